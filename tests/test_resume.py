"""Checkpoints and resuming: the same seed gives the same weights, a resumed run matches the uninterrupted one, and a
damaged or incomplete checkpoint is named before any step runs."""

import logging
import shutil
from pathlib import Path

import pytest
import torch

from scalevae import LatentText, hub
from scalevae.cli import main
from tests.model_tester import (
    assert_same_tensors,
    checkpointing_trainer,
    flip_bit,
    saved_tensors,
)

# -- reproducible and resumable CLI training ----------------------------------------------------------------------


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny tensors on shared CPUs: intra-op threads only contend. Module-wide, so that the runs compared bit for bit
    (an interrupted and an uninterrupted one) add their floats in the same order."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def run_b(tmp_path_factory, train_command, train_data):
    """tiny_run again, in another process's shoes: same command, another folder."""
    output = tmp_path_factory.mktemp("run_b")
    main(train_command(output, train_data, "--max_steps", "6", "--save_steps", "3"))
    return output


def test_same_seed_gives_bit_identical_weights(tiny_run, run_b):
    assert_same_tensors(saved_tensors(tiny_run / "final"), saved_tensors(run_b / "final"))


def test_resume_from_a_checkpoint_matches_the_uninterrupted_run(tiny_run, run_b, tmp_path, train_command, train_data):
    # run B killed right after its step-3 checkpoint: only that checkpoint is left
    shutil.copytree(run_b / "checkpoint-3", tmp_path / "checkpoint-3")
    main(
        train_command(
            tmp_path,
            train_data,
            "--max_steps",
            "6",
            "--save_steps",
            "3",
            "--resume_from_checkpoint",
            str(tmp_path / "checkpoint-3"),
        )
    )
    resumed, uninterrupted = saved_tensors(tmp_path / "final"), saved_tensors(tiny_run / "final")
    assert_same_tensors(resumed, uninterrupted)
    assert not torch.equal(uninterrupted["collapse.scale_factors"], torch.ones(4))  # the factors did move


def test_resume_with_another_model_setting_names_the_field(tiny_run, tmp_path, train_command, train_data):
    with pytest.raises(ValueError, match=r"collapse_strategy='vae' now, 'scale' in the checkpoint"):
        main(
            train_command(
                tmp_path,
                train_data,
                "--max_steps",
                "6",
                "--collapse_strategy",
                "vae",
                "--resume_from_checkpoint",
                str(tiny_run / "checkpoint-3"),
            )
        )
    assert not (tmp_path / "final").exists()


def test_trainer_checkpoints_are_complete_folders(tiny_run):
    checkpoint = tiny_run / "checkpoint-3"
    assert hub.missing_files(checkpoint) == []
    text = LatentText.from_pretrained(checkpoint)
    assert len(text.sample(2, max_new_tokens=3)) == 2


# -- resuming through the Trainer ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def checkpointed(tmp_path_factory, tiny_encoder_path):
    """A 4-step run with checkpoints at steps 2 and 4."""
    output = tmp_path_factory.mktemp("checkpointed")
    checkpointing_trainer(output, tiny_encoder_path).train()
    return output


def copied_checkpoint(checkpointed, tmp_path):
    return Path(shutil.copytree(checkpointed / "checkpoint-2", tmp_path / "resume-from"))


def test_resume_refuses_a_checkpoint_with_a_flipped_weight_bit(checkpointed, tmp_path, tiny_encoder_path):
    checkpoint = copied_checkpoint(checkpointed, tmp_path)
    flip_bit(checkpoint / "model.safetensors", "collapse.scale_factors")
    trainer = checkpointing_trainer(tmp_path / "out", tiny_encoder_path)
    with pytest.raises(
        OSError, match=rf"resume_from_checkpoint {checkpoint}: {checkpoint}/model\.safetensors is corr"
    ):
        trainer.train(resume_from_checkpoint=str(checkpoint))
    assert trainer.state.global_step == 0 and not (tmp_path / "out" / "checkpoint-4").exists()


def test_resume_from_a_truncated_checkpoint_names_the_file(checkpointed, tmp_path, tiny_encoder_path):
    checkpoint = copied_checkpoint(checkpointed, tmp_path)
    weights = checkpoint / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(OSError, match=rf"{weights} is truncated"):
        checkpointing_trainer(tmp_path / "out", tiny_encoder_path).train(resume_from_checkpoint=str(checkpoint))


def test_resume_without_optimizer_or_rng_state_says_which_and_what_changes(
    checkpointed, tmp_path, tiny_encoder_path, caplog
):
    checkpoint = copied_checkpoint(checkpointed, tmp_path)
    (checkpoint / "optimizer.pt").unlink()
    (checkpoint / "rng_state.pth").unlink()
    with caplog.at_level(logging.WARNING, logger="scalevae.training"):
        trainer = checkpointing_trainer(tmp_path / "out", tiny_encoder_path)
        trainer.train(resume_from_checkpoint=str(checkpoint))
    warned = [r.getMessage() for r in caplog.records if "Resuming from" in r.getMessage()]
    assert len(warned) == 1, warned
    assert (
        "without optimizer.pt (the optimizer's state" in warned[0] and "rng_state.pth (the random state" in warned[0]
    )
    assert "scheduler.pt" not in warned[0] and "will not reproduce the uninterrupted run" in warned[0]
    assert trainer.state.global_step == 4  # it does resume


def test_training_args_bin_is_readable_by_its_owner_only(checkpointed, tmp_path, tiny_encoder_path):
    for step in (2, 4):
        assert (checkpointed / f"checkpoint-{step}" / "training_args.bin").stat().st_mode & 0o777 == 0o600
    trainer = checkpointing_trainer(tmp_path / "out", tiny_encoder_path)
    trainer.save_model(str(tmp_path / "saved"))  # the Trainer's own save writes it too
    assert (tmp_path / "saved" / "training_args.bin").stat().st_mode & 0o777 == 0o600


# -- a checkpoint is complete or invisible; a finished run resumes to its end (issue 28) ------------------------------


def test_resuming_from_the_last_checkpoint_finishes_the_run_identically(tiny_run, tmp_path, train_command, train_data):
    """A run killed during its final evaluation or save: resuming from checkpoint-N at max_steps ended in a TypeError
    (or, with the bar off, ran step N+1, and the weights differed from the uninterrupted run)."""
    shutil.copytree(tiny_run / "checkpoint-6", tmp_path / "checkpoint-6")
    command = train_command(tmp_path, train_data, "--max_steps", "6", "--save_steps", "3")
    main([*command, "--resume_from_checkpoint", str(tmp_path / "checkpoint-6")])
    assert_same_tensors(saved_tensors(tmp_path / "final"), saved_tensors(tiny_run / "final"))
    assert sorted(p.name for p in tmp_path.glob("checkpoint-*")) == ["checkpoint-6"]  # no step 7


@pytest.mark.parametrize("killed_after", ["weights", "optimizer", "trainer_state.json", "tokenizers"])
def test_an_incomplete_checkpoint_is_named_with_the_one_to_resume_from(
    tiny_run, tmp_path, train_command, train_data, killed_after
):
    """3 of 8 random kills of `train --save_steps 1` left a newest checkpoint without trainer_state.json; resuming
    warned "the run continues", then raised a raw FileNotFoundError."""
    for step in (3, 6):
        shutil.copytree(tiny_run / f"checkpoint-{step}", tmp_path / f"checkpoint-{step}")
    newest = tmp_path / "checkpoint-6"
    written_after = {
        "weights": ["optimizer.pt", "scheduler.pt", "rng_state.pth", "trainer_state.json", "decoder_tokenizer"],
        "optimizer": ["scheduler.pt", "rng_state.pth", "trainer_state.json", "decoder_tokenizer"],
        "trainer_state.json": ["decoder_tokenizer", "README.md"],
        "tokenizers": ["README.md"],
    }[killed_after]
    for name in [*written_after, "checkpoint_complete.json"]:
        path = newest / name
        shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)
    command = train_command(tmp_path, train_data, "--max_steps", "6", "--save_steps", "3")
    with pytest.raises(ValueError, match=rf"{newest} is incomplete: it lacks .*Resume from {tmp_path}/checkpoint-3"):
        main([*command, "--resume_from_checkpoint", str(newest)])
    assert not (tmp_path / "final").exists()


def test_resuming_the_newest_checkpoint_skips_incomplete_ones_by_name(
    checkpointed, tmp_path, tiny_encoder_path, caplog
):
    for step in (2, 4):
        shutil.copytree(checkpointed / f"checkpoint-{step}", tmp_path / f"checkpoint-{step}")
    (tmp_path / "checkpoint-4" / "trainer_state.json").unlink()
    (tmp_path / "checkpoint-4" / "checkpoint_complete.json").unlink()
    trainer = checkpointing_trainer(tmp_path, tiny_encoder_path)
    with caplog.at_level(logging.WARNING, logger="scalevae.training"):
        trainer.train(resume_from_checkpoint=True)
    assert f"Skipping incomplete checkpoint(s) {tmp_path}/checkpoint-4" in caplog.text
    assert f"resuming from {tmp_path}/checkpoint-2" in caplog.text
    assert trainer.state.global_step == 4


def test_every_checkpoint_ends_with_its_completion_marker(tiny_run, checkpointed):
    for folder in [*tiny_run.glob("checkpoint-*"), *checkpointed.glob("checkpoint-*")]:
        marker = folder / "checkpoint_complete.json"
        newest = max(p.stat().st_mtime_ns for p in folder.rglob("*") if p.is_file())
        assert marker.stat().st_mtime_ns == newest, folder


def test_a_resume_uses_the_checkpoints_tokenizers_and_refuses_other_data(
    tiny_run, tmp_path, train_command, train_data, monkeypatch
):
    """Resuming with another --train_file refitted the decoder tokenizer (same size, so no check fired) and trained the
    embeddings on other token ids."""
    import scalevae.factory

    shutil.copytree(tiny_run / "checkpoint-3", tmp_path / "checkpoint-3")
    other = tmp_path / "other.txt"
    other.write_text("".join(reversed(train_data.read_text().splitlines(keepends=True))))  # same words, other data
    monkeypatch.setattr(scalevae.factory, "fit_decoder_tokenizer", lambda *a, **k: pytest.fail("refitted"))
    resume = ["--max_steps", "6", "--resume_from_checkpoint", str(tmp_path / "checkpoint-3")]
    with pytest.raises(ValueError, match=rf"checkpoint-3 was trained on other data than {other}: 64 sentences"):
        main([*train_command(tmp_path / "run", other, *resume)])
    main([*train_command(tmp_path / "run", train_data, *resume, "--save_steps", "3")])  # its own data: no refit
    assert_same_tensors(saved_tensors(tmp_path / "run" / "final"), saved_tensors(tiny_run / "final"))


@pytest.mark.slow  # a second process (the killed run) beside this one: see .ci/run
def test_a_run_killed_while_checkpointing_resumes_from_a_complete_checkpoint(tmp_path, train_command, train_data):
    """A real `scalevae train --save_steps 1` killed with SIGKILL at a random moment after its second checkpoint
    began: every checkpoint left is complete or is named as incomplete, and the run resumes to its end."""
    import os
    import random
    import subprocess
    import sys
    import time

    from scalevae.training import is_complete_checkpoint

    output = tmp_path / "run"
    command = train_command(output, train_data, "--max_steps", "8", "--save_steps", "1")
    process = subprocess.Popen(
        [sys.executable, "-m", "scalevae.cli", *command],
        cwd=Path(__file__).parent.parent,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 120
        while len(list(output.glob("checkpoint-*"))) < 2 and process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(random.Random().uniform(0, 0.3))
    finally:
        process.kill()
        process.wait(30)
    checkpoints = sorted(output.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
    assert checkpoints, "the run wrote no checkpoint before it was killed"
    resume = checkpoints[-1]
    if not is_complete_checkpoint(str(resume)):
        with pytest.raises(ValueError, match=rf"{resume} is incomplete: it lacks .*Resume from (\S+), the newest"):
            main([*command, "--resume_from_checkpoint", str(resume)])
        resume = next(p for p in reversed(checkpoints) if is_complete_checkpoint(str(p)))
    main([*command, "--resume_from_checkpoint", str(resume)])
    assert (output / "final" / "model.safetensors").is_file()


def test_the_newest_checkpoint_is_chosen_by_step_not_by_name(tmp_path):
    from scalevae.training import mark_complete, newest_complete_checkpoint

    for step in (9, 10, 11):
        folder = tmp_path / f"checkpoint-{step}"
        folder.mkdir()
        if step != 11:
            (folder / "trainer_state.json").write_text("{}")
            mark_complete(str(folder), step)
    assert newest_complete_checkpoint(str(tmp_path)) == str(tmp_path / "checkpoint-10")
