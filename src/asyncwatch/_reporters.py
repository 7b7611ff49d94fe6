"""Where findings go: a small pipeline of reporters.

Detectors hand each `Finding` to `Pipeline.emit`; the pipeline hands it to
every reporter.  Findings flow one way: a reporter never calls back into a
detector.  A reporter that raises is disabled and the failure is logged once,
so a broken log handler or a full disk never reaches the watched program.
"""

from __future__ import annotations

import json
import os
import sys
import threading
from collections import Counter
from collections.abc import Callable, Iterable
from typing import IO, Any, Protocol, runtime_checkable

import structlog

from ._findings import Finding, FindingKind, Site

__all__ = [
    "CollectingReporter",
    "JsonLinesReporter",
    "Reporter",
    "StructlogReporter",
    "SummaryReporter",
]

LOGGER_NAME = "asyncwatch"


@runtime_checkable
class Reporter(Protocol):
    """Receives findings.  ``report`` may be called from any thread."""

    def report(self, finding: Finding) -> None: ...


_reported_errors: set[str] = set()
_reported_lock = threading.Lock()


def report_internal_error(part: str, exc: BaseException) -> None:
    """Log an error inside asyncwatch once per *part*; never raise."""
    with _reported_lock:
        if part in _reported_errors:
            return
        _reported_errors.add(part)
    try:
        structlog.get_logger(LOGGER_NAME).error(
            "asyncwatch.internal_error",
            part=part,
            error=f"{type(exc).__name__}: {exc}",
            note=f"asyncwatch disabled its {part}; the watched program is unaffected",
            exc_info=exc,
        )
    except Exception:  # the logging itself is broken: last resort
        try:
            sys.stderr.write(f"asyncwatch: internal error in {part}: {type(exc).__name__}: {exc}\n")
        except Exception:
            pass


def forget_internal_errors() -> None:
    """Let every part report its next internal error again (after uninstall)."""
    with _reported_lock:
        _reported_errors.clear()


class Pipeline:
    """Hands findings to reporters; contains and disables failing ones."""

    def __init__(self, reporters: Iterable[Reporter] = ()) -> None:
        self._reporters: list[Reporter] = list(reporters)
        self._lock = threading.Lock()

    def add(self, reporter: Reporter) -> None:
        with self._lock:
            self._reporters = [*self._reporters, reporter]

    def remove(self, reporter: Reporter) -> None:
        with self._lock:
            self._reporters = [r for r in self._reporters if r is not reporter]

    @property
    def reporters(self) -> tuple[Reporter, ...]:
        return tuple(self._reporters)

    def emit(self, finding: Finding) -> None:
        for reporter in self._reporters:  # a snapshot: add/remove replace the list
            try:
                reporter.report(finding)
            except Exception as exc:
                self.remove(reporter)
                report_internal_error(f"reporter {type(reporter).__name__}", exc)

    def close(self) -> None:
        for reporter in self._reporters:
            close = getattr(reporter, "close", None)
            if close is not None:
                try:
                    close()
                except Exception as exc:
                    report_internal_error(f"reporter {type(reporter).__name__}", exc)


def _site_text(site: dict[str, Any] | None) -> str | None:
    if site is None:
        return None
    path = site["file"]
    try:
        rel = os.path.relpath(path)
        if not rel.startswith(".."):
            path = rel
    except ValueError:  # another drive on Windows
        pass
    return f"{path}:{site['line']} in {site['function']}"


class StructlogReporter:
    """One warning-level structlog event per finding on the ``asyncwatch`` logger.

    The event is the finding's kind; the finding's JSON fields are the keys.
    In library mode the application's structlog configuration decides how it
    is rendered.  With *fallback* ("console" or "json"), used by the command
    line, findings are rendered to stderr by asyncwatch's own private logger
    *unless* the program configured structlog itself.
    """

    def __init__(self, fallback: str | None = None, stream: IO[str] | None = None) -> None:
        if fallback not in (None, "console", "json"):
            raise ValueError(f"fallback={fallback!r}; use 'console', 'json' or None")
        self._fallback = fallback
        self._stream = stream
        self._private: Any = None

    def _logger(self) -> Any:
        if self._fallback is None or structlog.is_configured():
            return structlog.get_logger(LOGGER_NAME)
        if self._private is None:
            stream = self._stream or sys.stderr
            processors: list[Any] = [
                structlog.processors.add_log_level,
                structlog.processors.TimeStamper(fmt="iso", utc=True),
            ]
            if self._fallback == "json":
                processors.append(structlog.processors.JSONRenderer())
            else:
                processors += [_readable_sites, structlog.dev.ConsoleRenderer(colors=_isatty(stream))]
            self._private = structlog.wrap_logger(
                structlog.PrintLogger(stream),  # type: ignore[arg-type]
                processors=processors,
                logger_name=LOGGER_NAME,
            )
        return self._private

    def report(self, finding: Finding) -> None:
        fields = self.fields(finding)
        kind = fields.pop("kind")
        self._logger().warning(kind, **fields)

    def fields(self, finding: Finding) -> dict[str, Any]:
        """The event's keys: the finding's JSON form, with ``stack`` as text.

        structlog reserves ``stack`` for a formatted stack (its renderers
        print it as one, and ConsoleRenderer fails on anything else), so the
        event carries the frames in that form; the findings file keeps the
        list.  Subclasses may add keys.
        """
        fields = finding.to_dict()
        fields["stack"] = stack_text(finding.stack) if finding.stack else None
        return fields


def stack_text(stack: Iterable[Site]) -> str:
    """Frames as text, outermost first, like a traceback's lines."""
    return "\n".join(f'  File "{s.file}", line {s.line}, in {s.function}' for s in stack)


def _isatty(stream: IO[str]) -> bool:
    try:
        return stream.isatty()
    except Exception:
        return False


def _readable_sites(_logger: Any, _method: str, event: dict[str, Any]) -> dict[str, Any]:
    """Console rendering: sites as ``file:line in function``; drop the bulky stack."""
    for key in ("site", "cancelled_by", "created_at"):
        if isinstance(event.get(key), dict):
            event[key] = _site_text(event[key])
        elif key in event and event[key] is None:
            del event[key]
    event.pop("stack", None)  # the summary line is enough on a console
    for key in ("task", "coroutine", "duration_s", "time", "pid"):
        if event.get(key) is None:
            event.pop(key, None)
    event.pop("time", None)  # the renderer prints its own timestamp
    event.pop("pid", None)
    return event


class JsonLinesReporter:
    """Write each finding as one JSON object per line, flushed as it happens.

    A crash of the watched program loses nothing already found.
    """

    def __init__(self, path: str | os.PathLike[str], *, append: bool = False) -> None:
        self.path = os.path.abspath(os.fspath(path))
        self._file: IO[str] | None = open(self.path, "a" if append else "w", encoding="utf-8")  # noqa: SIM115
        self._lock = threading.Lock()

    def report(self, finding: Finding) -> None:
        line = json.dumps(finding.to_dict(), ensure_ascii=False) + "\n"
        with self._lock:
            if self._file is None:
                return
            self._file.write(line)
            self._file.flush()

    def close(self) -> None:
        with self._lock:
            if self._file is not None:
                self._file.close()
                self._file = None


class CollectingReporter:
    """Keep findings in a list (what `asyncwatch.testing.capture_findings` uses)."""

    def __init__(self, predicate: Callable[[Finding], bool] | None = None) -> None:
        self.findings: list[Finding] = []
        self._predicate = predicate
        self._lock = threading.Lock()

    def report(self, finding: Finding) -> None:
        if self._predicate is None or self._predicate(finding):
            with self._lock:
                self.findings.append(finding)


class SummaryReporter:
    """Count findings by kind and site for the human summary at exit."""

    def __init__(self) -> None:
        self.counts: Counter[tuple[FindingKind, Site | None]] = Counter()
        self._lock = threading.Lock()

    def report(self, finding: Finding) -> None:
        with self._lock:
            self.counts[(finding.kind, finding.site)] += 1

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def render(self) -> str:
        """A short text: findings grouped by kind and site, with counts."""
        total = self.total
        if not total:
            return "asyncwatch: no findings\n"
        places = len(self.counts)
        lines = [f"asyncwatch: {total} finding{'s' if total != 1 else ''} in {places} place{'s' if places != 1 else ''}"]
        width = max(len(k.value) for k, _ in self.counts)
        order = sorted(self.counts.items(), key=lambda item: (item[0][0].value, -item[1], str(item[0][1])))
        for (kind, site), count in order:
            where = _site_text(site.to_dict()) if site else "(site unknown)"
            lines.append(f"  {kind.value:<{width}}  {count:>4}x  {where}")
        return "\n".join(lines) + "\n"
