"""Per-task cost in CPU instructions, counted by valgrind's callgrind.

    python benchmarks/instructions.py                  # this interpreter
    python benchmarks/instructions.py --python /path/to/python3.13 --loop uvloop

Wall and even CPU time swing by several percent from run to run on a shared
machine; an instruction count does not.  This runs a ``gather`` of N trivial
two-step tasks twice (N and 3N) under ``valgrind --tool=callgrind`` and
divides the difference by 2N: what one task costs, start-up excluded.  Each
mode isolates one part of asyncwatch's per-task cost:

* ``plain``: asyncio (or uvloop) alone;
* ``python-factory``: a task factory written in Python that makes plain Tasks;
* ``task-subclass``: a Python factory making a subclass of asyncio.Task (the
  kind asyncwatch needs to see ``cancel()``); CPython's C Task takes slower,
  generic paths for any type that is not exactly ``asyncio.Task``;
* ``asyncwatch``: ``asyncwatch.install()`` with every task detector, without
  the slow-callback watchdog: under valgrind the program runs ~50 times
  slower while the watchdog keeps its wall-clock period, which would inflate
  its share fifty-fold (its real cost is what benchmarks/run.py measures);
* ``notable`` and ``all``: the same with ``spans=`` that mode, to an SDK
  tracer provider with a batch processor and an exporter that drops
  everything (no task of the workload is notable: the long-life threshold
  is an hour, since valgrind slows the run some fifty-fold).

``--workload tcp_echo`` or ``--workload producer_consumer`` counts, the same
way, what one echoed line or one processed item of benchmarks/workloads.py
costs (N and 3N of them, three clients or eight consumers).

Requires valgrind (``apt-get install valgrind``).
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile

MODES = ("plain", "python-factory", "task-subclass", "asyncwatch", "notable", "all")

#: The size each workload scales by, and its default N.
UNITS = {"churn": ("tasks", 10_000), "tcp_echo": ("messages", 300), "producer_consumer": ("items", 5_000)}

PROGRAM = r"""
import asyncio, os, sys
mode, loop_name, n, workload = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]

async def two_steps(i):
    await asyncio.sleep(0)
    return i

class SubTask(asyncio.Task):
    __slots__ = ("a", "b", "c")

def python_factory(loop, coro, **kwargs):
    return asyncio.Task(coro, loop=loop, **kwargs)

def subclass_factory(loop, coro, **kwargs):
    return SubTask(coro, loop=loop, **kwargs)

import asyncwatch  # imported in every mode: the same start-up
DETECT = ["task_destroyed_pending", "coroutine_never_awaited", "cancellation_swallowed", "task_exception_unretrieved"]
if mode == "asyncwatch":
    asyncwatch.install(log=False, detect=DETECT)
elif mode in ("notable", "all"):
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult

    class Drop(SpanExporter):
        def export(self, spans):
            return SpanExportResult.SUCCESS

    provider = TracerProvider()
    provider.add_span_processor(BatchSpanProcessor(Drop()))
    # Under valgrind the gather runs ~50 times slower: its tasks would live
    # past the default 1 s and all be notable.  No task is notable here.
    asyncwatch.install(log=False, detect=DETECT, spans=mode, metrics=False, tracer_provider=provider,
                       spans_min_duration_ms=3_600_000)

async def main():
    loop = asyncio.get_running_loop()
    if mode == "python-factory":
        loop.set_task_factory(python_factory)
    elif mode == "task-subclass":
        loop.set_task_factory(subclass_factory)
    if workload == "churn":
        await asyncio.gather(*(two_steps(i) for i in range(n)))
        return
    sys.path.insert(0, os.environ["BENCHMARKS_DIR"])
    import workloads
    chosen = workloads.WORKLOADS[workload]
    unit = {"tcp_echo": "messages", "producer_consumer": "items"}[workload]
    overrides = {unit: n, "timeout_s": 3600} if workload == "tcp_echo" else {unit: n}
    await chosen.run(chosen.sizes(True, overrides))

if loop_name == "uvloop":
    import uvloop
    factory = uvloop.new_event_loop
    if mode in ("asyncwatch", "notable", "all"):
        factory = asyncwatch.loop_factory(factory)
    with asyncio.Runner(loop_factory=factory) as runner:
        runner.run(main())
else:
    asyncio.run(main())
"""


def instructions(python: str, program: str, mode: str, loop: str, n: int, workload: str = "churn") -> int:
    env = dict(os.environ, PYTHONHASHSEED="0", BENCHMARKS_DIR=os.path.dirname(os.path.abspath(__file__)))
    result = subprocess.run(
        [
            "valgrind",
            "--tool=callgrind",
            "--callgrind-out-file=/dev/null",
            python,
            program,
            mode,
            loop,
            str(n),
            workload,
        ],
        capture_output=True,
        text=True,
        env=env,
        check=False,
    )
    match = re.search(r"Collected : (\d+)", result.stderr)
    if result.returncode != 0 or match is None:
        raise SystemExit(f"instructions.py: {mode} failed:\n{result.stderr[-2000:]}")
    return int(match.group(1))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--python", default=sys.executable, help="the interpreter to measure (default: this one)")
    parser.add_argument("--loop", choices=("asyncio", "uvloop"), default="asyncio")
    parser.add_argument("--workload", choices=tuple(UNITS), default="churn")
    parser.add_argument("--tasks", type=int, default=None, help="N (default: 10,000 tasks, 300 lines, 5,000 items)")
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    args = parser.parse_args(argv)
    if shutil.which("valgrind") is None:
        parser.error("valgrind is not installed (apt-get install valgrind)")
    version = subprocess.run(
        [args.python, "-c", "import sys; print(sys.version.split()[0])"], capture_output=True, text=True, check=True
    ).stdout.strip()
    with tempfile.TemporaryDirectory() as tmp:
        program = os.path.join(tmp, "churn.py")
        with open(program, "w", encoding="utf-8") as f:
            f.write(PROGRAM)
        per_task: dict[str, float] = {}
        unit, default_n = UNITS[args.workload]
        n = args.tasks or default_n
        for mode in args.modes:
            small = instructions(args.python, program, mode, args.loop, n, args.workload)
            large = instructions(args.python, program, mode, args.loop, 3 * n, args.workload)
            per_task[mode] = (large - small) / (2 * n)
    what = "task (gather of two-step tasks)" if args.workload == "churn" else f"{unit[:-1]} ({args.workload})"
    print(f"Python {version}, {args.loop}: instructions per {what}")
    base = per_task.get("plain")
    for mode, count in per_task.items():
        extra = f"  {count / base:.3f}x  ({count - base:+,.0f})" if base and mode != "plain" else ""
        print(f"  {mode:<15} {count:>10,.0f}{extra}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
