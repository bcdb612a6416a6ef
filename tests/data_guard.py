"""The real corpora (../shared/data), read at run time, and the guard that keeps CI honest about them: a test that
skips for want of a corpus while the data folder exists fails instead (`pytest_runtest_makereport`, which conftest.py
registers). A module of its own, importing neither torch nor transformers, so that a pytest run of it alone starts
fast."""

import os
from pathlib import Path

import pytest

# The real corpora: ../shared/data beside the repository (SCALEVAE_SHARED_DATA points elsewhere, e.g. from a worktree).
SHARED_DATA = Path(os.environ.get("SCALEVAE_SHARED_DATA") or Path(__file__).resolve().parents[2] / "shared" / "data")
# Every skip for want of the real corpora says this, so that `data_skip_failure` can tell it from other skips.
DATA_SKIP_MARK = "../shared/data"


def shared_file(name: str) -> Path:
    path = SHARED_DATA / name
    if not path.exists():
        pytest.skip(f"{path} is absent: the real corpora are read at run time from {DATA_SKIP_MARK}")
    return path


def data_skip_failure(reason: str, shared_data: Path = SHARED_DATA) -> str | None:
    """Why a skip must count as a failure, or None: a test skipped for want of the real corpora while their folder
    exists (a file missing, renamed or unreadable) would otherwise leave CI green without the checks on real text."""
    if DATA_SKIP_MARK in reason and shared_data.is_dir():
        return (
            f"{reason}\nThe data folder {shared_data} exists, so this data-dependent test must run: a skip here "
            "would hide that it did not (tests/data_guard.py turns it into a failure)."
        )
    return None


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if report.skipped and not hasattr(report, "wasxfail"):
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        failure = data_skip_failure(reason)
        if failure:
            report.outcome = "failed"
            report.longrepr = failure
