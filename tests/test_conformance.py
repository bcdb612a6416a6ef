"""The model behaves as transformers users expect (issue 21): embeddings that resize with a tokenizer, gradient
checkpointing on every latent injection, buffers initialised from the meta device, an attention implementation per
part, `torch.export` with a dynamic batch, `use_cache` in the config, generation by the encoder-decoder convention the
config declares, a strict loader that says how to load anyway, repeatable eval outputs, and hidden states/attentions.

Tiny models from tests/model_tester.py; real text (the default corpus, MiniLM's tokenizer) wherever tokens matter."""

import copy
import os

import pytest
import torch
from transformers import Trainer, TrainingArguments

from configuration_scalevae import FORMAT_1_FIELDS, FORMAT_2_FIELDS, ScaleVAEConfig
from modeling_scalevae import ScaleVAEForLatentLM
from tests.model_tester import every_injection, tester

PREVIOUS_RELEASE = os.path.join(os.path.dirname(__file__), "fixtures", "scalevae-0.1.0", "scale")


@pytest.fixture(scope="module")
def setup(tiny_encoder_path):
    """A model built on the tiny encoder folder with MiniLM's tokenizers, and the default corpus tokenized."""
    return tester.get_trainer_setup(tiny_encoder_path, sentences=32)


def real_batch(setup, size=4, split="validation"):
    return setup.collator([setup.data[split][i] for i in range(size)])


def eval_model(setup):
    return copy.deepcopy(setup.model).eval()


# -- 1. embeddings ----------------------------------------------------------------------------------------------------


def test_resize_token_embeddings_follows_a_decoder_tokenizer_that_gained_tokens(setup, tmp_path):
    encoder_tokenizer, decoder_tokenizer = tester.get_tokenizers()  # fresh: this test adds tokens
    model = copy.deepcopy(setup.model)
    old_rows = model.get_input_embeddings().weight.detach().clone()
    decoder_tokenizer.add_tokens(["<scalevae-topic>"])
    model.resize_token_embeddings(len(decoder_tokenizer))

    assert model.config.decoder.vocab_size == len(decoder_tokenizer) == old_rows.shape[0] + 1
    embedding, head = model.get_input_embeddings(), model.get_output_embeddings()
    assert embedding is model.decoder.transformer.wte and embedding.weight.shape[0] == len(decoder_tokenizer)
    assert head.weight.data_ptr() == embedding.weight.data_ptr()  # the tied LM head followed
    assert torch.equal(embedding.weight[:-1], old_rows)

    text = "<scalevae-topic> the function returns a list"
    new_id = decoder_tokenizer.convert_tokens_to_ids("<scalevae-topic>")
    labels = decoder_tokenizer(text, add_special_tokens=False, return_tensors="pt").input_ids
    assert new_id in labels[0].tolist()
    encoded = encoder_tokenizer(text, return_tensors="pt", return_token_type_ids=False)
    out = model.eval()(**encoded, labels=labels)
    assert torch.isfinite(out.loss) and out.logits.shape[-1] == len(decoder_tokenizer)

    # The encoder has its own tokenizer and resizes through its own part, its config following likewise.
    encoder_tokenizer.add_tokens(["<scalevae-topic>"])
    model.encoder.resize_token_embeddings(len(encoder_tokenizer))
    assert model.config.encoder.vocab_size == len(encoder_tokenizer)
    encoded = encoder_tokenizer(text, return_tensors="pt", return_token_type_ids=False)
    assert encoded.input_ids.max() == len(encoder_tokenizer) - 1
    out = model(**encoded, labels=labels)
    assert torch.isfinite(out.loss)

    model.save_pretrained(tmp_path)  # the strict loader accepts the resized model's own folder
    loaded = ScaleVAEForLatentLM.from_pretrained(tmp_path).eval()
    assert torch.equal(loaded(**encoded, labels=labels).logits, out.logits)


# -- 2. gradient checkpointing ----------------------------------------------------------------------------------------


@every_injection
def test_gradient_checkpointing_gives_the_same_training_step(injection):
    """The memory slot ("memory", the default, and "both") carries z: under checkpointing it reaches every decoder block
    through a cache that is never written, so the backward replay sees the same keys. Dropout included (the replay
    restores the random state), the gradients and the step are those of the plain model."""
    plain = tester.get_model(latent_injection=injection).train()
    checkpointed = copy.deepcopy(plain)
    checkpointed.activation_checkpointing_enable()
    assert checkpointed.is_gradient_checkpointing and not plain.is_gradient_checkpointing
    results = []
    for model in (plain, checkpointed):
        torch.manual_seed(3)
        losses, _ = tester.train_steps(model, steps=2)
        grads = {name: p.grad for name, p in model.named_parameters() if p.grad is not None}
        results.append((losses, grads, model.state_dict()))
    (plain_losses, plain_grads, plain_state), (losses, grads, state) = results
    assert losses == pytest.approx(plain_losses, rel=1e-6)
    assert grads.keys() == plain_grads.keys()
    for name, grad in plain_grads.items():
        assert torch.allclose(grads[name], grad, rtol=1e-5, atol=1e-7), name
    for name, tensor in plain_state.items():
        assert torch.allclose(state[name].double(), tensor.double(), rtol=1e-5, atol=1e-7), name


def test_reentrant_checkpointing_with_a_memory_slot_is_refused_with_the_fix():
    model = tester.get_model(latent_injection="both").train()
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": True})
    with pytest.raises(ValueError, match="use_reentrant=False"):
        model(**tester.prepare_inputs())


# -- 3. buffers initialised from the meta device ----------------------------------------------------------------------


@pytest.mark.parametrize("strategy", ["scale", "bn"])
def test_a_model_built_on_the_meta_device_initialises_every_buffer(strategy):
    config = tester.get_config(collapse_strategy=strategy)
    fresh = ScaleVAEForLatentLM(config)
    with torch.device("meta"):
        model = ScaleVAEForLatentLM(config)
    model.to_empty(device="cpu")
    with torch.no_grad():  # what uninitialised memory may hold
        for tensor in [*model.parameters(), *model.buffers()]:
            tensor.fill_(True if tensor.dtype == torch.bool else 7)
    model.init_weights()
    for name, buffer in fresh.named_buffers():
        assert torch.equal(model.get_buffer(name), buffer), name
    assert all(torch.isfinite(p).all() and not (p == 7).all() for p in model.parameters())
    model.collapse.end_step()
    model.collapse.end_epoch()
    if strategy == "scale":  # the schedule counts from a fresh model's zero
        assert int(model.collapse.steps) == model.collapse._steps == 1 and not model.collapse._frozen


def test_a_loaded_scale_vae_keeps_its_frozen_factors(tmp_path):
    """The schedule's Python mirrors are re-read from the loaded buffers: a folder saved with frozen factors trains on
    with them frozen (before, `from_pretrained` left the mirrors at a fresh model's zero and the factors moved)."""
    model = tester.get_model(scale_freeze_steps=2)
    tester.train_steps(model, steps=1)
    model.collapse.end_step()
    model.collapse.end_step()
    assert bool(model.collapse.frozen)
    model.save_pretrained(tmp_path)
    loaded = ScaleVAEForLatentLM.from_pretrained(tmp_path)
    frozen = loaded.collapse.scale_factors.clone()
    tester.train_steps(loaded, steps=2)
    assert torch.equal(loaded.collapse.scale_factors, frozen)
    assert int(loaded.collapse.steps) == 2 and loaded.collapse._steps == 2


# -- 4. attention implementation per part -----------------------------------------------------------------------------


def test_an_attention_implementation_chosen_for_one_part_is_kept(tmp_path):
    config = tester.get_config()
    config.decoder._attn_implementation = "eager"
    model = ScaleVAEForLatentLM(config)
    assert model.decoder.config._attn_implementation == "eager"
    assert model.encoder.config._attn_implementation == "sdpa"  # the composite's default reaches the other part

    by_dict = ScaleVAEForLatentLM(tester.get_config(attn_implementation={"encoder": "eager"}))
    assert by_dict.encoder.config._attn_implementation == "eager"
    assert by_dict.decoder.config._attn_implementation == "sdpa"

    tester.get_model().save_pretrained(tmp_path)
    loaded = ScaleVAEForLatentLM.from_pretrained(tmp_path, attn_implementation={"decoder": "eager"})
    assert loaded.decoder.config._attn_implementation == "eager"
    assert (
        ScaleVAEForLatentLM.from_pretrained(tmp_path, attn_implementation="eager").encoder.config._attn_implementation
        == "eager"
    )


# -- 5. torch.export with a dynamic batch -----------------------------------------------------------------------------


def test_export_with_a_dynamic_batch_runs_other_batch_sizes(setup):
    from torch.export import Dim, export

    model = eval_model(setup)
    names = ("input_ids", "attention_mask", "decoder_input_ids", "decoder_attention_mask")
    batch = Dim("batch", min=2, max=64)
    example = real_batch(setup, 4)
    program = export(
        model,
        (),
        kwargs={**{name: example[name] for name in names}, "use_cache": False},
        dynamic_shapes={**{name: {0: batch} for name in names}, "use_cache": None},
        strict=False,
    )
    for size in (3, 8):
        inputs = {name: real_batch(setup, size)[name] for name in names}
        exported, eager = program.module()(**inputs, use_cache=False), model(**inputs, use_cache=False)
        assert exported.logits.shape[0] == size
        assert torch.allclose(exported.logits, eager.logits, atol=1e-5)
    bad = {**inputs, "decoder_input_ids": inputs["decoder_input_ids"][:2]}
    with pytest.raises(ValueError, match="disagree on the batch size"):  # eager still names the inputs
        model(**bad)


# -- 6. use_cache in the config ---------------------------------------------------------------------------------------


def test_use_cache_is_a_config_field_that_forward_follows(setup):
    model = eval_model(setup)
    batch = real_batch(setup)
    assert model.config.use_cache is True
    out = model(**batch)
    assert out.cache is not None and out.cache.get_seq_length() == 1 + batch["decoder_input_ids"].shape[1]
    assert model(**batch, use_cache=False).cache is None
    model.config.use_cache = False
    assert model(**batch).cache is None and model(**batch, use_cache=True).cache is not None
    # The returned cache continues decoding: the next token's logits are those of the full teacher-forced pass.
    ids, mask = batch["decoder_input_ids"][:1, :5], batch["decoder_attention_mask"][:1, :5]
    assert mask.all()
    head = model(latents=out.latents[:1], decoder_input_ids=ids[:, :4], use_cache=True)
    step = model(latents=out.latents[:1], decoder_input_ids=ids[:, 4:], cache=head.cache, use_cache=True)
    full = model(latents=out.latents[:1], decoder_input_ids=ids)
    assert torch.allclose(step.logits[:, -1], full.logits[:, -1], atol=1e-5)


def test_use_cache_keeps_the_format_and_older_folders_load():
    assert "use_cache" not in FORMAT_1_FIELDS + FORMAT_2_FIELDS  # no format bump: not a required field
    assert ScaleVAEConfig.from_pretrained(PREVIOUS_RELEASE).use_cache is True
    assert ScaleVAEConfig.from_dict({**tester.get_config().to_dict(), "use_cache": False}).use_cache is False


# -- 7. generation by the encoder-decoder convention ------------------------------------------------------------------


def test_the_config_declares_an_encoder_decoder_model():
    assert tester.get_config().is_encoder_decoder
    assert ScaleVAEConfig(is_encoder_decoder=False).is_encoder_decoder  # a property of the architecture
    assert ScaleVAEConfig.from_pretrained(PREVIOUS_RELEASE).is_encoder_decoder  # older folders too


def test_generate_takes_encoder_ids_and_returns_decoder_ids(setup):
    model = eval_model(setup)
    batch = real_batch(setup)
    bos = model.config.decoder.bos_token_id
    kwargs = dict(max_new_tokens=4, min_new_tokens=4, do_sample=False)
    from_text = model.generate(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], **kwargs)
    assert from_text.shape == (4, 1 + 4) and (from_text[:, 0] == bos).all()  # start token, then the new tokens
    mode = model.encode(batch["input_ids"], batch["attention_mask"]).decoder_mu
    assert torch.equal(from_text, model.generate(latents=mode, **kwargs))
    assert torch.equal(from_text, model.generate(batch["input_ids"], attention_mask=batch["attention_mask"], **kwargs))
    with pytest.raises(ValueError, match="latents=z"):
        model.generate(mode, **kwargs)  # a z passed where transformers puts the encoder's ids

    prompt = batch["decoder_input_ids"][:, :3]
    assert (prompt[:, 0] == bos).all()
    prompted = model.generate(
        batch["input_ids"], attention_mask=batch["attention_mask"], decoder_input_ids=prompt, **kwargs
    )
    assert prompted.shape == (4, 3 + 4) and torch.equal(prompted[:, :3], prompt)
    without_bos = model.generate(latents=mode, decoder_input_ids=prompt[:, 1:], **kwargs)
    assert torch.equal(without_bos, prompted)  # the start token is prepended, as for every encoder-decoder model

    seeded = [
        model.generate(
            batch["input_ids"],
            attention_mask=batch["attention_mask"],
            sample_posterior=True,
            generator=torch.Generator().manual_seed(1),
            output_logits=True,
            return_dict_in_generate=True,
            **kwargs,
        )
        for _ in range(2)
    ]
    assert torch.equal(seeded[0].logits[0], seeded[1].logits[0])
    greedy = model.generate(latents=mode, output_logits=True, return_dict_in_generate=True, **kwargs)
    assert not torch.allclose(seeded[0].logits[0], greedy.logits[0])  # a draw, not the mode


def test_prepare_inputs_for_generation_passes_extra_arguments_through():
    model = tester.get_model().eval()
    z = torch.randn(2, 4)
    ids = torch.ones(2, 3, dtype=torch.long)
    inputs = model.prepare_inputs_for_generation(ids, latents=z, kl_weight=0.5, use_cache=True)
    assert torch.equal(inputs["decoder_input_ids"], ids) and "input_ids" not in inputs
    assert inputs["latents"] is z and inputs["kl_weight"] == 0.5 and inputs["use_cache"] is True
    out = model(**inputs)
    assert out.logits.shape == (2, 3, model.config.decoder.vocab_size)


# -- 8. strict loading says how to load anyway ------------------------------------------------------------------------


def test_a_folder_lacking_weights_is_refused_with_the_way_to_load_it_anyway(tmp_path):
    from safetensors.torch import load_file, save_file

    model = tester.get_model()
    model.save_pretrained(tmp_path)
    weights = tmp_path / "model.safetensors"
    tensors = load_file(weights)
    del tensors["injection.to_memory.weight"]
    save_file(tensors, weights, metadata={"format": "pt"})  # a file written by other tools: no checksum

    with pytest.raises(ValueError, match=r"(?s)lacks.*To load it anyway, pass strict=False") as error:
        ScaleVAEForLatentLM.from_pretrained(tmp_path)
    assert "injection.to_memory.weight" in str(error.value)

    loaded, info = ScaleVAEForLatentLM.from_pretrained(tmp_path, strict=False, output_loading_info=True)
    assert info["missing_keys"] == {"injection.to_memory.weight"}
    new = loaded.injection.to_memory.weight
    assert torch.isfinite(new).all() and not torch.equal(new, model.injection.to_memory.weight)
    assert new.std().item() == pytest.approx(model.config.decoder.initializer_range, rel=0.2)  # `_init_weights`'
    for name, tensor in loaded.state_dict().items():
        if name != "injection.to_memory.weight":
            assert torch.equal(tensor, model.state_dict()[name]), name


# -- eval determinism -------------------------------------------------------------------------------------------------


def test_eval_outputs_are_repeatable_and_sampling_is_asked_for(setup, tmp_path):
    model = eval_model(setup)
    batch = real_batch(setup)
    first, second = model(**batch), model(**batch)
    assert torch.equal(first.logits, second.logits) and torch.equal(first.loss, second.loss)
    assert torch.equal(first.latents, first.decoder_mu)  # the posterior's mode

    sampled = [model(**batch, sample_posterior=True, generator=torch.Generator().manual_seed(5)) for _ in range(2)]
    assert torch.equal(sampled[0].latents, sampled[1].latents)
    assert not torch.allclose(sampled[0].latents, first.latents)
    noise = torch.randn(first.latents.shape, generator=torch.Generator().manual_seed(5))
    assert torch.allclose(sampled[0].latents, first.decoder_mu + noise * (0.5 * first.logvar).exp())

    model.save_pretrained(tmp_path)  # round trip: the same outputs without passing z
    assert torch.equal(ScaleVAEForLatentLM.from_pretrained(tmp_path).eval()(**batch).logits, first.logits)

    trained = model.train()(**batch)
    assert not torch.allclose(trained.latents, trained.decoder_mu)  # training samples by default


def test_a_deterministic_autoencoder_never_samples():
    model = tester.get_model(collapse_strategy="ae").train()
    out = model(**tester.prepare_inputs(), sample_posterior=True)
    assert torch.equal(out.latents, out.decoder_mu)


def test_evaluation_call_sites_still_sample_where_they_estimate_the_elbo(setup, tmp_path):
    """`latent_statistics` (the latent monitor) and the Trainer's `eval_loss` estimate the training objective from one
    sampled z: they ask for it; a plain Trainer evaluates at the mode, repeatably."""
    from scalevae.training import latent_statistics, make_trainer

    args = TrainingArguments(
        str(tmp_path), per_device_eval_batch_size=16, report_to=[], use_cpu=True, disable_tqdm=True
    )
    model = eval_model(setup)
    batches = [real_batch(setup, 8)]
    torch.manual_seed(4)
    stats = latent_statistics(model, batches)
    torch.manual_seed(4)
    sampled = model(**batches[0], sample_posterior=True)
    assert stats["reconstruction_loss"] == pytest.approx(sampled.reconstruction_loss.item(), rel=1e-6)
    assert stats["reconstruction_loss"] != pytest.approx(model(**batches[0]).reconstruction_loss.item(), rel=1e-6)

    def eval_losses(trainer):
        losses = []
        for seed in (0, 1):
            torch.manual_seed(seed)
            losses.append(trainer.evaluate()["eval_loss"])
        return losses

    data = {split: setup.data[split] for split in ("train", "validation")}
    made = make_trainer(model, args, data["train"], setup.collator, eval_dataset=data["validation"])
    plain = Trainer(model=model, args=args, eval_dataset=data["validation"], data_collator=setup.collator)
    sampled_losses, mode_losses = eval_losses(made), eval_losses(plain)
    assert sampled_losses[0] != sampled_losses[1]
    assert mode_losses[0] == mode_losses[1]


# -- hidden states and attentions -------------------------------------------------------------------------------------


@pytest.mark.parametrize("injection", ["both", "embedding"])
def test_hidden_states_and_attentions_of_both_parts(injection):
    config = tester.get_config(latent_injection=injection, attn_implementation="eager", dropout=0.0)
    model = ScaleVAEForLatentLM(config).eval()
    batch = tester.prepare_inputs()
    out = model(**batch, output_hidden_states=True, output_attentions=True)
    size, length = batch["decoder_input_ids"].shape
    slot = int(injection == "both")
    assert len(out.decoder_hidden_states) == config.decoder.n_layer + 1
    assert all(h.shape == (size, length, config.decoder.n_embd) for h in out.decoder_hidden_states)
    assert len(out.decoder_attentions) == config.decoder.n_layer
    for attention in out.decoder_attentions:
        assert attention.shape == (size, config.decoder.n_head, length, slot + length)
        assert torch.allclose(attention.sum(-1), torch.ones(()), atol=1e-5)
        assert (attention[..., slot:].triu(diagonal=1) == 0).all()  # causal over the tokens
        if slot:  # and every token sees the latent's slot, whatever its position
            assert (attention[..., 0] > 0).all()
    encoder_length = batch["input_ids"].shape[1]
    assert len(out.encoder_hidden_states) == config.encoder.num_hidden_layers + 1
    assert out.encoder_attentions[0].shape == (
        size,
        config.encoder.num_attention_heads,
        encoder_length,
        encoder_length,
    )
    assert torch.equal(out.logits, model(**batch).logits)  # asking for them changes nothing else
    given_z = model(**batch, latents=out.latents, output_hidden_states=True)
    assert given_z.encoder_hidden_states is None and given_z.decoder_hidden_states is not None

    generated = model.generate(
        latents=out.latents,
        max_new_tokens=3,
        output_attentions=True,
        output_hidden_states=True,
        return_dict_in_generate=True,
    )
    assert len(generated.decoder_attentions) == 3 and len(generated.decoder_hidden_states) == 3


# -- generation (issue 28): from a returned cache, assisted decoding, the encoder's outputs ----------------------------------


@pytest.fixture(scope="module")
def generation_models():
    return {
        injection: tester.get_model(dropout=0.0, latent_injection=injection).eval()
        for injection in ("memory", "embedding", "both")
    }


NO_EOS = dict(eos_token_id=-1, pad_token_id=0, do_sample=False, return_dict_in_generate=True, output_logits=True)


@pytest.mark.parametrize("injection", ["memory", "embedding", "both"])
def test_generation_continued_from_a_returned_cache_equals_teacher_forcing(generation_models, injection):
    model = generation_models[injection]
    batch = tester.prepare_inputs()
    encoder = dict(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    first = model.generate(**encoder, max_new_tokens=3, **NO_EOS)
    assert first.cache is not None
    more = model.generate(**encoder, decoder_input_ids=first.sequences, cache=first.cache, max_new_tokens=3, **NO_EOS)
    teacher_forced = model(**encoder, decoder_input_ids=more.sequences[:, :-1]).logits
    start = first.sequences.shape[1] - 1
    for step, logits in enumerate(more.logits):
        torch.testing.assert_close(logits, teacher_forced[:, start + step], atol=1e-4, rtol=0)
    uncached = model.generate(**encoder, decoder_input_ids=first.sequences, max_new_tokens=3, **NO_EOS)
    assert torch.equal(more.sequences, uncached.sequences)


def test_a_cache_longer_than_the_decoder_inputs_is_named(generation_models):
    model = generation_models["both"]
    batch = tester.prepare_inputs()
    first = model.generate(input_ids=batch["input_ids"], max_new_tokens=3, **NO_EOS)
    with pytest.raises(ValueError, match=r"The cache holds 3 decoder positions but decoder_input_ids has 1"):
        model.generate(input_ids=batch["input_ids"], cache=first.cache, max_new_tokens=2, **NO_EOS)


@pytest.mark.parametrize(
    "assisted",
    [
        lambda model: dict(assistant_model=model),
        lambda model: dict(prompt_lookup_num_tokens=2),
        lambda model: dict(assistant_early_exit=1),
    ],
)
def test_assisted_decoding_is_refused_with_the_reason(generation_models, assisted):
    model = generation_models["both"]
    batch = tester.prepare_inputs()
    with pytest.raises(
        ValueError, match=r"assisted decoding is not supported by Scale-VAE\. Each sentence is decoded"
    ):
        model.generate(input_ids=batch["input_ids"], max_new_tokens=2, **assisted(model))


def test_generate_returns_the_encoders_attentions_and_hidden_states():
    model = tester.get_model(dropout=0.0).eval()
    model.set_attn_implementation("eager")  # SDPA computes no attention weights to return (transformers warns)
    batch = tester.prepare_inputs()
    out = model.generate(
        input_ids=batch["input_ids"],
        attention_mask=batch["attention_mask"],
        max_new_tokens=2,
        output_attentions=True,
        output_hidden_states=True,
        **NO_EOS,
    )
    reference = model.encoder(
        input_ids=batch["input_ids"],
        attention_mask=batch["attention_mask"],
        output_attentions=True,
        output_hidden_states=True,
    )
    assert len(out.encoder_attentions) == tester.encoder_layers
    assert len(out.encoder_hidden_states) == tester.encoder_layers + 1
    for got, expected in zip(
        out.encoder_attentions + out.encoder_hidden_states, reference.attentions + reference.hidden_states
    ):
        torch.testing.assert_close(got, expected)
    assert out.decoder_attentions is not None and out.decoder_hidden_states is not None
