"""What asyncwatch costs per unit of work, in CPU instructions counted by valgrind's callgrind.

    python benchmarks/instructions.py                        # this interpreter, both loops, five workloads
    python benchmarks/instructions.py --python python3.11 --python /path/to/python3.13 --jobs 2
    python benchmarks/instructions.py --workloads task_churn --modes plain python-factory task-subclass asyncwatch

Wall and even CPU time swing by several percent from run to run on a shared
machine; an instruction count does not.  Each of `workloads.py`'s four timed
workloads, and ``allocating`` (steps that build containers: a young
collection every ~700, what ``gc.callbacks`` entries cost), runs twice in a
fresh interpreter under ``valgrind --tool=callgrind``, once with N units of
work and once with 2N (tasks, callbacks, echoed messages, queue items,
rounds of 1,000 containers), and the difference divided by N is what one unit costs:
interpreter start-up, imports and set-up cancel out.  The garbage collector
is on, as in a real program, so what asyncwatch's imports leave alive (which
every collection walks again) counts.

Modes:

* ``plain``: asyncio alone (asyncwatch is not even imported);
* ``asyncwatch``: ``asyncwatch.install(log=False, ...)`` with every detector
  except the slow-callback watchdog.  Under valgrind the program runs ~50
  times slower while the watchdog keeps its wall-clock period, which would
  inflate its share fifty-fold; its cost is in wall time, which
  ``benchmarks/run.py`` measures;
* ``uvloop`` and ``asyncwatch-uvloop``: the same on uvloop
  (``asyncwatch.loop_factory(uvloop.new_event_loop)``); the latter's ratio is
  to plain uvloop;
* ``notable`` and ``all`` (asyncio only): ``asyncwatch`` with ``spans=`` that
  mode, to an SDK tracer provider with a batch processor and an exporter that
  drops everything (no task of the workload is notable: the long-life
  threshold is an hour, since valgrind slows the run some fifty-fold);
  ``notable-metrics``: ``notable`` with metrics on as well, to an SDK meter
  provider with no reader (what ``asyncwatch run --otlp`` turns on);
* ``asyncwatch-python`` and ``asyncwatch-python-uvloop``: ``asyncwatch`` and
  ``asyncwatch-uvloop`` without asyncwatch's C extension
  (``ASYNCWATCH_NO_EXTENSIONS=1``): its Task and task factory in Python, as
  where no compiler built it;
* ``watchdog``: the slow-callback watchdog alone (``detect=["slow_callback"]``,
  as run.py's ``asyncwatch-watchdog``), with its threshold stretched fifty-fold
  (5 s) so that the loop's ticks, and any look, come as often per unit of work
  as at the default 100 ms in a real run; the watchdog thread's instructions
  are counted with the loop's.  ``plain-thread``: asyncio and one idle thread,
  what any second thread costs (glibc leaves its single-threaded paths).
  What neither counts is the wall time of handing the GIL over, which a
  watchdog that wakes on a healthy loop would pay (run.py);
* for analysis (``-uvloop`` on uvloop): ``python-factory`` (a task factory
  written in Python that makes plain Tasks) and ``task-subclass`` (one that
  makes a subclass of asyncio.Task: CPython's C Task takes slower, generic
  paths for any type that is not exactly ``asyncio.Task``).

It also prints how many objects tracked by the garbage collector
``import asyncwatch`` plus ``install()`` adds after ``import asyncio``
(``len(gc.get_objects())`` after a full collection, before and after).

Requires valgrind (``apt-get install valgrind``); exit status 1 if a
measurement fails (including a finding in a workload: they are correct code).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Sequence

BENCHMARKS = os.path.dirname(os.path.abspath(__file__))

MODES = (
    "plain",
    "asyncwatch",
    "uvloop",
    "asyncwatch-uvloop",
    "python-factory",
    "task-subclass",
    "python-factory-uvloop",
    "task-subclass-uvloop",
    "notable",
    "all",
    "notable-metrics",
    "plain-thread",
    "watchdog",
    "asyncwatch-python",
    "asyncwatch-python-uvloop",
)
DEFAULT_MODES = MODES[:4]
BASELINE = {mode: "uvloop" if mode.endswith("-uvloop") else "plain" for mode in MODES[1:]}

#: Per workload: its sizes at N, the size that is doubled for 2N, and its unit.
SIZES: dict[str, tuple[dict[str, int], str, str]] = {
    "task_churn": ({"tasks": 20_000, "batch": 5_000}, "tasks", "task"),
    "call_soon": ({"callbacks": 200_000, "chains": 4}, "callbacks", "callback"),
    "tcp_echo": ({"clients": 10, "messages": 300, "payload": 100, "timeout_s": 600}, "messages", "message"),
    "producer_consumer": ({"items": 20_000, "consumers": 8, "concurrency": 4, "maxsize": 10}, "items", "item"),
    "allocating": ({"rounds": 300, "containers": 1_000}, "rounds", "round"),
}
#: How many units the size stands for (tcp_echo: messages per client).
UNITS_PER_SIZE = {"tcp_echo": lambda sizes: sizes["clients"]}

PROGRAM = r"""
import ast, asyncio, sys
sys.path.insert(0, sys.argv[1])
import workloads
mode, name, sizes = sys.argv[2], sys.argv[3], ast.literal_eval(sys.argv[4])
on_uvloop = mode == "uvloop" or mode.endswith("-uvloop")
mode = mode.removesuffix("-uvloop")
if mode == "asyncwatch-python":  # without asyncwatch's C extension
    import os
    os.environ["ASYNCWATCH_NO_EXTENSIONS"] = "1"
    mode = "asyncwatch"

class SubTask(asyncio.Task):
    __slots__ = ("a", "b", "c")

def python_factory(loop, coro, **kwargs):
    return asyncio.Task(coro, loop=loop, **kwargs)

def subclass_factory(loop, coro, **kwargs):
    return SubTask(coro, loop=loop, **kwargs)

collector = None
loop_factory = None
if mode.startswith("asyncwatch"):
    import asyncwatch
    from asyncwatch._outputs.collect import CollectingReporter
    collector = CollectingReporter()
    every_but_the_watchdog = [k.value for k in asyncwatch.FindingKind if k.value not in ("slow_callback", "task_leaked")]
    asyncwatch.install(log=False, reporters=[collector], detect=every_but_the_watchdog)
elif mode in ("notable", "all", "notable-metrics"):
    import asyncwatch
    from asyncwatch._outputs.collect import CollectingReporter
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult

    class Drop(SpanExporter):
        def export(self, spans):
            return SpanExportResult.SUCCESS

    provider = TracerProvider()
    provider.add_span_processor(BatchSpanProcessor(Drop()))
    collector = CollectingReporter()
    every_but_the_watchdog = [k.value for k in asyncwatch.FindingKind if k.value not in ("slow_callback", "task_leaked")]
    # Under valgrind the workload runs ~50 times slower: its tasks would live
    # past the default 1 s and all be notable.  No task is notable here.
    meter_provider = None
    if mode == "notable-metrics":  # the --otlp default: notable spans and metrics
        from opentelemetry.sdk.metrics import MeterProvider
        meter_provider = MeterProvider()
    asyncwatch.install(log=False, reporters=[collector], detect=every_but_the_watchdog,
                       spans=mode.removesuffix("-metrics"), metrics=meter_provider is not None,
                       tracer_provider=provider, meter_provider=meter_provider, spans_min_duration_ms=3_600_000)
elif mode == "plain-thread":
    # A second thread that never runs: once there is one, glibc leaves its
    # single-threaded fast paths for good (run.py's plain-thread row).
    import select, threading
    threading.Thread(target=lambda: select.poll().poll(), daemon=True).start()
elif mode == "watchdog":
    import asyncwatch
    from asyncwatch._outputs.collect import CollectingReporter
    collector = CollectingReporter()
    # The watchdog alone (run.py's asyncwatch-watchdog), its threshold
    # stretched by valgrind's ~50-fold slowdown: the loop's ticks and any
    # look then come as often per unit of work as at the default 100 ms in a
    # real run, and both threads' instructions are counted.
    asyncwatch.install(log=False, reporters=[collector], detect=["slow_callback"], slow_callback_ms=5_000)
if on_uvloop:
    import uvloop
    loop_factory = uvloop.new_event_loop
    if mode == "asyncwatch":
        loop_factory = asyncwatch.loop_factory(loop_factory)

async def main():
    loop = asyncio.get_running_loop()
    if mode == "python-factory":
        loop.set_task_factory(python_factory)
    elif mode == "task-subclass":
        loop.set_task_factory(subclass_factory)
    return await workloads.WORKLOADS[name].run(sizes)

with asyncio.Runner(loop_factory=loop_factory) as runner:
    runner.run(main())
if collector is not None and collector.findings:
    raise SystemExit(f"asyncwatch reported a finding in a correct workload: {collector.findings[0]}")
"""

FOOTPRINT = r"""
import asyncio, gc
gc.collect()
before = len(gc.get_objects())
import asyncwatch
gc.collect()
imported = len(gc.get_objects())
asyncwatch.install()
gc.collect()
print(imported - before, len(gc.get_objects()) - before)
"""


class Failed(Exception):
    """One measurement did not complete."""


def instructions(python: str, program: str, mode: str, workload: str, sizes: dict[str, int]) -> int:
    env = dict(os.environ, PYTHONHASHSEED="0")
    env.pop("PYTHONDEVMODE", None)
    command = ["valgrind", "--tool=callgrind", "--callgrind-out-file=/dev/null", python, program]
    result = subprocess.run(
        [*command, BENCHMARKS, mode, workload, repr(sizes)], capture_output=True, text=True, env=env, check=False
    )
    match = re.search(r"Collected : (\d+)", result.stderr)
    if result.returncode != 0 or match is None:
        raise Failed(f"{workload} under {mode} with {python}:\n{result.stderr[-2000:]}")
    return int(match.group(1))


def footprint(python: str) -> tuple[int, int]:
    """GC-tracked objects that ``import asyncwatch`` and then ``install()`` add after ``import asyncio``."""
    out = subprocess.run([python, "-c", FOOTPRINT], capture_output=True, text=True, check=True).stdout
    imported, installed = (int(x) for x in out.split())
    return imported, installed


def version_of(python: str) -> str:
    code = "import sys; print(sys.version.split()[0])"
    return subprocess.run([python, "-c", code], capture_output=True, text=True, check=True).stdout.strip()


def measure(python: str, program: str, workloads: Sequence[str], modes: Sequence[str], scale: float, jobs: int):
    """{(workload, mode): instructions per unit}, and the failures."""
    runs: dict[tuple[str, str, int], concurrent.futures.Future[int]] = {}
    with concurrent.futures.ThreadPoolExecutor(max_workers=jobs) as pool:
        for workload in workloads:
            base, key, _unit = SIZES[workload]
            for mode in modes:
                for factor in (1, 2):
                    sizes = dict(base)
                    sizes[key] = max(1, round(base[key] * scale)) * factor
                    runs[workload, mode, factor] = pool.submit(instructions, python, program, mode, workload, sizes)
    per_unit: dict[tuple[str, str], float] = {}
    failures: list[str] = []
    for workload in workloads:
        base, key, _unit = SIZES[workload]
        n = max(1, round(base[key] * scale))
        units = n * UNITS_PER_SIZE.get(workload, lambda _s: 1)(base)
        for mode in modes:
            try:
                small, large = runs[workload, mode, 1].result(), runs[workload, mode, 2].result()
            except Failed as exc:
                failures.append(str(exc))
                continue
            per_unit[workload, mode] = (large - small) / units
    return per_unit, failures


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--python", action="append", help="an interpreter to measure (repeatable; default: this one)")
    parser.add_argument("--workloads", nargs="+", choices=tuple(SIZES), default=list(SIZES))
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(DEFAULT_MODES))
    parser.add_argument("--scale", type=float, default=1.0, help="multiply N by this (default 1)")
    parser.add_argument("--jobs", type=int, default=1, help="valgrind runs at once (default 1)")
    args = parser.parse_args(argv)
    if shutil.which("valgrind") is None:
        parser.error("valgrind is not installed (apt-get install valgrind)")
    with tempfile.TemporaryDirectory() as tmp:
        program = os.path.join(tmp, "program.py")
        with open(program, "w", encoding="utf-8") as f:
            f.write(PROGRAM)
        return 1 if report(args, program) else 0


def report(args: argparse.Namespace, program: str) -> bool:
    """Measure and print every interpreter's tables; whether anything failed."""
    failed = False
    for python in args.python or [sys.executable]:
        version = version_of(python)
        imported, installed = footprint(python)
        print(f"Python {version} ({python})")
        print(
            f"  import asyncwatch adds {imported:,} objects tracked by the garbage collector; "
            f"with install(): {installed:,}"
        )
        per_unit, failures = measure(python, program, args.workloads, args.modes, args.scale, args.jobs)
        for failure in failures:
            print(f"  FAILED: {failure}", file=sys.stderr)
            failed = True
        print(f"  instructions per unit of work (N against 2N, callgrind), modes: {', '.join(args.modes)}")
        print(f"  {'workload':<18} {'unit':<9}" + "".join(f" {m:>24}" for m in args.modes))
        for workload in args.workloads:
            cells = []
            for mode in args.modes:
                count = per_unit.get((workload, mode))
                base = per_unit.get((workload, BASELINE.get(mode, "")))
                if count is None:
                    cells.append(f" {'failed':>24}")
                elif base and mode in BASELINE:
                    cells.append(f" {f'{count:,.0f} ({count / base:.3f}x)':>24}")
                else:
                    cells.append(f" {count:>24,.0f}")
            print(f"  {workload:<18} {SIZES[workload][2]:<9}" + "".join(cells))
        sys.stdout.flush()
    return failed


if __name__ == "__main__":
    raise SystemExit(main())
