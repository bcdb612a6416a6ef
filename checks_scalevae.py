"""Input checks of Scale-VAE: a clear error naming the argument instead of a crash deep in torch or a silently wrong
result. A sibling of `modeling_scalevae.py` that every saved folder carries (it imports only torch and transformers)."""

import torch
from transformers.utils import logging

logger = logging.get_logger(__name__)

# ---------------------------------------------------------------------------------------------------------------------
# Input checks: a clear error naming the argument instead of a crash deep in torch or a silently wrong result
#
# Each check reads a few numbers back to the host, before any work: a bad id or shape then fails with its name, value
# and valid range instead of an IndexError deep inside an embedding.
# ---------------------------------------------------------------------------------------------------------------------


def check_latents(latents: torch.Tensor, batch_size: int, latent_size: int, check_values: bool = True) -> None:
    if latents.dim() != 2 or latents.shape[1] != latent_size or latents.shape[0] != batch_size:
        raise ValueError(
            f"latents must have shape (batch_size={batch_size}, latent_size={latent_size}), got {tuple(latents.shape)}."
        )
    if check_values and not torch.isfinite(latents).all():
        raise ValueError("latents contain NaN or infinite values.")


def may_read_values(tensor: torch.Tensor | None, training: bool) -> bool:
    """Whether a check may read `tensor`'s values: always on the CPU (no device sync there), outside training on an
    accelerator (a training step never waits on the host), never while torch.compile traces."""
    return tensor is not None and not torch.compiler.is_compiling() and (tensor.device.type == "cpu" or not training)


def check_token_ids(
    name: str, ids: torch.Tensor | None, vocab_size: int, part: str, ignore_index=None, training: bool = False
) -> None:
    if ids is None or ids.numel() == 0 or not may_read_values(ids, training):
        return
    valid = ids if ignore_index is None else ids[ids != ignore_index]
    if valid.numel() == 0:
        return
    low, high = torch.stack([valid.min(), valid.max()]).tolist()
    if low < 0 or high >= vocab_size:
        bad = low if low < 0 else high
        allowed = f" (or {ignore_index} for ignored positions)" if ignore_index is not None else ""
        raise ValueError(
            f"{name} holds the token id {bad}, outside the {part}'s vocabulary: valid ids are 0 to {vocab_size - 1}"
            f"{allowed} (config.{part}.vocab_size={vocab_size}). Were they made by the {part}'s own tokenizer?"
        )


def check_encoder_inputs(
    config, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, training: bool = False
) -> None:
    check_token_ids("input_ids", input_ids, config.encoder.vocab_size, "encoder", training=training)
    # A shape, not a value: checked in every mode, before the position embeddings fail with a size mismatch.
    positions = getattr(config.encoder, "max_position_embeddings", None)
    if positions is not None and input_ids.dim() == 2 and input_ids.shape[1] > positions:
        raise ValueError(
            f"input_ids of length {input_ids.shape[1]} need more positions than the encoder has "
            f"(config.encoder.max_position_embeddings={positions}): truncate them (the tokenizer's max_length)."
        )
    if (
        attention_mask is not None
        and attention_mask.dim() == 2
        and attention_mask.shape[1] > 0
        and may_read_values(attention_mask, training)
    ):
        empty = (attention_mask == 0).all(dim=1)
        if bool(empty.any()):
            logger.warning_once(
                "attention_mask has a row of zeros only: the encoder sees no token of that sentence, and every such "
                "row gets the same posterior. Is the mask inverted, or is a sentence empty?"
            )


def cached_length(cache) -> int | None:
    """How many positions the decoder's cache holds, read without a host sync where that is possible: None for a
    filled static cache while torch.compile traces (its length lives on the device; `generate` compiles only the steps
    after the first, and checks the whole length before it)."""
    if cache is None or not cache.is_initialized:
        return 0
    length = cache.get_seq_length()
    if isinstance(length, torch.Tensor):  # a StaticCache counts on the device
        return None if torch.compiler.is_compiling() else int(length)
    return length


def check_decoder_inputs(
    config, decoder_input_ids: torch.Tensor, cache, memory_slot: bool, training: bool = False
) -> None:
    past = cached_length(cache)
    if past is None:
        return
    if past == 0:  # later steps of generate() decode the model's own tokens
        check_token_ids(
            "decoder_input_ids", decoder_input_ids, config.decoder.vocab_size, "decoder", training=training
        )
    slot = int(memory_slot and past == 0)  # the latent's key/value pair takes the first position
    needed = past + slot + decoder_input_ids.shape[-1]
    if needed > config.decoder.n_positions:
        raise ValueError(
            f"decoder_input_ids of length {decoder_input_ids.shape[-1]} (after {past} cached positions"
            f"{' and the latent slot' if slot else ''}) need {needed} positions, but the decoder has "
            f"config.decoder.n_positions={config.decoder.n_positions}."
        )


def check_forward_inputs(config, input_ids, decoder_input_ids, labels, latents, training: bool = False) -> None:
    if decoder_input_ids is None and labels is None:
        raise ValueError("Pass decoder_input_ids or labels: the decoder needs its inputs.")
    if latents is None and input_ids is None:
        raise ValueError("Pass input_ids (encoder tokens) or latents: the decoder needs a latent.")
    sizes = {
        name: tensor.shape[0]
        for name, tensor in (
            ("input_ids", input_ids),
            ("latents", latents),
            ("decoder_input_ids", decoder_input_ids),
            ("labels", labels),
        )
        if tensor is not None and tensor.dim() > 0
    }

    def message():
        return (
            "The inputs disagree on the batch size: "
            + ", ".join(f"{k} has {v}" for k, v in sizes.items())
            + ". Each row of the encoder's and the decoder's inputs is one sentence."
        )

    first, *others = sizes.values()
    if any(isinstance(size, torch.SymInt) for size in sizes.values()):
        # A dynamic batch under torch.export / torch.compile: symbolic sizes cannot be hashed (as a set would) nor
        # branched on; torch._check records their equality as a constraint of the graph, checked at run time.
        for size in others:
            torch._check(size == first, message)
    elif any(size != first for size in others):
        raise ValueError(message())
    check_token_ids("labels", labels, config.decoder.vocab_size, "decoder", ignore_index=-100, training=training)


def checked_kl_weight(kl_weight):
    if isinstance(kl_weight, (int, float)) and not 0 <= kl_weight < float("inf"):
        raise ValueError(f"kl_weight={kl_weight!r} must be a finite number >= 0.")
    return kl_weight


def check_generation_length(model, decoder_input_ids, generation_kwargs: dict) -> None:
    """Generating past the decoder's positions would fail after producing every token up to them: refuse first."""
    n_positions = model.config.decoder.n_positions
    prompt = decoder_input_ids.shape[-1] if decoder_input_ids is not None else 1  # the BOS token
    slot = int(model.injection.to_memory is not None)
    generation_config = generation_kwargs.get("generation_config") or model.generation_config
    max_new_tokens = generation_kwargs.get("max_new_tokens", generation_config.max_new_tokens)
    if max_new_tokens is not None:
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens={max_new_tokens} must be at least 1.")
        if prompt + slot + max_new_tokens > n_positions:
            raise ValueError(
                f"max_new_tokens={max_new_tokens} is too many: a prompt of {prompt} token(s)"
                f"{', the latent slot' if slot else ''} and {max_new_tokens} new tokens need "
                f"{prompt + slot + max_new_tokens} positions, but the decoder has config.decoder.n_positions="
                f"{n_positions}; use max_new_tokens <= {n_positions - prompt - slot}."
            )
        return
    max_length = generation_kwargs.get("max_length", generation_config.max_length)
    if max_length is not None and max_length + slot > n_positions:
        raise ValueError(
            f"max_length={max_length} is too long: with{' the latent slot and' if slot else ''} a prompt of {prompt} "
            f"token(s) the decoder has config.decoder.n_positions={n_positions}; use max_length <= "
            f"{n_positions - slot} (or max_new_tokens <= {n_positions - prompt - slot})."
        )


def as_model_latents(latents, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Latents of another float type (numpy arrays, float16/float64 tensors) in the model's dtype and device."""
    if not isinstance(latents, torch.Tensor):
        latents = torch.as_tensor(latents)
    if not latents.is_floating_point():
        raise ValueError(f"latents must be floating point, got dtype {latents.dtype}.")
    return latents.to(device=device, dtype=dtype)
