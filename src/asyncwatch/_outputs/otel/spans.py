"""Spans for tasks: the OpenTelemetry task tracer, a detector-style plug-in.

`TaskTracer` overrides the task hooks of the detector interface: it wraps
each task's coroutine in asyncwatch's step timer, gives every task a
`_TaskRecord` (creation time, the creator's OpenTelemetry context, steps,
busy time) and turns records into spans: at creation in ``"all"`` mode, or
in ``"notable"`` mode the moment a task becomes notable (a cancellation, a
finding, an exception, a long life), with the real start time.  Findings are
put on these spans by `Telemetry` (telemetry.py).

One concept (a task's record and its span), hence one module a little over
the usual length: the record's hooks and the tracer's bookkeeping share the
tracer's lock and its rules about which thread may end a span.
"""

from __future__ import annotations

import asyncio
import collections
import os
import threading
import time
import traceback
import weakref
from types import FrameType
from typing import Any

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.trace import Status, StatusCode

from ..._core.detector import Detector
from ..._core.findings import Finding, Site
from ..._core.frames import app_frame, describe_exception, frame_site, is_own_file
from ..._core.runtime import report_internal_error
from ..._core.stepping import TimedCoroutine
from ..._core.tasks import coro_of, task_context
from .names import (
    ATTR_BUSY_TIME,
    ATTR_CANCEL_MESSAGE,
    ATTR_SCHEDULING_DELAY,
    ATTR_STEPS,
    ATTR_TASK_NAME,
    ATTR_TASK_STATE,
    EVENT_CANCEL_REQUESTED,
    FINDING_EVENT_PREFIX,
    SPAN_PREFIX,
    STATE_CANCELLED,
    STATE_DESTROYED,
    STATE_EXCEPTION,
    STATE_FINISHED,
    STATES,
    finding_attributes,
    finding_ns,
    site_attributes,
)

__all__ = ["RECENT_LIMIT", "TaskTracer"]

# asyncio's (and uvloop's) own tasks: never a span, never counted.
_INTERNAL_COROUTINES = frozenset(
    {
        "BaseEventLoop.shutdown_asyncgens",
        "BaseEventLoop.shutdown_default_executor",
        "BaseSelectorEventLoop._accept_connection2",
        "Loop.shutdown_asyncgens",
        "Loop.shutdown_default_executor",
    }
)
_ASYNCIO_DIR = os.path.dirname(asyncio.__file__) + os.sep

_ASYNCIO_DIR = os.path.dirname(asyncio.__file__) + os.sep
#: Bounds on what is kept to match findings that come late.
RECENT_LIMIT = 256


def now_ns_for(perf: float) -> int:
    """Wall-clock nanoseconds of the ``time.perf_counter()`` reading *perf*.

    Converted relative to now, so that the two clocks drifting apart over
    a long run never skews a span by more than its own length.
    """
    return time.time_ns() - int((time.perf_counter() - perf) * 1e9)


# --- per-task bookkeeping ----------------------------------------------------


class _Failure:
    """A task's exception as the span's ``exception`` event will say it: the
    attributes of OpenTelemetry's ``record_exception`` (type, message,
    traceback text), made at once, so that nothing keeps the exception."""

    __slots__ = ("attributes", "description")

    def __init__(self, exc: BaseException) -> None:
        self.description = describe_exception(exc)
        self.attributes = {
            "exception.type": type(exc).__name__,
            "exception.message": str(exc),
            "exception.stacktrace": "".join(traceback.format_exception(type(exc), exc, exc.__traceback__)),
            "exception.escaped": "False",
        }


class _TaskRecord:
    """One task's life, and its per-task observer.

    `TaskTracer.task_created` points the task's timing wrapper at its record,
    so each step costs one call and four attribute updates, with no lookup.
    Owned by the wrapper, which the task owns: it dies with the task, and a
    record dying with its span unfinished means the task was destroyed while
    pending (`__del__`).
    """

    __slots__ = (
        "__weakref__",
        "busy",
        "created_ns",
        "created_perf",
        "done",
        "first_step",
        "last_end",
        "name",
        "owner",
        "parent",
        "qualname",
        "site",
        "slow_steps",
        "span",
        "state",
        "steps",
        "watched",
    )

    def __init__(
        self, owner: TaskTracer, qualname: str, site: Site | None, parent: Any, created_ns: int, created_perf: float
    ) -> None:
        self.owner = owner
        self.qualname = qualname
        self.site = site
        self.parent = parent
        self.created_ns = created_ns
        self.created_perf = created_perf
        self.first_step = 0.0
        self.last_end = 0.0
        self.steps = 0
        self.busy = 0.0
        self.span: Any = None
        self.name: str | None = None
        self.done = False  # the task finished (its span may end a little later)
        self.state: str | None = None  # set when the span is finished
        self.watched = False  # registered by name for findings to find it
        self.slow_steps = 0  # slow steps whose finding has not arrived yet

    # -- TaskObserver, called by the task's timing wrapper ---------------------

    def task_created(self, task: asyncio.Task[Any], created_at: Site | None) -> None:
        """Never called: the record is attached after creation."""

    def task_step(self, task: asyncio.Task[Any], start: float, duration: float) -> None:
        """Count the step and its time; a long one may have a finding coming."""
        if not self.steps:
            self.first_step = start
        self.steps += 1
        self.busy += duration
        self.last_end = start + duration
        if duration >= self.owner.slow_floor_s and self.owner.tracing:
            self.owner.slow_step(self, task)

    def task_cancel_requested(self, task: asyncio.Task[Any], canceller: Site | None, message: Any) -> None:
        """Put the request on the span (made now in notable mode: a cancelled task is notable)."""
        owner = self.owner
        if not owner.tracing:
            return
        owner.watch(self, task)
        span = self.span if self.span is not None else owner.promote(self)
        if span is not None and span.is_recording():
            attributes = site_attributes(canceller)
            if message is not None:
                attributes[ATTR_CANCEL_MESSAGE] = str(message)
            span.add_event(EVENT_CANCEL_REQUESTED, attributes)

    def task_done(self, task: asyncio.Task[Any]) -> None:
        """Count the task; end its span, after the findings its end may cause."""
        if task.cancelled():
            state, exc = STATE_CANCELLED, None
        else:
            # Not task.exception(): that marks it retrieved, and would hide
            # task_exception_unretrieved from asyncwatch itself.
            exc = task._exception
            state = STATE_EXCEPTION if exc is not None else STATE_FINISHED
        self.done = True
        owner = self.owner
        owner.finished[state] += 1
        if (
            self.span is None
            and state is STATE_FINISHED
            and not self.watched
            and (self.last_end or time.perf_counter()) - self.created_perf < owner.min_duration_s
        ):
            return  # notable mode's usual case: a short task that went well, nothing to say
        self.name = task.get_name()  # create_task(name=...) names it after creation
        if self.watched:
            # A swallowed cancellation is reported by a done callback that
            # asyncio runs after this one, a slow last step by the loop's next
            # heartbeat: end the span once they have run.
            # The exception goes as text: a callback the loop never runs (it
            # stopped right after this task, as run_until_complete does) must
            # not keep the exception, its traceback and every frame in it
            # (sockets, SSL contexts) alive.
            failure = _Failure(exc) if exc is not None else None
            try:
                task.get_loop().call_soon(self.finish, state, failure)
                return
            except RuntimeError:  # the loop is closing
                pass
        self.finish(state, exc)

    # -- spans --------------------------------------------------------------

    def finish(self, state: str, exc: BaseException | _Failure | None, end_ns: int | None = None) -> None:
        """End the span (making it first if the task turned out notable)."""
        owner = self.owner
        self.state = state
        if self.watched:
            owner.unwatch(self)
        span = self.span
        if span is None:
            span = owner.promote(self)
            if span is None:
                return
        if span.is_recording():
            span.set_attributes(self._attributes(state))
            if exc is not None:
                failure = exc if isinstance(exc, _Failure) else _Failure(exc)
                span.add_event("exception", failure.attributes)
                span.set_status(Status(StatusCode.ERROR, failure.description))
                owner.remember_failed(self)
        if end_ns is None:
            end_ns = now_ns_for(self.last_end) if self.last_end else time.time_ns()
        span.end(end_time=max(end_ns, self.created_ns))

    def _attributes(self, state: str) -> dict[str, Any]:
        attributes: dict[str, Any] = {
            ATTR_TASK_STATE: state,
            ATTR_STEPS: self.steps,
            ATTR_BUSY_TIME: self.busy,
            **site_attributes(self.site),
        }
        if self.name is not None:
            attributes[ATTR_TASK_NAME] = self.name
        if self.steps:
            attributes[ATTR_SCHEDULING_DELAY] = max(0.0, self.first_step - self.created_perf)
        return attributes

    def __del__(self) -> None:
        # Freed with its task.  Unfinished means the task was destroyed while
        # pending: hand it over to be ended outside the garbage collector,
        # since ending a span takes the span processor's locks.
        if not self.done:
            try:  # noqa: SIM105 - at interpreter shutdown even contextlib may be gone
                self.owner.orphaned(self)
            except Exception:  # interpreter shutdown: nothing to do
                pass


class TaskTracer(Detector):
    """The OpenTelemetry task tracer: a record per task, spans from records.

    A plug-in like any detector (it reports no finding of its own): the
    engine adds it to a loop's hooks while a tracer or meter provider is
    there to send to.  Runs on the threads of the watched loops (and the
    watchdog's, for findings); shared state is touched under a lock, off the
    per-step path.  It contains its own failures: tracing stops, the task
    counts for the metrics go on.
    """

    def __init__(self, mode: str, min_duration_s: float) -> None:
        self.mode = mode  # "all", "notable" or "off" (then only counted, for the metrics)
        self.tracing = False
        self.min_duration_s = min_duration_s
        self.slow_floor_s = float("inf")  # the lowest slow-callback threshold of a watched loop
        self.tracer: Any = None
        # Counts for the metrics (plain ints: += on an attribute is not
        # interrupted by a thread switch under the GIL).
        self.created = 0
        self.finished = dict.fromkeys(STATES, 0)
        self._file_kinds: dict[str, bool] = {}
        self._lock = threading.Lock()
        # Records findings may concern, by task name (tasks with a cancel
        # request or a slow step): the only way from a Finding to its task.
        self._watched: weakref.WeakValueDictionary[str, _TaskRecord] = weakref.WeakValueDictionary()
        self._failed: collections.OrderedDict[str, Any] = collections.OrderedDict()
        self._orphans: collections.deque[_TaskRecord] = collections.deque()
        self._destroyed: collections.deque[Finding] = collections.deque(maxlen=RECENT_LIMIT)
        self.closed = False
        self.failed = False

    # -- detector hooks -------------------------------------------------------

    def wrap_coroutine(self, coro: Any) -> Any:
        """Time each step: the task's record takes over as the step observer."""
        return TimedCoroutine(coro, self)

    def task_created(self, task: asyncio.Task[Any], coro: Any, site: Site | None) -> None:
        """Start the task's record (and, in "all" mode, its span, made current inside the task)."""
        wrapper = coro if type(coro) is TimedCoroutine else None
        if self.failed:
            if wrapper is not None:
                wrapper._aw_observer = None
            return
        try:
            self._task_created(task, wrapper, site)
        except Exception as exc:
            # Stop tracing; the counts for the metrics go on.
            self.failed = True
            self.tracing = False
            if wrapper is not None:
                wrapper._aw_observer = None
            report_internal_error("OpenTelemetry task tracing", exc)

    def _task_created(self, task: asyncio.Task[Any], wrapper: TimedCoroutine | None, created_at: Site | None) -> None:
        if self._orphans:
            self.drain()
        if wrapper is None:  # a task this tracer did not wrap: nothing to time
            return
        all_spans = self.tracing and self.mode == "all"
        now_perf = time.perf_counter()
        now_ns = time.time_ns() if all_spans else 0  # else worked out if a span is ever made
        inner = wrapper._aw_inner
        qualname = getattr(inner, "__qualname__", None) or type(inner).__qualname__
        code = getattr(inner, "cr_code", None)
        if (
            code is not None and self._special_file(code.co_filename) and self._internal(code.co_filename, qualname)
        ) or (qualname in _INTERNAL_COROUTINES):
            wrapper._aw_observer = None  # asyncio's or asyncwatch's own work: not even timed
            return
        early = wrapper._aw_early
        if early is not None:  # an eager first step already ran: that was the start
            if now_ns:
                now_ns -= int((now_perf - early[0]) * 1e9)
            now_perf = early[0]
        self.created += 1
        parent = otel_context.get_current() if self.tracing else None
        record = _TaskRecord(self, qualname, created_at, parent, now_ns, now_perf)
        if all_spans:
            span = self.tracer.start_span(SPAN_PREFIX + qualname, context=parent, start_time=now_ns)
            record.span = span
            context = None if task.done() else task_context(task)
            if context is not None:
                # The task copied its creator's context at creation; setting
                # the span in that copy makes it current in every later step.
                context.run(otel_context.attach, trace.set_span_in_context(span, parent))
        wrapper._aw_observer = record

    def task_step(self, task: asyncio.Task[Any], start: float, duration: float) -> None:
        """A step before the task had a record: nothing to count it on."""

    def task_cancel_requested(self, task: asyncio.Task[Any], caller: FrameType, message: Any) -> None:
        """Forward to the task's record, with the application line that called ``cancel()``."""
        wrapper = coro_of(task)  # pending: safe to ask
        record = wrapper._aw_observer if type(wrapper) is TimedCoroutine else None
        if isinstance(record, _TaskRecord):
            app = app_frame(caller)
            record.task_cancel_requested(task, frame_site(app) if app is not None else None, message)

    def task_done(self, task: asyncio.Task[Any], coro: Any) -> None:
        """Forward to the task's record."""
        record = coro._aw_observer if type(coro) is TimedCoroutine else None
        if isinstance(record, _TaskRecord):
            record.task_done(task)

    def _special_file(self, filename: str) -> bool:
        special = self._file_kinds.get(filename)
        if special is None:
            if len(self._file_kinds) > 4096:  # exec'd code can invent names
                self._file_kinds.clear()
            special = self._file_kinds[filename] = (
                filename.startswith(_ASYNCIO_DIR) or filename.endswith("loop.pyx") or is_own_file(filename)
            )
        return special

    @staticmethod
    def _internal(filename: str, qualname: str) -> bool:
        return is_own_file(filename) or qualname in _INTERNAL_COROUTINES

    # -- spans ----------------------------------------------------------------

    def promote(self, record: _TaskRecord) -> Any:
        """Make the span of a task that just became notable, from its creation time."""
        with self._lock:
            if record.span is None and self.tracing:
                if not record.created_ns:
                    record.created_ns = now_ns_for(record.created_perf)
                record.span = self.tracer.start_span(
                    SPAN_PREFIX + record.qualname, context=record.parent, start_time=record.created_ns
                )
            return record.span

    def watch(self, record: _TaskRecord, task: asyncio.Task[Any]) -> None:
        """Let findings about *task* (named now) find its record."""
        if not record.watched:
            with self._lock:
                record.name = task.get_name()
                record.watched = True
                self._watched[record.name] = record

    def unwatch(self, record: _TaskRecord) -> None:
        with self._lock:
            record.watched = False
            if record.name is not None and self._watched.get(record.name) is record:
                del self._watched[record.name]

    def slow_step(self, record: _TaskRecord, task: asyncio.Task[Any]) -> None:
        """A step at least as long as the lowest threshold: its finding may follow."""
        self.watch(record, task)
        with self._lock:
            record.slow_steps += 1

    def remember_failed(self, record: _TaskRecord) -> None:
        """Keep a failed task's span, for an unretrieved-exception finding to come."""
        if record.name is None or record.span is None:
            return
        with self._lock:
            self._failed[record.name] = record.span.get_span_context()
            while len(self._failed) > RECENT_LIMIT:
                self._failed.popitem(last=False)

    def orphaned(self, record: _TaskRecord) -> None:
        if not self.closed:
            self.finished[STATE_DESTROYED] += 1
            self._orphans.append(record)  # deque.append: no lock, safe inside the collector

    def destroyed_finding(self, finding: Finding) -> None:
        self._destroyed.append(finding)

    def drain(self) -> None:
        """End the spans of tasks destroyed while pending, with their finding."""
        while self._orphans:
            try:
                record = self._orphans.popleft()
            except IndexError:
                return
            finding = self._pop_destroyed(record)
            if finding is not None:
                record.name = finding.task
            if record.watched:
                self.unwatch(record)
            span = record.span if record.span is not None else self.promote(record)
            if span is None:
                continue
            if finding is not None and span.is_recording():
                span.add_event(
                    FINDING_EVENT_PREFIX + finding.kind.value, finding_attributes(finding), finding_ns(finding)
                )
            record.finish(STATE_DESTROYED, None, finding_ns(finding) if finding else time.time_ns())

    def _pop_destroyed(self, record: _TaskRecord) -> Finding | None:
        for finding in self._destroyed:
            if finding.coroutine == record.qualname and finding.created_at == record.site:
                self._destroyed.remove(finding)
                return finding
        return None

    def find(self, finding: Finding) -> _TaskRecord | None:
        """The live record *finding* concerns, by task name and coroutine."""
        if finding.task is None:
            return None
        with self._lock:
            record = self._watched.get(finding.task)
        if record is None or (finding.coroutine is not None and record.qualname != finding.coroutine):
            return None
        return record

    def failed_span_context(self, finding: Finding) -> Any:
        with self._lock:
            return self._failed.pop(finding.task, None) if finding.task else None
