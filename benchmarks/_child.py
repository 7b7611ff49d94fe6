"""Run one workload in one mode, in this (fresh) process, and print the result as JSON.

    python benchmarks/_child.py --workload task_churn --mode asyncwatch [--size tasks=1000] [--smoke]
    python benchmarks/_child.py --probe

`run.py` and `memory.py` start one of these per measurement.  The last line on
stdout is one JSON object: ``elapsed_s`` is the wall time (``cpu_s`` the CPU
time of every thread of the process, asyncwatch's watchdog included) of
``runner.run(workload)`` alone (the loop's creation included; interpreter
start-up, imports, mode set-up, the warm-up and the loop's closing excluded),
``peak_rss_bytes`` the process's peak RSS, ``info`` what the workload
reports.

The warm-up: before the timed run, the workload runs once with its smoke
sizes, in the same mode, on a loop of its own.  Without it the first run in a
process measures the C library's allocator as much as the event loop: glibc
maps and unmaps asyncio's 256 KiB ``recv()`` buffers (page faults on every
receive) until its dynamic mmap threshold adjusts, and how soon it does
depends on what the process did before, so the cold TCP echo ran 2.3x faster
under one mode than under another for no reason of theirs.  The
warm-up puts every mode in the steady state a long-running program is in.

Exit status: 0 success; 3 the workload produced asyncwatch findings (a false
positive: the workloads are correct code); 4 the mode is not available here;
anything else is a crash.  ``--probe`` prints which modes are available.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import workloads

EXIT_FINDINGS = 3
EXIT_UNAVAILABLE = 4

#: Every mode, in the order tables show them.
MODES: tuple[str, ...] = (
    "plain",
    "plain-thread",
    "asyncwatch",
    "asyncwatch-watchdog",
    "asyncwatch-spans",
    "debug",
    "uvloop",
    "asyncwatch-uvloop",
    "aiodebug",
    "logfire",
    "otel-asyncio",
)

#: What each mode is, for the tables and the README.
MODE_DESCRIPTIONS: dict[str, str] = {
    "plain": "asyncio, nothing else",
    "plain-thread": "asyncio and one idle thread (blocked in poll): what any second thread costs, a watchdog's floor",
    "asyncwatch": "asyncwatch.install(log=False), all detectors on",
    "asyncwatch-watchdog": 'the watchdog alone: asyncwatch.install(log=False, detect=["slow_callback"]), no task factory',
    "asyncwatch-spans": "asyncwatch with a span for every task through the OpenTelemetry SDK",
    "debug": "asyncio debug mode (debug=True, slow_callback_duration=0.1)",
    "uvloop": "plain uvloop",
    "asyncwatch-uvloop": "asyncwatch on uvloop (loop_factory(uvloop.new_event_loop))",
    "aiodebug": "aiodebug.log_slow_callbacks.enable(0.1)",
    "logfire": "logfire.log_slow_async_callbacks(slow_duration=0.1), nothing sent",
    "otel-asyncio": "opentelemetry-instrumentation-asyncio with an SDK provider (spans dropped)",
}

#: The mode each mode's ratio is taken against.
BASELINE: dict[str, str] = dict.fromkeys(MODES, "plain") | {"asyncwatch-uvloop": "uvloop"}

SPANS_UNAVAILABLE = "not available in this asyncwatch (OpenTelemetry spans not implemented yet)"


class Unavailable(Exception):
    """The mode cannot run in this environment (a missing optional package)."""


@dataclass
class Setup:
    """A mode, set up: how to make the loop, and what to check and tidy afterwards."""

    loop_factory: Callable[[], asyncio.AbstractEventLoop] | None = None
    debug: bool | None = None
    collector: Any = None  # asyncwatch's CollectingReporter, when asyncwatch runs
    after: list[Callable[[], dict[str, Any]]] = field(default_factory=list)


# --- OpenTelemetry SDK: a provider whose spans go nowhere --------------------------


def _sdk_tracer_provider() -> tuple[Any, Callable[[], dict[str, Any]]]:
    """An SDK TracerProvider with a BatchSpanProcessor and an exporter that drops
    every span (it only counts them).  Returns the provider and a function that
    shuts it down and reports the count."""
    try:
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult
    except ImportError as exc:
        raise Unavailable(f"opentelemetry-sdk is not installed ({exc})") from None

    class DroppingExporter(SpanExporter):
        """Counts the spans it is given and drops them."""

        def __init__(self) -> None:
            self.count = 0

        def export(self, spans: Sequence[Any]) -> Any:
            self.count += len(spans)
            return SpanExportResult.SUCCESS

        def shutdown(self) -> None:
            pass

        def force_flush(self, timeout_millis: int = 30_000) -> bool:
            return True

    exporter = DroppingExporter()
    provider = TracerProvider()
    provider.add_span_processor(BatchSpanProcessor(exporter))

    def finish() -> dict[str, Any]:
        provider.shutdown()  # flushes the batch processor
        return {"spans_exported": exporter.count}

    return provider, finish


# --- the modes ----------------------------------------------------------------------


def _asyncwatch_collector() -> Any:
    from asyncwatch._outputs.collect import CollectingReporter

    return CollectingReporter()


def _install_asyncwatch(**options: Any) -> Any:
    """``asyncwatch.install(log=False, reporters=[collector], **options)``; return the collector."""
    import asyncwatch

    collector = _asyncwatch_collector()
    asyncwatch.install(log=False, reporters=[collector], **options)
    return collector


def _uvloop_factory() -> Callable[[], asyncio.AbstractEventLoop]:
    try:
        import uvloop
    except ImportError:
        raise Unavailable("uvloop is not installed") from None
    return uvloop.new_event_loop


def setup_mode(mode: str) -> Setup:
    """Prepare this process for *mode*; raise `Unavailable` if it cannot run here."""
    if mode == "plain":
        return Setup()
    if mode == "plain-thread":
        # A thread that never runs still costs a process that had none:
        # once a thread is created, glibc leaves its single-threaded fast
        # paths (malloc's among them) for good.  Any watchdog pays this; a
        # program with a thread of its own (an executor, a resolver) already
        # does.  The asyncwatch-watchdog row is read against this one.
        import select
        import threading

        threading.Thread(target=lambda: select.poll().poll(), name="idle", daemon=True).start()
        return Setup()
    if mode == "asyncwatch":
        return Setup(collector=_install_asyncwatch())
    if mode == "asyncwatch-watchdog":
        # What watching for blocking alone costs in wall time (issue 15): the
        # watchdog thread taking the GIL from a busy loop, which instruction
        # counts do not see.
        return Setup(collector=_install_asyncwatch(detect=["slow_callback"]))
    if mode == "asyncwatch-spans":
        import asyncwatch

        provider, finish = _sdk_tracer_provider()
        try:
            collector = _install_asyncwatch(spans="all", tracer_provider=provider)
        except (asyncwatch.ConfigurationError, TypeError) as exc:
            # Only an *unknown* option means "not implemented yet"; a bad value is a real error.
            message = str(exc)
            unknown = isinstance(exc, TypeError) or "unknown" in message
            if unknown and ("spans" in message or "tracer_provider" in message):
                raise Unavailable(SPANS_UNAVAILABLE) from None
            raise
        return Setup(collector=collector, after=[finish])
    if mode == "debug":

        def debug_loop() -> asyncio.AbstractEventLoop:
            loop = asyncio.new_event_loop()
            loop.slow_callback_duration = 0.1  # asyncio's default, made explicit: asyncwatch's threshold
            return loop

        return Setup(loop_factory=debug_loop, debug=True)
    if mode == "uvloop":
        return Setup(loop_factory=_uvloop_factory())
    if mode == "asyncwatch-uvloop":
        import asyncwatch

        base = _uvloop_factory()
        collector = _install_asyncwatch()
        return Setup(loop_factory=asyncwatch.loop_factory(base), collector=collector)
    if mode == "aiodebug":
        try:
            import aiodebug.log_slow_callbacks
        except ImportError:
            raise Unavailable("aiodebug is not installed") from None
        aiodebug.log_slow_callbacks.enable(0.1)
        return Setup()
    if mode == "logfire":
        try:
            import logfire
        except ImportError:
            raise Unavailable("logfire is not installed") from None
        logfire.configure(send_to_logfire=False, console=False)
        logfire.log_slow_async_callbacks(slow_duration=0.1)
        return Setup()
    if mode == "otel-asyncio":
        try:
            from opentelemetry.instrumentation.asyncio import AsyncioInstrumentor
        except ImportError:
            raise Unavailable("opentelemetry-instrumentation-asyncio is not installed") from None
        provider, finish = _sdk_tracer_provider()
        AsyncioInstrumentor().instrument(tracer_provider=provider)
        return Setup(after=[finish])
    raise ValueError(f"unknown mode {mode!r}; modes: {', '.join(MODES)}")


def _watching_check(collector: Any) -> Callable[[], None]:
    """A check, run inside the loop, that asyncwatch really watches it."""

    def check() -> None:
        if collector is None:
            return
        import asyncwatch

        if not asyncwatch.is_installed():
            raise RuntimeError("asyncwatch mode, but asyncwatch is not installed")
        from asyncwatch import _engine

        engine = getattr(_engine, "current_engine", lambda: None)()
        is_watching = getattr(engine, "is_watching", None)
        if is_watching is not None and not is_watching(asyncio.get_running_loop()):
            raise RuntimeError("asyncwatch mode, but asyncwatch does not watch this loop")

    return check


def run_one(workload_name: str, mode: str, sizes: dict[str, int], *, warmup: bool = True) -> dict[str, Any]:
    """Set up *mode*, warm up (see the module's docstring), run the workload once
    timed, and return the result record."""
    workload = workloads.WORKLOADS[workload_name]
    setup = setup_mode(mode)
    check = _watching_check(setup.collector)
    warmup = warmup and workload.warmup

    async def main(sizes: dict[str, int]) -> dict[str, Any]:
        check()
        return await workload.run(sizes)

    if warmup:
        with asyncio.Runner(debug=setup.debug, loop_factory=setup.loop_factory) as runner:
            runner.run(main(workload.sizes(smoke=True)))
    gc.collect()
    with asyncio.Runner(debug=setup.debug, loop_factory=setup.loop_factory) as runner:
        start, cpu_start = time.perf_counter(), time.process_time()
        info = runner.run(main(sizes))
        elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu_start
    for _ in range(3):  # let finalizers report anything they would
        gc.collect()
    extra: dict[str, Any] = {}
    for finish in setup.after:
        extra.update(finish())
    findings = [] if setup.collector is None else list(setup.collector.findings)
    return {
        "workload": workload_name,
        "mode": mode,
        "sizes": sizes,
        "elapsed_s": elapsed,
        "cpu_s": cpu,
        "warmup": warmup,
        "peak_rss_bytes": workloads.peak_rss_bytes(),
        "info": info | extra,
        "findings": [f.to_dict() for f in findings],
        "python": sys.version.split()[0],
    }


def probe(modes: Sequence[str]) -> dict[str, str | None]:
    """Which *modes* can run here: mode -> None (available) or the reason it cannot.

    Each mode is set up in a fresh child of this one, since setting a mode up
    changes the process (hooks, instrumentation) for good.
    """
    import subprocess

    found: dict[str, str | None] = {}
    for mode in modes:
        proc = subprocess.run(
            [sys.executable, __file__, "--probe-one", mode],
            check=False,
            capture_output=True,
            text=True,
            timeout=120,
        )
        if proc.returncode == 0:
            found[mode] = None
        elif proc.returncode == EXIT_UNAVAILABLE:
            found[mode] = proc.stdout.strip() or "not available"
        else:
            found[mode] = f"set-up failed: {(proc.stderr.strip().splitlines() or ['?'])[-1]}"
    return found


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workload", choices=sorted(workloads.WORKLOADS))
    parser.add_argument("--mode", choices=MODES)
    parser.add_argument("--smoke", action="store_true", help="tiny sizes")
    parser.add_argument("--no-warmup", action="store_true", help="time the first run in the process")
    parser.add_argument("--size", action="append", default=[], metavar="NAME=INT", help="override one size")
    parser.add_argument(
        "--probe", nargs="*", metavar="MODE", help="print which modes (default: all) are available, as JSON"
    )
    parser.add_argument("--probe-one", metavar="MODE", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.probe_one:
        try:
            setup_mode(args.probe_one)
        except Unavailable as exc:
            print(exc)
            return EXIT_UNAVAILABLE
        return 0
    if args.probe is not None:
        unknown = [m for m in args.probe if m not in MODES]
        if unknown:
            parser.error(f"unknown mode(s) {', '.join(unknown)}; modes: {', '.join(MODES)}")
        print(json.dumps(probe(args.probe or MODES)))
        return 0
    if not args.workload or not args.mode:
        parser.error("--workload and --mode are required")

    overrides = {}
    for item in args.size:
        name, _, value = item.partition("=")
        overrides[name] = int(value)
    sizes = workloads.WORKLOADS[args.workload].sizes(args.smoke, overrides)
    try:
        record = run_one(args.workload, args.mode, sizes, warmup=not args.no_warmup)
    except Unavailable as exc:
        print(json.dumps({"workload": args.workload, "mode": args.mode, "unavailable": str(exc)}))
        return EXIT_UNAVAILABLE
    print(json.dumps(record))
    if record["findings"]:
        sys.stderr.write(
            f"asyncwatch reported {len(record['findings'])} finding(s) in {args.workload} under {args.mode}; "
            "the workloads are correct code, so this is a false positive:\n"
        )
        for finding in record["findings"][:5]:
            sys.stderr.write(f"  {finding['kind']}: {finding['message']} (site {finding['site']})\n")
        return EXIT_FINDINGS
    return 0


if __name__ == "__main__":
    sys.exit(main())
