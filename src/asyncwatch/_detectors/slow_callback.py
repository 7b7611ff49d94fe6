"""Slow callbacks: a watchdog thread that samples the loop thread's stack.

Nothing runs on the event loop's hot path.  One daemon thread, shared by
every watched loop, wakes every ``threshold / 10`` and looks at the frame
the loop thread is executing (``sys._current_frames``):

* the *callback frame* is the outermost frame of the running callback: the
  frame just inside ``Handle._run`` (asyncio), or just inside the frame that
  called ``run_forever`` (uvloop, whose dispatch is compiled).  When there is
  none, the loop is idle or in its own machinery.
* the same callback frame object seen across samples for at least the
  threshold is one callback or task step blocking the loop.  The watchdog
  keeps that frame object (never the task) between two samples, so a new
  call can never reuse its address.
* a task's coroutine frame survives across steps, so identity alone cannot
  tell one long step from many short ones.  A heartbeat callback separates
  them: whenever the watchdog starts following a callback frame, it has a
  heartbeat queued with ``call_soon_threadsafe``; the ready queue is FIFO, so
  the task's next step cannot run before the heartbeat, and an unchanged
  heartbeat count proves it is still the same step.

The site reported is the innermost application frame at the moment the
threshold was crossed: the blocking line itself, not the next ``await``.

Blocking that holds the GIL (one long C call: ``json.loads`` of a large
body, ``list.sort``, a backtracking regex) keeps the watchdog from running
at all.  Its own wake-up then arrives late by about the length of the call;
the loop thread gives the GIL up at its first eval-breaker check after the
call returns, so its frame is still at the calling line, and its CPU clock
says whether it held the GIL.  A wake-up late by the threshold, not spent
waiting for a CPU, starts a stall at once, dated from when the wake-up was
due.

A stack that ends without reaching the loop's dispatch, while the loop is
running and in none of its own machinery, is a greenlet's (SQLAlchemy's
asyncio layer runs sync code in greenlets on the loop thread): its
outermost frame stands for the callback, and the heartbeat, as for a task,
tells one long switch-in from many short ones.

Why the loop stalled (the ``cause`` field) comes from the clocks in
`stall_cause`, read by the watchdog thread at the start and the end of a
stall.

One concept, one module (longer than most): the sampling thread and the
per-loop probe share their state machine and their locking rules.
"""

from __future__ import annotations

import _thread
import asyncio
import asyncio.events
import gc
import sys
import threading
import time
import weakref
from collections.abc import Callable
from types import CodeType, FrameType
from typing import Any, NamedTuple

from .._core.detector import Detector, DetectorContext, WatchedLoop
from .._core.findings import Finding, FindingKind, Site
from .._core.frames import frame_site, is_library_file, is_own_file, qualname_of, stack_of
from .._core.runtime import HiddenThread, in_forked_child, report_internal_error, reporting, start_hidden_thread
from .._core.stepping import STEP_WRAPPER_CODES
from .._core.tasks import coro_name, created_at
from . import stall_cause
from .stall_cause import Breakdown, GcClock, ThreadClock

__all__ = ["LoopProbe", "SlowCallbackDetector", "Watchdog"]

_HANDLE_RUN = asyncio.events.Handle._run.__code__
# A traced task's steps run inside asyncwatch's timing wrapper: that frame is
# the user's step, not asyncwatch's own work.
_STEP_WRAPPERS = STEP_WRAPPER_CODES


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
        probe = LoopProbe(loop, watch.settings.slow_callback_s, watch.emit, watch.heard_from)
        probe.gc_clock = self.watchdog.gc_clock
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


def _own_work(chain: list[FrameType]) -> bool:
    """Whether asyncwatch itself (not a wrapped task step) is running."""
    for frame in chain:
        code = frame.f_code
        if code not in _STEP_WRAPPERS and is_own_file(code.co_filename):
            return True
    return False


_now = time.perf_counter


if sys.version_info < (3, 11, 9):

    def _current_frames() -> dict[int, FrameType]:
        """``sys._current_frames()`` without gh-106883's deadlock.

        Before 3.11.9 it holds the runtime's thread-list lock while it makes
        frame objects; a collection triggered by one of those allocations
        that frees a ``threading.local`` (an event-loop policy's, say) takes
        the same lock and hangs the whole process.  CPython's own fix turns
        the collector off for the call; so do we, unless it is already off.
        """
        if not gc.isenabled():
            return sys._current_frames()
        gc.disable()
        try:
            return sys._current_frames()
        finally:
            gc.enable()

else:
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


class _Clocks(NamedTuple):
    """What the watchdog reads at each sample of a running loop."""

    wall: float
    loop_cpu: float
    loop_wait: float | None  # None: the kernel does not say
    process_cpu: float
    gc: float
    foreign: float  # GIL held by other threads so far (late wake-ups)


class _Stall:
    __slots__ = ("callback", "coroutine", "created_at", "importing", "late", "library_only", "site", "stack", "task")

    def __init__(
        self,
        site: Site | None,
        stack: tuple[Site, ...],
        task: str | None,
        coroutine: str | None,
        callback: str | None,
        importing: str | None = None,
        created_at: Site | None = None,
        library_only: bool = False,
    ) -> None:
        self.importing = importing
        self.site = site
        self.stack = stack
        self.task = task
        self.coroutine = coroutine
        self.callback = callback
        self.created_at = created_at
        # Python frames, none of them the application's: the loop waited
        # inside asyncio or the standard library (starting an executor's
        # thread, say), not at a line of the program.
        self.library_only = library_only
        # Seen only once the GIL was free again (a late wake-up): the line
        # running then, which is the call's when the watchdog asked for the
        # GIL during it, and may be one just after when it asked later.
        self.late = False


class _Wake:
    """How late a wake-up of the watchdog came (`raw`), and, read only when
    asked (the read releases the GIL), less its own wait for a CPU."""

    __slots__ = ("_before", "_clock", "_late", "known", "raw")

    def __init__(self, raw: float, clock: ThreadClock | None = None, before: float | None = None) -> None:
        self.raw = raw
        self._clock = clock
        self._before = before
        self._late: float | None = None
        self.known = False

    def late(self) -> float:
        if self._late is None:
            after = self._clock.read()[1] if self._clock is not None else None
            self.known = self._before is not None and after is not None
            if self._before is not None and after is not None:
                self._late = max(self.raw - (after - self._before), 0.0)
            else:
                self._late = self.raw
        return self._late


class _Compiled:
    """Stands for a callback with no Python frame (a C function, on uvloop)."""


_COMPILED = _Compiled()


class LoopProbe:
    """The watchdog's view of one loop.  Sampling state is touched only by
    the watchdog thread; the heartbeat fields only by the loop thread."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        threshold_s: float,
        emit: Callable[[Finding], None],
        heard_from: Callable[[str], None] | None = None,
    ) -> None:
        self.loop_ref = weakref.ref(loop)
        # asyncio's loop runs its machinery in Python (_LOOP_MACHINERY); a
        # compiled loop is told from a greenlet by its runner_code only.
        self.pure_asyncio = isinstance(loop, asyncio.base_events.BaseEventLoop)
        self.threshold_s = threshold_s
        self.emit = emit
        # Told the name of the thread a heartbeat ran on, when it changes.
        self.heard_from = heard_from
        self.enabled = True
        self.wake: Callable[[], None] = lambda: None  # set by the Watchdog
        self.parked = False
        # written by the loop thread (heartbeat)
        self.thread_id: int | None = None
        self.thread_name: str | None = None  # of the thread that last ran a heartbeat
        self.runner_code: CodeType | None = None
        self.beats = 0
        self.beat_time = 0.0
        self.beat_pending = False
        self.beat_posted = 0.0
        # written by the watchdog thread
        self.held: FrameType | _Compiled | None = None
        self.held_since = 0.0
        self.held_beats = 0
        self.stall: _Stall | None = None
        self._stall_lock = threading.Lock()
        self.python_seen = 0.0  # last sample that saw a Python callback frame
        # why the loop stalled (see stall_cause): clocks read by the watchdog
        self.gc_clock = GcClock()
        self.native_id: int | None = None  # of the loop thread (heartbeat)
        self.clock: ThreadClock | None = None
        self.clock_ident: tuple[int, int | None] | None = None
        self.prev: _Clocks | None = None  # at the previous sample
        self.started: _Clocks | None = None  # when the loop started running (heartbeat)
        self.mark: _Clocks | None = None  # when the followed callback was first seen
        self.foreign = 0.0  # total GIL hold by other threads seen by late wake-ups
        self.others_before: dict[int, float] = {}  # other threads' CPU, when last busy
        self.holder: str | None = None  # the thread named for the last foreign hold
        self.stall_threads: dict[int, float] = {}  # other threads' CPU at the stall's capture
        self.stall_waits: float | None = None  # other threads' run-queue wait then (library-only stalls)

    # -- loop thread ---------------------------------------------------------

    def beat(self) -> None:
        """Heartbeat, run by the loop: who runs the loop, and from where."""
        self.beat_time = _now()
        ident = threading.get_ident()
        if ident != self.thread_id or self.thread_name is None:
            self.thread_name = threading.current_thread().name
            self.native_id = threading.get_native_id()
            if self.heard_from is not None:
                self.heard_from(self.thread_name)
        self.thread_id = ident
        caller = sys._getframe(1)
        # asyncio: Handle._run; uvloop: the frame that called run_forever
        # (matched by code, so it survives the loop being run again).
        self.runner_code = None if caller.f_code is _HANDLE_RUN else caller.f_code
        self.beats += 1
        self.beat_pending = False
        if self.parked or self.prev is None:
            # The loop starts running, before the watchdog has looked at it:
            # its clocks now, for the first sample (the first step may hold
            # the GIL from here on).  Once per run of the loop.
            cpu, wait = stall_cause.own_schedstat()
            self.started = _Clocks(
                self.beat_time,
                time.thread_time() if cpu is None else cpu,
                wait,
                time.process_time(),
                self.gc_clock.read(self.beat_time),
                0.0,
            )
        if self.parked:
            self.parked = False
            self.wake()
        if self.stall is not None:
            # The blocking callback is over (we run after it): report it now,
            # before the program moves on, instead of at the next sample.
            self._end_stall(self.beat_time)

    # -- watchdog thread -----------------------------------------------------

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        """Queue the first heartbeat now, so that it runs before the first
        step of the program's main task (which may block at once)."""
        self.thread_id = threading.get_ident()
        self.beat_pending = True
        try:
            if loop.is_running():
                loop.call_soon_threadsafe(self.beat)
            else:
                loop.call_soon(self.beat)
        except RuntimeError:
            self.beat_pending = False

    def _post_beat(self, loop: asyncio.AbstractEventLoop) -> None:
        if not self.beat_pending:
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
                # One of our gc.callbacks (the collector clock, the never-
                # awaited detector's), called inside a collection the
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

    def sample(self, frames: dict[int, FrameType], now: float, wake: _Wake | None = None) -> float | None:
        """Look at the loop once; return how soon to look again (None: drop me).

        *wake*: how late this wake-up of the watchdog came.
        """
        loop = self.loop_ref()
        if loop is None or loop.is_closed() or not self.enabled:
            self.finish(now)
            return None
        if not loop.is_running():
            # Park until the loop runs: the queued heartbeat is its first
            # callback then, and wakes us at once (a stall may start at once).
            self.finish(now)
            self.parked = True
            self.prev = None  # the next run's clocks start when it does (heartbeat)
            self._post_beat(loop)
            return 1.0
        tick = max(self.threshold_s / 10, 0.001)
        thread_id: int | None = getattr(loop, "_thread_id", None) or self.thread_id
        top = frames.get(thread_id) if thread_id is not None else None
        if top is None or thread_id is None:
            self.finish(now)
            self._post_beat(loop)  # learn the loop thread
            return tick
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
        early: _Stall | None = None
        if not idle and not same_step and late >= self.threshold_s:
            early = self._capture(loop, top, chain)
        if same_step and self.stall is None and now - self.held_since >= self.threshold_s:
            self.stall = self._capture(loop, top, chain)
        del top, chain
        prev, clocks = self.prev, self._read_clocks(now, thread_id)
        self.prev = clocks
        if prev is None and self.started is not None and self.thread_id == thread_id:
            prev = self.started._replace(foreign=self.foreign)
        self.started = None
        held_by = self._late_hold(prev, clocks, wake, thread_id) if compiled or not idle else None
        if compiled:
            return self._sample_compiled(loop, now, tick, prev)
        if idle or callback is None:
            self.finish(now)
            return tick
        if (
            early is not None
            and held_by is not None
            and wake is not None
            and wake.late() >= self.threshold_s
            # Held by the loop thread: only a call an application line made
            # (a C callback of the loop's own, with no such line, is no
            # single call the watchdog can vouch for).
            and (held_by != "loop" or early.site is not None)
        ):
            # Dated from when the wake-up was due: whoever held the GIL,
            # the loop could not go on until we took it.
            self._late_stall(loop, callback, early, now - wake.raw, prev)  # type: ignore[arg-type]
            return min(tick, 0.002)
        self._note_others(prev, clocks, thread_id)
        if same_step:
            return min(tick, 0.002) if self.stall is not None else tick  # catch the end precisely
        self.finish(now)
        self.held = callback
        self.held_since = now
        self.held_beats = self.beats
        self.mark = clocks
        self._post_beat(loop)
        return tick

    def _note_others(self, prev: _Clocks | None, clocks: _Clocks, thread_id: int) -> None:
        """Other threads are busy: keep their CPU clocks, so that one that
        takes the GIL next can be named (only then: ~1 us a thread)."""
        if prev is None:
            return
        others = (clocks.process_cpu - prev.process_cpu) - (clocks.loop_cpu - prev.loop_cpu)
        if others > (clocks.wall - prev.wall) / 4:
            self.others_before = stall_cause.threads_cpu((thread_id, threading.get_ident()))

    def _late_stall(
        self, loop: asyncio.AbstractEventLoop, callback: FrameType, stall: _Stall, since: float, prev: _Clocks
    ) -> None:
        """One hold of the GIL, by the loop thread (a long C call, its frame
        now at the calling line), the collector or another thread, began
        after the previous sample: the step the loop is in has been stalled
        since this wake-up was due."""
        self.finish(since)
        self.held = callback
        self.held_since = since
        self.held_beats = self.beats
        self.mark = prev
        stall.late = True
        self.stall = stall
        self._post_beat(loop)

    def _read_clocks(self, now: float, thread_id: int) -> _Clocks:
        """The loop thread's clocks now (see `stall_cause`)."""
        native = self.native_id if thread_id == self.thread_id else None
        if self.clock is None or self.clock_ident != (thread_id, native):
            if self.clock is not None:
                self.clock.close()
            self.clock = ThreadClock(thread_id, native)
            self.clock_ident = (thread_id, native)
            self.prev = self.mark = None
            self.others_before = stall_cause.threads_cpu((thread_id, threading.get_ident()))
        cpu, wait = self.clock.read()
        return _Clocks(now, cpu, wait, time.process_time(), self.gc_clock.read(now), self.foreign)

    def _late_hold(self, prev: _Clocks | None, clocks: _Clocks, wake: _Wake | None, thread_id: int) -> str | None:
        """Who held the GIL while this wake-up was late: "loop", "gc",
        "foreign" (another thread; added to `foreign`, its name to
        `holder`), or None (not late, or cannot tell)."""
        if wake is None or prev is None or wake.raw < max(self.threshold_s / 4, 4 * sys.getswitchinterval()):
            return None
        late = wake.late()
        loop_cpu = clocks.loop_cpu - prev.loop_cpu
        loop_busy = loop_cpu
        if clocks.loop_wait is not None and prev.loop_wait is not None:
            loop_busy += clocks.loop_wait - prev.loop_wait  # preempted while holding it
        if clocks.gc - prev.gc >= late / 2:
            return "gc"
        # Only the thread holding the GIL runs Python: the loop thread ran
        # more than all the others together.  (A thread waiting for the GIL
        # wakes every switch interval to ask for it, so on a loaded machine
        # it waits in the run queue too: its wait alone proves nothing.)
        others = (clocks.process_cpu - prev.process_cpu) - loop_cpu
        # Without the run-queue wait, a watchdog that waited for a CPU looks
        # late too: ask the loop thread to have run almost all the time.
        if loop_cpu >= others and loop_busy >= late * (0.5 if wake.known else 0.8):
            return "loop"
        if wake.known and others >= late / 4:
            # The whole wait, ours for a CPU included: the holder kept the
            # GIL until we took it, and the loop could not have it before.
            self.foreign += max(wake.raw - loop_busy, 0.0)
            skip = (thread_id, threading.get_ident())
            now_cpu = stall_cause.threads_cpu(skip)
            self.holder, _ = stall_cause.busiest_thread(self.others_before, now_cpu)
            self.others_before = now_cpu
            return "foreign"
        return None

    def _sample_compiled(self, loop: asyncio.AbstractEventLoop, now: float, tick: float, prev: _Clocks | None) -> float:
        """`sample` when uvloop looks idle or runs compiled code with no Python
        frame: a heartbeat queued for longer than the threshold tells them
        apart (an idle loop runs it at once)."""
        if self.held is _COMPILED and self.beats == self.held_beats:
            if self.stall is None and now - self.held_since >= self.threshold_s:
                self.stall = _Stall(None, (), None, None, None)
            return min(tick, 0.002) if self.stall is not None else tick
        self.finish(now)
        if self.beat_pending and now - self.beat_posted >= tick:
            # Dated from the last sign of Python running, never earlier:
            # a sample that falls between two short callbacks of a busy
            # loop must not inherit the time the heartbeat waited.
            self.held = _COMPILED
            self.held_since = max(self.beat_posted, self.python_seen)
            self.held_beats = self.beats
            self.mark = prev
        else:
            # Keep one queued: the stall's start is known to within a tick.
            # (About 1/tick trivial wake-ups a second of an idle uvloop;
            # asyncio has a Python dispatch frame and needs none.)
            self._post_beat(loop)
        return tick

    def _capture(self, loop: asyncio.AbstractEventLoop, top: FrameType, chain: list[FrameType]) -> _Stall:
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
        else:
            name = coroutine = None
            if chain:
                callback = chain[-1].f_code.co_qualname
            elif top.f_code is _HANDLE_RUN:
                handle = top.f_locals.get("self")  # the Handle: names the C callback
                callback = qualname_of(getattr(handle, "_callback", None))
                del handle
        del task  # never keep the user's task alive
        if self.thread_id is not None:
            self.stall_threads = stall_cause.threads_cpu((self.thread_id, threading.get_ident()))
        library_only = bool(chain) and blocking is None
        if library_only:
            self.stall_waits = stall_cause.tasks_wait((self.native_id, threading.get_native_id()))
        return _Stall(
            site,
            stack_of(chain),
            name,
            coroutine,
            callback,
            importing=_importing(chain),
            created_at=created,
            library_only=library_only,
        )

    def finish(self, now: float) -> None:
        """The followed callback is over (watchdog thread); report a stall."""
        end = now
        if self.beats != self.held_beats and self.held_since < self.beat_time < end:
            end = self.beat_time  # the loop said when it got free
        self._end_stall(end)
        self.held = None

    def _end_stall(self, end: float) -> None:
        """Report the stall in progress, once (from either thread)."""
        if self.stall is None:  # every sample comes here: allocate nothing then
            return
        with reporting():  # from the moment it is taken: a signal's exit waits for it
            self._report_stall(end)

    def _report_stall(self, end: float) -> None:
        with self._stall_lock:
            stall, self.stall = self.stall, None
        if stall is not None:
            self.emit(self._finding(stall, end))

    def _breakdown(self, stall: _Stall, end: float) -> tuple[Breakdown | None, str | None]:
        """Where the stall's time went (see `stall_cause`), and the other
        thread that ran most meanwhile."""
        mark, clock = self.mark, self.clock
        if mark is None or clock is None:
            return None, None
        cpu, wait = clock.read()
        loop_cpu = cpu - mark.loop_cpu
        others = time.process_time() - mark.process_cpu - loop_cpu
        starved = wait - mark.loop_wait if wait is not None and mark.loop_wait is not None else 0.0
        wall = end - mark.wall
        gil = self.foreign - mark.foreign
        holder = self.holder if gil > 0 else None
        off_cpu = wall - loop_cpu - starved
        if stall.library_only and off_cpu >= wall / 2:
            # Waiting inside asyncio or the standard library for other threads
            # (a new executor thread that must get the GIL from busy ones, or
            # a CPU on a loaded machine): no line of the program.  Theirs is
            # the time they ran (the GIL) or waited for a CPU.
            waits = None
            if self.stall_waits is not None:
                now_waits = stall_cause.tasks_wait((self.native_id, threading.get_native_id()))
                waits = now_waits - self.stall_waits if now_waits is not None else None
            if waits is not None and waits >= off_cpu / 2 and waits > others:
                starved = max(starved, off_cpu)
            elif others >= off_cpu / 4 or (waits is not None and others + waits >= off_cpu / 2):
                gil = max(gil, off_cpu)
                after = stall_cause.threads_cpu((self.thread_id, threading.get_ident()))
                holder, _ = stall_cause.busiest_thread(self.stall_threads, after)
        gc_time = self.gc_clock.read(end) - mark.gc
        pauses = self.gc_clock.pauses_since(mark.wall, end, GcClock.PAUSE_FLOOR_S)
        return Breakdown(wall, loop_cpu, max(starved, 0.0), gc_time, gil, others, pauses), holder

    def _finding(self, stall: _Stall, end: float) -> Finding:
        duration = end - self.held_since
        if stall.task:
            what = f"Task {stall.task!r} (coroutine {stall.coroutine!r})"
        elif stall.callback:
            what = f"Callback {stall.callback!r}"
        else:
            what = "A callback with no Python frame (compiled code)"
        try:
            breakdown, holder = self._breakdown(stall, end)
        except Exception as exc:  # contained: the finding goes out without a cause
            report_internal_error("slow-callback cause", exc)
            breakdown, holder = None, None
        cause = stall_cause.IMPORT if stall.importing is not None else None
        if cause is None and breakdown is not None:
            cause = stall_cause.classify(breakdown, self.threshold_s)
        site = stall.site
        if cause in (stall_cause.GC, stall_cause.GIL, stall_cause.STARVED):
            site = None  # never blamed on the line the loop happened to be at
        return Finding(
            kind=FindingKind.SLOW_CALLBACK,
            message=(
                f"{what} blocked the event loop for {duration * 1000:.0f} ms "
                f"(threshold {self.threshold_s * 1000:.0f} ms)" + _why(cause, stall, breakdown, holder)
            ),
            site=site,
            stack=stall.stack,
            task=stall.task,
            coroutine=stall.coroutine,
            duration_s=round(duration, 6),
            created_at=stall.created_at,
            cause=cause,
            breakdown=breakdown.as_pairs() if breakdown is not None else (),
            gil_holder=holder if cause == stall_cause.GIL else None,
        )


def _ms(seconds: float) -> str:
    return f"{max(seconds, 0.0) * 1000:.0f} ms"


def _why(cause: str | None, stall: _Stall, breakdown: Breakdown | None, holder: str | None) -> str:
    """The message's second half: the cause, what was measured, the advice."""
    if cause == stall_cause.IMPORT:
        module = f"module {stall.importing!r}" if stall.importing else "a module"
        return (
            f" while importing {module} (cause: import; start-up work, such as a server importing "
            "the application in its loop: the site is the line the import was running); import it "
            "before the loop starts to keep it off the loop"
        )
    if breakdown is None or cause is None:
        return "; move blocking or CPU-bound work to asyncio.to_thread() or an executor"
    measured = f"{_ms(breakdown.wall)} measured"
    if cause == stall_cause.CPU:
        where = (
            "; one call held the GIL: the site is the line running when it returned, the call's or just after it"
            if stall.late
            else ""
        )
        return (
            f" (cause: cpu; the loop thread was on CPU {_ms(breakdown.cpu - breakdown.gc)} of {measured}{where}): "
            "CPU-bound work; run it in a process pool (loop.run_in_executor(ProcessPoolExecutor(), ...)), "
            "since threads share the GIL"
        )
    if cause == stall_cause.BLOCKING_IO:
        return (
            f" (cause: blocking_io; the loop thread was off CPU {_ms(breakdown.off_cpu - breakdown.gil)} "
            f"of {measured}): blocking I/O, a sleep or a lock; use an async API or asyncio.to_thread()"
        )
    if cause == stall_cause.GC:
        return (
            f" (cause: gc; the garbage collector ran {_ms(breakdown.gc)} of {measured}): a collection "
            "pauses every thread, so no line of the program is blamed; many long-lived objects make "
            "full collections long (gc.freeze() after start-up, or fewer objects, shortens them)"
        )
    if cause == stall_cause.GIL:
        who = f"thread {holder!r}" if holder else "another thread"
        return (
            f" (cause: gil; the loop thread waited {_ms(breakdown.gil)} of {measured} for the GIL while "
            f"{who} held it): not the line the loop was at; move that thread's CPU-bound work "
            "(or long C calls that hold the GIL) to a process pool"
        )
    return (
        f" (cause: starved; the loop thread waited {_ms(breakdown.starved)} of {measured} for a CPU): "
        "the machine is overloaded, not a line of the program; give the process more CPU or run less beside it"
    )


class Watchdog:
    """One daemon thread sampling every registered `LoopProbe`."""

    def __init__(self) -> None:
        self._probes: list[LoopProbe] = []
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._thread: HiddenThread | None = None
        self._stopping = False
        self._woken_at = 0.0  # when a loop starting to run last woke us
        #: Time spent in garbage collection (installed by the detector).
        self.gc_clock = GcClock()
        #: Told when sampling fails (the detector disables itself through the
        #: engine); without one, the error is reported here.
        self.on_failure: Callable[[Exception], None] | None = None
        in_forked_child(self, Watchdog._after_fork)

    def add(self, probe: LoopProbe) -> None:
        probe.wake = self._wake_up
        with self._lock:
            self._probes.append(probe)
            self._ensure_thread()
        self._wake.set()

    def remove(self, probe: LoopProbe) -> None:
        with self._lock:
            probe.enabled = False
            if probe in self._probes:
                self._probes.remove(probe)

    def flush(self) -> None:
        """Report any stall in progress now (at exit or uninstall)."""
        now = _now()
        for probe in list(self._probes):
            try:
                probe.finish(now)
            except Exception as exc:
                self._failed(exc)

    def stop(self) -> None:
        with self._lock:
            self._stopping = True
            thread = self._thread
            self._thread = None
        self._wake.set()
        if thread is not None:
            thread.join(timeout=1.0)
        self.flush()
        with self._lock:
            self._probes.clear()
            self._stopping = False

    def _failed(self, exc: Exception) -> None:
        on_failure = self.on_failure
        if on_failure is not None:
            on_failure(exc)
        else:
            report_internal_error("slow-callback watchdog", exc)

    def _wake_up(self) -> None:
        """A parked probe's loop started running (loop thread)."""
        if self._thread is None:  # a forked child that had no loop running
            with self._lock:
                if self._probes and not self._stopping:
                    self._ensure_thread()
        self._woken_at = _now()
        self._wake.set()

    def _ensure_thread(self) -> None:
        if self._thread is None or not self._thread.is_alive():
            # Its first look is late if the loop's first step holds the GIL.
            self._woken_at = _now()
            self._thread = start_hidden_thread(self._run, "asyncwatch-watchdog")

    def _after_fork(self) -> None:
        """In a forked child: only the thread that called fork() survives.

        The watchdog thread is gone, and a lock or event some parent thread
        held at that moment stays held forever: make them all new.  A loop
        that was running is the parent's: its thread is gone, or, for the
        thread that forked, asyncio no longer sees it as running (its running
        loop is per process); stop watching it.  No thread starts here: a
        loop the child runs (an inherited one that was not running wakes its
        parked probe, a new one is added) starts one then.
        """
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._thread = None
        self._stopping = False
        kept: list[LoopProbe] = []
        for probe in self._probes:
            probe._stall_lock = threading.Lock()
            if probe.clock is not None:  # names the parent's loop thread
                probe.clock.forget_after_fork()
            probe.clock = None
            probe.prev = probe.mark = None
            probe.wake = self._wake_up
            # What the parent's watchdog was following is the parent's to report.
            probe.held = None
            probe.stall = None
            loop = probe.loop_ref()
            if loop is None or loop.is_closed() or loop.is_running() or not probe.enabled:
                probe.enabled = False
                continue
            # Parked, with a heartbeat queued, so that the child running it wakes us.
            probe.parked = True
            if not probe.beat_pending:
                probe.beat_pending = True
                loop.call_soon(probe.beat)
            kept.append(probe)
        self._probes = kept

    def _run(self) -> None:
        me = _thread.get_ident()  # not threading.current_thread(): that would register us
        own = ThreadClock(threading.get_ident(), threading.get_native_id())
        wake = _Wake(max(_now() - self._woken_at, 0.0), own, own.read()[1])
        try:
            while True:
                # Cleared before looking, so a wake-up that comes while we sample
                # is never lost: the wait below then returns at once.
                self._wake.clear()
                with self._lock:
                    if self._stopping or self._thread is None or self._thread.ident != me:
                        return
                    has_probes = bool(self._probes)
                if not has_probes:
                    self._wake.wait()
                    wake = _Wake(0.0)
                    continue
                delay = self._sample_all(wake)
                del wake
                if delay is None:
                    return
                _, waited = own.read()
                due = _now() + delay
                self._wake.wait(delay)
                # How late this wake-up came: the GIL held by someone, or no
                # CPU free (our own run-queue wait, subtracted when asked).
                now = _now()
                late = now - due
                if self._woken_at > due - delay:
                    # Woken by a loop starting to run, whose first step may
                    # have held the GIL since.
                    late = max(late, now - self._woken_at)
                wake = _Wake(max(late, 0.0), own, waited)
        finally:
            own.close()

    def _sample_all(self, wake: _Wake | None = None) -> float | None:
        """Sample every probe once; return how long to sleep (None: stop).

        A method of its own so that no probe (and through it the loop's
        watch) stays referenced from the thread's locals while it sleeps:
        a closed loop's state is freed as soon as its probe is dropped.
        """
        with self._lock:
            probes = list(self._probes)
        delay = 1.0
        frames: dict[int, FrameType] = {}
        try:
            frames = _current_frames()
            now = _now()
            for probe in probes:
                next_in = probe.sample(frames, now, wake)
                if next_in is None:
                    self.remove(probe)
                else:
                    delay = min(delay, next_in)
        except Exception as exc:
            self._failed(exc)
            with self._lock:
                for probe in self._probes:
                    probe.enabled = False
                self._probes.clear()
            return None
        finally:
            # The dict holds this thread's own frame, which holds the dict:
            # a cycle that would keep every thread's frames, and their
            # locals, alive until the next collection.
            frames.clear()
        return delay
