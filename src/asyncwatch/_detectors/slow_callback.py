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
from typing import Any

from .._core.detector import Detector, DetectorContext, WatchedLoop, watches
from .._core.findings import Finding, FindingKind, Site
from .._core.frames import frame_site, is_library_file, is_own_file, qualname_of, stack_of
from .._core.runtime import HiddenThread, in_forked_child, report_internal_error, reporting, start_hidden_thread
from .._core.stepping import STEP_WRAPPER_CODES
from .._core.tasks import coro_name

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

    def loop_attached(self, watch: WatchedLoop) -> None:
        loop = watch.loop_ref()
        if loop is None:
            return
        probe = LoopProbe(loop, watch.settings.slow_callback_s, watch.emit, watch.heard_from)
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


class _Stall:
    __slots__ = ("callback", "coroutine", "importing", "site", "stack", "task")

    def __init__(
        self,
        site: Site | None,
        stack: tuple[Site, ...],
        task: str | None,
        coroutine: str | None,
        callback: str | None,
        importing: str | None = None,
    ) -> None:
        self.importing = importing
        self.site = site
        self.stack = stack
        self.task = task
        self.coroutine = coroutine
        self.callback = callback


class _Compiled:
    """Stands for a callback with no Python frame (a C function, on uvloop)."""


_COMPILED = _Compiled()


class LoopProbe:
    """The watchdog's view of one loop.  Sampling state is touched only by
    the watchdog thread (but for `held`, which the heartbeat drops); the
    heartbeat fields only by the loop thread."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        threshold_s: float,
        emit: Callable[[Finding], None],
        heard_from: Callable[[str], None] | None = None,
    ) -> None:
        self.loop_ref = weakref.ref(loop)
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

    # -- loop thread ---------------------------------------------------------

    def beat(self) -> None:
        """Heartbeat, run by the loop: who runs the loop, and from where."""
        self.beat_time = _now()
        ident = threading.get_ident()
        if ident != self.thread_id or self.thread_name is None:
            self.thread_name = threading.current_thread().name
            if self.heard_from is not None:
                self.heard_from(self.thread_name)
        self.thread_id = ident
        caller = sys._getframe(1)
        # asyncio: Handle._run; uvloop: the frame that called run_forever
        # (matched by code, so it survives the loop being run again).
        self.runner_code = None if caller.f_code is _HANDLE_RUN else caller.f_code
        self.beats += 1
        self.beat_pending = False
        # The callback the watchdog followed is over (we run after it): drop
        # its frame here, now, on the loop thread.  Kept until the next
        # sample, a finished frame keeps its locals (the program's task,
        # hence its loop) alive for a moment the program can see: anyio's
        # test_asyncio_run_does_not_leak_event_loop saw the loop alive after
        # anyio.run() returned.  Only the beats counter decides whether a
        # callback is still the same one; this reference is for identity.
        self.held = None
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
        while frame is not None:
            code = frame.f_code
            if code is _HANDLE_RUN and not chain:
                # asyncio is running a callback with no Python frame of its
                # own (a C function such as time.sleep): follow Handle._run.
                return frame, []
            if code is _HANDLE_RUN or code is runner:
                return (chain[-1] if chain else None), chain
            chain.append(frame)
            frame = frame.f_back
        return None, []

    def sample(self, frames: dict[int, FrameType], now: float) -> float | None:
        """Look at the loop once; return how soon to look again (None: drop me)."""
        loop = self.loop_ref()
        if loop is None or loop.is_closed() or not self.enabled:
            self.finish(now)
            return None
        if not loop.is_running():
            # Park until the loop runs: the queued heartbeat is its first
            # callback then, and wakes us at once (a stall may start at once).
            self.finish(now)
            self.parked = True
            self._post_beat(loop)
            return 1.0
        tick = max(self.threshold_s / 10, 0.001)
        thread_id = getattr(loop, "_thread_id", None) or self.thread_id
        top = frames.get(thread_id) if thread_id is not None else None
        if top is None:
            self.finish(now)
            self._post_beat(loop)  # learn the loop thread
            return tick
        callback, chain = self.callback_frame(top)
        if callback is None and self.runner_code is not None and top.f_code is self.runner_code:
            return self._sample_compiled(loop, now, tick)
        if callback is not None:
            self.python_seen = now
        if callback is None or _own_work(chain):
            # Idle, in the loop's own machinery, or in asyncwatch's own work,
            # which must never make user code look slow.
            self.finish(now)
            return tick
        if callback is self.held and self.beats == self.held_beats:
            if self.stall is None and now - self.held_since >= self.threshold_s:
                self.stall = self._capture(loop, top, chain)
            if self.stall is not None:
                return min(tick, 0.002)  # catch the end precisely
            return tick
        self.finish(now)
        self.held = callback
        self.held_since = now
        self.held_beats = self.beats
        self._post_beat(loop)
        return tick

    def _sample_compiled(self, loop: asyncio.AbstractEventLoop, now: float, tick: float) -> float:
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
        if task is not None:
            name: str | None = task.get_name()
            coroutine = coro_name(task)
            # Observers of the blocking task (notable spans: the context the
            # step runs in) learn of it while the step still runs.
            watch = watches.get(loop)
            if watch is not None and watch.hooks.task_blocking:
                watch.hooks.dispatch("task_blocking", task, self.held_since)
        else:
            name = coroutine = None
            if chain:
                callback = chain[-1].f_code.co_qualname
            elif top.f_code is _HANDLE_RUN:
                handle = top.f_locals.get("self")  # the Handle: names the C callback
                callback = qualname_of(getattr(handle, "_callback", None))
                del handle
        del task  # never keep the user's task alive
        return _Stall(site, stack_of(chain), name, coroutine, callback, importing)

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
            duration = end - self.held_since
            if stall.task:
                what = f"Task {stall.task!r} (coroutine {stall.coroutine!r})"
            elif stall.callback:
                what = f"Callback {stall.callback!r}"
            else:
                what = "A callback with no Python frame (compiled code)"
            blocked = (
                f"{what} blocked the event loop for {duration * 1000:.0f} ms "
                f"(threshold {self.threshold_s * 1000:.0f} ms)"
            )
            if stall.importing is not None:
                module = f"module {stall.importing!r}" if stall.importing else "a module"
                advice = (
                    f" while importing {module} (cause: import; start-up work, such as a server importing "
                    "the application in its loop: the site is the line the import was running); import it "
                    "before the loop starts to keep it off the loop"
                )
            else:
                advice = "; move blocking or CPU-bound work to asyncio.to_thread() or an executor"
            self.emit(
                Finding(
                    kind=FindingKind.SLOW_CALLBACK,
                    message=blocked + advice,
                    cause="import" if stall.importing is not None else None,
                    site=stall.site,
                    stack=stall.stack,
                    task=stall.task,
                    coroutine=stall.coroutine,
                    duration_s=round(duration, 6),
                )
            )


class Watchdog:
    """One daemon thread sampling every registered `LoopProbe`."""

    def __init__(self) -> None:
        self._probes: list[LoopProbe] = []
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._thread: HiddenThread | None = None
        self._stopping = False
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
        self._wake.set()

    def _ensure_thread(self) -> None:
        if self._thread is None or not self._thread.is_alive():
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
                continue
            delay = self._sample_all()
            if delay is None:
                return
            self._wake.wait(delay)

    def _sample_all(self) -> float | None:
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
                next_in = probe.sample(frames, now)
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
