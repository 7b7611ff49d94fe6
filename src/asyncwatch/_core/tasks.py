"""Tasks: asyncwatch's Task subclass, its task factory, and creation sites.

Cost model (this runs for every task):

* The chained task factory records where a task was created as a code object
  and an instruction offset in two slots of the task itself; turning that into
  a file and line happens only when a finding is reported.
* `Task` is a C type where asyncwatch's optional extension was built
  (`_compiled`, ``_ctask.c``): the same class, about 1,500 instructions a
  task cheaper than in Python.
* `Task.cancel` is the only overridden method, so a task that is never
  cancelled pays nothing else.  It tells the ``task_cancel_requested`` hooks
  of its loop's detectors (the cancellation detector, spans).
* The factory specialises itself, when it is made, for what it chains and
  for the loop's task hooks (`Hooks`): with none (the default detectors need
  only creation sites), it runs its common path of about a dozen bytecodes.
* Nothing here holds a strong reference to a task or a coroutine.

One concept, hence one module over the usual length: the Task subclass, the
factory that makes it and the creation sites it records share the task's
slots and one cost model (the factory is specialised by hand, measured per
bytecode); split apart, each half would have to know the other's layout.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import dis
import functools
import gc
import os
import sys
import threading
import weakref
from collections.abc import Callable
from types import CodeType, FrameType
from typing import TYPE_CHECKING, Any

from . import loops
from .detector import Hooks, WatchedLoop, watches
from .findings import Site
from .frames import (
    LOOP_DISPATCH_IDS,
    _is_library_cache,
    app_frame_in_running_loop,
    code_site,
    is_library_file,
    is_own_file,
    qualname_of,
)
from .runtime import report_internal_error
from .settings import extension
from .stepping import TimedCoroutine

__all__ = [
    "CancelCall",
    "CountingTask",
    "Task",
    "TaskEnds",
    "TaskFactory",
    "TellingTask",
    "cancel_calls",
    "coro_name",
    "coro_of",
    "created_at",
    "describe_gather",
    "forget",
    "hold_gather_sites",
    "release_gather_sites",
    "task_context",
    "user_coro_of",
]

# 3.12+; before, a sentinel no factory is: None would equal "no factory
# chained", and every check for the eager factory would hold on 3.11 (it
# named every task's coroutine at creation, ~100 bytecodes a task, issue 14).
_eager_task_factory: Any = getattr(asyncio, "eager_task_factory", object())

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
    if isinstance(task, Task):  # ours, or our TellingTask
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
    if isinstance(task, Task):  # ours, or our TellingTask
        # Our factory names every task it starts eagerly, so this one was
        # not, and get_coro() is safe even on 3.12.0-3.12.4.
        return qualname_of(task.get_coro())
    entry = _foreign_entry(task)
    if entry is not None:
        return entry.coroutine  # the coroutine the program gave, not a library's wrapper of it
    return qualname_of(coro_of(task))


class CancelCall:
    """One ``cancel()`` of one of our tasks in progress on this thread.

    ``outer.cancel()`` cancels the future the task waits on; when that is
    another task, its ``cancel()`` runs inside ours.  Detectors leave a note
    on the call (keyed by themselves) for the calls it causes to read.
    """

    __slots__ = ("notes", "task")

    def __init__(self, task: asyncio.Task[Any]) -> None:
        self.task = task
        self.notes: dict[object, Any] = {}


class _Cancelling(threading.local):
    def __init__(self) -> None:
        self.calls: list[CancelCall] = []


_cancelling = _Cancelling()


def cancel_calls() -> list[CancelCall]:
    """This thread's ``cancel()`` calls in progress, innermost (the current one) last."""
    return _cancelling.calls


_asyncio_task = asyncio.Task


class Task(asyncio.Task):  # type: ignore[type-arg]
    """asyncio's Task, with three slots and a recorded ``cancel()``.

    Created by asyncwatch's task factory when no other factory is chained.  It
    is an `asyncio.Task` in every other respect (same C implementation, same
    ``repr``), so code that checks ``isinstance(t, asyncio.Task)`` is unaffected.
    """

    # _aw_site: (code, offset) of the creating line; _aw_cancel: the
    # cancellation detector's record of cancel() calls;
    # _aw_coro: the coroutine's name where get_coro() may be unsafe later.
    __slots__ = ("_aw_cancel", "_aw_coro", "_aw_site")
    _aw_site: tuple[CodeType, int] | None
    _aw_cancel: Any
    _aw_coro: str | None

    if (3, 13, 0) <= sys.version_info[:3] < (3, 13, 3):

        def set_name(self, value: object) -> None:
            # gh-130033: with a task factory set, create_task() calls
            # set_name(None) and the task is renamed "None"; plain asyncio
            # keeps "Task-N".  Installing asyncwatch must not rename tasks.
            if value is not None:
                _asyncio_task.set_name(self, value)

    def get_coro(self) -> Any:
        # A traced task runs asyncwatch's timing wrapper around the program's
        # coroutine; the program gets its own coroutine back, as without
        # asyncwatch (identity, types.CoroutineType, inspect.iscoroutine).
        coro = _asyncio_task.get_coro(self)
        return coro._aw_inner if type(coro) is TimedCoroutine else coro

    def cancel(self, msg: Any = None) -> bool:
        calls = _cancelling.calls
        calls.append(CancelCall(self))
        try:
            if not self.done():
                watch = watches.get(self.get_loop())
                if watch is not None:
                    hooks = watch.hooks
                    caller = sys._getframe(1)
                    for hook in hooks.task_cancel_requested:
                        try:
                            hook(self, caller, msg)
                        except Exception as exc:
                            hooks.failed(hook, exc)
                    del caller
            return _asyncio_task.cancel(self, msg)
        finally:
            calls.pop()


# C methods of asyncio's Task that the compiled Task declares as its own, so
# that CPython specializes their calls on it: gather's done callback calls
# cancelled(), exception() and result() of each child (five calls a task),
# and add_done_callback() and get_loop() as it starts.  Those asyncio writes
# as METH_METHOD (3.12+: result(), exception()) stay inherited.
_REDECLARED = (
    "add_done_callback",
    "cancelled",
    "cancelling",
    "done",
    "exception",
    "get_loop",
    "remove_done_callback",
    "result",
    "uncancel",
)


def _compiled(cls: type[Task]) -> type[Task]:
    """*cls* as a C type (`_ctask.subclass`), when asyncwatch's extension was
    built and asyncio's Task is its C one: the same slots, the same Python
    methods, about 1,500 instructions a task cheaper (benchmarks/README.md).
    Otherwise *cls* itself; ``ASYNCWATCH_NO_EXTENSIONS=1`` asks for that."""
    _ctask = extension()
    if _ctask is None:
        return cls
    import _asyncio

    if asyncio.Task is not _asyncio.Task:  # the pure-Python Task: nothing to specialize
        return cls
    own = {name: value for name, value in vars(cls).items() if callable(value) and not name.startswith("__")}
    try:
        made: type[Task] = _ctask.subclass(
            asyncio.Task,
            f"{cls.__module__}.{cls.__qualname__}",
            cls.__slots__,
            tuple(n for n in _REDECLARED if n not in own),
        )
        for name, value in own.items():
            setattr(made, name, value)
    except Exception as exc:  # an asyncio this extension does not know: the Python class
        report_internal_error("compiled Task", exc)
        return cls
    made.__doc__ = cls.__doc__
    return made


#: The Python class, which the C type mirrors (and the one used without it).
PythonTask = Task
if not TYPE_CHECKING:  # one class to type-check: the Python one
    Task = _compiled(Task)


_future_result = asyncio.Task.result
_future_exception = asyncio.Task.exception


class TellingTask(Task):
    """Our Task, which tells the ``task_failed`` hooks when the outcome of a
    task that raised is asked for (``result()``, ``exception()``).

    asyncio's C Task has no hook at its end but done callbacks, which show in
    ``repr(task)`` and cost every task a callback.  But a task awaiting a
    task of a subclass asks it for ``result()`` (``task_wakeup`` in CPython's
    Modules/_asynciomodule.c takes its generic path for any type but exactly
    ``asyncio.Task``), and so do ``gather``, ``TaskGroup`` and ``wait_for``;
    a failure nobody asks about is "Task exception was never retrieved".
    Made by the factory only while a detector overrides ``task_failed``: the
    other tasks are spared a Python call per ``result()``/``exception()``.

    _aw_born and _aw_note are kept for such a detector (OpenTelemetry's
    notable spans: when the task was made, what it noted then).
    """

    __slots__ = ("_aw_born", "_aw_note")
    _aw_born: float
    _aw_note: Any

    def result(self) -> Any:
        if self._exception is not None:
            _tell_failed(self)
        try:
            return _future_result(self)
        except BaseException as exc:
            _drop_frame(exc, _RESULT_CODE)
            raise  # a bare raise adds no traceback entry for this frame

    def exception(self) -> BaseException | None:
        if self._exception is not None:
            _tell_failed(self)
        try:
            return _future_exception(self)
        except BaseException as exc:  # CancelledError, InvalidStateError
            _drop_frame(exc, _EXCEPTION_CODE)
            raise


# repr(task) says the class's name: "<Task pending ...>", as without asyncwatch.
TellingTask.__name__ = TellingTask.__qualname__ = "Task"


class TaskEnds:
    """How many tasks were counted here, and how those that ended ended,
    without a wrapper, a done callback or anything else per step.

    A detector gives each task it counts this object (`count`): the task
    must be a `CountingTask`, whose finalizer counts its final state here.
    A task that ended but is still referenced is found by `counts` in
    asyncio's own registry of tasks, so that the counts are exact whenever
    they are read, not only once tasks are freed.

    The counts are plain ints: ``+=`` on an attribute is not interrupted by
    a thread switch under the GIL (nothing between the read and the write
    checks for one), nor by a finalizer (nothing there frees an object that
    has one, or starts a collection).
    """

    __slots__ = ("cancelled", "created", "destroyed", "exception", "finished")

    def __init__(self) -> None:
        self.created = 0
        # Freed tasks, by final state (``destroyed``: freed while pending).
        self.finished = 0
        self.cancelled = 0
        self.exception = 0
        self.destroyed = 0

    def count(self, task: asyncio.Task[Any]) -> bool:
        """Count *task* (a `CountingTask`, just created); False for any
        other task, which is not counted (it could not count its end)."""
        if type(task) is not CountingTask:
            return False
        if task.done():
            # Eager (3.12+), and ended inside create_task: asyncio never
            # registers it, so `counts` would not find it; its end is final.
            self.created += 1
            self._ended(task._state, task._exception)
            return True
        task._aw_ends = self
        self.created += 1
        return True

    def _ended(self, state: str, exception: BaseException | None) -> None:
        if state == "FINISHED":
            if exception is None:
                self.finished += 1
            else:
                self.exception += 1
        elif state == "CANCELLED":
            self.cancelled += 1
        else:
            self.destroyed += 1

    def counts(self) -> tuple[int, int, int, int, int]:
        """The counts now, as (created, finished, cancelled, exception,
        destroyed): tasks freed, by final state, plus the tasks that ended
        and are still referenced (asyncio's registry holds them), by
        theirs.  Safe from any thread; exact while no task of these counts
        is created, ends or is freed meanwhile (each count then lags by at
        most the tasks doing so, and never counts a task twice)."""
        # Freed tasks first: one freed during the walk below is then either
        # not counted yet here, or no longer found there (its finalizer
        # takes it off `_aw_ends` before counting it), never both.
        freed = (self.finished, self.cancelled, self.exception, self.destroyed)
        ended = [0, 0, 0]
        for ref in _registered():
            task = ref()
            if type(task) is CountingTask and getattr(task, "_aw_ends", None) is self:
                state = task._state
                if state == "FINISHED":
                    ended[0 if task._exception is None else 2] += 1
                elif state == "CANCELLED":
                    ended[1] += 1
            del task
        # Read last: every task counted as ended above was created before.
        created = self.created
        return created, freed[0] + ended[0], freed[1] + ended[1], freed[2] + ended[2], freed[3]


def _registered() -> list[Any]:
    """Weak references to the tasks asyncio has registered (3.11:
    ``_all_tasks``; 3.12, 3.13: ``_scheduled_tasks``, which has every task
    but those running an eager first step, all pending).  Copied at once
    under the GIL (a C-level copy of the set runs no Python code), so
    another thread may add tasks meanwhile; a reference at a time is
    followed, so no user's task is kept by the copy.  Where asyncio keeps
    its tasks elsewhere (3.14 puts its C tasks in per-thread lists), ours
    are not found: ended tasks still referenced then count as alive until
    they are freed."""
    registry = getattr(asyncio.tasks, "_all_tasks", None)
    if registry is None:
        registry = getattr(asyncio.tasks, "_scheduled_tasks", None)
    data = getattr(registry, "data", None) if isinstance(registry, weakref.WeakSet) else None
    return list(data) if isinstance(data, set) else []


_task_finalize = asyncio.Task.__del__


class CountingTask(TellingTask):
    """A `TellingTask` that counts its own end, by final state, in the
    `TaskEnds` it was given, when it is freed: the one moment every task
    has, with no wrapper around its steps and no done callback (which
    would show in ``repr(task)`` and cost every task a call through the
    loop).  Made by the factory only while a detector counts tasks
    (`Detector.counts_task_ends`)."""

    __slots__ = ("_aw_ends",)
    _aw_ends: TaskEnds

    # *finalize* as a default: read as a local (cheaper than a global, on
    # every task), and still there at interpreter shutdown, when module
    # globals may already be gone.
    def __del__(self, finalize: Any = _task_finalize) -> None:
        try:
            try:
                ends = self._aw_ends
            except AttributeError:  # not counted (asyncio's own tasks)
                return
            # Taken off first: `TaskEnds.counts`, walking asyncio's registry
            # on another thread, must not count this task as well.
            del self._aw_ends
            # `TaskEnds._ended`, inline: this runs for every task counted.
            state = self._state
            if state == "FINISHED":
                if self._exception is None:
                    ends.finished += 1
                else:
                    ends.exception += 1
            elif state == "CANCELLED":
                ends.cancelled += 1
            else:
                ends.destroyed += 1
        finally:
            # asyncio's own finalizer: "Task was destroyed but it is
            # pending!", "Task exception was never retrieved".
            finalize(self)


CountingTask.__name__ = CountingTask.__qualname__ = "Task"
_RESULT_CODE = TellingTask.result.__code__
_EXCEPTION_CODE = TellingTask.exception.__code__


def _drop_frame(exc: BaseException, code: Any) -> None:
    """Take this module's frame off the head of *exc*'s traceback: the
    program sees the traceback it would see without asyncwatch."""
    tb = exc.__traceback__
    if tb is not None and tb.tb_frame.f_code is code:
        exc.__traceback__ = tb.tb_next


def _tell_failed(task: TellingTask) -> None:
    watch = watches.get(task.get_loop())
    if watch is not None:
        hooks = watch.hooks
        for hook in hooks.task_failed:
            try:
                hook(task)
            except Exception as exc:
                hooks.failed(hook, exc)


# --- where a task was created ------------------------------------------------

# Tasks made by another library's task factory are not our subclass and have
# no slots: their creation sites live here, keyed by id(task) and checked
# against id() of the coroutine the task runs (which may be the library's
# wrapper of the program's coroutine, as Sentry's is), with the name of the
# program's coroutine (a done task may no longer say it).  Entries leave on
# completion; the table is capped for tasks that vanish without a word
# (gather hides their destruction).
_FOREIGN_LIMIT = 100_000


class _ForeignSite:
    """Where a task of another library's factory was created."""

    __slots__ = ("code", "coro_id", "coroutine", "offset")

    def __init__(self, coro_id: int, code: CodeType, offset: int, coroutine: str | None) -> None:
        self.coro_id = coro_id  # id() of what the task runs, 0 if unknown; checked against reuse of the task's id
        self.code = code
        self.offset = offset
        self.coroutine = coroutine  # the name of the program's coroutine


_foreign_sites: dict[int, _ForeignSite] = {}


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
    return code_site(entry.code, entry.offset) if entry is not None else None


def _foreign_entry(task: asyncio.Future[Any]) -> _ForeignSite | None:
    entry = _foreign_sites.get(id(task))
    if entry is not None:
        coro = coro_of(task)
        # No coroutine to check (finished: asyncio let it go) or none known
        # at creation (finished eagerly on 3.12.0-3.12.4): trust the id of the task.
        if coro is None or not entry.coro_id or entry.coro_id == id(coro):
            return entry
    return None


class TaskFactory:
    """The loop's task factory while asyncwatch watches it; chains *previous*.

    `function` is what is installed on the loop: a plain function (cheaper
    to call than an object with ``__call__``), closing over this state.
    """

    __slots__ = ("__weakref__", "enabled", "function", "previous", "runner")

    def __init__(
        self,
        previous: Callable[..., Any] | None,
        loop: asyncio.AbstractEventLoop,
        hooks: Hooks | None = None,
    ) -> None:
        self.previous = previous
        self.enabled = True
        # The code of the Python frame that started the loop running (see
        # `note_runner`): on a loop whose dispatch is compiled (uvloop), the
        # caller every callback appears to have.
        self.runner: CodeType | None = None
        # What it chains and whether it tells task hooks are fixed here: the
        # function is specialised for them (see _make_factory).  *hooks* is
        # given only when the loop's detectors observe tasks.
        self.function = _make_factory(self, _first_caller_depth(loop), hooks)


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


def _make_factory(state: TaskFactory, depth: int, hooks: Hooks | None) -> Callable[..., Any]:  # noqa: C901 - see below
    """The task factory function for *state*, telling the task *hooks* about each task.

    Its common path (no chained factory, no task hooks, a gather child) runs
    about a dozen bytecodes besides creating the task: this runs for every
    task of the program, and each bytecode costs about as much as 1% of
    what asyncio itself spends on a trivial task.
    """
    getframe = sys._getframe
    library = _library_cache
    gather = _GATHER
    running_loop = asyncio.events._get_running_loop
    dispatch = LOOP_DISPATCH_IDS
    # The gather frame of the fan-out in progress, called straight from
    # application code, its depth below the factory, and the creation site
    # of every task it makes (its caller's code and offset).  The frame is
    # held, so that no other frame can take its address while we compare
    # identities, but only until the loop's next callback: gather makes all
    # its tasks within one callback, and a finished frame keeps its locals.
    fan_frame: FrameType | None = None
    fan_depth = 0
    fan_site: tuple[CodeType, int] | None = None
    # Every gather frame that made tasks since the loop's last callback, with
    # its first task and creation site: once gather has returned, its future
    # goes to the `gather_made` hooks (gather silences "Task was destroyed
    # but it is pending!" for its tasks).  Once per gather call, never per task.
    gathered: list[tuple[FrameType, Any, tuple[CodeType, int] | None]] = []
    # The C factory running the plain factory's common path (`_fan_out`),
    # told of each fan-out as it begins and ends.
    fast: Any = None

    def end_fan_out(loop: asyncio.AbstractEventLoop) -> None:
        nonlocal fan_frame, fan_depth
        fan_frame, fan_depth = None, 0
        if fast is not None:
            fast.fan(None, 0, None)
        made = gathered.copy()
        gathered.clear()
        try:
            _tell_gathered(loop, made)
        except Exception as exc:
            state.enabled = False
            report_internal_error("task factory", exc)

    previous = state.previous
    # Tasks that tell their failure, only while a detector wants to be told;
    # that count their end, only while a detector counts tasks.
    task_class: type[Task] = Task
    if hooks is not None and hooks.counts_task_ends:
        task_class = CountingTask
    elif hooks is not None and hooks.task_failed:
        task_class = TellingTask

    def creation_site(
        loop: asyncio.AbstractEventLoop, frame: FrameType | None, level: int, task: Any
    ) -> tuple[CodeType, int] | None:
        """The innermost application frame from *frame* (at *level* below
        the factory) outwards, as (code, offset): never the frame (its locals)."""
        nonlocal fan_frame, fan_depth, fan_site
        gather_frame: FrameType | None = None
        gather_level = 0
        runner = state.runner
        while frame is not None:
            code = frame.f_code
            if (id(code) in dispatch or code is runner) and running_loop() is loop:
                # The loop's own dispatch, running: library code the loop
                # called back made this task (asyncio's finalizer of an
                # async generator, a protocol's callback).  Its caller's
                # line (``asyncio.run(main())``) did not; no line is known.
                # (Not running: asyncio.run's Runner making the main task.)
                # A uvloop loop run by hand dispatches from C: the frame
                # that runs it (the program's ``loop.run_until_complete``
                # line, a library's ``run_app``) is its dispatch.
                return None
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
        if gather_frame is not None:
            if not gathered:
                loops.call_soon(loop, end_fan_out, loop)
            if not gathered or gathered[-1][0] is not gather_frame:  # a gather makes its tasks in a row
                gathered.append((gather_frame, task, site))
            if level == gather_level + 1:  # gather called from application code
                fan_frame, fan_depth, fan_site = gather_frame, gather_level, site
                if fast is not None:
                    fast.fan(gather_frame, gather_level, site)
        return site

    # One function with every path inline: each call or branch moved out costs
    # every task of the program (benchmarks/instructions.py counts it).
    def asyncwatch_task_factory(loop: asyncio.AbstractEventLoop, coro: Any, **kwargs: Any) -> Any:  # noqa: C901 - the measured hot path
        if not state.enabled:
            if previous is None:
                return asyncio.Task(coro, loop=loop, **kwargs)
            return previous(loop, coro, **kwargs)
        if hooks is not None and (previous is None or previous is _eager_task_factory):
            for wrap in hooks.wrap_coroutine:
                try:
                    coro = wrap(coro)
                except Exception as exc:
                    hooks.failed(wrap, exc)
        task: Any
        if previous is None:
            task = task_class(coro, loop=loop, **kwargs)
        elif previous is _eager_task_factory:
            # Exactly what asyncio.eager_task_factory does, our Task in place
            # of asyncio's (so a loop passing eager_start itself, as uvloop
            # does on 3.13, fails here as it would without asyncwatch).
            task = task_class(coro, loop=loop, eager_start=True, **kwargs)  # type: ignore[call-arg]  # 3.12+
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
                site = creation_site(loop, getframe(depth), depth, task)
            if type(task) is task_class:
                task._aw_site = site
                if previous is _eager_task_factory or kwargs.get("eager_start"):
                    task._aw_coro = qualname_of(coro)
                if hooks is not None:
                    _tell_created(task, coro, site, hooks)
            elif site is not None and isinstance(task, asyncio.Task):
                _remember_foreign(task, coro, site)
        except Exception as exc:
            state.enabled = False
            report_internal_error("task factory", exc)
        return task

    if previous is not None or hooks is not None:
        return asyncwatch_task_factory

    def asyncwatch_plain_task_factory(
        loop: asyncio.AbstractEventLoop, coro: Any, *, context: Any = None, eager_start: Any = None, **kwargs: Any
    ) -> Any:
        """`asyncwatch_task_factory` when it chains no factory and tells no
        task hooks (the default): asyncio's Task, our slots, nothing else.

        Every bytecode on its common path (no keywords, on the running loop,
        a child of a ``gather``) costs each task of the program: about 20
        instructions of a trivial task's 70,000 (benchmarks/instructions.py).
        """
        task: Any
        # uvloop passes context=None to every factory call, and on 3.13
        # eager_start=None too (asyncio passes neither): named parameters
        # take them without filling the keyword dict.
        if kwargs or context is not None or eager_start is not None or not state.enabled:
            if eager_start is not None:
                kwargs["eager_start"] = eager_start
            if not state.enabled:
                return asyncio.Task(coro, loop=loop, context=context, **kwargs)
            task = Task(coro, loop=loop, context=context, **kwargs)
        elif loop is running_loop():
            # Task(coro, loop=loop) would build a dict for the keyword and
            # parse it against Task's keyword parameters (about 400
            # instructions on 3.11); without it the C Task takes the running
            # loop, this same one.
            task = Task(coro)
        else:
            task = Task(coro, loop=loop)
        try:
            try:
                if fan_depth and getframe(fan_depth) is fan_frame:
                    task._aw_site = fan_site
                else:
                    task._aw_site = creation_site(loop, getframe(depth), depth, task)
            except ValueError:  # the stack is not as deep as the fan-out's frame
                task._aw_site = creation_site(loop, getframe(depth), depth, task)
            if eager_start:
                task._aw_coro = qualname_of(coro)  # get_coro() may be gone (gh-122332)
            if task._source_traceback:  # asyncio debug mode
                _trim_source_traceback(task._source_traceback)
        except Exception as exc:
            state.enabled = False
            report_internal_error("task factory", exc)
        return task

    fast = _fan_out(asyncwatch_plain_task_factory, state)
    return fast or asyncwatch_plain_task_factory


def _fan_out(slow: Callable[..., Any], state: TaskFactory) -> Any:
    """The plain factory *slow* with its common path (a child of the gather
    in progress) in C (`_ctask.FanOut`), where the extension was built and
    asyncwatch's Task is compiled: the Python function's call and bytecodes
    cost each task about 1,500 instructions more.  None otherwise."""
    if Task is PythonTask:
        return None
    from . import _ctask

    return _ctask.FanOut(
        slow, Task, state, sys._getframe, asyncio.events._get_running_loop, _trim_task_source_traceback
    )


def _trim_task_source_traceback(task: asyncio.Task[Any]) -> None:
    _trim_source_traceback(task._source_traceback)  # type: ignore[attr-defined]


def _tell_gathered(
    loop: asyncio.AbstractEventLoop, made: list[tuple[FrameType, Any, tuple[CodeType, int] | None]]
) -> None:
    """Tell the `gather_made` hooks about the futures of the gathers in *made*,
    which have returned, when they are neither done nor awaited yet.

    ``await gather(...)`` has put the awaiting task's wake-up on the future
    before this runs (the loop's next callback): the common case costs only
    finding the future, and is not watched (a task awaiting it that is lost
    is reported itself)."""
    watch: WatchedLoop | None = None
    told: set[int] = set()
    for frame, task, site in made:
        if site is not None and _awaited_at_once(*site):
            continue
        outer = _gathering_future_of(task)
        if outer is None and task.done():
            # Its first task ended before this callback (it failed in its
            # first step), and gather's callback on it went with it: the
            # gather's finished frame still has its future (a dict of its
            # locals, built only here).
            outer = frame.f_locals.get("outer")
        if not isinstance(outer, asyncio.Future):
            continue
        for lost in _unawaited(outer):
            if id(lost) in told:
                continue  # the gather of several gathers made here
            told.add(id(lost))
            where = _lost_gather_site(lost, outer, site)
            if lost.done():
                continue
            if watch is None:
                watch = watches.get(loop)
                if watch is None or not watch.hooks.gather_made:
                    return
            _tell_gather_made(watch, lost, where)


def _tell_gather_made(watch: WatchedLoop, gathering: asyncio.Future[Any], where: Site | None) -> None:
    hooks = watch.hooks
    for hook in hooks.gather_made:
        try:
            hook(watch, gathering, where)
        except Exception as exc:
            hooks.failed(hook, exc)


def _lost_gather_site(
    lost: asyncio.Future[Any], outer: asyncio.Future[Any], site: tuple[CodeType, int] | None
) -> Site | None:
    """Where gather's future *lost* was made: *site*, where its tasks were
    made, for *outer* itself; for a gather of it (of gathers...), which made
    no task of its own, the line `_GatherSites` left on it."""
    if lost is not outer:
        site = getattr(lost, "_aw_site", None)
    elif site is not None:
        # Where it was made, should it fail with nobody asking: asyncio then
        # says "_GatheringFuture exception was never retrieved", with no line
        # (`created_at` reads it; a gather's future is a Python object with
        # a __dict__).
        with contextlib.suppress(AttributeError):
            outer._aw_site = site  # type: ignore[attr-defined]
    return code_site(*site) if site is not None else None


_CACHE = dis.opmap["CACHE"]
_GET_AWAITABLE = dis.opmap["GET_AWAITABLE"]


def _awaited_at_once(code: CodeType, offset: int) -> bool:
    """Whether the call at *offset* in *code* is ``await gather(...)``: the
    instruction after it (past its inline caches) is GET_AWAITABLE.  The
    common case, told from the bytecode in a few steps."""
    raw = code.co_code
    for at in range(offset + 2, len(raw), 2):
        op = raw[at]
        if op != _CACHE:
            return op == _GET_AWAITABLE
    return False


# gather() puts a closure over its future on each task it makes: reading the
# future from it is cheaper than reading gather's finished frame's f_locals,
# which builds a dict of them all (callgrind, a loop of awaited gathers of
# two tasks: f_locals and the loop's watch for every gather cost +6.6% per
# task; the bytecode check, this closure and the watch only for a gather not
# yet awaited, +2.7%; a gather of 10,000 tasks, +0.1%).
_GATHER_CALLBACK = next((c for c in _GATHER.co_consts if isinstance(c, CodeType) and "outer" in c.co_freevars), None)
_OUTER_CELL = _GATHER_CALLBACK.co_freevars.index("outer") if _GATHER_CALLBACK is not None else -1


def _gathering_future_of(task: Any) -> asyncio.Future[Any] | None:
    """The future of the gather that made *task*, from gather's done callback on it."""
    for callback, _context in getattr(task, "_callbacks", None) or ():
        outer = _gather_of_callback(callback)
        if outer is not None:
            return outer
    return None


def _gather_of_callback(callback: Any) -> asyncio.Future[Any] | None:
    """The future of the gather whose done callback *callback* is, or None."""
    if getattr(callback, "__code__", None) is _GATHER_CALLBACK:
        outer = callback.__closure__[_OUTER_CELL].cell_contents
        return outer if isinstance(outer, asyncio.Future) else None
    return None


def _unawaited(outer: asyncio.Future[Any]) -> list[asyncio.Future[Any]]:
    """The futures whose loss would lose gather's future *outer*: *outer*
    itself when nothing waits on it; when only gathers do (a gather of
    gathers), theirs, outwards; none when anything else does (a task
    awaiting it, ``shield``, a done callback of the program's)."""
    found: list[asyncio.Future[Any]] = []
    todo = [outer]
    while todo:
        future = todo.pop()
        callbacks = future._callbacks
        if not callbacks:
            found.append(future)
            continue
        parents = [_gather_of_callback(callback) for callback, _context in callbacks]
        if None not in parents:
            todo.extend(parents)  # type: ignore[arg-type]
    return found


def describe_gather(gathering: asyncio.Future[Any]) -> tuple[str | None, str]:
    """The name of the coroutine that the first task of gather's future
    *gathering* runs (through gathers it gathered), and a message's words
    for the gather: ``"A gather() of 3 awaitables (the first runs 'fetch')"``."""
    children = getattr(gathering, "_children", None) or ()
    count = len(children)
    words = f"A gather() of {count} awaitable{'' if count == 1 else 's'}"
    nested = False
    for _ in range(100):  # gathers nest as deep as the program wrote them
        if not children:
            break
        first = children[0]
        if isinstance(first, asyncio.Task):
            name = coro_name(first)
            if name is None:
                break
            which = "the first task of the gathers it gathered" if nested else "the first"
            return name, f"{words} ({which} runs {name!r})"
        children = getattr(first, "_children", None) or ()
        nested = True
    return None, words


# --- where a gather was called -------------------------------------------------


class _GatherSites:
    """``_GatheringFuture.__init__`` wrapped to leave on each gather's future
    the application line that called ``gather`` (``_aw_site``, as the task
    factory leaves on a task), while any detector holds it.

    The task factory sees a gather only through the tasks it makes; a gather
    of futures alone (a gather of gathers) makes none, and this is the one
    moment its line can be had.  Once per gather call, never per task: a walk
    out to the first application frame, usually gather's caller.

    Applied while held (`hold_gather_sites`); restored when the last holder
    lets go, unless someone wrapped it since (then ours stays in their chain,
    inert), as `asyncwatch._patches.Patch` does.
    """

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.holders = 0
        self.active = False  # held, and no error of ours since
        self.original: Any = None
        self.installed: Any = None

    def hold(self) -> None:
        with self.lock:
            self.holders += 1
            self.active = True
            if self.installed is None and _GATHER_INIT_KNOWN:
                self.original = original = _GatheringFuture.__dict__["__init__"]
                self.installed = self._wrap(original)
                _GatheringFuture.__init__ = self.installed

    def release(self) -> None:
        with self.lock:
            self.holders = max(0, self.holders - 1)
            self.active = self.active and self.holders > 0
            if self.holders or self.installed is None:
                return
            if _GatheringFuture.__dict__.get("__init__") is self.installed:
                _GatheringFuture.__init__ = self.original
            self.installed = self.original = None

    def _wrap(self, original: Callable[..., None]) -> Callable[..., None]:
        sites = self
        getframe = sys._getframe
        library = _library_cache
        gather = _GATHER
        gathering = _GatheringFuture

        # gather's own signature (3.11-3.14), not (*args, **kwargs), and the
        # walk only past library frames: timeit, +750 ns a gather with both,
        # +200 ns without (asyncio's own __init__: 550 ns).
        def __init__(self: Any, children: Any, *, loop: Any) -> None:
            try:
                original(self, children, loop=loop)
            except BaseException as exc:
                _drop_frame(exc, code)
                raise
            if sites.active:
                try:
                    frame: FrameType | None = getframe(1)
                    if frame is not None and frame.f_code is gather:
                        frame = frame.f_back
                    if frame is not None and library.get(frame.f_code.co_filename) is not False:
                        frame = app_frame_in_running_loop(frame)  # called through a library
                    if frame is not None:
                        self._aw_site = site = (frame.f_code, frame.f_lasti)
                        del frame
                        if not _awaited_at_once(*site):
                            for child in children:
                                if type(child) is gathering:
                                    # Gathers made in an earlier step, gathered
                                    # here: whose loss is it, once this step ends?
                                    if not loops.is_closed(loop):
                                        loops.call_soon(loop, _tell_gathers_gathered, loop, weakref.ref(self))
                                    break
                except Exception as exc:
                    sites.active = False  # inert until asyncwatch starts again
                    report_internal_error("gather sites", exc)

        code = __init__.__code__
        functools.update_wrapper(__init__, original)
        return __init__


def _tell_gathers_gathered(loop: asyncio.AbstractEventLoop, ref: weakref.ref[asyncio.Future[Any]]) -> None:
    """Tell the `gather_made` hooks about a gather of gathers not awaited at
    once (the loop's next callback after it was made), when nothing but
    gathers waits on it: the gathers it holds are its loss now."""
    outer = ref()
    if outer is None or outer.done():
        return
    watch = watches.get(loop)
    if watch is None or not watch.hooks.gather_made:
        return
    for lost in _unawaited(outer):
        if not lost.done():
            site = getattr(lost, "_aw_site", None)
            _tell_gather_made(watch, lost, code_site(*site) if site is not None else None)


_GatheringFuture: Any = getattr(asyncio.tasks, "_GatheringFuture", None)
# Wrapped only where its signature is the one the wrapper takes (3.11-3.14):
# elsewhere a gather of gathers has no known line, rather than a broken gather.
_gather_init_code: Any = getattr(getattr(_GatheringFuture, "__init__", None), "__code__", None)
_GATHER_INIT_KNOWN = (
    _gather_init_code is not None
    and _gather_init_code.co_varnames[:3] == ("self", "children", "loop")
    and (_gather_init_code.co_argcount, _gather_init_code.co_kwonlyargcount) == (2, 1)
)
_gather_sites = _GatherSites()


def hold_gather_sites() -> None:
    """Record where each gather is called from now on (until `release_gather_sites`)."""
    _gather_sites.hold()


def release_gather_sites() -> None:
    """Undo one `hold_gather_sites`; the last one restores asyncio's gather."""
    _gather_sites.release()


def _tell_created(task: Task, coro: Any, site: tuple[CodeType, int] | None, hooks: Hooks) -> None:
    """Tell the task hooks about a new task (the factory's slower path)."""
    created = hooks.task_created
    if created:
        where = code_site(*site) if site and hooks.creation_sites else None
        for hook in created:
            try:
                hook(task, coro, where)
            except Exception as exc:
                hooks.failed(hook, exc)
    if type(coro) is TimedCoroutine:
        coro.attach(task)
    if hooks.task_done:
        if task.done():  # eager, and finished in that first step
            _tell_done(hooks, coro, task)
        else:
            # Handed the coroutine: asking a done task for it is unsafe on
            # 3.12.0-3.12.4 (gh-122332).
            task.add_done_callback(functools.partial(_tell_done, hooks, coro))


def _tell_done(hooks: Hooks, coro: Any, task: asyncio.Task[Any]) -> None:
    for hook in hooks.task_done:
        try:
            hook(task, coro)
        except Exception as exc:
            hooks.failed(hook, exc)


def _remember_foreign(task: asyncio.Task[Any], coro: Any, site: tuple[CodeType, int]) -> None:
    if len(_foreign_sites) >= _FOREIGN_LIMIT:
        for key in list(_foreign_sites)[: _FOREIGN_LIMIT // 2]:
            del _foreign_sites[key]
    runs = coro_of(task)
    _foreign_sites[id(task)] = _ForeignSite(id(runs) if runs is not None else 0, *site, qualname_of(coro))
    task.add_done_callback(_forget_foreign)


_BASE_EVENTS = os.path.join(os.path.dirname(asyncio.__file__), "base_events.py")


def _trim_source_traceback(tb: list[Any]) -> None:
    """In asyncio debug mode, drop our factory's frame and the loop's
    ``create_task`` from where the task says it was created, as asyncio's
    own ``create_task`` does, so "created at" still points at the caller."""
    while tb and (is_own_file(tb[-1].filename) or (tb[-1].filename == _BASE_EVENTS and tb[-1].name == "create_task")):
        del tb[-1]


def task_context(task: asyncio.Task[Any]) -> contextvars.Context | None:
    """The `contextvars.Context` *task* runs its steps in.

    ``Task.get_context()`` exists from 3.12.  On 3.11 the C task keeps its
    context in a slot Python cannot name, but the garbage collector can: it
    is the task's only referent of type Context.
    """
    get_context = getattr(task, "get_context", None)
    if get_context is not None:  # 3.12+
        return get_context()  # type: ignore[no-any-return]
    context = getattr(task, "_context", None)  # the pure-Python Task
    if isinstance(context, contextvars.Context):
        return context
    # 3.11's C Task has no accessor, but it visits its own context first
    # when the garbage collector asks what it refers to.
    return next((r for r in gc.get_referents(task) if type(r) is contextvars.Context), None)
