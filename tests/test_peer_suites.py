"""Other projects' suites as an oracle for the pytest plugin (issue 10).

The runner is ``compat/run_peer_suites.py`` (see compat/README.md): released
sdists of pytest-asyncio and anyio, fetched from the package index, each run
``-p no:asyncwatch``, installed-not-enabled, ``--asyncwatch --asyncwatch-mode
report`` and ``--asyncwatch``.  Here the CI subset (``--subset ci``), on 3.11
only: 46 tests of pytest-asyncio and 535 of anyio, four legs each, ~3.5
minutes on a loaded 2-core machine with the downloads and installs, which CI
can afford once, not per interpreter.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

RUNNER = Path(__file__).resolve().parent.parent / "compat" / "run_peer_suites.py"


@pytest.mark.skipif(sys.version_info[:2] != (3, 11), reason="run on 3.11 only, to stay within CI's time budget")
def test_installing_or_enabling_asyncwatch_changes_no_outcome_but_through_findings(tmp_path):
    """Installed and report mode: every test's outcome is the plain run's;
    fail mode: only tests with a finding that counts differ."""
    work = Path(os.environ.get("ASYNCWATCH_PEER_WORK", tmp_path))
    result = subprocess.run(
        [sys.executable, str(RUNNER), "--subset", "ci", "--work", str(work)],
        capture_output=True,
        text=True,
        timeout=2400,
    )
    report = result.stdout[-6000:] + result.stderr[-3000:]
    summary_file = work / "summary.json"
    assert summary_file.exists(), f"status {result.returncode}\n{report}"
    summary = json.loads(summary_file.read_text(encoding="utf-8"))
    assert set(summary) == {"pytest-asyncio", "anyio"}, report
    for name, suite in summary.items():
        assert suite["tests"] > 40, (name, report)  # the run collected the subset
        for leg in ("inert", "report", "fail"):
            assert suite[leg]["unexplained"] == [], (name, leg, report)
        # Installed but not enabled, asyncwatch does nothing at all: only the
        # suite's own races may differ.
        assert [d for d in suite["inert"]["differences"] if not d["flaky"]] == [], report
    assert result.returncode == 0, report
