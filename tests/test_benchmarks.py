"""The benchmark harness in smoke mode: tiny sizes, no timing assertions.

This keeps ``benchmarks/`` from rotting: every workload runs in every mode
available here (each in its fresh process), the tables come out, and
asyncwatch reports nothing on the workloads (a finding there would be a false
positive, and the harness exits with status 3).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"
WORKLOADS = ("task_churn", "call_soon", "tcp_echo", "producer_consumer")


#: A guard against a hung child, not a timing check: the smoke runs take
#: seconds idle and a minute or more on a loaded machine (valgrind's
#: instructions.py took 62 s at load 9), and must never fail for that.
HANG_GUARD_S = 1800


def run_script(*args: str, timeout: float = HANG_GUARD_S) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ASYNCWATCH_")}
    return subprocess.run(
        [sys.executable, *args],
        check=False,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
        cwd=BENCHMARKS.parent,
    )


def table_rows(stdout: str, first_header_cell: str) -> dict[str, list[str]]:
    """The rows of the printed table whose header starts with *first_header_cell*, by their first cell."""
    rows: dict[str, list[str]] = {}
    inside = False
    for line in stdout.splitlines():
        cells = [c.strip() for c in line.split("  ") if c.strip()]
        if not inside:
            inside = bool(cells) and cells[0] == first_header_cell
            continue
        if not cells:
            break
        if not set(line) <= {"-", " "}:
            rows[cells[0]] = cells[1:]
    return rows


def test_run_smoke(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    proc = run_script(str(BENCHMARKS / "run.py"), "--smoke", "--rounds", "1", "--quiet", "--json", str(out))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = proc.stdout.splitlines()
    header = next(line for line in lines if line.startswith("mode ") and "task_churn" in line)
    assert header.split()[1:] == list(WORKLOADS)
    rows = table_rows(proc.stdout, "mode")
    assert len(rows["plain asyncio, median"]) == len(WORKLOADS)
    assert all(cell.endswith(" s") for cell in rows["plain asyncio, median"])
    for mode in ("asyncwatch", "debug"):
        assert len(rows[mode]) == len(WORKLOADS), proc.stdout
        assert all(cell.endswith("x") for cell in rows[mode]), proc.stdout
    if "uvloop" in rows:
        assert len(rows["asyncwatch-uvloop (vs uvloop)"]) == len(WORKLOADS)
    # Every mode is either in the table or skipped with its reason.
    for mode in ("asyncwatch-spans", "aiodebug", "logfire", "otel-asyncio"):
        assert mode in rows or any(line.startswith(f"{mode}: ") and "skipped" in line for line in lines), mode
    rss = table_rows(proc.stdout, "peak RSS (MiB)")
    assert set(rss) >= {"plain", "asyncwatch", "debug"}
    assert "targets: not evaluated with smoke sizes" in proc.stdout
    assert "FAILED" not in proc.stdout and "FALSE POSITIVE" not in proc.stdout

    doc = json.loads(out.read_text())
    assert doc["smoke"] is True
    assert {m["workload"] for m in doc["measurements"]} == set(WORKLOADS)
    assert all(m["error"] is None and m["elapsed_s"] > 0 for m in doc["measurements"])
    assert all(not m["findings"] for m in doc["measurements"])

    again = run_script(str(BENCHMARKS / "run.py"), "--report", str(out), "--markdown")
    assert again.returncode == 0, again.stdout + again.stderr
    assert "| mode | task_churn | call_soon | tcp_echo | producer_consumer |" in again.stdout
    assert "| asyncwatch | " in again.stdout


def test_memory_smoke() -> None:
    proc = run_script(str(BENCHMARKS / "memory.py"), "--smoke")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rows = table_rows(proc.stdout, "mode")
    for mode in ("plain", "asyncwatch"):
        cells = rows[mode]
        assert len(cells) == 7 and all(cell.endswith("MiB") for cell in cells), proc.stdout
    assert "growth over 10,000" in proc.stdout
    assert "targets: not evaluated with smoke sizes" in proc.stdout


def test_child_fails_loudly_on_unknown_mode() -> None:
    proc = run_script(str(BENCHMARKS / "_child.py"), "--workload", "task_churn", "--mode", "nope")
    assert proc.returncode == 2 and "invalid choice" in proc.stderr


@pytest.mark.parametrize("bad", ["task_churn.nope=1", "nope.tasks=1", "task_churn.tasks=many"])
def test_run_rejects_bad_sizes(bad: str) -> None:
    proc = run_script(str(BENCHMARKS / "run.py"), "--smoke", "--size", bad)
    assert proc.returncode == 2 and "--size" in proc.stderr


def test_child_fails_loudly_on_a_finding() -> None:
    """A finding in a workload is a false positive: the child exits with status 3 and says so."""
    code = f"""
import asyncio, sys
sys.path.insert(0, {str(BENCHMARKS)!r})
import workloads, _child

async def fire_and_forget(sizes):
    async def fail():
        raise ValueError("nobody looks")
    task = asyncio.create_task(fail())
    await asyncio.sleep(0.01)
    del task
    return {{}}

workloads.WORKLOADS["task_churn"] = workloads.Workload("task_churn", "", fire_and_forget, {{}}, {{}})
sys.exit(_child.main(["--workload", "task_churn", "--mode", "asyncwatch", "--smoke"]))
"""
    proc = run_script("-c", code)
    assert proc.returncode == 3, proc.stdout + proc.stderr
    assert "task_exception_unretrieved" in proc.stderr and "false positive" in proc.stderr


def test_spans_mode_code_path() -> None:
    """The asyncwatch-spans mode runs once ``install()`` accepts ``spans=`` and
    ``tracer_provider=`` (issue 3); until then, a stand-in that takes them checks the path."""
    pytest.importorskip("opentelemetry.sdk.trace")
    code = f"""
import sys
sys.path.insert(0, {str(BENCHMARKS)!r})
import asyncwatch, _child

real_install = asyncwatch.install
seen = {{}}

def install(*, spans=None, tracer_provider=None, **options):
    if spans is not None:
        seen["spans"] = spans
        seen["tracer_provider"] = type(tracer_provider).__name__
    return real_install(**options)

try:
    real_install(spans="all")
except (asyncwatch.ConfigurationError, TypeError):
    asyncwatch.install = install  # spans not implemented yet: stand in
    status = _child.main(["--workload", "task_churn", "--mode", "asyncwatch-spans", "--smoke"])
    assert seen == {{"spans": "all", "tracer_provider": "TracerProvider"}}, seen
    sys.exit(status)
else:
    asyncwatch.uninstall()
    sys.exit(_child.main(["--workload", "task_churn", "--mode", "asyncwatch-spans", "--smoke"]))
"""
    proc = run_script("-c", code)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    record = json.loads(proc.stdout.splitlines()[-1])
    assert record["mode"] == "asyncwatch-spans" and "spans_exported" in record["info"]


@pytest.mark.skipif(not shutil.which("valgrind"), reason="valgrind is not installed (apt-get install valgrind)")
def test_instructions_smoke() -> None:
    """instructions.py prints the import's GC footprint and a cost per unit for each workload and mode (tiny sizes)."""
    proc = run_script(
        str(BENCHMARKS / "instructions.py"),
        *("--scale", "0.01", "--jobs", "2", "--workloads", "task_churn", "call_soon", "--modes", "plain", "asyncwatch"),
    )
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0].startswith(f"Python {sys.version.split()[0]} ")
    assert re.fullmatch(
        r"  import asyncwatch adds [\d,]+ objects tracked by the garbage collector; with install\(\): [\d,]+", lines[1]
    )
    rows = {line.split()[0]: line.split()[2:] for line in lines[4:]}
    assert list(rows) == ["task_churn", "call_soon"]
    for plain, asyncwatch, ratio in rows.values():
        assert int(plain.replace(",", "")) > 0 and int(asyncwatch.replace(",", "")) > 0
        assert re.fullmatch(r"\(\d\.\d{3}x\)", ratio)
