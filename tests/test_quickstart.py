"""The main job (scalevae.quickstart): the wall-clock budget, what the user sees, and that a seed reproduces it.
A tiny encoder, a few steps; the real run's figures are in the README."""

import contextlib
import io
import json
from pathlib import Path
from types import SimpleNamespace

import pytest

from scalevae import LatentText, quickstart, training
from scalevae.corpus import default_corpus_files
from scalevae.quickstart import DEFAULT_STEPS, quickstart_spec
from scalevae.training import TimeBudgetCallback
from tests.model_tester import tester

TINY_RUN = dict(
    max_steps=4,
    max_length=16,
    eval_sentences=8,
    per_device_train_batch_size=8,
    num_importance_samples=2,
    logging_steps=2,
    decoder_vocab_size=512,
    warmup_steps=2,
    decoder_layers=tester.built_decoder_layers,
    decoder_width=tester.hidden_size,
    decoder_heads=tester.num_attention_heads,
)


@pytest.fixture(scope="module")
def tiny_corpus(tmp_path_factory):
    """The embedded corpus cut to 200 / 16 / 8 sentences."""
    folder = tmp_path_factory.mktemp("corpus")
    files = {}
    for split, size in (("train", 200), ("validation", 16), ("test", 8)):
        lines = Path(default_corpus_files()[split]).read_text(encoding="utf-8").splitlines()[:size]
        files[split] = str(folder / f"{split}.txt")
        Path(files[split]).write_text("\n".join(lines) + "\n", encoding="utf-8")
    return files


def budget_steps(seconds, step_seconds, stop_every, monkeypatch):
    """Steps that a run of `step_seconds` per step trains under a `seconds` budget."""
    clock = SimpleNamespace(now=0.0)
    monkeypatch.setattr(training.time, "perf_counter", lambda: clock.now)
    callback = TimeBudgetCallback(seconds, stop_every, "train")
    state, control = SimpleNamespace(global_step=0, max_steps=10**7), SimpleNamespace(should_training_stop=False)
    callback.on_train_begin(None, state, control)
    while not control.should_training_stop:
        clock.now += step_seconds
        state.global_step += 1
        callback.on_step_end(None, state, control)
    callback.on_train_end(None, state, control)
    return state.global_step


def test_budget_stops_on_a_logging_step_within_the_budget(monkeypatch):
    steps = budget_steps(seconds=60, step_seconds=0.7, stop_every=25, monkeypatch=monkeypatch)
    assert steps % 25 == 0 and steps * 0.7 <= 60 and (steps + 25) * 0.7 > 60 - 25 * 0.7
    assert budget_steps(seconds=60, step_seconds=0.07, stop_every=25, monkeypatch=monkeypatch) > 8 * steps


def test_the_main_job_trains_a_fixed_number_of_steps_by_default():
    """Its quality must not follow the machine's load: a step count, not a clock, unless --train_minutes is given
    (then whichever comes first stops it, as in every command)."""
    spec, _ = quickstart_spec([])
    assert spec.training.max_steps == DEFAULT_STEPS and spec.run.train_minutes is None
    spec, _ = quickstart_spec(["--train_minutes", "3"])
    assert spec.training.max_steps == DEFAULT_STEPS and spec.run.train_minutes == 3
    spec, _ = quickstart_spec(["--max_steps", "40"])
    assert spec.training.max_steps == 40 and spec.run.train_minutes is None


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_encoder_path, tiny_corpus):
    """The same tiny quickstart (tiny encoder and decoder, tiny corpus) twice, same seed, with what it printed."""
    outputs = []
    options = dict(
        TINY_RUN, encoder=tiny_encoder_path, **{f"{split}_file": path for split, path in tiny_corpus.items()}
    )
    argv = [item for key, value in options.items() for item in (f"--{key}", str(value))]
    for name in ("first", "second"):
        folder = tmp_path_factory.mktemp(name)
        printed, bars = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(printed), contextlib.redirect_stderr(bars):
            results = quickstart.main(["--output_dir", str(folder), *argv])
        outputs.append((folder, results, printed.getvalue(), bars.getvalue()))
    return outputs


def test_report_is_short_and_complete(runs):
    folder, results, printed, _ = runs[0]
    before_table = printed.split("held-out test set")[0]
    assert len(before_table.strip().splitlines()) <= 4
    for part in (
        "training steps",
        "reconstruction BLEU",
        "Reconstructions",
        "Samples from the",
        "Interpolation",
        "gist",
        "--des_std",
        "--compare_vae",
        "Trained Scale-VAE 4 steps",
    ):
        assert part in printed, part
    summary = json.loads((folder / "results.json").read_text())["scale"]
    assert summary["steps"] == 4 and 0 <= summary["printed_repetition"] <= 1 and 0 <= summary["prior_distinct_2"] <= 1
    assert "repetition rate of the printed text" in printed
    assert (folder / "training_curves.png").stat().st_size and (folder / "latent_map.png").stat().st_size


def test_two_progress_bars_and_no_others(runs):
    bars = runs[0][3]
    for noise in ("Tokenizing", "Stripping", "Dropping", "Map", "Filter", "Loading weights", "Writing model"):
        assert noise not in bars, noise
    assert "train Scale-VAE" in bars and "evaluate" in bars


def test_same_seed_same_printout(runs):
    (first, _, printed_first, _), (second, _, printed_second, _) = runs

    def untimed(printed, folder):  # the closing line's training seconds are the one thing that varies
        return [line for line in printed.replace(str(folder), "").splitlines() if not line.startswith("Trained")]

    assert untimed(printed_first, first) == untimed(printed_second, second)
    assert (first / "results.md").read_text() == (second / "results.md").read_text()


def test_saved_folder_carries_the_fitted_tokenizer(runs):
    folder, results, _, _ = runs[0]
    text = LatentText.from_pretrained(folder / "scale" / "final")
    assert len(text.decoder_tokenizer) == 512 and text.model.config.freeze_encoder is True
    assert "--max_steps 4" in (folder / "scale" / "final" / "README.md").read_text()
    assert len(text.reconstruct(["Return the value."], max_new_tokens=4)) == 1
