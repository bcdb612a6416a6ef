"""Loading what may not be trusted: weights verified against their checksum, folders validated as a whole before
anything is allocated, a folder's own code never run, and folders without tokenizers named with the fix."""

import json
import logging

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import scalevae
from scalevae import LatentText, hub
from scalevae.cli import main
from tests.model_tester import (
    edit_json,
    flip_bit,
)

# -- verified weights ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("tensor", ["collapse.scale_factors", "encoder.embeddings.word_embeddings.weight"])
def test_a_flipped_bit_fails_loading_naming_the_file(tmp_path, tiny_parts, tensor):
    folder = hub.save_model(tmp_path / "model", *tiny_parts)
    weights = folder / "model.safetensors"
    flip_bit(weights, tensor)
    with pytest.raises(OSError, match=rf"{weights}.* is corrupted.*verify_weights=False"):
        scalevae.ScaleVAEForLatentLM.from_pretrained(folder)
    with pytest.raises(OSError, match="is corrupted"):
        LatentText.from_pretrained(folder)
    loaded = scalevae.ScaleVAEForLatentLM.from_pretrained(folder, verify_weights=False)  # the opt-out
    assert not torch.equal(loaded.state_dict()[tensor], tiny_parts[0].state_dict()[tensor])


def test_every_save_records_the_checksum_and_older_folders_load(tmp_path, tiny_parts):
    model = tiny_parts[0]
    model.save_pretrained(tmp_path / "plain")  # what Trainer checkpoints and push_to_hub call
    with safe_open(str(tmp_path / "plain" / "model.safetensors"), "pt") as handle:
        assert handle.metadata()["scalevae_weights_checksum"].startswith("scalevae-checksum-1:")
    # a folder saved before checksums existed loads as before
    state = load_file(str(tmp_path / "plain" / "model.safetensors"))
    save_file(state, str(tmp_path / "plain" / "model.safetensors"), metadata={"format": "pt"})
    loaded = scalevae.ScaleVAEForLatentLM.from_pretrained(tmp_path / "plain")
    assert torch.equal(loaded.latent_head.proj.weight, model.latent_head.proj.weight)


def test_every_shard_is_verified(tmp_path, tiny_parts):
    model = tiny_parts[0]
    model.save_pretrained(tmp_path / "sharded", max_shard_size="100KB")
    index = json.loads((tmp_path / "sharded" / "model.safetensors.index.json").read_text())
    shard = index["weight_map"]["collapse.scale_factors"]
    flip_bit(tmp_path / "sharded" / shard, "collapse.scale_factors")
    with pytest.raises(OSError, match=rf"{shard} is corrupted"):
        scalevae.ScaleVAEForLatentLM.from_pretrained(tmp_path / "sharded")


# -- no folder's code runs ----------------------------------------------------------------------------------------


def test_a_folder_without_model_type_never_runs_its_code_nor_prompts(tiny_folder_copy, tmp_path, monkeypatch, capsys):
    """config.json without model_type but with auto_map made AutoTokenizer ask "run the custom code? [y/N]"; a user
    answering y ran the folder's configuration_scalevae.py."""
    import builtins

    folder, marker = tiny_folder_copy, tmp_path / "the folder's code ran"
    edit_json(folder / "config.json", lambda config: config.pop("model_type"))
    with open(folder / "configuration_scalevae.py", "a") as handle:
        handle.write(f"\nopen({str(marker)!r}, 'w').write('x')\n")
    prompts = []
    monkeypatch.setattr(builtins, "input", lambda *args: prompts.append(args) or "y")
    scalevae.factory.load_tokenizers(folder)
    scalevae.load_pretrained(folder)
    main(["generate", str(folder), "--sample", "1", "--max_new_tokens", "2"])
    assert prompts == [] and not marker.exists()


# -- a folder is validated as a whole -----------------------------------------------------------------------------


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
def test_config_sizes_are_bounded_before_allocation_naming_the_field(tiny_folder_copy, field, value):
    def edit(config):
        owner = config[field.split(".")[0]] if "." in field else config
        owner[field.split(".")[-1]] = value

    edit_json(tiny_folder_copy / "config.json", edit)
    with pytest.raises(ValueError, match=rf"{field}={value} must be an integer in \[1, \d+\]"):
        scalevae.ScaleVAEForLatentLM.from_pretrained(tiny_folder_copy)


def test_required_fields_are_checked_without_model_type(tiny_folder_copy):
    edit_json(
        tiny_folder_copy / "config.json", lambda c: [c.pop(k) for k in ("model_type", "kl_weight", "scale_target_std")]
    )
    with pytest.raises(ValueError, match="lacks the required field.s. kl_weight, scale_target_std"):
        scalevae.ScaleVAEForLatentLM.from_pretrained(tiny_folder_copy)


@pytest.mark.parametrize(
    "content, match",
    [
        ("[1, 2]", r"config\.json holds a JSON list, not the JSON object of a config"),
        ('{"model_type": "bert"}', r"config\.json is the config of a 'bert' model, not of a Scale-VAE"),
    ],
)
def test_a_config_json_that_is_no_scalevae_config_is_named(tiny_folder_copy, content, match):
    (tiny_folder_copy / "config.json").write_text(content)
    with pytest.raises(ValueError, match=rf"{tiny_folder_copy}/{match}"):
        scalevae.ScaleVAEForLatentLM.from_pretrained(tiny_folder_copy)


@pytest.mark.parametrize(
    "name", ["tokenizer.json", "decoder_tokenizer/tokenizer_config.json", "generation_config.json"]
)
def test_a_json_file_that_fails_to_parse_is_named(tiny_folder_copy, name):
    path = tiny_folder_copy / name
    path.write_text(path.read_text()[:40])
    with pytest.raises(ValueError, match=rf"{path} is not valid JSON \(.*line \d+ column \d+"):
        scalevae.load_pretrained(tiny_folder_copy)


def test_the_encoder_type_is_checked_against_the_weights(tiny_folder_copy):
    """RoBERTa has BERT's tensor names and shapes: an edited encoder model_type loaded silently, with other
    position ids."""
    edit_json(tiny_folder_copy / "config.json", lambda c: c["encoder"].update(model_type="roberta"))
    with pytest.raises(
        ValueError, match=r"encoder\.model_type='roberta' in the config, but the weights file was saved"
    ):
        scalevae.ScaleVAEForLatentLM.from_pretrained(tiny_folder_copy)


def test_a_generation_config_without_bos_still_generates(tiny_folder_copy, caplog):
    edit_json(tiny_folder_copy / "generation_config.json", lambda g: g.pop("bos_token_id"))
    with caplog.at_level(logging.WARNING, logger="scalevae.factory"):
        text = LatentText.from_pretrained(tiny_folder_copy)
    assert text.model.generation_config.bos_token_id == text.decoder_tokenizer.bos_token_id
    assert len(text.sample(2, max_new_tokens=3)) == 2
    assert any("lacks bos_token_id" in r.getMessage() for r in caplog.records)


# -- folders without tokenizers -----------------------------------------------------------------------------------


def test_folders_without_tokenizers_say_which_and_how_to_fix(tmp_path, tiny_parts, capsys):
    model, encoder_tokenizer, decoder_tokenizer = tiny_parts
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
