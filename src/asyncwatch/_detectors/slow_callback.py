"""Slow callbacks: a watchdog thread that looks at the loop thread's stack.

Nothing of ours runs on the event loop's hot path.  One daemon thread
(`watchdog`), shared by every watched loop, looks at each loop
(`loop_probe`) only when the loop missed the deadline its own ticks keep
pushing back (`deadline`): a step has held it for a tenth of the threshold.
From then on, until the loop ticks again, it looks at most
``LOOKS_PER_THRESHOLD`` times per threshold; it takes the GIL only for
those looks (issue 15: a healthy loop must not lose the GIL on a fixed
clock).  Where the loop cannot tick safely, it looks on that clock always.

* the *callback frame* is the outermost frame of the running callback: the
  frame just inside ``Handle._run`` (asyncio), or just inside the frame that
  called ``run_forever`` (uvloop, whose dispatch is compiled).  When there is
  none, the loop is idle or in its own machinery.
* at each look that finds a new callback frame, the watchdog queues a
  heartbeat (``call_soon_threadsafe``); the ready queue is FIFO, so the next
  step of the same task cannot run before it, and an unchanged heartbeat
  count at the next look proves it is still the same step.  The step is
  timed from the first look that saw it, and looked at again when that
  reaches the threshold: then it is a stall, and the site is the innermost
  application frame at that moment: the blocking line itself.
* blocking that holds the GIL (one long C call: ``json.loads`` of a large
  body, ``list.sort``, a backtracking regex) keeps the watchdog from running
  at all.  Its wake-up then arrives late by about the length of the call;
  the loop thread gives the GIL up at its first eval-breaker check after the
  call returns, so its frame is still at the calling line.  A wake-up late
  by the threshold, not spent waiting for a CPU, starts a stall at once,
  dated from when the wake-up was due.
* a stack that ends without reaching the loop's dispatch, while the loop is
  running and in none of its own machinery, is a greenlet's (SQLAlchemy's
  asyncio layer runs sync code in greenlets on the loop thread): its
  outermost frame stands for the callback, and the heartbeat, as for a task,
  tells one long switch-in from many short ones.

What the loop thread's stack says (the callback, its line, a step just
begun) is read by `paused_frames` while the watchdog holds the GIL.  Why the
loop stalled (the ``cause`` field) comes from the clocks in `stall_cause`,
kept per loop by `stall_meter`, all read in the watchdog thread;
`stall_report` turns a stall into its finding.
"""

from __future__ import annotations

from .._core.detector import Detector, DetectorContext, WatchedLoop
from .._core.findings import FindingKind
from .loop_probe import LoopProbe
from .watchdog import Watchdog

__all__ = ["LoopProbe", "SlowCallbackDetector", "Watchdog"]


class SlowCallbackDetector(Detector):
    """Reports ``slow_callback`` (site: the blocking line): a `LoopProbe` per
    loop, sampled by one `Watchdog` thread for the whole process."""

    kind = FindingKind.SLOW_CALLBACK

    def __init__(self) -> None:
        self.watchdog = Watchdog()

    def install(self, context: DetectorContext) -> None:
        self.watchdog.on_failure = lambda exc: context.failed(self, exc)
        self.watchdog.gc_clock.install()

    def loop_attached(self, watch: WatchedLoop) -> None:
        loop = watch.loop_ref()
        if loop is None:
            return
        probe = LoopProbe(loop, watch.settings.slow_callback_s, watch.emit, watch.heard_from, self.watchdog.gc_clock)
        watch.state[self] = probe
        probe.start(loop)
        self.watchdog.add(probe)

    def loop_detached(self, watch: WatchedLoop) -> None:
        probe = watch.state.pop(self, None)
        if probe is not None:
            self.watchdog.remove(probe)

    def flush(self) -> None:
        self.watchdog.flush()

    def uninstall(self) -> None:
        self.watchdog.stop()
        self.watchdog.gc_clock.uninstall()
