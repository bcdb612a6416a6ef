"""Tests for the embedded default corpus (scalevae/corpus) and scalevae.data."""

from __future__ import annotations

import logging
import platform
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from scalevae.corpus import BUILT_WITH_PYTHON, CORPUS_DIR, default_corpus_files
from scalevae.corpus import build_stdlib_corpus as build
from scalevae.data import (
    DataCollatorForLatentLM,
    decoder_special_token_ids,
    load_text_dataset,
    tokenize_dataset,
    tokenize_texts,
)
from tests.data_guard import SHARED_DATA

PTB_VALID = SHARED_DATA / "ptb.valid.txt"
SPLITS = ("train", "validation", "test")


# ----------------------------------------------------------------------------- fixtures


# `tokenizers` (conftest, session): the MiniLM (BERT WordPiece, pad id 0) tokenizer as encoder, and as decoder with
# [CLS]/[SEP] as BOS/EOS.


def _byte_level_bpe(special_tokens: list[str]):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE(unk_token="<unk>" if "<unk>" in special_tokens else None))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=special_tokens, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    sentences = Path(default_corpus_files()["validation"]).read_text(encoding="utf-8").splitlines()[:200]
    tokenizer.train_from_iterator(sentences, trainer)
    return tokenizer


@pytest.fixture(scope="module")
def roberta_like_tokenizer():
    """A tiny offline RoBERTa-style tokenizer: <s>=0, <pad>=1, </s>=2, byte-level BPE."""
    from tokenizers import processors

    backend = _byte_level_bpe(["<s>", "<pad>", "</s>", "<unk>", "<mask>"])
    backend.post_processor = processors.RobertaProcessing(("</s>", 2), ("<s>", 0))
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
        mask_token="<mask>",
    )
    assert (tokenizer.bos_token_id, tokenizer.pad_token_id, tokenizer.eos_token_id) == (0, 1, 2)
    return tokenizer


def _write_lines(path: Path, lines: list[str]) -> Path:
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


# ----------------------------------------------------------------------- default corpus


def _corpus_lines() -> dict[str, list[str]]:
    files = default_corpus_files()
    assert set(files) == set(SPLITS)
    return {split: Path(path).read_text(encoding="utf-8").split("\n")[:-1] for split, path in files.items()}


def test_default_corpus_files_exist_and_are_disjoint():
    for split, path in default_corpus_files().items():
        assert Path(path).is_file(), path
        assert Path(path).parent == CORPUS_DIR
        raw = Path(path).read_bytes()
        assert raw.endswith(b"\n") and b"\r" not in raw and b"\n\n" not in raw, split
    lines = _corpus_lines()
    total = sum(len(v) for v in lines.values())
    assert 8_000 <= total <= 12_000, total
    assert len(lines["train"]) > 0.85 * total
    assert min(len(lines["validation"]), len(lines["test"])) > 0.04 * total
    sets = {split: set(v) for split, v in lines.items()}
    assert sum(len(s) for s in sets.values()) == total, "duplicate sentences"
    assert not sets["train"] & sets["validation"]
    assert not sets["train"] & sets["test"]
    assert not sets["validation"] & sets["test"]
    assert (CORPUS_DIR / "LICENSE.md").is_file()


def test_default_corpus_sentences_follow_the_rules():
    for split, lines in _corpus_lines().items():
        for sentence in lines:
            assert 5 <= len(sentence.split()) <= 30, (split, sentence)
            assert sentence.isascii() and sentence[0].isupper() and sentence.endswith("."), (split, sentence)
            assert sentence == " ".join(sentence.split()), (split, sentence)
            markers = (">>>", "::", "=", "{", "`", "__", "http://", "https://")
            assert not any(marker in sentence for marker in markers), sentence
            assert build.is_good_sentence(sentence), sentence


def test_sentence_rules_on_examples():
    doc = """Return the sum of two numbers.  It never fails on integers.

    Example::

        total = add(1, 2)

    >>> add(1, 2)
    3
    The result is an integer unless one argument is a float.

    .. versionadded:: 3.2
    Note that x == y here.  See http://example.com for more details today.
    - first: The first item of a short list.
    """
    sentences = list(build.sentences_from_text(doc))
    assert sentences == ["Return the sum of two numbers.", "It never fails on integers."]
    # Split after . ! ? (and a closing quote) only when a capital letter follows.
    assert build.split_sentences('One two three four five. "Six seven." Eight nine. ten eleven twelve.') == [
        'One two three four five. "Six seven."',
        "Eight nine. ten eleven twelve.",
    ]
    assert build.split_sentences("Use a tuple, e.g. The default one.") == ["Use a tuple, e.g. The default one."]
    assert build.is_good_sentence("The decoder can modify this setting as appropriate.")
    for bad in (
        "too short to keep.",
        "lowercase start is not a sentence here.",
        "No final full stop in this one",
        "Call os.path.join to build the file name.",
        "Set max_length to a larger value please.",
        "Set the value with x = 5 for the loop.",
        "Use f() and g() and h() to compute it.",
        "Caf\u00e9 owners like this sentence very much.",
        " ".join(["Word"] * 31) + ".",
    ):
        assert not build.is_good_sentence(bad), bad


def test_build_is_deterministic_and_reproduces_shipped_files(tmp_path):
    if platform.python_version() != BUILT_WITH_PYTHON:
        pytest.skip(
            f"the shipped corpus was built with Python {BUILT_WITH_PYTHON}; this is {platform.python_version()}, "
            "whose stdlib docstrings differ"
        )
    script = Path(build.__file__).resolve()
    # Run the script by path: it needs only the stdlib, and walks it in a fresh `python -I -S`.
    result = subprocess.run(
        [sys.executable, str(script), "--out", str(tmp_path)], capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr
    assert "distinct sentences" in result.stdout
    for split, path in default_corpus_files().items():
        rebuilt = (tmp_path / f"stdlib.{split}.txt").read_bytes()
        assert rebuilt == Path(path).read_bytes(), f"{split} differs from the rebuilt corpus"


def test_split_corpus_is_seeded_and_90_5_5():
    sentences = [f"Sentence number {i} is here." for i in range(1000)]
    first = build.split_corpus(sentences, seed=1234)
    assert first == build.split_corpus(sentences, seed=1234)
    assert first != build.split_corpus(sentences, seed=1)
    assert [len(first[s]) for s in SPLITS] == [900, 50, 50]
    assert sorted(sum(first.values(), [])) == sorted(sentences)


# ------------------------------------------------------------------------------ loading


def test_load_default_corpus(tmp_path):
    dataset = load_text_dataset(cache_dir=str(tmp_path / "cache"))
    lines = _corpus_lines()
    assert set(dataset) == set(SPLITS)
    for split in SPLITS:
        assert dataset[split].column_names == ["text"]
        assert dataset[split].num_rows == len(lines[split])
        assert dataset[split][0]["text"] == lines[split][0]


def test_load_ptb_strips_lines(tmp_path):
    if not PTB_VALID.is_file():
        pytest.skip(f"{PTB_VALID} is absent: the real PTB corpus is read at run time from ../shared/data")
    raw = PTB_VALID.read_text(encoding="utf-8").splitlines()
    assert raw[0].startswith(" ") and raw[0].endswith(" "), "PTB lines are expected to be space-padded"
    expected = [line.strip() for line in raw if line.strip()]
    dataset = load_text_dataset({"validation": str(PTB_VALID)}, cache_dir=str(tmp_path / "cache"))
    texts = dataset["validation"]["text"]
    assert list(dataset) == ["validation"]
    assert len(texts) == len(expected)
    assert texts[:50] == expected[:50]
    assert texts[-1] == expected[-1]
    assert all(text == text.strip() and text for text in texts)


def test_load_single_path_is_train_and_drops_empty_lines(tmp_path, caplog):
    path = _write_lines(tmp_path / "a.txt", ["  first line  ", "", "   ", "second line"])
    with caplog.at_level(logging.INFO, logger="scalevae.data"):
        dataset = load_text_dataset(str(path), cache_dir=str(tmp_path / "cache"))
    assert list(dataset) == ["train"]
    assert dataset["train"]["text"] == ["first line", "second line"]
    assert "dropped 2 empty lines" in caplog.text


def test_load_missing_file(tmp_path):
    missing = tmp_path / "nope.txt"
    with pytest.raises(ValueError, match="not found.*nope.txt"):
        load_text_dataset({"train": str(missing)})


def test_load_non_utf8_file(tmp_path):
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"\xff\xfe bad")
    with pytest.raises(ValueError, match=r"bad\.txt is not valid UTF-8.*byte offset 0"):
        load_text_dataset({"train": str(bad)})
    later = tmp_path / "later.txt"
    later.write_bytes(b"good line\n" + "caf\u00e9".encode() + b"\n\x80\n")
    with pytest.raises(ValueError, match=r"later\.txt is not valid UTF-8.*byte offset 16"):
        load_text_dataset({"train": str(later)})


def test_load_empty_file(tmp_path):
    empty = _write_lines(tmp_path / "empty.txt", ["", "  ", "\t"])
    good = _write_lines(tmp_path / "good.txt", ["A line."])
    with pytest.raises(ValueError, match=r"empty\.txt has no non-empty lines"):
        load_text_dataset({"train": str(good), "validation": str(empty)})


def test_load_named_dataset_renames_text_column(tmp_path):
    # A local dataset folder goes through the same load_dataset(name) path as a Hub name, offline.
    folder = tmp_path / "my_dataset"
    folder.mkdir()
    (folder / "train.csv").write_text(
        'sentence,label\n  A first sentence. ,1\n"",0\nA second one.,0\n', encoding="utf-8"
    )
    dataset = load_text_dataset(dataset_name=str(folder), text_column="sentence", cache_dir=str(tmp_path / "cache"))
    assert list(dataset) == ["train"]
    assert dataset["train"].column_names == ["text"]
    assert dataset["train"]["text"] == ["A first sentence.", "A second one."]
    with pytest.raises(ValueError, match="column 'body' not found"):
        load_text_dataset(dataset_name=str(folder), text_column="body", cache_dir=str(tmp_path / "cache"))


def test_load_rejects_both_sources(tmp_path):
    with pytest.raises(ValueError, match="either"):
        load_text_dataset(str(tmp_path / "x.txt"), dataset_name="some/dataset")


# ---------------------------------------------------------------------------- tokenising


def test_tokenize_dataset_bos_eos_from_decoder_tokenizer(tokenizers, tmp_path, caplog):
    encoder, decoder = tokenizers
    texts = [
        "The quick brown fox jumps over the lazy dog.",
        "Return the cube root of x.",
        " ".join(["word"] * 40) + ".",  # longer than max_length on both sides
    ]
    dataset = load_text_dataset({"train": str(_write_lines(tmp_path / "t.txt", texts))}, cache_dir=str(tmp_path))
    max_length = 12
    with caplog.at_level(logging.INFO, logger="scalevae.data"):
        tokenized, stats = tokenize_dataset(dataset, encoder, decoder, max_length=max_length)
    bos, eos = decoder.bos_token_id, decoder.eos_token_id
    assert (bos, eos) == (decoder.cls_token_id, decoder.sep_token_id) == (101, 102)
    train = tokenized["train"]
    assert "text" not in train.column_names
    assert set(train.column_names) == {"input_ids", "attention_mask", "labels"}  # the collator shifts the labels
    for row, text in zip(train, texts):
        assert row["labels"][-1] == eos and bos not in row["labels"]
        assert len(row["labels"]) <= max_length and len(row["input_ids"]) <= max_length
        assert row["input_ids"][0] == encoder.cls_token_id and row["input_ids"][-1] == encoder.sep_token_id
        raw = decoder(text, add_special_tokens=False)["input_ids"]
        assert row["labels"][:-1] == raw[: max_length - 1]
    assert stats["train"] == {"texts": 3, "truncated": 1, "encoder_truncated": 1, "decoder_truncated": 1}
    assert "truncated 1 of 3 texts to max_length=12" in caplog.text


def test_tokenize_counts_encoder_only_truncation(tokenizers, tmp_path):
    encoder, decoder = tokenizers
    # 9 word pieces: fits the decoder (max_length - 1 = 9) but not the encoder (9 + [CLS] + [SEP] > 10).
    text = "one two three four five six seven eight nine"
    assert len(decoder(text, add_special_tokens=False)["input_ids"]) == 9
    dataset = load_text_dataset(str(_write_lines(tmp_path / "t.txt", [text])), cache_dir=str(tmp_path))
    _, stats = tokenize_dataset(dataset, encoder, decoder, max_length=10)
    assert stats["train"] == {"texts": 1, "truncated": 1, "encoder_truncated": 1, "decoder_truncated": 0}
    _, stats = tokenize_dataset(dataset, encoder, decoder, max_length=11)
    assert stats["train"]["truncated"] == 0


def test_tokenize_uses_roberta_bos_eos(roberta_like_tokenizer, tmp_path):
    tok = roberta_like_tokenizer
    path = _write_lines(tmp_path / "t.txt", ["Return the cube root of x."])
    dataset = load_text_dataset(str(path), cache_dir=str(tmp_path))
    tokenized, _ = tokenize_dataset(dataset, tok, tok, max_length=32)
    row = tokenized["train"][0]
    assert row["labels"][-1] == 2
    batch = DataCollatorForLatentLM(tok, tok)([row])
    assert batch["decoder_input_ids"][0, 0] == 0  # RoBERTa's BOS
    assert row["input_ids"][0] == 0 and row["input_ids"][-1] == 2


def test_decoder_special_ids_fallback_and_errors(tokenizers, roberta_like_tokenizer):
    encoder, _ = tokenizers
    assert encoder.bos_token_id is None
    assert decoder_special_token_ids(encoder) == (encoder.cls_token_id, encoder.sep_token_id)
    assert decoder_special_token_ids(roberta_like_tokenizer) == (0, 2)
    bare = PreTrainedTokenizerFast(tokenizer_object=_byte_level_bpe(["<pad>", "</s>"]), pad_token="<pad>")
    with pytest.raises(ValueError, match="bos_token"):
        decoder_special_token_ids(bare)
    bare_eos = PreTrainedTokenizerFast(
        tokenizer_object=_byte_level_bpe(["<pad>", "<s>"]), pad_token="<pad>", bos_token="<s>"
    )
    with pytest.raises(ValueError, match="eos_token"):
        decoder_special_token_ids(bare_eos)


# ----------------------------------------------------------------------------- collation


def _check_batch(batch: dict[str, torch.Tensor], features: list[dict], encoder_pad: int, decoder_pad: int) -> None:
    assert set(batch) == {"input_ids", "attention_mask", "decoder_input_ids", "decoder_attention_mask", "labels"}
    assert all(t.dtype == torch.long for t in batch.values())
    assert (batch["input_ids"][batch["attention_mask"] == 0] == encoder_pad).all()
    assert (batch["decoder_input_ids"][batch["decoder_attention_mask"] == 0] == decoder_pad).all()
    assert torch.equal(batch["labels"] == -100, batch["decoder_attention_mask"] == 0)
    for row, feature in enumerate(features):
        n = len(feature["input_ids"])
        assert batch["input_ids"][row, :n].tolist() == feature["input_ids"]
        assert batch["attention_mask"][row].sum() == n
        m = len(feature["labels"])
        bos = batch["decoder_input_ids"][0, 0].item()
        assert batch["decoder_input_ids"][row, :m].tolist() == [bos, *feature["labels"][:-1]]  # teacher forcing
        assert batch["labels"][row, :m].tolist() == feature["labels"]
        assert batch["decoder_attention_mask"][row].sum() == m


_COLLATE_TEXTS = [
    "Return the cube root of x.",
    "The decoder can modify this setting as appropriate when it needs to.",
    "Flat is better than nested.",
]


@pytest.mark.parametrize("pad_to_multiple_of", [None, 8])
def test_collator_pads_with_bert_pad_id_0(tokenizers, tmp_path, pad_to_multiple_of):
    encoder, decoder = tokenizers
    assert encoder.pad_token_id == 0 and decoder.pad_token_id == 0
    dataset = load_text_dataset(str(_write_lines(tmp_path / "t.txt", _COLLATE_TEXTS)), cache_dir=str(tmp_path))
    tokenized, _ = tokenize_dataset(dataset, encoder, decoder, max_length=64)
    features = [tokenized["train"][i] for i in range(3)]
    collator = DataCollatorForLatentLM(encoder, decoder, pad_to_multiple_of=pad_to_multiple_of)
    batch = collator(features)
    _check_batch(batch, features, encoder_pad=0, decoder_pad=0)
    longest = max(len(f["labels"]) for f in features)
    assert batch["decoder_input_ids"].shape[1] == (longest if pad_to_multiple_of is None else -(-longest // 8) * 8)
    if pad_to_multiple_of:
        assert batch["input_ids"].shape[1] % pad_to_multiple_of == 0


def test_collator_pads_with_roberta_pad_id_1(roberta_like_tokenizer, tmp_path):
    tok = roberta_like_tokenizer
    dataset = load_text_dataset(str(_write_lines(tmp_path / "t.txt", _COLLATE_TEXTS)), cache_dir=str(tmp_path))
    tokenized, _ = tokenize_dataset(dataset, tok, tok, max_length=64)
    features = [tokenized["train"][i] for i in range(3)]
    batch = DataCollatorForLatentLM(tok, tok)(features)
    assert (batch["attention_mask"] == 0).any(), "test needs padding"
    _check_batch(batch, features, encoder_pad=1, decoder_pad=1)


def test_collator_decoder_pad_falls_back_to_eos(tokenizers):
    encoder, decoder = tokenizers
    no_pad = AutoTokenizer.from_pretrained(decoder.name_or_path, bos_token="[CLS]", eos_token="[SEP]")
    no_pad.pad_token = None
    assert no_pad.pad_token_id is None
    features = [
        {"input_ids": [101, 5, 102], "attention_mask": [1, 1, 1], "labels": [5, 102]},
        {"input_ids": [101, 102], "attention_mask": [1, 1], "labels": [102]},
    ]
    batch = DataCollatorForLatentLM(encoder, no_pad)(features)
    assert batch["decoder_input_ids"].tolist() == [[101, 5], [101, 102]]
    assert batch["labels"].tolist() == [[5, 102], [102, -100]]
    assert batch["decoder_attention_mask"].tolist() == [[1, 1], [1, 0]]
    assert batch["input_ids"].tolist() == [[101, 5, 102], [101, 102, 0]]


def test_collator_rejects_empty_batch(tokenizers):
    encoder, decoder = tokenizers
    with pytest.raises(ValueError, match="empty batch"):
        DataCollatorForLatentLM(encoder, decoder)([])


def test_benchmark_collates_on_the_fly_like_the_training_path(tokenizers):
    """benchmarks/benchmark.py tokenises and collates texts on the fly (no CI job runs it): its batch must be the
    one `tokenize_texts` + the collator give, or a change to the data path breaks it unnoticed."""
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "benchmark.py"
    spec = importlib.util.spec_from_file_location("scalevae_benchmark", path)
    benchmark = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(benchmark)
    encoder, decoder = tokenizers
    texts = _COLLATE_TEXTS[:2]
    batch = benchmark.collate(texts, encoder, decoder, max_length=16)
    columns = tokenize_texts(texts, encoder, decoder, 16)
    expected = DataCollatorForLatentLM(encoder, decoder)(
        [{key: columns[key][i] for key in ("input_ids", "attention_mask", "labels")} for i in range(len(texts))]
    )
    assert batch.keys() == expected.keys()
    assert all(torch.equal(batch[key].cpu(), expected[key]) for key in batch)
