"""Reliability and security (issue 9): reproducible and resumable CLI training, folders free of secrets and machine
paths, saves that keep the newest complete model, verified weights, and clear errors for bad inputs and folders."""

import getpass
import json
import logging
import os
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import scalevae
from scalevae import LatentText, hub
from scalevae.card import public_command
from scalevae.cli import main
from scalevae.data import load_text_dataset
from tests.conftest import shared_file
from tests.model_tester import tester

TOKEN = "hf_" + "Zq7" * 10  # what a real access token looks like


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
    with pytest.raises(ValueError, match=rf"--max_steps {steps}: give a number of optimizer steps >= 1"):
        main(train_args(tmp_path, tiny_encoder_path, train_data, "--max_steps", steps))
    assert not (tmp_path / "final").exists()


def test_max_length_beyond_the_decoder_positions_is_refused(tmp_path, tiny_encoder_path, train_data):
    with pytest.raises(ValueError, match=r"--max_length 200 does not fit the decoder's 128 positions.*<= 127"):
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
