"""Swallowed cancellations: a task cancelled that finished without raising.

Only ``cancel()`` calls from outside asyncio's structured helpers count
(TaskGroup, timeout(), wait_for() uncancel() what they cancel).  Each
unstructured request records who cancelled (the application line calling
``cancel()``) and where the CancelledError will land (the task's innermost
application ``await``); a done callback checks, when the task finishes,
whether it finished normally while still ``cancelling()``.  A request
forwarded from an outer task's ``cancel()`` into the task it awaits is
reported once, on the task that swallowed it.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable
from types import FrameType
from typing import Any

from .._core.detector import Detector, DetectorContext, watches
from .._core.findings import Finding, FindingKind, Site
from .._core.frames import app_frame, await_chain, frame_site, is_library_file, is_own_file, qualname_of
from .._core.runtime import report_internal_error
from .._core.tasks import CancelCall, Task, cancel_calls, coro_name, created_at, user_coro_of

__all__ = ["CancellationDetector"]


class CancellationDetector(Detector):
    """Reports ``cancellation_swallowed`` (site: where the CancelledError landed)."""

    kind = FindingKind.CANCELLATION_SWALLOWED

    def __init__(self) -> None:
        self._context: DetectorContext | None = None

    def install(self, context: DetectorContext) -> None:
        self._context = context

    def task_cancel_requested(self, task: asyncio.Task[Any], caller: FrameType, message: Any) -> None:
        calls = cancel_calls()
        if type(task) is Task and calls and calls[-1].task is task:
            _note_cancel(task, caller, calls[-1], calls[-2] if len(calls) > 1 else None, self._check_swallowed)

    def _check_swallowed(self, task: asyncio.Task[Any]) -> None:
        """Done callback of a cancelled task: report if it finished normally."""
        try:
            _check_swallowed(task)
        except Exception as exc:
            if self._context is not None:
                self._context.failed(self, exc)
            else:
                report_internal_error(self.name, exc)


class CancelRequest:
    """One unstructured ``cancel()`` of a task: who, and where it lands."""

    __slots__ = ("absorbed", "cancelled_by", "delivered_at", "delivery_stack", "forwarded_from")

    def __init__(self, cancelled_by: Site | None, forwarded_from: CancelRequest | None) -> None:
        self.cancelled_by = cancelled_by
        self.delivered_at: Site | None = None
        self.delivery_stack: tuple[Site, ...] = ()
        self.forwarded_from = forwarded_from
        # Set when the task this request was forwarded into swallowed it:
        # this task then never saw a CancelledError, and only that one is reported.
        self.absorbed = False


class CancelRecord:
    """The unstructured cancellation requests of one task."""

    __slots__ = ("requests",)

    def __init__(self) -> None:
        self.requests: list[CancelRequest] = []


class _Note:
    """What one cancel() call left for the cancel() calls it causes."""

    __slots__ = ("canceller", "request", "structured")

    def __init__(self, request: CancelRequest | None, structured: bool, canceller: Site | None) -> None:
        self.request = request
        self.structured = structured
        self.canceller = canceller


_NOTE = "cancellation"


# Cancellations made by asyncio's structured helpers (they uncancel() when
# they are done, or, on 3.11/3.12, TaskGroup sometimes leaves the count at 1:
# gh-116720).  Keyed by file name, then by function name (None = any).
_STRUCTURED: dict[str, frozenset[str] | None] = {
    "taskgroups.py": None,
    "timeouts.py": None,
    "staggered.py": None,
    "tasks.py": frozenset({"wait_for", "_cancel_and_wait", "_on_timeout"}),
}
_ASYNCIO_DIR = os.path.dirname(asyncio.__file__) + os.sep


def _is_structured(frame: FrameType) -> bool:
    code = frame.f_code
    filename = code.co_filename
    if not filename.startswith(_ASYNCIO_DIR):
        return False
    base = os.path.basename(filename)
    if base not in _STRUCTURED:
        return False
    names = _STRUCTURED[base]
    return names is None or code.co_name in names


def _note_cancel(
    task: Task,
    caller: FrameType,
    call: CancelCall,
    outer_call: CancelCall | None,
    check_swallowed: Callable[[asyncio.Task[Any]], None],
) -> None:
    """Record one cancel() of a pending *task*; leave its note on *call*."""
    record: CancelRecord | None = getattr(task, "_aw_cancel", None)
    if record is None:
        record = CancelRecord()
        task._aw_cancel = record
        if getattr(task, "_aw_coro", None) is None:
            task._aw_coro = qualname_of(user_coro_of(task))  # pending: safe to ask now
        task.add_done_callback(check_swallowed)
    note: _Note | None = outer_call.notes.get(_NOTE) if outer_call is not None else None
    outer: CancelRequest | None = None
    if note is not None and note.request is not None and note.request not in record.requests:
        # Forwarded from an outer task's cancel(): same canceller, same kind.
        outer, structured, canceller = note.request, note.structured, note.canceller
    elif note is not None and note.structured:
        structured, canceller = True, None  # forwarded from a structured cancel
    else:
        frame: FrameType | None = caller
        while frame is not None and is_own_file(frame.f_code.co_filename):
            frame = frame.f_back  # called from our own cancel() of an untracked outer task
        structured = frame is not None and _is_structured(frame)
        app = app_frame(frame)
        canceller = frame_site(app) if app is not None else None
    if structured:
        call.notes[_NOTE] = _Note(None, True, canceller)
        return
    request = CancelRequest(canceller, outer)
    request.delivered_at, request.delivery_stack = _delivery_point(task, canceller)
    record.requests.append(request)
    call.notes[_NOTE] = _Note(request, False, canceller)


def _delivery_point(task: asyncio.Task[Any], canceller: Site | None) -> tuple[Site | None, tuple[Site, ...]]:
    """Where CancelledError will be thrown into *task*: its innermost
    application ``await``, found through the chain of awaited coroutines."""
    coro = user_coro_of(task)
    if getattr(coro, "cr_running", False):
        # The task cancels itself: the error lands at its next await, which
        # has not happened yet; the cancel() call is the best line we have.
        return canceller, ((canceller,) if canceller else ())
    chain = await_chain(coro)
    delivered = next((s for s in reversed(chain) if not is_library_file(s.file)), None)
    return delivered, tuple(chain)


def _check_swallowed(task: asyncio.Task[Any]) -> None:
    """Report *task*, cancelled, if it finished normally (its done callback)."""
    record: CancelRecord | None = getattr(task, "_aw_cancel", None)
    if record is None or task.cancelled() or task._exception is not None:
        return
    swallowed = [r for r in record.requests if not r.absorbed]
    if not swallowed or task.cancelling() <= 0:
        # Only structured cancellation, a deliberate uncancel(), or every
        # request went into a task that swallowed it (that one is reported).
        return
    for request in swallowed:
        outer = request.forwarded_from
        while outer is not None:
            outer.absorbed = True
            outer = outer.forwarded_from
    request = swallowed[0]
    watch = watches.get(task.get_loop())
    if watch is None or not watch.detects(FindingKind.CANCELLATION_SWALLOWED):
        return
    coro = coro_name(task)
    name = task.get_name()
    by = f" (cancelled at {_short(request.cancelled_by)})" if request.cancelled_by else ""
    watch.emit(
        Finding(
            kind=FindingKind.CANCELLATION_SWALLOWED,
            message=(
                f"Task {name!r} (coroutine {coro!r}) was cancelled{by} but finished without "
                "raising CancelledError, so the cancellation was swallowed; re-raise "
                "CancelledError after cleanup"
            ),
            site=request.delivered_at,
            stack=request.delivery_stack,
            task=name,
            coroutine=coro,
            cancelled_by=request.cancelled_by,
            created_at=created_at(task),
        )
    )


def _short(site: Site | None) -> str:
    if site is None:
        return "an unknown place"
    return f"{os.path.basename(site.file)}:{site.line}"
