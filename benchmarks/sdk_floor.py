"""What the OpenTelemetry SDK alone costs per task for the span ``spans="all"`` makes.

No asyncwatch: a task factory makes, for each task of ``instructions.py``'s
task churn, the SDK calls asyncwatch's task tracer makes, and a done callback
ends the span.  Modes, each counted in CPU instructions by callgrind (N
against 2N tasks, per task, as ``instructions.py`` does):

- ``plain``: asyncio alone;
- ``control``: a done callback per task, nothing else (the baseline of the rest);
- ``bare``: ``start_span(name)`` and ``end()``, nothing more;
- ``link``: a span beginning a trace of its own, linked to a creator span,
  with start and end times (what a churn task's span is in ``"all"`` mode);
- ``full``: ``link`` with the eight attributes ``"all"`` puts on a task's span.

``full`` less ``control``, added to plain asyncio's count, is the floor of
``"all"`` mode on churn: what no change inside asyncwatch can take away while
the spans keep their attributes and links.  Requires valgrind::

    nice -n 10 python benchmarks/sdk_floor.py --tasks 5000
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import subprocess
import sys
import time
from typing import Any

MODES = ("plain", "control", "bare", "link", "full")
ATTRIBUTES = {
    "asyncio.task.state": "finished",
    "code.function.name": "main",
    "code.file.path": "/srv/app/main.py",
    "code.line.number": 3,
    "asyncio.task.steps": 3,
    "asyncio.task.busy_time": 0.000012,
    "asyncio.task.name": "Task-1",
    "asyncio.task.scheduling_delay": 0.00001,
}


def child(mode: str, tasks: int) -> None:
    """Run the task churn with *mode*'s task factory."""
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import workloads
    from opentelemetry import context as otel_context
    from opentelemetry import trace
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult

    class Drop(SpanExporter):
        def export(self, spans: Any) -> SpanExportResult:
            return SpanExportResult.SUCCESS

    provider = TracerProvider()
    provider.add_span_processor(BatchSpanProcessor(Drop()))
    tracer = provider.get_tracer("sdk_floor")
    creator = tracer.start_span("main").get_span_context()
    no_parent = otel_context.Context()

    def factory(loop: asyncio.AbstractEventLoop, coro: Any, **kwargs: Any) -> asyncio.Task[Any]:
        task = asyncio.Task(coro, loop=loop, **kwargs)
        if mode == "control":
            task.add_done_callback(lambda _t: None)
        elif mode == "bare":
            span = tracer.start_span("asyncio.task", context=no_parent)
            task.add_done_callback(lambda _t: span.end())
        else:
            span = tracer.start_span(
                "asyncio.task " + coro.__qualname__,
                context=no_parent,
                start_time=time.time_ns(),
                links=[trace.Link(creator)],
            )

            def done(_task: asyncio.Task[Any]) -> None:
                if mode == "full":
                    span.set_attributes(dict(ATTRIBUTES))
                span.end(end_time=time.time_ns())

            task.add_done_callback(done)
        return task

    async def main() -> None:
        if mode != "plain":
            asyncio.get_running_loop().set_task_factory(factory)
        await workloads.task_churn({"tasks": tasks, "batch": min(tasks, 5000)})

    asyncio.run(main())
    provider.shutdown()


def instructions(mode: str, tasks: int) -> int:
    command = ["valgrind", "--tool=callgrind", "--callgrind-out-file=/dev/null"]
    command += [sys.executable, os.path.abspath(__file__), "--child", mode, "--tasks", str(tasks)]
    env = dict(os.environ, PYTHONHASHSEED="0")
    result = subprocess.run(command, capture_output=True, text=True, env=env, check=False)
    match = re.search(r"Collected : (\d+)", result.stderr)
    if result.returncode != 0 or match is None:
        raise SystemExit(f"{mode} failed:\n{result.stderr[-2000:]}")
    return int(match.group(1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=5000, help="N (default 5000)")
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    parser.add_argument("--child", choices=MODES, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child, args.tasks)
        return
    counts = {}
    for mode in args.modes:
        counts[mode] = (instructions(mode, 2 * args.tasks) - instructions(mode, args.tasks)) / args.tasks
        print(f"{mode:8} {counts[mode]:>10,.0f} instructions per task", flush=True)
    if {"plain", "control", "full"} <= counts.keys():
        floor = counts["plain"] + counts["full"] - counts["control"]
        print(f"floor of spans='all' on churn: {floor:,.0f} ({floor / counts['plain']:.2f}x plain)")


if __name__ == "__main__":
    main()
