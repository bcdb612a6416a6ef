"""Evaluation metrics of text VAEs: the one implementation that Trainer callbacks, the CLI and the experiments share.

Conventions (every function states its own definition; these are the common ones):

* A *batch* is the data collator's dict: `input_ids`, `attention_mask` (encoder), `decoder_input_ids`,
  `decoder_attention_mask`, `labels` (the decoder's next-token targets, -100 where ignored).
* *Counted tokens* are the label tokens that are not -100: every token of the sentence plus its EOS. The BOS token is
  only a decoder input (never a target) and padding is -100, so neither counts.
* Log-likelihoods are in nats and summed over a sentence's counted tokens ("per sentence"); the one per-token quantity
  is the perplexity.
* There are two posteriors. The encoder's ("original") posterior q(z|x) = N(mu, σ²) is the one whose KL the paper
  reports. The decoder's posterior q'(z|x) = N(decoder_mu, σ²), decoder_mu = f ⊙ mu, with the generative model's prior
  p(z) (`config.prior`: a diagonal, full-covariance or mixture Gaussian fitted to the aggregate posterior, or
  N(0, diag f²); its density is `model.prior_distribution().log_prob`), is the pair of a true ELBO for the model that
  generates text (f = 1 for every strategy but Scale-VAE, where the two pairs coincide).
* The model is evaluated in eval mode (Scale-VAE then uses its saved running scale factors, BN-VAE its running
  statistics) under `torch.no_grad()`; the previous train/eval mode is restored afterwards.
"""

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import torch

from distributions_scalevae import gaussian_kl, prior_kl
from modeling_scalevae import token_nll

from .latent import LatentText, evaluating

LOG_2PI = math.log(2 * math.pi)

__all__ = [
    "METRICS",
    "MetricInfo",
    "metric_info",
    "PosteriorAccumulator",
    "active_units",
    "active_units_variance",
    "count_tokens",
    "elbo",
    "evaluate_model",
    "iw_log_likelihood",
    "linear_probe_accuracy",
    "mutual_information",
    "reconstruction_bleu",
    "reconstruction_bleu_of",
]


# ---------------------------------------------------------------------------------------------------------------------
# Names: the one table of figure names, labels and meanings that the console, the model card and the plots read
# ---------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class MetricInfo:
    name: str  # short: the model card's rows, table headers
    label: str  # long, with units: console tables and plot axes
    description: str  # what it measures: the model card
    format: str = ".2f"


METRICS: dict[str, MetricInfo] = {
    "nll": MetricInfo(
        "NLL",
        "IW-NLL (nats/sentence)",
        "−log p(x) per sentence, nats: importance-weighted estimate, latent integrated out (lower is better)",
    ),
    "ppl": MetricInfo(
        "PPL", "perplexity", "exp(total NLL / counted tokens), tokens including EOS (lower is better)", ".1f"
    ),
    "elbo": MetricInfo(
        "ELBO", "ELBO (nats/sentence)", "single-sample evidence lower bound, nats per sentence (higher is better)"
    ),
    "reconstruction_nll": MetricInfo(
        "rec. NLL",
        "reconstruction NLL from mean z",
        "−log p(x|z) at z = the decoder's posterior mean, nats per sentence",
    ),
    "reconstruction_loss": MetricInfo(
        "rec. loss",
        "reconstruction NLL, sampled z (nats/sentence)",
        "−log p(x|z) at one z sampled from the decoder's posterior, nats per sentence (the training loss's term)",
    ),
    "kl": MetricInfo(
        "KL",
        "KL, original posterior",
        "the paper's KL: KL(N(μ, σ²) ‖ N(0, I)) of the encoder's posterior, nats per sentence",
    ),
    "decoder_kl": MetricInfo(
        "KL bound",
        "KL, decoder's latent (bound)",
        "the bound's KL: KL(N(f ⊙ μ, σ²) ‖ p(z)) of the decoder's posterior to the generative prior, nats per sentence",
    ),
    "mi": MetricInfo("MI", "MI, original posterior", "mutual information I(x; z) under the encoder's posterior, nats"),
    "mi_decoder": MetricInfo(
        "MI dec.", "MI, decoder's latent", "mutual information of the decoder's (scaled) posterior, nats"
    ),
    "au": MetricInfo(
        "AU",
        "AU, original posterior",
        "active units: dimensions of μ whose variance across sentences exceeds 0.01 (Burda et al. 2016)",
        "d",
    ),
    "au_decoder": MetricInfo(
        "AU dec.",
        "AU, decoder's latent",
        "active units of the decoder's latent f ⊙ μ (high by construction for Scale-VAE)",
        "d",
    ),
    "token_accuracy": MetricInfo(
        "tok. acc.",
        "token accuracy from mean z",
        "fraction of tokens whose teacher-forced prediction from the posterior mean is right",
        ".3f",
    ),
    "bleu": MetricInfo(
        "Reconstruction BLEU",
        "reconstruction BLEU",
        "corpus BLEU (sacreBLEU, 0-100) of each sentence's greedy decoding from its latent",
        ".1f",
    ),
    "shuffle_gap": MetricInfo(
        "shuffle gap",
        "shuffled-z NLL gap (nats)",
        "rise of the reconstruction NLL when each sentence is decoded from another's latent, nats",
    ),
    "probe_mu": MetricInfo(
        "probe acc. μ", "linear-probe accuracy of μ", "held-out accuracy of a logistic regression on μ", ".3f"
    ),
    "probe_decoder_mu": MetricInfo(
        "probe acc. dec.",
        "linear-probe accuracy of f ⊙ μ",
        "held-out accuracy of a logistic regression on the decoder's latent mean",
        ".3f",
    ),
    "prior_distinct_2": MetricInfo(
        "distinct-2",
        "distinct bigrams, 20 prior samples",
        "distinct bigrams / all bigrams over texts sampled from the prior",
    ),
    "printed_repetition": MetricInfo(
        "printed rep.",
        "repetition rate of the printed text",
        "share of the printed reconstructions, samples and interpolation steps with one word three times in a row",
        ".2f",
    ),
    "control_acc": MetricInfo(
        "transfer acc.",
        "transfer accuracy",
        "fraction of test sentences whose latent, moved towards the other class, decodes to a sentence that an "
        "independent text classifier assigns to that class",
        ".3f",
    ),
    "control_bleu": MetricInfo(
        "BLEU to source",
        "BLEU of the edits to their sources",
        "content kept: corpus BLEU (sacreBLEU, 0-100) of the edited sentences against the sentences they came from",
        ".1f",
    ),
    "control_ppl": MetricInfo(
        "edit PPL",
        "perplexity of the edits",
        "fluency: perplexity of the edited sentences under the reference language model (lower is better)",
        ".1f",
    ),
    "control_strength50": MetricInfo(
        "strength 50%",
        "strength where transfer reaches 50%",
        "the first edit strength (in gaps between the class means) whose transfer accuracy reaches 50%",
        ".2f",
    ),
    "control_acc50": MetricInfo(
        "transfer acc. @50%", "transfer accuracy at that strength", "transfer accuracy at the 50% strength", ".3f"
    ),
    "control_bleu50": MetricInfo(
        "BLEU to source @50%", "BLEU to source at that strength", "BLEU of the edits to their sources there", ".1f"
    ),
    "control_repetition": MetricInfo(
        "edit rep.",
        "repetition rate of the edits",
        "share of edited sentences with one word three times in a row (lower is better)",
        ".3f",
    ),
    "control_repetition50": MetricInfo(
        "edit rep. @50%", "repetition rate of the edits at that strength", "repetition rate of the edits there", ".3f"
    ),
    "control_ppl50": MetricInfo(
        "edit PPL @50%", "perplexity of the edits at that strength", "perplexity of the edits there", ".1f"
    ),
    "control_acc_at_bleu1": MetricInfo(
        "transfer @ BLEU 1",
        "transfer accuracy at BLEU 1 to the source",
        "transfer at equal content kept: the transfer-accuracy curve over strengths interpolated where the edits' "
        "BLEU to their sources falls through 1 (higher is better)",
        ".3f",
    ),
    "control_separation": MetricInfo(
        "class separation",
        "class separation along the attribute direction",
        "gap between the two classes' mean latents along the attribute direction, over the within-class standard "
        "deviation (training sentences)",
    ),
    "steps": MetricInfo("steps", "training steps", "optimizer steps trained", "d"),
    "seconds_per_step": MetricInfo("s/step", "seconds per step", "wall-clock seconds per optimizer step", ".3f"),
}
# The paper's other claims (`scalevae.claims.evaluate_claims`): the few-label probe at each default N, consistency of the
# latent space, generation from the prior.
PROBE_SIZES = (100, 1000, 10000)
_PROBED = {"mu": "μ", "decoder_mu": "f ⊙ μ"}
for _size in PROBE_SIZES:
    for _feature, _symbol in _PROBED.items():
        METRICS[f"probe_{_size}_{_feature}"] = MetricInfo(
            f"probe {_symbol}, {_size}",
            f"few-label probe accuracy of {_symbol}, {_size} labels",
            f"test accuracy of a logistic regression on {_symbol} trained on {_size} class-balanced labelled training "
            "sentences, mean over 5 random subsets (higher is better)",
            ".3f",
        )
        METRICS[f"probe_{_size}_{_feature}_sd"] = MetricInfo(
            f"sd probe {_symbol}, {_size}",
            f"sd of the few-label probe accuracy of {_symbol}, {_size} labels",
            f"standard deviation of that accuracy over the 5 subsets of {_size} labelled sentences",
            ".3f",
        )
for _cycle, _start in (("prior", "z ~ p(z)"), ("data", "z = the latent of a test sentence")):
    METRICS[f"consistency_{_cycle}_top1"] = MetricInfo(
        f"consist. {_cycle} top-1",
        f"latent consistency, {_cycle} cycle: top-1 retrieval",
        f"{_start} → greedy text → its latent ẑ: share of cycles whose ẑ is closest (cosine, centred) to its own z "
        "among all N (1: perfect; 1/N: chance)",
        ".3f",
    )
METRICS |= {
    "gen_forward_ppl": MetricInfo(
        "fwd PPL",
        "forward perplexity of prior samples",
        "perplexity of prior samples (nucleus-sampled, top-p 0.9) under a GPT-2 of the decoder's size trained on the "
        "training split (lower: more like the data)",
        ".1f",
    ),
    "gen_repetition": MetricInfo(
        "sample rep.",
        "repetition rate of prior samples",
        "share of prior samples with one word three times in a row (lower is better)",
        ".3f",
    ),
    "recon_ppl": MetricInfo(
        "recon. PPL",
        "forward perplexity of reconstructions",
        "perplexity of the greedy reconstructions of test sentences under the reference language model",
        ".1f",
    ),
    "recon_repetition": MetricInfo(
        "recon. rep.",
        "repetition rate of reconstructions",
        "share of greedy reconstructions of test sentences with one word three times in a row (lower is better)",
        ".3f",
    ),
    "gen_reverse_ppl": MetricInfo(
        "rev. PPL",
        "reverse perplexity (LM trained on prior samples)",
        "perplexity of the test split under a GPT-2 of the decoder's size trained on the prior samples (lower: the "
        "samples cover more of the data)",
        ".1f",
    ),
    "gen_distinct_1": MetricInfo(
        "dist-1", "distinct-1 of prior samples", "distinct unigrams / all unigrams over the prior samples", ".3f"
    ),
    "gen_distinct_2": MetricInfo(
        "dist-2", "distinct-2 of prior samples", "distinct bigrams / all bigrams over the prior samples", ".3f"
    ),
    "gen_self_bleu": MetricInfo(
        "self-BLEU",
        "self-BLEU-4 of prior samples",
        "mean sentence BLEU-4 (sacreBLEU, 0-100) of each prior sample against all the others (lower: more diverse)",
        ".1f",
    ),
    "gen_mean_length": MetricInfo(
        "sample length", "mean prior-sample length (tokens)", "decoder tokens per nucleus-sampled prior sample", ".1f"
    ),
    "data_mean_length": MetricInfo(
        "data length",
        "mean test-sentence length (tokens)",
        "decoder tokens per test sentence, cut to the training length",
        ".1f",
    ),
}

# The priors a density figure may be computed under (`evaluate_model(priors=...)` adds `nll_fitted`, ...).
PRIOR_NAMES = {
    "fitted": "fitted prior",
    "scaled": "N(0, diag f²)",
    "full": "full-covariance prior",
    "mixture": "Gaussian-mixture prior",
}


def metric_info(key: str) -> MetricInfo:
    """The table's entry for `key`, including a density figure under a named prior (`nll_fitted`) and a control figure
    at one strength (`control_acc@1.0`); a key the table does not know gets its own name as name and label."""
    if key in METRICS:
        return METRICS[key]
    if "@" in key:  # a figure at one edit strength: `control_acc@1.0`
        base, _, strength = key.partition("@")
        if base in METRICS:
            info = METRICS[base]
            return MetricInfo(
                f"{info.name} @{strength}", f"{info.label}, strength {strength}", info.description, info.format
            )
    base, _, prior = key.rpartition("_")
    if base in METRICS and prior in PRIOR_NAMES:
        info = METRICS[base]
        return MetricInfo(
            f"{info.name}, {prior}", f"{info.label}, {PRIOR_NAMES[prior]}", info.description, info.format
        )
    return MetricInfo(key, key, "as reported by the evaluation")


# ---------------------------------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------------------------------


def _model_device(model) -> torch.device:
    device = getattr(model, "device", None)
    if isinstance(device, torch.device):
        return device
    for tensor in list(model.parameters()) + list(model.buffers()):
        return tensor.device
    return torch.device("cpu")


def _to_device(batch: Mapping, device: torch.device) -> dict:
    return {key: value.to(device) if isinstance(value, torch.Tensor) else value for key, value in batch.items()}


def _decoder_inputs(model, batch: Mapping) -> tuple[torch.Tensor, torch.Tensor | None]:
    if batch.get("decoder_input_ids") is not None:
        return batch["decoder_input_ids"], batch.get("decoder_attention_mask")
    return model.decoder_inputs_from_labels(
        batch["labels"]
    )  # the model's own rule: BOS, then the labels shifted right


def _randn(shape, like: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """Standard normal noise with `like`'s device and dtype, drawn on the generator's device (so a CPU generator
    gives the same numbers whatever device the model is on)."""
    device = generator.device if generator is not None else like.device
    return torch.randn(shape, generator=generator, device=device, dtype=torch.float32).to(like.device, like.dtype)


def _require_density(model, what: str) -> None:
    if not model.collapse.stochastic:
        raise ValueError(
            f"{what} is undefined for a deterministic autoencoder (collapse_strategy='ae'): its decoder is trained on "
            "z = mu only and its posterior variance is never trained, so the model defines no density p(x) to "
            "estimate. Report reconstruction metrics for it instead."
        )


def count_tokens(labels: torch.Tensor) -> int:
    """The number of counted tokens: label positions that are not -100 (the sentence's tokens and its EOS; the BOS
    token is never a label, padding is -100)."""
    return int((labels != -100).sum())


def _log_normal(z: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """log N(z; mean, diag(std²)) summed over the last dimension, in float64."""
    z, mean, std = z.double(), mean.double(), std.double()
    return (-0.5 * ((z - mean) / std).pow(2) - std.log() - 0.5 * LOG_2PI).sum(-1)


# ---------------------------------------------------------------------------------------------------------------------
# Likelihood: importance-weighted log p(x) and the ELBO
# ---------------------------------------------------------------------------------------------------------------------


def _priors_of(model, priors: Sequence[str] | Mapping) -> dict:
    """name -> the prior p(z) as a float64 `torch.distributions` object; "" is the config's. Names resolve through
    `model.prior_distribution`; a mapping's distributions (families the model does not hold, fitted apart by
    `scalevae.training.fit_prior_families`) are used as given, so one pass scores every family."""
    given = priors if isinstance(priors, Mapping) else {}
    return {
        name: given.get(name) if given.get(name) is not None else model.prior_distribution(name or None, torch.float64)
        for name in priors
    }


def _iw_from_posterior(model, batch, posterior, num_samples, chunk_size, generator, priors=("",)) -> dict:
    """name -> importance-weighted log p(x) (batch,) under each prior, from the same samples of q'(z|x)."""
    decoder_input_ids, decoder_attention_mask = _decoder_inputs(model, batch)
    labels = batch["labels"]
    mean, logvar = posterior.decoder_mu, posterior.logvar
    priors = _priors_of(model, priors)
    std = (0.5 * logvar).exp()
    batch_size, latent_size = mean.shape
    log_weights = {name: [] for name in priors}
    for start in range(0, num_samples, chunk_size):
        c = min(chunk_size, num_samples - start)
        # Sample j of sentence i sits at row i * c + j, the order of repeat_interleave.
        z = (mean.unsqueeze(1) + std.unsqueeze(1) * _randn((batch_size, c, latent_size), mean, generator)).flatten(
            0, 1
        )
        log_px_z = model.log_likelihood(
            z,
            decoder_input_ids.repeat_interleave(c, dim=0),
            labels.repeat_interleave(c, dim=0),
            None if decoder_attention_mask is None else decoder_attention_mask.repeat_interleave(c, dim=0),
        ).double()
        log_qz = _log_normal(z, mean.repeat_interleave(c, dim=0), std.repeat_interleave(c, dim=0))
        for name, prior in priors.items():
            log_pz = prior.log_prob(z.double())
            log_weights[name].append((log_px_z + log_pz - log_qz).view(batch_size, c))
    return {
        name: torch.logsumexp(torch.cat(weights, dim=1), dim=1) - math.log(num_samples)
        for name, weights in log_weights.items()
    }


def iw_log_likelihood(
    model,
    batch: Mapping[str, torch.Tensor],
    num_samples: int = 500,
    chunk_size: int = 50,
    generator: torch.Generator | None = None,
    prior: str | None = None,
) -> torch.Tensor:
    """Importance-weighted estimate of log p(x) per sentence (Burda et al. 2016), shape `(batch,)`, float64, nats.

    Definition: the encoder runs once per sentence; k = `num_samples` latents z_1..z_k are drawn from the decoder's
    posterior q'(z|x) = N(decoder_mu, diag(exp(logvar))), and

        log p(x) ≈ logsumexp_k [ log p(x|z_k) + log p(z_k) − log q'(z_k|x) ] − log k,

    with p(z) the generative prior (`prior`, default `config.prior`; log p(z) is its exact density, for a mixture too),

    where log p(x|z) is summed over the counted tokens (labels != -100: the sentence's tokens and its EOS; not BOS,
    not padding). The latent is integrated out, so there is no separate KL term: −this is the NLL with the KL
    "inside". It is a stochastic lower bound that tightens as k grows (k = 1 is an unbiased single-sample ELBO with a
    Monte Carlo KL); He et al. (2019) report it with k = 500.

    Samples are batched: each chunk of c ≤ `chunk_size` samples repeats the batch c times along the batch dimension
    and calls `model.log_likelihood` once, so the decoder runs ceil(k / chunk_size) times. `generator` (on the CPU or
    the model's device) makes the noise reproducible. A deterministic autoencoder (`collapse.stochastic` False)
    raises a `ValueError`: it defines no density.
    """
    _require_density(model, "The importance-weighted log-likelihood")
    if num_samples < 1 or chunk_size < 1:
        raise ValueError(f"num_samples={num_samples} and chunk_size={chunk_size} must both be >= 1.")
    with evaluating(model), torch.no_grad():
        batch = _to_device(batch, _model_device(model))
        posterior, name = model.encode(batch["input_ids"], batch.get("attention_mask")), prior or ""
        return _iw_from_posterior(model, batch, posterior, num_samples, chunk_size, generator, (name,))[name]


def _decoder_kl(posterior, prior, generator=None) -> torch.Tensor:
    """KL(q'(z|x) || p(z)) per sentence, float64 (`prior_kl`: closed form for the Gaussians, a Monte Carlo estimate
    with 256 draws per sentence for a mixture)."""
    return prior_kl(posterior.decoder_mu.double(), posterior.logvar.double(), prior, 256, generator)


def _elbo_from_posterior(model, batch, posterior, generator, priors=("",)) -> dict:
    """name -> single-sample ELBO (batch,) under each prior, from the same z."""
    decoder_input_ids, decoder_attention_mask = _decoder_inputs(model, batch)
    mean, logvar = posterior.decoder_mu, posterior.logvar
    z = mean + (0.5 * logvar).exp() * _randn(mean.shape, mean, generator)
    log_px_z = model.log_likelihood(z, decoder_input_ids, batch["labels"], decoder_attention_mask).double()
    return {
        name: log_px_z - _decoder_kl(posterior, prior, generator) for name, prior in _priors_of(model, priors).items()
    }


def elbo(
    model, batch: Mapping[str, torch.Tensor], generator: torch.Generator | None = None, prior: str | None = None
) -> torch.Tensor:
    """The evidence lower bound per sentence, shape `(batch,)`, float64, nats (a log-likelihood: higher is better).

    Definition: ELBO(x) = log p(x|z) − KL(q'(z|x) || p(z)) with ONE z ~ q'(z|x) = N(decoder_mu, diag(exp(logvar))),
    log p(x|z) summed over the counted tokens (labels != -100), and the KL analytic: the decoder's posterior against the
    generative prior (`prior`, default `config.prior`; the model's `decoder_kl`),
    summed over latent dimensions. For Scale-VAE this KL differs from the paper's KL of the original posterior; it is
    the one that makes the bound a bound on the p(x) of the model that generates. −ELBO = reconstruction NLL + KL
    ("KL inside the NLL"). A deterministic autoencoder raises a `ValueError`.
    """
    _require_density(model, "The ELBO")
    with evaluating(model), torch.no_grad():
        batch = _to_device(batch, _model_device(model))
        posterior, name = model.encode(batch["input_ids"], batch.get("attention_mask")), prior or ""
        return _elbo_from_posterior(model, batch, posterior, generator, (name,))[name]


# ---------------------------------------------------------------------------------------------------------------------
# The latent space: mutual information, active units, linear probe
# ---------------------------------------------------------------------------------------------------------------------


def mutual_information(
    mu: torch.Tensor,
    logvar: torch.Tensor,
    generator: torch.Generator | None = None,
    chunk_elements: int = 1 << 22,
) -> float:
    """He et al. (2019)'s estimate of the mutual information I(x; z) under q, in nats, over a whole evaluation set.

    `mu`, `logvar`: the stacked posterior parameters of all N examples, shape (N, d): pass (mu, logvar) for the
    encoder's (original) posterior or (decoder_mu, logvar) for the decoder's.

    Definition: I = E_x[E_{q(z|x)}[log q(z|x)]] − E_x[E_{q(z|x)}[log q(z)]], where the aggregate posterior
    q(z) = (1/N) Σ_j q(z|x_j) is the mixture of the N posteriors. The first term is the negative entropy of each
    Gaussian, computed exactly (−d/2·log 2π − ½ Σ (1 + logvar)) and averaged over x; the second draws ONE z_i ~ q(z|x_i)
    per example and averages log q(z_i) = logsumexp_j log q(z_i|x_j) − log N. This is He et al.'s `calc_mi`, except
    that the mixture spans the whole set rather than one batch (it is computed in chunks, in float64).

    Small negative values are possible: the first term is exact but the second is a Monte Carlo average over N
    single samples, so when the posteriors barely differ (I ≈ 0) the estimate fluctuates around 0 on both sides. The
    estimate is also capped at log N (the mixture weight 1/N of each example's own component) and biased upward for
    small N.
    """
    mu, logvar = mu.detach().double(), logvar.detach().double()
    if mu.dim() != 2 or mu.shape != logvar.shape:
        raise ValueError(
            f"mu and logvar must both have shape (N, d); got {tuple(mu.shape)} and {tuple(logvar.shape)}."
        )
    n, d = mu.shape
    if n == 0:
        raise ValueError("mutual_information needs at least one example.")
    neg_entropy = (-0.5 * d * LOG_2PI - 0.5 * (1 + logvar).sum(-1)).mean()
    std = (0.5 * logvar).exp()
    z = mu + std * _randn(mu.shape, mu, generator)
    # log q(z_i|x_j) = -½ Σ_d (z_id - mu_jd)² / var_jd + const_j, expanded into matrix products: no (N, N, d) tensor.
    inv_var = (-logvar).exp()  # (N, d)
    log_norm = -0.5 * (d * LOG_2PI + logvar.sum(-1)) - 0.5 * (mu.pow(2) * inv_var).sum(-1)  # (N,)
    mu_inv_var = mu * inv_var
    rows = max(1, chunk_elements // n)
    log_qz = []
    for start in range(0, n, rows):
        zc = z[start : start + rows]
        log_density = -0.5 * zc.pow(2) @ inv_var.T + zc @ mu_inv_var.T + log_norm  # (rows, N)
        log_qz.append(torch.logsumexp(log_density, dim=1) - math.log(n))
    return float(neg_entropy - torch.cat(log_qz).mean())


def active_units_variance(mu: torch.Tensor) -> torch.Tensor:
    """Cov_x(E_{q(z|x)}[z]) per latent dimension, shape (d,), float64: the variance across the N examples of the
    posterior mean (`mu`, shape (N, d)), unbiased (N − 1 denominator, as in He et al. 2019's code)."""
    mu = mu.detach().double()
    if mu.dim() != 2:
        raise ValueError(f"mu must have shape (N, d); got {tuple(mu.shape)}.")
    if mu.shape[0] < 2:
        raise ValueError("The variance of the posterior means needs at least two examples.")
    return mu.var(dim=0, unbiased=True)


def active_units(mu: torch.Tensor, threshold: float = 0.01) -> int:
    """The number of active units (Burda et al. 2016) over a whole evaluation set: latent dimensions u with
    Cov_x(E_{q(u|x)}[u]) > `threshold` (δ = 0.01), see `active_units_variance`. Pass the stacked posterior means
    (N, d): `mu` for the paper's count; `decoder_mu` counts the decoder's latent (for Scale-VAE, f rescales every
    dimension's spread towards `scale_target_std`, so that count is high by construction)."""
    return int((active_units_variance(mu) > threshold).sum())


def linear_probe_accuracy(features, labels, seed: int = 0, test_size: float = 0.2) -> float:
    """Test accuracy, in [0, 1], of a linear probe of the latents: standardised features, then scikit-learn's
    `LogisticRegression` (L2, C = 1), trained on a seeded, stratified (when every class allows it) train/test split
    with `test_size` of the examples held out. `features`: (N, d) tensor or array (e.g. posterior means); `labels`:
    N class labels."""
    import numpy as np

    try:
        import sklearn  # noqa: F401
    except ImportError as error:
        raise ImportError("linear_probe_accuracy needs scikit-learn: pip install 'scalevae[probe]'.") from error
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import train_test_split
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    features = features.detach().cpu().double().numpy() if isinstance(features, torch.Tensor) else np.asarray(features)
    labels = labels.detach().cpu().numpy() if isinstance(labels, torch.Tensor) else np.asarray(labels)
    if features.ndim != 2 or len(features) != len(labels):
        raise ValueError(f"features must be (N, d) with N = len(labels): got {features.shape}, {len(labels)} labels.")
    classes, counts = np.unique(labels, return_counts=True)
    if len(classes) < 2:
        raise ValueError("A linear probe needs at least two classes among the labels.")
    stratify = labels if counts.min() >= 2 else None
    x_train, x_test, y_train, y_test = train_test_split(
        features, labels, test_size=test_size, random_state=seed, stratify=stratify
    )
    if len(np.unique(y_train)) < 2:
        raise ValueError("The training split holds a single class; give more examples per class.")
    probe = make_pipeline(StandardScaler(), LogisticRegression(max_iter=1000, random_state=seed))
    probe.fit(x_train, y_train)
    return float(probe.score(x_test, y_test))


# ---------------------------------------------------------------------------------------------------------------------
# Reconstruction BLEU
# ---------------------------------------------------------------------------------------------------------------------


def reconstruction_bleu(references: Sequence[str], hypotheses: Sequence[str]) -> float:
    """Corpus BLEU, 0-100, of `hypotheses` against one reference each: `sacrebleu.corpus_bleu` with its defaults
    (13a tokenisation, 4-grams, brevity penalty). sacrebleu is called directly: `evaluate.load("bleu")` fetches its
    script from the Hub and fails offline. `force=True` only silences sacreBLEU's warning about tokenized input (PTB
    and Yelp are tokenized, on both sides alike); it does not change the score."""
    import sacrebleu

    references, hypotheses = list(references), list(hypotheses)
    if len(references) != len(hypotheses):
        raise ValueError(f"{len(references)} references but {len(hypotheses)} hypotheses.")
    return float(sacrebleu.corpus_bleu(hypotheses, [references], force=True).score)


def reconstruction_bleu_of(
    model,
    texts: Sequence[str],
    encoder_tokenizer,
    decoder_tokenizer,
    max_length: int = 64,
    batch_size: int = 32,
) -> float:
    """Reconstruction BLEU (0-100) of `texts`: each text is encoded (encoder tokens truncated to `max_length`), its
    decoder-posterior mean `decoder_mu` is decoded greedily (`max_new_tokens=max_length`, no sampling) and the output
    ids are decoded with `skip_special_tokens=True`. The reference is the text tokenised and detokenised by the
    decoder's tokenizer, `decoder_tokenizer.decode(decoder_tokenizer(text, add_special_tokens=False).input_ids)`, so
    casing and tokenisation artefacts are the same on both sides; it is not truncated. See `reconstruction_bleu`."""
    texts = list(texts)
    references = [decoder_tokenizer.decode(decoder_tokenizer(t, add_special_tokens=False).input_ids) for t in texts]
    text = LatentText(model, encoder_tokenizer, decoder_tokenizer, max_length=max_length)
    with evaluating(model), torch.no_grad():
        hypotheses = [
            out
            for start in range(0, len(texts), batch_size)
            for out in text.reconstruct(texts[start : start + batch_size], do_sample=False)
        ]
    return reconstruction_bleu(references, hypotheses)


# ---------------------------------------------------------------------------------------------------------------------
# A pass over data: the one per-batch accumulator
# ---------------------------------------------------------------------------------------------------------------------


class PosteriorAccumulator:
    """What a pass over data collects batch by batch, for `evaluate_model` and the training monitor alike: the
    posterior parameters of every sentence (for the set-level MI and active units) and sums of per-sentence figures
    (divided by the number of sentences at the end)."""

    def __init__(self):
        self.mus, self.logvars, self.decoder_mus = [], [], []
        self.sums: dict[str, float] = {}
        self.num_sentences = self.num_tokens = 0

    def add(self, posterior, labels: torch.Tensor, **sums: float) -> None:
        """One batch: its posterior (`mu`, `logvar`, `decoder_mu`), its labels, and per-sentence figures summed over
        the batch."""
        self.mus.append(posterior.mu.detach().double().cpu())
        self.logvars.append(posterior.logvar.detach().double().cpu())
        self.decoder_mus.append(posterior.decoder_mu.detach().double().cpu())
        for key, value in sums.items():
            self.sums[key] = self.sums.get(key, 0.0) + float(value)
        self.num_sentences += labels.shape[0]
        self.num_tokens += count_tokens(labels)

    def posteriors(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(mu, logvar, decoder_mu) of every sentence so far, each (N, d), float64."""
        if not self.num_sentences:
            raise ValueError("no batches were accumulated: the data is empty.")
        return torch.cat(self.mus), torch.cat(self.logvars), torch.cat(self.decoder_mus)

    def summary(self, generator: torch.Generator | None = None) -> dict:
        """Each sum per sentence, and the latent figures of the whole set: `mi`, `mi_decoder` (`mutual_information`),
        `au`, `au_decoder` (`active_units`; 0 for a set of one sentence)."""
        mu, logvar, decoder_mu = self.posteriors()
        several = self.num_sentences > 1
        return {
            **{key: value / self.num_sentences for key, value in self.sums.items()},
            "mi": mutual_information(mu, logvar, generator=generator),
            "mi_decoder": mutual_information(decoder_mu, logvar, generator=generator),
            "au": active_units(mu) if several else 0,
            "au_decoder": active_units(decoder_mu) if several else 0,
        }


# ---------------------------------------------------------------------------------------------------------------------
# Everything in one pass
# ---------------------------------------------------------------------------------------------------------------------


def evaluate_model(
    model,
    dataloader: Iterable[Mapping[str, torch.Tensor]],
    num_importance_samples: int | None = 500,
    chunk_size: int = 50,
    max_batches: int | None = None,
    generator: torch.Generator | None = None,
    progress: bool = True,
    priors: Sequence[str] | Mapping = (),
) -> dict:
    """Every corpus-level metric in one pass over `dataloader` (at most `max_batches` batches); a flat dict of floats
    (ints for the counts). The density figures (`nll`, `ppl`, `elbo`, `decoder_kl`) are under the model's prior
    (`config.prior`); each name in `priors` (`"fitted"`, `"scaled"`) adds them under that prior as `nll_fitted`, ...,
    computed from the same importance samples. `priors` may also map names to distributions the model does not hold
    (`scalevae.training.fit_prior_families`): every family is scored in this one pass, and MI, AU, the shuffle gap and
    the reconstruction are computed once. N = `num_sentences`, T = `num_tokens` (counted tokens: labels != -100, i.e. each sentence's
    tokens and its EOS; not BOS, not padding). All NLLs are in nats.

    - `nll`: −IW log p(x) (`iw_log_likelihood` with k = `num_importance_samples` samples from the decoder's posterior),
      summed over the set / N: per sentence, with the latent integrated out (the "KL" is inside it).
    - `ppl`: exp(Σ IW NLL / T), the perplexity per counted token of that same NLL.
    - `elbo`: the single-sample ELBO (`elbo`: log p(x|z), z ~ q', minus the decoder's analytic KL), mean per sentence;
      −elbo ≥ nll up to Monte Carlo noise.
    - `reconstruction_nll`: −log p(x|z) with z = decoder_mu (the decoder's posterior mean, no sampling), per sentence.
    - `kl`: the paper's KL, KL(N(mu, σ²) || N(0, I)) of the encoder's (original) posterior, mean per sentence.
    - `decoder_kl`: the bound's KL, KL(N(decoder_mu, σ²) || p(z)), mean per sentence (`prior_kl`: for a mixture prior, a
      Monte Carlo estimate).
    - `mi`, `mi_decoder`: `mutual_information` of the original and of the decoder's posterior over the whole set.
    - `au`, `au_decoder`: `active_units` (δ = 0.01) of `mu` and of `decoder_mu` over the whole set.
    - `token_accuracy`: fraction of counted tokens where the teacher-forced argmax from z = decoder_mu is the label.
    - `shuffle_gap`: "does the decoder use z": the reconstruction NLL per sentence when each sentence is decoded from
      another sentence's decoder_mu (a random cyclic permutation of the whole set, so no sentence keeps its own) minus
      `reconstruction_nll`. About 0 for a decoder that ignores z; NaN for a set of one sentence.
    - `num_sentences`, `num_tokens`: N and T.

    `num_importance_samples=0` (or None) skips importance sampling (`nll`, `ppl` are NaN), for cheap evaluation during
    training. A deterministic autoencoder has no density: `nll`, `ppl` and `elbo` are NaN for it. `generator` seeds
    every sample (importance sampling, ELBO, MI and the permutation). The decoder inputs are kept on the CPU for the
    second, decoder-only pass of `shuffle_gap`.
    """
    from tqdm.auto import tqdm

    stochastic = model.collapse.stochastic
    use_iw = stochastic and bool(num_importance_samples)
    prior_distributions = _priors_of(
        model, {"": None, **(priors if isinstance(priors, Mapping) else dict.fromkeys(priors))}
    )
    prior_names = list(prior_distributions)
    accumulated, decoder_batches = PosteriorAccumulator(), []
    try:
        total = len(dataloader)
    except TypeError:  # an iterable-style dataset has no length
        total = None
    if max_batches is not None:
        total = max_batches if total is None else min(total, max_batches)

    with evaluating(model), torch.no_grad():
        device = _model_device(model)
        for index, batch in enumerate(tqdm(dataloader, total=total, desc="evaluate", disable=not progress)):
            if max_batches is not None and index >= max_batches:
                break
            batch = _to_device(batch, device)
            labels = batch["labels"]
            decoder_input_ids, decoder_attention_mask = _decoder_inputs(model, batch)
            posterior = model.encode(batch["input_ids"], batch.get("attention_mask"))
            logits = model.decode(posterior.decoder_mu, decoder_input_ids, decoder_attention_mask).logits
            sums = {
                "reconstruction_nll": token_nll(logits, labels).double().sum(),
                "kl": gaussian_kl(posterior.mu.double(), posterior.logvar.double()).sum(),
                "correct_tokens": ((logits.argmax(-1) == labels) & (labels != -100)).sum(),
            }
            if use_iw:
                iw = _iw_from_posterior(
                    model, batch, posterior, num_importance_samples, chunk_size, generator, prior_distributions
                )
                sums |= {_with_prior("iw_nll", name): -iw[name].sum() for name in prior_names}
            if stochastic:
                bound = _elbo_from_posterior(model, batch, posterior, generator, prior_distributions)
                sums |= {_with_prior("elbo", name): bound[name].sum() for name in prior_names}
            # Last: a mixture's Monte Carlo KL draws from `generator`, and the importance samples above must not
            # depend on which families are scored beside the model's own.
            for name, prior in prior_distributions.items():
                sums[_with_prior("decoder_kl", name)] = _decoder_kl(posterior, prior, generator).sum()
            accumulated.add(posterior, labels, **sums)
            mask = None if decoder_attention_mask is None else decoder_attention_mask.cpu()
            decoder_batches.append((decoder_input_ids.cpu(), mask, labels.cpu()))

        if accumulated.num_sentences == 0:
            raise ValueError("evaluate_model got no batches: the dataloader is empty (or max_batches is 0).")
        num_sentences, num_tokens, totals = accumulated.num_sentences, accumulated.num_tokens, accumulated.sums
        decoder_mu = accumulated.posteriors()[2].to(model.dtype)

        # Second, decoder-only pass: each sentence decoded from another's latent (a random cyclic derangement).
        shuffle_gap = float("nan")
        if num_sentences > 1:
            generator_device = generator.device if generator is not None else "cpu"
            order = torch.randperm(num_sentences, generator=generator, device=generator_device).cpu()
            source = torch.empty_like(order)
            source[order] = order.roll(-1)  # sentence order[i] takes the latent of sentence order[i + 1]
            shuffled_nll, offset = 0.0, 0
            for decoder_input_ids, decoder_attention_mask, labels in decoder_batches:
                size = labels.shape[0]
                latents = decoder_mu[source[offset : offset + size]].to(device)
                offset += size
                logits = model.decode(
                    latents,
                    decoder_input_ids.to(device),
                    None if decoder_attention_mask is None else decoder_attention_mask.to(device),
                ).logits
                shuffled_nll += float(token_nll(logits, labels.to(device)).double().sum())
            shuffle_gap = (shuffled_nll - totals["reconstruction_nll"]) / num_sentences
        figures = accumulated.summary(generator)  # after the permutation: a seeded generator draws in a fixed order

    nan = float("nan")
    per_prior = {}
    for name in prior_names:
        iw_nll = figures.get(_with_prior("iw_nll", name), nan)
        per_prior |= {
            _with_prior("nll", name): iw_nll,
            _with_prior("ppl", name): math.exp(totals[_with_prior("iw_nll", name)] / num_tokens)
            if use_iw and num_tokens
            else nan,
            _with_prior("elbo", name): figures.get(_with_prior("elbo", name), nan),
            _with_prior("decoder_kl", name): figures[_with_prior("decoder_kl", name)],
        }
    return {
        **per_prior,
        "reconstruction_nll": figures["reconstruction_nll"],
        "kl": figures["kl"],
        "mi": figures["mi"],
        "mi_decoder": figures["mi_decoder"],
        "au": figures["au"],
        "au_decoder": figures["au_decoder"],
        "token_accuracy": totals["correct_tokens"] / num_tokens if num_tokens else nan,
        "shuffle_gap": shuffle_gap,
        "num_sentences": num_sentences,
        "num_tokens": num_tokens,
    }


def _with_prior(key: str, prior: str) -> str:
    """The name of a density figure under a named prior (`nll_fitted`); the model's own prior keeps the bare name."""
    return f"{key}_{prior}" if prior else key
