"""Coroutines never awaited.

CPython reports a coroutine that is finalized before it ever ran by calling
``warnings._warn_unawaited_coroutine(coro)``, looked up on the module at that
moment.  asyncwatch chains that function: it records a finding, then calls
the original, so the RuntimeWarning (and any filter that turns it into an
error) behaves exactly as before.

A finding says where the coroutine was created (``created_at``) and where
it was dropped (``dropped_at``), each where known, and the message says
which line is which: a site never presents one as the other.

The creation line comes from ``coro.cr_origin`` when coroutine-origin
tracking is on (``track_coroutine_origins=True``; it costs time on every
coroutine, so it is off by default).  The drop line is the innermost
application frame when the coroutine is dropped synchronously.  Without
tracking, the drop line is also the creation line when the dropping
instruction discards the result of a call of the coroutine's own function
(``save(x)`` as a statement, the common mistake), checked exactly (see
`called_function_code`); a property returning ``self._ping()`` is not.  When
the garbage collector finalizes the coroutine, the stack says nothing about
either line; the source may still (`_core.callsites`): the one call of the
coroutine function that is neither awaited nor handed to asyncio, said to
be read from the source.  So may it for a coroutine function given to the
loop as a callback (``call_soon(flush)``), which the loop calls and drops
inside its own dispatch: the one registration of it (``scheduled_at``).
"""

from __future__ import annotations

import asyncio
import asyncio.base_events
import asyncio.events
import functools
import os
import sys
import threading
import types
import warnings
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

from .._core.collecting import after_collections, collecting, hold, no_longer_after_collections
from .._core.detector import CoroutineClaims, Detector, DetectorContext
from .._core.findings import Finding, FindingKind, Site
from .._core.frames import (
    LOOP_DISPATCH,
    LOOP_DISPATCH_NAMES,
    app_frame_in_callback,
    frame_site,
    is_library_file,
    qualname_of,
    source_path,
)
from .._core.runtime import report_internal_error

if TYPE_CHECKING:
    from .._core.survivors import Survivors

__all__ = ["ORIGIN_DEPTH", "NeverAwaitedDetector"]


#: Frames recorded per coroutine with track_coroutine_origins: enough to get
#: past library frames to the creating line; CPython prints them in its own
#: "never awaited" warning too, so no deeper.
ORIGIN_DEPTH = 8


def _is_stdlib_hook(func: Any) -> bool:
    return getattr(func, "__module__", None) in ("warnings", "_py_warnings") and (
        getattr(func, "__qualname__", None) == "_warn_unawaited_coroutine"
    )


def _stdlib_message(coro: Any) -> str:
    """The text of CPython's own ``warnings._warn_unawaited_coroutine``."""
    lines = [f"coroutine '{coro.__qualname__}' was never awaited\n"]
    origin = getattr(coro, "cr_origin", None)
    if origin is not None:
        import linecache
        import traceback

        frames = [(f, n, fn, linecache.getline(f, n)) for f, n, fn in reversed(origin)]
        lines.append("Coroutine created at (most recent call last)\n")
        lines += traceback.format_list(frames)
    return "".join(lines).rstrip("\n")


class NeverAwaitedDetector(Detector):
    """Reports ``coroutine_never_awaited``: owns the
    ``warnings._warn_unawaited_coroutine`` hook (and origin tracking).

    A process-wide detector: coroutines belong to no loop.
    """

    kind = FindingKind.COROUTINE_NEVER_AWAITED

    def __init__(self) -> None:
        self._emit: Callable[[Finding], None] = _nowhere
        self._context: DetectorContext | None = None
        self._track_origins = False
        self._original: Callable[[Any], None] | None = None
        self._installed: Callable[[Any], None] | None = None
        self._previous_depth: int | None = None
        self.enabled = True
        # The coroutines of tasks reported as destroyed while pending: their
        # "never awaited" is the same mistake, reported once.
        self._claims = CoroutineClaims()
        # Findings made while the garbage collector runs, held until it is
        # done: it may finalize a coroutine before the task that owns it.
        self._held: list[tuple[int, Finding]] = []
        self._held_lock = threading.Lock()

    def install(self, context: DetectorContext) -> None:
        self._context = context
        self._emit = context.emit
        self._track_origins = context.settings.track_coroutine_origins
        self._claims = context.claims
        self._claims.active = True
        original = getattr(warnings, "_warn_unawaited_coroutine", None)
        if original is None:  # pragma: no cover - every supported CPython has it
            return
        self._original = original

        is_stdlib = _is_stdlib_hook(original)

        def _warn_unawaited_coroutine(coro: Any) -> None:
            if self.enabled:
                try:
                    self._on_never_awaited(coro, sys._getframe(1))
                except Exception as exc:
                    self.enabled = False
                    self._failed(exc)
            if is_stdlib:
                # Warn from this frame with the stdlib's stacklevel, so the
                # RuntimeWarning still points at the user's line, not at us.
                warnings.warn(_stdlib_message(coro), category=RuntimeWarning, stacklevel=2, source=coro)
            else:
                original(coro)

        self._installed = _warn_unawaited_coroutine
        warnings._warn_unawaited_coroutine = _warn_unawaited_coroutine  # type: ignore[attr-defined]
        after_collections(self._after_collection)
        if self._track_origins:
            self._previous_depth = sys.get_coroutine_origin_tracking_depth()
            sys.set_coroutine_origin_tracking_depth(max(self._previous_depth, ORIGIN_DEPTH))

    def uninstall(self) -> None:
        self._claims.active = False
        if self._installed is not None:
            if getattr(warnings, "_warn_unawaited_coroutine", None) is self._installed:
                warnings._warn_unawaited_coroutine = self._original  # type: ignore[attr-defined]
            else:
                # Someone wrapped us after we installed: stay in their chain, inert.
                self.enabled = False
            self._installed = None
        no_longer_after_collections(self._after_collection)
        self._flush_held()
        if self._previous_depth is not None:
            sys.set_coroutine_origin_tracking_depth(self._previous_depth)
            self._previous_depth = None

    def _failed(self, exc: Exception) -> None:
        if self._context is not None:
            self._context.failed(self, exc)
        else:
            report_internal_error(self.name, exc)

    def _after_collection(self) -> None:
        try:
            self._flush_held()
        except Exception as exc:
            self.enabled = False
            self._failed(exc)

    def _flush_held(self) -> None:
        with self._held_lock:
            held, self._held = self._held, []
            claimed = self._claims.take_all()
        for coro_id, finding in held:
            if coro_id not in claimed:
                self._emit(finding)

    def _on_never_awaited(self, coro: Any, caller: Any) -> None:
        if self._claims.take(id(coro)):
            return
        finding = self._finding(coro, caller)
        if collecting():
            with self._held_lock:
                self._held.append((id(coro), finding))
            hold()
        else:
            self._emit(finding)

    #: How many coroutines alive at exit are told with what holds them (two
    #: walks over the heap each).
    HOLDERS_AT_EXIT = 5

    def at_exit(self, survivors: Survivors) -> None:
        """A coroutine never started that the program still holds (a list
        of work "for later") is never awaited all the same: CPython warns
        when it is freed, as the interpreter clears the modules."""
        from .._core.survivors import held_by  # at exit only: nothing at import

        described = 0
        for coro in survivors.coroutines:
            if self._claims.take(id(coro)):
                continue
            holder = None
            if described < self.HOLDERS_AT_EXIT:
                described += 1
                holder = held_by(coro, ignore=(survivors.coroutines,))
            self._emit(self._finding_at_exit(coro, holder))

    def _finding_at_exit(self, coro: Any, holder: str | None) -> Finding:
        name = qualname_of(coro)
        created, stack = _origin(coro)
        held = f" (by {holder})" if holder else ""
        advice = "add 'await', or schedule it with asyncio.create_task() and keep the task"
        if created is not None:
            message = (
                f"Coroutine {name!r} was created at {_short(created)} but never awaited: it was still "
                f"referenced when the program ended{held}, so CPython warns only as it shuts down; {advice}"
            )
        elif (made := _made_at(getattr(coro, "cr_code", None))) is not None:
            created = made[0]
            message = (
                f"Coroutine {name!r} was never awaited: it was still referenced when the program ended{held}, "
                f"so CPython warns only as it shuts down; {_as_the_source_tells(name, made, advice)}"
            )
        else:
            code = getattr(coro, "cr_code", None)
            defined = f" (defined at {code.co_filename}:{code.co_firstlineno})" if code is not None else ""
            how = "" if self._track_origins else "; track_coroutine_origins=True records it"
            message = (
                f"Coroutine {name!r}{defined} was never awaited: it was still referenced when the program "
                f"ended{held}, so CPython warns only as it shuts down; where it was created is not known{how}; "
                f"{advice} where it is created"
            )
        return Finding(
            kind=FindingKind.COROUTINE_NEVER_AWAITED,
            message=message,
            site=created,
            stack=stack,
            coroutine=name,
            created_at=created,
        )

    def _finding(self, coro: Any, caller: Any) -> Finding:
        name = qualname_of(coro)
        dropped: Site | None = None
        created, stack = _origin(coro)
        collected = collecting()
        how: str | None = None
        returned_by: str | None = None
        scheduled: Site | None = None
        if not collected:
            # Dropped right here (not by a collection, which may run anywhere).
            frame = app_frame_in_callback(caller)
            if frame is None:
                how, returned_by, returned_from, scheduled = _called_back_by_the_loop(caller, coro)
                created = created or returned_from
                if not stack and returned_from is not None:
                    stack = (returned_from,)
            else:
                dropped = frame_site(frame)
                code = getattr(coro, "cr_code", None)
                if created is None and _called_here(frame, code):
                    # ``save(x)`` as a statement (or ``[save(x) for x in
                    # xs]``): this line called the coroutine function and
                    # discards what it returned.
                    created = dropped
                if not stack:
                    stack = (dropped,)
        inferred: tuple[Site, str | None] | None = None
        if created is None and dropped is None and (how is None or (how == _COMPILED and scheduled is None)):
            # No frame saw it made or dropped (the collector freed it, or
            # library code dropped it, or a compiled loop with no callback
            # of the program's to blame: uvloop freeing an executor
            # future's result, ``run_in_executor(None, lambda: save(r))``):
            # the source may still tell.
            inferred = _made_at(getattr(coro, "cr_code", None))
            created = inferred[0] if inferred is not None else None
        return Finding(
            kind=FindingKind.COROUTINE_NEVER_AWAITED,
            message=_message(
                name,
                getattr(coro, "cr_code", None),
                created,
                dropped,
                self._track_origins,
                collected,
                how,
                returned_by,
                scheduled,
                inferred,
            ),
            # Where it was created when known (the line to fix); else the
            # line that gave it to the loop, or where it was dropped, said so.
            site=created or scheduled or dropped,
            stack=stack,
            coroutine=name,
            created_at=created,
            dropped_at=dropped,
            scheduled_at=scheduled,
            # Dropped right here, or finalized by a collection that may be
            # another thread's: then where it was dropped is unknown.
            thread=None if collected else threading.current_thread().name,
        )


def _origin(coro: Any) -> tuple[Site | None, tuple[Site, ...]]:
    """Where *coro* was created (its innermost application frame) and the
    stack that created it, outermost first, from ``cr_origin`` when origin
    tracking is on; else nothing."""
    origin = getattr(coro, "cr_origin", None)
    if not origin:
        return None, ()
    # innermost first: (filename, lineno, function); stop at the loop's
    # dispatch (a coroutine function called back by the loop).
    sites = []
    for filename, line, function in origin:
        if (filename, function) in LOOP_DISPATCH_NAMES:
            break
        sites.append(Site(source_path(filename), line, function))
    created = next((s for s in sites if not is_library_file(s.file)), None)
    return created, tuple(reversed(sites))


_HANDLE_RUN = asyncio.events.Handle._run.__code__
_RUN_ONCE = asyncio.base_events.BaseEventLoop._run_once.__code__  # type: ignore[attr-defined]


#: How the event loop dropped a coroutine (`_called_back_by_the_loop`).
_SCHEDULED = "scheduled"  # it called the coroutine function, given as a callback
_RETURNED = "returned"  # a callback of the program returned the coroutine
_COMPILED = "compiled"  # from C (uvloop): one of the two, or another drop


def _called_here(frame: Any, code: Any) -> bool:
    """Whether *frame*'s current line called the function of *code* (or a
    comprehension of such calls) and discards what it returned."""
    try:
        # Imported when a finding is made: a module of tens of objects that
        # every collection of the program would walk again (issue 15's
        # import budget).
        from .._core.bytecode import called_function_code, comprehension_call_codes
    except ImportError:  # the interpreter is shutting down: no creation line, the finding all the same
        return False
    return called_function_code(frame) is code or code in comprehension_call_codes(frame)


def _called_back_by_the_loop(caller: Any, coro: Any) -> tuple[str | None, str | None, Site | None, Site | None]:
    """How the event loop dropped *coro*, never started, as a callback's
    return value: `_SCHEDULED`, when asyncio's loop called *coro*'s coroutine
    function as a plain callback (``call_soon(refresh)``); `_RETURNED`, with
    the callback's name and the line that made *coro*, when a callback of
    the program returned what a call of the coroutine function returned
    (``call_later(5, lambda: expire(sid))``; the line read from the
    callback's code, only when a single one can have made it, else None);
    `_COMPILED` when a compiled loop dropped it from C, under the frame that
    runs the loop (no handle to read); else None.  Last, the line that gave
    the loop that callback, where the source names a single one."""
    frame = caller
    while frame is not None and frame.f_code not in LOOP_DISPATCH:
        if not is_library_file(frame.f_code.co_filename):
            return None, None, None, None
        frame = frame.f_back
    if frame is None:
        return None, None, None, None
    code = getattr(coro, "cr_code", None)
    if frame.f_code is not _HANDLE_RUN:
        compiled = frame.f_code is not _RUN_ONCE and not isinstance(
            asyncio.events._get_running_loop(), asyncio.base_events.BaseEventLoop
        )
        if not compiled:
            return None, None, None, None
        # No handle to read: the coroutine function itself, or a lambda
        # calling it, is what the program can have given the loop.
        return _COMPILED, None, None, _scheduled_at(code, code, or_returning=True)
    handle = frame.f_locals.get("self")  # asyncio's Handle._run: a library frame
    callback = getattr(handle, "_callback", None)
    del frame, handle
    callback = getattr(callback, "func", callback)  # functools.partial
    callback = getattr(callback, "__func__", callback)  # a bound method
    if code is None or not isinstance(callback, types.FunctionType):
        return None, None, None, None
    if callback.__code__ is code:
        return _SCHEDULED, None, None, _scheduled_at(code, code)
    if is_library_file(callback.__code__.co_filename):
        return None, None, None, None
    scheduled = _scheduled_at(callback.__code__, code)
    try:
        from .._core.bytecode import returned_call_lines  # see `_called_here`
    except ImportError:  # the interpreter is shutting down
        return _RETURNED, callback.__code__.co_qualname, None, scheduled
    lines = set(returned_call_lines(callback, code))
    made = None
    if len(lines) == 1:
        made = Site(source_path(callback.__code__.co_filename), lines.pop(), callback.__code__.co_qualname)
    return _RETURNED, callback.__code__.co_qualname, made, scheduled


def _made_at(code: Any) -> tuple[Site, str | None] | None:
    """The one line of the program's source that calls *code*'s coroutine
    function and neither awaits the result nor hands it to asyncio, or that
    gives the function to something that calls it plainly; with what it
    was given to (``atexit.register``), if that is how.  (A tuple, not a
    class: a class is tens of objects every collection walks, issue 15.)"""
    if code is None or is_library_file(code.co_filename):
        return None
    try:
        from .._core.callsites import made_at  # see `_scheduled_at`
    except ImportError:  # the interpreter is shutting down
        return None
    found = made_at(_tiers(code.co_filename, code.co_name), code.co_name)
    if found is None:
        return None
    site, given_to = found
    return Site(source_path(site.file), site.line, site.function), given_to


def _as_the_source_tells(name: str | None, made: tuple[Site, str | None], advice: str) -> str:
    """Where the source says *made* was made, and what to do about it."""
    site, given_to = made
    if given_to is not None:
        return (
            f"no frame saw where it was made, and the source tells: at {_short(site)}, the only line there "
            f"that gives {_called(name)} to {given_to}(), which calls it as a plain function and drops "
            f"the coroutine it returns; give {given_to}() a plain function that runs the coroutine "
            f"(asyncio.run({_called(name)}(...)), or asyncio.run_coroutine_threadsafe({_called(name)}(...), "
            "loop) from another thread)"
        )
    return (
        f"no frame saw where it was made, and the source tells: at {_short(site)}, the only call of "
        f"{_called(name)}() there that is neither awaited nor given to asyncio; {advice}"
    )


def _tiers(file: str, name: str) -> Iterator[list[str]]:
    """The program's files to read for a line that uses *name*, defined in
    *file*, in the order `callsites` reads them: *file* and the main script
    (a function is often defined in one module and used where the program
    is wired up); then, only if they have no such line, the program's other
    modules that spell *name*."""
    main = getattr(sys.modules.get("__main__"), "__file__", None)
    yield [file] + ([main] if main and not is_library_file(main) else [])
    yield list(_naming(name, len(sys.modules)))


#: The most modules of the program `_naming` reads, and names: a larger
#: program is read no further (the first tier still is), and a name spelled
#: in more modules than that is too common to tell one line by.
_MODULES_READ = 1000
_MODULES_NAMING = 50


@functools.lru_cache(maxsize=32)
def _naming(name: str, modules: int) -> tuple[str, ...]:
    """The program's imported modules (not the standard library's, nor an
    installed package's) whose source spells *name*; *modules*, how many
    are imported, only makes a new import read them again."""
    del modules
    found: list[str] = []
    needle = name.encode()
    read = 0
    for module in list(sys.modules.values()):
        file = getattr(module, "__file__", None)
        if not isinstance(file, str) or not file.endswith(".py") or is_library_file(file):
            continue
        read += 1
        if read > _MODULES_READ:
            break
        try:
            with open(file, "rb") as source:
                if needle not in source.read():
                    continue
        except OSError:
            continue
        found.append(file)
        if len(found) > _MODULES_NAMING:
            return ()
    return tuple(sorted(found))


def _scheduled_at(callback: Any, code: Any, *, or_returning: bool = False) -> Site | None:
    """The line of *callback*'s module that gave the loop *callback* (a
    function's code), where the source names a single one; with
    *or_returning*, also a lambda calling the coroutine function of *code*."""
    if callback is None or is_library_file(callback.co_filename):
        return None
    try:
        # Imported when a finding is made (issue 15's import budget).
        from .._core.callsites import scheduled_at
    except ImportError:  # the interpreter is shutting down
        return None
    if callback.co_name == "<lambda>":  # the registration holds the lambda itself
        site = scheduled_at(((callback.co_filename,),), code.co_name, lambda_line=callback.co_firstlineno)
    else:
        site = scheduled_at(_tiers(callback.co_filename, callback.co_name), callback.co_name, or_returning=or_returning)
    return Site(source_path(site.file), site.line, site.function) if site is not None else None


def _message(
    name: str | None,
    code: Any,
    created: Site | None,
    dropped: Site | None,
    tracking: bool,
    collected: bool = True,
    how: str | None = None,
    returned_by: str | None = None,
    scheduled: Site | None = None,
    inferred: tuple[Site, str | None] | None = None,
) -> str:
    advice = "add 'await', or schedule it with asyncio.create_task() and keep the task"
    if inferred is not None:
        if how == _COMPILED:
            by = "the event loop dropped it from compiled code, with no line of the program running"
        elif collected:
            by = "the garbage collector freed it"
        else:
            by = "library code dropped it with no line of the program running"
        return f"Coroutine {name!r} was never awaited; {by}; {_as_the_source_tells(name, inferred, advice)}"
    if how == _COMPILED and created is None:
        defined = f" (defined at {code.co_filename}:{code.co_firstlineno})" if code is not None else ""
        if scheduled is not None:
            return (
                f"Coroutine {name!r}{defined} was never awaited; the event loop dropped it from compiled code, "
                f"with no line of the program running: the callback given to the loop at {_short(scheduled)} "
                "(the only line giving the loop a callback that is this coroutine function or calls it, in its "
                "file and the main script or, with none there, in the program's other modules) makes a coroutine "
                "the loop ignores; pass a function that calls "
                f"asyncio.create_task({_called(name)}(...)) and keeps the task"
            )
        return (
            f"Coroutine {name!r}{defined} was never awaited; the event loop dropped it from compiled code, "
            "with no line of the program running: a callback given to the loop (call_soon, call_later, "
            "add_done_callback) that is this coroutine function, or that returned its coroutine, would do "
            "that; where it was created and scheduled is unknown on this loop; pass a function that calls "
            f"asyncio.create_task({_called(name)}(...)) and keeps the task"
        )
    if how == _RETURNED:
        made = f"was created at {_short(created)}" if created is not None else "was made"
        hint = "" if created is not None or tracking else "; track_coroutine_origins=True records where"
        given = f" (given to the loop at {_short(scheduled)})" if scheduled not in (None, created) else ""
        return (
            f"Coroutine {name!r} {made} and returned by {returned_by!r}{given}, a callback the event loop called "
            "(call_soon, call_later, call_at, add_done_callback, add_reader ignore what a callback returns): "
            f"the loop dropped it, so it never ran{hint}; in the callback, schedule it with "
            "asyncio.create_task() and keep the task"
        )
    if created is not None and created == dropped:
        return f"Coroutine {name!r} was created and dropped at {_short(created)} without being awaited; {advice}"
    if created is not None:
        where = f" and dropped at {_short(dropped)}" if dropped else ""
        return f"Coroutine {name!r} was created at {_short(created)}{where} but never awaited; {advice}"
    defined = f" (defined at {code.co_filename}:{code.co_firstlineno})" if code is not None else ""
    hint = "" if tracking else "; track_coroutine_origins=True records it"
    if dropped is not None:
        return (
            f"Coroutine {name!r}{defined} was dropped at {_short(dropped)} without being awaited; where it "
            f"was created is not known{hint}; {advice} where it is created"
        )
    if how == _SCHEDULED:
        where = f" at {_short(scheduled)}" if scheduled is not None else ""
        unknown = "" if scheduled is not None else "; where it was scheduled is unknown"
        return (
            f"Coroutine function {name!r}{defined} was given to the event loop as a callback{where} (call_soon, "
            "call_later, call_at, add_done_callback, add_reader take plain functions): the loop called it and "
            f"dropped the coroutine it returned, so it never ran{unknown}; "
            f"pass a function that calls asyncio.create_task({_called(name)}(...)) and keeps the task"
        )
    if not collected:
        return (
            f"Coroutine {name!r}{defined} was never awaited; library code dropped it with no line of the "
            f"program running, so where it was created and dropped is unknown{hint}; {advice}"
        )
    return (
        f"Coroutine {name!r}{defined} was never awaited; the garbage collector freed it, so where it was "
        f"created and dropped is unknown{hint}; {advice}"
    )


def _called(name: str | None) -> str:
    """How a call of the coroutine function *name* (a qualified name) is
    written where it is scheduled: ``flush``, not ``main.<locals>.flush``."""
    return (name or "...").rpartition(".")[2]


def _short(site: Site | None) -> str:
    return f"{os.path.basename(site.file)}:{site.line}" if site is not None else "an unknown line"


def _nowhere(finding: Finding) -> None:
    """Where findings go before `NeverAwaitedDetector.install`."""
