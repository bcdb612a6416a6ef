"""Tests of scalevae.metrics: analytic toy cases for MI and AU, an exactly solvable linear-Gaussian model for the
importance-weighted likelihood, and a tiny real Scale-VAE for the properties every model must satisfy."""

import math
from types import SimpleNamespace

import pytest
import torch

from distributions_scalevae import gaussian_kl
from modeling_scalevae import ScaleVAEEncoderOutput
from scalevae import metrics
from tests.model_tester import ScaleVAEModelTester

LATENT = 4
SENTENCES = [[5, 6, 7, 8], [9, 10, 11], [12, 13, 14, 15, 16, 17]]
# One decoder layer and BERT's and a short GPT-2's default positions: the sizes the Monte Carlo tolerances below were
# set on (other sizes draw other weights).
tester = ScaleVAEModelTester(decoder_layers=1, decoder_positions=64, encoder_positions=512, latent_size=LATENT)


# ---------------------------------------------------------------------------------------------------------------------
# Fixtures: a tiny real model and hand-built batches
# ---------------------------------------------------------------------------------------------------------------------


def tiny_model(collapse_strategy="scale", seed=0, amplify=True, **overrides):
    overrides.setdefault("latent_injection", "both")  # both paths, each amplified below
    model = tester.get_model(seed=seed, collapse_strategy=collapse_strategy, **overrides).eval()
    if amplify:  # a freshly initialised model barely uses z; make posteriors differ and the decoder depend on z
        with torch.no_grad():
            model.latent_head.proj.weight.mul_(10)
            model.injection.to_embedding.weight.mul_(10)
            model.injection.to_memory.weight.mul_(5)
            model.decoder.transformer.wte.weight.mul_(5)
            if collapse_strategy == "scale":  # prior_std != 1 exercises the decoder's prior and posterior
                model.collapse.scale_factors.copy_(torch.tensor([2.0, 0.5, 1.0, 1.5]))
    return model


def make_batch(sentences, extra_pad=0):
    """Right-padded batch: encoder sees the tokens; decoder input is BOS + tokens, labels are tokens + EOS."""
    length = max(len(s) for s in sentences) + 1 + extra_pad
    size = len(sentences)
    batch = dict(
        input_ids=torch.zeros(size, length, dtype=torch.long),
        attention_mask=torch.zeros(size, length, dtype=torch.long),
        decoder_input_ids=torch.zeros(size, length, dtype=torch.long),
        decoder_attention_mask=torch.zeros(size, length, dtype=torch.long),
        labels=torch.full((size, length), -100, dtype=torch.long),
    )
    for i, s in enumerate(sentences):
        n = len(s)
        batch["input_ids"][i, :n] = torch.tensor(s)
        batch["attention_mask"][i, :n] = 1
        batch["decoder_input_ids"][i, 0] = 1
        batch["decoder_input_ids"][i, 1 : n + 1] = torch.tensor(s)
        batch["decoder_attention_mask"][i, : n + 1] = 1
        batch["labels"][i, :n] = torch.tensor(s)
        batch["labels"][i, n] = 2
    return batch


def repeat_batch(batch, times):
    return {k: v.repeat_interleave(times, dim=0) for k, v in batch.items()}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny tensors on shared CPUs: intra-op threads only contend (a 0.2 s test then takes 10 s)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def model():
    return tiny_model()


@pytest.fixture(scope="module")
def batch():
    return make_batch(SENTENCES)


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


# ---------------------------------------------------------------------------------------------------------------------
# An exactly solvable model: p(z) = N(0, f²), p(x|z) = N(x; z, τ²), so p(x) = N(x; 0, f² + τ²)
# ---------------------------------------------------------------------------------------------------------------------


class LinearGaussianVAE(torch.nn.Module):
    """Quacks like ScaleVAEForLatentLM for the likelihood metrics. x (float, (B, d)) travels as input_ids (encoder)
    and decoder_input_ids (decoder). With `exact`, q'(z|x) is the true posterior; otherwise it is shifted and wider."""

    def __init__(self, f, tau=0.7, exact=True):
        super().__init__()
        self.register_buffer("f", f.double())
        self.tau, self.exact = tau, exact
        self.collapse = SimpleNamespace(stochastic=True)

    def posterior(self, x):
        var = (1 / (1 / self.f.pow(2) + 1 / self.tau**2)).expand_as(x)
        mean = var * x / self.tau**2
        if not self.exact:
            mean, var = mean + 0.4, var * 1.8
        return mean, var

    def encode(self, input_ids, attention_mask=None, prior=None):
        mean, var = self.posterior(input_ids)
        return ScaleVAEEncoderOutput(mu=mean / self.f, logvar=var.log(), decoder_mu=mean, prior_std=self.f)

    def prior_distribution(self, prior=None, dtype=None):
        return torch.distributions.Independent(torch.distributions.Normal(torch.zeros_like(self.f), self.f), 1)

    def log_likelihood(self, latents, decoder_input_ids, labels, decoder_attention_mask=None):
        return torch.distributions.Normal(latents, self.tau).log_prob(decoder_input_ids).sum(-1)

    def log_px(self, x):
        return torch.distributions.Normal(0.0, (self.f.pow(2) + self.tau**2).sqrt()).log_prob(x).sum(-1)

    def expected_elbo(self, x):
        """log p(x) − KL(q'(z|x) || p(z|x)), the expectation of both the ELBO and the k = 1 IW estimate."""
        true = LinearGaussianVAE(self.f, self.tau, exact=True)
        m_q, v_q = self.posterior(x)
        m_p, v_p = true.posterior(x)
        kl = 0.5 * (v_q / v_p + (m_q - m_p).pow(2) / v_p - 1 - (v_q / v_p).log()).sum(-1)
        return self.log_px(x) - kl


def gaussian_batch(x):
    ones = torch.ones(x.shape[0], 1, dtype=torch.long)
    return dict(input_ids=x, attention_mask=ones, decoder_input_ids=x, decoder_attention_mask=ones, labels=ones * 0)


F_TOY = torch.tensor([2.0, 0.5, 1.0])
X_TOY = torch.tensor([[0.3, -1.2, 2.0], [1.5, 0.1, -0.4]], dtype=torch.float64)


def test_iw_is_exact_with_the_true_posterior():
    # With q' the exact posterior every importance weight equals p(x): any k gives log p(x) to rounding.
    toy = LinearGaussianVAE(F_TOY, exact=True)
    estimate = metrics.iw_log_likelihood(toy, gaussian_batch(X_TOY), num_samples=7, chunk_size=3, generator=gen())
    torch.testing.assert_close(estimate, toy.log_px(X_TOY), rtol=0, atol=1e-9)


def test_iw_converges_to_log_px_with_a_wrong_posterior():
    toy = LinearGaussianVAE(F_TOY, exact=False)
    batch = gaussian_batch(X_TOY)
    estimate = metrics.iw_log_likelihood(toy, batch, num_samples=20000, chunk_size=5000, generator=gen())
    torch.testing.assert_close(estimate, toy.log_px(X_TOY), rtol=0, atol=0.03)
    assert (toy.log_px(X_TOY) - toy.expected_elbo(X_TOY) > 0.2).all()  # the bound's gap is real, so the check bites


def test_elbo_and_k1_iw_have_the_analytic_expectation():
    toy = LinearGaussianVAE(F_TOY, exact=False)
    reps = 4000
    big = gaussian_batch(X_TOY.repeat_interleave(reps, dim=0))
    expected = toy.expected_elbo(X_TOY)
    for values in (metrics.elbo(toy, big, generator=gen(1)), metrics.iw_log_likelihood(toy, big, 1, generator=gen(2))):
        values = values.view(len(X_TOY), reps)
        stderr = values.std(1) / math.sqrt(reps)
        assert ((values.mean(1) - expected).abs() < 4 * stderr + 1e-6).all(), (values.mean(1), expected)


# ---------------------------------------------------------------------------------------------------------------------
# Importance-weighted likelihood and ELBO on the tiny real model
# ---------------------------------------------------------------------------------------------------------------------


def test_iw_tightens_with_k_and_bounds_the_elbo(model, batch):
    big = repeat_batch(batch, 4)
    iw = {k: metrics.iw_log_likelihood(model, big, k, 50, generator=gen(0)).mean().item() for k in (1, 10, 100)}
    elbo = metrics.elbo(model, repeat_batch(batch, 50), generator=gen(0)).mean().item()
    tol = 0.5  # nats per sentence of Monte Carlo slack
    assert iw[10] >= iw[1] - tol and iw[100] >= iw[10] - tol, iw
    assert -iw[100] <= -elbo + tol, (iw, elbo)  # IW-NLL <= -ELBO
    assert iw[100] > elbo + 0.5, (iw, elbo)  # and the gap is not trivially zero for this model


def test_k1_iw_equals_elbo_in_expectation(model, batch):
    reps = 300
    big = repeat_batch(batch, reps)
    iw1 = metrics.iw_log_likelihood(model, big, 1, generator=gen(3)).view(len(SENTENCES), reps)
    elbo = metrics.elbo(model, big, generator=gen(4)).view(len(SENTENCES), reps)
    stderr = (iw1.var(1) / reps + elbo.var(1) / reps).sqrt()
    assert ((iw1.mean(1) - elbo.mean(1)).abs() < 4 * stderr).all(), (iw1.mean(1), elbo.mean(1), stderr)


def test_iw_batches_samples_into_few_decoder_calls(model, batch, monkeypatch):
    calls = []
    original = model.log_likelihood

    def counting(latents, decoder_input_ids, labels, decoder_attention_mask=None):
        calls.append(latents.shape[0])
        return original(latents, decoder_input_ids, labels, decoder_attention_mask)

    monkeypatch.setattr(model, "log_likelihood", counting)
    out = metrics.iw_log_likelihood(model, batch, num_samples=100, chunk_size=30, generator=gen())
    assert out.shape == (len(SENTENCES),)
    assert len(calls) == math.ceil(100 / 30)
    assert calls == [30 * len(SENTENCES)] * 3 + [10 * len(SENTENCES)]


def test_iw_is_reproducible_and_restores_training_mode(model, batch):
    model.train()
    try:
        a = metrics.iw_log_likelihood(model, batch, 20, generator=gen(7))
        assert model.training
        b = metrics.iw_log_likelihood(model, batch, 20, generator=gen(7))
    finally:
        model.eval()
    torch.testing.assert_close(a, b)
    assert not a.requires_grad


def test_ae_has_no_density(batch):
    ae = tiny_model("ae")
    with pytest.raises(ValueError, match="deterministic autoencoder"):
        metrics.iw_log_likelihood(ae, batch, 10)
    with pytest.raises(ValueError, match="deterministic autoencoder"):
        metrics.elbo(ae, batch)
    results = metrics.evaluate_model(ae, [batch], num_importance_samples=10, progress=False)
    assert math.isnan(results["nll"]) and math.isnan(results["ppl"]) and math.isnan(results["elbo"])
    assert math.isfinite(results["reconstruction_nll"]) and math.isfinite(results["mi"])


# ---------------------------------------------------------------------------------------------------------------------
# evaluate_model
# ---------------------------------------------------------------------------------------------------------------------

KEYS = {
    "nll",
    "ppl",
    "elbo",
    "reconstruction_nll",
    "kl",
    "decoder_kl",
    "mi",
    "mi_decoder",
    "au",
    "au_decoder",
    "token_accuracy",
    "shuffle_gap",
    "num_sentences",
    "num_tokens",
}


def test_evaluate_model_definitions(model, batch):
    loader = [batch, make_batch([[20, 21], [22, 23, 24, 25, 26]])]
    results = metrics.evaluate_model(
        model, loader, num_importance_samples=30, chunk_size=15, generator=gen(), progress=False
    )
    assert set(results) == KEYS
    n, t = results["num_sentences"], results["num_tokens"]
    assert n == 5 and t == (4 + 3 + 6 + 2 + 5) + 5  # each sentence's tokens plus its EOS; no BOS, no padding
    assert results["ppl"] == pytest.approx(math.exp(results["nll"] * n / t), rel=1e-12)
    assert -results["elbo"] >= results["nll"] - 1.0  # IW-NLL <= -ELBO up to Monte Carlo noise
    with torch.no_grad():
        posteriors = [model.encode(b["input_ids"], b["attention_mask"]) for b in loader]
        kl = sum(gaussian_kl(p.mu, p.logvar).sum() for p in posteriors) / n
        decoder_kl = sum(gaussian_kl(p.decoder_mu, p.logvar, p.prior_std).sum() for p in posteriors) / n
        recon = (
            -sum(
                model.log_likelihood(
                    p.decoder_mu, b["decoder_input_ids"], b["labels"], b["decoder_attention_mask"]
                ).sum()
                for p, b in zip(posteriors, loader)
            )
            / n
        )
        mu = torch.cat([p.mu for p in posteriors])
    assert results["kl"] == pytest.approx(float(kl), rel=1e-5)
    assert results["decoder_kl"] == pytest.approx(float(decoder_kl), rel=1e-5)
    assert results["kl"] != pytest.approx(results["decoder_kl"], rel=1e-3)  # f != 1: the two KLs differ
    assert results["reconstruction_nll"] == pytest.approx(float(recon), rel=1e-5)
    assert results["au"] == metrics.active_units(mu)
    assert 0.0 <= results["token_accuracy"] <= 1.0
    assert results["shuffle_gap"] != pytest.approx(0.0, abs=1e-3)  # this decoder's output depends on z


def test_padding_does_not_count(model, batch):
    plain = metrics.evaluate_model(model, [batch], num_importance_samples=20, generator=gen(5), progress=False)
    padded = metrics.evaluate_model(
        model, [make_batch(SENTENCES, extra_pad=7)], num_importance_samples=20, generator=gen(5), progress=False
    )
    assert padded["num_tokens"] == plain["num_tokens"] == sum(len(s) + 1 for s in SENTENCES)
    for key in ("nll", "ppl", "elbo", "reconstruction_nll", "kl", "token_accuracy"):
        assert padded[key] == pytest.approx(plain[key], rel=1e-4, abs=1e-4), key


def test_shuffle_gap_is_large_when_the_decoder_needs_z():
    # Sentences share a prefix and differ after it: a briefly trained autoencoder must read z to reconstruct them, so
    # decoding from another sentence's latent costs nats (and its teacher-forced accuracy is high).
    sentences = [[5, 6, 10 + 3 * i, 11 + 3 * i, 12 + 3 * i] for i in range(6)]
    train = make_batch(sentences)
    ae = tiny_model("ae", amplify=False)
    optimizer = torch.optim.Adam(ae.parameters(), lr=1e-2)
    ae.train()
    for _ in range(40):
        optimizer.zero_grad()
        ae(**train).loss.backward()
        optimizer.step()
    results = metrics.evaluate_model(ae, [train], generator=gen(), progress=False)
    assert results["token_accuracy"] > 0.9, results
    assert results["shuffle_gap"] > 1.0, results
    assert results["au"] >= 1


def test_shuffle_gap_is_zero_when_the_decoder_ignores_z(batch):
    blind = tiny_model()
    with torch.no_grad():
        for layer in (blind.injection.to_embedding, blind.injection.to_memory):
            layer.weight.zero_()
            layer.bias.zero_()
    results = metrics.evaluate_model(blind, [batch, batch], num_importance_samples=5, generator=gen(), progress=False)
    assert results["shuffle_gap"] == pytest.approx(0.0, abs=1e-5)


def test_max_batches_and_mode_restored(model, batch):
    model.train()
    try:
        results = metrics.evaluate_model(model, [batch] * 5, num_importance_samples=0, max_batches=2, progress=False)
        assert model.training
    finally:
        model.eval()
    assert results["num_sentences"] == 2 * len(SENTENCES)
    assert math.isnan(results["nll"]) and math.isfinite(results["elbo"])


# ---------------------------------------------------------------------------------------------------------------------
# Mutual information and active units: Gaussian toys with known answers
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("s, sigma", [(1.0, 1.0), (2.0, 1.0), (0.5, 0.3)])
def test_mi_matches_the_gaussian_closed_form(s, sigma):
    # mu ~ N(0, s²), q(z|x) = N(mu, σ²) per dim: q(z) = N(0, s² + σ²), I(x; z) = ½ d log(1 + s²/σ²).
    n, d = 2000, 4
    g = gen(11)
    mu = torch.randn(n, d, generator=g) * s
    logvar = torch.full((n, d), 2 * math.log(sigma))
    truth = 0.5 * d * math.log(1 + s**2 / sigma**2)
    assert metrics.mutual_information(mu, logvar, generator=g) == pytest.approx(truth, abs=0.1)


def test_mi_is_about_zero_when_posteriors_coincide():
    n, d = 4000, 2
    mu, logvar = torch.full((n, d), 0.3), torch.full((n, d), -1.0)
    mi = metrics.mutual_information(mu, logvar, generator=gen(2))
    assert -0.05 < mi < 0.05


def test_mi_uses_the_whole_set():
    # Two well-separated clusters of posteriors: z tells which half x is in, I = log 2 (one batch of a cluster: 0).
    mu = torch.cat([torch.full((500, 3), -10.0), torch.full((500, 3), 10.0)])
    assert metrics.mutual_information(mu, torch.zeros_like(mu), generator=gen()) == pytest.approx(math.log(2), abs=0.1)


def test_active_units_counts_dims_above_threshold():
    n = 1000
    signs = torch.tensor([1.0, -1.0]).repeat(n // 2)  # mean 0, unbiased variance a² n / (n - 1)
    mu = torch.stack([1.0 * signs, 0.12 * signs, 0.09 * signs, torch.full((n,), 5.0)], dim=1)
    variance = metrics.active_units_variance(mu)
    torch.testing.assert_close(variance, mu.double().var(0))
    assert metrics.active_units(mu) == 2  # variances 1.0, 0.0144 | 0.0081, 0
    assert metrics.active_units(mu, threshold=0.005) == 3


# ---------------------------------------------------------------------------------------------------------------------
# BLEU and the linear probe
# ---------------------------------------------------------------------------------------------------------------------


def test_bleu_identical_and_disjoint():
    refs = ["the cat sat on the mat today", "a quick brown fox jumps over the lazy dog"]
    assert metrics.reconstruction_bleu(refs, refs) == pytest.approx(100.0)
    assert metrics.reconstruction_bleu(refs, ["xx yy zz ww vv uu", "qq rr ss tt oo pp nn mm"]) < 1.0
    with pytest.raises(ValueError):
        metrics.reconstruction_bleu(refs, refs[:1])


def test_linear_probe_separable():
    g = gen(0)
    labels = torch.arange(200) % 2
    features = torch.randn(200, 5, generator=g) * 0.1
    features[:, 0] += labels * 4 - 2
    assert metrics.linear_probe_accuracy(features, labels) == 1.0
    with pytest.raises(ValueError):
        metrics.linear_probe_accuracy(features, torch.zeros(200))


def test_reconstruction_bleu_of(tokenizers, monkeypatch):
    encoder_tokenizer, decoder_tokenizer = tokenizers
    vae = tester.get_model_for_tokenizers(encoder_tokenizer, decoder_tokenizer).eval()
    for name in ("bos_token_id", "eos_token_id", "pad_token_id"):  # the ids reach generation from the tokenizer
        assert (
            getattr(vae.config.decoder, name)
            == getattr(vae.generation_config, name)
            == getattr(decoder_tokenizer, name)
        )
    texts = ["The Cat sat on the mat.", "A quick brown fox jumps over the lazy dog!", "Hello World, again"]

    # Real greedy generation: a finite score.
    score = metrics.reconstruction_bleu_of(
        vae, texts, encoder_tokenizer, decoder_tokenizer, max_length=8, batch_size=2
    )
    assert 0.0 <= score <= 100.0

    # A perfect decoder (it returns BOS + the text's ids + EOS + padding) scores 100 against the detokenised reference,
    # though the raw text (casing) differs from what an uncased tokenizer gives back.
    queue = [decoder_tokenizer(t, add_special_tokens=False).input_ids for t in texts]

    def perfect_generate(latents, max_new_tokens, do_sample):
        rows = [
            [decoder_tokenizer.bos_token_id] + queue.pop(0) + [decoder_tokenizer.eos_token_id]
            for _ in range(latents.shape[0])
        ]
        width = max(map(len, rows))
        return torch.tensor([r + [decoder_tokenizer.pad_token_id] * (width - len(r)) for r in rows])

    monkeypatch.setattr(vae, "generate", perfect_generate)
    score = metrics.reconstruction_bleu_of(vae, texts, encoder_tokenizer, decoder_tokenizer, batch_size=2)
    assert score == pytest.approx(100.0)
    assert not queue


# ---------------------------------------------------------------------------------------------------------------------
# The generative prior: KL, ELBO and IW-NLL with a shifted prior and factors != 1, against exact values
# ---------------------------------------------------------------------------------------------------------------------

F_SHIFT = torch.tensor([2.0, 0.5, 1.5], dtype=torch.float64)  # scale factors: decoder_mu = f * mu


PRIOR_MEAN = torch.tensor([0.8, -1.1, 0.3], dtype=torch.float64)


PRIOR_STD = torch.tensor([1.6, 0.6, 1.1], dtype=torch.float64)


X_SHIFT = torch.tensor([[0.3, -1.2, 2.0], [1.5, 0.1, -0.4]], dtype=torch.float64)


class ShiftedLinearGaussian(torch.nn.Module):
    """p(z) = N(m, s²), p(x|z) = N(x; z, τ²), so p(x) = N(x; m, s² + τ²). The decoder's posterior is exact, or shifted
    and wider; the encoder's mean is decoder_mu / f. With `flat`, log p(x|z) does not depend on z, so the single-sample
    ELBO is exactly that constant minus the analytic KL."""

    def __init__(self, tau=0.7, exact=True, flat=False):
        super().__init__()
        self.tau, self.exact, self.flat = tau, exact, flat
        self.collapse = SimpleNamespace(stochastic=True)

    def posterior(self, x):
        var = 1 / (1 / PRIOR_STD**2 + 1 / self.tau**2)
        mean = var * (x / self.tau**2 + PRIOR_MEAN / PRIOR_STD**2)
        return (mean + 0.4, var.expand_as(x) * 1.8) if not self.exact else (mean, var.expand_as(x))

    def encode(self, input_ids, attention_mask=None, prior=None):
        mean, var = self.posterior(input_ids)
        return ScaleVAEEncoderOutput(
            mu=mean / F_SHIFT, logvar=var.log(), decoder_mu=mean, prior_mean=PRIOR_MEAN, prior_std=PRIOR_STD
        )

    def prior_distribution(self, prior=None, dtype=None):
        return torch.distributions.Independent(torch.distributions.Normal(PRIOR_MEAN, PRIOR_STD), 1)

    def log_likelihood(self, latents, decoder_input_ids, labels, decoder_attention_mask=None):
        if self.flat:
            return -(decoder_input_ids**2).sum(-1)
        return torch.distributions.Normal(latents, self.tau).log_prob(decoder_input_ids).sum(-1)

    def log_px(self, x):
        return torch.distributions.Normal(PRIOR_MEAN, (PRIOR_STD**2 + self.tau**2).sqrt()).log_prob(x).sum(-1)


def shifted_batch(x):
    ones = torch.ones(x.shape[0], 1, dtype=torch.long)
    return dict(input_ids=x, attention_mask=ones, decoder_input_ids=x, decoder_attention_mask=ones, labels=ones * 0)


def exact_kl(mean, var):
    """KL(N(mean, var) || N(PRIOR_MEAN, PRIOR_STD²)) summed over dimensions, by torch.distributions."""
    q, p = torch.distributions.Normal(mean, var.sqrt()), torch.distributions.Normal(PRIOR_MEAN, PRIOR_STD)
    return torch.distributions.kl_divergence(q, p).sum(-1)


def test_iw_nll_is_exact_under_a_shifted_prior():
    toy = ShiftedLinearGaussian(exact=True)
    estimate = metrics.iw_log_likelihood(
        toy, shifted_batch(X_SHIFT), num_samples=7, chunk_size=3, generator=torch.Generator().manual_seed(0)
    )
    torch.testing.assert_close(estimate, toy.log_px(X_SHIFT), rtol=0, atol=1e-9)


def test_iw_nll_converges_under_a_shifted_prior_with_a_wrong_posterior():
    toy = ShiftedLinearGaussian(exact=False)
    estimate = metrics.iw_log_likelihood(
        toy, shifted_batch(X_SHIFT), 20000, chunk_size=5000, generator=torch.Generator().manual_seed(1)
    )
    torch.testing.assert_close(estimate, toy.log_px(X_SHIFT), rtol=0, atol=0.03)


def test_elbo_uses_the_decoder_posterior_against_the_shifted_prior_exactly():
    toy = ShiftedLinearGaussian(exact=False, flat=True)
    mean, var = toy.posterior(X_SHIFT)
    expected = -(X_SHIFT**2).sum(-1) - exact_kl(mean, var)
    torch.testing.assert_close(
        metrics.elbo(toy, shifted_batch(X_SHIFT), generator=torch.Generator().manual_seed(2)),
        expected,
        rtol=0,
        atol=1e-12,
    )
    # the KL of the encoder's mean (mu = decoder_mu / f) or against a zero-mean prior would differ by nats
    assert (exact_kl(mean / F_SHIFT, var) - exact_kl(mean, var)).abs().min() > 0.1
    zero_mean = torch.distributions.kl_divergence(
        torch.distributions.Normal(mean, var.sqrt()), torch.distributions.Normal(0 * PRIOR_MEAN, PRIOR_STD)
    ).sum(-1)
    assert (zero_mean - exact_kl(mean, var)).abs().min() > 0.1


def test_evaluate_model_decoder_kl_with_factors_and_a_fitted_shifted_prior():
    model = ScaleVAEModelTester().get_model(dropout=0.0, prior="fitted").eval()  # the suite's default sizes
    with torch.no_grad():
        model.collapse.scale_factors.copy_(torch.tensor([2.0, 0.5, 1.0, 1.5]))
        model.fitted_prior.loc.copy_(torch.tensor([0.3, -0.2, 0.5, 0.1]))
        model.fitted_prior.scale.copy_(torch.tensor([1.5, 0.7, 1.2, 0.9]))
    batch = tester.prepare_inputs(batch_size=4, seed=4)
    results = metrics.evaluate_model(
        model, [batch], num_importance_samples=0, generator=torch.Generator().manual_seed(0), progress=False
    )
    with torch.no_grad():
        posterior = model.encode(batch["input_ids"], batch["attention_mask"])
    q = torch.distributions.Normal(
        (posterior.mu * model.collapse.scale_factors).double(), (0.5 * posterior.logvar).exp().double()
    )
    p = torch.distributions.Normal(model.fitted_prior.loc.double(), model.fitted_prior.scale.double())
    expected = torch.distributions.kl_divergence(q, p).sum(-1).mean().item()
    assert results["decoder_kl"] == pytest.approx(expected, rel=1e-6)
