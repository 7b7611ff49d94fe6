"""Reporters that are slow, down or flooded never hold up the watched program."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import subprocess
import sys
import textwrap
import threading
import time

import pytest
from structlog.testing import capture_logs

import asyncwatch
from asyncwatch import Finding, FindingKind, JsonLinesReporter, Site, StructlogReporter
from asyncwatch._outputs.collect import CollectingReporter
from asyncwatch._outputs.pipeline import Pipeline, RateLimiter
from asyncwatch.testing import capture_findings
from conftest import line_of

HERE = Site("/app/service.py", 12, "handler")
THERE = Site("/app/jobs.py", 40, "spawn")


def finding(site=HERE, kind=FindingKind.SLOW_CALLBACK):
    return Finding(kind=kind, message="blocked", site=site)


class FakeClock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


def limiter(burst=3, interval_s=60.0, **kwargs):
    limit = RateLimiter(burst, interval_s, **kwargs)
    limit._clock = FakeClock()
    return limit


class TestRateLimiter:
    def test_a_burst_per_place_then_one_per_interval_with_the_count_held_back(self):
        """The first findings at a place go through; then one per interval, which
        says how many like it were held back since the last one."""
        limit = limiter(burst=3, interval_s=60)
        passed = [limit.admit(finding()) for _ in range(10)]
        assert [f is not None for f in passed] == [True] * 3 + [False] * 7
        assert all(f.suppressed == 0 for f in passed[:3])
        limit._clock.now += 61
        later = limit.admit(finding())
        assert later is not None and later.suppressed == 7
        assert later.site == HERE and later.kind is FindingKind.SLOW_CALLBACK
        assert limit.admit(finding()) is None  # the next interval starts now
        assert limit.suppressed[(FindingKind.SLOW_CALLBACK, HERE)] == 8

    def test_places_and_kinds_are_limited_separately(self):
        """A flood at one place does not silence another place, or another kind at the same place."""
        limit = limiter(burst=2)
        for _ in range(50):
            limit.admit(finding(HERE))
        assert limit.admit(finding(THERE)) is not None
        assert limit.admit(finding(HERE, FindingKind.CANCELLATION_SWALLOWED)) is not None

    def test_its_table_of_places_stays_bounded(self):
        """A million distinct places cannot grow the limiter without bound."""
        limit = limiter(burst=1, max_places=1000)
        for line in range(20_000):
            site = Site("/app/generated.py", line, "f")
            limit.admit(finding(site))
            limit.admit(finding(site))  # held back: counted
        assert len(limit._places) <= 1000
        assert len(limit.suppressed) <= 1000


class TestPipelineWithALimit:
    def test_counters_see_every_finding_and_outputs_the_limited_stream(self):
        """Reporters that count (receives_all) get every finding; the others only
        what the rate limit lets through."""
        counted = CollectingReporter()
        logged: list[Finding] = []

        class Output:
            def report(self, f):
                logged.append(f)

        pipeline = Pipeline([counted, Output()], limiter=limiter(burst=2))
        for _ in range(5):
            pipeline.emit(finding())
        assert len(counted.findings) == 5
        assert len(logged) == 2

    def test_install_limits_the_log_and_the_file_but_not_capture_findings(self, tmp_path):
        """install(report_limit=N): N findings of one line reach the findings file and
        the log; capture_findings (and the exit summary) count all of them."""
        path = tmp_path / "f.jsonl"

        async def save():
            pass

        async def main():
            with capture_findings(FindingKind.COROUTINE_NEVER_AWAITED) as found:
                for _ in range(25):
                    save()  # <- dropped 25 times
                await asyncio.sleep(0)
            return found

        with capture_logs() as logs, asyncwatch.install(findings=path, report_limit=4):
            found = asyncio.run(main())
        assert len(found) == 25
        lines = [json.loads(line) for line in path.read_text().splitlines()]
        assert [(d["kind"], d["site"]["line"]) for d in lines] == [
            ("coroutine_never_awaited", line_of("# <- dropped 25 times"))
        ] * 4
        assert len([e for e in logs if e["event"] == "coroutine_never_awaited"]) == 4

    def test_report_limit_zero_reports_everything(self, tmp_path):
        """report_limit=0 turns the limit off."""
        path = tmp_path / "f.jsonl"

        async def save():
            pass

        async def main():
            for _ in range(25):
                save()
            await asyncio.sleep(0)

        with asyncwatch.install(findings=path, report_limit=0, log=False):
            asyncio.run(main())
        assert len(path.read_text().splitlines()) == 25

    @pytest.mark.parametrize("bad", [-1, 2.5, "many", True])
    def test_a_bad_report_limit_names_the_value(self, bad):
        with pytest.raises(asyncwatch.ConfigurationError, match="report_limit"):
            asyncwatch.install(report_limit=bad)
        assert not asyncwatch.is_installed()


class TestEnrichment:
    """The ordered stage between the rate limit and the reporters."""

    def test_enrichers_run_in_order_before_every_reporter_whenever_they_were_added(self):
        """What an enricher adds reaches the structlog event, even if the log was added first."""
        log = StructlogReporter()
        pipeline = Pipeline([log])
        pipeline.add_enricher(lambda f: dataclasses.replace(f, extra=(*f.extra, ("trace_id", "ab"))))
        pipeline.add_enricher(lambda f: dataclasses.replace(f, extra=(*f.extra, ("span_id", "cd"))))
        with capture_logs() as logs:
            pipeline.emit(finding())
        [event] = logs
        assert (event["trace_id"], event["span_id"]) == ("ab", "cd")
        assert "extra" not in finding().to_dict()  # not part of the JSON form

    def test_a_failing_enricher_is_dropped_said_once_and_findings_go_on(self, capsys, caplog):
        collected = CollectingReporter()
        calls = []

        def broken(f):
            calls.append(f)
            raise RuntimeError("enricher exploded")

        pipeline = Pipeline([collected])
        pipeline.add_enricher(broken)
        pipeline.emit(finding())
        pipeline.emit(finding(THERE))
        assert len(calls) == 1 and [f.site for f in collected.findings] == [HERE, THERE]
        out = capsys.readouterr()
        # structlog when configured (capture_logs above configures it), else stdlib logging
        assert (out.out + out.err + caplog.text).count("asyncwatch.internal_error") == 1

    def test_findings_held_back_by_the_limit_are_not_enriched(self):
        enriched = []
        pipeline = Pipeline([CollectingReporter()], limiter=limiter(burst=1))
        pipeline.add_enricher(lambda f: enriched.append(f) or f)
        for _ in range(3):
            pipeline.emit(finding())
        assert len(enriched) == 1


class StuckDisk:
    """os.write that blocks until released: a hung network file system."""

    def __init__(self):
        self.release = threading.Event()
        self.entered = threading.Event()

    def __call__(self, fd, data):
        self.entered.set()
        self.release.wait(30)
        return os.write(fd, data)


class TestJsonLinesReporterUnderFaults:
    def test_a_stuck_disk_does_not_stall_the_event_loop(self, tmp_path):
        """While the disk hangs, findings are queued and the loop runs on; when it
        comes back, every queued finding is written."""
        path = tmp_path / "f.jsonl"
        reporter = JsonLinesReporter(path)
        stuck = StuckDisk()
        reporter._write = stuck

        async def main():
            ticks = 0
            started = time.monotonic()
            for _ in range(20):
                reporter.report(finding())  # from the loop's own thread, as detectors do
                await asyncio.sleep(0)
                ticks += 1
            return ticks, time.monotonic() - started

        ticks, elapsed = asyncio.run(main())
        assert stuck.entered.wait(5)
        assert ticks == 20 and elapsed < 2.0  # generous: the write would block for 30 s
        stuck.release.set()
        assert reporter.flush(10)
        assert len(path.read_text().splitlines()) == 20
        reporter.close()

    def test_a_queue_that_overflows_drops_and_says_so_once(self, tmp_path):
        """If the disk never keeps up, at most max_queued findings wait; the rest
        are counted as dropped and reported once through the asyncwatch logger."""
        reporter = JsonLinesReporter(tmp_path / "f.jsonl", max_queued=5)
        stuck = StuckDisk()
        reporter._write = stuck
        with capture_logs() as logs:
            reporter.report(finding())
            assert stuck.entered.wait(5)  # the writer holds the first, blocked
            for _ in range(20):
                reporter.report(finding())
        assert reporter.dropped == 15
        errors = [e for e in logs if e["event"] == "asyncwatch.internal_error"]
        assert len(errors) == 1 and "dropping findings" in errors[0]["error"]
        stuck.release.set()
        reporter.close()

    def test_a_full_disk_disables_the_file_and_the_log_goes_on(self):
        """Writing to a full disk (/dev/full) is reported once; the file reporter
        stops, the structlog events keep coming."""
        if not os.path.exists("/dev/full"):
            pytest.skip("no /dev/full on this system")

        async def save():
            pass

        async def main():
            for _ in range(3):
                save()  # <- on a full disk
                await asyncio.sleep(0)
                await asyncio.sleep(0.05)

        with capture_logs() as logs, asyncwatch.install(findings="/dev/full", report_limit=0):
            asyncio.run(main())
        events = [e["event"] for e in logs]
        assert events.count("coroutine_never_awaited") == 3
        errors = [e for e in logs if e["event"] == "asyncwatch.internal_error"]
        assert len(errors) == 1 and errors[0]["part"] == "findings file"
        assert "No space left on device" in errors[0]["error"]


def run_python(code, tmp_path):
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=900,
    )


class TestNothingQueuedIsLostAtExit:
    def test_a_normal_exit_writes_what_is_queued(self, tmp_path):
        """The writer is a daemon thread; leaving the interpreter still writes every line."""
        result = run_python(
            """
            import asyncio, os, time, asyncwatch
            from asyncwatch._engine import current_engine
            asyncwatch.install(findings="f.jsonl", log=False, report_limit=0)

            def slow_write(fd, data):  # a slow disk: lines are still queued at exit
                time.sleep(0.2)
                return os.write(fd, data)

            for reporter in current_engine().pipeline.reporters:
                reporter._write = slow_write

            async def save():
                pass

            async def main():
                for _ in range(500):
                    save()
                    await asyncio.sleep(0)

            asyncio.run(main())
            """,
            tmp_path,
        )
        assert result.returncode == 0, result.stderr
        assert len((tmp_path / "f.jsonl").read_text().splitlines()) == 500

    @pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
    def test_a_multiprocessing_fork_child_writes_its_findings_before_os_exit(self, tmp_path):
        """A multiprocessing "fork" child ends with os._exit(), which skips atexit:
        its findings still reach the shared file."""
        result = run_python(
            """
            import asyncio, multiprocessing, os, time, asyncwatch
            from asyncwatch._engine import current_engine
            asyncwatch.install(findings="f.jsonl", log=False, report_limit=0)

            def slow_write(fd, data):  # a slow disk: lines are still queued at exit
                time.sleep(0.2)
                return os.write(fd, data)

            async def save():
                pass

            async def work():
                for _ in range(50):
                    save()
                    await asyncio.sleep(0)

            def child():
                for reporter in current_engine().pipeline.reporters:
                    reporter._write = slow_write
                asyncio.run(work())

            if __name__ == "__main__":
                process = multiprocessing.get_context("fork").Process(target=child)
                process.start()
                process.join()
                assert process.exitcode == 0
                print(process.pid)
            """,
            tmp_path,
        )
        assert result.returncode == 0, result.stderr
        pids = [json.loads(line)["pid"] for line in (tmp_path / "f.jsonl").read_text().splitlines()]
        assert pids == [int(result.stdout)] * 50


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
@pytest.mark.parametrize("lock", ["engine.pipeline._lock", "engine.pipeline.limiter._lock"])
def test_a_fork_while_a_thread_reports_leaves_the_child_able_to_report(tmp_path, lock):
    """A thread in the middle of reporting holds the pipeline's locks; a child
    forked then must not inherit them held (it would hang at its first finding)."""
    result = run_python(
        f"""
        import asyncio, os, threading, time
        import asyncwatch
        from asyncwatch._engine import current_engine
        from asyncwatch.testing import capture_findings

        asyncwatch.install(log=False)
        engine = current_engine()
        lock = {lock}
        held, release = threading.Event(), threading.Event()

        def hold():
            with lock:
                held.set()
                release.wait()

        threading.Thread(target=hold, daemon=True).start()
        held.wait()
        pid = os.fork()
        if pid == 0:
            async def main():
                time.sleep(0.2)
                await asyncio.sleep(0)

            with capture_findings() as found:
                asyncio.run(main())
            os._exit(0 if [f.kind.value for f in found] == ["slow_callback"] else 1)
        release.set()
        for _ in range(200):
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                raise SystemExit(os.waitstatus_to_exitcode(status))
            time.sleep(0.05)
        os.kill(pid, 9)
        raise SystemExit("the child hung")
        """,
        tmp_path,
    )
    assert result.returncode == 0, result.stderr


def test_a_findings_file_is_written_where_no_thread_can_start(tmp_path, monkeypatch):
    """Python 3.12 starts no thread while it shuts down: a finding an exit
    function makes is written by the thread that reports it (it was lost,
    with an internal error on stderr)."""
    from asyncwatch._core.runtime import ShuttingDown
    from asyncwatch._outputs import jsonl

    def refuse(target, name):
        raise ShuttingDown("can't create new thread at interpreter shutdown")

    monkeypatch.setattr(jsonl, "start_hidden_thread", refuse)
    reporter = jsonl.JsonLinesReporter(tmp_path / "findings.jsonl")
    try:
        reporter.report(Finding(kind=FindingKind.SLOW_CALLBACK, message="at exit", site=None))
        assert [json.loads(line)["message"] for line in (tmp_path / "findings.jsonl").read_text().splitlines()] == [
            "at exit"
        ]
        assert reporter.flush(timeout=0.1)
    finally:
        reporter.close()
