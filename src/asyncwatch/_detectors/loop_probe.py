"""The watchdog's view of one event loop: which callback or task step it is
running, whether that is still the step seen at the last look, and the stall
it becomes once one step has held the loop for the threshold.

All of it runs in the watchdog thread but `LoopProbe.beat`, the heartbeat
the loop runs as an ordinary callback when the watchdog queues one.  The
heartbeat only stores: a clock read through the vDSO (no system call), the
thread's identity (the ``threading`` objects' attributes) and a counter.  It
reads no file and no other clock: a test suite that forbids blocking calls
on the loop (anyio's, with blockbuster) must see nothing of ours there.
Every per-loop object here refers to the loop weakly.
"""

from __future__ import annotations

import asyncio
import asyncio.events
import dis
import gc
import sys
import threading
import time
import weakref
from collections.abc import Callable
from types import CodeType, FrameType
from typing import Any, NamedTuple

from .._core.detector import watches
from .._core.findings import Finding, Site
from .._core.frames import frame_site, is_library_file, is_own_file, qualname_of, stack_of
from .._core.runtime import report_internal_error, reporting
from .._core.stepping import STEP_WRAPPER_CODES
from .._core.tasks import coro_name, created_at
from .stall_cause import Breakdown, GcClock
from .stall_meter import Clocks, StallMeter, Wake
from .stall_report import COMPILED, Compiled, Stall, stall_finding

__all__ = ["LOOKS_PER_THRESHOLD", "Look", "LoopProbe"]

_HANDLE_RUN = asyncio.events.Handle._run.__code__
# A traced task's steps run inside asyncwatch's timing wrapper: that frame is
# the user's step, not asyncwatch's own work.
_STEP_WRAPPERS = STEP_WRAPPER_CODES

#: How many times per threshold the watchdog looks at a loop that is busy.
#: The look interval is what a look can miss: a step is first seen up to
#: one interval after it began and is timed from then, so steps between 1x
#: and (1 + 1/LOOKS) x the threshold may go unreported and a duration is
#: short by up to an interval.  Only a look proves a step was already
#: running (the heartbeat dates a step's end, never its start, and dating
#: one from the look before it would report steps shorter than the
#: threshold), so the window cannot shrink without more looks.  Four looks
#: (a quarter of the threshold missed) lost stalls that ten found; ten is
#: the rate issue 15's wall-time cost was measured at (each look takes the
#: GIL from the loop once, without the loop thread reading any clock).
LOOKS_PER_THRESHOLD = 10

_now = time.perf_counter


def _own_work(chain: list[FrameType]) -> bool:
    """Whether asyncwatch itself (not a wrapped task step) is running."""
    for frame in chain:
        code = frame.f_code
        if code not in _STEP_WRAPPERS and is_own_file(code.co_filename):
            return True
    return False

    _current_frames = sys._current_frames


# The import system's own frames: a stall with one of these on its stack is
# start-up work (a module's top level running inside the loop, as uvicorn's
# workers import the application), not a stall of the running program.
_IMPORT_FILES = frozenset(("<frozen importlib._bootstrap>", "<frozen importlib._bootstrap_external>"))


def _importing(chain: list[FrameType]) -> str | None:
    """The module the outermost import on *chain* (innermost first) is
    loading; "" for an import whose name cannot be read; None for no import."""
    found: str | None = None
    for frame in chain:
        if frame.f_code.co_filename in _IMPORT_FILES:
            if found is None:
                found = ""
            if frame.f_code.co_name == "_find_and_load":  # outer ones overwrite inner ones
                # As _capture reads a Handle: the loop thread is paused here.
                try:
                    name = frame.f_locals.get("name")
                except Exception:
                    name = None
                found = name if isinstance(name, str) else found
    return found


# asyncio's own loop machinery: a stack through one of these that never
# reached Handle._run is the loop between callbacks, not a greenlet.
_LOOP_MACHINERY = frozenset(
    (
        asyncio.base_events.BaseEventLoop._run_once.__code__,  # type: ignore[attr-defined]
        asyncio.base_events.BaseEventLoop.run_forever.__code__,
    )
)


# What may stand between a callee's load and its call: its arguments, when
# each is a single load, and the call's own preludes (3.11's PRECALL, the
# keyword names).
_ARGUMENT_LOADS = frozenset(("LOAD_CONST", "LOAD_FAST", "LOAD_DEREF", "LOAD_GLOBAL", "LOAD_NAME", "LOAD_SMALL_INT"))
_CALL_PRELUDES = frozenset(("PRECALL", "KW_NAMES", "PUSH_NULL"))


def _calls_gc_collect(frame: FrameType) -> bool:
    """Whether *frame* is calling ``gc.collect`` (``gc.collect()``,
    ``gc.collect(2)``, or ``collect()`` imported from gc): its current
    instruction is a call whose callee, loaded by that name just before its
    arguments, is the gc module's.  The bytecode only: no source file (this
    runs while the loop thread is paused; a read would release the GIL)."""
    lasti = frame.f_lasti
    window: list[dis.Instruction] = []
    for instruction in dis.get_instructions(frame.f_code):
        if instruction.offset > lasti:
            break
        window.append(instruction)
        del window[:-12]  # the callee is loaded a few instructions before its call
    # 3.11 specializes a call of a C function into its PRECALL, which makes
    # the call itself: the frame is then at the PRECALL (same argument count).
    call = window[-1] if window else None
    if (
        call is None
        or not (call.opname.startswith("CALL") or call.opname == "PRECALL")
        or not isinstance(call.arg, int)
    ):
        return False
    argc, arguments = window[-1].arg, 0
    for k in range(len(window) - 2, -1, -1):
        instruction = window[k]
        if instruction.opname in _CALL_PRELUDES:
            continue
        if instruction.argval == "collect" and arguments == argc:
            return _is_gc_collect(frame, window, k)
        if instruction.opname not in _ARGUMENT_LOADS:
            return False
        arguments += 1
    return False


def _is_gc_collect(frame: FrameType, window: list[dis.Instruction], k: int) -> bool:
    """Whether the load at *k* in *window* (named ``collect``) is gc.collect.

    Globals only: reading a frame's ``f_locals`` would leave a dict of the
    program's locals on the frame (3.11-3.12), which ``gc.get_referrers``
    then finds (anyio's test_run_sync_worker_cyclic_references does).  A
    ``gc`` or ``collect`` that is a local name is not told apart."""
    load = window[k]
    if load.opname in ("LOAD_ATTR", "LOAD_METHOD"):
        holder = window[k - 1] if k > 0 else None
        if holder is None or holder.opname not in ("LOAD_GLOBAL", "LOAD_NAME") or not isinstance(holder.argval, str):
            return False
        return frame.f_globals.get(holder.argval) is gc
    if load.opname in ("LOAD_GLOBAL", "LOAD_NAME"):
        return frame.f_globals.get("collect") is gc.collect
    return False


class Look(NamedTuple):
    """What `LoopProbe.sample` saw of the loop's stack, without a frame."""

    thread_id: int
    compiled: bool
    idle: bool
    same_step: bool
    early: Stall | None  # a wake-up late by the threshold: the line running
    captured: Stall | None  # the followed step crossed the threshold: its line


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
        self._stall_lock = threading.Lock()
        self.python_seen = 0.0  # last sample that saw a Python callback frame
        #: The stall's breakdown and GIL holder at the last look during it.
        self.measured: tuple[Breakdown | None, str | None] = (None, None)
        #: Why the loop stalled: its clocks, read by the watchdog.
        self.meter = StallMeter(gc_clock if gc_clock is not None else GcClock())

    # -- loop thread ---------------------------------------------------------

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
        self.thread_id = ident
        caller = sys._getframe(1)
        # asyncio: Handle._run; uvloop: the frame that called run_forever
        # (matched by code, so it survives the loop being run again).
        self.runner_code = None if caller.f_code is _HANDLE_RUN else caller.f_code
        self.beats += 1
        self.beat_pending = False
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
        step of the program's main task (which may block at once)."""
        self.thread_id = threading.get_ident()
        self.native_id = threading.current_thread().native_id
        if asyncio._get_running_loop() is None:
            # Not inside a loop's step (that one runs no I/O of ours): the
            # clocks a first step holding the GIL at once is measured from.
            self._park_clocks(_now())
        self.beat_pending = True
        try:
            if loop.is_running():
                loop.call_soon_threadsafe(self.beat)
            else:
                loop.call_soon(self.beat)
        except RuntimeError:
            self.beat_pending = False

    def _post_beat(self) -> None:
        loop = self.loop_ref()
        if loop is not None and not self.beat_pending:
            self.beat_pending = True
            self.beat_posted = _now()
            try:
                loop.call_soon_threadsafe(self.beat)
            except RuntimeError:  # closed between our check and the call
                self.beat_pending = False

    def callback_frame(self, top: FrameType) -> tuple[FrameType | None, list[FrameType]]:
        """The outermost frame of the running callback, and the frames from
        *top* down to it (innermost first); (None, []) when idle."""
        chain: list[FrameType] = []
        runner = self.runner_code
        frame: FrameType | None = top
        own: FrameType | None = frame
        while own is not None and is_own_file(own.f_code.co_filename):
            if own.f_code.co_name == "_gc_callback":
                # One of our gc.callbacks (the collector clock's, or
                # _core.collecting's, named so for this), called inside a collection the
                # program's allocation triggered: the program's frame is the
                # one below.  (Its call lets the GIL go, which is how a long
                # C call is often first seen.)
                frame = own.f_back
                break
            own = own.f_back
        while frame is not None:
            code = frame.f_code
            if code is _HANDLE_RUN and not chain:
                # asyncio is running a callback with no Python frame of its
                # own (a C function such as time.sleep): follow Handle._run.
                return frame, []
            if code is _HANDLE_RUN or code is runner:
                return (chain[-1] if chain else None), chain
            if code in _LOOP_MACHINERY:
                return None, []  # asyncio between callbacks
            chain.append(frame)
            frame = frame.f_back
        if chain and "greenlet" in sys.modules and (runner is not None or self.pure_asyncio):
            # The stack ended (f_back None) short of the dispatch: a greenlet
            # switched to inside a callback.  Its first frame stands for the
            # callback; the heartbeat tells one long switch-in from many.
            return chain[-1], chain
        return None, []

    def sample(self, frames: dict[int, FrameType], now: float, wake: Wake | None = None) -> Look | float | None:
        """Look at the loop's stack (first half of a look; nothing here
        releases the GIL): how soon to look again (None: drop me), or what
        was seen, for `settle` once the watchdog has let go of every frame.

        *wake*: how late this wake-up of the watchdog came.  A look at a
        busy loop comes every `look_s`; a step still running at a look is
        looked at again when it would cross the threshold, counted from the
        look that first saw it.
        """
        loop = self.loop_ref()
        if loop is None or loop.is_closed() or not self.enabled:
            del loop
            self.finish(now)
            return None
        if not loop.is_running():
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
        idle = callback is None or _own_work(chain)
        same_step = not idle and callback is self.held and self.beats == self.held_beats
        late = wake.raw if wake is not None else 0.0
        # Every frame is read before the clocks: reading /proc releases the
        # GIL, and the loop thread, given it, moves on from the line it was at.
        early: Stall | None = None
        if not idle and not same_step and late >= self.threshold_s:
            early = self._capture(loop, top, chain, now - late)
        captured: Stall | None = None
        if same_step and self.stall is None and now - self.held_since >= self.threshold_s:
            captured = self._capture(loop, top, chain, self.held_since)
        # The step newly seen, kept like `held` (the probe's, so that
        # `Watchdog.remove` lets go of it): no local of ours refers to the
        # loop or its frames while `settle` reads clocks.
        self.seen = callback if not idle and not same_step else None
        self.seen_beats = self.beats
        return Look(thread_id, compiled, idle, same_step, early, captured)

    def settle(self, look: Look, now: float, wake: Wake | None) -> float:
        """The second half of a look: the clocks (reads that release the
        GIL), the late hold, and what the step seen becomes."""
        meter = self.meter
        thread_id = look.thread_id
        prev, clocks = meter.prev, meter.read(now, thread_id, self._native(thread_id))
        meter.prev = clocks
        for stall in (look.early, look.captured):
            if stall is not None:
                meter.captured(self.thread_id, self.native_id, stall.library_only)
        held_by = None
        if look.compiled or not look.idle:
            held_by = meter.late_hold(prev, clocks, wake, thread_id, self.threshold_s)
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
            # single call the watchdog can vouch for).
            and (held_by != "loop" or early.site is not None)
        ):
            # Dated from when the wake-up was due: whoever held the GIL,
            # the loop could not go on until we took it.
            self._late_stall(early, now - wake.raw, prev, clocks, now)
            return self.tick_s
        meter.note_others(prev, clocks, thread_id)
        if look.same_step:
            return self._still(now, look.captured)
        self.finish(now)
        self._follow(now)
        meter.mark = clocks
        self._post_beat()
        return self.look_s

    def _follow(self, since: float) -> None:
        """Follow the step `sample` saw, from *since*, unless the loop is no
        longer watched (`Watchdog.remove` may run while `settle` reads)."""
        if self.enabled:
            # A heartbeat that ran meanwhile ended the step: keep no frame,
            # and the next look sees the count changed.
            self.held = self.seen if self.beats == self.seen_beats else None
            self.held_since = since
            self.held_beats = self.seen_beats
        self.seen = None

    def _still(self, now: float, captured: Stall | None) -> float:
        """The step followed is still running: how soon to look again."""
        if captured is not None:
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
        # Look again when it crosses the threshold, if not before.
        return min(self.look_s, max(self.held_since + self.threshold_s - now, 0.001))

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
    ) -> None:
        """One hold of the GIL, by the loop thread (a long C call, its frame
        now at the calling line), the collector or another thread, began
        after the previous look: the step the loop is in has been stalled
        since this wake-up was due."""
        self.finish(since)
        self._follow(since)
        self.meter.mark = _mark_at(prev, clocks, since, 2 * self.look_s)
        stall.late = True
        self._measure(now, stall)  # before the heartbeat can see it
        self.stall = stall
        if not self.enabled:  # the loop closed while we read: report it now
            self._end_stall(now)
            return
        self._post_beat()

    def _sample_compiled(self, now: float, tick: float, prev: Clocks | None) -> float:
        """`sample` when uvloop looks idle or runs compiled code with no Python
        frame: a heartbeat queued for longer than the threshold tells them
        apart (an idle loop runs it at once)."""
        if self.held is COMPILED and self.beats == self.held_beats:
            if self.stall is None and now - self.held_since >= self.threshold_s:
                stall = Stall(None, (), None, None, None)
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

    def _capture(self, loop: asyncio.AbstractEventLoop, top: FrameType, chain: list[FrameType], since: float) -> Stall:
        # The innermost application frame *of this callback*: never further
        # out than the loop's dispatch (that is whoever runs the loop).
        importing = _importing(chain)
        blocking = next((f for f in chain if not is_library_file(f.f_code.co_filename)), None)
        if importing is not None and blocking is not None and blocking.f_code.co_filename.startswith("<"):
            # Code a library exec'd while being imported (dataclasses'
            # "<string>" __init__): the application's line is the import.
            blocking = next(
                (
                    f
                    for f in chain
                    if not is_library_file(f.f_code.co_filename) and not f.f_code.co_filename.startswith("<")
                ),
                blocking,
            )
        site = frame_site(blocking) if blocking is not None else None
        task: Any = asyncio.current_task(loop)
        callback: str | None = None
        created: Site | None = None
        if task is not None:
            name: str | None = task.get_name()
            coroutine = coro_name(task)
            created = created_at(task)
            # Observers of the blocking task (notable spans: the context the
            # step runs in) learn of it while the step still runs, with when
            # the watchdog dates the block from.
            watch = watches.get(loop)
            if watch is not None and watch.hooks.task_blocking:
                watch.hooks.dispatch("task_blocking", task, since)
        else:
            name = coroutine = None
            if chain:
                callback = chain[-1].f_code.co_qualname
            elif top.f_code is _HANDLE_RUN:
                handle = top.f_locals.get("self")  # the Handle: names the C callback
                callback = qualname_of(getattr(handle, "_callback", None))
                del handle
        del task  # never keep the user's task alive
        library_only = bool(chain) and blocking is None
        explicit_gc = blocking is not None and _calls_gc_collect(blocking)
        self.meter.captured(self.thread_id, self.native_id, library_only)
        return Stall(
            site,
            stack_of(chain),
            name,
            coroutine,
            callback,
            importing=_importing(chain),
            created_at=created,
            library_only=library_only,
            explicit_gc=explicit_gc,
        )

    def finish(self, now: float) -> None:
        """The followed callback is over (watchdog thread); report a stall."""
        end = now
        if self.beats != self.held_beats and self.held_since < self.beat_time < end:
            end = self.beat_time  # the loop said when it got free
        self._end_stall(end)
        self.held = None

    def _measure(self, now: float, stall: Stall) -> None:
        """Where the stall's time went so far (watchdog thread: the reads
        release the GIL and touch /proc); the heartbeat that ends the stall
        reports with these, read no more than a tick before its end."""
        try:
            self.measured = self.meter.breakdown(stall.library_only, now, self.thread_id, self.native_id)
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
                self.emit(self._finding(stall, end, measured))

    def _finding(self, stall: Stall, end: float, measured: bool) -> Finding:
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


def _mark_at(prev: Clocks, clocks: Clocks, since: float, fresh_s: float) -> Clocks:
    """The clocks a late stall's breakdown starts from: the previous look's,
    or, when that look is older than *fresh_s* (the loop's first step,
    compared with clocks read while it was parked), the clocks now taken back
    to *since*: the loop thread on CPU all along (it held the GIL; or the
    collector did, whose clock says so), with no wait for a CPU measured."""
    if prev.wall >= since - fresh_s:
        return prev
    span = max(clocks.wall - since, 0.0)
    loop_cpu = min(clocks.loop_cpu - prev.loop_cpu, span)
    gc_time = min(clocks.gc - prev.gc, span)
    return Clocks(
        since,
        clocks.loop_cpu - loop_cpu,
        clocks.loop_wait,
        clocks.process_cpu - loop_cpu,
        clocks.gc - gc_time,
        prev.foreign,
        clocks.own_cpu,
        clocks.reader,
    )
