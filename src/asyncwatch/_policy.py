"""The loop factory (the way forward) and the event-loop policy (3.11 to 3.13).

Python 3.14 deprecates event-loop policies; ``asyncio.run(main(),
loop_factory=...)`` and ``asyncio.Runner(loop_factory=...)`` are what
replaces them, so the loop factory is the primary entry point and the policy
is a thin wrapper over the same attachment.
"""

from __future__ import annotations

import asyncio
import asyncio.events as _events
import warnings
from collections.abc import Callable
from typing import Any

from ._core.settings import Settings, check_loop_factory_base, check_policy_base
from ._engine import attach_loop

__all__ = ["EventLoopPolicy", "loop_factory", "new_event_loop"]

LoopFactory = Callable[[], asyncio.AbstractEventLoop]

# 3.14 renamed the policy classes with a leading underscore and deprecated
# the public names; use whichever exists without touching the deprecated one.
_AbstractPolicy: Any = getattr(_events, "_AbstractEventLoopPolicy", None) or _events.AbstractEventLoopPolicy


def _default_policy() -> Any:
    import asyncio as _asyncio

    cls = getattr(_asyncio, "_DefaultEventLoopPolicy", None)
    if cls is None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            cls = _asyncio.DefaultEventLoopPolicy
    return cls()


def get_policy() -> Any:
    """``asyncio.get_event_loop_policy()`` without 3.14's deprecation warning."""
    getter = getattr(_events, "_get_event_loop_policy", None)
    if getter is not None:
        return getter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        return asyncio.get_event_loop_policy()


def set_policy(policy: Any) -> None:
    """``asyncio.set_event_loop_policy()`` without 3.14's deprecation warning."""
    setter = getattr(_events, "_set_event_loop_policy", None)
    if setter is not None:
        setter(policy)
        return
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        asyncio.set_event_loop_policy(policy)


def _validated(options: dict[str, Any]) -> dict[str, Any]:
    Settings().with_options(options)  # fail now, at the call site, not in the loop
    return options


def loop_factory(base: LoopFactory | None = None, /, **options: Any) -> LoopFactory:
    """Return a loop factory whose loops asyncwatch watches.

    *base* makes the loop (default: ``asyncio.new_event_loop``; pass
    ``uvloop.new_event_loop`` for uvloop).  Use it with
    ``asyncio.run(main(), loop_factory=...)`` (3.12+) or
    ``asyncio.Runner(loop_factory=...)`` (3.11+).  *options* are those of
    `asyncwatch.install`.
    """
    check_loop_factory_base(base)
    make = base or asyncio.new_event_loop
    opts = _validated(dict(options))

    def asyncwatch_loop_factory() -> asyncio.AbstractEventLoop:
        loop = make()
        attach_loop(loop, opts)
        return loop

    asyncwatch_loop_factory.__qualname__ = f"loop_factory({getattr(make, '__qualname__', make)!s})"
    return asyncwatch_loop_factory


def new_event_loop() -> asyncio.AbstractEventLoop:
    """A new ``asyncio`` event loop, watched: ``asyncio.run(main(), loop_factory=asyncwatch.new_event_loop)``."""
    loop = asyncio.new_event_loop()
    attach_loop(loop, {})
    return loop


class EventLoopPolicy(_AbstractPolicy):  # type: ignore[misc]
    """An event-loop policy whose loops asyncwatch watches.

    Wraps *base* (default: asyncio's default policy; pass
    ``uvloop.EventLoopPolicy()`` for uvloop) and delegates everything to it.
    ``asyncio.set_event_loop_policy(asyncwatch.EventLoopPolicy())``.
    """

    def __init__(self, base: Any = None, **options: Any) -> None:
        check_policy_base(base)
        self._base = base if base is not None else _default_policy()
        self._options = _validated(dict(options))
        self.inert = False  # set by uninstall() when someone replaced us

    @property
    def base(self) -> Any:
        return self._base

    def _watch(self, loop: asyncio.AbstractEventLoop) -> asyncio.AbstractEventLoop:
        if not self.inert:
            attach_loop(loop, self._options)
        return loop

    def get_event_loop(self) -> asyncio.AbstractEventLoop:
        loop = self._base.get_event_loop()
        return self._watch(loop)

    def set_event_loop(self, loop: asyncio.AbstractEventLoop | None) -> None:
        self._base.set_event_loop(loop)

    def new_event_loop(self) -> asyncio.AbstractEventLoop:
        return self._watch(self._base.new_event_loop())

    # In a forked child, asyncio (3.12+) forgets the parent's event loop by
    # giving the current policy a new ``_local``: that must reach the base,
    # which keeps the loops, or the child would share its parent's loop.
    @property
    def _local(self) -> Any:
        return self._base._local

    @_local.setter
    def _local(self, value: Any) -> None:
        self._base._local = value

    # The abstract policy defines these (3.11, 3.12), so __getattr__ would
    # never be asked: delegate them explicitly.
    def get_child_watcher(self) -> Any:
        return self._base.get_child_watcher()

    def set_child_watcher(self, watcher: Any) -> None:
        self._base.set_child_watcher(watcher)

    def __getattr__(self, name: str) -> Any:
        # Anything a third-party base policy adds.
        return getattr(self._base, name)
