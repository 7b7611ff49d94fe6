#!/usr/bin/env python3
"""CPython's own asyncio tests, run with asyncwatch on every event loop, compared with a plain run.

    python compat/run_test_asyncio.py          # watched; what fails is run again plain
    python compat/run_test_asyncio.py --full   # and the whole suite plain as well

The standard library ships its asyncio tests as ``test.test_asyncio`` (about
2,400 tests).  This runs them with unittest, split by test class over a few
worker processes:

* **watched**: `asyncwatch.install()` before any test code, so that every loop
  a test creates (through the policy, ``asyncio.Runner``, ``new_event_loop``,
  ``test_utils.TestLoop``, by hand...) is watched, from its creation when the
  policy makes it (the runner puts asyncwatch's policy back before each test:
  the suite resets it), else once it runs; every detector on, coroutine origins tracked, and a span for every task (``spans="all"``)
  through an OpenTelemetry SDK `TracerProvider` whose exporter counts spans
  and drops them.  Each finding goes to ``findings.jsonl`` with the id of the
  test that was running.  The run counts the loops asyncwatch attached to, and
  checks that every loop that started running was watched by then.
* **plain**: the same tests, the same way, without asyncwatch: by default only
  those that failed watched (which are also retried watched in a fresh
  process, as regrtest's ``--rerun`` does), or all of them with ``--full``.

A **regression** is a test that fails watched, again on the retry, and passes
plain.  The run exits with status 1 when there is one, when asyncwatch logged
an internal error (a part of it switched itself off), when a watched worker
died, when an entry of `SKIP_LIST` is no longer true, or when a finding is
not one of the suite's deliberate mistakes listed in `KNOWN_FINDINGS`; with 2
when it could not run at all.  ``summary.json`` in the output directory has everything.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import faulthandler
import gc
import importlib
import json
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import unittest
from collections.abc import Callable, Iterable, Iterator, MutableMapping
from pathlib import Path
from typing import IO, Any, NoReturn

SUITE = "test.test_asyncio"

#: Where ``test.test_asyncio`` comes from when an interpreter lacks it.
TESTSUITE_PACKAGE = (
    "the interpreter's own test package (Lib/test): python.org and pyenv builds include it; "
    "on Debian and Ubuntu install libpython{v}-testsuite"
)

#: Tests that observe asyncwatch itself, not asyncio's behaviour.  Each is run
#: watched all the same, and must still fail watched and pass plain, else the
#: entry is stale and the run fails.  Test id -> why it differs.
SKIP_LIST: dict[str, str] = {
    "test.test_asyncio.test_base_events.BaseEventLoopWithSelectorTests.test_log_slow_callbacks": (
        "asserts that the last callback asyncio's debug mode logged (with slow_callback_duration=0, every one "
        "is) is its own; asyncwatch's watchdog heartbeat, queued when the loop starts, runs after it"
    ),
    "test.test_asyncio.test_pep492.CoroutineTests.test_debug_mode_manages_coroutine_origin_tracking": (
        "asserts that the coroutine origin tracking depth is 0 outside asyncio's debug mode; "
        "track_coroutine_origins=True sets it to 8"
    ),
}

#: The findings the suite makes, each a real mistake made on purpose:
#: (kind, test method) -> what the test does.  Any other finding is
#: unclassified and fails the run: a new mistake in the suite (classify it
#: here) or a false positive of asyncwatch (fix it).  Not slow_callback:
#: whether a step crosses 100 ms depends on the machine and its load.
KNOWN_FINDINGS: dict[tuple[str, str], str] = {
    ("coroutine_never_awaited", "test_run_until_complete_nesting"): (
        "calls loop.run_until_complete(coro1()) inside the running loop, which refuses before awaiting coro1(); "
        "the test asserts the RuntimeWarning"
    ),
    ("coroutine_never_awaited", "test_recursive_run"): (
        "calls runner.run(g()) inside the running Runner, which refuses before awaiting g(); "
        "the test asserts the RuntimeWarning"
    ),
    ("cancellation_swallowed", "test_timeout_after_cancellation"): (
        "the test's task cancels itself and ends in 'except CancelledError: pass', then tests a timeout"
    ),
    ("cancellation_swallowed", "test_cancel_in_timeout_after_cancellation"): (
        "the test's task cancels itself and ends in 'except CancelledError: pass', then tests a cancel in a timeout"
    ),
    ("cancellation_swallowed", "test_foreign_cancel_doesnt_timeout_if_not_expired"): (
        "the test's task cancels itself inside asyncio.timeout() and catches the CancelledError with assertRaises"
    ),
    ("cancellation_swallowed", "test_asyncio_wait_for_cancelled"): (
        "SlowTask.run ignores cancellation by design ('except CancelledError: pass'); from 3.12 wait_for() "
        "runs it in the cancelled task itself (3.11 runs it in an inner task that wait_for cancels)"
    ),
    ("cancellation_swallowed", "test_asyncio_wait_for_timeout"): (
        "SlowTask.run ignores cancellation by design ('except CancelledError: pass') and wait_for() times out "
        "on it: wait_for returns instead of raising TimeoutError, which the test is about"
    ),
    ("cancellation_swallowed", "test_wait_for_cancellation_race_condition"): (
        "inner() catches wait_for's CancelledError with assertRaises and returns 1 on purpose: the test checks "
        "that wait_for then returns the value"
    ),
    ("cancellation_swallowed", "test_timeout_expiring"): (
        "the test catches the expiring timeout's CancelledError with assertRaises inside the block, on purpose, "
        "to test reschedule() while the timeout is expiring"
    ),
    ("cancellation_swallowed", "test_wait_for_cancel_suppressed"): (
        "return_42 suppresses wait_for's CancelledError and returns 42 on purpose (3.12+, gh-86296: "
        "'Supressing CancelledError is discouraged'); the test checks that wait_for returns the value"
    ),
    ("cancellation_swallowed", "test_taskgroup_no_create_task_after_failure"): (
        "coro2 catches the CancelledError of the TaskGroup's abort to test create_task() after a failure, and "
        "returns normally: the group never uncancels its children, so that is a swallowed cancellation"
    ),
    ("task_exception_unretrieved", "test_default_exc_handler_coro"): (
        "drops a failed task on purpose to test asyncio's 'exception was never retrieved' log"
    ),
}

#: Finding kinds whose presence depends on timing; reported, never unclassified.
TIMING_KINDS = frozenset({"slow_callback"})

#: Outcomes that count as failing.
FAILING = frozenset({"failure", "error", "unexpected_success", "crash"})

#: asyncwatch's options in the watched run.
WATCHED_OPTIONS: dict[str, Any] = {
    "detect": "all",
    "spans": "all",
    "track_coroutine_origins": True,
    "log": False,  # findings go to the runner's reporter; asyncwatch's own log events are captured
}

#: A test that runs longer than this is stopped: its worker dumps the stacks
#: and exits, and the run goes on with the next test in a new worker.
PER_TEST_TIMEOUT_S = 300.0


# --- the worker: runs a list of tests, watched or plain ------------------------


class _Current:
    """The test running now, to attribute findings (read from any thread)."""

    test: str | None = None
    last: str | None = None


class _Journal:
    """One JSON object per line, flushed at once: a worker that dies loses nothing."""

    def __init__(self, path: str) -> None:
        self._file: IO[str] = open(path, "a", encoding="utf-8")  # noqa: SIM115 - closed in close()
        self._lock = threading.Lock()

    def write(self, record: dict[str, Any]) -> None:
        line = json.dumps(record, ensure_ascii=False, default=str) + "\n"
        with self._lock:
            self._file.write(line)
            self._file.flush()

    def close(self) -> None:
        with self._lock:
            self._file.close()


def _traceback_tail(err: Any) -> str:
    lines = [line for line in "".join(traceback.format_exception(*err)).splitlines() if line.strip()]
    return "\n".join(lines[-12:])


class _Result(unittest.TestResult):
    """Writes each test's outcome to the journal; calls *before* and *after* around each test."""

    def __init__(self, journal: _Journal, before: Callable[[], None], after: Callable[[], None]) -> None:
        super().__init__()
        self._journal = journal
        self._before = before
        self._after = after
        self._outcome: dict[str, tuple[str, str]] = {}
        self._started = 0.0

    def startTest(self, test: unittest.TestCase) -> None:  # noqa: N802 - unittest's name
        test_id = test.id()
        self._journal.write({"start": test_id})
        _Current.test = _Current.last = test_id
        faulthandler.dump_traceback_later(PER_TEST_TIMEOUT_S, exit=True)
        self._before()
        self._started = time.perf_counter()
        super().startTest(test)

    def stopTest(self, test: unittest.TestCase) -> None:  # noqa: N802
        super().stopTest(test)
        duration = round(time.perf_counter() - self._started, 3)
        faulthandler.cancel_dump_traceback_later()
        test_id = test.id()
        outcome, detail = self._outcome.pop(test_id, ("pass", ""))
        self._after()
        _Current.test = None
        self._journal.write({"test": test_id, "outcome": outcome, "detail": detail, "duration_s": duration})

    def _set(self, test: Any, outcome: str, detail: str = "") -> None:
        test_id = test.id()
        if not isinstance(test, unittest.TestCase):
            # A class or module fixture (setUpClass...) that failed: it has no start or stop.
            self._journal.write({"test": test_id, "outcome": outcome, "detail": detail, "duration_s": 0.0})
            return
        previous = self._outcome.get(test_id)
        if previous is None or previous[0] in ("pass", "skip"):
            self._outcome[test_id] = (outcome, detail)

    def addSuccess(self, test: unittest.TestCase) -> None:  # noqa: N802
        super().addSuccess(test)
        self._set(test, "pass")

    def addFailure(self, test: Any, err: Any) -> None:  # noqa: N802
        super().addFailure(test, err)
        self._set(test, "failure", _traceback_tail(err))

    def addError(self, test: Any, err: Any) -> None:  # noqa: N802
        super().addError(test, err)
        self._set(test, "error", _traceback_tail(err))

    def addSkip(self, test: Any, reason: str) -> None:  # noqa: N802
        super().addSkip(test, reason)
        self._set(test, "skip", reason)

    def addExpectedFailure(self, test: unittest.TestCase, err: Any) -> None:  # noqa: N802
        super().addExpectedFailure(test, err)
        self._set(test, "expected_failure")

    def addUnexpectedSuccess(self, test: unittest.TestCase) -> None:  # noqa: N802
        super().addUnexpectedSuccess(test)
        self._set(test, "unexpected_success")

    def addSubTest(self, test: unittest.TestCase, subtest: unittest.TestCase, err: Any) -> None:  # noqa: N802
        super().addSubTest(test, subtest, err)
        if err is not None:
            outcome = "failure" if issubclass(err[0], test.failureException) else "error"
            self._set(test, outcome, f"{subtest.id()}\n{_traceback_tail(err)}")


def _flatten(suite: Iterable[Any]) -> Iterator[Any]:
    for item in suite:
        if isinstance(item, unittest.TestSuite):
            yield from _flatten(item)
        else:
            yield item


def load_tests() -> list[Any]:
    """Every test of the suite, in unittest's order (module, class, method)."""
    return list(_flatten(unittest.defaultTestLoader.loadTestsFromName(SUITE)))


class _Watch:
    """asyncwatch on every loop, and what the run learns about it.

    Counting attachments wraps the engine's ``attach`` and asyncio's
    ``_set_running_loop`` (outside asyncwatch's own hook): private names,
    used only to prove that asyncwatch really was there.
    """

    def __init__(self, journal: _Journal, policy_per_test: bool) -> None:
        import asyncio.events

        import structlog
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import SimpleSpanProcessor, SpanExporter, SpanExportResult

        import asyncwatch
        from asyncwatch._engine import current_engine

        self.journal = journal
        self.policy_per_test = policy_per_test
        self.findings: collections.Counter[str] = collections.Counter()
        self.spans = 0
        self.finding_events = 0
        self.attached = 0
        self.attached_types: collections.Counter[str] = collections.Counter()
        self.not_loops: list[str] = []
        self.runs = 0
        self.runs_unwatched: list[str] = []
        self.tests_with_loops = 0
        self.early_tasks = 0
        self.early_tests: set[str] = set()
        self.factory_not_ours: set[str] = set()
        self.internal_errors = 0
        self.runner_errors: list[str] = []
        self.policy_rewraps = 0
        self._attached_before = 0
        watch = self

        class CountingExporter(SpanExporter):
            """Counts spans and the findings on them; keeps nothing, so memory stays flat."""

            def export(self, spans: Any) -> Any:
                for span in spans:
                    watch.spans += 1
                    watch.finding_events += sum(1 for e in span.events if e.name.startswith("asyncwatch."))
                return SpanExportResult.SUCCESS

            def shutdown(self) -> None:
                pass

        def capture_log(_logger: Any, _method: str, event: MutableMapping[str, Any]) -> NoReturn:
            # asyncwatch's own log events (findings are not logged: log=False).
            # An internal error means a part of asyncwatch switched itself off.
            if event.get("event") == "asyncwatch.internal_error":
                record: dict[str, Any] = {k: str(v) for k, v in event.items() if k != "exc_info"}
                record["test"] = _Current.test or _Current.last
                watch.internal_errors += 1
                journal.write({"internal_error": record})
            raise structlog.DropEvent

        structlog.configure(processors=[capture_log])

        provider = TracerProvider()
        provider.add_span_processor(SimpleSpanProcessor(CountingExporter()))
        asyncwatch.install(tracer_provider=provider, reporters=[self], **WATCHED_OPTIONS)
        engine = current_engine()
        if engine is None:
            raise RuntimeError("asyncwatch.install() started no engine")
        self.engine: Any = engine

        attach = engine.attach

        def counting_attach(loop: Any, settings: Any = None) -> Any:
            if not engine.is_watching(loop):
                watch.attached += 1
                watch.attached_types[type(loop).__qualname__] += 1
                if not isinstance(loop, asyncio.AbstractEventLoop):
                    watch.not_loops.append(f"{type(loop).__qualname__} in {_Current.test}")
            return attach(loop, settings)

        engine.attach = counting_attach  # type: ignore[method-assign]

        set_running_loop = asyncio.events._set_running_loop

        def checking_set_running_loop(loop: Any) -> None:
            seen = loop is None or engine.is_watching(loop)
            set_running_loop(loop)
            if loop is not None:
                try:
                    watch.check_running(loop, seen)
                except Exception as exc:  # the runner's own bookkeeping must never fail a test
                    watch.runner_errors.append(f"{type(exc).__name__}: {exc} in {_Current.test}")

        asyncio.events._set_running_loop = checking_set_running_loop

        # The watchdog thread starts with the first watched loop: start it
        # now, so that the tests' thread-leak checks (threading_cleanup)
        # never see it appear during a test.
        loop = asyncio.new_event_loop()
        try:
            loop.run_until_complete(asyncio.sleep(0))
        finally:
            loop.close()
        suite = importlib.import_module(SUITE)
        folder = os.path.dirname(os.path.abspath(str(suite.__file__)))
        self._suite_files = [os.path.join(folder, n) for n in sorted(os.listdir(folder)) if n.endswith(".py")]

    def check_running(self, loop: Any, seen: bool) -> None:
        """*loop* started running: was it watched by then, and how?"""
        import asyncio

        self.runs += 1
        if not self.engine.is_watching(loop):
            self.runs_unwatched.append(f"{type(loop).__qualname__} in {_Current.test}")
            return
        test = _Current.test or ""
        if not seen and isinstance(loop, asyncio.AbstractEventLoop):
            early = len(asyncio.all_tasks(loop))
            if early:  # made before asyncwatch could see them: no creation site, no cancel() tracking
                self.early_tasks += early
                self.early_tests.add(test)
        # The program may set its own task factory after asyncwatch attached:
        # asyncwatch's is then gone from the loop, or only chained by it.
        factory = getattr(self.engine.watches.get(loop), "factory", None)
        if factory is None or loop.get_task_factory() is not factory.function:
            self.factory_not_ours.add(test)

    def report(self, finding: Any) -> None:
        """asyncwatch `Reporter`: write the finding, with the test it came from."""
        record = finding.to_dict()
        record["test"] = _Current.test or _Current.last
        record["during_test"] = _Current.test is not None
        self.findings[record["kind"]] += 1
        self.journal.write({"finding": record})

    def before(self) -> None:
        """Before each test."""
        self._attached_before = self.attached
        # The suite is the application here, though it lives in the standard
        # library's directory: let sites point into its files rather than be
        # None.  asyncwatch caches its answer per file name (a cache that is
        # emptied when it grows), so this is renewed before every test.
        with contextlib.suppress(ImportError):
            from asyncwatch._core.frames import _is_library_cache

            for path in self._suite_files:
                _is_library_cache[path] = False
        if self.policy_per_test:
            self._rewrap_policy()

    def _rewrap_policy(self) -> None:
        # test_asyncio sets the event-loop policy back to None in most of its
        # tearDowns, which drops the one install() put in place.  Put it back
        # before every test, as a program that installed asyncwatch has it:
        # loops made through the policy are then watched from their creation
        # (with the tasks made before they first run), not only once they run.
        import asyncwatch
        from asyncwatch._policy import get_policy, set_policy

        policy = get_policy()
        if not isinstance(policy, asyncwatch.EventLoopPolicy):
            set_policy(asyncwatch.EventLoopPolicy(policy))
            self.policy_rewraps += 1

    def after(self) -> None:
        """After each test."""
        if self.attached > self._attached_before:
            self.tests_with_loops += 1

    def stats(self) -> dict[str, Any]:
        return {
            "loops_attached": self.attached,
            "loop_types": dict(self.attached_types.most_common()),
            "attached_not_a_loop": self.not_loops,
            "loop_runs": self.runs,
            "loop_runs_unwatched": self.runs_unwatched,
            "tests_that_attached_a_loop": self.tests_with_loops,
            "tasks_made_before_attach": self.early_tasks,
            "tests_with_tasks_made_before_attach": sorted(self.early_tests),
            "tests_that_ran_a_loop_without_asyncwatchs_task_factory": sorted(self.factory_not_ours),
            "policy_rewraps": self.policy_rewraps,
            "spans": self.spans,
            "finding_events_on_spans": self.finding_events,
            "findings": dict(self.findings),
            "internal_errors": self.internal_errors,
            "runner_errors": self.runner_errors,
        }


def worker(mode: str, ids_file: str, journal_path: str, collect: bool, policy_per_test: bool) -> int:
    """Run the tests listed in *ids_file*, in that order; write the journal.

    Watched: install asyncwatch before any test module is imported.
    """
    journal = _Journal(journal_path)
    watch = _Watch(journal, policy_per_test) if mode == "watched" else None
    wanted = [line.strip() for line in Path(ids_file).read_text(encoding="utf-8").splitlines() if line.strip()]
    index = {test_id: n for n, test_id in enumerate(wanted)}
    tests = sorted((t for t in load_tests() if t.id() in index), key=lambda t: index[t.id()])
    suite = unittest.TestSuite(tests)
    del tests  # the suite drops each test once it has run: keep no other reference

    gc_time = 0.0

    def before() -> None:
        if watch is not None:
            watch.before()

    def after() -> None:
        nonlocal gc_time
        if collect:
            # The findings the collector makes (a pending task destroyed, a
            # coroutine never awaited) then go to the test that left the
            # garbage, not to whichever test the collector happens to run in.
            start = time.perf_counter()
            gc.collect()
            gc_time += time.perf_counter() - start
        if watch is not None:
            watch.after()

    result = _Result(journal, before, after)
    started = time.perf_counter()
    result.startTestRun()
    suite.run(result)
    result.stopTestRun()
    stats: dict[str, Any] = {"mode": mode, "duration_s": round(time.perf_counter() - started, 2)}
    stats["gc_s"] = round(gc_time, 2)
    if watch is not None:
        stats.update(watch.stats())
    journal.write({"stats": stats})
    journal.close()
    return 0


# --- the parent: shards, phases, comparison -------------------------------------


class _WorkerFailed(Exception):
    """A worker died before its first test: nothing can be compared."""


class _Phase:
    """The outcomes of one mode over some tests, merged from its workers' journals."""

    def __init__(self, mode: str) -> None:
        self.mode = mode
        self.outcomes: dict[str, str] = {}
        self.details: dict[str, str] = {}
        self.findings: list[dict[str, Any]] = []
        self.internal_errors: list[dict[str, Any]] = []
        self.stats: list[dict[str, Any]] = []
        self.crashes: list[str] = []
        self.exit_problems: list[str] = []
        self.wall_s = 0.0

    def failing(self) -> list[str]:
        return sorted(t for t, o in self.outcomes.items() if o in FAILING)

    def read(self, journal: Path) -> tuple[bool, str | None]:
        """Merge one worker's journal: whether it started any test, and the
        test it started and never finished."""
        started = False
        running: str | None = None
        if not journal.exists():
            return False, None
        for line in journal.read_text(encoding="utf-8").splitlines():
            try:
                record = json.loads(line)
            except ValueError:
                continue  # the last line of a killed worker
            if "start" in record:
                started = True
                running = record["start"]
            elif "outcome" in record:
                self.outcomes[record["test"]] = record["outcome"]
                if record["detail"]:
                    self.details[record["test"]] = record["detail"]
                if record["test"] == running:
                    running = None
            elif "finding" in record:
                self.findings.append(record["finding"])
            elif "internal_error" in record:
                self.internal_errors.append(record["internal_error"])
            elif "stats" in record:
                self.stats.append(record["stats"])
        return started, running


def _worker_env() -> dict[str, str]:
    # The same environment for both modes; asyncwatch's own variables would
    # change the watched run's settings, and only those.
    env = {k: v for k, v in os.environ.items() if not k.startswith("ASYNCWATCH_")}
    env["PYTHONFAULTHANDLER"] = "1"
    return env


def run_phase(
    mode: str,
    shards: list[list[str]],
    out: Path,
    label: str,
    flags: list[str],
    timeout_s: float,
    log: Callable[[str], None],
) -> _Phase:
    """Run *shards* of tests in parallel workers.

    A worker that dies (a crash, or a test past `PER_TEST_TIMEOUT_S`) is
    replaced by one that runs the tests it had not reached; the test it was
    running counts as a crash.
    """
    phase = _Phase(mode)
    started = time.perf_counter()
    pending = [(n, ids) for n, ids in enumerate(shards) if ids]
    attempt = 0
    while pending:
        procs = []
        for n, ids in pending:
            stem = f"{label}-{n}" + (f"-restart{attempt}" if attempt else "")
            ids_file = out / f"{stem}.ids"
            ids_file.write_text("\n".join(ids) + "\n", encoding="utf-8")
            journal = out / f"{stem}.jsonl"
            journal.unlink(missing_ok=True)
            logfile = open(out / f"{stem}.log", "w", encoding="utf-8")  # noqa: SIM115 - closed below
            cwd = out / f"{stem}.cwd"  # the tests' temporary files (os_helper.TESTFN) go here
            cwd.mkdir(exist_ok=True)
            cmd = [sys.executable, os.path.abspath(__file__), "--worker", mode, str(ids_file), str(journal), *flags]
            proc = subprocess.Popen(
                cmd, stdout=logfile, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=_worker_env(), cwd=cwd
            )
            procs.append((n, ids, journal, proc, logfile))
        pending = []
        for n, ids, journal, proc, logfile in procs:
            try:
                code = proc.wait(timeout=max(1.0, timeout_s - (time.perf_counter() - started)))
            except subprocess.TimeoutExpired:
                proc.kill()
                code = proc.wait()
                log(f"{label}: worker {n} killed after {timeout_s:.0f} s")
            logfile.close()
            any_test, running = phase.read(journal)
            if code == 0 and running is None:
                continue
            if not any_test:
                tail = Path(logfile.name).read_text(encoding="utf-8", errors="replace")[-3000:]
                raise _WorkerFailed(f"{label} worker {n} exited with status {code} before its first test:\n{tail}")
            rest = [t for t in ids if t not in phase.outcomes and t != running]
            if running is not None:
                phase.outcomes[running] = "crash"
                phase.details[running] = f"its worker exited with status {code} while running it; see {logfile.name}"
                phase.crashes.append(running)
            elif not rest:
                phase.exit_problems.append(f"{label} worker {n} exited with status {code} after its last test")
            if rest and time.perf_counter() - started < timeout_s and attempt < 10:
                pending.append((n, rest))
            else:
                for test_id in rest:
                    phase.outcomes[test_id] = "crash"
                    phase.details[test_id] = "never run: its worker kept dying, or the phase timed out"
        attempt += 1
    phase.wall_s = round(time.perf_counter() - started, 1)
    return phase


#: Rough cost of a test, by module, in milliseconds (measured watched on a
#: 2-core machine); only the balance of the shards depends on it.
_COST_MS = {
    "test_ssl": 550,
    "test_sock_lowlevel": 200,
    "test_sendfile": 190,
    "test_events": 180,
    "test_taskgroups": 180,
    "test_sslproto": 140,
    "test_futures": 100,
    "test_subprocess": 80,
    "test_waitfor": 80,
    "test_base_events": 50,
    "test_tasks": 40,
}
_DEFAULT_COST_MS = 15


def shard(ids: list[str], count: int) -> list[list[str]]:
    """Split *ids* into at most *count* shards of whole test classes, of about equal cost.

    Deterministic: the classes go, costliest first (ties by name), to the
    shard with the least cost so far; each shard keeps unittest's order.
    """
    classes: dict[str, list[str]] = {}
    for test_id in ids:
        classes.setdefault(test_id.rpartition(".")[0], []).append(test_id)

    def cost(name: str) -> int:
        parts = name.split(".")
        module = parts[2] if len(parts) > 2 else name
        return _COST_MS.get(module, _DEFAULT_COST_MS) * len(classes[name])

    count = max(1, min(count, len(classes)))
    loads = [0] * count
    chosen: list[list[str]] = [[] for _ in range(count)]
    for name in sorted(classes, key=lambda c: (-cost(c), c)):
        n = loads.index(min(loads))
        chosen[n].append(name)
        loads[n] += cost(name)
    order = {name: n for n, name in enumerate(classes)}
    return [[t for name in sorted(names, key=order.__getitem__) for t in classes[name]] for names in chosen]


def compare(all_ids: list[str], watched: _Phase, retry: _Phase | None, plain: _Phase, full: bool) -> dict[str, Any]:
    """Classify every test that failed watched, and check the skip list."""
    regressions: list[dict[str, str]] = []
    flaky: list[str] = []
    failing_plain: list[str] = []
    skip_hits: list[str] = []
    for test_id in watched.failing():
        plain_outcome = plain.outcomes.get(test_id)
        retried = retry.outcomes.get(test_id) if retry is not None else None
        if plain_outcome in FAILING:
            failing_plain.append(test_id)
        elif test_id in SKIP_LIST:
            skip_hits.append(test_id)
        elif retried is not None and retried not in FAILING:
            flaky.append(test_id)
        else:
            regressions.append(
                {
                    "test": test_id,
                    "watched": watched.outcomes[test_id],
                    "watched_retry": retried or "not run",
                    "plain": plain_outcome or "not run",
                    "detail": watched.details.get(test_id, ""),
                }
            )
    present = set(all_ids)
    stale = [
        {"test": t, "watched": watched.outcomes.get(t), "plain": plain.outcomes.get(t), "reason": SKIP_LIST[t]}
        for t in SKIP_LIST
        if t in present and t not in skip_hits and t not in failing_plain
    ]
    return {
        "regressions": regressions,
        "flaky_watched": flaky,
        "failing_plain_too": failing_plain,
        "failing_plain_only": (
            sorted(t for t in plain.failing() if watched.outcomes.get(t) not in FAILING) if full else []
        ),
        "skip_list": {
            "hits": skip_hits,
            "stale": stale,
            "not_in_this_suite": sorted(t for t in SKIP_LIST if t not in present),
        },
    }


def _sum_stats(stats: list[dict[str, Any]]) -> dict[str, Any]:
    total: dict[str, Any] = {}
    for part in stats:
        for key, value in part.items():
            if isinstance(value, bool) or key == "mode":
                continue
            if isinstance(value, (int, float)):
                total[key] = round(total.get(key, 0) + value, 2)
            elif isinstance(value, list):
                total.setdefault(key, []).extend(value)
            elif isinstance(value, dict):
                merged = total.setdefault(key, {})
                for k, v in value.items():
                    merged[k] = merged.get(k, 0) + v
    return total


def suite_problem() -> str | None:
    """Why ``test.test_asyncio`` cannot run here, or None."""
    try:
        importlib.import_module(SUITE)
    except ImportError as exc:
        version = f"{sys.version_info[0]}.{sys.version_info[1]}"
        return f"{SUITE} is not importable ({exc}); it comes with " + TESTSUITE_PACKAGE.format(v=version)
    except unittest.SkipTest as exc:
        return f"{SUITE} skips itself on this platform: {exc}"
    return None


def _site_text(site: dict[str, Any] | None) -> str | None:
    if not site:
        return None
    return f"{os.path.basename(site['file'])}:{site['line']} in {site['function']}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--full", action="store_true", help="also run the whole suite plain (else only what failed)")
    parser.add_argument("--shards", type=int, default=4, help="worker processes per phase (default 4)")
    parser.add_argument("--out", type=Path, help="directory for summary.json, findings.jsonl and the logs")
    parser.add_argument("--tests", nargs="+", metavar="SUBSTRING", help="only the tests whose id contains one")
    parser.add_argument("--timeout", type=float, default=1800.0, help="seconds for each phase (default 1800)")
    parser.add_argument(
        "--collect",
        action="store_true",
        help="collect garbage after each test, so that the findings the collector makes go to the test that "
        "left the garbage (slower: tens of ms a test)",
    )
    parser.add_argument(
        "--no-policy-per-test",
        dest="policy_per_test",
        action="store_false",
        help="do not put asyncwatch's event-loop policy back before each test (the suite resets it; loops "
        "are then watched only once they run)",
    )
    parser.add_argument("--worker", nargs=3, metavar=("MODE", "IDS", "JOURNAL"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.worker:
        mode, ids_file, journal = args.worker
        return worker(mode, ids_file, journal, args.collect, args.policy_per_test)

    def log(message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    problem = suite_problem()
    if problem is not None:
        log(f"run_test_asyncio: {problem}")
        return 2
    try:
        import opentelemetry.sdk.trace  # noqa: F401 - the watched run needs the SDK

        import asyncwatch
    except ImportError as exc:
        log(f"run_test_asyncio: {exc}; install the test extra: pip install -e '.[test]'")
        return 2

    out: Path = (args.out or Path(tempfile.mkdtemp(prefix="test_asyncio-oracle-"))).resolve()
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    all_ids = [t.id() for t in load_tests()]
    if args.tests:
        all_ids = [t for t in all_ids if any(s in t for s in args.tests)]
    if not all_ids:
        log("run_test_asyncio: no test selected")
        return 2
    shards = shard(all_ids, args.shards)
    log(
        f"run_test_asyncio: {len(all_ids)} tests, Python {platform.python_version()}, asyncwatch "
        f"{asyncwatch.__version__}, {len(shards)} workers, output in {out}"
    )
    flags = (["--collect"] if args.collect else []) + ([] if args.policy_per_test else ["--no-policy-per-test"])
    try:
        watched = run_phase("watched", shards, out, "watched", flags, args.timeout, log)
        failing = watched.failing()
        log(f"watched: {len(watched.outcomes)} outcomes, {len(failing)} failing, {watched.wall_s} s")
        retry = run_phase("watched", [failing], out, "watched-retry", flags, args.timeout, log) if failing else None
        plain = run_phase("plain", shards if args.full else [failing], out, "plain", flags, args.timeout, log)
        log(f"plain: {len(plain.outcomes)} outcomes, {len(plain.failing())} failing, {plain.wall_s} s")
    except _WorkerFailed as exc:
        log(f"run_test_asyncio: {exc}")
        return 2

    summary = _summary(args, all_ids, watched, retry, plain, started, out)
    (out / "summary.json").write_text(json.dumps(summary, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    print(render(summary))
    return 0 if summary["ok"] else 1


def _summary(
    args: argparse.Namespace,
    all_ids: list[str],
    watched: _Phase,
    retry: _Phase | None,
    plain: _Phase,
    started: float,
    out: Path,
) -> dict[str, Any]:
    import asyncwatch

    verdict = compare(all_ids, watched, retry, plain, args.full)
    stats = _sum_stats(watched.stats)
    findings = sorted(watched.findings, key=lambda f: (f["kind"], str(f.get("test")), f.get("time", "")))
    with open(out / "findings.jsonl", "w", encoding="utf-8") as f:
        for record in findings:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
    by_kind: dict[str, list[dict[str, Any]]] = {}
    for record in findings:
        by_kind.setdefault(record["kind"], []).append(
            {
                "test": record.get("test"),
                "during_test": record.get("during_test"),
                "site": _site_text(record.get("site")),
                "coroutine": record.get("coroutine"),
                "message": record.get("message"),
            }
        )
    unclassified = [
        {"kind": r["kind"], "test": r.get("test"), "site": _site_text(r.get("site")), "message": r.get("message")}
        for r in findings
        if r["kind"] not in TIMING_KINDS and (r["kind"], str(r.get("test")).rpartition(".")[2]) not in KNOWN_FINDINGS
    ]
    internal_errors = watched.internal_errors + (retry.internal_errors if retry else [])
    worker_problems = watched.exit_problems + (retry.exit_problems if retry else [])
    failing = watched.failing()
    summary: dict[str, Any] = {
        "ok": not (
            verdict["regressions"]
            or internal_errors
            or worker_problems
            or verdict["skip_list"]["stale"]
            or unclassified
        ),
        "python": platform.python_version(),
        "asyncwatch": asyncwatch.__version__,
        "watched_options": WATCHED_OPTIONS,
        "policy_per_test": args.policy_per_test,
        "gc_after_each_test": args.collect,
        "tests": len(all_ids),
        "wall_s": round(time.perf_counter() - started, 1),
        "watched": {
            "outcomes": dict(collections.Counter(watched.outcomes.values())),
            "failing": {t: watched.outcomes[t] for t in failing},
            "details": {t: watched.details.get(t, "") for t in failing},
            "retry": {t: retry.outcomes.get(t) for t in failing} if retry else {},
            "crashes": watched.crashes,
            "wall_s": watched.wall_s,
        },
        "plain": {
            "scope": "all" if args.full else "failing watched",
            "outcomes": dict(collections.Counter(plain.outcomes.values())),
            "failing": {t: plain.outcomes[t] for t in plain.failing()},
            "wall_s": plain.wall_s,
        },
        **verdict,
        "internal_errors": internal_errors,
        "worker_problems": worker_problems,
        "loops": {
            "attached": stats.get("loops_attached", 0),
            "by_type": stats.get("loop_types", {}),
            "attached_not_a_loop": stats.get("attached_not_a_loop", []),
            "runs": stats.get("loop_runs", 0),
            "runs_unwatched": stats.get("loop_runs_unwatched", []),
            "tests_that_attached_a_loop": stats.get("tests_that_attached_a_loop", 0),
            "policy_rewraps": stats.get("policy_rewraps", 0),
            "tasks_made_before_attach": stats.get("tasks_made_before_attach", 0),
            "tests_with_tasks_made_before_attach": sorted(stats.get("tests_with_tasks_made_before_attach", [])),
            "tests_that_ran_a_loop_without_asyncwatchs_task_factory": sorted(
                stats.get("tests_that_ran_a_loop_without_asyncwatchs_task_factory", [])
            ),
        },
        "spans": {"exported": stats.get("spans", 0), "finding_events": stats.get("finding_events_on_spans", 0)},
        "findings": {
            "total": len(findings),
            "by_kind": {k: len(v) for k, v in sorted(by_kind.items())},
            "items": by_kind,
            "unclassified": unclassified,
        },
        "runner_errors": stats.get("runner_errors", []),
        "output": str(out),
    }
    return summary


def render(summary: dict[str, Any]) -> str:
    """The summary for a person: counts, then every test or finding that needs a look."""
    loops = summary["loops"]
    lines = [
        f"test_asyncio under asyncwatch {summary['asyncwatch']}, Python {summary['python']}: "
        f"{summary['tests']} tests in {summary['wall_s']} s",
        f"  watched: {summary['watched']['outcomes']}",
        f"  plain ({summary['plain']['scope']}): {summary['plain']['outcomes']}",
        f"  loops attached: {loops['attached']}; loop runs: {loops['runs']}, not watched: {len(loops['runs_unwatched'])}; "
        f"spans: {summary['spans']['exported']}",
    ]
    lines.extend(f"  skip list (differs as expected): {test_id}" for test_id in summary["skip_list"]["hits"])
    for key, title in (
        ("failing_plain_too", "fails plain too"),
        ("flaky_watched", "failed watched, passed on the watched retry"),
        ("failing_plain_only", "fails plain only"),
    ):
        lines.extend(f"  {title}: {test_id}" for test_id in summary[key])
    lines.extend(
        f"  STALE skip-list entry (watched {entry['watched']}, plain {entry['plain']}): {entry['test']}"
        for entry in summary["skip_list"]["stale"]
    )
    lines.extend(
        f"  INTERNAL ERROR in {error.get('part')} during {error.get('test')}: {error.get('error')}"
        for error in summary["internal_errors"]
    )
    lines.extend(f"  WORKER: {problem}" for problem in summary["worker_problems"])
    for entry in summary["regressions"]:
        last = [line for line in entry["detail"].splitlines() if line.strip()][-1:] or [""]
        lines.append(f"  REGRESSION ({entry['watched']} watched, {entry['plain']} plain): {entry['test']}")
        lines.append(f"      {last[0].strip()[:200]}")
    lines.append(f"  findings: {summary['findings']['total']} {summary['findings']['by_kind']}")
    lines.extend(
        f"    {kind}: {item['test']} at {item['site']}"
        for kind, items in summary["findings"]["items"].items()
        for item in items
    )
    lines.extend(
        f"  UNCLASSIFIED finding: {item['kind']} in {item['test']} at {item['site']}: {item['message']}"
        for item in summary["findings"]["unclassified"]
    )
    lines.append(f"  regressions: {len(summary['regressions'])}; details in {summary['output']}/summary.json")
    return "\n".join(lines)


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        sys.exit(main())
    sys.exit(130)
