"""The pipeline: findings flow one way from detectors to outputs.

Detectors hand each `Finding` to `Pipeline.emit`.  In order:

1. the `RateLimiter` decides whether the finding is reported one by one or
   only counted (``report_limit``);
2. the *enrichment* stage, an ordered list of `Enricher`s (structlog's
   processors in spirit), may add to a finding what later outputs show with
   it (OpenTelemetry places it on a span and adds the span's ids to
   ``Finding.extra``);
3. every `Reporter` gets the finding.

A reporter never calls back into a detector.  An enricher or reporter that
raises is dropped and the failure is said once, so a broken log handler or a
full disk never reaches the watched program.
"""

from __future__ import annotations

import dataclasses
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable
from typing import Protocol, runtime_checkable

from .._core.findings import Finding, FindingKind, Site
from .._core.runtime import in_forked_child, new_lock, report_internal_error, reporting

__all__ = ["Enricher", "Pipeline", "RateLimiter", "Reporter"]


@runtime_checkable
class Reporter(Protocol):
    """Receives findings.  ``report`` may be called from any thread, often the
    event loop's: it must not block (hand slow work to a thread, as
    `JsonLinesReporter` does).

    A reporter receives the findings the pipeline's `RateLimiter` lets
    through; one with a true ``receives_all`` attribute (counters, such as
    the exit summary and the testing helpers) receives every finding, and
    one with a ``held_back(finding)`` method is told of those held back.
    """

    def report(self, finding: Finding) -> None: ...


#: One step of the enrichment stage: given a finding about to be reported,
#: return it, or a copy with more to say (``dataclasses.replace``).  Runs on
#: the emitting thread, in the order the enrichers were added.
Enricher = Callable[[Finding], Finding]


class _Place:
    """The rate limit's count for one (kind, site)."""

    __slots__ = ("held", "let_through", "seen")

    def __init__(self, now: float) -> None:
        self.seen = 1  # findings seen
        self.let_through = now  # when the last one went through
        self.held = 0  # held back since


class RateLimiter:
    """At most *burst* findings of one kind at one site, then one per *interval_s*.

    A hot loop that blocks on every tick, or a line that drops a coroutine a
    thousand times a second, must not flood logs, the findings file or
    memory.  The first *burst* findings of each (kind, site) go through; after
    that one per *interval_s* does, carrying in ``suppressed`` how many like
    it were held back since the last one that went through.  Counts per place
    are kept for the exit summary.  The table of places is bounded: past
    *max_places*, the oldest half is forgotten (a forgotten place starts a
    new burst, which is the safe direction to err in).
    """

    def __init__(self, burst: int = 10, interval_s: float = 60.0, max_places: int = 10_000) -> None:
        self.burst = burst
        self.interval_s = interval_s
        self.max_places = max_places
        self._places: dict[tuple[FindingKind, Site | None], _Place] = {}
        self.suppressed: Counter[tuple[FindingKind, Site | None]] = Counter()
        self._lock = threading.Lock()
        self._clock = time.monotonic
        in_forked_child(self, new_lock)

    def admit(self, finding: Finding) -> Finding | None:
        """The finding to report (with ``suppressed`` filled in), or None to hold it back."""
        key = (finding.kind, finding.site)
        now = self._clock()
        with self._lock:
            place = self._places.get(key)
            if place is None:
                if len(self._places) >= self.max_places:
                    for old in list(self._places)[: self.max_places // 2]:
                        del self._places[old]
                self._places[key] = _Place(now)
                return finding
            place.seen += 1
            if place.seen <= self.burst or now - place.let_through >= self.interval_s:
                held, place.let_through, place.held = place.held, now, 0
                return dataclasses.replace(finding, suppressed=held) if held else finding
            place.held += 1
            if len(self.suppressed) < self.max_places or key in self.suppressed:
                self.suppressed[key] += 1
            return None


class Pipeline:
    """Hands findings to reporters; contains and disables failing ones."""

    def __init__(self, reporters: Iterable[Reporter] = (), limiter: RateLimiter | None = None) -> None:
        self._reporters: list[Reporter] = list(reporters)
        self._enrichers: list[Enricher] = []
        self._lock = threading.Lock()
        self.limiter = limiter
        in_forked_child(self, new_lock)

    def add(self, reporter: Reporter) -> None:
        with self._lock:
            self._reporters = [*self._reporters, reporter]

    def remove(self, reporter: Reporter) -> None:
        with self._lock:
            self._reporters = [r for r in self._reporters if r is not reporter]

    def add_enricher(self, enricher: Enricher) -> None:
        """Run *enricher* on every finding reported one by one, after those added before."""
        with self._lock:
            self._enrichers = [*self._enrichers, enricher]

    @property
    def reporters(self) -> tuple[Reporter, ...]:
        return tuple(self._reporters)

    def emit(self, finding: Finding) -> None:
        with reporting():
            self._emit(finding)

    def _emit(self, finding: Finding) -> None:
        limiter = self.limiter
        admitted: Finding | None = finding
        if limiter is not None:
            try:
                admitted = limiter.admit(finding)
            except Exception as exc:
                self.limiter = None
                report_internal_error("rate limiter", exc)
        if admitted is not None:
            admitted = self._enrich(admitted)
        interrupted: BaseException | None = None
        for reporter in self._reporters:  # a snapshot: add/remove replace the list
            try:
                if getattr(reporter, "receives_all", False):
                    reporter.report(finding)
                elif admitted is not None:
                    reporter.report(admitted)
                else:
                    held_back = getattr(reporter, "held_back", None)
                    if held_back is not None:  # e.g. a metric that counts every finding
                        held_back(finding)
            except Exception as exc:
                self.remove(reporter)
                report_internal_error(f"reporter {type(reporter).__name__}", exc)
            except BaseException as exc:
                # The program's signal handler raised here (SystemExit from a
                # SIGTERM handler, KeyboardInterrupt): it is the program's, and
                # goes on once the other reporters have the finding.
                if interrupted is None:
                    interrupted = exc
        if interrupted is not None:
            raise interrupted

    def _enrich(self, finding: Finding) -> Finding:
        """The enrichment stage: each enricher in turn; a failing one is dropped."""
        for enricher in self._enrichers:  # a snapshot, like the reporters
            try:
                finding = enricher(finding)
            except Exception as exc:
                with self._lock:
                    self._enrichers = [e for e in self._enrichers if e is not enricher]
                report_internal_error(f"enricher {getattr(enricher, '__qualname__', enricher)}", exc)
        return finding

    def flush(self, timeout: float = 5.0) -> None:
        """Wait (at most *timeout* seconds each) for reporters that write in the background."""
        for reporter in self._reporters:
            flush = getattr(reporter, "flush", None)
            if flush is not None:
                try:
                    flush(timeout)
                except Exception as exc:
                    report_internal_error(f"reporter {type(reporter).__name__}", exc)

    def close(self) -> None:
        for reporter in self._reporters:
            close = getattr(reporter, "close", None)
            if close is not None:
                try:
                    close()
                except Exception as exc:
                    report_internal_error(f"reporter {type(reporter).__name__}", exc)
