"""OpenTelemetry: a span for each task's life, findings in place, and metrics.

`Telemetry` is what the engine holds when spans or metrics are on.  It has
three parts:

* `TaskTracer`, the engine's `TaskObserver`: it gives every task a
  `_TaskRecord` (creation time, the creator's OpenTelemetry context, steps,
  busy time) and turns records into spans: at creation in ``"all"`` mode, or
  in ``"notable"`` mode the moment a task becomes notable (a cancellation, a
  finding, an exception, a long life), with the real start time.
* `Telemetry.report`, a `Reporter`: each finding becomes an event on the span
  of the task it concerns, or a short span of its own; the ids of that span
  go into the finding's structlog event (`TracedStructlogReporter`).
* metrics through the metrics API: loop lag from a timer per loop, task
  counts kept as plain integers and read by observable instruments at
  collection time (a synchronous counter costs microseconds per call, and
  the task path is the hot path), findings by kind.

Only ``opentelemetry-api`` is needed here.  Spans and metrics go to the
providers given to `install()`, else to the application's global ones; while
neither is configured (the API's default proxies), asyncwatch does not
observe tasks at all, so that OpenTelemetry costs nothing until it has
somewhere to send to.  `setup_otlp` (``asyncwatch run --otlp``) needs the
``otlp`` extra.
"""

from __future__ import annotations

import asyncio
import collections
import contextvars
import gc
import os
import threading
import time
import traceback
import weakref
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

from opentelemetry import context as otel_context
from opentelemetry import metrics, trace
from opentelemetry.trace import Status, StatusCode

from ._findings import Finding, FindingKind, Site, describe_exception, is_own_file
from ._reporters import StructlogReporter, report_internal_error, start_hidden_thread
from ._tasks import TimedCoroutine, coro_name, coro_of
from ._version import __version__

if TYPE_CHECKING:
    from ._settings import Settings

__all__ = ["Telemetry", "TracedStructlogReporter", "setup_otlp"]

#: The instrumentation scope of every span and instrument.
SCOPE = "asyncwatch"

#: What to run when the ``otlp`` extra is missing.
INSTALL_OTLP = "pip install 'asyncwatch[otlp]'"

# --- names: span, event, attribute and instrument names in one place -------

SPAN_PREFIX = "asyncio.task "
FINDING_SPAN_PREFIX = "asyncwatch "
FINDING_EVENT_PREFIX = "asyncwatch."

ATTR_TASK_NAME = "asyncio.task.name"
ATTR_TASK_STATE = "asyncio.task.state"
ATTR_SCHEDULING_DELAY = "asyncio.task.scheduling_delay"
ATTR_STEPS = "asyncio.task.steps"
ATTR_BUSY_TIME = "asyncio.task.busy_time"
ATTR_CANCEL_MESSAGE = "asyncio.task.cancel_message"
ATTR_CODE_FUNCTION = "code.function.name"
ATTR_CODE_FILE = "code.file.path"
ATTR_CODE_LINE = "code.line.number"
ATTR_FINDING_KIND = "asyncwatch.finding.kind"
ATTR_FINDING_MESSAGE = "asyncwatch.finding.message"
ATTR_FINDING_DURATION = "asyncwatch.finding.duration"
ATTR_FINDING_CANCELLED_BY = "asyncwatch.finding.cancelled_by"
ATTR_FINDING_TASK = "asyncwatch.finding.task"
#: OpenTelemetry's semantic convention for the thread's name.
ATTR_THREAD_NAME = "thread.name"

EVENT_CANCEL_REQUESTED = "asyncio.task.cancel_requested"

STATE_FINISHED = "finished"
STATE_CANCELLED = "cancelled"
STATE_EXCEPTION = "exception"
#: A task garbage-collected while pending (see ``task_destroyed_pending``).
STATE_DESTROYED = "destroyed_pending"
STATES = (STATE_FINISHED, STATE_CANCELLED, STATE_EXCEPTION, STATE_DESTROYED)

METRIC_LOOP_LAG = "asyncio.event_loop.lag"
METRIC_TASKS_CREATED = "asyncio.task.created"
METRIC_TASKS_FINISHED = "asyncio.task.finished"
METRIC_TASKS_ALIVE = "asyncio.task.count"
METRIC_FINDINGS = "asyncwatch.findings"

#: How often each loop's lag is sampled while metrics are on.
LAG_INTERVAL_S = 0.5
# Seconds; the SDK's default buckets are meant for milliseconds.
_LAG_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)

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

# How long the watchdog thread waits for the loop thread to finish timing a
# step it reported as slow (see `Telemetry._match_slow`).
_SLOW_MATCH_WAIT_S = 0.05
# Bounds on what is kept to match findings that come late.
_RECENT_LIMIT = 256


def _now_ns_for(perf: float) -> int:
    """Wall-clock nanoseconds of the ``time.perf_counter()`` reading *perf*.

    Converted relative to now, so that the two clocks drifting apart over
    a long run never skews a span by more than its own length.
    """
    return time.time_ns() - int((time.perf_counter() - perf) * 1e9)


def _site_attributes(site: Site | None) -> dict[str, Any]:
    if site is None:
        return {}
    return {ATTR_CODE_FUNCTION: site.function, ATTR_CODE_FILE: site.file, ATTR_CODE_LINE: site.line}


def _site_text(site: Site) -> str:
    return f"{site.file}:{site.line} in {site.function}"


def _finding_ns(finding: Finding) -> int:
    return int(finding.time.timestamp() * 1e9)


def _finding_attributes(finding: Finding) -> dict[str, Any]:
    attributes: dict[str, Any] = {
        ATTR_FINDING_KIND: finding.kind.value,
        ATTR_FINDING_MESSAGE: finding.message,
        **_site_attributes(finding.site),
    }
    if finding.duration_s is not None:
        attributes[ATTR_FINDING_DURATION] = finding.duration_s
    if finding.cancelled_by is not None:
        attributes[ATTR_FINDING_CANCELLED_BY] = _site_text(finding.cancelled_by)
    if finding.task is not None:
        attributes[ATTR_FINDING_TASK] = finding.task
    if finding.thread is not None:
        attributes[ATTR_THREAD_NAME] = finding.thread
    return attributes


def _provider_configured(provider: Any, unset: tuple[type, ...]) -> bool:
    return provider is not None and not isinstance(provider, unset)


def _unset_meter_providers() -> tuple[type, ...]:
    unset: list[type] = [metrics.NoOpMeterProvider]
    try:  # the API's placeholder until the application sets a provider
        from opentelemetry.metrics._internal import _ProxyMeterProvider

        unset.append(_ProxyMeterProvider)
    except ImportError:  # pragma: no cover - another API layout
        pass
    return tuple(unset)


_UNSET_TRACER_PROVIDERS: tuple[type, ...] = (trace.ProxyTracerProvider, trace.NoOpTracerProvider)
_UNSET_METER_PROVIDERS = _unset_meter_providers()


def _task_context_of(task: asyncio.Task[Any]) -> Any:
    """The `contextvars.Context` *task* runs its steps in.

    ``Task.get_context()`` exists from 3.12.  On 3.11 the C task keeps its
    context in a slot Python cannot name, but the garbage collector can: it
    is the task's only referent of type Context while the task has no done
    callback (true right after creation, when this is called).
    """
    get_context = getattr(task, "get_context", None)
    if get_context is not None:
        return get_context()
    for referent in gc.get_referents(task):
        if type(referent) is contextvars.Context:
            return referent
    return None


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
            attributes = _site_attributes(canceller)
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
            end_ns = _now_ns_for(self.last_end) if self.last_end else time.time_ns()
        span.end(end_time=max(end_ns, self.created_ns))

    def _attributes(self, state: str) -> dict[str, Any]:
        attributes: dict[str, Any] = {
            ATTR_TASK_STATE: state,
            ATTR_STEPS: self.steps,
            ATTR_BUSY_TIME: self.busy,
            **_site_attributes(self.site),
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
            try:
                self.owner.orphaned(self)
            except Exception:  # interpreter shutdown: nothing to do
                pass


class TaskTracer:
    """The engine's task observer: a record per task, spans from records.

    Runs on the threads of the watched loops (and the watchdog's, for
    findings); shared state is touched under a lock, off the per-step path.
    """

    def __init__(self, telemetry: Telemetry, mode: str, min_duration_s: float) -> None:
        self.telemetry = telemetry
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
        self._destroyed: collections.deque[Finding] = collections.deque(maxlen=_RECENT_LIMIT)
        self._handoff = threading.local()
        self.closed = False
        self.failed = False

    # -- TaskObserver ---------------------------------------------------------

    def task_created(self, task: asyncio.Task[Any], created_at: Site | None) -> None:
        """Start the task's record (and, in "all" mode, its span, made current inside the task)."""
        if self.failed:
            wrapper = coro_of(task)
            if type(wrapper) is TimedCoroutine:
                wrapper._aw_observer = None
            return
        try:
            self._task_created(task, created_at)
        except Exception as exc:
            # Raising here would switch off asyncwatch's whole task factory:
            # switch off only this part.
            self.failed = True
            self.tracing = False
            report_internal_error("OpenTelemetry task tracing", exc)

    def _task_created(self, task: asyncio.Task[Any], created_at: Site | None) -> None:
        if self._orphans:
            self.drain()
        all_spans = self.tracing and self.mode == "all"
        now_perf = time.perf_counter()
        now_ns = time.time_ns() if all_spans else 0  # else worked out if a span is ever made
        # A done task here finished eagerly inside create_task: do not ask
        # for its coroutine (gone, or a crash on 3.12.0-3.12.4: gh-122332).
        wrapper = None if task.done() else coro_of(task)
        if type(wrapper) is TimedCoroutine:
            inner = wrapper._aw_inner
            qualname = getattr(inner, "__qualname__", None) or type(inner).__qualname__
            code = getattr(inner, "cr_code", None)
            if code is not None and self._special_file(code.co_filename) and self._internal(code.co_filename, qualname):
                wrapper._aw_observer = None  # asyncio's or asyncwatch's own work: not even timed
                return
            early = wrapper._aw_early
            if early is not None:  # an eager first step already ran: that was the start
                if now_ns:
                    now_ns -= int((now_perf - early[0]) * 1e9)
                now_perf = early[0]
        else:
            wrapper = None
            qualname = coro_name(task) or "<unknown>"  # the factory kept it for eager tasks
            if qualname in _INTERNAL_COROUTINES:
                return
        self.created += 1
        parent = otel_context.get_current() if self.tracing else None
        record = _TaskRecord(self, qualname, created_at, parent, now_ns, now_perf)
        if all_spans:
            span = self.tracer.start_span(SPAN_PREFIX + qualname, context=parent, start_time=now_ns)
            record.span = span
            task_context = _task_context_of(task)
            if task_context is not None:
                # The task copied its creator's context at creation; setting
                # the span in that copy makes it current in every later step.
                task_context.run(otel_context.attach, trace.set_span_in_context(span, parent))
        if wrapper is not None:
            wrapper._aw_observer = record
        else:
            self._handoff.pending = (id(task), record)

    def task_step(self, task: asyncio.Task[Any], start: float, duration: float) -> None:
        """An eager task's first step, told after creation."""
        record = self._record_of(task)
        if record is not None:
            record.task_step(task, start, duration)

    def task_cancel_requested(self, task: asyncio.Task[Any], canceller: Site | None, message: Any) -> None:
        """Forward to the task's record."""
        record = self._record_of(task)
        if record is not None:
            record.task_cancel_requested(task, canceller, message)

    def task_done(self, task: asyncio.Task[Any]) -> None:
        """An eager task that finished inside ``create_task``."""
        record = self._record_of(task)
        if record is not None:
            self._handoff.pending = None
            record.task_done(task)

    def _record_of(self, task: asyncio.Task[Any]) -> _TaskRecord | None:
        pending = getattr(self._handoff, "pending", None)
        if pending is not None and pending[0] == id(task):
            return pending[1]  # type: ignore[no-any-return]
        wrapper = coro_of(task)
        observer = getattr(wrapper, "_aw_observer", None) if type(wrapper) is TimedCoroutine else None
        return observer if isinstance(observer, _TaskRecord) else None

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
                    record.created_ns = _now_ns_for(record.created_perf)
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
            while len(self._failed) > _RECENT_LIMIT:
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
                    FINDING_EVENT_PREFIX + finding.kind.value, _finding_attributes(finding), _finding_ns(finding)
                )
            record.finish(STATE_DESTROYED, None, _finding_ns(finding) if finding else time.time_ns())

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


# --- loop lag ---------------------------------------------------------------


class _LagProbe:
    """A timer per loop: how late it fires is how long callbacks waited."""

    __slots__ = ("enabled", "expected", "histogram", "interval", "loop_ref")

    def __init__(self, loop: asyncio.AbstractEventLoop, histogram: Any, interval: float) -> None:
        self.loop_ref = weakref.ref(loop)
        self.histogram = histogram
        self.interval = interval
        self.enabled = True
        self.expected = 0.0

    def alive(self) -> bool:
        loop = self.loop_ref()
        return self.enabled and loop is not None and not loop.is_closed()

    def schedule(self) -> None:
        loop = self.loop_ref()
        if loop is None or loop.is_closed() or not self.enabled:
            return
        self.expected = loop.time() + self.interval
        loop.call_at(self.expected, self.tick)

    def tick(self) -> None:
        loop = self.loop_ref()
        if loop is None or not self.enabled:
            return
        try:
            # Timers may fire up to the clock's resolution early: never negative.
            self.histogram.record(max(0.0, loop.time() - self.expected))
        except Exception as exc:
            self.enabled = False
            report_internal_error("OpenTelemetry loop lag", exc)
            return
        self.schedule()


# --- the whole -----------------------------------------------------------------


class Telemetry:
    """asyncwatch's OpenTelemetry side, as the engine sees it.

    *settings* gives ``spans``, ``spans_min_duration_ms`` and ``metrics``;
    *tracer_provider* / *meter_provider* override the global providers.
    """

    def __init__(
        self,
        settings: Settings,
        *,
        tracer_provider: Any = None,
        meter_provider: Any = None,
        lag_interval_s: float | None = None,
    ) -> None:
        self.spans = settings.spans
        self.metrics_wanted = settings.metrics
        self.tracer_provider = tracer_provider
        self.meter_provider = meter_provider
        self.lag_interval_s = LAG_INTERVAL_S if lag_interval_s is None else lag_interval_s
        #: Called once, when a loop is attached and no provider is configured
        #: (``asyncwatch run --otlp`` sets up the SDK this way, so that a
        #: program that configures OpenTelemetry itself keeps its own).
        self.fallback: Callable[[], None] | None = None
        self.tracer_observer = TaskTracer(self, settings.spans, settings.spans_min_duration_ms / 1000)
        self._metering = False
        self._findings_counter: Any = None
        self._lag_histogram: Any = None
        self._probes: list[_LagProbe] = []
        self._ids: dict[int, tuple[Finding, str, str]] = {}
        self._lock = threading.Lock()

    # -- engine side ------------------------------------------------------------

    def observer_for_loop(self, loop: asyncio.AbstractEventLoop, settings: Settings) -> TaskTracer | None:
        """The task observer for a loop being attached, or None while there is
        nowhere to send spans or task metrics (nothing is observed then)."""
        self._activate()
        tracer = self.tracer_observer
        if FindingKind.SLOW_CALLBACK in settings.detect:
            tracer.slow_floor_s = min(tracer.slow_floor_s, settings.slow_callback_s)
        if self._metering and self._lag_histogram is not None:
            probe = _LagProbe(loop, self._lag_histogram, self.lag_interval_s)
            self._probes = [p for p in self._probes if p.alive()]  # loops come and go (tests)
            self._probes.append(probe)
            try:
                probe.schedule()
            except RuntimeError:  # a closed loop
                pass
        return tracer if tracer.tracing or self._metering else None

    def _activate(self) -> None:
        """Start tracing and metering as soon as a provider is there to take them."""
        tracer = self.tracer_observer
        if (self.spans == "off" or tracer.tracing) and (not self.metrics_wanted or self._metering):
            return
        if self.fallback is not None and not self._configured():
            fallback, self.fallback = self.fallback, None
            fallback()
        if self.spans != "off" and not tracer.tracing:
            provider = self.tracer_provider or trace.get_tracer_provider()
            if _provider_configured(provider, _UNSET_TRACER_PROVIDERS):
                tracer.tracer = trace.get_tracer(SCOPE, __version__, tracer_provider=provider)
                tracer.tracing = True
        if self.metrics_wanted and not self._metering:
            provider = self.meter_provider or metrics.get_meter_provider()
            if _provider_configured(provider, _UNSET_METER_PROVIDERS):
                self._start_metrics(metrics.get_meter(SCOPE, __version__, meter_provider=provider))

    def _configured(self) -> bool:
        return _provider_configured(
            self.tracer_provider or trace.get_tracer_provider(), _UNSET_TRACER_PROVIDERS
        ) or _provider_configured(self.meter_provider or metrics.get_meter_provider(), _UNSET_METER_PROVIDERS)

    def _start_metrics(self, meter: Any) -> None:
        tracer = self.tracer_observer

        def created(_options: Any) -> Iterable[metrics.Observation]:
            yield metrics.Observation(tracer.created)

        def finished(_options: Any) -> Iterable[metrics.Observation]:
            for state, count in list(tracer.finished.items()):
                yield metrics.Observation(count, {ATTR_TASK_STATE: state})

        def alive(_options: Any) -> Iterable[metrics.Observation]:
            yield metrics.Observation(tracer.created - sum(tracer.finished.values()))

        try:
            self._lag_histogram = meter.create_histogram(
                METRIC_LOOP_LAG,
                unit="s",
                description="How late a timer on the event loop ran: how long ready callbacks waited",
                explicit_bucket_boundaries_advisory=_LAG_BUCKETS,
            )
        except TypeError:  # opentelemetry-api < 1.23 has no bucket advice
            self._lag_histogram = meter.create_histogram(METRIC_LOOP_LAG, unit="s")
        meter.create_observable_counter(METRIC_TASKS_CREATED, [created], unit="{task}", description="Tasks created")
        meter.create_observable_counter(
            METRIC_TASKS_FINISHED, [finished], unit="{task}", description="Tasks finished, by final state"
        )
        meter.create_observable_up_down_counter(
            METRIC_TASKS_ALIVE, [alive], unit="{task}", description="Tasks created and not finished yet"
        )
        self._findings_counter = meter.create_counter(
            METRIC_FINDINGS, unit="{finding}", description="asyncwatch findings, by kind"
        )
        self._metering = True

    def close(self) -> None:
        """Stop the lag timers; end the spans of tasks destroyed meanwhile."""
        for probe in self._probes:
            probe.enabled = False
        self._probes.clear()
        tracer = self.tracer_observer
        try:
            tracer.drain()
        finally:
            tracer.closed = True

    # -- Reporter ---------------------------------------------------------------

    def held_back(self, finding: Finding) -> None:
        """A finding the report limit kept from the logs and spans: counted all the same."""
        counter = self._findings_counter
        if counter is not None:
            counter.add(1, {ATTR_FINDING_KIND: finding.kind.value})

    def report(self, finding: Finding) -> None:
        """Count the finding; put it on its task's span, or on a short span of its own."""
        counter = self._findings_counter
        if counter is not None:
            counter.add(1, {ATTR_FINDING_KIND: finding.kind.value})
        tracer = self.tracer_observer
        if not tracer.tracing:
            return
        try:
            span = self._span_for(finding)
        except Exception as exc:
            # Stop tracing, but stay in the pipeline: the findings counter goes on.
            tracer.tracing = False
            report_internal_error("OpenTelemetry task tracing", exc)
            return
        if span is not None:
            context = span.get_span_context()
            if context.is_valid:
                self._remember_ids(finding, context)

    def _span_for(self, finding: Finding) -> Any:
        tracer = self.tracer_observer
        kind = finding.kind
        record = self._match_slow(finding) if kind is FindingKind.SLOW_CALLBACK else tracer.find(finding)
        if record is not None and record.state is None:
            span = record.span if record.span is not None else tracer.promote(record)
            if span is not None and span.is_recording():
                span.add_event(FINDING_EVENT_PREFIX + kind.value, _finding_attributes(finding), _finding_ns(finding))
            return span
        if kind is FindingKind.TASK_DESTROYED_PENDING and record is None:
            # Its task's record is freed right after (see _TaskRecord.__del__):
            # the event goes on the span then.
            tracer.destroyed_finding(finding)
            return None
        parent = otel_context.get_current()
        context = record.span.get_span_context() if record is not None and record.span is not None else None
        if context is None and kind is FindingKind.TASK_EXCEPTION_UNRETRIEVED:
            context = tracer.failed_span_context(finding)
        if context is not None:
            parent = trace.set_span_in_context(trace.NonRecordingSpan(context))
        return self._finding_span(finding, parent)

    def _match_slow(self, finding: Finding) -> _TaskRecord | None:
        """The record of the task whose step *finding* reports as slow."""
        tracer = self.tracer_observer
        if finding.task is None:
            return None
        deadline = time.monotonic() + _SLOW_MATCH_WAIT_S
        while True:
            record = tracer.find(finding)
            if record is not None and record.slow_steps > 0:
                with tracer._lock:
                    record.slow_steps -= 1
                return record
            # The watchdog thread can report the step while the loop thread
            # is still timing it (a few bytecodes away from telling us).  Only
            # a thread that runs no loop may wait for that, and only briefly;
            # on the loop thread the step has always been told already.
            if asyncio._get_running_loop() is not None or time.monotonic() >= deadline:
                return None
            time.sleep(0.001)

    def _finding_span(self, finding: Finding, parent: Any) -> Any:
        """A short span for a finding no task span can take (its own start and end)."""
        end_ns = _finding_ns(finding)
        start_ns = end_ns - int((finding.duration_s or 0.0) * 1e9)
        span = self.tracer_observer.tracer.start_span(
            FINDING_SPAN_PREFIX + finding.kind.value,
            context=parent,
            start_time=start_ns,
            attributes=_finding_attributes(finding),
        )
        span.end(end_time=end_ns)
        return span

    def _remember_ids(self, finding: Finding, context: Any) -> None:
        with self._lock:
            if len(self._ids) >= _RECENT_LIMIT:  # nobody takes them (structlog off)
                del self._ids[next(iter(self._ids))]
            self._ids[id(finding)] = (
                finding,
                trace.format_trace_id(context.trace_id),
                trace.format_span_id(context.span_id),
            )

    def trace_ids(self, finding: Finding) -> dict[str, str]:
        """``trace_id`` and ``span_id`` of the span *finding* went to, if any."""
        with self._lock:
            entry = self._ids.pop(id(finding), None)
        if entry is None or entry[0] is not finding:
            return {}
        return {"trace_id": entry[1], "span_id": entry[2]}

    def structlog_reporter(self, fallback: str | None) -> StructlogReporter:
        return TracedStructlogReporter(self, fallback=fallback)


class TracedStructlogReporter(StructlogReporter):
    """`StructlogReporter` whose events carry the ``trace_id`` and ``span_id``
    of the span the finding went to, so logs and traces join.

    The engine adds the `Telemetry` reporter before this one: it has placed
    the finding by the time this runs.
    """

    def __init__(self, telemetry: Telemetry, fallback: str | None = None) -> None:
        super().__init__(fallback=fallback)
        self._telemetry = telemetry

    def fields(self, finding: Finding) -> dict[str, Any]:
        fields = super().fields(finding)
        fields.update(self._telemetry.trace_ids(finding))
        return fields


# --- asyncwatch run --otlp -----------------------------------------------------


class OtlpSetup:
    """The OpenTelemetry SDK with OTLP/HTTP exporters, for ``asyncwatch run --otlp``.

    The standard variables configure it: ``OTEL_EXPORTER_OTLP_ENDPOINT`` (and
    the per-signal ones), ``OTEL_SERVICE_NAME`` / ``OTEL_RESOURCE_ATTRIBUTES``,
    ``OTEL_TRACES_SAMPLER`` / ``OTEL_TRACES_SAMPLER_ARG``; ``OTEL_TRACES_EXPORTER``
    or ``OTEL_METRICS_EXPORTER`` set to ``none`` leaves that signal out (a
    receiver for traces only, such as Jaeger, answers metrics with 404).
    """

    #: The most that flushing at exit may hold the program's exit (a
    #: receiver that is down makes the exporter retry for longer).
    FLUSH_TIMEOUT_S = 5.0

    def __init__(self, *, metrics: bool = True) -> None:
        check_otlp_installed()
        self.traces = os.environ.get("OTEL_TRACES_EXPORTER", "").strip().lower() != "none"
        self.metrics = metrics and os.environ.get("OTEL_METRICS_EXPORTER", "").strip().lower() != "none"
        self.tracer_provider: Any = None
        self.meter_provider: Any = None
        self._exporters: list[Any] = []

    def install(self) -> None:
        """Set up the SDK and make its providers the global ones."""
        from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
        from opentelemetry.sdk.metrics import MeterProvider
        from opentelemetry.sdk.metrics.export import PeriodicExportingMetricReader
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor

        resource = Resource.create()  # OTEL_SERVICE_NAME, OTEL_RESOURCE_ATTRIBUTES
        # shutdown_on_exit=False: `shutdown` below does it, bounded.
        if self.traces:
            span_exporter = OTLPSpanExporter()
            self._exporters.append(span_exporter)
            self.tracer_provider = TracerProvider(resource=resource, shutdown_on_exit=False)
            self.tracer_provider.add_span_processor(BatchSpanProcessor(span_exporter))
            trace.set_tracer_provider(self.tracer_provider)
        if self.metrics:
            metric_exporter = OTLPMetricExporter()
            self._exporters.append(metric_exporter)
            reader = PeriodicExportingMetricReader(metric_exporter)
            self.meter_provider = MeterProvider(resource=resource, metric_readers=[reader], shutdown_on_exit=False)
            metrics.set_meter_provider(self.meter_provider)

    def shutdown(self, timeout_s: float | None = None) -> bool:
        """Flush and shut down, for at most *timeout_s*; return whether it finished.

        Runs in a helper thread: the SDK's shutdown waits for its export
        thread, which retries a receiver that is down for up to its own
        timeout.  Past the deadline the exporters are told to stop retrying.
        """
        providers = [p for p in (self.tracer_provider, self.meter_provider) if p is not None]
        if not providers:
            return True
        timeout = self.FLUSH_TIMEOUT_S if timeout_s is None else timeout_s

        def shut() -> None:
            for provider in providers:
                try:
                    provider.shutdown()
                except Exception as exc:
                    report_internal_error("OpenTelemetry shutdown", exc)

        worker = start_hidden_thread(shut, "asyncwatch-otlp-flush")
        worker.join(timeout)
        if not worker.is_alive():
            return True
        for exporter in self._exporters:
            try:
                exporter.shutdown()
            except Exception:  # already shut down by the provider: fine
                pass
        worker.join(0.5)
        return False


def check_otlp_installed() -> None:
    """Raise ImportError, with the command to run, if the ``otlp`` extra is missing."""
    try:
        import opentelemetry.exporter.otlp.proto.http.trace_exporter  # noqa: F401  (checks it is there)
        import opentelemetry.sdk.trace  # noqa: F401
    except ImportError as exc:
        raise ImportError(
            f"OTLP export needs the OpenTelemetry SDK and OTLP/HTTP exporter ({exc.name} is missing); "
            f"install them with: {INSTALL_OTLP}"
        ) from None


def setup_otlp(*, metrics: bool = True) -> OtlpSetup:
    """An `OtlpSetup` (not installed yet); ImportError names the extra to install."""
    return OtlpSetup(metrics=metrics)
