"""The model card: the README.md of every saved folder, rendered from `model_card.md` with what this model is, how it
was trained and what was measured on it; and what a published folder may say about the machine that made it
(credentials and local paths never reach a card or config.json)."""

import json
import math
import os
import re
import shlex
import string
from pathlib import Path

import torch

from configuration_scalevae import SCALEVAE_FORMAT_VERSION, ScaleVAEConfig
from loading_scalevae import public_name
from modeling_scalevae import ScaleVAEForLatentLM

from . import __version__
from .corpus import CORPUS_NAME
from .data import texts_fingerprint
from .metrics import METRICS, metric_info

CARD_TEMPLATE_NAME = "model_card.md"
CARD_TAGS = ["scalevae", "vae", "text-generation"]
DEFAULT_LICENSE = "apache-2.0"

# The evaluation table's six rows (names and meanings from `scalevae.metrics.METRICS`). Keys are matched
# case-insensitively, with an optional "eval_" prefix (Trainer's), and through the aliases below. Every row is in the
# table; one without a measured value reads "not evaluated".
CARD_METRICS = ("nll", "ppl", "kl", "mi", "au", "bleu")
# Further figures of `evaluate_model`: listed under the six rows when measured, with their meanings.
EXTRA_METRICS = (
    "elbo",
    "reconstruction_nll",
    "decoder_kl",
    "mi_decoder",
    "au_decoder",
    "token_accuracy",
    "shuffle_gap",
)
# Entries of `metrics` that describe the evaluation rather than measure the model.
EVALUATION_SETTINGS = ("dataset", "split", "num_sentences", "num_tokens", "num_importance_samples")
_METRIC_ALIASES = {
    "perplexity": "ppl",
    "mutual_information": "mi",
    "active_units": "au",
    "reconstruction_bleu": "bleu",
    "recon_bleu": "bleu",
}

NOT_SET = "(not set)"  # the "default" of a setting that ScaleVAEConfig() does not have

# Bookkeeping entries of config.to_dict() that are not hyperparameters.
_NOT_HYPERPARAMETERS = {
    "_name_or_path",
    "architectures",
    "auto_map",
    "dtype",
    "torch_dtype",
    "transformers_version",
    "scalevae_version",
    "_attn_implementation",
    "_attn_implementation_autoset",
    "_commit_hash",
    "output_attentions",
    "output_hidden_states",
    "return_dict",
}


# ---------------------------------------------------------------------------------------------------------------------
# What a published folder may say about the machine that made it
# ---------------------------------------------------------------------------------------------------------------------

# Command-line flags whose values are credentials: never written into a card.
_SECRET_FLAG = re.compile(r"token|passw|secret|key|credential", re.IGNORECASE)
# Hugging Face access tokens, wherever they appear.
_HF_TOKEN = re.compile(r"hf_[A-Za-z0-9]{16,}")
HIDDEN = "***"


def _is_local_path(value: str) -> bool:
    return bool(value) and (os.path.isabs(value) or value.startswith("~") or os.path.exists(value))


def public_value(value):
    """`value` as a published folder may show it: a local path becomes "local file `name`" / "local folder `name`"
    (its base name only: the rest of the path belongs to the machine), an access token becomes ***; anything else
    is returned as it is."""
    if not isinstance(value, str):
        return value
    if _is_local_path(value):
        path = Path(os.path.expanduser(value))
        kind = "folder" if path.is_dir() else "file"
        return f"local {kind} `{path.name or path.resolve().name}`"
    return _HF_TOKEN.sub(HIDDEN, value)


def public_command(command) -> str:
    """A command line fit for a model card: the values of flags named like credentials (`--*token*`, `*password*`,
    `*secret*`, `*key*`) are replaced by ***, and local paths by their base name."""
    words = shlex.split(command) if isinstance(command, str) else [str(word) for word in command]
    public, hide_next = [], False
    for word in words:
        if hide_next and not word.startswith("-"):
            public.append(HIDDEN)
            hide_next = False
            continue
        hide_next = False
        if word.startswith("-"):
            name, equals, value = word.partition("=")
            if _SECRET_FLAG.search(name):
                hide_next = not equals
                public.append(f"{name}={HIDDEN}" if equals else name)
            else:
                public.append(f"{name}={_public_word(value)}" if equals else word)
        else:
            public.append(_public_word(word))
    return shlex.join(_HF_TOKEN.sub(HIDDEN, word) for word in public)


def _public_word(word: str) -> str:
    if _is_local_path(word):
        return Path(os.path.expanduser(word)).name or word
    return word


def _public_training(training: dict) -> dict:
    """The card's training record without local paths or credentials. A local `dataset` is not a Hub dataset: it
    moves to the description of the data."""
    public = {}
    for key, value in training.items():
        if key == "command":
            public[key] = public_command(value)
        elif _SECRET_FLAG.search(key) and key not in ("dataset",):
            continue
        else:
            public[key] = public_value(value)
    dataset = training.get("dataset")
    if isinstance(dataset, str) and _is_local_path(dataset):
        public.pop("dataset")
        public.setdefault("data", public_value(dataset))
    return public


# ---------------------------------------------------------------------------------------------------------------------
# Model card
# ---------------------------------------------------------------------------------------------------------------------


def card_template_path() -> Path:
    """The card template: `model_card.md` at the root of a source checkout (the file to edit), else the copy that the
    installed package ships in `scalevae/templates/` (setup.py's build step copies the root file there)."""
    package = Path(__file__).resolve().parent
    root = package.parent
    candidates = []
    if (root / "setup.py").exists():  # a source checkout or an editable install, not site-packages
        candidates.append(root / CARD_TEMPLATE_NAME)
    candidates.append(package / "templates" / CARD_TEMPLATE_NAME)
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(
        f"The model card template {CARD_TEMPLATE_NAME} is missing (looked in {', '.join(map(str, candidates))}); "
        "reinstall scalevae."
    )


def _cell(text) -> str:
    """Text for a Markdown table cell: a bare | would end the cell."""
    return str(text).replace("|", "\\|").replace("\n", " ")


def _plural(count: int, noun: str) -> str:
    return f"{count} {noun}{'' if count == 1 else 's'}"


def _number(value) -> str:
    if isinstance(value, int):
        return str(value)
    return f"{value:.2f}" if abs(value) >= 0.01 or value == 0 else f"{value:.3g}"


def _split_metrics(metrics: dict | None) -> tuple[dict, dict, dict]:
    """(the six table metrics, other numeric figures, evaluation settings such as dataset and split). NaN means "not
    computed" (`evaluate_model` returns it, e.g. NLL without importance sampling): such a figure is left out."""
    known, other, settings = {}, {}, {}
    table = set(CARD_METRICS)
    for key, value in (metrics or {}).items():
        name = key.lower()
        name = name[len("eval_") :] if name.startswith("eval_") else name
        name = _METRIC_ALIASES.get(name, name)
        if isinstance(value, (dict, list, tuple)):  # examples and curves, not a figure of the card
            continue
        if name in EVALUATION_SETTINGS or isinstance(value, bool) or not isinstance(value, (int, float)):
            settings[name if name in EVALUATION_SETTINGS else key] = value
        elif math.isnan(value):
            continue
        elif math.isinf(value):
            raise ValueError(f"metrics[{key!r}]={value!r} is infinite: a card reports finite, measured figures.")
        elif name in table:
            known[name] = value
        else:
            other[name if name in EXTRA_METRICS else key] = value
    return known, other, settings


def _flat_config(config) -> dict:
    flat = {}
    for key, value in config.to_dict().items():
        if key in _NOT_HYPERPARAMETERS:
            continue
        if key in ("encoder", "decoder") and isinstance(value, dict):
            for sub_key, sub_value in value.items():
                if sub_key not in _NOT_HYPERPARAMETERS:
                    flat[f"{key}.{sub_key}"] = sub_value
        else:
            flat[key] = value
    return flat


def checkpoint_config_differences(config: ScaleVAEConfig, checkpoint: str | os.PathLike) -> list[str]:
    """Every setting of `config` that the checkpoint folder's config.json holds with another value, in words naming
    the field and both values (empty: the checkpoint was trained with this model's settings, or has no config.json,
    which the Trainer reports itself)."""
    if not (Path(checkpoint) / "config.json").is_file():
        return []
    # use_cache is a runtime switch the Trainer sets from its own arguments, not a setting the weights were trained with
    values = {k: v for k, v in _flat_config(config).items() if k != "use_cache"}
    saved = {k: v for k, v in _flat_config(ScaleVAEConfig.from_pretrained(checkpoint)).items() if k != "use_cache"}
    return [
        f"{key}={values.get(key, NOT_SET)!r} now, {saved.get(key, NOT_SET)!r} in the checkpoint"
        for key in sorted(set(values) | set(saved))
        if values.get(key, NOT_SET) != saved.get(key, NOT_SET)
    ]


def non_default_hyperparameters(config: ScaleVAEConfig) -> dict[str, tuple]:
    """Every config value that differs from `ScaleVAEConfig()`'s, as name -> (value, default); the parts' settings
    are named `encoder.*` / `decoder.*` (their defaults: `BertConfig()` and `GPT2Config()`). A setting the default
    config does not have at all gets the default `NOT_SET`."""
    values, defaults = _flat_config(config), _flat_config(ScaleVAEConfig())
    return {
        key: (value, defaults.get(key, NOT_SET))
        for key, value in sorted(values.items())
        if defaults.get(key, NOT_SET) != value
    }


def _yaml_metadata(model_name: str, known: dict, other: dict, settings: dict, training: dict) -> str:
    from huggingface_hub import EvalResult, ModelCardData

    dataset = settings.get("dataset") or training.get("dataset")
    eval_results = None
    measured = [*known.items(), *((key, value) for key, value in other.items() if key in EXTRA_METRICS)]
    if measured:  # model-index only for evaluation figures that were measured
        split = settings.get("split")
        # A local training file is named by its description (the card never shows a local path).
        eval_dataset = str(dataset or training.get("data") or "unspecified")
        names = {key: METRICS[key].name for key in CARD_METRICS}
        eval_results = [
            EvalResult(
                task_type="text-generation",
                dataset_type=eval_dataset,
                dataset_name=eval_dataset,
                dataset_split=str(split) if split else None,
                metric_type=key if key in names else key.lower(),
                metric_name=names.get(key, key),
                metric_value=value,
            )
            for key, value in measured
        ]
    data = ModelCardData(
        license=training.get("license", DEFAULT_LICENSE),
        library_name="transformers",
        tags=list(CARD_TAGS),
        datasets=[str(training["dataset"])] if training.get("dataset") else None,
        base_model=training.get("base_model"),
        model_name=model_name,
        eval_results=eval_results,
    )
    return data.to_yaml()


def _architecture(model: ScaleVAEForLatentLM, base_model: str | None = None) -> str:
    config = model.config
    enc, dec = config.encoder, config.decoder
    encoder_source = base_model or getattr(enc, "_name_or_path", "") or ""
    if _is_local_path(encoder_source):
        encoder_source = f"local folder `{public_name(encoder_source)}`"
    elif encoder_source:
        encoder_source = f"`{public_value(encoder_source)}`"
    encoder_source = f" from {encoder_source}" if encoder_source else ""
    params = sum(p.numel() for p in model.parameters())
    return "\n".join(
        [
            "| part | setting |",
            "| --- | --- |",
            f"| encoder | {enc.model_type}{encoder_source}: {_plural(enc.num_hidden_layers, 'layer')}, hidden size {enc.hidden_size}, "
            f"vocabulary {enc.vocab_size} |",
            f"| latent | z of size {config.latent_size}, Gaussian posterior from mean-pooled encoder states |",
            f"| decoder | GPT-2: {_plural(dec.n_layer, 'layer')}, width {dec.n_embd}, {_plural(dec.n_head, 'head')}, {dec.n_positions} positions, "
            f"vocabulary {dec.vocab_size} |",
            f"| latent injection | `{config.latent_injection}` |",
            f"| posterior-collapse remedy | `{config.collapse_strategy}`"
            + (f", schedule `{config.scale_schedule}`" if config.collapse_strategy == "scale" else "")
            + " |",
            f"| parameters | {params:,} |",
            f"| scalevae format | {config.scalevae_format_version} (saved by scalevae {config.scalevae_version or __version__}) |",
        ]
    )


def _evaluation(known: dict, other: dict, settings: dict, training: dict) -> str:
    rows = ["| metric | value | what it measures |", "| --- | --- | --- |"]
    for key in CARD_METRICS:
        value = _number(known[key]) if key in known else "not evaluated"
        rows.append(f"| {METRICS[key].name} | {value} | {_cell(METRICS[key].description)} |")
    for key, value in other.items():
        rows.append(f"| {_cell(key)} | {_number(value)} | {_cell(metric_info(key).description)} |")
    if not known and not other:
        lead = (
            "**This model has not been evaluated**: the table below holds no figures. Evaluate it (see the scalevae "
            "package's evaluation) and save it again with the measured metrics to fill it in."
        )
    else:
        lead = "Figures measured on this model (never copied from the paper or from another model)."
    if known or other:
        described = [f"{key} = {value}" for key, value in settings.items()]
        if training.get("evaluation"):
            described.insert(0, str(training["evaluation"]))
        if described:
            lead += "\n\nEvaluation settings: " + "; ".join(described) + "."
    return lead + "\n\n" + "\n".join(rows)


# `training` entries with a place of their own in the card; every other entry is listed as a training argument.
_RECIPE_KEYS = (
    "dataset",
    "data",
    "dataset_description",
    "steps",
    "epochs",
    "command",
    "license",
    "model_name",
    "base_model",
    "evaluation",
)


def _training_sections(model: ScaleVAEForLatentLM, training: dict) -> tuple[str, str, str]:
    data = training.get("dataset")
    description = training.get("data") or training.get("dataset_description")
    if data or description:
        parts = [f"`{data}`." if data else "", str(description).rstrip(".") + "." if description else ""]
        training_data = " ".join(part for part in parts if part)
    else:
        training_data = "Not recorded: this folder was saved without a training record."
    steps = []
    for key, label in (("steps", "optimizer steps"), ("epochs", "epochs")):
        if training.get(key) is not None:
            steps.append(f"{training[key]} {label}")
    lines = [f"- Length of training: {', '.join(steps) if steps else 'not recorded'}."]
    arguments = {k: v for k, v in training.items() if k not in _RECIPE_KEYS}
    if arguments:
        lines.append("- Training arguments:")
        lines.extend(f"  - `{key}` = `{value}`" for key, value in sorted(arguments.items()))
    command = training.get("command")
    if command:
        lines.append("- Command that trained it:\n\n  ```bash\n  " + str(command).replace("\n", "\n  ") + "\n  ```")
    else:
        lines.append("- Command: not recorded.")
    hyper = non_default_hyperparameters(model.config)
    if hyper:
        table = ["| setting | value | default |", "| --- | --- | --- |"]
        table += [
            f"| `{_cell(key)}` | `{_cell(json.dumps(value))}` | "
            + (NOT_SET if default == NOT_SET else f"`{_cell(json.dumps(default))}`")
            + " |"
            for key, (value, default) in hyper.items()
        ]
        hyperparameters = "\n".join(table)
    else:
        hyperparameters = "None: every setting is `ScaleVAEConfig()`'s default."
    return training_data, "\n".join(lines), hyperparameters


def render_model_card(
    model: ScaleVAEForLatentLM,
    metrics: dict | None = None,
    training: dict | None = None,
    model_name: str | None = None,
) -> str:
    """The model card (README.md) text for `model`.

    `metrics`: figures measured on this very model: `nll`, `ppl`, `kl`, `mi`, `au`, `bleu` (see `CARD_METRICS`; an `eval_`
    prefix is accepted), other numeric figures (listed as reported), and string settings such as `dataset` and
    `split`. Without them every figure reads "not evaluated", and the card's metadata carries no model-index.
    `training`: the recipe: `dataset` (a Hub id, also listed in the metadata), `data` (a description of the training
    data), `steps`, `epochs`, `command`, `evaluation` (how the metrics were measured), `license`, `base_model` (the
    pretrained encoder's Hub id), `model_name`, and any training argument (learning rate, batch size, ...). The
    non-default model hyperparameters come from `model.config`.
    """
    training = _public_training(dict(training or {}))
    known, other, settings = _split_metrics(metrics)
    settings = {key: public_value(value) for key, value in settings.items()}
    model_name = model_name or training.get("model_name") or "scalevae-model"
    config = model.config
    if config.collapse_strategy == "scale":
        strategy_note = 'This model uses Scale-VAE (`collapse_strategy="scale"`).'
    else:
        strategy_note = (
            f"**This model is a baseline, not Scale-VAE**: it was trained with `collapse_strategy="
            f'"{config.collapse_strategy}"`. The Scale-VAE sections below describe the package\'s default remedy.'
        )
    training_data, recipe, hyperparameters = _training_sections(model, training)
    template = string.Template(card_template_path().read_text(encoding="utf-8"))
    return template.substitute(
        metadata=_yaml_metadata(model_name, known, other, settings, training).strip(),
        model_name=model_name,
        strategy_note=strategy_note,
        architecture=_architecture(model, training.get("base_model")),
        training_data=training_data,
        training_recipe=recipe,
        hyperparameters=hyperparameters,
        evaluation=_evaluation(known, other, settings, training),
        license=training.get("license", DEFAULT_LICENSE),
        format_version=SCALEVAE_FORMAT_VERSION,
    )


def write_model_card(
    folder: str | os.PathLike,
    model: ScaleVAEForLatentLM,
    metrics: dict | None = None,
    training: dict | None = None,
    model_name: str | None = None,
) -> Path:
    """Write `folder/README.md` (see `render_model_card`); the model name defaults to the folder's name."""
    path = Path(folder) / "README.md"
    path.write_text(
        render_model_card(model, metrics, training, model_name or Path(folder).resolve().name), encoding="utf-8"
    )
    return path


__all__ = [
    "card_template_path",
    "checkpoint_config_differences",
    "non_default_hyperparameters",
    "public_command",
    "public_value",
    "render_model_card",
    "write_model_card",
]


def describe_device() -> str:
    """The device a run trains on, as the card and the quickstart name it."""
    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    return f"CPU, {torch.get_num_threads()} threads"


def training_record(
    spec, data, command: str | None = None, steps: int | None = None, seconds: float | None = None, metrics=None
) -> dict:
    """The model card's record of how a run recipe's model (`scalevae.recipe.RunSpec`, `scalevae.data.RunData`) was
    trained: for a checkpoint the settings; for the final model also `command`, the `steps` trained in `seconds` and
    on what the figures of `metrics` (split -> figures) were measured. No credentials, no local paths: the card
    scrubs them."""

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
    if steps is not None:
        record["steps"] = steps
        record["training_time"] = f"{seconds:.0f} s ({seconds / max(steps, 1):.2f} s/step) on {describe_device()}"
    if metrics:
        split = "test" if "test" in metrics else next(iter(metrics))
        record["evaluation"] = (
            f"{len(data.dataset[split])} {split} sentences, {spec.run.num_importance_samples} importance samples"
        )
    return record
