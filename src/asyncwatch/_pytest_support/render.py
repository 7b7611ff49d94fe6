"""How a verdict reads: findings as text, sites relative to the rootdir."""

from __future__ import annotations

import linecache
import os
import sys

from .._core.findings import Finding, Site
from .owners import Owner


def _title(owner: Owner) -> str:
    title = owner.nodeid if owner.fixture is None and owner.nodeid else owner.what
    if owner.fixture is not None and owner.nodeid:
        title += f" of {owner.nodeid}"
    return title or "outside any test"


_WHERE_HINT = (
    "(findings sited outside the project's own code are reported, not failed: "
    "--asyncwatch-fail-on=all fails them too; --asyncwatch-allow-site=PATTERN or asyncwatch_allow_sites "
    "never fails findings at a module, path glob or path:line)"
)


def render(findings: list[Finding], root: os.PathLike[str] | str, when: str = "") -> str:
    """Return *findings* as text for the terminal: a one-line summary (what
    pytest's short summary shows), then a block per finding."""
    places = dict.fromkeys(
        f"{f.kind.value} at {_where(f.site, root, short=True)}" if f.site else f.kind.value for f in findings
    )
    lines = [f"asyncwatch{f' ({when})' if when else ''}: {', '.join(places)}"]
    for finding in findings:
        lines += ["", f"{finding.kind.value}: {finding.message}"]
        lines += _site_lines(finding.site, root, "  ") if finding.site else ["  (site unknown)"]
        for label, extra in (
            ("cancelled by", finding.cancelled_by),
            ("created at", finding.created_at),
            ("dropped at", finding.dropped_at),
            ("swallowed at", finding.swallowed_at),
            ("scheduled at", finding.scheduled_at),
        ):
            if extra is not None and extra != finding.site:
                lines += _site_lines(extra, root, "  ", f"{label} ")
        if finding.stack and finding.stack != (finding.site,):
            lines.append("  stack (outermost first):")
            for site in finding.stack:
                lines += _site_lines(site, root, "    ")
    return "\n".join(lines)


def _where(site: Site, root: os.PathLike[str] | str, short: bool = False) -> str:
    path = _display_path(site.file, os.fspath(root))
    return f"{path}:{site.line}" if short else f"{path}:{site.line} in {site.function}"


def _display_path(path: str, root: str) -> str:
    """*path* relative to the rootdir, or to its entry of ``sys.path``
    (``asyncio/tasks.py``), or as it is."""
    for base in (root, *sorted((p for p in sys.path if p and os.path.isabs(p)), key=len, reverse=True)):
        try:
            rel = os.path.relpath(path, base)
        except ValueError:  # another drive on Windows
            continue
        if not rel.startswith(".."):
            return rel
    return path


def _site_lines(site: Site, root: os.PathLike[str] | str, indent: str, label: str = "") -> list[str]:
    """``file:line in function`` and, below it, the source line."""
    out = [f"{indent}{label}{_where(site, root)}"]
    source = linecache.getline(site.file, site.line).strip()
    if source:
        out.append(f"{indent}    {source}")
    return out
