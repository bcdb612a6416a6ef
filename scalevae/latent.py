"""Latent-space operations on a trained model, from text to text: encode, decode, reconstruct, sample, interpolate,
analogy and traversal; attribute directions and edits along them (`AttributeDirection`); label-conditional sampling
from one Gaussian per class (`LatentClasses`, kept beside the model as `latent_classes.safetensors`).

Labels are compared as strings (`1` and `"1"` are the same class, as in a label file), stripped of surrounding spaces.
"""

import contextlib
import functools
import inspect
import json
import logging
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from checks_scalevae import MAX_GENERATION_ROWS, ArgumentError, check_generator, check_integer, check_number
from loading_scalevae import (
    WEIGHTS_DIGEST_KEY,
    folder_or_hub_id,
    read_safetensors_header,
    read_snapshot,
    weights_files_in,
)
from modeling_scalevae import ScaleVAEForLatentLM

from .factory import decoder_special_token_ids, load_pretrained

logger = logging.getLogger(__name__)

# The per-class Gaussians' file in a saved model folder, and the format its metadata names.
CLASSES_FILE = "latent_classes.safetensors"
CLASSES_FORMAT = "scalevae-latent-classes-1"
# Added to every class covariance, relative to its mean variance: a class with fewer texts than latent dimensions, or
# an autoencoder's unused dimensions, would otherwise give a singular matrix that has no Cholesky factor.
COVARIANCE_RIDGE = 1e-5
DIRECTION_METHODS = ("mean", "logistic")
COVARIANCES = ("full", "diagonal")


# ---------------------------------------------------------------------------------------------------------------------
# Input checks shared by the methods (the messages name the argument)
# ---------------------------------------------------------------------------------------------------------------------


def _text_list(texts, name: str = "texts", allow_empty: bool = False) -> list[str]:
    """`texts` (any iterable of strings: a list, a tuple, a generator, a numpy array) as a list of str; an
    ArgumentError naming `name` for one string, a non-iterable, an empty list or an item that is no non-empty text."""
    if isinstance(texts, (str, bytes)):
        raise ArgumentError(f"{name} must be a list of texts, got one string: wrap it as [{name}].")
    if isinstance(texts, (Mapping, torch.Tensor)) or not hasattr(texts, "__iter__"):
        raise ArgumentError(f"{name} must be a list of texts, not {type(texts).__name__}.")
    texts = list(texts)
    if not texts and not allow_empty:
        raise ArgumentError(f"{name} is empty: give at least one text.")
    for i, text in enumerate(texts):
        if not isinstance(text, str) or not text.strip():
            raise ArgumentError(f"{name}[{i}] is {text!r}: every text must be a non-empty string.")
    return [str(text) for text in texts]  # numpy's str_ items as plain str, what tokenizers take


def _latent_matrix(latents, latent_size: int, name: str = "latents") -> torch.Tensor:
    """`latents` (a tensor, a numpy array or nested lists of numbers) as a float tensor of shape (n, latent_size)."""
    if not isinstance(latents, torch.Tensor):
        try:
            latents = torch.as_tensor(latents)
        except (TypeError, ValueError, RuntimeError) as error:
            raise ArgumentError(
                f"{name} must be a tensor or array of shape (n, {latent_size}), not {type(latents).__name__} "
                f"({error})."
            ) from None
    if not latents.is_floating_point():
        raise ArgumentError(f"{name} must be floating point, got dtype {latents.dtype}.")
    if latents.dim() != 2 or latents.shape[1] != latent_size:
        raise ArgumentError(f"{name} of shape {tuple(latents.shape)}: expected (n, {latent_size}), one row per text.")
    return latents


def _strengths(strength, rows: int) -> torch.Tensor:
    """An edit's strength, one number or one per row, as a float64 column (rows, 1)."""
    if isinstance(strength, (str, bytes)):
        raise ArgumentError(f"strength={strength!r} must be a number or one number per text, not a string.")
    scalar = isinstance(strength, (int, float)) or getattr(strength, "ndim", None) == 0
    if scalar:
        return torch.full((rows, 1), check_number("strength", strength), dtype=torch.float64)
    try:
        step = torch.as_tensor(strength, dtype=torch.float64).cpu()
    except (TypeError, ValueError, RuntimeError):
        raise ArgumentError(f"strength={strength!r} must be a number or one number per text.") from None
    if step.shape != (rows,):
        raise ArgumentError(f"strength holds {tuple(step.shape)} values: give one number or one per text ({rows}).")
    if not torch.isfinite(step).all():
        raise ArgumentError(f"strength must be finite, got {step.tolist()}.")
    return step.unsqueeze(1)


def _label_list(labels, texts: list[str]) -> list[str]:
    if isinstance(labels, str):
        raise ValueError("labels must be a list with one label per text, got one string.")
    if isinstance(labels, torch.Tensor):
        labels = labels.tolist()
    labels = [str(label).strip() for label in labels]
    if len(labels) != len(texts):
        raise ValueError(f"{len(texts)} texts but {len(labels)} labels: give one label per text.")
    return labels


@torch.no_grad()
def posterior_means(model, batches) -> tuple[torch.Tensor, torch.Tensor]:
    """(mu, decoder_mu) of every sentence of `batches` (mappings with `input_ids` and `attention_mask`: a DataLoader
    of a tokenised dataset, or `encoded_batches` of texts), in eval mode, on the CPU."""
    mus, decoder_mus = [], []
    with evaluating(model):
        for batch in batches:
            posterior = model.encode(batch["input_ids"].to(model.device), batch["attention_mask"].to(model.device))
            mus.append(posterior.mu.float().cpu())
            decoder_mus.append(posterior.decoder_mu.float().cpu())
    return torch.cat(mus), torch.cat(decoder_mus)


def encoded_batches(encoder_tokenizer, texts: Sequence[str], max_length: int, batch_size: int):
    """The encoder's inputs of `texts`, `batch_size` at a time, padded and cut to `max_length` tokens. A batch of empty
    texts only is encoded as one padding position, masked out, so every empty text gets the same latent."""
    for start in range(0, len(texts), batch_size):
        batch = encoder_tokenizer(
            list(texts[start : start + batch_size]),
            padding=True,
            truncation=True,
            max_length=max_length,
            return_tensors="pt",
        )
        ids, mask = batch["input_ids"], batch["attention_mask"]
        if ids.shape[1] == 0:
            ids, mask = ids.new_full((len(ids), 1), encoder_tokenizer.pad_token_id or 0), mask.new_zeros(len(ids), 1)
        yield {"input_ids": ids, "attention_mask": mask}


@contextlib.contextmanager
def evaluating(model):
    """Eval mode inside (Scale-VAE's saved factors, BN-VAE's population statistics, no dropout; a model left in
    training mode by a Trainer would otherwise encode with batch statistics and update its running ones), and the
    model's previous mode restored on exit."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def every_method_in_eval_mode(cls):
    """Class decorator: every public method of `cls` runs its model in eval mode (`evaluating`), so that no method,
    including one added later, decodes with dropout or writes a running statistic of a model left in training mode."""
    for name, member in list(vars(cls).items()):
        if not name.startswith("_") and inspect.isfunction(member):
            setattr(cls, name, _in_eval_mode(member))
    return cls


def _in_eval_mode(method):
    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        with evaluating(self.model):
            return method(self, *args, **kwargs)

    return wrapper


# ---------------------------------------------------------------------------------------------------------------------
# Attribute directions
# ---------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class AttributeDirection:
    """A direction in the decoder's latent space, from the texts of one class (`source`) to those of another
    (`target`), and the unit edits along it are measured in.

    `vector` is a unit vector (float32, CPU). `spread` is the distance along it between the two classes' mean latents:
    an edit of strength s moves a latent by s · spread · vector, so strength 1 carries a text from where the source
    class sits on average to where the target class sits, whatever the model's latent scale (Scale-VAE's factors,
    BN-VAE's γ, a collapsed VAE's tiny means): the same number means the same on every model. Negative strengths move
    towards `source`. `within_std` is the pooled within-class standard deviation of the texts' projections on `vector`;
    spread / within_std (`separation`) says how far apart the classes are along it. `method`: `"mean"` (difference of
    the class means) or `"logistic"` (the normal of a logistic regression between the two classes).
    """

    vector: torch.Tensor
    spread: float
    source: str
    target: str
    within_std: float
    method: str = "mean"

    @property
    def separation(self) -> float:
        return self.spread / self.within_std if self.within_std > 0 else math.inf

    def sign_towards(self, label) -> float:
        """+1 to move a text towards `label` when it is the target, -1 when it is the source."""
        label = str(label).strip()
        if label == self.target:
            return 1.0
        if label == self.source:
            return -1.0
        raise ValueError(f"label {label!r} is not one of this direction's classes ({self.source!r}, {self.target!r}).")


def _mean_direction(source: torch.Tensor, target: torch.Tensor, method: str, seed: int = 0) -> torch.Tensor:
    """The (unnormalised) direction from `source` latents to `target` latents, float64."""
    if method == "mean":
        return target.mean(0) - source.mean(0)
    import numpy as np

    try:
        from sklearn.linear_model import LogisticRegression
    except ImportError as error:
        raise ImportError("method='logistic' needs scikit-learn: pip install 'scalevae[probe]'.") from error

    features = torch.cat([source, target]).cpu().numpy()
    classes = np.r_[np.zeros(len(source)), np.ones(len(target))]
    classifier = LogisticRegression(max_iter=1000, random_state=seed).fit(features, classes)
    return torch.from_numpy(classifier.coef_[0]).to(source)  # points towards class 1, the target


def fit_direction(
    latents: torch.Tensor, labels: Sequence[str], source: str, target: str, method: str = "mean"
) -> AttributeDirection:
    """The `AttributeDirection` from the `source` rows of `latents` (n, d) to its `target` rows (`labels`: n
    strings); rows of other classes are ignored."""
    if method not in DIRECTION_METHODS:
        raise ValueError(f"method={method!r} is not one of {DIRECTION_METHODS}.")
    z = latents.detach().double()
    rows = {name: torch.tensor([label == name for label in labels], device=z.device) for name in (source, target)}
    source_z, target_z = z[rows[source]], z[rows[target]]
    raw = _mean_direction(source_z, target_z, method)
    norm = raw.norm()
    if not torch.isfinite(norm) or norm == 0:
        raise ValueError(
            f"classes {source!r} and {target!r} have the same latents on this model: no direction separates them."
        )
    vector = raw / norm
    source_p, target_p = source_z @ vector, target_z @ vector
    spread = float(target_p.mean() - source_p.mean())
    if not spread > 0:
        raise ValueError(
            f"the {method} direction does not separate the class means of {source!r} and {target!r} (gap {spread:g})."
        )
    squares = (source_p - source_p.mean()).pow(2).sum() + (target_p - target_p.mean()).pow(2).sum()
    within_std = float((squares / (len(source_p) + len(target_p))).sqrt())
    return AttributeDirection(vector.float().cpu(), spread, source, target, within_std, method)


# ---------------------------------------------------------------------------------------------------------------------
# One Gaussian per class, for label-conditional sampling
# ---------------------------------------------------------------------------------------------------------------------


@dataclass
class LatentClasses:
    """One Gaussian N(mean_c, cov_c) per class in the decoder's latent space, for label-conditional sampling.

    Each is fitted to the class's aggregate posterior, like the model's fitted prior: mean_c = E[f ⊙ μ] and
    cov_c = Cov(f ⊙ μ) + diag(E[σ²]) over the class's texts (no σ² for the autoencoder, whose σ is never trained).
    The covariance is full by default: per class there are typically thousands of texts for a few dozen dimensions,
    enough for the d(d+1)/2 entries, and the decoder's latent has correlated dimensions that a diagonal Gaussian would
    fill in with mass where no text of the class sits (`"diagonal"` keeps only the variances). A ridge of
    `COVARIANCE_RIDGE` times the mean variance keeps every matrix invertible. Statistics are float64 on the CPU:
    sampling draws the same latents on every device.
    """

    labels: tuple[str, ...]
    means: torch.Tensor  # (k, d) float64
    covariances: torch.Tensor  # (k, d, d) float64
    counts: torch.Tensor  # (k,) int64
    covariance: str = "full"

    @classmethod
    def fit(
        cls, decoder_mu: torch.Tensor, variance: torch.Tensor | None, labels: Sequence[str], covariance: str = "full"
    ) -> "LatentClasses":
        """From the texts' decoder means (n, d), their posterior variances (n, d; None: none) and labels."""
        if covariance not in COVARIANCES:
            raise ValueError(f"covariance={covariance!r} is not one of {COVARIANCES}.")
        names = tuple(sorted(set(labels)))
        z = decoder_mu.detach().double().cpu()
        means, covariances, counts = [], [], []
        for name in names:
            rows = torch.tensor([label == name for label in labels])
            if int(rows.sum()) < 2:
                raise ValueError(f"class {name!r} has {int(rows.sum())} text: a class's Gaussian needs at least 2.")
            x = z[rows]
            centred = x - x.mean(0)
            cov = centred.T @ centred / len(x)
            if variance is not None:
                cov = cov + torch.diag(variance.detach().double().cpu()[rows].mean(0))
            if covariance == "diagonal":
                cov = torch.diag(torch.diagonal(cov))
            ridge = COVARIANCE_RIDGE * max(float(torch.diagonal(cov).mean()), 1e-12)
            means.append(x.mean(0))
            covariances.append(cov + ridge * torch.eye(len(cov), dtype=cov.dtype))
            counts.append(len(x))
        return cls(names, torch.stack(means), torch.stack(covariances), torch.tensor(counts), covariance)

    @property
    def latent_size(self) -> int:
        return self.means.shape[1]

    def index(self, label) -> int:
        label = str(label).strip()
        if label not in self.labels:
            raise ValueError(f"label {label!r} is unknown: the fitted classes are {list(self.labels)}.")
        return self.labels.index(label)

    def sample(self, label, num_samples: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """`num_samples` latents (float64, CPU) from the class `label`'s Gaussian; the noise is drawn on the
        generator's device (CPU without one), so a seed gives the same latents wherever the model is."""
        num_samples = check_integer("num_samples", num_samples, 1, MAX_GENERATION_ROWS)
        check_generator("generator", generator)
        i = self.index(label)
        device = generator.device if generator is not None else torch.device("cpu")
        noise = torch.randn(num_samples, self.latent_size, generator=generator, device=device, dtype=torch.float64)
        return self.means[i] + noise.cpu() @ torch.linalg.cholesky(self.covariances[i]).T

    def checksum(self) -> str:
        """A SHA-256 of everything the file holds: labels in their order, covariance kind and every tensor's dtype,
        shape and bytes (a flipped bit or reordered labels change it)."""
        import hashlib

        digest = hashlib.sha256(json.dumps([list(self.labels), self.covariance]).encode())
        for tensor in (self.means, self.covariances, self.counts):
            digest.update(f"{tensor.dtype}{tuple(tensor.shape)}".encode())
            digest.update(tensor.contiguous().cpu().numpy().tobytes())
        return f"sha256:{digest.hexdigest()}"

    def save(self, path: str | os.PathLike, weights_checksum: str | None = None) -> Path:
        """Write the statistics to one safetensors file (labels, settings and their own checksum in its metadata),
        atomically: a temporary file beside it is renamed over it."""
        from safetensors.torch import save_file

        path = Path(path)
        metadata = {
            "format": CLASSES_FORMAT,
            "labels": json.dumps(list(self.labels)),
            "covariance": self.covariance,
            "checksum": self.checksum(),
        }
        if weights_checksum:
            metadata["weights_checksum"] = weights_checksum
        tensors = {"means": self.means, "covariances": self.covariances, "counts": self.counts}
        temporary = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        try:
            save_file({k: v.contiguous() for k, v in tensors.items()}, str(temporary), metadata=metadata)
            os.replace(temporary, path)
        finally:
            temporary.unlink(missing_ok=True)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike, latent_size: int | None = None) -> tuple["LatentClasses", dict]:
        """The statistics `save` wrote, bit for bit, and the file's metadata, validated: format, checksum, labels,
        shapes (`latent_size`: the model's), finite values, counts, symmetric positive-definite covariances. Raises a
        ValueError naming the file and what is wrong."""
        from safetensors import SafetensorError, safe_open

        try:
            with safe_open(str(path), framework="pt") as handle:
                metadata = handle.metadata() or {}
                if metadata.get("format") != CLASSES_FORMAT:
                    raise ValueError(f"it is not a {CLASSES_FORMAT} file (format {metadata.get('format')!r})")
                missing = sorted({"means", "covariances", "counts"} - set(handle.keys()))
                if missing:
                    raise ValueError(f"it lacks the tensor(s) {', '.join(missing)}")
                tensors = {key: handle.get_tensor(key) for key in ("means", "covariances", "counts")}
            labels = json.loads(metadata.get("labels", "null"))
            if not isinstance(labels, list) or not all(isinstance(label, str) for label in labels):
                raise ValueError("its labels are not a list of strings")
            covariance = metadata.get("covariance", "full")
            if covariance not in COVARIANCES:
                raise ValueError(f"covariance={covariance!r} is not one of {COVARIANCES}")
            classes = cls(tuple(labels), **tensors, covariance=covariance)
            recorded = metadata.get("checksum")
            if recorded is not None and recorded != classes.checksum():
                raise ValueError("its contents do not match the checksum recorded when it was saved (corrupted)")
            classes._validate(latent_size)
        except (SafetensorError, OSError, ValueError, TypeError) as error:
            reason = "truncated or not a safetensors file" if isinstance(error, SafetensorError) else str(error)
            raise ValueError(f"{path}: {reason}.") from None
        return classes, metadata

    def _validate(self, latent_size: int | None) -> None:
        k = len(self.labels)
        if len(set(self.labels)) != k or k == 0:
            raise ValueError(f"its {k} labels are empty or repeat one")
        d = self.means.shape[-1] if self.means.dim() == 2 else -1
        shapes = {"means": (k, d), "covariances": (k, d, d), "counts": (k,)}
        for name, shape in shapes.items():
            tensor = getattr(self, name)
            if tuple(tensor.shape) != shape:
                raise ValueError(
                    f"{name} has shape {tuple(tensor.shape)}, but {k} labels need {shape} (means {tuple(self.means.shape)})"
                )
        if latent_size is not None and d != latent_size:
            raise ValueError(
                f"its classes have {d} dimensions, the model's latent {latent_size} (fitted on another model)"
            )
        if not self.means.is_floating_point() or not self.covariances.is_floating_point():
            raise ValueError("its means and covariances are not floating point")
        if not (torch.isfinite(self.means).all() and torch.isfinite(self.covariances).all()):
            raise ValueError("its means or covariances hold NaN or infinite values")
        if self.counts.is_floating_point() or bool((self.counts < 2).any()):
            raise ValueError(f"its counts {self.counts.tolist()} are not whole numbers >= 2")
        covariances = self.covariances.double()
        if not torch.allclose(covariances, covariances.transpose(1, 2), rtol=1e-6, atol=0):
            raise ValueError("a covariance is not symmetric")
        failed = torch.linalg.cholesky_ex(covariances).info
        if bool((failed != 0).any()):
            bad = [self.labels[i] for i in (failed != 0).nonzero().flatten().tolist()]
            raise ValueError(f"the covariance of class(es) {bad} is not positive definite")


def folder_weights_checksum(folder: str | os.PathLike) -> str | None:
    """The checksums recorded in a local folder's weights files (one string; None when there are none)."""
    digests = []
    for path in weights_files_in(str(folder)):
        digests.append((read_safetensors_header(path)[1].get("__metadata__") or {}).get(WEIGHTS_DIGEST_KEY))
    return ",".join(digests) if digests and all(digests) else None


def _classes_of(path, model: ScaleVAEForLatentLM, hub_kwargs: dict) -> tuple["LatentClasses | None", str | None]:
    """The class statistics saved beside the model at `path` (a local folder or a Hub id), or None, and why they were
    not loaded. An optional file never blocks loading the model: statistics fitted on other weights (the folder's
    weights checksum changed since), or a file that fails its checks (`LatentClasses.load`), are left out with a
    warning naming the file; `sample(label=...)` then says why it has no classes."""
    if os.path.isdir(str(path)):
        file = Path(path) / CLASSES_FILE
        file = str(file) if file.is_file() else None
    else:
        from transformers.utils import cached_file

        file = cached_file(
            str(path),
            CLASSES_FILE,
            _raise_exceptions_for_missing_entries=False,
            _raise_exceptions_for_connection_errors=False,
            **{k: v for k, v in hub_kwargs.items() if k in ("revision", "token", "cache_dir", "local_files_only")},
        )
    if file is None:
        return None, None
    try:
        classes, metadata = LatentClasses.load(file, latent_size=model.config.latent_size)
    except ValueError as error:
        reason = f"{error} Not loaded: refit the classes (fit_classes) and save them again (save_classes)."
        logger.warning("%s", reason)
        return None, reason
    recorded = metadata.get("weights_checksum")
    current = folder_weights_checksum(path) if os.path.isdir(str(path)) else None
    if recorded and current and recorded != current:
        reason = f"{file} was fitted on other weights than this folder's: not loaded; refit it."
        logger.warning("%s", reason)
        return None, reason
    return classes, None


def decoding_defaults(model: ScaleVAEForLatentLM, decoder_tokenizer):
    """LatentText's own complete decoding settings: greedy, one text per latent, plain ids returned (every other
    setting at transformers' defaults), and the special ids of the decoder's tokenizer, falling back to the model's
    decoder config for a tokenizer without a pad token."""
    from transformers import GenerationConfig

    bos_id, eos_id = decoder_special_token_ids(decoder_tokenizer)
    pad_id = decoder_tokenizer.pad_token_id
    if pad_id is None:
        pad_id = model.config.decoder.pad_token_id if model.config.decoder.pad_token_id is not None else eos_id
    return GenerationConfig(
        bos_token_id=bos_id,
        eos_token_id=eos_id,
        pad_token_id=pad_id,
        decoder_start_token_id=bos_id,
        do_sample=False,
        num_beams=1,
        num_return_sequences=1,
        return_dict_in_generate=False,
    )


@every_method_in_eval_mode
class LatentText:
    """Text-level operations on a trained model: one object holding the model, its two tokenizers and, once fitted or
    loaded, the per-class Gaussians of label-conditional sampling (`classes`).

    Methods that take lists of texts encode and decode them `batch_size` at a time, on the model's device. Every method
    runs the model in eval mode (and restores its mode after): a model left in training mode would decode with dropout
    and update its running statistics."""

    def __init__(
        self,
        model: ScaleVAEForLatentLM,
        encoder_tokenizer,
        decoder_tokenizer,
        max_length: int | None = None,
        classes: LatentClasses | None = None,
    ):
        if not isinstance(model, ScaleVAEForLatentLM):
            raise ArgumentError(f"model must be a ScaleVAEForLatentLM, not {type(model).__name__}.")
        self.model, self.encoder_tokenizer, self.decoder_tokenizer = model, encoder_tokenizer, decoder_tokenizer
        self.max_length = max_length
        self.classes = classes
        self.classes_not_loaded: str | None = None  # why a folder's latent_classes.safetensors was left out
        # LatentText decodes with its own defaults (greedy, one text per latent, ids returned): a folder's
        # generation_config.json must not turn the documented-greedy reconstruct random or multiply sample's texts.
        # It is kept here, and applies where the caller passes it: decode(z, generation_config=text.folder_generation_config).
        self.folder_generation_config = model.generation_config
        model.generation_config = decoding_defaults(model, decoder_tokenizer)

    @property
    def max_length(self) -> int:
        """Tokens per text, special tokens included, that encoding keeps and decoding generates by default."""
        return self._max_length

    @max_length.setter
    def max_length(self, value) -> None:  # checked before it is kept: a bad value never reaches a tokenizer call
        """None: 64, or fewer where the model's positions are fewer (`scalevae.options.max_length_limit`). A larger
        value is kept: decoding stops at the decoder's positions, and encoding refuses, naming them, a text longer
        than the encoder's."""
        from .options import max_length_limit

        if value is None:
            value = min(64, max_length_limit(self.model.config)[0])
        self._max_length = check_integer("max_length", value, 2, 1 << 17)

    @property
    def classes(self) -> "LatentClasses | None":
        """The per-class Gaussians of `sample(label=...)` (`fit_classes`, or the folder's saved ones)."""
        return self._classes

    @classes.setter
    def classes(self, value) -> None:
        if value is not None and not isinstance(value, LatentClasses):
            raise ArgumentError(f"classes must be LatentClasses or None, not {type(value).__name__}.")
        if value is not None and value.latent_size != self.model.config.latent_size:
            raise ArgumentError(
                f"classes have {value.latent_size} dimensions, the model's latent {self.model.config.latent_size}."
            )
        self._classes = value

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, **kwargs) -> "LatentText":
        """A saved folder's model and tokenizers, and its per-class Gaussians when it has a `latent_classes.safetensors`
        (`save_classes`)."""

        def load():
            text = cls(*load_pretrained(path, **kwargs))
            text.classes, text.classes_not_loaded = _classes_of(folder_or_hub_id(path), text.model, kwargs)
            return text

        return read_snapshot(path, load)

    @torch.no_grad()
    def encode(self, texts: list[str]) -> torch.Tensor:
        """The decoder's latent for each text: the (scaled) posterior mean; no texts give a (0, latent_size) tensor."""
        texts = _text_list(texts, allow_empty=True)
        if len(texts) == 0:
            return torch.empty(0, self.model.config.latent_size, device=self.model.device, dtype=self.model.dtype)
        batch = self.encoder_tokenizer(
            texts, padding=True, truncation=True, max_length=self.max_length, return_tensors="pt"
        ).to(self.model.device)
        return self.model.encode(batch["input_ids"], batch["attention_mask"]).decoder_mu

    @torch.no_grad()
    def decode(self, latents, **generation_kwargs) -> list[str]:
        """Generate a text from each latent (a tensor or a numpy array of shape (n, latent_size), any float type:
        it is cast to the model's). Without `max_new_tokens` / `max_length`, up to `max_length` tokens, fewer if the
        decoder has fewer positions."""
        latents = _latent_matrix(latents, self.model.config.latent_size)
        latents = latents.to(device=self.model.device, dtype=self.model.dtype)
        if latents.shape[0] == 0:  # nothing to generate (the decoder cannot run on 0 rows)
            return []
        if "max_length" not in generation_kwargs:
            # the BOS token and, with memory injection, the latent's slot take positions too
            room = self.model.config.decoder.n_positions - 1 - int(self.model.config.latent_injection != "embedding")
            generation_kwargs.setdefault("max_new_tokens", min(self.max_length, room))
        ids = self.model.generate(latents=latents, **generation_kwargs)
        return self.decoder_tokenizer.batch_decode(ids, skip_special_tokens=True)

    def reconstruct(self, texts: list[str], **generation_kwargs) -> list[str]:
        return self.decode(self.encode(texts), **generation_kwargs)

    def encode_in_batches(self, texts: list[str], batch_size: int = 64) -> torch.Tensor:
        """`encode`, `batch_size` texts at a time (padding stays short, memory bounded)."""
        batch_size = check_integer("batch_size", batch_size, 1)
        texts = _text_list(texts)
        return torch.cat([self.encode(texts[i : i + batch_size]) for i in range(0, len(texts), batch_size)])

    def decode_in_batches(self, latents: torch.Tensor, batch_size: int = 64, **generation_kwargs) -> list[str]:
        """`decode`, `batch_size` latents at a time."""
        batch_size = check_integer("batch_size", batch_size, 1)
        latents = _latent_matrix(latents, self.model.config.latent_size)
        return [
            text
            for i in range(0, len(latents), batch_size)
            for text in self.decode(latents[i : i + batch_size], **generation_kwargs)
        ]

    @torch.no_grad()
    def _posteriors(self, texts: list[str], batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(decoder_mu, logvar) of each text, as `encode` tokenizes them."""
        batch_size = check_integer("batch_size", batch_size, 1)
        means, logvars = [], []
        for i in range(0, len(texts), batch_size):
            batch = self.encoder_tokenizer(
                texts[i : i + batch_size],
                padding=True,
                truncation=True,
                max_length=self.max_length,
                return_tensors="pt",
            ).to(self.model.device)
            posterior = self.model.encode(batch["input_ids"], batch["attention_mask"])
            means.append(posterior.decoder_mu)
            logvars.append(posterior.logvar)
        return torch.cat(means), torch.cat(logvars)

    def sample(
        self,
        num_samples: int,
        generator: torch.Generator | None = None,
        label=None,
        **generation_kwargs,
    ) -> list[str]:
        """Texts decoded from latents drawn from the generative prior or, with `label`, from that class's Gaussian
        (`fit_classes`, or the folder's saved ones). `generator` seeds the latents."""
        num_samples = check_integer("num_samples", num_samples, 1, MAX_GENERATION_ROWS)
        check_generator("generator", generator)
        if label is None:
            return self.decode(self.model.sample_prior(num_samples, generator=generator), **generation_kwargs)
        if self.classes is None:
            why = f" (the folder's were not loaded: {self.classes_not_loaded})" if self.classes_not_loaded else ""
            raise ValueError(
                f"sample(label={label!r}) needs per-class Gaussians{why}: fit them with fit_classes(texts, labels), "
                "and save_classes(folder) to keep them with the model."
            )
        return self.decode(self.classes.sample(label, num_samples, generator), **generation_kwargs)

    # -- attributes: directions, edits, classes ---------------------------------------------------------------------

    def attribute_direction(
        self,
        texts: Sequence[str],
        labels: Sequence,
        target=None,
        source=None,
        method: str = "mean",
        batch_size: int = 64,
    ) -> AttributeDirection:
        """The direction in the decoder's latent from the texts labelled `source` to those labelled `target`
        (`AttributeDirection`: the difference of the two class means, or with `method="logistic"` the normal of a
        logistic regression between them). With two classes, `target` defaults to the second in sorted order and
        `source` to the other; with more, give both (rows of other classes are ignored)."""
        texts = _text_list(texts)
        labels = _label_list(labels, texts)
        classes = sorted(set(labels))
        if len(classes) < 2:
            raise ValueError(f"the labels hold one class ({classes[0]!r}): a direction needs texts of two classes.")
        for name, value in (("target", target), ("source", source)):
            if value is not None and str(value).strip() not in classes:
                raise ValueError(f"{name}={value!r} is not among the labels ({classes}).")
        target = str(target).strip() if target is not None else None
        source = str(source).strip() if source is not None else None
        if target is None or source is None:
            if len(classes) > 2:
                raise ValueError(f"the labels hold {len(classes)} classes ({classes}): give both target= and source=.")
            target = target or next(c for c in reversed(classes) if c != source)
            source = source or next(c for c in classes if c != target)
        if source == target:
            raise ValueError(f"source and target are the same class ({source!r}).")
        if method not in DIRECTION_METHODS:
            raise ValueError(f"method={method!r} is not one of {DIRECTION_METHODS}.")
        keep = [i for i, label in enumerate(labels) if label in (source, target)]
        latents = self.encode_in_batches([texts[i] for i in keep], batch_size)
        return fit_direction(latents, [labels[i] for i in keep], source, target, method)

    def direction_between(
        self, source_texts: Sequence[str], target_texts: Sequence[str], method: str = "mean", batch_size: int = 64
    ) -> AttributeDirection:
        """The direction from one list of texts to another (their classes are named "source" and "target")."""
        source_texts = _text_list(source_texts, "source_texts")
        target_texts = _text_list(target_texts, "target_texts")
        labels = ["source"] * len(source_texts) + ["target"] * len(target_texts)
        return self.attribute_direction(source_texts + target_texts, labels, "target", "source", method, batch_size)

    def edit_latents(self, latents: torch.Tensor, direction: AttributeDirection, strength) -> torch.Tensor:
        """`latents` (n, d) moved by strength · spread along the direction; `strength` is one finite number or one per
        row (a sequence or tensor of n)."""
        if not isinstance(direction, AttributeDirection):
            raise ArgumentError(f"direction must be an AttributeDirection, got {type(direction).__name__}.")
        latents = _latent_matrix(latents, self.model.config.latent_size)
        if direction.vector.shape != (latents.shape[-1],):
            raise ArgumentError(
                f"the direction has {direction.vector.numel()} dimensions but the latents {latents.shape[-1]}: fit it "
                "with this model."
            )
        step = _strengths(strength, len(latents))
        moved = latents.double() + (step * direction.spread).to(latents.device) * direction.vector.to(latents.device)
        moved = moved.to(latents.dtype)
        if not torch.isfinite(moved).all():  # a finite strength too large for the latents' float type (1e300)
            raise ArgumentError(
                f"strength={strength!r} moves the latents beyond the range of {latents.dtype}: use a smaller strength."
            )
        return moved

    def edit(
        self, texts: Sequence[str], direction: AttributeDirection, strength, batch_size: int = 64, **generation_kwargs
    ) -> list[str]:
        """Each text encoded, moved along `direction` by `strength` (in units of the attribute's spread: 1 carries the
        source class's mean onto the target's; one number or one per text) and decoded."""
        texts = _text_list(texts)
        if not isinstance(direction, AttributeDirection):  # both refused before any encoding
            raise ArgumentError(f"direction must be an AttributeDirection, got {type(direction).__name__}.")
        _strengths(strength, len(texts))
        latents = self.encode_in_batches(texts, batch_size)
        moved = self.edit_latents(latents, direction, strength)
        return self.decode_in_batches(moved, batch_size, **generation_kwargs)

    def fit_classes(
        self, texts: Sequence[str], labels: Sequence, covariance: str = "full", batch_size: int = 64
    ) -> LatentClasses:
        """Fit one Gaussian per label in the decoder's latent (see `LatentClasses`), keep it for `sample(label=...)`
        and return it; `save_classes(folder)` writes it beside the model."""
        texts = _text_list(texts)
        labels = _label_list(labels, texts)
        if covariance not in COVARIANCES:
            raise ValueError(f"covariance={covariance!r} is not one of {COVARIANCES}.")
        decoder_mu, logvar = self._posteriors(texts, batch_size)
        variance = logvar.exp() if self.model.collapse.stochastic else None
        self.classes = LatentClasses.fit(decoder_mu, variance, labels, covariance)
        return self.classes

    def save_classes(self, folder: str | os.PathLike) -> Path:
        """Write the fitted class Gaussians into a saved model folder as `latent_classes.safetensors`, atomically, with
        the folder's weights checksum (a folder whose weights later change does not load them)."""
        if self.classes is None:
            raise ValueError("no class Gaussians to save: call fit_classes(texts, labels) first.")
        folder = Path(folder)
        if not folder.is_dir():
            raise NotADirectoryError(f"{folder} is not a folder: give the saved model's folder.")
        return self.classes.save(folder / CLASSES_FILE, folder_weights_checksum(folder))

    # -- walks through the latent --------------------------------------------------------------------------------------

    def interpolate(self, text_a: str, text_b: str, steps: int = 5, **generation_kwargs) -> list[str]:
        """Decode z_a + t (z_b - z_a) for `steps` evenly spaced t in [0, 1]."""
        steps = check_integer("steps", steps, 2, MAX_GENERATION_ROWS)  # the two end points, at least
        for name, text in (("text_a", text_a), ("text_b", text_b)):
            if not isinstance(text, str):
                raise ArgumentError(f"{name}={text!r} must be one text (a string).")
        z = self.encode([text_a, text_b])
        weights = torch.linspace(0, 1, steps, device=z.device).unsqueeze(1)
        return self.decode(z[0] + weights * (z[1] - z[0]), **generation_kwargs)

    def analogy(self, text_a, text_b, text_c, batch_size: int = 64, **generation_kwargs):
        """a : b :: c : ?, decoded from z_c + z_b - z_a. Three texts give one text; three lists of equal length give a
        list, one analogy per position."""
        single = all(isinstance(t, str) for t in (text_a, text_b, text_c))
        names = ("text_a", "text_b", "text_c")
        a, b, c = (
            [t] if isinstance(t, str) else _text_list(t, name) for t, name in zip((text_a, text_b, text_c), names)
        )
        if not len(a) == len(b) == len(c):
            raise ValueError(
                f"text_a, text_b and text_c hold {len(a)}, {len(b)} and {len(c)} texts: give equal lists."
            )
        z = self.encode_in_batches(_text_list(a + b + c), batch_size)
        n = len(a)
        outputs = self.decode_in_batches(z[2 * n :] + z[n : 2 * n] - z[:n], batch_size, **generation_kwargs)
        return outputs[0] if single else outputs

    def traverse(self, text_or_latent, dim: int, values: Sequence[float], **generation_kwargs) -> list[str]:
        """One latent (of a text, or given: shape (d,) or (1, d)) decoded with its coordinate `dim` set to each of
        `values`, in the decoder's latent units (the prior's spread along it: `model.prior_parameters()[1][dim]`)."""
        size = self.model.config.latent_size
        dim = check_integer("dim", dim, 0, size - 1)
        if isinstance(values, (str, bytes)) or not hasattr(values, "__iter__"):
            raise ArgumentError(f"values={values!r} must be a list of numbers.")
        values = [check_number(f"values[{i}]", v) for i, v in enumerate(values)]
        if not 1 <= len(values) <= MAX_GENERATION_ROWS:
            raise ArgumentError(f"values holds {len(values)} numbers: give 1 to {MAX_GENERATION_ROWS}.")
        if isinstance(text_or_latent, str):
            z = self.encode(_text_list([text_or_latent], "text_or_latent"))[0]
        else:
            z = _latent_matrix(
                text_or_latent.reshape(1, -1) if getattr(text_or_latent, "ndim", 0) == 1 else text_or_latent,
                size,
                "text_or_latent",
            )
            if len(z) != 1:
                raise ArgumentError(f"text_or_latent holds {len(z)} latents: give one text or one latent ({size},).")
            z = z.to(self.model.device).reshape(size)
        latents = z.expand(len(values), size).clone()
        latents[:, dim] = torch.tensor(values, dtype=latents.dtype, device=latents.device)
        return self.decode(latents, **generation_kwargs)
