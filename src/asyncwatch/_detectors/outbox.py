"""Findings the slow-callback watchdog made, reported by a thread of their own.

Reporting writes (a log line to stderr, a line to the findings file), and
each write lets the GIL go.  Made from the watchdog thread in the middle of
its looks, each write let a loop thread that runs steps holding the GIL back
to back run one of them unseen: six tasks each summing a large list gave two
findings, one of them five steps long, under ``asyncwatch run`` with its
console log (six of six with the log off).  The watchdog only queues here;
a hidden thread reports, and whoever stops watching a loop or flushes at
exit (or at a signal) reports what is left, on its own thread.
"""

from __future__ import annotations

import collections
import threading
from collections.abc import Callable

from .._core.findings import Finding
from .._core.runtime import HiddenThread, ShuttingDown, report_internal_error, reporting, start_hidden_thread

__all__ = ["Outbox"]

Emit = Callable[[Finding], None]


class Outbox:
    """A queue of (emit, finding) and the thread that empties it."""

    def __init__(self) -> None:
        self._queue: collections.deque[tuple[Emit, Finding]] = collections.deque()
        self._ready = threading.Event()
        self._thread: HiddenThread | None = None
        self._stopping = False
        #: When the oldest finding not yet sent to the thread was queued.
        self.since: float | None = None

    def start(self) -> None:
        """Start the reporting thread unless it runs (from a thread that may
        let the GIL go: never from a look)."""
        if self._thread is not None and self._thread.is_alive():
            return
        self._stopping = False
        try:
            self._thread = start_hidden_thread(self._run, "asyncwatch-reporter")
        except ShuttingDown:
            self._thread = None  # what is queued is reported by the exit's flush

    #: The longest a finding waits for a quiet moment of the loops.
    HOLD_S = 1.0

    def put(self, emit: Emit, finding: Finding, now: float) -> None:
        """Queue *finding* for *emit* (the watchdog thread, in a look: lets
        nothing go, and wakes no one)."""
        if self.since is None:
            self.since = now
        self._queue.append((emit, finding))

    def send(self, now: float, quiet: bool) -> None:
        """Have the thread report what is queued, when the watchdog is about
        to wait and its last look found no loop in a step (*quiet*), or a
        finding has waited `HOLD_S`.  Woken during a look, the thread asked
        for the GIL, took it at the switch interval, and its writes let the
        loop thread run on; woken while a loop runs steps that hold the GIL
        back to back, it took the GIL as one let it go, ahead of the
        watchdog, and the next one ran unseen (3.11: one sum in six)."""
        since = self.since
        if since is not None and (quiet or now - since >= self.HOLD_S):
            self.since = None
            self._ready.set()

    def drain(self) -> None:
        """Report everything queued, on the calling thread."""
        self.since = None
        while self._queue:
            # Marked before it is taken off the queue: a signal's exit waits
            # for a finding in our hands (`wait_for_emitters`).
            with reporting():
                try:
                    emit, finding = self._queue.popleft()
                except IndexError:  # another thread took the last one
                    return
                try:
                    emit(finding)
                except Exception as exc:  # contained: the next one still goes out
                    report_internal_error("slow-callback report", exc)

    def stop(self) -> None:
        """Stop the thread (at most a second's wait) and report what is left."""
        self._stopping = True
        self._ready.set()
        thread, self._thread = self._thread, None
        if thread is not None:
            thread.join(timeout=1.0)
        self.drain()

    def _run(self) -> None:
        while not self._stopping:
            self._ready.wait()
            self._ready.clear()
            self.drain()
