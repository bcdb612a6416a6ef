"""The Python API's argument checks: token ids, batch sizes, latents, positions and sizes are checked where they enter,
with an error that names the argument, before anything is allocated or generated."""

import logging
from pathlib import Path

import pytest
import torch

import scalevae
from scalevae import LatentText, hub
from scalevae.cli import main
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
    with pytest.raises(ValueError, match=r"num_samples=0 must be a whole number >= 1"):
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
