"""The embedded default corpus: English sentences from the Python standard library's docstrings.

See ``LICENSE.md`` in this folder for provenance and licence, and ``build_stdlib_corpus.py``
for the extraction rules and how to rebuild.
"""

from __future__ import annotations

from pathlib import Path

CORPUS_DIR = Path(__file__).parent

#: Interpreter version that built the shipped files; rebuilding with it reproduces them exactly.
BUILT_WITH_PYTHON = "3.11.7"

SPLITS = ("train", "validation", "test")
#: How a model card names this corpus (its dataset field): what it is and its licence, not a local path.
CORPUS_NAME = "scalevae embedded corpus: Python standard library docstrings (PSF License)"


def default_corpus_files() -> dict[str, str]:
    """Paths of the shipped splits, as ``{"train": ..., "validation": ..., "test": ...}``."""
    return {split: str(CORPUS_DIR / f"stdlib.{split}.txt") for split in SPLITS}


__all__ = ["BUILT_WITH_PYTHON", "CORPUS_DIR", "CORPUS_NAME", "SPLITS", "default_corpus_files"]
