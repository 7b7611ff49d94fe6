"""The watchdog's view of one event loop: which callback or task step it is
running, whether that is still the step seen at the last look, and the stall
it becomes once one step has held the loop for the threshold.

All of it runs in the watchdog thread but two callbacks the loop runs:
`LoopProbe.beat`, the heartbeat the watchdog queues, and `LoopProbe.tick`,
the loop's own timer that pushes back its deadline.  The heartbeat only
stores: a clock read through the vDSO (no system call), the thread's
identity (the ``threading`` objects' attributes) and a counter.  The tick
reads the loop thread's clocks, its schedstat file through ctypes (a read
that never blocks, and no Python-level I/O: a test suite that forbids
blocking calls on the loop, anyio's with blockbuster, sees nothing of ours
there), and sets a timer.  Every per-loop object here refers to the loop
weakly.

What the stack says is `paused_frames`'; the clocks, `stall_meter`'s.  This
module stays one concept, past the project's ~450 lines: the state machine
that follows one step of the loop from the look that first sees it to the
heartbeat that ends it (followed, tentative, captured, late, compiled),
whose transitions read and write the same few fields from two threads; split,
each half would need the other's invariants to be read.
"""

from __future__ import annotations

import asyncio
import asyncio.events
import sys
import threading
import time
import weakref
from collections.abc import Callable
from types import CodeType, FrameType

from .._core import loops
from .._core.detector import watches
from .._core.findings import Finding
from .._core.frames import is_library_file
from .._core.runtime import report_internal_error, reporting
from .deadline import Deadline, thread_state, ticks_safely
from .paused_frames import HANDLE_RUN, at_start, callback_frame, own_work, read_stall, resumed_under_an_await
from .peeked import Peek, elsewhere, vouched
from .stall_cause import Breakdown, GcClock
from .stall_meter import Clocks, StallMeter, Wake, held_from, mark_at
from .stall_report import COMPILED, Compiled, Stall, stall_finding

__all__ = ["LOOKS_PER_THRESHOLD", "Look", "LoopProbe"]

#: How many times per threshold the watchdog looks at a loop that is busy
#: with no deadline (`deadline`), or whose deadline passed; it is also the
#: deadline itself: a step is first seen within a tenth of the threshold.
#: The look interval is what a look can miss: a step is first seen up to
#: one interval after it began and is timed from then, so steps between 1x
#: and (1 + 1/LOOKS) x the threshold may go unreported and a duration is
#: short by up to an interval.  Only a look proves a step was already
#: running (the heartbeat dates a step's end, never its start, and dating
#: one from the look before it would report steps shorter than the
#: threshold), so the window cannot shrink without more looks.  Four looks
#: (a quarter of the threshold missed) lost stalls that ten found.  Each
#: look takes the GIL from the loop once: on a fixed clock, ten a threshold
#: cost a never-idle loop 1.07x-1.11x wall time (issue 15), which is why a
#: healthy loop is now looked at only when it misses its deadline.
LOOKS_PER_THRESHOLD = 10

#: Of the threshold, how long a step must have been followed for its line to
#: be kept in case no look comes between the threshold and its end (asyncio,
#: where the heartbeat dates the end exactly: see `LoopProbe.finish`).
TENTATIVE_SHARE = 0.5

_now = time.perf_counter
# The interpreter's switch interval when asyncwatch was imported: how long a
# thread asking for the GIL waits before the holder is asked to let it go.
_SWITCH_S = sys.getswitchinterval()


# The two below are plain classes with slots, not NamedTuples: each
# NamedTuple costs about 30 objects that every full collection of the
# program walks again, a slots class 9 (issue 15's import footprint).


class _Tentative:
    """A followed step's line past `TENTATIVE_SHARE` of the threshold, with
    what its finding needs if its heartbeat proves it a stall."""

    __slots__ = ("beats", "mark", "measured", "since", "stall")

    def __init__(
        self,
        stall: Stall,
        since: float,
        beats: int,
        mark: Clocks | None,
        measured: tuple[Breakdown | None, str | None],
    ) -> None:
        self.stall = stall
        self.since = since  # when a look first saw the step
        self.beats = beats  # the heartbeat count then
        self.mark = mark
        self.measured = measured


class Look:
    """What `LoopProbe.sample` saw of the loop's stack, without a frame.

    *early*: a wake-up late by the threshold, the line running.  *captured*:
    the followed step crossed the threshold, its line.  *dated*: a step newly
    seen by a late wake-up, at a line of the program, on a loop whose
    dispatch is Python: it held the GIL since before the look.  *fresh*: the
    step newly seen is at a function's first instruction (`_at_start`).
    *tentative*: the followed step is past `TENTATIVE_SHARE` of the
    threshold, its line.  *held_line*: a step newly seen by a wake-up late by
    half the threshold or more, its line (where a hold of the GIL let go).
    *in_program*: a step newly seen by a late wake-up, at a line of the
    program, on any loop.  *inner*: the stall followed (or *captured*) was
    read with code the interpreter entered inside a call left out
    (`Stall.interrupted`), and this look read it with that code in
    (`LoopProbe._still_inside`).  *reread*: the stall followed was read
    inside an import, and this look read it again (`LoopProbe._past_import`).
    *ended*: a wake-up late by the threshold found the loop idle, or in a
    step the peek taken meanwhile does not vouch for, and the peek stood
    still at a line of the program elsewhere: the stall of a step that is
    over (`peeked.elsewhere`), if the loop thread held the GIL.
    """

    __slots__ = (
        "captured",
        "compiled",
        "dated",
        "early",
        "ended",
        "fresh",
        "held_line",
        "idle",
        "in_program",
        "inner",
        "reread",
        "same_step",
        "tentative",
        "thread_id",
    )

    def __init__(
        self,
        thread_id: int,
        compiled: bool,
        idle: bool,
        same_step: bool,
        early: Stall | None,
        captured: Stall | None,
        dated: bool = False,
        fresh: bool = False,
        tentative: Stall | None = None,
        held_line: Stall | None = None,
        in_program: bool = False,
        inner: Stall | None = None,
        reread: Stall | None = None,
        ended: Stall | None = None,
    ) -> None:
        self.thread_id = thread_id
        self.compiled = compiled
        self.idle = idle
        self.same_step = same_step
        self.early = early
        self.captured = captured
        self.dated = dated
        self.fresh = fresh
        self.tentative = tentative
        self.held_line = held_line
        self.in_program = in_program
        self.inner = inner
        self.reread = reread
        self.ended = ended


class LoopProbe:
    """The watchdog's view of one loop.  Sampling state is touched only by
    the watchdog thread; the heartbeat fields only by the loop thread."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        threshold_s: float,
        emit: Callable[[Finding], None],
        heard_from: Callable[[str], None] | None = None,
        gc_clock: GcClock | None = None,
    ) -> None:
        self.loop_ref = weakref.ref(loop)
        # asyncio's loop runs its machinery in Python (_LOOP_MACHINERY); a
        # compiled loop is told from a greenlet by its runner_code only.
        self.pure_asyncio = isinstance(loop, asyncio.base_events.BaseEventLoop)
        self.threshold_s = threshold_s
        #: Between two looks at a busy loop.
        self.look_s = max(threshold_s / LOOKS_PER_THRESHOLD, 0.001)
        #: Between two looks while a stall is in progress (its end).
        self.tick_s = max(threshold_s / 10, 0.001)
        self.emit = emit
        # Told the name of the thread a heartbeat ran on, when it changes.
        self.heard_from = heard_from
        self.enabled = True
        self.wake: Callable[[], None] = lambda: None  # set by the Watchdog: the loop started
        self.nudge: Callable[[], None] = lambda: None  # set by the Watchdog: look now
        self.parked = False
        # written by the loop thread (heartbeat)
        self.thread_id: int | None = None
        self.thread_name: str | None = None  # of the thread that last ran a heartbeat
        self.native_id: int | None = None
        self.runner_code: CodeType | None = None
        self.beats = 0
        self.beat_time = 0.0
        self.beat_pending = False
        self.beat_posted = 0.0
        # written by the watchdog thread
        self.held: FrameType | Compiled | None = None
        self.seen: FrameType | None = None  # by `sample`, for `settle`
        self.seen_beats = 0
        self.held_since = 0.0
        self.held_beats = 0
        self.stall: Stall | None = None
        #: The heartbeat posted for the step followed was next in asyncio's
        #: ready queue: it runs as soon as that step ends (`_post_beat`).
        self.beat_next = False
        #: That step's line, seen past half the threshold: its stall if
        #: the heartbeat then comes a threshold after it was first seen.
        self.tentative: _Tentative | None = None
        #: The line a late look saw the step followed at, as a hold of the GIL
        #: by the loop thread let go, and when: that hold is most of the step
        #: if the step crosses the threshold soon after (`_dated_line`).
        self.dated_line: Stall | None = None
        self.dated_at = 0.0
        self.first_beat = 0.0  # written by the loop thread: the first heartbeat after the step followed
        self._stall_lock = threading.Lock()
        self.python_seen = 0.0  # last sample that saw a Python callback frame
        self.gil_lag = 0.0  # how late the last look got the GIL, up to a switch interval
        #: The stall's breakdown and GIL holder at the last look during it.
        self.measured: tuple[Breakdown | None, str | None] = (None, None)
        #: Why the loop stalled: its clocks, read by the watchdog.
        self.meter = StallMeter(gc_clock if gc_clock is not None else GcClock())
        #: Pushed back by `tick` while the loop turns; the watchdog sleeps
        #: on it instead of looking on its clock (None: it looks on its clock).
        self.deadline: Deadline | None = None
        self.ticking = False  # written by the loop thread: a tick is scheduled
        self.tick_failed = False

    # -- loop thread ---------------------------------------------------------

    def tick(self) -> None:
        """The loop's proof that it turns: a timer every half deadline that
        pushes the deadline back, with the loop thread's clocks for the look
        a missed deadline brings (the previous look may be minutes old).
        The schedstat read goes through ctypes and never blocks."""
        deadline, loop = self.deadline, self.loop_ref()
        if deadline is None or loop is None or not self.enabled:
            self.ticking = False
            return
        try:
            now = _now()
            meter = self.meter
            clock = meter.clock
            if clock is not None and meter.clock_ident is not None and meter.clock_ident[0] == threading.get_ident():
                cpu, wait = clock.read()
                slices = clock.slices
            else:
                cpu, wait, slices = time.thread_time(), None, None
            clocks = Clocks(
                now, cpu, wait, time.process_time(), meter.gc_clock.read(now), meter.foreign, loop_slices=slices
            )
            deadline.push(now, clocks)
            loops.call_later(loop, deadline.tick_every, self.tick)
        except RuntimeError:  # closed
            self.ticking = False
        except Exception as exc:  # contained: the watchdog goes back to its own clock
            self.ticking = False
            self.tick_failed = True  # never armed again: once passed, the watchdog's own clock
            report_internal_error("slow-callback deadline", exc)

    def _start_ticking(self, deadline: Deadline) -> None:
        loop = self.loop_ref()
        if loop is None:
            return
        try:
            loops.call_later(loop, deadline.tick_every, self.tick)
        except RuntimeError:  # closed: no more ticks, the watchdog's own clock
            return
        self.ticking = True

    def beat(self) -> None:
        """Heartbeat, run by the loop: who runs the loop, and from where.

        Stores only (see the module's docstring); a stall it ends is
        reported from here, with the clocks the watchdog read at its last
        look, before the task's next step (a span still open takes it)."""
        self.beat_time = _now()
        ident = threading.get_ident()
        if ident != self.thread_id or self.thread_name is None:
            thread = threading.current_thread()
            self.thread_name = thread.name
            self.native_id = thread.native_id  # set when the thread started: no system call
            if self.heard_from is not None:
                self.heard_from(self.thread_name)
        deadline = self.deadline
        if deadline is not None and (deadline.tstate == 0 or ident != self.thread_id):
            # The loop thread's, read on it: once per deadline (a forked
            # child's is new) and thread (a loop run on another).
            deadline.tstate = thread_state() or -1
        self.thread_id = ident
        caller = sys._getframe(1)
        # asyncio: Handle._run; uvloop: the frame that called run_forever
        # (matched by code, so it survives the loop being run again).
        self.runner_code = None if caller.f_code is HANDLE_RUN else caller.f_code
        if self.beats == self.held_beats:
            self.first_beat = self.beat_time
        self.beats += 1
        self.beat_pending = False
        if not self.ticking and self.deadline is not None and not self.tick_failed:
            self._start_ticking(self.deadline)
        # The step followed is over (we run after it): let go of its frame
        # now.  A frame object held past its function's return keeps the
        # frames that called it (CPython links f_back then), and through
        # them the loop, until our next look: a loop that stops right after
        # would outlive the program's gc.collect() (anyio's
        # test_asyncio_run_does_not_leak_event_loop).
        self.held = self.seen = None
        if self.parked:
            self.parked = False
            self.wake()
        stall = self.stall
        if stall is not None:
            if stall.library_only:
                # A wait inside asyncio or the standard library: whose it was
                # (other threads' CPU, their waits for one) is read over the
                # whole stall, by the watchdog, which we wake.
                self.nudge()
            else:
                # The blocking step is over (we run after it): report it now,
                # before the program moves on, instead of at the next look.
                self._end_stall(self.beat_time, measured=True)

    # -- watchdog thread -----------------------------------------------------

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        """Queue the first heartbeat now, so that it runs before the first
        step of the program's main task (which may block at once); it
        starts the ticks where they are safe (`deadline.ticks_safely`)."""
        if self.deadline is None and ticks_safely(loop):
            self.deadline = Deadline.open(self.look_s)
        self.thread_id = threading.get_ident()
        self.native_id = threading.current_thread().native_id
        if asyncio._get_running_loop() is None:
            # Not inside a loop's step (that one runs no I/O of ours): the
            # clocks a first step holding the GIL at once is measured from.
            self._park_clocks(_now())
        self.beat_pending = True
        # Parked until that heartbeat runs, whatever a look sees meanwhile:
        # it wakes the watchdog and dates the loop's start.  A loop is
        # running before its first callback (uvloop makes its signal
        # socketpair in Python then, asyncio is in run_forever's set-up),
        # and a look there, seeing no step, used to leave the probe
        # unparked: a first step holding the GIL from the heartbeat on went
        # unreported (see `Watchdog._run`).
        self.parked = True
        try:
            if loops.is_running(loop):
                loops.call_soon_threadsafe(loop, self.beat)
            else:
                loops.call_soon(loop, self.beat)
        except RuntimeError:
            self.beat_pending = self.parked = False

    def _post_beat(self, in_step: bool = False) -> bool:
        """Queue a heartbeat unless one is queued; whether it was queued
        now, first in asyncio's ready queue (read under the GIL, which the
        loop thread waits for): then nothing runs between the callback
        running now and the heartbeat (what the loop adds later, an I/O
        event's callback, a timer's, the callback's own, goes after it).
        *in_step*: the look that asks saw the loop in a step."""
        loop = self.loop_ref()
        if loop is None or self.beat_pending:
            return False
        ready = getattr(loop, "_ready", None) if self.pure_asyncio else None
        first = ready is not None and len(ready) == 0
        self.beat_pending = True
        self.beat_posted = _now()
        try:
            if in_step and ready is not None and not loops.is_closed(loop):
                # In a step, asyncio's loop reads its ready queue before it
                # next waits: it needs no wake-up.  call_soon_threadsafe
                # writes to its self-pipe, and the socket's send lets the
                # GIL go: the loop thread, running steps that hold the GIL
                # back to back, ran one of them before we looked again.
                loop._call_soon(self.beat, (), None)  # type: ignore[attr-defined]
            else:
                loops.call_soon_threadsafe(loop, self.beat)
        except RuntimeError:  # closed between our check and the call
            self.beat_pending = False
            return False
        return first

    def running_on(self) -> int | None:
        """The thread running the loop, whose stack a look reads; None
        when it is not running (a look then reads no stack)."""
        loop = self.loop_ref()
        if loop is None or not self.enabled or loops.is_closed(loop) or not loops.is_running(loop):
            return None
        thread_id: int | None = getattr(loop, "_thread_id", None) or self.thread_id
        return thread_id

    def covered(self) -> bool:
        """Whether the loop's deadline wakes the watchdog when a look is
        due: armed (a tick since it last passed), and no stall or tentative
        stall followed, whose end a look on the clock finds."""
        deadline = self.deadline
        return deadline is not None and deadline.armed and self.stall is None and self.tentative is None

    def callback_frame(self, top: FrameType) -> tuple[FrameType | None, list[FrameType]]:
        """The outermost frame of the running callback, and the frames from
        *top* down to it (innermost first); (None, []) when idle."""
        return callback_frame(top, self.runner_code, self.pure_asyncio)

    def sample(self, frames: dict[int, FrameType], now: float, wake: Wake | None = None) -> Look | float | None:
        """Look at the loop's stack (first half of a look; nothing here
        releases the GIL): how soon to look again (None: drop me), or what
        was seen, for `settle` once the watchdog has let go of every frame.

        *wake*: how late this wake-up of the watchdog came.  A look at a
        busy loop comes every `look_s`; a step still running at a look is
        looked at again when it would cross the threshold, counted from the
        look that first saw it.
        """
        peek = self._peeked()
        loop = self.loop_ref()
        if loop is None or loops.is_closed(loop) or not self.enabled:
            del loop
            self.finish(now)
            return None
        if not loops.is_running(loop):
            del loop
            # Park until the loop runs: the queued heartbeat is its first
            # callback then, and wakes us at once (a stall may start at once).
            self.finish(now)
            self.parked = True
            self._park_clocks(now)
            self._post_beat()
            return 1.0
        thread_id: int | None = getattr(loop, "_thread_id", None) or self.thread_id
        top = frames.pop(thread_id, None) if thread_id is not None else None
        if top is None or thread_id is None:
            del loop
            self.finish(now)
            self._post_beat()  # learn the loop thread
            return self.look_s
        callback, chain = self.callback_frame(top)
        compiled = callback is None and self.runner_code is not None and top.f_code is self.runner_code
        if callback is not None:
            self.python_seen = now
        # Idle, in the loop's own machinery, or in asyncwatch's own work,
        # which must never make user code look slow.
        idle = callback is None or own_work(chain)
        same_step = not idle and callback is self.held and self.beats == self.held_beats
        late = wake.raw if wake is not None else 0.0
        # Every frame is read before the clocks: reading /proc releases the
        # GIL, and the loop thread, given it, moves on from the line it was at.
        # The line first of all: Python work of ours past the switch interval
        # lets the loop thread, waiting for the GIL, take it back (a late
        # look that read the other threads' clocks first saw the line after
        # a str.join, or the step over, 3 runs in 4 on 3.12).
        early: Stall | None = None
        dated = fresh = in_program = False
        if not idle and not same_step and late >= self.look_s:
            fresh = at_start(chain[-1] if chain else top) or resumed_under_an_await(chain)
            if late >= self.threshold_s:
                early = self._capture(loop, top, chain, now - late, peek)
            in_program = any(not is_library_file(f.f_code.co_filename) for f in chain)
            dated = self.pure_asyncio and in_program
        ended = self._ended(peek, late, top, chain, idle or fresh, early, same_step)
        held_line = early
        if held_line is None and dated and not fresh and late >= self.threshold_s * TENTATIVE_SHARE:
            held_line = self._capture(loop, top, chain, peek=peek)
        captured: Stall | None = None
        tentative: Stall | None = None
        if same_step and self.stall is None:
            if now - self.held_since >= self.threshold_s:
                captured = self._dated_line(now, self._capture(loop, top, chain, self.held_since, peek))
            elif self.beat_next and now - self.held_since >= self.threshold_s * TENTATIVE_SHARE:
                tentative = self._dated_line(now, self._capture(loop, top, chain, peek=peek))
        inner = reread = None
        if same_step:
            inner, reread = self._reread(loop, top, chain, captured, now)
        self.meter.glance(thread_id, late + (wake.head if wake is not None else 0.0), self.threshold_s)
        # The step newly seen, kept like `held` (the probe's, so that
        # `Watchdog.remove` lets go of it): no local of ours refers to the
        # loop or its frames while `settle` reads clocks.
        self.seen = callback if not idle and not same_step else None
        self.seen_beats = self.beats
        return Look(
            thread_id,
            compiled,
            idle,
            same_step,
            early,
            captured,
            dated,
            fresh,
            tentative,
            held_line,
            in_program,
            inner,
            reread,
            ended,
        )

    def _ended(
        self,
        peek: tuple[Peek, ...] | None,
        late: float,
        top: FrameType,
        chain: list[FrameType],
        over: bool,
        early: Stall | None,
        followed: bool,
    ) -> Stall | None:
        """The stall of a step that is over, read by the peek only (`Look.ended`):
        for a look late by the threshold that found no step, one at its
        start (*over*), or one the peek could not be vouched for (*early*);
        never the step followed (*followed*)."""
        if not peek or late < self.threshold_s or followed:
            return None
        if not over and (early is None or early.peeked or early.interrupted):
            return None
        dispatch = HANDLE_RUN if self.runner_code is None else self.runner_code
        seen = elsewhere(peek, top, chain, over, dispatch)
        if seen is None:
            return None
        stall = Stall(seen[0], seen[1], None, None, None)
        stall.peeked = stall.ended = True
        return stall

    def _reread(
        self,
        loop: asyncio.AbstractEventLoop,
        top: FrameType,
        chain: list[FrameType],
        captured: Stall | None,
        now: float,
    ) -> tuple[Stall | None, Stall | None]:
        """The step followed, read again while its stall runs: with code
        the interpreter entered in, when the stall left it out (`Look.inner`);
        as any look reads it, when the stall was read inside an import
        (`Look.reread`)."""
        inner = reread = None
        stall = self.stall or captured
        if stall is not None and stall.interrupted:
            inner = read_stall(loop, top, chain, as_a_visit=False)
        if self.stall is not None and self._in_import(self.stall, now):
            reread = read_stall(loop, top, chain)
        return inner, reread

    def _dated_line(self, now: float, seen: Stall) -> Stall:
        """*seen*, the line a look sees the step followed at, or the line a
        late look dated it at, where the loop thread's hold of the GIL let
        go, when that hold is most of the step so far.  A translate() of
        1.1x the threshold, its look 98 ms late (our own wait for a CPU
        left out, under the threshold): the step was dated back and the
        look at the crossing, 2 ms on, saw the caller's next line (3.13)."""
        dated = self.dated_line
        if dated is not None and 2 * (self.dated_at - self.held_since) >= now - self.held_since:
            return dated
        return seen

    def settle(self, look: Look, now: float, wake: Wake | None) -> float:
        """The second half of a look: the clocks (reads that release the
        GIL), the late hold, and what the step seen becomes."""
        meter = self.meter
        thread_id = look.thread_id
        self.gil_lag = min(wake.raw, _SWITCH_S) if wake is not None else 0.0
        native = self._native(thread_id)
        # Clocks read for another thread are no baseline for this one: a loop
        # made and watched on one thread and run on another was compared, at
        # its first look, with the parked clocks of the thread that made it,
        # and a first step's json.loads (uvloop) came out as 5.8 s of another
        # thread's hold of the GIL, cause gil, no line.  (`read` forgets them
        # as it opens this thread's clock; the ticks are the loop thread's.)
        kept = meter.prev if meter.clock_ident == (thread_id, native) else None
        prev, clocks = self._baseline(kept, now), meter.read(now, thread_id, native)
        meter.prev = clocks
        held_by = None
        if look.compiled or not look.idle or look.ended is not None:
            held_by = meter.late_hold(prev, clocks, wake, thread_id, self.threshold_s)
        if self._after_an_ended_step(look, held_by, wake, prev, clocks, now):
            return self.look_s
        if look.compiled:
            return self._sample_compiled(now, self.look_s, prev)
        if look.idle:
            self.finish(now)
            return self.look_s
        early = look.early
        if (
            early is not None
            and held_by is not None
            and wake is not None
            and prev is not None
            and wake.late() >= self.threshold_s
            # Held by the loop thread: only a call an application line made
            # (a C callback of the loop's own, with no such line, is no
            # single call the watchdog can vouch for), seen at the call (a
            # step seen at its start was let in by the step before's hold).
            # Held by the collector or another thread, the loop thread waited
            # wherever it was.
            and (held_by != "loop" or (early.site is not None and not look.fresh))
        ):
            # Dated from when the wake-up was due: whoever held the GIL,
            # the loop could not go on until we took it.  Held by the loop
            # thread, from when it has been busy since, if earlier: the
            # wake-up was due a deadline after the tick before the call.
            # A collection that began later dates it instead: a wake-up due
            # on our own clock, 63 ms before the collection's step began,
            # made a 250 ms pause a 340 ms stall.
            since = now - wake.raw
            early.fresh = look.fresh
            if held_by == "loop":
                since = held_from(prev, clocks, since)
            elif held_by == "gc":
                began = meter.gc_clock.began_since(since)
                if began is not None:
                    since = max(since, began)
            self._late_stall(early, since, prev, clocks, now, held_by == "loop")
            return self.tick_s
        meter.note_others(prev, clocks, thread_id)
        if look.same_step:
            self._still_inside(look.inner, look.captured, clocks)
            self._past_import(look.reread, now)
            return self._still(now, look.captured, look.tentative)
        dated = self._dated_since(look, held_by, now, wake, prev, clocks)
        if dated is not None and prev is not None:
            return self._dated_step(dated, now, prev, clocks, look)
        self.finish(now)
        self._follow(now)
        meter.mark = clocks
        self.beat_next = self._post_beat(in_step=True)
        return self.look_s

    def _dated_since(
        self, look: Look, held_by: str | None, now: float, wake: Wake | None, prev: Clocks | None, clocks: Clocks
    ) -> float | None:
        """When the step newly seen by a late look began, or the latest time
        it is known to have been running; None to time it from the look."""
        if look.fresh or wake is None or prev is None:
            return None
        if held_by == "gc" and look.in_program:
            # A collection held the GIL since it began, after the previous
            # look (none can look during one), and no step can begin
            # without the GIL: the step seen now at a line of the program,
            # not at its start, was running when the collection began.
            # Timed from the look, a loop thread sleeping 350 ms beside a
            # 190 ms collection came to 160 ms and went unreported; timed
            # from when this wake-up was due, on our clock a tenth of the
            # threshold after the previous look, it came up to that short.
            began = self.meter.gc_clock.began_since(prev.wall)
            return max(began, prev.wall) if began is not None else now - wake.raw
        if look.dated and (held_by == "loop" or (held_by is None and self.meter.loop_held(prev, clocks, wake))):
            # The loop thread kept the GIL from before this wake-up was due
            # until the step seen now let it go (at its first eval-breaker
            # check after the hold: asyncio's dispatch, in Python, would
            # have let it go between two callbacks): the step has run since
            # at least as long as we waited for it, our own waits for a CPU
            # left out.  Timed from the look, a json.loads of 1.3x the
            # threshold first seen 36 ms into it (a collection's callback
            # let us in), or a first step that held the GIL 94 ms before our
            # first look, was never a stall.  A hold under `late_hold`'s
            # gate counts as well: four sorts of 0.3 threshold in one step,
            # first seen 18 ms late, were timed from the look and came to
            # 0.8 threshold (3 runs in 100 on 3.13; once in CI).
            return held_from(prev, clocks, now - wake.late())
        return None

    def _dated_step(self, since: float, now: float, prev: Clocks, clocks: Clocks, look: Look) -> float:
        """Follow the step seen now from *since*, before the look: when it
        began, or the latest time it is known to have been running."""
        self.finish(since)
        self._follow(since)
        self.dated_line, self.dated_at = look.held_line, now
        self.meter.mark = mark_at(prev, clocks, since, 2 * self.look_s)
        self.beat_next = self._post_beat(in_step=True)
        return min(self.look_s, max(since + self.threshold_s - now, 0.001))

    def _follow(self, since: float) -> None:
        """Follow the step `sample` saw, from *since*; keep its frame only
        while the loop is watched (`Watchdog.remove` may run while `settle`
        reads).  Its start is kept all the same: a stall captured as the loop
        closed is reported at once, timed from it (left at the previous
        step's, a first step's json.loads as its loop closed was reported as
        lasting since the clock's epoch)."""
        # A heartbeat that ran meanwhile ended the step: keep no frame,
        # and the next look sees the count changed.
        self.held = self.seen if self.enabled and self.beats == self.seen_beats else None
        self.held_since = since
        self.held_beats = self.seen_beats
        self.seen = None
        self.dated_line = None

    def _still_inside(self, inner: Stall | None, captured: Stall | None, clocks: Clocks) -> None:
        """A look reads a stall as where the loop thread let the GIL go, and
        code the interpreter ran inside a call there (a finalizer the
        collector called, a signal handler) as a moment's visit, left out
        for the call's line (`Stall.interrupted`).  *inner*, the same
        stall read with that code in, still inside that call, while the
        loop thread was off CPU most of the stall so far: that code blocks
        (a __del__ that sleeps: at `conn = None`, or after the collection
        that freed it held the GIL 100 ms), and its line is the stall's.
        On CPU, it may be one finalizer of many that a long call ran, and
        the call stays the site (a json.loads, 30 runs of 30)."""
        stall = self.stall or captured
        mark = self.meter.mark
        if inner is None or stall is None or not stall.interrupted or mark is None:
            return
        if inner.site is None or inner.site == stall.site or stall.site not in inner.stack:
            return
        busy = clocks.loop_cpu - mark.loop_cpu
        if clocks.loop_wait is not None and mark.loop_wait is not None:
            busy += clocks.loop_wait - mark.loop_wait  # preempted is not blocked
        if busy >= (clocks.wall - mark.wall) / 2:
            return
        stall.site, stall.stack, stall.explicit_gc = inner.site, inner.stack, inner.explicit_gc
        stall.interrupted = False

    def _in_import(self, stall: Stall, now: float) -> bool:
        """Whether a look should read *stall* again: it was read inside an
        import, and the step has not yet run a threshold outside one."""
        left = stall.left_import_at
        return stall.importing is not None and (left is None or now - left < self.threshold_s)

    def _past_import(self, reread: Stall | None, now: float) -> None:
        """The stall followed, read inside an import, as this look read it
        again: out of every import since *now* (its line kept until it has
        run a threshold outside one, as a stall's line is the one running
        at the crossing), or back inside one."""
        stall = self.stall
        if stall is None or reread is None:
            return
        if reread.importing is not None:
            stall.after_import = stall.left_import_at = None
            return
        if stall.left_import_at is None:
            stall.left_import_at = now
        stall.after_import = reread

    def _still(self, now: float, captured: Stall | None, tentative: Stall | None = None) -> float:
        """The step followed is still running: how soon to look again."""
        if tentative is not None and captured is None and self.stall is None:
            self._captured(tentative)
            self._measure(now, tentative)  # the clocks its finding is scaled from
            if self.beats == self.held_beats:  # the heartbeat has not ended it meanwhile
                self.tentative = _Tentative(tentative, self.held_since, self.held_beats, self.meter.mark, self.measured)
        if captured is not None:
            self.tentative = None
            self._captured(captured)
            # Measured before the heartbeat can see it (a read that
            # releases the GIL lets the loop run it).
            self._measure(now, captured)
            self.stall = captured
            if not self.enabled:  # the loop closed while we read: report it now
                self._end_stall(now)
        elif self.stall is not None:
            self._measure(now, self.stall)
        if self.stall is not None:
            return self.tick_s  # its end
        # Look again when it crosses the threshold, if not before: woken
        # that much earlier as the GIL took us to get at the last look (a
        # loop running Python lets it go only at the switch interval, 5 ms
        # after we ask), so that the look lands on the crossing, not 5 ms
        # after it (a 120 ms busy loop was missed 1 run in 12 on a loaded
        # machine).  A look that lands early just looks again.
        return min(self.look_s, max(self.held_since + self.threshold_s - now - self.gil_lag, 0.001))

    def _baseline(self, prev: Clocks | None, now: float) -> Clocks | None:
        """The clocks the look at *now* compares with: the previous look's,
        or the last tick's when it came since (looks are rare while the
        deadline holds: compared with a look minutes old, any late wake-up
        of a busy loop looked like its own hold of the GIL), but never a
        tick that came after the look.  The loop thread runs between the
        stacks and the clocks (our Python work past the switch interval, a
        read that lets the GIL go); a tick it ran there, right after the
        hold the look was late for, made that hold vanish from the
        comparison (a first step's json.loads on uvloop, unreported)."""
        deadline = self.deadline
        ticked: Clocks | None = deadline.clocks if deadline is not None else None
        if ticked is not None and ticked.wall <= now and (prev is None or ticked.wall > prev.wall):
            return ticked
        return prev

    def _native(self, thread_id: int) -> int | None:
        return self.native_id if thread_id == self.thread_id else None

    def _park_clocks(self, now: float) -> None:
        """The loop thread's clocks while its loop is not running: the
        first look once it runs compares with them (its first step may
        hold the GIL from the start, and the loop thread reads none)."""
        if self.thread_id is not None:
            self.meter.prev = self.meter.read(now, self.thread_id, self.native_id)

    def _late_stall(
        self,
        stall: Stall,
        since: float,
        prev: Clocks,
        clocks: Clocks,
        now: float,
        held: bool = True,
    ) -> None:
        """One hold of the GIL, by the loop thread (a long C call, its frame
        now at the calling line; *held*), the collector or another thread,
        began after the previous look: the step the loop is in has been
        stalled since this wake-up was due."""
        self.finish(since)
        self._follow(since)
        self._captured(stall)
        self.meter.mark = mark_at(prev, clocks, since, 2 * self.look_s, held)
        stall.late = True
        self._measure(now, stall)  # before the heartbeat can see it
        self.stall = stall
        if not self.enabled:  # the loop closed while we read: report it now
            self._end_stall(now)
            return
        self._post_beat(in_step=True)

    def _after_an_ended_step(
        self, look: Look, held_by: str | None, wake: Wake | None, prev: Clocks | None, clocks: Clocks, now: float
    ) -> bool:
        """Report the stall of a step that is over (`Look.ended`) if the loop
        thread, or a collection, held the GIL for the threshold (its breakdown
        tells which), and follow the step running now from now; whether it
        did."""
        ended = look.ended
        if ended is None or held_by not in ("loop", "gc") or wake is None or prev is None:
            return False
        if wake.late() < self.threshold_s:
            return False
        self._ended_stall(ended, held_from(prev, clocks, now - wake.raw), prev, clocks, now)
        if not look.idle:
            self._follow(now)
            self.meter.mark = clocks
            self.beat_next = self._post_beat(in_step=True)
        return True

    def _captured(self, stall: Stall) -> None:
        """*stall* is followed from now: the other threads' clocks, from
        which its breakdown names one (`StallMeter.captured`).  Only then,
        never as `sample` reads a stall: for a wait inside the library it
        lists the process's threads in /proc, reads that let the GIL go,
        and a stall seen and dropped (a step at its start, let in by the
        step before's hold) let four steps holding the GIL run unseen."""
        self.meter.captured(self.thread_id, self.native_id, stall.library_only)

    def _ended_stall(self, stall: Stall, since: float, prev: Clocks, clocks: Clocks, now: float) -> None:
        """Report *stall*, of a step that held the GIL from *since* and is
        over: what the loop thread did since is that hold (the look came at
        the first eval-breaker check after it)."""
        self.finish(since)
        self.held = self.dated_line = None
        self.held_since = since
        self._captured(stall)
        self.meter.mark = mark_at(prev, clocks, since, 2 * self.look_s, True)
        stall.late = True
        self.stall = stall
        self._end_stall(now)

    def _sample_compiled(self, now: float, tick: float, prev: Clocks | None) -> float:
        """`sample` when uvloop looks idle or runs compiled code with no Python
        frame: a heartbeat queued for longer than the threshold tells them
        apart (an idle loop runs it at once)."""
        if self.held is COMPILED and self.beats == self.held_beats:
            if self.stall is None and now - self.held_since >= self.threshold_s:
                # No line of the program is running: judged as a wait inside
                # the library is.  Off CPU while other threads ran, the loop
                # thread waited for the GIL at each callback uvloop runs (a
                # pure-Python thread beside an idle uvloop, 3.13 at load 3:
                # 120-160 ms called blocking_io, 2 runs in 10; a C function
                # given as a callback that sleeps stays blocking_io).
                stall = Stall(None, (), None, None, None, library_only=True)
                self.meter.captured(self.thread_id, self.native_id, True)
                self._measure(now, stall)
                self.stall = stall
            if self.stall is not None:
                self._measure(now, self.stall)
                return min(tick, 0.002)
            return tick
        self.finish(now)
        if self.beat_pending and now - self.beat_posted >= tick:
            # Dated from the last sign of Python running, never earlier:
            # a sample that falls between two short callbacks of a busy
            # loop must not inherit the time the heartbeat waited.
            self.held = COMPILED
            self.held_since = max(self.beat_posted, self.python_seen)
            self.held_beats = self.beats
            self.meter.mark = prev
        else:
            # Keep one queued: the stall's start is known to within a tick.
            # (About 1/tick trivial wake-ups a second of an idle uvloop;
            # asyncio has a Python dispatch frame and needs none.)
            self._post_beat()
        return tick

    def _peeked(self) -> tuple[Peek, ...] | None:
        """The loop thread's stack as its deadline passed, read without the
        GIL, for the late look now (once: a later look is another's)."""
        deadline = self.deadline
        if deadline is None:
            return None
        peek: tuple[Peek, ...] | None = deadline.peeked
        deadline.peeked = None
        return peek

    def _capture(
        self,
        loop: asyncio.AbstractEventLoop,
        top: FrameType,
        chain: list[FrameType],
        since: float | None = None,
        peek: tuple[Peek, ...] | None = None,
    ) -> Stall:
        """What the loop thread is stalled in; *since*: when the stall is
        dated from, told to the blocking task's observers (None: a step not
        yet known to be a stall); *peek*: its stack, read without the GIL
        while the step held it (its line, where the look vouches for it)."""
        stall = read_stall(loop, top, chain)
        if peek is not None and not stall.interrupted:
            # (Code the interpreter entered inside a call, a finalizer, is
            # told apart by `_still_inside`, on the live stack, as before.)
            seen = vouched(peek, chain)
            if seen is not None:
                stall.site, stall.stack = seen
                stall.peeked = True
        if since is not None:
            # Observers of the blocking task (notable spans: the context the
            # step runs in) learn of it while the step still runs.
            watch = watches.get(loop)
            if watch is not None and watch.hooks.task_blocking:
                task = asyncio.current_task(loop)
                if task is not None:
                    watch.hooks.dispatch("task_blocking", task, since)
                del task  # never keep the user's task alive
        return stall

    def finish(self, now: float) -> None:
        """The followed callback is over (watchdog thread); report a stall."""
        end = now
        if self.beats != self.held_beats and self.held_since < self.beat_time < end:
            end = self.beat_time  # the loop said when it got free
        self._end_stall(end)
        self.held = self.dated_line = None
        self.beat_next = False
        pending = self.tentative
        if pending is None or self.beats == pending.beats:
            return  # none, or its heartbeat has not run: asyncio is between the step and it
        self.tentative = None
        if self.first_beat - pending.since >= self.threshold_s:
            # No look came between the threshold and the step's end, but its
            # heartbeat, next in the ready queue, ran a threshold after a look
            # saw the step: it held the loop that long.  (A 120 ms busy loop
            # first seen 20 ms in ended before the crossing look, which the
            # switch interval makes land 5 ms late; a scan holding the GIL to
            # a step's end kept every look out until asyncio was past it.)
            self.held_since = pending.since
            self.meter.mark, self.measured = pending.mark, pending.measured
            self.stall = pending.stall
            self._end_stall(self.first_beat, measured=True)

    def _measure(self, now: float, stall: Stall) -> None:
        """Where the stall's time went so far (watchdog thread: the reads
        release the GIL and touch /proc); the heartbeat that ends the stall
        reports with these, read no more than a tick before its end."""
        try:
            breakdown, holder = self.meter.breakdown(stall.library_only, now, self.thread_id, self.native_id)
            # A holder that ended since the last look (joined as the stall
            # ended) is no longer there to be named: it still held the GIL.
            self.measured = (breakdown, holder if holder is not None else self.measured[1])
        except Exception as exc:  # contained: the finding goes out without a cause
            report_internal_error("slow-callback cause", exc)
            self.measured = (None, None)

    def _end_stall(self, end: float, measured: bool = False) -> None:
        """Report the stall in progress, once: from the watchdog thread, or
        from whoever stops watching the loop (`Watchdog.remove`, `flush`)."""
        if self.stall is None:  # every sample comes here: allocate nothing then
            return
        with reporting(), self._stall_lock:  # from the moment it is taken: a signal's exit waits for it
            # Emitted under the lock: whoever stops watching the loop waits
            # here until a report the watchdog thread has begun is out.
            stall, self.stall = self.stall, None
            if stall is not None:
                self.tentative = None  # this step's stall is out: never a second one
                self.emit(self._finding(stall, end, measured))

    def _finding(self, stall: Stall, end: float, measured: bool) -> Finding:
        stall = stall.past_import(end, self.threshold_s)
        if measured:
            # On the loop thread, which reads no clock for us: the last
            # look's measure, its shares carried on to the end.
            breakdown, holder = self.measured
            mark = self.meter.mark
            if breakdown is not None and mark is not None and breakdown.wall > 0:
                breakdown = breakdown.scaled((end - mark.wall) / breakdown.wall)
        else:
            self._measure(end, stall)
            breakdown, holder = self.measured
        self.measured = (None, None)
        return stall_finding(stall, end - self.held_since, self.threshold_s, breakdown, holder)
