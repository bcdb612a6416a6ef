"""Build the embedded default corpus from the Python standard library's own prose.

Every Python installation carries the same English text under the PSF licence:
the docstrings of the standard-library modules (and of their public classes,
functions and methods) and the ``pydoc_data.topics`` help topics.  This script
extracts sentences from that text and writes ``stdlib.{train,validation,test}.txt``
(one sentence per line, UTF-8, LF).

Usage::

    python -m scalevae.corpus.build_stdlib_corpus [--out DIR] [--seed 1234]

Sources (walked in a fixed, sorted order)
-----------------------------------------
* ``pydoc_data.topics.topics`` (sorted by topic name).
* Every module named in ``sys.stdlib_module_names`` (sorted) and, for packages,
  their submodules (sorted, recursively).  Skipped: names with a component that
  starts with ``_``; test packages (``test``, ``tests``, ``idle_test`` at any
  depth, ``xx*``); GUI / side-effect / tooling modules (``idlelib``,
  ``tkinter``, ``turtle``, ``turtledemo``, ``lib2to3``, ``ensurepip``,
  ``antigravity``, ``this``, ``readline``, ``rlcompleter``); ``distutils``
  (deprecated, and replaced by setuptools' copy when setuptools is installed);
  ``pydoc_data`` (read directly); modules that fail to import; modules whose
  file lies outside the stdlib folder (third-party shadows).  Each import runs
  with stdin/stdout/stderr detached, warnings silenced and (where ``SIGALRM``
  exists) a timeout, so it cannot hang or print.
* For each module: the module docstring, then the docstrings of public
  (non-``_``) module attributes that are classes or routines defined in that
  module (or in a private accelerator module such as ``_io`` that it
  re-exports), then the public methods/properties defined directly in those
  classes.

Sentence rules (applied in this order)
--------------------------------------
1. ``inspect.cleandoc`` the docstring; replace typographic quotes, dashes and
   ellipses with their ASCII equivalents; unwrap reST emphasis ``*x*`` /
   ``**x**`` to ``x``.
2. Split into blocks at blank lines.  A line is a block boundary (and is
   dropped) if it is a doctest prompt (starts with ``>>>`` or ``...``), a reST
   directive (starts with ``.. ``), a heading underline (no letters or digits)
   or ends with ``::``.  The lines after a doctest prompt up to the next blank
   line are its output and are dropped.  A list item (``-``, ``*``, ``+``,
   ``o``, ``1.``, ``1)``, ``(a)``) starts a new block, without its marker; a
   line ending in ``:`` ends its block.  A block that is indented deeper than
   the block before it, when that block ends with ``:`` and is more than a
   short label such as ``Note:``, is a literal/code block and is dropped.
3. Collapse the whitespace of each block to single spaces and split it into
   sentences after ``.``, ``!`` or ``?`` (optionally followed by a closing
   quote or parenthesis) when followed by whitespace and a capital letter,
   except after ``e.g.`` and ``i.e.``.
4. Keep a sentence only if it
   - is ASCII only,
   - starts with a capital letter ``A-Z`` and ends with ``.`` (not ``..``),
   - has 5 to 30 whitespace-separated words,
   - contains none of ``>>>``, ``::``, ``=``, ``{``, ``}``, ``[``, ``]``,
     backtick, ``__``, ``*``, ``\\``, ``|``, ``<``, ``>``, ``#``, ``@``, ``~``,
     ``^``, ``$``, ``http://``, ``https://``, ``www.``, and does not start with
     ``.. `` (code, markup, URLs),
   - contains ``()`` at most once (call-heavy text is code, not prose) and
     ``:`` at most once (more is a flattened parameter list),
   - has no word that looks like an identifier path (``a.b`` with letters on
     both sides of the dot, such as ``os.path``; ``e.g.`` and ``i.e.`` are
     allowed) or ``snake_case``,
   - has balanced parentheses and double quotes,
   - is at least 80% letters among its non-space characters.
5. Deduplicate exactly (case-sensitive, after whitespace normalisation), sort,
   shuffle with ``random.Random(seed)`` and split 90/5/5 into
   train/validation/test.

The output depends on the interpreter's stdlib, so rebuild with the Python
version recorded in ``LICENSE.md`` to reproduce the shipped files byte for byte.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import inspect
import io
import json
import os
import pkgutil
import random
import re
import signal
import subprocess
import sys
import tempfile
import threading
import warnings
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

DEFAULT_SEED = 1234
SPLIT_FRACTIONS = (("train", 0.90), ("validation", 0.05), ("test", 0.05))
MIN_WORDS, MAX_WORDS = 5, 30
IMPORT_TIMEOUT_S = 10
WORKER_TIMEOUT_S = 600

SKIP_TOP_LEVEL = frozenset(
    {
        "antigravity",  # opens a web browser
        "this",  # prints the Zen of Python on import
        "idlelib",
        "tkinter",
        "turtle",  # needs tkinter, whose presence varies between builds
        "turtledemo",
        "lib2to3",
        "ensurepip",
        "test",
        "readline",  # touches the terminal
        "rlcompleter",  # installs a readline completer
        "pydoc_data",  # read directly, see pydoc_topics()
        "distutils",  # deprecated, gone in 3.12, and shadowed by setuptools when installed
    }
)
SKIP_COMPONENTS = frozenset({"test", "tests", "idle_test"})

_TYPOGRAPHIC = str.maketrans(
    {
        "\u2018": "'",
        "\u2019": "'",
        "\u201c": '"',
        "\u201d": '"',
        "\u2013": "-",
        "\u2014": "-",
        "\u2026": "...",
        "\u00a0": " ",
    }
)
_EMPHASIS = re.compile(r"\*{1,2}([A-Za-z][^*\n]*?)\*{1,2}")
_SENTENCE_END = re.compile(r"(?<!\be\.g\.)(?<!\bi\.e\.)(?<=[.!?])([\"')]?)\s+(?=[A-Z])")
_FORBIDDEN = (
    ">>>", "::", "=", "{", "}", "[", "]", "`", "__", "*", "\\", "|", "<", ">",
    "#", "@", "~", "^", "$", "http://", "https://", "www.",
)  # fmt: skip
_IDENTIFIER_PATH = re.compile(r"[A-Za-z]\.[A-Za-z]|[A-Za-z0-9]_[A-Za-z0-9]")
_ABBREVIATIONS = frozenset({"e.g.", "e.g.,", "i.e.", "i.e.,", "(e.g.", "(i.e."})
_LIST_ITEM = re.compile(r"^\s*(?:[-*+o]|\d+[.)]|\([0-9a-z]\))\s+")
_HEADING_UNDERLINE = re.compile(r"^[^A-Za-z0-9]+$")


# --------------------------------------------------------------------------- text


def _is_boundary_line(stripped: str) -> bool:
    return (
        stripped.startswith((">>>", "...", ".. "))
        or stripped.endswith("::")
        or bool(_HEADING_UNDERLINE.match(stripped))
    )


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip(" "))


def _is_label(block: list[str]) -> bool:
    # "Note:", "See also:", "Warning:" introduce indented prose, not code.
    return len(block) == 1 and len(block[0].split()) <= 3


def text_blocks(text: str) -> Iterator[str]:
    """Yield the prose blocks of a docstring, each collapsed to one line."""
    text = inspect.cleandoc(text).translate(_TYPOGRAPHIC)
    text = _EMPHASIS.sub(r"\1", text)
    raw_blocks: list[list[str]] = [[]]
    doctest_output: set[int] = set()
    for line in text.splitlines():
        stripped = line.strip()
        if not stripped:
            raw_blocks.append([])
            continue
        if _is_boundary_line(stripped):
            raw_blocks.append([])
            if stripped.startswith((">>>", "...")):
                # The lines after a prompt, up to the next blank line, are its output.
                doctest_output.add(len(raw_blocks) - 1)
            continue
        bullet = _LIST_ITEM.match(line)
        if bullet:
            raw_blocks.append([])
            line = " " * len(bullet.group(0)) + line[len(bullet.group(0)) :]
        raw_blocks[-1].append(line)
        if stripped.endswith(":"):
            raw_blocks.append([])
    previous: list[str] | None = None
    for index, block in enumerate(raw_blocks):
        if not block:
            continue
        is_literal = (
            previous is not None
            and previous[-1].rstrip().endswith(":")
            and not _is_label(previous)
            and _indent(block[0]) > _indent(previous[0])
        )
        if index not in doctest_output and not is_literal:
            yield " ".join(" ".join(block).split())
        previous = block


def split_sentences(block: str) -> list[str]:
    """Split one whitespace-collapsed block after . ! ? followed by a capital."""
    return [s.strip() for s in _SENTENCE_END.sub(r"\1\n", block).split("\n") if s.strip()]


def is_good_sentence(sentence: str) -> bool:
    """Return True if ``sentence`` passes the prose rules in the module docstring."""
    if not sentence.isascii():
        return False
    if not ("A" <= sentence[0] <= "Z") or not sentence.endswith(".") or sentence.endswith(".."):
        return False
    words = sentence.split()
    if not MIN_WORDS <= len(words) <= MAX_WORDS:
        return False
    if sentence.startswith(".. ") or any(marker in sentence for marker in _FORBIDDEN):
        return False
    if sentence.count("()") > 1 or sentence.count(":") > 1:
        return False
    if any(_IDENTIFIER_PATH.search(word.rstrip(".,;:")) for word in words if word not in _ABBREVIATIONS):
        return False
    if sentence.count("(") != sentence.count(")") or sentence.count('"') % 2:
        return False
    visible = [c for c in sentence if not c.isspace()]
    return sum(c.isalpha() for c in visible) >= 0.8 * len(visible)


def sentences_from_text(text: str) -> Iterator[str]:
    for block in text_blocks(text):
        for sentence in split_sentences(block):
            if is_good_sentence(sentence):
                yield sentence


# ------------------------------------------------------------------------ sources


def pydoc_topics() -> Iterator[str]:
    from pydoc_data.topics import topics

    for name in sorted(topics):
        yield topics[name]


def _skip_module(name: str) -> bool:
    parts = name.split(".")
    return (
        parts[0] in SKIP_TOP_LEVEL
        or parts[0].startswith("xx")
        or any(part.startswith("_") or part in SKIP_COMPONENTS for part in parts)
    )


class _ImportTimeout(Exception):
    pass


def _on_alarm(signum: int, frame: object) -> None:
    raise _ImportTimeout


def safe_import(name: str) -> ModuleType | None:
    """Import ``name`` quietly and with a timeout; return None on any failure."""
    use_alarm = hasattr(signal, "SIGALRM") and threading.current_thread() is threading.main_thread()
    previous_handler = signal.signal(signal.SIGALRM, _on_alarm) if use_alarm else None
    sink = io.StringIO()
    saved_stdin = sys.stdin
    try:
        sys.stdin = io.StringIO()  # nothing may block on input
        if use_alarm:
            signal.alarm(IMPORT_TIMEOUT_S)
        with warnings.catch_warnings(), contextlib.redirect_stdout(sink), contextlib.redirect_stderr(sink):
            warnings.simplefilter("ignore")
            return importlib.import_module(name)
    except (Exception, _ImportTimeout, SystemExit):  # a broken module must not stop the build
        return None
    finally:
        if use_alarm:
            signal.alarm(0)
            signal.signal(signal.SIGALRM, previous_handler)
        sys.stdin = saved_stdin


def stdlib_top_level_names() -> list[str]:
    names = getattr(sys, "stdlib_module_names", None)
    if names is None:  # Python < 3.10
        import sysconfig

        stdlib = sysconfig.get_paths()["stdlib"]
        paths = [stdlib, os.path.join(stdlib, "lib-dynload")]
        names = {m.name for m in pkgutil.iter_modules(paths)} | set(sys.builtin_module_names)
    return sorted(names)


_STDLIB_DIR = Path(os.__file__).resolve().parent


def _is_stdlib_file(module: ModuleType) -> bool:
    # Guards against third-party shadows (e.g. setuptools' distutils hack).
    file = getattr(module, "__file__", None)
    if file is None:  # built into the interpreter
        return True
    path = Path(file).resolve()
    return path.is_relative_to(_STDLIB_DIR) and not {"site-packages", "dist-packages"} & set(path.parts)


def iter_stdlib_modules() -> Iterator[ModuleType]:
    """Yield importable public stdlib modules in sorted, depth-first order."""
    for top in stdlib_top_level_names():
        yield from _walk(top)


def _walk(name: str) -> Iterator[ModuleType]:
    if _skip_module(name):
        return
    module = safe_import(name)
    if module is None or not _is_stdlib_file(module):
        return
    yield module
    path = getattr(module, "__path__", None)
    if path is None:
        return
    for child in sorted(info.name for info in pkgutil.iter_modules(path)):
        yield from _walk(f"{name}.{child}")


def _defined_here(obj: object, module_name: str) -> bool:
    # Objects implemented in a private accelerator module (``_io``, ``_functools``)
    # are documented only through the public module that re-exports them.
    owner = getattr(obj, "__module__", None)
    return isinstance(owner, str) and (owner == module_name or owner.split(".")[0].startswith("_"))


def module_docstrings(module: ModuleType) -> Iterator[str]:
    """Module docstring, then public classes/routines defined here and their methods."""
    if isinstance(module.__doc__, str):
        yield module.__doc__
    for attr in sorted(vars(module)):
        if attr.startswith("_"):
            continue
        obj = vars(module)[attr]
        if not (inspect.isclass(obj) or inspect.isroutine(obj)):
            continue
        if not _defined_here(obj, module.__name__):
            continue
        if isinstance(getattr(obj, "__doc__", None), str):
            yield obj.__doc__
        if inspect.isclass(obj):
            for member_name in sorted(vars(obj)):
                if member_name.startswith("_"):
                    continue
                member = vars(obj)[member_name]
                owner = getattr(member, "__module__", None)
                if isinstance(owner, str) and not _defined_here(member, module.__name__):
                    continue  # patched in by a third-party package
                doc = getattr(member, "__doc__", None)
                if isinstance(doc, str):
                    yield doc


def iter_source_texts() -> Iterator[str]:
    yield from pydoc_topics()
    for module in iter_stdlib_modules():
        yield from module_docstrings(module)


# -------------------------------------------------------------------------- build


def collect_sentences() -> list[str]:
    """All distinct good sentences, sorted, from *this* interpreter's loaded stdlib.

    Third-party packages already imported here may have patched stdlib objects
    (transformers adds methods to ``logging.Logger``), so the build uses
    :func:`collect_sentences_isolated` instead.
    """
    seen: set[str] = set()
    with warnings.catch_warnings():
        # Reading attributes of deprecated modules (typing.io, ...) warns.
        warnings.simplefilter("ignore")
        for text in iter_source_texts():
            seen.update(sentences_from_text(text))
    return sorted(seen)


def collect_sentences_isolated(timeout_s: float = WORKER_TIMEOUT_S) -> list[str]:
    """Run :func:`collect_sentences` in a fresh ``python -I -S`` (no site-packages).

    A clean interpreter makes the output independent of what the caller has
    imported, and the timeout bounds the whole walk.
    """
    with tempfile.TemporaryDirectory() as tmp:
        result = Path(tmp) / "sentences.json"
        command = [sys.executable, "-I", "-S", str(Path(__file__).resolve()), "--worker", str(result)]
        subprocess.run(command, check=True, timeout=timeout_s, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
        return json.loads(result.read_text(encoding="utf-8"))


def split_corpus(sentences: list[str], seed: int = DEFAULT_SEED) -> dict[str, list[str]]:
    """Shuffle with a fixed seed and split 90/5/5."""
    shuffled = list(sentences)
    random.Random(seed).shuffle(shuffled)
    n = len(shuffled)
    n_validation = round(n * SPLIT_FRACTIONS[1][1])
    n_test = round(n * SPLIT_FRACTIONS[2][1])
    n_train = n - n_validation - n_test
    return {
        "train": shuffled[:n_train],
        "validation": shuffled[n_train : n_train + n_validation],
        "test": shuffled[n_train + n_validation :],
    }


def write_splits(splits: dict[str, list[str]], out_dir: Path) -> dict[str, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {}
    for split, lines in splits.items():
        path = out_dir / f"stdlib.{split}.txt"
        with open(path, "w", encoding="utf-8", newline="\n") as handle:
            handle.writelines(line + "\n" for line in lines)
        paths[split] = path
    return paths


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent, help="output folder")
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED, help="shuffle seed")
    parser.add_argument("--worker", type=Path, help=argparse.SUPPRESS)  # internal: write sentences as JSON
    args = parser.parse_args(argv)

    if args.worker is not None:
        args.worker.write_text(json.dumps(collect_sentences()), encoding="utf-8")
        return 0

    sentences = collect_sentences_isolated()
    splits = split_corpus(sentences, seed=args.seed)
    paths = write_splits(splits, args.out)
    print(f"Python {sys.version.split()[0]}: {len(sentences)} distinct sentences")
    for split, path in paths.items():
        print(f"  {split:<10} {len(splits[split]):>6}  {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
