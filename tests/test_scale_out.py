"""Past one eager CPU process (issue 18): `torch.compile` of the training step and of latent generation, the static
key/value cache, and FSDP / DeepSpeed runs that match one process.

The compiled runs use inductor's `fallback_random`, so compiled and eager code draw the same random numbers (the
posterior's noise): the losses are then equal to float rounding, not merely close in distribution.
"""

import pytest
import torch
import torch._dynamo
import torch._inductor.config
from transformers import TrainingArguments
from transformers.generation.configuration_utils import CompileConfig

from scalevae.data import DataCollatorForLatentLM
from scalevae.training import make_trainer
from tests.model_tester import ALL_INJECTIONS, tester


def compiled_graphs() -> int:
    return torch._dynamo.utils.counters["stats"]["unique_graphs"]


def separated_logits(model):
    """Greedy decoding compares argmaxes: scaling the tied output embedding keeps two tokens' logits far apart, so
    compiled and eager kernels (which round differently) pick the same token."""
    with torch.no_grad():
        model.decoder.lm_head.weight.mul_(20)
    return model


def test_compiled_training_step_matches_eager_without_recompiling():
    """A hand-written loop over `torch.compile(model, fullgraph=True)` (a graph break raises) gives the eager losses and
    scale factors; the step compiles once, plus once more when β first changes (dynamo then makes the float
    dynamic), however many steps follow (it used to recompile every step on Scale-VAE's Python step counters)."""

    def run(compiled):
        model = tester.get_model(dropout=0.0).train()
        forward = torch.compile(model, fullgraph=True) if compiled else model
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
        torch.manual_seed(123)
        losses = []
        for step in range(5):
            out = forward(**tester.prepare_inputs(batch_size=8, seed=step), kl_weight=0.2 * (step + 1))
            optimizer.zero_grad()
            out.loss.backward()
            optimizer.step()
            model.collapse.end_step()
            losses.append(out.loss.item())
        return losses, model

    eager_losses, eager = run(compiled=False)
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    with torch._inductor.config.patch(fallback_random=True):
        compiled_losses, compiled = run(compiled=True)
    assert compiled_losses == pytest.approx(eager_losses, rel=1e-5)
    assert torch.allclose(compiled.collapse.scale_factors, eager.collapse.scale_factors, rtol=1e-5)
    assert compiled_graphs() <= 2


def test_compiled_step_of_a_loaded_frozen_model_keeps_its_factors(tmp_path):
    """The step reads the schedule's Python mirrors, which loading leaves stale; `train()` re-reads them eagerly, so a
    compiled step (which cannot read a buffer without breaking its graph) sees a loaded model's frozen factors."""
    from modeling_scalevae import ScaleVAEForLatentLM

    model = tester.get_model(dropout=0.0, scale_freeze_steps=1)
    tester.train_steps(model, steps=1)
    model.collapse.end_step()
    assert model.collapse._frozen
    model.save_pretrained(tmp_path)
    loaded = ScaleVAEForLatentLM.from_pretrained(tmp_path).train()
    saved, batches = loaded.collapse.scale_factors.clone(), loaded.collapse.epoch_batches.item()
    torch._dynamo.reset()
    torch.compile(loaded, fullgraph=True)(**tester.prepare_inputs(batch_size=8, seed=5)).loss.backward()
    assert torch.equal(loaded.collapse.scale_factors, saved) and loaded.collapse.epoch_batches.item() == batches


def test_trainer_torch_compile_matches_eager(tmp_path, tiny_encoder_path):
    """`TrainingArguments(torch_compile=True)` through `make_trainer` (callbacks, prior fit) trains to the eager losses,
    scale factors and fitted prior, with one compiled graph for the whole run. Fixed-length batches
    (`pad_to_multiple_of`): each new padded length would otherwise cost a recompile."""

    def run(compiled):
        model, encoder_tokenizer, decoder_tokenizer, data, _ = tester.get_trainer_setup(tiny_encoder_path)
        collator = DataCollatorForLatentLM(encoder_tokenizer, decoder_tokenizer, pad_to_multiple_of=32)
        args = TrainingArguments(
            output_dir=str(tmp_path / f"compiled-{compiled}"),
            max_steps=3,
            per_device_train_batch_size=8,
            learning_rate=1e-3,
            logging_steps=1,
            report_to=[],
            save_strategy="no",
            use_cpu=True,
            seed=0,
            disable_tqdm=True,
            torch_compile=compiled,
        )
        trainer = make_trainer(model, args, data["train"], collator, prior_fit_sentences=32, probe_size=16)
        trainer.train()
        return [h["loss"] for h in trainer.state.log_history if "loss" in h], model

    eager_losses, eager = run(compiled=False)
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    with torch._inductor.config.patch(fallback_random=True):
        compiled_losses, compiled = run(compiled=True)
    assert len(compiled_losses) == 3
    assert compiled_losses == pytest.approx(eager_losses, rel=1e-5)
    assert torch.allclose(compiled.collapse.scale_factors, eager.collapse.scale_factors, rtol=1e-5)
    assert torch.allclose(compiled.fitted_prior.scale, eager.fitted_prior.scale, rtol=1e-5)
    assert compiled_graphs() == 1


@pytest.mark.parametrize("injection", [name for name in ALL_INJECTIONS if name != "embedding"])
def test_static_cache_generation_matches_the_dynamic_cache(injection):
    """`cache_implementation="static"`: the latent's memory slot is written into a `StaticCache` sized for it, and
    greedy decoding of a batch gives the dynamic cache's tokens. (`latent_injection="embedding"` has no slot: the
    decoder fills the static cache as plain GPT-2 does.)"""
    model = separated_logits(tester.get_model(dropout=0.0, latent_injection=injection).eval())
    latents = torch.randn(3, 4, generator=torch.Generator().manual_seed(0))
    dynamic = model.generate(latents=latents, max_new_tokens=12, do_sample=False)
    static = model.generate(latents=latents, max_new_tokens=12, do_sample=False, cache_implementation="static")
    assert torch.equal(static, dynamic)


def test_compiled_static_cache_generation_matches_eager():
    """Batch-1 decoding steps compiled as one graph (`fullgraph=True`: a graph break, such as a branch on the static
    cache's length, raises) give the eager dynamic cache's greedy tokens, for two latents in a row."""
    model = separated_logits(tester.get_model(dropout=0.0).eval())
    compile_config = CompileConfig(fullgraph=True, mode="default")
    compile_config._compile_all_devices = True  # GenerationMixin compiles only on accelerators unless told
    torch._dynamo.reset()
    for seed in (1, 2):
        latents = torch.randn(1, 4, generator=torch.Generator().manual_seed(seed))
        eager = model.generate(latents=latents, max_new_tokens=12, do_sample=False)
        compiled = model.generate(
            latents=latents,
            max_new_tokens=12,
            do_sample=False,
            cache_implementation="static",
            compile_config=compile_config,
        )
        assert torch.equal(compiled, eager)
    assert hasattr(model, "_compiled_call")  # the compiled path ran (not a silent eager fallback)
