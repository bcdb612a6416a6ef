"""Input checks of Scale-VAE: a clear error naming the argument instead of a crash deep in torch or a silently wrong
result. A sibling of `modeling_scalevae.py` that every saved folder carries (it imports only torch and transformers)."""

import math
from collections.abc import Mapping

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


def encoder_batches(batches) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
    """The `(input_ids, attention_mask)` of each batch of an iterable of tokenizer outputs (a DataLoader or a list of
    dicts), each a 2-D integer tensor; the mask may be absent (None). Anything else is refused, naming the batch."""
    if isinstance(batches, (str, bytes, torch.Tensor)) or not hasattr(batches, "__iter__"):
        raise ArgumentError(
            f"batches must be an iterable (a DataLoader or a list) of dicts with input_ids, not {type(batches).__name__}."
        )
    inputs = []
    for i, batch in enumerate(batches):
        if not isinstance(batch, Mapping):
            raise ArgumentError(
                f"batches[{i}] is a {type(batch).__name__}: each batch must be a dict with the encoder's "
                "input_ids (and attention_mask), as a tokenizer called with return_tensors='pt' returns it."
            )
        ids, mask = batch.get("input_ids"), batch.get("attention_mask")
        for name, tensor in (("input_ids", ids), ("attention_mask", mask)):
            if tensor is None and name == "attention_mask":
                continue
            if not (isinstance(tensor, torch.Tensor) and tensor.dim() == 2 and not tensor.is_floating_point()):
                raise ArgumentError(
                    f"batches[{i}][{name!r}] must be a 2-D integer tensor (batch, length), got "
                    f"{type(tensor).__name__}{tuple(tensor.shape) if isinstance(tensor, torch.Tensor) else ''}."
                )
        inputs.append((ids, mask))
    if not inputs:
        raise ValueError("fit_prior got no batches.")
    return inputs


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


def checked_kl_weight(kl_weight, training: bool = False):
    """β for one forward: a finite number >= 0, or a one-element tensor (a schedule's) checked where reading it is
    free (`check_kl_weight_tensor`)."""
    if isinstance(kl_weight, torch.Tensor):
        check_kl_weight_tensor(kl_weight, training)
        return kl_weight
    if torch.compiler.is_compiling():  # a symbolic float under torch.compile: checked once, outside the graph
        return kl_weight
    return check_number("kl_weight", kl_weight, 0.0)


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


# ---------------------------------------------------------------------------------------------------------------------
# Arguments of the public calls (the model's methods, `generate`'s forwarded arguments, scalevae's LatentText): one
# checker, so that every call names the argument, refuses a wrong type, NaN and infinities, and bounds a size before
# anything is allocated. Numbers may be Python, numpy or 0-d tensor scalars (what an array computation hands over);
# booleans are never numbers.
# ---------------------------------------------------------------------------------------------------------------------

# The most rows one call generates (texts × beams × returned sequences), and the most beams or returned sequences per
# text: beyond, generation would ask the allocator for more than any machine holds and fail without naming why.
MAX_GENERATION_ROWS = 1 << 16
# Latents drawn at once (no text generated): millions are cheap (4M x 32 floats are 512 MB), a typo's 1e12 is not.
MAX_SAMPLED_LATENTS = 1 << 22
MAX_BEAMS = 256


class ArgumentError(ValueError, TypeError):
    """A bad argument of a public call; the message names it. Both a ValueError and a TypeError, so that code catching
    either (Python raises TypeError for a wrong type, ValueError for a wrong value) catches it."""


def _scalar(value):
    """A Python scalar from a numpy scalar or a 0-d tensor (anything else as it is)."""
    if isinstance(value, torch.Tensor) and value.dim() == 0:
        return value.item()
    item = getattr(value, "item", None)
    if type(value).__module__ == "numpy" and callable(item) and getattr(value, "ndim", None) == 0:
        return item()
    return value


def check_integer(name: str, value, low: int | None = 1, high: int | None = None):
    """`value` as an int in [low, high]; an ArgumentError naming `name` otherwise (bool, 2.5 and '3' included)."""
    number = _scalar(value)
    if isinstance(number, bool) or not isinstance(number, int):
        raise ArgumentError(f"{name}={value!r} must be a whole number (an int), not {type(value).__name__}.")
    if (low is not None and number < low) or (high is not None and number > high):
        bounds = (
            f"in [{low}, {high}]"
            if high is not None and low is not None
            else f">= {low}"
            if low is not None
            else f"<= {high}"
        )
        raise ArgumentError(f"{name}={value!r} must be a whole number {bounds}.")
    return number


def check_number(
    name: str, value, low: float | None = None, high: float | None = None, low_open: bool = False
) -> float:
    """`value` as a finite float in [low, high] (`(low, high]` with `low_open`); an ArgumentError naming `name`."""
    number = _scalar(value)
    if isinstance(number, bool) or not isinstance(number, (int, float)):
        raise ArgumentError(f"{name}={value!r} must be a number, not {type(value).__name__}.")
    number = float(number)
    too_low = low is not None and (number <= low if low_open else number < low)
    if not math.isfinite(number) or too_low or (high is not None and number > high):
        left = "(" if low_open else "["
        bounds = (
            f" in {left}{low}, {high}]"
            if low is not None and high is not None
            else (f" {'>' if low_open else '>='} {low}" if low is not None else "")
        )
        raise ArgumentError(f"{name}={value!r} must be a finite number{bounds}.")
    return number


def check_flag(name: str, value) -> bool:
    if not isinstance(_scalar(value), bool):
        raise ArgumentError(f"{name}={value!r} must be True or False.")
    return _scalar(value)


def check_generator(name: str, value) -> None:
    if value is not None and not isinstance(value, torch.Generator):
        raise ArgumentError(
            f"{name}={value!r} must be a torch.Generator (torch.Generator().manual_seed(seed)) or None, not "
            f"{type(value).__name__}."
        )


# generate()'s arguments this model checks before transformers sees them: name -> checker of one value.
GENERATION_ARGUMENTS = {
    "max_new_tokens": lambda v: check_integer("max_new_tokens", v, 1),
    "min_new_tokens": lambda v: check_integer("min_new_tokens", v, 0),
    "max_length": lambda v: check_integer("max_length", v, 1),
    "min_length": lambda v: check_integer("min_length", v, 0),
    "num_beams": lambda v: check_integer("num_beams", v, 1, MAX_BEAMS),
    "num_return_sequences": lambda v: check_integer("num_return_sequences", v, 1, MAX_BEAMS),
    "top_k": lambda v: check_integer("top_k", v, 0),
    "top_p": lambda v: check_number("top_p", v, 0.0, 1.0, low_open=True),
    "min_p": lambda v: check_number("min_p", v, 0.0, 1.0),
    "typical_p": lambda v: check_number("typical_p", v, 0.0, 1.0, low_open=True),
    "temperature": lambda v: check_number("temperature", v, 0.0, None, low_open=True),
    "repetition_penalty": lambda v: check_number("repetition_penalty", v, 0.0, None, low_open=True),
    "length_penalty": lambda v: check_number("length_penalty", v),
    "no_repeat_ngram_size": lambda v: check_integer("no_repeat_ngram_size", v, 0),
    **{
        flag: (lambda name: lambda v: check_flag(name, v))(flag)
        for flag in (
            "do_sample",
            "use_cache",
            "return_dict_in_generate",
            "output_scores",
            "output_logits",
            "output_attentions",
            "output_hidden_states",
        )
    },
}


def check_generation_arguments(generation_kwargs: dict, batch_size: int | None = None) -> None:
    """Check the arguments `generate` forwards to transformers (and those of a `generation_config` passed with them),
    and, given the batch size, bound the rows they ask for: an error names the argument instead of a ZeroDivisionError (num_beams=0), a
    silently truncated 2.5 or a NaN that samples garbage."""
    config = generation_kwargs.get("generation_config")
    values = {name: getattr(config, name, None) for name in GENERATION_ARGUMENTS} if config is not None else {}
    values.update({name: generation_kwargs[name] for name in GENERATION_ARGUMENTS if name in generation_kwargs})
    for name, value in values.items():
        if value is not None:
            values[name] = GENERATION_ARGUMENTS[name](value)
    if batch_size is None:
        return
    rows = batch_size * max(values.get("num_beams") or 1, values.get("num_return_sequences") or 1)
    if rows > MAX_GENERATION_ROWS:
        raise ArgumentError(
            f"generate() would decode {rows} rows at once ({batch_size} latents × num_beams / num_return_sequences), "
            f"more than {MAX_GENERATION_ROWS}: decode in batches (LatentText.decode_in_batches)."
        )


def check_kl_weight_tensor(kl_weight: torch.Tensor, training: bool) -> None:
    """A tensor β (a schedule's) must be one finite value >= 0; read only where reading it costs no device sync."""
    if kl_weight.numel() != 1:
        raise ArgumentError(f"kl_weight must be one number, got a tensor of shape {tuple(kl_weight.shape)}.")
    if may_read_values(kl_weight, training):
        value = float(kl_weight.detach())
        if not (math.isfinite(value) and value >= 0):
            raise ArgumentError(f"kl_weight={value!r} must be a finite number >= 0.")
