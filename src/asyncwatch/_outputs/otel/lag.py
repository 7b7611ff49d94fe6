"""Loop lag: a timer per loop; how late it fires is how long callbacks waited."""

from __future__ import annotations

import asyncio
import weakref
from typing import Any

from ..._core import loops
from ..._core.runtime import report_internal_error

__all__ = ["LAG_BUCKETS", "LagProbe"]

# Seconds; the SDK's default buckets are meant for milliseconds.
LAG_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class LagProbe:
    """A timer per loop: how late it fires is how long callbacks waited."""

    __slots__ = ("enabled", "expected", "histogram", "interval", "loop_ref")

    def __init__(self, loop: asyncio.AbstractEventLoop, histogram: Any, interval: float) -> None:
        self.loop_ref = weakref.ref(loop)
        self.histogram = histogram
        self.interval = interval
        self.enabled = True
        self.expected = 0.0

    def alive(self) -> bool:
        loop = self.loop_ref()
        return self.enabled and loop is not None and not loops.is_closed(loop)

    def schedule(self) -> None:
        loop = self.loop_ref()
        if loop is None or loops.is_closed(loop) or not self.enabled:
            return
        self.expected = loop.time() + self.interval
        loops.call_at(loop, self.expected, self.tick)

    def tick(self) -> None:
        loop = self.loop_ref()
        if loop is None or not self.enabled:
            return
        try:
            # Timers may fire up to the clock's resolution early: never negative.
            self.histogram.record(max(0.0, loop.time() - self.expected))
        except Exception as exc:
            self.enabled = False
            report_internal_error("OpenTelemetry loop lag", exc)
            return
        self.schedule()
