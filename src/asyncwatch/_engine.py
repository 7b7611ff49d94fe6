"""The engine: one per process, shared by all four entry points.

Global state department.  `install()`, the event-loop policy, the loop
factory and the command line all end in `Engine.attach(loop)`; everything
hooked is chained and restored by `uninstall()`.
"""

from __future__ import annotations

import asyncio
import asyncio.base_events
import asyncio.events
import asyncio.runners
import dataclasses
import threading
import weakref
from collections.abc import Callable, Iterable, Mapping
from typing import TYPE_CHECKING, Any

from ._coroutines import CoroutineHook
from ._findings import Finding, FindingKind
from ._reporters import (
    JsonLinesReporter,
    Pipeline,
    RateLimiter,
    Reporter,
    StructlogReporter,
    forget_internal_errors,
    in_forked_child,
    internal_logger,
    report_internal_error,
)
from ._settings import ConfigurationError, Settings, check_install_arguments
from ._slow import LoopProbe, Watchdog
from ._tasks import (
    DESTROYED_PENDING,
    NEVER_RETRIEVED,
    ExceptionHandler,
    TaskFactory,
    TaskObserver,
    destroyed_pending_finding,
    forget,
    unretrieved_finding,
    user_coro_of,
    watches,
)

if TYPE_CHECKING:
    from ._otel import Telemetry

__all__ = ["Engine", "Installation", "LoopWatch", "install", "is_installed", "uninstall"]

# The live threads by ident: threading's own table, read without its lock
# (taking that lock from a finalizer could deadlock the thread holding it).
_THREADS: dict[int, threading.Thread] = getattr(threading, "_active", {})

# Options that belong to the whole process rather than to one loop.
_ENGINE_OPTIONS = (
    "findings",
    "track_coroutine_origins",
    "log",
    "spans",
    "spans_min_duration_ms",
    "metrics",
    "report_limit",
)


# The kinds found through the task factory (creation sites, cancel() calls).
_TASK_KINDS = frozenset(
    {
        FindingKind.TASK_DESTROYED_PENDING,
        FindingKind.TASK_EXCEPTION_UNRETRIEVED,
        FindingKind.CANCELLATION_SWALLOWED,
        FindingKind.TASK_LEAKED,
    }
)


def _nothing() -> None:
    return None


class LoopWatch:
    """asyncwatch attached to one loop: its chained hooks and its probe."""

    def __init__(self, engine: Engine, loop: asyncio.AbstractEventLoop, settings: Settings) -> None:
        self.engine = engine
        self.settings = settings
        self.loop_ref = weakref.ref(loop)
        self._detect = settings.detect
        observer = engine.observer_for(loop, settings)
        # The task factory runs for every task: only when something needs it
        # (detect=["slow_callback"] alone costs tasks nothing).
        factory = None
        if observer is not None or self._detect & _TASK_KINDS:
            factory = TaskFactory(loop.get_task_factory(), loop, observer)
        handler = ExceptionHandler(self, loop.get_exception_handler())
        # Held weakly: the loop holds both (its task factory and exception
        # handler), and what they chain may refer to the loop (a bound method
        # of an object that keeps it).  From here, a value of the
        # WeakKeyDictionaries keyed by the loop, a strong reference would
        # keep the loop, and all it refers to, alive for ever.
        self._factory: Callable[[], TaskFactory | None] = weakref.ref(factory) if factory else _nothing
        self._handler = weakref.ref(handler)
        self.probe: LoopProbe | None = None
        # The thread running the loop, as last known; a loop is nearly always
        # run by the thread that makes it, which is the first guess.
        self.thread: str | None = None
        self.thread = self._loop_thread(loop) or threading.current_thread().name
        if factory is not None:
            loop.set_task_factory(factory.function)
        watches[loop] = self
        loop.set_exception_handler(handler)
        if FindingKind.SLOW_CALLBACK in self._detect:
            self.probe = LoopProbe(loop, settings.slow_callback_s, self.emit)
            self.probe.start(loop)
            engine.watchdog.add(self.probe)

    @property
    def factory(self) -> TaskFactory | None:
        """The task factory asyncwatch gave the loop, while anything holds it."""
        return self._factory()

    @property
    def handler(self) -> ExceptionHandler | None:
        """The exception handler asyncwatch gave the loop, while anything holds it."""
        return self._handler()

    def detects(self, kind: FindingKind) -> bool:
        return kind in self._detect

    def emit(self, finding: Finding) -> None:
        if finding.kind in self._detect:
            if finding.thread is None:
                finding = dataclasses.replace(finding, thread=self._loop_thread(self.loop_ref()))
            self.engine.emit(finding)

    def _loop_thread(self, loop: asyncio.AbstractEventLoop | None) -> str | None:
        """The name of the thread running *loop*, asked only when a finding is
        made.  Not the current thread: the garbage collector finalizes a task
        (and so reports it) in whichever thread it happens to run."""
        if loop is not None:
            if asyncio.events._get_running_loop() is loop:
                self.thread = threading.current_thread().name
                return self.thread
            ident = getattr(loop, "_thread_id", None)  # asyncio's loops, while they run
            thread = _THREADS.get(ident) if ident is not None else None
            if thread is not None:
                self.thread = thread.name
                return self.thread
        probe = self.probe
        if probe is not None and probe.thread_name is not None:
            # uvloop's, or a loop no longer running: its heartbeat saw the thread.
            self.thread = probe.thread_name
        return self.thread

    def on_exception_context(self, context: Mapping[str, Any]) -> None:
        message = context.get("message")
        if message == DESTROYED_PENDING:
            task = context.get("task")
            if isinstance(task, asyncio.Task) and self.detects(FindingKind.TASK_DESTROYED_PENDING):
                coro = user_coro_of(task)
                hook = self.engine.coroutine_hook
                if hook is not None and coro is not None:
                    # If it never started, CPython also warns that its coroutine
                    # was never awaited (before or after this, depending on the
                    # collector's order): the same mistake, reported once.
                    hook.reported_elsewhere.add(id(coro))
                self.emit(destroyed_pending_finding(task))
                forget(task)
        elif isinstance(message, str) and message.endswith(NEVER_RETRIEVED):
            task = context.get("future")
            exc = context.get("exception")
            if (
                isinstance(task, asyncio.Task)
                and isinstance(exc, BaseException)
                and self.detects(FindingKind.TASK_EXCEPTION_UNRETRIEVED)
            ):
                self.emit(unretrieved_finding(task, exc))
                forget(task)

    def detach(self) -> None:
        """Restore the loop's hooks, or go inert where someone chained on top of us."""
        factory, handler = self.factory, self.handler
        if factory is not None:
            factory.enabled = False
        if handler is not None:
            handler.enabled = False
        loop = self.loop_ref()
        if loop is not None and watches.get(loop) is self:
            del watches[loop]
        if self.probe is not None:
            self.engine.watchdog.remove(self.probe)
        loop = self.loop_ref()
        if loop is None or loop.is_closed():
            return
        try:
            if factory is not None and loop.get_task_factory() is factory.function:
                loop.set_task_factory(factory.previous)
            if handler is not None and loop.get_exception_handler() is handler:
                loop.set_exception_handler(handler.previous)
        except Exception as exc:  # a loop that refuses: stay inert, say so once
            report_internal_error("uninstall", exc)


class Engine:
    """Reporters, the watchdog, global hooks, and the loops being watched."""

    def __init__(
        self,
        settings: Settings,
        reporters: Iterable[Reporter] = (),
        log_fallback: str | None = None,
        *,
        tracer_provider: Any = None,
        meter_provider: Any = None,
    ):
        self.settings = settings
        self.pipeline = Pipeline(limiter=RateLimiter(settings.report_limit) if settings.report_limit else None)
        # OpenTelemetry spans and metrics; inert until a provider is configured.
        self.telemetry: Telemetry | None = None
        if settings.spans != "off" or settings.metrics:
            from ._otel import Telemetry

            self.telemetry = Telemetry(settings, tracer_provider=tracer_provider, meter_provider=meter_provider)
            # First, so that the finding is on its span before it is logged with the span's ids.
            self.pipeline.add(self.telemetry)
        if settings.log:
            if self.telemetry is not None:
                self.pipeline.add(self.telemetry.structlog_reporter(log_fallback))
            else:
                self.pipeline.add(StructlogReporter(fallback=log_fallback))
        if settings.findings:
            try:
                self.pipeline.add(JsonLinesReporter(settings.findings))
            except OSError as exc:
                raise ConfigurationError(
                    f"findings={settings.findings!r}: cannot write the findings file ({exc.strerror}); "
                    "give a path in a writable directory"
                ) from None
        for reporter in reporters:
            self.pipeline.add(reporter)
        self.watchdog = Watchdog()
        # Told about every task's life (OpenTelemetry spans); None costs nothing.
        self.task_observer: TaskObserver | None = None
        self.watches: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, LoopWatch] = weakref.WeakKeyDictionary()
        self._lock = threading.RLock()
        in_forked_child(self, _new_engine_lock)  # attaching a loop, at fork()
        self.coroutine_hook: CoroutineHook | None = None
        if FindingKind.COROUTINE_NEVER_AWAITED in settings.detect:
            self.coroutine_hook = CoroutineHook(self.emit, settings.track_coroutine_origins)
            self.coroutine_hook.install()

    def emit(self, finding: Finding) -> None:
        self.pipeline.emit(finding)

    def observer_for(self, loop: asyncio.AbstractEventLoop, settings: Settings) -> TaskObserver | None:
        """The task observer for a loop being attached: one set on the engine,
        else OpenTelemetry's while it has a provider to send to."""
        if self.task_observer is not None or self.telemetry is None:
            return self.task_observer
        try:
            return self.telemetry.observer_for_loop(loop, settings)
        except Exception as exc:
            report_internal_error("OpenTelemetry", exc)
            self.telemetry = None
            return None

    def attach(self, loop: asyncio.AbstractEventLoop, settings: Settings | None = None) -> LoopWatch:
        with self._lock:
            watch = self.watches.get(loop)
            if watch is None:
                watch = LoopWatch(self, loop, settings or self.settings)
                self.watches[loop] = watch
            return watch

    def is_watching(self, loop: asyncio.AbstractEventLoop) -> bool:
        return loop in self.watches

    def close(self) -> None:
        with self._lock:
            self.watchdog.stop()
            for watch in list(self.watches.values()):
                watch.detach()
            self.watches.clear()
            if self.coroutine_hook is not None:
                self.coroutine_hook.uninstall()
            self.pipeline.close()


# --- Global state department -------------------------------------------------


def _new_engine_lock(engine: Engine) -> None:
    engine._lock = threading.RLock()


class _State:
    """Everything `install()` changed in the interpreter, to undo it."""

    def __init__(self) -> None:
        self.lock = threading.RLock()  # renewed in a forked child
        self.engine: Engine | None = None
        self.explicit: dict[str, Any] = {}
        self.policy: Any = None  # our EventLoopPolicy while it is the current one
        self.policy_base: Any = None
        self.set_running_loop: Callable[[Any], None] | None = None
        self.original_set_running_loop: Callable[[Any], None] | None = None
        self.runner_init: Callable[[Any], None] | None = None  # our asyncio.Runner._lazy_init
        self.original_runner_init: Callable[[Any], None] | None = None
        self.run_until_complete: Callable[[Any, Any], Any] | None = None  # our BaseEventLoop's
        self.original_run_until_complete: Callable[[Any, Any], Any] | None = None
        self.future_loops: Settings | None = None


_state = _State()


def _new_state_lock(state: _State) -> None:
    state.lock = threading.RLock()


# A lock another thread held at fork() (installing) would stay held in the
# child for ever.
in_forked_child(_state, _new_state_lock)


def current_engine() -> Engine | None:
    return _state.engine


def is_installed() -> bool:
    """Return whether asyncwatch is installed in this process."""
    return _state.engine is not None


def _env_settings() -> Settings:
    """``ASYNCWATCH_*`` variables; a bad one (a bad value, an unknown name, a
    findings file that cannot be written) is logged and ignored rather than
    breaking a production start-up (the command line is strict instead)."""

    def warn(variable: str, value: Any, error: str) -> None:
        internal_logger().warning(
            "asyncwatch.bad_environment", variable=variable, value=value, error=error, using="default"
        )

    return Settings.from_env(on_error=warn)


def ensure_engine(
    options: Mapping[str, Any],
    *,
    reporters: Iterable[Reporter] = (),
    log_fallback: str | None = None,
    base: Settings | None = None,
    tracer_provider: Any = None,
    meter_provider: Any = None,
) -> tuple[Engine, Settings]:
    """Start the engine if needed; return it and the settings for *options*."""
    with _state.lock:
        settings = (base or _env_settings()).with_options(options)
        engine = _state.engine
        if engine is None:
            engine = Engine(
                settings,
                reporters,
                log_fallback=log_fallback,
                tracer_provider=tracer_provider,
                meter_provider=meter_provider,
            )
            _state.engine = engine
            _state.explicit = {k: getattr(settings, k) for k in _ENGINE_OPTIONS if k in options}
            return engine, settings
        for name in _ENGINE_OPTIONS:
            if name in options and getattr(settings, name) != getattr(engine.settings, name):
                # Whoever installed first (often `asyncwatch run` or the pytest
                # plugin) owns the process-wide options; a later install()
                # from the program must not break it, so it is told, not failed.
                internal_logger().warning(
                    "asyncwatch.already_installed",
                    option=name,
                    requested=getattr(settings, name),
                    kept=getattr(engine.settings, name),
                    note="call asyncwatch.uninstall() first to change process-wide options",
                )
        for name, provider in (("tracer_provider", tracer_provider), ("meter_provider", meter_provider)):
            kept = getattr(engine.telemetry, name, None)
            if provider is not None and provider is not kept:
                internal_logger().warning(
                    "asyncwatch.already_installed",
                    option=name,
                    requested=repr(provider),
                    kept=repr(kept),
                    note="call asyncwatch.uninstall() first to change process-wide options",
                )
        for reporter in reporters:
            engine.pipeline.add(reporter)
        return engine, settings


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


def attach_loop(loop: asyncio.AbstractEventLoop, options: Mapping[str, Any]) -> LoopWatch:
    """Watch *loop* (the loop factory and the policy use this).

    Without options, a loop gets the settings `install()` was given.
    """
    with _state.lock:
        engine = _state.engine
        if engine is not None and not options:
            return engine.attach(loop, _state.future_loops or engine.settings)
        engine, settings = ensure_engine(options)
        return engine.attach(loop, settings)


def watch_future_loops(settings: Settings) -> None:
    """`_watch_future_loops` under the install lock (the pytest plugin's way in)."""
    with _state.lock:
        _watch_future_loops(settings)


def _watch_future_loops(settings: Settings) -> None:
    """Watch loops that do not exist yet: through the event-loop policy (it
    makes the loops of ``asyncio.run()`` and ``new_event_loop()``, uvloop's
    included), and when any asyncio loop starts running (loops made by hand
    or by a ``loop_factory``)."""
    from ._policy import EventLoopPolicy, get_policy, set_policy

    _state.future_loops = settings
    if _state.policy is None:
        base = get_policy()
        if not isinstance(base, EventLoopPolicy):
            policy = EventLoopPolicy(base)
            set_policy(policy)
            _state.policy = policy
            _state.policy_base = base
    if _state.set_running_loop is None:
        original = asyncio.events._set_running_loop

        def _set_running_loop(loop: Any) -> None:
            original(loop)
            _watch_starting_loop(loop)

        _state.original_set_running_loop = original
        _state.set_running_loop = _set_running_loop
        asyncio.events._set_running_loop = _set_running_loop
    runner = asyncio.runners.Runner
    if _state.runner_init is None and hasattr(runner, "_lazy_init"):
        # uvloop keeps its own reference to asyncio's _set_running_loop, so a
        # uvloop loop given to asyncio.Runner (uvloop.run() does that) never
        # goes through the hook above: catch it as the Runner makes it,
        # before the Runner creates the program's main task on it.
        original_init = runner._lazy_init

        def _lazy_init(self: Any) -> None:
            original_init(self)
            _watch_starting_loop(getattr(self, "_loop", None))

        _state.original_runner_init = original_init
        _state.runner_init = _lazy_init
        setattr(runner, "_lazy_init", _lazy_init)  # noqa: B010 - private in typeshed
    base_loop = asyncio.base_events.BaseEventLoop
    if _state.run_until_complete is None:
        # loop.run_until_complete(coro) makes the task for coro before the
        # loop starts running: attach a loop made by hand first, so that
        # task is ours too.
        original_ruc = base_loop.run_until_complete

        def run_until_complete(self: Any, future: Any) -> Any:
            if not self.is_closed():
                _watch_starting_loop(self)
            return original_ruc(self, future)

        _state.original_run_until_complete = original_ruc
        _state.run_until_complete = run_until_complete
        setattr(base_loop, "run_until_complete", run_until_complete)  # noqa: B010


def _watch_starting_loop(loop: Any) -> None:
    """Attach a loop about to run (the loop-start hooks), unless it is watched."""
    engine = _state.engine
    if loop is not None and engine is not None and _state.future_loops is not None:
        try:
            if not engine.is_watching(loop):
                engine.attach(loop, _state.future_loops)
        except Exception as exc:
            report_internal_error("loop start hook", exc)


def uninstall() -> None:
    """Stop watching and restore every hook asyncwatch changed.

    Hooks that another library wrapped after asyncwatch are left in place
    with asyncwatch's part made inert, so uninstall order never matters.
    """
    from ._policy import get_policy, set_policy

    with _state.lock:
        engine = _state.engine
        if _state.set_running_loop is not None:
            if asyncio.events._set_running_loop is _state.set_running_loop:
                asyncio.events._set_running_loop = _state.original_set_running_loop  # type: ignore[assignment]
            _state.set_running_loop = None
        if _state.runner_init is not None:
            if getattr(asyncio.runners.Runner, "_lazy_init", None) is _state.runner_init:
                setattr(asyncio.runners.Runner, "_lazy_init", _state.original_runner_init)  # noqa: B010
            _state.runner_init = None
        if _state.run_until_complete is not None:
            base_loop = asyncio.base_events.BaseEventLoop
            if base_loop.__dict__.get("run_until_complete") is _state.run_until_complete:
                setattr(base_loop, "run_until_complete", _state.original_run_until_complete)  # noqa: B010
            _state.run_until_complete = None
        if _state.policy is not None:
            if get_policy() is _state.policy:
                set_policy(_state.policy_base)
            else:
                _state.policy.inert = True
            _state.policy = None
            _state.policy_base = None
        _state.future_loops = None
        _state.engine = None
        _state.explicit = {}
        if engine is not None:
            engine.close()
        forget_internal_errors()

