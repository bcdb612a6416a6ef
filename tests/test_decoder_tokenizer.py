"""The decoder tokenizer fitted to the training text (scalevae.factory.fit_decoder_tokenizer) and what build_model, the
saved folder and remote-code loading make of it. Tiny models; nothing reaches the network."""

import uuid

import pytest
import torch
from transformers import AutoConfig, AutoModel, AutoTokenizer, PreTrainedTokenizerFast

from scalevae import LatentText
from scalevae.corpus import default_corpus_files
from scalevae.factory import DECODER_SPECIAL_TOKENS, fit_decoder_tokenizer
from scalevae.hub import save_model
from tests.model_tester import tester
from tests.test_hub import remote_code_only  # noqa: F401  (a fixture)

VOCAB = 512


def corpus(split: str) -> list[str]:
    with open(default_corpus_files()[split], encoding="utf-8") as handle:
        return [line.strip() for line in handle if line.strip()]


@pytest.fixture(scope="module")
def fitted():
    return fit_decoder_tokenizer(corpus("train"), vocab_size=VOCAB)


def test_round_trips_text_exactly(fitted):
    texts = corpus("test")[:100] + ["Spaces  twice , a tab\there, ünïcödé → ≥ 5 and a CJK 漢字 never seen."]
    ids = fitted(texts, add_special_tokens=False)["input_ids"]
    assert [fitted.decode(row) for row in ids] == texts
    assert fitted.batch_decode(ids, skip_special_tokens=True) == texts


def test_special_tokens_and_size(fitted):
    assert len(fitted) == VOCAB
    assert (fitted.pad_token_id, fitted.bos_token_id, fitted.eos_token_id) == (0, 1, 2)
    names = ("pad_token", "bos_token", "eos_token")
    assert fitted.convert_ids_to_tokens([0, 1, 2]) == [DECODER_SPECIAL_TOKENS[name] for name in names]
    # special tokens in the text are not split into bytes when skipped on decoding
    assert (
        fitted.decode([1, *fitted("Return it.", add_special_tokens=False)["input_ids"], 2], skip_special_tokens=True)
        == "Return it."
    )


def test_fit_is_deterministic(fitted):
    again = fit_decoder_tokenizer(corpus("train"), vocab_size=VOCAB)
    assert again.backend_tokenizer.to_str() == fitted.backend_tokenizer.to_str()


def test_vocabulary_too_small_is_refused():
    with pytest.raises(ValueError, match="vocab_size=100"):
        fit_decoder_tokenizer(["a b c"], vocab_size=100)


@pytest.fixture(scope="module")
def built(tiny_encoder_path):
    return tester.build(tiny_encoder_path, train_texts=corpus("train")[:2000], decoder_vocab_size=VOCAB)


def test_build_model_fits_the_decoder_tokenizer_and_its_ids_reach_the_config(built, tiny_encoder_path):
    model, encoder_tokenizer, decoder_tokenizer = built
    assert isinstance(decoder_tokenizer, PreTrainedTokenizerFast) and len(decoder_tokenizer) == VOCAB
    assert model.config.decoder.vocab_size == VOCAB
    for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
        assert getattr(model.config.decoder, name) == getattr(decoder_tokenizer, name)
        assert getattr(model.generation_config, name) == getattr(decoder_tokenizer, name)
    # the encoder keeps its own tokenizer
    assert encoder_tokenizer.vocab_size == AutoTokenizer.from_pretrained(tiny_encoder_path).vocab_size


def test_without_texts_the_decoder_shares_the_encoders_vocabulary(tiny_encoder_path):
    model, encoder_tokenizer, decoder_tokenizer = tester.build(tiny_encoder_path)
    assert len(decoder_tokenizer) == len(encoder_tokenizer) == model.config.decoder.vocab_size


def test_a_given_tokenizer_object_is_used(tiny_encoder_path, fitted):
    model, _, decoder_tokenizer = tester.build(tiny_encoder_path, decoder_tokenizer=fitted)
    assert decoder_tokenizer is fitted and model.config.decoder.vocab_size == VOCAB


@pytest.fixture(scope="module")
def folder(built, tmp_path_factory):
    model, encoder_tokenizer, decoder_tokenizer = built
    # a unique basename: transformers names a local folder's remote-code module after it
    return save_model(
        tmp_path_factory.mktemp("fitted") / f"fitted_{uuid.uuid4().hex[:8]}",
        model.eval(),
        encoder_tokenizer,
        decoder_tokenizer,
    )


def greedy(model, encoder_tokenizer, decoder_tokenizer, texts):
    batch = encoder_tokenizer(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        z = model.encode(batch["input_ids"], batch["attention_mask"]).decoder_mu
        ids = model.generate(latents=z, max_new_tokens=8, do_sample=False)
    return ids, decoder_tokenizer.batch_decode(ids, skip_special_tokens=True)


def test_saved_folder_loads_and_generates_with_the_package(built, folder):
    texts = corpus("test")[:3]
    text = LatentText.from_pretrained(folder)
    assert text.decoder_tokenizer.backend_tokenizer.to_str() == built[2].backend_tokenizer.to_str()
    assert text.reconstruct(texts, max_new_tokens=8, do_sample=False) == greedy(*built, texts)[1]


def test_saved_folder_loads_and_generates_without_the_package(remote_code_only, built, folder):  # noqa: F811
    # remote_code_only (from test_hub) unregisters the installed classes, so the folder's own code runs
    texts = corpus("test")[:3]
    model = AutoModel.from_pretrained(folder, trust_remote_code=True).eval()
    assert type(model).__module__.startswith("transformers_modules.")
    config = AutoConfig.from_pretrained(folder, trust_remote_code=True)
    assert type(config).__module__.startswith("transformers_modules.")
    encoder_tokenizer = AutoTokenizer.from_pretrained(folder)
    decoder_tokenizer = AutoTokenizer.from_pretrained(folder, subfolder="decoder_tokenizer")
    assert type(decoder_tokenizer) is PreTrainedTokenizerFast and len(decoder_tokenizer) == VOCAB
    ids, texts_out = greedy(model, encoder_tokenizer, decoder_tokenizer, texts)
    expected_ids, expected = greedy(*built, texts)
    assert torch.equal(ids, expected_ids) and texts_out == expected
