"""The findings contract: one `Finding`, the same fields in every output."""

from __future__ import annotations

import dataclasses
import datetime as dt
import io
import json
import logging
import os
import time

import pytest
import structlog
from structlog.testing import capture_logs

import asyncwatch
from asyncwatch import Finding, FindingKind, JsonLinesReporter, Site, StructlogReporter
from asyncwatch._outputs.collect import SummaryReporter

SITE = Site("/app/service.py", 12, "handler")
OTHER = Site("/app/jobs.py", 40, "spawn")


def wait_for_lines(path, count, timeout=300.0):
    """The kinds in *path* once it has *count* lines (the writer is a thread)."""
    deadline = time.monotonic() + timeout
    while True:
        lines = path.read_text(encoding="utf-8").splitlines()
        if len(lines) >= count or time.monotonic() > deadline:
            return [json.loads(line)["kind"] for line in lines]
        time.sleep(0.005)


def make(kind=FindingKind.SLOW_CALLBACK, site=SITE, **extra):
    return Finding(kind=kind, message="something happened", site=site, **extra)


class TestFinding:
    def test_is_immutable(self):
        """A Finding cannot be changed after it is made."""
        with pytest.raises(dataclasses.FrozenInstanceError):
            make().message = "changed"  # type: ignore[misc]

    def test_json_form_has_every_field(self):
        """to_dict() gives the documented keys, sites as {file, line, function}, time in UTC."""
        f = make(
            stack=(OTHER, SITE),
            task="Task-3",
            coroutine="handler",
            duration_s=0.25,
            cancelled_by=OTHER,
            created_at=OTHER,
            thread="worker-2",
        )
        d = f.to_dict()
        assert set(d) == {
            "kind",
            "message",
            "site",
            "stack",
            "task",
            "coroutine",
            "duration_s",
            "cancelled_by",
            "created_at",
            "time",
            "pid",
            "thread",
            "suppressed",
            "cause",
            "dropped_at",
            "swallowed_at",
            "scheduled_at",
            "breakdown",
            "gil_holder",
        }
        assert d["kind"] == "slow_callback"
        assert d["site"] == {"file": "/app/service.py", "line": 12, "function": "handler"}
        assert d["stack"] == [OTHER.to_dict(), SITE.to_dict()]
        assert d["cancelled_by"] == d["created_at"] == OTHER.to_dict()
        assert d["pid"] == os.getpid()
        assert d["thread"] == "worker-2"
        assert d["suppressed"] == 0
        assert d["time"].endswith("Z")
        parsed = dt.datetime.fromisoformat(d["time"].replace("Z", "+00:00"))
        assert parsed.utcoffset() == dt.timedelta(0)
        json.dumps(d)  # serialisable as is

    def test_unknown_site_is_null(self):
        """A finding whose site is truly unknown says null, not a guess."""
        d = make(kind=FindingKind.COROUTINE_NEVER_AWAITED, site=None).to_dict()
        assert d["site"] is None and d["created_at"] is None and d["stack"] == [] and d["thread"] is None


class TestJsonLinesReporter:
    def test_writes_each_finding_without_waiting_for_close(self, tmp_path):
        """Each finding reaches the disk as it is reported, not at close (a crash
        loses at most the last moments), one JSON object per line."""
        path = tmp_path / "findings.jsonl"
        reporter = JsonLinesReporter(path)
        reporter.report(make())
        assert wait_for_lines(path, 1) == ["slow_callback"]
        reporter.report(make(kind=FindingKind.TASK_DESTROYED_PENDING))
        assert wait_for_lines(path, 2) == ["slow_callback", "task_destroyed_pending"]
        reporter.close()

    def test_install_with_an_unwritable_path_names_the_path(self, tmp_path):
        """findings= in a missing directory fails at install() with the path in the message."""
        bad = tmp_path / "missing" / "f.jsonl"
        with pytest.raises(asyncwatch.ConfigurationError, match="missing"):
            asyncwatch.install(findings=bad, log=False)
        assert not asyncwatch.is_installed()


class TestStructlogReporter:
    def test_one_warning_event_with_the_finding_fields(self):
        """The event is the kind, at warning level, with the JSON fields as keys."""
        with capture_logs() as logs:
            StructlogReporter().report(make(task="Task-1", duration_s=0.3, thread="worker-2"))
        [event] = logs
        assert event["event"] == "slow_callback"
        assert event["log_level"] == "warning"
        assert event["site"] == SITE.to_dict()
        assert event["task"] == "Task-1" and event["duration_s"] == 0.3 and event["thread"] == "worker-2"
        assert {"message", "stack", "coroutine", "cancelled_by", "created_at", "time", "pid"} <= set(event)
        assert event["stack"] is None  # no frames: nothing for structlog to print

    def test_a_configured_console_renderer_prints_the_stack(self, capsys):
        """structlog configured with its ConsoleRenderer renders the event; the stack is text there."""
        structlog.reset_defaults()
        structlog.configure(processors=[structlog.dev.ConsoleRenderer(colors=False)])
        try:
            StructlogReporter().report(make(stack=(OTHER, SITE)))
        finally:
            structlog.reset_defaults()
        out = capsys.readouterr().out
        assert "slow_callback" in out
        assert 'File "/app/jobs.py", line 40, in spawn' in out and "asyncwatch.internal_error" not in out

    def test_unconfigured_structlog_leaves_stdout_alone_for_stdlib_logging(self, capsys, caplog):
        """structlog not configured: one WARNING record on the stdlib 'asyncwatch' logger, nothing on stdout."""
        structlog.reset_defaults()
        with caplog.at_level("WARNING", logger="asyncwatch"):
            StructlogReporter().report(make(stack=(OTHER, SITE)))
        assert capsys.readouterr().out == ""
        [record] = caplog.records
        assert record.name == "asyncwatch" and record.levelname == "WARNING"
        assert record.getMessage().startswith("slow_callback at /app/service.py:12 in handler: ")
        assert record.asyncwatch["site"] == SITE.to_dict()
        assert record.asyncwatch["stack"] == [OTHER.to_dict(), SITE.to_dict()]

    def test_library_mode_never_configures_structlog(self):
        """Installing asyncwatch leaves structlog's configuration alone."""
        before = structlog.get_config()
        was_configured = structlog.is_configured()
        asyncwatch.install(log=True)
        asyncwatch.uninstall()
        assert structlog.get_config() == before
        assert structlog.is_configured() == was_configured

    def test_fallback_renders_json_to_its_stream_when_structlog_is_unconfigured(self, monkeypatch):
        """The CLI's fallback writes one JSON object per finding to stderr."""
        structlog.reset_defaults()
        # pytest's own log capture is a root handler: the application's logging
        # would take the finding (see the logging tests); here it has none.
        monkeypatch.setattr(logging.getLogger("asyncwatch"), "propagate", False)
        out = io.StringIO()
        StructlogReporter(fallback="json", stream=out).report(make())
        event = json.loads(out.getvalue())
        assert event["event"] == "slow_callback" and event["level"] == "warning"
        assert event["site"]["line"] == 12


class TestSummary:
    def test_groups_by_kind_and_site_with_counts(self):
        """The exit summary counts findings per kind and site."""
        summary = SummaryReporter()
        for _ in range(3):
            summary.report(make())
        summary.report(make(kind=FindingKind.TASK_DESTROYED_PENDING, site=OTHER))
        text = summary.render()
        assert text.splitlines()[0] == "asyncwatch: 4 findings in 2 places"
        assert any("slow_callback" in line and "3x" in line and "service.py:12" in line for line in text.splitlines())
        assert any("task_destroyed_pending" in line and "1x" in line for line in text.splitlines())

    def test_says_so_when_clean(self):
        """A clean run says there were no findings."""
        assert SummaryReporter().render() == "asyncwatch: no findings\n"
