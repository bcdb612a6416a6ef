"""Loading what may not be trusted: weights verified against their checksum, folders validated as a whole before
anything is allocated, a folder's own code never run, and folders without tokenizers named with the fix."""

import json
import logging
import re
import shutil
from pathlib import Path

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
    tester,
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


# -- side files tied to the weights (issue 28) --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def fitted_pair(tmp_path_factory, tiny_encoder_path):
    """Two saved models whose decoders have byte-level BPEs fitted to the same corpus: 300 and 270 tokens."""
    from scalevae.data import load_text_dataset

    texts = load_text_dataset()["train"]["text"][:400]
    root = tmp_path_factory.mktemp("fitted")
    folders = {}
    for size in (300, 270):
        parts = tester.build(tiny_encoder_path, train_texts=texts, decoder_vocab_size=size)
        folders[size] = hub.save_model(root / f"bpe{size}", *parts)
    return folders


def swap_two_token_ids(tokenizer_json: Path) -> None:
    """The same vocabulary size, but two tokens trade ids (a vocabulary that only a hash tells apart)."""
    spec = json.loads(tokenizer_json.read_text())
    vocab = spec["model"]["vocab"]
    a, b = list(vocab)[300:302] if len(vocab) > 400 else list(vocab)[260:262]
    vocab[a], vocab[b] = vocab[b], vocab[a]
    tokenizer_json.write_text(json.dumps(spec))


@pytest.mark.parametrize("change", ["another model's", "two ids swapped"])
def test_a_decoder_tokenizer_not_saved_with_the_weights_is_refused_by_name(fitted_pair, tmp_path, change):
    """Another model's decoder_tokenizer/ (270 instead of 300 tokens) loaded silently and `sample` decoded garbage."""
    folder = Path(shutil.copytree(fitted_pair[300], tmp_path / "model"))
    if change == "another model's":
        shutil.rmtree(folder / "decoder_tokenizer")
        shutil.copytree(fitted_pair[270] / "decoder_tokenizer", folder / "decoder_tokenizer")
    else:
        swap_two_token_ids(folder / "decoder_tokenizer" / "tokenizer.json")
    for load in (scalevae.load_pretrained, LatentText.from_pretrained, scalevae.load_tokenizers):
        with pytest.raises(ValueError, match=r"decoder_tokenizer is not the decoder tokenizer this model was saved"):
            load(folder)
    assert len(LatentText.from_pretrained(fitted_pair[300]).sample(1, max_new_tokens=2)) == 1  # the original loads


def test_an_encoder_tokenizer_not_saved_with_the_weights_is_refused_by_name(tiny_folder_copy):
    swap_two_token_ids(tiny_folder_copy / "tokenizer.json")
    with pytest.raises(ValueError, match=r"\(its root tokenizer\) is not the encoder tokenizer this model was saved"):
        scalevae.load_pretrained(tiny_folder_copy)


def test_a_tokenizer_larger_than_the_model_is_refused_without_a_record(fitted_pair, tmp_path):
    """A folder saved before tokenizers were recorded (a Trainer's save_pretrained, older scalevae): the sizes still
    have to fit."""
    folder = Path(shutil.copytree(fitted_pair[270], tmp_path / "model"))
    model = scalevae.ScaleVAEForLatentLM.from_pretrained(folder)
    model.save_pretrained(folder)  # no tokenizers recorded
    shutil.rmtree(folder / "decoder_tokenizer")
    shutil.copytree(fitted_pair[300] / "decoder_tokenizer", folder / "decoder_tokenizer")
    with pytest.raises(ValueError, match=r"decoder_tokenizer: the decoder tokenizer has 300 tokens, but the model's"):
        scalevae.load_pretrained(folder)


GENERATION_OVERRIDES = [
    {"do_sample": True, "temperature": 5.0},
    {"do_sample": True, "num_return_sequences": 50},
    {"return_dict_in_generate": True, "output_scores": True},
    {"num_beams": 3, "length_penalty": -5.0},
    {"no_repeat_ngram_size": 1, "repetition_penalty": 100.0},
    {"min_new_tokens": 3, "bad_words_ids": [[5], [6], [7]], "suppress_tokens": [8, 9]},
]


DECODED_TEXTS = ["the cat sat on the mat", "a dog ran"]


def decoded(text):
    """What LatentText decodes by default: a reconstruction and two seeded samples."""
    return (
        text.reconstruct(DECODED_TEXTS, max_new_tokens=4),
        text.sample(2, generator=torch.Generator().manual_seed(0), max_new_tokens=4),
    )


@pytest.fixture(scope="module")
def plain_decoding(tiny_folder):
    return decoded(LatentText.from_pretrained(tiny_folder))


@pytest.mark.parametrize("override", GENERATION_OVERRIDES, ids=lambda o: "+".join(o))
def test_a_folders_generation_config_applies_only_where_the_caller_asks(plain_decoding, tiny_folder_copy, override):
    """do_sample made the documented-greedy reconstruct random, num_return_sequences=50 made sample(2) return 100
    texts, return_dict_in_generate made reconstruct fail with a KeyError."""
    edit_json(tiny_folder_copy / "generation_config.json", lambda config: config.update(override))
    edited = LatentText.from_pretrained(tiny_folder_copy)
    outputs = decoded(edited)
    assert outputs == plain_decoding
    assert edited.reconstruct(DECODED_TEXTS, max_new_tokens=4) == outputs[0]  # greedy: the same every time
    assert edited.folder_generation_config.to_diff_dict().items() >= override.items()


def test_the_folders_generation_config_applies_when_passed(tiny_folder_copy):
    edit_json(tiny_folder_copy / "generation_config.json", lambda g: g.update(do_sample=True, num_return_sequences=3))
    text = LatentText.from_pretrained(tiny_folder_copy)
    outputs = text.sample(2, max_new_tokens=3, generation_config=text.folder_generation_config)
    assert len(outputs) == 6


@pytest.fixture(scope="module")
def classes_folder(tmp_path_factory, tiny_folder):
    """The tiny folder with two classes fitted and saved, and the class statistics themselves."""
    folder = Path(shutil.copytree(tiny_folder, tmp_path_factory.mktemp("classes") / "model"))
    text = LatentText.from_pretrained(folder)
    texts = [f"{word} is here {i}" for i, word in enumerate(["cat", "dog", "sun", "moon"] * 3)]
    text.fit_classes(texts, ["0", "1"] * 6)
    text.save_classes(folder)
    return folder, text.classes


def rewritten(classes, **changes):
    from scalevae.latent import LatentClasses

    fields = dict(classes.__dict__)
    fields.update(changes)
    return LatentClasses(**fields)


def damage_classes(folder: Path, classes, damage: str) -> None:
    file = folder / "latent_classes.safetensors"
    d = classes.latent_size
    if damage == "flipped bit":
        flip_bit(file, "means")
    elif damage == "reordered labels":
        tensors, metadata = load_file(file), safe_open(str(file), framework="pt").metadata()
        metadata["labels"] = json.dumps(list(reversed(json.loads(metadata["labels"]))))
        save_file(tensors, str(file), metadata=metadata)
    elif damage == "truncated":
        file.write_bytes(file.read_bytes()[:-40])
    else:  # saved with a valid checksum of their own, but not statistics any model can sample from
        bad = {
            "NaN": dict(means=classes.means.clone().fill_(float("nan"))),
            "not positive definite": dict(covariances=-classes.covariances),
            "wrong shapes": dict(covariances=classes.covariances[:, :, :-1]),
            "wrong label count": dict(labels=(*classes.labels, "2")),
            "another latent size": dict(
                means=torch.zeros(2, d + 1, dtype=torch.float64),
                covariances=torch.eye(d + 1, dtype=torch.float64).expand(2, d + 1, d + 1).clone(),
            ),
        }[damage]
        rewritten(classes, **bad).save(file)


CLASS_DAMAGES = [
    "flipped bit",
    "reordered labels",
    "truncated",
    "NaN",
    "not positive definite",
    "wrong shapes",
    "wrong label count",
    "another latent size",
]


@pytest.mark.parametrize("damage", CLASS_DAMAGES)
def test_damaged_class_statistics_never_block_the_model_and_are_named(classes_folder, tmp_path, damage, caplog):
    """A flipped bit or reordered labels loaded silently; NaN, a covariance that is not positive definite, wrong
    shapes or a truncated file gave deep errors (cholesky, IndexError, SafetensorError) and blocked loading."""
    folder = Path(shutil.copytree(classes_folder[0], tmp_path / "model"))
    damage_classes(folder, classes_folder[1], damage)
    with caplog.at_level(logging.WARNING, logger="scalevae.latent"):
        text = LatentText.from_pretrained(folder)
    assert text.classes is None
    assert any("latent_classes.safetensors" in r.getMessage() for r in caplog.records)
    assert len(text.reconstruct(["the cat sat"], max_new_tokens=2)) == 1  # the model itself works
    with pytest.raises(ValueError, match=r"latent_classes\.safetensors.*refit the classes"):
        text.sample(1, label="0")


def test_intact_class_statistics_load_bit_for_bit(classes_folder):
    text = LatentText.from_pretrained(classes_folder[0])
    assert text.classes.labels == classes_folder[1].labels
    assert torch.equal(text.classes.covariances, classes_folder[1].covariances)
    assert len(text.sample(2, label="1", max_new_tokens=2)) == 2


# -- a folder is untrusted input (issue 28) -----------------------------------------------------------------------------


def doubling_normalizer(steps: int) -> dict:
    return {
        "type": "Sequence",
        "normalizers": [{"type": "Replace", "pattern": {"String": " "}, "content": "  "}] * steps,
    }


@pytest.mark.parametrize(
    ("where", "part", "value", "message"),
    [
        ("decoder_tokenizer", "normalizer", doubling_normalizer(26), r"normalizer can make a text 6\.71e\+07 times"),
        ("", "normalizer", doubling_normalizer(8), r"normalizer can make a text 256 times longer"),
        ("", "decoder", {"type": "Replace", "pattern": {"Regex": "."}, "content": "x" * 500}, r"decoder can make"),
        ("decoder_tokenizer", "normalizer", {"type": "Exotic"}, r"unknown step type 'Exotic'"),
    ],
)
def test_an_unbounded_tokenizer_pipeline_is_refused_before_it_runs(tiny_folder_copy, where, part, value, message):
    """26 chained Replace(" " -> "  ") made `generate --reconstruct` take 10 GB of memory."""
    file = tiny_folder_copy / where / "tokenizer.json"
    edit_json(file, lambda spec: spec.update({part: value}))
    with pytest.raises(ValueError, match=rf"{file}.*{message}" if where else message):
        LatentText.from_pretrained(tiny_folder_copy)


def test_real_tokenizer_pipelines_stay_within_the_bound():
    """BERT's (MiniLM's), the fitted byte-level BPE's and a doubling chain that stays short all pass."""
    from scalevae.factory import MAX_TEXT_GROWTH, _step_growth

    assert _step_growth(json.loads(tester.get_tokenizers()[0].backend_tokenizer.to_str())["normalizer"], "") <= 24
    assert _step_growth(doubling_normalizer(7), "") == 128 <= MAX_TEXT_GROWTH


def test_a_vocabulary_beyond_the_bound_is_refused(tiny_folder_copy, monkeypatch):
    monkeypatch.setattr(scalevae.factory, "MAX_TOKENIZER_TOKENS", 1000)
    with pytest.raises(ValueError, match=r"model/tokenizer\.json holds \d+ tokens, more than the 1000"):
        scalevae.load_tokenizers(tiny_folder_copy)


MISSING_LOCAL = ["w/Fg", "./Fg", "../Fg", "w/a/b", "/nonexistent/Fg", "w\\Fg", "~/nonexistent-Fg", "Fg/"]


@pytest.mark.parametrize("name", MISSING_LOCAL)
def test_a_missing_local_path_never_reaches_the_hub(tmp_path, monkeypatch, name, capsys):
    """`scalevae generate w/Fg` (a missing folder inside the folder w) was looked up as a Hub repository."""
    import huggingface_hub

    monkeypatch.chdir(tmp_path)
    (tmp_path / "w").mkdir()
    asked = []
    for function in ("hf_hub_download", "snapshot_download"):
        monkeypatch.setattr(huggingface_hub, function, lambda *a, **k: asked.append(a) or 1 / 0)
    loads = [
        scalevae.load_pretrained,
        scalevae.load_tokenizers,
        LatentText.from_pretrained,
        scalevae.ScaleVAEForLatentLM.from_pretrained,
    ]
    for load in loads:
        with pytest.raises(FileNotFoundError, match=rf"no such folder: the model {re.escape(name)} does not exist"):
            load(name)
    with pytest.raises((SystemExit, FileNotFoundError), match="no such folder"):
        main(["generate", name, "--sample", "1"])
    assert asked == []


def test_hub_ids_stay_hub_ids(tmp_path, monkeypatch):
    """`owner/name` with no local folder `owner`, and `hf://` spelled out, are Hub ids (offline here: the Hub says
    so, not "no such folder")."""
    from loading_scalevae import folder_or_hub_id

    monkeypatch.chdir(tmp_path)
    (tmp_path / "w").mkdir()
    assert folder_or_hub_id("someone/model") == "someone/model"
    assert folder_or_hub_id("hf://w/Fg") == "w/Fg"
    assert folder_or_hub_id("gpt2") == "gpt2"
    with pytest.raises(ValueError, match="not a valid Hub repository id"):
        folder_or_hub_id("hf://w/../x")
    with pytest.raises(OSError) as raised:  # looked up on the Hub (offline here), not as the local w/Fg
        LatentText.from_pretrained("hf://w/Fg")
    assert "no such folder" not in str(raised.value) and "w/Fg" in str(raised.value)


@pytest.mark.parametrize("name", ["eval_results.json", "all_results.json", "notes.json", "decoder_tokenizer/x.json"])
def test_a_broken_optional_json_file_never_blocks_loading(tiny_folder, tmp_path, name):
    folder = Path(shutil.copytree(tiny_folder, tmp_path / "model"))
    (folder / name).write_text('{"nll": 3')  # truncated
    model = scalevae.load_pretrained(folder)[0]
    assert model.config.latent_size == tester.latent_size


# -- every config.json field with a value of the wrong JSON type, and unknown fields (issue 28) -----------------------

JSON_VALUES = {"string": "x", "integer": 7, "number": 2.5, "array": [1], "null": None, "object": {}}


def accepted_json_kinds(annotation) -> set[str]:
    """The JSON kinds a config field takes, read from its annotation independently of the code under test."""
    text = str(annotation)
    kinds = set()
    if "float" in text:
        kinds |= {"integer", "number"}
    if "int" in text.replace("Literal", ""):
        kinds.add("integer")
    if "str" in text or "Literal" in text or "dtype" in text:
        kinds.add("string")
    if "None" in text or "Optional" in text:
        kinds.add("null")
    if "dict" in text:
        kinds.add("object")
    if "list" in text:
        kinds.add("array")
    return kinds


def test_every_config_field_of_a_wrong_json_type_is_refused_naming_it(tiny_folder, tmp_path):
    """Each field of a saved config.json, given each JSON kind it does not take: a ValueError that names the field, never
    a deep TypeError/AttributeError nor a silently different config."""
    import dataclasses
    import typing

    from configuration_scalevae import ScaleVAEConfig

    hints = typing.get_type_hints(ScaleVAEConfig, localns={"torch": torch})
    annotations = {item.name: hints[item.name] for item in dataclasses.fields(ScaleVAEConfig)}
    annotations.update(encoder=dict, decoder=dict, model_type=str, auto_map=dict | None, use_cache=bool)
    saved = json.loads((tiny_folder / "config.json").read_text())
    folder = Path(shutil.copytree(tiny_folder, tmp_path / "model"))
    tried = 0
    for field in sorted(saved):
        accepted = accepted_json_kinds(annotations[field])
        for kind, value in JSON_VALUES.items():
            if kind in accepted:
                continue
            (folder / "config.json").write_text(json.dumps({**saved, field: value}))
            with pytest.raises(ValueError, match=rf"\b{field}\b"):
                ScaleVAEConfig.from_pretrained(folder)
            tried += 1
    assert tried >= 53


@pytest.mark.parametrize(
    "edit, match",
    [
        (dict(latent_sise=8), r"unknown field 'latent_sise'\. Did you mean 'latent_size'\?"),
        (dict(colapse_strategy="vae"), r"Did you mean 'collapse_strategy'\?"),
        (dict(encoder={}), r"field 'encoder' names no model_type"),
        (dict(architectures=[1]), r"field 'architectures' is \[1\]: every item must be a JSON string"),
        (dict(dtype="float99"), r"field 'dtype' is 'float99', not the name of a torch dtype"),
        (dict(use_cache="no"), r"field 'use_cache' is 'no', a JSON string; it must be a JSON boolean"),
    ],
)
def test_unknown_or_impossible_config_fields_are_refused_by_name(tiny_folder_copy, edit, match):
    edit_json(tiny_folder_copy / "config.json", lambda config: config.update(edit))
    with pytest.raises(ValueError, match=match):
        scalevae.load_pretrained(tiny_folder_copy)
