"""Hub-ready folders: save a model with everything it needs (code, weights, both tokenizers, generation config, model
card), atomically; push it to the Hugging Face Hub in one commit.

A saved folder loads without this package:

    AutoModel.from_pretrained(folder, trust_remote_code=True)

because the two model files register themselves for the auto classes (`register_for_auto_class`), so every
`save_pretrained` (this module's, `Trainer`'s, `push_to_hub`'s) copies the model code (`MODEL_CODE_FILES`)
into the folder and records the two classes in config.json's `auto_map`.

What a published folder says is the model's, not the machine's: every save records a checksum of the weights (checked
on load) and its time; config.json and the card name local folders and files by their base name only, and the card's
command line hides the values of credential flags (`public_command`). A save killed halfway is undone by the next one
(`recover_interrupted_save`), which restores the newest complete folder and removes the leftovers.
"""

import contextlib
import errno
import json
import logging
import os
import shutil
import tempfile
import threading
import uuid
from pathlib import Path

from configuration_scalevae import ScaleVAEConfig
from loading_scalevae import (
    WEIGHTS_SAVED_AT_KEY,
    read_safetensors_header,
    recording_tokenizers,
    replacing_folder,
    verify_weights_checksums,
    weights_files_in,
)
from modeling_scalevae import ScaleVAEForLatentLM

from . import __version__
from .card import write_model_card
from .factory import DECODER_TOKENIZER_SUBFOLDER, save_tokenizers

logger = logging.getLogger(__name__)

# The model's code, which every saved folder carries for remote-code users: the modeling file and the siblings it
# imports relatively (transformers' `custom_object_save` copies them).
MODEL_CODE_FILES = (
    "configuration_scalevae.py",
    "modeling_scalevae.py",
    "checks_scalevae.py",
    "loading_scalevae.py",
    "distributions_scalevae.py",
)
# What every saved folder holds besides its weights (model.safetensors, or shards and their index).
REQUIRED_FILES = (
    "config.json",
    *MODEL_CODE_FILES,
    "generation_config.json",
    "README.md",
    "tokenizer_config.json",
    f"{DECODER_TOKENIZER_SUBFOLDER}/tokenizer_config.json",
)


# ---------------------------------------------------------------------------------------------------------------------
# Saving
# ---------------------------------------------------------------------------------------------------------------------


def missing_files(folder: str | os.PathLike) -> list[str]:
    """The files a complete saved folder holds that `folder` lacks (empty: complete)."""
    folder = Path(folder)
    return _required_missing(lambda name: (folder / name).is_file())


def _required_missing(has) -> list[str]:
    missing = [name for name in REQUIRED_FILES if not has(name)]
    if not has("model.safetensors") and not has("model.safetensors.index.json"):
        missing.append("model.safetensors")
    return missing


def _is_model_folder(folder: Path) -> bool:
    try:
        return json.loads((folder / "config.json").read_text()).get("model_type") == ScaleVAEConfig.model_type
    except (OSError, ValueError):
        return False


def _swap_in(new: Path, folder: Path) -> None:
    """Replace `folder` by `new`: rename the old one aside, rename the new one in, then delete the old one. Each rename
    is atomic, so `folder` is at every moment either the complete old folder, the complete new one, or (between the
    two renames, if the process dies there) absent with both complete folders beside it, which the next save
    restores (`recover_interrupted_save`)."""
    if not folder.exists():
        os.rename(new, folder)
        return
    old = folder.with_name(f".{folder.name}.old-{uuid.uuid4().hex[:8]}")
    with replacing_folder(folder):  # the loads reading the old folder finish first (`read_snapshot`)
        os.rename(folder, old)
        try:
            os.rename(new, folder)
        except BaseException:
            os.rename(old, folder)
            raise
    shutil.rmtree(old, ignore_errors=True)


_HELD: dict[Path, int] = {}  # lock file -> the thread of this process holding it
_HELD_GUARD = threading.Lock()


class FolderInUseError(RuntimeError):
    """Another writer (a `save_model`, a training run) holds the lock of the folder being written."""


@contextlib.contextmanager
def writer_lock(folder: str | os.PathLike, purpose: str = "write"):
    """Hold the lock of `folder` for one writer (a `save_model`, a training run): the file `.NAME.lock` beside it,
    locked with `flock` and holding the writer's pid. A second writer, in this process or another, fails at once with
    `FolderInUseError` naming the holder's pid; the lock dies with its process, so a killed writer leaves nothing that
    blocks the next one. The thread that holds it may take it again (a training run saving into its own folder).
    (Without `fcntl`, on Windows, nothing is locked.)"""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows
        yield
        return
    folder = Path(folder).absolute()
    folder.parent.mkdir(parents=True, exist_ok=True)
    lock_path = folder.with_name(f".{folder.name}.lock")
    me = threading.get_ident()
    with _HELD_GUARD:
        reentry = _HELD.get(lock_path) == me
    if reentry:
        yield
        return
    while True:
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 32).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise FolderInUseError(
                f"{folder} is being written by another writer (process {holder}, lock file {lock_path}): two writers "
                f"would corrupt each other's files. Wait for it to finish, or {purpose} to another folder."
            ) from None
        try:  # the lock's previous holder may have removed the file between our open and our flock: lock the new one
            if os.stat(lock_path).st_ino == os.fstat(fd).st_ino:
                break
        except FileNotFoundError:
            pass
        os.close(fd)
    with _HELD_GUARD:
        _HELD[lock_path] = me
    try:
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        yield
    finally:
        with _HELD_GUARD:
            del _HELD[lock_path]
        with contextlib.suppress(FileNotFoundError):
            os.unlink(lock_path)
        os.close(fd)


def disk_full(error: BaseException, folder: str | os.PathLike) -> bool:
    """Whether a write into `folder` failed because its device is full: ENOSPC (or a quota) anywhere in the error's
    chain or text, or, for an I/O error that lost its errno (torch.save's "basic_ios::clear: iostream error" or
    "unexpected pos" is a RuntimeError), less than 1 MiB left on the device."""
    seen, write_error = error, False
    while seen is not None:
        if getattr(seen, "errno", None) in (errno.ENOSPC, errno.EDQUOT) or "No space left on device" in str(seen):
            return True
        write_error = write_error or isinstance(seen, (OSError, RuntimeError)) or "Safetensor" in type(seen).__name__
        seen = seen.__cause__ or seen.__context__
    if not write_error:
        return False
    path = Path(folder).absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    try:
        return shutil.disk_usage(path).free < 1 << 20
    except OSError:
        return False


def no_space_error(folder: str | os.PathLike, removed: str | os.PathLike, error: BaseException) -> OSError:
    """The OSError that says a save of `folder` ran out of space and that its partial files (`removed`) are gone."""
    return OSError(
        errno.ENOSPC,
        f"no space left on device while writing {folder} ({shutil.disk_usage(Path(removed).parent).free} bytes "
        f"free); the partial save {removed} was removed. Free some space and save again. ({type(error).__name__}: "
        f"{error})",
    )


@contextlib.contextmanager
def removed_if_incomplete(partial: str | os.PathLike, folder: str | os.PathLike | None = None):
    """Remove `partial`, a save being written, when writing it fails or is interrupted, so nothing ever finds half a
    save; a full disk is reported as such (`no_space_error`), naming `folder` (default: `partial`) and what was
    removed."""
    try:
        yield
    except Exception as error:
        full = disk_full(error, partial)
        shutil.rmtree(partial, ignore_errors=True)
        if full:
            raise no_space_error(folder or partial, partial, error) from error
        raise
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise


def _leftovers(folder: Path) -> list[Path]:
    """The folders that killed saves of `folder` left beside it: `.NAME.tmp-*` (a new save being written) and
    `.NAME.old-*` (a replaced folder being deleted, or set aside just before a kill)."""
    return [
        p
        for p in folder.parent.glob(f".{folder.name}.*-*")
        if p.is_dir() and p.name.startswith((f".{folder.name}.tmp-", f".{folder.name}.old-"))
    ]


def save_time(folder: str | os.PathLike) -> int | None:
    """When the save that wrote `folder` ran (nanoseconds since the epoch, recorded in its weights' metadata; 0 for a
    folder saved before scalevae recorded it), or None when `folder` is not a complete saved folder whose weights
    match their checksum. Recovery trusts this, not the folder's mtime, which deleting files inside it changes."""
    folder = Path(folder)
    if missing_files(folder) or not _is_model_folder(folder):
        return None
    try:
        files = weights_files_in(str(folder))
        stamps = [
            (read_safetensors_header(path)[1].get("__metadata__") or {}).get(WEIGHTS_SAVED_AT_KEY) for path in files
        ]
        verify_weights_checksums(files)
    except (OSError, ValueError):
        return None
    return max((int(stamp) for stamp in stamps if stamp and stamp.isdigit()), default=0) if files else None


def recover_interrupted_save(folder: str | os.PathLike) -> Path | None:
    """Undo what killed saves of `folder` left (`save_model` calls it first): if `folder` is missing, put back the
    newest complete folder among the leftovers, chosen by the save time recorded inside each (`save_time`), never by
    mtime; then delete the other leftovers. Returns the folder it restored, or None. Leftovers with nothing complete
    among them are kept while `folder` is missing, for the user to inspect."""
    folder = Path(folder).absolute()
    leftovers, restored = _leftovers(folder), None
    if not folder.exists():
        complete = [(stamp, path) for path in leftovers if (stamp := save_time(path)) is not None]
        if not complete:
            return None
        newest = max(complete, key=lambda item: item[0])[1]
        os.rename(newest, folder)
        leftovers.remove(newest)
        restored = folder
    for path in leftovers:
        shutil.rmtree(path, ignore_errors=True)
    return restored


def save_model(
    folder: str | os.PathLike,
    model: ScaleVAEForLatentLM,
    encoder_tokenizer,
    decoder_tokenizer,
    metrics: dict | None = None,
    training: dict | None = None,
    state_dict: dict | None = None,
    space: bool = False,
) -> Path:
    """Save a complete, Hub-ready folder, atomically: config.json (with `auto_map` and the scalevae version), the two
    model code files, model.safetensors (scale factors included), generation_config.json, the encoder's tokenizer at
    the root and the decoder's in `decoder_tokenizer/`, and the README.md model card (`render_model_card`).

    Everything is written into a temporary sibling folder that then replaces `folder` whole (`_swap_in`): an error or
    an interruption leaves the previous folder as it was. An existing `folder` that is not a saved ScaleVAE model (and
    not empty) is refused rather than replaced. One writer at a time (`writer_lock`): a second `save_model` of the
    same folder, or a save into a training run's folder, raises `FolderInUseError`. A full disk raises an OSError
    (ENOSPC) that says so and names the folder; the partial save is removed. `state_dict`, as in `save_pretrained`:
    the weights to write instead of the model's own (e.g. `accelerator.get_state_dict(model)` gathered under FSDP).
    With `space`, the folder also runs as a Gradio Space as it is: app.py, requirements.txt and a copy of this package
    (`scalevae.demo.write_space_files`; the page of `scalevae demo`).
    """
    folder = Path(folder).absolute()
    with writer_lock(folder, "save"):
        return _save_model_locked(
            folder, model, encoder_tokenizer, decoder_tokenizer, metrics, training, state_dict, space
        )


def save_run(spec, data, model, metrics: dict, steps: int, seconds: float, command: str | None = None) -> Path:
    """Save a run recipe's model (`scalevae.recipe.run`) to OUTPUT_DIR/final with its model card: the test split's
    figures (else the first split's) and the record of how it was trained (`scalevae.card.training_record`)."""
    from .card import training_record

    record = training_record(spec, data, command, steps=steps, seconds=seconds, metrics=metrics)
    figures = metrics.get("test") or next(iter(metrics.values()), None)
    folder = spec.output_dir / "final"
    return save_model(folder, model, data.encoder_tokenizer, data.decoder_tokenizer, metrics=figures, training=record)


def _save_model_locked(
    folder: Path, model, encoder_tokenizer, decoder_tokenizer, metrics, training, state_dict=None, space=False
) -> Path:
    recover_interrupted_save(folder)
    if folder.exists():
        if not folder.is_dir():
            raise NotADirectoryError(f"{folder} exists and is not a folder.")
        if any(folder.iterdir()) and not _is_model_folder(folder):
            raise FileExistsError(
                f"{folder} holds files but no ScaleVAE config.json: save_model replaces the whole folder, so it refuses "
                "to overwrite it. Choose an empty or new folder."
            )
    folder.parent.mkdir(parents=True, exist_ok=True)
    model.config.scalevae_version = __version__
    # Unique per writer (pid and a random part), so no two saves ever share one.
    new = folder.with_name(f".{folder.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    new.mkdir()  # not tempfile.mkdtemp: its mode 0o700 would end up on the saved folder
    with removed_if_incomplete(new, folder):
        with recording_tokenizers(encoder_tokenizer, decoder_tokenizer):
            model.save_pretrained(new, state_dict=state_dict)
        save_tokenizers(new, encoder_tokenizer, decoder_tokenizer)
        write_model_card(new, model, metrics, training, model_name=(training or {}).get("model_name") or folder.name)
        if space:
            from .demo import write_space_files

            write_space_files(new)
        missing = missing_files(new)
        if missing:
            raise RuntimeError(
                f"save_model wrote an incomplete folder (missing {', '.join(missing)}); nothing replaced."
            )
        _keep_class_statistics(folder, new)
        _swap_in(new, folder)
    for path in _leftovers(folder):  # of saves killed earlier (this one's own are gone)
        shutil.rmtree(path, ignore_errors=True)
    return folder


# ---------------------------------------------------------------------------------------------------------------------
# Pushing to the Hub
# ---------------------------------------------------------------------------------------------------------------------


# What a Trainer checkpoint holds besides the model: the state to resume training, not part of a published model.
# (training_args.bin is the pickled TrainingArguments, access token included.)
TRAINER_STATE_FILES = (
    "optimizer.pt",
    "scheduler.pt",
    "scaler.pt",
    "rng_state.pth",
    "training_args.bin",
    "trainer_state.json",
    "checkpoint_complete.json",  # scalevae.training.COMPLETE_MARKER
    "data_fingerprint.json",  # scalevae.training.DATA_FINGERPRINT
)


def is_trainer_state(name: str) -> bool:
    """Whether a file name is a Trainer checkpoint's training state (`TRAINER_STATE_FILES`, per-process RNG states)."""
    return name in TRAINER_STATE_FILES or (name.startswith("rng_state") and name.endswith(".pth"))


def _keep_class_statistics(old: Path, new: Path) -> None:
    """A re-save replaces the whole folder: the label-conditional class statistics (`LatentText.save_classes`) carry
    over when they were fitted on the very weights being saved again (same weights checksum), else they are left out."""
    from .latent import CLASSES_FILE, folder_weights_checksum

    classes = old / CLASSES_FILE
    if not classes.is_file():
        return
    recorded = (read_safetensors_header(str(classes))[1].get("__metadata__") or {}).get("weights_checksum")
    if recorded and recorded == folder_weights_checksum(new):
        shutil.copy2(classes, new / CLASSES_FILE)


def folder_files(folder: str | os.PathLike) -> list[str]:
    """What a saved folder publishes, as repository paths (POSIX, relative), sorted: its regular files, at any depth,
    but a Trainer checkpoint's training state (`is_trainer_state`, in a `checkpoint-N/` inside the folder too: its
    training_args.bin holds the access token) and anything that is not a regular file inside the folder. A link, to
    a file or a folder, is skipped with a warning naming it (uploading it would publish what it points to, wherever
    that is); so are sockets, pipes and devices."""
    folder = Path(folder)
    files, skipped = [], []
    for root, dirs, names in os.walk(folder):  # os.walk does not enter linked folders; they are listed in dirs
        base = Path(root)
        for name in [d for d in dirs if (base / d).is_symlink()]:
            dirs.remove(name)
            skipped.append(base / name)
        for name in names:
            path = base / name
            if path.is_symlink() or not path.is_file():
                skipped.append(path)
            elif not is_trainer_state(name):
                files.append(path.relative_to(folder).as_posix())
    for path in skipped:
        target = f" -> {os.readlink(path)}" if path.is_symlink() else ""
        logger.warning("%s%s is a link or not a regular file: it is not published.", path, target)
    return sorted(files)


def push_to_hub(
    folder_or_model,
    repo_id: str,
    *,
    encoder_tokenizer=None,
    decoder_tokenizer=None,
    metrics: dict | None = None,
    training: dict | None = None,
    commit_message: str = "Upload ScaleVAE model",
    private: bool | None = None,
    token: str | None = None,
    revision: str | None = None,
    create_pr: bool = False,
    delete_stale: bool = True,
):
    """Upload a saved folder (or a model, saved first with its two tokenizers) to the Hub repository `repo_id`, in a
    single commit: the repository changes from its old model to the new one at once, never half of each.

    With `delete_stale`, files of the repository that the folder does not have (say, the shards of an earlier, larger
    save) are deleted in the same commit; `.gitattributes` is kept. Returns huggingface_hub's `CommitInfo`.
    """
    from huggingface_hub import CommitOperationAdd, CommitOperationDelete, HfApi
    from huggingface_hub.errors import EntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError

    with tempfile.TemporaryDirectory() as scratch:
        if isinstance(folder_or_model, (str, os.PathLike)):
            folder = Path(folder_or_model)
            missing = missing_files(folder)
            if missing:
                raise FileNotFoundError(
                    f"{folder} is not a complete saved ScaleVAE folder (missing {', '.join(missing)}); save it with "
                    "scalevae.hub.save_model first."
                )
        else:
            if encoder_tokenizer is None or decoder_tokenizer is None:
                raise TypeError("push_to_hub(model, ...) needs encoder_tokenizer= and decoder_tokenizer=.")
            folder = save_model(
                Path(scratch) / repo_id.split("/")[-1],
                folder_or_model,
                encoder_tokenizer,
                decoder_tokenizer,
                metrics=metrics,
                training=training,
            )
        files = folder_files(folder)
        unpublished = _required_missing(set(files).__contains__)
        if unpublished:
            raise FileNotFoundError(
                f"{folder}: {', '.join(unpublished)} would not be uploaded (a link or not a regular file); a published "
                "folder holds its own files. Replace the link(s) by the files."
            )
        api = HfApi(token=token)
        repo_id = api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model").repo_id
        operations = [CommitOperationAdd(path_in_repo=name, path_or_fileobj=str(folder / name)) for name in files]
        if delete_stale:
            try:
                remote = api.list_repo_files(repo_id, revision=None if create_pr else revision, repo_type="model")
            except (EntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError):
                remote = []
            keep = set(files) | {".gitattributes"}
            operations = [CommitOperationDelete(path_in_repo=name) for name in remote if name not in keep] + operations
        return api.create_commit(
            repo_id,
            operations,
            commit_message=commit_message,
            revision=revision,
            create_pr=create_pr,
            repo_type="model",
        )


__all__ = [
    "FolderInUseError",
    "disk_full",
    "folder_files",
    "is_trainer_state",
    "missing_files",
    "push_to_hub",
    "recover_interrupted_save",
    "save_model",
    "save_time",
    "writer_lock",
]
