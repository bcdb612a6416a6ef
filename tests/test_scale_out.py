"""Past one eager CPU process (issue 18): `torch.compile` of the training step and of latent generation, the static
key/value cache, and FSDP / DeepSpeed runs that match one process.

The compiled runs use inductor's `fallback_random`, so compiled and eager code draw the same random numbers (the
posterior's noise): the losses are then equal to float rounding, not merely close in distribution.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch._dynamo
import torch._inductor.config
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
        args = tester.training_args(tmp_path / f"compiled-{compiled}", max_steps=3, torch_compile=compiled)
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


# ---------------------------------------------------------------------------------------------------------------------
# Several processes (gloo, on this machine's CPU): tests/scale_out_run.py trains a tiny model for 3 steps on each
# launcher; the records of N processes must match each other exactly and one process within float rounding.
# ---------------------------------------------------------------------------------------------------------------------

REPO = Path(__file__).resolve().parents[1]
RUNNER = REPO / "tests" / "scale_out_run.py"
# What the processes must agree on with one process, per strategy. BN-VAE's running mean is left out: the bias of mu
# cancels in the normalisation, so its gradient is rounding noise, which AdamW scales up to steps of the learning rate
# (the 1- and 2-process runs move it differently; the loss does not depend on it).
COMPARED = {"scale": ("scale_factors", "prior_loc", "prior_scale"), "bn": ("running_var", "prior_loc", "prior_scale")}


def launch(output: Path, encoder: str, processes: int, *options: str, config_file: Path | None = None) -> list[dict]:
    """Run the runner on `processes` processes (plain Python for one, torchrun, or `accelerate launch --config_file`);
    returns each rank's record."""
    runner = [str(RUNNER), str(output), "--encoder", encoder, *options]
    if config_file is not None:
        command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config_file), *runner]
    elif processes > 1:
        command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes), *runner]
    else:
        command = [sys.executable, *runner]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    result = subprocess.run(command, env=env, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    return [json.loads((output / f"rank{rank}.json").read_text()) for rank in range(processes)]


def assert_matches_one_process(ranks: list[dict], single: dict, strategy: str) -> None:
    assert len(ranks) == 2 and ranks[0]["processes"] == 2 and single["processes"] == 1
    # Every rank holds the same statistics, bit for bit: during training (running estimates) and after the prior fit.
    for key in ("losses", "running", "final"):
        assert ranks[1][key] == ranks[0][key], key
    assert ranks[0]["losses"] == pytest.approx(single["losses"], rel=1e-5)
    for name in COMPARED[strategy]:
        assert ranks[0]["final"][name] == pytest.approx(single["final"][name], rel=1e-4, abs=1e-7), name


def assert_saved_exactly(output: Path) -> None:
    """The saved folder loads back to the very tensors the run gathered (the tied output embedding is saved once)."""
    from modeling_scalevae import ScaleVAEForLatentLM

    state = torch.load(output / "state.pt")
    loaded = ScaleVAEForLatentLM.from_pretrained(output / "final").state_dict()
    compared = [name for name in state if name in loaded]
    assert len(compared) >= len(loaded) - 1
    for name in compared:
        assert torch.equal(loaded[name], state[name].to(loaded[name].dtype)), name


@pytest.fixture(scope="module")
def one_process(tmp_path_factory, tiny_encoder_path):
    """The one-process reference runs, each made once: (loop, strategy) -> record."""
    records = {}

    def get(loop: str, strategy: str = "scale") -> dict:
        if (loop, strategy) not in records:
            output = tmp_path_factory.mktemp(f"one-{loop}-{strategy}")
            options = ("--loop", loop, "--strategy", strategy, "--batch_size", "8")
            records[loop, strategy] = launch(output, tiny_encoder_path, 1, *options)[0]
        return records[loop, strategy]

    return get


@pytest.mark.slow  # two processes: see .ci/run
@pytest.mark.parametrize("strategy", ["scale", "bn"])
def test_fsdp2_on_two_processes_matches_one_process(strategy, tmp_path, tiny_encoder_path, one_process):
    """FSDP2 (`fully_shard` of every encoder and decoder block and of the model) over 2 gloo processes: the losses of
    one process with the same global batch; scale factors, BN-VAE's statistics (global-batch ones, as SyncBatchNorm)
    and the running fitted prior identical on both ranks at the end of training; `fit_prior` on the sharded model
    (which gathers the root's own parameters); the gathered full state dict saved and loaded bit-exactly."""
    options = ("--loop", "fsdp2", "--strategy", strategy, "--batch_size", "4")
    ranks = launch(tmp_path, tiny_encoder_path, 2, *options)
    assert_matches_one_process(ranks, one_process("fsdp2", strategy), strategy)
    assert_saved_exactly(tmp_path)


@pytest.mark.slow  # two processes: see .ci/run
def test_trainer_on_two_processes_matches_one_process(tmp_path, tiny_encoder_path, one_process):
    """`make_trainer` under torchrun with 2 gloo processes, asked for FSDP (`fsdp=True`): on a CPU, Accelerate sets up
    FSDP only for GPU-type devices (accelerate/state.py), so the Trainer trains with DDP, which is what this checks: the
    one-process losses and statistics, identical on both ranks, and the saved folder."""
    ranks = launch(tmp_path, tiny_encoder_path, 2, "--batch_size", "4", "--fsdp")
    assert ranks[0]["distributed_type"] == "DistributedType.MULTI_CPU"  # not FSDP: see the docstring
    assert_matches_one_process(ranks, one_process("trainer"), "scale")
    assert_saved_exactly(tmp_path)


@pytest.mark.slow  # two processes: see .ci/run
def test_accelerate_with_the_fsdp_config_matches_one_process(tmp_path, tiny_encoder_path, one_process):
    """`accelerate launch --config_file examples/fsdp_accelerate.yaml` on 2 CPU processes: a plain Accelerate loop (the
    runner's, in the one-process run's batch order) matches one process. As for the Trainer, Accelerate turns the FSDP
    config into DDP on a CPU."""
    config = REPO / "examples" / "fsdp_accelerate.yaml"
    ranks = launch(tmp_path, tiny_encoder_path, 2, "--loop", "accelerate", "--batch_size", "4", config_file=config)
    assert ranks[0]["distributed_type"] == "DistributedType.MULTI_CPU"
    assert_matches_one_process(ranks, one_process("fsdp2"), "scale")  # the same loop, sequential batches
    assert_saved_exactly(tmp_path)


@pytest.mark.slow  # two processes: see .ci/run
@pytest.mark.parametrize("stage", [1, 2])
def test_deepspeed_zero_through_the_trainer_matches_one_process(stage, tmp_path, tiny_encoder_path, one_process):
    """DeepSpeed ZeRO stage 1 or 2 through `make_trainer` on 2 CPU processes (DeepSpeed's CPU accelerator, gloo):
    one process's losses and statistics, and a saved folder that loads bit-exactly."""
    config = {
        "train_micro_batch_size_per_gpu": "auto",
        "gradient_accumulation_steps": "auto",
        "train_batch_size": "auto",
        "gradient_clipping": "auto",
        "zero_optimization": {"stage": stage},
        "optimizer": {
            "type": "AdamW",
            "params": {"lr": "auto", "betas": "auto", "eps": "auto", "weight_decay": "auto"},
        },
    }
    (tmp_path / "ds_config.json").write_text(json.dumps(config))
    ranks = launch(
        tmp_path, tiny_encoder_path, 2, "--batch_size", "4", "--deepspeed", str(tmp_path / "ds_config.json")
    )
    assert ranks[0]["distributed_type"] == "DistributedType.DEEPSPEED"
    assert_matches_one_process(ranks, one_process("trainer"), "scale")
    assert_saved_exactly(tmp_path)
