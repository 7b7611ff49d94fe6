"""Under a blocking-call guard, as anyio's suite runs with blockbuster.

Such a guard makes every file-system call on a thread running an event loop
raise.  asyncwatch makes its sites on the loop thread (a task created, a
cancellation, a task collected), so it must make them with strings only:
a guard that raised inside it would disable a detector and log an internal
error into the program's own logs (anyio's test_unhandled_exception_group
saw that through caplog).
"""

# Every line here runs on purpose inside a loop that a guard watches.
# ruff: noqa: ASYNC230

from __future__ import annotations

import asyncio
import builtins
import contextlib
import gc
import io
import json
import logging
import os
import sys
from collections.abc import Callable, Iterator
from typing import Any

import pytest

import asyncwatch
from conftest import line_of

_OWN_DIR = os.path.dirname(asyncwatch.__file__) + os.sep
_PATH_MODULES = {m.__file__ for m in (os, os.path, sys.modules["genericpath"])}

# What blockbuster guards in os and os.path, and the ways to open a file.
_GUARDED: list[tuple[Any, str]] = (
    [
        (os, name)
        for name in ("getcwd", "stat", "lstat", "listdir", "scandir", "readlink", "access", "read", "write", "statvfs")
    ]
    + [
        (os.path, name)
        for name in ("abspath", "realpath", "relpath", "exists", "isfile", "isdir", "islink", "ismount", "getsize")
    ]
    + [(builtins, "open"), (io, "open")]
)


class BlockingCall(Exception):
    """What the guard raises, as blockbuster's BlockingError does."""


@contextlib.contextmanager
def blocking_guard() -> Iterator[list[str]]:
    """Make file-system calls that asyncwatch makes on a loop thread raise; yield what was called."""
    calls: list[str] = []

    def guarded(name: str, original: Callable[..., Any]) -> Callable[..., Any]:
        def guard(*args: Any, **kwargs: Any) -> Any:
            try:
                asyncio.get_running_loop()
            except RuntimeError:
                return original(*args, **kwargs)
            # Who made the call: past os.path's own functions (abspath
            # calls getcwd).  The standard library's own calls (linecache,
            # when asyncio's handler logs a traceback) are the program's.
            frame = sys._getframe(1)
            while frame is not None and frame.f_code.co_filename in _PATH_MODULES:
                frame = frame.f_back
            if frame is not None and frame.f_code.co_filename.startswith(_OWN_DIR):
                calls.append(f"{name} from {frame.f_code.co_qualname}")
                raise BlockingCall(f"blocking call to {name}")
            return original(*args, **kwargs)

        return guard

    saved = [(owner, name, getattr(owner, name)) for owner, name in _GUARDED if hasattr(owner, name)]
    for owner, name, original in saved:
        setattr(owner, name, guarded(f"{getattr(owner, '__name__', owner)}.{name}", original))
    try:
        yield calls
    finally:
        for owner, name, original in saved:
            setattr(owner, name, original)


async def _wait_forever() -> None:
    await asyncio.Event().wait()


async def _swallows() -> None:
    try:
        await asyncio.sleep(3600)  # <- guard: swallowed here
    except asyncio.CancelledError:
        pass


async def _fails() -> None:
    raise ValueError("never retrieved")


# A relative code file name: made absolute without os.getcwd.
_RELATIVE = compile(
    "async def _relative_creator(make):\n    return asyncio.ensure_future(make())\n",
    "relative_program.py",
    "exec",
)
_relative_ns: dict[str, Any] = {"asyncio": asyncio}
exec(_RELATIVE, _relative_ns)


async def _program() -> None:
    swallower = asyncio.create_task(_swallows())
    await asyncio.sleep(0)
    swallower.cancel()
    await asyncio.sleep(0)
    await swallower
    lost = await _relative_ns["_relative_creator"](_wait_forever)  # a task made from a relative file name
    await asyncio.sleep(0)
    del lost
    failing = asyncio.create_task(_fails())  # <- guard: never retrieved
    await asyncio.sleep(0)
    del failing
    _wait_forever()  # <- guard: never awaited
    lost_gather = asyncio.gather(_wait_forever(), _wait_forever())  # <- guard: lost gather
    await asyncio.sleep(0)
    del lost_gather
    for _ in range(4):
        gc.collect()  # on the loop thread, where the collected tasks are reported
    await asyncio.sleep(0)


def test_asyncwatch_makes_no_file_system_call_on_the_loop_thread(watched, capsys, caplog):
    """Every finding of a program run under the guard is reported at its
    line, the guard saw no call of asyncwatch's, and nothing was logged as
    an internal error."""
    caplog.set_level(logging.DEBUG)
    with blocking_guard() as calls:
        watched.run(_program)
    assert calls == []
    out = capsys.readouterr()
    assert "internal_error" not in out.out + out.err + caplog.text
    here = os.path.abspath(__file__)
    found = {(f.kind.value, f.site and (f.site.file, f.site.line)) for f in watched.findings}
    relative = os.path.join(os.getcwd(), "relative_program.py")
    assert {
        ("cancellation_swallowed", (here, line_of("# <- guard: swallowed here"))),
        ("task_exception_unretrieved", (here, line_of("# <- guard: never retrieved"))),
        ("coroutine_never_awaited", (here, line_of("# <- guard: never awaited"))),
        ("task_destroyed_pending", (here, line_of("# <- guard: lost gather"))),
        ("task_destroyed_pending", (relative, 2)),
    } <= found


def test_the_guard_catches_a_file_system_call_of_asyncwatchs():
    """The guard itself: a call from asyncwatch's code inside a running loop raises and is recorded."""
    from asyncwatch._core import runtime

    async def main() -> None:
        with pytest.raises(BlockingCall):
            # Any function of asyncwatch's that reaches os: the internal
            # helper that names a thread's process, say.
            eval(compile("os.getcwd()", runtime.__file__, "eval"), {"os": os})

    with blocking_guard() as calls:
        asyncio.run(main())
        os.getcwd()  # outside a loop: allowed
    assert calls == ["os.getcwd from <module>"]


pytest_plugins = ["pytester"]


def test_the_pytest_plugin_reports_under_the_guard(pytester: pytest.Pytester):
    """The plugin judges and records findings on the loop thread (a task
    collected there) with no file-system call either: the findings file has
    the finding and no internal error is logged."""
    pytester.makepyfile(
        test_guarded="""
        import asyncio, gc
        from test_blocking_guard import blocking_guard

        async def forever():
            await asyncio.Event().wait()

        async def main():
            lost = asyncio.create_task(forever())  # <- lost
            await asyncio.sleep(0)
            del lost
            gc.collect()
            await asyncio.sleep(0)

        def test_it():
            with blocking_guard() as calls:
                asyncio.run(main())
            assert calls == []
        """
    )
    pytester.makeini("[pytest]\nasyncio_default_fixture_loop_scope = function\n")
    findings = pytester.path / "findings.jsonl"
    result = pytester.runpytest(
        "-p", "no:cacheprovider", "--asyncwatch", "--asyncwatch-mode", "report", f"--asyncwatch-findings={findings}"
    )
    result.assert_outcomes(passed=1)
    assert "internal_error" not in result.stdout.str() + result.stderr.str()
    lines = [json.loads(line) for line in findings.read_text().splitlines()]
    line = next(
        n for n, text in enumerate((pytester.path / "test_guarded.py").read_text().splitlines(), 1) if "<- lost" in text
    )
    assert [(f["kind"], f["site"]["line"]) for f in lines] == [("task_destroyed_pending", line)]
