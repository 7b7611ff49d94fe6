"""Calling a watched loop as its class defines it, never through the instance.

A test may patch a method on its running loop (``patch.object(loop,
"is_closed")``, a ``MagicMock`` for ``call_later``) and then assert how
often the program called it.  asyncwatch's own calls must not count there,
nor get the patch's answer: janus's suite patches ``is_closed`` to return
True and asserts one call; the watchdog's look called it too (2 == 1), took
the loop for closed and stopped watching it for good.  Looked up on the
class, the call is the loop's real one (a subclass's override included) and
an instance attribute the program set is left to the program.

Each costs a class lookup more than the method call it replaces; none runs
per task or per step (the most frequent, the deadline's tick, runs every
half deadline).  An object whose class lacks the method (a duck-typed loop)
is called through the instance, as before.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

__all__ = ["call_at", "call_later", "call_soon", "call_soon_threadsafe", "is_closed", "is_running"]


def _method(loop: asyncio.AbstractEventLoop, name: str) -> Callable[..., Any]:
    """*loop*'s class's *name*, bound to *loop*; the instance's own if the class has none."""
    function = getattr(type(loop), name, None)
    if function is None:
        return getattr(loop, name)  # type: ignore[no-any-return]
    return function.__get__(loop)  # type: ignore[no-any-return]


def is_closed(loop: asyncio.AbstractEventLoop) -> bool:
    """``loop.is_closed()``, from any thread."""
    return _method(loop, "is_closed")()  # type: ignore[no-any-return]


def is_running(loop: asyncio.AbstractEventLoop) -> bool:
    """``loop.is_running()``, from any thread."""
    return _method(loop, "is_running")()  # type: ignore[no-any-return]


def call_soon(loop: asyncio.AbstractEventLoop, callback: Callable[..., object], *args: Any) -> asyncio.Handle:
    """``loop.call_soon(callback, *args)`` (the loop's thread)."""
    return _method(loop, "call_soon")(callback, *args)  # type: ignore[no-any-return]


def call_soon_threadsafe(
    loop: asyncio.AbstractEventLoop, callback: Callable[..., object], *args: Any
) -> asyncio.Handle:
    """``loop.call_soon_threadsafe(callback, *args)``."""
    return _method(loop, "call_soon_threadsafe")(callback, *args)  # type: ignore[no-any-return]


def call_later(
    loop: asyncio.AbstractEventLoop, delay: float, callback: Callable[..., object], *args: Any
) -> asyncio.TimerHandle:
    """``loop.call_later(delay, callback, *args)`` (the loop's thread)."""
    return _method(loop, "call_later")(delay, callback, *args)  # type: ignore[no-any-return]


def call_at(
    loop: asyncio.AbstractEventLoop, when: float, callback: Callable[..., object], *args: Any
) -> asyncio.TimerHandle:
    """``loop.call_at(when, callback, *args)`` (the loop's thread)."""
    return _method(loop, "call_at")(when, callback, *args)  # type: ignore[no-any-return]
