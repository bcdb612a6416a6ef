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
