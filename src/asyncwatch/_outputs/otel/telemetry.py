"""OpenTelemetry as the engine sees it: activation, findings on spans, metrics.

`Telemetry` is what the engine holds when spans or metrics are on:

* its `TaskTracer` (spans.py) is one more plug-in in the loops' hooks;
* `Telemetry.place` is a step of the pipeline's enrichment stage: each
  finding becomes an event on the span of the task it concerns, or a short
  span of its own, and carries that span's ids on to the later outputs;
* metrics through the metrics API: loop lag from a timer per loop (lag.py),
  task counts kept as plain integers and read by observable instruments at
  collection time (a synchronous counter costs microseconds per call, and
  the task path is the hot path), findings by kind (`Telemetry.report`).

Only ``opentelemetry-api`` is needed here.  Spans and metrics go to the
providers given to `install()`, else to the application's global ones; while
neither is configured (the API's default proxies), asyncwatch does not
observe tasks at all, so that OpenTelemetry costs nothing until it has
somewhere to send to.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import threading
import time
from collections.abc import Callable, Iterable
from typing import Any

from opentelemetry import context as otel_context
from opentelemetry import metrics, trace

from ..._core.findings import Finding, FindingKind
from ..._core.runtime import report_internal_error
from ..._core.settings import Settings
from ..._version import __version__
from .lag import LAG_BUCKETS, LagProbe
from .names import (
    ATTR_FINDING_KIND,
    ATTR_HAS_FINDINGS,
    ATTR_TASK_STATE,
    FINDING_SPAN_PREFIX,
    METRIC_FINDINGS,
    METRIC_LOOP_LAG,
    METRIC_TASKS_ALIVE,
    METRIC_TASKS_CREATED,
    METRIC_TASKS_FINISHED,
    SCOPE,
    STATES,
    finding_attributes,
    finding_ns,
)
from .notable import NotableTracer
from .spans import TaskTracer, _TaskRecord, now_ns_for

__all__ = ["LAG_INTERVAL_S", "Telemetry"]

#: How often each loop's lag is sampled while metrics are on.
LAG_INTERVAL_S = 0.5

# How long the watchdog thread waits for the loop thread to finish timing a
# step it reported as slow (see `Telemetry._match_slow`).
_SLOW_MATCH_WAIT_S = 0.05


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
        # Notable spans need nothing from a task that never becomes notable
        # (`NotableTracer`), and neither do the metrics' task counts, which
        # it keeps from each task's creation and its being freed: with
        # spans "off" it only counts.  Only "all" times every task's steps.
        tracer_class = TaskTracer if settings.spans == "all" else NotableTracer
        self.task_tracer = tracer_class(settings.spans, settings.spans_min_duration_ms / 1000)
        # The last value of each task counter read by a collection: a
        # counter never goes back, whatever a reading racing the loops' threads saw.
        self._reported: dict[str | None, int] = {}
        self._reported_lock = threading.Lock()
        self._metering = False
        self._findings_counter: Any = None
        self._lag_histogram: Any = None
        self._probes: list[LagProbe] = []

    # -- engine side ------------------------------------------------------------

    def observer_for_loop(self, loop: asyncio.AbstractEventLoop, settings: Settings) -> TaskTracer | None:
        """The task observer for a loop being attached, or None while there is
        nowhere to send spans or task metrics (nothing is observed then)."""
        self._activate()
        tracer = self.task_tracer
        if FindingKind.SLOW_CALLBACK in settings.detect:
            tracer.slow_floor_s = min(tracer.slow_floor_s, settings.slow_callback_s)
        if self._metering and self._lag_histogram is not None:
            probe = LagProbe(loop, self._lag_histogram, self.lag_interval_s)
            self._probes = [p for p in self._probes if p.alive()]  # loops come and go (tests)
            self._probes.append(probe)
            with contextlib.suppress(RuntimeError):  # a closed loop
                probe.schedule()
        return tracer if tracer.tracing or self._metering else None

    def _activate(self) -> None:
        """Start tracing and metering as soon as a provider is there to take them."""
        tracer = self.task_tracer
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

    def _task_counts(self) -> tuple[int, dict[str, int]]:
        """Tasks created, and finished by final state, as the task tracer
        counts them; never less than a collection already reported."""
        try:
            created, finished = self.task_tracer.task_counts()
        except Exception as exc:  # counting is asyncwatch's: the last values stand
            report_internal_error("OpenTelemetry task counts", exc)
            created, finished = 0, {}
        with self._reported_lock:
            reported = self._reported
            created = reported[None] = max(created, reported.get(None, 0))
            for state in STATES:
                finished[state] = reported[state] = max(finished.get(state, 0), reported.get(state, 0))
        return created, finished

    def _start_metrics(self, meter: Any) -> None:
        if isinstance(self.task_tracer, NotableTracer):
            self.task_tracer.count_tasks()

        def created(_options: Any) -> Iterable[metrics.Observation]:
            yield metrics.Observation(self._task_counts()[0])

        def finished(_options: Any) -> Iterable[metrics.Observation]:
            for state, count in self._task_counts()[1].items():
                yield metrics.Observation(count, {ATTR_TASK_STATE: state})

        def alive(_options: Any) -> Iterable[metrics.Observation]:
            created, finished = self._task_counts()
            yield metrics.Observation(max(0, created - sum(finished.values())))

        try:
            self._lag_histogram = meter.create_histogram(
                METRIC_LOOP_LAG,
                unit="s",
                description="How late a timer on the event loop ran: how long ready callbacks waited",
                explicit_bucket_boundaries_advisory=LAG_BUCKETS,
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
        tracer = self.task_tracer
        try:
            tracer.drain()
        finally:
            tracer.closed = True

    # -- the pipeline: an enricher and a counting reporter ------------------------

    #: As a reporter it counts findings for the metrics: every one, those the
    #: report limit holds back from the logs and spans included.
    receives_all = True

    def report(self, finding: Finding) -> None:
        """Count the finding (``asyncwatch.findings``, by kind)."""
        counter = self._findings_counter
        if counter is not None:
            counter.add(1, {ATTR_FINDING_KIND: finding.kind.value})

    def place(self, finding: Finding) -> Finding:
        """The enrichment step: put *finding* on its task's span, or on a short
        span of its own; return it with that span's ``trace_id`` and ``span_id``
        in ``extra``, so that logs and traces join."""
        tracer = self.task_tracer
        if not tracer.tracing:
            return finding
        try:
            span = self._span_for(finding)
        except Exception as exc:
            # Stop tracing, but stay in the pipeline: the findings counter goes on.
            tracer.tracing = False
            report_internal_error("OpenTelemetry task tracing", exc)
            return finding
        if span is None:
            return finding
        context = span.get_span_context()
        if not context.is_valid:
            return finding
        ids = (
            ("trace_id", trace.format_trace_id(context.trace_id)),
            ("span_id", trace.format_span_id(context.span_id)),
        )
        return dataclasses.replace(finding, extra=(*finding.extra, *ids))

    def _span_for(self, finding: Finding) -> Any:
        tracer = self.task_tracer
        kind = finding.kind
        at_ns = finding_ns(finding)
        record: _TaskRecord | None
        if kind is FindingKind.SLOW_CALLBACK:
            match = self._match_slow(finding)
            if match is not None:
                record, (start, _duration, context) = match
                # The event marks the start of the block (in notable mode, where
                # the watchdog first saw it: steps are not timed); its duration
                # is an attribute.
                return self._place_slow(finding, record, now_ns_for(start), context)
            record = None
        else:
            record = tracer.find(finding)
        if record is not None and record.state is None:
            span = record.span if record.span is not None else tracer.promote(record)
            if span is not None and span.is_recording():
                record.add_finding(span, finding, at_ns)
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

    def _place_slow(self, finding: Finding, record: _TaskRecord, at_ns: int, context: Any) -> Any:
        """A slow step of a task goes where the program was: on the task's
        span when that is in the trace of the span current during the step,
        else (notable mode, a request span opened inside the task) on a short
        span under the current one, so that the request's trace holds it."""
        tracer = self.task_tracer
        where = trace.get_current_span(context).get_span_context()
        if record.state is None:
            if record.span is not None:
                trace_id = record.span.get_span_context().trace_id
            else:
                trace_id = trace.get_current_span(record.parent).get_span_context().trace_id
            if not where.is_valid or where.trace_id == trace_id:
                span = record.span if record.span is not None else tracer.promote(record)
                if span is not None and span.is_recording():
                    record.add_finding(span, finding, at_ns)
                return span
        return self._finding_span(finding, context if where.is_valid else otel_context.get_current(), at_ns)

    def _match_slow(self, finding: Finding) -> tuple[_TaskRecord, tuple[float, float, Any]] | None:
        """The record of the task whose step *finding* reports as slow, and that step."""
        tracer = self.task_tracer
        if finding.task is None:
            return None
        deadline = time.monotonic() + _SLOW_MATCH_WAIT_S
        while True:
            record = tracer.find(finding)
            if record is not None and record.slow:
                with tracer._lock:
                    if record.slow:
                        # The step nearest in length (the detector times the
                        # whole callback, a little longer than the step).
                        # Untimed (duration -1, notable mode): the oldest.
                        taken = min(
                            record.slow,
                            key=lambda step: abs(step[1] - (finding.duration_s or 0.0)) if step[1] >= 0 else 0.0,
                        )
                        record.slow.remove(taken)
                        return record, taken
            # The watchdog thread can report the step while the loop thread
            # is still timing it (a few bytecodes away from telling us).  Only
            # a thread that runs no loop may wait for that, and only briefly;
            # on the loop thread the step has always been told already.
            if asyncio._get_running_loop() is not None or time.monotonic() >= deadline:
                return None
            time.sleep(0.001)

    def _finding_span(self, finding: Finding, parent: Any, start_ns: int | None = None) -> Any:
        """A short span for a finding no task span can take (its own start and end)."""
        duration_ns = int((finding.duration_s or 0.0) * 1e9)
        if start_ns is None:
            end_ns = finding_ns(finding)
            start_ns = end_ns - duration_ns
        else:
            end_ns = start_ns + duration_ns
        span = self.task_tracer.tracer.start_span(
            FINDING_SPAN_PREFIX + finding.kind.value,
            context=parent,
            start_time=start_ns,
            attributes={**finding_attributes(finding), ATTR_HAS_FINDINGS: True},
        )
        span.end(end_time=end_ns)
        return span
