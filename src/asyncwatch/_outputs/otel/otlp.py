"""``asyncwatch run --otlp``: the OpenTelemetry SDK with OTLP/HTTP exporters.

Needs the ``otlp`` extra; a missing one fails with the command to install it.
"""

from __future__ import annotations

import contextlib
import os
from typing import Any

from opentelemetry import metrics, trace

from ..._core.runtime import report_internal_error, start_hidden_thread
from ..._core.settings import metrics_exported
from .names import INSTALL_OTLP

__all__ = ["OtlpSetup", "check_otlp_installed", "setup_otlp"]


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
        self.metrics = metrics and metrics_exported(os.environ)
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
            with contextlib.suppress(Exception):  # already shut down by the provider: fine
                exporter.shutdown()
        worker.join(0.5)
        return False


def check_otlp_installed() -> None:
    """Raise ImportError, with the command to run, if the ``otlp`` extra is missing."""
    try:
        import opentelemetry.exporter.otlp.proto.http.trace_exporter  # (checks it is there)
        import opentelemetry.sdk.trace  # noqa: F401
    except ImportError as exc:
        raise ImportError(
            f"OTLP export needs the OpenTelemetry SDK and OTLP/HTTP exporter ({exc.name} is missing); "
            f"install them with: {INSTALL_OTLP}"
        ) from None


def setup_otlp(*, metrics: bool = True) -> OtlpSetup:
    """An `OtlpSetup` (not installed yet); ImportError names the extra to install."""
    return OtlpSetup(metrics=metrics)
