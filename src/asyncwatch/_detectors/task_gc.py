"""Pending tasks destroyed by the garbage collector.

asyncio reports "Task was destroyed but it is pending!" through the loop's
exception handler, from the task's finalizer: the program kept no reference
to a task that had not finished.  The site is where the task was created.

gather() turns that report off for the tasks it makes, so a gather neither
awaited nor kept loses its children in silence.  The task factory tells
`Detector.gather_made` once per gather (never per task: gather is how most
tasks are made); its future gets a weak reference whose callback reports it,
and a done callback that drops the reference: a gather collected before it
finished was lost, and its pending children with it.  A gather awaited by a
task that is itself destroyed while pending is that task's mistake, reported
once: a gather's finding is held while the collector runs, and dropped when
the task waiting on it is reported in the same collection.
"""

from __future__ import annotations

import asyncio
import threading
import weakref
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from .._core.collecting import after_collections, collecting, hold, no_longer_after_collections
from .._core.detector import Detector, DetectorContext, WatchedLoop, watches
from .._core.findings import Finding, FindingKind, Site
from .._core.frames import describe_task
from .._core.tasks import (
    coro_name,
    created_at,
    describe_gather,
    forget,
    hold_gather_sites,
    release_gather_sites,
    user_coro_of,
)

if TYPE_CHECKING:
    from .._core.survivors import Survivors

__all__ = ["DESTROYED_PENDING", "TaskGarbageDetector"]

DESTROYED_PENDING = "Task was destroyed but it is pending!"


class TaskGarbageDetector(Detector):
    """Reports ``task_destroyed_pending`` (site: the line that created the task)."""

    kind = FindingKind.TASK_DESTROYED_PENDING
    needs_task_factory = True  # creation sites

    def __init__(self) -> None:
        self._context: DetectorContext | None = None
        # id(future) -> the weak reference that reports a gather's future.
        self._gathered: dict[int, _LostGather] = {}
        self._lock = threading.Lock()
        # Gathers' findings made while this thread collects (see _core.collecting).
        self._held: list[tuple[int, WatchedLoop, Finding]] = []
        self._claimed: set[int] = set()

    def install(self, context: DetectorContext) -> None:
        self._context = context
        after_collections(self._after_collection)
        hold_gather_sites()  # the line of a gather of gathers, which makes no task

    def uninstall(self) -> None:
        release_gather_sites()
        no_longer_after_collections(self._after_collection)
        with self._lock:
            self._gathered.clear()  # the references go, and with them their callbacks
        self._flush_held()

    def gather_made(self, watch: WatchedLoop, gathering: asyncio.Future[Any], site: Site | None) -> None:
        with self._lock:
            known = self._gathered.get(id(gathering))
            if known is not None and known() is gathering:
                return  # told again: made with tasks and of gathers (see `asyncwatch._core.tasks`)
            lost = _LostGather(gathering, self._lost, watch, site)
            self._gathered[id(gathering)] = lost
            # Gathers it gathered, watched since they were made: their loss
            # is now this gather's, reported once, at its line.
            for child in getattr(gathering, "_children", ()):
                watched = self._gathered.get(id(child))
                if watched is not None and watched() is child:
                    del self._gathered[id(child)]
        gathering.add_done_callback(self._gather_done)

    def _gather_done(self, gathering: asyncio.Future[Any]) -> None:
        with self._lock:
            self._gathered.pop(id(gathering), None)

    def _lost(self, lost: weakref.ReferenceType[asyncio.Future[Any]]) -> None:
        """The weak reference's callback: a gather died before it finished."""
        try:
            assert isinstance(lost, _LostGather)
            with self._lock:
                if self._gathered.get(lost.future_id) is not lost:
                    return
                del self._gathered[lost.future_id]
            finding = lost.finding()
            if collecting():
                with self._lock:
                    self._held.append((lost.future_id, lost.watch, finding))
                hold()
            else:
                lost.watch.emit(finding)
        except Exception as exc:
            if self._context is not None:
                self._context.failed(self, exc)

    def _after_collection(self) -> None:
        try:
            self._flush_held()
        except Exception as exc:
            if self._context is not None:
                self._context.failed(self, exc)

    def _flush_held(self) -> None:
        with self._lock:
            held, self._held = self._held, []
            claimed, self._claimed = self._claimed, set()
        for task_id, watch, finding in held:
            if task_id not in claimed:
                watch.emit(finding)

    def _claim_gathered(self, task: asyncio.Task[Any]) -> None:
        """*task*, destroyed while pending, was waiting on a gather: that gather is its loss."""
        waiter = getattr(task, "_fut_waiter", None)
        if waiter is not None:
            with self._lock:
                self._claimed.add(id(waiter))
            hold()  # used up after this collection, whatever it held

    def at_exit(self, survivors: Survivors) -> None:
        """A pending task the program still holds when it ends, its loop no
        longer running (run by hand and left, or closed), never finishes:
        asyncio reports it destroyed while pending when the interpreter
        frees it.  A loop still running (in a daemon thread) is left alone,
        and so are gather's tasks, for which asyncio says nothing."""
        for task in survivors.tasks:
            if task.done() or not getattr(task, "_log_destroy_pending", False):
                continue
            loop = task.get_loop()
            watch = watches.get(loop)
            if watch is None or loop.is_running():
                continue
            coro = user_coro_of(task)
            if coro is not None and self._context is not None:
                self._context.claims.claim(coro)
            watch.emit(destroyed_pending_finding(task, at_exit=True))
            forget(task)

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
            self._claim_gathered(task)
            watch.emit(destroyed_pending_finding(task))
            forget(task)


class _LostGather(weakref.ref):  # type: ignore[type-arg]
    """A weak reference to a gather's future, with what its finding needs."""

    __slots__ = ("coroutine", "future_id", "site", "watch", "words")

    def __new__(
        cls, gathering: asyncio.Future[Any], callback: Any, watch: WatchedLoop, site: Site | None
    ) -> _LostGather:
        return super().__new__(cls, gathering, callback)

    def __init__(self, gathering: asyncio.Future[Any], callback: Any, watch: WatchedLoop, site: Site | None) -> None:
        # The reference itself is made by weakref.ref.__new__.
        self.future_id = id(gathering)
        self.watch = watch
        self.site = site
        # The first task's coroutine only: naming them all would cost every task.
        self.coroutine, self.words = describe_gather(gathering)

    def finding(self) -> Finding:
        return Finding(
            kind=FindingKind.TASK_DESTROYED_PENDING,
            message=(
                f"{self.words} was destroyed by the garbage collector "
                "while still pending, and its unfinished tasks with it (asyncio does not warn for "
                "gather's tasks); await the gather, or keep a reference to it until it is done"
            ),
            site=self.site,
            stack=(self.site,) if self.site else (),
            coroutine=self.coroutine,
            created_at=self.site,
        )


def destroyed_pending_finding(task: asyncio.Task[Any], *, at_exit: bool = False) -> Finding:
    """The finding for *task*, destroyed while pending (*at_exit*: still
    pending and referenced when the program ended, its loop stopped)."""
    # A pending task is always in a reference cycle (it and the future it
    # waits on refer to each other), and the collector finalizes its
    # coroutine first, so where it was waiting is gone by now: the creation
    # site is what there is.
    name = task.get_name()
    coro = coro_name(task)
    where = created_at(task)
    if at_exit:
        message = (
            f"{describe_task(name, coro)} was still pending when the program ended, its loop no longer "
            "running: it never finished, and asyncio says so only as Python shuts down; await it, or "
            "cancel it and await the cancellation, before the loop stops (a TaskGroup does both)"
        )
    else:
        message = (
            f"{describe_task(name, coro)} was destroyed by the garbage collector "
            "while still pending; keep a reference to it (a set of background tasks, or a TaskGroup)"
        )
    return Finding(
        kind=FindingKind.TASK_DESTROYED_PENDING,
        message=message,
        site=where,
        stack=(where,) if where else (),
        task=name,
        coroutine=coro,
        created_at=where,
    )
