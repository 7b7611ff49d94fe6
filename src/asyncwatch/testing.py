"""Helpers for testing code under asyncwatch."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

from ._core.findings import Finding, FindingKind
from ._engine import current_engine
from ._outputs.collect import CollectingReporter

__all__ = ["capture_findings"]


@contextmanager
def capture_findings(*kinds: FindingKind | str) -> Iterator[list[Finding]]:
    """Collect the findings reported inside the ``with`` block (of *kinds*, or all).

    asyncwatch must be installed.  The collector is removed on exit, even on
    errors::

        with capture_findings("slow_callback") as found:
            await handler()
        assert found[0].site.line == 42
    """
    engine = current_engine()
    if engine is None:
        raise RuntimeError("asyncwatch is not installed; call asyncwatch.install() before capture_findings()")
    wanted = frozenset(FindingKind(k) for k in kinds)
    predicate: Callable[[Finding], bool] | None = (lambda f: f.kind in wanted) if wanted else None
    collector = CollectingReporter(predicate)
    engine.pipeline.add(collector)
    try:
        yield collector.findings
    finally:
        engine.pipeline.remove(collector)
