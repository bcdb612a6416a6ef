"""Scale-VAE (Song et al., LREC-COLING 2024): a text VAE whose GPT-2 decoder keeps using the latent.

Reading order: outputs -> latent head -> collapse strategies (Scale-VAE is `ScaleStrategy`) -> the fitted prior ->
latent injection -> `ScaleVAEForLatentLM` -> the helpers the data code shares (`shift_labels_right`, `token_nll`,
`default_decoder_config`). This file travels inside every saved model folder (``trust_remote_code=True``) with its
siblings: `configuration_scalevae.py`, `checks_scalevae.py` (input checks), `loading_scalevae.py` (strict loading,
checksums) and `distributions_scalevae.py` (Gaussian KLs, prior sampling, the mixture fit, global-batch statistics).
All of them import only torch and transformers (and safetensors, which transformers requires).
"""

from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.distributions import Categorical, Distribution, MixtureSameFamily, MultivariateNormal
from torch.utils.checkpoint import checkpoint
from transformers import (
    AutoModel,
    DynamicCache,
    EncoderDecoderCache,
    GenerationConfig,
    GenerationMixin,
    GPT2Config,
    GPT2LMHeadModel,
    PreTrainedModel,
)
from transformers import initialization as init
from transformers.cache_utils import Cache, DynamicLayer
from transformers.modeling_outputs import BaseModelOutput
from transformers.utils import ModelOutput, logging

try:  # a saved folder loaded with trust_remote_code: transformers only allows relative imports between its files
    from .checks_scalevae import (
        MAX_SAMPLED_LATENTS,
        as_model_latents,
        cached_length,
        check_decoder_inputs,
        check_encoder_inputs,
        check_flag,
        check_forward_inputs,
        check_generation_arguments,
        check_generation_length,
        check_generator,
        check_integer,
        check_latents,
        checked_kl_weight,
        encoder_batches,
    )
    from .configuration_scalevae import PRIORS, ScaleVAEConfig
    from .distributions_scalevae import (
        data_parallel_world,
        diagonal_gaussian,
        fit_gaussian_mixture,
        gaussian_kl,
        global_batch_mean,
        prior_kl,
        sample_distribution,
    )
    from .loading_scalevae import load_strictly, save_publicly
except ImportError:  # the same files installed as top-level modules
    from checks_scalevae import (
        MAX_SAMPLED_LATENTS,
        as_model_latents,
        cached_length,
        check_decoder_inputs,
        check_encoder_inputs,
        check_flag,
        check_forward_inputs,
        check_generation_arguments,
        check_generation_length,
        check_generator,
        check_integer,
        check_latents,
        checked_kl_weight,
        encoder_batches,
    )
    from configuration_scalevae import PRIORS, ScaleVAEConfig
    from distributions_scalevae import (
        data_parallel_world,
        diagonal_gaussian,
        fit_gaussian_mixture,
        gaussian_kl,
        global_batch_mean,
        prior_kl,
        sample_distribution,
    )
    from loading_scalevae import load_strictly, save_publicly

logger = logging.get_logger(__name__)


# ---------------------------------------------------------------------------------------------------------------------
# Outputs
# ---------------------------------------------------------------------------------------------------------------------


@dataclass
class ScaleVAEEncoderOutput(ModelOutput):
    """
    The posterior q(z|x) = N(mu, exp(logvar)) and the posterior the decoder sees.

    Args:
        mu, logvar (`torch.FloatTensor` of shape `(batch_size, latent_size)`):
            The encoder's ("original") posterior; the paper's KL is computed on it.
        decoder_mu (`torch.FloatTensor` of shape `(batch_size, latent_size)`):
            Mean of the decoder's posterior N(f ⊙ mu, exp(logvar)) (equal to `mu` for every strategy but Scale-VAE).
        prior_mean, prior_std (`torch.FloatTensor` of shape `(latent_size,)`):
            The generative model's prior (`config.prior`, or the `prior` asked for): N(prior_mean, diag(prior_std²))
            for the fitted diagonal Gaussian or N(0, diag f²) with f the scale factors (ones but for Scale-VAE); the
            mean and marginal standard deviations of a full-covariance or mixture prior (`prior_distribution`).
    """

    mu: torch.FloatTensor | None = None
    logvar: torch.FloatTensor | None = None
    decoder_mu: torch.FloatTensor | None = None
    prior_mean: torch.FloatTensor | None = None
    prior_std: torch.FloatTensor | None = None


@dataclass
class ScaleVAEOutput(ModelOutput):
    """
    Output of [`ScaleVAEForLatentLM.forward`].

    Loss normalisation: every term is a sum over the sentence (tokens for the reconstruction, latent dimensions for the
    KL) averaged over the batch, so `loss` is the negative ELBO per sentence in nats when `kl_weight` is 1:
    `loss = reconstruction_loss + kl_weight * kl_loss`.

    Args:
        loss (`torch.FloatTensor` of shape `()`, returned when `labels` are given): the training objective.
        logits (`torch.FloatTensor` of shape `(batch_size, target_length, vocab_size)`): the decoder's logits.
        reconstruction_loss (`torch.FloatTensor` of shape `()`): -log p(x|z) summed over non-pad tokens, batch mean.
        kl (`torch.FloatTensor` of shape `()`): KL(q(z|x) || N(0, I)) of the encoder's (original) posterior, summed
            over dimensions, batch mean. This is the paper's KL.
        kl_per_dim (`torch.FloatTensor` of shape `(latent_size,)`): `kl` per dimension, batch mean.
        kl_loss (`torch.FloatTensor` of shape `()`): the KL that enters the loss (free bits thresholds it, AE zeroes it).
        decoder_kl (`torch.FloatTensor` of shape `()`): KL of the decoder's posterior N(f ⊙ mu, σ²) to the generative
            prior (`config.prior`), batch mean: the KL of a true ELBO for the model that `sample_prior()` draws from
            (`prior_kl`: closed form, or for a mixture prior a Monte Carlo estimate from a fixed seed).
        mu, logvar (`torch.FloatTensor` of shape `(batch_size, latent_size)`): the encoder's posterior.
        decoder_mu (`torch.FloatTensor` of shape `(batch_size, latent_size)`): the decoder's posterior mean f ⊙ mu.
        prior_mean, prior_std (`torch.FloatTensor` of shape `(latent_size,)`): the generative prior's parameters.
        latents (`torch.FloatTensor` of shape `(batch_size, latent_size)`): the z the decoder saw.
        cache (`Cache`, *optional*, returned when `use_cache` is on): the decoder's key/value cache (generation); its
            first position holds the latent's key/value slot when `latent_injection` is `"memory"` or `"both"`.
        decoder_hidden_states, decoder_attentions (`tuple(torch.FloatTensor)`, *optional*): the decoder's, with
            `output_hidden_states=True` / `output_attentions=True` (attentions need `attn_implementation="eager"` for
            the decoder). With memory injection the keys are the latent slot, then the tokens: `[..., 0]` of each
            attention map is how much each token attends to z.
        encoder_hidden_states, encoder_attentions (`tuple(torch.FloatTensor)`, *optional*): the encoder's, likewise,
            when the encoder ran (not when `latents` were given).
        cross_attentions: always None: z enters the decoder's self-attention, which has no cross-attention; the field
            is here because `generate(output_attentions=True)` of an encoder-decoder model reads it.
    """

    loss: torch.FloatTensor | None = None
    logits: torch.FloatTensor | None = None
    reconstruction_loss: torch.FloatTensor | None = None
    kl: torch.FloatTensor | None = None
    kl_per_dim: torch.FloatTensor | None = None
    kl_loss: torch.FloatTensor | None = None
    decoder_kl: torch.FloatTensor | None = None
    mu: torch.FloatTensor | None = None
    logvar: torch.FloatTensor | None = None
    decoder_mu: torch.FloatTensor | None = None
    prior_mean: torch.FloatTensor | None = None
    prior_std: torch.FloatTensor | None = None
    latents: torch.FloatTensor | None = None
    cache: Cache | None = None
    decoder_hidden_states: tuple[torch.FloatTensor, ...] | None = None
    decoder_attentions: tuple[torch.FloatTensor, ...] | None = None
    cross_attentions: tuple[torch.FloatTensor, ...] | None = None
    encoder_hidden_states: tuple[torch.FloatTensor, ...] | None = None
    encoder_attentions: tuple[torch.FloatTensor, ...] | None = None


# ---------------------------------------------------------------------------------------------------------------------
# Latent head: pooled sentence representation -> (mu, logvar)
# ---------------------------------------------------------------------------------------------------------------------


class LatentHead(nn.Module):
    """Masked mean pooling of the encoder's last hidden states, then one linear layer to (mu, logvar).

    Mean pooling rather than BERT's [CLS] pooler: it works for every BERT-style encoder (RoBERTa and sentence
    encoders such as MiniLM ship no trained pooler, and MiniLM was trained with mean pooling).
    """

    def __init__(self, hidden_size: int, latent_size: int):
        super().__init__()
        self.proj = nn.Linear(hidden_size, 2 * latent_size)

    def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mask = attention_mask.unsqueeze(-1).to(hidden_states.dtype)
        pooled = (hidden_states * mask).sum(1) / mask.sum(1).clamp(min=1.0)
        mu, logvar = self.proj(pooled).chunk(2, dim=-1)
        return mu, logvar


# ---------------------------------------------------------------------------------------------------------------------
# Collapse strategies: how the decoder's latent is formed, and which KL enters the loss
# ---------------------------------------------------------------------------------------------------------------------


class CollapseStrategy(nn.Module):
    """The plain VAE. A remedy overrides only what it changes; `forward` of the model never changes."""

    stochastic = True  # whether the decoder's z is sampled from the posterior (False: z is the mean)

    def __init__(self, config: ScaleVAEConfig):
        super().__init__()
        self.latent_size = config.latent_size

    def normalize_mean(self, mu: torch.Tensor) -> torch.Tensor:
        """The posterior mean the KL and the decoder both use (BN-VAE batch-normalises it)."""
        return mu

    def scale_factors_for(self, mu: torch.Tensor) -> torch.Tensor | None:
        """Per-dimension factors f applied to the decoder's mean; None means f = 1."""
        return None

    def kl_in_loss(self, kl_per_dim: torch.Tensor) -> torch.Tensor:
        """The KL term of each example, shape (batch,), from per-example per-dimension KLs."""
        return kl_per_dim.sum(-1)

    def end_step(self) -> None:
        """Called by the training loop after each optimizer step (`make_trainer` does it; a hand-written loop calls
        `model.collapse.end_step()` after `optimizer.step()`); a schedule counted in optimizer steps overrides it."""

    def end_epoch(self) -> None:
        """Called by the training loop at each epoch's end; a schedule that changes with epochs overrides it."""

    @torch.no_grad()
    def calibrate(self, mus: torch.Tensor) -> None:
        """Refit statistics that evaluation uses from the pre-normalisation means of a whole dataset (N, d)."""


class AEStrategy(CollapseStrategy):
    """Deterministic autoencoder: z = mu and no KL in the loss (the KL is still reported)."""

    stochastic = False

    def kl_in_loss(self, kl_per_dim: torch.Tensor) -> torch.Tensor:
        return kl_per_dim.new_zeros(kl_per_dim.shape[0])


class FreeBitsStrategy(CollapseStrategy):
    """Free bits with Optimus's semantics (Li et al. 2020): per example, a dimension whose KL is below the threshold is
    masked out of the loss, so it receives no KL gradient. (Kingma et al.'s variant, max(λ, batch-mean KL), differs.)"""

    def __init__(self, config: ScaleVAEConfig):
        super().__init__(config)
        self.threshold = config.free_bits

    def kl_in_loss(self, kl_per_dim: torch.Tensor) -> torch.Tensor:
        return (kl_per_dim * (kl_per_dim > self.threshold).to(kl_per_dim.dtype)).sum(-1)


class BNStrategy(CollapseStrategy):
    """BN-VAE (Zhu et al. 2020): mu is batch-normalised with a fixed scale γ and a learned shift β, so the batch mean
    of mu_d² is at least γ² and the expected KL at least latent_size · γ² / 2.

    Two changes from a plain `BatchNorm1d(affine=False)` keep that guarantee outside the training batch:

    - No additive eps under the variance. With BatchNorm's eps = 1e-5 the normalised mean is (mu − m) / sqrt(v + eps),
      and the KL term pays the encoder to shrink v far below eps, where the output is ≈ 0 and the bound is gone (on
      real text the pre-norm variance fell to 1e-14). Without eps the objective does not depend on the scale of the
      pre-norm mean, so nothing pulls it down; a floor of 1e-20 only guards a batch of identical sentences.
    - Evaluation uses population statistics. Running averages with momentum lag a scale that moves during training;
      `calibrate` (called by `ScaleVAEForLatentLM.fit_prior` after training) replaces them with the exact mean and
      variance over a dataset, as "precise BN" does.

    Under data parallelism the statistics are the global batch's (as SyncBatchNorm's), so every process normalises
    alike, keeps the same running statistics, and trains as one process would on the whole batch.
    """

    variance_floor = 1e-20

    def __init__(self, config: ScaleVAEConfig):
        super().__init__(config)
        self.momentum = 0.1
        self.register_buffer("gamma", torch.tensor(float(config.bn_gamma)))
        self.beta = nn.Parameter(torch.zeros(config.latent_size))
        self.register_buffer("running_mean", torch.zeros(config.latent_size))
        self.register_buffer("running_var", torch.ones(config.latent_size))

    def normalize_mean(self, mu: torch.Tensor) -> torch.Tensor:
        mu = mu.float()
        if self.training:
            world = data_parallel_world()
            if mu.shape[0] * world == 1:
                raise ValueError(
                    "collapse_strategy='bn' cannot train on a batch of one: batch-norm needs two examples."
                )
            if world == 1:
                mean, var, count = mu.mean(0), mu.var(0, unbiased=False), mu.shape[0]
            else:
                mean, count = global_batch_mean(mu)
                var, _ = global_batch_mean((mu - mean).pow(2))
            with torch.no_grad():
                self.running_mean.lerp_(mean.detach(), self.momentum)
                unbiased = var.detach() * count / (count - 1)
                self.running_var.lerp_(unbiased, self.momentum)
        else:
            mean, var = self.running_mean, self.running_var
        return self.gamma * (mu - mean) * var.clamp(min=self.variance_floor).rsqrt() + self.beta

    @torch.no_grad()
    def calibrate(self, mus: torch.Tensor) -> None:
        self.running_mean.copy_(mus.double().mean(0))
        self.running_var.copy_(mus.double().var(0))


class ScaleStrategy(CollapseStrategy):
    """Scale-VAE: the decoder sees z = f ⊙ mu + σ ⊙ ε with f_d = target_std / std_batch(mu_d).

    f carries no gradient and is shared by every instance; the KL is that of the unscaled posterior, so the encoder is
    not pushed to raise it, while the scaled means stay discriminative for the decoder. The running estimate of f in
    `scale_factors` (saved with the model) serves evaluation, encoding and generation, and the frozen phase of a
    schedule. The statistics and the estimate are kept in float32 or float64 whatever the autocast dtype of mu.

    The schedule state is saved as buffers (a resumed run continues where it stopped) and mirrored in Python ints, so
    that the training step branches on it without reading a tensor back from the device. The mirrors are re-read from
    the buffers whenever those are replaced (`from_pretrained`, `.to()`, `to_empty()`), once, on their next eager use.
    The step itself reads only `_frozen`, which changes once in a run: a counter read there would make `torch.compile`
    recompile the step at every new value.
    """

    def __init__(self, config: ScaleVAEConfig):
        super().__init__(config)
        self.target_std = config.scale_target_std
        self.momentum = config.scale_momentum
        self.min_std = config.scale_min_std
        self.schedule = config.scale_schedule
        self.freeze_steps = config.scale_freeze_steps
        self.freeze_epochs = config.scale_freeze_epochs
        self.register_buffer("scale_factors", torch.ones(config.latent_size))
        self.register_buffer("frozen", torch.tensor(False))
        self.register_buffer("steps", torch.tensor(0, dtype=torch.long))
        self.register_buffer("epochs", torch.tensor(0, dtype=torch.long))
        self.register_buffer("epoch_factor_sum", torch.zeros(config.latent_size, dtype=torch.float64))
        self.register_buffer("epoch_batches", torch.tensor(0, dtype=torch.long))
        self._steps, self._frozen, self._epochs = 0, False, 0
        self._mirrored = None  # the buffers the mirrors were read from; None: read them at the next use

    def _schedule_buffers(self) -> tuple[torch.Tensor, ...]:
        return self.steps, self.frozen, self.epochs, self.epoch_batches

    def _sync_mirrors(self) -> None:
        """Re-read the mirrors if the buffers are other tensors than the ones they were read from: loading replaces the
        buffers' tensors (transformers' loader assigns them) instead of copying into them, and so do `.to()` and
        `to_empty()`. In-place updates keep the tensors, so a training step reads nothing back."""
        buffers = self._schedule_buffers()
        if self._mirrored is None or any(a is not b for a, b in zip(buffers, self._mirrored)):
            self._steps, self._frozen, self._epochs = int(self.steps), bool(self.frozen), int(self.epochs)
            self._mirrored = buffers

    def train(self, mode: bool = True):
        # Read the mirrors here, eagerly: a compiled step cannot (a host read breaks its graph), so it relies on this.
        if not self.steps.is_meta:
            self._sync_mirrors()
        return super().train(mode)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self._mirrored = None  # load_state_dict copies into the same tensors

    @torch.no_grad()
    def batch_factors(self, mu: torch.Tensor) -> torch.Tensor | None:
        """target / std over the (global, under DDP) batch of each dimension of mu, float32; None for a batch of one."""
        distributed = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
        if mu.shape[0] * (dist.get_world_size() if distributed else 1) < 2:
            return None
        stats = torch.stack([mu.new_full((mu.shape[1],), mu.shape[0]), mu.sum(0), mu.pow(2).sum(0)]).double()
        if distributed:
            # Reduce the sums, not the factors: every rank then holds the global batch's factors.
            dist.all_reduce(stats)
        count, total, total_sq = stats
        var = (total_sq - total.pow(2) / count) / (count - 1)
        std = var.clamp(min=0).sqrt().clamp(min=self.min_std)
        return (self.target_std / std).to(self.scale_factors.dtype)

    def scale_factors_for(self, mu: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return self.scale_factors
        if not torch.compiler.is_compiling():  # a compiled step relies on train() having read them
            self._sync_mirrors()
        if self._frozen:
            return self.scale_factors
        factors = self.batch_factors(mu.detach())
        if factors is None:  # a batch of one has no spread: fall back to the running estimate
            logger.warning_once(
                "Scale-VAE got a training batch of one sentence: its scale factors need the spread of a batch, so "
                "this batch uses the running estimate (ones before any larger batch). Train with a batch size of at "
                "least 2 (16 or more for a stable estimate)."
            )
            return self.scale_factors
        with torch.no_grad():
            # The first batch of the run starts the estimate (a weight of 1 copies it exactly). Decided on the device:
            # a Python counter read here would make torch.compile recompile the step at each new value.
            started = (self.steps + self.epochs + self.epoch_batches) > 0
            self.scale_factors.lerp_(factors, torch.where(started, self.momentum, 1.0).to(factors.dtype))
            self.epoch_factor_sum.add_(factors.double())
            self.epoch_batches.add_(1)
        return factors

    @torch.no_grad()
    def end_step(self):
        """Counts optimizer steps (not forward passes, which gradient accumulation multiplies); the `"running"`
        schedule freezes the factors after `scale_freeze_steps` of them."""
        self._sync_mirrors()
        self._steps += 1
        self.steps.add_(1)
        if self.schedule == "running" and self.freeze_steps is not None and self._steps >= self.freeze_steps:
            self._frozen = True
            self.frozen.fill_(True)

    @torch.no_grad()
    def end_epoch(self):
        """The `"epoch"` schedule freezes after f_epo epochs to the mean of the last epoch's per-batch factors."""
        self._sync_mirrors()
        self._epochs += 1
        self.epochs.add_(1)
        if self.schedule == "epoch" and not self._frozen and self._epochs >= self.freeze_epochs:
            batches = int(self.epoch_batches)  # once per epoch, outside the step: a host read is fine here
            if batches:
                self.scale_factors.copy_((self.epoch_factor_sum / batches).to(self.scale_factors.dtype))
                self._frozen = True
                self.frozen.fill_(True)
        self.epoch_factor_sum.zero_()
        self.epoch_batches.zero_()


COLLAPSE_STRATEGY_CLASSES = {
    "vae": CollapseStrategy,
    "ae": AEStrategy,
    "free_bits": FreeBitsStrategy,
    "bn": BNStrategy,
    "scale": ScaleStrategy,
}


# ---------------------------------------------------------------------------------------------------------------------
# The fitted prior: the aggregate posterior's Gaussian, full-covariance Gaussian or mixture, saved as buffers
# ---------------------------------------------------------------------------------------------------------------------


class FittedPrior(nn.Module):
    """The prior fitted to the aggregate of the decoder's posterior, q'(z) = the mean over sentences of N(f ⊙ mu, σ²).

    Any fixed prior gives a valid bound; one fitted to q'(z) does not pay for the gap between N(0, diag f²) and where
    the decoder's latents are. Three families (`config.prior`), each the maximum-likelihood fit to q'(z) within it:

    - `"fitted"`: N(loc, diag(scale²)) with the aggregate's moments, loc = E[f ⊙ mu], scale² = Var(f ⊙ mu) + E[σ²].
      While training, an exponential moving average of the moments (momentum `prior_momentum`) tracks it.
    - `"full"`: N(m, Σ) with the aggregate's mean and full covariance Σ = Cov(f ⊙ mu) + diag(E[σ²]).
    - `"mixture"`: `prior_components` full-covariance Gaussians, fitted by EM to samples of q'(z).

    `fit` sets them from a dataset's posteriors (`ScaleVAEForLatentLM.fit_prior`). The diagonal running estimate always
    exists (`evaluate_model(priors=("fitted",))` scores any model with it); "full" and "mixture" keep one (k, d, d)
    set of buffers (k = 1 for "full"), which mirror the running estimate while training, until `fit` refits them.
    """

    def __init__(self, config: ScaleVAEConfig):
        super().__init__()
        self.family, self.momentum = config.prior, config.prior_momentum
        d = config.latent_size
        # Only the buffers a fitted family uses are saved, so folders saved with another prior (or before this one
        # existed) load strictly; the full and mixture priors keep the diagonal fit too, to be scored against it.
        self.register_buffer("loc", torch.zeros(d), persistent=self.family != "scaled")
        self.register_buffer("scale", torch.ones(d), persistent=self.family != "scaled")
        self.components = {"full": 1, "mixture": config.prior_components}.get(self.family)
        if self.components is not None:
            k = self.components
            self.register_buffer("component_logits", torch.zeros(k))
            self.register_buffer("component_loc", torch.zeros(k, d))
            self.register_buffer("component_scale_tril", torch.eye(d).repeat(k, 1, 1))

    @torch.no_grad()
    def _mirror_diagonal(self) -> None:
        if self.components is not None:
            self.component_logits.zero_()
            self.component_loc.copy_(self.loc.expand_as(self.component_loc))
            self.component_scale_tril.copy_(torch.diag_embed(self.scale).expand_as(self.component_scale_tril))

    def distribution(self, family: str | None = None, dtype: torch.dtype | None = None) -> Distribution:
        """The fitted prior of `family` (default: the config's) as a `torch.distributions` object, in `dtype`."""
        family = family or self.family
        if family == "fitted":
            return diagonal_gaussian(self.loc.to(dtype), self.scale.to(dtype))
        if family != self.family or self.components is None:
            raise ValueError(
                f"prior={family!r} was not built: this model's prior is {self.family!r}. Call "
                f"model.set_prior({family!r}) and then model.fit_prior(...) on training data."
            )
        loc, tril = self.component_loc.to(dtype), self.component_scale_tril.to(dtype)
        if family == "full":
            return MultivariateNormal(loc[0], scale_tril=tril[0], validate_args=False)
        return MixtureSameFamily(
            Categorical(logits=self.component_logits.to(dtype), validate_args=False),
            MultivariateNormal(loc, scale_tril=tril, validate_args=False),
            validate_args=False,
        )

    @torch.no_grad()
    def update(self, decoder_mu: torch.Tensor, logvar: torch.Tensor) -> None:
        """One step of the running estimate, from the batch's moments (the global batch's under data parallelism, so
        that every process keeps the same estimate)."""
        if data_parallel_world() == 1:
            mean = decoder_mu.float().mean(0)
            second_moment = (decoder_mu.float().pow(2) + logvar.float().exp()).mean(0)
        else:
            moments, _ = global_batch_mean(
                torch.cat([decoder_mu.float(), decoder_mu.float().pow(2) + logvar.float().exp()], 1)
            )
            mean, second_moment = moments.chunk(2)
        running_second_moment = self.scale.pow(2) + self.loc.pow(2)
        self.loc.lerp_(mean, self.momentum)
        second = running_second_moment.lerp_(second_moment, self.momentum)
        self.scale.copy_((second - self.loc.pow(2)).clamp(min=1e-12).sqrt())
        self._mirror_diagonal()

    @torch.no_grad()
    def fit(
        self,
        decoder_mu: torch.Tensor,
        logvar: torch.Tensor,
        generator: torch.Generator | None = None,
        num_samples: int = 10000,
    ) -> None:
        """Fit to the aggregate posterior of N sentences ((N, d) means and log-variances): the diagonal and full
        Gaussians to its exact moments; the mixture by EM on at least `num_samples` draws from it (as many per
        sentence), with `generator` (default: seeded with 0, so a refit gives the same prior)."""
        decoder_mu, variance = decoder_mu.double(), logvar.double().exp()
        mean = decoder_mu.mean(0)
        # Every fit is computed before any buffer changes, so a fit that fails leaves the prior as it was.
        components = None
        if self.family == "full":
            centred = decoder_mu - mean
            covariance = centred.T @ centred / len(decoder_mu) + torch.diag(variance.mean(0))
            tril, info = torch.linalg.cholesky_ex(covariance)
            # Singular only when posterior variances vanish (an AE's) and the means span too few dimensions.
            if info.item() != 0:
                raise ValueError(
                    f"The full-covariance prior cannot be fitted: the aggregate posterior of {len(decoder_mu)} sentences "
                    f"has a singular covariance in {decoder_mu.shape[1]} dimensions (smallest mean posterior variance "
                    f"{variance.mean(0).min().item():.3g}). Fit it on more sentences, or use prior='fitted'."
                )
            components = (torch.zeros(1), mean.unsqueeze(0), tril.unsqueeze(0))
        elif self.family == "mixture":
            generator = generator if generator is not None else torch.Generator().manual_seed(0)
            per_sentence = -(-num_samples // len(decoder_mu))
            shape = (len(decoder_mu), per_sentence, decoder_mu.shape[1])
            noise = torch.randn(shape, generator=generator, device=generator.device, dtype=torch.float64)
            noise = noise.to(decoder_mu.device)
            samples = (decoder_mu.unsqueeze(1) + variance.sqrt().unsqueeze(1) * noise).flatten(0, 1)
            components = fit_gaussian_mixture(samples, self.components, generator)
        self.loc.copy_(mean)
        self.scale.copy_((decoder_mu.var(0, unbiased=False) + variance.mean(0)).sqrt())
        if components is not None:
            buffers = (self.component_logits, self.component_loc, self.component_scale_tril)
            for buffer, value in zip(buffers, components):
                buffer.copy_(value)


# ---------------------------------------------------------------------------------------------------------------------
# Latent injection (Optimus): z -> one key/value memory slot per decoder layer, and/or z -> added token embedding
# ---------------------------------------------------------------------------------------------------------------------


class LatentInjection(nn.Module):
    def __init__(self, config: ScaleVAEConfig):
        super().__init__()
        decoder = config.decoder
        self.num_layers, self.num_heads = decoder.n_layer, decoder.n_head
        self.head_dim = decoder.n_embd // decoder.n_head
        use_memory = config.latent_injection in ("memory", "both")
        use_embedding = config.latent_injection in ("embedding", "both")
        # Separate keys and values for every layer (Optimus shares one vector for both; the extra map costs nothing).
        self.to_memory = nn.Linear(config.latent_size, 2 * decoder.n_layer * decoder.n_embd) if use_memory else None
        self.to_embedding = nn.Linear(config.latent_size, decoder.n_embd) if use_embedding else None

    def fill_memory(self, latents: torch.Tensor, cache: Cache) -> None:
        """Write z's key/value slot into an empty cache: every text position then attends to it, and text positions
        shift by one because the latent occupies slot 0."""
        batch = latents.shape[0]
        kv = self.to_memory(latents).view(batch, self.num_layers, 2, self.num_heads, 1, self.head_dim)
        for layer in range(self.num_layers):
            cache.update(kv[:, layer, 0], kv[:, layer, 1], layer)

    def memory_cache(self, latents: torch.Tensor) -> Cache:
        """A cache that holds z's key/value slot and is never written: one decoder pass (training, scoring) reads the
        slot through it without building a cache to return. Gradient checkpointing needs that: its backward replays each
        layer with the same cache, and a cache that appended would hand the replay other keys than the first pass saw."""
        kv = self.to_memory(latents).view(latents.shape[0], self.num_layers, 2, self.num_heads, 1, self.head_dim)
        return Cache(layers=[LatentMemoryLayer(kv[:, layer, 0], kv[:, layer, 1]) for layer in range(self.num_layers)])


class LatentMemoryLayer(DynamicLayer):
    """One decoder layer's read-only cache: the latent's key/value slot, followed by the keys/values of the tokens
    being decoded, which it returns without storing."""

    def __init__(self, keys: torch.Tensor, values: torch.Tensor):
        super().__init__()
        super().update(keys, values)

    def update(self, key_states, value_states, *args, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.cat([self.keys, key_states], dim=-2), torch.cat([self.values, value_states], dim=-2)


# ---------------------------------------------------------------------------------------------------------------------
# The model
# ---------------------------------------------------------------------------------------------------------------------


class ScaleVAEPreTrainedModel(PreTrainedModel):
    config_class = ScaleVAEConfig
    base_model_prefix = "scalevae"
    main_input_name = "input_ids"
    supports_gradient_checkpointing = True
    _no_split_modules = ["BertLayer", "RobertaLayer", "GPT2Block"]
    _supports_sdpa = True

    def _init_weights(self, module):
        """The new layers only (latent head, strategies, injection): transformers hands the modules of the encoder
        and the decoder, themselves `PreTrainedModel`s, to their own `_init_weights`. Every buffer gets the value a
        fresh model holds, so a model built on the meta device (big-model loading, FSDP) and then `to_empty()` +
        `init_weights()` is a fresh model; `transformers.initialization` skips the tensors a checkpoint loaded."""
        if isinstance(module, nn.Linear):
            init.normal_(module.weight, mean=0.0, std=self.config.decoder.initializer_range)
            if module.bias is not None:
                init.zeros_(module.bias)
        elif isinstance(module, ScaleStrategy):
            init.ones_(module.scale_factors)
            for buffer in (module.frozen, module.steps, module.epochs, module.epoch_factor_sum, module.epoch_batches):
                init.zeros_(buffer)
            module._mirrored = None
        elif isinstance(module, BNStrategy):
            init.constant_(module.gamma, float(self.config.bn_gamma))
            init.zeros_(module.beta)
            init.zeros_(module.running_mean)
            init.ones_(module.running_var)
        elif isinstance(module, FittedPrior):
            init.zeros_(module.loc)
            init.ones_(module.scale)
            if module.components is not None:  # the full and mixture priors: N(0, I) in every component
                init.zeros_(module.component_logits)
                init.zeros_(module.component_loc)
                tril = module.component_scale_tril
                init.copy_(tril, torch.eye(tril.shape[-1], device=tril.device, dtype=tril.dtype).expand_as(tril))


class ScaleVAEForLatentLM(ScaleVAEPreTrainedModel, GenerationMixin):
    r"""
    A text VAE: BERT-style encoder -> Gaussian latent z -> GPT-2 decoder conditioned on z (Optimus-style injection),
    with a swappable posterior-collapse remedy (`config.collapse_strategy`, Scale-VAE by default).

    The generative model is z ~ p(z), x ~ p(x|z), with p(z) chosen by `config.prior`: a diagonal (`"fitted"`),
    full-covariance (`"full"`) or mixture (`"mixture"`) Gaussian fitted to the aggregate of the decoder's posterior, or
    N(0, diag(f²)), the standard normal pushed through the scale factors (`"scaled"`; f = 1 for every strategy but
    Scale-VAE). `sample_prior`, `decoder_kl`, the ELBO and the importance-weighted NLL all refer to it
    (`prior_distribution`).

    It follows transformers' encoder-decoder conventions (`config.is_encoder_decoder` is True), those of
    `EncoderDecoderModel`:

    - `input_ids`/`attention_mask` are always the encoder's tokens, `decoder_input_ids`/`decoder_attention_mask` the
      decoder's, in `forward` and in `generate` alike.
    - `generate(input_ids=...)` encodes the text, takes z (the posterior's mode, or one draw with
      `sample_posterior=True`) and returns decoder token ids only, starting with the decoder's start token (its BOS):
      `(batch, 1 + new tokens)`, or `(batch, prompt + new tokens)` with a decoder prompt `decoder_input_ids=`, to which
      BOS is prepended if it does not start with it. `generate(latents=z)` decodes a given z the same way.
    - In eval mode `forward` decodes the posterior's mode, so its outputs are repeatable; it samples z in training, or
      when `sample_posterior=True` (diffusers' `AutoencoderKL` convention), from `generator` if given.
    - `get_input_embeddings()` is the decoder's token embedding (the decoder is the text config transformers resizes):
      `resize_token_embeddings` resizes it and the tied LM head; resize the encoder's with
      `model.encoder.resize_token_embeddings`.
    - The attention implementation is chosen per part: `attn_implementation={"encoder": "sdpa", "decoder": "eager"}`,
      or one set on `config.encoder`/`config.decoder`, is kept; the composite's applies to a part that set none.
    """

    def __init__(
        self,
        config: ScaleVAEConfig,
        encoder: PreTrainedModel | None = None,
        decoder: GPT2LMHeadModel | None = None,
    ):
        # What each part asked for, before PreTrainedModel resolves the composite's choice and copies it to both.
        part_attention = {part: getattr(config, part)._attn_implementation for part in ("encoder", "decoder")}
        super().__init__(config)
        config = self.config  # PreTrainedModel keeps its own copy
        encoder = encoder if encoder is not None else AutoModel.from_config(config.encoder)
        decoder = decoder if decoder is not None else GPT2LMHeadModel._from_config(config.decoder)
        if getattr(encoder, "pooler", None) is not None:
            encoder.pooler = None  # mean pooling is used instead; an unused pooler would get no gradient
        if encoder.get_output_embeddings() is not None:
            raise ValueError(f"The encoder {type(encoder).__name__} must be a base model without an LM head.")
        # The parts share the composite config, so changes to it reach them (as in EncoderDecoderModel); the
        # composite's attention implementation, resolved by PreTrainedModel, is then dispatched to a part that asked
        # for none of its own.
        encoder_attention = part_attention["encoder"] or encoder.config._attn_implementation
        decoder_attention = part_attention["decoder"] or decoder.config._attn_implementation
        encoder.config, decoder.config = config.encoder, config.decoder
        self.encoder = encoder
        self.decoder = decoder
        self.latent_head = LatentHead(config.encoder.hidden_size, config.latent_size)
        self.collapse = COLLAPSE_STRATEGY_CLASSES[config.collapse_strategy](config)
        self.fitted_prior = FittedPrior(config)
        self.injection = LatentInjection(config)
        if config.decoder.tie_word_embeddings:
            # Saved once as the embedding; naming it lets Trainer re-tie it instead of warning on resume.
            self._keys_to_ignore_on_save = ["decoder.lm_head.weight"]
        top = config._attn_implementation
        self.set_attn_implementation(
            {"": top, "encoder": encoder_attention or top, "decoder": decoder_attention or top}
        )
        self.post_init()
        self._freeze_encoder(config.freeze_encoder)
        self.generation_config = GenerationConfig(
            bos_token_id=config.decoder.bos_token_id,
            decoder_start_token_id=config.decoder.bos_token_id,
            eos_token_id=config.decoder.eos_token_id,
            pad_token_id=config.decoder.pad_token_id,
        )

    def _freeze_encoder(self, frozen: bool | int) -> None:
        """`config.freeze_encoder`: True freezes the whole encoder, k its embeddings and lower k layers."""
        if frozen is False or frozen == 0 and not isinstance(frozen, bool):
            return
        layers = getattr(getattr(self.encoder, "encoder", None), "layer", None)
        if frozen is True or layers is None:
            modules = [self.encoder]
        else:
            modules = [self.encoder.embeddings, *layers[:frozen]]
        for module in modules:
            module.requires_grad_(False)

    def train(self, mode: bool = True):
        """`nn.Module.train`, except that a wholly frozen encoder stays in eval mode: it learns nothing, and its
        dropout would only add noise to the features the latent head learns from."""
        super().train(mode)
        if self.config.freeze_encoder is True:
            self.encoder.eval()
        return self

    def _set_gradient_checkpointing(
        self, enable: bool = True, gradient_checkpointing_func=checkpoint, every_n_layers: int = 1
    ):
        """transformers' switch, except that GPT-2's trunk keeps handing its blocks the cache: under checkpointing it
        would hand them none, and the latent's key/value slot reaches them through one. The blocks still checkpoint
        themselves; `decode` gives them, in checkpointed training, a cache that is never written (`memory_cache`), so
        the backward replay of a block reads the same keys as its first pass."""
        super()._set_gradient_checkpointing(enable, gradient_checkpointing_func, every_n_layers)
        self.decoder.transformer.gradient_checkpointing = False

    def _decoder_checkpointing(self) -> bool:
        """Whether this decoder pass checkpoints its blocks (training, with gradients), as GPT-2 decides it."""
        if not (self.training and torch.is_grad_enabled()):
            return False
        transformer = self.decoder.transformer
        if transformer.gradient_checkpointing:  # enabled on `model.decoder` alone: route the cache as above
            transformer.gradient_checkpointing = False
        return any(block.gradient_checkpointing for block in transformer.h)

    # -- embeddings ---------------------------------------------------------------------------------------------------

    def get_input_embeddings(self) -> nn.Module:
        """The decoder's token embedding, tied to its LM head: transformers' text config here is the decoder's."""
        return self.decoder.get_input_embeddings()

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.decoder.set_input_embeddings(value)

    def get_output_embeddings(self) -> nn.Module:
        return self.decoder.get_output_embeddings()

    def set_output_embeddings(self, new_embeddings: nn.Module) -> None:
        self.decoder.set_output_embeddings(new_embeddings)

    # -- loading ------------------------------------------------------------------------------------------------------

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *model_args, **kwargs):
        """`PreTrainedModel.from_pretrained`, strict: a ScaleVAE folder loads only into the config it was saved with.

        A tensor the config expects but the weights file lacks, one the file holds but the config does not use, or one
        of another shape raises a `ValueError` naming the config values on both sides, never a silently initialised
        layer (`ignore_mismatched_sizes=True` still allows, on request, shape changes such as a new vocabulary;
        `strict=False` loads a file that lacks weights, or holds unused ones, as transformers does: newly initialised,
        dropped, and listed in a warning and in `output_loading_info`). A truncated or corrupted safetensors file raises
        an `OSError` naming it, and so does one whose tensors differ from the checksum recorded when it was saved
        (`verify_weights=False` skips that check; files saved without a checksum load as before).
        `output_loading_info=True` works as usual.
        """
        return load_strictly(super().from_pretrained, pretrained_model_name_or_path, *model_args, **kwargs)

    def save_pretrained(self, save_directory, *args, push_to_hub: bool = False, **kwargs):
        """`PreTrainedModel.save_pretrained` (also behind Trainer checkpoints and `push_to_hub`), plus: each weights
        file records a checksum of its tensors and the time of the save (`from_pretrained` verifies the checksum), and
        config.json names local encoder/decoder folders by their name only, not by their path on this machine."""
        save_publicly(self, super().save_pretrained, save_directory, *args, push_to_hub=push_to_hub, **kwargs)

    # -- construction from pretrained parts ------------------------------------------------------------------------

    @classmethod
    def from_encoder_decoder_pretrained(
        cls,
        encoder_pretrained_model_name_or_path: str,
        decoder_pretrained_model_name_or_path: str | None = None,
        **kwargs,
    ) -> "ScaleVAEForLatentLM":
        """Build from a pretrained encoder (e.g. `"bert-base-uncased"`) and a pretrained GPT-2 (e.g. `"gpt2"`).

        Keyword arguments prefixed `encoder_` / `decoder_` go to that part's `from_pretrained`, as in
        `EncoderDecoderModel`; `decoder_config` replaces the decoder; the rest go to `ScaleVAEConfig`. With no decoder
        path, the decoder is a new `GPT2LMHeadModel` built from `decoder_config` (default: `default_decoder_config`).
        """
        encoder_kwargs = {k[len("encoder_") :]: v for k, v in kwargs.items() if k.startswith("encoder_")}
        decoder_kwargs = {k[len("decoder_") :]: v for k, v in kwargs.items() if k.startswith("decoder_")}
        config_kwargs = {k: v for k, v in kwargs.items() if not k.startswith(("encoder_", "decoder_"))}
        encoder = AutoModel.from_pretrained(encoder_pretrained_model_name_or_path, **encoder_kwargs)
        if decoder_pretrained_model_name_or_path is not None:
            decoder = GPT2LMHeadModel.from_pretrained(decoder_pretrained_model_name_or_path, **decoder_kwargs)
        else:
            decoder_config = decoder_kwargs.pop("config", None) or default_decoder_config(
                vocab_size=encoder.config.vocab_size
            )
            decoder = GPT2LMHeadModel._from_config(decoder_config)
        config = ScaleVAEConfig(encoder=encoder.config, decoder=decoder.config, **config_kwargs)
        return cls(config, encoder=encoder, decoder=decoder)

    # -- the latent ---------------------------------------------------------------------------------------------------

    def encode(
        self,
        input_ids: torch.LongTensor,
        attention_mask: torch.Tensor | None = None,
        prior: str | None = None,
    ) -> ScaleVAEEncoderOutput:
        """The posterior of each sentence and the generative prior (`prior` overrides `config.prior`). Outside training
        the scale factors are the saved running estimate."""
        check_encoder_inputs(self.config, input_ids, attention_mask, self.training)
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        return self._posterior(hidden, attention_mask, prior)

    def _posterior(
        self, hidden: torch.Tensor, attention_mask: torch.Tensor, prior: str | None = None
    ) -> ScaleVAEEncoderOutput:
        mu, logvar = self.latent_head(hidden, attention_mask)
        mu = self.collapse.normalize_mean(mu)
        factors = self.collapse.scale_factors_for(mu)
        decoder_mu = mu if factors is None else factors * mu
        prior_mean, prior_std = self.prior_parameters(prior, factors)
        return ScaleVAEEncoderOutput(
            mu=mu, logvar=logvar, decoder_mu=decoder_mu, prior_mean=prior_mean, prior_std=prior_std
        )

    def draw_latents(
        self,
        posterior: ScaleVAEEncoderOutput,
        sample_posterior: bool | None = None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """The z the decoder sees: a draw from the decoder's posterior N(decoder_mu, σ²) when sampling, its mode
        `decoder_mu` otherwise. `sample_posterior=None` samples in training only; a deterministic autoencoder
        (`collapse_strategy="ae"`) never samples. `generator` seeds the draw."""
        check_generator("generator", generator)
        sample = self.training if sample_posterior is None else check_flag("sample_posterior", sample_posterior)
        mean = posterior.decoder_mu
        if not (sample and self.collapse.stochastic):
            return mean
        if generator is None:
            noise = torch.randn_like(mean)
        else:  # drawn on the generator's device: a CPU generator gives the same z whatever device the model is on
            noise = torch.randn(mean.shape, generator=generator, device=generator.device, dtype=mean.dtype)
        return mean + noise.to(mean.device) * (0.5 * posterior.logvar).exp()

    def prior_parameters(
        self, prior: str | None = None, factors: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean, std) of the generative prior, per dimension: the parameters of a diagonal prior (`"fitted"`,
        `"scaled"`), the mean and marginal standard deviations of a full-covariance or mixture prior, whose density
        needs `prior_distribution`. `prior` defaults to `config.prior`; `factors` are the scale factors of the scaled
        prior (default: the saved running estimate)."""
        prior = prior or self.config.prior
        if prior == "fitted":
            return self.fitted_prior.loc, self.fitted_prior.scale
        if prior == "scaled":
            if factors is None:
                factors = getattr(self.collapse, "scale_factors", None)
            std = factors if factors is not None else self.fitted_prior.scale.new_ones(self.config.latent_size)
            return torch.zeros_like(std), std
        distribution = self.prior_distribution(prior)
        return distribution.mean, distribution.stddev

    def prior_distribution(self, prior: str | None = None, dtype: torch.dtype | None = None) -> Distribution:
        """The generative prior p(z) as a `torch.distributions` object (`log_prob`, `mean`), in `dtype` (default: the
        buffers'): `prior` (default `config.prior`) is one of `"fitted"`, `"scaled"`, `"full"`, `"mixture"`; a full or
        mixture prior other than the config's was not built (`set_prior` builds it)."""
        prior = prior or self.config.prior
        if prior not in PRIORS:
            raise ValueError(f"prior={prior!r} is not one of {PRIORS}.")
        if prior == "scaled":
            mean, std = self.prior_parameters("scaled")
            return diagonal_gaussian(mean.to(dtype), std.to(dtype))
        return self.fitted_prior.distribution(prior, dtype)

    def sample_prior(
        self, num_samples: int, generator: torch.Generator | None = None, prior: str | None = None
    ) -> torch.Tensor:
        """z ~ p(z), the generative prior (`config.prior`, or `prior`) as the decoder sees it."""
        num_samples = check_integer("num_samples", num_samples, 1, MAX_SAMPLED_LATENTS)
        check_generator("generator", generator)
        return sample_distribution(self.prior_distribution(prior), num_samples, generator)

    def set_prior(self, prior: str, components: int | None = None) -> None:
        """Switch the generative prior to `prior` (with `components` for `"mixture"`), keeping the diagonal running
        estimate; `fit_prior` then fits it. Training never uses the prior (its KL is the original posterior's to
        N(0, I)), so a trained model can be scored under each family in turn."""
        changes = {"prior": prior} if components is None else {"prior": prior, "prior_components": components}
        fitted_prior = FittedPrior(self.config.validated_copy(**changes)).to(self.fitted_prior.loc.device)
        fitted_prior.loc.copy_(self.fitted_prior.loc)
        fitted_prior.scale.copy_(self.fitted_prior.scale)
        fitted_prior._mirror_diagonal()
        for field, value in changes.items():
            setattr(self.config, field, value)
        self.fitted_prior = fitted_prior

    @torch.no_grad()
    def fit_prior(self, batches, generator: torch.Generator | None = None) -> None:
        """Fit the generative model's statistics to data, in eval mode: first the strategy's (BN-VAE's population mean
        and variance), then the fitted prior to the aggregate decoder posterior (`FittedPrior.fit`: exact moments for
        the Gaussians, EM for the mixture, whose samples `generator` draws). `batches`: an iterable (a DataLoader or a
        list) of dicts with the encoder's `input_ids` and `attention_mask`; the training glue calls it after training
        on (a sample of) the training set, never on test data."""
        check_generator("generator", generator)
        inputs = [
            (ids.to(self.device), torch.ones_like(ids) if mask is None else mask.to(self.device))
            for ids, mask in encoder_batches(batches)
        ]
        # Under FSDP2 the model's own parameters (embeddings, latent head) stay sharded outside its forward, and this
        # calls its parts directly: gather them first (the sharded blocks gather theirs in their own forward).
        sharded = False
        if dist.is_available():
            from torch.distributed.fsdp import FSDPModule

            sharded = isinstance(self, FSDPModule)
        if sharded:
            self.unshard()
        was_training = self.training
        self.eval()
        try:
            # First the statistics the posterior goes through (BN-VAE's), then the prior fitted to that posterior.
            if type(self.collapse).calibrate is not CollapseStrategy.calibrate:
                pre_norm_means = [
                    self.latent_head(self.encoder(input_ids=ids, attention_mask=mask).last_hidden_state, mask)[0]
                    for ids, mask in inputs
                ]
                self.collapse.calibrate(torch.cat(pre_norm_means).float())
            posteriors = [self.encode(ids, mask) for ids, mask in inputs]
            self.fitted_prior.fit(
                torch.cat([p.decoder_mu for p in posteriors]), torch.cat([p.logvar for p in posteriors]), generator
            )
        finally:
            self.train(was_training)
            if sharded:
                self.reshard()

    # -- the decoder --------------------------------------------------------------------------------------------------

    def decode(
        self,
        latents: torch.Tensor,
        decoder_input_ids: torch.LongTensor,
        decoder_attention_mask: torch.Tensor | None = None,
        cache: Cache | None = None,
        use_cache: bool = False,
        **decoder_kwargs,
    ):
        """Teacher-forced decoder pass conditioned on z; returns the GPT-2 `CausalLMOutput` (logits, cache, and hidden
        states or attentions when `decoder_kwargs` ask for them). With `use_cache`, the cache (a new one, or the given
        one continued) is returned; without, no cache is built. An `EncoderDecoderCache` (what `generate` makes for an
        encoder-decoder model) is used through its self-attention cache."""
        latents = as_model_latents(latents, self.dtype, self.device)
        if isinstance(cache, EncoderDecoderCache):
            cache = cache.self_attention_cache
        if self._decoder_checkpointing():
            if cache is not None:
                raise ValueError(
                    "A cache cannot be continued in a training pass under gradient checkpointing: the backward replay "
                    "would write it twice. Decode without `cache`, or under torch.no_grad()."
                )
            if use_cache:
                logger.warning_once(
                    "use_cache=True is incompatible with gradient checkpointing: no cache is returned."
                )
            use_cache = False
            checkpoint_func = getattr(self.decoder.transformer.h[0], "_gradient_checkpointing_func", None)
            checkpoint_kwargs = getattr(checkpoint_func, "keywords", {})
            if self.injection.to_memory is not None and checkpoint_kwargs.get("use_reentrant"):
                raise ValueError(
                    "latent_injection='memory'/'both' under gradient checkpointing needs use_reentrant=False "
                    "(transformers' default): the latent's key/value slot, read by every decoder layer, is not an "
                    "input of the checkpointed call, so reentrant checkpointing's backward cannot reach it. Enable it "
                    "with gradient_checkpointing_kwargs={'use_reentrant': False}."
                )
        check_decoder_inputs(
            self.config, decoder_input_ids, cache, self.injection.to_memory is not None, self.training
        )
        # The value check reads a tensor back to the host: once per call (not per generated token), never in a
        # training step or under torch.compile.
        first_call = cached_length(cache) == 0
        check_values = first_call and not self.training and not torch.compiler.is_compiling()
        check_latents(latents, decoder_input_ids.shape[0], self.config.latent_size, check_values)
        embeds = self.decoder.transformer.wte(decoder_input_ids)
        if self.training and self.config.word_dropout > 0:
            # Word dropout (Bowman et al. 2016): a dropped token's embedding is zeroed, BOS (position 0) never.
            keep = torch.rand(decoder_input_ids.shape, device=embeds.device) >= self.config.word_dropout
            keep[:, 0] = True
            embeds = embeds * keep.unsqueeze(-1).to(embeds.dtype)
        if self.injection.to_embedding is not None:
            embeds = embeds + self.injection.to_embedding(latents).unsqueeze(1).to(embeds.dtype)
        if self.injection.to_memory is not None:
            if cache is None and not use_cache:  # one pass: the slot is read, no cache is written
                cache = self.injection.memory_cache(latents.to(embeds.dtype))
            else:
                if cache is None:
                    cache = DynamicCache(config=self.config.decoder)
                if first_call:
                    self.injection.fill_memory(latents.to(embeds.dtype), cache)
            if decoder_attention_mask is not None:
                decoder_attention_mask = torch.cat(
                    [decoder_attention_mask.new_ones(latents.shape[0], 1), decoder_attention_mask], dim=1
                )
        return self.decoder(
            inputs_embeds=embeds,
            attention_mask=decoder_attention_mask,
            cache=cache,
            use_cache=use_cache,
            **decoder_kwargs,
        )

    def log_likelihood(
        self,
        latents: torch.Tensor,
        decoder_input_ids: torch.LongTensor,
        labels: torch.LongTensor,
        decoder_attention_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """log p(x|z) per example: summed over the label tokens that are not -100."""
        logits = self.decode(latents, decoder_input_ids, decoder_attention_mask).logits
        return -token_nll(logits, labels).sum(-1)

    # -- forward ------------------------------------------------------------------------------------------------------

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        decoder_input_ids: torch.LongTensor | None = None,
        decoder_attention_mask: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        latents: torch.Tensor | None = None,
        cache: Cache | None = None,
        use_cache: bool | None = None,
        kl_weight: float | torch.Tensor | None = None,
        sample_posterior: bool | None = None,
        generator: torch.Generator | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
    ) -> ScaleVAEOutput | tuple:
        r"""
        input_ids, attention_mask: the encoder's tokens (its own tokenizer).
        decoder_input_ids, decoder_attention_mask: the decoder's inputs, starting with its BOS; built from `labels`
            (shifted right, as in `EncoderDecoderModel`) when not given.
        labels: the decoder's targets aligned with `decoder_input_ids` (next tokens), -100 where ignored.
        latents: a given z of shape `(batch_size, latent_size)`; it bypasses the encoder (teacher-forced decoding
            from z, e.g. for importance sampling), and the KL fields are then None.
        cache, use_cache: the decoder's key/value cache to continue, and whether to return one (default
            `config.use_cache`; never under gradient checkpointing in training).
        kl_weight: β for this call (a KL schedule passes it every step); defaults to `config.kl_weight`.
        sample_posterior: whether the decoder's z is a draw from the posterior (a single-sample ELBO estimate) or its
            mode. Default: sample in training, the mode in eval mode, so that eval outputs are repeatable.
        generator: the `torch.Generator` of that draw.
        output_attentions, output_hidden_states: return the decoder's (and, when it runs, the encoder's) attentions or
            hidden states; defaults from the config.
        return_dict: `False` returns `ScaleVAEOutput.to_tuple()`, the loss first when there is one.
        """
        check_forward_inputs(self.config, input_ids, decoder_input_ids, labels, latents, self.training)
        if use_cache is None:  # the config's, silently off where checkpointing rules a cache out (as in GPT-2)
            use_cache = self.config.use_cache and not self._decoder_checkpointing()
        output_attentions = output_attentions if output_attentions is not None else self.config.output_attentions
        output_hidden_states = (
            output_hidden_states if output_hidden_states is not None else self.config.output_hidden_states
        )
        outputs = dict(output_attentions=output_attentions, output_hidden_states=output_hidden_states)
        if decoder_input_ids is None:
            decoder_input_ids, decoder_attention_mask = self.decoder_inputs_from_labels(labels)
        latent_fields, encoder_outputs = {}, None
        if latents is None:
            check_encoder_inputs(self.config, input_ids, attention_mask, self.training)
            if attention_mask is None:
                attention_mask = torch.ones_like(input_ids)
            encoder_outputs = self.encoder(input_ids=input_ids, attention_mask=attention_mask, **outputs)
            posterior = self._posterior(encoder_outputs.last_hidden_state, attention_mask)
            latents = self.draw_latents(posterior, sample_posterior, generator)
            if self.training:
                self.fitted_prior.update(posterior.decoder_mu.detach(), posterior.logvar.detach())
            latent_fields = self._latent_fields(posterior)
        decoder_outputs = self.decode(
            latents, decoder_input_ids, decoder_attention_mask, cache=cache, use_cache=bool(use_cache), **outputs
        )
        logits = decoder_outputs.logits
        loss = reconstruction_loss = None
        if labels is not None:
            reconstruction_loss = loss = token_nll(logits, labels).sum(-1).mean()
            if latent_fields:
                kl_weight = checked_kl_weight(
                    kl_weight if kl_weight is not None else self.config.kl_weight, self.training
                )
                loss = reconstruction_loss + kl_weight * latent_fields["kl_loss"]
        returned_cache = None
        if decoder_outputs.cache is not None:  # the caller's cache object (generate's EncoderDecoderCache) if given
            returned_cache = cache if cache is not None else decoder_outputs.cache
        output = ScaleVAEOutput(  # loss first: outputs[0] and to_tuple()[0] are the loss, transformers' convention
            loss=loss,
            logits=logits,
            reconstruction_loss=reconstruction_loss,
            latents=latents,
            cache=returned_cache,
            decoder_hidden_states=decoder_outputs.hidden_states,
            decoder_attentions=decoder_outputs.attentions or None,
            encoder_hidden_states=encoder_outputs.hidden_states if encoder_outputs is not None else None,
            encoder_attentions=(encoder_outputs.attentions or None) if encoder_outputs is not None else None,
            **latent_fields,
        )
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        return output if return_dict else output.to_tuple()

    def _latent_fields(self, posterior: ScaleVAEEncoderOutput) -> dict[str, torch.Tensor]:
        """The output's posterior and KL fields: the paper's KL of the original posterior (per dimension and summed),
        the KL the strategy puts in the loss, and the KL of the decoder's posterior to the generative prior; batch
        means, in float32 whatever the autocast dtype."""
        mu, logvar = posterior.mu.float(), posterior.logvar.float()
        kl_per_example_dim = gaussian_kl(mu, logvar)
        if self.config.prior in ("fitted", "scaled"):  # the posterior's own: "scaled" uses the batch's factors
            prior = diagonal_gaussian(posterior.prior_mean.float(), posterior.prior_std.float())
        else:
            prior = self.prior_distribution(dtype=torch.float32)
        # A mixture's KL is a Monte Carlo estimate: from a fixed seed, so that two eval passes give the same output.
        fixed = torch.Generator(mu.device).manual_seed(0) if self.config.prior == "mixture" else None
        decoder_kl = prior_kl(posterior.decoder_mu.float(), logvar, prior, generator=fixed)
        return dict(
            kl=kl_per_example_dim.sum(-1).mean(),
            kl_per_dim=kl_per_example_dim.mean(0),
            kl_loss=self.collapse.kl_in_loss(kl_per_example_dim).mean(),
            decoder_kl=decoder_kl.mean(),
            mu=mu,
            logvar=logvar,
            decoder_mu=posterior.decoder_mu,
            prior_mean=posterior.prior_mean,
            prior_std=posterior.prior_std,
        )

    def decoder_inputs_from_labels(self, labels: torch.LongTensor) -> tuple[torch.LongTensor, torch.Tensor]:
        """The teacher-forcing inputs of `labels` by `shift_labels_right`, with the decoder's BOS and pad ids (EOS where
        it has no pad token)."""
        decoder = self.config.decoder
        if decoder.bos_token_id is None:
            raise ValueError("config.decoder.bos_token_id is None: set it from the decoder tokenizer's BOS token.")
        pad = decoder.pad_token_id if decoder.pad_token_id is not None else decoder.eos_token_id
        return shift_labels_right(labels, decoder.bos_token_id, pad if pad is not None else decoder.bos_token_id)

    # -- generation -----------------------------------------------------------------------------------------------------

    @torch.no_grad()
    def generate(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        latents: torch.Tensor | None = None,
        decoder_input_ids: torch.LongTensor | None = None,
        sample_posterior: bool = False,
        generator: torch.Generator | None = None,
        **generation_kwargs,
    ) -> torch.LongTensor:
        """Decode text from z with transformers' `GenerationMixin` (KV cache; greedy, sampling, beam search), by the
        encoder-decoder convention (see the class docstring).

        input_ids, attention_mask: the encoder's tokens (as `inputs`, transformers' name, too): z is their posterior's
            mode as the decoder sees it, or one draw from it with `sample_posterior=True` (seeded by `generator`).
        latents: a given z of shape `(batch_size, latent_size)` instead.
        decoder_input_ids: a decoder prompt (BOS is prepended if it does not start with it); default: BOS alone.

        Returns the decoder's token ids, the start token and any prompt included (a `GenerateOutput` with
        `return_dict_in_generate=True`).
        """
        if input_ids is None:
            input_ids = generation_kwargs.pop("inputs", None)
        refuse_assisted_decoding(generation_kwargs)
        check_generation_arguments(generation_kwargs)
        check_flag("sample_posterior", sample_posterior)
        check_generator("generator", generator)
        encoder_outputs = generation_kwargs.pop("encoder_outputs", None)
        if latents is None and encoder_outputs is not None:  # what an earlier call passed: z as a one-position output
            latents = encoder_outputs.last_hidden_state[:, 0]
        check_generation_length(self, decoder_input_ids, generation_kwargs)
        encoder_fields = {}
        if latents is None:
            if input_ids is None:
                raise ValueError("generate() needs latents= or encoder input_ids= to know what to decode.")
            if input_ids.is_floating_point():
                raise ValueError(
                    "generate()'s first argument is the encoder's input_ids (the encoder-decoder convention); "
                    "pass a latent as generate(latents=z)."
                )
            check_encoder_inputs(self.config, input_ids, attention_mask, self.training)
            if attention_mask is None:
                attention_mask = torch.ones_like(input_ids)
            # The encoder's attentions and hidden states, when asked for, are returned as transformers returns an
            # encoder-decoder model's (`GenerateEncoderDecoderOutput.encoder_attentions`, `encoder_hidden_states`).
            requested = {
                flag: bool(generation_kwargs.get(flag, getattr(self.generation_config, flag, False)))
                for flag in ("output_attentions", "output_hidden_states")
            }
            encoded = self.encoder(input_ids=input_ids, attention_mask=attention_mask, **requested)
            posterior = self._posterior(encoded.last_hidden_state, attention_mask)
            latents = self.draw_latents(posterior, sample_posterior, generator)
            encoder_fields = dict(hidden_states=encoded.hidden_states, attentions=encoded.attentions)
        latents = as_model_latents(latents, self.dtype, self.device)
        check_generation_arguments(generation_kwargs, batch_size=latents.shape[0])
        if decoder_input_ids is not None:
            generation_kwargs["decoder_input_ids"] = decoder_input_ids
        # For GenerationMixin, the encoder's output is z as a sequence of one position (the one slot the decoder
        # conditions on): it sets the batch size, and beam search expands it with the other per-sentence inputs. The
        # decoder reads z from `latents`, drawn once here, so that every step decodes the same z.
        return super().generate(
            latents=latents,
            encoder_outputs=BaseModelOutput(last_hidden_state=latents.unsqueeze(1), **encoder_fields),
            **generation_kwargs,
        )

    def prepare_inputs_for_generation(
        self, input_ids, *args, encoder_outputs=None, next_sequence_length=None, **kwargs
    ):
        """GenerationMixin's (the generated ids as `decoder_input_ids`, every other keyword argument passed through to
        `forward`), less `encoder_outputs` (`latents` carry all the decoder takes from the encoder side), and with the
        decoder's inputs cut where its cache ends. GenerationMixin counts every cached position as a text position, but
        with memory injection the cache also holds the latent's slot: continuing from a returned cache, it would feed
        the whole sequence again. The decoder's ids always start with BOS (`generate` prepends it), so they are the
        whole sequence, and the cache holds its first `cached - slot` positions."""
        cache = kwargs.get("cache")
        if isinstance(cache, EncoderDecoderCache):
            cache = cache.self_attention_cache
        cached = cached_length(cache)
        if cached:  # None: a static cache's length under torch.compile, where GenerationMixin's own count holds
            text = cached - int(self.injection.to_memory is not None)
            if text >= input_ids.shape[1]:
                raise ValueError(
                    f"The cache holds {text} decoder positions but decoder_input_ids has {input_ids.shape[1]}: to "
                    "continue from a returned cache, pass the sequences it was returned with (they start with BOS)."
                )
            next_sequence_length = input_ids.shape[1] - text
        return super().prepare_inputs_for_generation(
            input_ids, *args, next_sequence_length=next_sequence_length, **kwargs
        )

    def _prepare_static_cache(self, cache_implementation, batch_size, max_cache_len, *args, **kwargs):
        """`generate(..., cache_implementation="static")`: the static cache `GenerationMixin` sizes for the text, plus
        the latent's memory slot, which takes the first position."""
        slot = int(self.injection.to_memory is not None)
        return super()._prepare_static_cache(cache_implementation, batch_size, max_cache_len + slot, *args, **kwargs)

    def create_masks_for_generate(self, attention_mask=None, **kwargs):
        """The decoder's 2D mask as it is: `GenerationMixin` would expand it to 4D for a static cache before the
        latent's slot is in the cache, one position off; `decode` adds the slot to the 2D mask and GPT-2 expands it."""
        return attention_mask


# The arguments that switch `generate` to assisted decoding (a draft model, prompt lookup, early exit).
ASSISTED_DECODING_ARGUMENTS = ("assistant_model", "prompt_lookup_num_tokens", "assistant_early_exit")


def refuse_assisted_decoding(generation_kwargs: dict) -> None:
    """Assisted decoding cannot run on this model: its candidates are verified by cropping the decoder's cache to a
    number of text positions, which cuts the wrong position when the cache also holds the latent's slot, and the draft
    model would decode without the sentence's latent. Refused with the reason instead of an IndexError."""
    config = generation_kwargs.get("generation_config")
    asked = [
        name
        for name in ASSISTED_DECODING_ARGUMENTS
        if generation_kwargs.get(name) is not None or getattr(config, name, None) is not None
    ]
    if asked:
        raise ValueError(
            f"generate({', '.join(asked)}=...): assisted decoding is not supported by Scale-VAE. Each sentence is "
            "decoded from its own latent z, which a draft model does not see, and verifying its candidates crops the "
            "decoder's cache by text positions while the cache also holds z's key/value slot. Decode without it "
            "(greedy, sampling and beam search are supported)."
        )


# ---------------------------------------------------------------------------------------------------------------------
# Helpers the model and the data code share
# ---------------------------------------------------------------------------------------------------------------------


def shift_labels_right(
    labels: torch.LongTensor, bos_token_id: int, pad_token_id: int
) -> tuple[torch.LongTensor, torch.Tensor]:
    """Teacher-forcing inputs from right-padded labels, the one rule of the data collator and the model (as
    `EncoderDecoderModel`): BOS, then the labels shifted right; a position whose label is ignored (-100) holds
    `pad_token_id` and is masked out. Returns `(decoder_input_ids, decoder_attention_mask)`."""
    keep = labels != -100
    shifted = torch.cat([labels.new_full((labels.shape[0], 1), bos_token_id), labels[:, :-1]], 1)
    return shifted.masked_fill(~keep, pad_token_id), keep.long()


def default_decoder_config(vocab_size: int, **overrides) -> GPT2Config:
    """The small GPT-2 used when no pretrained decoder is given: 4 layers, 256 wide, 4 heads, 128 positions
    (about 3.2M parameters besides the vocab_size × 256 tied embedding)."""
    defaults = dict(n_layer=4, n_embd=256, n_head=4, n_positions=128, vocab_size=vocab_size)
    return GPT2Config(**{**defaults, **overrides})


def token_nll(logits: torch.Tensor, labels: torch.LongTensor) -> torch.Tensor:
    """Per-token negative log-likelihood (batch, length), zero where labels are -100."""
    if labels.shape != logits.shape[:2]:
        raise ValueError(
            f"labels have shape {tuple(labels.shape)} but the decoder produced {tuple(logits.shape[:2])}."
        )
    nll = F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), ignore_index=-100, reduction="none")
    return nll.view(labels.shape)


__all__ = ["ScaleVAEForLatentLM", "ScaleVAEPreTrainedModel", "ScaleVAEOutput", "ScaleVAEEncoderOutput"]

# Every save (save_pretrained, Trainer checkpoints, push_to_hub) copies this file and its sibling files and records
# them in config.json's auto_map, so `AutoModel.from_pretrained(folder, trust_remote_code=True)` works without scalevae.
ScaleVAEForLatentLM.register_for_auto_class("AutoModel")
