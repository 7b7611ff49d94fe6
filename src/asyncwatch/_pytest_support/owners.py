"""Who owns a finding: the owner stack, per-test garbage collection, and leaked tasks."""

from __future__ import annotations

import asyncio
import contextvars
import dataclasses
import fnmatch
import gc
import os
import threading
from typing import Any

import pytest

from .._core.findings import Finding, FindingKind, Site, counts_against_program
from .._core.frames import absolute_path, await_chain, describe_task, is_library_file, relative_path
from .._core.tasks import coro_name, created_at, task_context
from .options import NodeOptions

# The owner of the code that is running, copied into every task at its
# creation (tasks copy the current context): the leak check asks each
# pending task which owner created it.
_OWNER: contextvars.ContextVar[Owner | None] = contextvars.ContextVar("asyncwatch_pytest_owner", default=None)


class Owner:
    """A test, or a fixture wider than one test: receives the findings
    reported while it runs, and owns the tasks its code creates."""

    def __init__(self, what: str, nodeid: str | None, judged: bool, options: NodeOptions, fixture: str | None = None):
        self.what = what  # "the test", "fixture 'server' (module scope)"
        self.nodeid = nodeid
        self.fixture = fixture
        self.judged = judged
        self.options = options
        self.findings: list[Finding] = []
        self.expected = False  # the test took the fixture: findings until its body ends are its to check
        self.verdict_upto = 0  # findings before this index have been judged
        self.counted: list[Finding] = []  # judged findings that count, for the summary
        # id() of findings sited outside the project -> why they do not fail (kept with the finding)
        self.not_ours: dict[int, str] = {}
        self.location: Site | None = None  # the test's own line: the site of last resort
        self.collected = ""  # the last phase whose garbage `Watcher.collect_after` collected
        self.gc_clock = _GcClock()
        self._lock = threading.Lock()

    def counts(self, finding: Finding) -> bool:
        """Return whether *finding* fails (in report mode: is listed for) this owner."""
        return id(finding) not in self.not_ours and self.options.counts(finding)

    def add(self, finding: Finding) -> None:
        with self._lock:
            self.findings.append(finding)

    def take_new(self) -> list[Finding]:
        """Return the findings not judged yet, and mark them judged."""
        with self._lock:
            new = self.findings[self.verdict_upto :]
            self.verdict_upto = len(self.findings)
        return new


YOUNG = 1  # the generations the garbage collector's cheap collections look at: 0 and 1


def _collect_garbage(generation: int = 2) -> None:
    """Collect until nothing more is freed: finalizers can free more.

    A judged test's garbage is collected at the end of its body and after
    its teardown, so that what the test dropped is reported in that test.
    Nothing is frozen (an earlier version froze everything older than the
    test with `gc.freeze` to make these collections cheap: tests saw it,
    `gc.get_referrers` missed old referrers and `gc.collect` could not free
    cycles through old objects).  A full collection costs 15-100 ms in a
    large session (anyio's), so `_GcClock` says when a young one is enough.
    """
    for _ in range(4):
        if not gc.collect(generation):
            break


class _GcClock:
    """Whether the garbage a test made can be old.

    Objects start in generation 0 and reach the old generation only by
    surviving a collection of generation 1 or a full one.  If the
    interpreter ran none since the test began, the test's garbage is young,
    and a young collection finds what a full one would have found of it
    (compat/README.md: what that saves on anyio's suite).
    """

    def __init__(self) -> None:
        self._mark = self._now()

    @staticmethod
    def _now() -> tuple[int, int]:
        stats = gc.get_stats()
        return stats[1]["collections"], stats[2]["collections"]

    def collect(self, last: bool) -> None:
        """Collect the test's garbage: young if it all is, else in full.

        Before the *last* collection of the test, only generation 0 is
        collected when all is young: a collection of generation 1 would
        make what is still alive (the fixtures' objects, dropped by
        teardown) old, out of reach of the last, young, collection.
        """
        if self._now() != self._mark:
            _collect_garbage(2)
        else:
            _collect_garbage(YOUNG if last else 0)
        self._mark = self._now()


def _test_line(item: pytest.Item) -> Site | None:
    """The line where *item*'s test is defined, from pytest's own report info."""
    try:
        path, line, name = item.reportinfo()
        if line is None:
            return None
        return Site(os.path.abspath(os.fspath(path)), int(line) + 1, str(name).rsplit(".", 1)[-1])
    except Exception:  # noqa: BLE001 - a custom item's reportinfo: no fallback site then
        return None


def _in_project(file: str, root: str) -> bool:
    """Whether *file* is the project's own code: under the rootdir, not an installed package."""
    path = absolute_path(file)
    return (path == root or path.startswith(root.rstrip(os.sep) + os.sep)) and not is_library_file(path)


def _site_matches(pattern: str, file: str, line: int, root: str) -> bool:
    """Whether a site matches an allow-site *pattern*: a module name
    (``anyio._backends``: that module or package), a path glob matched against
    the absolute and the rootdir-relative path, or either with ``:LINE``."""
    if ":" in pattern and pattern.rsplit(":", 1)[1].isdigit():
        glob, want = pattern.rsplit(":", 1)
        if int(want) != line:
            return False
    else:
        glob = pattern
    if "/" not in glob and "*" not in glob and not glob.endswith(".py"):
        # A module or package: its file, or a file under its directory.
        stem = os.sep + glob.replace(".", os.sep) + os.sep
        return stem in os.path.splitext(absolute_path(file))[0] + os.sep
    rel = relative_path(file, root)
    return fnmatch.fnmatch(file, glob) or fnmatch.fnmatch(rel, glob)


def _sited(finding: Finding, fallback: Site | None, root: str) -> Finding:
    """*finding* with a site to open when asyncwatch found no frame of the
    application (every frame library code, as when a library's own suite
    runs against its installed copy): the innermost frame of its stack in
    the project (under the rootdir, not an installed package), else the
    test's own line, else the innermost frame of its stack; the message says
    which line it is."""
    if finding.site is not None or not counts_against_program(finding):
        # (A stall of the collector, another thread's GIL or a busy machine
        # has no site on purpose: no line of the program is to blame.)
        return finding
    stack = finding.stack
    site = next((s for s in reversed(stack) if _in_project(s.file, root)), None)
    how = "the innermost frame of the project's own code in its stack"
    if site is None and fallback is not None:
        site, how = fallback, "the test's own line"
    if site is None and stack:
        site, how = stack[-1], "the innermost frame of its stack"
    if site is None:
        return finding
    note = f" (no frame of the application was found: the site given is {how})"
    return dataclasses.replace(finding, site=site, message=finding.message + note)


def _owner_of(task: asyncio.Task[Any]) -> Owner | None:
    context = task_context(task)
    return context.get(_OWNER) if context is not None else None


def _awaiting(task: asyncio.Task[Any]) -> tuple[Site, ...]:
    """Where a pending *task* is suspended: its chain of awaits, outermost first."""
    # Pending: get_coro() is safe on 3.12.0-3.12.4 (gh-122332).
    return tuple(await_chain(getattr(task, "get_coro", lambda: None)()))


def leaked_finding(task: asyncio.Task[Any], owner: Owner) -> Finding:
    """A `task_leaked` finding for *task*, sited where it was created."""
    name = task.get_name()
    coro = coro_name(task)
    where = created_at(task)
    stack = _awaiting(task)
    waiting = next((s for s in reversed(stack) if not is_library_file(s.file)), None)
    waiting_text = f" (waiting at {os.path.basename(waiting.file)}:{waiting.line})" if waiting else ""
    return Finding(
        kind=FindingKind.TASK_LEAKED,
        message=(
            f"{describe_task(name, coro)} was still pending when {owner.what} ended{waiting_text}; "
            "stop it before then: await it, or cancel it and await the cancellation (a TaskGroup does both)"
        ),
        site=where,
        stack=stack,
        task=name,
        coroutine=coro,
        created_at=where,
    )


# --- loops -------------------------------------------------------------------
