"""Reliability, round 3 (issue 28, part A): validate then change, outputs outside model folders, eval mode everywhere,
one argument checker, generation from a returned cache."""

import json
import shutil
from pathlib import Path

import pytest
import torch

import scalevae
from scalevae import LatentText, hub
from scalevae.cli import main
from scalevae.options import OptionError
from scalevae.outputs import write_atomically
from tests.model_tester import tester


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def parts(tiny_encoder_path):
    return tester.build(tiny_encoder_path)


@pytest.fixture
def fresh_parts(tiny_encoder_path):
    """A model this test may change."""
    return tester.build(tiny_encoder_path)


@pytest.fixture(scope="module")
def saved(tmp_path_factory, parts):
    return hub.save_model(tmp_path_factory.mktemp("saved") / "model", *parts)


def folder_bytes(folder):
    return {p.relative_to(folder): p.read_bytes() for p in sorted(Path(folder).rglob("*")) if p.is_file()}


# -- 1. validate, then change; validate before every save -------------------------------------------------------------


@pytest.mark.parametrize(
    "args, match",
    [
        (("mixture", 0), r"prior_components=0 must be an integer in \[1, 65536\]"),
        (("mixture", -3), r"prior_components=-3"),
        (("mixture", 2.5), r"prior_components=2.5"),
        (("mixture", True), r"prior_components=True"),
        (("gaussian", None), r"prior='gaussian' is not one of"),
        ((None, None), r"prior=None is not one of"),
    ],
)
def test_a_refused_setter_changes_nothing_and_the_next_save_loads(fresh_parts, tmp_path, args, match):
    model, *tokenizers = fresh_parts
    config_before = model.config.to_dict()
    prior_before = {k: v.clone() for k, v in model.fitted_prior.state_dict().items()}
    with pytest.raises(ValueError, match=match):
        model.set_prior(*args)
    assert model.config.to_dict() == config_before
    assert prior_before.keys() == model.fitted_prior.state_dict().keys()
    for key, value in model.fitted_prior.state_dict().items():
        assert torch.equal(value, prior_before[key]), key
    folder = hub.save_model(tmp_path / "model", model, *tokenizers)
    assert scalevae.load_pretrained(folder)[0].config.to_dict()["prior"] == config_before["prior"]


def test_an_accepted_setter_saves_a_folder_that_loads(fresh_parts, tmp_path):
    model, *tokenizers = fresh_parts
    model.set_prior("mixture", components=3)
    loaded = scalevae.load_pretrained(hub.save_model(tmp_path / "model", model, *tokenizers))[0]
    assert (loaded.config.prior, loaded.config.prior_components) == ("mixture", 3)


@pytest.mark.parametrize(
    "field, value, match",
    [
        ("prior_components", 0, r"Not saved: the model's config would not load \(prior_components=0"),
        ("kl_weight", float("nan"), r"Not saved.*kl_weight=nan"),
        ("latent_injection", "everywhere", r"Not saved.*latent_injection='everywhere'"),
        # Valid values that describe another model than the one whose tensors are saved.
        (
            "latent_size",
            8,
            r"(?s)Not saved: the model.s config no longer describes its tensors.*latent_head.proj.weight",
        ),
        ("prior", "mixture", r"fitted_prior.component_loc: \(1, 4\), the config gives \(4, 4\)"),
        ("prior", "fitted", r"fitted_prior.component_loc: not in the config"),
        ("latent_injection", "embedding", r"injection.to_memory.weight: not in the config"),
    ],
)
def test_no_save_writes_a_folder_that_would_not_load(fresh_parts, saved, tmp_path, field, value, match):
    """A config changed by hand is checked by every save (save_model, save_pretrained, Trainer checkpoints): refused
    before anything is written, the folder saved before left as it was."""
    model, *tokenizers = fresh_parts
    folder = Path(shutil.copytree(saved, tmp_path / "model"))
    before = folder_bytes(folder)
    setattr(model.config, field, value)
    with pytest.raises(ValueError, match=match):
        hub.save_model(folder, model, *tokenizers)
    with pytest.raises(ValueError, match=match):
        model.save_pretrained(tmp_path / "plain")
    assert folder_bytes(folder) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]  # no partial folder, no leftover


def test_validated_copy_names_unknown_fields_with_a_suggestion(parts):
    model = parts[0]
    with pytest.raises(
        ValueError, match=r"'prior_component' is not a ScaleVAEConfig field\. Did you mean 'prior_components'"
    ):
        model.config.validated_copy(prior_component=3)


# -- 2. outputs: checked before the work, atomic, never inside a model folder ------------------------------------------


@pytest.fixture
def test_file(tmp_path):
    path = tmp_path / "test.txt"
    path.write_text("the cat sat\na dog ran far\nthree words here\n")
    return path


def evaluate_args(folder, data, *extra):
    return ["evaluate", str(folder), "--data", str(data), "--num_samples", "0", "--max_length", "16", *extra]


@pytest.mark.parametrize(
    "output, match",
    [
        ("model/model.safetensors", r"--output .*model.safetensors lies inside the input model folder"),
        ("model/config.json", r"--output .*config.json lies inside the input model folder"),
        ("model/eval_results.json", r"lies inside the input model folder"),
        ("model/decoder_tokenizer/new.json", r"lies inside the input model folder"),
        ("model", r"lies inside|is the input model folder|is a folder"),
        ("test.txt", r"--output .*test.txt is the input file"),
        ("other/config.json", r"--output .*config.json lies inside the model folder .*other"),
        ("subdir", r"--output .*subdir is a folder: give a file name"),
    ],
)
def test_evaluate_refuses_an_output_inside_a_model_folder_before_any_work(
    saved, tmp_path, test_file, output, match, monkeypatch
):
    folder = Path(shutil.copytree(saved, tmp_path / "model"))
    shutil.copytree(saved, tmp_path / "other")  # another model folder, not an input of the command
    (tmp_path / "subdir").mkdir()
    before = folder_bytes(folder), test_file.read_bytes()

    def no_work(*args, **kwargs):
        raise AssertionError("the output was checked after the work started")

    monkeypatch.setattr(scalevae.factory, "load_pretrained", no_work)
    with pytest.raises(OptionError, match=match):
        main(evaluate_args(folder, test_file, "--output", str(tmp_path / output)))
    assert (folder_bytes(folder), test_file.read_bytes()) == before


def test_evaluate_writes_only_where_asked_and_atomically(saved, tmp_path, test_file, capsys):
    folder = Path(shutil.copytree(saved, tmp_path / "model"))
    before = folder_bytes(folder)
    main(evaluate_args(folder, test_file))
    assert folder_bytes(folder) == before  # without --output: printed, nothing written
    assert "kl" in capsys.readouterr().out
    output = tmp_path / "figures" / "metrics.json"
    main(evaluate_args(folder, test_file, "--output", str(output)))
    assert json.loads(output.read_text())["kl"] is not None
    assert sorted(p.name for p in output.parent.iterdir()) == ["metrics.json"]


def test_a_write_that_fails_leaves_the_old_file_and_no_temporary(tmp_path, monkeypatch):
    path = tmp_path / "results.json"
    path.write_text('{"old": 1}')

    def fail(self, *args, **kwargs):
        Path.write_bytes(self, b'{"ne')  # half a file, then the process dies
        raise KeyboardInterrupt

    monkeypatch.setattr(Path, "write_text", fail)
    with pytest.raises(KeyboardInterrupt):
        write_atomically(path, '{"new": 2}')
    assert [p.name for p in tmp_path.iterdir()] == ["results.json"]
    assert path.read_text() == '{"old": 1}'


@pytest.mark.parametrize("name", ["eval_results.json", "all_results.json", "notes.json", "decoder_tokenizer/x.json"])
def test_a_broken_optional_json_file_never_blocks_loading(saved, tmp_path, name):
    folder = Path(shutil.copytree(saved, tmp_path / "model"))
    (folder / name).write_text('{"nll": 3')  # truncated
    model = scalevae.load_pretrained(folder)[0]
    assert model.config.latent_size == tester.latent_size


@pytest.mark.parametrize("command", ["train", "quickstart", "compare"])
def test_run_commands_refuse_an_output_folder_inside_a_model_folder_at_parse_time(saved, tmp_path, command):
    folder = Path(shutil.copytree(saved, tmp_path / "model"))
    with pytest.raises(OptionError, match=r"--output_dir .*runs lies inside the model folder"):
        main([command, "--output_dir", str(folder / "runs"), "--max_steps", "1"])


# -- 3. every LatentText method runs in eval mode and writes no buffer -------------------------------------------------


def method_calls(text: LatentText, folder: Path) -> dict:
    """One valid call of every public LatentText method (the test fails when a method has none here)."""
    texts = ["the cat sat on the mat", "a dog ran far away", "stocks fell sharply today", "prices rose again"]
    labels = ["0", "0", "1", "1"]
    direction = text.direction_between(texts[:2], texts[2:])
    short = dict(max_new_tokens=3)
    return {
        "encode": lambda: text.encode(texts),
        "decode": lambda: text.decode(torch.zeros(2, tester.latent_size), **short),
        "reconstruct": lambda: text.reconstruct(texts[:2], **short),
        "encode_in_batches": lambda: text.encode_in_batches(texts, batch_size=3),
        "decode_in_batches": lambda: text.decode_in_batches(torch.zeros(3, tester.latent_size), batch_size=2, **short),
        "sample": lambda: text.sample(2, generator=torch.Generator().manual_seed(0), **short),
        "attribute_direction": lambda: text.attribute_direction(texts, labels),
        "direction_between": lambda: text.direction_between(texts[:2], texts[2:]),
        "edit_latents": lambda: text.edit_latents(text.encode(texts), direction, 1.0),
        "edit": lambda: text.edit(texts[:2], direction, 1.0, **short),
        "fit_classes": lambda: text.fit_classes(texts, labels),
        "save_classes": lambda: text.save_classes(folder),
        "interpolate": lambda: text.interpolate(texts[0], texts[1], steps=3, **short),
        "analogy": lambda: text.analogy(texts[0], texts[1], texts[2], **short),
        "traverse": lambda: text.traverse(texts[0], 0, [-1.0, 1.0], **short),
    }


def public_methods(cls) -> set[str]:
    return {
        name
        for name, member in vars(cls).items()
        if not name.startswith("_") and callable(member) and not isinstance(member, (classmethod, staticmethod))
    }


@pytest.mark.parametrize("strategy", ["scale", "bn"])
def test_every_latent_text_method_runs_in_eval_mode_and_writes_no_buffer(tiny_encoder_path, tmp_path, strategy):
    """A model left in training mode (by a Trainer, say): Scale-VAE's running factors, BN-VAE's running statistics and
    the fitted prior's running moments would move with every encoded batch, and dropout would make outputs random."""
    model, *tokenizers = tester.build(tiny_encoder_path, collapse_strategy=strategy, seed=1)
    folder = hub.save_model(tmp_path / "model", model, *tokenizers)
    text = LatentText(model.train(), *tokenizers)
    calls = method_calls(text, folder)
    assert public_methods(LatentText) - {"from_pretrained"} == set(calls)
    for name, call in calls.items():
        buffers = {key: value.clone() for key, value in model.named_buffers()}
        first = call()
        model.train()
        for key, value in model.named_buffers():
            assert torch.equal(value, buffers[key]), f"{name} wrote {key}"
        assert model.training, f"{name} left the model in eval mode"
        if name in ("encode", "reconstruct", "decode"):  # no dropout: the same call gives the same result
            second = call()
            assert torch.equal(first, second) if isinstance(first, torch.Tensor) else first == second, name


# -- 5. generation: from a returned cache, assisted decoding, the encoder's outputs ----------------------------------


@pytest.fixture(scope="module")
def generation_models():
    return {
        injection: tester.get_model(dropout=0.0, latent_injection=injection).eval()
        for injection in ("memory", "embedding", "both")
    }


NO_EOS = dict(eos_token_id=-1, pad_token_id=0, do_sample=False, return_dict_in_generate=True, output_logits=True)


@pytest.mark.parametrize("injection", ["memory", "embedding", "both"])
def test_generation_continued_from_a_returned_cache_equals_teacher_forcing(generation_models, injection):
    model = generation_models[injection]
    batch = tester.prepare_inputs()
    encoder = dict(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    first = model.generate(**encoder, max_new_tokens=3, **NO_EOS)
    assert first.cache is not None
    more = model.generate(**encoder, decoder_input_ids=first.sequences, cache=first.cache, max_new_tokens=3, **NO_EOS)
    teacher_forced = model(**encoder, decoder_input_ids=more.sequences[:, :-1]).logits
    start = first.sequences.shape[1] - 1
    for step, logits in enumerate(more.logits):
        torch.testing.assert_close(logits, teacher_forced[:, start + step], atol=1e-4, rtol=0)
    uncached = model.generate(**encoder, decoder_input_ids=first.sequences, max_new_tokens=3, **NO_EOS)
    assert torch.equal(more.sequences, uncached.sequences)


def test_a_cache_longer_than_the_decoder_inputs_is_named(generation_models):
    model = generation_models["both"]
    batch = tester.prepare_inputs()
    first = model.generate(input_ids=batch["input_ids"], max_new_tokens=3, **NO_EOS)
    with pytest.raises(ValueError, match=r"The cache holds 3 decoder positions but decoder_input_ids has 1"):
        model.generate(input_ids=batch["input_ids"], cache=first.cache, max_new_tokens=2, **NO_EOS)


@pytest.mark.parametrize(
    "assisted",
    [
        lambda model: dict(assistant_model=model),
        lambda model: dict(prompt_lookup_num_tokens=2),
        lambda model: dict(assistant_early_exit=1),
    ],
)
def test_assisted_decoding_is_refused_with_the_reason(generation_models, assisted):
    model = generation_models["both"]
    batch = tester.prepare_inputs()
    with pytest.raises(
        ValueError, match=r"assisted decoding is not supported by Scale-VAE\. Each sentence is decoded"
    ):
        model.generate(input_ids=batch["input_ids"], max_new_tokens=2, **assisted(model))


def test_generate_returns_the_encoders_attentions_and_hidden_states():
    model = tester.get_model(dropout=0.0).eval()
    model.set_attn_implementation("eager")  # SDPA computes no attention weights to return (transformers warns)
    batch = tester.prepare_inputs()
    out = model.generate(
        input_ids=batch["input_ids"],
        attention_mask=batch["attention_mask"],
        max_new_tokens=2,
        output_attentions=True,
        output_hidden_states=True,
        **NO_EOS,
    )
    reference = model.encoder(
        input_ids=batch["input_ids"],
        attention_mask=batch["attention_mask"],
        output_attentions=True,
        output_hidden_states=True,
    )
    assert len(out.encoder_attentions) == tester.encoder_layers
    assert len(out.encoder_hidden_states) == tester.encoder_layers + 1
    for got, expected in zip(
        out.encoder_attentions + out.encoder_hidden_states, reference.attentions + reference.hidden_states
    ):
        torch.testing.assert_close(got, expected)
    assert out.decoder_attentions is not None and out.decoder_hidden_states is not None
