"""Swallowed cancellations: a task cancelled that finished without raising.

asyncio's structured helpers uncancel() only the task they own: a timeout()
its task, a TaskGroup its parent (which on 3.11/3.12 it may leave at 1:
gh-116720).  Those cancellations are exempt.  Every other ``cancel()`` is a
request the task must honour: a program's own, a TaskGroup's abort of its
children, wait_for's cancellation of what it waits on, and a structured
cancellation forwarded from the owned task into the task it awaits.  Each
request records who cancelled (the application line calling ``cancel()``,
or, for a structure, the line that set it up: the ``async with
TaskGroup()``, the ``async with asyncio.timeout()``, the ``wait_for`` call)
and where the CancelledError will land (the task's innermost application
``await``); a done callback checks, when the task finishes, whether it
finished normally while still ``cancelling()``.  A request forwarded from an
outer task's ``cancel()`` into the task it awaits is reported once, on the
task that swallowed it.

A timeout's cancellation of its own task is exempt from that check (the
timeout uncancels it), but it can be swallowed all the same, inside the
``async with asyncio.timeout()`` block (and so inside 3.12+'s ``wait_for``,
which is one): the block then runs on past its deadline and ends without
the CancelledError the timeout turns into TimeoutError.  The timeout's
``__aexit__`` is the one place that knows; it is wrapped while the detector
is installed (a plain function returning asyncio's own coroutine, so no
frame of ours is in a traceback), and when it sees an expired timeout whose
cancellation never arrived and was not uncancelled, the finding names where
the error landed (recorded when the timeout fired) and the ``async with``.
"""

from __future__ import annotations

import asyncio
import asyncio.runners
import inspect
import os
import weakref
from collections.abc import Callable
from types import FrameType
from typing import TYPE_CHECKING, Any

from .._core.detector import Detector, DetectorContext, watches
from .._core.findings import Finding, FindingKind, Site
from .._core.frames import (
    LOOP_DISPATCH,
    app_frame_in_callback,
    app_frame_in_running_loop,
    await_chain,
    describe_task,
    frame_site,
    is_library_file,
    is_own_file,
    library_package,
    qualname_of,
    source_path,
)
from .._core.runtime import report_internal_error
from .._core.tasks import CancelCall, Task, cancel_calls, coro_name, created_at, user_coro_of

if TYPE_CHECKING:
    from .._core.catchers import Swallower

__all__ = ["CancellationDetector"]


class CancellationDetector(Detector):
    """Reports ``cancellation_swallowed`` (site: where the CancelledError landed)."""

    kind = FindingKind.CANCELLATION_SWALLOWED

    def __init__(self) -> None:
        self._context: DetectorContext | None = None
        self._timeout_exit: _TimeoutExitPatch | None = None

    def install(self, context: DetectorContext) -> None:
        self._context = context
        self._timeout_exit = _TimeoutExitPatch(self._check_timeout)

    def uninstall(self) -> None:
        if self._timeout_exit is not None:
            self._timeout_exit.restore()
            self._timeout_exit = None

    def _check_timeout(self, timeout: asyncio.Timeout) -> None:
        """An expired timeout's block ended without an exception (its ``__aexit__``)."""
        self._contained(_check_timeout_swallowed, timeout)

    def task_cancel_requested(self, task: asyncio.Task[Any], caller: FrameType, message: Any) -> None:
        calls = cancel_calls()
        if isinstance(task, Task) and calls and calls[-1].task is task:
            _note_cancel(task, caller, calls[-1], calls[-2] if len(calls) > 1 else None, self._check_swallowed)

    def _check_swallowed(self, task: asyncio.Task[Any]) -> None:
        """Done callback of a cancelled task: report if it finished normally."""
        self._contained(_check_swallowed, task)

    def _contained(self, check: Callable[[Any], None], subject: Any) -> None:
        """Run *check*, called from asyncio's machinery: an error of ours is
        contained and disables this detector, reported once."""
        try:
            check(subject)
        except Exception as exc:
            if self._context is not None:
                self._context.failed(self, exc)
            else:
                report_internal_error(self.name, exc)


class CancelRequest:
    """One unstructured ``cancel()`` of a task: who, and where it lands."""

    __slots__ = (
        "absorbed",
        "cancelled_by",
        "delivered_at",
        "delivery_stack",
        "forwarded_from",
        "in_chain",
        "structure",
    )

    def __init__(
        self, cancelled_by: Site | None, forwarded_from: CancelRequest | None, structure: str | None = None
    ) -> None:
        self.cancelled_by = cancelled_by
        # What cancelled, when it was a structure ("the TaskGroup"): its line is cancelled_by.
        self.structure = structure
        self.delivered_at: Site | None = None
        self.delivery_stack: tuple[Site, ...] = ()
        # Whether delivery_stack is the chain of awaits the error lands in
        # (not a task cancelling itself, whose next await is not known yet).
        self.in_chain = False
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

    __slots__ = ("canceller", "forwarded", "request", "structure", "structured")

    def __init__(
        self, request: CancelRequest | None, structured: bool, canceller: Site | None, structure: str | None = None
    ) -> None:
        # request None and structured False: a structure cancelling the task
        # it owns, exempt; what it forwards to the task awaited is a request.
        self.request = request
        self.structured = structured
        self.canceller = canceller
        self.structure = structure
        # The tasks that cancel() was forwarded into (weakly): one that
        # swallows it is reported itself, not the structure's own task.
        self.forwarded: list[weakref.ReferenceType[asyncio.Task[Any]]] = []


_NOTE = "cancellation"


# Cancellations made by asyncio's structured helpers, keyed by file name,
# then by function name (None = any).  Which of them are exempt is decided
# by `_structured_cancel`.
_STRUCTURED: dict[str, frozenset[str] | None] = {
    "taskgroups.py": None,
    "timeouts.py": None,
    "staggered.py": None,
    "tasks.py": frozenset({"wait_for", "_cancel_and_wait", "_on_timeout"}),
}
_ASYNCIO_DIR = os.path.dirname(asyncio.__file__) + os.sep
_WAIT_FOR = asyncio.tasks.wait_for.__code__
_TIMEOUT_NAMES = frozenset({"timeout", "timeout_at"})


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


# What a structured helper's cancel() of a task is (`_structured_cancel`).
_EXEMPT = "exempt"  # asyncio's own bookkeeping: never reported, nor what it forwards
_OWN = "own"  # the structure's own task, which it uncancels: exempt; what it forwards is a request
_REQUEST = "request"  # a task the structure never uncancels: a request like a program's


def _structured_cancel(frame: FrameType, task: asyncio.Task[Any]) -> tuple[str, Site | None, str | None]:
    """Classify a cancel() of *task* made by asyncio's structured helper in
    *frame*; return the class, the line that set the structure up, and its name."""
    base = os.path.basename(frame.f_code.co_filename)
    owner: Any = frame.f_locals.get("self")
    if base == "taskgroups.py" and isinstance(owner, asyncio.TaskGroup):
        parent = getattr(owner, "_parent_task", None)
        line = _structure_line(parent, frame, frozenset({"TaskGroup"}), "taskgroups.py")
        return (_OWN if task is parent else _REQUEST), line, "the TaskGroup"
    if base == "timeouts.py" and isinstance(owner, asyncio.Timeout) and task is getattr(owner, "_task", None):
        return _OWN, _structure_line(task, frame, _TIMEOUT_NAMES, "timeouts.py"), "the timeout"
    if base == "tasks.py" and frame.f_code.co_name == "_cancel_and_wait":
        app = app_frame_in_callback(frame)
        if app is None:
            return _EXEMPT, None, None
        # 3.11's wait_for(coroutine) runs it in a task of its own, made on
        # the wait_for line; 3.12+ awaits it in the caller's task, under a
        # timeout (see `_check_timeout_swallowed`).  Either way, a coroutine
        # that swallows wait_for's cancellation is reported, at the wait_for line.
        return _REQUEST, frame_site(app), "wait_for"
    return _EXEMPT, None, None


def _structure_line(
    owner: asyncio.Task[Any] | None, caller: FrameType, names: frozenset[str], library: str
) -> Site | None:
    """The application line that set a structure up (an ``async with``): in
    the frames of *owner*, the task it belongs to, the innermost ``async with``
    block around the current line whose expression calls one of *names*; a
    frame awaiting the structure's exit (in *library*), or wait_for, is at
    that line.  None when it cannot be told."""
    if owner is None:
        return None
    try:
        from .._core.bytecode import enclosing_async_withs  # see `_swallower`
    except ImportError:  # the interpreter is shutting down
        return None
    previous: FrameType | None = None
    for frame in _task_frames(owner, caller):
        code = frame.f_code
        if is_library_file(code.co_filename):
            previous = frame
            continue
        if previous is not None and (
            previous.f_code is _WAIT_FOR or os.path.basename(previous.f_code.co_filename) == library
        ):
            return frame_site(frame)  # awaiting wait_for, or the structure's __aexit__, on that line
        previous = frame
        # Matched by what the ``async with`` expression calls, not by the
        # object: reading an application frame's f_locals would keep its
        # locals alive on 3.11/3.12 (a snapshot stays on the frame).
        for block in enclosing_async_withs(frame):
            if block.loads & names:
                return Site(source_path(code.co_filename), block.line, code.co_qualname)
    return None


def _task_frames(task: asyncio.Task[Any], caller: FrameType) -> list[FrameType]:
    """The frames of *task*'s coroutine chain, innermost first: its stack from
    *caller* outwards when it is running, else its chain of awaits."""
    coro = user_coro_of(task)
    frames: list[FrameType] = []
    if getattr(coro, "cr_running", False):
        frame: FrameType | None = caller
        while frame is not None and frame.f_code not in LOOP_DISPATCH:
            frames.append(frame)
            frame = frame.f_back
        return frames
    obj: Any = coro
    while obj is not None:
        found = getattr(obj, "cr_frame", None) or getattr(obj, "gi_frame", None) or getattr(obj, "ag_frame", None)
        if found is None:
            break
        frames.append(found)
        obj = getattr(obj, "cr_await", None) or getattr(obj, "gi_yieldfrom", None) or getattr(obj, "ag_await", None)
    frames.reverse()
    return frames


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
    structure: str | None = None
    if note is not None and note.request is not None and note.request not in record.requests:
        # Forwarded from an outer task's cancel(): same canceller, same kind.
        outer, structured, canceller, structure = note.request, note.structured, note.canceller, note.structure
    elif note is not None and note.structured:
        structured, canceller = True, None  # forwarded from an exempt structured cancel
    elif note is not None and note.request is None:
        # Forwarded from a structure's cancel of the task it owns into the
        # task that one awaits, which the structure never uncancels.
        structured, canceller, structure = False, note.canceller, note.structure
        note.forwarded.append(weakref.ref(task))
    else:
        frame: FrameType | None = caller
        while frame is not None and is_own_file(frame.f_code.co_filename):
            frame = frame.f_back  # called from our own cancel() of an untracked outer task
        if frame is not None and _is_structured(frame):
            kind, canceller, structure = _structured_cancel(frame, task)
            if kind == _OWN:
                own = call.notes[_NOTE] = _Note(None, False, canceller, structure)
                owner = frame.f_locals.get("self")
                if isinstance(owner, asyncio.Timeout):
                    # Where its CancelledError lands, for `_check_timeout_swallowed`.
                    owner._aw_landed = _Landed(own, *_delivery_point(task, canceller))  # type: ignore[attr-defined]
                return
            structured = kind == _EXEMPT
        elif frame is not None and _library_cancels_its_own(frame, task):
            structured, canceller = True, None
        else:
            structured = False
            app = app_frame_in_running_loop(frame)
            canceller = frame_site(app) if app is not None else None
    if structured:
        call.notes[_NOTE] = _Note(None, True, canceller)
        return
    request = CancelRequest(canceller, outer, structure)
    request.delivered_at, request.delivery_stack, request.in_chain = _delivery_point(task, canceller)
    record.requests.append(request)
    call.notes[_NOTE] = _Note(request, False, canceller, structure)


def _library_cancels_its_own(caller: FrameType, task: asyncio.Task[Any]) -> bool:
    """Whether *task* runs an installed library's coroutine and is cancelled,
    in *caller*, by that library or by asyncio's shutdown: the library's own
    structure, as asyncio's are.

    aiohappyeyeballs' staggered race (aiohttp's every connection to a host
    with several addresses) runs each attempt in ``run_one_coro``, which
    catches BaseException to record it, and cancels the attempts that lose:
    a copy of asyncio's own staggered race, which is exempt as asyncio's.
    anyio's process pool keeps a task that waits for asyncio.run's shutdown
    to cancel it, and then stops the workers and returns.  The program can
    neither see nor fix either; reported, they were "swallowed
    cancellations" on every slow first attempt and at every exit.  A library
    task running the program's coroutine (a task group's child) is the
    program's: still reported.
    """
    code = getattr(user_coro_of(task), "cr_code", None)
    if code is None:
        return False
    package = library_package(code.co_filename)
    if package is None:
        return False
    return caller.f_code is _SHUTDOWN_CANCEL or library_package(caller.f_code.co_filename) == package


# asyncio.run's (asyncio.Runner's) cancel of the tasks left when the main task ends.
_SHUTDOWN_CANCEL = getattr(getattr(asyncio.runners, "_cancel_all_tasks", None), "__code__", None)


def _delivery_point(task: asyncio.Task[Any], canceller: Site | None) -> tuple[Site | None, tuple[Site, ...], bool]:
    """Where CancelledError will be thrown into *task*: its innermost
    application ``await``, found through the chain of awaited coroutines;
    the chain; and whether it is one (not the cancel() of a running task)."""
    coro = user_coro_of(task)
    if getattr(coro, "cr_running", False):
        # The task cancels itself: the error lands at its next await, which
        # has not happened yet; the cancel() call is the best line we have.
        return canceller, ((canceller,) if canceller else ()), False
    chain = await_chain(coro)
    delivered = next((s for s in reversed(chain) if not is_library_file(s.file)), None)
    return delivered, tuple(chain), bool(chain)


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
    swallower = _swallower(request.delivery_stack) if request.in_chain else None
    if request.structure is not None:
        where = (
            f"set up at {_short(request.cancelled_by)}"
            if request.cancelled_by
            else "set up where asyncwatch cannot tell"
        )
        by = f" (by {request.structure}, {where})"
    else:
        by = f" (cancelled at {_short(request.cancelled_by)})" if request.cancelled_by else ""
    watch.emit(
        Finding(
            kind=FindingKind.CANCELLATION_SWALLOWED,
            message=(
                f"{describe_task(name, coro)} was cancelled{by} but finished without "
                f"raising CancelledError, so the cancellation was swallowed{_by_what(swallower)}; "
                "re-raise CancelledError after cleanup"
            ),
            site=request.delivered_at,
            stack=request.delivery_stack,
            task=name,
            coroutine=coro,
            cancelled_by=request.cancelled_by,
            created_at=created_at(task),
            swallowed_at=swallower.site if swallower is not None else None,
        )
    )


_EXPIRING = getattr(getattr(asyncio.timeouts, "_State", None), "EXPIRING", None)


class _TimeoutExitPatch:
    """``asyncio.Timeout.__aexit__`` wrapped to tell *check* about an expired
    timeout whose block ended without an exception; restored on `restore`."""

    def __init__(self, check: Callable[[asyncio.Timeout], None]) -> None:
        self.original = original = asyncio.Timeout.__dict__["__aexit__"]
        self.active = True

        def __aexit__(self_: asyncio.Timeout, exc_type: Any, exc_val: Any, exc_tb: Any) -> Any:
            if exc_type is None and patch.active and getattr(self_, "_state", None) is _EXPIRING:
                check(self_)
            return original(self_, exc_type, exc_val, exc_tb)

        patch = self
        __aexit__.__qualname__ = original.__qualname__
        __aexit__.__doc__ = original.__doc__
        __aexit__.__wrapped__ = original  # type: ignore[attr-defined]
        mark = getattr(inspect, "markcoroutinefunction", None)  # 3.12+
        self.installed = mark(__aexit__) if mark is not None else __aexit__
        asyncio.Timeout.__aexit__ = self.installed  # type: ignore[method-assign,assignment]

    def restore(self) -> None:
        self.active = False
        if asyncio.Timeout.__dict__.get("__aexit__") is self.installed:
            asyncio.Timeout.__aexit__ = self.original  # type: ignore[method-assign]
        # else someone wrapped us since: stay in their chain, inert.


class _Landed:
    """Where an expired timeout's cancellation of its task lands."""

    __slots__ = ("delivered_at", "in_chain", "note", "stack")

    def __init__(self, note: _Note, delivered_at: Site | None, stack: tuple[Site, ...], in_chain: bool) -> None:
        self.note = note  # of the timeout's cancel(): what it was forwarded into
        self.delivered_at = delivered_at
        self.in_chain = in_chain
        self.stack = stack


def _check_timeout_swallowed(timeout: asyncio.Timeout) -> None:
    landed: _Landed | None = getattr(timeout, "_aw_landed", None)
    task: asyncio.Task[Any] | None = getattr(timeout, "_task", None)
    if landed is None or task is None or task.cancelling() <= getattr(timeout, "_cancelling", 0):
        return  # not ours to judge, or uncancel()ed on purpose
    for ref in landed.note.forwarded:
        awaited = ref()
        if awaited is not None and awaited.done() and not awaited.cancelled():
            return  # the task it went into swallowed it, and is reported for it
    watch = watches.get(task.get_loop())
    if watch is None or not watch.detects(FindingKind.CANCELLATION_SWALLOWED):
        return
    cancelled_by, delivered_at, stack = landed.note.canceller, landed.delivered_at, landed.stack
    name = task.get_name()
    coro = coro_name(task)
    where = f"set up at {_short(cancelled_by)}" if cancelled_by else "set up where asyncwatch cannot tell"
    swallower = _swallower(stack) if landed.in_chain else None
    watch.emit(
        Finding(
            kind=FindingKind.CANCELLATION_SWALLOWED,
            message=(
                f"{describe_task(name, coro)} was cancelled (by the timeout, {where}) but its block "
                f"went on without raising CancelledError, so the cancellation was swallowed{_by_what(swallower)} "
                "and the timeout neither ended the block nor raised TimeoutError; re-raise CancelledError "
                "after cleanup"
            ),
            site=delivered_at,
            stack=stack,
            task=name,
            coroutine=coro,
            cancelled_by=cancelled_by,
            created_at=created_at(task),
            swallowed_at=swallower.site if swallower is not None else None,
        )
    )


def _swallower(chain: tuple[Site, ...]) -> Swallower | None:
    # Imported when first needed, as `bytecode` is: each module is tens of
    # objects that every collection of the program would walk again, and
    # `import asyncwatch` plus install() may add 2,000 (issue 15).
    try:
        from .._core.catchers import swallowed_at
    except ImportError:  # the interpreter is shutting down: the finding without it
        return None
    return swallowed_at(chain)


def _by_what(swallower: Swallower | None) -> str:
    if swallower is None:
        return ""
    return f" by {swallower.what} at {_short(swallower.site)}"


def _short(site: Site | None) -> str:
    if site is None:
        return "an unknown place"
    return f"{os.path.basename(site.file)}:{site.line}"
