"""One validation of every command's options: each numeric option declares its valid range where it is defined
(`number(...)`, dataclass field metadata), and `validate_options` checks a parsed dataclass of options against them
before anything runs. The rules behind it:

- a value outside its range is refused, with the range in the message (`--top_p 2.0: must be a number in (0, 1]`);
- 0 and negative values never stand for "the default": an option that is not given is None, and a given value means
  what it says, or is refused;
- an option that does nothing in the chosen mode (`--top_p` without `--do_sample`) warns, once per option;
- an option needed by the chosen mode (`--kl_warmup_steps` with `--kl_schedule linear`) is required;
- a sequence length must fit the encoder's and the decoder's positions (`check_max_length`); output paths follow the
  rules of `scalevae.outputs` (`check_output_folder`, `check_output_file`).
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import math
import os
from argparse import Namespace
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from transformers import HfArgumentParser, TrainingArguments

from configuration_scalevae import PAPER_ALIASES, PRIORS, ScaleVAEConfig

from .outputs import is_model_folder

logger = logging.getLogger(__name__)

KL_SCHEDULES = ("constant", "linear", "cyclical")

__all__ = [
    "OptionParser",
    "field_specs",
    "Condition",
    "OptionError",
    "Range",
    "check_max_length",
    "check_output_file",
    "check_output_folder",
    "max_length_limit",
    "merged_options",
    "number",
    "validate_options",
    "device_option",
    "max_length_option",
    "max_new_tokens_option",
    "seed_option",
    "SEED_RANGE",
]


class OptionError(ValueError):
    """An option value that the command cannot honour; the message names the option and its valid range."""


@dataclass(frozen=True)
class Range:
    """The values a numeric option accepts: `low`/`high` bounds (None: unbounded), each inclusive unless `*_open`,
    whole numbers only with `integer`. Always finite: NaN and infinities are refused."""

    low: float | None = None
    high: float | None = None
    integer: bool = False
    low_open: bool = False
    high_open: bool = False

    def describe(self) -> str:
        kind = "a whole number" if self.integer else "a number"
        if self.low is None and self.high is None:
            return f"{kind} (finite)"
        if self.high is None:
            return f"{kind} {'>' if self.low_open else '>='} {_show(self.low)}"
        if self.low is None:
            return f"{kind} {'<' if self.high_open else '<='} {_show(self.high)}"
        left, right = "(" if self.low_open else "[", ")" if self.high_open else "]"
        return f"{kind} in {left}{_show(self.low)}, {_show(self.high)}{right}"

    def accepts(self, value: Any) -> bool:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return False
        if not math.isfinite(value) or (self.integer and value != int(value)):
            return False
        if self.low is not None and (value <= self.low if self.low_open else value < self.low):
            return False
        return not (self.high is not None and (value >= self.high if self.high_open else value > self.high))


def _show(bound: float) -> str:
    return str(int(bound)) if float(bound).is_integer() and abs(bound) < 1e15 else repr(bound)


@dataclass(frozen=True)
class Condition:
    """A mode of the command: `field` has one of `values` (`values=None`: `field` is set, i.e. neither None nor
    False). Written in messages as, e.g., `--do_sample` or `--kl_schedule linear`, or as `text`."""

    field: str
    values: tuple | None = None
    text: str | None = None

    def holds(self, options: Any) -> bool:
        value = getattr(options, self.field)
        if self.values is None:
            return value is not None and value is not False
        return value in self.values

    def describe(self) -> str:
        if self.text:
            return self.text
        if self.values is None:
            return f"--{self.field}"
        return f"--{self.field} " + " or ".join(str(value) for value in self.values)


def _condition(spec: str | Condition | tuple | None) -> Condition | None:
    if spec is None or isinstance(spec, Condition):
        return spec
    if isinstance(spec, str):
        return Condition(spec)
    field, values = spec
    return Condition(field, tuple(values) if isinstance(values, (list, tuple)) else (values,))


def number(
    default: Any = None,
    *,
    low: float | None = None,
    high: float | None = None,
    integer: bool = False,
    low_open: bool = False,
    high_open: bool = False,
    only_with: str | Condition | tuple | None = None,
    required_with: str | Condition | tuple | None = None,
    help: str = "",
    **field_kwargs,
):
    """A dataclass field for a numeric option: its default (None: not given), its valid range, the mode it only
    matters in (`only_with`: a `Condition`, a field name, or `(field, value or values)`) and the mode that requires it
    (`required_with`). The range goes into the help text, for `HfArgumentParser`/argparse."""
    valid = Range(low, high, integer, low_open, high_open)
    text = f"{help} ({valid.describe()})".strip() if help else valid.describe()
    metadata = {
        "help": text,
        "range": valid,
        "only_with": _condition(only_with),
        "required_with": _condition(required_with),
        **field_kwargs.pop("metadata", {}),
    }
    if "default_factory" not in field_kwargs and default is not dataclasses.MISSING:  # MISSING: a required option
        field_kwargs["default"] = default
    return dataclasses.field(metadata=metadata, **field_kwargs)


# The options several commands share, declared once: each command's dataclass calls these for its field.
SEED_RANGE = dict(low=0, high=2**32 - 1, integer=True)  # what torch and numpy seed with; also compare's --seeds


def seed_option(help: str = "random seed"):
    return number(0, **SEED_RANGE, help=help)


def max_length_option(help: str = "tokens per sentence, for the encoder and the decoder"):
    return number(64, low=2, high=131072, integer=True, help=help)


def max_new_tokens_option(default: int | None, help: str = "tokens generated per text at most"):
    return number(default, low=1, high=131072, integer=True, help=help)


def device_option(default: str | None = None):
    where = f"default {default}" if default else "default: cuda when available"
    return dataclasses.field(default=default, metadata={"help": f"cpu, cuda, cuda:1... ({where})"})


# What `number(...)` adds to a field's metadata beyond argparse's keywords.
NUMBER_METADATA = ("range", "only_with", "required_with")


def _values(value: Any) -> list:
    return list(value) if isinstance(value, (list, tuple)) else [value]


_warned: set[tuple[str, str]] = set()


def validate_options(
    options: Any,
    given: Iterable[str] | None = None,
    command: str = "",
    checks: Iterable[Callable] = (),
    specs: dict[str, dict] | None = None,
) -> list[str]:
    """Check the options a command line gave against their specs; raise `OptionError` for the first given value
    outside its range (each element of a list option is checked) or a required option missing (None) in the chosen
    mode. The specs are a dataclass's `number(...)` field metadata, or `specs` ({option: {"range", "only_with",
    "required_with"}}, e.g. `field_specs(*sections)`, for an argparse Namespace or the sections of a `RunSpec`).
    `given`: the names the command line set (default: those of a dataclass not at their default); defaults are the
    program's own, which may be sentinels (TrainingArguments' max_steps=-1: train for the epochs) and are not checked.
    Given options that do nothing in the chosen mode are warned about, once per option and command in a process.
    `checks` are further functions of `options` that return an error message or None (cross-field rules). Returns the
    warnings."""
    if specs is None:
        fields = {item.name: item.metadata for item in dataclasses.fields(options)}
        if given is None:
            given = {
                item.name for item in dataclasses.fields(options) if getattr(options, item.name) != _default_of(item)
            }
    else:
        fields = {name: spec for name, spec in specs.items() if hasattr(options, name)}
        if given is None:
            raise TypeError("validate_options(..., specs=...) needs given=: the options the command line set.")
    given = set(given)
    prefix = f"{command}: " if command else ""
    for name, item in fields.items():
        valid = item.get("range")
        value = getattr(options, name)
        if valid is not None and value is not None and name in given:
            for element in _values(value):
                if not valid.accepts(element):
                    raise OptionError(f"{prefix}--{name} {element!r}: must be {valid.describe()}.")
        required = item.get("required_with")
        if required is not None and value is None and required.holds(options):
            raise OptionError(
                f"{prefix}{required.describe()} needs --{name} ({valid.describe() if valid else 'a value'})."
            )
    for check in checks:
        problem = check(options)
        if problem:
            raise OptionError(f"{prefix}{problem}")
    warnings = []
    for name, item in fields.items():
        condition = item.get("only_with")
        if condition is not None and name in given and not condition.holds(options):
            message = f"{prefix}--{name} does nothing without {condition.describe()}; it is ignored."
            warnings.append(message)
            if (command, name) not in _warned:
                _warned.add((command, name))
                logger.warning(message)
    return warnings


def merged_options(*sections: Any) -> Namespace:
    """One namespace of the fields of several option objects (dataclasses or namespaces: a `RunSpec`'s sections), for
    `validate_options`; a name in two sections keeps the first's value."""
    merged = {}
    for section in sections:
        values = (
            {item.name: getattr(section, item.name) for item in dataclasses.fields(section)}
            if dataclasses.is_dataclass(section)
            else vars(section)
        )
        for name, value in values.items():
            merged.setdefault(name, value)
    return Namespace(**merged)


def _spec(low=None, high=None, *, integer=True, low_open=False, high_open=False, only_with=None, required_with=None):
    return {
        "range": Range(low, high, integer, low_open, high_open),
        "only_with": _condition(only_with),
        "required_with": _condition(required_with),
    }


_POSITIVE = _spec(0, None, integer=False, low_open=True)  # a finite number > 0
_CYCLICAL = ("kl_schedule", "cyclical")
_LINEAR = ("kl_schedule", "linear")

# Every numeric option of every command is declared once, with its range: on its dataclass field (`number(...)`; the
# commands validate at parse time with `validate_options(args, given, command, specs=field_specs(*sections))`, and the
# help texts show the ranges), or, for the stock TrainingArguments, in the table below. Sizes and lengths that depend
# on the model are checked once it is known (`check_max_length`, the config's own `validate_scalevae`, generation's
# position check). 0 means "none" only where that is a real choice (0 importance samples: no IW-NLL; 0 warm-up steps
# of the learning rate), never "the default".
#
# The ranges of the stock TrainingArguments' numeric options (not our dataclass: declared here, once). The recipe's own
# sections declare theirs on their fields (`number(...)`, below).
TRAINING_OPTIONS: dict[str, dict] = {
    "max_steps": _spec(1),
    "num_train_epochs": _POSITIVE,
    "learning_rate": _POSITIVE,
    "per_device_train_batch_size": _spec(1),
    "per_device_eval_batch_size": _spec(1),
    "gradient_accumulation_steps": _spec(1),
    "warmup_steps": _spec(0),
    "logging_steps": _POSITIVE,  # below 1: a fraction of the run (TrainingArguments' convention)
    "save_steps": _POSITIVE,
    "eval_steps": _POSITIVE,
    "save_total_limit": _spec(1),
    "seed": _spec(**SEED_RANGE),
}


def _default_of(item: dataclasses.Field) -> Any:
    if item.default is not dataclasses.MISSING:
        return item.default
    if item.default_factory is not dataclasses.MISSING:
        return item.default_factory()
    return dataclasses.MISSING


def max_length_limit(config) -> tuple[int, str]:
    """The longest `max_length` (tokens per sentence, special tokens included) a ScaleVAE config can take, and why:
    the encoder's positions (RoBERTa-style encoders start counting after the pad id) and the decoder's (the latent's
    memory slot takes one with `latent_injection` "memory" or "both")."""
    encoder = config.encoder
    encoder_positions = encoder.max_position_embeddings
    if "roberta" in encoder.model_type or encoder.model_type == "camembert":
        encoder_positions -= (encoder.pad_token_id or 0) + 1
    slot = int(config.latent_injection != "embedding")
    decoder_positions = config.decoder.n_positions - slot
    why = f"the encoder takes {encoder_positions} tokens, the decoder {config.decoder.n_positions} positions" + (
        f" of which the latent takes one (latent_injection={config.latent_injection!r})" if slot else ""
    )
    return min(encoder_positions, decoder_positions), why


def check_max_length(max_length: int, config, option: str = "--max_length") -> None:
    """Refuse a `max_length` outside [2, `max_length_limit(config)`], naming both limits: beyond them the encoder's or
    the decoder's position embeddings run out mid-batch with a shape error that names neither."""
    limit, why = max_length_limit(config)
    if not Range(2, limit, integer=True).accepts(max_length):
        raise OptionError(f"{option} {max_length!r}: must be a whole number in [2, {limit}] ({why}).")


# -- output paths: the rules of `scalevae.outputs` ------------------------------------------------------------------


class OutputPathError(OptionError):
    """An output path a command refuses before it starts; the message names the option and the reason."""


def _resolved(path: str | os.PathLike) -> Path:
    return Path(os.path.realpath(os.path.expanduser(str(path))))


def _local(path: str | os.PathLike | None) -> Path | None:
    """An input that exists on this machine, resolved; None for None, a Hub id or a missing path."""
    if path is None or not os.path.exists(os.path.expanduser(str(path))):
        return None
    return _resolved(path)


def _check(path: str | os.PathLike, inputs, option: str, folder: bool) -> Path:
    if path is None or not str(path).strip():
        raise OutputPathError(f"{option} is empty: give a path.")
    out = _resolved(path)
    kind = "folder" if folder else "file"
    for source in inputs:
        model = _local(source)
        if model is None:
            continue
        if not model.is_dir():
            if out == model:
                raise OutputPathError(
                    f"{option} {path} is the input file {source}: the command would overwrite what it reads. Choose "
                    f"another output {kind}."
                )
            continue
        if out == model or model in out.parents or (folder and out in model.parents):
            relation = "is" if out == model else "lies inside" if model in out.parents else "holds"
            raise OutputPathError(
                f"{option} {path} {relation} the input model folder {source}: the command would write over (or rotate "
                f"away) what it reads. Choose an output {kind} outside it."
            )
    for parent in ([out] if folder else []) + list(out.parents):
        if is_model_folder(parent):
            where = "is" if parent == out else "lies inside"
            raise OutputPathError(
                f"{option} {path} {where} the model folder {parent}: a model folder holds only what a save writes "
                f"(its files are checked together when it loads). Choose an output {kind} outside it."
            )
    if not folder and out.is_dir():
        raise OutputPathError(f"{option} {path} is a folder: give a file name.")
    if folder and out.exists() and not out.is_dir():
        raise OutputPathError(f"{option} {path} is a file: give a folder.")
    existing = next(p for p in ([out] if folder else []) + [out.parent, *out.parent.parents] if p.exists())
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        raise OutputPathError(f"{option} {path}: {existing} is not a folder this user can write into.")
    return out


def check_output_file(path: str | os.PathLike, *inputs: str | os.PathLike | None, option: str = "--output") -> Path:
    """Refuse, before the work, an output file the command must not write (see the module's rules); `inputs` are the
    command's input models and files (Hub ids and absent paths are skipped). Returns the resolved path."""
    return _check(path, inputs, option, folder=False)


def check_output_folder(
    output_dir: str | os.PathLike, *inputs: str | os.PathLike | None, option: str = "--output_dir"
) -> Path:
    """Refuse, before the work, an output folder that is, holds or lies inside an input model folder, or is or lies
    inside any model folder: a run writes its checkpoints and `final/` there and rotates old checkpoints. Links are
    resolved first; Hub ids and absent inputs are skipped. Returns the resolved path."""
    return _check(output_dir, inputs, option, folder=True)


# ---------------------------------------------------------------------------------------------------------------------
# The run recipe's options: the config's fields, and the sections of a `RunSpec`
# ---------------------------------------------------------------------------------------------------------------------


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
        if kind == (bool | int):  # freeze_encoder: True, False or a number of layers, typed by the parser itself
            kind = encoder_layers_to_freeze
        specs.append((item.name, kind, dataclasses.field(default=default, metadata=metadata)))
    return dataclasses.make_dataclass("ScaleVAEConfigArguments", specs)


def encoder_layers_to_freeze(value: str) -> bool | int:
    """`--freeze_encoder`'s type: true/all, false/none, or a number of lower encoder layers."""
    parsed = {"true": True, "false": False, "all": True, "none": False}.get(str(value).lower())
    if parsed is None and not str(value).isdigit():
        raise argparse.ArgumentTypeError(f"{value!r}: give true, false or a number of lower encoder layers")
    return parsed if parsed is not None else int(value)


def config_kwargs_from(arguments) -> dict:
    """The parsed config options as `ScaleVAEConfig` keyword arguments."""
    return dataclasses.asdict(arguments)


class _GivenOnly(argparse.Namespace):
    """A namespace on which every attribute seems present: argparse then fills in no default, so after parsing it
    holds exactly the options the command line gave."""

    def __getattr__(self, name: str):
        if name.startswith("_"):  # argparse's own bookkeeping (unrecognised arguments) must read as absent
            raise AttributeError(name)
        return None


def explicit_options(parser: argparse.ArgumentParser, argv: list[str]) -> set[str]:
    """The destinations of the options `argv` actually gives (also under an alias or a `--no_*` form), as opposed to
    those holding their defaults: a default must not overwrite a value saved in a folder."""
    given, _ = parser.parse_known_args(argv, namespace=_GivenOnly())
    return set(vars(given))


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
    decoder_layers: int = number(
        4, low=1, high=1024, integer=True, help="layers of the new GPT-2 when --decoder is not given"
    )
    decoder_width: int = number(256, low=1, high=65536, integer=True, help="width of the new GPT-2")
    decoder_heads: int = number(4, low=1, high=1024, integer=True, help="attention heads of the new GPT-2")
    decoder_vocab_size: int = number(
        4096,
        low=259,
        high=2097152,
        integer=True,
        help="byte-level BPE vocabulary fitted to the training text for a new decoder",
    )
    new_encoder_layers: int | None = number(
        None,
        low=1,
        high=1024,
        integer=True,
        help="instead of a pretrained encoder, a new BERT of this many layers on the decoder's fitted "
        "tokenizer, trained from scratch (the CPU comparisons: MiniLM's forward alone outweighs a small model's "
        "step)",
    )
    new_encoder_width: int = number(128, low=1, high=65536, integer=True)
    new_encoder_heads: int = number(4, low=1, high=1024, integer=True)
    kl_schedule: str = field(
        default="constant", metadata={"help": f"{' | '.join(KL_SCHEDULES)}: β rises to --kl_weight"}
    )
    kl_warmup_steps: int | None = number(
        None,
        low=1,
        integer=True,
        only_with=_LINEAR,
        required_with=_LINEAR,
        help="steps of the linear schedule's rise",
    )
    kl_n_cycle: int = number(4, low=1, integer=True, only_with=_CYCLICAL)
    kl_ratio_zero: float = number(0.25, low=0, high=1, high_open=True, only_with=_CYCLICAL)
    kl_ratio_increase: float = number(0.25, low=0, high=1, low_open=True, only_with=_CYCLICAL)

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
    max_length: int = max_length_option()
    train_sentences: int | None = number(None, low=1, integer=True, help="train on the first N sentences only")
    eval_sentences: int | None = number(
        None, low=1, integer=True, help="evaluate on the first N validation and test sentences only"
    )


@dataclass
class RunArguments:
    """The run's budget and its evaluation."""

    train_minutes: float | None = number(
        None,
        low=0,
        low_open=True,
        help="wall-clock training budget: training stops at the last logging step that fits (a run that "
        "trained N steps is reproduced by --max_steps N)",
    )
    eval_splits: list[str] = field(
        default_factory=lambda: ["test"], metadata={"help": "splits evaluated after training, when present"}
    )
    num_importance_samples: int = number(50, low=0, integer=True, help="k of the importance-weighted NLL")
    priors: list[str] = field(
        default_factory=lambda: ["fitted"],
        metadata={
            "help": "generative priors the density is reported under: fitted, scaled, and full or mixture (refitted "
            "on the training sentences for the scoring when the model holds another family)",
            "choices": PRIORS,
        },
    )
    bleu_sentences: int = number(200, low=1, integer=True, help="sentences whose greedy reconstruction BLEU scores")
    prior_fit_sentences: int = number(
        4000, low=1, integer=True, help="training sentences the prior (and BN-VAE's statistics) are fitted on"
    )
    claims: bool = field(
        default=False,
        metadata={
            "help": "also measure the paper's other claims on the test split (scalevae.claims): the few-label probe "
            "(labelled data), latent consistency (prior and data cycles) and generation (forward PPL under a "
            "reference LM, distinct-n, self-BLEU, lengths)"
        },
    )
    claims_prior_samples: int = number(
        1000, low=2, integer=True, only_with="claims", help="prior samples of the generation figures"
    )
    reverse_lm_steps: int = number(
        0,
        low=0,
        integer=True,
        only_with="claims",
        help="steps of the reverse-perplexity LM trained on the samples (0: not measured)",
    )
    control: bool = field(
        default=False,
        metadata={
            "help": "labelled data: also measure control on the test split (scalevae.control): flip each sentence's "
            "class through the latent, scored by a text classifier trained on the training split (transfer "
            "accuracy, BLEU to the source, perplexity under the reference LM, per strength)"
        },
    )
    control_sentences: int = number(
        200, low=1, integer=True, only_with="control", help="test sentences edited by the control measurement"
    )
    save: bool = field(default=True, metadata={"help": "save the trained model to OUTPUT_DIR/final"})


# What the project's own runs share (the quickstart and the comparison presets): a small model on a BPE fitted to the
# training text, batch 32, AdamW without weight decay at a constant 5e-4 after a warm-up.
SMALL_RUN_DEFAULTS = dict(
    per_device_train_batch_size=32,
    learning_rate=5e-4,
    lr_scheduler_type="constant_with_warmup",
    weight_decay=0.0,
    # 32 tokens, not the recipe's 64: the small CPU presets trade the longest sentences' tails (counted in the
    # card's `truncated`) for steps per minute; their published figures were measured so.
    max_length=32,
    latent_size=32,
    decoder_vocab_size=4096,
)


def field_specs(*sections: type) -> dict[str, dict]:
    """{option: its range and conditions} of the dataclasses a command parses: their `number(...)` fields, and for the
    stock `TrainingArguments` (which declares no ranges) `TRAINING_OPTIONS`. What `validate_options` checks."""
    specs = {}
    for section in sections:
        if issubclass(section, TrainingArguments):
            specs |= TRAINING_OPTIONS
        else:
            specs |= {item.name: item.metadata for item in dataclasses.fields(section) if "range" in item.metadata}
    return specs


class OptionParser(HfArgumentParser):
    """`HfArgumentParser` over dataclasses whose numeric fields are `number(...)`: their range and conditions stay in
    the field's metadata, for the validator, and only the rest (help, aliases, choices...) reaches argparse."""

    def add_argument(self, *args, **kwargs):
        for key in NUMBER_METADATA:
            kwargs.pop(key, None)
        return super().add_argument(*args, **kwargs)
