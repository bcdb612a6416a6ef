"""Data loading, tokenisation and batch collation for Scale-VAE text models.

The pipeline is built on ``datasets`` so that tokenised corpora are cached on disk:

1. :func:`load_text_dataset` gives a ``DatasetDict`` with one ``"text"`` column (local
   one-sentence-per-line files, a Hub dataset, or the embedded default corpus);
2. :func:`tokenize_dataset` adds encoder inputs and teacher-forcing decoder inputs/labels;
3. :class:`DataCollatorForLatentLM` pads each batch dynamically.
"""

from __future__ import annotations

import codecs
import logging
import os
import unicodedata
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import datasets
import torch
from torch.utils.data import DataLoader

from modeling_scalevae import shift_labels_right
from scalevae.corpus import default_corpus_files
from scalevae.factory import (
    MAX_RUN_CHARS,
    choose_decoder_tokenizer,
    decoder_special_token_ids,
    load_tokenizers,
    new_encoder,
    offline_encoder_path,
    reading_text_as_text,
    split_long_runs,
)

logger = logging.getLogger(__name__)

TEXT_COLUMN = "text"
LABEL_PAD_ID = -100  # ignored by torch.nn.CrossEntropyLoss
_CHECK_CHUNK_BYTES = 1 << 20

__all__ = [
    "DataCollatorForLatentLM",
    "check_text_file",
    "decoder_special_token_ids",
    "load_text_dataset",
    "tokenize_dataset",
]


# --------------------------------------------------------------------------- loading


def check_text_file(path: str | Path) -> None:
    """Raise ``ValueError`` unless ``path`` is a regular UTF-8 text file with a non-blank line; warn (naming the line) if it
    holds NUL bytes, which `load_text_dataset` reads as spaces.

    ``datasets`` would otherwise fail deep inside a worker with an error that does not
    name the file, or silently build an empty split.
    """
    path = Path(path)
    if not path.exists():
        raise ValueError(f"text file not found: {path}")
    if not path.is_file():  # a FIFO or a device would block or never end; a folder is no text
        raise ValueError(f"{path} is not a regular file (a folder, FIFO, socket or device): give a text file.")
    decoder = codecs.getincrementaldecoder("utf-8")()
    offset = 0
    lines = 0
    has_text = False
    nul_seen = False
    with open(path, "rb") as handle:
        while True:
            chunk = handle.read(_CHECK_CHUNK_BYTES)
            final = not chunk
            if not nul_seen and b"\x00" in chunk:
                nul_seen = True
                line = lines + chunk.count(b"\n", 0, chunk.index(b"\x00")) + 1
                logger.warning(
                    "%s holds NUL bytes (first on line %d): each is read as a space, so the words around it stay "
                    "apart. Is it a text file?",
                    path,
                    line,
                )
            lines += chunk.count(b"\n")
            try:
                text = decoder.decode(chunk, final=final)
            except UnicodeDecodeError as error:
                # error.start counts from the decoder's buffer: the undecoded tail of the
                # previous chunk (still held, as the failed call did not consume it) plus this one.
                position = offset - len(decoder.getstate()[0]) + error.start
                raise ValueError(
                    f"{path} is not valid UTF-8: byte 0x{error.object[error.start]:02x} at byte offset {position}"
                ) from None
            has_text = has_text or has_visible_text(text)
            if final:
                break
            offset += len(chunk)
    if not has_text:
        raise ValueError(f"{path} has no non-empty lines")


def has_visible_text(text: str) -> bool:
    """Whether `text` holds a character that is neither white space nor a format character (category Cf: zero-width
    spaces and joiners, U+2060, the byte-order mark): a line of only those is empty to a reader, and a sentence of
    nothing to a model."""
    if text.isprintable():  # the usual case, at C speed: no format character at all
        return bool(text.strip())
    return any(not char.isspace() and unicodedata.category(char) != "Cf" for char in text)


def clean_line(text: str | None) -> tuple[str, bool]:
    """A line as the pipeline keeps it, and whether a long run without spaces was cut: without the UTF-8 byte-order
    mark an editor put before it, NUL bytes read as spaces (tokenizers would drop them and merge the words around
    them; `check_text_file` warns), stripped, and every run of more than `MAX_RUN_CHARS` characters without a space cut
    into pieces (`split_long_runs`), which bounds each tokenizer's work on the line. Empty if nothing visible is left."""
    text = "" if text is None else str(text).lstrip("\ufeff").replace("\x00", " ").strip()
    if not has_visible_text(text):
        return "", False
    return split_long_runs(text)


def _normalise_data_files(data_files: Mapping[str, str | Path] | str | Path) -> dict[str, str]:
    if isinstance(data_files, (str, Path)):
        return {"train": str(data_files)}
    if not isinstance(data_files, Mapping) or not data_files:
        raise ValueError(f"data_files must be a path or a non-empty {{split: path}} mapping, got {data_files!r}")
    return {str(split): str(path) for split, path in data_files.items()}


def _clean_batch(batch: dict[str, list]) -> dict[str, list]:
    cleaned = [clean_line(text) for text in batch[TEXT_COLUMN]]
    return {TEXT_COLUMN: [text for text, _ in cleaned], "_split": [split for _, split in cleaned]}


def _strip_and_drop_empty(dataset: datasets.DatasetDict, num_proc: int | None) -> datasets.DatasetDict:
    # PTB-style files pad every line with a leading and trailing space; Hub datasets may hold None.
    stripped = dataset.map(_clean_batch, batched=True, num_proc=num_proc, desc="Stripping lines")
    for split in stripped:
        cut = list(stripped[split]["_split"])
        if any(cut):
            logger.warning(
                "%s: %d line(s) (the first: line %d) hold a run of more than %d characters without a space; each such "
                "run was cut into pieces of %d characters, which bounds the tokenizers' work on it.",
                split,
                sum(cut),
                cut.index(True) + 1,
                MAX_RUN_CHARS,
                MAX_RUN_CHARS,
            )
    stripped = stripped.remove_columns("_split")
    kept = stripped.filter(
        lambda batch: [bool(text) for text in batch[TEXT_COLUMN]],
        batched=True,
        num_proc=num_proc,
        desc="Dropping empty lines",
    )
    for split in kept:
        dropped = stripped[split].num_rows - kept[split].num_rows
        if dropped:
            logger.info("%s: dropped %d empty lines of %d", split, dropped, stripped[split].num_rows)
        if kept[split].num_rows == 0:
            raise ValueError(f"split {split!r} has no non-empty texts")
    return kept


def load_text_dataset(
    data_files: Mapping[str, str | Path] | str | Path | None = None,
    dataset_name: str | None = None,
    text_column: str = TEXT_COLUMN,
    *,
    dataset_config: str | None = None,
    cache_dir: str | None = None,
    num_proc: int | None = None,
    **load_kwargs: Any,
) -> datasets.DatasetDict:
    """Load a text corpus as a ``DatasetDict`` whose only column is ``"text"``.

    Args:
        data_files: local text files, one sentence or document per line: a single path
            (becomes the ``"train"`` split) or ``{split: path}``.
        dataset_name: a dataset on the Hugging Face Hub (or a local dataset script/folder)
            for ``datasets.load_dataset``; used when ``data_files`` is None.
        text_column: column holding the text in a named dataset; renamed to ``"text"``
            (local text files always give ``"text"``, so it is ignored for them).
        dataset_config: configuration name of the Hub dataset.
        cache_dir: ``datasets`` cache folder.
        num_proc: processes for the stripping/filtering passes.
        **load_kwargs: passed on to ``datasets.load_dataset``.

    With neither ``data_files`` nor ``dataset_name``, the embedded default corpus
    (``scalevae/corpus``, sentences from the Python standard library) is loaded.
    Lines are cleaned (`clean_line`: byte-order mark and NUL bytes, surrounding space, runs of more than
    `MAX_RUN_CHARS` characters without a space cut, with a warning) and lines with nothing visible dropped.

    Raises:
        ValueError: both sources given; a local file is missing, is not valid UTF-8 or
            has no non-empty lines; ``text_column`` is not in the dataset.
    """
    if data_files is not None and dataset_name is not None:
        raise ValueError("pass either data_files or dataset_name, not both")
    if data_files is None and dataset_name is None:
        data_files = default_corpus_files()

    if data_files is not None:
        files = _normalise_data_files(data_files)
        for path in files.values():
            check_text_file(path)
        dataset = datasets.load_dataset("text", data_files=files, cache_dir=cache_dir, **load_kwargs)
        text_column = TEXT_COLUMN
    else:
        dataset = datasets.load_dataset(dataset_name, dataset_config, cache_dir=cache_dir, **load_kwargs)

    if isinstance(dataset, datasets.Dataset):
        dataset = datasets.DatasetDict({"train": dataset})
    for split, split_dataset in dataset.items():
        if text_column not in split_dataset.column_names:
            raise ValueError(
                f"column {text_column!r} not found in split {split!r}; columns are {split_dataset.column_names}"
            )
    # Keep only the text so that tokenize_dataset's output has a fixed schema.
    dataset = dataset.select_columns([text_column])
    if text_column != TEXT_COLUMN:
        dataset = dataset.rename_column(text_column, TEXT_COLUMN)
    return _strip_and_drop_empty(dataset, num_proc)


# ------------------------------------------------------------------------ tokenising


def _encoder_truncated(encoder_tokenizer: Any, texts: list[str], ids: list[list[int]], max_length: int) -> list[bool]:
    # Only a sequence that fills max_length can have been cut; re-tokenise just those.
    full = [i for i, row in enumerate(ids) if len(row) >= max_length]
    flags = [False] * len(texts)
    if full:
        untruncated = encoder_tokenizer([texts[i] for i in full], truncation=False)["input_ids"]
        for i, row in zip(full, untruncated):
            flags[i] = len(row) > max_length
    return flags


def tokenize_texts(
    texts: list[str], encoder_tokenizer: Any, decoder_tokenizer: Any, max_length: int
) -> dict[str, list]:
    """One batch of texts as `tokenize_dataset` stores them (see there), with per-text truncation flags in
    `_encoder_truncated` / `_decoder_truncated`."""
    _, eos_id = decoder_special_token_ids(decoder_tokenizer)
    max_decoder_tokens = max_length - 1
    encoded = encoder_tokenizer(texts, truncation=True, max_length=max_length, return_token_type_ids=False)
    encoder_cut = _encoder_truncated(encoder_tokenizer, texts, encoded["input_ids"], max_length)
    raw = decoder_tokenizer(texts, add_special_tokens=False)["input_ids"]
    decoder_cut = [len(ids) > max_decoder_tokens for ids in raw]
    raw = [ids[:max_decoder_tokens] for ids in raw]
    return {
        "input_ids": encoded["input_ids"],
        "attention_mask": encoded["attention_mask"],
        "labels": [[*ids, eos_id] for ids in raw],
        # Counted after map, so that the numbers survive caching and num_proc.
        "_encoder_truncated": encoder_cut,
        "_decoder_truncated": decoder_cut,
    }


def tokenize_dataset(
    dataset: datasets.DatasetDict | datasets.Dataset,
    encoder_tokenizer: Any,
    decoder_tokenizer: Any,
    max_length: int = 64,
    num_proc: int | None = None,
) -> tuple[datasets.DatasetDict | datasets.Dataset, dict[str, dict[str, int]]]:
    """Tokenise the ``"text"`` column for the encoder and for teacher-forced decoding.

    Encoder: ``input_ids``/``attention_mask`` with the encoder's special tokens, truncated
    to ``max_length``. Decoder: the text's tokens without special tokens, cut to
    ``max_length - 1``, as ``labels = ids + [eos]`` (at most ``max_length`` long); the
    collator makes the decoder's inputs ``[bos] + ids`` from them. BOS/EOS come from
    ``decoder_tokenizer``.

    Returns:
        The tokenised dataset (text column removed; same type as the input) and per-split
        statistics ``{"texts", "truncated", "encoder_truncated", "decoder_truncated"}``.
        Truncation counts are also logged.
    """
    if max_length < 2:
        raise ValueError(f"max_length must be at least 2 (BOS/EOS plus one token), got {max_length}")

    def tokenize(batch: dict[str, list[str]]) -> dict[str, list]:
        return tokenize_texts(batch[TEXT_COLUMN], encoder_tokenizer, decoder_tokenizer, max_length)

    single = isinstance(dataset, datasets.Dataset)
    dataset_dict = datasets.DatasetDict({"train": dataset}) if single else dataset
    for split, split_dataset in dataset_dict.items():
        if TEXT_COLUMN not in split_dataset.column_names:
            raise ValueError(
                f"split {split!r} has no {TEXT_COLUMN!r} column; columns are {split_dataset.column_names}"
            )

    tokenized = dataset_dict.map(
        tokenize,
        batched=True,
        num_proc=num_proc,
        remove_columns=[TEXT_COLUMN],
        desc="Tokenizing",
    )
    stats: dict[str, dict[str, int]] = {}
    for split, split_dataset in tokenized.items():
        encoder_cut = split_dataset["_encoder_truncated"]
        decoder_cut = split_dataset["_decoder_truncated"]
        either = sum(e or d for e, d in zip(encoder_cut, decoder_cut))
        stats[split] = {
            "texts": split_dataset.num_rows,
            "truncated": either,
            "encoder_truncated": sum(encoder_cut),
            "decoder_truncated": sum(decoder_cut),
        }
        logger.info(
            "%s: truncated %d of %d texts to max_length=%d (encoder %d, decoder %d)",
            split,
            either,
            split_dataset.num_rows,
            max_length,
            stats[split]["encoder_truncated"],
            stats[split]["decoder_truncated"],
        )
    tokenized = tokenized.remove_columns(["_encoder_truncated", "_decoder_truncated"])
    return (tokenized["train"] if single else tokenized), stats


# ------------------------------------------------------------------------- collation


@dataclass
class DataCollatorForLatentLM:
    """Pad a list of :func:`tokenize_dataset` examples into a batch of tensors.

    The encoder side is padded by ``encoder_tokenizer.pad`` (its own pad id: 0 for BERT,
    1 for RoBERTa). ``labels`` are right-padded with -100 so padding is not scored, and the
    decoder's inputs are made from them by ``shift_labels_right`` (the model's own rule): its
    BOS, then the labels shifted right, padding with its ``pad_token_id`` (``eos_token_id``
    if it has none). ``pad_to_multiple_of`` rounds both lengths up (tensor-core friendly).
    """

    encoder_tokenizer: Any
    decoder_tokenizer: Any
    pad_to_multiple_of: int | None = None

    def _decoder_pad_id(self) -> int:
        pad_id = self.decoder_tokenizer.pad_token_id
        if pad_id is None:
            pad_id = self.decoder_tokenizer.eos_token_id
        if pad_id is None:
            raise ValueError("decoder tokenizer has neither pad_token nor eos_token to pad with")
        return int(pad_id)

    def _padded_length(self, length: int) -> int:
        multiple = self.pad_to_multiple_of
        if multiple:
            return -(-length // multiple) * multiple
        return length

    def __call__(self, features: Sequence[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
        if not features:
            raise ValueError("DataCollatorForLatentLM received an empty batch")
        encoder_features = []
        for feature in features:
            input_ids = list(feature["input_ids"])
            mask = feature.get("attention_mask")
            encoder_features.append(
                {"input_ids": input_ids, "attention_mask": [1] * len(input_ids) if mask is None else list(mask)}
            )
        encoder_batch = self.encoder_tokenizer.pad(
            encoder_features, padding=True, pad_to_multiple_of=self.pad_to_multiple_of, return_tensors="pt"
        )

        labels = [list(f["labels"]) for f in features]
        length = self._padded_length(max(len(targets) for targets in labels))
        label_tensor = torch.full((len(features), length), LABEL_PAD_ID, dtype=torch.long)
        for row, targets in enumerate(labels):
            label_tensor[row, : len(targets)] = torch.tensor(targets, dtype=torch.long)
        bos_id, _ = decoder_special_token_ids(self.decoder_tokenizer)
        decoder_input_ids, decoder_attention_mask = shift_labels_right(label_tensor, bos_id, self._decoder_pad_id())

        return {
            "input_ids": encoder_batch["input_ids"],
            "attention_mask": encoder_batch["attention_mask"],
            "decoder_input_ids": decoder_input_ids,
            "decoder_attention_mask": decoder_attention_mask,
            "labels": label_tensor,
        }


# ------------------------------------------------------------------------- a run's data


@dataclass
class RunData:
    """What every run on the same data shares: the tokenizers, the tokenised splits, the raw texts and labels."""

    encoder_tokenizer: object
    decoder_tokenizer: object
    dataset: datasets.DatasetDict  # tokenised: train, and validation / test when present
    texts: dict[str, list[str]]
    labels: dict[str, list[str]]  # split -> one class per sentence, for labelled data
    encoder: str | None  # the encoder every new model starts from (a path or Hub id; None: the offline MiniLM)
    truncation: dict = field(default_factory=dict)

    @property
    def collator(self) -> DataCollatorForLatentLM:
        return DataCollatorForLatentLM(self.encoder_tokenizer, self.decoder_tokenizer)

    def loader(self, split: str, batch_size: int = 32) -> DataLoader:
        return DataLoader(self.dataset[split], batch_size=batch_size, collate_fn=self.collator)


def texts_fingerprint(texts) -> str:
    """A SHA-256 of the training texts as the run reads them (file, dataset or embedded corpus alike)."""
    import hashlib

    digest = hashlib.sha256()
    for text in texts:
        digest.update(text.encode("utf-8", "surrogatepass") + b"\n")
    return digest.hexdigest()


def read_labelled(text_file: str | Path, label_file: str | Path) -> tuple[list[str], list[str]]:
    """The texts of `text_file` and their classes, one per line of the parallel `label_file`: the one reader of
    labelled files, for training, evaluation, comparisons, `edit` and `generate --label` alike.

    Both files are checked as text files (`check_text_file`: regular, UTF-8, not empty). Their lines are read as
    `load_text_dataset` reads text (`clean_line`: the byte-order mark stripped, in the label file too, NUL bytes as
    spaces, surrounding space stripped), and a line with no visible text is not a text: it is dropped with its class,
    as `load_text_dataset` drops it, so texts and classes stay aligned. A text whose class line is blank is refused,
    naming the line."""
    check_text_file(text_file)
    check_text_file(label_file)
    lines = Path(text_file).read_text(encoding="utf-8").splitlines()
    classes = Path(label_file).read_text(encoding="utf-8").splitlines()
    if len(lines) != len(classes):
        raise ValueError(
            f"{text_file} has {len(lines)} lines but {label_file} has {len(classes)}: one class per line."
        )
    texts, labels = [], []
    for number, (line, label) in enumerate(zip(lines, classes), 1):
        text, _ = clean_line(line)
        if not text:
            continue
        label, _ = clean_line(label)
        if not label:
            raise ValueError(f"{label_file} line {number} is blank: every text of {text_file} needs its class.")
        texts.append(text)
        labels.append(label)
    return texts, labels


def read_texts(path: str | Path) -> list[str]:
    """The texts of a text file, one per line, read as `load_text_dataset` reads them (`check_text_file`, then
    `clean_line`; lines with nothing visible dropped), without building a dataset."""
    check_text_file(path)
    lines = (clean_line(line)[0] for line in Path(path).read_text(encoding="utf-8").splitlines())
    return [text for text in lines if text]


def same_file(a: str | Path, b: str | Path) -> bool:
    """Whether two paths name one file (links and other spellings resolved)."""
    try:
        return os.path.samefile(a, b)
    except OSError:
        return str(a) == str(b)


def labelled_dataset(files: dict[str, str], suffix: str) -> datasets.DatasetDict:
    """Each split's `read_labelled` texts and classes (the class file: the text file with the suffix `suffix`), as
    `text` and `label` columns."""
    splits = {}
    for split, path in files.items():
        texts, labels = read_labelled(path, Path(path).with_suffix(f".{suffix}"))
        splits[split] = datasets.Dataset.from_dict({"text": texts, "label": labels})
    return datasets.DatasetDict(splits)


def load_raw(spec) -> datasets.DatasetDict:
    """The text splits a spec names (with a `label` column for labelled data), cut to its subsets."""
    data = spec.data
    files = {
        split: path
        for split, path in (("train", data.train_file), ("validation", data.validation_file), ("test", data.test_file))
        if path
    }
    if files and "train" not in files:
        raise ValueError("--validation_file/--test_file need a --train_file.")
    # The training file also validating, with --eval_sentences: its last eval_sentences lines are held out.
    validates_on_training = "validation" in files and same_file(files["validation"], files["train"])
    held_out = validates_on_training and data.eval_sentences is not None
    if validates_on_training and not held_out:
        logger.warning(
            "--validation_file %s is the training file: the validation figures measure sentences the model trained "
            "on. Give another file, or --eval_sentences N to hold out its last N lines.",
            files["validation"],
        )
    if held_out:
        del files["validation"]
    if data.label_suffix and not files:
        raise ValueError("--label_suffix needs --train_file (the labelled text files).")
    if files:
        # Labels stay aligned with their lines: no line of a labelled file is dropped or reordered here.
        raw = load_text_dataset(files) if not data.label_suffix else labelled_dataset(files, data.label_suffix)
    else:
        raw = load_text_dataset(dataset_name=data.dataset_name, text_column=data.text_column)
    if held_out:
        train = raw["train"]
        raw["train"] = train.select(range(len(train) - data.eval_sentences))
        raw["validation"] = train.select(range(len(train) - data.eval_sentences, len(train)))
    if data.train_sentences is not None:
        raw["train"] = raw["train"].select(range(min(data.train_sentences, len(raw["train"]))))
    if data.eval_sentences is not None:
        for split in ("validation", "test"):
            if split in raw:
                raw[split] = raw[split].select(range(min(data.eval_sentences, len(raw[split]))))
    return raw


def prepare_data(spec) -> RunData:
    """Load the texts, make the two tokenizers (a saved model's own; else the encoder's and a BPE fitted to the
    training text) and tokenise every split."""
    from transformers import AutoTokenizer

    raw = load_raw(spec)
    encoder = spec.model.encoder
    resume = spec.training.resume_from_checkpoint  # checked complete by the recipe (`check_checkpoint_complete`)
    if spec.model.model_name_or_path or resume:  # a resume trains on its checkpoint's token ids, never refitted ones
        encoder_tokenizer, decoder_tokenizer = load_tokenizers(resume or spec.model.model_name_or_path)
        if resume and spec.model.new_encoder_layers and not encoder:
            encoder = new_encoder(
                encoder_tokenizer,
                spec.output_dir / "encoder",
                spec.model.new_encoder_layers,
                spec.model.new_encoder_width,
                spec.model.new_encoder_heads,
                spec.data.max_length,
            )
    else:
        decoder_tokenizer = choose_decoder_tokenizer(
            encoder, spec.model.decoder, train_texts=raw["train"]["text"], vocab_size=spec.model.decoder_vocab_size
        )
        if spec.model.new_encoder_layers and not encoder:
            model = spec.model
            encoder = new_encoder(
                decoder_tokenizer,
                spec.output_dir / "encoder",
                model.new_encoder_layers,
                model.new_encoder_width,
                model.new_encoder_heads,
                spec.data.max_length,
            )
        encoder_tokenizer = reading_text_as_text(
            AutoTokenizer.from_pretrained(encoder or offline_encoder_path(), trust_remote_code=False)
        )
    return text_data(raw, encoder_tokenizer, decoder_tokenizer, spec.data.max_length, encoder)


def text_data(
    raw: datasets.DatasetDict, encoder_tokenizer, decoder_tokenizer, max_length: int, encoder: str | None = None
) -> RunData:
    """The `RunData` of text splits (a `label` column: labelled data), tokenised with the two tokenizers."""
    texts = {split: list(raw[split]["text"]) for split in raw}
    labels = {split: list(raw[split]["label"]) for split in raw if "label" in raw[split].column_names}
    dataset, truncation = tokenize_dataset(
        raw.select_columns(["text"]), encoder_tokenizer, decoder_tokenizer, max_length
    )
    return RunData(encoder_tokenizer, decoder_tokenizer, dataset, texts, labels, encoder, truncation)
