"""Where the commands write: every output path of every command is checked before the work starts
(`scalevae.options.check_output_file` / `check_output_folder`), and every file is written atomically. The rules:

- an output never lies inside a model folder (a saved folder or a checkpoint: its `config.json` beside weights or
  naming a Scale-VAE), nor is, holds or lies inside an input model folder: `evaluate --output F/config.json` would
  overwrite the model it measured, `train --output_dir F` would rotate checkpoints over it;
- an output file is not an input file of the same command (`evaluate --data t.txt --output t.txt`) nor a folder;
- the nearest existing parent of an output is a writable folder: a command that trains for an hour must not fail
  when it writes its first figure;
- a file is written to a temporary sibling and renamed over its name (`write_atomically`, `atomic_target`), so a
  reader, or a command killed mid-write, sees the old file or the new one, never half of one;
- no output path is derived from a model argument (a Hub id such as `user/model` would become a local folder);
  commands write where an output option says, or print.
"""

from __future__ import annotations

import contextlib
import json
import os
import uuid
from collections.abc import Iterator
from pathlib import Path

__all__ = ["atomic_target", "is_model_folder", "write_atomically"]

# A folder's files that make it a model folder: a config.json beside one of these (any transformers model), or a
# config.json naming a Scale-VAE (a save whose weights are being written or went missing).
WEIGHTS_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)


def is_model_folder(folder: str | os.PathLike) -> bool:
    """Whether `folder` is a saved model (or checkpoint) folder: a `config.json` beside weights, or naming a
    Scale-VAE."""
    folder = Path(folder)
    config = folder / "config.json"
    if not config.is_file():
        return False
    if any((folder / name).is_file() for name in WEIGHTS_FILES):
        return True
    try:
        return json.loads(config.read_text(encoding="utf-8")).get("model_type") == "scalevae"
    except (OSError, ValueError, AttributeError):
        return False


@contextlib.contextmanager
def atomic_target(path: str | os.PathLike) -> Iterator[Path]:
    """A temporary sibling of `path` to write (keeping its suffix, which matplotlib reads), renamed over `path` when
    the block ends without an error and removed otherwise."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.stem}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}{path.suffix}")
    try:
        yield temporary
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


def write_atomically(path: str | os.PathLike, data: str | bytes) -> Path:
    """Write `data` (text as UTF-8) to `path` through `atomic_target`."""
    with atomic_target(path) as temporary:
        if isinstance(data, str):
            temporary.write_text(data, encoding="utf-8")
        else:
            temporary.write_bytes(data)
    return Path(path)
