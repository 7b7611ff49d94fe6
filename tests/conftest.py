"""Shared harness: run a coroutine on a watched loop (asyncio or uvloop) and
collect what asyncwatch reported."""

from __future__ import annotations

import asyncio
import gc
import sys
from collections.abc import Callable, Coroutine, Iterator
from typing import Any

import pytest

import asyncwatch
from asyncwatch import Finding
from asyncwatch._core.findings import counts_against_program
from asyncwatch._engine import current_engine
from asyncwatch._outputs.collect import CollectingReporter

try:
    import uvloop
except ImportError:  # pragma: no cover - uvloop is a test dependency
    uvloop = None

LOOPS = ["asyncio", "uvloop"]


def gc_collect_harder() -> None:
    """Collect until nothing more is freed (finalizers can free more)."""
    for _ in range(4):
        gc.collect()


@pytest.fixture(params=LOOPS)
def loop_name(request: pytest.FixtureRequest) -> str:
    """Each test that takes this runs on asyncio's loop and on uvloop."""
    if request.param == "uvloop" and uvloop is None:
        pytest.skip("uvloop is not installed")
    return str(request.param)


def base_factory(loop_name: str) -> Callable[[], asyncio.AbstractEventLoop]:
    if loop_name == "uvloop":
        assert uvloop is not None
        return uvloop.new_event_loop  # type: ignore[no-any-return]
    return asyncio.new_event_loop


def flush_what_the_run_left() -> None:
    """What a program's exit does: wait for a look of the watchdog in
    progress, and report a stall it recorded.  A look late for a last step's
    hold (a first step's json.loads, then the program returned) may still be
    reading clocks when the loop has closed and asyncio.run() has returned:
    its finding comes out just after, at exit in a program, and a test
    reading the findings at once saw none."""
    engine = current_engine()
    if engine is not None:
        engine.flush_detectors()


class Watched:
    """Runs coroutines on watched loops and collects the findings."""

    def __init__(self, loop_name: str) -> None:
        self.loop_name = loop_name
        self.collector = CollectingReporter()

    @property
    def findings(self) -> list[Finding]:
        """What the program is blamed for: without the stalls that are not
        its line (a test's own ``gc.collect()`` over a full suite's heap is a
        collector pause, cause gc), which `of` still returns."""
        return [f for f in self.collector.findings if counts_against_program(f)]

    def blamed(self, kind: str) -> list[Finding]:
        """Every finding of *kind* the program is blamed for.  A stall that
        is the machine's (cause starved: a 20 ms sleep whose wake-up waited
        140 ms for a CPU at load 8) is reported with no line and fails no
        test; one given a line of the program anyway is still blamed."""
        return [
            f
            for f in self.collector.findings
            if f.kind.value == kind and (counts_against_program(f) or (f.site is not None and f.cause != "gc"))
        ]

    def kinds(self) -> list[str]:
        return [f.kind.value for f in self.findings]

    def of(self, kind: str) -> list[Finding]:
        """Every finding of *kind*, the stalls that are not the program's included."""
        return [f for f in self.collector.findings if f.kind.value == kind]

    def run(self, main: Callable[[], Coroutine[Any, Any, Any]], **options: Any) -> Any:
        """Run ``main()`` with asyncio.Runner on a watched loop; collect garbage after."""
        options.setdefault("log", False)
        factory = asyncwatch.loop_factory(base_factory(self.loop_name), **options)
        # Process-wide options must reach the engine when it starts.
        process_wide = {k: v for k, v in options.items() if k in ("log", "findings", "track_coroutine_origins")}
        asyncwatch.install(reporters=[self.collector], **process_wide)
        try:
            with asyncio.Runner(loop_factory=factory) as runner:
                result = runner.run(main())
        finally:
            flush_what_the_run_left()
            gc_collect_harder()
        return result


@pytest.fixture
def watched(loop_name: str) -> Iterator[Watched]:
    """A `Watched` harness on the parametrized loop; uninstalls afterwards."""
    harness = Watched(loop_name)
    try:
        yield harness
    finally:
        asyncwatch.uninstall()


@pytest.fixture(autouse=True)
def _always_uninstalled() -> Iterator[None]:
    """No test leaks an installation (or a hook) into the next."""
    yield
    asyncwatch.uninstall()
    assert not asyncwatch.is_installed()


def line_of(marker: str, path: str | None = None) -> int:
    """The line number of the (unique) source line containing *marker*.

    Tests mark the lines they expect in a finding with a comment such as
    ``# <- blocking`` instead of hard-coding numbers.
    """
    if path is None:
        path = sys._getframe(1).f_code.co_filename
    with open(path, encoding="utf-8") as f:
        hits = [n for n, text in enumerate(f, 1) if marker in text and "line_of(" not in text]
    assert len(hits) == 1, f"marker {marker!r} found {len(hits)} times in {path}"
    return hits[0]
