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
        self.lock = threading.Lock()
        #: Called after each batch of spans arrives (on the receiver's thread).
        self.on_traces: Any = None
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
                    with receiver.lock:
                        receiver.traces.append(request)
                    if receiver.on_traces is not None:
                        receiver.on_traces()
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
        with self.lock:
            requests = list(self.traces)
        for request in requests:
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
    endpoint: str, script: Path, *args: str, findings: Path, timeout: float = 900, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    env = {
        **os.environ,
        **(env or {}),
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
        # One trace per order: main's gather children begin traces of their own, linked to main.
        [main_span] = [span for span in tasks if span.name == "asyncio.task main"]
        handlers = [span for span in tasks if span.name == "asyncio.task handle_order"]
        assert all(not span.parent_span_id for span in handlers)
        assert all([link.span_id for link in span.links] == [main_span.span_id] for span in handlers)
        assert len({span.trace_id for span in requests}) == 4
        assert len({span.trace_id for _, span in by_id.values()}) == 5
        assert {"asyncio.task.created", "asyncio.task.finished", "asyncio.task.count"} <= receiver.metric_names()
        # The findings file and the log join the trace.
        kinds = [json.loads(line)["kind"] for line in findings.read_text().splitlines()]
        assert "cancellation_swallowed" in kinds
        assert f"span_id={notify.span_id.hex()}" in result.stderr

    def test_in_notable_mode_each_finding_is_in_its_orders_trace(self, receiver, tmp_path):
        """The --otlp default: order 2's block and order 3's swallowed cancellation are in those orders' traces."""
        result = run_otlp(receiver.endpoint, SHOP, "--no-metrics", findings=tmp_path / "findings.jsonl")
        assert result.returncode == 0, result.stderr
        spans = [span for _, _, span in receiver.spans()]
        orders = {attrs_of(span)["order.id"]: span.trace_id for span in spans if span.name == "POST /orders"}
        assert sorted(orders) == [1, 2, 3, 4] and len(set(orders.values())) == 4
        assert {span.trace_id for span in spans} == set(orders.values())  # no trace but the orders'

        def traces_holding(kind: str) -> list[bytes]:
            return [
                span.trace_id
                for span in spans
                if span.name == f"asyncwatch {kind}" or any(e.name == f"asyncwatch.{kind}" for e in span.events)
            ]

        assert traces_holding("slow_callback") == [orders[2]]
        assert traces_holding("cancellation_swallowed") == [orders[3]]
        assert f"trace_id={orders[2].hex()}" in result.stderr

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


SERVER = """
import asyncio, os, sys, time, traceback
from opentelemetry import trace

tracer = trace.get_tracer("server")
REQUESTS = 8


async def lookup(n):
    await asyncio.sleep(0)
    if n == 3:
        time.sleep(0.15)  # <- blocks in the request's task
    return n


async def notify():
    try:
        await asyncio.sleep(10)  # <- swallowed here
    except asyncio.CancelledError:
        pass


async def fails():
    await asyncio.sleep(0)
    raise ValueError("request 5 failed")  # <- fails here


async def handle(reader, writer):
    n = int(await reader.readline())
    with tracer.start_as_current_span("GET /item", attributes={"request.n": n}):
        await asyncio.create_task(lookup(n))
        if n == 4:
            task = asyncio.create_task(notify())
            await asyncio.sleep(0.01)
            task.cancel()
            await task
        if n == 5:
            try:
                await asyncio.create_task(fails())
            except ValueError:
                traceback.print_exc()
        if n == 6:
            time.sleep(0.15)  # <- blocks in the request itself
    writer.write(b"ok\\n")
    await writer.drain()
    writer.close()
    await writer.wait_closed()


async def main():
    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    async with server:
        for n in range(REQUESTS):
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(b"%d\\n" % n)
            assert await reader.readline() == b"ok\\n"
            writer.close()
            await writer.wait_closed()
        # Serve on until the receiver has every request's whole trace (it
        # writes the flag file), so that "while the server runs" is a fact
        # of the run, not of timing; bounded for a receiver that never says so.
        for _ in range(1200):
            if os.path.exists(os.environ["ARRIVED_FLAG"]):
                break
            await asyncio.sleep(0.05)
        print("served")


asyncio.run(main())
"""


def run_instrumented(endpoint: str, script: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """Run *script* under ``opentelemetry-instrument``, exporting traces over OTLP/HTTP to *endpoint*."""
    env = {
        **os.environ,
        **env,
        "OTEL_EXPORTER_OTLP_ENDPOINT": endpoint,
        "OTEL_TRACES_EXPORTER": "otlp_proto_http",
        "OTEL_METRICS_EXPORTER": "none",
        "OTEL_LOGS_EXPORTER": "none",
        "OTEL_SERVICE_NAME": "server-under-test",
        "PYTHONPATH": str(ROOT / "src"),
    }
    for name in list(env):
        if name.startswith("ASYNCWATCH_"):
            del env[name]
    instrument = os.path.join(os.path.dirname(sys.executable), "opentelemetry-instrument")
    command = [instrument, sys.executable, str(script)]
    return subprocess.run(command, capture_output=True, text=True, env=env, timeout=900, cwd=ROOT)


def traces_holding(spans: list[Any], kind: str, line: int) -> list[bytes]:
    """The trace ids of the spans holding the finding of *kind* at *line* (as an event, or as their own)."""
    found = []
    for span in spans:
        holders = [attrs_of(e) for e in span.events if e.name == f"asyncwatch.{kind}"]
        if span.name == f"asyncwatch {kind}":
            holders.append(attrs_of(span))
        if any(h.get("code.line.number") == line for h in holders):
            found.append(span.trace_id)
            assert attrs_of(span)["asyncwatch.has_findings"] is True
    return found


def request_roots_arrived(received: list[Any], count: int) -> bool:
    """Whether *count* request spans and the root span of each one's trace have arrived."""
    spans = [span for _, _, span in received]
    requests = [span for span in spans if span.name == "GET /item"]
    roots = {span.trace_id for span in spans if not span.parent_span_id}
    return len(requests) >= count and all(span.trace_id in roots for span in requests)


class TestAServer:
    """A server's accept loop and its requests, each under a request span, as a receiver gets them."""

    @pytest.mark.parametrize("mode", ["notable", "all", "opentelemetry-instrument"])
    def test_every_request_is_a_trace_of_its_own_with_its_findings(self, receiver, tmp_path, mode):
        """Each request is its own trace, whole while the server runs; its findings carry its trace id;
        no span is asyncio's own; events lie inside their spans; no asyncwatch frame in a traceback.

        Under ``asyncwatch run --otlp`` (notable by default, and all), and under
        ``opentelemetry-instrument`` (which also loads opentelemetry-instrumentation-asyncio
        when it is installed, wrapping every task's coroutine)."""
        app = tmp_path / "server.py"
        app.write_text(SERVER)
        flag = tmp_path / "all-arrived"

        def check() -> None:
            if not flag.exists() and request_roots_arrived(receiver.spans(), 8):
                flag.touch()

        receiver.on_traces = check
        findings = tmp_path / "findings.jsonl"
        spans_option = ["--spans", "all"] if mode == "all" else []  # notable: the --otlp default
        # OTEL_BSP_SCHEDULE_DELAY: export batches promptly (ms).
        env = {"OTEL_BSP_SCHEDULE_DELAY": "50", "ARRIVED_FLAG": str(flag)}
        if mode == "opentelemetry-instrument":
            pytest.importorskip("opentelemetry.distro")  # what configures the SDK for opentelemetry-instrument
            result = run_instrumented(receiver.endpoint, app, env=env)
        else:
            result = run_otlp(receiver.endpoint, app, *spans_option, "--no-metrics", findings=findings, env=env)
        assert result.returncode == 0, result.stderr
        # The flag was written while the server ran, before it stopped waiting.
        assert flag.exists() and result.stdout.strip() == "served"

        spans = [span for _, _, span in receiver.spans()]
        requests = {attrs_of(span)["request.n"]: span for span in spans if span.name == "GET /item"}
        assert sorted(requests) == list(range(8))
        assert len({span.trace_id for span in requests.values()}) == 8
        by_id = {span.span_id: span for span in spans}
        coroutines = {"main", "handle", "lookup", "notify", "fails"}
        ours = [span for span in spans if span.name.startswith("asyncio.task ")]
        assert {span.name.removeprefix("asyncio.task ") for span in ours} <= coroutines
        if mode == "all":
            assert {span.name.removeprefix("asyncio.task ") for span in ours} == coroutines
            # The handler's span begins the request's trace, linked to the task that accepted it.
            [main_span] = [span for span in ours if span.name == "asyncio.task main"]
            for span in requests.values():
                handler = by_id[span.parent_span_id]
                assert handler.name == "asyncio.task handle" and not handler.parent_span_id
                assert [link.span_id for link in handler.links] == [main_span.span_id]

        def trace_of_finding(kind: str, line: int) -> list[bytes]:
            return traces_holding(spans, kind, line)

        assert trace_of_finding("slow_callback", line_of("# <- blocks in the request's task", str(app))) == [
            requests[3].trace_id
        ]
        assert trace_of_finding("slow_callback", line_of("# <- blocks in the request itself", str(app))) == [
            requests[6].trace_id
        ]
        assert trace_of_finding("cancellation_swallowed", line_of("# <- swallowed here", str(app))) == [
            requests[4].trace_id
        ]
        if mode != "opentelemetry-instrument":  # asyncwatch run's log shows the finding's ids
            for n in (3, 4, 6):
                assert f"trace_id={requests[n].trace_id.hex()}" in result.stderr

        outside = [
            (span.name, event.name)
            for span in spans
            for event in span.events
            if not span.start_time_unix_nano <= event.time_unix_nano <= span.end_time_unix_nano
        ]
        assert outside == []

        # The failing task's traceback, as the program printed it and on its span: no asyncwatch frame.
        printed = result.stderr[result.stderr.index("Traceback") :]
        printed = printed[: printed.index("ValueError: request 5 failed")]
        assert "asyncwatch" not in printed and line_of("# <- fails here", str(app)) > 0
        failed = [span for span in ours if span.name == "asyncio.task fails"]
        assert len(failed) == 1 and failed[0].trace_id == requests[5].trace_id
        [exception] = [e for e in failed[0].events if e.name == "exception"]
        stacktrace = attrs_of(exception)["exception.stacktrace"]
        assert "request 5 failed" in stacktrace and "asyncwatch" not in stacktrace
