#!/usr/bin/env python3
"""Other projects' test suites, run four ways, to prove the pytest plugin changes nothing it should not.

    python compat/run_peer_suites.py                      # pytest-asyncio's and anyio's whole suites
    python compat/run_peer_suites.py --suite anyio --subset ci

For each suite the released sdist is fetched from the package index
(``pip download --no-binary :all: --no-deps``) into a work directory, its
package is installed (not editable: its frames are library frames, as for a
user of asyncwatch who runs a library's suite) with the suite's test
dependencies into a virtual environment of its own, asyncwatch from this
checkout beside it, and the suite runs four ways.  It runs from the
unpacked sdist, so a flat-layout package (pytest-asyncio's; anyio keeps its
under ``src/``) is imported from there and its frames are the project's:
its own mistakes then count in the ``fail`` leg (uvicorn's suite, tried
this way, failed one test on uvicorn's own swallowed cancellation):

* ``plain``: ``-p no:asyncwatch`` (asyncwatch is not even loaded);
* ``inert``: asyncwatch installed, not enabled;
* ``report``: ``--asyncwatch --asyncwatch-mode report``;
* ``fail``: ``--asyncwatch`` (a test with a finding that counts fails).

Each test's outcome (passed, failed, error, skipped, xfailed, xpassed, per
node id, setup and teardown included) is recorded by a small plugin and
compared with ``plain``.  Targets: no difference in ``inert`` and
``report``; in ``fail`` only tests with a counted finding differ.  Tests that
fail in ``plain`` too (no network, no IPv6 on this machine) are listed apart.
Every finding of the ``fail`` run is listed by kind and site.

Exit status: 0 on target, 1 when a leg differs from ``plain`` where it must
not, 2 when the suite could not be fetched, installed or run.  ``summary.json``
in the work directory holds everything.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import json
import os
import re
import subprocess
import sys
import tarfile
import tempfile
import time
import tomllib
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
LEGS = ("plain", "inert", "report", "fail")
FAILING = {"failed", "error"}


@dataclasses.dataclass(frozen=True)
class Suite:
    name: str  # on the package index
    version: str
    groups: tuple[str, ...]  # PEP 735 dependency groups (or extras) holding its test requirements
    args: tuple[str, ...] = ()  # pytest arguments for every leg
    # The CI subset: test files chosen to cover every way the suite makes
    # loops, within a couple of minutes for the four legs on one interpreter.
    ci_paths: tuple[str, ...] = ()


SUITES = {
    "pytest-asyncio": Suite(
        "pytest-asyncio",
        "1.5.0",
        ("test",),
        # Most of its suite runs pytest in pytest (pytester): 2-5 s per test
        # on a loaded 2-core machine.  The CI subset keeps the files whose
        # tests are async tests and fixtures themselves (function, module
        # and class scopes, subprocesses, the docs' examples) and one
        # pytester file (inner runs load asyncwatch without enabling it:
        # the inert path): 46 tests, ~15 s a leg.
        ci_paths=(
            "tests/test_simple.py",
            "tests/test_subprocess.py",
            "tests/async_fixtures/test_async_fixtures.py",
            "tests/async_fixtures/test_nested.py",
            "tests/async_fixtures/test_shared_module_fixture.py",
            "tests/markers/test_mixed_scope.py",
            "docs",
        ),
    ),
    "anyio": Suite(
        "anyio",
        "4.16.0",
        ("test",),
        # The trio backend is not installed: those parameters are skipped by
        # anyio's own conftest.  Network tests need the internet.
        args=("-m", "not network"),
        # The CI subset: task groups (cancellation, the bulk of what
        # asyncwatch watches), threads (thread counts, a loop's leak check
        # through gc), the event loop and debugging helpers, and the module
        # that stopped collection before.  Sockets are left out: with no
        # IPv6 on this machine a third of them fail in every leg.
        ci_paths=(
            "tests/test_taskgroups.py",
            "tests/test_to_thread.py",
            "tests/test_eventloop.py",
            "tests/test_debugging.py",
            "tests/test_all_attributes.py",
        ),
    ),
}

# A plugin loaded into every leg (``-p``): each test's outcome, per node id.
OUTCOMES_PLUGIN = """
import json, os

_results = {}

def pytest_runtest_logreport(report):
    entry = _results.setdefault(report.nodeid, {"outcome": "passed", "phases": {}})
    outcome = report.outcome
    if hasattr(report, "wasxfail"):
        outcome = "xfailed" if report.skipped else "xpassed"
    entry["phases"][report.when] = outcome
    if report.when == "call" or outcome != "passed":
        if report.when != "call" and report.failed:
            entry["outcome"] = "error"
        elif entry["outcome"] != "error":
            entry["outcome"] = outcome
    if report.failed and "why" not in entry:
        entry["why"] = str(report.longreprtext).strip().splitlines()[-1:][0][:300] if report.longreprtext else ""

def pytest_collectreport(report):
    if report.failed:
        _results[report.nodeid or "<collection>"] = {
            "outcome": "collection error", "phases": {}, "why": str(report.longreprtext)[-300:]
        }

def pytest_sessionfinish(session, exitstatus):
    if hasattr(session.config, "workerinput"):
        return
    with open(os.environ["PEER_OUTCOMES"], "w") as f:
        json.dump({"exitstatus": int(exitstatus), "tests": _results}, f)
"""


def run(cmd: list[str], **kwargs: Any) -> subprocess.CompletedProcess[str]:
    print("+", " ".join(cmd), flush=True)
    return subprocess.run(cmd, text=True, **kwargs)


def prepare(suite: Suite, work: Path, python: str) -> tuple[Path, Path]:
    """Fetch, unpack and install *suite*; return (its source tree, its venv's python)."""
    sdists = work / "sdists"
    sdists.mkdir(parents=True, exist_ok=True)
    pin = f"{suite.name}=={suite.version}"
    found = [p for p in sdists.iterdir() if p.name.startswith(suite.name.replace("-", "_") + "-" + suite.version)]
    if not found:
        cmd = [python, "-m", "pip", "download", "-q", "--no-binary", ":all:", "--no-deps", pin, "-d", str(sdists)]
        if run(cmd).returncode != 0:
            raise SystemExit(f"cannot download {pin} from the package index")
        found = [p for p in sdists.iterdir() if p.name.startswith(suite.name.replace("-", "_") + "-" + suite.version)]
    sdist = found[0]
    tree = work / sdist.name.removesuffix(".tar.gz")
    if not tree.exists():
        with tarfile.open(sdist) as tar:
            tar.extractall(work, filter="data")
    venv = work / f"venv-{suite.name}-{sys.version_info[0]}.{sys.version_info[1]}"
    vpython = venv / "bin" / "python"
    stamp = venv / ".installed"
    if not stamp.exists():
        if run([python, "-m", "venv", str(venv)]).returncode != 0:
            raise SystemExit(f"cannot make a virtual environment in {venv}")
        requirements = test_requirements(tree / "pyproject.toml", suite.groups)
        cmd = [str(vpython), "-m", "pip", "install", "-q", str(sdist), *requirements]
        if run(cmd).returncode != 0:
            raise SystemExit(f"cannot install {pin} and its test requirements: {requirements}")
        stamp.write_text("\n".join(requirements))
    # asyncwatch from this checkout, every time (it is what is under test).
    if run([str(vpython), "-m", "pip", "install", "-q", "--no-deps", "--force-reinstall", str(ROOT)]).returncode:
        raise SystemExit("cannot install asyncwatch from this checkout")
    # its dependencies once (structlog, opentelemetry-api)
    if run([str(vpython), "-m", "pip", "install", "-q", str(ROOT)]).returncode:
        raise SystemExit("cannot install asyncwatch's dependencies")
    return tree, vpython


def test_requirements(pyproject: Path, groups: tuple[str, ...]) -> list[str]:
    """The requirements of *groups* (PEP 735 dependency groups, else extras)."""
    data = tomllib.loads(pyproject.read_text())
    table = data.get("dependency-groups", {})
    extras = data.get("project", {}).get("optional-dependencies", {})
    out: list[str] = []

    def add(group: str) -> None:
        for entry in table.get(group, extras.get(group, [])):
            if isinstance(entry, dict):
                add(entry["include-group"])
            else:
                out.append(" ".join(entry.split()))

    for group in groups:
        add(group)
    # Not what is under test here, and pytest-cov would need a configured run.
    return [r for r in out if not re.match(r"(coverage|pytest-cov)\b", r)]


def run_leg(
    suite: Suite, leg: str, tree: Path, vpython: Path, out: Path, paths: list[str], extra: list[str]
) -> dict[str, Any]:
    out.mkdir(parents=True, exist_ok=True)
    (out / "_peer_outcomes.py").write_text(OUTCOMES_PLUGIN)
    results = out / f"{leg}.json"
    findings = out / f"{leg}.findings.jsonl"
    findings.unlink(missing_ok=True)
    args = [str(vpython), "-m", "pytest", "-p", "_peer_outcomes", "-p", "no:cacheprovider", "-q", "--no-header"]
    args += ["-p", "no:randomly", *suite.args, *extra]
    if leg == "plain":
        args += ["-p", "no:asyncwatch"]
    elif leg == "report":
        args += ["--asyncwatch", "--asyncwatch-mode", "report", f"--asyncwatch-findings={findings}"]
    elif leg == "fail":
        args += ["--asyncwatch", f"--asyncwatch-findings={findings}"]
    args += paths
    env = {**os.environ, "PYTHONPATH": str(out), "PEER_OUTCOMES": str(results), "PYTHONDONTWRITEBYTECODE": "1"}
    env = {k: v for k, v in env.items() if not k.startswith("ASYNCWATCH_")}
    started = time.monotonic()
    proc = run(args, cwd=tree, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    seconds = time.monotonic() - started
    (out / f"{leg}.log").write_text(proc.stdout)
    if not results.exists():
        tail = "\n".join(proc.stdout.splitlines()[-30:])
        raise SystemExit(f"{suite.name} {leg}: pytest ended ({proc.returncode}) without results:\n{tail}")
    data = json.loads(results.read_text())
    data["seconds"] = round(seconds, 1)
    data["findings"] = [json.loads(line) for line in findings.read_text().splitlines()] if findings.exists() else []
    return data


def recheck(
    suite: Suite, legs: dict[str, dict[str, Any]], tree: Path, vpython: Path, out: Path, extra: list[str]
) -> None:
    """Run each test that differs from ``plain`` again, both ways, twice: a
    difference that does not come back, or a test whose plain outcome
    changes, is the suite's own flakiness (timing races on a loaded machine;
    an automatic garbage collection that happens to run in this test and
    finalizes another test's unclosed sockets, which ``filterwarnings =
    error`` turns into a failure), listed as such rather than blamed on
    asyncwatch."""
    plain = legs["plain"]["tests"]
    for leg, data in legs.items():
        if leg == "plain":
            continue
        differing = sorted(k for k, v in data["tests"].items() if v["outcome"] != plain.get(k, {}).get("outcome"))
        differing = [k for k in differing if "::" in k][:200]
        data["flaky"] = {}
        if not differing:
            continue
        outcomes: dict[str, dict[str, set[str]]] = {k: {"plain": set(), leg: set()} for k in differing}
        for attempt in (1, 2):
            for way in ("plain", leg):
                again = run_leg(suite, way, tree, vpython, out / f"recheck-{leg}-{attempt}", differing, extra)
                for k in differing:
                    outcomes[k][way].add(again["tests"].get(k, {}).get("outcome", "absent"))
        for k in differing:
            first_plain, first_leg = plain.get(k, {}).get("outcome", "absent"), data["tests"][k]["outcome"]
            seen_plain = outcomes[k]["plain"] | {first_plain}
            seen_leg = outcomes[k][leg] | {first_leg}
            if len(seen_plain) > 1 or len(seen_leg) > 1 or seen_plain & seen_leg:
                data["flaky"][k] = {"plain": sorted(seen_plain), leg: sorted(seen_leg)}


def compare(name: str, legs: dict[str, dict[str, Any]]) -> dict[str, Any]:
    plain = legs["plain"]["tests"]
    out: dict[str, Any] = {
        "tests": len(plain),
        "seconds": {leg: legs[leg]["seconds"] for leg in legs},
        "failing_plain": sorted(k for k, v in plain.items() if v["outcome"] in ("failed", "error", "collection error")),
    }
    for leg in LEGS[1:]:
        if leg not in legs:
            continue
        tests = legs[leg]["tests"]
        with_findings = {f.get("nodeid") for f in legs[leg]["findings"] if f.get("counts", True)}
        diffs = []
        for nodeid in sorted(set(plain) | set(tests)):
            a = plain.get(nodeid, {}).get("outcome", "absent")
            b = tests.get(nodeid, {}).get("outcome", "absent")
            if a != b:
                diffs.append(
                    {
                        "test": nodeid,
                        "plain": a,
                        leg: b,
                        "has_finding": nodeid in with_findings,
                        "why": tests.get(nodeid, {}).get("why", ""),
                    }
                )
        flaky = legs[leg].get("flaky", {})
        for d in diffs:
            d["flaky"] = flaky.get(d["test"])
            # A test failing both ways, once as a failure and once with an
            # error at teardown as well: its own unclosed resources, which
            # asyncwatch's collection after its teardown finalizes there
            # (plain, the interpreter finalizes them in some later test).
            d["failing_both_ways"] = {d["plain"], d[leg]} <= FAILING
        allowed = [d for d in diffs if (leg == "fail" and d["has_finding"]) or d["flaky"] or d["failing_both_ways"]]
        out[leg] = {
            "differences": diffs,
            "flaky": [d for d in diffs if d["flaky"]],
            "failing_both_ways": [d for d in diffs if d["failing_both_ways"] and not d["flaky"]],
            "unexplained": [d for d in diffs if d not in allowed],
        }
    findings = legs.get("fail", {}).get("findings", [])
    distinct: collections.Counter[tuple[str, str, bool]] = collections.Counter()
    for f in findings:
        site = f.get("site")
        where = f"{site['file']}:{site['line']} in {site['function']}" if site else "(site unknown)"
        distinct[(f["kind"], where, f.get("counts", True))] += 1
    out["distinct_findings"] = [
        {"kind": k, "site": s, "counts": c, "times": n} for (k, s, c), n in sorted(distinct.items())
    ]
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--suite", action="append", choices=sorted(SUITES), help="default: every suite")
    parser.add_argument("--subset", choices=("all", "ci"), default="all", help="ci: the files of Suite.ci_paths")
    parser.add_argument("--legs", nargs="+", choices=LEGS, default=list(LEGS))
    parser.add_argument("--work", type=Path, default=None, help="work directory (default: a new temporary one)")
    parser.add_argument("--python", default=sys.executable, help="the interpreter for the suites' venvs")
    parser.add_argument("pytest_args", nargs="*", help="more pytest arguments for every leg (after --)")
    ns = parser.parse_args(argv)
    work = ns.work or Path(tempfile.mkdtemp(prefix="asyncwatch-peers-"))
    work = work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    legs = ["plain", *[leg for leg in ns.legs if leg != "plain"]]
    summary: dict[str, Any] = {}
    status = 0
    for name in ns.suite or sorted(SUITES):
        suite = SUITES[name]
        tree, vpython = prepare(suite, work, ns.python)
        paths = list(suite.ci_paths) if ns.subset == "ci" else []
        out = work / f"out-{name}"
        results = {leg: run_leg(suite, leg, tree, vpython, out, paths, ns.pytest_args) for leg in legs}
        recheck(suite, results, tree, vpython, out, ns.pytest_args)
        report = summary[name] = compare(name, results)
        print(f"\n== {name} {suite.version}: {report['tests']} tests; seconds per leg {report['seconds']}")
        print(f"   failing in plain too ({len(report['failing_plain'])}): {report['failing_plain'][:20]}")
        for leg in legs[1:]:
            diffs = report[leg]["differences"]
            bad = report[leg]["unexplained"]
            flaky = report[leg]["flaky"]
            print(
                f"   {leg}: {len(diffs)} differences from plain: {len(flaky)} not reproducible (the suite's own "
                f"races, or another test's garbage collected there by chance), {len(bad)} not explained by a finding"
            )
            for d in flaky:
                print(f"      flaky: {d['test']}: {d['flaky']}")
            for d in report[leg]["failing_both_ways"]:
                print(f"      failing both ways: {d['test']}: {d['plain']} -> {d[leg]}")
            for d in bad[:40]:
                print(f"      {d['test']}: {d['plain']} -> {d[leg]}  {d['why']}")
            if bad:
                status = 1
        print(f"   distinct findings in the fail leg ({len(report['distinct_findings'])}):")
        for f in report["distinct_findings"]:
            print(f"      {f['kind']} at {f['site']} ({'counts' if f['counts'] else 'reported only'}) x{f['times']}")
    (work / "summary.json").write_text(json.dumps(summary, indent=2))
    print(f"\nsummary: {work / 'summary.json'}")
    return status


if __name__ == "__main__":
    sys.exit(main())
