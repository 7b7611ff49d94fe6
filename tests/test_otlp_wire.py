"""The OTLP wire path end to end: ``asyncwatch run --otlp`` in a subprocess,
sending to a real OTLP/HTTP receiver on 127.0.0.1 that decodes the protobuf.

Everything is local and bounded: the receiver listens on port 0, every
subprocess has a timeout.
"""

from __future__ import annotations

import gzip
import http.server
import json
import os
import socket
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import (
    ExportMetricsServiceRequest,
    ExportMetricsServiceResponse,
)
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)

from conftest import line_of

ROOT = Path(__file__).resolve().parent.parent
SHOP = ROOT / "examples" / "jaeger" / "shop.py"


class Receiver:
    """An OTLP/HTTP receiver: POST /v1/traces and /v1/metrics, protobuf bodies."""

    def __init__(self) -> None:
        self.traces: list[ExportTraceServiceRequest] = []
        self.metrics: list[ExportMetricsServiceRequest] = []
        receiver = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # the http.server API names it
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                if self.headers.get("Content-Encoding") == "gzip":
                    body = gzip.decompress(body)
                if self.path == "/v1/traces":
                    request: Any = ExportTraceServiceRequest()
                    request.ParseFromString(body)
                    receiver.traces.append(request)
                    answer = ExportTraceServiceResponse().SerializeToString()
                elif self.path == "/v1/metrics":
                    request = ExportMetricsServiceRequest()
                    request.ParseFromString(body)
                    receiver.metrics.append(request)
                    answer = ExportMetricsServiceResponse().SerializeToString()
                else:
                    self.send_error(404)
                    return
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", str(len(answer)))
                self.end_headers()
                self.wfile.write(answer)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.endpoint = f"http://127.0.0.1:{self.server.server_port}"
        self.thread = threading.Thread(target=self.server.serve_forever, name="otlp-receiver", daemon=True)

    def spans(self) -> list[tuple[dict[str, Any], Any, Any]]:
        """Every received span as (resource attributes, scope, span)."""
        out = []
        for request in self.traces:
            for resource_spans in request.resource_spans:
                resource = {a.key: a.value.string_value for a in resource_spans.resource.attributes}
                out.extend(
                    (resource, scope_spans.scope, span)
                    for scope_spans in resource_spans.scope_spans
                    for span in scope_spans.spans
                )
        return out

    def metric_names(self) -> set[str]:
        return {
            metric.name
            for request in self.metrics
            for resource_metrics in request.resource_metrics
            for scope_metrics in resource_metrics.scope_metrics
            for metric in scope_metrics.metrics
        }


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    server = Receiver()
    server.thread.start()
    yield server
    server.server.shutdown()
    server.server.server_close()


def run_otlp(
    endpoint: str, script: Path, *args: str, findings: Path, timeout: float = 900
) -> subprocess.CompletedProcess[str]:
    env = {
        **os.environ,
        "OTEL_EXPORTER_OTLP_ENDPOINT": endpoint,
        "OTEL_SERVICE_NAME": "shop-under-test",
        "PYTHONPATH": str(ROOT / "src"),
    }
    for name in list(env):
        if name.startswith("ASYNCWATCH_"):
            del env[name]
    command = [sys.executable, "-m", "asyncwatch", "run", "--otlp", "--findings", str(findings), *args, str(script)]
    return subprocess.run(command, capture_output=True, text=True, env=env, timeout=timeout, cwd=ROOT)


def attrs_of(item: Any) -> dict[str, Any]:
    out = {}
    for attribute in item.attributes:
        value = attribute.value
        out[attribute.key] = getattr(value, value.WhichOneof("value"))
    return out


class TestTracesOverTheWire:
    """The Jaeger example's trace, as a receiver gets it."""

    def test_the_example_trace_arrives_whole(self, receiver, tmp_path):
        """Resource service.name, scope asyncwatch, request span -> task spans, events, and the metrics."""
        findings = tmp_path / "findings.jsonl"
        result = run_otlp(receiver.endpoint, SHOP, "--spans", "all", findings=findings)
        assert result.returncode == 0, result.stderr
        received = receiver.spans()
        assert {resource["service.name"] for resource, _, _ in received} == {"shop-under-test"}
        by_id = {span.span_id: (scope, span) for _, scope, span in received}
        tasks = [span for scope, span in by_id.values() if scope.name == "asyncwatch"]
        assert {scope.version for scope, _ in by_id.values() if scope.name == "asyncwatch"} != {""}
        names = sorted(span.name for span in tasks)
        assert names.count("asyncio.task fetch_price") == 6 and names.count("asyncio.task handle_order") == 4

        def parent_name(span: Any) -> str:
            return by_id[span.parent_span_id][1].name

        for span in tasks:
            if span.name in ("asyncio.task fetch_price", "asyncio.task reserve_stock", "asyncio.task notify_customer"):
                assert parent_name(span) == "POST /orders"
        requests = [span for scope, span in by_id.values() if span.name == "POST /orders"]
        assert {parent_name(span) for span in requests} == {"asyncio.task handle_order"}
        [notify] = [span for span in tasks if span.name == "asyncio.task notify_customer"]
        cancel, swallowed = notify.events
        assert cancel.name == "asyncio.task.cancel_requested"
        assert attrs_of(cancel)["code.line.number"] == line_of("# <- cancelled here", str(SHOP))
        assert attrs_of(cancel)["asyncio.task.cancel_message"] == "order shipped"
        assert swallowed.name == "asyncwatch.cancellation_swallowed"
        assert attrs_of(swallowed)["code.line.number"] == line_of("# <- swallowed here", str(SHOP))
        assert len({span.trace_id for _, span in by_id.values()}) == 1
        assert {"asyncio.task.created", "asyncio.task.finished", "asyncio.task.count"} <= receiver.metric_names()
        # The findings file and the log join the trace.
        kinds = [json.loads(line)["kind"] for line in findings.read_text().splitlines()]
        assert "cancellation_swallowed" in kinds
        assert f"span_id={notify.span_id.hex()}" in result.stderr

    def test_a_program_with_its_own_provider_keeps_it(self, receiver, tmp_path):
        """--otlp sets nothing up when the program configured OpenTelemetry itself: spans go to its provider."""
        app = tmp_path / "own_provider.py"
        app.write_text(
            textwrap.dedent(
                """
                import asyncio
                from opentelemetry import trace
                from opentelemetry.sdk.trace import TracerProvider
                from opentelemetry.sdk.trace.export import SimpleSpanProcessor
                from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

                exporter = InMemorySpanExporter()
                provider = TracerProvider()
                provider.add_span_processor(SimpleSpanProcessor(exporter))
                trace.set_tracer_provider(provider)

                async def main():
                    await asyncio.create_task(asyncio.sleep(0))

                asyncio.run(main())
                print(sorted(s.name for s in exporter.get_finished_spans()))
                """
            )
        )
        result = run_otlp(receiver.endpoint, app, "--spans", "all", "--no-metrics", findings=tmp_path / "f.jsonl")
        assert result.returncode == 0, result.stderr
        assert result.stdout.strip() == "['asyncio.task main', 'asyncio.task sleep']"
        assert receiver.spans() == []


def closed_port() -> int:
    """A port on 127.0.0.1 that nothing listens on (bound, then released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class TestReceiverDown:
    """A receiver that is down never stalls the loop and loses no finding."""

    def test_the_loop_keeps_its_pace_and_every_finding_is_written(self, tmp_path):
        """The loop's worst lag stays small; the findings file is complete; the exit is bounded."""
        app = tmp_path / "busy.py"
        app.write_text(
            textwrap.dedent(
                """
                import asyncio, gc, json, time

                async def swallows():
                    try:
                        await asyncio.sleep(10)
                    except asyncio.CancelledError:
                        pass

                async def fails():
                    raise ValueError("nobody looks")

                async def ticker(lags):
                    loop = asyncio.get_running_loop()
                    for _ in range(40):
                        before = loop.time()
                        await asyncio.sleep(0.01)
                        lags.append(loop.time() - before - 0.01)

                async def main():
                    lags = []
                    tick = asyncio.create_task(ticker(lags))
                    for _ in range(3):
                        task = asyncio.create_task(swallows())
                        await asyncio.sleep(0)
                        task.cancel()
                        await task
                        asyncio.create_task(fails())
                        await asyncio.sleep(0.01)
                        gc.collect()
                    # 2000 spans while the ticker runs: the exporter fails
                    # batch after batch in its own thread meanwhile.
                    for _ in range(40):
                        await asyncio.gather(*(asyncio.sleep(0) for _ in range(50)))
                        await asyncio.sleep(0.005)
                    await tick
                    print(json.dumps({"max_lag": max(lags)}))

                asyncio.run(main())
                """
            )
        )
        findings = tmp_path / "findings.jsonl"
        started = time.monotonic()
        result = run_otlp(f"http://127.0.0.1:{closed_port()}", app, "--spans", "all", findings=findings)
        elapsed = time.monotonic() - started
        assert result.returncode == 0, result.stderr
        # An export on the loop's thread would hold it for the exporter's
        # retry back-off (1 s and more); 0.5 s leaves a loaded machine room.
        assert json.loads(result.stdout)["max_lag"] < 0.5
        kinds = sorted(json.loads(line)["kind"] for line in findings.read_text().splitlines())
        assert kinds == ["cancellation_swallowed"] * 3 + ["task_exception_unretrieved"] * 3
        assert elapsed < 15  # the flush at exit gives up after 5 s
