"""Hub-ready folders (scalevae.hub): contents, loading with and without the package, uploads, strict loading,
damaged files, atomic saves, version errors and the model card. Tiny random models; nothing reaches the network."""

import json
import os
import shutil
import subprocess
import sys
import textwrap
import uuid
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import AutoConfig, AutoModel
from transformers.dynamic_module_utils import check_imports, get_imports, get_relative_imports

import scalevae
import scalevae.card
from configuration_scalevae import SCALEVAE_FORMAT_VERSION
from scalevae import hub
from scalevae.card import card_template_path, non_default_hyperparameters, render_model_card
from tests.model_tester import ScaleVAEModelTester

REPO = Path(__file__).resolve().parents[1]
SENTENCES = ["the cat sat on the mat", "a second, somewhat longer sentence to encode"]

EXPECTED_FILES = {
    "README.md",
    "config.json",
    *hub.MODEL_CODE_FILES,
    "generation_config.json",
    "model.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
    "decoder_tokenizer/tokenizer.json",
    "decoder_tokenizer/tokenizer_config.json",
}


# One decoder layer, vocabularies of 100 and the default encoder positions: the sizes the card and mismatch checks name.
tester = ScaleVAEModelTester(vocab_size=100, decoder_layers=1, decoder_positions=64, encoder_positions=512)


def unique(tmp_path, stem="model"):
    """A folder name unique across tests: transformers names a local folder's remote-code module after its basename."""
    return tmp_path / f"{stem}_{uuid.uuid4().hex[:8]}"


@pytest.fixture(scope="module")
def model(tokenizers):
    model = tester.get_model_for_tokenizers(*tokenizers).eval()
    with torch.no_grad():  # trained-looking scale factors, so that a load that dropped them would show
        model.collapse.scale_factors.copy_(torch.tensor([0.5, 2.0, 3.0, 0.25]))
        model.collapse.steps.fill_(7)
    return model


@pytest.fixture(scope="module")
def saved(tmp_path_factory, model, tokenizers):
    folder = tmp_path_factory.mktemp("hub") / "saved_model"
    return hub.save_model(folder, model, *tokenizers, training={"dataset": "stdlib", "steps": 3})


@pytest.fixture
def remote_code_only(monkeypatch):
    """The auto classes as in a process without scalevae. transformers 5 prefers classes registered in-process over a
    folder's own code even with trust_remote_code=True, so the folder's code only runs once they are unregistered."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    monkeypatch.delitem(CONFIG_MAPPING._extra_content, scalevae.ScaleVAEConfig.model_type)
    monkeypatch.delitem(AutoModel._model_mapping._extra_content, scalevae.ScaleVAEConfig)


def reference_outputs(model, tokenizers):
    """Encoder posterior, teacher-forced logits and greedy generation, all deterministic (z given, no sampling)."""
    encoder_tokenizer, decoder_tokenizer = tokenizers
    batch = encoder_tokenizer(SENTENCES, padding=True, return_tensors="pt")
    decoder_batch = decoder_tokenizer(SENTENCES, padding=True, return_tensors="pt")
    with torch.no_grad():
        posterior = model.encode(batch["input_ids"], batch["attention_mask"])
        logits = model(
            latents=posterior.decoder_mu,
            decoder_input_ids=decoder_batch["input_ids"],
            decoder_attention_mask=decoder_batch["attention_mask"],
        ).logits
        generated = model.generate(latents=posterior.decoder_mu, max_new_tokens=8, do_sample=False)
    return {
        "input_ids": batch["input_ids"],
        "attention_mask": batch["attention_mask"],
        "decoder_input_ids": decoder_batch["input_ids"],
        "decoder_attention_mask": decoder_batch["attention_mask"],
        "mu": posterior.mu,
        "logvar": posterior.logvar,
        "decoder_mu": posterior.decoder_mu,
        "logits": logits,
        "generated": generated,
    }


def assert_same_outputs(loaded, model, tokenizers):
    expected, actual = reference_outputs(model, tokenizers), reference_outputs(loaded, tokenizers)
    for key in expected:
        assert torch.equal(expected[key], actual[key]), key


# -- (a) what a saved folder holds ------------------------------------------------------------------------------------


def test_saved_folder_holds_exactly_everything(saved, model):
    assert set(hub.folder_files(saved)) == EXPECTED_FILES
    assert hub.missing_files(saved) == []
    config = json.loads((saved / "config.json").read_text())
    assert config["auto_map"] == {
        "AutoConfig": "configuration_scalevae.ScaleVAEConfig",
        "AutoModel": "modeling_scalevae.ScaleVAEForLatentLM",
    }
    assert config["model_type"] == "scalevae"
    assert config["scalevae_version"] == scalevae.__version__
    assert config["scalevae_format_version"] == FORMAT
    for name in hub.MODEL_CODE_FILES:  # the code that wrote the folder, verbatim
        assert (saved / name).read_bytes() == (REPO / name).read_bytes()
    with safe_open(saved / "model.safetensors", framework="pt") as weights:
        assert torch.equal(weights.get_tensor("collapse.scale_factors"), model.collapse.scale_factors)
        assert weights.get_tensor("collapse.steps").item() == 7
    generation = json.loads((saved / "generation_config.json").read_text())
    assert (generation["bos_token_id"], generation["eos_token_id"]) == (
        model.config.decoder.bos_token_id,
        model.config.decoder.eos_token_id,
    )
    assert (saved / "README.md").read_text().startswith("---\n")
    # nothing left beside the folder by the atomic save
    assert [p.name for p in saved.parent.iterdir()] == [saved.name]


def test_plain_save_pretrained_carries_the_code(tmp_path, model):
    """What Trainer(push_to_hub=True) and checkpoints write: model.save_pretrained alone copies every code file."""
    model.save_pretrained(tmp_path)
    assert {*hub.MODEL_CODE_FILES, "config.json", "model.safetensors"} <= {p.name for p in tmp_path.iterdir()}
    auto_map = json.loads((tmp_path / "config.json").read_text())["auto_map"]
    assert set(auto_map) == {"AutoConfig", "AutoModel"}


def test_save_model_loads_back_with_the_package(saved, model, tokenizers):
    loaded, encoder_tokenizer, decoder_tokenizer = scalevae.load_pretrained(saved)
    assert type(loaded) is scalevae.ScaleVAEForLatentLM
    assert torch.equal(loaded.collapse.scale_factors, model.collapse.scale_factors)
    assert encoder_tokenizer(SENTENCES)["input_ids"] == tokenizers[0](SENTENCES)["input_ids"]
    assert decoder_tokenizer.bos_token_id == tokenizers[1].bos_token_id
    assert_same_outputs(loaded, model, tokenizers)


def test_auto_classes_use_the_installed_classes(saved):
    """scalevae.hub registers the classes with AutoConfig/AutoModel: the package's users need no remote code, and the
    installed code wins over a folder's copy even with trust_remote_code=True (transformers' rule for local code)."""
    for trust in (False, True):
        assert type(AutoConfig.from_pretrained(saved, trust_remote_code=trust)) is scalevae.ScaleVAEConfig
        assert type(AutoModel.from_pretrained(saved, trust_remote_code=trust)) is scalevae.ScaleVAEForLatentLM


# -- (b) remote code, in process ---------------------------------------------------------------------------------------


def test_remote_code_gives_identical_outputs(remote_code_only, tmp_path, model, tokenizers):
    folder = hub.save_model(unique(tmp_path), model, *tokenizers)
    config = AutoConfig.from_pretrained(folder, trust_remote_code=True)
    loaded = AutoModel.from_pretrained(folder, trust_remote_code=True).eval()
    # the classes come from the folder's own files, not from the installed modules
    assert type(config).__module__.startswith("transformers_modules.")
    assert type(loaded).__module__.startswith("transformers_modules.")
    assert type(loaded.config).__module__.startswith("transformers_modules.")
    assert torch.equal(loaded.collapse.scale_factors, model.collapse.scale_factors)
    assert_same_outputs(loaded, model, tokenizers)


def test_relative_import_passes_transformers_checks_and_both_import_ways(remote_code_only, tmp_path, model):
    model.save_pretrained(tmp_path)
    modeling = tmp_path / "modeling_scalevae.py"
    # transformers' checker skips try blocks: the top-level fallback import is not a requirement of the folder ...
    assert "configuration_scalevae" not in get_imports(modeling)
    third_party = set(get_imports(modeling)) - set(sys.stdlib_module_names)
    assert third_party <= {"torch", "transformers", "safetensors"}
    # ... while the relative imports are found, so the sibling files travel with the modeling file
    siblings = ["checks_scalevae", "configuration_scalevae", "distributions_scalevae", "loading_scalevae"]
    assert sorted(get_relative_imports(modeling)) == siblings
    assert sorted(check_imports(modeling)) == siblings
    # way 1: installed as top-level modules
    import configuration_scalevae
    import modeling_scalevae

    assert modeling_scalevae.ScaleVAEConfig is configuration_scalevae.ScaleVAEConfig
    # way 2: as a folder's remote code, the relative import resolves to the folder's own configuration file
    remote = type(AutoModel.from_pretrained(tmp_path, trust_remote_code=True))
    remote_module = sys.modules[remote.__module__]
    assert remote_module.ScaleVAEConfig.__module__ == remote.__module__.rsplit(".", 1)[0] + ".configuration_scalevae"
    assert remote_module.ScaleVAEConfig is not configuration_scalevae.ScaleVAEConfig


# -- (c) a fresh environment without the package --------------------------------------------------------------------------

FRESH_SCRIPT = textwrap.dedent(
    """
    import importlib.util, json, sys
    import torch
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModel, AutoTokenizer

    folder, reference, sentences, report = sys.argv[1], sys.argv[2], json.loads(sys.argv[3]), sys.argv[4]
    modules = ("scalevae", "configuration_scalevae", "modeling_scalevae", "checks_scalevae", "loading_scalevae",
               "distributions_scalevae")
    importable = [m for m in modules if importlib.util.find_spec(m)]
    assert not importable, f"{importable} importable: this check must run without the package"
    ref = load_file(reference)
    config = AutoConfig.from_pretrained(folder, trust_remote_code=True)
    model = AutoModel.from_pretrained(folder, trust_remote_code=True).eval()
    encoder_tokenizer = AutoTokenizer.from_pretrained(folder)
    decoder_tokenizer = AutoTokenizer.from_pretrained(folder, subfolder="decoder_tokenizer")
    batch = encoder_tokenizer(sentences, padding=True, return_tensors="pt")
    decoder_batch = decoder_tokenizer(sentences, padding=True, return_tensors="pt")
    with torch.no_grad():
        posterior = model.encode(batch["input_ids"], batch["attention_mask"])
        logits = model(latents=posterior.decoder_mu, decoder_input_ids=decoder_batch["input_ids"],
                       decoder_attention_mask=decoder_batch["attention_mask"]).logits
        generated = model.generate(latents=ref["decoder_mu"], max_new_tokens=8, do_sample=False)
    actual = dict(input_ids=batch["input_ids"], decoder_input_ids=decoder_batch["input_ids"], mu=posterior.mu,
                  logvar=posterior.logvar, decoder_mu=posterior.decoder_mu, logits=logits, generated=generated)
    open(report, "w").write(json.dumps({
        "module": type(model).__module__,
        "config_module": type(config).__module__,
        "differ": [key for key, value in actual.items() if not torch.equal(value, ref[key])],
        "text": decoder_tokenizer.batch_decode(generated, skip_special_tokens=True),
    }))
    """
)


@pytest.mark.slow
def test_fresh_venv_without_the_package_reproduces_the_model(tmp_path, model, tokenizers):
    import transformers

    folder = hub.save_model(tmp_path / "folder" / "fresh_model", model, *tokenizers)
    reference = reference_outputs(model, tokenizers)
    save_file({k: v.contiguous() for k, v in reference.items()}, tmp_path / "reference.safetensors")
    expected_text = tokenizers[1].batch_decode(reference["generated"], skip_special_tokens=True)

    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")}
    venv = tmp_path / "venv"
    try:
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, env=env)
        python = str(venv / "bin" / "python")
        install = [
            python,
            "-m",
            "pip",
            "install",
            "-q",
            "torch==2.13.0",
            f"transformers=={transformers.__version__}",
            "safetensors",
        ]
        installed = subprocess.run(install, env=env, capture_output=True, text=True, timeout=1500)
        assert installed.returncode == 0, installed.stdout[-2000:] + installed.stderr[-4000:]

        script = tmp_path / "work" / "check.py"
        script.parent.mkdir()
        script.write_text(FRESH_SCRIPT)
        env.update(HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf_home"), PYTHONNOUSERSITE="1")
        result = subprocess.run(
            [
                python,
                str(script),
                str(folder),
                str(tmp_path / "reference.safetensors"),
                json.dumps(SENTENCES),
                str(tmp_path / "report.json"),
            ],
            cwd=script.parent,
            env=env,
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    finally:
        shutil.rmtree(venv, ignore_errors=True)  # about a gigabyte of torch
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["module"].startswith("transformers_modules.") and report["config_module"].startswith(
        "transformers_modules."
    )
    assert report["differ"] == []
    assert report["text"] == expected_text


# -- (d) uploads ---------------------------------------------------------------------------------------------------------


class RecordingHub:
    """Stands in for the Hub at huggingface_hub's HfApi layer and records what would be sent."""

    def __init__(self, monkeypatch, remote_files=()):
        import huggingface_hub
        from huggingface_hub import HfApi
        from huggingface_hub.hf_api import RepoUrl

        self.calls, self.commits, self.remote_files = [], [], list(remote_files)
        monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # anything unpatched fails, offline

        def create_repo(api, repo_id, **kwargs):
            self.calls.append(("create_repo", repo_id, kwargs))
            return RepoUrl(f"https://huggingface.co/{repo_id}")

        def list_repo_files(api, repo_id, **kwargs):
            self.calls.append(("list_repo_files", repo_id, kwargs))
            return list(self.remote_files)

        def create_commit(api, repo_id, operations, **kwargs):
            operations = list(operations)
            for op in operations:  # the bytes that would go up are readable now
                if hasattr(op, "path_or_fileobj"):
                    assert Path(op.path_or_fileobj).is_file()
            self.commits.append((repo_id, operations, kwargs))
            return "commit-info"

        monkeypatch.setattr(HfApi, "create_repo", create_repo)
        monkeypatch.setattr(HfApi, "list_repo_files", list_repo_files)
        monkeypatch.setattr(HfApi, "create_commit", create_commit)
        monkeypatch.setattr(HfApi, "upload_folder", lambda *a, **k: pytest.fail("push_to_hub must make one commit"))

    def single_commit(self):
        from huggingface_hub import CommitOperationAdd, CommitOperationDelete

        assert len(self.commits) == 1
        repo_id, operations, kwargs = self.commits[0]
        added = {op.path_in_repo for op in operations if isinstance(op, CommitOperationAdd)}
        deleted = {op.path_in_repo for op in operations if isinstance(op, CommitOperationDelete)}
        return repo_id, added, deleted, kwargs


def test_push_folder_uploads_every_file_in_one_commit(monkeypatch, saved):
    recorder = RecordingHub(
        monkeypatch, remote_files=[".gitattributes", "README.md", "model-00001-of-00002.safetensors"]
    )
    assert hub.push_to_hub(saved, "someone/scalevae-tiny", commit_message="v1") == "commit-info"
    repo_id, added, deleted, kwargs = recorder.single_commit()
    assert repo_id == "someone/scalevae-tiny"
    assert added == EXPECTED_FILES  # card and code included
    assert deleted == {"model-00001-of-00002.safetensors"}  # stale, and .gitattributes kept
    assert kwargs["commit_message"] == "v1"
    assert recorder.calls[0][0] == "create_repo"


def test_push_model_saves_then_uploads(monkeypatch, model, tokenizers):
    recorder = RecordingHub(monkeypatch)
    hub.push_to_hub(
        model,
        "someone/another",
        encoder_tokenizer=tokenizers[0],
        decoder_tokenizer=tokenizers[1],
        metrics={"nll": 12.5},
        delete_stale=False,
    )
    _, added, deleted, _ = recorder.single_commit()
    assert added == EXPECTED_FILES and deleted == set()
    with pytest.raises(TypeError, match="encoder_tokenizer"):
        hub.push_to_hub(model, "someone/another")


def test_push_refuses_an_incomplete_folder(monkeypatch, tmp_path, model):
    RecordingHub(monkeypatch)
    model.save_pretrained(tmp_path)  # no tokenizers, no card
    with pytest.raises(FileNotFoundError, match="README.md"):
        hub.push_to_hub(tmp_path, "someone/x")


# -- (e) config and weights must agree -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def small_folders(tmp_path_factory):
    """Plain save_pretrained folders of tiny models: latent_injection "both" and "memory"."""
    root = tmp_path_factory.mktemp("small")
    folders = {}
    for injection in ("both", "memory"):
        folders[injection] = root / injection
        tester.get_model(latent_injection=injection).save_pretrained(folders[injection])
    return folders


def test_latent_size_mismatch_names_both_values(small_folders):
    with pytest.raises(ValueError, match=r"latent_size=8 in the config.*saved with latent_size=4"):
        scalevae.ScaleVAEForLatentLM.from_pretrained(small_folders["both"], config=tester.get_config(latent_size=8))
    with pytest.raises(ValueError, match=r"latent_size=8 in the config.*saved with latent_size=4"):
        scalevae.ScaleVAEForLatentLM.from_pretrained(small_folders["both"], latent_size=8)


def test_missing_injection_weights_are_an_error_not_a_fresh_layer(small_folders):
    with pytest.raises(
        ValueError,
        match=r"latent_injection='both' expects injection.to_embedding.bias and injection.to_embedding.weight, which "
        r"the weights file lacks \(was it saved with latent_injection='memory'\?\)",
    ):
        scalevae.ScaleVAEForLatentLM.from_pretrained(
            small_folders["memory"], config=tester.get_config(latent_injection="both")
        )
    with pytest.raises(ValueError, match=r"holds injection.to_embedding.*latent_injection='memory' does not use"):
        scalevae.ScaleVAEForLatentLM.from_pretrained(
            small_folders["both"], config=tester.get_config(latent_injection="memory")
        )


def test_vocabulary_mismatch_names_both_values(small_folders):
    with pytest.raises(ValueError, match=r"decoder.vocab_size=120 in the config.*saved with decoder.vocab_size=100"):
        scalevae.ScaleVAEForLatentLM.from_pretrained(
            small_folders["both"], config=tester.get_config(decoder_vocab_size=120)
        )
    with pytest.raises(ValueError, match=r"encoder.vocab_size=120 in the config.*saved with encoder.vocab_size=100"):
        config = tester.get_config()
        config.encoder.vocab_size = 120
        scalevae.ScaleVAEForLatentLM.from_pretrained(small_folders["both"], config=config)


def test_collapse_strategy_without_its_buffers_is_an_error(small_folders):
    with pytest.raises(ValueError, match=r"holds collapse.*collapse_strategy='vae' does not use.*'scale'"):
        scalevae.ScaleVAEForLatentLM.from_pretrained(
            small_folders["both"], config=tester.get_config(collapse_strategy="vae")
        )


def test_strict_loading_keeps_the_usual_api(small_folders):
    model, info = scalevae.ScaleVAEForLatentLM.from_pretrained(small_folders["both"], output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    # an explicit request to re-initialise resized layers is honoured (it is not silent: the caller asked)
    resized = scalevae.ScaleVAEForLatentLM.from_pretrained(
        small_folders["both"],
        config=tester.get_config(decoder_vocab_size=120, latent_injection="both"),
        ignore_mismatched_sizes=True,
    )
    assert resized.decoder.transformer.wte.weight.shape[0] == 120


def test_mismatch_is_caught_through_remote_code_too(remote_code_only, small_folders, tmp_path):
    folder = unique(tmp_path)
    shutil.copytree(small_folders["memory"], folder)
    config = json.loads((folder / "config.json").read_text())
    config["latent_injection"] = "both"  # a config edited by hand to disagree with its weights
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"latent_injection='both' expects injection.to_embedding"):
        AutoModel.from_pretrained(folder, trust_remote_code=True)


# -- (f) damaged files and interrupted saves -----------------------------------------------------------------------------


@pytest.mark.parametrize("damage", ["truncated", "header", "empty"])
def test_damaged_weights_fail_clearly(remote_code_only, small_folders, tmp_path, damage, tokenizers):
    folder = unique(tmp_path)
    shutil.copytree(small_folders["both"], folder)
    scalevae.save_tokenizers(folder, *tokenizers)  # load_pretrained checks for them first
    weights = folder / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(
        {"truncated": data[: len(data) // 2], "header": data[:8] + b"#" * 40 + data[48:], "empty": b""}[damage]
    )
    with pytest.raises(OSError, match=r"model\.safetensors is truncated or corrupted"):
        scalevae.ScaleVAEForLatentLM.from_pretrained(folder)
    with pytest.raises(OSError, match=r"model\.safetensors is truncated or corrupted"):
        scalevae.load_pretrained(folder)
    with pytest.raises(OSError, match=str(weights).replace(".", r"\.")):
        AutoModel.from_pretrained(folder, trust_remote_code=True)


def test_interrupted_save_leaves_the_old_folder_intact(monkeypatch, tmp_path, model, tokenizers):
    folder = hub.save_model(tmp_path / "atomic_model", model, *tokenizers)
    before = {name: (folder / name).read_bytes() for name in hub.folder_files(folder)}
    other = scalevae.ScaleVAEForLatentLM(model.config)  # different weights

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt("killed while writing the card")

    monkeypatch.setattr(hub, "write_model_card", interrupted)
    with pytest.raises(KeyboardInterrupt):
        hub.save_model(folder, other, *tokenizers)
    assert {name: (folder / name).read_bytes() for name in hub.folder_files(folder)} == before
    assert [p.name for p in tmp_path.iterdir()] == ["atomic_model"]  # the half-written folder is gone
    loaded = scalevae.ScaleVAEForLatentLM.from_pretrained(folder)
    assert torch.equal(loaded.latent_head.proj.weight, model.latent_head.proj.weight)


def test_failed_swap_puts_the_old_folder_back(monkeypatch, tmp_path, model, tokenizers):
    folder = hub.save_model(tmp_path / "swap_model", model, *tokenizers)
    before = {name: (folder / name).read_bytes() for name in hub.folder_files(folder)}
    real_rename, renames = os.rename, []

    def failing_rename(src, dst):
        renames.append((src, dst))
        if len(renames) == 2:  # the old folder is aside; moving the new one in fails
            raise OSError("disk full")
        real_rename(src, dst)

    monkeypatch.setattr(hub.os, "rename", failing_rename)
    with pytest.raises(OSError, match="disk full"):
        hub.save_model(folder, scalevae.ScaleVAEForLatentLM(model.config), *tokenizers)
    monkeypatch.setattr(hub.os, "rename", real_rename)
    assert {name: (folder / name).read_bytes() for name in hub.folder_files(folder)} == before
    assert [p.name for p in tmp_path.iterdir()] == ["swap_model"]


def test_a_save_killed_between_the_renames_is_recovered(tmp_path, model, tokenizers):
    folder = hub.save_model(tmp_path / "killed_model", model, *tokenizers)
    os.rename(folder, tmp_path / ".killed_model.old-deadbeef")  # the state a kill between the two renames leaves
    hub.save_model(folder, model, *tokenizers)
    assert hub.missing_files(folder) == []


def test_save_model_refuses_to_replace_a_folder_that_is_not_a_model(tmp_path, model, tokenizers):
    (tmp_path / "notes.txt").write_text("precious")
    with pytest.raises(FileExistsError, match="no ScaleVAE config.json"):
        hub.save_model(tmp_path, model, *tokenizers)
    assert (tmp_path / "notes.txt").read_text() == "precious"


# -- (g) version safety ----------------------------------------------------------------------------------------------------


def edited_copy(folder, tmp_path, edit):
    copy = unique(tmp_path)
    shutil.copytree(folder, copy)
    config = json.loads((copy / "config.json").read_text())
    edit(config)
    (copy / "config.json").write_text(json.dumps(config))
    return copy


LOADERS = {
    "package": lambda folder: scalevae.ScaleVAEForLatentLM.from_pretrained(folder),
    "remote_code": lambda folder: AutoModel.from_pretrained(folder, trust_remote_code=True),
}
FORMAT = SCALEVAE_FORMAT_VERSION
INSTALLED = f"installed: scalevae {scalevae.__version__} (format {FORMAT})"


@pytest.mark.parametrize("loader", sorted(LOADERS))
def test_newer_format_names_the_versions(remote_code_only, saved, tmp_path, loader):
    newer = FORMAT + 1
    folder = edited_copy(saved, tmp_path, lambda c: c.update(scalevae_format_version=newer, scalevae_version="9.0.0"))
    with pytest.raises(ValueError, match=rf"scalevae_format_version={newer} was written by a newer scalevae") as error:
        LOADERS[loader](folder)
    assert f"saved by scalevae 9.0.0 (format {newer})" in str(error.value) and INSTALLED in str(error.value)


@pytest.mark.parametrize("loader", sorted(LOADERS))
def test_unknown_collapse_strategy_names_field_and_versions(remote_code_only, saved, tmp_path, loader):
    folder = edited_copy(saved, tmp_path, lambda c: c.update(collapse_strategy="magic", scalevae_version="0.9.0"))
    with pytest.raises(ValueError, match=r"collapse_strategy='magic' is not one of") as error:
        LOADERS[loader](folder)
    assert f"saved by scalevae 0.9.0 (format {FORMAT})" in str(error.value) and INSTALLED in str(error.value)


@pytest.mark.parametrize("loader", sorted(LOADERS))
def test_missing_field_names_field_and_versions(remote_code_only, saved, tmp_path, loader):
    folder = edited_copy(saved, tmp_path, lambda c: c.pop("latent_size"))
    with pytest.raises(ValueError, match=r"lacks the required field\(s\) latent_size") as error:
        LOADERS[loader](folder)
    assert f"saved by scalevae {scalevae.__version__} (format {FORMAT})" in str(error.value)
    assert INSTALLED in str(error.value)


def test_partial_dicts_still_build_configs():
    """Only a saved config (one naming its model_type) must be complete; a user's partial dict gets defaults."""
    assert scalevae.ScaleVAEConfig.from_dict({"latent_size": 8}).latent_size == 8


# -- (h) the model card ------------------------------------------------------------------------------------------------------


def table_row(card, name):
    return next(line for line in card.splitlines() if line.startswith(f"| {name} |"))


def test_card_without_metrics_claims_nothing(model):
    card = render_model_card(model, training={"dataset": "stdlib", "steps": 3, "command": "scalevae train --steps 3"})
    metadata = card.split("---\n")[1]
    assert "model-index" not in metadata
    assert "license: apache-2.0" in metadata and "library_name: transformers" in metadata
    for tag in ("scalevae", "vae", "text-generation"):
        assert f"- {tag}\n" in metadata
    for name in ("NLL", "PPL", "KL", "MI", "AU", "Reconstruction BLEU"):
        assert "| not evaluated |" in table_row(card, name)
    assert "has not been evaluated" in card
    assert "scalevae train --steps 3" in card and "3 optimizer steps" in card
    assert "$" not in card


def test_card_reports_measured_figures_only(model):
    metrics = {
        "eval_nll": 31.234,
        "ppl": 45.6,
        "kl": 5.0,
        "mi": 3.1,
        "au": 4,
        "reconstruction_bleu": 40.5,
        "dataset": "stdlib",
        "split": "test",
    }
    card = render_model_card(model, metrics=metrics)
    assert "| 31.23 |" in table_row(card, "NLL") and "| 4 |" in table_row(card, "AU")
    assert "| 40.50 |" in table_row(card, "Reconstruction BLEU")
    assert "not evaluated" not in card.split("## Evaluation")[1].split("## How to load")[0]
    metadata = card.split("---\n")[1]
    assert "model-index" in metadata and "value: 31.234" in metadata and "split: test" in metadata
    partial = render_model_card(
        model, metrics={"nll": 30.0, "control_examples": {"1": [["a source sentence", "its edited twin", "1"]]}}
    )
    assert "| 30.00 |" in table_row(partial, "NLL") and "| not evaluated |" in table_row(partial, "KL")
    assert "control_examples" not in partial and "edited twin" not in partial  # examples are not a figure of the card
    with pytest.raises(ValueError, match="infinite"):
        render_model_card(model, metrics={"nll": float("inf")})


def test_card_takes_evaluate_model_output_as_it_is(model):
    """`evaluate_model` returns NaN for what it did not compute, counts, and further figures; the CLI adds `bleu` and
    the quickstart timings, and describes its data and evaluation in `training`."""
    nan = float("nan")
    metrics = {
        "nll": nan,
        "ppl": nan,
        "elbo": nan,
        "kl": 4.25,
        "decoder_kl": 6.5,
        "mi": 2.0,
        "au": 3,
        "au_decoder": 4,
        "shuffle_gap": 1.5,
        "num_sentences": 200,
        "num_tokens": 3000,
        "bleu": 12.0,
        "train_seconds": 60.0,
    }
    training = {
        "data": "embedded default corpus, 900 training sentences",
        "steps": 50,
        "batch_size": 16,
        "evaluation": "200 test sentences, 0 importance samples",
        "command": "scalevae quickstart",
    }
    card = render_model_card(model, metrics=metrics, training=training)
    assert "| not evaluated |" in table_row(card, "NLL") and "| not evaluated |" in table_row(card, "PPL")
    assert "| 4.25 |" in table_row(card, "KL") and "| 12.00 |" in table_row(card, "Reconstruction BLEU")
    assert "| 6.50 |" in table_row(card, "decoder_kl") and "| 60.00 |" in table_row(card, "train_seconds")
    assert "elbo" not in card.split("## Evaluation")[1].split("## How to load")[0]
    assert not any(line.startswith("| num_sentences") for line in card.splitlines())
    assert "200 test sentences, 0 importance samples; num_sentences = 200; num_tokens = 3000" in card
    assert "embedded default corpus, 900 training sentences." in card and "`batch_size` = `16`" in card
    metadata = card.split("---\n")[1]
    assert "type: decoder_kl" in metadata and "train_seconds" not in metadata and "type: nll" not in metadata


def test_card_lists_every_non_default_hyperparameter(model):
    hyper = non_default_hyperparameters(model.config)
    assert hyper["latent_size"] == (4, 32)
    assert hyper["decoder.n_layer"] == (1, 12)
    assert "kl_weight" not in hyper and "scalevae_version" not in hyper and "auto_map" not in hyper
    card = render_model_card(model)
    assert "| `latent_size` | `4` | `32` |" in card
    assert "| `decoder.n_embd` | `32` | `768` |" in card
    baseline = tester.get_model(collapse_strategy="free_bits", free_bits=0.25)
    card = render_model_card(baseline)
    assert "| `free_bits` | `0.25` | `0.5` |" in card and "baseline, not Scale-VAE" in card


def test_card_template_is_the_repository_file():
    assert card_template_path() == REPO / "model_card.md"
    text = card_template_path().read_text()
    assert "Song et al." in text and "LREC-COLING 2024" in text and "not available" in text


def test_installed_package_reads_the_shipped_template(monkeypatch, tmp_path):
    """Outside a source checkout (no setup.py beside the package) the template is the copy in scalevae/templates/."""
    package = tmp_path / "site-packages" / "scalevae"
    (package / "templates").mkdir(parents=True)
    (tmp_path / "site-packages" / "model_card.md").write_text("some other project's file")
    monkeypatch.setattr(scalevae.card, "__file__", str(package / "card.py"))
    with pytest.raises(FileNotFoundError, match="reinstall scalevae"):
        card_template_path()
    shutil.copyfile(REPO / "model_card.md", package / "templates" / "model_card.md")
    assert card_template_path() == package / "templates" / "model_card.md"
