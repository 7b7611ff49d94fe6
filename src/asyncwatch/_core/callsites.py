"""Lines of a never-awaited coroutine's story that no frame records.

Two findings have no line of the program running when they are made, and
only the source can give the line to fix cheaply; this module reads it when
such a finding is made, never per call or per coroutine.

- ``loop.call_soon(flush)`` with ``async def flush()`` (or ``call_later(5,
  lambda: expire(sid))``): the loop calls the callback, gets a coroutine back
  and ignores it, inside its own dispatch.  A handle does not record where
  it was made (asyncio's debug mode does, at a cost on every ``call_soon``).
  `scheduled_at` finds the registration: a loop method that takes a
  callback (``call_soon``, ``call_later``, ``add_done_callback``, ...) whose
  callback argument names the function (``flush``, ``self.flush``,
  ``partial(flush, ...)``), or is the lambda the loop called.
- A coroutine never started that the program still holds at exit (a list of
  work "for later"), or that the garbage collector freed: where it was made
  is known only with origin tracking.  `made_at` finds the call of its
  function that is neither awaited nor handed to asyncio (``create_task``,
  ``gather``, ``wait_for``, ...), directly or through the variable it is
  assigned to (``c = fetch()`` ... ``await c``), or the line that gave the
  function to something that calls it as a plain function and drops the
  coroutine (``atexit.register(close)``, ``Thread(target=poll)``).

The files are read in tiers: the function's own and the main module's,
where a program's wiring usually is; only when they hold no such line, the
program's other modules that spell its name (a package wired up in a module
that is neither: ``app/server.py`` scheduling ``jobs.flush``).  A line is
named only when exactly one line in the first tier holding any can have been
the one: a callback passed through a variable, or two such lines, give None,
since a confident wrong line is worse than none.
"""

from __future__ import annotations

import ast
import functools
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import TypeVar

from .catchers import dotted_tail, parse_source
from .findings import Site
from .runtime import report_internal_error

_T = TypeVar("_T")

__all__ = ["made_at", "scheduled_at"]

# The loop and future methods that take a callback, and its position.
_CALLBACK_ARGUMENT = {
    "call_soon": 0,
    "call_soon_threadsafe": 0,
    "add_done_callback": 0,
    "call_later": 1,
    "call_at": 1,
    "add_reader": 1,
    "add_writer": 1,
    "add_signal_handler": 1,
}

# What takes a coroutine and runs it (or makes it a task): a call of the
# function given to one of these is not the one that was never awaited.
_RUNS_A_COROUTINE = frozenset(
    {
        "create_task",
        "ensure_future",
        "gather",
        "wait_for",
        "shield",
        "run",
        "run_until_complete",
        "run_coroutine_threadsafe",
        "wait",
        "as_completed",
        "timeout",
        "start_soon",
        "spawn",
        "Task",
    }
)


# What calls a function it is given as a plain function, from another
# thread or at exit, and drops what it returns: the module it must be
# spelled with (None: any), and the callable's position or keyword.
_PLAIN_CALLERS: dict[str, tuple[str | None, int | str]] = {
    "register": ("atexit", 0),
    "Thread": (None, "target"),
    "Timer": (None, 1),
    "run_in_executor": (None, 1),
    "submit": (None, 0),
    "signal": ("signal", 1),
    "finalize": ("weakref", 1),
}


Tiers = Iterable[Sequence[str]]


def scheduled_at(tiers: Tiers, name: str, *, lambda_line: int | None = None, or_returning: bool = False) -> Site | None:
    """The one line of the files in *tiers* that gives the loop a callback
    named *name* (or, with *lambda_line*, the lambda defined on that line
    of the first file; with *or_returning*, also a lambda whose body calls
    *name*), or None where there is none or more than one.  Never raises: a
    source it cannot read costs the field, not the finding."""
    return _the_one(tiers, lambda file: _registrations(file, name, lambda_line, or_returning))


def made_at(tiers: Tiers, name: str) -> tuple[Site, str | None] | None:
    """The one line of the files in *tiers* that calls *name* (a coroutine
    function's name) without awaiting the result or handing it to asyncio,
    or that gives the function to something that calls it as a plain
    function (``atexit.register``, ``Thread(target=...)``,
    ``run_in_executor``: then with what it was given to), or None where
    there is none or more than one.  Never raises."""
    return _the_one(tiers, lambda file: _made_here(file, name))


def _the_one(tiers: Tiers, read: Callable[[str], tuple[_T, ...]]) -> _T | None:
    """The one answer of the first tier of files that has any (each tier
    read only when those before it had none; a file only once)."""
    global _disabled
    if _disabled:
        return None
    seen: set[str] = set()
    try:
        for files in tiers:
            fresh = [file for file in dict.fromkeys(files) if file not in seen]
            seen.update(fresh)
            found = [site for file in fresh for site in read(file)]
            if found:
                return found[0] if len(found) == 1 else None
    except Exception as exc:
        _disabled = True
        report_internal_error("call-site source reader", exc)
    return None


_disabled = False  # after an error of its own (reported once)


# Answers, not trees, are kept (see catchers: a module's tree is tens of
# thousands of objects every collection would walk again); a mistake made
# once is usually made again, on the same line.
@functools.lru_cache(maxsize=64)
def _registrations(file: str, name: str, lambda_line: int | None, or_returning: bool) -> tuple[Site, ...]:
    found = []
    for call, _parent, scope, _body in _calls(file):
        if not isinstance(call.func, ast.Attribute) or call.func.attr not in _CALLBACK_ARGUMENT:
            continue
        callback = _callback_argument(call, _CALLBACK_ARGUMENT[call.func.attr])
        if callback is None:
            continue
        if lambda_line is not None:
            hit = isinstance(callback, ast.Lambda) and callback.lineno == lambda_line
        else:
            hit = _names(_unwrap_partial(callback), name) or (
                or_returning
                and isinstance(callback, ast.Lambda)
                and isinstance(callback.body, ast.Call)
                and _names(callback.body.func, name)
            )
        if hit:
            found.append(Site(file, call.lineno, scope))
    return tuple(found)


@functools.lru_cache(maxsize=64)
def _made_here(file: str, name: str) -> tuple[tuple[Site, str | None], ...]:
    """In one pass over *file*: each call of *name* neither awaited nor
    handed to asyncio (with None), and each line giving the function to a
    plain caller (with what it was given to)."""
    found: list[tuple[Site, str | None]] = []
    for call, parent, scope, body in _calls(file):
        if _names(call.func, name):
            if not _runs(parent) and not _assigned_and_run(parent, body):
                found.append((Site(file, call.lineno, scope), None))
        elif (given_to := _given_plainly(call, name)) is not None:
            found.append((Site(file, call.lineno, scope), given_to))
    return tuple(found)


def _assigned_and_run(parent: ast.AST | None, body: ast.AST) -> bool:
    """``c = fetch()`` ... ``await c``: assigned to a name that the same
    function (or module) awaits or hands to asyncio."""
    if isinstance(parent, ast.Assign):
        target: ast.expr = parent.targets[0]
    elif isinstance(parent, ast.AnnAssign):
        target = parent.target
    else:
        return False
    return isinstance(target, ast.Name) and _run_later(body, target.id)


def _given_plainly(call: ast.Call, name: str) -> str | None:
    """What *call* gives the function *name* to, if it is a plain caller
    (`_PLAIN_CALLERS`); else None."""
    called = dotted_tail(call.func)
    where = _PLAIN_CALLERS.get(called) if called else None
    if where is None:
        return None
    module, argument = where
    if module is not None and not (
        isinstance(call.func, ast.Attribute) and isinstance(call.func.value, ast.Name) and call.func.value.id == module
    ):
        return None
    if isinstance(argument, str):
        given = next((k.value for k in call.keywords if k.arg == argument), None)
    else:
        given = _callback_argument(call, argument)
    return ast.unparse(call.func) if given is not None and _names(_unwrap_partial(given), name) else None


def _runs(parent: ast.AST | None) -> bool:
    """Whether what *parent* does with a value runs it: ``await``, or
    handing it to asyncio."""
    return isinstance(parent, ast.Await) or (
        isinstance(parent, ast.Call) and dotted_tail(parent.func) in _RUNS_A_COROUTINE
    )


def _run_later(body: ast.AST, variable: str) -> bool:
    """Whether *body* (a function, or a module) awaits *variable* or hands
    it to asyncio somewhere."""
    return any(
        _runs(node) and any(isinstance(value, ast.Name) and value.id == variable for value in _operands(node))
        for node in ast.walk(body)
    )


def _operands(node: ast.AST) -> list[ast.expr]:
    if isinstance(node, ast.Await):
        return [node.value]
    if isinstance(node, ast.Call):
        return list(node.args)
    return []


def _calls(file: str) -> Iterator[tuple[ast.Call, ast.AST | None, str, ast.AST]]:
    """Each call in *file*'s source, with the node it is directly in, the
    qualified name of the function it is in, spelled as ``co_qualname``
    spells it (``f.<locals>.g``, ``C.m``; ``<module>``), and that function's
    node (or the module's)."""
    tree = parse_source(file)
    if tree is None:
        return
    # (node, its parent, qualified name of its scope, whether that scope is
    # a function, the scope's node)
    stack: list[tuple[ast.AST, ast.AST | None, str, bool, ast.AST]] = [(tree, None, "", False, tree)]
    while stack:
        node, parent, where, in_function, body = stack.pop()
        inner, inner_in_function, inner_body = where, in_function, body
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef, ast.Lambda)):
            name = "<lambda>" if isinstance(node, ast.Lambda) else node.name
            inner = f"{where}.<locals>.{name}" if in_function else f"{where}.{name}" if where else name
            inner_in_function = not isinstance(node, ast.ClassDef)
            inner_body = node
        elif isinstance(node, ast.Call):
            yield node, parent, where or "<module>", body
        stack.extend((child, node, inner, inner_in_function, inner_body) for child in ast.iter_child_nodes(node))


def _callback_argument(call: ast.Call, index: int) -> ast.expr | None:
    if len(call.args) <= index or isinstance(call.args[index], ast.Starred):
        return None
    return call.args[index]


def _unwrap_partial(expression: ast.expr) -> ast.expr:
    """``partial(f, ...)`` and ``functools.partial(f, ...)`` call ``f``."""
    if (
        isinstance(expression, ast.Call)
        and _names(expression.func, "partial")
        and expression.args
        and not isinstance(expression.args[0], ast.Starred)
    ):
        return expression.args[0]
    return expression


def _names(expression: ast.expr, name: str) -> bool:
    """``name`` or ``anything.name``."""
    return dotted_tail(expression) == name
