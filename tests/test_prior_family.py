"""The prior family (config.prior "full" and "mixture"): fitted to the aggregate decoder posterior, scored by its exact
density, saved bit-exactly. The diagonal "fitted" and the "scaled" priors are tested in test_prior.py."""

import copy
import json
import math

import numpy as np
import pytest
import torch
from torch.distributions import MultivariateNormal, kl_divergence

from distributions_scalevae import fit_gaussian_mixture, prior_kl
from modeling_scalevae import ScaleVAEForLatentLM
from scalevae.metrics import elbo, evaluate_model, iw_log_likelihood
from scalevae.training import fit_prior_families
from tests.model_tester import tester

FAMILIES = [("full", None), ("mixture", 3)]


def trained(prior="fitted", components=None, steps=20, seed=0):
    model = tester.get_model(seed=seed, prior=prior, **({"prior_components": components} if components else {}))
    tester.train_steps(model, steps=steps, lr=3e-3, optimizer=torch.optim.Adam)
    return model.eval()


def batches(count=3):
    return [tester.prepare_inputs(batch_size=8, seed=100 + i) for i in range(count)]


def overlapping_clusters(seed=0):
    """600 points from three overlapping full-covariance Gaussians in 3-d: responsibilities are not 0 or 1."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.tensor([[0.0, 0.0, 0.0], [2.5, 1.0, 0.0], [0.0, 2.5, 1.5]])
    parts = [
        c + torch.randn(150 + 75 * i, 3, generator=g) @ (0.3 * torch.randn(3, 3, generator=g) + torch.eye(3))
        for i, c in enumerate(centres)
    ]
    return torch.cat(parts).double()


def test_em_finds_the_maximum_likelihood_mixture_of_scikit_learn():
    from sklearn.mixture import GaussianMixture

    x = overlapping_clusters()
    log_weights, loc, tril = fit_gaussian_mixture(x, 3, torch.Generator().manual_seed(0), max_iter=2000, tol=1e-12)
    reference = GaussianMixture(3, covariance_type="full", tol=1e-12, max_iter=2000, n_init=5, random_state=0)
    reference.fit(x.numpy())
    ours, theirs = np.argsort(loc[:, 0].numpy()), np.argsort(reference.means_[:, 0])
    np.testing.assert_allclose(loc.numpy()[ours], reference.means_[theirs], atol=1e-5)
    np.testing.assert_allclose(log_weights.exp().numpy()[ours], reference.weights_[theirs], atol=1e-5)
    np.testing.assert_allclose((tril @ tril.mT).numpy()[ours], reference.covariances_[theirs], atol=1e-5)
    mixture = torch.distributions.MixtureSameFamily(
        torch.distributions.Categorical(logits=log_weights), MultivariateNormal(loc, scale_tril=tril)
    )
    assert mixture.log_prob(x).mean().item() == pytest.approx(reference.score(x.numpy()), abs=1e-8)


def test_full_prior_is_the_aggregate_posteriors_mean_and_covariance():
    model = trained(prior="full")
    data = batches()
    model.fit_prior(data)
    with torch.no_grad():
        posteriors = [model.encode(b["input_ids"], b["attention_mask"]) for b in data]
    means = torch.cat([p.decoder_mu for p in posteriors]).double().numpy()
    variances = torch.cat([p.logvar for p in posteriors]).double().exp().numpy()
    covariance = np.cov(means, rowvar=False, bias=True) + np.diag(variances.mean(0))
    prior = model.prior_distribution()
    np.testing.assert_allclose(prior.mean.numpy(), means.mean(0), atol=1e-6)
    np.testing.assert_allclose(prior.covariance_matrix.double().numpy(), covariance, atol=1e-5)
    mean, std = model.prior_parameters()
    np.testing.assert_allclose(std.double().numpy(), np.sqrt(np.diag(covariance)), atol=1e-6)
    assert torch.equal(mean, prior.mean)
    # The diagonal fit is the same aggregate's moments: the full prior's marginals.
    np.testing.assert_allclose(model.fitted_prior.scale.double().numpy(), np.sqrt(np.diag(covariance)), atol=1e-6)


def test_a_singular_aggregate_is_refused_and_the_prior_kept():
    # An AE-like aggregate: no posterior variance, and every sentence at the same mean.
    model = trained(prior="full")
    before = {name: buffer.clone() for name, buffer in model.fitted_prior.named_buffers()}
    means = torch.randn(1, tester.latent_size, generator=torch.Generator().manual_seed(0)).repeat(3, 1)
    with pytest.raises(ValueError, match=f"singular covariance in {tester.latent_size} dimensions.*prior='fitted'"):
        model.fitted_prior.fit(means, torch.full_like(means, -math.inf))
    for name, buffer in model.fitted_prior.named_buffers():
        assert torch.equal(buffer, before[name]), name


def test_kl_to_each_prior():
    g = torch.Generator().manual_seed(0)
    mu, logvar = torch.randn(5, 3, generator=g).double(), 0.3 * torch.randn(5, 3, generator=g).double()
    q = MultivariateNormal(mu, scale_tril=torch.diag_embed((0.5 * logvar).exp()))
    log_weights, loc, tril = fit_gaussian_mixture(overlapping_clusters(), 3, torch.Generator().manual_seed(0))
    full = MultivariateNormal(loc[0], scale_tril=tril[0])
    torch.testing.assert_close(prior_kl(mu, logvar, full), kl_divergence(q, full))
    mixture = torch.distributions.MixtureSameFamily(
        torch.distributions.Categorical(logits=log_weights), MultivariateNormal(loc, scale_tril=tril)
    )
    torch.manual_seed(0)
    z = q.sample((200000,))
    log_ratio = q.log_prob(z) - mixture.log_prob(z)
    reference = log_ratio.mean(0)  # the definition, with many draws
    estimate = prior_kl(mu, logvar, mixture, num_samples=4000, generator=torch.Generator().manual_seed(1))
    standard_error = log_ratio.std(0) / 4000**0.5
    assert ((estimate - reference).abs() < 4 * standard_error).all(), (estimate, reference, standard_error)
    one = torch.distributions.MixtureSameFamily(
        torch.distributions.Categorical(logits=torch.zeros(1, dtype=torch.float64)),
        MultivariateNormal(loc[:1], scale_tril=tril[:1]),
    )
    standard_error = (q.log_prob(z) - full.log_prob(z)).std(0) / 4000**0.5
    assert ((prior_kl(mu, logvar, one, num_samples=4000) - kl_divergence(q, full)).abs() < 4 * standard_error).all()


@pytest.mark.parametrize(("prior", "components"), FAMILIES)
def test_iw_is_a_valid_bound_under_each_prior(prior, components):
    """The importance-weighted bound tightens with k and stays under the ELBO, under every prior family (the default
    full-covariance one included: no other test repeats this)."""
    model = trained(prior, components, steps=30)
    model.fit_prior(batches())
    batch = tester.prepare_inputs(batch_size=8, seed=7)
    nll = {
        k: -iw_log_likelihood(model, batch, num_samples=k, generator=torch.Generator().manual_seed(k)).mean()
        for k in (1, 10, 200)
    }
    neg_elbo = torch.stack(
        [-elbo(model, batch, generator=torch.Generator().manual_seed(s)).mean() for s in range(50)]
    ).mean()
    assert neg_elbo >= nll[200] - 0.05
    assert nll[1] >= nll[10] >= nll[200]
    figures = evaluate_model(
        model, [batch], num_importance_samples=50, generator=torch.Generator().manual_seed(0), progress=False
    )
    assert -figures["elbo"] >= figures["nll"] - 1.0
    assert figures["decoder_kl"] > 0


def clustered_model_and_batch():
    """A tiny VAE whose 64 sentences, four near-copies of four sentences, have tight posteriors (σ ≈ 0.05) around
    four separated means: an aggregate posterior far from any one Gaussian."""
    model = tester.get_model(seed=0, collapse_strategy="vae", dropout=0.0).eval()
    with torch.no_grad():
        model.latent_head.proj.weight[: tester.latent_size] *= 100
        model.latent_head.proj.bias[tester.latent_size :] = -6.0
    g = torch.Generator().manual_seed(0)
    bases = torch.randint(3, tester.vocab_size, (4, 7), generator=g)
    rows = []
    for i in range(64):
        ids = bases[i % 4].clone()
        ids[torch.randint(0, 7, (1,), generator=g)] = torch.randint(3, tester.vocab_size, (1,), generator=g)
        rows.append(ids)
    ids = torch.stack(rows)
    labels = torch.cat([ids, torch.full((len(ids), 1), tester.eos)], 1)
    return model, dict(input_ids=ids, attention_mask=torch.ones_like(ids), labels=labels)


def test_iw_nll_falls_as_the_prior_family_fits_a_clustered_aggregate():
    model, batch = clustered_model_and_batch()
    nll = {}
    for prior, components in [("fitted", None), ("full", None), ("mixture", 4)]:
        scored = copy.deepcopy(model)
        scored.set_prior(prior, components)
        scored.fit_prior([batch])
        # The same noise for every prior: the figures differ only by log p(z).
        iw = iw_log_likelihood(scored, batch, num_samples=20, generator=torch.Generator().manual_seed(1))
        nll[prior] = -iw.mean().item()
    assert nll["fitted"] > nll["full"] + 0.3 > nll["mixture"] + 0.6, nll


def test_one_pass_scores_every_family_as_refitted_copies_do():
    """`fit_prior_families` + one `evaluate_model` pass give, for the families the model does not hold, the figures a
    copy refitted to each family gives in a pass of its own (same fit, same importance samples)."""
    model, batch = clustered_model_and_batch()
    model.set_prior("fitted")
    model.fit_prior([batch])
    families = fit_prior_families(model, [batch], ("full", "mixture"), seed=3)
    one_pass = evaluate_model(
        model,
        [batch],
        num_importance_samples=20,
        generator=torch.Generator().manual_seed(0),
        progress=False,
        priors={"scaled": None, **families},
    )
    for family, components in (("full", None), ("mixture", 4)):
        copy_of = copy.deepcopy(model)
        copy_of.set_prior(family, components)
        copy_of.fit_prior([batch], generator=torch.Generator().manual_seed(3))
        alone = evaluate_model(
            copy_of, [batch], num_importance_samples=20, generator=torch.Generator().manual_seed(0), progress=False
        )
        assert one_pass[f"nll_{family}"] == pytest.approx(alone["nll"], abs=1e-6), family
        assert one_pass[f"ppl_{family}"] == pytest.approx(alone["ppl"], rel=1e-6), family
    assert one_pass["nll_full"] < one_pass["nll"]  # the clustered aggregate: the full covariance fits it better
    assert model.config.prior == "fitted" and one_pass["nll_scaled"] > 0  # the model itself is untouched


@pytest.mark.parametrize(("prior", "components"), FAMILIES)
def test_prior_survives_save_and_load_bit_exactly(tmp_path, prior, components):
    model = trained(prior, components)
    model.fit_prior(batches())
    model.save_pretrained(tmp_path)
    loaded = ScaleVAEForLatentLM.from_pretrained(tmp_path).eval()
    assert loaded.config.prior == prior and loaded.config.prior_components == model.config.prior_components
    for name, buffer in model.fitted_prior.named_buffers():
        assert torch.equal(dict(loaded.fitted_prior.named_buffers())[name], buffer), name
    generator = lambda: torch.Generator().manual_seed(3)  # noqa: E731
    assert torch.equal(loaded.sample_prior(50, generator()), model.sample_prior(50, generator()))
    batch = tester.prepare_inputs(batch_size=4, seed=9)
    assert torch.equal(
        iw_log_likelihood(loaded, batch, num_samples=5, generator=generator()),
        iw_log_likelihood(model, batch, num_samples=5, generator=generator()),
    )
    with pytest.raises(ValueError, match="component_"):  # strict: the weights hold a prior the config does not build
        ScaleVAEForLatentLM.from_pretrained(tmp_path, prior="fitted")


def test_format_2_folders_load_with_the_default_number_of_components(tmp_path):
    model = tester.get_model(prior="fitted")
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    del config["prior_components"]  # what format-2 folders of scalevae 0.2.0 hold
    (tmp_path / "config.json").write_text(json.dumps(config))
    loaded = ScaleVAEForLatentLM.from_pretrained(tmp_path)
    assert loaded.config.prior == "fitted" and loaded.config.prior_components == 4
    assert torch.equal(loaded.fitted_prior.scale, model.fitted_prior.scale)
    with pytest.raises(ValueError, match="prior_components=0"):
        tester.get_config(prior="mixture", prior_components=0)


def test_sample_prior_draws_from_the_mixture():
    model = trained("mixture", 3)
    model.fit_prior(batches())
    prior = model.prior_distribution()
    z = model.sample_prior(100000, torch.Generator().manual_seed(0)).double()
    weights, loc = prior.mixture_distribution.probs.double(), prior.component_distribution.loc.double()
    covariances = prior.component_distribution.covariance_matrix.double()
    mean = weights @ loc
    covariance = (weights[:, None, None] * (covariances + loc[:, :, None] * loc[:, None, :])).sum(0) - mean.outer(mean)
    torch.testing.assert_close(z.mean(0), mean, atol=0.02 * covariance.diagonal().max().sqrt().item(), rtol=0)
    torch.testing.assert_close(torch.cov(z.T), covariance, atol=0.03 * covariance.diagonal().max().item(), rtol=0)
    assert prior.log_prob(z[:5]).shape == (5,)


@pytest.mark.parametrize(("prior", "components"), FAMILIES)
def test_until_fitted_the_prior_is_the_running_diagonal_estimate(prior, components):
    model = trained(prior, components, steps=5)
    covariance = model.prior_distribution().covariance_matrix if prior == "full" else None
    if prior == "full":
        torch.testing.assert_close(covariance, torch.diag(model.fitted_prior.scale.pow(2)))
    mean, std = model.prior_parameters()
    torch.testing.assert_close(mean, model.fitted_prior.loc)
    torch.testing.assert_close(std, model.fitted_prior.scale)
    batch = tester.prepare_inputs(batch_size=8, seed=3)
    with torch.no_grad():  # the decoder's KL is reproducible in eval mode (a mixture's estimate uses a fixed seed)
        first, second = model(**batch).decoder_kl, model(**batch).decoder_kl
    assert torch.equal(first, second)


def test_set_prior_switches_family_and_keeps_the_running_estimate():
    model = trained("fitted")
    loc = model.fitted_prior.loc.clone()
    with pytest.raises(ValueError, match=r"set_prior\('full'\)"):
        model.prior_distribution("full")
    model.set_prior("mixture", 2)
    assert model.config.prior == "mixture" and model.config.prior_components == 2
    assert torch.equal(model.fitted_prior.loc, loc)
    model.fit_prior(batches())
    assert model.prior_distribution().component_distribution.loc.shape == (2, tester.latent_size)
    assert {"fitted_prior.component_logits", "fitted_prior.loc"} <= set(model.state_dict())
    model.set_prior("scaled")
    assert not any(key.startswith("fitted_prior.") for key in model.state_dict())


@pytest.mark.parametrize(("prior", "components"), FAMILIES)
def test_a_model_built_on_the_meta_device_initialises_the_prior_buffers(prior, components):
    config = tester.get_config(prior=prior, prior_components=components or 4)
    fresh = ScaleVAEForLatentLM(config)
    with torch.device("meta"):
        model = ScaleVAEForLatentLM(config)
    model.to_empty(device="cpu")
    with torch.no_grad():  # what uninitialised memory may hold
        for buffer in model.fitted_prior.buffers():
            buffer.fill_(7)
    model.init_weights()
    for name, buffer in fresh.fitted_prior.named_buffers():
        assert torch.equal(model.fitted_prior.get_buffer(name), buffer), name
    assert torch.equal(model.prior_distribution().mean, torch.zeros(tester.latent_size))
