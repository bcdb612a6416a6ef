"""Reliability and security (issue 9): reproducible and resumable CLI training, folders free of secrets and machine
paths, saves that keep the newest complete model, verified weights, and clear errors for bad inputs and folders."""

import getpass
import json
import logging
import os
import shutil
import types
from argparse import Namespace
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import scalevae
from modeling_scalevae import ScaleVAEEncoderOutput
from scalevae import LatentText, hub, metrics
from scalevae.card import public_command
from scalevae.cli import main
from scalevae.compare import choose_des_std
from scalevae.data import load_text_dataset
from scalevae.options import (
    COMMAND_OPTIONS,
    OptionError,
    check_max_length,
    check_output_folder,
    number,
    validate_options,
)
from tests.conftest import shared_file
from tests.model_tester import strategies_and_injections, tester

TOKEN = "hf_" + "Zq7" * 10  # what a real access token looks like


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny tensors on shared CPUs: intra-op threads only contend. Module-wide, so that the runs compared bit for bit
    (an interrupted and an uninterrupted one) add their floats in the same order."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def train_args(output_dir, encoder, data, *extra):
    return [
        "train",
        "--output_dir",
        str(output_dir),
        "--encoder",
        encoder,
        "--latent_size",
        "4",
        "--train_file",
        str(data),
        "--max_length",
        "16",
        "--per_device_train_batch_size",
        "4",
        "--report_to",
        "none",
        "--use_cpu",
        "--decoder_layers",
        "1",
        "--decoder_width",
        "32",
        "--decoder_heads",
        "2",
        "--seed",
        "0",
        "--logging_steps",
        "2",
        *extra,
    ]


def tensors(folder):
    return load_file(str(Path(folder) / "model.safetensors"))


def assert_same_tensors(a, b):
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


@pytest.fixture(scope="module")
def train_data(tmp_path_factory):
    """The first 64 sentences of PTB's validation file, as a local file."""
    lines = shared_file("ptb.valid.txt").read_text().splitlines()[:64]
    path = tmp_path_factory.mktemp("data") / "ptb.train.txt"
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture(scope="module")
def run_a(tmp_path_factory, tiny_encoder_path, train_data):
    """6 steps, a checkpoint every 3, a token on the command line (it must not be recorded)."""
    output = tmp_path_factory.mktemp("run_a")
    main(
        train_args(
            output, tiny_encoder_path, train_data, "--max_steps", "6", "--save_steps", "3", "--hub_token", TOKEN
        )
    )
    return output


# -- 1. reproducible and resumable training ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def run_b(tmp_path_factory, tiny_encoder_path, train_data):
    """Run A again, in another process's shoes: same command, another folder."""
    output = tmp_path_factory.mktemp("run_b")
    main(train_args(output, tiny_encoder_path, train_data, "--max_steps", "6", "--save_steps", "3"))
    return output


def test_same_seed_gives_bit_identical_weights(run_a, run_b):
    assert_same_tensors(tensors(run_a / "final"), tensors(run_b / "final"))


def test_resume_from_a_checkpoint_matches_the_uninterrupted_run(run_a, run_b, tmp_path, tiny_encoder_path, train_data):
    # run B killed right after its step-3 checkpoint: only that checkpoint is left
    shutil.copytree(run_b / "checkpoint-3", tmp_path / "checkpoint-3")
    main(
        train_args(
            tmp_path,
            tiny_encoder_path,
            train_data,
            "--max_steps",
            "6",
            "--save_steps",
            "3",
            "--resume_from_checkpoint",
            str(tmp_path / "checkpoint-3"),
        )
    )
    resumed, uninterrupted = tensors(tmp_path / "final"), tensors(run_a / "final")
    assert_same_tensors(resumed, uninterrupted)
    assert not torch.equal(uninterrupted["collapse.scale_factors"], torch.ones(4))  # the factors did move


def test_resume_with_another_model_setting_names_the_field(run_a, tmp_path, tiny_encoder_path, train_data):
    with pytest.raises(ValueError, match=r"collapse_strategy='vae' now, 'scale' in the checkpoint"):
        main(
            train_args(
                tmp_path,
                tiny_encoder_path,
                train_data,
                "--max_steps",
                "6",
                "--collapse_strategy",
                "vae",
                "--resume_from_checkpoint",
                str(run_a / "checkpoint-3"),
            )
        )
    assert not (tmp_path / "final").exists()


@pytest.mark.parametrize("steps", ["0", "-2"])
def test_max_steps_zero_is_refused(tmp_path, tiny_encoder_path, train_data, steps):
    with pytest.raises(ValueError, match=rf"--max_steps {steps}: must be a whole number >= 1"):
        main(train_args(tmp_path, tiny_encoder_path, train_data, "--max_steps", steps))
    assert not (tmp_path / "final").exists()


def test_max_length_beyond_the_decoder_positions_is_refused(tmp_path, tiny_encoder_path, train_data):
    with pytest.raises(
        ValueError,
        match=r"--max_length 200: must be a whole number in \[2, \d+\] \(the encoder takes \d+ tokens, the decoder 128 positions",
    ):
        main(train_args(tmp_path, tiny_encoder_path, train_data, "--max_steps", "1") + ["--max_length", "200"])


def test_one_sentence_files_train(tmp_path, tiny_encoder_path):
    one = tmp_path / "one.txt"
    one.write_text("the only sentence of this file\n")
    main(
        train_args(
            tmp_path / "run",
            tiny_encoder_path,
            one,
            "--validation_file",
            str(one),
            "--max_steps",
            "2",
            "--logging_steps",
            "1",
            "--save_strategy",
            "no",
        )
    )
    assert (tmp_path / "run" / "final" / "model.safetensors").exists()


# -- 2. no secrets, no machine paths ----------------------------------------------------------------------------------


def test_published_folders_hold_no_token_path_or_user_name(run_a, tiny_encoder_path, train_data):
    home, user = str(Path.home()), getpass.getuser()
    private = [
        TOKEN,
        str(run_a),
        tiny_encoder_path,
        str(train_data),
        str(train_data.parent),
        home,
        f"/{user}/",
        f"-of-{user}",
        os.path.dirname(scalevae.__file__),
    ]
    for folder in (run_a / "final", run_a / "checkpoint-3"):
        # what push_to_hub uploads: no Trainer state (its training_args.bin holds the token)
        files = hub.folder_files(folder)
        assert "model.safetensors" in files and "training_args.bin" not in files
        for name in files:
            path = folder / name
            text = path.read_bytes().decode("utf-8", errors="replace")
            for secret in private:
                assert secret not in text, (path.relative_to(folder), secret)
    card = (run_a / "final" / "README.md").read_text()
    assert "--hub_token '***'" in card and "local file `ptb.train.txt`" in card
    config = json.loads((run_a / "final" / "config.json").read_text())
    assert config["encoder"]["_name_or_path"] == Path(tiny_encoder_path).name


def test_public_command_hides_credentials_and_local_paths(tmp_path):
    data = tmp_path / "corpus.txt"
    data.write_text("x\n")
    command = public_command(
        [
            "scalevae",
            "train",
            "--hub_token",
            TOKEN,
            "--api_key=abc",
            "--db_password",
            "pw",
            "--client_secret",
            "s3",
            "--use_auth_token",
            "--train_file",
            str(data),
            "--run_name",
            f"x{TOKEN}",
        ]
    )
    assert command == (
        "scalevae train --hub_token '***' '--api_key=***' --db_password '***' --client_secret '***' "
        "--use_auth_token --train_file corpus.txt --run_name 'x***'"
    )


# -- 3. saves ---------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def parts(tiny_encoder_path):
    return tester.build(tiny_encoder_path)


def other_weights(model, seed):
    torch.manual_seed(seed)
    other = scalevae.ScaleVAEForLatentLM(model.config)
    with torch.no_grad():
        other.collapse.scale_factors.fill_(float(seed))
    return other


def test_recovery_restores_the_newest_complete_save_not_the_newest_mtime(tmp_path, parts):
    model, *tokenizers = parts
    folder = tmp_path / "model"
    older = hub.save_model(tmp_path / "v1", other_weights(model, 1), *tokenizers)
    newer = hub.save_model(tmp_path / "v2", other_weights(model, 2), *tokenizers)
    partly_deleted = hub.save_model(tmp_path / "v3", other_weights(model, 3), *tokenizers)
    (partly_deleted / "model.safetensors").unlink()
    os.rename(newer, tmp_path / ".model.old-00000002")
    os.rename(older, tmp_path / ".model.old-00000001")
    os.rename(partly_deleted, tmp_path / ".model.tmp-00000003")
    for age, name in enumerate([".model.old-00000002", ".model.old-00000001", ".model.tmp-00000003"]):
        os.utime(tmp_path / name, (1e9 + age * 1e6, 1e9 + age * 1e6))  # newest mtime: the incomplete one
    assert hub.recover_interrupted_save(folder) == folder
    assert tensors(folder)["collapse.scale_factors"].tolist() == [2.0] * 4
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]  # leftovers cleaned


def test_a_save_cleans_the_leftovers_of_killed_saves(tmp_path, parts):
    folder = hub.save_model(tmp_path / "model", *parts)
    for name in (".model.tmp-deadbeef", ".model.old-cafebabe"):
        (tmp_path / name / "decoder_tokenizer").mkdir(parents=True)
        (tmp_path / name / "config.json").write_text("{}")
    hub.save_model(folder, *parts)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_every_saved_file_gets_the_same_permissions(tmp_path, parts, umask):
    previous = os.umask(umask)
    try:
        folder = hub.save_model(tmp_path / "model", *parts)
    finally:
        os.umask(previous)
    modes = {p.relative_to(folder).as_posix(): p.stat().st_mode & 0o777 for p in folder.rglob("*") if p.is_file()}
    assert set(modes.values()) == {0o666 & ~umask}, modes


# -- 4. verified weights ----------------------------------------------------------------------------------------------


def flip_bit(path, tensor_name):
    """Flip one bit in the first byte of a tensor's data."""
    with open(path, "rb") as handle:
        length = int.from_bytes(handle.read(8), "little")
        header = json.loads(handle.read(length))
    data = bytearray(Path(path).read_bytes())
    data[8 + length + header[tensor_name]["data_offsets"][0] + 3] ^= 0x40
    Path(path).write_bytes(bytes(data))


@pytest.mark.parametrize("tensor", ["collapse.scale_factors", "encoder.embeddings.word_embeddings.weight"])
def test_a_flipped_bit_fails_loading_naming_the_file(tmp_path, parts, tensor):
    folder = hub.save_model(tmp_path / "model", *parts)
    weights = folder / "model.safetensors"
    flip_bit(weights, tensor)
    with pytest.raises(OSError, match=rf"{weights}.* is corrupted.*verify_weights=False"):
        scalevae.ScaleVAEForLatentLM.from_pretrained(folder)
    with pytest.raises(OSError, match="is corrupted"):
        LatentText.from_pretrained(folder)
    loaded = scalevae.ScaleVAEForLatentLM.from_pretrained(folder, verify_weights=False)  # the opt-out
    assert not torch.equal(loaded.state_dict()[tensor], parts[0].state_dict()[tensor])


def test_every_save_records_the_checksum_and_older_folders_load(tmp_path, parts):
    model = parts[0]
    model.save_pretrained(tmp_path / "plain")  # what Trainer checkpoints and push_to_hub call
    with safe_open(str(tmp_path / "plain" / "model.safetensors"), "pt") as handle:
        assert handle.metadata()["scalevae_weights_checksum"].startswith("scalevae-checksum-1:")
    # a folder saved before checksums existed loads as before
    state = load_file(str(tmp_path / "plain" / "model.safetensors"))
    save_file(state, str(tmp_path / "plain" / "model.safetensors"), metadata={"format": "pt"})
    loaded = scalevae.ScaleVAEForLatentLM.from_pretrained(tmp_path / "plain")
    assert torch.equal(loaded.latent_head.proj.weight, model.latent_head.proj.weight)


def test_every_shard_is_verified(tmp_path, parts):
    model = parts[0]
    model.save_pretrained(tmp_path / "sharded", max_shard_size="100KB")
    index = json.loads((tmp_path / "sharded" / "model.safetensors.index.json").read_text())
    shard = index["weight_map"]["collapse.scale_factors"]
    flip_bit(tmp_path / "sharded" / shard, "collapse.scale_factors")
    with pytest.raises(OSError, match=rf"{shard} is corrupted"):
        scalevae.ScaleVAEForLatentLM.from_pretrained(tmp_path / "sharded")


# -- 5. folders without tokenizers ------------------------------------------------------------------------------------


def test_trainer_checkpoints_are_complete_folders(run_a):
    checkpoint = run_a / "checkpoint-3"
    assert hub.missing_files(checkpoint) == []
    text = LatentText.from_pretrained(checkpoint)
    assert len(text.sample(2, max_new_tokens=3)) == 2


def test_folders_without_tokenizers_say_which_and_how_to_fix(tmp_path, parts, capsys):
    model, encoder_tokenizer, decoder_tokenizer = parts
    model.save_pretrained(tmp_path / "bare")
    with pytest.raises(FileNotFoundError, match=r"no encoder tokenizer.*scalevae\.save_tokenizers"):
        LatentText.from_pretrained(tmp_path / "bare")
    encoder_tokenizer.save_pretrained(tmp_path / "bare")
    for load in (
        LatentText.from_pretrained,
        scalevae.load_pretrained,
        lambda folder: main(["generate", str(folder), "--sample", "1"]),
    ):
        with pytest.raises(FileNotFoundError, match=r"no decoder tokenizer \(no decoder_tokenizer/ folder"):
            load(tmp_path / "bare")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        LatentText.from_pretrained(tmp_path / "no_such_model")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        main(["generate", "outputs/no/such/model", "--sample", "1"])


# -- 6. bad inputs ----------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def small():
    return tester.get_model(dropout=0.0).eval()


@pytest.mark.parametrize(
    "name, value, match",
    [
        (
            "input_ids",
            120,
            r"input_ids holds the token id 120, outside the encoder's vocabulary: valid ids are 0 to 119",
        ),
        ("input_ids", -1, r"input_ids holds the token id -1"),
        ("decoder_input_ids", 500, r"decoder_input_ids holds the token id 500.*decoder's vocabulary"),
        ("labels", 120, r"labels holds the token id 120.*\(or -100 for ignored positions\)"),
        ("labels", -5, r"labels holds the token id -5"),
    ],
)
def test_token_ids_outside_the_vocabulary(small, name, value, match):
    batch = tester.prepare_inputs()
    batch[name][0, 0] = value
    with pytest.raises(ValueError, match=match):
        small(**batch)


def test_batch_sizes_that_differ_name_both_inputs(small):
    batch = tester.prepare_inputs(batch_size=4)
    batch["decoder_input_ids"] = batch["decoder_input_ids"][:3]
    batch.pop("decoder_attention_mask")
    batch.pop("labels")
    with pytest.raises(ValueError, match=r"input_ids has 4, decoder_input_ids has 3"):
        small(**batch)


def test_an_all_zero_attention_row_warns_once(small, caplog):
    logging.Logger.warning_once.cache_clear()  # transformers' warning_once is process-wide: an earlier test may have
    batch = tester.prepare_inputs()
    batch["attention_mask"][1] = 0
    with caplog.at_level(logging.WARNING):
        small(**batch)
        small(**batch)
    assert sum("row of zeros only" in r.getMessage() for r in caplog.records) == 1


@pytest.mark.parametrize("kind", ["float16", "float64", "numpy"])
def test_latents_of_any_float_type(small, tokenizers, kind):
    z = torch.randn(2, 4)
    latents = z.numpy() if kind == "numpy" else z.to(getattr(torch, kind))
    if kind == "float64":  # cast to the model's float32: the very latents
        expected = small.generate(latents=z, max_new_tokens=3)
        assert torch.equal(small.generate(latents=latents, max_new_tokens=3), expected)
    elif kind == "float16":
        assert small.generate(latents=latents, max_new_tokens=3).shape == (2, 4)
    text = LatentText(small, *tokenizers)
    assert len(text.decode(latents, max_new_tokens=3)) == 2


def test_generating_past_the_positions_is_refused_first(small, monkeypatch):
    from transformers import GenerationMixin

    def never(*args, **kwargs):
        raise AssertionError("generation started")

    monkeypatch.setattr(GenerationMixin, "generate", never)
    # 80 positions: the BOS token and the latent's slot leave 78 new tokens
    with pytest.raises(ValueError, match=r"max_new_tokens=79 is too many.*n_positions=80; use max_new_tokens <= 78"):
        small.generate(latents=torch.zeros(1, 4), max_new_tokens=79)


def test_generation_up_to_the_last_position_works(small):
    out = small.generate(latents=torch.zeros(1, 4), max_new_tokens=78, min_new_tokens=78)
    assert out.shape[1] == 79


def test_evaluate_without_importance_samples_writes_valid_json(tmp_path, parts):
    folder = hub.save_model(tmp_path / "model", *parts)
    data = tmp_path / "test.txt"
    data.write_text("the cat sat\na dog ran far\nthree words here\n")
    output = tmp_path / "metrics.json"
    main(
        [
            "evaluate",
            str(folder),
            "--data",
            str(data),
            "--num_samples",
            "0",
            "--max_length",
            "16",
            "--output",
            str(output),
        ]
    )

    def no_nan(constant):
        raise AssertionError(f"{constant} is not JSON")

    metrics = json.loads(output.read_text(), parse_constant=no_nan)
    assert metrics["nll"] is None and metrics["kl"] is not None


def test_sample_zero_is_refused(small, tokenizers):
    with pytest.raises(ValueError, match=r"num_samples=0 must be a whole number >= 1"):
        LatentText(small, *tokenizers).sample(0)


def test_a_nul_byte_warns_and_separates_words(tmp_path, caplog):
    path = tmp_path / "nul.txt"
    path.write_bytes(b"first line\nsecond\x00line here\n")
    with caplog.at_level(logging.WARNING):
        dataset = load_text_dataset(path)
    assert dataset["train"]["text"] == ["first line", "second line here"]
    assert any(str(path) in r.getMessage() and "line 2" in r.getMessage() for r in caplog.records)


# =====================================================================================================================
# Issue 19: no folder runs its own code or leaks through links, every option is checked, concurrent and resumed runs
# fail loudly. Every test below builds tiny models on the embedded corpus (no ../shared/data needed).
# =====================================================================================================================


def gen(seed):
    return torch.Generator().manual_seed(seed)


def corpus_file(tmp_path, lines=12, name="corpus.txt"):
    """The first `lines` validation sentences of the embedded corpus, as a local file."""
    texts = load_text_dataset()["validation"]["text"][:lines]
    path = tmp_path / name
    path.write_text("\n".join(texts) + "\n")
    return path


def edit_json(path, edit):
    """Change a JSON file in place: `edit` mutates the parsed object."""
    data = json.loads(Path(path).read_text())
    edit(data)
    Path(path).write_text(json.dumps(data))


@pytest.fixture(scope="module")
def saved(tmp_path_factory, parts):
    """A complete save_model folder of the tiny model; tests copy it before changing it."""
    return hub.save_model(tmp_path_factory.mktemp("saved") / "model", *parts)


@pytest.fixture
def copy_of_saved(saved, tmp_path):
    return Path(shutil.copytree(saved, tmp_path / "model"))


# -- security: no folder's code runs ----------------------------------------------------------------------------------


def test_a_folder_without_model_type_never_runs_its_code_nor_prompts(copy_of_saved, tmp_path, monkeypatch, capsys):
    """config.json without model_type but with auto_map made AutoTokenizer ask "run the custom code? [y/N]"; a user
    answering y ran the folder's configuration_scalevae.py."""
    import builtins

    folder, marker = copy_of_saved, tmp_path / "the folder's code ran"
    edit_json(folder / "config.json", lambda config: config.pop("model_type"))
    with open(folder / "configuration_scalevae.py", "a") as handle:
        handle.write(f"\nopen({str(marker)!r}, 'w').write('x')\n")
    prompts = []
    monkeypatch.setattr(builtins, "input", lambda *args: prompts.append(args) or "y")
    scalevae.factory.load_tokenizers(folder)
    scalevae.load_pretrained(folder)
    main(["generate", str(folder), "--sample", "1", "--max_new_tokens", "2"])
    assert prompts == [] and not marker.exists()


# -- security: what is published ---------------------------------------------------------------------------------------


def test_only_regular_files_inside_the_folder_are_published_without_trainer_state(copy_of_saved, tmp_path, caplog):
    folder = copy_of_saved
    secret = tmp_path / "secret.txt"
    secret.write_text(TOKEN)
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "elsewhere" / "data.txt").write_text(TOKEN)
    os.symlink(secret, folder / "notes.txt")
    os.symlink(tmp_path / "elsewhere", folder / "linked_folder")
    checkpoint = folder / "checkpoint-3"  # a Trainer checkpoint inside a model folder: its state at any depth
    checkpoint.mkdir()
    for name in ("training_args.bin", "optimizer.pt", "scheduler.pt", "rng_state.pth", "rng_state_1.pth", "README.md"):
        (checkpoint / name).write_text(TOKEN if name == "training_args.bin" else "x")
    with caplog.at_level(logging.WARNING, logger="scalevae.hub"):
        files = hub.folder_files(folder)
    assert "checkpoint-3/README.md" in files and "model.safetensors" in files
    leaked = [name for name in files if "notes" in name or "linked_folder" in name or name.startswith("checkpoint-3/")]
    assert leaked == ["checkpoint-3/README.md"], files
    warned = " ".join(record.getMessage() for record in caplog.records)
    assert str(folder / "notes.txt") in warned and str(folder / "linked_folder") in warned


def test_push_refuses_a_folder_whose_weights_are_a_link(copy_of_saved, tmp_path):
    folder = copy_of_saved
    os.rename(folder / "model.safetensors", tmp_path / "outside.safetensors")
    os.symlink(tmp_path / "outside.safetensors", folder / "model.safetensors")
    with pytest.raises(FileNotFoundError, match=r"model\.safetensors would not be uploaded \(a link"):
        hub.push_to_hub(folder, "someone/model")  # refused before any Hub call


# -- resuming: verified weights, named missing state, one run per folder, owner-only arguments ----------------------


def trainer_for(output_dir, encoder_path, **overrides):
    from scalevae.training import make_trainer

    model, _, _, data, collator = tester.get_trainer_setup(encoder_path, sentences=32, max_length=12)
    checkpointing = dict(max_steps=4, logging_steps=2, save_strategy="steps", save_steps=2)
    args = tester.training_args(output_dir, **{**checkpointing, **overrides})
    return make_trainer(model, args, data["train"], collator, probe_size=8)


@pytest.fixture(scope="module")
def checkpointed(tmp_path_factory, tiny_encoder_path):
    """A 4-step run with checkpoints at steps 2 and 4."""
    output = tmp_path_factory.mktemp("checkpointed")
    trainer_for(output, tiny_encoder_path).train()
    return output


def copied_checkpoint(checkpointed, tmp_path):
    return Path(shutil.copytree(checkpointed / "checkpoint-2", tmp_path / "resume-from"))


def test_resume_refuses_a_checkpoint_with_a_flipped_weight_bit(checkpointed, tmp_path, tiny_encoder_path):
    checkpoint = copied_checkpoint(checkpointed, tmp_path)
    flip_bit(checkpoint / "model.safetensors", "collapse.scale_factors")
    trainer = trainer_for(tmp_path / "out", tiny_encoder_path)
    with pytest.raises(
        OSError, match=rf"resume_from_checkpoint {checkpoint}: {checkpoint}/model\.safetensors is corr"
    ):
        trainer.train(resume_from_checkpoint=str(checkpoint))
    assert trainer.state.global_step == 0 and not (tmp_path / "out" / "checkpoint-4").exists()


def test_resume_from_a_truncated_checkpoint_names_the_file(checkpointed, tmp_path, tiny_encoder_path):
    checkpoint = copied_checkpoint(checkpointed, tmp_path)
    weights = checkpoint / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(OSError, match=rf"{weights} is truncated"):
        trainer_for(tmp_path / "out", tiny_encoder_path).train(resume_from_checkpoint=str(checkpoint))


def test_resume_without_optimizer_or_rng_state_says_which_and_what_changes(
    checkpointed, tmp_path, tiny_encoder_path, caplog
):
    checkpoint = copied_checkpoint(checkpointed, tmp_path)
    (checkpoint / "optimizer.pt").unlink()
    (checkpoint / "rng_state.pth").unlink()
    with caplog.at_level(logging.WARNING, logger="scalevae.training"):
        trainer = trainer_for(tmp_path / "out", tiny_encoder_path)
        trainer.train(resume_from_checkpoint=str(checkpoint))
    warned = [r.getMessage() for r in caplog.records if "Resuming from" in r.getMessage()]
    assert len(warned) == 1, warned
    assert (
        "without optimizer.pt (the optimizer's state" in warned[0] and "rng_state.pth (the random state" in warned[0]
    )
    assert "scheduler.pt" not in warned[0] and "will not reproduce the uninterrupted run" in warned[0]
    assert trainer.state.global_step == 4  # it does resume


def test_training_args_bin_is_readable_by_its_owner_only(checkpointed, tmp_path, tiny_encoder_path):
    for step in (2, 4):
        assert (checkpointed / f"checkpoint-{step}" / "training_args.bin").stat().st_mode & 0o777 == 0o600
    trainer = trainer_for(tmp_path / "out", tiny_encoder_path)
    trainer.save_model(str(tmp_path / "saved"))  # the Trainer's own save writes it too
    assert (tmp_path / "saved" / "training_args.bin").stat().st_mode & 0o777 == 0o600


def hold_lock_in_thread(folder):
    """Hold `folder`'s writer lock in another thread until the returned event is set."""
    import threading

    held, release = threading.Event(), threading.Event()

    def holder():
        with hub.writer_lock(folder):
            held.set()
            release.wait(30)

    thread = threading.Thread(target=holder)
    thread.start()
    assert held.wait(30)
    return release, thread


def test_a_second_writer_of_a_folder_fails_at_once(tmp_path, parts, tiny_encoder_path):
    folder = tmp_path / "model"
    release, thread = hold_lock_in_thread(folder)
    try:
        with pytest.raises(hub.FolderInUseError, match=rf"{folder} is being written by another writer \(process"):
            hub.save_model(folder, *parts)
        trainer = trainer_for(folder, tiny_encoder_path)
        with pytest.raises(hub.FolderInUseError, match=rf"{os.getpid()}"):
            trainer.train()
        assert trainer.state.global_step == 0
    finally:
        release.set()
        thread.join()
    hub.save_model(folder, *parts)  # the lock went with its holder
    assert not (tmp_path / ".model.lock").exists()


def test_concurrent_saves_of_one_folder_never_break_each_other(tmp_path, parts):
    """12 of 30 concurrent saves failed with FileNotFoundError: each save's cleanup deleted the others' temporary
    folders. Now each either saves or is refused by the lock, and the folder is always complete."""
    from concurrent.futures import ThreadPoolExecutor

    folder = tmp_path / "model"

    def save(_):
        try:
            hub.save_model(folder, *parts)
        except hub.FolderInUseError:
            return "refused"
        return "saved"

    with ThreadPoolExecutor(6) as pool:
        outcomes = list(pool.map(save, range(12)))
    assert "saved" in outcomes and set(outcomes) <= {"saved", "refused"}
    assert hub.missing_files(folder) == [] and sorted(p.name for p in tmp_path.iterdir()) == ["model"]


def test_another_process_holding_the_lock_is_named_by_its_pid(tmp_path, parts):
    import subprocess
    import sys

    folder = tmp_path / "model"
    child = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time\nfrom scalevae.hub import writer_lock\nwith writer_lock(sys.argv[1]):\n"
            "    print('held', flush=True)\n    time.sleep(60)",
            str(folder),
        ],
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])},
    )
    try:
        assert child.stdout.readline().strip() == "held"
        with pytest.raises(hub.FolderInUseError, match=rf"process {child.pid}\b"):
            hub.save_model(folder, *parts)
    finally:
        child.kill()
        child.wait()
    hub.save_model(folder, *parts)  # a killed holder leaves no lock behind


# -- a full disk ------------------------------------------------------------------------------------------------------


def test_no_space_left_is_said_and_the_partial_save_removed(tmp_path, parts, monkeypatch):
    folder = hub.save_model(tmp_path / "model", *parts)
    before = tensors(folder)

    def full_disk(self, directory, *args, **kwargs):
        Path(directory, "model.safetensors").write_bytes(b"\0" * 100)  # what was written before the disk filled
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(scalevae.ScaleVAEForLatentLM, "save_pretrained", full_disk)
    with pytest.raises(
        OSError, match=rf"no space left on device while writing {folder} .*the partial save .* was rem"
    ):
        hub.save_model(folder, *parts)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]
    assert_same_tensors(tensors(folder), before)  # the previous save is intact


@pytest.fixture
def small_disk(tmp_path):
    """A tmpfs of a given size (needs the right to mount: root on Linux), unmounted after the test."""
    import subprocess

    mounted = []

    def make(size_bytes):
        path = tmp_path / "disk"
        path.mkdir()
        result = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={size_bytes}", "tmpfs", str(path)], capture_output=True
        )
        if result.returncode:
            pytest.skip(f"cannot mount a tmpfs to fill (needs root): {result.stderr.decode().strip()}")
        mounted.append(path)
        return path

    yield make
    for path in mounted:
        subprocess.run(["umount", str(path)], check=False)


def test_a_really_full_disk_during_save_model(small_disk, parts):
    disk = small_disk(1 << 20)  # the tiny model's weights take about 8 MB
    with pytest.raises(OSError, match=rf"no space left on device while writing {disk / 'model'}") as raised:
        hub.save_model(disk / "model", *parts)
    assert raised.value.errno == 28
    assert list(disk.iterdir()) == []


def test_a_really_full_disk_during_a_checkpoint_removes_it(small_disk, tiny_encoder_path, tmp_path):
    trainer = trainer_for(tmp_path / "not-used", tiny_encoder_path)
    weights = sum(t.numel() * t.element_size() for t in trainer.model.state_dict().values())
    disk = small_disk(weights + (3 << 20))  # the weights fit, the optimizer's two moments do not
    trainer.args.output_dir = str(disk / "run")
    with pytest.raises(OSError, match=rf"no space left on device while writing {disk / 'run' / 'checkpoint-2'}"):
        trainer.train()
    assert not (disk / "run" / "checkpoint-2").exists()


# -- a folder is validated as a whole -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "field, value",
    [
        ("latent_size", 10**12),
        ("decoder.vocab_size", 10**12),
        ("decoder.n_positions", 10**12),
        ("encoder.max_position_embeddings", 10**12),
        ("encoder.vocab_size", 10**12),
        ("decoder.n_layer", -1),
        ("encoder.num_hidden_layers", 0),
        ("decoder.n_embd", 0),
    ],
)
def test_config_sizes_are_bounded_before_allocation_naming_the_field(copy_of_saved, field, value):
    def edit(config):
        owner = config[field.split(".")[0]] if "." in field else config
        owner[field.split(".")[-1]] = value

    edit_json(copy_of_saved / "config.json", edit)
    with pytest.raises(ValueError, match=rf"{field}={value} must be an integer in \[1, \d+\]"):
        scalevae.ScaleVAEForLatentLM.from_pretrained(copy_of_saved)


def test_a_new_model_is_validated_before_anything_is_allocated(tmp_path, tiny_encoder_path, monkeypatch):
    from transformers import GPT2LMHeadModel

    def never(*args, **kwargs):
        raise AssertionError("a decoder was allocated")

    monkeypatch.setattr(GPT2LMHeadModel, "_from_config", never)
    data = corpus_file(tmp_path, lines=16)
    with pytest.raises(ValueError, match=r"--decoder_width 0: must be a whole number in \[1, 65536\]"):
        main(train_args(tmp_path / "run", tiny_encoder_path, data, "--max_steps", "1", "--decoder_width", "0"))
    with pytest.raises(ValueError, match=r"decoder\.n_embd=0 must be an integer in \[1, 65536\]"):
        scalevae.build_model(tiny_encoder_path, decoder_config_overrides=dict(n_embd=0))
    with pytest.raises(ValueError, match=r"latent_size=100000000 must be an integer in \[1, 65536\]"):
        tester.build(tiny_encoder_path, latent_size=10**8)


def test_required_fields_are_checked_without_model_type(copy_of_saved):
    edit_json(
        copy_of_saved / "config.json", lambda c: [c.pop(k) for k in ("model_type", "kl_weight", "scale_target_std")]
    )
    with pytest.raises(ValueError, match="lacks the required field.s. kl_weight, scale_target_std"):
        scalevae.ScaleVAEForLatentLM.from_pretrained(copy_of_saved)


@pytest.mark.parametrize(
    "content, match",
    [
        ("[1, 2]", r"config\.json holds a JSON list, not the JSON object of a config"),
        ('{"model_type": "bert"}', r"config\.json is the config of a 'bert' model, not of a Scale-VAE"),
    ],
)
def test_a_config_json_that_is_no_scalevae_config_is_named(copy_of_saved, content, match):
    (copy_of_saved / "config.json").write_text(content)
    with pytest.raises(ValueError, match=rf"{copy_of_saved}/{match}"):
        scalevae.ScaleVAEForLatentLM.from_pretrained(copy_of_saved)


@pytest.mark.parametrize(
    "name", ["tokenizer.json", "decoder_tokenizer/tokenizer_config.json", "generation_config.json"]
)
def test_a_json_file_that_fails_to_parse_is_named(copy_of_saved, name):
    path = copy_of_saved / name
    path.write_text(path.read_text()[:40])
    with pytest.raises(ValueError, match=rf"{path} is not valid JSON \(.*line \d+ column \d+"):
        scalevae.load_pretrained(copy_of_saved)


def test_the_encoder_type_is_checked_against_the_weights(copy_of_saved):
    """RoBERTa has BERT's tensor names and shapes: an edited encoder model_type loaded silently, with other
    position ids."""
    edit_json(copy_of_saved / "config.json", lambda c: c["encoder"].update(model_type="roberta"))
    with pytest.raises(
        ValueError, match=r"encoder\.model_type='roberta' in the config, but the weights file was saved"
    ):
        scalevae.ScaleVAEForLatentLM.from_pretrained(copy_of_saved)


def test_a_generation_config_without_bos_still_generates(copy_of_saved, caplog):
    edit_json(copy_of_saved / "generation_config.json", lambda g: g.pop("bos_token_id"))
    with caplog.at_level(logging.WARNING, logger="scalevae.factory"):
        text = LatentText.from_pretrained(copy_of_saved)
    assert text.model.generation_config.bos_token_id == text.decoder_tokenizer.bos_token_id
    assert len(text.sample(2, max_new_tokens=3)) == 2
    assert any("lacks bos_token_id" in r.getMessage() for r in caplog.records)


# -- text ---------------------------------------------------------------------------------------------------------------


def test_a_byte_order_mark_and_invisible_lines_are_not_text(tmp_path):
    path = tmp_path / "bom.txt"
    path.write_bytes("\ufeffthe first line\n\u200b\n\u2060 \u200b\n\ufeff\nlast line \u200b here\n".encode())
    assert load_text_dataset(path)["train"]["text"] == ["the first line", "last line \u200b here"]
    only_invisible = tmp_path / "invisible.txt"
    only_invisible.write_bytes("\ufeff\n\u200b\u200b\n\u2060\n".encode())
    with pytest.raises(ValueError, match="has no non-empty lines"):
        load_text_dataset(only_invisible)


def test_a_megabyte_word_is_cut_so_the_tokenizer_fit_stays_fast(tmp_path, caplog):
    """The BPE fit took time quadratic in a word's length: over 5 minutes for one 1 MB "word" (3 s for 100 kB)."""
    import random
    import time

    from scalevae.factory import MAX_RUN_CHARS, fit_decoder_tokenizer

    rng = random.Random(0)
    word = "".join(rng.choice("abcdefghij") for _ in range(300_000))
    path = tmp_path / "long.txt"
    path.write_text(f"the cat sat\n{word}\na dog ran\n")
    with caplog.at_level(logging.WARNING):
        texts = load_text_dataset(path)["train"]["text"]
        start = time.perf_counter()
        fit_decoder_tokenizer(["the cat", word, "a dog"], vocab_size=300)
        seconds = time.perf_counter() - start
    assert texts[0] == "the cat sat" and texts[1].split() == [
        word[i : i + MAX_RUN_CHARS] for i in range(0, len(word), MAX_RUN_CHARS)
    ]
    assert seconds < 10, seconds  # 30 s before (quadratic), under a second now
    messages = " ".join(r.getMessage() for r in caplog.records)
    assert "line 2" in messages and "fitted on it cut into pieces" in messages


def test_encoding_and_decoding_zero_rows(small, tokenizers):
    text = LatentText(small, *tokenizers)
    assert text.decode(torch.zeros(0, 4)) == []
    assert text.encode([]).shape == (0, 4)
    with pytest.raises(ValueError, match=r"latents of shape \(0, 3\): expected \(n, 4\)"):
        text.decode(torch.zeros(0, 3))


# -- options: one validation for every command --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "command, option, value, mode, message",
    [
        ("quickstart", "max_steps", 0, {}, r"--max_steps 0: must be a whole number >= 1"),
        ("quickstart", "train_minutes", 0.0, {}, r"--train_minutes 0.0: must be a number > 0"),
        ("evaluate", "max_sentences", 0, {}, r"--max_sentences 0: must be a whole number >= 1"),
        ("evaluate", "max_sentences", -1, {}, r"--max_sentences -1: must be a whole number >= 1"),
        ("evaluate", "num_samples", -1, {}, r"--num_samples -1: must be a whole number >= 0"),
        ("compare", "max_steps", 0, {}, r"--max_steps 0: must be a whole number >= 1"),
        ("compare", "max_steps", -5, {}, r"--max_steps -5"),
        ("compare", "seeds", [0, -1], {}, r"--seeds -1: must be a whole number in \[0, 4294967295\]"),
        (
            "train",
            "kl_warmup_steps",
            -5,
            {"kl_schedule": "linear"},
            r"--kl_warmup_steps -5: must be a whole number >= 1",
        ),
        ("train", "kl_warmup_steps", None, {"kl_schedule": "linear"}, r"--kl_schedule linear needs --kl_warmup_steps"),
        ("train", "decoder_width", 0, {}, r"--decoder_width 0: must be a whole number in \[1, 65536\]"),
        ("train", "decoder_vocab_size", 100, {}, r"--decoder_vocab_size 100: must be a whole number in \[259,"),
        ("train", "learning_rate", float("nan"), {}, r"--learning_rate nan: must be a number > 0"),
        ("generate", "top_p", 2.0, {"do_sample": True}, r"--top_p 2.0: must be a number in \(0, 1\]"),
        ("generate", "num_beams", 0, {}, r"--num_beams 0: must be a whole number >= 1"),
        ("generate", "temperature", float("inf"), {"do_sample": True}, r"--temperature inf: must be a number > 0"),
        ("generate", "sample", 2.5, {}, r"--sample 2.5: must be a whole number >= 1"),
    ],
)
def test_every_numeric_option_is_checked_with_its_range(command, option, value, mode, message):
    options = Namespace(**{option: value, **mode})
    with pytest.raises(OptionError, match=rf"^{command}: {message}"):
        validate_options(options, given={option, *mode}, command=command, specs=COMMAND_OPTIONS[command])


def test_options_that_do_nothing_in_the_mode_warn_once(caplog, monkeypatch):
    monkeypatch.setattr(scalevae.options, "_warned", set())  # what earlier tests of this process warned about
    specs = COMMAND_OPTIONS["generate"]
    options = Namespace(do_sample=False, top_p=0.9, temperature=0.7, num_beams=2, interpolate=None, steps=4)
    with caplog.at_level(logging.WARNING, logger="scalevae.options"):
        warnings = validate_options(options, {"top_p", "temperature", "num_beams", "steps"}, "generate", specs=specs)
        validate_options(options, {"top_p", "temperature", "num_beams", "steps"}, "generate", specs=specs)
    assert warnings == [
        "generate: --steps does nothing without --interpolate; it is ignored.",
        "generate: --temperature does nothing without --do_sample; it is ignored.",
        "generate: --top_p does nothing without --do_sample; it is ignored.",
    ]
    assert sorted(r.getMessage() for r in caplog.records) == warnings  # once each, not once per call
    assert validate_options(options, {"num_beams"}, "generate", specs=specs) == []  # defaults never warn


def test_a_run_specs_sections_are_validated_together():
    """RunSpec.parse checks every section's given options against `COMMAND_OPTIONS[command]` at parse time."""
    from scalevae.options import merged_options
    from scalevae.recipe import RunSpec

    argv = ["--output_dir", "x", "--kl_n_cycle", "3", "--train_minutes", "0", "--max_steps", "-1"]
    with pytest.raises(OptionError, match=r"^train: --max_steps -1: must be a whole number >= 1"):
        RunSpec.parse(argv)
    with pytest.raises(OptionError, match=r"^quickstart: --train_minutes 0.0: must be a number > 0"):
        RunSpec.parse(argv[:-2], command="quickstart")  # max_steps left at TrainingArguments' -1: not checked
    spec, given, _ = RunSpec.parse(argv[:4])
    options = merged_options(spec.model, spec.data, spec.run, spec.training)
    (warning,) = validate_options(options, given, "train", specs=COMMAND_OPTIONS["train"])
    assert warning == "train: --kl_n_cycle does nothing without --kl_schedule cyclical; it is ignored."


def test_a_dataclass_of_options_declares_its_ranges_in_one_place():
    import dataclasses
    from dataclasses import dataclass

    @dataclass
    class GenerateOptions:
        do_sample: bool = False
        top_p: float | None = number(low=0, high=1, low_open=True, only_with="do_sample", help="nucleus mass")
        beams: int = number(1, low=1, integer=True)
        warmup: int | None = number(low=1, integer=True, required_with=("schedule", "linear"))
        schedule: str = "constant"

    help_text = {f.name: f.metadata.get("help") for f in dataclasses.fields(GenerateOptions)}
    assert help_text["top_p"] == "nucleus mass (a number in (0, 1])"
    assert validate_options(GenerateOptions(top_p=0.5)) == ["--top_p does nothing without --do_sample; it is ignored."]
    assert validate_options(GenerateOptions(do_sample=True, top_p=1.0)) == []
    with pytest.raises(OptionError, match=r"--beams 0: must be a whole number >= 1"):
        validate_options(GenerateOptions(beams=0))
    with pytest.raises(OptionError, match=r"--schedule linear needs --warmup"):
        validate_options(GenerateOptions(schedule="linear"))
    with pytest.raises(OptionError, match=r"width 30 is not a multiple"):
        validate_options(GenerateOptions(), checks=[lambda o: "width 30 is not a multiple of 4"])


def test_the_output_folder_is_never_the_input_model_folder(tmp_path):
    model = tmp_path / "runs" / "final"
    model.mkdir(parents=True)
    os.symlink(model, tmp_path / "link")
    for output, relation in [
        (model, "is"),
        (tmp_path / "link", "is"),
        (model / "more", "lies inside"),
        (tmp_path / "runs", "holds"),
    ]:
        with pytest.raises(OptionError, match=rf"--output_dir {output} {relation} the input model folder {model}"):
            check_output_folder(output, model)
    check_output_folder(tmp_path / "other", model, None, "someone/hub-model")  # no local folder in common


def test_fine_tuning_never_writes_into_the_model_folder_it_reads(saved, tmp_path):
    """`train --model_name_or_path D --output_dir D` wrote checkpoints and final/ inside the input folder."""
    data = corpus_file(tmp_path, lines=16)
    before = {p.name: p.stat().st_mtime_ns for p in saved.iterdir()}
    for output in (saved, saved.parent):
        argv = ["train", "--model_name_or_path", str(saved), "--output_dir", str(output), "--train_file", str(data)]
        with pytest.raises(OptionError, match=rf"--output_dir {output} (is|holds) the input model folder {saved}"):
            main([*argv, "--max_steps", "1", "--report_to", "none", "--use_cpu", "--max_length", "16"])
    assert {p.name: p.stat().st_mtime_ns for p in saved.iterdir()} == before


def test_max_length_fits_both_the_encoder_and_the_decoder():
    short_encoder = tester.get_config(encoder_positions=40, decoder_positions=80)
    check_max_length(40, short_encoder)
    with pytest.raises(
        OptionError, match=r"--max_length 41: .*\[2, 40\] \(the encoder takes 40 tokens, the decoder 80"
    ):
        check_max_length(41, short_encoder)
    memory = tester.get_config(encoder_positions=512, decoder_positions=80, latent_injection="memory")
    with pytest.raises(OptionError, match=r"--max_length 100000: .*\[2, 79\].*of which the latent takes one"):
        check_max_length(100000, memory)
    check_max_length(80, tester.get_config(encoder_positions=512, decoder_positions=80, latent_injection="embedding"))


# -- scalevae evaluate is evaluate_model ---------------------------------------------------------------------------------


def test_the_evaluate_command_equals_evaluate_model_on_the_same_data(saved, tmp_path):
    from torch.utils.data import DataLoader

    from scalevae.data import DataCollatorForLatentLM, tokenize_dataset
    from scalevae.metrics import evaluate_model

    data, output = corpus_file(tmp_path, lines=10), tmp_path / "metrics.json"
    argv = ["evaluate", str(saved), "--data", str(data), "--num_samples", "3", "--max_length", "16"]
    main([*argv, "--batch_size", "4", "--seed", "5", "--device", "cpu", "--output", str(output)])
    written = json.loads(output.read_text())

    model, encoder_tokenizer, decoder_tokenizer = scalevae.load_pretrained(saved)
    dataset, _ = tokenize_dataset(load_text_dataset({"test": data})["test"], encoder_tokenizer, decoder_tokenizer, 16)
    loader = DataLoader(
        dataset, batch_size=4, collate_fn=DataCollatorForLatentLM(encoder_tokenizer, decoder_tokenizer)
    )
    expected = evaluate_model(
        model, loader, num_importance_samples=3, generator=torch.Generator().manual_seed(5), progress=False
    )
    assert expected["num_sentences"] == 10
    for key, value in expected.items():
        assert written[key] == (None if value != value else pytest.approx(value, rel=1e-12, abs=1e-12)), key


# -- a save/load round trip keeps every output bit for bit --------------------------------------------------------------


@strategies_and_injections()
def test_save_and_load_give_bit_equal_outputs(tmp_path, strategy, injection):
    model = tester.get_model(collapse_strategy=strategy, latent_injection=injection, dropout=0.0)
    tester.train_steps(model, steps=1, batch_size=4)  # moves the factors, BN statistics and the fitted prior
    model.eval()
    model.save_pretrained(tmp_path)
    loaded = scalevae.ScaleVAEForLatentLM.from_pretrained(tmp_path).eval()
    assert_same_tensors(loaded.state_dict(), model.state_dict())
    batch = tester.prepare_inputs(batch_size=4, seed=9)
    outputs = []
    for each in (model, loaded):
        torch.manual_seed(3)  # the stochastic strategies sample z in forward
        out = each(**batch)
        generated = each.generate(latents=out.decoder_mu, max_new_tokens=3)
        outputs.append(
            [out.loss, out.logits, out.mu, out.logvar, out.decoder_mu, out.prior_mean, out.prior_std, generated]
        )
    for a, b in zip(*outputs):
        assert torch.equal(a, b)


# -- the generative prior: KL, ELBO and IW-NLL with a shifted prior and factors != 1, against exact values ---------------

F_SHIFT = torch.tensor([2.0, 0.5, 1.5], dtype=torch.float64)  # scale factors: decoder_mu = f * mu
PRIOR_MEAN = torch.tensor([0.8, -1.1, 0.3], dtype=torch.float64)
PRIOR_STD = torch.tensor([1.6, 0.6, 1.1], dtype=torch.float64)
X_SHIFT = torch.tensor([[0.3, -1.2, 2.0], [1.5, 0.1, -0.4]], dtype=torch.float64)


class ShiftedLinearGaussian(torch.nn.Module):
    """p(z) = N(m, s²), p(x|z) = N(x; z, τ²), so p(x) = N(x; m, s² + τ²). The decoder's posterior is exact, or shifted
    and wider; the encoder's mean is decoder_mu / f. With `flat`, log p(x|z) does not depend on z, so the single-sample
    ELBO is exactly that constant minus the analytic KL."""

    def __init__(self, tau=0.7, exact=True, flat=False):
        super().__init__()
        self.tau, self.exact, self.flat = tau, exact, flat
        self.collapse = types.SimpleNamespace(stochastic=True)

    def posterior(self, x):
        var = 1 / (1 / PRIOR_STD**2 + 1 / self.tau**2)
        mean = var * (x / self.tau**2 + PRIOR_MEAN / PRIOR_STD**2)
        return (mean + 0.4, var.expand_as(x) * 1.8) if not self.exact else (mean, var.expand_as(x))

    def encode(self, input_ids, attention_mask=None, prior=None):
        mean, var = self.posterior(input_ids)
        return ScaleVAEEncoderOutput(
            mu=mean / F_SHIFT, logvar=var.log(), decoder_mu=mean, prior_mean=PRIOR_MEAN, prior_std=PRIOR_STD
        )

    def prior_distribution(self, prior=None, dtype=None):
        return torch.distributions.Independent(torch.distributions.Normal(PRIOR_MEAN, PRIOR_STD), 1)

    def log_likelihood(self, latents, decoder_input_ids, labels, decoder_attention_mask=None):
        if self.flat:
            return -(decoder_input_ids**2).sum(-1)
        return torch.distributions.Normal(latents, self.tau).log_prob(decoder_input_ids).sum(-1)

    def log_px(self, x):
        return torch.distributions.Normal(PRIOR_MEAN, (PRIOR_STD**2 + self.tau**2).sqrt()).log_prob(x).sum(-1)


def shifted_batch(x):
    ones = torch.ones(x.shape[0], 1, dtype=torch.long)
    return dict(input_ids=x, attention_mask=ones, decoder_input_ids=x, decoder_attention_mask=ones, labels=ones * 0)


def exact_kl(mean, var):
    """KL(N(mean, var) || N(PRIOR_MEAN, PRIOR_STD²)) summed over dimensions, by torch.distributions."""
    q, p = torch.distributions.Normal(mean, var.sqrt()), torch.distributions.Normal(PRIOR_MEAN, PRIOR_STD)
    return torch.distributions.kl_divergence(q, p).sum(-1)


def test_iw_nll_is_exact_under_a_shifted_prior():
    toy = ShiftedLinearGaussian(exact=True)
    estimate = metrics.iw_log_likelihood(toy, shifted_batch(X_SHIFT), num_samples=7, chunk_size=3, generator=gen(0))
    torch.testing.assert_close(estimate, toy.log_px(X_SHIFT), rtol=0, atol=1e-9)


def test_iw_nll_converges_under_a_shifted_prior_with_a_wrong_posterior():
    toy = ShiftedLinearGaussian(exact=False)
    estimate = metrics.iw_log_likelihood(toy, shifted_batch(X_SHIFT), 20000, chunk_size=5000, generator=gen(1))
    torch.testing.assert_close(estimate, toy.log_px(X_SHIFT), rtol=0, atol=0.03)


def test_elbo_uses_the_decoder_posterior_against_the_shifted_prior_exactly():
    toy = ShiftedLinearGaussian(exact=False, flat=True)
    mean, var = toy.posterior(X_SHIFT)
    expected = -(X_SHIFT**2).sum(-1) - exact_kl(mean, var)
    torch.testing.assert_close(
        metrics.elbo(toy, shifted_batch(X_SHIFT), generator=gen(2)), expected, rtol=0, atol=1e-12
    )
    # the KL of the encoder's mean (mu = decoder_mu / f) or against a zero-mean prior would differ by nats
    assert (exact_kl(mean / F_SHIFT, var) - exact_kl(mean, var)).abs().min() > 0.1
    zero_mean = torch.distributions.kl_divergence(
        torch.distributions.Normal(mean, var.sqrt()), torch.distributions.Normal(0 * PRIOR_MEAN, PRIOR_STD)
    ).sum(-1)
    assert (zero_mean - exact_kl(mean, var)).abs().min() > 0.1


def test_evaluate_model_decoder_kl_with_factors_and_a_fitted_shifted_prior(small):
    model = tester.get_model(dropout=0.0, prior="fitted").eval()
    with torch.no_grad():
        model.collapse.scale_factors.copy_(torch.tensor([2.0, 0.5, 1.0, 1.5]))
        model.fitted_prior.loc.copy_(torch.tensor([0.3, -0.2, 0.5, 0.1]))
        model.fitted_prior.scale.copy_(torch.tensor([1.5, 0.7, 1.2, 0.9]))
    batch = tester.prepare_inputs(batch_size=4, seed=4)
    results = metrics.evaluate_model(model, [batch], num_importance_samples=0, generator=gen(0), progress=False)
    with torch.no_grad():
        posterior = model.encode(batch["input_ids"], batch["attention_mask"])
    q = torch.distributions.Normal(
        (posterior.mu * model.collapse.scale_factors).double(), (0.5 * posterior.logvar).exp().double()
    )
    p = torch.distributions.Normal(model.fitted_prior.loc.double(), model.fitted_prior.scale.double())
    expected = torch.distributions.kl_divergence(q, p).sum(-1).mean().item()
    assert results["decoder_kl"] == pytest.approx(expected, rel=1e-6)


# -- choose_des_std: the 1% rule and its fallbacks ----------------------------------------------------------------------


def des_std_table(vae=None, **runs):
    """{run: {"validation": {"nll": (mean, sd), "mi_decoder": (mean, sd)}}} from run=(nll, mi) keywords,
    `scale_0_5` naming the run scale_0.5."""
    rows = {"scale_" + name.removeprefix("scale_").replace("_", "."): values for name, values in runs.items()}
    if vae is not None:
        rows["vae"] = (vae, 0.0)
    return {name: {"validation": {"nll": (nll, 0.0), "mi_decoder": (mi, 0.0)}} for name, (nll, mi) in rows.items()}


def test_choose_des_std_takes_the_most_mi_within_one_percent_of_the_vae():
    table = des_std_table(vae=100.0, scale_0_5=(100.9, 3.0), scale_1_0=(100.5, 2.0), scale_2_0=(101.2, 9.0))
    assert choose_des_std(table, ["scale_0.5", "scale_1.0", "scale_2.0"]) == ("scale_0.5", "scale_1.0")
    # the bound is inclusive: exactly 1% above the VAE is within
    table = des_std_table(vae=100.0, scale_0_5=(101.0, 3.0), scale_1_0=(100.5, 2.0))
    assert choose_des_std(table, ["scale_0.5", "scale_1.0"]) == ("scale_0.5", "scale_1.0")


def test_choose_des_std_chooses_none_where_the_rule_cannot_hold():
    # no des_std within 1%, or no VAE to compare with: nothing is chosen; the lowest IW-NLL is still reported
    none_within = des_std_table(vae=100.0, scale_0_5=(103.0, 3.0), scale_1_0=(102.0, 1.0))
    assert choose_des_std(none_within, ["scale_0.5", "scale_1.0"]) == (None, "scale_1.0")
    no_vae = des_std_table(scale_0_5=(90.0, 1.0), scale_1_0=(95.0, 7.0))
    assert choose_des_std(no_vae, ["scale_0.5", "scale_1.0"]) == (None, "scale_0.5")
    assert choose_des_std(no_vae, []) == (None, None)


def test_choose_des_std_ignores_a_diverged_run():
    table = des_std_table(vae=100.0, scale_0_5=(float("nan"), 5.0), scale_1_0=(100.2, 1.0))
    assert choose_des_std(table, ["scale_0.5", "scale_1.0"]) == ("scale_1.0", "scale_1.0")


# -- CI: a data-dependent test may not skip while the data is there ------------------------------------------------------


def test_a_data_skip_fails_when_the_data_folder_exists(tmp_path):
    import subprocess
    import sys

    from tests.data_guard import data_skip_failure

    reason = "x.txt is absent: the real corpora are read at run time from ../shared/data"
    assert data_skip_failure(reason, tmp_path) is not None
    assert data_skip_failure(reason, tmp_path / "absent") is None
    assert data_skip_failure("needs a GPU", tmp_path) is None

    (tmp_path / "data").mkdir()
    (tmp_path / "test_needs_data.py").write_text(
        "import pytest\nfrom tests.data_guard import shared_file\n\n"
        "def test_reads_a_corpus():\n    shared_file('no_such_corpus.txt')\n\n"
        "def test_other_skip():\n    pytest.skip('not about data')\n"
    )
    (tmp_path / "pytest.ini").write_text("[pytest]\n")
    repo = Path(__file__).resolve().parents[1]
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "tests.data_guard", "-p", "no:cacheprovider", "-q", str(tmp_path)],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(repo), "SCALEVAE_SHARED_DATA": str(tmp_path / "data")},
        timeout=300,
    )
    assert result.returncode == 1, result.stdout
    assert "1 failed, 1 skipped" in result.stdout and "so this data-dependent test must run" in result.stdout


def test_encoder_inputs_longer_than_its_positions_are_refused_by_name():
    model = tester.get_model(collapse_strategy="vae").eval()
    positions = model.config.encoder.max_position_embeddings
    ids = torch.ones(1, positions + 1, dtype=torch.long)
    with pytest.raises(ValueError, match=r"input_ids of length \d+ need more positions than the encoder has"):
        model.encode(ids)
