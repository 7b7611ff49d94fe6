"""Outputs that keep findings in memory: for tests, and the summary at exit."""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Callable, Mapping

from .._core.findings import Finding, FindingKind, Site, counts_against_program
from .._core.frames import site_text

__all__ = ["CollectingReporter", "SummaryReporter"]


class CollectingReporter:
    """Keep findings in a list (what `asyncwatch.testing.capture_findings` uses).

    It receives every finding, rate limit or not: tests count them.
    """

    receives_all = True

    def __init__(self, predicate: Callable[[Finding], bool] | None = None) -> None:
        self.findings: list[Finding] = []
        self._predicate = predicate
        self._lock = threading.Lock()

    def report(self, finding: Finding) -> None:
        if self._predicate is None or self._predicate(finding):
            with self._lock:
                self.findings.append(finding)


class SummaryReporter:
    """Count findings by kind and site for the human summary at exit.

    It receives every finding, including those the rate limit held back
    from the logs and the findings file.
    """

    receives_all = True

    def __init__(self) -> None:
        self.counts: Counter[tuple[FindingKind, Site | None]] = Counter()
        #: Of `counts`, the stalls inside an import (``cause="import"``): start-up work.
        self.imports: Counter[tuple[FindingKind, Site | None]] = Counter()
        #: Of `counts`, the stalls that are not the program's, by cause (the
        #: collector, another thread's GIL, no CPU free, an import).
        self.not_the_programs: Counter[tuple[FindingKind, Site | None]] = Counter()
        self.causes: dict[tuple[FindingKind, Site | None], set[str]] = {}
        self._lock = threading.Lock()

    def report(self, finding: Finding) -> None:
        with self._lock:
            self.counts[(finding.kind, finding.site)] += 1
            if finding.cause == "import":
                self.imports[(finding.kind, finding.site)] += 1
            if not counts_against_program(finding):
                self.not_the_programs[(finding.kind, finding.site)] += 1
                self.causes.setdefault((finding.kind, finding.site), set()).add(str(finding.cause))

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    @property
    def verdict_total(self) -> int:
        """The findings that fail ``--fail-on-findings``: all but the stalls
        that are not the program's (start-up imports, the collector, another
        thread's GIL, a machine short of CPUs)."""
        return self.total - sum(self.not_the_programs.values())

    def render(self, held_back: Mapping[tuple[FindingKind, Site | None], int] | None = None) -> str:
        """A short text: findings grouped by kind and site, with counts, and
        how many of them the rate limit (*held_back*, per kind and site) kept
        out of the logs and the findings file."""
        total = self.total
        if not total:
            return "asyncwatch: no findings\n"
        places = len(self.counts)
        lines = [
            f"asyncwatch: {total} finding{'s' if total != 1 else ''} in {places} place{'s' if places != 1 else ''}"
        ]
        width = max(len(k.value) for k, _ in self.counts)
        order = sorted(self.counts.items(), key=lambda item: (item[0][0].value, -item[1], str(item[0][1])))
        for (kind, site), count in order:
            where = site_text(site, relative=True) if site else "(site unknown)"
            line = f"  {kind.value:<{width}}  {count:>4}x  {where}"
            if self.imports.get((kind, site)):
                line += "  (inside an import: start-up; not counted by --fail-on-findings)"
            elif self.not_the_programs.get((kind, site)):
                causes = ", ".join(sorted(self.causes.get((kind, site), ())))
                line += f"  (cause {causes}: not the program's line; not counted by --fail-on-findings)"
            held = held_back.get((kind, site), 0) if held_back else 0
            if held:
                line += f"  ({held} not logged one by one: report limit)"
            lines.append(line)
        total_held = sum(held_back.values()) if held_back else 0
        if total_held:
            lines.append(
                f"  ({total_held} finding{'s' if total_held != 1 else ''} repeated a place already reported and "
                "were only counted; --report-limit / ASYNCWATCH_REPORT_LIMIT sets how many are logged per place)"
            )
        return "\n".join(lines) + "\n"
