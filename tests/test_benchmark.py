"""The benchmark runs through the run recipe: a smoke run of it (one round, a tiny decoder) so it cannot crash
unnoticed; the ratios themselves are measured by hand (docs/benchmarks.md), never asserted as times."""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def test_benchmark_smoke_run_reports_every_ratio(tmp_path):
    output = tmp_path / "results.json"
    command = [sys.executable, "benchmarks/benchmark.py", "--quick", "--rounds", "1", "--importance_samples", "4"]
    result = subprocess.run(
        [*command, "--batch_size", "8", "--max_length", "16", "--output", str(output)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(output.read_text())
    expected = {
        "train_step_scale_over_vae",
        "train_step_scale_over_vae_bf16",
        "data_over_train_step",
        "generate_speed_vs_plain_gpt2",
        "generate_speedup_vs_cacheless",
        "iw_nll_over_decoder_floor",
        "peak_memory_scale_over_ae",
    }
    assert expected <= set(report["results"])
    assert all(math.isfinite(value) and value > 0 for value in report["results"].values())
    assert "ratio" in result.stdout and "iw_nll_over_decoder_floor" in result.stdout


SCRIPTS = sorted(
    str(path.relative_to(REPO)) for folder in ("benchmarks", "examples") for path in (REPO / folder).glob("*.py")
)


@pytest.mark.parametrize("script", SCRIPTS)
def test_every_benchmark_and_example_script_imports_and_explains_itself(script):
    # The scripts import the package's inner modules; a name moved by a refactor must fail here, not in a measurement.
    result = subprocess.run([sys.executable, script, "--help"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "usage:" in result.stdout
