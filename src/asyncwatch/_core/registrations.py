"""Which line gave the event loop a callback that dropped a coroutine.

``loop.call_soon(flush)`` with ``async def flush()`` (or ``call_later(5,
lambda: expire(sid))``) never runs anything: the loop calls the callback,
gets a coroutine back and ignores it.  The coroutine is finalized inside the
loop's own dispatch, with no line of the program running, and a handle does
not record where it was made (asyncio's debug mode does, at a cost on every
``call_soon``).  The line to fix is the registration, and only the source
can give it cheaply: this module reads it when such a finding is made,
never per call.

The files read are the callback's own (or the coroutine function's) and the
main module's, where a program's wiring usually is.  A line is named only
when exactly one registration in them can have been the one: a loop method that takes a callback (``call_soon``,
``call_later``, ``add_done_callback``, ...) whose callback argument names
the function (``flush``, ``self.flush``, ``partial(flush, ...)``), or is
the lambda the loop called.  A callback passed through a variable, or two
registrations of the same name, give None: a confident wrong line is worse
than none.
"""

from __future__ import annotations

import ast
import functools
import linecache
from collections.abc import Iterator, Sequence

from .findings import Site
from .runtime import report_internal_error

__all__ = ["scheduled_at"]

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


def scheduled_at(
    files: Sequence[str], name: str, *, lambda_line: int | None = None, or_returning: bool = False
) -> Site | None:
    """The one line of *files* that gives the loop a callback named *name*
    (or, with *lambda_line*, the lambda defined on that line of the first
    file; with *or_returning*, also a lambda whose body calls *name*), or
    None where there is none or more than one.  Never raises: a source it
    cannot read costs the field, not the finding."""
    global _disabled
    if _disabled:
        return None
    try:
        found = [
            site for file in dict.fromkeys(files) for site in _registrations(file, name, lambda_line, or_returning)
        ]
    except Exception as exc:
        _disabled = True
        report_internal_error("callback source reader", exc)
        return None
    return found[0] if len(found) == 1 else None


_disabled = False  # after an error of its own (reported once)


# Answers, not trees, are kept (see catchers: a module's tree is tens of
# thousands of objects every collection would walk again); a callback
# registered wrongly once is usually scheduled again.
@functools.lru_cache(maxsize=64)
def _registrations(file: str, name: str, lambda_line: int | None, or_returning: bool) -> tuple[Site, ...]:
    lines = linecache.getlines(file)
    if not lines:
        return ()
    try:
        tree = ast.parse("".join(lines), file)
    except (SyntaxError, ValueError):
        return ()
    found = []
    for call, scope in _callback_calls(tree.body, ""):
        callback = _callback_argument(call)
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
            found.append(Site(file, call.lineno, scope or "<module>"))
    return tuple(found)


def _callback_calls(nodes: list[ast.stmt], scope: str) -> Iterator[tuple[ast.Call, str]]:
    """Each call of a callback-taking method under *nodes*, with the
    qualified name of the function it is in, spelled as ``co_qualname``
    spells it (``f.<locals>.g``, ``C.m``)."""
    # (node, qualified name of its scope, whether that scope is a function)
    stack: list[tuple[ast.AST, str, bool]] = [(node, scope, False) for node in reversed(nodes)]
    while stack:
        node, where, in_function = stack.pop()
        inner, inner_in_function = where, in_function
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef, ast.Lambda)):
            name = "<lambda>" if isinstance(node, ast.Lambda) else node.name
            inner = f"{where}.<locals>.{name}" if in_function else f"{where}.{name}" if where else name
            inner_in_function = not isinstance(node, ast.ClassDef)
        elif (
            isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in _CALLBACK_ARGUMENT
        ):
            yield node, where
        stack.extend((child, inner, inner_in_function) for child in reversed(list(ast.iter_child_nodes(node))))


def _callback_argument(call: ast.Call) -> ast.expr | None:
    assert isinstance(call.func, ast.Attribute)
    index = _CALLBACK_ARGUMENT[call.func.attr]
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
    if isinstance(expression, ast.Name):
        return expression.id == name
    if isinstance(expression, ast.Attribute):
        return expression.attr == name
    return False
