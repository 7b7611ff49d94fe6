"""asyncwatch's ``gc.callbacks`` entries in Python, where its C extension
was not built (`_ctask.GcTimer`, `_ctask.Collecting`: the same fields and
protocol).  Imported only then: a Python entry lets signal handlers run
inside a long C call (see _ctask.c and the README's Limits).

Each entry's function is named ``_gc_callback``: the watchdog finds the
program's frame below a frame of that name (paused_frames.callback_frame).
"""

from __future__ import annotations

import collections
import threading
import time
from collections.abc import Callable
from typing import Any

__all__ = ["Collecting", "GcTimer"]


class GcTimer:
    """Times collections: see `_ctask.GcTimer`."""

    def __init__(self, pauses: collections.deque[tuple[float, float, float, int]], floor: float) -> None:
        self.total = 0.0
        self.started = 0.0  # wall clock, while a collection runs
        self.started_cpu = 0.0
        self.started_by = 0  # the thread running it
        self.pauses = pauses
        self.floor = floor

    def _gc_callback(self, phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            self.started_cpu = time.thread_time()
            self.started_by = threading.get_ident()
            self.started = time.perf_counter()  # last: set, the two above are this collection's
        elif self.started:
            spent = time.thread_time() - self.started_cpu
            self.total += spent
            if spent >= self.floor:
                self.pauses.append((time.perf_counter(), spent, self.started, self.started_by))
            self.started = 0.0

    __call__ = _gc_callback


class Collecting:
    """Which thread collects, and the flushes after one that held something:
    see `_ctask.Collecting`."""

    def __init__(self) -> None:
        self.thread = 0  # threading.get_ident() of the thread collecting; 0 when none
        self.held = False
        self.flushes: tuple[Callable[[], None], ...] = ()

    def _gc_callback(self, phase: str, _info: dict[str, Any]) -> None:
        if phase == "start":
            self.thread = threading.get_ident()
            return
        self.thread = 0
        if self.held:
            self.held = False
            for flush in self.flushes:
                flush()

    __call__ = _gc_callback
