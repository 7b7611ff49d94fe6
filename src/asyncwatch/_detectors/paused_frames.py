"""What the loop thread's stack says, read by the watchdog while it holds
the GIL (the loop thread is paused at an eval-breaker check): which callback
is running (`callback_frame`), the stall it is in (`read_stall`), and what
its frames are doing: asyncwatch's own work, an import, a ``gc.collect()``
call, a function's first instruction.

Frames and bytecode only: nothing here reads a file or a clock, or lets the
GIL go, so the loop thread cannot move on from the line being read.  The
watchdog holds no frame once it has read them (`loop_probe`).
"""

from __future__ import annotations

import asyncio
import asyncio.base_events
import asyncio.events
import dis
import gc
import os
import signal
import sys
from types import CodeType, FrameType
from typing import Any

from .._core.findings import Site
from .._core.frames import frame_site, is_library_file, is_own_file, qualname_of, stack_of
from .._core.stepping import STEP_WRAPPER_CODES
from .._core.tasks import coro_name, created_at
from .stall_report import Stall

__all__ = ["HANDLE_RUN", "at_start", "callback_frame", "calls_gc_collect", "importing", "own_work", "read_stall"]

#: asyncio runs each callback from this frame (uvloop's dispatch is compiled).
HANDLE_RUN = asyncio.events.Handle._run.__code__


def own_work(chain: list[FrameType]) -> bool:
    """Whether asyncwatch itself (not a wrapped task step) is running."""
    for frame in chain:
        code = frame.f_code
        if code not in STEP_WRAPPER_CODES and is_own_file(code.co_filename):
            return True
    return False


# The import system's own frames: a stall with one of these on its stack is
# start-up work (a module's top level running inside the loop, as uvicorn's
# workers import the application), not a stall of the running program.
_IMPORT_FILES = frozenset(("<frozen importlib._bootstrap>", "<frozen importlib._bootstrap_external>"))


def importing(chain: list[FrameType]) -> str | None:
    """The module the outermost import on *chain* (innermost first) is
    loading; "" for an import whose name cannot be read; None for no import."""
    found: str | None = None
    for frame in chain:
        if frame.f_code.co_filename in _IMPORT_FILES:
            if found is None:
                found = ""
            if frame.f_code.co_name == "_find_and_load":  # outer ones overwrite inner ones
                # As _capture reads a Handle: the loop thread is paused here.
                try:
                    name = frame.f_locals.get("name")
                except Exception:
                    name = None
                found = name if isinstance(name, str) else found
    return found


# asyncio's own loop machinery: a stack through one of these that never
# reached Handle._run is the loop between callbacks, not a greenlet.
_LOOP_MACHINERY = frozenset(
    (
        asyncio.base_events.BaseEventLoop._run_once.__code__,  # type: ignore[attr-defined]
        asyncio.base_events.BaseEventLoop.run_forever.__code__,
    )
)


# What may stand between a callee's load and its call: its arguments, when
# each is a single load, and the call's own preludes (3.11's PRECALL, the
# keyword names).
_ARGUMENT_LOADS = frozenset(("LOAD_CONST", "LOAD_FAST", "LOAD_DEREF", "LOAD_GLOBAL", "LOAD_NAME", "LOAD_SMALL_INT"))
_CALL_PRELUDES = frozenset(("PRECALL", "KW_NAMES", "PUSH_NULL"))


def calls_gc_collect(frame: FrameType) -> bool:
    """Whether *frame* is calling ``gc.collect`` (``gc.collect()``,
    ``gc.collect(2)``, or ``collect()`` imported from gc): its current
    instruction is a call whose callee, loaded by that name just before its
    arguments, is the gc module's.  The bytecode only: no source file (this
    runs while the loop thread is paused; a read would release the GIL)."""
    lasti = frame.f_lasti
    window: list[dis.Instruction] = []
    for instruction in dis.get_instructions(frame.f_code):
        if instruction.offset > lasti:
            break
        window.append(instruction)
        del window[:-12]  # the callee is loaded a few instructions before its call
    # 3.11 specializes a call of a C function into its PRECALL, which makes
    # the call itself: the frame is then at the PRECALL (same argument count).
    call = window[-1] if window else None
    if (
        call is None
        or not (call.opname.startswith("CALL") or call.opname == "PRECALL")
        or not isinstance(call.arg, int)
    ):
        return False
    argc, arguments = window[-1].arg, 0
    for k in range(len(window) - 2, -1, -1):
        instruction = window[k]
        if instruction.opname in _CALL_PRELUDES:
            continue
        if instruction.argval == "collect" and arguments == argc:
            return _is_gc_collect(frame, window, k)
        if instruction.opname not in _ARGUMENT_LOADS:
            return False
        arguments += 1
    return False


def _is_gc_collect(frame: FrameType, window: list[dis.Instruction], k: int) -> bool:
    """Whether the load at *k* in *window* (named ``collect``) is gc.collect.

    Globals only: reading a frame's ``f_locals`` would leave a dict of the
    program's locals on the frame (3.11-3.12), which ``gc.get_referrers``
    then finds (anyio's test_run_sync_worker_cyclic_references does).  A
    ``gc`` or ``collect`` that is a local name is not told apart."""
    load = window[k]
    if load.opname in ("LOAD_ATTR", "LOAD_METHOD"):
        holder = window[k - 1] if k > 0 else None
        if holder is None or holder.opname not in ("LOAD_GLOBAL", "LOAD_NAME") or not isinstance(holder.argval, str):
            return False
        return frame.f_globals.get(holder.argval) is gc
    if load.opname in ("LOAD_GLOBAL", "LOAD_NAME"):
        return frame.f_globals.get("collect") is gc.collect
    return False


_RESUME = dis.opmap["RESUME"]


def at_start(frame: FrameType) -> bool:
    """Whether *frame* is at its first instruction (RESUME): the GIL let go
    as the function was entered.  Asked of a step's outermost frame after a
    hold of the loop thread's: a step that has just begun was let in by the
    step before's hold (uvloop's dispatch between the two is compiled, with
    no eval-breaker check), which it must not be blamed for.  (Asked of the
    innermost frame instead, it also rejected the step's own hold: 3.12 can
    let the GIL go only at the next function the step enters, such as the
    ``asyncio.sleep`` after a ``sorted()``.)"""
    lasti = frame.f_lasti
    code = frame.f_code.co_code
    return 0 <= lasti < len(code) and code[lasti] == _RESUME


_SEND = dis.opmap["SEND"]
#: asyncio's own files, whose frames a step resumes in before the program's.
_ASYNCIO_DIR = os.path.dirname(asyncio.__file__) + os.sep


def resumed_under_an_await(chain: list[FrameType]) -> bool:
    """Whether the step whose frames are *chain* (innermost first) has run
    none of the program's code yet: only asyncio's own frames, resumed
    (``asyncio.sleep`` after its future, ``Queue.get``), inside the
    program's ``await``.  uvloop's dispatch is compiled, with no
    eval-breaker check: after a step that held the GIL, the next one lets it
    go in such a frame, and the program's ``await asyncio.sleep()`` line
    was blamed for the step before's hold (the next request's await, in a
    server whose handlers each sorted a large list).  A frame just entered
    (``await asyncio.sleep(0)`` right after a long call: the GIL let go as
    it began) is the same step's, and says no."""
    for k, frame in enumerate(chain):
        if not frame.f_code.co_filename.startswith(_ASYNCIO_DIR):
            if k == 0 or just_entered(chain[0]):
                return False
            return awaiting(frame)
    return False


_CACHE = dis.opmap["CACHE"]


def awaiting(frame: FrameType) -> bool:
    """Whether *frame* stands in an ``await``, calling into what it awaits:
    at its SEND, or, on 3.12, at SEND's inline cache entry."""
    code, at = frame.f_code.co_code, frame.f_lasti
    while 0 < at < len(code) and code[at] == _CACHE:
        at -= 2
    return 0 <= at < len(code) and code[at] == _SEND


def _entry_offset(code: CodeType) -> int:
    """The offset of *code*'s first RESUME: where a call enters it (after a
    generator's or coroutine's prologue), unlike the RESUMEs after an await."""
    raw = code.co_code
    return next((at for at in range(0, len(raw), 2) if raw[at] == _RESUME), -1)


def just_entered(frame: FrameType) -> bool:
    """Whether *frame* is at its function's entry, where its line is the
    ``def`` line (a frame resumed after an ``await`` is at its await line)."""
    return frame.f_lasti == _entry_offset(frame.f_code)


def callback_frame(
    top: FrameType, runner: CodeType | None, pure_asyncio: bool
) -> tuple[FrameType | None, list[FrameType]]:
    """The outermost frame of the running callback, and the frames from
    *top* down to it (innermost first); (None, []) when idle.  *runner*:
    the code of the frame that runs the loop's callbacks when its dispatch
    is compiled (uvloop); *pure_asyncio*: the dispatch is asyncio's, in
    Python."""
    chain: list[FrameType] = []
    frame: FrameType | None = top
    own: FrameType | None = frame
    while own is not None and is_own_file(own.f_code.co_filename):
        if own.f_code.co_name == "_gc_callback":
            # One of our gc.callbacks (the collector clock's, or
            # _core.collecting's, named so for this; Python only without
            # asyncwatch's extension), called inside a collection the
            # program's allocation triggered: the program's frame is the
            # one below.  (Its call lets the GIL go, which is how a long
            # C call is then often first seen.)
            frame = own.f_back
            break
        own = own.f_back
    while frame is not None:
        code = frame.f_code
        if code is HANDLE_RUN and not chain:
            # asyncio is running a callback with no Python frame of its
            # own (a C function such as time.sleep): follow Handle._run.
            return frame, []
        if code is HANDLE_RUN or code is runner:
            return (chain[-1] if chain else None), chain
        if code in _LOOP_MACHINERY:
            return None, []  # asyncio between callbacks
        chain.append(frame)
        frame = frame.f_back
    if chain and "greenlet" in sys.modules and (runner is not None or pure_asyncio):
        # The stack ended (f_back None) short of the dispatch: a greenlet
        # switched to inside a callback.  Its first frame stands for the
        # callback; the heartbeat tells one long switch-in from many.
        return chain[-1], chain
    return None, []


def _interrupted(chain: list[FrameType]) -> list[FrameType]:
    """*chain* (innermost first) without the Python code the interpreter
    ran inside it on its own (a finalizer the collector called, a signal
    handler, a ``gc.callbacks`` function), and whatever that called: the
    frames of the call that was in progress.  A look at a long C call lands
    where the GIL is let go, which is in such code when it runs (a
    ``__del__`` run by a collection inside a json.loads took the site from
    the json.loads line 1 run in 8).  *chain* itself where there is none,
    or nothing outside it."""
    entries = None
    for index in range(len(chain) - 1, -1, -1):
        code = chain[index].f_code
        if code.co_name == "__del__":
            break
        if entries is None:
            entries = _entered_by_the_interpreter()
        if code in entries:
            break
    else:
        return chain
    return chain[index + 1 :] or chain


def _entered_by_the_interpreter() -> set[CodeType]:
    """The code of the functions the interpreter calls between two
    instructions of any code: Python signal handlers and ``gc.callbacks``."""
    codes = set()
    handlers: list[Any] = list(gc.callbacks)
    for number in signal.valid_signals():
        try:
            handlers.append(signal.getsignal(number))
        except (ValueError, OSError):  # pragma: no cover - a number the platform lists but refuses
            continue
    for handler in handlers:
        code = getattr(getattr(handler, "__func__", handler), "__code__", None)
        if isinstance(code, CodeType):
            codes.add(code)
    return codes


def read_stall(
    loop: asyncio.AbstractEventLoop, top: FrameType, chain: list[FrameType], as_a_visit: bool = True
) -> Stall:
    """The stall the callback whose frames are *chain* (innermost first,
    *top* the thread's innermost) is in: its line, task and stack.
    *as_a_visit*: code the interpreter ran inside a call (a finalizer, a
    signal handler), where a look that waits for the GIL lands, is a
    moment's visit and does not take the call's site (`Stall.interrupted`
    says when it was left out); False reads it in, for a look that checks
    whether it is still running (`LoopProbe._still_inside`)."""
    # The innermost application frame *of this callback*: never further
    # out than the loop's dispatch (that is whoever runs the loop).
    module = importing(chain)
    running = _interrupted(chain) if as_a_visit else chain
    blocking = next((f for f in running if not is_library_file(f.f_code.co_filename)), None)
    if module is not None and blocking is not None and blocking.f_code.co_filename.startswith("<"):
        # Code a library exec'd while being imported (dataclasses'
        # "<string>" __init__): the application's line is the import.
        blocking = next(
            (
                f
                for f in chain
                if not is_library_file(f.f_code.co_filename) and not f.f_code.co_filename.startswith("<")
            ),
            blocking,
        )
    if blocking is not None and just_entered(blocking):
        # A look lands where the GIL was let go: in code of calls with no
        # loop (a recursive fib), that is only ever a function's entry,
        # whose line is its ``def``.  The call in progress is the caller's
        # line (fib's own recursive call, the loop calling a helper).
        # The frame entered has run no line yet: it leaves the stack too.
        outer = chain[chain.index(blocking) + 1 :]
        caller = next((f for f in outer if not is_library_file(f.f_code.co_filename)), None)
        if caller is not None:
            blocking, chain = caller, outer
    site = frame_site(blocking) if blocking is not None else None
    task: Any = asyncio.current_task(loop)
    callback: str | None = None
    created: Site | None = None
    if task is not None:
        name: str | None = task.get_name()
        coroutine = coro_name(task)
        created = created_at(task)
    else:
        name = coroutine = None
        if chain:
            callback = chain[-1].f_code.co_qualname
        elif top.f_code is HANDLE_RUN:
            handle = top.f_locals.get("self")  # the Handle: names the C callback
            callback = qualname_of(getattr(handle, "_callback", None))
            del handle
    del task  # never keep the user's task alive
    library_only = bool(chain) and blocking is None
    explicit_gc = blocking is not None and calls_gc_collect(blocking)
    stall = Stall(
        site,
        stack_of(chain),
        name,
        coroutine,
        callback,
        importing=module,
        created_at=created,
        library_only=library_only,
        explicit_gc=explicit_gc,
    )
    stall.interrupted = running is not chain
    return stall
