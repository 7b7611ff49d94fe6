"""Spans for tasks: the OpenTelemetry task tracer, a detector-style plug-in.

`TaskTracer` overrides the task hooks of the detector interface: it wraps
each task's coroutine in asyncwatch's step timer, gives every task a
`_TaskRecord` (creation time, the creator's OpenTelemetry context, steps,
busy time) and turns records into spans: at creation in ``"all"`` mode, or
in ``"notable"`` mode the moment a task becomes notable (a cancellation, a
finding, an exception, a long life), with the real start time.  Findings are
put on these spans by `Telemetry` (telemetry.py).  `NotableTracer`
(notable.py) is notable mode: no wrapper and no record until a task
becomes notable.

Traces stay the size of a unit of work: a task created under an application
span nests under it; one created where only a task span that began its own
trace is current (the main task, an accept loop) begins a trace of its own,
linked to its creator (see `TaskTracer._task_created`).

One concept (a task's record and its span), hence one module a little over
the usual length: the record's hooks and the tracer's bookkeeping share the
tracer's lock and its rules about which thread may end a span.
"""

from __future__ import annotations

import asyncio
import collections
import contextvars
import os
import sys
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
from ..._core.frames import (
    WRAPPER_NAMES,
    app_frame_in_running_loop,
    describe_exception,
    frame_site,
    is_own_file,
    program_coroutine,
)
from ..._core.runtime import report_internal_error
from ..._core.stepping import TimedCoroutine
from ..._core.tasks import coro_of, task_context
from .names import (
    ATTR_BUSY_TIME,
    ATTR_CANCEL_MESSAGE,
    ATTR_CODE_FILE,
    ATTR_CODE_FUNCTION,
    ATTR_CODE_LINE,
    ATTR_HAS_FINDINGS,
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

# asyncio's and uvloop's own tasks (Runner.close's shutdown_asyncgens, a
# server's _accept_connection2, create_server's _create_server_getaddrinfo
# ...) are recognised by where their coroutine is defined and by who created
# the task: never a span, never counted.  A task the program itself makes of
# one of asyncio's coroutines (``create_task(asyncio.sleep(1))``) stays.
# uvloop's Cython coroutines name their file "uvloop/loop.pyx".
_ASYNCIO_DIR = os.path.dirname(asyncio.__file__) + os.sep
_UVLOOP_FILE = "uvloop" + os.sep
# asyncio's functions that only pass a coroutine on to the loop's create_task:
# who called them is who created the task.
_PASSING_ON = frozenset({"create_task", "ensure_future", "_ensure_future", "gather", "run_until_complete"})

#: Context key: the task span that is the root of its own trace, in the
#: context of its task (see `TaskTracer._task_created` for the rule).
_ROOT_TASK = otel_context.create_key("asyncwatch.root-task-span")
_NO_PARENT = otel_context.Context()


# OpenTelemetry's current context is a ContextVar in the API's default
# runtime context (None for another runtime context).  Also read in a task's
# own `contextvars.Context` (notable.py), to see what the task has current.
_CONTEXT_VARIABLE = getattr(getattr(otel_context, "_RUNTIME_CONTEXT", None), "_current_context", None)


def _context_reader() -> Any:
    """A function returning OpenTelemetry's current context, as cheap as can be:
    the API's ContextVar's own ``get`` (one C call, read after every task
    step), else the API's `get_current` for another runtime context."""
    if isinstance(_CONTEXT_VARIABLE, contextvars.ContextVar):
        return _CONTEXT_VARIABLE.get
    return otel_context.get_current


_current_context = _context_reader()
#: The API's ContextVar's ``set``, if it is the API's default runtime context.
_SET_CONTEXT = _CONTEXT_VARIABLE.set if isinstance(_CONTEXT_VARIABLE, contextvars.ContextVar) else None

# The key under which the API keeps the current span in a Context, learnt
# through the API itself (set_span_in_context on an empty context), so that
# the hot path reads it with a dict lookup rather than get_current_span's
# two calls (issue 14).
_SPAN_KEY = next(iter(trace.set_span_in_context(trace.INVALID_SPAN, otel_context.Context())))


def _current_span(context: Any) -> Any:
    """The span current in *context*, or None (`trace.get_current_span`, inline)."""
    span = context.get(_SPAN_KEY)
    return span if isinstance(span, trace.Span) else None


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
        "context",
        "created_ns",
        "created_perf",
        "done",
        "end_ns",
        "first_step",
        "last_end",
        "last_event_ns",
        "link",
        "name",
        "owner",
        "parent",
        "qualname",
        "site",
        "slow",
        "span",
        "state",
        "stepped",
        "steps",
        "watched",
    )

    def __init__(
        self,
        owner: TaskTracer,
        qualname: str,
        site: Site | None,
        parent: Any,
        link: Any,
        created_ns: int,
        created_perf: float,
    ) -> None:
        self.owner = owner
        self.qualname = qualname
        self.site = site
        self.parent = parent  # the OpenTelemetry context the span starts in
        self.link = link  # the creator's span context, for a task that starts a trace of its own
        # OpenTelemetry's context as the last step left it: the context the
        # next step starts in (nothing else runs in the task's context).
        self.context = parent
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
        # Slow steps whose finding has not arrived yet: (start, duration,
        # the OpenTelemetry context current at the end of the step).
        self.slow: list[tuple[float, float, Any]] = []
        self.last_event_ns = 0  # the latest event on the span: it ends no earlier
        # Whether its steps were timed (steps, busy time, scheduling delay):
        # not for notable mode's tasks (`NotableTracer`), which end when their
        # done callback runs (end_ns).
        self.stepped = True
        self.end_ns = 0

    # -- TaskObserver, called by the task's timing wrapper ---------------------

    def task_step(self, task: asyncio.Task[Any], start: float, duration: float) -> None:
        """Count the step and its time; a long one may have a finding coming."""
        if not self.steps:
            self.first_step = start
        self.steps += 1
        self.busy += duration
        self.last_end = start + duration
        # Still inside the step, in the task's context.
        before, self.context = self.context, _current_context()
        if duration >= self.owner.slow_floor_s and self.owner.tracing:
            # What the program had current (a request's span) is where its
            # finding belongs: the span current when the step ended, else
            # the one current when it began (a request that ended in the step).
            after = self.context
            if not trace.get_current_span(after).get_span_context().is_valid:
                after = before
            self.owner.slow_step(self, task, start, duration, after)

    def add_event(self, span: Any, name: str, attributes: dict[str, Any], at_ns: int | None = None) -> None:
        """Put an event on the span, inside its interval (the span ends no earlier than its events)."""
        at_ns = max(time.time_ns() if at_ns is None else at_ns, self.created_ns)
        self.last_event_ns = max(self.last_event_ns, at_ns)
        span.add_event(name, attributes, at_ns)

    def add_finding(self, span: Any, finding: Finding, at_ns: int) -> None:
        """Put *finding* on the span as an event, and mark the span as holding one."""
        self.add_event(span, FINDING_EVENT_PREFIX + finding.kind.value, finding_attributes(finding), at_ns)
        span.set_attribute(ATTR_HAS_FINDINGS, True)

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
            self.add_event(span, EVENT_CANCEL_REQUESTED, attributes)

    def task_ended(self, task: asyncio.Task[Any], exc: BaseException | None) -> None:
        """Count the task; end its span, after the findings its end may cause.

        Told by the timing wrapper from inside the last step (no done
        callback: it would show in ``repr(task)``), so the outcome is what
        the coroutine did, as asyncio's Task is about to record it.
        """
        if exc is None:
            # A cancel() during the last step cancels a task that returned.
            state = STATE_CANCELLED if getattr(task, "_must_cancel", False) else STATE_FINISHED
        elif isinstance(exc, asyncio.CancelledError):
            state, exc = STATE_CANCELLED, None
        else:
            state = STATE_EXCEPTION
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
        self.ended(task, state, exc)

    def ended(self, task: asyncio.Task[Any], state: str, exc: BaseException | None) -> None:
        """End the span of *task*, which ended in *state*: now, or once the
        findings its end causes have come."""
        self.done = True
        self.name = task.get_name()  # create_task(name=...) names it after creation
        if self.watched:
            # A swallowed cancellation is reported by a done callback of the
            # task, which asyncio schedules once this step returns, a slow
            # last step by the loop's next heartbeat: end the span once they
            # have run (two turns of the loop: after the done callbacks).
            # The exception goes as text: a callback the loop never runs (it
            # stopped right after this task, as run_until_complete does) must
            # not keep the exception, its traceback and every frame in it
            # (sockets, SSL contexts) alive.
            failure = _Failure(exc) if exc is not None else None
            try:
                task.get_loop().call_soon(self._finish_soon, state, failure)
                return
            except RuntimeError:  # the loop is closing
                pass
        self.finish(state, exc)

    # -- spans --------------------------------------------------------------

    def _finish_soon(self, state: str, failure: _Failure | None) -> None:
        try:
            asyncio.get_running_loop().call_soon(self.finish, state, failure)
        except RuntimeError:  # the loop is closing
            self.finish(state, failure)

    def finish(self, state: str, exc: BaseException | _Failure | None, end_ns: int | None = None) -> None:
        """End the span (making it first if the task turned out notable)."""
        owner = self.owner
        self.state = state
        if self.watched:
            if self.slow:
                # The finding of a slow last step may come after the end (the
                # watchdog's thread was late): it must still find the context.
                owner.linger(self)
            else:
                owner.unwatch(self)
        span = self.span
        if span is None:
            if (
                state is STATE_FINISHED
                and (self.last_end or time.perf_counter()) - self.created_perf < owner.min_duration_s
            ):
                # Watched for a slow step whose finding went to a request's
                # span elsewhere (or never came): nothing more to say here.
                return
            span = owner.promote(self)
            if span is None:
                return
        if end_ns is None:
            end_ns = self.end_ns
            if not end_ns:
                # The end of the last step, from the span's own start: no
                # clock read (now_ns_for read two a task), and the clocks'
                # drift apart can skew the span by no more than its own
                # length, as with now_ns_for.
                last_end = self.last_end
                end_ns = self.created_ns + int((last_end - self.created_perf) * 1e9) if last_end else time.time_ns()
        end_ns = max(end_ns, self.created_ns, self.last_event_ns)
        if span.is_recording():
            span.set_attributes(self._attributes(state))
            if exc is not None:
                failure = exc if isinstance(exc, _Failure) else _Failure(exc)
                span.add_event("exception", failure.attributes, end_ns)
                span.set_status(Status(StatusCode.ERROR, failure.description))
                owner.remember_failed(self)
        span.end(end_time=end_ns)

    def _attributes(self, state: str) -> dict[str, Any]:
        site = self.site
        attributes: dict[str, Any] = (
            {ATTR_TASK_STATE: state}
            if site is None
            else {
                ATTR_TASK_STATE: state,
                ATTR_CODE_FUNCTION: site.function,
                ATTR_CODE_FILE: site.file,
                ATTR_CODE_LINE: site.line,
            }
        )  # site_attributes, inline
        if self.stepped:
            attributes[ATTR_STEPS] = self.steps
            attributes[ATTR_BUSY_TIME] = round(self.busy, 6)
        if self.name is not None:
            attributes[ATTR_TASK_NAME] = self.name
        if self.steps:
            attributes[ATTR_SCHEDULING_DELAY] = round(max(0.0, self.first_step - self.created_perf), 6)
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
        self.mode = mode  # "all"; or "notable" or "off" for `NotableTracer`
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
        self._lingering: collections.deque[_TaskRecord] = collections.deque(maxlen=64)
        self.closed = False
        self.failed = False

    def task_counts(self) -> tuple[int, dict[str, int]]:
        """Tasks counted so far, and those finished by final state, for the
        metrics: every task's end told by its timing wrapper."""
        return self.created, dict(self.finished)

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
        code = getattr(inner, "cr_code", None)
        if code is not None and code.co_name in WRAPPER_NAMES:
            inner = program_coroutine(inner)
            code = getattr(inner, "cr_code", None)
        if (
            code is not None
            and self._theirs(code.co_filename)
            and (is_own_file(code.co_filename) or self._created_by_them())
        ):
            wrapper._aw_observer = None  # asyncio's, uvloop's or asyncwatch's own work: not even timed
            return
        qualname = getattr(inner, "__qualname__", None) or type(inner).__qualname__
        early = wrapper._aw_early
        if early is not None:  # an eager first step already ran: that was the start
            if now_ns:
                now_ns -= int((now_perf - early[0]) * 1e9)
            now_perf = early[0]
        self.created += 1
        parent = link = None
        current: Any = None
        if self.tracing:
            parent = _current_context()
            # One trace per unit of work.  A task created where the current
            # span is a task span that began a trace of its own (the main
            # task, a server's accept loop: long-lived tasks with no
            # application span above them) begins a trace of its own too,
            # linked to its creator; under an application span (a request),
            # or a task span below one, it nests.  No trace then lasts as
            # long as the process.
            current = _current_span(parent)
            root = parent.get(_ROOT_TASK)
            if root is not None and root is current:
                parent, link, current = _NO_PARENT, root.get_span_context(), None
        record = _TaskRecord(self, qualname, created_at, parent, link, now_ns, now_perf)
        wrapper._aw_observer = record
        if all_spans:
            self._enter_span(task, wrapper, record, current, early is None)

    def _enter_span(
        self, task: asyncio.Task[Any], wrapper: TimedCoroutine, record: _TaskRecord, current: Any, fresh: bool
    ) -> None:
        """Start the span of a new task and make it current inside the task.

        The task copied its creator's context at creation; setting the span
        in that copy makes it current in every later step.  One copy of the
        context with both keys, as the API's set_value makes it (a Context
        made of a dict), rather than two.
        """
        span = self._start_span(record)
        if task.done():
            return
        values = dict(record.parent)
        values[_SPAN_KEY] = span
        if current is None or not current.get_span_context().is_valid:
            values[_ROOT_TASK] = span
        inside = otel_context.Context(values)
        if fresh and _SET_CONTEXT is not None:  # set by the first step, in the task's own context
            wrapper.enter_first(_SET_CONTEXT, inside)
            return
        context = task_context(task)  # an eager first step already ran
        if context is not None:
            context.run(otel_context.attach, inside)

    def _start_span(self, record: _TaskRecord) -> Any:
        links = [trace.Link(record.link)] if record.link is not None else None
        span = self.tracer.start_span(
            SPAN_PREFIX + record.qualname, context=record.parent, start_time=record.created_ns, links=links
        )
        record.span = span
        return span

    def task_step(self, task: asyncio.Task[Any], start: float, duration: float) -> None:
        """A step before the task had a record: nothing to count it on."""

    def task_ended(self, task: asyncio.Task[Any], exc: BaseException | None) -> None:
        """An eager task that ended before it had a record: nothing to end."""

    def task_cancel_requested(self, task: asyncio.Task[Any], caller: FrameType, message: Any) -> None:
        """Forward to the task's record, with the application line that called ``cancel()``."""
        wrapper = coro_of(task)  # pending: safe to ask
        record = wrapper._aw_observer if type(wrapper) is TimedCoroutine else None
        if isinstance(record, _TaskRecord):
            app = app_frame_in_running_loop(caller)
            record.task_cancel_requested(task, frame_site(app) if app is not None else None, message)

    def _created_by_them(self) -> bool:
        """Whether the task being created was asked for by asyncio, uvloop or
        asyncwatch rather than the program (asked only for their coroutines)."""
        frame: FrameType | None = sys._getframe(1)
        while frame is not None:
            code = frame.f_code
            if not (
                is_own_file(code.co_filename)
                or (code.co_name in _PASSING_ON and code.co_filename.startswith(_ASYNCIO_DIR))
            ):
                return self._theirs(code.co_filename)
            frame = frame.f_back
        return True  # made from no Python code at all: uvloop's own

    def _theirs(self, filename: str) -> bool:
        """Whether code in *filename* is asyncio's, uvloop's or asyncwatch's own."""
        theirs = self._file_kinds.get(filename)
        if theirs is None:
            if len(self._file_kinds) > 4096:  # exec'd code can invent names
                self._file_kinds.clear()
            theirs = self._file_kinds[filename] = (
                filename.startswith((_ASYNCIO_DIR, _UVLOOP_FILE)) or "/uvloop/" in filename or is_own_file(filename)
            )
        return theirs

    # -- spans ----------------------------------------------------------------

    def promote(self, record: _TaskRecord) -> Any:
        """Make the span of a task that just became notable, from its creation time."""
        with self._lock:
            if record.span is None and self.tracing:
                if not record.created_ns:
                    record.created_ns = now_ns_for(record.created_perf)
                self._start_span(record)
            return record.span

    def watch(self, record: _TaskRecord, task: asyncio.Task[Any]) -> None:
        """Let findings about *task* (named now) find its record."""
        if not record.watched:
            with self._lock:
                record.name = task.get_name()
                record.watched = True
                self._watched[record.name] = record

    def linger(self, record: _TaskRecord) -> None:
        """Keep a finished record findable by name for a while (its task may be freed)."""
        with self._lock:
            self._lingering.append(record)

    def unwatch(self, record: _TaskRecord) -> None:
        with self._lock:
            record.watched = False
            if record.name is not None and self._watched.get(record.name) is record:
                del self._watched[record.name]

    def slow_step(
        self, record: _TaskRecord, task: asyncio.Task[Any], start: float, duration: float, context: Any
    ) -> None:
        """A step at least as long as the lowest threshold: its finding may follow."""
        self.watch(record, task)
        with self._lock:
            record.slow.append((start, duration, context))
            del record.slow[:-16]  # steps under the detector's own threshold never get a finding

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
                record.add_finding(span, finding, finding_ns(finding))
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
