"""Task detectors: creation sites, pending tasks destroyed, exceptions never
retrieved, and swallowed cancellations.

Cost model (this runs for every task):

* The chained task factory records where a task was created as a code object
  and an instruction offset in two slots of the task itself; turning that into
  a file and line happens only when a finding is reported.
* `Task.cancel` is the only overridden method, so a task that is never
  cancelled pays nothing else.  A cancelled task gets one done callback that
  checks, when it finishes, whether the cancellation was swallowed.
* Nothing here holds a strong reference to a task or a coroutine.
"""

from __future__ import annotations

import asyncio
import collections.abc
import functools
import gc
import inspect
import os
import sys
import threading
import time
import weakref
from collections.abc import Callable
from types import CodeType, FrameType
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from ._findings import (
    Finding,
    FindingKind,
    Site,
    _is_library_cache,
    app_frame,
    code_site,
    describe_exception,
    frame_site,
    is_library_file,
    is_own_file,
    qualname_of,
)
from ._reporters import report_internal_error

if TYPE_CHECKING:
    from ._engine import LoopWatch

__all__ = ["Task", "TaskObserver", "TimedCoroutine"]

DESTROYED_PENDING = "Task was destroyed but it is pending!"
# asyncio words it "<class name> exception was never retrieved".
NEVER_RETRIEVED = " exception was never retrieved"

_eager_task_factory = getattr(asyncio, "eager_task_factory", None)

#: The LoopWatch of each watched loop.  Tasks do not carry it (one slot
#: less to fill on every task); the rare paths (cancel) look it up.
watches: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, LoopWatch] = weakref.WeakKeyDictionary()

# gh-122332: on 3.12.0-3.12.4, Task.get_coro() dereferences NULL (and kills
# the interpreter) for a task that completed eagerly.  Never ask a done task
# there; the eager path of our factory keeps the coroutine's name instead.
_GET_CORO_UNSAFE_WHEN_DONE = (3, 12) <= sys.version_info[:3] < (3, 12, 5)


_task_get_coro = asyncio.Task.get_coro


def coro_of(task: asyncio.Future[Any]) -> Any:
    """``task.get_coro()`` (for a traced task, asyncwatch's timing wrapper),
    or None where asking would crash CPython."""
    if _GET_CORO_UNSAFE_WHEN_DONE and task.done():
        return None
    if type(task) is Task:
        return _task_get_coro(task)  # past Task.get_coro, which shows the program its own coroutine
    get_coro = getattr(task, "get_coro", None)
    return get_coro() if get_coro is not None else None


def user_coro_of(task: asyncio.Future[Any]) -> Any:
    """`coro_of`, unwrapped from asyncwatch's timing wrapper."""
    coro = coro_of(task)
    return coro._aw_inner if type(coro) is TimedCoroutine else coro


def coro_name(task: asyncio.Future[Any]) -> str | None:
    """The qualified name of the coroutine *task* runs."""
    name = getattr(task, "_aw_coro", None)
    if name is not None:
        return name  # type: ignore[no-any-return]
    if type(task) is Task:
        # Our factory names every task it starts eagerly, so this one was
        # not, and get_coro() is safe even on 3.12.0-3.12.4.
        return qualname_of(task.get_coro())
    entry = _foreign_entry(task)
    if entry is not None:
        return entry[3]  # the coroutine the program gave, not a library's wrapper of it
    return qualname_of(coro_of(task))


class CancelRequest:
    """One unstructured ``cancel()`` of a task: who, and where it lands."""

    __slots__ = ("absorbed", "cancelled_by", "delivered_at", "delivery_stack", "forwarded_from")

    def __init__(self, cancelled_by: Site | None, forwarded_from: CancelRequest | None) -> None:
        self.cancelled_by = cancelled_by
        self.delivered_at: Site | None = None
        self.delivery_stack: tuple[Site, ...] = ()
        self.forwarded_from = forwarded_from
        # Set when the task this request was forwarded into swallowed it:
        # this task then never saw a CancelledError, and only that one is reported.
        self.absorbed = False


class CancelRecord:
    """The unstructured cancellation requests of one task."""

    __slots__ = ("requests",)

    def __init__(self) -> None:
        self.requests: list[CancelRequest] = []


class _Forwarding(threading.local):
    """The cancel() calls in progress on this thread, innermost last.

    ``outer.cancel()`` cancels the future the task waits on; when that is
    another task, its ``cancel()`` runs inside ours, and this stack is how
    the inner one learns it was cancelled on the outer one's behalf.
    """

    def __init__(self) -> None:
        self.stack: list[tuple[CancelRequest | None, bool, Site | None]] = []


_forwarding = _Forwarding()


def _recorded_cancel(task: Any, msg: Any, cancel: Callable[[Any], bool], caller: FrameType) -> bool:
    """``task.cancel(msg)``, recorded: who cancelled, and on whose behalf."""
    entry: tuple[CancelRequest | None, bool, Site | None] = (None, False, None)
    if not task.done():
        try:
            entry = _note_cancel(task, caller)
        except Exception as exc:
            report_internal_error("cancellation tracking", exc)
    stack = _forwarding.stack
    stack.append(entry)
    try:
        return cancel(msg)
    finally:
        stack.pop()


class Task(asyncio.Task):  # type: ignore[type-arg]
    """asyncio's Task, with three slots and a recorded ``cancel()``.

    Created by asyncwatch's task factory when no other factory is chained.  It
    is an `asyncio.Task` in every other respect (same C implementation, same
    ``repr``), so code that checks ``isinstance(t, asyncio.Task)`` is unaffected.
    """

    # _aw_site: (code, offset) of the creating line; _aw_cancel: CancelRecord;
    # _aw_coro: the coroutine's name where get_coro() may be unsafe later.
    __slots__ = ("_aw_cancel", "_aw_coro", "_aw_site")
    _aw_site: tuple[CodeType, int] | None
    _aw_cancel: CancelRecord
    _aw_coro: str | None

    if (3, 13, 0) <= sys.version_info[:3] < (3, 13, 3):

        def set_name(self, value: object) -> None:
            # gh-130033: with a task factory set, create_task() calls
            # set_name(None) and the task is renamed "None"; plain asyncio
            # keeps "Task-N".  Installing asyncwatch must not rename tasks.
            if value is not None:
                super().set_name(value)

    def get_coro(self) -> Any:
        # A traced task runs asyncwatch's timing wrapper around the program's
        # coroutine; the program gets its own coroutine back, as without
        # asyncwatch (identity, types.CoroutineType, inspect.iscoroutine).
        coro = super().get_coro()
        return coro._aw_inner if type(coro) is TimedCoroutine else coro

    def cancel(self, msg: Any = None) -> bool:
        caller = sys._getframe(1)
        coro = coro_of(self) if not self.done() else None
        if type(coro) is TimedCoroutine and coro._aw_observer is not None:
            try:
                app = app_frame(caller)
                coro._aw_observer.task_cancel_requested(self, frame_site(app) if app is not None else None, msg)
            except Exception as exc:
                coro._aw_observer = None
                report_internal_error("task observer", exc)
        return _recorded_cancel(self, msg, super().cancel, caller)


# --- Task lifecycle observers (OpenTelemetry spans build on this) -----------


@runtime_checkable
class TaskObserver(Protocol):
    """Told about each task's life.  Only when an observer is registered do
    tasks pay for it: they are then `TracedTask`, whose steps are timed."""

    def task_created(self, task: asyncio.Task[Any], created_at: Site | None) -> None:
        """*task* was just created (on the creating thread, in the creator's context)."""

    def task_step(self, task: asyncio.Task[Any], start: float, duration: float) -> None:
        """One step ran from *start* (``time.perf_counter()``) for *duration* seconds."""

    def task_cancel_requested(self, task: asyncio.Task[Any], canceller: Site | None, message: Any) -> None:
        """``task.cancel(message)`` was called from *canceller* while it was pending."""

    def task_done(self, task: asyncio.Task[Any]) -> None:
        """*task* finished (result, exception or cancelled), inside its last step."""


class TimedCoroutine(collections.abc.Coroutine):  # type: ignore[type-arg]
    """Wraps a traced task's coroutine to time each step (``send``/``throw``).

    asyncio's C Task has no hook between steps; it drives any coroutine
    through ``send`` and ``throw``, so this wrapper sees each step and
    forwards everything else (``cr_frame``, ``cr_await``, ``__qualname__``
    ...) so that ``repr(task)``, ``task.get_stack()`` and asyncwatch's own
    introspection see the user's coroutine.  Exceptions pass through
    untouched.  Used only while an observer (spans) is on.
    """

    # __weakref__: a coroutine can be weakly referenced, so its stand-in must be too.
    __slots__ = ("__weakref__", "_aw_early", "_aw_inner", "_aw_observer", "_aw_task")

    def __init__(self, coro: Any, observer: TaskObserver) -> None:
        self._aw_inner = coro
        self._aw_observer: TaskObserver | None = observer
        self._aw_task: Callable[[], Any] = _no_task
        # An eager first step runs inside Task.__init__, before the task
        # exists for the observer: kept here and told right after creation.
        self._aw_early: tuple[float, float] | None = None

    def send(self, value: Any) -> Any:
        start = _clock()
        try:
            return self._aw_inner.send(value)
        finally:
            self._stepped(start)

    def throw(self, *args: Any) -> Any:
        start = _clock()
        try:
            return self._aw_inner.throw(*args)
        finally:
            # *args holds the exception, whose traceback holds this frame:
            # a cycle that would keep everything the task's frames refer to
            # (sockets, SSL contexts) alive until the collector runs.
            del args
            self._stepped(start)

    def close(self) -> None:
        self._aw_inner.close()

    def __await__(self) -> Any:
        return self._aw_inner.__await__()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._aw_inner, name)

    def _stepped(self, start: float) -> None:
        observer = self._aw_observer
        task = self._aw_task()
        if task is None:
            self._aw_early = (start, _clock() - start)
        elif observer is not None:
            try:
                observer.task_step(task, start, _clock() - start)
            except Exception as exc:
                self._aw_observer = None
                report_internal_error("task observer", exc)


def _no_task() -> None:
    return None


_clock = time.perf_counter


def _observed_done(coro: TimedCoroutine, task: asyncio.Task[Any]) -> None:
    # Handed the wrapper: asking a done task for its coroutine is unsafe on
    # 3.12.0-3.12.4 (gh-122332).
    observer = coro._aw_observer
    if observer is not None:
        try:
            observer.task_done(task)
        except Exception as exc:
            coro._aw_observer = None
            report_internal_error("task observer", exc)


# Cancellations made by asyncio's structured helpers (they uncancel() when
# they are done, or, on 3.11/3.12, TaskGroup sometimes leaves the count at 1:
# gh-116720).  Keyed by file name, then by function name (None = any).
_STRUCTURED: dict[str, frozenset[str] | None] = {
    "taskgroups.py": None,
    "timeouts.py": None,
    "staggered.py": None,
    "tasks.py": frozenset({"wait_for", "_cancel_and_wait", "_on_timeout"}),
}
_ASYNCIO_DIR = os.path.dirname(asyncio.__file__) + os.sep


def _is_structured(frame: FrameType) -> bool:
    code = frame.f_code
    filename = code.co_filename
    if not filename.startswith(_ASYNCIO_DIR):
        return False
    base = os.path.basename(filename)
    if base not in _STRUCTURED:
        return False
    names = _STRUCTURED[base]
    return names is None or code.co_name in names


def _note_cancel(task: Task, caller: FrameType) -> tuple[CancelRequest | None, bool, Site | None]:
    """Record one cancel() of a pending *task*; return its forwarding entry."""
    watch = watches.get(task.get_loop())
    if watch is None or not watch.detects(FindingKind.CANCELLATION_SWALLOWED):
        return (None, False, None)
    record: CancelRecord | None = getattr(task, "_aw_cancel", None)
    if record is None:
        record = CancelRecord()
        task._aw_cancel = record
        if getattr(task, "_aw_coro", None) is None:
            task._aw_coro = qualname_of(user_coro_of(task))  # pending: safe to ask now
        task.add_done_callback(_check_swallowed)
    stack = _forwarding.stack
    outer: CancelRequest | None = None
    if stack and stack[-1][0] is not None and stack[-1][0] not in record.requests:
        # Forwarded from an outer task's cancel(): same canceller, same kind.
        outer, structured, canceller = stack[-1]
    elif stack and stack[-1][1]:
        structured, canceller = True, None  # forwarded from a structured cancel
    else:
        frame: FrameType | None = caller
        while frame is not None and is_own_file(frame.f_code.co_filename):
            frame = frame.f_back  # called from our own cancel() of an untracked outer task
        structured = frame is not None and _is_structured(frame)
        app = app_frame(frame)
        canceller = frame_site(app) if app is not None else None
    if structured:
        return (None, True, canceller)
    request = CancelRequest(canceller, outer)
    request.delivered_at, request.delivery_stack = _delivery_point(task, canceller)
    record.requests.append(request)
    return (request, False, canceller)


def _delivery_point(task: asyncio.Task[Any], canceller: Site | None) -> tuple[Site | None, tuple[Site, ...]]:
    """Where CancelledError will be thrown into *task*: its innermost
    application ``await``, found through the chain of awaited coroutines."""
    coro = user_coro_of(task)
    if getattr(coro, "cr_running", False):
        # The task cancels itself: the error lands at its next await, which
        # has not happened yet; the cancel() call is the best line we have.
        return canceller, ((canceller,) if canceller else ())
    chain: list[Site] = []
    obj: Any = coro
    while obj is not None:
        frame = getattr(obj, "cr_frame", None) or getattr(obj, "gi_frame", None) or getattr(obj, "ag_frame", None)
        if frame is None:
            agen = _async_generator_of(obj)
            if agen is None:
                break
            obj = agen  # `async for` / `async with` over an async generator
            continue
        chain.append(frame_site(frame))
        obj = getattr(obj, "cr_await", None) or getattr(obj, "gi_yieldfrom", None) or getattr(obj, "ag_await", None)
    delivered = next((s for s in reversed(chain) if not is_library_file(s.file)), None)
    return delivered, tuple(chain)


def _async_generator_of(awaitable: Any) -> Any:
    """The async generator behind an ``asend``/``athrow`` awaitable, which
    exposes no attribute for it.  Only runs when a task is cancelled."""
    if type(awaitable).__name__ not in ("async_generator_asend", "async_generator_athrow"):
        return None
    return next((r for r in gc.get_referents(awaitable) if inspect.isasyncgen(r)), None)


def _check_swallowed(task: asyncio.Task[Any]) -> None:
    """Done callback of a cancelled task: report if it finished normally."""
    try:
        record: CancelRecord | None = getattr(task, "_aw_cancel", None)
        if record is None or task.cancelled() or task._exception is not None:
            return
        swallowed = [r for r in record.requests if not r.absorbed]
        if not swallowed or task.cancelling() <= 0:
            # Only structured cancellation, a deliberate uncancel(), or every
            # request went into a task that swallowed it (that one is reported).
            return
        for request in swallowed:
            outer = request.forwarded_from
            while outer is not None:
                outer.absorbed = True
                outer = outer.forwarded_from
        request = swallowed[0]
        watch = watches.get(task.get_loop())
        if watch is None:
            return
        coro = coro_name(task)
        name = task.get_name()
        by = f" (cancelled at {_short(request.cancelled_by)})" if request.cancelled_by else ""
        watch.emit(
            Finding(
                kind=FindingKind.CANCELLATION_SWALLOWED,
                message=(
                    f"Task {name!r} (coroutine {coro!r}) was cancelled{by} but finished without "
                    "raising CancelledError, so the cancellation was swallowed; re-raise "
                    "CancelledError after cleanup"
                ),
                site=request.delivered_at,
                stack=request.delivery_stack,
                task=name,
                coroutine=coro,
                cancelled_by=request.cancelled_by,
                created_at=created_at(task),
            )
        )
    except Exception as exc:
        report_internal_error("cancellation tracking", exc)


def _short(site: Site | None) -> str:
    if site is None:
        return "an unknown place"
    return f"{os.path.basename(site.file)}:{site.line}"


# --- where a task was created ------------------------------------------------

# Tasks made by another library's task factory are not our subclass and have
# no slots: their creation sites live here, keyed by id(task) and checked
# against id() of the coroutine the task runs (which may be the library's
# wrapper of the program's coroutine, as Sentry's is), with the name of the
# program's coroutine (a done task may no longer say it).  Entries leave on
# completion; the table is capped for tasks that vanish without a word
# (gather hides their destruction).
_FOREIGN_LIMIT = 100_000
_foreign_sites: dict[int, tuple[int, CodeType, int, str | None]] = {}


def _forget_foreign(task: asyncio.Task[Any]) -> None:
    # A failed task keeps its entry: "exception never retrieved" is reported
    # later, from its finalizer, and needs the site then.
    if task.cancelled() or task._exception is None:
        _foreign_sites.pop(id(task), None)


def forget(task: asyncio.Future[Any]) -> None:
    """Drop what is kept about a reported task (it is being finalized)."""
    _foreign_sites.pop(id(task), None)


def created_at(task: asyncio.Future[Any]) -> Site | None:
    """The application line that created *task*, if asyncwatch saw it."""
    site = getattr(task, "_aw_site", None)
    if site is not None:
        return code_site(*site)
    entry = _foreign_entry(task)
    return code_site(entry[1], entry[2]) if entry is not None else None


def _foreign_entry(task: asyncio.Future[Any]) -> tuple[int, CodeType, int, str | None] | None:
    entry = _foreign_sites.get(id(task))
    if entry is not None:
        coro = coro_of(task)
        # No coroutine to check (finished: asyncio let it go) or none known
        # at creation (finished eagerly on 3.12.0-3.12.4): trust the id of the task.
        if coro is None or not entry[0] or entry[0] == id(coro):
            return entry
    return None


class TaskFactory:
    """The loop's task factory while asyncwatch watches it; chains *previous*.

    `function` is what is installed on the loop: a plain function (cheaper
    to call than an object with ``__call__``), closing over this state.
    """

    __slots__ = ("__weakref__", "enabled", "function", "previous")

    def __init__(
        self,
        previous: Callable[..., Any] | None,
        loop: asyncio.AbstractEventLoop,
        observer: TaskObserver | None = None,
    ) -> None:
        self.previous = previous
        self.enabled = True
        # What it chains and whom it tells are fixed here: the function is
        # specialised for them (see _make_factory).
        self.function = _make_factory(self, _first_caller_depth(loop), observer)


def _first_caller_depth(loop: asyncio.AbstractEventLoop) -> int:
    """How far above the factory the caller of ``loop.create_task`` is: on
    asyncio's loops, ``BaseEventLoop.create_task`` is a Python frame between."""
    import asyncio.base_events

    create_task = getattr(type(loop), "create_task", None)
    return 2 if create_task is asyncio.base_events.BaseEventLoop.create_task else 1


# `is_library_file`'s own cache, read inline on the hot path.  Keyed by file
# name: a str caches its hash, while a code object hashes its bytecode and
# constants, which made every lookup cost as much as the rest of the factory.
_library_cache = _is_library_cache


# asyncio functions that create many tasks from one frame, on behalf of their
# caller, through asyncio's own code only (gather -> ensure_future ->
# loop.create_task).  While such a frame stays at the same instruction, every
# task it makes has the same creation site: found once, then reused.
_GATHER = asyncio.tasks.gather.__code__

def _make_factory(state: TaskFactory, depth: int, observer: TaskObserver | None) -> Callable[..., Any]:
    """The task factory function for *state*, telling *observer* about each task.

    Its common path (no chained factory, no observer, a gather child) runs
    about a dozen bytecodes besides creating the task: this runs for every
    task of the program, and each bytecode costs about as much as 1% of
    what asyncio itself spends on a trivial task.
    """
    getframe = sys._getframe
    library = _library_cache
    gather = _GATHER
    # The gather frame of the fan-out in progress, called straight from
    # application code, its depth below the factory, and the creation site
    # of every task it makes (its caller's code and offset).  The frame is
    # held, so that no other frame can take its address while we compare
    # identities, but only until the loop's next callback: gather makes all
    # its tasks within one callback, and a finished frame keeps its locals.
    fan_frame: FrameType | None = None
    fan_depth = 0
    fan_site: tuple[CodeType, int] | None = None

    def end_fan_out() -> None:
        nonlocal fan_frame, fan_depth
        fan_frame, fan_depth = None, 0

    previous = state.previous
    plain = previous is None and observer is None

    def creation_site(
        loop: asyncio.AbstractEventLoop, frame: FrameType | None, level: int
    ) -> tuple[CodeType, int] | None:
        """The innermost application frame from *frame* (at *level* below
        the factory) outwards, as (code, offset): never the frame (its locals)."""
        nonlocal fan_frame, fan_depth, fan_site
        gather_frame: FrameType | None = None
        gather_level = 0
        while frame is not None:
            code = frame.f_code
            filename = code.co_filename
            is_library = library.get(filename)
            if is_library is None:
                is_library = is_library_file(filename)  # fills and caps the cache
            if not is_library:
                break
            if code is gather and gather_frame is None:
                gather_frame, gather_level = frame, level
            frame = frame.f_back
            level += 1
        if frame is None:
            return None
        site = (frame.f_code, frame.f_lasti)
        if gather_frame is not None and level == gather_level + 1:  # gather called from application code
            if fan_frame is None:
                loop.call_soon(end_fan_out)
            fan_frame, fan_depth, fan_site = gather_frame, gather_level, site
        return site

    def asyncwatch_task_factory(loop: asyncio.AbstractEventLoop, coro: Any, **kwargs: Any) -> Any:
        if not state.enabled:
            if previous is None:
                return asyncio.Task(coro, loop=loop, **kwargs)
            return previous(loop, coro, **kwargs)
        if plain:
            # Without **{} when there are no keywords: merging an empty dict
            # into the call costs more than the rest of this function's checks.
            task: Any = Task(coro, loop=loop, **kwargs) if kwargs else Task(coro, loop=loop)
        else:
            if observer is not None and (previous is None or previous is _eager_task_factory):
                coro = TimedCoroutine(coro, observer)
            if previous is None:
                task = Task(coro, loop=loop, **kwargs)
            elif previous is _eager_task_factory:
                # Exactly what asyncio.eager_task_factory does, our Task in place
                # of asyncio's (so a loop passing eager_start itself, as uvloop
                # does on 3.13, fails here as it would without asyncwatch).
                task = Task(coro, loop=loop, eager_start=True, **kwargs)  # type: ignore[call-arg]  # 3.12+
            else:
                task = previous(loop, coro, **kwargs)
                if not hasattr(task, "_source_traceback"):
                    # asyncio.Runner takes any future-like object from a task
                    # factory (CPython's test_runners makes one): nothing to record.
                    return task
        try:
            if task._source_traceback:  # asyncio debug mode
                _trim_source_traceback(task._source_traceback)
            site: tuple[CodeType, int] | None = None
            if fan_depth:
                try:
                    if getframe(fan_depth) is fan_frame:
                        site = fan_site
                except ValueError:  # the stack is not that deep
                    pass
            if site is None:
                site = creation_site(loop, getframe(depth), depth)
            if plain:
                task._aw_site = site
                if kwargs and kwargs.get("eager_start"):
                    task._aw_coro = qualname_of(coro)  # get_coro() may be gone (gh-122332)
            elif type(task) is Task:
                task._aw_site = site
                if previous is _eager_task_factory or kwargs.get("eager_start"):
                    task._aw_coro = qualname_of(coro)
                if observer is not None and type(coro) is TimedCoroutine:
                    _observe(task, coro, observer, site)
            elif site is not None and isinstance(task, asyncio.Task):
                _remember_foreign(task, coro, site)
        except Exception as exc:
            state.enabled = False
            report_internal_error("task factory", exc)
        return task

    return asyncwatch_task_factory


def _observe(task: Task, coro: TimedCoroutine, observer: TaskObserver, site: tuple[CodeType, int] | None) -> None:
    coro._aw_task = weakref.ref(task)  # the task owns the wrapper: no cycle
    observer.task_created(task, code_site(*site) if site else None)
    if coro._aw_early is not None:
        observer.task_step(task, *coro._aw_early)
        coro._aw_early = None
    if task.done():  # eager, and finished in that first step
        observer.task_done(task)
    else:
        task.add_done_callback(functools.partial(_observed_done, coro))


def _remember_foreign(task: asyncio.Task[Any], coro: Any, site: tuple[CodeType, int]) -> None:
    if len(_foreign_sites) >= _FOREIGN_LIMIT:
        for key in list(_foreign_sites)[: _FOREIGN_LIMIT // 2]:
            del _foreign_sites[key]
    runs = coro_of(task)
    _foreign_sites[id(task)] = (id(runs) if runs is not None else 0, *site, qualname_of(coro))
    task.add_done_callback(_forget_foreign)


_BASE_EVENTS = os.path.join(_ASYNCIO_DIR, "base_events.py")


def _trim_source_traceback(tb: list[Any]) -> None:
    """In asyncio debug mode, drop our factory's frame and the loop's
    ``create_task`` from where the task says it was created, as asyncio's
    own ``create_task`` does, so "created at" still points at the caller."""
    while tb and (is_own_file(tb[-1].filename) or (tb[-1].filename == _BASE_EVENTS and tb[-1].name == "create_task")):
        del tb[-1]


class ExceptionHandler:
    """The loop's exception handler while asyncwatch watches it; chains *previous*.

    asyncio reports a pending task destroyed, and a task exception never
    retrieved, through the loop's exception handler from the task's
    finalizer.  This one turns those into findings, then always hands the
    context on unchanged, so the program's own handler (or asyncio's
    default logging) sees exactly what it saw before.
    """

    __slots__ = ("__weakref__", "enabled", "previous", "watch")

    def __init__(self, watch: LoopWatch, previous: Callable[..., Any] | None) -> None:
        self.watch = watch
        self.previous = previous
        self.enabled = True

    def __call__(self, loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        if self.enabled:
            try:
                self.watch.on_exception_context(context)
            except Exception as exc:
                self.enabled = False
                report_internal_error("exception handler", exc)
        previous = self.previous
        if previous is None:
            loop.default_exception_handler(context)
        else:
            previous(loop, context)


def destroyed_pending_finding(task: asyncio.Task[Any]) -> Finding:
    # A pending task is always in a reference cycle (it and the future it
    # waits on refer to each other), and the collector finalizes its
    # coroutine first, so where it was waiting is gone by now: the creation
    # site is what there is.
    name = task.get_name()
    coro = coro_name(task)
    where = created_at(task)
    return Finding(
        kind=FindingKind.TASK_DESTROYED_PENDING,
        message=(
            f"Task {name!r} (coroutine {coro!r}) was destroyed by the garbage collector "
            "while still pending; keep a reference to it (a set of background tasks, or a TaskGroup)"
        ),
        site=where,
        stack=(where,) if where else (),
        task=name,
        coroutine=coro,
        created_at=where,
    )


def unretrieved_finding(task: asyncio.Task[Any], exc: BaseException) -> Finding:
    name = task.get_name()
    coro = coro_name(task)
    where = created_at(task)
    tb_sites: list[Site] = []
    tb = exc.__traceback__
    while tb is not None:
        tb_sites.append(Site(*_tb_site(tb)))
        tb = tb.tb_next
    return Finding(
        kind=FindingKind.TASK_EXCEPTION_UNRETRIEVED,
        message=(
            f"Task {name!r} (coroutine {coro!r}) failed with {describe_exception(exc)} "
            "and nobody retrieved the exception; await the task, or check it in a done callback"
        ),
        site=where,
        stack=tuple(tb_sites),
        task=name,
        coroutine=coro,
        created_at=where,
    )


def _tb_site(tb: Any) -> tuple[str, int, str]:
    site = frame_site(tb.tb_frame)
    return site.file, tb.tb_lineno, site.function
