"""Which ``except``, ``finally`` or ``suppress`` swallowed a cancellation.

A task reported for a swallowed cancellation finished normally although a
CancelledError was thrown in at the await where it was suspended.  The
statement that ended the CancelledError is somewhere around that await, or
around the awaits of the coroutines that awaited it: this module reads the
source of each frame of that chain, innermost first, and names it only when
the source leaves no doubt.  It runs when a finding is made, never per task.

Each construct around the await is one of:

- *transparent*: it lets a CancelledError through (``except Exception``,
  a handler that ends in ``raise``, a ``finally`` with no jump, ``with``
  over anything but ``suppress``);
- *swallows*: it ends one, whatever happens (``except CancelledError:``
  with no ``raise`` in it, ``suppress(CancelledError)``, a ``return``,
  ``break`` or ``continue`` as a statement of a ``finally``);
- *may swallow*: it catches one and may or may not re-raise it (a
  ``raise`` under an ``if``), or it cannot be read (``except ERRORS:``,
  a name this module cannot resolve);
- *weak*: a context manager other than ``suppress``, whose ``__exit__``
  could return true: almost always transparent (a lock, a timeout, a
  session), so read as such unless nothing else could have ended it.

The answer is the first construct that swallows, if nothing before it may;
or the only construct that may, if nothing after it could catch at all (the
task finished normally, so something ended the error); or, with no other
candidate at all, the only context manager.  Anything else is unknown: a
confident wrong line is worse than none.
"""

from __future__ import annotations

import ast
import contextlib
import functools
import io
import linecache
import tokenize
from collections.abc import Iterable, Iterator, Sequence

from .findings import Site
from .runtime import report_internal_error

__all__ = ["Swallower", "dotted_tail", "parse_source", "swallowed_at"]

# What ``except`` catches a CancelledError (a BaseException since 3.8, so
# ``except Exception`` does not): spelled as programs spell it.
_CANCELLED_NAMES = frozenset({"CancelledError", "BaseException"})
# Names that are exceptions but not CancelledError's bases: read as "does not
# catch it".  Anything else unresolved (``except ERRORS:``) may catch it.
_TRANSPARENT, _SWALLOWS, _MAY, _WEAK = "transparent", "swallows", "may", "weak"


class Swallower:
    """The statement that ended a CancelledError: its site and how it reads."""

    __slots__ = ("site", "what")

    def __init__(self, site: Site, what: str) -> None:
        self.site = site
        self.what = what  # "the `except asyncio.CancelledError:`", ...

    def __repr__(self) -> str:
        return f"Swallower({self.site}, {self.what!r})"


def swallowed_at(chain: Sequence[Site]) -> Swallower | None:
    """The statement that swallowed a CancelledError thrown in at the
    innermost frame of *chain* (outermost first), or None where unknown.
    Never raises: a source it cannot read costs the field, not the finding."""
    global _disabled
    if _disabled:
        return None
    try:
        return _swallowed_at(chain)
    except Exception as exc:
        _disabled = True
        report_internal_error("cancellation source reader", exc)
        return None


_disabled = False  # after an error of its own (reported once)


def _swallowed_at(chain: Sequence[Site]) -> Swallower | None:
    verdicts: list[tuple[str, Swallower | None]] = []
    for site in reversed(chain):
        constructs = _constructs_around(site)
        if constructs is None:
            return None  # a frame whose source cannot be read
        verdicts.extend(constructs)
    for index, (verdict, swallower) in enumerate(verdicts):
        if verdict == _SWALLOWS:
            return swallower
        if verdict == _MAY:
            others = verdicts[:index] + verdicts[index + 1 :]
            if swallower is not None and all(v == _TRANSPARENT for v, _ in others):
                return swallower
            return None
    weak = [swallower for verdict, swallower in verdicts if verdict == _WEAK]
    # Nothing else could end it, and the task finished normally: the one
    # context manager did (``except BaseException`` around a contextmanager's
    # ``yield``, an ``__aexit__`` that returns True).
    return weak[0] if len(weak) == 1 else None


# The verdicts, not the trees, are kept: a module's tree is tens of
# thousands of objects that every collection of the program would walk
# again (issue 15), while a site that swallows once (a handler cancelled at
# each timeout) often swallows again, and parsing a large module takes
# milliseconds.
@functools.lru_cache(maxsize=256)
def _constructs_around(site: Site) -> tuple[tuple[str, Swallower | None], ...] | None:
    """The verdict of each construct around *site*'s line, innermost first."""
    tree = parse_source(site.file)
    if tree is None:
        return None
    function = _function_at(tree, site.line, site.function.rpartition(".")[2])  # a qualified name
    if function is None:
        return None
    path = list(_path_to(function.body, site.line))
    verdicts: list[tuple[str, Swallower | None]] = []
    for node, part in reversed(path):
        verdicts.extend(_verdicts(node, part, site))
    return tuple(verdicts)


def parse_source(file: str) -> ast.Module | None:
    """*file*'s source as linecache has it, parsed; None where it has none
    or it does not parse."""
    lines = linecache.getlines(file)
    if not lines:
        return None
    try:
        return ast.parse("".join(lines), file)
    except (SyntaxError, ValueError):
        return None


_FUNCTIONS = (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)
_SCOPES = (*_FUNCTIONS, ast.ClassDef)


def _function_at(tree: ast.AST, line: int, name: str) -> ast.FunctionDef | ast.AsyncFunctionDef | None:
    """The innermost function named *name* whose body holds *line*."""
    found: ast.FunctionDef | ast.AsyncFunctionDef | None = None
    for node in ast.walk(tree):
        if (
            isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
            and node.name == name
            and node.body
            and node.body[0].lineno <= line <= (node.end_lineno or 0)
            and (found is None or node.lineno > found.lineno)
        ):
            found = node
    return found


def _holds(statements: Sequence[ast.stmt], line: int) -> bool:
    return bool(statements) and statements[0].lineno <= line <= (statements[-1].end_lineno or 0)


def _path_to(statements: Sequence[ast.stmt], line: int) -> Iterator[tuple[ast.stmt, str]]:
    """Each compound statement around *line*, outermost first, with the part
    of it that holds the line ("body", "handlers", "orelse", "finalbody")."""
    for statement in statements:
        if not statement.lineno <= line <= (statement.end_lineno or 0):
            continue
        if isinstance(statement, _SCOPES):
            return  # a nested function's code is another frame
        for part, children in _blocks(statement):
            if _holds(children, line):
                yield statement, part
                yield from _path_to(children, line)
                return
        return


def _blocks(statement: ast.stmt) -> Iterator[tuple[str, Sequence[ast.stmt]]]:
    for part in ("body", "orelse", "finalbody"):
        yield part, getattr(statement, part, None) or ()
    for handler in getattr(statement, "handlers", ()):
        yield "handlers", handler.body
    for case in getattr(statement, "cases", ()):
        yield "cases", case.body


def _verdicts(node: ast.stmt, part: str, site: Site) -> Iterator[tuple[str, Swallower | None]]:
    if isinstance(node, (ast.Try, ast.TryStar)):
        if part == "body":
            # The first handler whose type may match is the one that runs;
            # one that re-raises does not pass the error to its siblings.
            for index, handler in enumerate(node.handlers):
                catches = _catches(handler.type)
                if catches == _TRANSPARENT:
                    continue
                verdict = _handler_verdict(handler, catches, site)
                later = any(_catches(h.type) != _TRANSPARENT for h in node.handlers[index + 1 :])
                if catches == _MAY and later:
                    verdict = (_MAY, None)  # this one or a later one
                yield verdict
                break
        if part in ("body", "handlers", "orelse") and node.finalbody:
            yield _finally_verdict(node.finalbody, site)
    elif isinstance(node, (ast.With, ast.AsyncWith)) and part == "body":
        for item in reversed(node.items):
            yield _with_verdict(node, item.context_expr, site)


def _catches(expression: ast.expr | None) -> str:
    """Whether an ``except`` of *expression* catches a CancelledError."""
    if expression is None:
        return _SWALLOWS  # a bare ``except:``
    if isinstance(expression, ast.Tuple):
        verdicts = {_catches(element) for element in expression.elts}
        for verdict in (_SWALLOWS, _MAY):
            if verdict in verdicts:
                return verdict
        return _TRANSPARENT
    name = dotted_tail(expression)
    if name is None:
        return _MAY  # ``except get_cancelled_exc_class():``, ``except errors[0]:``
    if name in _CANCELLED_NAMES:
        return _SWALLOWS
    if name == "Exception" or name.endswith(("Error", "Exception", "Warning", "Exit", "Interrupt")):
        return _TRANSPARENT
    return _MAY  # ``except ERRORS:``: a tuple bound elsewhere


def dotted_tail(expression: ast.expr) -> str | None:
    """``name`` of ``name`` or ``anything.name``; None for anything else."""
    if isinstance(expression, ast.Name):
        return expression.id
    if isinstance(expression, ast.Attribute):
        return expression.attr
    return None


def _handler_verdict(handler: ast.ExceptHandler, catches: str, site: Site) -> tuple[str, Swallower | None]:
    swallower = Swallower(_at(site, handler.lineno), f"the `{_header(site.file, handler.lineno)}`")
    ends = _how_handler_ends(handler)
    if ends == "reraises":
        # Re-raised: if it caught anything, it let it through.  (A handler
        # that may not catch it, and re-raises, lets it through too.)
        return _TRANSPARENT, None
    if ends == "swallows" and catches == _SWALLOWS:
        return _SWALLOWS, swallower
    return _MAY, swallower


def _how_handler_ends(handler: ast.ExceptHandler) -> str:
    """ "reraises": a ``raise`` of what it caught is one of its statements,
    reached with no jump before it; "swallows": no ``raise`` in it, or a
    ``return`` (``break``, ``continue``) reached before any; else "maybe"
    (a conditional raise, a raise of something else)."""
    for statement in handler.body:
        if isinstance(statement, ast.Raise):
            return "reraises" if _raises_caught(statement, handler.name) else "maybe"
        if isinstance(statement, (ast.Return, ast.Break, ast.Continue)):
            return "swallows"
        if any(isinstance(n, ast.Raise) for n in _walk_code(statement)):
            return "maybe"
    return "swallows"


def _raises_caught(statement: ast.Raise, name: str | None) -> bool:
    if statement.exc is None:
        return True
    return name is not None and isinstance(statement.exc, ast.Name) and statement.exc.id == name


def _finally_verdict(finalbody: Sequence[ast.stmt], site: Site) -> tuple[str, Swallower | None]:
    for statement in finalbody:
        if isinstance(statement, (ast.Return, ast.Break, ast.Continue)):
            word = type(statement).__name__.lower()
            return _SWALLOWS, Swallower(_at(site, statement.lineno), f"the `{word}` in a `finally`")
        if isinstance(statement, ast.Raise):
            return _MAY, None  # another exception replaces it
        for nested in _walk_code(statement):
            if isinstance(nested, (ast.Return, ast.Raise)) or (
                isinstance(nested, (ast.Break, ast.Continue)) and not _in_own_loop(statement, nested)
            ):
                return _MAY, None
    return _TRANSPARENT, None


def _in_own_loop(statement: ast.stmt, jump: ast.AST) -> bool:
    """Whether *jump* (a break or continue) is inside a loop within *statement*."""
    for loop in _walk_code(statement):
        if isinstance(loop, (ast.For, ast.AsyncFor, ast.While)) and any(n is jump for n in _walk_code(loop)):
            return True
    return False


def _with_verdict(node: ast.With | ast.AsyncWith, expression: ast.expr, site: Site) -> tuple[str, Swallower | None]:
    if not (isinstance(expression, ast.Call) and dotted_tail(expression.func) == "suppress"):
        # Any other context manager lets it through as a rule (the standard
        # library's and the common ones do): named only when nothing else
        # could have ended it.
        header = _header(site.file, node.lineno)
        return _WEAK, Swallower(_at(site, node.lineno), f"the context manager of the `{header}`")
    verdicts = {_catches(argument) for argument in expression.args}
    swallower = Swallower(_at(site, node.lineno), f"the `{_header(site.file, node.lineno)}`")
    if _SWALLOWS in verdicts:
        return _SWALLOWS, swallower
    if _MAY in verdicts or expression.keywords or not expression.args:
        return _MAY, swallower
    return _TRANSPARENT, None


def _walk_code(node: ast.AST) -> Iterable[ast.AST]:
    """Every node under *node* that runs in its frame (not nested scopes)."""
    stack = [node]
    while stack:
        current = stack.pop()
        yield current
        stack.extend(child for child in ast.iter_child_nodes(current) if not isinstance(child, _SCOPES))


def _at(site: Site, line: int) -> Site:
    return Site(site.file, line, site.function)


def _header(file: str, line: int) -> str:
    """The statement's first line as written, without its comment."""
    text = linecache.getline(file, line).strip()
    with contextlib.suppress(tokenize.TokenError, SyntaxError):
        for token in tokenize.generate_tokens(io.StringIO(text).readline):
            if token.type == tokenize.COMMENT:
                text = text[: token.start[1]].rstrip()
                break
    return text if len(text) <= 80 else text[:77] + "..."
