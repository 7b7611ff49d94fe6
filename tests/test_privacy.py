"""What asyncwatch writes never carries the program's data: coroutine arguments
and local variables stay out of findings, logs and spans.  Only names (of
tasks, coroutines, functions), code locations, and the message the program's
own code gave an exception or a cancellation leave the process."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time

from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from structlog.testing import capture_logs

import asyncwatch
from conftest import gc_collect_harder

ARGUMENT = "ARG-7f3a-secret"  # passed to coroutines
LOCAL = "LOCAL-91c2-secret"  # held in local variables
MESSAGE = "the backend said no"  # the program's own exception message: allowed


async def blocks(token):
    password = LOCAL + token[:0]
    time.sleep(0.15)
    await asyncio.sleep(0)
    return password


async def fails(token):
    api_key = LOCAL  # a secret in a local of the failing frame
    if api_key:
        raise ConnectionError(MESSAGE)


async def waits(token):
    session = {"secret": LOCAL, "token": token}
    try:
        await asyncio.sleep(3600)
    except asyncio.CancelledError:
        return session  # swallowed


async def forgotten(token):
    pass


async def main():
    blocking = asyncio.create_task(blocks(ARGUMENT))
    await blocking
    failing = asyncio.create_task(fails(ARGUMENT))
    await asyncio.sleep(0.01)
    del failing
    swallowing = asyncio.create_task(waits(ARGUMENT))
    await asyncio.sleep(0)
    swallowing.cancel(f"shutting down {ARGUMENT[:0]}")
    await asyncio.sleep(0.01)
    forgotten(ARGUMENT)
    asyncio.create_task(waits(ARGUMENT))  # left pending, reference dropped
    await asyncio.sleep(0)


def test_no_argument_or_local_reaches_any_output(tmp_path):
    """Every kind of finding, with spans on: the findings file, the structlog
    events and every span attribute and event hold neither the coroutines'
    arguments nor their locals; the exception's own message is there."""
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    path = tmp_path / "findings.jsonl"
    with (
        capture_logs() as logs,
        asyncwatch.install(findings=path, spans="all", tracer_provider=provider, report_limit=0) as handle,
    ):
        loop = asyncio.new_event_loop()
        try:
            loop.run_until_complete(main())
            for task in asyncio.all_tasks(loop):
                del task
            gc_collect_harder()
        finally:
            with contextlib.suppress(Exception):
                loop.close()
        gc_collect_harder()
        assert handle is not None
    provider.shutdown()

    found = {json.loads(line)["kind"] for line in path.read_text().splitlines()}
    assert found >= {
        "slow_callback",
        "task_exception_unretrieved",
        "cancellation_swallowed",
        "coroutine_never_awaited",
    }
    outputs = [path.read_text(), json.dumps(logs, default=str)]
    for span in exporter.get_finished_spans():
        outputs.append(json.dumps(dict(span.attributes or {}), default=str))
        outputs.extend(event.name + json.dumps(dict(event.attributes or {}), default=str) for event in span.events)
        outputs.append(span.name + str(span.status.description))
    text = "\n".join(outputs)
    assert ARGUMENT not in text
    assert LOCAL not in text
    assert MESSAGE in text  # what the program said, on purpose, is kept
