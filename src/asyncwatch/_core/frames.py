"""Frames and sites: application code versus library code, and where things are.

Detectors point a finding at *application* code: not asyncio, not the
standard library, not site-packages, not asyncwatch itself.  These helpers
turn frames, code objects and await chains into `Site`s; the ones on hot
paths (task creation) are cached per file name.
"""

from __future__ import annotations

import contextlib
import gc
import inspect
import os
import site as _site
import sys
from collections.abc import Iterable
from types import CodeType, FrameType
from typing import Any

from .findings import Site
from .runtime import PACKAGE_DIR

# --- Paths without the file system -------------------------------------------------
#
# Sites are made on the loop thread (task creation, a cancellation, a
# collected task).  os.path.abspath calls os.getcwd for a relative name, and
# os.path.relpath calls abspath on both of its arguments: file-system calls
# that tools such as blockbuster (anyio's suite) turn into an exception on
# the loop thread.  These helpers do the same with strings only.


def _start_dir() -> str | None:
    try:
        return os.getcwd()
    except OSError:  # started in a directory that was removed
        return None


#: The working directory when asyncwatch was imported.  A relative code file
#: name (code compiled under a relative name, a relative sys.path entry) is
#: relative to the directory the program was in when it compiled it, far
#: more often its start-up directory than one it changed to since.
_START_DIR = _start_dir()


def absolute_path(filename: str) -> str:
    """``os.path.abspath`` without touching the file system (a relative
    name is taken relative to the start-up directory)."""
    if not os.path.isabs(filename) and _START_DIR is not None:
        filename = os.path.join(_START_DIR, filename)
    return os.path.normpath(filename)


def relative_path(path: str, start: str | None = None) -> str:
    """``os.path.relpath`` of an absolute *path* from *start* (default: the
    start-up directory) without touching the file system; *path* unchanged
    where that is impossible (relative, or on another drive)."""
    if start is None:
        start = _START_DIR
    if start is None or not os.path.isabs(path) or not os.path.isabs(start):
        return path
    if os.path.splitdrive(path)[0].lower() != os.path.splitdrive(start)[0].lower():
        return path
    parts = [p for p in os.path.normpath(path).split(os.sep) if p]
    base = [p for p in os.path.normpath(start).split(os.sep) if p]
    common = 0
    for a, b in zip(base, parts):
        if a != b:
            break
        common += 1
    rest = [os.pardir] * (len(base) - common) + parts[common:]
    return os.path.join(*rest) if rest else os.curdir


# --- Telling application code from library code --------------------------------
#
# A finding points at *application* code: not asyncio, not the standard
# library, not site-packages, not asyncwatch itself.  The answer is cached per
# file name because it is asked on hot paths (task creation).


def _library_prefixes() -> tuple[str, ...]:
    import sysconfig  # here, not at import: ~130 objects the collector would walk for ever (issue 15)

    paths: set[str] = set()
    for key in ("stdlib", "platstdlib", "purelib", "platlib"):
        p = sysconfig.get_paths().get(key)
        if p:
            paths.add(os.path.abspath(p))
    with contextlib.suppress(AttributeError):  # virtualenv's old site module has no getsitepackages
        paths.update(os.path.abspath(p) for p in _site.getsitepackages())
    user = getattr(_site, "getusersitepackages", lambda: None)()
    if user:
        paths.add(os.path.abspath(user))
    if sys.prefix != sys.base_prefix:
        # A virtual environment's bin/ holds the console scripts pip wrote
        # (uvicorn, gunicorn, asyncwatch itself): three lines that call an
        # installed package, never the application.  Counted as the
        # program's, every task uvicorn made was "created at
        # venv/bin/uvicorn:8", a confident wrong line.  (Not a system
        # Python's scripts directory: /usr/local/bin may hold the
        # program's own scripts.)
        scripts = sysconfig.get_paths().get("scripts")
        if scripts:
            paths.add(os.path.abspath(scripts))
    # Resolve symlinked prefixes too (pyenv, Debian's /usr/lib vs /lib).
    paths.update({os.path.realpath(p) for p in paths})
    return (*tuple(sorted(p.rstrip(os.sep) + os.sep for p in paths)), PACKAGE_DIR)


#: Computed when the first file name is asked about (`library_prefixes`).
_LIBRARY_PREFIXES: tuple[str, ...] | None = None
_is_library_cache: dict[str, bool] = {}


def library_prefixes() -> tuple[str, ...]:
    """The directories of the standard library, installed packages and asyncwatch."""
    global _LIBRARY_PREFIXES
    if _LIBRARY_PREFIXES is None:
        _LIBRARY_PREFIXES = _library_prefixes()
    return _LIBRARY_PREFIXES


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
        path = absolute_path(filename)
        result = (
            path.startswith(_LIBRARY_PREFIXES or library_prefixes())
            or f"{os.sep}site-packages{os.sep}" in path
            or f"{os.sep}dist-packages{os.sep}" in path
        )
    if len(_is_library_cache) > 4096:  # exec'd code can make endless names
        _is_library_cache.clear()
    _is_library_cache[filename] = result
    return result


def library_package(filename: str) -> str | None:
    """The installed package (or standard-library module) *filename* belongs
    to, as the directory or file under its library directory
    (``.../site-packages/aiohappyeyeballs``); None for the application's files."""
    if not is_library_file(filename) or filename.startswith("<"):
        return None
    path = absolute_path(filename)
    for marker in (f"{os.sep}site-packages{os.sep}", f"{os.sep}dist-packages{os.sep}"):
        at = path.rfind(marker)
        if at >= 0:
            start = at + len(marker)
            break
    else:
        start = max((len(p) for p in library_prefixes() if path.startswith(p)), default=0)
    top = path[start:].split(os.sep, 1)[0]
    return path[:start] + top if top else None


def is_own_file(filename: str) -> bool:
    """Return whether *filename* is part of asyncwatch itself."""
    return filename.startswith(PACKAGE_DIR)


def line_of(code: CodeType, lasti: int) -> int:
    """Return the source line of the instruction at byte offset *lasti*."""
    if lasti >= 0:
        for start, end, line in code.co_lines():
            if start <= lasti < end and line is not None:
                return line
    return code.co_firstlineno


# Sites by (id of the code object, offset), with the code object itself to
# check against a reused id.  A program creates its tasks from a few hundred
# lines; resolving one (abspath, co_lines) cost about 37,000 instructions per
# task whenever spans were on (issue 14, benchmarks/instructions.py).  Keyed
# by id: a code object hashes its bytecode and constants.
_SITE_CACHE_LIMIT = 4096
_site_cache: dict[tuple[int, int], tuple[CodeType, Site]] = {}


def code_site(code: CodeType, lasti: int) -> Site:
    """Make a `Site` from a code object and an instruction offset."""
    key = (id(code), lasti)
    cached = _site_cache.get(key)
    if cached is not None and cached[0] is code:
        return cached[1]
    site = Site(source_path(code.co_filename), line_of(code, lasti), code.co_qualname)
    if len(_site_cache) >= _SITE_CACHE_LIMIT:  # exec'd code can make code objects without end
        _site_cache.clear()
    _site_cache[key] = (code, site)
    return site


def frame_site(frame: FrameType) -> Site:
    """Make a `Site` from a live frame (its current line)."""
    code = frame.f_code
    return Site(source_path(code.co_filename), frame.f_lineno or code.co_firstlineno, code.co_qualname)


def source_path(filename: str) -> str:
    """The absolute path of a code object's file name (``<string>`` and the like as they are)."""
    return filename if filename.startswith("<") else absolute_path(filename)


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
#: The same, by id, for a hot path: a code object hashes its bytecode and
#: constants on every lookup, an int does not.  Module-level functions' code
#: objects live as long as the interpreter, so the ids stay theirs.
LOOP_DISPATCH_IDS = frozenset(id(code) for code in LOOP_DISPATCH)
LOOP_DISPATCH_NAMES = frozenset((c.co_filename, c.co_name) for c in LOOP_DISPATCH)


def app_frame_in_callback(frame: FrameType | None) -> FrameType | None:
    """The innermost application frame at or outside *frame*, but None at
    the event loop's dispatch: code called by the loop itself (a coroutine
    function used as a callback) has no application caller."""
    while frame is not None:
        code = frame.f_code
        if id(code) in LOOP_DISPATCH_IDS:
            return None
        if not is_library_file(code.co_filename):
            return frame
        frame = frame.f_back
    return None


def _interrupt_codes() -> frozenset[CodeType]:
    import asyncio.runners

    on_sigint = getattr(asyncio.runners.Runner, "_on_sigint", None)
    return frozenset((on_sigint.__code__,)) if on_sigint is not None else frozenset()


#: Signal handlers that cancel a task: their caller is whatever line the
#: signal interrupted, which did not ask for it.
_INTERRUPTS = _interrupt_codes()
_INTERRUPT_IDS = frozenset(id(code) for code in _INTERRUPTS)


def app_frame_in_running_loop(frame: FrameType | None) -> FrameType | None:
    """Like `app_frame_in_callback`, for a call that may come from outside
    the loop (``task.cancel()``).

    While a loop runs on this thread, its dispatch ends the walk: library
    code the loop called back (``loop.call_later(5, task.cancel)``, a
    protocol's callback) has no application caller, and the line further
    out (``asyncio.run(main())``) only started the loop.  Nor has a signal
    handler (asyncio.Runner's SIGINT handler cancelling the main task): its
    caller is the line the signal interrupted.  With no loop running
    (asyncio.run's set-up, its cancelling of the tasks left at the end),
    the walk goes on out to the line that called it.  The frame that
    started the running loop (`WatchedLoop.runner`) is a dispatch too:
    uvloop calls back from C, straight from that frame."""
    import asyncio.events

    from .detector import watches

    loop = asyncio.events._get_running_loop()
    running = loop is not None
    watch = watches.get(loop) if loop is not None else None
    runner = watch.runner if watch is not None else None
    del loop, watch
    while frame is not None:
        code = frame.f_code
        if (running and (id(code) in LOOP_DISPATCH_IDS or code is runner)) or id(code) in _INTERRUPT_IDS:
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


# Coroutines that only wrap the program's coroutine, by (function name, a
# piece of their file's path): opentelemetry-instrumentation-asyncio (which
# `opentelemetry-bootstrap` installs) runs every task's coroutine inside
# ``AsyncioInstrumentor.trace_coroutine(coro)``.  Naming the wrapper would name
# every task and finding "trace_coroutine".
_WRAPPER_COROUTINES = {"trace_coroutine": os.path.join("opentelemetry", "instrumentation", "asyncio") + os.sep}
#: The names of the known wrapper coroutines: a cheap first test, for the hot path.
WRAPPER_NAMES = frozenset(_WRAPPER_COROUTINES)


def program_coroutine(coro: Any) -> Any:
    """*coro*, or the program's coroutine that a known library wrapper runs
    (the wrapper's ``coro`` argument: it has not started, or holds it still)."""
    for _ in range(4):  # each instrumentation wraps once; a bound on cycles
        code = getattr(coro, "cr_code", None)
        if code is None:
            return coro
        where = _WRAPPER_COROUTINES.get(code.co_name)
        if where is None or where not in code.co_filename:
            return coro
        frame = getattr(coro, "cr_frame", None)
        inner = frame.f_locals.get("coro") if frame is not None else None
        if inner is None:
            return coro
        coro = inner
    return coro


def qualname_of(obj: Any) -> str | None:
    """The qualified name of a coroutine (the program's, inside a known
    wrapper), generator or callable, or None."""
    if getattr(obj, "cr_code", None) is not None:
        obj = program_coroutine(obj)
    name = getattr(obj, "__qualname__", None)
    if isinstance(name, str):
        return name
    func = getattr(obj, "__func__", None) or getattr(obj, "func", None)
    if func is not None:
        return qualname_of(func)
    # A task running ``agen.asend(None)`` (``anext(agen)``, as aiostream's
    # helpers make one) runs that async generator; the awaitable has no name.
    agen = _async_generator_of(obj)
    if agen is not None:
        name = getattr(agen, "__qualname__", None)
        return name if isinstance(name, str) else None
    return None


def describe_task(name: str | None, coroutine: str | None) -> str:
    """How a message names a task: ``Task 'Task-3' (coroutine 'fetch')``, or
    without the coroutine when its name is unknown (not "coroutine None")."""
    return f"Task {name!r} (coroutine {coroutine!r})" if coroutine is not None else f"Task {name!r}"


def describe_exception(exc: BaseException, limit: int = 200) -> str:
    """``ValueError('boom')``-like text: the type and the user's own message only."""
    text = str(exc)
    if len(text) > limit:
        text = text[: limit - 1] + "…"
    name = type(exc).__qualname__
    return f"{name}: {text}" if text else name


def site_text(site: Site, relative: bool = False) -> str:
    """``file:line in function``; with *relative*, the path relative to the
    start-up directory when it is inside it (console output)."""
    path = site.file
    if relative:
        rel = relative_path(path)
        if not rel.startswith(".."):
            path = rel
    return f"{path}:{site.line} in {site.function}"


def await_chain(coro: Any, limit: int = 64) -> list[Site]:
    """Where a suspended coroutine waits: the site of each frame along its
    chain of awaited coroutines and generators, outermost first (at most
    *limit* frames)."""
    chain: list[Site] = []
    obj: Any = coro
    while obj is not None and len(chain) < limit:
        frame = getattr(obj, "cr_frame", None) or getattr(obj, "gi_frame", None) or getattr(obj, "ag_frame", None)
        if frame is None:
            agen = _async_generator_of(obj)
            if agen is None:
                break
            obj = agen  # `async for` / `async with` over an async generator
            continue
        chain.append(frame_site(frame))
        obj = getattr(obj, "cr_await", None) or getattr(obj, "gi_yieldfrom", None) or getattr(obj, "ag_await", None)
    return chain


def _async_generator_of(awaitable: Any) -> Any:
    """The async generator behind an ``asend``/``athrow`` awaitable, which
    exposes no attribute for it.  Only asked off the hot path."""
    if type(awaitable).__name__ not in ("async_generator_asend", "async_generator_athrow"):
        return None
    return next((r for r in gc.get_referents(awaitable) if inspect.isasyncgen(r)), None)
