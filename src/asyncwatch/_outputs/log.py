"""The structlog output: one warning-level event per finding."""

from __future__ import annotations

import sys
from collections.abc import Iterable
from typing import IO, Any

import structlog

from .._core.findings import Finding, Site
from .._core.frames import site_text
from .._core.runtime import LOGGER_NAME, set_own_logger

__all__ = ["StructlogReporter", "stack_text"]


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
        if fallback is not None:
            # asyncwatch's own events (internal errors) go the same way.
            set_own_logger(self)

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
        fields.update(finding.extra)  # what the enrichment stage added (trace ids)
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
    for key in ("site", "cancelled_by", "created_at", "dropped_at"):
        value = event.get(key)
        if isinstance(value, dict):
            event[key] = site_text(Site(value["file"], value["line"], value["function"]), relative=True)
        elif key in event and event[key] is None:
            del event[key]
    event.pop("stack", None)  # the summary line is enough on a console
    for key in ("task", "coroutine", "duration_s", "time", "pid"):
        if event.get(key) is None:
            event.pop(key, None)
    if not event.get("suppressed"):
        event.pop("suppressed", None)
    event.pop("time", None)  # the renderer prints its own timestamp
    event.pop("pid", None)
    return event
