"""Configuration of Scale-VAE: a BERT-style encoder, a Gaussian latent and a GPT-2 decoder.

This file travels inside every saved model folder (``trust_remote_code=True``): it imports only transformers.
"""

import copy
import dataclasses
import difflib
import types
import typing

import torch
from transformers import AutoConfig, PreTrainedConfig
from transformers.configuration_utils import SubConfigSpec

# The on-disk format this code writes and reads. Bump it when a saved folder's meaning changes, so an old
# package refuses a newer folder instead of silently misreading it.
#   1 (scalevae 0.1.0): the first release.
#   2 (scalevae 0.2.0): the generative prior (`prior`, `prior_momentum`; buffers `fitted_prior.*` for "fitted"),
#     `freeze_encoder`, and BN-VAE normalising without eps, with population statistics (buffers `collapse.running_*`
#     instead of `collapse.norm.*`). Format-1 folders load with prior="scaled", the prior they were trained and
#     evaluated with, except BN-VAE folders, whose normalisation changed meaning: they are refused.
#   Still 2: the priors "full" and "mixture" (buffers `fitted_prior.component_*`) and `prior_components`. An older
#     package refuses such a folder by its `prior` value; format-2 folders mean what they meant. The default prior
#     became "full" (chosen on validation: model_card.md); every format-2 config.json names its prior, so a folder
#     saved with the "fitted" default keeps it.
SCALEVAE_FORMAT_VERSION = 2

LATENT_INJECTIONS = ("memory", "embedding", "both")
COLLAPSE_STRATEGIES = ("scale", "vae", "free_bits", "bn", "ae")
SCALE_SCHEDULES = ("running", "epoch")
PRIORS = ("fitted", "scaled", "full", "mixture")

# The fields every config.json of a format holds (`save_pretrained` writes them all). A saved config missing one was
# truncated or hand-edited: loading it refuses rather than silently using a default. A field added without a format
# bump must not be listed, so that older folders keep loading with the new field's default.
FORMAT_1_FIELDS = (
    "encoder",
    "decoder",
    "latent_size",
    "latent_injection",
    "collapse_strategy",
    "kl_weight",
    "scale_target_std",
    "scale_momentum",
    "scale_min_std",
    "scale_schedule",
    "scale_freeze_steps",
    "scale_freeze_epochs",
    "free_bits",
    "bn_gamma",
    "scalevae_format_version",
)
FORMAT_2_FIELDS = ("prior", "prior_momentum", "freeze_encoder")

# The names public Scale-VAE reimplementations use, accepted as aliases.
PAPER_ALIASES = {"des_std": "scale_target_std", "f_epo": "scale_freeze_epochs"}

# Upper bounds on the sizes a config may ask for, checked before any tensor is allocated: a hand-edited or corrupted
# config.json with vocab_size=1e12 would otherwise try to allocate terabytes (and 1e8 would really allocate 25 GB)
# before failing. Each bound is well above any published model's value. "sub-config field": (bound, what it sizes).
SIZE_BOUNDS = {
    "latent_size": 1 << 16,
    "prior_components": 1 << 16,
    "encoder.vocab_size": 1 << 21,
    "encoder.hidden_size": 1 << 16,
    "encoder.num_hidden_layers": 1 << 10,
    "encoder.num_attention_heads": 1 << 10,
    "encoder.intermediate_size": 1 << 18,
    "encoder.max_position_embeddings": 1 << 17,
    "decoder.vocab_size": 1 << 21,
    "decoder.n_embd": 1 << 16,
    "decoder.n_layer": 1 << 10,
    "decoder.n_head": 1 << 10,
    "decoder.n_inner": 1 << 18,
    "decoder.n_positions": 1 << 17,
}


class ScaleVAEConfig(PreTrainedConfig):
    r"""
    Configuration of [`ScaleVAEForLatentLM`]. Like `EncoderDecoderConfig`, it nests the two parts' configs and
    adds the latent variable and the posterior-collapse remedy. `is_encoder_decoder` is always True: the model follows
    transformers' encoder-decoder conventions (encoder `input_ids`, decoder `decoder_input_ids`, `generate` returning
    decoder ids only); it is a property of the architecture, not a setting.

    Args:
        encoder (`PreTrainedConfig` or `dict`, *optional*):
            Any BERT-style encoder config (BERT, MiniLM, RoBERTa, ...). Defaults to a `BertConfig`.
        decoder (`PreTrainedConfig` or `dict`, *optional*):
            A `GPT2Config`. Defaults to `GPT2Config()`.
        latent_size (`int`, defaults to 32):
            Dimension of the latent z.
        latent_injection (`str`, defaults to `"memory"`):
            Where z enters the decoder (Optimus, Li et al. 2020): `"memory"` adds one key/value slot computed from z
            to every decoder layer; `"embedding"` adds a projection of z to every token embedding; `"both"`. The
            default is `"memory"` for every remedy: the added embedding grows with the latent (3.4 times the token
            embeddings' norm for Scale-VAE des_std 1 on Yelp), drowns which word was just written, and the decoder
            repeats words (docs/fluency.md); a memory slot competes with the tokens under attention instead.
        collapse_strategy (`str`, defaults to `"scale"`):
            `"scale"` (Scale-VAE), `"vae"` (plain VAE; KL annealing through `kl_weight`), `"free_bits"`, `"bn"`
            (BN-VAE) or `"ae"` (deterministic autoencoder, no KL in the loss).
        kl_weight (`float`, defaults to 1.0):
            β, the weight of the KL term. `forward(kl_weight=...)` overrides it for one call: KL schedules (annealing)
            pass β that way, so the config keeps the value it was built with.
        scale_target_std (`float`, defaults to 1.0):
            Scale-VAE's `des_std`: the std, across the batch, that each dimension of the scaled posterior mean f ⊙ μ
            is given; f_d = scale_target_std / std_batch(μ_d).
        scale_momentum (`float`, defaults to 0.05):
            Momentum of the running estimate of f kept in the `scale_factors` buffer, which the model uses whenever it
            is not training.
        scale_min_std (`float`, defaults to 1e-3):
            Floor on std_batch(μ_d), so a dimension whose means collapse to one value gets a finite factor.
        scale_schedule (`str`, defaults to `"running"`):
            `"running"`: training uses each batch's own factors, evaluation the running estimate; the factors freeze to
            the running estimate after `scale_freeze_steps` optimizer steps, if set. `"epoch"` (the `f_epo` schedule
            of public reimplementations): after `scale_freeze_epochs` epochs, training uses the mean of the last
            epoch's per-batch factors, frozen.
        scale_freeze_steps (`int`, *optional*):
            With `scale_schedule="running"`, the number of optimizer steps after which the factors stop changing. The
            training loop counts them by calling `model.collapse.end_step()` after each optimizer step (`make_trainer`
            does; under gradient accumulation that is once per accumulated step).
        scale_freeze_epochs (`int`, defaults to 1):
            With `scale_schedule="epoch"`, the number of epochs (`f_epo`) after which the factors freeze.
        free_bits (`float`, defaults to 0.5):
            Free-bits threshold λ, in nats per dimension, with Optimus's semantics: per example, a dimension whose KL is
            below λ contributes nothing to the loss (and gets no KL gradient).
        bn_gamma (`float`, defaults to 0.5):
            BN-VAE's fixed γ: μ is batch-normalised with scale γ, which bounds the expected KL below by
            latent_size · γ² / 2.
        word_dropout (`float`, defaults to 0.0):
            Word dropout (Bowman et al. 2016) for every remedy: in training, each text token of the decoder's input
            (never its BOS) has its embedding zeroed with this probability, so the next word must come from z and the
            words before it. In [0, 0.9]; off at evaluation and generation.
        prior (`str`, defaults to `"full"`):
            The generative model's prior p(z), used by `sample_prior`, `decoder_kl`, the ELBO and the
            importance-weighted NLL (training's loss keeps the KL of the original posterior to N(0, I) either way). The
            default was chosen on validation IW-NLL (model_card.md: it lowers every latent-using remedy's bound, a
            mixture adds little). `"fitted"`: a diagonal Gaussian N(m, diag s²) fitted to the aggregate of the
            decoder's posterior N(f ⊙ μ, σ²) over training data (a running estimate while training; `fit_prior` refits
            it exactly on a pass over data). `"scaled"`: N(0, diag f²), the standard normal pushed through the scale
            factors (f = 1 but for Scale-VAE). Folders saved before this field existed load with `"scaled"`, which is
            what they were trained and evaluated with. `"full"`: the full-covariance Gaussian fitted to the same
            aggregate (its exact mean and covariance). `"mixture"`: a mixture of `prior_components` full-covariance
            Gaussians fitted by EM to samples of that aggregate. These two are fitted by `fit_prior` only (the Trainer
            glue calls it after training); until then they equal the diagonal running estimate. Every collapse strategy
            can use every prior.
        prior_components (`int`, defaults to 4):
            The number of components of the `"mixture"` prior (ignored by the others).
        prior_momentum (`float`, defaults to 0.01):
            Momentum of the fitted prior's running estimate of the aggregate posterior's moments.
        freeze_encoder (`bool` or `int`, defaults to `False`):
            `True` freezes the whole pretrained encoder (only the latent head and the decoder train); an integer k
            freezes its embeddings and lower k layers. Frozen parameters get `requires_grad=False`.
        use_cache (`bool`, defaults to `True`):
            Whether `forward` returns the decoder's key/value cache when its `use_cache` argument is not given (as in
            transformers' decoders; exporters that fold `use_cache` into the config rely on it). Never in a training
            pass under gradient checkpointing. Not a required field: folders saved before it load with `True`.
        scalevae_version (`str`, *optional*):
            The version of the scalevae package that saved this config (`scalevae.hub.save_model` records it); error
            messages about a folder quote it next to the installed version.
    """

    model_type = "scalevae"
    sub_configs_defaults = {
        "encoder": SubConfigSpec(config_class=AutoConfig, model_type="bert"),
        "decoder": SubConfigSpec(config_class=AutoConfig, model_type="gpt2"),
    }

    encoder: PreTrainedConfig | dict | None = None
    decoder: PreTrainedConfig | dict | None = None
    latent_size: int = 32
    latent_injection: str = "memory"
    collapse_strategy: str = "scale"
    kl_weight: float = 1.0
    scale_target_std: float = 1.0
    scale_momentum: float = 0.05
    scale_min_std: float = 1e-3
    scale_schedule: str = "running"
    scale_freeze_steps: int | None = None
    scale_freeze_epochs: int = 1
    free_bits: float = 0.5
    bn_gamma: float = 0.5
    word_dropout: float = 0.0
    prior: str = "full"
    prior_components: int = 4
    prior_momentum: float = 0.01
    freeze_encoder: bool | int = False
    scalevae_format_version: int = SCALEVAE_FORMAT_VERSION
    scalevae_version: str | None = None

    def __post_init__(self, **kwargs):
        for alias, field in PAPER_ALIASES.items():
            if alias in kwargs:
                setattr(self, field, kwargs.pop(alias))
        # transformers' own names, read by transformers (generation, exporters): not declared as ScaleVAE fields, so
        # that `scalevae train`, which offers every declared field as an option, does not offer them.
        use_cache = kwargs.pop("use_cache", True)
        if not isinstance(use_cache, bool):
            raise ValueError(f"use_cache={use_cache!r} must be True or False.")
        self.use_cache = use_cache
        super().__post_init__(**kwargs)
        self.is_encoder_decoder = True  # PreTrainedConfig's field: the architecture's, whatever a caller passed
        self.validate_scalevae()

    @classmethod
    def _dict_from_json_file(cls, json_file):
        """A config.json as a dict, refused unless it is one JSON object of a Scale-VAE config. A file without
        `model_type` is read as a Scale-VAE config, so `from_dict` checks its required fields (a missing `model_type`
        must not turn the check off); any other `model_type` is another model's folder."""
        config_dict = super()._dict_from_json_file(json_file)
        if not isinstance(config_dict, dict):
            raise ValueError(
                f"{json_file} holds a JSON {type(config_dict).__name__}, not the JSON object of a config: the file is "
                "corrupted or is not a config.json."
            )
        model_type = config_dict.setdefault("model_type", cls.model_type)
        if model_type != cls.model_type:
            raise ValueError(
                f"{json_file} is the config of a {model_type!r} model, not of a Scale-VAE ({cls.model_type!r}): its "
                "field model_type says so."
            )
        return config_dict

    @classmethod
    def from_dict(cls, config_dict: dict, **kwargs):
        """`PreTrainedConfig.from_dict`, which every `from_pretrained` goes through. A saved config (one that names its
        `model_type`) must hold every format-1 field; any error names the folder's and the installed versions."""
        versions = (
            f"the folder was saved by scalevae {config_dict.get('scalevae_version') or 'unknown'} "
            f"(format {config_dict.get('scalevae_format_version', 'unknown')}); installed: scalevae "
            f"{_installed_scalevae_version()} (format {SCALEVAE_FORMAT_VERSION})"
        )
        if config_dict.get("model_type") == cls.model_type:
            check_saved_fields(config_dict)
            saved_format = config_dict.get("scalevae_format_version", 1)
            required = FORMAT_1_FIELDS + (FORMAT_2_FIELDS if saved_format >= 2 else ())
            missing = [field for field in required if field not in config_dict]
            if missing:
                raise ValueError(
                    f"config.json lacks the required field(s) {', '.join(missing)}; {versions}. The file was truncated "
                    "or edited: re-save the model rather than let a default stand in for a saved value."
                )
            if saved_format < 2:
                if config_dict.get("collapse_strategy") == "bn":
                    raise ValueError(
                        f"This BN-VAE folder cannot be read by this scalevae; {versions}. BN-VAE changed meaning in "
                        "format 2 (no eps under the batch variance, population statistics in evaluation), so its "
                        "saved statistics would be misread. Retrain it, or load it with scalevae 0.1.0."
                    )
                config_dict = {"prior": "scaled", **config_dict}  # what format-1 folders were trained with
        try:
            return super().from_dict(config_dict, **kwargs)
        except ValueError as error:
            raise ValueError(f"{error} ({versions})") from error

    def validated_copy(self, **changes) -> "ScaleVAEConfig":
        """A copy of this config with `changes` applied, validated: setters build what they need from it and only then
        assign, so a refused value leaves the config (and the next save) as it was."""
        candidate = copy.deepcopy(self)
        for field, value in changes.items():
            if not hasattr(self, field):
                close = difflib.get_close_matches(field, list(self.to_dict()), n=1)
                hint = f" Did you mean {close[0]!r}?" if close else ""
                raise ValueError(f"{field!r} is not a ScaleVAEConfig field.{hint}")
            setattr(candidate, field, value)
        candidate.validate_scalevae()
        return candidate

    def validate_scalevae(self):
        """Raise a `ValueError` naming the field and its allowed values for every setting this code cannot honour."""
        if self.scalevae_format_version > SCALEVAE_FORMAT_VERSION:
            raise ValueError(
                f"scalevae_format_version={self.scalevae_format_version} was written by a newer scalevae; this code "
                f"reads format {SCALEVAE_FORMAT_VERSION} and older. Upgrade scalevae to load it."
            )
        choices = {
            "latent_injection": LATENT_INJECTIONS,
            "collapse_strategy": COLLAPSE_STRATEGIES,
            "scale_schedule": SCALE_SCHEDULES,
            "prior": PRIORS,
        }
        for field, allowed in choices.items():
            if getattr(self, field) not in allowed:
                raise ValueError(f"{field}={getattr(self, field)!r} is not one of {allowed}.")
        self._validate_sizes()
        positive_int = {"scale_freeze_epochs": self.scale_freeze_epochs}
        if self.scale_freeze_steps is not None:
            positive_int["scale_freeze_steps"] = self.scale_freeze_steps
        for field, value in positive_int.items():
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{field}={value!r} must be an integer >= 1.")
        # field: (low, high, low inclusive). The upper bounds keep float32 arithmetic finite: f = target / std with
        # std ≥ scale_min_std, and exp-free KL terms of size kl_weight · γ² stay far below float32's range.
        ranges = {
            "kl_weight": (0.0, 1e6, True),
            "scale_target_std": (0.0, 1e3, False),
            "scale_momentum": (0.0, 1.0, False),
            "scale_min_std": (0.0, 1e3, False),
            "free_bits": (0.0, 1e3, True),
            "bn_gamma": (0.0, 1e3, False),
            "prior_momentum": (0.0, 1.0, False),
            "word_dropout": (0.0, 0.9, True),
        }
        for field, (low, high, inclusive) in ranges.items():
            value = getattr(self, field)
            ok = isinstance(value, (int, float)) and not isinstance(value, bool) and value <= high
            ok = ok and (value >= low if inclusive else value > low) and value == value  # value == value rejects NaN
            if not ok:
                bracket = "[" if inclusive else "("
                raise ValueError(f"{field}={value!r} must be a finite number in {bracket}{low}, {high}].")
        layers = getattr(self.encoder, "num_hidden_layers", None)
        frozen = self.freeze_encoder
        if not isinstance(frozen, (bool, int)) or (
            not isinstance(frozen, bool) and not (0 <= frozen <= (layers if layers is not None else frozen))
        ):
            raise ValueError(
                f"freeze_encoder={frozen!r} must be True, False or a number of lower encoder layers in [0, {layers}]."
            )
        if self.decoder.model_type != "gpt2":
            raise ValueError(f"decoder.model_type={self.decoder.model_type!r}: the decoder must be a GPT-2 config.")

    def _validate_sizes(self):
        """Every size the model allocates from (`SIZE_BOUNDS`) is an integer in [1, bound]; the attention heads
        divide the width. Run before any tensor exists."""
        for name, bound in SIZE_BOUNDS.items():
            owner, field = (self, name) if "." not in name else (getattr(self, name.split(".")[0]), name.split(".")[1])
            value = getattr(owner, field, None)
            if value is None and name in ("decoder.n_inner", "encoder.intermediate_size"):
                continue  # GPT-2's n_inner=None means 4 * n_embd
            if value is None and "." in name and not hasattr(owner, field):
                continue  # an encoder type without this field (DistilBERT's dim, ...)
            if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= bound:
                raise ValueError(
                    f"{name}={value!r} must be an integer in [1, {bound}] (the bound keeps a corrupted or hand-edited "
                    "config.json from allocating what no machine holds)."
                )
        for width, heads in (
            ("encoder.hidden_size", "encoder.num_attention_heads"),
            ("decoder.n_embd", "decoder.n_head"),
        ):
            part = getattr(self, width.split(".")[0])
            w, h = getattr(part, width.split(".")[1], None), getattr(part, heads.split(".")[1], None)
            if isinstance(w, int) and isinstance(h, int) and w % h:
                raise ValueError(f"{width}={w} is not a multiple of {heads}={h}.")

    @property
    def des_std(self) -> float:
        """The paper-reimplementation name of `scale_target_std`."""
        return self.scale_target_std

    @property
    def f_epo(self) -> int:
        """The paper-reimplementation name of `scale_freeze_epochs`."""
        return self.scale_freeze_epochs


# Keys a saved config.json may hold besides the config's dataclass fields, with their JSON types: what transformers
# writes about the file and the model class, and the fields set outside the dataclass (`use_cache`, the output flags).
FILE_KEY_TYPES = {
    "model_type": (str,),
    "auto_map": (dict, type(None)),
    "use_cache": (bool,),
    "output_attentions": (bool,),
    "torch_dtype": (str, type(None)),
    "tie_encoder_decoder": (bool,),
}
# Sub-configs are JSON objects in a saved file: a null would silently stand in the default BERT or GPT-2.
SAVED_SUB_CONFIGS = ("encoder", "decoder")


def _json_types(annotation) -> tuple:
    """The JSON value types a dataclass field's annotation accepts (a sub-config is an object, a dtype its name)."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        return tuple(t for arg in typing.get_args(annotation) for t in _json_types(arg))
    if origin is typing.Literal:
        return tuple({type(arg) for arg in typing.get_args(annotation)})
    annotation = origin or annotation
    if annotation is type(None):
        return (type(None),)
    if annotation is float:
        return (int, float)
    if annotation is torch.dtype:
        return (str,)
    if isinstance(annotation, type) and issubclass(annotation, PreTrainedConfig):
        return (dict,)
    return (annotation,) if isinstance(annotation, type) else (object,)


def _list_element_type(annotation):
    """The item type of a `list[X]` member of an annotation (None when it has none)."""
    for arg in (annotation, *typing.get_args(annotation)):
        if typing.get_origin(arg) is list and typing.get_args(arg):
            return typing.get_args(arg)[0]
    return None


def _json_kind(value) -> str:
    if value is None:
        return "null"
    return {bool: "boolean", int: "integer", float: "number", str: "string", list: "array", dict: "object"}.get(
        type(value), type(value).__name__
    )


def check_saved_fields(config_dict: dict) -> None:
    """Refuse a saved config whose keys are unknown (with the closest known name) or whose values have another JSON
    type than the field takes, naming the field: each would otherwise fail deep in transformers, or load a config that
    is not the one saved (a null sub-config becomes the default BERT)."""
    # transformers writes some annotations as strings naming torch: resolved with it in scope.
    hints = typing.get_type_hints(ScaleVAEConfig, localns={"torch": torch})
    fields = {item.name: hints.get(item.name, object) for item in dataclasses.fields(ScaleVAEConfig)}
    for key, value in config_dict.items():
        if key.startswith("_"):  # transformers' bookkeeping (_name_or_path, _commit_hash, ...)
            continue
        if key in SAVED_SUB_CONFIGS:
            allowed = (dict,)
        elif key in fields:
            allowed = _json_types(fields[key])
        elif key in FILE_KEY_TYPES:
            allowed = FILE_KEY_TYPES[key]
        else:
            known = sorted(set(fields) | set(FILE_KEY_TYPES) | set(PAPER_ALIASES))
            close = difflib.get_close_matches(key, known, n=1)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            raise ValueError(f"config.json has the unknown field {key!r}.{hint} A Scale-VAE config has: {known}.")
        # JSON booleans are Python ints: an integer field takes no boolean unless it names bool itself.
        wrong_bool = isinstance(value, bool) and bool not in allowed
        if wrong_bool or not isinstance(value, allowed):
            kinds = sorted({_json_kind(t()) if t is not type(None) else "null" for t in allowed if t is not object})
            raise ValueError(
                f"config.json field {key!r} is {value!r}, a JSON {_json_kind(value)}; it must be a JSON "
                f"{' or '.join(kinds)}."
            )
        if key in SAVED_SUB_CONFIGS and not isinstance(value.get("model_type"), str):
            raise ValueError(
                f"config.json field {key!r} names no model_type: a saved sub-config always does, and without it the "
                "default config of the part would silently stand in for the saved one."
            )
        element = _list_element_type(fields.get(key))
        if isinstance(value, list) and element and not all(isinstance(item, element) for item in value):
            raise ValueError(f"config.json field {key!r} is {value!r}: every item must be a JSON string.")
        if (
            key in ("dtype", "torch_dtype")
            and isinstance(value, str)
            and not isinstance(getattr(torch, value, None), torch.dtype)
        ):
            raise ValueError(f"config.json field {key!r} is {value!r}, not the name of a torch dtype (float32, ...).")


def _installed_scalevae_version() -> str:
    """The installed scalevae package's version (this file also runs without it, as a folder's remote code)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("scalevae")
    except PackageNotFoundError:
        return "not installed"


__all__ = ["ScaleVAEConfig"]

# Every save (save_pretrained, Trainer checkpoints, push_to_hub) copies this file and records it in config.json's
# auto_map, so `AutoConfig.from_pretrained(folder, trust_remote_code=True)` works without the scalevae package.
ScaleVAEConfig.register_for_auto_class()
