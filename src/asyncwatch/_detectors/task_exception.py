"""Task exceptions never retrieved.

asyncio reports "<Task> exception was never retrieved" through the loop's
exception handler when a failed task is finalized and nobody awaited it or
asked for its exception.  The site is where the task was created; the stack
is the exception's traceback.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from typing import Any

from .._core.detector import Detector, WatchedLoop
from .._core.findings import Finding, FindingKind, Site
from .._core.frames import describe_exception, frame_site
from .._core.tasks import coro_name, created_at, forget

__all__ = ["NEVER_RETRIEVED", "TaskExceptionDetector"]

# asyncio words it "<class name> exception was never retrieved".
NEVER_RETRIEVED = " exception was never retrieved"


class TaskExceptionDetector(Detector):
    """Reports ``task_exception_unretrieved`` (site: the line that created the task)."""

    kind = FindingKind.TASK_EXCEPTION_UNRETRIEVED
    needs_task_factory = True  # creation sites

    def exception_context(self, watch: WatchedLoop, context: Mapping[str, Any]) -> None:
        message = context.get("message")
        if not (isinstance(message, str) and message.endswith(NEVER_RETRIEVED)):
            return
        task = context.get("future")
        exc = context.get("exception")
        if isinstance(task, asyncio.Task) and isinstance(exc, BaseException):
            watch.emit(unretrieved_finding(task, exc))
            forget(task)


def unretrieved_finding(task: asyncio.Task[Any], exc: BaseException) -> Finding:
    """The finding for *task*, which failed with *exc* that nobody retrieved."""
    name = task.get_name()
    coro = coro_name(task)
    where = created_at(task)
    tb_sites: list[Site] = []
    tb = exc.__traceback__
    while tb is not None:
        site = frame_site(tb.tb_frame)
        tb_sites.append(Site(site.file, tb.tb_lineno, site.function))
        tb = tb.tb_next
    return Finding(
        kind=FindingKind.TASK_EXCEPTION_UNRETRIEVED,
        message=(
            f"Task {name!r} (coroutine {coro!r}) failed with {describe_exception(exc)} "
            "and nobody retrieved the exception; await the task, or check it in a done callback"
        ),
        site=where,
        stack=tuple(tb_sites),
        task=name,
        coroutine=coro,
        created_at=where,
    )
