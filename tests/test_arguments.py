"""The Python API's argument checks: token ids, batch sizes, latents, positions and sizes are checked where they enter,
with an error that names the argument, before anything is allocated or generated."""

import logging
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import scalevae
from scalevae import LatentText, hub
from scalevae.cli import main
from scalevae.options import OptionError
from tests.model_tester import (
    corpus_file,
    tester,
)

# -- model inputs -------------------------------------------------------------------------------------------------


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


def test_encoder_inputs_longer_than_its_positions_are_refused_by_name():
    model = tester.get_model(collapse_strategy="vae").eval()
    positions = model.config.encoder.max_position_embeddings
    ids = torch.ones(1, positions + 1, dtype=torch.long)
    with pytest.raises(ValueError, match=r"input_ids of length \d+ need more positions than the encoder has"):
        model.encode(ids)


# -- generation and latents ---------------------------------------------------------------------------------------


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


def test_sample_zero_is_refused(small, tokenizers):
    with pytest.raises(ValueError, match=r"num_samples=0 must be a whole number in \[1, 65536\]"):
        LatentText(small, *tokenizers).sample(0)


def test_encoding_and_decoding_zero_rows(small, tokenizers):
    text = LatentText(small, *tokenizers)
    assert text.decode(torch.zeros(0, 4)) == []
    assert text.encode([]).shape == (0, 4)
    with pytest.raises(ValueError, match=r"latents of shape \(0, 3\): expected \(n, 4\)"):
        text.decode(torch.zeros(0, 3))


# -- building a model ---------------------------------------------------------------------------------------------


def test_a_new_model_is_validated_before_anything_is_allocated(
    tmp_path, tiny_encoder_path, monkeypatch, train_command
):
    from transformers import GPT2LMHeadModel

    def never(*args, **kwargs):
        raise AssertionError("a decoder was allocated")

    monkeypatch.setattr(GPT2LMHeadModel, "_from_config", never)
    data = corpus_file(tmp_path, lines=16)
    with pytest.raises(ValueError, match=r"--decoder_width 0: must be a whole number in \[1, 65536\]"):
        main(train_command(tmp_path / "run", data, "--max_steps", "1", "--decoder_width", "0"))
    with pytest.raises(ValueError, match=r"decoder\.n_embd=0 must be an integer in \[1, 65536\]"):
        scalevae.build_model(tiny_encoder_path, decoder_config_overrides=dict(n_embd=0))
    with pytest.raises(ValueError, match=r"latent_size=100000000 must be an integer in \[1, 65536\]"):
        tester.build(tiny_encoder_path, latent_size=10**8)


# -- every LatentText method runs in eval mode and writes no buffer -----------------------------------------


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


# -- one argument checker for every public call (issue 28) -------------------------------------------------------------


@pytest.fixture(scope="module")
def latent_text(tiny_encoder_path):
    model, *tokenizers = tester.build(tiny_encoder_path, seed=2)
    return LatentText(model.eval(), *tokenizers)


@pytest.fixture(scope="module")
def direction(latent_text):
    return latent_text.direction_between(["the cat sat", "a dog ran"], ["stocks fell", "prices rose"])


def zeros(rows=2):
    return torch.zeros(rows, tester.latent_size)


def batch_of(ids):
    return [{"input_ids": ids}]


# (call, the argument its error must name): each ended in a deep error or was silently accepted before.
REFUSED_CALLS = {
    "encode(one string)": (lambda t, d: t.encode("a b"), "texts"),
    "encode([None])": (lambda t, d: t.encode([None]), "texts[0]"),
    "encode(a number)": (lambda t, d: t.encode(3), "texts"),
    "decode(a 1-D tensor)": (lambda t, d: t.decode(torch.zeros(4)), "latents"),
    "decode(strings)": (lambda t, d: t.decode([["a"]]), "latents"),
    "decode(num_beams=0)": (lambda t, d: t.decode(zeros(), num_beams=0), "num_beams"),
    "decode(num_beams=10**6)": (lambda t, d: t.decode(zeros(), num_beams=10**6), "num_beams"),
    "decode(max_new_tokens=2.5)": (lambda t, d: t.decode(zeros(), max_new_tokens=2.5), "max_new_tokens"),
    "decode(max_new_tokens=True)": (lambda t, d: t.decode(zeros(), max_new_tokens=True), "max_new_tokens"),
    "decode(top_p=nan)": (lambda t, d: t.decode(zeros(), do_sample=True, top_p=float("nan")), "top_p"),
    "decode(top_k=-1)": (lambda t, d: t.decode(zeros(), do_sample=True, top_k=-1), "top_k"),
    "decode(temperature=0)": (lambda t, d: t.decode(zeros(), do_sample=True, temperature=0), "temperature"),
    "decode(do_sample='yes')": (lambda t, d: t.decode(zeros(), do_sample="yes"), "do_sample"),
    "decode(num_return_sequences=0)": (lambda t, d: t.decode(zeros(), num_return_sequences=0), "num_return_sequences"),
    "sample(generator=123)": (lambda t, d: t.sample(2, generator=123), "generator"),
    "sample(2.0)": (lambda t, d: t.sample(2.0), "num_samples"),
    "sample(10**9)": (lambda t, d: t.sample(10**9), "num_samples"),
    "decode_in_batches(batch_size=0)": (lambda t, d: t.decode_in_batches(zeros(), batch_size=0), "batch_size"),
    "encode_in_batches(batch_size='8')": (lambda t, d: t.encode_in_batches(["a b"], batch_size="8"), "batch_size"),
    "edit(strength='1')": (lambda t, d: t.edit(["a b"], d, strength="1"), "strength"),
    "edit(strength=1e300)": (lambda t, d: t.edit(["a b"], d, strength=1e300), "strength"),
    "edit(strength=nan)": (lambda t, d: t.edit(["a b"], d, strength=float("nan")), "strength"),
    "edit(direction=None)": (lambda t, d: t.edit(["a b"], None, strength=1.0), "direction"),
    "interpolate(steps=10**9)": (lambda t, d: t.interpolate("a b", "c d", steps=10**9), "steps"),
    "interpolate(a list)": (lambda t, d: t.interpolate(["a b"], "c d"), "text_a"),
    "traverse(dim=99)": (lambda t, d: t.traverse("a b", 99, [1.0]), "dim"),
    "traverse(values='12')": (lambda t, d: t.traverse("a b", 0, "12"), "values"),
    "max_length=-1": (lambda t, d: setattr(t, "max_length", -1), "max_length"),
    "classes='x'": (lambda t, d: setattr(t, "classes", "x"), "classes"),
    "fit_prior(lists)": (lambda t, d: t.model.fit_prior([[1, 2, 3]]), "batches[0]"),
    "fit_prior(list ids)": (lambda t, d: t.model.fit_prior(batch_of([[1, 2, 3]])), "input_ids"),
    "fit_prior(generator=1)": (lambda t, d: t.model.fit_prior(batch_of(torch.ones(1, 3).long()), 1), "generator"),
    "sample_prior(generator='a')": (lambda t, d: t.model.sample_prior(2, generator="a"), "generator"),
    "generate(sample_posterior='no')": (
        lambda t, d: t.model.generate(latents=zeros(), sample_posterior="no"),
        "sample_posterior",
    ),
    "forward(kl_weight=nan tensor)": (
        lambda t, d: t.model(**tester.prepare_inputs(vocab_size=100), kl_weight=torch.tensor(float("nan"))),
        "kl_weight",
    ),
    "forward(kl_weight='1')": (
        lambda t, d: t.model(**tester.prepare_inputs(vocab_size=100), kl_weight="1"),
        "kl_weight",
    ),
}


@pytest.mark.parametrize("case", sorted(REFUSED_CALLS))
def test_every_public_call_refuses_a_bad_argument_by_name(latent_text, direction, case):
    call, name = REFUSED_CALLS[case]
    with pytest.raises((ValueError, TypeError), match=re.escape(name)) as error:
        call(latent_text, direction)
    # One error class for every refusal: caught as a ValueError and as a TypeError alike.
    assert isinstance(error.value, ValueError) and isinstance(error.value, TypeError), type(error.value)


def test_build_model_refuses_one_string_as_train_texts(tiny_encoder_path):
    with pytest.raises(ValueError, match=r"train_texts must be an iterable of texts .* not str"):
        scalevae.build_model(tiny_encoder_path, train_texts="one text", decoder_vocab_size=300)


@pytest.mark.parametrize(
    "strength",
    [1, 1.0, np.float32(1.0), np.int64(1), torch.tensor(1.0), [1.0, -1.0], np.array([1.0, -1.0]), torch.ones(2)],
    ids=lambda value: type(value).__name__,
)
def test_any_numeric_strength_is_accepted(latent_text, direction, strength):
    """A strength from numpy or torch (a scalar, a 0-d tensor, one per text) means what the same Python number does."""
    texts = ["the cat sat", "a dog ran"]
    z = latent_text.encode(texts)
    per_text = np.asarray(strength, dtype=float).tolist() if np.ndim(strength) else 1.0
    expected = latent_text.edit_latents(z, direction, per_text)
    assert torch.equal(latent_text.edit_latents(z, direction, strength), expected)


def test_texts_from_any_iterable_encode_alike(latent_text):
    texts = ["the cat sat", "a dog ran"]
    expected = latent_text.encode(texts)
    for same in (tuple(texts), (t for t in texts), np.array(texts)):
        assert torch.equal(latent_text.encode(same), expected)


# -- property: wrong types and values for every argument of every public call -----------------------------------------

WRONG_COMMON = st.one_of(
    st.text(max_size=3),
    st.lists(st.text(max_size=2), min_size=1, max_size=2),
    st.dictionaries(st.text(), st.integers(), max_size=1),
)


def wrong_integer(low):
    return st.one_of(
        WRONG_COMMON,
        st.booleans(),
        st.floats(allow_nan=True, allow_infinity=True),
        st.integers(max_value=low - 1),
    )


def wrong_number(low=None, low_open=False):
    bad = [WRONG_COMMON, st.booleans(), st.sampled_from([float("nan"), float("inf"), -float("inf")])]
    if low is not None:
        bad.append(st.floats(max_value=low, exclude_max=not low_open, allow_nan=False))
    return st.one_of(*bad)


WRONG_FLAG = st.one_of(WRONG_COMMON, st.integers(), st.floats())
WRONG_GENERATOR = st.one_of(WRONG_COMMON, st.integers(), st.floats(), st.booleans())
WRONG_TEXTS = st.one_of(
    st.text(max_size=5),
    st.integers(),
    st.floats(),
    st.lists(st.one_of(st.integers(), st.none(), st.just(""), st.just("  "), st.floats()), min_size=1, max_size=3),
)
WRONG_LATENTS = st.one_of(
    st.text(max_size=3),
    st.lists(st.text(min_size=1, max_size=2), min_size=1, max_size=2),
    st.builds(torch.zeros, st.integers(1, 3)),  # one dimension
    st.builds(lambda n: torch.zeros(n, tester.latent_size + 1), st.integers(1, 3)),
    st.builds(lambda n: torch.zeros(n, tester.latent_size, dtype=torch.long), st.integers(1, 3)),
)

# (call taking the bad value, the argument's name, values it must refuse)
PROPERTY_CALLS = [
    (lambda t, d, v: t.encode(v), "texts", WRONG_TEXTS),
    (lambda t, d, v: t.encode_in_batches(v), "texts", WRONG_TEXTS),
    (lambda t, d, v: t.reconstruct(v), "texts", WRONG_TEXTS),
    (lambda t, d, v: t.fit_classes(v, ["0"]), "texts", WRONG_TEXTS),
    (lambda t, d, v: t.edit(v, d, 1.0), "texts", WRONG_TEXTS),
    (lambda t, d, v: t.decode(v), "latents", WRONG_LATENTS),
    (lambda t, d, v: t.decode_in_batches(v), "latents", WRONG_LATENTS),
    (lambda t, d, v: t.edit_latents(v, d, 1.0), "latents", WRONG_LATENTS),
    (lambda t, d, v: t.encode_in_batches(["a b"], batch_size=v), "batch_size", wrong_integer(1)),
    (lambda t, d, v: t.decode_in_batches(zeros(), batch_size=v), "batch_size", wrong_integer(1)),
    (lambda t, d, v: t.fit_classes(["a", "b"], ["0", "0"], batch_size=v), "batch_size", wrong_integer(1)),
    (lambda t, d, v: t.sample(v), "num_samples", wrong_integer(1)),
    (lambda t, d, v: t.sample(2, generator=v), "generator", WRONG_GENERATOR),
    (lambda t, d, v: t.interpolate("a b", "c d", steps=v), "steps", wrong_integer(2)),
    (lambda t, d, v: t.traverse("a b", v, [1.0]), "dim", wrong_integer(0)),
    (lambda t, d, v: t.traverse("a b", 0, [v]), "values[0]", wrong_number()),
    (lambda t, d, v: t.edit(["a b"], d, v), "strength", wrong_number()),
    (lambda t, d, v: t.edit_latents(zeros(), d, v), "strength", wrong_number()),
    (lambda t, d, v: t.model.sample_prior(v), "num_samples", wrong_integer(1)),
    (lambda t, d, v: t.model.sample_prior(2, generator=v), "generator", WRONG_GENERATOR),
    (lambda t, d, v: t.model.generate(latents=zeros(), generator=v), "generator", WRONG_GENERATOR),
    (
        lambda t, d, v: t.model(**tester.prepare_inputs(vocab_size=100), kl_weight=v),
        "kl_weight",
        wrong_number(0.0, low_open=False),
    ),
    *[
        (lambda t, d, v, name=name: t.decode(zeros(), **{name: v}), name, strategy)
        for name, strategy in {
            "max_new_tokens": wrong_integer(1),
            "num_beams": wrong_integer(1),
            "num_return_sequences": wrong_integer(1),
            "top_k": wrong_integer(0),
            "top_p": wrong_number(0.0, low_open=True),
            "temperature": wrong_number(0.0, low_open=True),
            "repetition_penalty": wrong_number(0.0, low_open=True),
            "do_sample": WRONG_FLAG,
        }.items()
    ],
]


@pytest.mark.parametrize("index", range(len(PROPERTY_CALLS)), ids=lambda i: PROPERTY_CALLS[i][1] + f"-{i}")
def test_wrong_types_and_values_are_refused_naming_the_argument(latent_text, direction, index):
    call, name, wrong = PROPERTY_CALLS[index]

    @settings(max_examples=12, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
    @given(value=wrong)
    def refused(value):
        with pytest.raises((ValueError, TypeError)) as error:
            call(latent_text, direction, value)
        assert name in str(error.value), f"{value!r}: {error.value}"

    refused()


@pytest.mark.parametrize(
    "argv, match",
    [
        (["--num_examples", "-5"], r"--num_examples -5: must be a whole number in \[1, 65536\]"),
        (["--num_examples", "0"], r"--num_examples 0"),
        (["--max_new_tokens", "0"], r"--max_new_tokens 0"),
    ],
)
def test_edit_options_are_bounded(tmp_path, argv, match):
    files = ["--labelled_file", "x.txt", "--label_file", "x.label", "--to", "1", "--strength", "1"]
    with pytest.raises(OptionError, match=match):
        main(["edit", str(tmp_path), *files, *argv])


@pytest.mark.parametrize(
    "argv, match",
    [
        (["--sample", str(10**9)], r"--sample 1000000000: must be a whole number in \[1, 65536\]"),
        (["--interpolate", "a", "b", "--steps", str(10**9)], r"--steps 1000000000: must be a whole number in \[2,"),
        (["--sample", "2", "--num_beams", "100000"], r"--num_beams 100000: must be a whole number in \[1, 256\]"),
    ],
)
def test_generate_sizes_are_bounded_before_loading(tmp_path, argv, match):
    with pytest.raises(OptionError, match=match):
        main(["generate", str(tmp_path), *argv])
