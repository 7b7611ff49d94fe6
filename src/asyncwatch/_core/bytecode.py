"""Reading a frame's code object: which ``async with`` it is in, and which
function the call on its current line made.

Both walk a code object's instructions (cached per code object, never per
call) and answer from the bytecode what the frame alone cannot say: the
cancellation detector names the structure (``async with TaskGroup()``,
``asyncio.timeout()``) that cancelled a task; the never-awaited detector
tells ``save(x)`` as a statement (created and dropped on this line) from a
property that returned a coroutine made elsewhere.
"""

from __future__ import annotations

import dis
import functools
import inspect
import sys
import types
from collections.abc import Callable
from types import CodeType, FrameType
from typing import Any

__all__ = [
    "AsyncWith",
    "called_function_code",
    "comprehension_call_codes",
    "dropped_call_result",
    "enclosing_async_withs",
    "returned_call_lines",
]


# --- Which ``async with`` a frame is in ------------------------------------------

# Instructions that end the expression of an ``async with`` when read backwards
# from its BEFORE_ASYNC_WITH: the previous statement's last instruction.
_STATEMENT_ENDS = frozenset({"POP_TOP", "RESUME", "NOP", "RETURN_VALUE", "RETURN_CONST", "POP_EXCEPT"})


class AsyncWith:
    """One ``async with`` statement of a code object: its line, the names its
    expression loads and the name its ``as`` binds (None without one)."""

    __slots__ = ("as_name", "line", "loads", "setup")

    def __init__(self, line: int, loads: frozenset[str], as_name: str | None, setup: int) -> None:
        self.line = line
        self.loads = loads
        self.as_name = as_name
        self.setup = setup  # the offset of its BEFORE_ASYNC_WITH


class _WithTable:
    """A code object's exception table, and its ``async with`` blocks by the
    offset of their exit handler."""

    __slots__ = ("blocks", "entries")

    def __init__(self, entries: tuple[tuple[int, int, int], ...], blocks: dict[int, AsyncWith]) -> None:
        self.entries = entries  # (start, end, target), non-overlapping
        self.blocks = blocks

    def handler_of(self, offset: int) -> int | None:
        return next((target for start, end, target in self.entries if start <= offset < end), None)


@functools.lru_cache(maxsize=256)
def _with_table(code: CodeType) -> _WithTable:
    """Read *code*'s ``async with`` blocks from its exception table (3.11+): a
    handler that starts with PUSH_EXC_INFO, WITH_EXCEPT_START is a with-block's
    exit, and the BEFORE_ASYNC_WITH just before the first range it covers is
    the statement.  Asked only when a structured cancellation is explained."""
    try:
        bytecode = dis.Bytecode(code)
        raw = getattr(bytecode, "exception_entries", ())  # 3.11+
    except Exception:  # pragma: no cover - a code object dis cannot read
        return _WithTable((), {})
    entries = tuple((e.start, e.end, e.target) for e in raw)
    instructions = list(bytecode)
    by_offset = {ins.offset: n for n, ins in enumerate(instructions)}
    starts: dict[int, int] = {}
    for start, _end, target in entries:
        n = by_offset.get(target)
        if n is None or n + 1 >= len(instructions):
            continue
        if instructions[n].opname == "PUSH_EXC_INFO" and instructions[n + 1].opname == "WITH_EXCEPT_START":
            starts[target] = min(start, starts.get(target, start))
    blocks: dict[int, AsyncWith] = {}
    for target, start in starts.items():
        setup = max(
            (n for n, ins in enumerate(instructions) if ins.offset < start and ins.opname.startswith("BEFORE_")),
            default=None,
        )
        if setup is None or instructions[setup].opname != "BEFORE_ASYNC_WITH":
            continue  # a plain ``with``
        positions = instructions[setup].positions
        if positions is None or positions.lineno is None:
            continue
        loads = set()
        for ins in reversed(instructions[:setup]):
            if ins.opname in _STATEMENT_ENDS or ins.opname.startswith(("STORE_", "JUMP", "POP_JUMP")):
                break
            if ins.opname.startswith("LOAD_") and isinstance(ins.argval, str):
                loads.add(ins.argval)
        first = instructions[by_offset[start]] if start in by_offset else None
        as_name = first.argval if first is not None and first.opname.startswith("STORE_") else None
        blocks[target] = AsyncWith(positions.lineno, frozenset(loads), as_name, instructions[setup].offset)
    return _WithTable(entries, blocks)


def enclosing_async_withs(frame: FrameType) -> list[AsyncWith]:
    """The ``async with`` blocks *frame* is inside now, innermost first.

    Each instruction has one handler in the exception table: a with-block's
    exit means it is in that block (whose own statement is then looked up
    the same way, for the blocks around it); any other handler (an
    ``except``, the cleanup of an ``await``) is code in the same blocks."""
    table = _with_table(frame.f_code)
    offset = frame.f_lasti
    inside: list[AsyncWith] = []
    seen: set[int] = set()
    while True:
        target = table.handler_of(offset)
        if target is None or target in seen:
            return inside
        seen.add(target)
        block = table.blocks.get(target)
        if block is not None:
            inside.append(block)
            offset = block.setup
        else:
            offset = target


# --- Which function a call made ---------------------------------------------------

_CALLS = frozenset({"CALL", "CALL_KW", "PRECALL"})
_NAME_LOADS = frozenset(
    {"LOAD_GLOBAL", "LOAD_NAME", "LOAD_FAST", "LOAD_FAST_CHECK", "LOAD_DEREF", "LOAD_ATTR", "LOAD_METHOD"}
)


@functools.lru_cache(maxsize=256)
def _instructions(code: CodeType) -> tuple[dis.Instruction, ...]:
    return tuple(dis.get_instructions(code))


def _stack_effect(ins: dis.Instruction) -> int | None:
    if ins.opname.startswith(("JUMP", "POP_JUMP", "FOR_ITER", "SEND")) or ins.opname in ("RETURN_VALUE", "YIELD_VALUE"):
        return None  # control flow: the walk below is only for straight-line code
    try:
        if ins.opcode >= dis.HAVE_ARGUMENT:
            return dis.stack_effect(ins.opcode, ins.arg or 0)
        return dis.stack_effect(ins.opcode)
    except ValueError:
        return None


def dropped_call_result(frame: FrameType) -> dis.Instruction | None:
    """When *frame* is discarding the result of a call (an expression
    statement ``f(x)``: the call, then POP_TOP at ``f_lasti``; or a truth
    test of it), the instruction that loaded the function called, else None."""
    instructions = _instructions(frame.f_code)
    at = _discarding_at(frame, instructions)
    return _callable_load(instructions, at) if at is not None else None


# What consumes a value and keeps nothing of it: a statement's POP_TOP, and
# a truth test (``if not store.exists(key):``, the await forgotten): 3.13's
# TO_BOOL, 3.11-3.12's UNARY_NOT, and the conditional jumps, which pop what
# they test (3.11's POP_JUMP_FORWARD_IF_FALSE, 3.12's POP_JUMP_IF_NONE, ...).
_TRUTH_TESTS = frozenset({"TO_BOOL", "UNARY_NOT"})


def _discards(opname: str) -> bool:
    return opname == "POP_TOP" or opname in _TRUTH_TESTS or opname.startswith("POP_JUMP_")


def _discarding_at(frame: FrameType, instructions: tuple[dis.Instruction, ...]) -> int | None:
    """The index of *frame*'s current instruction when it consumes a value
    and keeps nothing of it (`_discards`), else None."""
    at = next((n for n, ins in enumerate(instructions) if ins.offset == frame.f_lasti), None)
    return at if at is not None and _discards(instructions[at].opname) else None


def _callable_load(instructions: tuple[dis.Instruction, ...], at: int) -> dis.Instruction | None:
    """The instruction that loaded the function whose call's result
    ``instructions[at]`` consumes (a POP_TOP, a RETURN_VALUE), or None.

    Read backwards from the call through its arguments with each
    instruction's stack effect: the instruction that pushes past the
    arguments pushed the callable.  Straight-line code only."""
    if at < 2:
        return None
    n = at - 1
    consumed = 0
    while n >= 0 and instructions[n].opname in _CALLS:
        effect = _stack_effect(instructions[n])
        if effect is None:
            return None
        consumed -= effect
        n -= 1
    if consumed == 0:
        return None  # not a call (an attribute, a property)
    arguments = consumed + 1 - 2  # the call pushes its result; below the arguments, the callable and self/NULL
    pushed = 0
    while n >= 0:
        ins = instructions[n]
        effect = _stack_effect(ins)
        if effect is None:
            return None
        pushed += effect
        if pushed > arguments:
            if ins.opname == "PUSH_NULL" and n > 0:  # 3.13 pushes NULL after the callable
                n -= 1
            # An attribute that replaces what is below it (``mod.f`` as
            # PUSH_NULL, LOAD_NAME mod, LOAD_ATTR f on 3.11) is the callable.
            while (
                instructions[n + 1].opname in ("LOAD_ATTR", "LOAD_METHOD") and _stack_effect(instructions[n + 1]) == 0
            ):
                n += 1
            ins = instructions[n]
            return ins if ins.opname in _NAME_LOADS else None
        n -= 1
    return None


_MISSING = object()


def called_function_code(frame: FrameType) -> CodeType | None:
    """The code object of the function whose result *frame* is discarding
    (see `dropped_call_result`), when the callable is a name or an attribute
    of a name that can be read without running any code (no property, no
    ``__getattr__``: ``inspect.getattr_static``); else None."""
    load = dropped_call_result(frame)
    if load is None:
        return None
    return _function_code(_instructions(frame.f_code), load, lambda opname, name: _read_name(frame, opname, name))


#: What a comprehension does with each element it computes.
_APPENDS = frozenset({"LIST_APPEND", "SET_ADD", "MAP_ADD"})


def comprehension_call_codes(frame: FrameType) -> frozenset[CodeType]:
    """When *frame* is discarding what a comprehension on its current line
    built (``[send(u) for u in users]`` as a statement), the code objects of
    the functions that comprehension called for its elements (read as
    `called_function_code` reads them); else none.  Inlined on 3.12+
    (PEP 709); a nested ``<listcomp>`` function's code before."""
    instructions = _instructions(frame.f_code)
    at = _discarding_at(frame, instructions)
    if at is None:
        return frozenset()
    line = _line_at(instructions, at)
    inner: list[tuple[tuple[dis.Instruction, ...], int]] = []
    n = at - 1
    while n >= 0 and _line_at(instructions, n) in (line, None):
        ins = instructions[n]
        if ins.opname in _APPENDS:
            inner.append((instructions, n))
        elif ins.opname == "LOAD_CONST" and isinstance(ins.argval, CodeType) and ins.argval.co_name.endswith("comp>"):
            nested = _instructions(ins.argval)  # before 3.12: the comprehension's own function
            inner.extend((nested, k) for k, each in enumerate(nested) if each.opname in _APPENDS)
        n -= 1
    codes = set()
    for where, k in inner:
        load = _callable_load(where, k)
        called = _function_code(where, load, lambda op, name: _read_name(frame, op, name)) if load is not None else None
        if called is not None:
            codes.add(called)
    return frozenset(codes)


def _line_at(instructions: tuple[dis.Instruction, ...], n: int) -> int | None:
    positions = instructions[n].positions
    return positions.lineno if positions is not None else None


def returned_call_lines(function: types.FunctionType, code: CodeType) -> list[int]:
    """The lines where *function* returns, as it is, what a call of the
    function whose code is *code* returned (``lambda: expire(sid)``), the
    function called read as `called_function_code` reads it, from
    *function*'s globals and closure (never its arguments)."""
    instructions = _instructions(function.__code__)
    lines = []
    for at, ins in enumerate(instructions):
        if ins.opname != "RETURN_VALUE":
            continue
        load = _callable_load(instructions, at)
        if load is None or _function_code(instructions, load, lambda op, n: _read_static(function, op, n)) is not code:
            continue
        positions = instructions[at - 1].positions  # the call's: the line the coroutine was made at
        if positions is not None and positions.lineno is not None:
            lines.append(positions.lineno)
    return lines


def _function_code(
    instructions: tuple[dis.Instruction, ...], load: dis.Instruction, read: Callable[[str, str], Any]
) -> CodeType | None:
    """The code of the function *load* loads, read with *read* (a name, or
    an attribute of a name, read statically), or None."""
    if not isinstance(load.argval, str):
        return None
    name = load.argval
    target: Any = _MISSING
    if load.opname in ("LOAD_ATTR", "LOAD_METHOD"):
        at = instructions.index(load)
        base = instructions[at - 1] if at > 0 else None
        if base is None or base.opname == "LOAD_ATTR" or base.opname not in _NAME_LOADS:
            return None  # a longer chain: reading it could run code
        owner = read(base.opname, base.argval) if isinstance(base.argval, str) else _MISSING
        if owner is not _MISSING:
            try:
                target = inspect.getattr_static(owner, name)
            except AttributeError:
                return None
    else:
        target = read(load.opname, name)
    if isinstance(target, (staticmethod, classmethod)):
        target = target.__func__
    if isinstance(target, types.MethodType):
        target = target.__func__
    return target.__code__ if isinstance(target, types.FunctionType) else None


def _read_static(function: types.FunctionType, opname: str, name: str) -> Any:
    """A name *function*'s code loads, from its globals or its closure."""
    code = function.__code__
    if opname == "LOAD_DEREF":
        if name not in code.co_freevars or function.__closure__ is None:
            return _MISSING  # a cell of its own: a local
        try:
            return function.__closure__[code.co_freevars.index(name)].cell_contents
        except ValueError:  # an empty cell
            return _MISSING
    if opname in ("LOAD_GLOBAL", "LOAD_NAME"):
        value = function.__globals__.get(name, _MISSING)
        if value is _MISSING:
            builtins = getattr(function, "__builtins__", None)  # 3.10+
            value = builtins.get(name, _MISSING) if isinstance(builtins, dict) else _MISSING
        return value
    return _MISSING  # an argument or a local: not known before it runs


# Before 3.13 (PEP 667), reading a function frame's f_locals leaves a
# snapshot of its locals on the frame, which keeps them alive after the
# program deletes them: never asked there.
_LOCALS_ARE_A_VIEW = sys.version_info >= (3, 13)


def _read_name(frame: FrameType, opname: str, name: Any) -> Any:
    if not isinstance(name, str):
        return _MISSING
    if opname in ("LOAD_FAST", "LOAD_FAST_CHECK", "LOAD_DEREF"):
        return frame.f_locals.get(name, _MISSING) if _LOCALS_ARE_A_VIEW else _MISSING
    if opname == "LOAD_NAME" and frame.f_locals is frame.f_globals:
        return frame.f_globals.get(name, _MISSING)  # module level: the namespace itself
    if opname == "LOAD_NAME":
        return _MISSING  # a class body or exec() with separate locals
    value = frame.f_globals.get(name, _MISSING)
    if value is _MISSING:
        value = frame.f_builtins.get(name, _MISSING)
    return value
