"""Reading text and labelled files: what counts as a line, byte order marks, invisible and NUL characters, words too
long for the tokenizer fit, one-sentence files; and the guard that keeps data-dependent tests from skipping."""

import logging
import os
from pathlib import Path

import pytest

from scalevae.cli import main
from scalevae.data import load_text_dataset

# -- text files ---------------------------------------------------------------------------------------------------


def test_a_nul_byte_warns_and_separates_words(tmp_path, caplog):
    path = tmp_path / "nul.txt"
    path.write_bytes(b"first line\nsecond\x00line here\n")
    with caplog.at_level(logging.WARNING):
        dataset = load_text_dataset(path)
    assert dataset["train"]["text"] == ["first line", "second line here"]
    assert any(str(path) in r.getMessage() and "line 2" in r.getMessage() for r in caplog.records)


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


def test_one_sentence_files_train(tmp_path, train_command):
    one = tmp_path / "one.txt"
    one.write_text("the only sentence of this file\n")
    main(
        train_command(
            tmp_path / "run",
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


# -- the real corpora: a data-dependent test may not skip while the data is there ---------------------------------


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


# -- labelled files: one reader for every command -------------------------------------------------------------------


def labelled_pair(folder, texts: bytes, labels: bytes):
    text_file, label_file = folder / "pairs.txt", folder / "pairs.label"
    text_file.write_bytes(texts)
    label_file.write_bytes(labels)
    return text_file, label_file


def test_labelled_files_follow_the_text_rules_bom_and_blank_lines_included(tmp_path):
    """A byte-order mark in the label file made an invisible class '\\ufeff0'; the recipe dropped blank text lines while
    `edit` refused them. One rule now: marks stripped in both files, a text line with nothing visible dropped with its
    class, as `load_text_dataset` drops it."""
    from scalevae.data import labelled_dataset, read_labelled

    text_file, label_file = labelled_pair(
        tmp_path, "\ufeffthe first\n\u200b\n second one \nthird\n".encode(), "\ufeff0\n1\n1\n0\n".encode()
    )
    assert read_labelled(text_file, label_file) == (["the first", "second one", "third"], ["0", "1", "0"])
    dataset = labelled_dataset({"train": str(text_file)}, "label")["train"]
    assert dataset["text"] == ["the first", "second one", "third"] and dataset["label"] == ["0", "1", "0"]
    assert set(dataset["label"]) == {"0", "1"}  # no invisible third class


@pytest.mark.parametrize(
    "texts, labels, message",
    [
        (b"a\nb\n", b"0\n", r"pairs\.txt has 2 lines but .*pairs\.label has 1: one class per line"),
        (b"a\nb\n", b"0\n \n", r"pairs\.label line 2 is blank: every text of .*pairs\.txt needs its class"),
        (b"a\n", b"\xff\n", r"pairs\.label is not valid UTF-8"),
    ],
)
def test_labelled_files_that_do_not_pair_are_refused_by_name(tmp_path, texts, labels, message):
    from scalevae.data import read_labelled

    with pytest.raises(ValueError, match=message):
        read_labelled(*labelled_pair(tmp_path, texts, labels))


def test_a_fifo_is_refused_by_every_reader_without_blocking(tmp_path, tiny_folder, train_command):
    """Opening a FIFO blocks until a writer comes: every command checks that its files are regular files first."""
    from scalevae.data import read_labelled, read_texts

    fifo = tmp_path / "pipe.txt"
    os.mkfifo(fifo)
    text_file, label_file = labelled_pair(tmp_path, b"good\nbad\n", b"pos\nneg\n")
    message = rf"{fifo} is not a regular file \(a folder, FIFO, socket or device\)"
    for read in (load_text_dataset, read_texts, lambda path: read_labelled(path, label_file)):
        with pytest.raises(ValueError, match=message):
            read(fifo)
    with pytest.raises(ValueError, match=message):
        read_labelled(text_file, fifo)
    with pytest.raises(ValueError, match=message):
        main(train_command(tmp_path / "run", fifo, "--max_steps", "1"))
    with pytest.raises(ValueError, match=message):
        main(["evaluate", str(tiny_folder), "--data", str(fifo)])
    edit = ["edit", str(tiny_folder), "--label_file", str(label_file), "--to", "pos", "--strength", "1"]
    for flags, option in [(["--labelled_file", str(fifo)], "--labelled_file"), (["--input", str(fifo)], "--input")]:
        argv = edit + (flags if option == "--labelled_file" else ["--labelled_file", str(text_file), *flags])
        with pytest.raises(SystemExit, match=rf"{option}.*{message}"):
            main(argv)
    with pytest.raises(SystemExit, match=message):
        main(["generate", str(tiny_folder), "--sample", "1", "--label", "pos", "--labelled_file", str(fifo),
              "--label_file", str(label_file)])  # fmt: skip


def test_validating_on_the_training_file_warns(tmp_path, caplog):
    from scalevae.data import load_raw
    from scalevae.recipe import RunSpec

    data = tmp_path / "corpus.txt"
    data.write_text("one sentence\nanother one\na third\n")
    spec, _, _ = RunSpec.parse(
        ["--output_dir", str(tmp_path), "--train_file", str(data), "--validation_file", str(data)]
    )
    with caplog.at_level(logging.WARNING, logger="scalevae.data"):
        raw = load_raw(spec)
    assert raw["validation"]["text"] == raw["train"]["text"]
    assert any(
        "is the training file" in r.getMessage() and "--eval_sentences" in r.getMessage() for r in caplog.records
    )
    caplog.clear()
    held_out, _, _ = RunSpec.parse(
        [
            "--output_dir",
            str(tmp_path),
            "--train_file",
            str(data),
            "--validation_file",
            str(data),
            "--eval_sentences",
            "1",
        ]
    )
    with caplog.at_level(logging.WARNING, logger="scalevae.data"):
        raw = load_raw(held_out)
    assert raw["validation"]["text"] == ["a third"] and not caplog.records


# -- special-token strings in a user's text ------------------------------------------------------------------------


def test_special_token_strings_in_a_sentence_are_read_as_text(tiny_parts, tiny_folder):
    """ "[SEP]" or "</s>" typed in a sentence are its characters: the special ids appear only where the tokenizers'
    own rules put them, whether the tokenizers were just built, loaded by this package, or loaded by plain
    transformers from the saved folder (the rule is saved with them)."""
    from transformers import AutoTokenizer

    from scalevae.factory import DECODER_TOKENIZER_SUBFOLDER, load_tokenizers

    _, built_encoder, built_decoder = tiny_parts
    loaded_encoder, loaded_decoder = load_tokenizers(tiny_folder)
    plain_encoder = AutoTokenizer.from_pretrained(tiny_folder)
    plain_decoder = AutoTokenizer.from_pretrained(tiny_folder, subfolder=DECODER_TOKENIZER_SUBFOLDER)
    for encoder in (built_encoder, loaded_encoder, plain_encoder):
        specials = set(encoder.all_special_ids)
        ids = encoder(f"the food {encoder.sep_token} {encoder.cls_token} {encoder.pad_token} was good")["input_ids"]
        inside = ids[1:-1]  # the post-processor's own [CLS] ... [SEP] stay
        assert not specials & set(inside), (type(encoder).__name__, ids)
    for decoder in (built_decoder, loaded_decoder, plain_decoder):
        text = f"the food {decoder.eos_token} {decoder.bos_token} was good"
        ids = decoder(text, add_special_tokens=False)["input_ids"]
        assert not set(decoder.all_special_ids) & set(ids), ids
