"""The detector interface: optional hooks, dispatched only where overridden.

A `Detector` watches for one kind of mistake (or, like OpenTelemetry's task
tracer, observes tasks for an output).  Every hook is an optional no-op
method named after the event, in the spirit of trio's ``Instrument``:

=========================  ==============================================
``install(context)``       asyncwatch starts in this process
``uninstall()``            asyncwatch stops; restore what was hooked
``flush()``                report what is in progress now (exit, a signal)
``at_exit(survivors)``     the program is over: what it left alive
``loop_attached(watch)``   a loop is watched from now on
``loop_detached(watch)``   the loop is no longer watched
``exception_context(...)`` the loop's exception handler got a context
``task_created(...)``      asyncwatch's task factory made a task
``task_cancel_requested``  ``cancel()`` on a pending task of ours
``task_done(...)``         a task whose creation was told finished
``task_failed(task)``      a task's exception is first asked for
``task_blocking(task)``    a task's step holds the loop past the threshold
``gather_made(...)``       a ``gather()`` that made tasks has returned
``wrap_coroutine(coro)``   the coroutine a new task will run
=========================  ==============================================

For each loop the engine builds, once, a `Hooks` table: per hook, a tuple
of only the detectors that override it, so an unused hook costs nothing on
the hot path (the task factory specialises itself on the table).  A hook
that raises disables its detector everywhere, said once, in `Hooks.failed`.
"""

from __future__ import annotations

import asyncio
import dataclasses
import threading
import weakref
from collections.abc import Callable, Iterable, Mapping
from types import CodeType, FrameType
from typing import TYPE_CHECKING, Any, ClassVar

from .collecting import hold
from .findings import Finding, FindingKind, Site
from .runtime import report_internal_error

if TYPE_CHECKING:
    from .settings import Settings
    from .survivors import Survivors

__all__ = [
    "HOOKS",
    "TASK_HOOKS",
    "CoroutineClaims",
    "Detector",
    "DetectorContext",
    "Hooks",
    "WatchedLoop",
    "overrides",
    "watches",
]


class CoroutineClaims:
    """Coroutines a finding already covers: the same mistake is reported once.

    A pending task destroyed before it ever ran is also a coroutine never
    awaited; the task's detector claims the coroutine (by id, never a
    reference), and the never-awaited detector skips what is claimed.
    """

    def __init__(self) -> None:
        self._ids: set[int] = set()
        self._lock = threading.Lock()
        #: Whether anyone takes claims (the never-awaited detector is installed);
        #: until then nothing is kept.
        self.active = False

    def claim(self, coro: Any) -> None:
        if self.active:
            with self._lock:
                self._ids.add(id(coro))
            hold()  # a claim made by a collection is used up after it (`take_all`)

    def take(self, coro_id: int) -> bool:
        """Whether *coro_id* was claimed (the claim is used up)."""
        with self._lock:
            if coro_id in self._ids:
                self._ids.discard(coro_id)
                return True
            return False

    def take_all(self) -> set[int]:
        """Every claim so far, used up (after a garbage collection)."""
        with self._lock:
            ids, self._ids = self._ids, set()
            return ids


class DetectorContext:
    """What the engine gives each detector at `Detector.install`."""

    def __init__(
        self,
        settings: Settings,
        emit: Callable[[Finding], None],
        claims: CoroutineClaims,
        failed: Callable[[Detector, Exception], None],
    ) -> None:
        #: The process-wide settings (a loop's own are on its `WatchedLoop`).
        self.settings = settings
        #: Report a finding not tied to one loop (a loop's go to `WatchedLoop.emit`).
        self.emit = emit
        self.claims = claims
        #: Say that *detector* failed outside a dispatched hook (its own
        #: thread, a warnings hook, a done callback): the engine disables it
        #: on every loop and reports the error once, as for a hook.
        self.failed = failed


class Detector:
    """Base class of detectors: every hook is optional and does nothing.

    Override only what you need: the engine calls only overridden hooks.  A
    hook runs on whatever thread the event happens on (often the loop's, the
    collector's for finalizers) and must not block.  A hook that raises
    disables the whole detector, reported once as an internal error.
    """

    #: The kind of finding this detector reports, if it reports one.
    kind: ClassVar[FindingKind | None] = None
    #: Whether the detector needs asyncwatch's task factory (creation sites
    #: and ``Task.cancel``) even though it overrides no task hook.
    needs_task_factory: ClassVar[bool] = False
    #: Whether its ``task_created`` needs the creation site as a `Site`.
    #: Making one costs every task a lookup; a detector that needs the site
    #: only for the few tasks it reports says False and asks `created_at`.
    needs_creation_site: ClassVar[bool] = True
    #: Whether it counts tasks with a `asyncwatch._core.tasks.TaskEnds`:
    #: the factory then makes tasks that count their own end when they are
    #: freed (`asyncwatch._core.tasks.CountingTask`), which costs each task
    #: a Python call then.  Read when a loop is attached (an instance may
    #: set it before).
    counts_task_ends: bool = False

    @property
    def name(self) -> str:
        """How internal errors name this detector."""
        return self.kind.value if self.kind is not None else type(self).__name__

    def install(self, context: DetectorContext) -> None:
        """asyncwatch starts in this process (before any loop is attached)."""

    def uninstall(self) -> None:
        """asyncwatch stops: restore whatever `install` hooked, in any order."""

    def flush(self) -> None:
        """Report now what is in progress (a stall not over yet): the process
        is about to exit, or a signal is ending it."""

    def at_exit(self, survivors: Survivors) -> None:
        """The program's code and its exit functions have run: report what
        Python's shutdown would of the tasks and coroutines it left alive
        (`asyncwatch._core.survivors`), which it frees only as it clears the
        modules, too late for asyncwatch.  Told once, after a collection."""

    def loop_attached(self, watch: WatchedLoop) -> None:
        """*watch*'s loop is watched from now on."""

    def loop_detached(self, watch: WatchedLoop) -> None:
        """*watch*'s loop is no longer watched (uninstall)."""

    def exception_context(self, watch: WatchedLoop, context: Mapping[str, Any]) -> None:
        """The loop's exception handler got *context*; it goes on to the next handler unchanged."""

    def wrap_coroutine(self, coro: Any) -> Any:
        """Return what a new task runs instead of *coro* (a wrapper), or *coro*."""
        return coro

    def task_created(self, task: asyncio.Task[Any], coro: Any, site: Site | None) -> None:
        """*task* (running *coro*, as wrapped) was created at *site*, on the creating thread
        (*site* is None, unresolved, for a detector whose `needs_creation_site` is False)."""

    def task_cancel_requested(self, task: asyncio.Task[Any], caller: FrameType, message: Any) -> None:
        """``task.cancel(message)`` was called from *caller* while *task* was pending."""

    def task_done(self, task: asyncio.Task[Any], coro: Any) -> None:
        """*task* finished; *coro* is what it ran (a done task may not say, gh-122332)."""

    def task_failed(self, task: asyncio.Task[Any]) -> None:
        """*task* ended with an exception, and the program (or asyncio for it:
        ``await``, ``gather``, a ``TaskGroup``) asks for its outcome with
        ``result()`` or ``exception()``: told on the thread asking, before it
        gets the answer, possibly more than once.  Overriding it makes the
        factory create tasks that tell (`asyncwatch._core.tasks.TellingTask`),
        which costs each task a Python call per ``result()``/``exception()``,
        no callback and no wrapper."""

    def task_blocking(self, task: asyncio.Task[Any], since: float) -> None:
        """A step of *task* has held its loop for longer than the slow-callback
        threshold and still runs; the watchdog first saw it at *since*
        (``time.perf_counter()``).  Told from the watchdog's thread, during
        the step, once per slow step, only while slow callbacks are detected."""

    def gather_made(self, watch: WatchedLoop, gathering: asyncio.Future[Any], site: Site | None) -> None:
        """``gather()`` called at *site* made tasks and returned *gathering*,
        still pending.  asyncio silences "Task was destroyed but it is
        pending!" for those tasks: the caller holds no reference to them.
        Told once per gather, at the loop's next callback, by asyncwatch's
        task factory (so only for gathers whose tasks it made)."""


#: The hooks a `Hooks` table dispatches, in the order of `Detector`.
HOOKS = (
    "loop_attached",
    "loop_detached",
    "exception_context",
    "wrap_coroutine",
    "task_created",
    "task_cancel_requested",
    "task_done",
    "task_failed",
    "task_blocking",
    "gather_made",
)
#: The hooks that need asyncwatch's task factory.
TASK_HOOKS = ("wrap_coroutine", "task_created", "task_cancel_requested", "task_done", "task_failed")


def overrides(detector: Detector, hook: str) -> bool:
    """Whether *detector* overrides *hook* (a no-op default costs nothing)."""
    return getattr(type(detector), hook) is not getattr(Detector, hook)


class Hooks:
    """Per hook, the bound methods of the detectors that override it.

    Built once per loop; rebuilt in place when a detector is disabled, so
    whoever holds the table (the task factory) sees the change.
    """

    __slots__ = (*HOOKS, "_on_failure", "counts_task_ends", "creation_sites", "detectors")

    loop_attached: tuple[Callable[[WatchedLoop], None], ...]
    loop_detached: tuple[Callable[[WatchedLoop], None], ...]
    exception_context: tuple[Callable[[WatchedLoop, Mapping[str, Any]], None], ...]
    wrap_coroutine: tuple[Callable[[Any], Any], ...]
    task_created: tuple[Callable[[asyncio.Task[Any], Any, Site | None], None], ...]
    task_cancel_requested: tuple[Callable[[asyncio.Task[Any], FrameType, Any], None], ...]
    task_done: tuple[Callable[[asyncio.Task[Any], Any], None], ...]
    task_failed: tuple[Callable[[asyncio.Task[Any]], None], ...]
    task_blocking: tuple[Callable[[asyncio.Task[Any], float], None], ...]
    gather_made: tuple[Callable[[WatchedLoop, asyncio.Future[Any], Site | None], None], ...]

    def __init__(self, detectors: Iterable[Detector], on_failure: Callable[[Detector, Exception], None]) -> None:
        self._on_failure = on_failure
        self.detectors: tuple[Detector, ...] = ()
        self.build(detectors)

    def build(self, detectors: Iterable[Detector]) -> None:
        self.detectors = tuple(detectors)
        for hook in HOOKS:
            setattr(self, hook, tuple(getattr(d, hook) for d in self.detectors if overrides(d, hook)))
        #: Whether a ``task_created`` hook takes the creation site as a `Site`.
        self.creation_sites = any(d.needs_creation_site for d in self.detectors if overrides(d, "task_created"))
        #: Whether a detector counts tasks' ends (`Detector.counts_task_ends`).
        self.counts_task_ends = any(d.counts_task_ends for d in self.detectors if overrides(d, "task_created"))

    def without(self, detector: Detector) -> None:
        """Stop dispatching to *detector*."""
        if detector in self.detectors:
            self.build(d for d in self.detectors if d is not detector)

    @property
    def observes_tasks(self) -> bool:
        """Whether a task hook other than ``task_cancel_requested`` is used (the
        task factory then takes its slower, telling path)."""
        return bool(self.wrap_coroutine or self.task_created or self.task_done or self.task_failed)

    @property
    def needs_task_factory(self) -> bool:
        return any(d.needs_task_factory for d in self.detectors) or any(getattr(self, h) for h in TASK_HOOKS)

    def failed(self, hook: Callable[..., Any], exc: Exception) -> None:
        """*hook* raised: disable its detector (everywhere, through the engine)."""
        detector = getattr(hook, "__self__", None)
        if isinstance(detector, Detector):
            self._on_failure(detector, exc)
        else:  # not built by `build` (cannot happen): say so at least
            report_internal_error(getattr(hook, "__qualname__", repr(hook)), exc)

    def dispatch(self, hook: str, *args: Any) -> None:
        """Call every *hook*, containing each failure."""
        for method in getattr(self, hook):
            try:
                method(*args)
            except Exception as exc:
                self.failed(method, exc)


# The live threads by ident: threading's own table, read without its lock
# (taking that lock from a finalizer could deadlock the thread holding it).
_THREADS: dict[int, threading.Thread] = getattr(threading, "_active", {})


class WatchedLoop:
    """asyncwatch's view of one watched loop, as detectors see it.

    Holds the loop weakly.  `emit` fills in the finding's thread (the one
    running the loop) and drops kinds the loop's settings do not detect.
    """

    def __init__(
        self, loop: asyncio.AbstractEventLoop, settings: Settings, emit: Callable[[Finding], None], hooks: Hooks
    ) -> None:
        self.settings = settings
        self.loop_ref = weakref.ref(loop)
        self.hooks = hooks
        #: What detectors keep for this loop (a probe), keyed by detector.
        self.state: dict[Detector, Any] = {}
        #: The code of the Python frame that last started the loop running,
        #: where the loop-start hook saw it.  uvloop dispatches from C, so on
        #: a loop run by hand this frame is every callback's caller.
        self.runner: CodeType | None = None
        self._emit = emit
        self._detect = settings.detect
        # The thread running the loop, as last known; a loop is nearly always
        # run by the thread that makes it, which is the first guess.
        self.thread: str | None = None
        self.thread = self._loop_thread(loop) or threading.current_thread().name

    def detects(self, kind: FindingKind) -> bool:
        return kind in self._detect

    def emit(self, finding: Finding) -> None:
        if finding.kind in self._detect:
            if finding.thread is None:
                finding = _with_thread(finding, self._loop_thread(self.loop_ref()))
            self._emit(finding)

    def heard_from(self, thread_name: str) -> None:
        """The loop was seen running on *thread_name* (uvloop's heartbeat says so)."""
        self.thread = thread_name

    def _loop_thread(self, loop: asyncio.AbstractEventLoop | None) -> str | None:
        """The name of the thread running *loop*, asked only when a finding is
        made.  Not the current thread: the garbage collector finalizes a task
        (and so reports it) in whichever thread it happens to run."""
        if loop is not None:
            if asyncio.events._get_running_loop() is loop:
                self.thread = threading.current_thread().name
                return self.thread
            ident = getattr(loop, "_thread_id", None)  # asyncio's loops, while they run
            thread = _THREADS.get(ident) if ident is not None else None
            if thread is not None:
                self.thread = thread.name
                return self.thread
        # uvloop's, or a loop no longer running: the last thread seen.
        return self.thread


def _with_thread(finding: Finding, thread: str | None) -> Finding:
    return dataclasses.replace(finding, thread=thread)


#: The `WatchedLoop` of each watched loop: the one registry.  Tasks do not
#: carry it (one slot less to fill on every task); the rare paths
#: (``cancel()``, finalizers) look it up.
watches: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, WatchedLoop] = weakref.WeakKeyDictionary()
