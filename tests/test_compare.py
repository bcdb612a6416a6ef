"""`scalevae compare` end to end on a tiny preset over real PTB sentences: table, JSON, PNGs, resume."""

import json

import pytest

from scalevae.compare import Preset, run_comparison
from tests.conftest import shared_file
from tests.model_tester import tester


def tiny_preset(**overrides):
    settings = dict(
        name="tiny",
        train_file="ptb.train.txt",
        validation_file="ptb.valid.txt",
        test_file="ptb.test.txt",
        train_sentences=96,
        eval_sentences=12,
        max_steps=4,
        batch_size=8,
        max_length=16,
        latent_size=tester.latent_size,
        decoder_vocab_size=300,
        decoder=dict(
            n_layer=tester.built_decoder_layers, n_embd=tester.hidden_size, n_head=tester.num_attention_heads
        ),
        freeze_encoder=False,
        new_encoder=dict(
            hidden_size=tester.hidden_size,
            num_hidden_layers=tester.encoder_layers,
            num_attention_heads=tester.num_attention_heads,
            intermediate_size=tester.intermediate_size,
        ),
        num_importance_samples=2,
        seeds=(0,),
        des_std_sweep=(0.5,),
    )
    return Preset(**{**settings, **overrides})


def test_compare_writes_the_table_and_resumes_without_retraining(tmp_path):
    data_dir = shared_file("ptb.train.txt").parent
    output = tmp_path / "cmp"
    summary = run_comparison(tiny_preset(), output, data_dir, runs=["vae", "bn", "ae", "scale_0.5"])
    assert set(summary["runs"]) == {"vae", "bn", "ae", "scale_0.5"}
    assert summary["best_scale"] == "scale_0.5"
    test = summary["runs"]["scale_0.5"]["test"]
    for key in ("nll_fitted", "nll_scaled", "elbo_fitted", "kl", "mi_decoder", "au_decoder", "shuffle_gap", "bleu"):
        assert test[key][0] == test[key][0], key  # measured, not NaN
    assert (
        summary["runs"]["ae"]["test"]["nll_fitted"][0] != summary["runs"]["ae"]["test"]["nll_fitted"][0]
    )  # no density
    table = (output / "results.md").read_text()
    assert "| scale_0.5 (chosen) | 0 |" in table and "| bn | 0 |" in table
    assert json.loads((output / "results.json").read_text())["best_scale"] == "scale_0.5"
    for name in ("comparison_curves.png", "comparison_nll_vs_mi.png", "comparison_des_std_sweep.png"):
        assert (output / name).stat().st_size > 1000

    finished = {path.name: path.stat().st_mtime_ns for path in (output / "runs").iterdir()}
    again = run_comparison(tiny_preset(), output, data_dir, runs=["vae", "bn", "ae", "scale_0.5"])
    assert {path.name: path.stat().st_mtime_ns for path in (output / "runs").iterdir()} == finished  # nothing re-ran
    assert again["runs"]["vae"]["test"]["nll_fitted"] == summary["runs"]["vae"]["test"]["nll_fitted"]

    with pytest.raises(ValueError, match="other settings"):
        run_comparison(tiny_preset(max_steps=5), output, data_dir, runs=["vae"])
    with pytest.raises(ValueError, match="Unknown run 'vea'"):
        run_comparison(tiny_preset(), output, data_dir, runs=["vea"])
