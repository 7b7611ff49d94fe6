"""The findings contract: `Site`, `Finding`, `FindingKind`, and cheap frame helpers.

Everything asyncwatch detects becomes a `Finding`; every output (structlog,
the JSON Lines file, OpenTelemetry, the pytest plugin) renders the same
object, so the contract lives in one place.
"""

from __future__ import annotations

import datetime as _dt
import enum
import os
import site as _site
import sysconfig
from collections.abc import Iterable
from dataclasses import dataclass, field
from types import CodeType, FrameType
from typing import Any

__all__ = ["Finding", "FindingKind", "Site"]


class FindingKind(str, enum.Enum):
    """The stable names of what asyncwatch detects.

    The values are part of the public contract: they appear in logs, in the
    findings file and in OpenTelemetry events, and they never change.
    """

    SLOW_CALLBACK = "slow_callback"
    TASK_DESTROYED_PENDING = "task_destroyed_pending"
    COROUTINE_NEVER_AWAITED = "coroutine_never_awaited"
    CANCELLATION_SWALLOWED = "cancellation_swallowed"
    TASK_EXCEPTION_UNRETRIEVED = "task_exception_unretrieved"
    #: Reported by the pytest plugin only: a task a test started and left
    #: running when the test ended.
    TASK_LEAKED = "task_leaked"

    def __str__(self) -> str:
        return self.value


@dataclass(frozen=True, slots=True)
class Site:
    """A place in source code: absolute file path, 1-based line, function name."""

    file: str
    line: int
    function: str

    def to_dict(self) -> dict[str, Any]:
        """Return the JSON form: ``{"file", "line", "function"}``."""
        return {"file": self.file, "line": self.line, "function": self.function}

    def __str__(self) -> str:
        return f"{self.file}:{self.line} in {self.function}"


def _utcnow() -> _dt.datetime:
    return _dt.datetime.now(_dt.UTC)


@dataclass(frozen=True, slots=True)
class Finding:
    """One detected mistake.

    `site` is the single most useful line to open (see the README for the
    rule of each kind); `stack` lists the frames that explain the finding,
    outermost first.  `thread` names the thread that ran the event loop the
    finding came from (for `coroutine_never_awaited`, the thread that dropped
    the coroutine), so that the findings of several loops can be told apart;
    None where that is unknown.
    """

    kind: FindingKind
    message: str
    site: Site | None
    stack: tuple[Site, ...] = ()
    task: str | None = None
    coroutine: str | None = None
    duration_s: float | None = None
    cancelled_by: Site | None = None
    created_at: Site | None = None
    time: _dt.datetime = field(default_factory=_utcnow)
    pid: int = field(default_factory=os.getpid)
    thread: str | None = None
    #: How many findings like this one (same kind and site) the rate limit
    #: held back since the last one reported (see ``report_limit``).
    suppressed: int = 0
    #: What the stall was part of, when asyncwatch can tell: ``"import"`` for a
    #: ``slow_callback`` whose stack is inside the import system (start-up
    #: work such as a server importing the application in its loop).
    cause: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """Return the JSON form, the same fields in every output."""
        return {
            "kind": self.kind.value,
            "message": self.message,
            "site": self.site.to_dict() if self.site else None,
            "stack": [s.to_dict() for s in self.stack],
            "task": self.task,
            "coroutine": self.coroutine,
            "duration_s": self.duration_s,
            "cancelled_by": self.cancelled_by.to_dict() if self.cancelled_by else None,
            "created_at": self.created_at.to_dict() if self.created_at else None,
            "time": self.time.isoformat().replace("+00:00", "Z"),
            "pid": self.pid,
            "thread": self.thread,
            "suppressed": self.suppressed,
            "cause": self.cause,
        }


# --- Telling application code from library code --------------------------------
#
# A finding points at *application* code: not asyncio, not the standard
# library, not site-packages, not asyncwatch itself.  The answer is cached per
# file name because it is asked on hot paths (task creation).

_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__)) + os.sep


def _library_prefixes() -> tuple[str, ...]:
    paths: set[str] = set()
    for key in ("stdlib", "platstdlib", "purelib", "platlib"):
        p = sysconfig.get_paths().get(key)
        if p:
            paths.add(os.path.abspath(p))
    try:
        paths.update(os.path.abspath(p) for p in _site.getsitepackages())
    except AttributeError:  # pragma: no cover - virtualenv's old site module
        pass
    user = getattr(_site, "getusersitepackages", lambda: None)()
    if user:
        paths.add(os.path.abspath(user))
    # Resolve symlinked prefixes too (pyenv, Debian's /usr/lib vs /lib).
    paths.update({os.path.realpath(p) for p in paths})
    return tuple(sorted(p.rstrip(os.sep) + os.sep for p in paths)) + (_PACKAGE_DIR,)


_LIBRARY_PREFIXES = _library_prefixes()
_is_library_cache: dict[str, bool] = {}


def is_library_file(filename: str) -> bool:
    """Return whether *filename* belongs to asyncio, the standard library,
    installed packages or asyncwatch rather than to the application."""
    cached = _is_library_cache.get(filename)
    if cached is not None:
        return cached
    if filename.startswith("<"):
        # "<frozen runpy>" is the interpreter's; "<string>" and "<stdin>" are
        # code the user typed or exec'd.
        result = filename.startswith("<frozen")
    else:
        path = os.path.abspath(filename)
        result = (
            path.startswith(_LIBRARY_PREFIXES)
            or f"{os.sep}site-packages{os.sep}" in path
            or f"{os.sep}dist-packages{os.sep}" in path
        )
    if len(_is_library_cache) > 4096:  # exec'd code can make endless names
        _is_library_cache.clear()
    _is_library_cache[filename] = result
    return result


def is_own_file(filename: str) -> bool:
    """Return whether *filename* is part of asyncwatch itself."""
    return filename.startswith(_PACKAGE_DIR)


def line_of(code: CodeType, lasti: int) -> int:
    """Return the source line of the instruction at byte offset *lasti*."""
    if lasti >= 0:
        for start, end, line in code.co_lines():
            if start <= lasti < end and line is not None:
                return line
    return code.co_firstlineno


def code_site(code: CodeType, lasti: int) -> Site:
    """Make a `Site` from a code object and an instruction offset."""
    return Site(source_path(code.co_filename), line_of(code, lasti), code.co_qualname)


def frame_site(frame: FrameType) -> Site:
    """Make a `Site` from a live frame (its current line)."""
    code = frame.f_code
    return Site(source_path(code.co_filename), frame.f_lineno or code.co_firstlineno, code.co_qualname)


def source_path(filename: str) -> str:
    return filename if filename.startswith("<") else os.path.abspath(filename)


def app_frame(frame: FrameType | None) -> FrameType | None:
    """Return the innermost application frame at or outside *frame*."""
    while frame is not None:
        if not is_library_file(frame.f_code.co_filename):
            return frame
        frame = frame.f_back
    return None


def _loop_dispatch_codes() -> frozenset[CodeType]:
    import asyncio.base_events
    import asyncio.events
    import asyncio.runners

    base = asyncio.base_events.BaseEventLoop
    codes = {
        asyncio.events.Handle._run.__code__,
        base._run_once.__code__,  # type: ignore[attr-defined]
        base.run_forever.__code__,
        base.run_until_complete.__code__,
        asyncio.runners.Runner.run.__code__,
        asyncio.runners.run.__code__,
    }
    return frozenset(codes)


#: Frames of the event loop's own dispatch: a callback's caller chain ends
#: here, and whatever lies further out (``asyncio.run(main())``) did not
#: create what the callback made.
LOOP_DISPATCH = _loop_dispatch_codes()
LOOP_DISPATCH_NAMES = frozenset((c.co_filename, c.co_name) for c in LOOP_DISPATCH)


def app_frame_in_callback(frame: FrameType | None) -> FrameType | None:
    """Like `app_frame`, but stop at the event loop's dispatch: code called by
    the loop itself (a coroutine function used as a callback) has no
    application caller."""
    while frame is not None:
        code = frame.f_code
        if code in LOOP_DISPATCH:
            return None
        if not is_library_file(code.co_filename):
            return frame
        frame = frame.f_back
    return None


def stack_of(frames: Iterable[FrameType]) -> tuple[Site, ...]:
    """Sites for *frames* (given innermost first), outermost first, with
    asyncwatch's own frames left out."""
    sites = [frame_site(f) for f in frames if not is_own_file(f.f_code.co_filename)]
    sites.reverse()
    return tuple(sites)


def qualname_of(obj: Any) -> str | None:
    """The qualified name of a coroutine, generator or callable, or None."""
    name = getattr(obj, "__qualname__", None)
    if isinstance(name, str):
        return name
    func = getattr(obj, "__func__", None) or getattr(obj, "func", None)
    if func is not None:
        return qualname_of(func)
    return None


def describe_exception(exc: BaseException, limit: int = 200) -> str:
    """``ValueError('boom')``-like text: the type and the user's own message only."""
    text = str(exc)
    if len(text) > limit:
        text = text[: limit - 1] + "…"
    name = type(exc).__qualname__
    return f"{name}: {text}" if text else name
