"""Where findings go: a small pipeline of reporters.

Detectors hand each `Finding` to `Pipeline.emit`; the pipeline hands it to
every reporter.  Findings flow one way: a reporter never calls back into a
detector.  A reporter that raises is disabled and the failure is logged once,
so a broken log handler or a full disk never reaches the watched program.
"""

from __future__ import annotations

import _thread
import atexit
import contextlib
import dataclasses
import json
import logging
import os
import sys
import threading
import time
import weakref
from collections import Counter, deque
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import IO, Any, Protocol, runtime_checkable

import structlog

from ._findings import Finding, FindingKind, Site

__all__ = [
    "CollectingReporter",
    "JsonLinesReporter",
    "LoggingReporter",
    "RateLimiter",
    "Reporter",
    "StructlogReporter",
    "SummaryReporter",
]

LOGGER_NAME = "asyncwatch"


@runtime_checkable
class Reporter(Protocol):
    """Receives findings.  ``report`` may be called from any thread, often the
    event loop's: it must not block (hand slow work to a thread, as
    `JsonLinesReporter` does).

    A reporter receives the findings the pipeline's `RateLimiter` lets
    through; one with a true ``receives_all`` attribute (counters, such as
    the exit summary and the testing helpers) receives every finding, and
    one with a ``held_back(finding)`` method is told of those held back.
    """

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
        internal_logger().error(
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


#: The StructlogReporter rendering on the command line's behalf, if any: its
#: stream (stderr) is where asyncwatch's own events go too, never the
#: program's stdout.
_cli_reporter: weakref.ref[StructlogReporter] | None = None


def internal_logger() -> Any:
    """The logger for asyncwatch's own events (internal errors, bad environment).

    The application's structlog configuration when it has one; under
    ``asyncwatch run``, which owns the process, the command line's stderr
    rendering; else structlog's default.
    """
    if structlog.is_configured():
        return structlog.get_logger(LOGGER_NAME)
    reporter = _cli_reporter() if _cli_reporter is not None else None
    if reporter is not None and not _logging_configured():
        return reporter._logger()
    # Never structlog's unconfigured default: it prints on stdout.
    return _StdlibEvents(logging.getLogger(LOGGER_NAME))


def _logging_configured() -> bool:
    """Whether a record of the ``asyncwatch`` logger reaches a handler the
    application set up (its own, or the root logger's)."""
    return logging.getLogger(LOGGER_NAME).hasHandlers()


class _StdlibEvents:
    """structlog's calling convention (``error("event", key=value)``) on a
    standard library logger: one line, the keys on the record as ``asyncwatch``."""

    def __init__(self, logger: logging.Logger) -> None:
        self._logger = logger

    def _log(self, level: int, event: str, exc_info: Any = None, **fields: Any) -> None:
        text = " ".join(f"{key}={value!r}" for key, value in fields.items() if value is not None)
        self._logger.log(level, f"{event} {text}".rstrip(), exc_info=exc_info, extra={"asyncwatch": fields})

    def warning(self, event: str, **fields: Any) -> None:
        self._log(logging.WARNING, event, **fields)

    def error(self, event: str, **fields: Any) -> None:
        self._log(logging.ERROR, event, **fields)


# --- hidden threads --------------------------------------------------------------


class HiddenThread:
    """A thread of asyncwatch's own that the program never sees.

    Started with ``_thread.start_new_thread``, it is never registered in
    ``threading``'s table, so ``threading.enumerate()``, ``active_count()``
    and thread-leak checks (CPython's regrtest "env changed", anyio's
    ``test_single_thread``) see the program's threads only.  Like a daemon
    thread it is not joined at interpreter exit (it stops when finalization
    takes the GIL from it).  Its target must never call
    ``threading.current_thread()``: that would register a ``_DummyThread``
    for it.  It does not exist in a forked child: `is_alive` says so there.
    """

    __slots__ = ("_done", "_pid", "ident", "name", "native_id")

    def __init__(self, target: Callable[[], None], name: str) -> None:
        self.name = name
        self._pid = os.getpid()
        self._done = _thread.allocate_lock()
        self._done.acquire()
        self.ident: int | None = None
        self.native_id: int | None = None
        done = self._done

        def run() -> None:
            self.native_id = _thread.get_native_id()
            try:
                target()
            except BaseException as exc:  # noqa: BLE001 - nothing above us would report it
                report_internal_error(name, exc)
            finally:
                done.release()

        self.ident = _thread.start_new_thread(run, ())

    def is_alive(self) -> bool:
        return self._pid == os.getpid() and self._done.locked()

    def join(self, timeout: float) -> None:
        """Wait at most *timeout* seconds for the thread to end (never from itself)."""
        if self.is_alive() and self.ident != _thread.get_ident() and self._done.acquire(timeout=timeout):
            self._done.release()


def start_hidden_thread(target: Callable[[], None], name: str) -> HiddenThread:
    """Run *target* in a `HiddenThread` called *name*."""
    return HiddenThread(target, name)


# --- forked children -------------------------------------------------------------
#
# A forked child has only the thread that called fork(): a lock another
# thread held at that moment stays held in the child for ever, and threads
# asyncwatch started are gone.  Everything that owns such state registers here;
# one os.register_at_fork hook serves them all (it keeps forever whatever it
# is given, so owners are held weakly).

_in_forked_child: weakref.WeakKeyDictionary[Any, Callable[[Any], None]] = weakref.WeakKeyDictionary()


def in_forked_child(owner: Any, renew: Callable[[Any], None]) -> None:
    """Have ``renew(owner)`` called in every forked child while *owner* lives."""
    _in_forked_child[owner] = renew


def new_lock(owner: Any) -> None:
    """`in_forked_child`'s usual *renew*: a new ``owner._lock``."""
    owner._lock = threading.Lock()


def _after_fork_in_child() -> None:
    for owner, renew in list(_in_forked_child.items()):
        try:
            renew(owner)
        except Exception as exc:
            report_internal_error(f"{type(owner).__name__} after fork", exc)


def forget_internal_errors() -> None:
    """Let every part report its next internal error again (after uninstall)."""
    with _reported_lock:
        _reported_errors.clear()


class RateLimiter:
    """At most *burst* findings of one kind at one site, then one per *interval_s*.

    A hot loop that blocks on every tick, or a line that drops a coroutine a
    thousand times a second, must not flood logs, the findings file or
    memory.  The first *burst* findings of each (kind, site) go through; after
    that one per *interval_s* does, carrying in ``suppressed`` how many like
    it were held back since the last one that went through.  Counts per place
    are kept for the exit summary.  The table of places is bounded: past
    *max_places*, the oldest half is forgotten (a forgotten place starts a
    new burst, which is the safe direction to err in).
    """

    def __init__(self, burst: int = 10, interval_s: float = 60.0, max_places: int = 10_000) -> None:
        self.burst = burst
        self.interval_s = interval_s
        self.max_places = max_places
        # (kind, site) -> [findings seen, time of the last one let through, held back since]
        self._places: dict[tuple[FindingKind, Site | None], list[Any]] = {}
        self.suppressed: Counter[tuple[FindingKind, Site | None]] = Counter()
        self._lock = threading.Lock()
        self._clock = time.monotonic
        in_forked_child(self, new_lock)

    def admit(self, finding: Finding) -> Finding | None:
        """The finding to report (with ``suppressed`` filled in), or None to hold it back."""
        key = (finding.kind, finding.site)
        now = self._clock()
        with self._lock:
            place = self._places.get(key)
            if place is None:
                if len(self._places) >= self.max_places:
                    for old in list(self._places)[: self.max_places // 2]:
                        del self._places[old]
                self._places[key] = [1, now, 0]
                return finding
            place[0] += 1
            if place[0] <= self.burst or now - place[1] >= self.interval_s:
                held, place[1], place[2] = place[2], now, 0
                return dataclasses.replace(finding, suppressed=held) if held else finding
            place[2] += 1
            if len(self.suppressed) < self.max_places or key in self.suppressed:
                self.suppressed[key] += 1
            return None


#: Thread id -> how many findings it is handing to reporters (each thread
#: touches only its own key).
_emitting: dict[int, int] = {}


def emitting(thread_id: int) -> bool:
    """Whether *thread_id* is handing a finding to the reporters right now."""
    return thread_id in _emitting


@contextlib.contextmanager
def reporting() -> Iterator[None]:
    """Mark this thread as handing a finding to the reporters (from before the
    finding is built, for a detector that takes it from shared state): a
    signal that lands in the middle waits for it (see _signals)."""
    thread = threading.get_ident()
    _emitting[thread] = _emitting.get(thread, 0) + 1
    try:
        yield
    finally:
        depth = _emitting.pop(thread, 1) - 1
        if depth:
            _emitting[thread] = depth


def wait_for_emitters(ignore: int | None = None, timeout: float = 2.0) -> None:
    """Wait until no thread (but *ignore*) is handing a finding to the
    reporters: a signal is ending the process, and the summary must count
    what the watchdog thread is reporting at that moment."""
    deadline = time.monotonic() + timeout
    while any(thread != ignore for thread in list(_emitting)) and time.monotonic() < deadline:
        time.sleep(0.001)


class Pipeline:
    """Hands findings to reporters; contains and disables failing ones."""

    def __init__(self, reporters: Iterable[Reporter] = (), limiter: RateLimiter | None = None) -> None:
        self._reporters: list[Reporter] = list(reporters)
        self._lock = threading.Lock()
        self.limiter = limiter
        in_forked_child(self, new_lock)

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
        with reporting():
            self._emit(finding)

    def _emit(self, finding: Finding) -> None:
        limiter = self.limiter
        admitted: Finding | None = finding
        if limiter is not None:
            try:
                admitted = limiter.admit(finding)
            except Exception as exc:
                self.limiter = None
                report_internal_error("rate limiter", exc)
        interrupted: BaseException | None = None
        for reporter in self._reporters:  # a snapshot: add/remove replace the list
            try:
                if getattr(reporter, "receives_all", False):
                    reporter.report(finding)
                elif admitted is not None:
                    reporter.report(admitted)
                else:
                    held_back = getattr(reporter, "held_back", None)
                    if held_back is not None:  # e.g. a metric that counts every finding
                        held_back(finding)
            except Exception as exc:
                self.remove(reporter)
                report_internal_error(f"reporter {type(reporter).__name__}", exc)
            except BaseException as exc:
                # The program's signal handler raised here (SystemExit from a
                # SIGTERM handler, KeyboardInterrupt): it is the program's, and
                # goes on once the other reporters have the finding.
                if interrupted is None:
                    interrupted = exc
        if interrupted is not None:
            raise interrupted

    def flush(self, timeout: float = 5.0) -> None:
        """Wait (at most *timeout* seconds each) for reporters that write in the background."""
        for reporter in self._reporters:
            flush = getattr(reporter, "flush", None)
            if flush is not None:
                try:
                    flush(timeout)
                except Exception as exc:
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
            global _cli_reporter
            _cli_reporter = weakref.ref(self)

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
        if not structlog.is_configured() and (self._fallback is None or _logging_configured()):
            # The record keeps the findings file's form (``stack`` a list),
            # plus what a subclass adds (trace ids).
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
        self.emit(finding, fields)

    def emit(self, finding: Finding, fields: dict[str, Any]) -> None:
        if not self._logger.isEnabledFor(logging.WARNING):
            return
        site = _site_text(fields.get("site")) or "site unknown"
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
    for key in ("site", "cancelled_by", "created_at"):
        if isinstance(event.get(key), dict):
            event[key] = _site_text(event[key])
        elif key in event and event[key] is None:
            del event[key]
    event.pop("stack", None)  # the summary line is enough on a console
    for key in ("task", "coroutine", "duration_s", "time", "pid", "cause"):
        if event.get(key) is None:
            event.pop(key, None)
    if not event.get("suppressed"):
        event.pop("suppressed", None)
    event.pop("time", None)  # the renderer prints its own timestamp
    event.pop("pid", None)
    return event


class JsonLinesReporter:
    """Write each finding as one JSON object per line, as it happens.

    Lines are written by a background thread, so a slow or stuck disk never
    stalls the event loop that found something: `report` only queues the
    line (at most *max_queued* lines wait; more are counted as dropped and
    said once).  `flush` waits for the queue; `close` flushes, then closes.
    The file is opened with ``O_APPEND`` and lines go out in whole
    ``write()`` calls, so processes sharing it (the children of
    ``asyncwatch run``, the workers of a pre-forking server) never write
    over or into each other's lines.  A write that fails (a full or
    read-only disk) disables this reporter, said once; the other reporters
    go on.
    """

    def __init__(self, path: str | os.PathLike[str], *, append: bool = False, max_queued: int = 10_000) -> None:
        self.path = os.path.abspath(os.fspath(path))
        flags = os.O_WRONLY | os.O_CREAT | os.O_APPEND | (0 if append else os.O_TRUNC)
        self._fd: int | None = os.open(self.path, flags, 0o666)
        self._max_queued = max_queued
        self._queue: deque[bytes] = deque()
        self._writing = False
        self._cond = threading.Condition(threading.Lock())
        self._thread: HiddenThread | None = None
        self.dropped = 0
        self._write = os.write
        _open_files.add(self)
        in_forked_child(self, JsonLinesReporter._after_fork_in_child)

    def report(self, finding: Finding) -> None:
        data = (json.dumps(finding.to_dict(), ensure_ascii=False) + "\n").encode("utf-8")
        with self._cond:
            if self._fd is None:
                return
            if len(self._queue) >= self._max_queued:
                self.dropped += 1
                if self.dropped == 1:
                    report_internal_error(
                        "findings file", RuntimeError(f"{self.path}: writes are not keeping up; dropping findings")
                    )
                return
            self._queue.append(data)
            if self._thread is None:
                self._thread = start_hidden_thread(self._run, "asyncwatch-findings-writer")
            self._cond.notify()

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._queue and self._fd is not None:
                    self._cond.wait()
                fd = self._fd
                if fd is None:
                    return
                data = b"".join(self._queue)
                self._queue.clear()
                self._writing = True
            try:
                while data:  # whole lines; the loop only matters for a pipe's short writes
                    data = data[self._write(fd, data) :]
            except OSError as exc:
                with self._cond:
                    self._queue.clear()
                    self._close_fd()
                    self._writing = False
                    self._cond.notify_all()
                report_internal_error("findings file", exc)
                return
            with self._cond:
                self._writing = False
                self._cond.notify_all()

    def flush(self, timeout: float = 5.0) -> bool:
        """Wait until every queued line is written; False if *timeout* ran out."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while (self._queue or self._writing) and self._fd is not None:
                left = deadline - time.monotonic()
                if left <= 0 or self._thread is None or not self._thread.is_alive():
                    return False
                self._cond.wait(left)
            return True

    def close(self) -> None:
        self.flush()
        with self._cond:
            self._close_fd()
            self._queue.clear()
            self._cond.notify_all()

    def _close_fd(self) -> None:
        if self._fd is not None:
            try:
                os.close(self._fd)
            except OSError:
                pass
            self._fd = None

    def _after_fork_in_child(self) -> None:
        # The writer thread is not in the child, and a lock held by it at the
        # fork stays held: new ones.  Lines the parent had queued are the
        # parent's to write.
        self._cond = threading.Condition(threading.Lock())
        self._queue.clear()
        self._writing = False
        self._thread = None


_open_files: weakref.WeakSet[JsonLinesReporter] = weakref.WeakSet()


def _flush_open_files() -> None:
    """At exit: what is queued reaches the disk (the writer is a daemon thread)."""
    for reporter in list(_open_files):
        try:
            reporter.flush()
        except Exception as exc:
            report_internal_error("findings file", exc)


def _before_fork() -> None:
    # A multiprocessing "fork" child leaves through os._exit(), which runs no
    # atexit handler, but runs multiprocessing's own finalizers: have the
    # child register one (multiprocessing clears those it inherits).
    util = sys.modules.get("multiprocessing.util")
    if util is not None:
        for reporter in list(_open_files):
            util.register_after_fork(reporter, _flush_at_child_exit)


def _flush_at_child_exit(reporter: JsonLinesReporter) -> None:
    util = sys.modules.get("multiprocessing.util")
    if util is not None:
        util.Finalize(reporter, reporter.flush, exitpriority=-100)


atexit.register(_flush_open_files)
if hasattr(os, "register_at_fork"):
    os.register_at_fork(before=_before_fork, after_in_child=_after_fork_in_child)


class CollectingReporter:
    """Keep findings in a list (what `asyncwatch.testing.capture_findings` uses).

    It receives every finding, rate limit or not: tests count them.
    """

    receives_all = True

    def __init__(self, predicate: Callable[[Finding], bool] | None = None) -> None:
        self.findings: list[Finding] = []
        self._predicate = predicate
        self._lock = threading.Lock()

    def report(self, finding: Finding) -> None:
        if self._predicate is None or self._predicate(finding):
            with self._lock:
                self.findings.append(finding)


class SummaryReporter:
    """Count findings by kind and site for the human summary at exit.

    It receives every finding, including those the rate limit held back
    from the logs and the findings file.
    """

    receives_all = True

    def __init__(self) -> None:
        self.counts: Counter[tuple[FindingKind, Site | None]] = Counter()
        #: Of `counts`, the stalls inside an import (``cause="import"``): start-up work.
        self.imports: Counter[tuple[FindingKind, Site | None]] = Counter()
        self._lock = threading.Lock()

    def report(self, finding: Finding) -> None:
        with self._lock:
            self.counts[(finding.kind, finding.site)] += 1
            if finding.cause == "import":
                self.imports[(finding.kind, finding.site)] += 1

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    @property
    def verdict_total(self) -> int:
        """The findings that fail ``--fail-on-findings``: all but start-up imports."""
        return self.total - sum(self.imports.values())

    def render(self, held_back: Mapping[tuple[FindingKind, Site | None], int] | None = None) -> str:
        """A short text: findings grouped by kind and site, with counts, and
        how many of them the rate limit (*held_back*, per kind and site) kept
        out of the logs and the findings file."""
        total = self.total
        if not total:
            return "asyncwatch: no findings\n"
        places = len(self.counts)
        lines = [f"asyncwatch: {total} finding{'s' if total != 1 else ''} in {places} place{'s' if places != 1 else ''}"]
        width = max(len(k.value) for k, _ in self.counts)
        order = sorted(self.counts.items(), key=lambda item: (item[0][0].value, -item[1], str(item[0][1])))
        for (kind, site), count in order:
            where = _site_text(site.to_dict()) if site else "(site unknown)"
            line = f"  {kind.value:<{width}}  {count:>4}x  {where}"
            if self.imports.get((kind, site)):
                line += "  (inside an import: start-up; not counted by --fail-on-findings)"
            held = held_back.get((kind, site), 0) if held_back else 0
            if held:
                line += f"  ({held} not logged one by one: report limit)"
            lines.append(line)
        total_held = sum(held_back.values()) if held_back else 0
        if total_held:
            lines.append(
                f"  ({total_held} finding{'s' if total_held != 1 else ''} repeated a place already reported and "
                "were only counted; --report-limit / ASYNCWATCH_REPORT_LIMIT sets how many are logged per place)"
            )
        return "\n".join(lines) + "\n"
