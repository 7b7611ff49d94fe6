"""The findings file: JSON Lines, written by a background thread."""

from __future__ import annotations

import contextlib
import os
import sys
import threading
import time
import weakref
from collections import deque
from typing import Any

from .._core.findings import Finding
from .._core.runtime import (
    HiddenThread,
    ShuttingDown,
    at_exit,
    before_fork,
    in_forked_child,
    report_internal_error,
    start_hidden_thread,
)

__all__ = ["JsonLinesReporter", "finding_line", "write_all"]


def finding_line(finding: Finding, **extra: Any) -> bytes:
    """One line of a findings file: the finding's JSON form (after *extra*'s
    keys), UTF-8, ending in a newline; every writer of findings uses it."""
    import json  # loaded by every writer's set-up already (see JsonLinesReporter.__init__)

    return (json.dumps({**extra, **finding.to_dict()}, ensure_ascii=False) + "\n").encode("utf-8")


def write_all(fd: int, data: bytes) -> None:
    """Write *data* whole: one ``write()`` for a regular file (O_APPEND keeps
    the lines of several processes apart); the loop is for a pipe's short writes."""
    while data:
        data = data[os.write(fd, data) :]


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
        # json only once there is a findings file: at import it would add ~230
        # objects that every collection walks (issue 15); loaded here, not at
        # the first finding, which may be written from a signal handler.
        import json  # noqa: F401

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
        _flush_when_a_multiprocessing_child_ends(self)

    def report(self, finding: Finding) -> None:
        data = finding_line(finding)
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
            here = False
            if self._thread is None:
                try:
                    self._thread = start_hidden_thread(self._run, "asyncwatch-findings-writer")
                except ShuttingDown:  # 3.12, an exit function's finding: written here
                    here = True
            self._cond.notify()
        if here:
            with self._cond:
                self._writing = True
            self._write_queued()

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._queue and self._fd is not None:
                    self._cond.wait()
                if self._fd is None:
                    return
                self._writing = True
            if not self._write_queued():
                return

    def _write_queued(self) -> bool:
        """Write what is queued (`_writing` set by the caller); False once
        the file is closed, or failed."""
        with self._cond:
            fd = self._fd
            data = b"".join(self._queue)
            self._queue.clear()
        try:
            while data and fd is not None:  # whole lines; the loop only matters for a pipe's short writes
                data = data[self._write(fd, data) :]
        except OSError as exc:
            with self._cond:
                self._queue.clear()
                self._close_fd()
                self._writing = False
                self._cond.notify_all()
            report_internal_error("findings file", exc)
            return False
        with self._cond:
            self._writing = False
            self._cond.notify_all()
        return fd is not None

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
            with contextlib.suppress(OSError):
                os.close(self._fd)
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


def _flush_when_a_multiprocessing_child_ends(reporter: JsonLinesReporter) -> None:
    """A reporter made inside a multiprocessing child: flush it before os._exit().

    A forkserver's children import asyncio (and so, through the bootstrap,
    asyncwatch) while unpickling their target, before the child's
    ``_bootstrap`` clears the finalizers it inherited and runs the
    after-fork hooks: no fork happens after the reporter exists, so
    `_before_fork` never ran for it, and its queued line raced os._exit()
    (lost in about 1 run in 5).  An after-fork hook registered now runs in
    that ``_bootstrap``; a reporter made later, in a child already running
    its target, registers its finalizer at once.
    """
    util = sys.modules.get("multiprocessing.util")
    if util is None:
        return
    util.register_after_fork(reporter, _flush_at_child_exit)
    process = sys.modules.get("multiprocessing.process")
    if process is not None and process.parent_process() is not None:
        _flush_at_child_exit(reporter)


def _flush_at_child_exit(reporter: JsonLinesReporter) -> None:
    util = sys.modules.get("multiprocessing.util")
    if util is not None:
        util.Finalize(reporter, reporter.flush, exitpriority=-100)


at_exit(_flush_open_files)
before_fork(_before_fork)
