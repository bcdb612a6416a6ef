"""Loading and saving of Scale-VAE folders: strict loading and its diagnosis, weights checksums, public names in
config.json. A sibling of `modeling_scalevae.py` that every saved folder carries (transformers' `custom_object_save`
copies the modules a remote-code file imports relatively), so remote-code users (`trust_remote_code=True`, no scalevae
installed) get the same strict loading. It imports only torch, transformers and safetensors."""

import contextlib
import contextvars
import math

import torch
from transformers.utils import logging

try:  # a saved folder loaded with trust_remote_code: transformers only allows relative imports between its files
    from .configuration_scalevae import SCALEVAE_FORMAT_VERSION
except ImportError:  # the same file installed as a top-level module
    from configuration_scalevae import SCALEVAE_FORMAT_VERSION

logger = logging.get_logger(__name__)

# ---------------------------------------------------------------------------------------------------------------------
# Loading and saving: strict loading and its diagnosis, weights checksums, public names in config.json
# ---------------------------------------------------------------------------------------------------------------------


def load_strictly(load, pretrained_model_name_or_path, *model_args, **kwargs):
    """`ScaleVAEForLatentLM.from_pretrained`, given `PreTrainedModel.from_pretrained` as `load`: a local path that does
    not exist is refused (`folder_or_hub_id`), and a folder re-saved meanwhile is read again (`read_snapshot`)."""
    return read_snapshot(
        pretrained_model_name_or_path,
        lambda: _load_strictly(load, pretrained_model_name_or_path, *model_args, **dict(kwargs)),
    )


def _load_strictly(load, pretrained_model_name_or_path, *model_args, **kwargs):
    import os

    from safetensors import SafetensorError

    if isinstance(pretrained_model_name_or_path, (str, os.PathLike)):
        pretrained_model_name_or_path = folder_or_hub_id(pretrained_model_name_or_path)

    return_loading_info = kwargs.pop("output_loading_info", False)
    verify_weights = kwargs.pop("verify_weights", True)
    strict = kwargs.pop("strict", True)
    allow_resize = kwargs.pop("ignore_mismatched_sizes", False)
    try:  # collect the mismatches instead of transformers' generic error, then explain them below
        model, info = load(
            pretrained_model_name_or_path,
            *model_args,
            output_loading_info=True,
            ignore_mismatched_sizes=True,
            **kwargs,
        )
    except SafetensorError as error:
        raise OSError(
            f"{describe_weights_files(pretrained_model_name_or_path, kwargs.get('subfolder') or '')} is "
            f"truncated or corrupted ({error}); re-download or re-save the model."
        ) from error
    model.config.validate_scalevae()  # config fields given as keyword arguments override the saved ones unchecked
    files = resolved_weights_files(pretrained_model_name_or_path, kwargs)
    problems = part_type_mismatches(model.config, files) + weights_config_mismatches(
        model, info, allow_resize, allow_missing=not strict
    )
    absent, unused = sorted(info.get("missing_keys") or ()), sorted(info.get("unexpected_keys") or ())
    if problems:
        anyway = []
        if absent or unused:
            anyway.append(
                "strict=False (the weights the file lacks are newly initialised and those the config does not use are "
                "dropped, as transformers' own from_pretrained does; output_loading_info=True lists them)"
            )
        if info.get("mismatched_keys") and not allow_resize:
            anyway.append("ignore_mismatched_sizes=True (tensors of another shape are newly initialised)")
        raise ValueError(
            f"The weights in {pretrained_model_name_or_path} do not match its config:\n - "
            + "\n - ".join(problems)
            + "\nA ScaleVAE folder loads only into the config it was saved with: drop the config overrides, or "
            "fix config.json to the values the weights were trained with."
            + (f" To load it anyway, pass {' and '.join(anyway)}." if anyway else "")
        )
    if absent or unused:  # strict=False: said, not raised
        logger.warning(
            "Loaded %s with strict=False: newly initialised (the weights file lacks them): %s; dropped (the config "
            "does not use them): %s.",
            pretrained_model_name_or_path,
            ", ".join(absent) or "none",
            ", ".join(unused) or "none",
        )
    if verify_weights:
        verify_weights_checksums(files)
    # Loading materialises the parameters anew, without the requires_grad=False that __init__ set on a frozen encoder.
    model._freeze_encoder(model.config.freeze_encoder)
    return (model, info) if return_loading_info else model


def save_publicly(model, save, save_directory, *args, push_to_hub: bool = False, **kwargs):
    """`ScaleVAEForLatentLM.save_pretrained`, given `PreTrainedModel.save_pretrained` (bound to `model`) as `save`."""
    import os

    check_saveable(model, kwargs.get("state_dict"))
    model.config.scalevae_format_version = SCALEVAE_FORMAT_VERSION  # a loaded older folder is saved in today's format
    configs = [model.config, model.config.encoder, model.config.decoder]
    names = [getattr(config, "_name_or_path", "") for config in configs]
    hub_kwargs = {
        key: kwargs.pop(key) for key in ("repo_id", "commit_message", "create_pr", "private") if key in kwargs
    }
    try:
        for config, name in zip(configs, names):
            config._name_or_path = public_name(name)
        save(save_directory, *args, **kwargs)
    finally:
        for config, name in zip(configs, names):
            config._name_or_path = name
    if kwargs.get("is_main_process", True):
        record_weights_checksums(save_directory, {**part_types(model.config), **recorded_tokenizer_entries()})
    if push_to_hub:  # after the checksums: push_to_hub saves a fresh copy and uploads that
        repo_id = hub_kwargs.pop("repo_id", os.path.basename(os.path.normpath(str(save_directory))))
        model.push_to_hub(repo_id, token=kwargs.get("token"), **hub_kwargs)


def check_saveable(model, state_dict=None) -> None:
    """Refuse, before anything is written, a model whose folder would not load: its config must validate (a field set
    by hand, or by a setter that failed halfway, is not checked when it is assigned), and a model built from that config
    must hold the tensors it is about to save, in their shapes (a config edited after the model was built describes
    another model). The reference is built on the meta device: no memory, no initialisation. Tensors that are not
    plain local tensors here (sharded by FSDP, emptied by ZeRO-3) are not compared."""
    import copy

    try:
        model.config.validate_scalevae()
    except ValueError as error:
        raise ValueError(f"Not saved: the model's config would not load ({error}).") from error
    # The model's own class: FSDP2 and similar wrappers subclass it on the fly in their torch module.
    model_class = next(c for c in type(model).__mro__ if not c.__module__.startswith("torch."))
    with torch.device("meta"):
        reference = model_class(copy.deepcopy(model.config)).state_dict()
    saved = state_dict if state_dict is not None else model.state_dict()
    own = ("latent_head.", "collapse.", "fitted_prior.", "injection.")  # the composite's layers; the parts keep theirs
    problems = [
        f"{key}: {'missing' if key not in saved else 'not in the config'}"
        for key in sorted(set(reference) ^ set(saved))
        if key.startswith(own)
    ]
    for key in sorted(set(reference) & set(saved)):
        tensor = saved[key]
        if (
            type(tensor) in (torch.Tensor, torch.nn.Parameter)
            and tensor.numel()
            and tensor.shape != reference[key].shape
        ):
            problems.append(f"{key}: {tuple(tensor.shape)}, the config gives {tuple(reference[key].shape)}")
    if problems:
        raise ValueError(
            "Not saved: the model's config no longer describes its tensors, so the folder would not load:\n - "
            + "\n - ".join(problems)
            + "\nChange settings through the model (set_prior, resize_token_embeddings), not by editing model.config."
        )


def describe_weights_files(path, subfolder: str = "") -> str:
    """The safetensors file that fails to parse, for an error message (a local folder; a Hub id is named as such)."""
    import os

    from safetensors import SafetensorError, safe_open

    folder = os.path.join(str(path), subfolder)
    if not os.path.isdir(folder):
        return f"The safetensors weights of {path} (in the Hub cache)"
    files = sorted(os.path.join(folder, f) for f in os.listdir(folder) if f.endswith(".safetensors"))
    for file in files:
        try:
            with safe_open(file, framework="pt"):
                pass
        except (SafetensorError, OSError):
            return file
    return ", ".join(files) or folder


# The encoder's and decoder's model types, recorded in every weights file's metadata: a RoBERTa encoder has a BERT's
# tensor names and shapes, so only the record tells a config.json edited from one to the other.
PART_TYPE_KEYS = {"encoder": "scalevae_encoder_type", "decoder": "scalevae_decoder_type"}


def part_types(config) -> dict[str, str]:
    """The metadata entries recording the model types of `config`'s encoder and decoder."""
    return {key: getattr(config, part).model_type for part, key in PART_TYPE_KEYS.items()}


def part_type_mismatches(config, files) -> list[str]:
    """The encoder/decoder model types of `config` that differ from those recorded in the weights files (a file saved
    before they were recorded says nothing)."""
    problems = []
    for path in files[:1]:  # every shard of a save records the same types
        metadata = read_safetensors_header(path)[1].get("__metadata__") or {}
        for part, key in PART_TYPE_KEYS.items():
            saved, now = metadata.get(key), getattr(config, part).model_type
            if saved is not None and saved != now:
                problems.append(
                    f"{part}.model_type={now!r} in the config, but the weights file was saved from a {saved!r} {part}"
                )
    return problems


# Tensors whose shape reveals a config value: key -> ((config field, dimension of the saved shape, divisor), ...).
_SHAPE_WITNESSES = {
    "latent_head.proj.weight": (("latent_size", 0, 2), ("encoder.hidden_size", 1, 1)),
    "encoder.embeddings.word_embeddings.weight": (("encoder.vocab_size", 0, 1), ("encoder.hidden_size", 1, 1)),
    "encoder.embeddings.position_embeddings.weight": (("encoder.max_position_embeddings", 0, 1),),
    "decoder.transformer.wte.weight": (("decoder.vocab_size", 0, 1), ("decoder.n_embd", 1, 1)),
    "decoder.transformer.wpe.weight": (("decoder.n_positions", 0, 1),),
}


def weights_config_mismatches(model, info: dict, allow_resize: bool = False, allow_missing: bool = False) -> list[str]:
    """Every disagreement between a loaded weights file and the model's config, in words naming both values
    (`allow_missing`: weights the file lacks or holds in excess are none)."""
    config = model.config
    missing, unexpected = set(info.get("missing_keys") or ()), set(info.get("unexpected_keys") or ())
    if allow_missing:
        missing, unexpected = set(), set()
    problems = []

    def in_file(key: str, present_in_model: bool) -> bool:
        return key in unexpected or (present_in_model and key not in missing)

    has_memory = in_file("injection.to_memory.weight", model.injection.to_memory is not None)
    has_embedding = in_file("injection.to_embedding.weight", model.injection.to_embedding is not None)
    saved_injection = {(True, True): "both", (True, False): "memory", (False, True): "embedding"}.get(
        (has_memory, has_embedding), "none of memory/embedding/both"
    )
    has_scale = in_file("collapse.scale_factors", hasattr(model.collapse, "scale_factors"))
    has_bn = in_file("collapse.beta", hasattr(model.collapse, "beta"))
    saved_strategy = "'scale'" if has_scale else "'bn'" if has_bn else "'vae', 'free_bits' or 'ae'"
    groups = {}  # (field, config value, saved value, missing?) -> keys
    for key in sorted(missing | unexpected):
        if key.startswith("injection."):
            group = ("latent_injection", repr(config.latent_injection), repr(saved_injection))
        elif key.startswith("collapse."):
            group = ("collapse_strategy", repr(config.collapse_strategy), saved_strategy)
        else:
            group = (None, None, None)
        groups.setdefault((*group, key in missing), []).append(key)
    for (field, value, saved, is_missing), keys in groups.items():
        names = ", ".join(keys[:-1]) + (" and " if len(keys) > 1 else "") + keys[-1]
        if field is None:
            part = keys[0].split(".")[0]
            part_type = (
                f" ({part}.model_type={getattr(config, part).model_type!r} in the config)"
                if part in PART_TYPE_KEYS and all(key.startswith(part + ".") for key in keys)
                else ""
            )
            problems.append(
                f"the config builds {names}, which the weights file lacks{part_type}"
                if is_missing
                else f"the weights file holds {names}, which the config does not build{part_type}"
            )
        elif is_missing:
            problems.append(
                f"{field}={value} expects {names}, which the weights file lacks (was it saved with {field}={saved}?)"
            )
        else:
            problems.append(
                f"the weights file holds {names}, which {field}={value} does not use (was it saved with {field}={saved}?)"
            )
    gamma = getattr(model.collapse, "gamma", None)  # BN-VAE's γ is a saved buffer: the config must agree with it
    if gamma is not None and not math.isclose(gamma.item(), config.bn_gamma, rel_tol=1e-6):
        problems.append(f"bn_gamma={config.bn_gamma} in the config, but the weights hold γ={gamma.item():.6g}")
    if allow_resize:
        return problems
    explained = set()
    for key, saved_shape, model_shape in sorted(info.get("mismatched_keys") or (), key=lambda item: item[0]):
        for field, dim, divisor in _SHAPE_WITNESSES.get(key, ()):
            owner = config
            for part in field.split(".")[:-1]:
                owner = getattr(owner, part)
            value, saved = getattr(owner, field.split(".")[-1]), saved_shape[dim] // divisor
            if value != saved and field not in explained:
                explained.add(field)
                problems.append(
                    f"{field}={value} in the config, but the weights file was saved with {field}={saved} ({key} has "
                    f"shape {tuple(saved_shape)}, the config needs {tuple(model_shape)})"
                )
    if not explained:  # no witness named the field: list the shapes themselves
        for key, saved_shape, model_shape in sorted(info.get("mismatched_keys") or (), key=lambda item: item[0]):
            problems.append(
                f"{key} has shape {tuple(saved_shape)} in the weights file, the config needs {tuple(model_shape)}"
            )
    return problems


# -- weights integrity ------------------------------------------------------------------------------------------------
# Every save records, in each safetensors file's metadata, a checksum of its tensors and the time of the save;
# `from_pretrained` recomputes the checksum. Its data part is two 64-bit sums over the file's tensor bytes read as
# 64-bit words (all words, and the rows of 1024 words weighted by their position): any flipped bit, zeroed page or
# moved block changes it, and torch reads the bytes at memory speed, where a cryptographic hash of a large model costs
# more than loading it. It guards against damage, not against someone who rewrites the file and its checksum alike.

WEIGHTS_DIGEST_KEY = "scalevae_weights_checksum"
WEIGHTS_SAVED_AT_KEY = "scalevae_saved_at"
_CHECKSUM_VERSION = "scalevae-checksum-1"
_CHECKSUM_ROW_WORDS = 1024


def weights_files_in(folder) -> list[str]:
    """The safetensors weights files of a local folder: model.safetensors, or the shards its index lists."""
    import json
    import os

    single = os.path.join(folder, "model.safetensors")
    if os.path.isfile(single):
        return [single]
    index = os.path.join(folder, "model.safetensors.index.json")
    if os.path.isfile(index):
        with open(index, encoding="utf-8") as handle:
            shards = sorted(set(json.load(handle).get("weight_map", {}).values()))
        return [os.path.join(folder, shard) for shard in shards]
    return []


def read_safetensors_header(path) -> tuple[int, dict]:
    """(header length in bytes, parsed header) of a safetensors file. Raises an OSError naming the file when it is
    not one (too short, an unreadable header) or is shorter than its header says (truncated)."""
    import json
    import os

    size = os.path.getsize(path)
    with open(path, "rb") as handle:
        length = int.from_bytes(handle.read(8), "little")
        try:
            if size < 8 or length > size - 8:
                raise ValueError("shorter than its header")
            header = json.loads(handle.read(length))
            if not isinstance(header, dict):
                raise ValueError("header is not a JSON object")
            end = max(
                (entry["data_offsets"][1] for name, entry in header.items() if name != "__metadata__"), default=0
            )
        except (ValueError, KeyError, TypeError, IndexError) as error:
            raise OSError(
                f"{path} is truncated or corrupted: not a readable safetensors file ({error}); re-download or re-save "
                "the model."
            ) from None
    if 8 + length + end > size:
        raise OSError(
            f"{path} is truncated: {size} bytes, but its header describes {8 + length + end}; re-download or re-save "
            "the model."
        )
    return length, header


def weights_checksum(path, header_length: int, header: dict) -> str:
    import hashlib
    import json
    import mmap
    import warnings

    tensors = {name: entry for name, entry in header.items() if name != "__metadata__"}
    digest = hashlib.sha256(json.dumps(tensors, sort_keys=True, separators=(",", ":")).encode())
    start = 8 + header_length
    populate = getattr(mmap, "MAP_POPULATE", 0)  # Linux: map every page at once, not one page fault at a time
    with (
        open(path, "rb") as handle,
        (
            mmap.mmap(handle.fileno(), 0, flags=mmap.MAP_SHARED | populate, prot=mmap.PROT_READ)
            if populate
            else mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ)
        ) as data,
    ):
        rows = (len(data) - start) // (8 * _CHECKSUM_ROW_WORDS)
        end = start + rows * 8 * _CHECKSUM_ROW_WORDS
        if rows:
            with warnings.catch_warnings():  # torch warns that the buffer is read-only: it is only read
                warnings.simplefilter("ignore", UserWarning)
                words = torch.frombuffer(data, dtype=torch.int64, offset=start, count=end - start >> 3)
            row_sums = words.view(rows, _CHECKSUM_ROW_WORDS).sum(1)
            weighted = (row_sums * torch.arange(1, rows + 1, dtype=torch.int64)).sum()
            sums = torch.stack([row_sums.sum(), weighted]).tolist()
            del words, row_sums, weighted
        else:
            sums = [0, 0]
        for value in sums:
            digest.update((value & (2**64 - 1)).to_bytes(8, "little"))
        digest.update(data[end:])
    return f"{_CHECKSUM_VERSION}:{digest.hexdigest()}"


def record_weights_checksum(path, saved_at: int, extra: dict[str, str] | None = None) -> None:
    """Rewrite a safetensors file with its checksum, save time and `extra` entries in the metadata; the new file gets
    the folder's usual mode (0o666 less the umask), like every other file of a save."""
    import json
    import os
    import shutil

    length, header = read_safetensors_header(path)
    metadata = dict(header.get("__metadata__") or {})
    metadata[WEIGHTS_DIGEST_KEY] = weights_checksum(path, length, header)
    metadata[WEIGHTS_SAVED_AT_KEY] = str(saved_at)
    metadata.update(extra or {})
    new_header = json.dumps({**header, "__metadata__": metadata}, separators=(",", ":")).encode()
    new_header += b" " * (-len(new_header) % 8)  # the data stays 8-byte aligned
    partial = f"{path}.partial"
    fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o666)
    try:
        with os.fdopen(fd, "wb") as out, open(path, "rb") as source:
            out.write(len(new_header).to_bytes(8, "little"))
            out.write(new_header)
            source.seek(8 + length)
            shutil.copyfileobj(source, out, 16 << 20)
        os.replace(partial, path)
    except BaseException:
        if os.path.exists(partial):
            os.remove(partial)
        raise


def record_weights_checksums(folder, extra: dict[str, str] | None = None) -> None:
    import time

    saved_at = time.time_ns()
    for path in weights_files_in(folder):
        record_weights_checksum(path, saved_at, extra)


def verify_weights_checksums(
    files, remedy: str = "Re-download or re-save the model (or pass verify_weights=False to load it anyway)."
) -> None:
    """Raise an OSError naming the first weights file whose tensors differ from the checksum recorded at its save
    (`remedy` says what to do). A file saved without one (older versions of scalevae) passes."""
    for path in files:
        length, header = read_safetensors_header(path)
        recorded = (header.get("__metadata__") or {}).get(WEIGHTS_DIGEST_KEY)
        if recorded is None:
            continue
        if not recorded.startswith(_CHECKSUM_VERSION + ":"):
            logger.warning_once(f"{path}: unknown weights checksum {recorded.split(':')[0]!r}, not verified.")
            continue
        if weights_checksum(path, length, header) != recorded:
            raise OSError(
                f"{path} is corrupted: its tensors do not match the checksum recorded when it was saved "
                f"({WEIGHTS_DIGEST_KEY} in its metadata). {remedy}"
            )


def resolved_weights_files(path, kwargs: dict) -> list[str]:
    """The weights files `from_pretrained` read: a local folder's, or the Hub cache's copies of a repository's."""
    import os

    subfolder = kwargs.get("subfolder") or ""
    folder = os.path.join(str(path), subfolder)
    if os.path.isdir(folder):
        return weights_files_in(folder)
    from transformers.utils import cached_file

    options = dict(
        subfolder=subfolder,
        cache_dir=kwargs.get("cache_dir"),
        revision=kwargs.get("revision"),
        local_files_only=True,
        _raise_exceptions_for_missing_entries=False,
        _raise_exceptions_for_connection_errors=False,
    )
    try:
        single = cached_file(path, "model.safetensors", **options)
        if single is not None:
            return [single]
        index = cached_file(path, "model.safetensors.index.json", **options)
    except (OSError, ValueError):
        return []
    return weights_files_in(os.path.dirname(index)) if index is not None else []


def public_name(name: str) -> str:
    """A part's `_name_or_path` as a saved folder may show it: a Hub id as it is, a local path as its folder's name
    only (the rest of the path belongs to the machine that saved it)."""
    import os

    if not name or not (os.path.isabs(name) or os.path.exists(name) or name.startswith(("~", "."))):
        return name
    head, base = os.path.split(os.path.normpath(os.path.expanduser(name)))
    # a folder named only "model" (e.g. inside the offline MiniLM's package) says more with its parent's name
    if base in ("model", "models", "final") and os.path.basename(head):
        return f"{os.path.basename(head)}/{base}"
    return base


# -- tokenizers tied to the weights -------------------------------------------------------------------------------------
# A save that knows the model's tokenizers (`scalevae.hub.save_model`, the Trainer's checkpoints) records in the weights'
# metadata each one's size and a hash of its vocabulary (token -> id). Another model's `decoder_tokenizer/` copied into
# the folder then fails loading by name, instead of decoding the ids of one vocabulary with another's tokens.

TOKENIZER_KEYS = {"encoder": "scalevae_encoder_tokenizer", "decoder": "scalevae_decoder_tokenizer"}
_TOKENIZERS_BEING_SAVED = contextvars.ContextVar("scalevae_tokenizers_being_saved", default=None)


def tokenizer_fingerprint(tokenizer) -> str:
    """`"<size>:<hash>"`: the number of tokens and a SHA-256 of the vocabulary's token -> id pairs, added tokens
    included (what decides which id a text becomes, and which text an id becomes)."""
    import hashlib
    import json

    pairs = sorted((index, token) for token, index in tokenizer.get_vocab().items())
    digest = hashlib.sha256(json.dumps(pairs, ensure_ascii=False, separators=(",", ":")).encode()).hexdigest()
    return f"{len(tokenizer)}:{digest[:32]}"


@contextlib.contextmanager
def recording_tokenizers(encoder_tokenizer, decoder_tokenizer):
    """Inside, every `save_pretrained` of a ScaleVAE model records these two tokenizers' fingerprints with its weights
    (the save that writes them beside the model)."""
    token = _TOKENIZERS_BEING_SAVED.set({"encoder": encoder_tokenizer, "decoder": decoder_tokenizer})
    try:
        yield
    finally:
        _TOKENIZERS_BEING_SAVED.reset(token)


def recorded_tokenizer_entries() -> dict[str, str]:
    tokenizers = _TOKENIZERS_BEING_SAVED.get() or {}
    return {TOKENIZER_KEYS[part]: tokenizer_fingerprint(tokenizer) for part, tokenizer in tokenizers.items()}


def tokenizer_mismatches(files, tokenizers: dict, where: dict) -> list[str]:
    """Each tokenizer (`tokenizers`: part -> tokenizer; `where`: part -> its file or folder, for the message) whose
    fingerprint differs from the one recorded with the weights `files` (a folder saved without one says nothing)."""
    problems = []
    try:
        metadata = (read_safetensors_header(files[0])[1].get("__metadata__") or {}) if files else {}
    except OSError:  # damaged weights: loading the model names them
        metadata = {}
    for part, tokenizer in tokenizers.items():
        recorded = metadata.get(TOKENIZER_KEYS[part])
        if recorded is None:
            continue
        now = tokenizer_fingerprint(tokenizer)
        if now != recorded:
            size, _, digest = recorded.partition(":")
            problems.append(
                f"{where[part]} is not the {part} tokenizer this model was saved with: it has {len(tokenizer)} tokens "
                f"(vocabulary hash {now.partition(':')[2][:12]}), the weights were saved with a {size}-token one "
                f"(hash {digest[:12]})"
            )
    return problems


# -- where a name points: a local folder or a Hub repository ----------------------------------------------------------
# A missing path must never become a Hub lookup (a typo would download whatever model a stranger published under that
# name). The rule: a name that exists is local; `hf://owner/name` is always a Hub id; a missing name is a Hub id only
# if it is spelled as one (`name` or `owner/name`, valid for the Hub) and does not start in a local folder (`w/Fg`
# with a folder `w` here is a missing local folder); everything else that is missing ("./x", "../x", "/x", "~/x",
# "a/b/c", "a\\b") is refused as "no such folder".

HUB_PREFIX = "hf://"


def folder_or_hub_id(name, argument: str = "the model") -> str:
    """The local folder or the Hub id that `name` points to (a `hf://` prefix removed), by the rule above; raises a
    FileNotFoundError ("no such folder") for a missing local-looking path, a NotADirectoryError for a file."""
    import os

    text = os.fspath(name)
    if text.startswith(HUB_PREFIX):
        repo_id = text[len(HUB_PREFIX) :]
        _check_hub_id(repo_id, argument, text)
        return repo_id
    if os.path.exists(text):
        if not os.path.isdir(text):
            raise NotADirectoryError(f"{argument} {text} is a file: give the folder of a saved model.")
        return text
    first = text.replace("\\", "/").split("/")[0]
    looks_local = (
        os.path.isabs(text)
        or text.startswith((".", "~"))
        or "\\" in text
        or text.endswith("/")
        or text.count("/") > 1
        or (text.count("/") == 1 and os.path.isdir(first))
        or not _is_hub_id(text)
    )
    if looks_local:
        hint = f" ({first}/ is a local folder)" if text.count("/") == 1 and os.path.isdir(first) else ""
        raise FileNotFoundError(
            f"no such folder: {argument} {text} does not exist{hint}. Give the folder of a saved model; a Hub "
            f"repository is spelled owner/name (or {HUB_PREFIX}owner/name, which never means a local folder)."
        )
    return text


def _is_hub_id(text: str) -> bool:
    try:
        _check_hub_id(text, "", text)
    except ValueError:
        return False
    return True


def _check_hub_id(repo_id: str, argument: str, given: str) -> None:
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(repo_id)
    except HFValidationError as error:
        raise ValueError(f"{argument} {given} is not a valid Hub repository id: {error}") from None


# -- readers see one snapshot ------------------------------------------------------------------------------------------
# A save replaces a folder by renaming a complete new one over it (`scalevae.hub._swap_in`). A reader holds a shared
# `flock` on the folder itself (the directory, so no lock file is needed and read-only copies work) while it loads;
# the save takes the exclusive lock of the folder it replaces before the renames, so it waits for the readers of the
# old folder, and a reader that opened the old folder sees, once it has the lock, that the path now names another
# folder and starts again on the new one. Where flock is missing (Windows, some network file systems), the folder's
# identity (device, inode, ctime: it changes with every save and with every file added or removed inside) compared
# before and after the load catches a save in between, and the load is tried again.

SNAPSHOT_ATTEMPTS = 30
_IN_SNAPSHOT = contextvars.ContextVar("scalevae_in_snapshot", default=False)


class FolderChangedError(OSError):
    """A folder was re-saved during every one of a load's attempts."""


def folder_identity(path) -> tuple | None:
    import os

    try:
        stat = os.stat(path)
    except OSError:
        return None
    return (stat.st_dev, stat.st_ino, stat.st_ctime_ns)


def _complete_copies_beside(folder: str) -> list[str]:
    """The folders a save of `folder` writes or sets aside (`.NAME.tmp-*`, `.NAME.old-*`) that hold a config and
    weights, newest first."""
    import os

    parent, name = os.path.split(os.path.abspath(folder))
    try:
        entries = os.listdir(parent or ".")
    except OSError:
        return []
    copies = [
        os.path.join(parent, entry)
        for entry in entries
        if entry.startswith((f".{name}.tmp-", f".{name}.old-"))
        and os.path.isfile(os.path.join(parent, entry, "config.json"))
        and weights_files_in(os.path.join(parent, entry))
    ]
    return sorted(copies, key=lambda copy: os.stat(copy).st_mtime_ns, reverse=True)


# How long a load waits for a folder that is missing while a save's leftovers lie beside it: the two renames of a
# save follow each other within microseconds, so a folder still missing after this was left so by a killed save.
RENAME_PATIENCE_S = 2.0


def _wait_for_folder(folder: str) -> tuple | None:
    """The folder's identity; a folder missing while a save's leftovers lie beside it (a save between its two renames)
    is waited for, and if it stays missing, the complete copy beside it is named with the way to restore it."""
    import os
    import time

    identity = folder_identity(folder)
    if identity is not None:
        return identity
    parent, name = os.path.split(os.path.abspath(folder))
    try:
        saving = any(entry.startswith(f".{name}.") for entry in os.listdir(parent or "."))
    except OSError:
        saving = False
    if not saving:
        return None
    deadline = time.monotonic() + RENAME_PATIENCE_S
    while time.monotonic() < deadline:
        time.sleep(0.01)
        identity = folder_identity(folder)
        if identity is not None:
            return identity
    copies = _complete_copies_beside(folder)
    if copies:
        raise FileNotFoundError(
            f"{folder} does not exist, but {copies[0]} beside it holds a complete save: a save was interrupted "
            f"between its two renames. Restore the newest complete copy with "
            f"scalevae.hub.recover_interrupted_save({folder!r}) (the next save_model into it does the same)."
        )
    return None


def read_snapshot(folder, load):
    """`load()`, repeated until `folder` is the same before and after it (see above); a load that fails while the
    folder changed is tried again. Raises a FolderChangedError ("changed while loading") when every attempt saw a new
    save. A Hub id or a load inside another `read_snapshot` runs `load()` once."""
    import os
    import random
    import time

    if _IN_SNAPSHOT.get() or not isinstance(folder, (str, os.PathLike)):
        return load()
    folder = os.fspath(folder)
    parent, name = os.path.split(os.path.abspath(folder))
    if not os.path.isdir(folder) and not any(entry.startswith(f".{name}.") for entry in _listdir(parent)):
        return load()  # a Hub id, or a missing path with no save under way: the loader says what is wrong
    token, failure = _IN_SNAPSHOT.set(True), None
    try:
        for attempt in range(SNAPSHOT_ATTEMPTS):
            before = _wait_for_folder(folder)
            if before is None:  # missing with no complete copy beside it: the loader says so
                return load()
            with _shared_lock(folder) as locked:
                if locked is not None and locked != folder_identity(folder):
                    continue  # replaced between open and lock: read the new folder
                before = locked or before
                try:
                    result = load()
                except Exception as error:
                    if folder_identity(folder) == before:
                        raise  # the folder held still: the error is the folder's own
                    failure = error
                else:
                    if folder_identity(folder) == before:
                        return result
            time.sleep(random.uniform(0.005, 0.05) * (1 + attempt))
    finally:
        _IN_SNAPSHOT.reset(token)
    raise FolderChangedError(
        f"{folder} changed while loading, {SNAPSHOT_ATTEMPTS} times in a row: another process keeps re-saving it. "
        "Load it when the saves stop, or load a copy."
    ) from failure


@contextlib.contextmanager
def _shared_lock(folder: str):
    """A shared flock on the folder for the duration, yielding the identity of the folder it locked (None where the
    platform has no flock or the folder cannot be opened)."""
    import os

    try:
        import fcntl

        fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except (ImportError, OSError):
        yield None
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_SH)
        stat = os.fstat(fd)
        yield (stat.st_dev, stat.st_ino, stat.st_ctime_ns)
    finally:
        os.close(fd)


@contextlib.contextmanager
def replacing_folder(folder, patience_s: float = 600.0):
    """Hold the exclusive flock of `folder` (a save about to rename it away): wait for the loads reading it to finish,
    and keep new ones out until the renames are done. After `patience_s` of readers holding it, a TimeoutError."""
    import os
    import time

    try:
        import fcntl

        fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except (ImportError, OSError):
        yield
        return
    try:
        deadline = time.monotonic() + RENAME_PATIENCE_S
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise TimeoutError(
                        f"{folder} has been read by other loads for {patience_s:.0f} s: the save waited for them to "
                        "finish and gave up; nothing was replaced."
                    ) from None
                time.sleep(0.005)
        yield
    finally:
        os.close(fd)


def _listdir(folder: str) -> list[str]:
    import os

    try:
        return os.listdir(folder or ".")
    except OSError:
        return []
