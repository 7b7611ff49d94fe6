"""Notable mode: spans that cost a task nothing until it becomes notable.

`NotableTracer` is `TaskTracer` (spans.py) without the per-task step timer,
record, creation site or done callback: a task keeps only when it was made
and the OpenTelemetry context current there, in two slots of its own; a
record, a span from that creation time and a done callback come only once
the task becomes notable (a cancel(), a step that blocks the loop, its
exception asked for, asyncio's own report of it, or a life longer than the
threshold, found by a per-loop scan).  With metrics on, the task counts
cost a task an increment at creation and a call when it is freed
(`asyncwatch._core.tasks.TaskEnds`).  A module of its own: what it leaves
out, and how it still sees each kind of notable task, is its one concept.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import time
import weakref
from types import FrameType
from typing import Any

from opentelemetry import trace

from ..._core import loops
from ..._core.detector import Detector
from ..._core.findings import Site
from ..._core.frames import (
    WRAPPER_NAMES,
    app_frame_in_running_loop,
    frame_site,
    is_own_file,
    program_coroutine,
    qualname_of,
)
from ..._core.runtime import report_internal_error
from ..._core.tasks import CountingTask, TaskEnds, coro_name, created_at, task_context
from .names import (
    STATE_CANCELLED,
    STATE_DESTROYED,
    STATE_EXCEPTION,
    STATE_FINISHED,
)
from .spans import _CONTEXT_VARIABLE, TaskTracer, _current_context, _TaskRecord

__all__ = ["NotableTracer"]


def _first_done_callback(task: asyncio.Task[Any], callback: Any) -> None:
    """Add *callback* to *task* ahead of the callbacks it has (in their order):
    so that it runs before whoever awaits the task resumes, and a span ends
    when the task did, not after its awaiter's next step."""
    callbacks = list(getattr(task, "_callbacks", None) or ())
    for function, _context in callbacks:
        task.remove_done_callback(function)  # removes every copy: all are added back below
    task.add_done_callback(callback)
    for function, context in callbacks:
        task.add_done_callback(function, context=context)


class NotableTracer(TaskTracer):
    """The task tracer of ``spans="notable"``: nothing per step, nothing at
    a task's end, unless the task becomes notable.  With ``spans="off"``
    and metrics on, it only counts tasks (it never traces).

    A task costs its creation only: when it was made and the OpenTelemetry
    context current there, kept in two slots of the task itself
    (`asyncwatch._core.tasks.TellingTask`); no wrapper, no record, no
    creation site, no callback.  A task becomes notable, and gets a record, a
    span (from its creation time, under that context) and a done callback
    that ends it, when

    * ``cancel()`` is called on it (``task_cancel_requested``);
    * a step of it blocks the loop (``task_blocking``, from the watchdog);
    * its exception is asked for (``task_failed``: ``await``, ``gather``...)
      or never is (the loop's "exception was never retrieved");
    * it is destroyed while pending (the loop's "destroyed but it is pending");
    * it has lived `min_duration_s`: a timer on each loop looks at the loop's
      pending tasks every quarter of it (a task living between 1x and 1.25x
      the threshold may end unseen).

    Steps are not timed: the spans have no ``asyncio.task.steps``,
    ``busy_time`` or ``scheduling_delay`` (``spans="all"`` has them).

    The metrics' task counts (`count_tasks`) come from a `TaskEnds`: each
    task counted is a `asyncwatch._core.tasks.CountingTask`, which counts
    its final state when it is freed; ended tasks still referenced are
    found in asyncio's registry when the counts are read (`task_counts`).
    `TaskTracer.finished` is not used.
    """

    needs_creation_site = False  # resolved for notable tasks only (`created_at`)
    # No wrapper: not even a call per task to decline to wrap.
    wrap_coroutine = Detector.wrap_coroutine

    #: How often, as a share of the notable life, pending tasks are looked at
    #: (each look costs the loop a walk over its pending tasks), and at most
    #: how often (a threshold of a few ms must not keep the loop busy).
    SCAN_SHARE = 0.25
    SCAN_MIN_S = 0.005

    def __init__(self, mode: str, min_duration_s: float) -> None:
        super().__init__(mode, min_duration_s)
        self._scans: dict[int, asyncio.TimerHandle] = {}
        self._clock = time.perf_counter
        self._theirs_cache = self._file_kinds
        #: The task counts, once metrics are on (`count_tasks`).
        self.ends: TaskEnds | None = None

    def count_tasks(self) -> None:
        """Count tasks for the metrics from now on: each task created costs
        an increment, and a call when it is freed (no wrapper, no callback).
        Only on loops attached from now on: the factory of each makes tasks
        that count their end (`Detector.counts_task_ends`)."""
        self.ends = TaskEnds()
        self.counts_task_ends = True

    def task_counts(self) -> tuple[int, dict[str, int]]:
        ends = self.ends
        if ends is None:
            return 0, dict.fromkeys(self.finished, 0)
        created, finished, cancelled, exception, destroyed = ends.counts()
        return created, {
            STATE_FINISHED: finished,
            STATE_CANCELLED: cancelled,
            STATE_EXCEPTION: exception,
            STATE_DESTROYED: destroyed,
        }

    # -- every task -----------------------------------------------------------

    def task_created(self, task: asyncio.Task[Any], coro: Any, site: Site | None) -> None:
        """Count *task*, note when it was made and the context current there
        (for asyncwatch's own, asyncio's and uvloop's tasks: nothing)."""
        ends = self.ends
        if not self.tracing and ends is None:
            return
        if self._orphans:  # tasks destroyed while pending: end their spans
            self.drain()
        code = getattr(coro, "cr_code", None)
        if code is not None and code.co_name in WRAPPER_NAMES:
            # opentelemetry-instrumentation-asyncio's trace_coroutine: judge
            # and name the program's coroutine, which only a wrapper that has
            # not started yet still shows (a span may be made after the end).
            coro = program_coroutine(coro)
            code = getattr(coro, "cr_code", None)
            task._aw_coro = qualname_of(coro)  # type: ignore[attr-defined]
        if code is not None:
            filename = code.co_filename
            theirs = self._theirs_cache.get(filename)
            if theirs is None:
                theirs = self._theirs(filename)
            if theirs and (is_own_file(filename) or self._created_by_them()):
                return
        if ends is not None:
            # `TaskEnds.count`, inline for the common case: a call less for
            # every task (some 700 instructions of 90,000 on task churn,
            # benchmarks/instructions.py).  A task of a loop attached before
            # metrics started is no CountingTask: it could not count its
            # end, so it is not counted at all.
            if type(task) is CountingTask:
                if task.done():  # eager, ended inside create_task: TaskEnds.count knows
                    ends.count(task)
                else:
                    task._aw_ends = ends
                    ends.created += 1
            if not self.tracing:
                return
        task._aw_born = self._clock()  # type: ignore[attr-defined]
        task._aw_note = _current_context()  # type: ignore[attr-defined]

    # -- becoming notable ----------------------------------------------------

    def notable(self, task: asyncio.Task[Any], span: bool = True) -> _TaskRecord | None:
        """The record of *task*, made now if it had none (with its span,
        unless *span* is False), or None for a task that is not traced."""
        note = getattr(task, "_aw_note", None)
        if note is None or type(note) is _TaskRecord:
            if span and note is not None and note.span is None and not note.done:
                self.promote(note)
            return note
        if not self.tracing:
            return None
        with self._lock:
            note = task._aw_note  # type: ignore[attr-defined]
            if type(note) is _TaskRecord:  # made meanwhile by another thread
                return note
            record = _TaskRecord(
                self,
                coro_name(task) or "<unknown>",
                created_at(task),
                note,
                None,
                0,
                task._aw_born,  # type: ignore[attr-defined]
            )
            record.stepped = False
            task._aw_note = record  # type: ignore[attr-defined]
        if span:
            self.promote(record)
        if not task.done():
            loop = task.get_loop()
            if asyncio._get_running_loop() is loop:
                _first_done_callback(task, self._task_done)
            else:  # the watchdog's thread, during a slow step
                with contextlib.suppress(RuntimeError):  # the loop is closed
                    loops.call_soon_threadsafe(loop, self._watch_end, task)
        return record

    def _watch_end(self, task: asyncio.Task[Any]) -> None:
        if task.done():
            self._task_done(task)
        else:
            _first_done_callback(task, self._task_done)

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        """End a notable task's span: it ended now."""
        record = getattr(task, "_aw_note", None)
        if type(record) is not _TaskRecord or record.done:
            return
        record.end_ns = time.time_ns()
        if task.cancelled():
            state, exc = STATE_CANCELLED, None
        else:
            exc = task._exception  # not exception(): that would mark it retrieved
            state = STATE_EXCEPTION if exc is not None else STATE_FINISHED
        record.ended(task, state, exc)

    def task_cancel_requested(self, task: asyncio.Task[Any], caller: FrameType, message: Any) -> None:
        """A cancelled task is notable: put the request on its span."""
        record = self.notable(task)
        if record is not None:
            app = app_frame_in_running_loop(caller)
            record.task_cancel_requested(task, frame_site(app) if app is not None else None, message)

    def task_failed(self, task: asyncio.Task[Any]) -> None:
        """A failed task is notable: end its span with the exception, now."""
        record = self.notable(task)
        if record is not None and not record.done:
            self._task_done(task)

    def task_blocking(self, task: asyncio.Task[Any], since: float) -> None:
        """A slow step makes its task notable: keep the context the step runs
        in (a request span it opened) and when the watchdog first saw it (the
        step is not timed: its event is placed there), for its finding."""
        # Its span is made only if the finding goes on it: a block inside a
        # request span the task opened goes to that request's trace instead.
        record = self.notable(task, span=False)
        if record is None:
            return
        context = record.parent
        if isinstance(_CONTEXT_VARIABLE, contextvars.ContextVar):
            inside = task_context(task)
            current = inside.get(_CONTEXT_VARIABLE) if inside is not None else None
            if current is not None and trace.get_current_span(current).get_span_context().is_valid:
                context = current
        self.watch(record, task)
        with self._lock:
            # How long comes with the finding (its duration runs from *since*).
            record.slow.append((since, -1.0, context))
            del record.slow[:-16]

    def exception_context(self, watch: Any, context: Any) -> None:
        """A task destroyed while pending, or whose exception nobody asked
        for, is notable: its span is made now (ended when it is freed, or now)."""
        task = context.get("task") or context.get("future")
        if getattr(task, "_aw_note", None) is None:
            return
        message = context.get("message")
        if message == "Task was destroyed but it is pending!":
            record = self.notable(task)
            if record is not None:
                self.watch(record, task)
        elif isinstance(message, str) and message.endswith(" exception was never retrieved") and task.done():
            record = self.notable(task)
            if record is not None and not record.done:
                self._task_done(task)

    # -- long lives ------------------------------------------------------------

    def loop_attached(self, watch: Any) -> None:
        loop = watch.loop_ref()
        if loop is not None and self.mode != "off":  # "off": counting tasks only, no span to make
            self._schedule_scan(loop, weakref.ref(loop))

    def loop_detached(self, watch: Any) -> None:
        loop = watch.loop_ref()
        handle = self._scans.pop(id(loop), None) if loop is not None else None
        if handle is not None:
            handle.cancel()

    def _schedule_scan(self, loop: asyncio.AbstractEventLoop, loop_ref: Any) -> None:
        if self.failed or loops.is_closed(loop):
            return
        period = max(self.min_duration_s * self.SCAN_SHARE, self.SCAN_MIN_S)
        self._scans[id(loop)] = loops.call_later(loop, period, self._scan, loop_ref)

    def _scan(self, loop_ref: Any) -> None:
        """Make the spans of the loop's tasks that have lived the notable life."""
        loop = loop_ref()
        if loop is None:
            return
        if not self.tracing:  # counting tasks only (no tracer provider yet): nothing to make
            self._schedule_scan(loop, loop_ref)
            return
        try:
            oldest = self._clock() - self.min_duration_s
            for task in asyncio.all_tasks(loop):
                note = getattr(task, "_aw_note", None)
                if note is not None and type(note) is not _TaskRecord and task._aw_born <= oldest:  # type: ignore[attr-defined]
                    self.notable(task)
        except Exception as exc:
            self.failed = True
            self.tracing = False
            report_internal_error("OpenTelemetry task tracing", exc)
            return
        self._schedule_scan(loop, loop_ref)
