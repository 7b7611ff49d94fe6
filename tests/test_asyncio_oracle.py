"""CPython's own asyncio tests as an oracle: asyncwatch on every loop breaks none of them.

The runner is ``compat/run_test_asyncio.py`` (see compat/README.md); this runs
it whole, with this interpreter, in a subprocess.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
import warnings
from pathlib import Path
from types import ModuleType

import pytest

RUNNER = Path(__file__).resolve().parent.parent / "compat" / "run_test_asyncio.py"


def _runner() -> ModuleType:
    spec = importlib.util.spec_from_file_location("run_test_asyncio", RUNNER)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_no_test_of_test_asyncio_fails_under_asyncwatch_that_passes_without_it(tmp_path):
    """With asyncwatch attached to every loop the suite makes (every detector,
    a span for every task), no test fails that passes plain, asyncwatch never
    switches a part of itself off, and every finding is one of the suite's
    deliberate mistakes."""
    runner = _runner()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # whatever importing the standard library's test package says
        problem = runner.suite_problem()
    if problem is not None:
        pytest.skip(problem)

    result = subprocess.run(
        [sys.executable, str(RUNNER), "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=900,
    )
    summary_file = tmp_path / "summary.json"
    assert summary_file.exists(), f"status {result.returncode}\n{result.stderr[-4000:]}"
    summary = json.loads(summary_file.read_text(encoding="utf-8"))
    report = result.stdout + result.stderr[-2000:]

    assert summary["regressions"] == [], report
    assert summary["internal_errors"] == [], report
    assert summary["worker_problems"] == [] and summary["watched"]["crashes"] == [], report
    assert summary["skip_list"]["stale"] == [], report
    assert summary["findings"]["unclassified"] == [], report
    assert summary["runner_errors"] == [], report
    assert result.returncode == 0, report

    # The whole suite ran, and asyncwatch really was on it: every loop that
    # started running was watched, and nearly every test made such a loop.
    tests = summary["tests"]
    assert tests > 2000
    assert sum(summary["watched"]["outcomes"].values()) >= tests
    assert summary["watched"]["outcomes"]["pass"] > 0.9 * tests
    loops = summary["loops"]
    assert loops["runs_unwatched"] == []
    assert loops["attached"] > 1500
    assert loops["tests_that_attached_a_loop"] > 0.6 * tests
    assert summary["spans"]["exported"] > 2000
    # The detectors were on: two of the suite's deliberate mistakes, found where they are.
    found = {
        (kind, item["test"].rpartition(".")[2], (item["site"] or "").partition(":")[0])
        for kind, items in summary["findings"]["items"].items()
        for item in items
    }
    assert ("coroutine_never_awaited", "test_run_until_complete_nesting", "test_events.py") in found, found
    assert ("cancellation_swallowed", "test_timeout_after_cancellation", "test_timeouts.py") in found, found
