"""Task exceptions never retrieved.

asyncio reports "<Task> exception was never retrieved" through the loop's
exception handler when a failed task is finalized and nobody awaited it or
asked for its exception.  The site is where the task was created; the stack
is the exception's traceback.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from .._core.detector import Detector, DetectorContext, WatchedLoop, watches
from .._core.findings import Finding, FindingKind, Site
from .._core.frames import describe_exception, describe_task, frame_site
from .._core.tasks import coro_name, created_at, describe_gather, forget, hold_gather_sites, release_gather_sites

if TYPE_CHECKING:
    from .._core.survivors import Survivors

__all__ = ["AT_EXIT", "NEVER_RETRIEVED", "TaskExceptionDetector"]

#: What a finding about a task still referenced at exit adds to its message.
AT_EXIT = "; it was still referenced when the program ended, so asyncio reports it only as Python shuts down"

# asyncio words it "<class name> exception was never retrieved".
NEVER_RETRIEVED = " exception was never retrieved"


class TaskExceptionDetector(Detector):
    """Reports ``task_exception_unretrieved`` (site: the line that created the task)."""

    kind = FindingKind.TASK_EXCEPTION_UNRETRIEVED
    needs_task_factory = True  # creation sites

    def install(self, context: DetectorContext) -> None:
        hold_gather_sites()  # the line of a failed gather of gathers, which makes no task

    def uninstall(self) -> None:
        release_gather_sites()

    def at_exit(self, survivors: Survivors) -> None:
        """A failed task the program still holds (a module-level list of
        jobs) has its exception never retrieved all the same: asyncio
        reports it when the task is freed, as the interpreter clears the
        modules.  Read without asking (``exception()`` would mark it
        retrieved, and asyncio's own report would not come)."""
        for task in survivors.tasks:
            if not task.done() or task.cancelled() or not getattr(task, "_log_traceback", False):
                continue
            exc = getattr(task, "_exception", None)
            watch = watches.get(task.get_loop())
            if watch is not None and isinstance(exc, BaseException):
                watch.emit(unretrieved_finding(task, exc, AT_EXIT))
                forget(task)

    def exception_context(self, watch: WatchedLoop, context: Mapping[str, Any]) -> None:
        message = context.get("message")
        if not (isinstance(message, str) and message.endswith(NEVER_RETRIEVED)):
            return
        task = context.get("future")
        exc = context.get("exception")
        if not isinstance(exc, BaseException):
            return
        if isinstance(task, asyncio.Task):
            watch.emit(unretrieved_finding(task, exc))
            forget(task)
        elif isinstance(task, asyncio.Future):
            # A gather() neither awaited nor kept, whose child failed: the
            # factory left its line on it.
            where = created_at(task)
            if where is not None:
                watch.emit(gather_unretrieved_finding(task, exc, where))


def _traceback_sites(exc: BaseException) -> tuple[Site, ...]:
    tb_sites: list[Site] = []
    tb = exc.__traceback__
    while tb is not None:
        site = frame_site(tb.tb_frame)
        tb_sites.append(Site(site.file, tb.tb_lineno, site.function))
        tb = tb.tb_next
    return tuple(tb_sites)


def gather_unretrieved_finding(gathering: asyncio.Future[Any], exc: BaseException, where: Site) -> Finding:
    """The finding for a ``gather()``'s future, made at *where*, that failed
    with *exc*, which nobody retrieved."""
    coro, words = describe_gather(gathering)
    return Finding(
        kind=FindingKind.TASK_EXCEPTION_UNRETRIEVED,
        message=(f"{words} failed with {describe_exception(exc)} and nobody retrieved the exception; await the gather"),
        site=where,
        stack=_traceback_sites(exc),
        coroutine=coro,
        created_at=where,
    )


def unretrieved_finding(task: asyncio.Task[Any], exc: BaseException, more: str = "") -> Finding:
    """The finding for *task*, which failed with *exc* that nobody retrieved
    (*more*: said at the message's end)."""
    name = task.get_name()
    coro = coro_name(task)
    where = created_at(task)
    return Finding(
        kind=FindingKind.TASK_EXCEPTION_UNRETRIEVED,
        message=(
            f"{describe_task(name, coro)} failed with {describe_exception(exc)} "
            "and nobody retrieved the exception; await the task, or check it in a done callback" + more
        ),
        site=where,
        stack=_traceback_sites(exc),
        task=name,
        coroutine=coro,
        created_at=where,
    )
