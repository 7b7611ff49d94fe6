"""What asyncwatch patches in asyncio, as records that apply and restore.

Each `Patch` replaces one attribute and remembers what it replaced.
`restore` puts the original back only while the attribute is still ours: a
library that wrapped it after asyncwatch keeps its wrapper (which calls ours,
made inert by the engine being gone), so the order of uninstalls never
matters (OpenTelemetry contrib's paired instrument/uninstrument).
"""

from __future__ import annotations

import asyncio
import asyncio.base_events
import asyncio.events
import asyncio.runners
import contextlib
import functools
import sys
from collections.abc import Callable
from typing import Any

from ._core import loops
from ._core.settings import extension

__all__ = ["Patch", "hooked", "loop_start_patches"]


class Patch:
    """``setattr(owner, name, make(original))``, undone by `restore`."""

    __slots__ = ("_make", "name", "original", "owner", "replacement")

    def __init__(self, owner: Any, name: str, make: Callable[[Any], Any]) -> None:
        self.owner = owner
        self.name = name
        self._make = make
        self.original: Any = None
        self.replacement: Any = None

    @property
    def applied(self) -> bool:
        return self.replacement is not None

    def apply(self) -> None:
        """Replace the attribute (once; applying again does nothing)."""
        if self.replacement is None:
            self.original = getattr(self.owner, self.name)
            self.replacement = self._make(self.original)
            setattr(self.owner, self.name, self.replacement)

    def restore(self) -> None:
        """Put the original back if the attribute is still ours; forget it either way."""
        if self.replacement is not None:
            current = (
                self.owner.__dict__.get(self.name)
                if isinstance(self.owner, type)
                else getattr(self.owner, self.name, None)
            )
            if current is self.replacement:
                setattr(self.owner, self.name, self.original)
            self.replacement = self.original = None


def hooked(original: Any, before: Callable[..., None] | None = None, after: Callable[..., None] | None = None) -> Any:
    """*original*, calling *before* with its arguments first and *after*
    once it returned.  In C where asyncwatch's extension was built
    (`_ctask.Hooked`): a Python wrapper is a frame of ours in every
    traceback that passes through it, and every program that crashed under
    ``asyncio.run()`` showed one.  The hooks contain their own errors."""
    ctask = extension()
    if ctask is not None and hasattr(ctask, "Hooked"):
        made = ctask.Hooked(before, original, after)
        for name in ("__module__", "__name__", "__qualname__", "__doc__"):
            with contextlib.suppress(AttributeError):
                setattr(made, name, getattr(original, name))
        return made

    @functools.wraps(original)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        if before is not None:
            before(*args, **kwargs)
        result = original(*args, **kwargs)
        if after is not None:
            after(*args, **kwargs)
        return result

    return wrapper


def loop_start_patches(watch_starting_loop: Callable[..., None]) -> list[Patch]:
    """The hooks that see a loop about to run, for `install()` before any loop exists.

    *watch_starting_loop* is called with the loop, and, from the loop-start
    hook itself, with the code of the Python frame that made it run."""

    def set_running_loop(original: Callable[[Any], None]) -> Callable[[Any], None]:
        def _set_running_loop(loop: Any) -> None:
            original(loop)
            if loop is not None:
                # The caller of run_forever()/run_until_complete(): uvloop's
                # are compiled, so its frame is the one that runs the loop.
                watch_starting_loop(loop, sys._getframe(1).f_code)

        return _set_running_loop

    def lazy_init(original: Callable[[Any], None]) -> Any:
        # uvloop keeps its own reference to asyncio's _set_running_loop, so a
        # uvloop loop given to asyncio.Runner (uvloop.run() does that) never
        # goes through the hook above: catch it as the Runner makes it,
        # before the Runner creates the program's main task on it.
        def made(self: Any) -> None:
            watch_starting_loop(getattr(self, "_loop", None))

        return hooked(original, after=made)

    def run_until_complete(original: Callable[[Any, Any], Any]) -> Any:
        # loop.run_until_complete(coro) makes the task for coro before the
        # loop starts running: attach a loop made by hand first, so that
        # task is ours too.
        def starting(self: Any, *_: Any, **__: Any) -> None:
            if not loops.is_closed(self):
                watch_starting_loop(self)

        return hooked(original, before=starting)

    patches = [Patch(asyncio.events, "_set_running_loop", set_running_loop)]
    if getattr(asyncio, "_set_running_loop", None) is asyncio.events._set_running_loop:
        # uvloop takes ``asyncio._set_running_loop`` (the package's own name
        # for it) once, when it is imported: imported after install(), as
        # under ``asyncwatch run``, it then calls the hook above, and a loop
        # it runs by hand (aiohttp's ``web.run_app(app,
        # loop=uvloop.new_event_loop())``) is watched from its start.
        patches.append(Patch(asyncio, "_set_running_loop", set_running_loop))
    if hasattr(asyncio.runners.Runner, "_lazy_init"):
        patches.append(Patch(asyncio.runners.Runner, "_lazy_init", lazy_init))
    patches.append(Patch(asyncio.base_events.BaseEventLoop, "run_until_complete", run_until_complete))
    return patches
