"""One run recipe behind every command: a `RunSpec` and `run(spec)`.

    prepare_data -> build_or_load -> train (-> fit the prior) -> evaluate -> save

`scalevae train`, `scalevae quickstart`, `scalevae compare`, the examples and the benchmark all go through it; they
differ in their presets (`RunSpec` defaults) and in what they print. A spec is four dataclasses, parsed from a command
line by transformers' `HfArgumentParser` (`RunSpec.parse`), plus the model's config fields:

- `config`: `ScaleVAEConfig` fields (`collapse_strategy`, `scale_target_std` alias `des_std`, `kl_weight`, `prior`...),
  generated from the config class itself, so every field is an option under its own name;
- `model`: where the model comes from (a saved folder to fine-tune, or an encoder and a new decoder) and the KL schedule;
- `data`: the text files, their labels, lengths and subsets;
- `run`: the wall-clock budget and the evaluation;
- `training`: the stock `TrainingArguments`.

An option's route is visible: `--des_std 1.5` -> `spec.config["scale_target_std"]` -> `ScaleVAEConfig` -> the model.
"""

import contextlib
import dataclasses
import time
from dataclasses import dataclass, field
from pathlib import Path

import datasets
import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm
from transformers import (
    HfArgumentParser,
    PrinterCallback,
    ProgressCallback,
    TrainerCallback,
    TrainingArguments,
    enable_full_determinism,
    set_seed,
)
from transformers.utils import logging as hf_logging

from configuration_scalevae import PAPER_ALIASES, PRIORS, ScaleVAEConfig

from .corpus import CORPUS_NAME
from .data import DataCollatorForLatentLM, load_text_dataset, tokenize_dataset
from .training import (
    KL_SCHEDULES,
    KLSchedule,
    check_checkpoint_complete,
    check_resume_data,
    fit_prior_families,
    make_trainer,
    prior_fit_batches,
    texts_fingerprint,
)

# ---------------------------------------------------------------------------------------------------------------------
# The spec
# ---------------------------------------------------------------------------------------------------------------------


@dataclass
class ModelArguments:
    """Where the model comes from, and the KL schedule it trains with (its hyperparameters are the config's)."""

    model_name_or_path: str | None = field(
        default=None,
        metadata={
            "help": "fine-tune a saved Scale-VAE (a folder or Hub id written by scalevae) instead of building a new "
            "model: its config, weights, both tokenizers and its scale-factor, schedule and prior buffers carry on. "
            "Config options given override the saved config where the weights can follow (kl_weight, "
            "scale_target_std, free_bits, ...); options that change the architecture are refused."
        },
    )
    encoder: str | None = field(
        default=None, metadata={"help": "BERT-style encoder path or Hub id (default: the offline MiniLM-L6)."}
    )
    decoder: str | None = field(default=None, metadata={"help": "GPT-2 path or Hub id (default: a new small GPT-2)."})
    decoder_layers: int = field(default=4, metadata={"help": "layers of the new GPT-2 when --decoder is not given"})
    decoder_width: int = field(default=256, metadata={"help": "width of the new GPT-2"})
    decoder_heads: int = field(default=4, metadata={"help": "attention heads of the new GPT-2"})
    decoder_vocab_size: int = field(
        default=4096, metadata={"help": "byte-level BPE vocabulary fitted to the training text for a new decoder"}
    )
    new_encoder_layers: int | None = field(
        default=None,
        metadata={
            "help": "instead of a pretrained encoder, a new BERT of this many layers on the decoder's fitted "
            "tokenizer, trained from scratch (the CPU comparisons: MiniLM's forward alone outweighs a small model's "
            "step)"
        },
    )
    new_encoder_width: int = 128
    new_encoder_heads: int = 4
    kl_schedule: str = field(
        default="constant", metadata={"help": f"{' | '.join(KL_SCHEDULES)}: β rises to --kl_weight"}
    )
    kl_warmup_steps: int | None = field(default=None, metadata={"help": "steps of the linear schedule's rise"})
    kl_n_cycle: int = 4
    kl_ratio_zero: float = 0.25
    kl_ratio_increase: float = 0.25

    # Options that describe how a new model is built: meaningless when a saved one is fine-tuned.
    new_model_options = (
        "encoder",
        "decoder",
        "decoder_layers",
        "decoder_width",
        "decoder_heads",
        "decoder_vocab_size",
        "new_encoder_layers",
        "new_encoder_width",
        "new_encoder_heads",
    )


@dataclass
class DataArguments:
    train_file: str | None = field(
        default=None, metadata={"help": "one text per line (default: the embedded corpus and its splits)"}
    )
    validation_file: str | None = field(
        default=None,
        metadata={
            "help": "one text per line; the same file as --train_file with --eval_sentences: its last eval_sentences "
            "lines validate and the rest train"
        },
    )
    test_file: str | None = None
    label_suffix: str | None = field(
        default=None,
        metadata={
            "help": "labelled data: FILE with this suffix instead of its own (e.g. label: x.txt -> x.label) "
            "holds one class per line, for the representation and control measurements"
        },
    )
    dataset_name: str | None = field(default=None, metadata={"help": "a Hub dataset instead of files"})
    text_column: str = "text"
    max_length: int = field(default=64, metadata={"help": "tokens per sentence, for the encoder and the decoder"})
    train_sentences: int | None = field(default=None, metadata={"help": "train on the first N sentences only"})
    eval_sentences: int | None = field(
        default=None, metadata={"help": "evaluate on the first N validation and test sentences only"}
    )


@dataclass
class RunArguments:
    """The run's budget and its evaluation."""

    train_minutes: float | None = field(
        default=None,
        metadata={
            "help": "wall-clock training budget: training stops at the last logging step that fits (a run that "
            "trained N steps is reproduced by --max_steps N)"
        },
    )
    eval_splits: list[str] = field(
        default_factory=lambda: ["test"], metadata={"help": "splits evaluated after training, when present"}
    )
    num_importance_samples: int = field(default=50, metadata={"help": "k of the importance-weighted NLL"})
    priors: list[str] = field(
        default_factory=lambda: ["fitted"],
        metadata={
            "help": "generative priors the density is reported under: fitted, scaled, and full or mixture (refitted "
            "on the training sentences for the scoring when the model holds another family)",
            "choices": PRIORS,
        },
    )
    bleu_sentences: int = field(default=200, metadata={"help": "sentences whose greedy reconstruction BLEU scores"})
    prior_fit_sentences: int = field(
        default=4000, metadata={"help": "training sentences the prior (and BN-VAE's statistics) are fitted on"}
    )
    claims: bool = field(
        default=False,
        metadata={
            "help": "also measure the paper's other claims on the test split (scalevae.claims): the few-label probe "
            "(labelled data), latent consistency (prior and data cycles) and generation (forward PPL under a "
            "reference LM, distinct-n, self-BLEU, lengths)"
        },
    )
    claims_prior_samples: int = field(default=1000, metadata={"help": "prior samples of the generation figures"})
    reverse_lm_steps: int = field(
        default=0, metadata={"help": "steps of the reverse-perplexity LM trained on the samples (0: not measured)"}
    )
    control: bool = field(
        default=False,
        metadata={
            "help": "labelled data: also measure control on the test split (scalevae.control): flip each sentence's "
            "class through the latent, scored by a text classifier trained on the training split (transfer "
            "accuracy, BLEU to the source, perplexity under the reference LM, per strength)"
        },
    )
    control_sentences: int = field(default=200, metadata={"help": "test sentences edited by the control measurement"})
    save: bool = field(default=True, metadata={"help": "save the trained model to OUTPUT_DIR/final"})


@dataclass
class RunSpec:
    """Everything one run needs. `config` holds `ScaleVAEConfig` fields (only those given, when fine-tuning)."""

    training: TrainingArguments
    config: dict = field(default_factory=dict)
    model: ModelArguments = field(default_factory=ModelArguments)
    data: DataArguments = field(default_factory=DataArguments)
    run: RunArguments = field(default_factory=RunArguments)

    @property
    def output_dir(self) -> Path:
        return Path(self.training.output_dir)

    def replace(self, config: dict | None = None, **sections) -> "RunSpec":
        """A copy with some config fields and some sections' fields changed: `spec.replace({"kl_weight": 0.5},
        training=dict(seed=1))`."""
        changed = {name: dataclasses.replace(getattr(self, name), **values) for name, values in sections.items()}
        return dataclasses.replace(self, config={**self.config, **(config or {})}, **changed)

    @classmethod
    def parser(cls, defaults: dict | None = None, extra: tuple = (), **parser_kwargs) -> HfArgumentParser:
        """An `HfArgumentParser` over the config's fields, the four sections and a command's `extra` dataclasses;
        `defaults` (option -> value) are a command's preset."""
        sections = (config_arguments(), ModelArguments, DataArguments, RunArguments, TrainingArguments, *extra)
        parser = HfArgumentParser(sections, **parser_kwargs)
        if defaults:
            parser.set_defaults(**defaults)
        return parser

    @classmethod
    def parse(
        cls, argv: list[str], defaults: dict | None = None, extra: tuple = (), command: str = "train", **parser_kwargs
    ) -> tuple["RunSpec", set[str], tuple]:
        """The spec a command line gives, the options it gave explicitly (a fine-tuned model keeps its saved config
        values but for those), and the command's `extra` dataclasses, parsed. Every numeric option given is checked
        against its range (`scalevae.options.COMMAND_OPTIONS[command]`): 0 or a negative number never means "the
        default"; an option that does nothing in the chosen mode warns once."""
        from .options import COMMAND_OPTIONS, check_output_folder, merged_options, validate_options

        parser = cls.parser(defaults, extra, **parser_kwargs)
        config_args, model, data, run, training, *extras = parser.parse_args_into_dataclasses(argv)
        given = explicit_options(parser, argv)
        validate_options(
            merged_options(model, data, run, training, *extras), given, command, specs=COMMAND_OPTIONS[command]
        )
        check_output_folder(training.output_dir, model.model_name_or_path)
        config = config_kwargs_from(config_args)
        if model.model_name_or_path:
            rebuilt = [name for name in ModelArguments.new_model_options if name in given]
            if rebuilt:
                raise ValueError(
                    f"--model_name_or_path {model.model_name_or_path} fine-tunes a saved model with its own encoder, "
                    f"decoder and tokenizers: {', '.join('--' + name for name in rebuilt)} only build(s) a new model. "
                    "Drop the option(s)."
                )
            config = {name: value for name, value in config.items() if name in given}
        return cls(training=training, config=config, model=model, data=data, run=run), given, tuple(extras)


# What the project's own runs share (the quickstart and the comparison presets): a small model on a BPE fitted to the
# training text, batch 32, AdamW without weight decay at a constant 5e-4 after a warm-up.
SMALL_RUN_DEFAULTS = dict(
    per_device_train_batch_size=32,
    learning_rate=5e-4,
    lr_scheduler_type="constant_with_warmup",
    weight_decay=0.0,
    max_length=32,
    latent_size=32,
    decoder_vocab_size=4096,
)


# Config fields that are not hyperparameters a user sets on the command line.
_NOT_OPTIONS = ("encoder", "decoder", "scalevae_format_version", "scalevae_version")


def config_arguments(config_class=None) -> type:
    """A dataclass with one field per `ScaleVAEConfig` field: the config's name, type, default and the help text of
    its docstring, and its paper aliases (`--des_std`, `--f_epo`). A field added to the config becomes an option of
    every command without touching this file."""
    import inspect
    import re

    config_class = config_class or ScaleVAEConfig
    # Google style, as transformers: "    name (`type`, ...):" then its text indented further (after cleandoc).
    doc = "\n".join(
        inspect.cleandoc(base.__doc__)
        for base in config_class.__mro__
        if isinstance(base, type) and issubclass(base, ScaleVAEConfig) and base.__doc__
    )
    aliases = {field_name: alias for alias, field_name in PAPER_ALIASES.items()}
    # ScaleVAEConfig's own fields and those of its subclasses, not PreTrainedConfig's (return_dict, dtype, ...).
    own = set().union(
        *(
            vars(base).get("__annotations__", {})
            for base in config_class.__mro__
            if isinstance(base, type) and issubclass(base, ScaleVAEConfig)
        )
    )
    specs = []
    for item in dataclasses.fields(config_class):
        if item.name not in own or item.name in _NOT_OPTIONS:
            continue
        match = re.search(rf"^ {{4}}{item.name} \(.*?\):\n(.*?)(?=^ {{4}}\w+ \(|\Z)", doc, re.S | re.M)
        metadata = {"help": (" ".join(match.group(1).split()) if match else "").replace("%", "%%")}
        if item.name in aliases:
            metadata["aliases"] = [f"--{aliases[item.name]}"]
        kind, default = item.type, item.default
        if kind == (bool | int):  # freeze_encoder: True, False or a number of layers
            kind, default = str, str(item.default)
        specs.append((item.name, kind, dataclasses.field(default=default, metadata=metadata)))
    return dataclasses.make_dataclass("ScaleVAEConfigArguments", specs)


def config_kwargs_from(arguments) -> dict:
    """The parsed config options as `ScaleVAEConfig` keyword arguments."""
    kwargs = dataclasses.asdict(arguments)
    if isinstance(kwargs.get("freeze_encoder"), str):
        value = kwargs["freeze_encoder"]
        parsed = {"true": True, "false": False, "all": True, "none": False}.get(value.lower())
        if parsed is None and not value.isdigit():
            raise ValueError(f"--freeze_encoder {value!r}: give true, false or a number of lower encoder layers.")
        kwargs["freeze_encoder"] = parsed if parsed is not None else int(value)
    return kwargs


def explicit_options(parser, argv: list[str]) -> set[str]:
    """The destinations of the options `argv` actually gives (also under an alias or a `--no_*` form), as opposed to
    those holding their defaults: a default must not overwrite a value saved in a folder."""
    import argparse

    defaults = [(action, action.default) for action in parser._actions]
    saved_defaults = dict(parser._defaults)
    try:
        for action, _ in defaults:
            action.default = argparse.SUPPRESS
        parser._defaults.clear()
        given, _ = parser.parse_known_args(argv)
    finally:
        for action, default in defaults:
            action.default = default
        parser._defaults.update(saved_defaults)
    return set(vars(given))


# ---------------------------------------------------------------------------------------------------------------------
# The data
# ---------------------------------------------------------------------------------------------------------------------


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


def _labels_for(path: str, suffix: str) -> Path:
    return Path(path).with_suffix(f".{suffix}")


def load_raw(spec: RunSpec) -> datasets.DatasetDict:
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
    held_out = bool(files) and files.get("validation") == files["train"] and data.eval_sentences is not None
    if held_out:
        del files["validation"]
    if data.label_suffix and not files:
        raise ValueError("--label_suffix needs --train_file (the labelled text files).")
    if files:
        # Labels stay aligned with their lines: no line of a labelled file is dropped or reordered here.
        raw = load_text_dataset(files) if not data.label_suffix else _labelled_dataset(files, data.label_suffix)
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


def _labelled_dataset(files: dict[str, str], suffix: str) -> datasets.DatasetDict:
    from .data import check_text_file

    splits = {}
    for split, path in files.items():
        label_path = _labels_for(path, suffix)
        check_text_file(path)
        check_text_file(label_path)
        lines = Path(path).read_text(encoding="utf-8").splitlines()
        classes = Path(label_path).read_text(encoding="utf-8").splitlines()
        if len(lines) != len(classes):
            raise ValueError(f"{label_path} has {len(classes)} lines but {path} has {len(lines)}: one class per line.")
        pairs = [(t.strip(), c.strip()) for t, c in zip(lines, classes) if t.strip()]
        splits[split] = datasets.Dataset.from_dict({"text": [t for t, _ in pairs], "label": [c for _, c in pairs]})
    return datasets.DatasetDict(splits)


def new_encoder(spec: RunSpec, tokenizer, folder: Path) -> str:
    """A randomly initialised BERT (seed 0) on `tokenizer`, saved once in `folder`: every run starts from it. Saved
    whole, with the pooler every BERT checkpoint carries (the model drops it), so loading it reports no missing
    weight."""
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    width = spec.model.new_encoder_width
    config = BertConfig(
        vocab_size=len(tokenizer),
        pad_token_id=tokenizer.pad_token_id,
        max_position_embeddings=max(64, spec.data.max_length),
        hidden_size=width,
        num_hidden_layers=spec.model.new_encoder_layers,
        num_attention_heads=spec.model.new_encoder_heads,
        intermediate_size=4 * width,
    )
    BertModel(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


def prepare_data(spec: RunSpec) -> RunData:
    """Load the texts, make the two tokenizers (a saved model's own; else the encoder's and a BPE fitted to the
    training text) and tokenise every split."""
    from transformers import AutoTokenizer

    from .factory import (
        fit_decoder_tokenizer,
        load_tokenizers,
        offline_encoder_path,
        prepare_decoder_tokenizer,
    )

    raw = load_raw(spec)
    encoder = spec.model.encoder
    resume = spec.training.resume_from_checkpoint
    if resume:
        check_checkpoint_complete(resume)
    if spec.model.model_name_or_path or resume:  # a resume trains on its checkpoint's token ids, never refitted ones
        encoder_tokenizer, decoder_tokenizer = load_tokenizers(resume or spec.model.model_name_or_path)
        if resume and spec.model.new_encoder_layers and not encoder:
            encoder = new_encoder(spec, encoder_tokenizer, spec.output_dir / "encoder")
    else:
        if spec.model.decoder:
            decoder_tokenizer = AutoTokenizer.from_pretrained(spec.model.decoder, trust_remote_code=False)
        else:
            decoder_tokenizer = fit_decoder_tokenizer(raw["train"]["text"], spec.model.decoder_vocab_size)
        decoder_tokenizer = prepare_decoder_tokenizer(decoder_tokenizer)
        if spec.model.new_encoder_layers and not encoder:
            encoder = new_encoder(spec, decoder_tokenizer, spec.output_dir / "encoder")
        encoder_tokenizer = AutoTokenizer.from_pretrained(encoder or offline_encoder_path(), trust_remote_code=False)
    texts = {split: list(raw[split]["text"]) for split in raw}
    labels = {split: list(raw[split]["label"]) for split in raw if "label" in raw[split].column_names}
    dataset, truncation = tokenize_dataset(
        raw.select_columns(["text"]), encoder_tokenizer, decoder_tokenizer, spec.data.max_length
    )
    return RunData(encoder_tokenizer, decoder_tokenizer, dataset, texts, labels, encoder, truncation)


# ---------------------------------------------------------------------------------------------------------------------
# Build, train, evaluate, save
# ---------------------------------------------------------------------------------------------------------------------


def build_or_load(spec: RunSpec, data: RunData):
    """A new model around the data's tokenizers, or the saved model to fine-tune; seeded first, since the random
    initialisation is part of the run (the Trainer seeds only itself)."""
    from .factory import build_model
    from .options import check_max_length

    if spec.training.full_determinism:
        enable_full_determinism(spec.training.seed)
    else:
        set_seed(spec.training.seed)
    if spec.model.model_name_or_path:
        model, _, _ = load_for_finetuning(spec.model.model_name_or_path, spec.config)
    else:
        model, _, _ = build_model(
            data.encoder,
            spec.model.decoder,
            decoder_tokenizer=data.decoder_tokenizer,
            decoder_config_overrides=dict(
                n_layer=spec.model.decoder_layers, n_embd=spec.model.decoder_width, n_head=spec.model.decoder_heads
            ),
            **spec.config,
        )
    check_max_length(spec.data.max_length, model.config)  # the encoder's and the decoder's positions
    return model


def load_for_finetuning(model_name_or_path: str, overrides: dict):
    """A saved model and its two tokenizers, its config updated by `overrides` (`ScaleVAEConfig` fields the user gave).

    The model loads through `ScaleVAEForLatentLM.from_pretrained` (a folder or a Hub id), strictly: an override the
    saved weights cannot follow (a latent size, an injection or a collapse strategy with other tensors) makes the load
    fail, and the error names the override. The collapse strategy's buffers (Scale-VAE's running scale factors and
    schedule counts, BN-VAE's statistics) and the fitted prior continue from their saved values.

    Raises:
        ValueError: an override is not a valid config value, or the saved weights cannot follow it.
    """
    import re
    import sys

    from modeling_scalevae import ScaleVAEForLatentLM

    from .factory import load_tokenizers

    encoder_tokenizer, decoder_tokenizer = load_tokenizers(model_name_or_path)
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
    return model, encoder_tokenizer, decoder_tokenizer


def loads_with(load, overrides: dict) -> bool:
    """Whether `load(overrides)` succeeds: the strict loader accepts the saved weights under those overrides."""
    try:
        load(overrides)
    except ValueError:
        return False
    return True


class TimeBudgetCallback(TrainerCallback):
    """The training phase's one progress bar (in seconds under a wall-clock budget, else in steps, with the loss), and
    the budget: training stops when the next `stop_every` steps would overrun `seconds`.

    Training stops only at multiples of `stop_every` (the logging interval), projecting the next interval from the
    last one (so a machine that slows down mid-run still stops near the budget): a run that printed N steps is
    reproduced exactly by `--max_steps N` under a schedule that does not depend on the total (constant learning rate).
    """

    def __init__(self, seconds: float | None, stop_every: int, desc: str = "train"):
        self.seconds, self.stop_every, self.desc = seconds, stop_every, desc
        self.bar, self.start, self.last_check, self.loss = None, 0.0, 0.0, None
        self.elapsed = 0.0  # seconds from the first step's start to the last step's end

    def on_train_begin(self, args, state, control, **kwargs):
        self.start = self.last_check = time.perf_counter()
        unit = "s" if self.seconds else "step"
        bar_format = "{desc}: {percentage:3.0f}%|{bar}| {n:.0f}/{total:.0f} " + unit + " [{elapsed}{postfix}]"
        self.bar = tqdm(
            total=round(self.seconds) if self.seconds else state.max_steps,
            initial=0 if self.seconds else state.global_step,
            desc=self.desc,
            unit=unit,
            dynamic_ncols=True,
            bar_format=bar_format,
        )

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "loss" in logs:
            self.loss = logs["loss"]

    def on_step_end(self, args, state, control, **kwargs):
        now = time.perf_counter()
        self.elapsed = now - self.start
        if self.bar is not None:
            self.bar.n = min(self.elapsed, self.bar.total) if self.seconds else state.global_step
            postfix = f"step {state.global_step}" if self.seconds else ""
            if self.loss is not None:
                postfix += f"{', ' if postfix else ''}loss {self.loss:.1f}"
            self.bar.set_postfix_str(postfix, refresh=False)
            self.bar.refresh()
        if self.seconds and state.global_step % self.stop_every == 0:
            interval = now - self.last_check
            self.last_check = now
            if self.elapsed + interval > self.seconds:
                control.should_training_stop = True

    def on_train_end(self, args, state, control, **kwargs):
        if self.bar is not None:
            self.bar.refresh()
            self.bar.close()


@contextlib.contextmanager
def quiet():
    """One progress bar per phase: none for `datasets`' map/filter passes or transformers' weight loading and
    saving (sub-second on these corpora), and library messages at warning level and above only."""
    datasets_bars = datasets.is_progress_bar_enabled()
    transformers_bars = hf_logging.is_progress_bar_enabled()
    verbosity = hf_logging.get_verbosity()
    datasets.disable_progress_bars()
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_warning()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if transformers_bars:
            hf_logging.enable_progress_bar()
        if datasets_bars:
            datasets.enable_progress_bars()


def train(spec: RunSpec, data: RunData, model, callbacks=(), desc: str = "train"):
    """The stock Trainer with the recipe's glue (`make_trainer`: KL schedule, the strategy's `end_step`/`end_epoch`,
    the prior fit at the end, the latent monitor, complete checkpoints). Returns the trainer and the seconds trained."""
    from .card import checkpoint_config_differences

    args = spec.training
    if args.dataloader_pin_memory and not torch.cuda.is_available():  # nothing to pin to: spare the warning
        args = dataclasses.replace(args, dataloader_pin_memory=False)
    if args.resume_from_checkpoint:
        differences = checkpoint_config_differences(model.config, args.resume_from_checkpoint)
        if differences:
            raise ValueError(
                f"--resume_from_checkpoint {args.resume_from_checkpoint} was trained with another model: "
                + "; ".join(differences)
                + ". Resume with the options the checkpoint was trained with."
            )
        check_resume_data(args.resume_from_checkpoint, data.texts["train"], training_record(spec, data)["data"])
    schedule = KLSchedule(
        spec.model.kl_schedule,
        model.config.kl_weight,  # a fine-tuned model's saved β unless --kl_weight is given
        spec.model.kl_warmup_steps or 0,
        args.max_steps if args.max_steps > 0 else 0,
        spec.model.kl_n_cycle,
        spec.model.kl_ratio_zero,
        spec.model.kl_ratio_increase,
    )
    trainer = make_trainer(
        model,
        args,
        data.dataset["train"],
        data.collator,
        eval_dataset=data.dataset.get("validation"),
        kl_schedule=schedule,
        prior_fit_sentences=spec.run.prior_fit_sentences,
        processing_class=data.encoder_tokenizer,
        training=training_record(spec, data),
    )
    # The recipe's bar shows the phase; the full logs go to TensorBoard and `trainer.state.log_history`.
    trainer.remove_callback(PrinterCallback)
    trainer.remove_callback(ProgressCallback)
    budget = TimeBudgetCallback(
        spec.run.train_minutes * 60 if spec.run.train_minutes is not None else None, args.logging_steps, desc
    )
    trainer.add_callback(budget)
    for callback in callbacks:
        trainer.add_callback(callback)
    trainer.train(resume_from_checkpoint=args.resume_from_checkpoint)
    return trainer, budget.elapsed


def evaluate(
    spec: RunSpec,
    data: RunData,
    model,
    seed: int | None = None,
    progress: bool = True,
    reference_lm=None,
    classifier=None,
) -> dict:
    """The field's figures on each of `spec.run.eval_splits` that the data holds: `evaluate_model` (IW-NLL, ELBO,
    KL, MI, AU, token accuracy, shuffle gap) under each prior, reconstruction BLEU, for labelled data a linear probe of
    the latents, and with `spec.run.claims` the test split's representation, consistency and generation figures
    (`scalevae.claims.evaluate_claims`; `reference_lm` scores the samples' forward perplexity), and with
    `spec.run.control` the attribute edits of `scalevae.control.evaluate_control`, judged by `classifier`."""
    from .metrics import evaluate_model, linear_probe_accuracy, reconstruction_bleu_of

    seed = spec.training.seed if seed is None else seed
    model.eval()
    # Families the model does not hold are fitted apart and scored in the same pass (an AE has no density to score).
    others = [family for family in spec.run.priors if family in ("full", "mixture") and family != model.config.prior]
    priors = dict.fromkeys(p for p in spec.run.priors if p not in others)
    if others and model.collapse.stochastic:
        batches = prior_fit_batches(data.dataset["train"], data.collator, spec.run.prior_fit_sentences)
        priors |= fit_prior_families(model, batches, others, seed)
    results = {}
    for split in spec.run.eval_splits:
        if split not in data.dataset:
            continue
        loader = data.loader(split)

        metrics = evaluate_model(
            model,
            loader,
            num_importance_samples=spec.run.num_importance_samples,
            generator=torch.Generator().manual_seed(seed),
            progress=progress,
            priors=priors,
        )
        metrics["bleu"] = reconstruction_bleu_of(
            model,
            data.texts[split][: spec.run.bleu_sentences],
            data.encoder_tokenizer,
            data.decoder_tokenizer,
            spec.data.max_length,
        )
        if split in data.labels:
            mu, decoder_mu = posterior_means(model, loader)
            metrics["probe_mu"] = linear_probe_accuracy(mu, data.labels[split], seed=seed)
            metrics["probe_decoder_mu"] = linear_probe_accuracy(decoder_mu, data.labels[split], seed=seed)
        if spec.run.claims and split == "test":
            from .claims import evaluate_claims

            metrics.update(
                evaluate_claims(
                    model,
                    data.encoder_tokenizer,
                    data.decoder_tokenizer,
                    data.texts,
                    labels=data.labels or None,
                    reference_lm=reference_lm,
                    seed=seed,
                    num_prior_samples=spec.run.claims_prior_samples,
                    max_length=spec.data.max_length,
                    reverse_lm_steps=spec.run.reverse_lm_steps,
                )
            )
        if spec.run.control and split == "test" and split in data.labels:
            from .claims import language_model_perplexity
            from .control import evaluate_control
            from .latent import LatentText

            def fluency(texts):
                return language_model_perplexity(reference_lm, data.decoder_tokenizer, texts, spec.data.max_length)

            metrics.update(
                evaluate_control(
                    LatentText(model, data.encoder_tokenizer, data.decoder_tokenizer, max_length=spec.data.max_length),
                    data.texts[split],
                    data.labels[split],
                    classifier or text_classifier(data),
                    fluency=fluency if reference_lm is not None else None,
                    num_sentences=spec.run.control_sentences,
                    seed=seed,
                    train_texts=data.texts["train"],
                    train_labels=data.labels["train"],
                )
            )
        results[split] = metrics
    return results


def text_classifier(data: RunData, path: Path | None = None):
    """The control measurement's judge: a classifier of the text itself (TF-IDF + logistic regression, not any VAE's
    latent) trained on the labelled training split; kept at `path` so a comparison trains it once."""
    from .control import TextClassifier

    if path is not None and path.is_file():
        return TextClassifier.load(path)
    classifier = TextClassifier.fit(data.texts["train"], data.labels["train"])
    if "test" in data.labels:
        classifier.test_accuracy = classifier.accuracy(data.texts["test"], data.labels["test"])
    if path is not None:
        classifier.save(path)
    return classifier


def reference_language_model(spec: RunSpec, data: RunData, folder: Path):
    """The comparison's reference LM (a plain GPT-2 of the decoder's size trained on the same training split), trained
    once and kept in `folder`: every run's samples are scored by the same model."""
    from transformers import GPT2LMHeadModel

    from modeling_scalevae import default_decoder_config

    from .claims import train_language_model

    if (folder / "config.json").is_file():
        return GPT2LMHeadModel.from_pretrained(folder).eval()
    tokenizer, model = data.decoder_tokenizer, spec.model
    config = default_decoder_config(
        len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        n_layer=model.decoder_layers,
        n_embd=model.decoder_width,
        n_head=model.decoder_heads,
    )
    return train_language_model(
        data.dataset["train"],
        data.decoder_tokenizer,
        config,
        max_length=spec.data.max_length,
        max_steps=spec.training.max_steps,
        batch_size=spec.training.per_device_train_batch_size,
        learning_rate=spec.training.learning_rate,
        seed=0,
        output_dir=str(folder),
    )


def describe_device() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    return f"CPU, {torch.get_num_threads()} threads"


def training_record(spec: RunSpec, data: RunData, command: str | None = None) -> dict:
    """The model card's record of how the model was trained (no credentials, no local paths: the card scrubs them)."""
    args = spec.training
    record = dict(
        data=spec.data.train_file or spec.data.dataset_name or CORPUS_NAME,
        training_sentences=len(data.dataset["train"]),
        batch_size=args.per_device_train_batch_size,
        max_length=spec.data.max_length,
        learning_rate=args.learning_rate,
        lr_schedule=f"{args.lr_scheduler_type}, {args.warmup_steps} warm-up steps",
        seed=args.seed,
        truncated=data.truncation.get("train", {}).get("truncated"),
        decoder_tokenizer=f"{type(data.decoder_tokenizer).__name__}, {len(data.decoder_tokenizer)} tokens",
        data_sha256=texts_fingerprint(data.texts["train"]),
    )
    if command:
        record["command"] = command
    if spec.model.model_name_or_path:
        record["fine_tuned_from"] = spec.model.model_name_or_path  # the card shows a local folder by its name only
    return record


@dataclass
class RunResult:
    model: object
    data: RunData
    metrics: dict  # split -> figures
    steps: int
    train_seconds: float
    history: list  # the Trainer's log history
    folder: Path | None  # the saved model, when saved

    @property
    def seconds_per_step(self) -> float:
        return self.train_seconds / max(self.steps, 1)


def run(
    spec: RunSpec,
    data: RunData | None = None,
    callbacks=(),
    command: str | None = None,
    desc: str = "train",
    progress: bool = True,
    reference_lm=None,
    classifier=None,
) -> RunResult:
    """prepare_data (unless `data` is given: runs that share it) -> build_or_load -> train (the prior is fitted when
    training ends) -> evaluate -> save to OUTPUT_DIR/final. `command` goes into the model card."""
    from .hub import save_model

    with quiet():
        data = data or prepare_data(spec)
        model = build_or_load(spec, data)
        trainer, seconds = train(spec, data, model, callbacks, desc)
        steps = trainer.state.global_step
        metrics = evaluate(spec, data, model, progress=progress, reference_lm=reference_lm, classifier=classifier)
        folder = None
        if (
            command and spec.run.train_minutes is not None
        ):  # the clock stopped it: the card names the steps that reproduce it
            command += f" --max_steps {steps}"
        if spec.run.save:
            folder = spec.output_dir / "final"
            training = training_record(spec, data, command) | dict(
                steps=steps,
                training_time=f"{seconds:.0f} s ({seconds / max(steps, 1):.2f} s/step) on {describe_device()}",
            )
            if metrics:
                split = "test" if "test" in metrics else next(iter(metrics))
                training["evaluation"] = (
                    f"{len(data.dataset[split])} {split} sentences, {spec.run.num_importance_samples} importance samples"
                )
            save_model(
                folder,
                model,
                data.encoder_tokenizer,
                data.decoder_tokenizer,
                metrics=metrics.get("test") or next(iter(metrics.values()), None),
                training=training,
            )
    return RunResult(model, data, metrics, steps, seconds, trainer.state.log_history, folder)


@torch.no_grad()
def posterior_means(model, loader) -> tuple[torch.Tensor, torch.Tensor]:
    """(mu, decoder_mu) of every sentence of `loader`, in eval mode, on the CPU."""
    model.eval()
    mus, decoder_mus = [], []
    for batch in loader:
        posterior = model.encode(batch["input_ids"].to(model.device), batch["attention_mask"].to(model.device))
        mus.append(posterior.mu.float().cpu())
        decoder_mus.append(posterior.decoder_mu.float().cpu())
    return torch.cat(mus), torch.cat(decoder_mus)
