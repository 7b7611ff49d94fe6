"""The line a long operation holding the GIL was running, read while it ran.

A look waits for the GIL, and the loop thread lets it go at its next
eval-breaker check after the operation: after a C call that is the call's own
instruction, but after an operator (``big * big``, ``x in huge_list``) it is
the next call, lines on, or in the caller once the function has returned (a
corpus's ``hit = user_id in BLOCKED_IDS`` was reported at the caller's
``print()``).  When a loop's deadline passes, the watchdog reads the loop
thread's stack without the GIL (`_core/_peek.c`, optional) and keeps it if
the thread stood still; the look that follows, with the GIL, vouches for it
(`vouched`) before it becomes the stall's site.
"""

from __future__ import annotations

import functools
from types import CodeType, FrameType
from typing import TYPE_CHECKING, Any

from .._core.findings import Site
from .._core.frames import is_library_file, is_own_file, source_path
from .._core.settings import extension
from .paused_frames import awaiting, just_entered

if TYPE_CHECKING:
    import dis

__all__ = ["Peek", "elsewhere", "module", "vouched"]

#: (file, line, qualname, lasti in code units), innermost first.
Peek = tuple[tuple[str, int, str, int], ...]

# What may run between the operation peeked at and the instruction the loop
# thread let the GIL go at, for the peek to stand: instructions that run no
# code of the program's and cannot take long.  Anything else there (a call,
# a loop, another operator, a format) could have been the hold instead.
_QUIET = frozenset(
    {
        "CACHE",
        "COPY",
        "END_SEND",
        "EXTENDED_ARG",
        "GET_AWAITABLE",
        "IS_OP",
        "JUMP_FORWARD",
        "KW_NAMES",
        "LOAD_ATTR",
        "LOAD_CLOSURE",
        "LOAD_CONST",
        "LOAD_DEREF",
        "LOAD_FAST",
        "LOAD_FAST_CHECK",
        "LOAD_FAST_AND_CLEAR",
        "LOAD_FAST_LOAD_FAST",
        "LOAD_GLOBAL",
        "LOAD_METHOD",
        "LOAD_NAME",
        "NOP",
        "POP_TOP",
        "PRECALL",
        "PUSH_NULL",
        "STORE_DEREF",
        "STORE_FAST",
        "STORE_FAST_LOAD_FAST",
        "STORE_FAST_STORE_FAST",
        "STORE_GLOBAL",
        "STORE_NAME",
        "SWAP",
        "TO_BOOL",
        "UNARY_NOT",
    }
)


def module() -> Any:
    """``_core/_peek``, or None where it was not built (another
    interpreter, no compiler, not Linux) or extensions are turned off."""
    peek = extension("_peek")
    return peek if hasattr(peek, "poll") else None


def vouched(peeks: tuple[Peek, ...], chain: list[FrameType]) -> tuple[Site, tuple[Site, ...]] | None:
    """The site and stack (outermost first) the first of *peeks* that can
    be vouched for gives the step whose frames are now *chain* (innermost
    first, the callback's outermost last), or None.  *peeks*: the last
    stack the loop thread stood still in, and the one before at another
    instruction: under load the peeker still reads the loop thread after it
    let the GIL go, standing still where it waits to take it back."""
    for peek in peeks:
        seen = _vouched(peek, chain)
        if seen is not None:
            return seen
    return None


def _vouched(peek: Peek, chain: list[FrameType]) -> tuple[Site, tuple[Site, ...]] | None:
    """What *peek* gives, or None where it cannot be vouched for: another
    step, the thread gone on through code that could have held the GIL
    instead, no line of the program's in it, or nothing the live stack does
    not show (the thread where it let the GIL go)."""
    if len(chain) > 1 and _index(peek, chain[0].f_code, 0) is None and just_entered(chain[0]):
        # The GIL let go as the step entered a function after the operation
        # (3.11-3.12 check on entering one: the asyncio.sleep() after it).
        chain = chain[1:]
    if not chain:
        return None
    top, outer = chain[0], chain[-1]
    at = _index(peek, top.f_code, 0)
    end = _index(peek, outer.f_code, at) if at is not None else None
    if at is None or end is None or not _went_quietly(top, peek[at][3], returned=at > 0):
        return None
    entries = [entry for entry in peek[: end + 1] if not is_own_file(entry[0])]
    site = next((entry for entry in entries if not is_library_file(entry[0])), None)
    if site is None:
        return None
    stack = tuple(Site(source_path(file), line, name) for file, line, name, _ in reversed(entries))
    return Site(source_path(site[0]), site[1], site[2]), stack


def elsewhere(
    peeks: tuple[Peek, ...], top: FrameType, chain: list[FrameType], over: bool, dispatch: CodeType
) -> tuple[Site, tuple[Site, ...]] | None:
    """The site and stack of the first of *peeks* that stood still at a line
    of the program in a step that is over, or None.

    For a look late by a hold of the loop thread's own that finds it where
    the live stack cannot vouch for the peek.  The hold ended with its step,
    before any eval-breaker check in it (``return x in huge_list``):
    asyncio's dispatch, or the next step's first call, let the GIL go, and
    the peek is the only place it was seen.  *top*: the loop thread's
    innermost frame now; *chain*: the step's frames seen now, innermost
    first; *over*: the look found no step, or one at its first instruction;
    *dispatch*: the code that runs the loop's callbacks (asyncio's
    ``Handle._run``, or the frame that runs a compiled loop), below which
    a peek's frames are not the step's (the program's ``main()`` that
    called ``asyncio.run``, a test function).
    Otherwise the peek is another step's only where the live stack does not
    hold its function, or holds it earlier on, awaiting (a step of another
    task running the same coroutine); a peek the live step may have moved on
    from (a call since, a loop) is not taken.  The position the thread
    stands at now is never taken: under load the peeker also reads it
    there, waiting to take the GIL back."""
    now = set()
    frame: FrameType | None = top
    while frame is not None:
        code = frame.f_code
        now.add((code.co_filename, code.co_qualname, frame.f_lasti // 2))
        frame = frame.f_back
    for peek in peeks:
        if not peek or (peek[0][0], peek[0][2], peek[0][3]) in now:
            continue
        below = _index(peek, dispatch, 0)
        if below is None:
            continue  # not in a step: nothing to say which frames were the step's
        entries = [entry for entry in peek[:below] if not is_own_file(entry[0])]
        program = [entry for entry in entries if not is_library_file(entry[0])]
        if not program or not (over or _another_step(program[-1], chain)):
            continue
        site = program[0]
        stack = tuple(Site(source_path(file), line, name) for file, line, name, _ in reversed(entries))
        return Site(source_path(site[0]), site[1], site[2]), stack
    return None


def _another_step(outer: tuple[str, int, str, int], chain: list[FrameType]) -> bool:
    """Whether the peek whose outermost frame of the program's is *outer*
    was of another step than *chain*'s."""
    file, _line, name, lasti = outer
    for frame in chain:
        code = frame.f_code
        same = code.co_filename == file and code.co_qualname == name
        if same and (frame.f_lasti // 2 >= lasti or not awaiting(frame)):
            return False
    return True


def _index(peek: Peek, code: CodeType, start: int) -> int | None:
    for k in range(start, len(peek)):
        file, _line, name, _lasti = peek[k]
        if file == code.co_filename and name == code.co_qualname:
            return k
    return None


def _went_quietly(frame: FrameType, lasti: int, returned: bool) -> bool:
    """Whether *frame*, peeked at code unit *lasti*, can have gone from
    there to where it is now with nothing but `_QUIET` instructions between,
    or any on the line peeked at, which is the site either way (``n = a * b
    * a``: either product may have been the long one); its callee returning
    into it, when *returned*.  Still at the instruction peeked at, the peek
    says nothing the live stack does not: False."""
    instructions = _instructions(frame.f_code)
    at, now = _containing(instructions, lasti), _containing(instructions, frame.f_lasti // 2)
    if at is None or now is None or now < at:
        return False  # a jump back: a loop ran since
    if now == at:
        # Where it let the GIL go: nothing the live stack does not show, or,
        # a callee having returned into the call, a call that ran on since.
        return False
    peeked = instructions[at]
    k = at + 1
    if peeked.opname == "SEND":
        # A coroutine returned into the await: it resumes at SEND's target.
        target = next((n for n, ins in enumerate(instructions) if ins.offset == peeked.argval), None)
        if target is None:
            return False
        k = target
    line = _line(peeked)
    for n in range(k, now):
        ins = instructions[n]
        if ins.opname in _QUIET or _forward_jump(ins):
            continue
        if ins.opname.startswith("CALL") and all(quiet.opname in _QUIET for quiet in instructions[n + 1 : now]):
            # The call the GIL was let go after, at its check: 3.13 shows
            # the frame past it (print() right after the await, v27).
            return True
        if returned or line is None or _line(ins) != line or ins.opname.startswith("JUMP_BACKWARD"):
            return False
    return True


def _containing(instructions: tuple[dis.Instruction, ...], unit: int) -> int | None:
    """The index of the instruction that code unit *unit* is in: a frame
    that called into another stands at the call's last inline cache entry
    (3.12), which ``dis`` does not list."""
    found = None
    for n, ins in enumerate(instructions):
        if ins.offset // 2 > unit:
            break
        found = n
    return found


def _line(ins: dis.Instruction) -> int | None:
    positions = ins.positions
    return positions.lineno if positions is not None else None


def _forward_jump(ins: dis.Instruction) -> bool:
    """A conditional jump forward: the path taken is a part of the
    straight line scanned, whichever way it went."""
    return ins.opname.startswith("POP_JUMP_") and "BACKWARD" not in ins.opname


@functools.lru_cache(maxsize=256)
def _instructions(code: CodeType) -> tuple[dis.Instruction, ...]:
    # Not `_core.bytecode`'s cache: importing that module (and inspect)
    # inside a look lets the GIL go, and the loop thread moves on from the
    # line being vouched for (the operator tests failed 3 runs in 3).
    import dis  # when a stall is seen, not at import (issue 15's import budget)

    return tuple(dis.get_instructions(code))
