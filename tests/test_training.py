import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import Trainer, TrainerState

from scalevae.data import DataCollatorForLatentLM, load_text_dataset, tokenize_dataset
from scalevae.training import KLSchedule, KLScheduleCallback, make_trainer
from tests.conftest import shared_file
from tests.model_tester import tester

REPO = Path(__file__).resolve().parents[1]


def test_kl_schedules():
    assert KLSchedule("constant", max_weight=0.5)(123) == 0.5
    linear = KLSchedule("linear", warmup_steps=10)
    assert [linear(s) for s in (0, 5, 10, 50)] == [0.0, 0.5, 1.0, 1.0]
    cyc = KLSchedule("cyclical", total_steps=100, n_cycle=2, ratio_zero=0.2, ratio_increase=0.4)
    # cycle of 50 steps: zero for 10, rises over 20, then 1
    assert [cyc(s) for s in (0, 9, 10, 20, 30, 49, 50, 60, 70)] == pytest.approx([0, 0, 0, 0.5, 1, 1, 0, 0, 0.5])
    with pytest.raises(ValueError, match="schedule"):
        KLSchedule("exponential")
    with pytest.raises(ValueError, match="ratio_zero"):
        KLSchedule("cyclical", total_steps=10, ratio_zero=0.8, ratio_increase=0.5)


def args_for(tmp_path, **kwargs):
    return tester.training_args(tmp_path, **{"per_device_eval_batch_size": 16, "logging_steps": 2, **kwargs})


def test_stock_trainer_trains_without_subclass(tmp_path, tiny_encoder_path):
    model, _, _, data, collator = tester.get_trainer_setup(tiny_encoder_path)
    trainer = Trainer(
        model=model,
        args=args_for(tmp_path),
        train_dataset=data["train"],
        data_collator=collator,
        eval_dataset=data["validation"],
    )
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == 3 and all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < losses[0]
    assert torch.isfinite(torch.tensor(trainer.evaluate()["eval_loss"]))
    assert not torch.equal(model.collapse.scale_factors, torch.ones(4))  # the running estimate was learned


def test_callbacks_log_latent_figures_and_schedule_kl(tmp_path, tiny_encoder_path):
    model, _, _, data, collator = tester.get_trainer_setup(tiny_encoder_path, strategy="vae")
    args = args_for(tmp_path, report_to=["tensorboard"])
    trainer = make_trainer(
        model,
        args,
        data["train"],
        collator,
        eval_dataset=data["validation"],
        kl_schedule=KLSchedule("linear", warmup_steps=6),
    )
    trainer.train()
    logged = [h for h in trainer.state.log_history if "loss" in h]
    for key in ("reconstruction_loss", "kl", "decoder_kl", "mi", "mi_decoder", "au", "au_decoder", "kl_weight"):
        assert all(key in h for h in logged), key
    assert [h["kl_weight"] for h in logged] == pytest.approx([1 / 6, 3 / 6, 5 / 6])  # set before steps 2, 4, 6
    assert model.config.kl_weight == 1.0 and not model._forward_pre_hooks  # the config keeps its β; hook removed
    assert list(tmp_path.rglob("events.out.tfevents*")), "TensorBoard got nothing"


def test_kl_schedule_passes_beta_to_training_forwards_only(tiny_encoder_path):
    model, _, _, data, collator = tester.get_trainer_setup(tiny_encoder_path, strategy="vae")
    callback = KLScheduleCallback(KLSchedule("linear", warmup_steps=4))
    state = TrainerState(max_steps=8, global_step=1)
    callback.on_train_begin(None, state, None, model=model)
    callback.on_step_begin(None, state, None)
    batch = collator([data["train"][i] for i in range(8)])
    torch.manual_seed(0)
    out = model.train()(**batch)
    assert torch.allclose(out.loss, out.reconstruction_loss + 0.25 * out.kl_loss)
    out = model.eval()(**batch)  # evaluation scores the config's β
    assert torch.allclose(out.loss, out.reconstruction_loss + out.kl_loss)
    callback.on_train_end(None, state, None)
    torch.manual_seed(0)
    out = model.train()(**batch)
    assert torch.allclose(out.loss, out.reconstruction_loss + out.kl_loss)


def test_scale_schedule_counts_optimizer_steps_under_gradient_accumulation(tmp_path, tiny_encoder_path):
    model, _, _, data, collator = tester.get_trainer_setup(tiny_encoder_path)
    trainer = make_trainer(
        model, args_for(tmp_path, max_steps=3, gradient_accumulation_steps=2), data["train"], collator
    )
    trainer.train()
    assert model.collapse.steps.item() == trainer.state.global_step == 3  # 6 forward passes


def test_resume_gives_the_same_losses_and_factors(tmp_path, tiny_encoder_path):
    def run(output, resume=None, max_steps=6):
        model, _, _, data, collator = tester.get_trainer_setup(tiny_encoder_path)
        args = args_for(output, max_steps=max_steps, save_strategy="steps", save_steps=3, logging_steps=1)
        trainer = make_trainer(model, args, data["train"], collator)
        trainer.train(resume_from_checkpoint=resume)
        return [h["loss"] for h in trainer.state.log_history if "loss" in h], model.collapse.scale_factors.clone()

    full_losses, full_factors = run(tmp_path / "full")
    run(tmp_path / "cut", max_steps=6)  # writes checkpoint-3 and checkpoint-6
    resumed_losses, resumed_factors = run(tmp_path / "cut", resume=str(tmp_path / "cut" / "checkpoint-3"))
    assert resumed_losses == pytest.approx(full_losses, rel=1e-5)  # steps 1-3 come from the checkpoint's history
    assert torch.allclose(resumed_factors, full_factors, rtol=1e-5)


def test_trainer_on_real_ptb_text(tmp_path, tiny_encoder_path):
    path = shared_file("ptb.valid.txt")
    model, encoder_tokenizer, decoder_tokenizer = tester.build(tiny_encoder_path)
    data, stats = tokenize_dataset(load_text_dataset({"train": str(path)}), encoder_tokenizer, decoder_tokenizer, 16)
    assert stats["train"]["truncated"] > 0  # PTB has long sentences: truncation is counted
    trainer = Trainer(
        model=model,
        args=args_for(tmp_path, max_steps=3),
        train_dataset=data["train"],
        data_collator=DataCollatorForLatentLM(encoder_tokenizer, decoder_tokenizer),
    )
    assert torch.isfinite(torch.tensor(trainer.train().training_loss))


@pytest.mark.slow
def test_two_process_accelerate_run(tmp_path, tiny_encoder_path):
    """Two CPU processes over gloo, started by torchrun, train the example script end to end."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        str(REPO / "examples/train_accelerate.py"),
        "--encoder",
        tiny_encoder_path,
        "--decoder_layers",
        "1",
        "--decoder_width",
        "32",
        "--latent_size",
        "4",
        "--max_steps",
        "6",
        "--per_device_train_batch_size",
        "8",
        "--logging_steps",
        "3",
        "--output_dir",
        str(tmp_path),
    ]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600, cwd=REPO)
    assert result.returncode == 0, result.stderr[-3000:]
    assert (tmp_path / "final" / "model.safetensors").exists()
    history = __import__("json").loads((tmp_path / "history.json").read_text())
    assert [h["step"] for h in history] == [3, 6] and all(h["loss"] == h["loss"] for h in history)


def test_cyclical_schedule_without_a_length_takes_the_runs_length():
    """`scalevae train --kl_schedule cyclical` without --max_steps: the schedule learns the run's length when training
    begins (it used to cycle over 1 step, leaving β = 0 for the whole run)."""
    unset = KLSchedule("cyclical", 1.0, total_steps=0, n_cycle=4)
    with pytest.raises(ValueError, match="total_steps is unset"):
        unset(10)
    callback = KLScheduleCallback(unset)
    callback.on_train_begin(None, TrainerState(max_steps=400), None, model=torch.nn.Linear(1, 1))
    schedule = callback.schedule
    assert schedule.total_steps == 400 and unset.total_steps == 0  # the caller's schedule is not mutated
    betas = [schedule(step) for step in range(400)]
    assert betas[0] == 0.0 and max(betas) == 1.0 and sum(b == 1.0 for b in betas) == 200  # half of each cycle at 1
