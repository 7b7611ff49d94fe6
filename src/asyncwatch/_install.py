"""`install()` and `uninstall()`: what the program calls, and what they change.

Global state department (with `_engine._state`): the engine, the event-loop
policy asyncwatch set, and the asyncio patches that see loops start
(`_patches`), all undone by `uninstall()` in any order relative to other
libraries.
"""

from __future__ import annotations

import asyncio
import gc
from collections.abc import Iterable
from types import CodeType
from typing import Any

from ._core.runtime import at_exit, forget_internal_errors, report_internal_error
from ._core.settings import Settings, check_install_arguments
from ._engine import Engine, _state, ensure_engine
from ._outputs.pipeline import Reporter
from ._patches import Patch, loop_start_patches
from ._policy import EventLoopPolicy, get_policy, set_policy

__all__ = ["Installation", "collect_garbage", "finish_at_exit", "install", "uninstall", "watch_future_loops"]


class _Hooked:
    """What install() changed in the interpreter, to undo it."""

    def __init__(self) -> None:
        self.policy: EventLoopPolicy | None = None  # ours, while it is the current one
        self.policy_base: Any = None
        self.patches: list[Patch] = []


_hooked = _Hooked()


class Installation:
    """What `install()` returns: undo it with `uninstall()` or a ``with`` block."""

    def __init__(self, engine: Engine) -> None:
        self._engine = engine

    @property
    def settings(self) -> Settings:
        return self._engine.settings

    def add_reporter(self, reporter: Reporter) -> None:
        """Send every later finding to *reporter* too."""
        self._engine.pipeline.add(reporter)

    def remove_reporter(self, reporter: Reporter) -> None:
        self._engine.pipeline.remove(reporter)

    def uninstall(self) -> None:
        """Same as `asyncwatch.uninstall()`."""
        if _state.engine is self._engine:
            uninstall()

    def __enter__(self) -> Installation:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.uninstall()


def install(
    *,
    loop: asyncio.AbstractEventLoop | None = None,
    reporters: Iterable[Reporter] = (),
    tracer_provider: Any = None,
    meter_provider: Any = None,
    **options: Any,
) -> Installation:
    """Start watching for asyncio's silent failures.

    Called inside a running loop, watch that loop; called before any loop
    runs, watch every loop created or started afterwards; with ``loop=``,
    watch that loop.  Calling it again is harmless (it attaches any new
    loop).  Options: see `Settings`; ``ASYNCWATCH_*`` environment variables
    give the defaults.  OpenTelemetry spans and metrics go to
    *tracer_provider* / *meter_provider*, else to the application's global
    providers.  Undo everything with `uninstall()`.
    """
    reporters = check_install_arguments(loop, reporters, tracer_provider, meter_provider)
    with _state.lock:
        engine, settings = ensure_engine(
            options, reporters=reporters, tracer_provider=tracer_provider, meter_provider=meter_provider
        )
        if loop is None:
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:
                loop = None
        if loop is not None:
            engine.attach(loop, settings)
        else:
            _watch_future_loops(settings)
        return Installation(engine)


def watch_future_loops(settings: Settings) -> None:
    """`_watch_future_loops` under the install lock (the pytest plugin's way in)."""
    with _state.lock:
        _watch_future_loops(settings)


def _watch_future_loops(settings: Settings) -> None:
    """Watch loops that do not exist yet: through the event-loop policy (it
    makes the loops of ``asyncio.run()`` and ``new_event_loop()``, uvloop's
    included), and when any asyncio loop starts running (loops made by hand
    or by a ``loop_factory``)."""
    _state.future_loops = settings
    if _hooked.policy is None:
        base = get_policy()
        if not isinstance(base, EventLoopPolicy):
            policy = EventLoopPolicy(base)
            set_policy(policy)
            _hooked.policy = policy
            _hooked.policy_base = base
    if not _hooked.patches:
        _hooked.patches = loop_start_patches(_watch_starting_loop)
        for patch in _hooked.patches:
            patch.apply()


def _watch_starting_loop(loop: Any, runner: CodeType | None = None) -> None:
    """Attach a loop about to run (the loop-start hooks), unless it is
    watched; *runner*, the code of the frame that runs it, goes to its watch
    (`WatchedLoop.runner`, for ``cancel()``) and its task factory
    (`TaskFactory.runner`, read on the creation-site walk without a lookup)."""
    engine = _state.engine
    if loop is not None and engine is not None and _state.future_loops is not None:
        try:
            watch = engine.attach(loop, _state.future_loops)
            if runner is not None:
                watch.runner = runner
                factory = watch.factory
                if factory is not None:
                    factory.runner = runner
        except Exception as exc:
            report_internal_error("loop start hook", exc)


def uninstall() -> None:
    """Stop watching and restore every hook asyncwatch changed.

    Hooks that another library wrapped after asyncwatch are left in place
    with asyncwatch's part made inert, so uninstall order never matters.
    """
    with _state.lock:
        engine = _state.engine
        for patch in _hooked.patches:
            patch.restore()
        _hooked.patches = []
        if _hooked.policy is not None:
            if get_policy() is _hooked.policy:
                set_policy(_hooked.policy_base)
            else:
                _hooked.policy.inert = True
            _hooked.policy = None
            _hooked.policy_base = None
        _state.future_loops = None
        _state.engine = None
        if engine is not None:
            engine.close()
        forget_internal_errors()


def collect_garbage() -> None:
    """Surface tasks and coroutines that are garbage but not yet collected
    (three passes: a finalizer may free more)."""
    for _ in range(3):
        gc.collect()


def finish_at_exit() -> None:
    """The program is over, its code and exit functions run: report its
    garbage and what it left alive (`Engine.report_survivors`), then stop
    watching.  Python frees what is left while it clears the modules,
    asyncwatch's among them: a report then is lost, or fails (an internal
    error on stderr).  First of asyncwatch's exit work, before the findings
    files are flushed."""
    engine = _state.engine
    if engine is None:
        return
    try:
        collect_garbage()
        engine.report_survivors()
    finally:
        uninstall()


at_exit(finish_at_exit, first=True)
