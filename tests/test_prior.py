"""The diagonal generative priors ("fitted", "scaled") and BN-VAE's guarantee, on tiny models and real text. The
full-covariance and mixture priors (the default is "full") are tested in test_prior_family.py."""

import functools
import json

import pytest
import torch

from configuration_scalevae import ScaleVAEConfig
from modeling_scalevae import ScaleVAEForLatentLM
from scalevae.metrics import evaluate_model
from tests.conftest import shared_file
from tests.model_tester import DENSITY_STRATEGIES, tester

tiny_model, random_batch = functools.partial(tester.get_model, prior="fitted"), tester.prepare_inputs


def trained(seed=0, steps=20, **kwargs):
    model = tiny_model(seed=seed, **kwargs)
    tester.train_steps(model, steps=steps, lr=3e-3, optimizer=torch.optim.Adam)
    return model.eval()


def batches(count=3):
    return [random_batch(batch_size=8, seed=100 + i) for i in range(count)]


def aggregate_moments(model, data):
    with torch.no_grad():
        posteriors = [model.encode(b["input_ids"], b["attention_mask"]) for b in data]
    decoder_mu = torch.cat([p.decoder_mu for p in posteriors]).double()
    variance = torch.cat([p.logvar for p in posteriors]).double().exp()
    return decoder_mu.mean(0), (decoder_mu.var(0, unbiased=False) + variance.mean(0)).sqrt()


@pytest.mark.parametrize("strategy", DENSITY_STRATEGIES)
def test_fitted_prior_equals_the_aggregate_posteriors_moments(strategy):
    model = trained(collapse_strategy=strategy)
    data = batches()
    model.fit_prior(data)
    loc, scale = aggregate_moments(model, data)
    assert torch.allclose(model.fitted_prior.loc.double(), loc, atol=1e-6)
    assert torch.allclose(model.fitted_prior.scale.double(), scale, atol=1e-6)
    posterior = model.encode(data[0]["input_ids"], data[0]["attention_mask"])
    assert torch.equal(posterior.prior_mean, model.fitted_prior.loc)
    assert torch.equal(posterior.prior_std, model.fitted_prior.scale)
    scaled_mean, scaled_std = model.prior_parameters("scaled")
    assert torch.equal(scaled_mean, torch.zeros_like(scaled_std))
    if strategy == "scale":
        assert torch.equal(scaled_std, model.collapse.scale_factors)


def test_running_estimate_tracks_the_aggregate_while_training():
    model = tiny_model(prior_momentum=0.5).train()
    batch = random_batch(batch_size=16)
    for _ in range(40):  # same batch, no optimizer step: the moments are fixed, the average converges to them
        model(**batch)
    model.eval()
    with torch.no_grad():
        # In training the decoder's mean uses the batch's own factors; reproduce them.
        mu = model.encode(batch["input_ids"], batch["attention_mask"]).mu
        factors = model.collapse.batch_factors(mu)
    model.train()
    torch.manual_seed(0)
    with torch.no_grad():
        out = model(**batch)
    decoder_mu, variance = (factors * out.mu).double(), out.logvar.double().exp()
    # Encoder dropout makes each pass's moments differ a little: the average is near, not equal.
    assert torch.allclose(model.fitted_prior.loc.double(), decoder_mu.mean(0), atol=0.3)
    expected_scale = (decoder_mu.var(0, unbiased=False) + variance.mean(0)).sqrt()
    assert torch.allclose(model.fitted_prior.scale.double(), expected_scale, rtol=0.3)


def test_both_priors_in_one_evaluation_match_separate_evaluations():
    model = trained(steps=10)
    model.fit_prior(batches())
    data = batches(2)
    both = evaluate_model(
        model,
        data,
        num_importance_samples=8,
        generator=torch.Generator().manual_seed(0),
        progress=False,
        priors=("fitted", "scaled"),
    )
    assert both["nll"] == both["nll_fitted"]  # the config's prior is "fitted"
    assert both["nll_scaled"] != both["nll_fitted"]
    model.config.prior = "scaled"
    alone = evaluate_model(
        model, data, num_importance_samples=8, generator=torch.Generator().manual_seed(0), progress=False
    )
    assert alone["nll"] == pytest.approx(both["nll_scaled"], rel=1e-9)
    assert alone["decoder_kl"] == pytest.approx(both["decoder_kl_scaled"], rel=1e-9)


def test_fitted_prior_survives_save_and_load_bit_exactly(tmp_path):
    model = trained()
    model.fit_prior(batches())
    model.save_pretrained(tmp_path)
    loaded = ScaleVAEForLatentLM.from_pretrained(tmp_path).eval()
    assert torch.equal(loaded.fitted_prior.loc, model.fitted_prior.loc)
    assert torch.equal(loaded.fitted_prior.scale, model.fitted_prior.scale)
    generator = lambda: torch.Generator().manual_seed(3)  # noqa: E731
    assert torch.equal(loaded.sample_prior(5, generator()), model.sample_prior(5, generator()))


def test_sample_prior_draws_from_the_configured_prior():
    model = trained()
    model.fit_prior(batches())
    z = model.sample_prior(40000, torch.Generator().manual_seed(0))
    assert torch.allclose(z.mean(0), model.fitted_prior.loc, atol=0.05 * model.fitted_prior.scale.max().item())
    assert torch.allclose(z.std(0), model.fitted_prior.scale, rtol=0.03)
    z = model.sample_prior(40000, torch.Generator().manual_seed(0), prior="scaled")
    assert torch.allclose(z.std(0), model.collapse.scale_factors, rtol=0.03)
    with pytest.raises(ValueError, match="num_samples=0"):
        model.sample_prior(0)
    with pytest.raises(ValueError, match="prior='uniform'"):
        model.sample_prior(2, prior="uniform")


def test_folders_saved_before_the_fitted_prior_load_with_the_scaled_prior(tmp_path):
    model = tiny_model(prior="scaled")
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    del config["prior"], config["prior_momentum"], config["freeze_encoder"]  # what the previous release wrote
    config["scalevae_format_version"] = 1
    (tmp_path / "config.json").write_text(json.dumps(config))
    loaded = ScaleVAEForLatentLM.from_pretrained(tmp_path)
    assert loaded.config.prior == "scaled"
    assert ScaleVAEConfig().prior == "full"  # new models default to the full-covariance prior


def test_bn_vae_keeps_its_guarantee_in_eval_on_held_out_text():
    """Zhu et al.: with μ batch-normalised to scale γ, the expected KL is at least d·γ²/2 and every unit is active.
    Trained on real sentences, it must hold in eval mode on held-out ones, not only on the training batch."""
    from scalevae.data import DataCollatorForLatentLM, tokenize_texts
    from scalevae.factory import fit_decoder_tokenizer, prepare_decoder_tokenizer

    lines = [line.strip() for line in shared_file("ptb.train.txt").read_text().splitlines() if line.strip()]
    held_out = [line.strip() for line in shared_file("ptb.valid.txt").read_text().splitlines() if line.strip()][:256]
    # One small BPE fitted to the text serves both sides: the test is about the latent, not the vocabulary.
    decoder_tokenizer = prepare_decoder_tokenizer(fit_decoder_tokenizer(lines[:3200], vocab_size=600))
    encoder_tokenizer = decoder_tokenizer
    model = tester.get_model_for_tokenizers(
        encoder_tokenizer, decoder_tokenizer, latent_size=8, collapse_strategy="bn", bn_gamma=0.5
    ).train()
    collator = DataCollatorForLatentLM(encoder_tokenizer, decoder_tokenizer)

    def as_batches(texts, size):
        features = tokenize_texts(texts, encoder_tokenizer, decoder_tokenizer, 24)
        rows = [dict(zip(features, values)) for values in zip(*features.values())]
        return [collator(rows[i : i + size]) for i in range(0, len(rows), size)]

    train = as_batches(lines[:3200], 16)
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3)
    for step in range(200):
        loss = model(**train[step % len(train)]).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.fit_prior(train[:50])
    metrics = evaluate_model(
        model,
        as_batches(held_out, 64),
        num_importance_samples=0,
        progress=False,
        generator=torch.Generator().manual_seed(0),
    )
    d, gamma = 8, 0.5
    assert metrics["kl"] >= 0.9 * d * gamma**2 / 2, metrics["kl"]
    assert metrics["au"] == d
