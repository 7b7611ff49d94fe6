"""Pending tasks destroyed by the garbage collector.

asyncio reports "Task was destroyed but it is pending!" through the loop's
exception handler, from the task's finalizer: the program kept no reference
to a task that had not finished.  The site is where the task was created.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from typing import Any

from .._core.detector import Detector, DetectorContext, WatchedLoop
from .._core.findings import Finding, FindingKind
from .._core.tasks import coro_name, created_at, forget, user_coro_of

__all__ = ["DESTROYED_PENDING", "TaskGarbageDetector"]

DESTROYED_PENDING = "Task was destroyed but it is pending!"


class TaskGarbageDetector(Detector):
    """Reports ``task_destroyed_pending`` (site: the line that created the task)."""

    kind = FindingKind.TASK_DESTROYED_PENDING
    needs_task_factory = True  # creation sites

    def __init__(self) -> None:
        self._context: DetectorContext | None = None

    def install(self, context: DetectorContext) -> None:
        self._context = context

    def exception_context(self, watch: WatchedLoop, context: Mapping[str, Any]) -> None:
        if context.get("message") != DESTROYED_PENDING:
            return
        task = context.get("task")
        if isinstance(task, asyncio.Task):
            coro = user_coro_of(task)
            if coro is not None and self._context is not None:
                # If it never started, CPython also warns that its coroutine
                # was never awaited (before or after this, depending on the
                # collector's order): the same mistake, reported once.
                self._context.claims.claim(coro)
            watch.emit(destroyed_pending_finding(task))
            forget(task)


def destroyed_pending_finding(task: asyncio.Task[Any]) -> Finding:
    """The finding for *task*, destroyed while pending."""
    # A pending task is always in a reference cycle (it and the future it
    # waits on refer to each other), and the collector finalizes its
    # coroutine first, so where it was waiting is gone by now: the creation
    # site is what there is.
    name = task.get_name()
    coro = coro_name(task)
    where = created_at(task)
    return Finding(
        kind=FindingKind.TASK_DESTROYED_PENDING,
        message=(
            f"Task {name!r} (coroutine {coro!r}) was destroyed by the garbage collector "
            "while still pending; keep a reference to it (a set of background tasks, or a TaskGroup)"
        ),
        site=where,
        stack=(where,) if where else (),
        task=name,
        coroutine=coro,
        created_at=where,
    )
