"""One run recipe behind every command: a `RunSpec` and `run(spec)`, the pipeline

    prepare_data (data.py) -> build_or_load -> train (training.py; the prior is fitted when training ends)
    -> evaluate (evaluation.py) -> save_run (hub.py)

`scalevae train`, `scalevae quickstart`, `scalevae compare`, the examples and the benchmark all go through it; they
differ in their presets (`RunSpec` defaults) and in what they print. A spec is four dataclasses (declared with their
ranges in `scalevae.options`), parsed from a command line by transformers' `HfArgumentParser` (`RunSpec.parse`), plus
the model's config fields:

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
from dataclasses import dataclass, field
from pathlib import Path

import datasets
from transformers import HfArgumentParser, TrainingArguments, enable_full_determinism, set_seed
from transformers.utils import logging as hf_logging

from .data import RunData, prepare_data
from .evaluation import evaluate
from .factory import load_for_finetuning, new_model
from .hub import save_run
from .options import (
    DataArguments,
    ModelArguments,
    OptionParser,
    RunArguments,
    check_max_length,
    check_output_folder,
    config_arguments,
    config_kwargs_from,
    explicit_options,
    field_specs,
    merged_options,
    validate_options,
)
from .training import check_checkpoint_complete, train

__all__ = ["RunResult", "RunSpec", "build_or_load", "prepare_data", "quiet", "run"]

# ---------------------------------------------------------------------------------------------------------------------
# The spec
# ---------------------------------------------------------------------------------------------------------------------


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
        parser = OptionParser(sections, **parser_kwargs)
        if defaults:
            parser.set_defaults(**defaults)
        return parser

    @classmethod
    def parse(
        cls, argv: list[str], defaults: dict | None = None, extra: tuple = (), command: str = "train", **parser_kwargs
    ) -> tuple["RunSpec", set[str], tuple]:
        """The spec a command line gives, the options it gave explicitly (a fine-tuned model keeps its saved config
        values but for those), and the command's `extra` dataclasses, parsed. Every numeric option given is checked
        against the range declared on its field (`scalevae.options.field_specs`): 0 or a negative number never means "the
        default"; an option that does nothing in the chosen mode warns once."""
        parser = cls.parser(defaults, extra, **parser_kwargs)
        config_args, model, data, run, training, *extras = parser.parse_args_into_dataclasses(argv)
        given = explicit_options(parser, argv)
        sections = (TrainingArguments, ModelArguments, DataArguments, RunArguments, *extra)
        validate_options(
            merged_options(model, data, run, training, *extras), given, command, specs=field_specs(*sections)
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


# ---------------------------------------------------------------------------------------------------------------------
# The steps the pipeline calls that belong to no other module, and the pipeline
# ---------------------------------------------------------------------------------------------------------------------


def build_or_load(spec: RunSpec, data: RunData):
    """A new model around the data's tokenizers, or the saved model to fine-tune; seeded first, since the random
    initialisation is part of the run (the Trainer seeds only itself)."""
    if spec.training.full_determinism:
        enable_full_determinism(spec.training.seed)
    else:
        set_seed(spec.training.seed)
    if spec.model.model_name_or_path:
        model = load_for_finetuning(spec.model.model_name_or_path, spec.config)
    else:
        model = new_model(
            data.encoder,
            spec.model.decoder,
            data.decoder_tokenizer,
            decoder_config_overrides=dict(
                n_layer=spec.model.decoder_layers, n_embd=spec.model.decoder_width, n_head=spec.model.decoder_heads
            ),
            **spec.config,
        )
    check_max_length(spec.data.max_length, model.config)  # the encoder's and the decoder's positions
    return model


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
    with quiet():
        if spec.training.resume_from_checkpoint:  # before its tokenizers are read
            check_checkpoint_complete(spec.training.resume_from_checkpoint)
        data = data or prepare_data(spec)
        model = build_or_load(spec, data)
        trainer, seconds = train(spec, data, model, callbacks, desc)
        steps = trainer.state.global_step
        metrics = evaluate(spec, data, model, progress=progress, reference_lm=reference_lm, classifier=classifier)
        if command and spec.run.train_minutes is not None:  # the clock stopped it: the card names the steps
            command += f" --max_steps {steps}"
        folder = save_run(spec, data, model, metrics, steps, seconds, command) if spec.run.save else None
    return RunResult(model, data, metrics, steps, seconds, trainer.state.log_history, folder)
