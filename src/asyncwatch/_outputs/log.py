"""The log output: one warning per finding, through structlog or the standard library."""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterable
from typing import IO, Any

from .._core.findings import Finding, Site
from .._core.frames import site_text
from .._core.runtime import LOGGER_NAME, configured_structlog, logging_configured, set_own_logger

__all__ = ["LoggingReporter", "StructlogReporter", "stack_text"]


class StructlogReporter:
    """One warning per finding on the ``asyncwatch`` logger, where the
    application logs.  Which logger is decided at each finding:

    * the application configured structlog (``structlog.is_configured()``):
      a structlog event; the event is the finding's kind, the finding's JSON
      fields are the keys, and the application's configuration renders it;
    * else, in library mode (no *fallback*): a standard library ``logging``
      record (see `LoggingReporter`), which the application's handlers
      receive, or ``logging.lastResort`` prints on stderr;
    * else, under the command line (*fallback* "console" or "json"): the
      standard library's ``logging`` if the application's logging
      configuration has a handler for the ``asyncwatch`` logger (its own or
      the root logger's), otherwise asyncwatch's own rendering on stderr.

    Never structlog's unconfigured default, which prints on stdout.
    """

    def __init__(self, fallback: str | None = None, stream: IO[str] | None = None) -> None:
        if fallback not in (None, "console", "json"):
            raise ValueError(f"fallback={fallback!r}; use 'console', 'json' or None")
        self._fallback = fallback
        self._stream = stream
        self._private: Any = None
        self._stdlib = LoggingReporter()
        if fallback is not None:
            # asyncwatch's own events (internal errors) go the same way.
            set_own_logger(self)

    def _logger(self) -> Any:
        configured = configured_structlog()
        if configured is not None:
            return configured.get_logger(LOGGER_NAME)
        if self._fallback is None:
            import structlog  # a dependency, imported only when it renders: it costs the collector ~2,600 objects

            return structlog.get_logger(LOGGER_NAME)
        if self._private is None:
            import structlog

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
        if configured_structlog() is None and (self._fallback is None or logging_configured()):
            # The record keeps the findings file's form (``stack`` a list),
            # plus what the enrichment stage added (trace ids).
            self._stdlib.emit(finding, {**fields, **finding.to_dict()})
            return
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


class LoggingReporter:
    """One WARNING record per finding on the standard library's ``asyncwatch`` logger.

    The message is one line: the kind, the site and the finding's message.
    The record carries the finding's JSON form as ``record.asyncwatch`` (a
    dict: ``kind``, ``site``, ``task``, ... as in the findings file), so that
    a handler or formatter can use the fields.  Records go to whatever
    handlers the application configured; with none, ``logging.lastResort``
    prints them on stderr.
    """

    def __init__(self, logger: logging.Logger | None = None) -> None:
        self._logger = logger or logging.getLogger(LOGGER_NAME)

    def report(self, finding: Finding) -> None:
        fields = finding.to_dict()
        fields.update(finding.extra)
        self.emit(finding, fields)

    def emit(self, finding: Finding, fields: dict[str, Any]) -> None:
        if not self._logger.isEnabledFor(logging.WARNING):
            return
        site = site_text(finding.site, relative=True) if finding.site else "site unknown"
        text = f"{finding.kind.value} at {site}: {finding.message}"
        if finding.suppressed:
            text += f" ({finding.suppressed} more like it held back by the report limit)"
        self._logger.warning(" ".join(text.split()), extra={"asyncwatch": fields})


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
    for key in ("site", "cancelled_by", "created_at", "dropped_at", "swallowed_at", "scheduled_at"):
        value = event.get(key)
        if isinstance(value, dict):
            event[key] = site_text(Site(value["file"], value["line"], value["function"]), relative=True)
        elif key in event and event[key] is None:
            del event[key]
    event.pop("stack", None)  # the summary line is enough on a console
    for key in ("task", "coroutine", "duration_s", "time", "pid", "cause", "breakdown", "gil_holder"):
        if event.get(key) is None:
            event.pop(key, None)
    if not event.get("suppressed"):
        event.pop("suppressed", None)
    event.pop("time", None)  # the renderer prints its own timestamp
    event.pop("pid", None)
    return event
