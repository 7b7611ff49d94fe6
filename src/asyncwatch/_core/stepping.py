"""Timing each step of a task: the wrapper a detector's ``wrap_coroutine`` returns.

asyncio's C Task has no hook between steps; wrapping the coroutine is the
way to see each one.  Spans use it; so may any detector that needs steps.
"""

from __future__ import annotations

import asyncio
import collections.abc
import time
import weakref
from collections.abc import Callable
from typing import Any, Protocol, runtime_checkable

from .runtime import report_internal_error

__all__ = ["STEP_WRAPPER_CODES", "StepObserver", "TimedCoroutine"]


@runtime_checkable
class StepObserver(Protocol):
    """Told how long each step of a task took, by its `TimedCoroutine`.

    It may also have ``task_ended(task, exc)``: told after the task's last
    step, from inside it, that its coroutine returned (*exc* None) or raised
    *exc*; asyncio marks the task done right after.  Told from the step, so
    that no done callback shows in the task's repr.
    """

    def task_step(self, task: asyncio.Task[Any], start: float, duration: float) -> None:
        """One step ran from *start* (``time.perf_counter()``) for *duration* seconds."""


class TimedCoroutine(collections.abc.Coroutine):  # type: ignore[type-arg]
    """Wraps a traced task's coroutine to time each step (``send``/``throw``).

    asyncio's C Task has no hook between steps; it drives any coroutine
    through ``send`` and ``throw``, so this wrapper sees each step and
    forwards everything else (``cr_frame``, ``cr_await``, ``__qualname__``
    ...) so that ``repr(task)``, ``task.get_stack()`` and asyncwatch's own
    introspection see the user's coroutine.  Exceptions pass through
    unchanged but for this wrapper's own frame, taken off their traceback;
    the task's last step is told as its end (`StepObserver.task_ended`).  A detector's ``wrap_coroutine`` returns one (spans do); the
    task factory then points it at its task (`attach`).
    """

    # __weakref__: a coroutine can be weakly referenced, so its stand-in must be too.
    __slots__ = ("__weakref__", "_aw_early", "_aw_ended", "_aw_enter", "_aw_inner", "_aw_observer", "_aw_task")

    def __init__(self, coro: Any, observer: StepObserver) -> None:
        self._aw_inner = coro
        self._aw_observer: StepObserver | None = observer
        self._aw_task: Callable[[], Any] = _no_task
        # An eager first step runs inside Task.__init__, before the task
        # exists for the observer: kept here and told right after creation.
        self._aw_early: tuple[float, float] | None = None
        # An eager first step may also be the last: (how it ended,) until attached.
        self._aw_ended: tuple[BaseException | None] | None = None
        # Run once, inside the task's context, before its first step: (a
        # setter, its argument), e.g. a ContextVar's ``set`` and the value the
        # task's steps should see (`enter_first`).
        self._aw_enter: tuple[Callable[[Any], Any], Any] | None = None

    def enter_first(self, setter: Callable[[Any], Any], value: Any) -> None:
        """Call ``setter(value)`` at the start of the first step, in the task's own context.

        Cheaper than reaching the task's `contextvars.Context` from outside
        at creation (on 3.11 a walk over the task's referents, then
        ``Context.run`` and the API's attach): about 70 bytecodes and that
        walk less a task (issue 14; counted with ``sys.settrace`` opcodes).
        """
        self._aw_enter = (setter, value)

    def send(self, value: Any) -> Any:
        enter = self._aw_enter
        if enter is not None:
            self._enter(enter)
        start = _clock()
        try:
            result = self._aw_inner.send(value)
        except StopIteration:  # the task's normal end: nothing to hide
            self._ended(start, None)
            raise
        except BaseException as exc:
            _hide_own_frame(exc)
            self._ended(start, exc)
            raise  # a bare raise adds no traceback entry for this frame
        # _stepped's usual case inline: a call less per step.
        observer = self._aw_observer
        if observer is not None:
            task = self._aw_task()
            if task is not None:
                try:
                    observer.task_step(task, start, _clock() - start)
                except Exception as exc:
                    self._aw_observer = None
                    report_internal_error("task observer", exc)
                return result
        self._stepped(start)
        return result

    def throw(self, *args: Any) -> Any:
        # *args holds the exception, whose traceback will hold this frame: a
        # cycle that would keep everything the task's frames refer to
        # (sockets, SSL contexts) alive until the collector runs.
        enter = self._aw_enter
        if enter is not None:
            self._enter(enter)
        start = _clock()
        try:
            result = self._aw_inner.throw(*args)
        except StopIteration:
            del args
            self._ended(start, None)
            raise
        except BaseException as exc:
            del args
            _hide_own_frame(exc)
            self._ended(start, exc)
            raise
        del args
        self._stepped(start)
        return result

    def close(self) -> None:
        self._aw_inner.close()

    def __await__(self) -> Any:
        return self._aw_inner.__await__()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._aw_inner, name)

    def attach(self, task: asyncio.Task[Any]) -> None:
        """Time steps for *task* from now on; tell the observer an eager first step."""
        self._aw_task = weakref.ref(task)  # the task owns the wrapper: no cycle
        early, self._aw_early = self._aw_early, None
        ended, self._aw_ended = self._aw_ended, None
        observer = self._aw_observer
        if early is not None and observer is not None:
            observer.task_step(task, *early)
            if ended is not None:
                _tell_ended(observer, task, ended[0])

    def _enter(self, enter: tuple[Callable[[Any], Any], Any]) -> None:
        self._aw_enter = None
        try:
            enter[0](enter[1])
        except Exception as exc:
            report_internal_error("task observer", exc)

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

    def _ended(self, start: float, exc: BaseException | None) -> None:
        """The task's last step: it returned (*exc* None) or raised *exc*."""
        observer = self._aw_observer
        if observer is None:
            return
        task = self._aw_task()
        if task is None:  # eager, finished inside create_task: told on attach
            self._aw_early = (start, _clock() - start)
            self._aw_ended = (exc,)
            return
        try:
            observer.task_step(task, start, _clock() - start)
            _tell_ended(observer, task, exc)
        except Exception as error:
            self._aw_observer = None
            report_internal_error("task observer", error)


def _hide_own_frame(exc: BaseException) -> None:
    """Drop the wrapper's own entry from the head of *exc*'s traceback.

    The exception passed through ``send``/``throw`` on its way to the task,
    which added this frame to its traceback; without it, the traceback the
    program sees (``await task``, the span's ``exception`` event, asyncio's
    "exception was never retrieved" log) is the one it would see without
    asyncwatch.  The bare ``raise`` that follows re-raises without adding
    the frame again (CPython's RERAISE path skips PyTraceBack_Here).
    """
    tb = exc.__traceback__
    if tb is not None and tb.tb_frame.f_code in STEP_WRAPPER_CODES:
        exc.__traceback__ = tb.tb_next


def _tell_ended(observer: StepObserver, task: asyncio.Task[Any], exc: BaseException | None) -> None:
    # task_ended is optional: an observer that only times steps need not say it.
    ended = getattr(observer, "task_ended", None)
    if ended is not None:
        ended(task, exc)


def _no_task() -> None:
    return None


_clock = time.perf_counter

#: The code of the wrapper's steps: a frame running one of these is the
#: program's task step, not asyncwatch's own work (the slow-callback
#: detector must see through it).
STEP_WRAPPER_CODES = frozenset({TimedCoroutine.send.__code__, TimedCoroutine.throw.__code__})
