"""Scale-VAE (Song et al., LREC-COLING 2024): a text VAE whose GPT-2 decoder keeps using the latent.

Reading order: outputs -> latent head -> collapse strategies (Scale-VAE is `ScaleStrategy`) -> latent injection ->
`ScaleVAEForLatentLM`. This file travels inside every saved model folder (``trust_remote_code=True``): it imports only
torch, transformers (and safetensors, which transformers requires) and its sibling configuration file.
"""

from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from transformers import (
    AutoModel,
    DynamicCache,
    GenerationConfig,
    GenerationMixin,
    GPT2Config,
    GPT2LMHeadModel,
    PreTrainedModel,
)
from transformers.cache_utils import Cache
from transformers.utils import ModelOutput, logging

try:  # a saved folder loaded with trust_remote_code: transformers only allows relative imports between its files
    from .configuration_scalevae import ScaleVAEConfig
except ImportError:  # the same file installed as a top-level module
    from configuration_scalevae import ScaleVAEConfig

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
        prior_std (`torch.FloatTensor` of shape `(latent_size,)`):
            Std of the decoder's prior N(0, diag(prior_std²)): the scale factors f for Scale-VAE, ones otherwise.
    """

    mu: torch.FloatTensor | None = None
    logvar: torch.FloatTensor | None = None
    decoder_mu: torch.FloatTensor | None = None
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
        decoder_kl (`torch.FloatTensor` of shape `()`): KL of the decoder's posterior N(f ⊙ mu, σ²) to the decoder's
            prior N(0, f²), batch mean: the KL of a true ELBO for the generative model that `sample()` draws from.
        mu, logvar (`torch.FloatTensor` of shape `(batch_size, latent_size)`): the encoder's posterior.
        latents (`torch.FloatTensor` of shape `(batch_size, latent_size)`): the z the decoder saw.
        cache (`Cache`, *optional*): the decoder's key/value cache (generation).
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
    latents: torch.FloatTensor | None = None
    cache: Cache | None = None


def gaussian_kl(mu: torch.Tensor, logvar: torch.Tensor, prior_std: torch.Tensor | None = None) -> torch.Tensor:
    """Per-dimension KL(N(mu, e^logvar) || N(0, prior_std²))."""
    if prior_std is None:
        return 0.5 * (mu.pow(2) + logvar.exp() - logvar - 1)
    prior_var = prior_std.pow(2)
    return 0.5 * ((mu.pow(2) + logvar.exp()) / prior_var - logvar + prior_var.log() - 1)


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
    of mu_d² is at least γ² and the expected KL at least latent_size · γ² / 2."""

    def __init__(self, config: ScaleVAEConfig):
        super().__init__(config)
        self.norm = nn.BatchNorm1d(config.latent_size, affine=False)
        self.register_buffer("gamma", torch.tensor(float(config.bn_gamma)))
        self.beta = nn.Parameter(torch.zeros(config.latent_size))

    def normalize_mean(self, mu: torch.Tensor) -> torch.Tensor:
        if self.training and mu.shape[0] == 1:
            raise ValueError("collapse_strategy='bn' cannot train on a batch of one: batch-norm needs two examples.")
        return self.gamma * self.norm(mu) + self.beta


class ScaleStrategy(CollapseStrategy):
    """Scale-VAE: the decoder sees z = f ⊙ mu + σ ⊙ ε with f_d = target_std / std_batch(mu_d).

    f carries no gradient and is shared by every instance; the KL is that of the unscaled posterior, so the encoder is
    not pushed to raise it, while the scaled means stay discriminative for the decoder. The running estimate of f in
    `scale_factors` (saved with the model) serves evaluation, encoding and generation, and the frozen phase of a
    schedule.
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
        # Schedule state, saved so that a resumed run continues where it stopped.
        self.register_buffer("frozen", torch.tensor(False))
        self.register_buffer("steps", torch.tensor(0, dtype=torch.long))
        self.register_buffer("epochs", torch.tensor(0, dtype=torch.long))
        self.register_buffer("epoch_factor_sum", torch.zeros(config.latent_size, dtype=torch.float64))
        self.register_buffer("epoch_batches", torch.tensor(0, dtype=torch.long))

    @torch.no_grad()
    def batch_factors(self, mu: torch.Tensor) -> torch.Tensor | None:
        """target / std over the (global, under DDP) batch of each dimension of mu; None for a batch of one."""
        stats = torch.stack([mu.new_full((mu.shape[1],), mu.shape[0]), mu.sum(0), mu.pow(2).sum(0)]).double()
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            # Reduce the sums, not the factors: every rank then holds the global batch's factors.
            dist.all_reduce(stats)
        count, total, total_sq = stats
        if count[0] < 2:
            return None
        var = (total_sq - total.pow(2) / count) / (count - 1)
        std = var.clamp(min=0).sqrt().clamp(min=self.min_std)
        return (self.target_std / std).to(mu.dtype)

    def scale_factors_for(self, mu: torch.Tensor) -> torch.Tensor:
        if not self.training or self.frozen:
            return self.scale_factors
        factors = self.batch_factors(mu)
        if factors is None:  # a batch of one has no spread: fall back to the running estimate
            return self.scale_factors
        with torch.no_grad():
            if self.steps == 0:
                self.scale_factors.copy_(factors)
            else:
                self.scale_factors.lerp_(factors, self.momentum)
            self.steps += 1
            self.epoch_factor_sum += factors.double()
            self.epoch_batches += 1
            if self.schedule == "running" and self.freeze_steps is not None and self.steps >= self.freeze_steps:
                self.frozen.fill_(True)
        return factors

    @torch.no_grad()
    def end_epoch(self):
        """Called at each epoch's end (the training glue does it); the `"epoch"` schedule freezes after f_epo epochs
        to the mean of the last epoch's per-batch factors."""
        self.epochs += 1
        if self.schedule == "epoch" and not self.frozen and self.epochs >= self.freeze_epochs and self.epoch_batches:
            self.scale_factors.copy_((self.epoch_factor_sum / self.epoch_batches).to(self.scale_factors.dtype))
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
        and the decoder, themselves `PreTrainedModel`s, to their own `_init_weights`."""
        if isinstance(module, nn.Linear):
            module.weight.data.normal_(mean=0.0, std=self.config.decoder.initializer_range)
            if module.bias is not None:
                module.bias.data.zero_()


class ScaleVAEForLatentLM(ScaleVAEPreTrainedModel, GenerationMixin):
    r"""
    A text VAE: BERT-style encoder -> Gaussian latent z -> GPT-2 decoder conditioned on z (Optimus-style injection),
    with a swappable posterior-collapse remedy (`config.collapse_strategy`, Scale-VAE by default).

    The generative model is z ~ N(0, diag(f²)) (the standard normal pushed through the scale factors; f = 1 for every
    strategy but Scale-VAE), x ~ p(x|z). `sample`, `decoder_kl` and the importance-weighted NLL all refer to it.
    """

    def __init__(
        self,
        config: ScaleVAEConfig,
        encoder: PreTrainedModel | None = None,
        decoder: GPT2LMHeadModel | None = None,
    ):
        super().__init__(config)
        config = self.config  # PreTrainedModel keeps its own copy
        encoder = encoder if encoder is not None else AutoModel.from_config(config.encoder)
        decoder = decoder if decoder is not None else GPT2LMHeadModel._from_config(config.decoder)
        if getattr(encoder, "pooler", None) is not None:
            encoder.pooler = None  # mean pooling is used instead; an unused pooler would get no gradient
        if encoder.get_output_embeddings() is not None:
            raise ValueError(f"The encoder {type(encoder).__name__} must be a base model without an LM head.")
        # The parts share the composite config, so changes to it reach them (as in EncoderDecoderModel); the
        # composite's attention implementation, resolved by PreTrainedModel, is then dispatched to both.
        encoder.config, decoder.config = config.encoder, config.decoder
        self.encoder = encoder
        self.decoder = decoder
        self.latent_head = LatentHead(config.encoder.hidden_size, config.latent_size)
        self.collapse = COLLAPSE_STRATEGY_CLASSES[config.collapse_strategy](config)
        self.injection = LatentInjection(config)
        if config.decoder.tie_word_embeddings:
            # Saved once as the embedding; naming it lets Trainer re-tie it instead of warning on resume.
            self._keys_to_ignore_on_save = ["decoder.lm_head.weight"]
        self.set_attn_implementation(config._attn_implementation)
        self.post_init()
        self._freeze_encoder(config.freeze_encoder)
        self.generation_config = GenerationConfig(
            bos_token_id=config.decoder.bos_token_id,
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

    # -- loading ------------------------------------------------------------------------------------------------------

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *model_args, **kwargs):
        """`PreTrainedModel.from_pretrained`, strict: a ScaleVAE folder loads only into the config it was saved with.

        A tensor the config expects but the weights file lacks, one the file holds but the config does not use, or one
        of another shape raises a `ValueError` naming the config values on both sides, never a silently initialised
        layer (`ignore_mismatched_sizes=True` still allows, on request, shape changes such as a new vocabulary). A
        truncated or corrupted safetensors file raises an `OSError` naming it. `output_loading_info=True` works as
        usual.
        """
        from safetensors import SafetensorError

        return_loading_info = kwargs.pop("output_loading_info", False)
        allow_resize = kwargs.pop("ignore_mismatched_sizes", False)
        try:  # collect the mismatches instead of transformers' generic error, then explain them below
            model, info = super().from_pretrained(
                pretrained_model_name_or_path,
                *model_args,
                output_loading_info=True,
                ignore_mismatched_sizes=True,
                **kwargs,
            )
        except SafetensorError as error:
            raise OSError(
                f"{_describe_weights_files(pretrained_model_name_or_path, kwargs.get('subfolder') or '')} is "
                f"truncated or corrupted ({error}); re-download or re-save the model."
            ) from error
        problems = _weights_config_mismatches(model, info, allow_resize)
        if problems:
            raise ValueError(
                f"The weights in {pretrained_model_name_or_path} do not match its config:\n - " + "\n - ".join(problems)
                + "\nA ScaleVAE folder loads only into the config it was saved with: drop the config overrides, or "
                "fix config.json to the values the weights were trained with."
            )
        return (model, info) if return_loading_info else model

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

    def encode(self, input_ids: torch.LongTensor, attention_mask: torch.Tensor | None = None) -> ScaleVAEEncoderOutput:
        """The posterior of each sentence. Outside training the scale factors are the saved running estimate."""
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        mu, logvar = self.latent_head(hidden, attention_mask)
        mu = self.collapse.normalize_mean(mu)
        factors = self.collapse.scale_factors_for(mu)
        prior_std = factors if factors is not None else torch.ones_like(mu[0])
        return ScaleVAEEncoderOutput(mu=mu, logvar=logvar, decoder_mu=prior_std * mu, prior_std=prior_std)

    def prior_std(self) -> torch.Tensor:
        """Std of the generative model's prior N(0, diag(f²)) at inference."""
        factors = getattr(self.collapse, "scale_factors", None)
        return factors if factors is not None else torch.ones(self.config.latent_size, device=self.device)

    def sample_prior(self, num_samples: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """z ~ N(0, diag(f²)): the prior as the decoder sees it."""
        std = self.prior_std()
        noise = torch.randn(num_samples, std.shape[0], generator=generator, device=std.device, dtype=std.dtype)
        return noise * std

    # -- the decoder --------------------------------------------------------------------------------------------------

    def decode(
        self,
        latents: torch.Tensor,
        decoder_input_ids: torch.LongTensor,
        decoder_attention_mask: torch.Tensor | None = None,
        cache: Cache | None = None,
        use_cache: bool = False,
    ):
        """Teacher-forced decoder pass conditioned on z; returns the GPT-2 `CausalLMOutput` (logits, cache)."""
        _check_latents(latents, decoder_input_ids.shape[0], self.config.latent_size)
        embeds = self.decoder.transformer.wte(decoder_input_ids)
        if self.injection.to_embedding is not None:
            embeds = embeds + self.injection.to_embedding(latents).unsqueeze(1).to(embeds.dtype)
        if self.injection.to_memory is not None:
            if self.decoder.transformer.gradient_checkpointing and self.training:
                raise ValueError(
                    "latent_injection='memory'/'both' needs the decoder's key/value cache, which GPT-2 turns off under "
                    "gradient checkpointing; checkpoint only the encoder or use latent_injection='embedding'."
                )
            if cache is None:
                cache = DynamicCache(config=self.config.decoder)
            if cache.get_seq_length() == 0:
                self.injection.fill_memory(latents.to(embeds.dtype), cache)
            use_cache = True
            if decoder_attention_mask is not None:
                decoder_attention_mask = torch.cat([decoder_attention_mask.new_ones(latents.shape[0], 1), decoder_attention_mask], dim=1)
        return self.decoder(inputs_embeds=embeds, attention_mask=decoder_attention_mask, cache=cache, use_cache=use_cache)

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
        return_dict: bool | None = None,
    ) -> ScaleVAEOutput:
        r"""
        input_ids, attention_mask: the encoder's tokens (its own tokenizer).
        decoder_input_ids, decoder_attention_mask: the decoder's inputs, starting with its BOS; built from `labels`
            (shifted right, as in `EncoderDecoderModel`) when not given.
        labels: the decoder's targets aligned with `decoder_input_ids` (next tokens), -100 where ignored.
        latents: a given z of shape `(batch_size, latent_size)`; it bypasses the encoder (teacher-forced decoding
            from z, e.g. for importance sampling), and the KL fields are then None.
        """
        if decoder_input_ids is None:
            if labels is None:
                raise ValueError("Pass decoder_input_ids or labels: the decoder needs its inputs.")
            decoder_input_ids, decoder_attention_mask = self._shift_labels_right(labels)
        mu = logvar = kl_per_example_dim = None
        if latents is None:
            if input_ids is None:
                raise ValueError("Pass input_ids (encoder tokens) or latents: the decoder needs a latent.")
            posterior = self.encode(input_ids, attention_mask)
            mu, logvar = posterior.mu, posterior.logvar
            latents = posterior.decoder_mu
            if self.collapse.stochastic:
                latents = latents + torch.randn_like(mu) * (0.5 * logvar).exp()
            kl_per_example_dim = gaussian_kl(mu, logvar)
        decoder_outputs = self.decode(latents, decoder_input_ids, decoder_attention_mask, cache=cache, use_cache=bool(use_cache))
        logits = decoder_outputs.logits

        output = ScaleVAEOutput(logits=logits, mu=mu, logvar=logvar, latents=latents)
        if use_cache:
            output.cache = decoder_outputs.cache
        if kl_per_example_dim is not None:
            output.kl_per_dim = kl_per_example_dim.mean(0)
            output.kl = kl_per_example_dim.sum(-1).mean()
            output.kl_loss = self.collapse.kl_in_loss(kl_per_example_dim).mean()
            output.decoder_kl = gaussian_kl(posterior.decoder_mu, logvar, posterior.prior_std).sum(-1).mean()
        if labels is not None:
            output.reconstruction_loss = token_nll(logits, labels).sum(-1).mean()
            output.loss = output.reconstruction_loss
            if output.kl_loss is not None:
                output.loss = output.loss + self.config.kl_weight * output.kl_loss
        return output

    def _shift_labels_right(self, labels: torch.LongTensor) -> tuple[torch.LongTensor, torch.Tensor]:
        bos, pad = self.config.decoder.bos_token_id, self.config.decoder.pad_token_id
        if bos is None:
            raise ValueError("config.decoder.bos_token_id is None: set it from the decoder tokenizer's BOS token.")
        fill = pad if pad is not None else bos
        keep = labels != -100
        shifted = torch.cat([labels.new_full((labels.shape[0], 1), bos), labels[:, :-1].masked_fill(~keep[:, :-1], fill)], 1)
        mask = torch.cat([keep.new_ones(labels.shape[0], 1), keep[:, :-1]], 1).long()
        return shifted, mask

    # -- generation -----------------------------------------------------------------------------------------------------

    @torch.no_grad()
    def generate(
        self,
        latents: torch.Tensor | None = None,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        decoder_input_ids: torch.LongTensor | None = None,
        **generation_kwargs,
    ) -> torch.LongTensor:
        """Decode text from z with transformers' `GenerationMixin` (KV cache; greedy, sampling, beam search).

        Give `latents`, or encoder `input_ids` whose posterior mean (as the decoder sees it) is decoded. The decoder
        starts from `decoder_input_ids` (a prompt) or from its BOS token. Returns decoder token ids, BOS included.
        """
        if latents is None:
            if input_ids is None:
                raise ValueError("generate() needs latents= or encoder input_ids= to know what to decode.")
            latents = self.encode(input_ids, attention_mask).decoder_mu
        return super().generate(inputs=decoder_input_ids, latents=latents, **generation_kwargs)

    def prepare_inputs_for_generation(self, input_ids, next_sequence_length=None, cache=None, attention_mask=None, latents=None, **kwargs):
        if next_sequence_length is not None:
            input_ids = input_ids[:, -next_sequence_length:]
        return {
            "decoder_input_ids": input_ids,
            "decoder_attention_mask": attention_mask,
            "latents": latents,
            "cache": cache,
            "use_cache": kwargs.get("use_cache", True),
        }

    def get_input_embeddings(self):
        return self.encoder.get_input_embeddings()

    def get_output_embeddings(self):
        return self.decoder.get_output_embeddings()


def default_decoder_config(vocab_size: int, **overrides) -> GPT2Config:
    """The small GPT-2 used when no pretrained decoder is given: 4 layers, 256 wide, 4 heads, 128 positions
    (about 3.2M parameters besides the vocab_size × 256 tied embedding)."""
    defaults = dict(n_layer=4, n_embd=256, n_head=4, n_positions=128, vocab_size=vocab_size)
    return GPT2Config(**{**defaults, **overrides})


def token_nll(logits: torch.Tensor, labels: torch.LongTensor) -> torch.Tensor:
    """Per-token negative log-likelihood (batch, length), zero where labels are -100."""
    if labels.shape != logits.shape[:2]:
        raise ValueError(f"labels have shape {tuple(labels.shape)} but the decoder produced {tuple(logits.shape[:2])}.")
    nll = F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), ignore_index=-100, reduction="none")
    return nll.view(labels.shape)


def _describe_weights_files(path, subfolder: str = "") -> str:
    """The safetensors file that fails to parse, for an error message (a local folder; a Hub id is named as such)."""
    import os

    from safetensors import SafetensorError, safe_open

    folder = os.path.join(str(path), subfolder)
    if not os.path.isdir(folder):
        return f"The safetensors weights of {path} (in the Hub cache)"
    files = sorted(os.path.join(folder, f) for f in os.listdir(folder) if f.endswith(".safetensors"))
    for file in files:
        try:
            with safe_open(file, framework="pt"):
                pass
        except (SafetensorError, OSError):
            return file
    return ", ".join(files) or folder


# Tensors whose shape reveals a config value: key -> ((config field, dimension of the saved shape, divisor), ...).
_SHAPE_WITNESSES = {
    "latent_head.proj.weight": (("latent_size", 0, 2), ("encoder.hidden_size", 1, 1)),
    "encoder.embeddings.word_embeddings.weight": (("encoder.vocab_size", 0, 1), ("encoder.hidden_size", 1, 1)),
    "encoder.embeddings.position_embeddings.weight": (("encoder.max_position_embeddings", 0, 1),),
    "decoder.transformer.wte.weight": (("decoder.vocab_size", 0, 1), ("decoder.n_embd", 1, 1)),
    "decoder.transformer.wpe.weight": (("decoder.n_positions", 0, 1),),
}


def _weights_config_mismatches(model: "ScaleVAEForLatentLM", info: dict, allow_resize: bool = False) -> list[str]:
    """Every disagreement between a loaded weights file and the model's config, in words naming both values."""
    config = model.config
    missing, unexpected = set(info.get("missing_keys") or ()), set(info.get("unexpected_keys") or ())
    problems = []

    def in_file(key: str, present_in_model: bool) -> bool:
        return key in unexpected or (present_in_model and key not in missing)

    has_memory = in_file("injection.to_memory.weight", model.injection.to_memory is not None)
    has_embedding = in_file("injection.to_embedding.weight", model.injection.to_embedding is not None)
    saved_injection = {(True, True): "both", (True, False): "memory", (False, True): "embedding"}.get(
        (has_memory, has_embedding), "none of memory/embedding/both"
    )
    has_scale = in_file("collapse.scale_factors", hasattr(model.collapse, "scale_factors"))
    has_bn = in_file("collapse.beta", hasattr(model.collapse, "beta"))
    saved_strategy = "'scale'" if has_scale else "'bn'" if has_bn else "'vae', 'free_bits' or 'ae'"
    groups = {}  # (field, config value, saved value, missing?) -> keys
    for key in sorted(missing | unexpected):
        if key.startswith("injection."):
            group = ("latent_injection", repr(config.latent_injection), repr(saved_injection))
        elif key.startswith("collapse."):
            group = ("collapse_strategy", repr(config.collapse_strategy), saved_strategy)
        else:
            group = (None, None, None)
        groups.setdefault((*group, key in missing), []).append(key)
    for (field, value, saved, is_missing), keys in groups.items():
        names = ", ".join(keys[:-1]) + (" and " if len(keys) > 1 else "") + keys[-1]
        if field is None:
            problems.append(f"the config builds {names}, which the weights file lacks" if is_missing
                            else f"the weights file holds {names}, which the config does not build")
        elif is_missing:
            problems.append(
                f"{field}={value} expects {names}, which the weights file lacks (was it saved with {field}={saved}?)"
            )
        else:
            problems.append(
                f"the weights file holds {names}, which {field}={value} does not use (was it saved with {field}={saved}?)"
            )
    if allow_resize:
        return problems
    explained = set()
    for key, saved_shape, model_shape in sorted(info.get("mismatched_keys") or (), key=lambda item: item[0]):
        for field, dim, divisor in _SHAPE_WITNESSES.get(key, ()):
            owner = config
            for part in field.split(".")[:-1]:
                owner = getattr(owner, part)
            value, saved = getattr(owner, field.split(".")[-1]), saved_shape[dim] // divisor
            if value != saved and field not in explained:
                explained.add(field)
                problems.append(
                    f"{field}={value} in the config, but the weights file was saved with {field}={saved} ({key} has "
                    f"shape {tuple(saved_shape)}, the config needs {tuple(model_shape)})"
                )
    if not explained:  # no witness named the field: list the shapes themselves
        for key, saved_shape, model_shape in sorted(info.get("mismatched_keys") or (), key=lambda item: item[0]):
            problems.append(
                f"{key} has shape {tuple(saved_shape)} in the weights file, the config needs {tuple(model_shape)}"
            )
    return problems


def _check_latents(latents: torch.Tensor, batch_size: int, latent_size: int) -> None:
    if latents.dim() != 2 or latents.shape[1] != latent_size or latents.shape[0] != batch_size:
        raise ValueError(
            f"latents must have shape (batch_size={batch_size}, latent_size={latent_size}), got {tuple(latents.shape)}."
        )
    if not torch.isfinite(latents).all():
        raise ValueError("latents contain NaN or infinite values.")


__all__ = ["ScaleVAEForLatentLM", "ScaleVAEPreTrainedModel", "ScaleVAEOutput", "ScaleVAEEncoderOutput"]

# Every save (save_pretrained, Trainer checkpoints, push_to_hub) copies this file and its configuration file and records
# them in config.json's auto_map, so `AutoModel.from_pretrained(folder, trust_remote_code=True)` works without scalevae.
ScaleVAEForLatentLM.register_for_auto_class("AutoModel")
