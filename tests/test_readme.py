"""The README's Python examples run as written, in order, in a scratch folder. The only changes are the ones a test
needs, listed in SUBSTITUTIONS (a run length); the files the examples name (train.txt, valid.txt, a saved model) are
made from the embedded corpus first."""

import os
import re
from pathlib import Path

from scalevae.data import load_text_dataset

README = Path(__file__).resolve().parents[1] / "README.md"
SUBSTITUTIONS = {"max_steps=2000": "max_steps=2"}
SAVED_FOLDER = "outputs/quickstart/scale/final"


def python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(encoding="utf-8"), flags=re.DOTALL)


def test_readme_has_the_examples_this_test_runs():
    blocks = python_blocks()
    assert len(blocks) >= 3, "the README lost its Python examples"
    assert any("LatentText.from_pretrained" in block for block in blocks)
    for old in SUBSTITUTIONS:  # a substitution that no longer matches would silently run the full example
        assert any(old in block for block in blocks), old


def test_readme_python_examples_run(tmp_path, monkeypatch):
    corpus = load_text_dataset()
    (tmp_path / "train.txt").write_text("\n".join(corpus["train"]["text"][:1500]) + "\n", encoding="utf-8")
    (tmp_path / "valid.txt").write_text("\n".join(corpus["validation"]["text"][:100]) + "\n", encoding="utf-8")
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    for block in python_blocks():
        if SAVED_FOLDER in block and not os.path.isdir(SAVED_FOLDER):
            from scalevae.hub import save_model

            save_model(
                SAVED_FOLDER, namespace["model"], namespace["encoder_tokenizer"], namespace["decoder_tokenizer"]
            )
        for old, new in SUBSTITUTIONS.items():
            block = block.replace(old, new)
        exec(compile(block, "README.md", "exec"), namespace)
    assert namespace["trainer"].state.global_step == 2
    assert len(namespace["text"].sample(2)) == 2
    assert namespace["model"].config.model_type == "scalevae"
