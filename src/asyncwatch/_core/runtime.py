"""Process runtime: asyncwatch's own errors, forked children, interpreter exit.

Everything here is process-wide and independent of any detector or output:

* `report_internal_error`: an error inside asyncwatch is contained by its
  caller and said once per part, on asyncwatch's own logger;
* `in_forked_child`: one ``os.register_at_fork`` hook renews the locks and
  threads of every owner registered (a forked child has only the thread that
  called fork(); a lock another thread held stays held for ever);
* `before_fork` / `at_exit`: callbacks run before a fork and at exit;
* `HiddenThread`: asyncwatch's own threads, which the program never sees;
* `reporting`: marks a thread handing a finding to the outputs, so that a
  signal ending the process waits for it (see _signals.py).
"""

from __future__ import annotations

import _thread
import atexit
import contextlib
import logging
import os
import sys
import threading
import time
import weakref
from collections.abc import Callable, Iterator
from types import ModuleType
from typing import Any

__all__ = [
    "LOGGER_NAME",
    "PACKAGE_DIR",
    "HiddenThread",
    "ShuttingDown",
    "at_exit",
    "before_fork",
    "configured_structlog",
    "forget_internal_errors",
    "in_forked_child",
    "internal_logger",
    "new_lock",
    "report_internal_error",
    "reporting",
    "set_own_logger",
    "start_hidden_thread",
    "wait_for_emitters",
]

LOGGER_NAME = "asyncwatch"

#: asyncwatch's own package directory (this file is in its _core/), with a
#: trailing separator: a code file under it is ours.  Here, in the module
#: that imports nothing of the package, so that any part may ask.
PACKAGE_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__))) + os.sep

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
        with contextlib.suppress(Exception):
            sys.stderr.write(f"asyncwatch: internal error in {part}: {type(exc).__name__}: {exc}\n")


def forget_internal_errors() -> None:
    """Let every part report its next internal error again (after uninstall)."""
    with _reported_lock:
        _reported_errors.clear()


#: Where asyncwatch's own events go when structlog is not configured: under
#: ``asyncwatch run``, the command line's stderr rendering, never the
#: program's stdout.  Held weakly: it belongs to the output that set it.
_own_logger: weakref.ref[Any] | None = None


def set_own_logger(owner: Any) -> None:
    """Have *owner*'s ``_logger()`` log asyncwatch's own events while it lives
    and the application has not configured structlog."""
    global _own_logger
    _own_logger = weakref.ref(owner)


def internal_logger() -> Any:
    """The logger for asyncwatch's own events (internal errors, bad environment).

    The application's structlog configuration when it has one; under
    ``asyncwatch run``, which owns the process, the command line's stderr
    rendering unless the application's logging has a handler for it; else
    the standard library's ``asyncwatch`` logger (never structlog's
    unconfigured default: it prints on stdout).
    """
    structlog = configured_structlog()
    if structlog is not None:
        return structlog.get_logger(LOGGER_NAME)
    owner = _own_logger() if _own_logger is not None else None
    if owner is not None and not logging_configured():
        return owner._logger()
    return _StdlibEvents(logging.getLogger(LOGGER_NAME))


def configured_structlog() -> ModuleType | None:
    """structlog, if the application configured it; else None.

    Never imports structlog: a program that has not imported it has not
    configured it, and importing it would add ~2,600 objects that every
    collection of the garbage collector walks again (issue 15).
    """
    structlog = sys.modules.get("structlog")
    if structlog is None:
        return None
    is_configured = getattr(structlog, "is_configured", None)  # None while structlog itself is importing
    return structlog if is_configured is not None and is_configured() else None


def logging_configured() -> bool:
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

        try:
            self.ident = _thread.start_new_thread(run, ())
        except RuntimeError as exc:
            if "shutdown" in str(exc):
                raise ShuttingDown(str(exc)) from None
            raise

    def is_alive(self) -> bool:
        return self._pid == os.getpid() and self._done.locked()

    def join(self, timeout: float) -> None:
        """Wait at most *timeout* seconds for the thread to end (never from itself)."""
        if self.is_alive() and self.ident != _thread.get_ident() and self._done.acquire(timeout=timeout):
            self._done.release()


class ShuttingDown(RuntimeError):
    """No thread can start: Python 3.12 refuses them once it is shutting
    down, its exit functions included ("can't create new thread at
    interpreter shutdown"; 3.11 and 3.13 start them)."""


def start_hidden_thread(target: Callable[[], None], name: str) -> HiddenThread:
    """Run *target* in a `HiddenThread` called *name* (`ShuttingDown`: too late)."""
    return HiddenThread(target, name)


# --- threads handing a finding to the outputs ---------------------------------------

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


# --- forked children -------------------------------------------------------------
#
# A forked child has only the thread that called fork(): a lock another
# thread held at that moment stays held in the child for ever, and threads
# asyncwatch started are gone.  Everything that owns such state registers here;
# one os.register_at_fork hook serves them all (it keeps forever whatever it
# is given, so owners are held weakly).

_in_forked_child: weakref.WeakKeyDictionary[Any, Callable[[Any], None]] = weakref.WeakKeyDictionary()
_before_fork: list[Callable[[], None]] = []
_at_exit: list[Callable[[], None]] = []


def in_forked_child(owner: Any, renew: Callable[[Any], None]) -> None:
    """Have ``renew(owner)`` called in every forked child while *owner* lives."""
    _in_forked_child[owner] = renew


def new_lock(owner: Any) -> None:
    """`in_forked_child`'s usual *renew*: a new ``owner._lock``."""
    owner._lock = threading.Lock()


def before_fork(callback: Callable[[], None]) -> None:
    """Have *callback* called (contained) before every ``os.fork()``."""
    _before_fork.append(callback)


def at_exit(callback: Callable[[], None], *, first: bool = False) -> None:
    """Have *callback* called (contained) when the interpreter exits
    (*first*: before those already registered)."""
    if first:
        _at_exit.insert(0, callback)
    else:
        _at_exit.append(callback)


def _run_all(callbacks: list[Callable[[], None]], part: str) -> None:
    for callback in list(callbacks):
        try:
            callback()
        except Exception as exc:  # noqa: BLE001 - diagnostics never break a test run; it runs on unwatched
            report_internal_error(part, exc)


def _after_fork_in_child() -> None:
    for owner, renew in list(_in_forked_child.items()):
        try:
            renew(owner)
        except Exception as exc:
            report_internal_error(f"{type(owner).__name__} after fork", exc)


atexit.register(_run_all, _at_exit, "exit")
if hasattr(os, "register_at_fork"):
    os.register_at_fork(before=lambda: _run_all(_before_fork, "fork"), after_in_child=_after_fork_in_child)
