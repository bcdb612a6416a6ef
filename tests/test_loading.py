"""Loading saved folders: a folder saved by the previous release (tests/fixtures/scalevae-0.1.0, made by
make_previous_release.py) loads and computes what that release computed, or is refused with the version error where
its meaning changed; config overrides given to `from_pretrained` are checked like a new config; a frozen encoder stays
frozen after loading."""

import json
from pathlib import Path

import pytest
import torch

from modeling_scalevae import ScaleVAEForLatentLM
from tests.conftest import tiny_model

PREVIOUS_RELEASE = Path(__file__).resolve().parent / "fixtures" / "scalevae-0.1.0"


def test_a_scale_vae_saved_by_the_previous_release_computes_what_it_computed():
    folder = PREVIOUS_RELEASE / "scale"
    expected = json.loads((folder / "expected.json").read_text())
    model = ScaleVAEForLatentLM.from_pretrained(folder).eval()
    assert model.config.prior == "scaled"  # the prior it was trained and evaluated with
    probe = {key: torch.tensor(value) for key, value in expected["probe"].items()}
    with torch.no_grad():
        decoder_mu = model.encode(probe["input_ids"], probe["attention_mask"]).decoder_mu
        out = model(**probe, latents=decoder_mu)
        generated = model.generate(latents=decoder_mu, max_new_tokens=8, do_sample=False)
    # Equal up to float32 rounding: the math library may sum in another order on another machine or thread count.
    assert torch.allclose(decoder_mu, torch.tensor(expected["decoder_mu"]), rtol=1e-5, atol=1e-6)
    assert out.reconstruction_loss.item() == pytest.approx(expected["reconstruction_loss"], rel=1e-6)
    scored = probe["labels"] != -100
    assert out.logits.double()[scored].sum().item() == pytest.approx(expected["scored_logits_sum"], rel=1e-6)
    assert generated.tolist() == expected["generated"]


def test_a_bn_vae_saved_by_the_previous_release_is_refused_with_the_version_error():
    """BN-VAE changed meaning in format 2 (no eps, population statistics): its old folders must not load as if not."""
    with pytest.raises(ValueError, match=r"BN-VAE folder cannot be read.*saved by scalevae \w+ \(format 1\)") as error:
        ScaleVAEForLatentLM.from_pretrained(PREVIOUS_RELEASE / "bn")
    assert "installed: scalevae" in str(error.value)


def test_a_frozen_encoder_stays_frozen_after_loading(tmp_path):
    model = tiny_model(freeze_encoder=True)
    model.save_pretrained(tmp_path)
    loaded = ScaleVAEForLatentLM.from_pretrained(tmp_path)
    assert not any(p.requires_grad for p in loaded.encoder.parameters())
    assert all(p.requires_grad for p in loaded.decoder.parameters())
    unfrozen = ScaleVAEForLatentLM.from_pretrained(tmp_path, freeze_encoder=False)
    assert all(p.requires_grad for p in unfrozen.encoder.parameters())


def test_config_overrides_at_load_time_are_validated(tmp_path):
    tiny_model().save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="kl_weight=-1.0"):
        ScaleVAEForLatentLM.from_pretrained(tmp_path, kl_weight=-1.0)
    assert ScaleVAEForLatentLM.from_pretrained(tmp_path, kl_weight=0.5).config.kl_weight == 0.5


def test_bn_gamma_must_agree_with_the_saved_buffer(tmp_path):
    tiny_model(collapse_strategy="bn", bn_gamma=0.5).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=r"bn_gamma=0.8 in the config, but the weights hold γ=0.5"):
        ScaleVAEForLatentLM.from_pretrained(tmp_path, bn_gamma=0.8)
