"""Latent-space operations on a trained model, from text to text: encode, decode, reconstruct, sample, interpolate,
analogy."""

import os

import torch

from modeling_scalevae import ScaleVAEForLatentLM

from .factory import load_pretrained


class LatentText:
    """Text-level operations on a trained model: one object holding the model and its two tokenizers."""

    def __init__(self, model: ScaleVAEForLatentLM, encoder_tokenizer, decoder_tokenizer, max_length: int = 64):
        self.model, self.encoder_tokenizer, self.decoder_tokenizer = model, encoder_tokenizer, decoder_tokenizer
        self.max_length = max_length

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, **kwargs) -> "LatentText":
        return cls(*load_pretrained(path, **kwargs))

    @torch.no_grad()
    def encode(self, texts: list[str]) -> torch.Tensor:
        """The decoder's latent for each text: the (scaled) posterior mean."""
        if not texts or any(not t.strip() for t in texts):
            raise ValueError("encode() needs a non-empty list of non-empty texts.")
        batch = self.encoder_tokenizer(
            texts, padding=True, truncation=True, max_length=self.max_length, return_tensors="pt"
        ).to(self.model.device)
        return self.model.encode(batch["input_ids"], batch["attention_mask"]).decoder_mu

    @torch.no_grad()
    def decode(self, latents, **generation_kwargs) -> list[str]:
        """Generate a text from each latent (a tensor or a numpy array of shape (n, latent_size), any float type:
        it is cast to the model's). Without `max_new_tokens` / `max_length`, up to `max_length` tokens, fewer if the
        decoder has fewer positions."""
        if not isinstance(latents, torch.Tensor):
            latents = torch.as_tensor(latents)
        if not latents.is_floating_point():
            raise ValueError(f"latents must be floating point, got dtype {latents.dtype}.")
        latents = latents.to(device=self.model.device, dtype=self.model.dtype)
        if "max_length" not in generation_kwargs:
            # the BOS token and, with memory injection, the latent's slot take positions too
            room = self.model.config.decoder.n_positions - 1 - int(self.model.config.latent_injection != "embedding")
            generation_kwargs.setdefault("max_new_tokens", min(self.max_length, room))
        ids = self.model.generate(latents=latents, **generation_kwargs)
        return self.decoder_tokenizer.batch_decode(ids, skip_special_tokens=True)

    def reconstruct(self, texts: list[str], **generation_kwargs) -> list[str]:
        return self.decode(self.encode(texts), **generation_kwargs)

    def sample(self, num_samples: int, generator: torch.Generator | None = None, **generation_kwargs) -> list[str]:
        if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 1:
            raise ValueError(f"num_samples={num_samples!r} must be a whole number >= 1.")
        return self.decode(self.model.sample_prior(num_samples, generator=generator), **generation_kwargs)

    def interpolate(self, text_a: str, text_b: str, steps: int = 5, **generation_kwargs) -> list[str]:
        """Decode z_a + t (z_b - z_a) for `steps` evenly spaced t in [0, 1]."""
        if steps < 2:
            raise ValueError(f"steps={steps} must be >= 2 (the two end points).")
        z = self.encode([text_a, text_b])
        weights = torch.linspace(0, 1, steps, device=z.device).unsqueeze(1)
        return self.decode(z[0] + weights * (z[1] - z[0]), **generation_kwargs)

    def analogy(self, text_a: str, text_b: str, text_c: str, **generation_kwargs) -> str:
        """a : b :: c : ?, decoded from z_c + z_b - z_a."""
        z = self.encode([text_a, text_b, text_c])
        return self.decode((z[2] + z[1] - z[0]).unsqueeze(0), **generation_kwargs)[0]
