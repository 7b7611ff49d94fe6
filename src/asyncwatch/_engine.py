"""The engine: one per process, shared by all four entry points.

Global state department.  `install()`, the event-loop policy, the loop
factory and the command line all end in `Engine.attach(loop)`.  The engine
owns the pipeline (outputs) and the detectors; for each loop it builds, once,
the `Hooks` table of the detectors that loop's settings ask for, and gives
the loop a chained task factory and exception handler that dispatch to it.
A detector whose hook raises is disabled here, for every loop, said once.
"""

from __future__ import annotations

import asyncio
import os
import threading
import weakref
from collections.abc import Callable, Iterable, Mapping
from typing import TYPE_CHECKING, Any

from ._core import loops
from ._core.detector import CoroutineClaims, Detector, DetectorContext, Hooks, WatchedLoop, overrides, watches
from ._core.findings import Finding, FindingKind
from ._core.runtime import in_forked_child, internal_logger, report_internal_error
from ._core.settings import PROCESS_OPTIONS, ConfigurationError, Settings
from ._core.tasks import TaskFactory
from ._detectors import BUILTIN, PROCESS_WIDE
from ._outputs.jsonl import JsonLinesReporter
from ._outputs.log import StructlogReporter
from ._outputs.pipeline import Pipeline, RateLimiter, Reporter

if TYPE_CHECKING:
    from ._outputs.otel.telemetry import Telemetry

__all__ = ["Engine", "LoopWatch", "attach_loop", "current_engine", "ensure_engine", "is_installed"]


def _nothing() -> None:
    return None


class ExceptionHandler:
    """The loop's exception handler while asyncwatch watches it; chains *previous*.

    asyncio reports a pending task destroyed, and a task exception never
    retrieved, through the loop's exception handler from the task's
    finalizer.  This one hands the context to the detectors' hooks, then
    always on, unchanged, so the program's own handler (or asyncio's
    default logging) sees exactly what it saw before.
    """

    __slots__ = ("__weakref__", "enabled", "previous", "watch")

    def __init__(self, watch: LoopWatch, previous: Callable[..., Any] | None) -> None:
        self.watch = watch
        self.previous = previous
        self.enabled = True

    def __call__(self, loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        if self.enabled:
            self.watch.hooks.dispatch("exception_context", self.watch, context)
        previous = self.previous
        if previous is None:
            loop.default_exception_handler(context)
        else:
            previous(loop, context)


class LoopWatch(WatchedLoop):
    """asyncwatch attached to one loop: its hooks table and its chained hooks."""

    def __init__(self, engine: Engine, loop: asyncio.AbstractEventLoop, settings: Settings) -> None:
        self.engine = engine
        hooks = Hooks(engine.detectors_for(loop, settings), engine.disable)
        super().__init__(loop, settings, engine.emit, hooks)
        # The task factory runs for every task: only when a detector needs it
        # (detect=["slow_callback"] alone costs tasks nothing), and told
        # about each task only when a detector observes tasks (spans).
        factory = None
        if hooks.needs_task_factory:
            factory = TaskFactory(loop.get_task_factory(), loop, hooks if hooks.observes_tasks else None)
        handler = ExceptionHandler(self, loop.get_exception_handler())
        # Held weakly: the loop holds both (its task factory and exception
        # handler), and what they chain may refer to the loop (a bound method
        # of an object that keeps it).  From here, a value of the
        # WeakKeyDictionary keyed by the loop, a strong reference would keep
        # the loop, and all it refers to, alive for ever.
        self._factory: Callable[[], TaskFactory | None] = weakref.ref(factory) if factory else _nothing
        self._handler = weakref.ref(handler)
        if factory is not None:
            loop.set_task_factory(factory.function)
        watches[loop] = self
        loop.set_exception_handler(handler)
        hooks.dispatch("loop_attached", self)

    @property
    def factory(self) -> TaskFactory | None:
        """The task factory asyncwatch gave the loop, while anything holds it."""
        return self._factory()

    @property
    def handler(self) -> ExceptionHandler | None:
        """The exception handler asyncwatch gave the loop, while anything holds it."""
        return self._handler()

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
        self.hooks.dispatch("loop_detached", self)
        if loop is None or loops.is_closed(loop):
            return
        try:
            if factory is not None and loop.get_task_factory() is factory.function:
                loop.set_task_factory(factory.previous)
            if handler is not None and loop.get_exception_handler() is handler:
                loop.set_exception_handler(handler.previous)
        except Exception as exc:  # a loop that refuses: stay inert, say so once
            report_internal_error("uninstall", exc)


class Engine:
    """The pipeline, the detectors, and the loops being watched."""

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
        #: The process that made it: a forked child's copy holds the parent's
        #: tasks too, which the parent reports (`report_survivors`).
        self.pid = os.getpid()
        self.pipeline = Pipeline(limiter=RateLimiter(settings.report_limit) if settings.report_limit else None)
        # OpenTelemetry spans and metrics; inert until a provider is configured.
        self.telemetry: Telemetry | None = None
        if settings.spans != "off" or settings.metrics:
            from ._outputs.otel.telemetry import Telemetry

            self.telemetry = Telemetry(settings, tracer_provider=tracer_provider, meter_provider=meter_provider)
            # An enricher runs before every reporter: the finding is on its
            # span, with the span's ids, before it is logged.
            self.pipeline.add_enricher(self.telemetry.place)
            self.pipeline.add(self.telemetry)  # counts findings for the metrics
        if settings.log:
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
        self._lock = threading.RLock()
        in_forked_child(self, _new_engine_lock)  # attaching a loop, at fork()
        self._context = DetectorContext(settings, self.emit, CoroutineClaims(), self.disable)
        # The built-in detectors, made and installed when first needed.
        self._detectors: dict[FindingKind, Detector] = {}
        # Detectors registered with add_detector(), for every loop.
        self._added: list[Detector] = []
        self._disabled: set[int] = set()
        for kind in PROCESS_WIDE & settings.detect:
            self.detector(kind)

    def emit(self, finding: Finding) -> None:
        self.pipeline.emit(finding)

    # -- detectors ------------------------------------------------------------------

    def detector(self, kind: FindingKind) -> Detector:
        """The built-in detector of *kind*, installed on first use."""
        with self._lock:
            detector = self._detectors.get(kind)
            if detector is None:
                detector = BUILTIN[kind]()
                self._install(detector)
                self._detectors[kind] = detector
            return detector

    def add_detector(self, detector: Detector) -> None:
        """Register *detector* for every loop attached from now on.

        Its hooks run beside the built-in detectors'; it is installed now and
        uninstalled with the engine.
        """
        with self._lock:
            self._install(detector)
            self._added.append(detector)

    def _install(self, detector: Detector) -> None:
        try:
            detector.install(self._context)
        except Exception as exc:
            self.disable(detector, exc)

    def detectors_for(self, loop: asyncio.AbstractEventLoop, settings: Settings) -> list[Detector]:
        """The detectors a loop being attached with *settings* dispatches to, in order."""
        # Process-wide detectors follow the engine's settings only (a loop
        # asking for never-awaited coroutines does not hook warnings for the
        # whole process); they have no loop hooks anyway.
        detectors = [self.detector(kind) for kind in BUILTIN if kind in settings.detect and kind not in PROCESS_WIDE]
        detectors += [d for kind, d in list(self._detectors.items()) if kind in PROCESS_WIDE & settings.detect]
        detectors += self._added
        tracer = self._task_tracer_for(loop, settings)
        if tracer is not None:
            # First: in notable mode a task destroyed while pending, or whose
            # exception was never retrieved, gets its span from the loop's
            # exception handler context before the finding about it is placed.
            detectors.insert(0, tracer)
        return [d for d in detectors if id(d) not in self._disabled]

    def _task_tracer_for(self, loop: asyncio.AbstractEventLoop, settings: Settings) -> Detector | None:
        """OpenTelemetry's task tracer, while it has a provider to send to."""
        if self.telemetry is None:
            return None
        try:
            return self.telemetry.observer_for_loop(loop, settings)
        except Exception as exc:
            report_internal_error("OpenTelemetry", exc)
            self.telemetry = None
            return None

    def disable(self, detector: Detector, exc: Exception) -> None:
        """*detector* raised: stop dispatching to it on every loop; say so once.

        The one place a detector's failure is handled: hooks dispatched
        through `Hooks`, and failures a detector meets on its own
        (`DetectorContext.failed`), both end here.
        """
        self._disabled.add(id(detector))
        for watch in self._watches():
            watch.hooks.without(detector)
        report_internal_error(detector.name, exc)

    # -- loops ----------------------------------------------------------------------

    def attach(self, loop: asyncio.AbstractEventLoop, settings: Settings | None = None) -> LoopWatch:
        with self._lock:
            watch = watches.get(loop)
            if not isinstance(watch, LoopWatch) or watch.engine is not self:
                watch = LoopWatch(self, loop, settings or self.settings)
            return watch

    def is_watching(self, loop: asyncio.AbstractEventLoop) -> bool:
        watch = watches.get(loop)
        return isinstance(watch, LoopWatch) and watch.engine is self

    @property
    def watches(self) -> dict[asyncio.AbstractEventLoop, LoopWatch]:
        """The loops this engine watches (a snapshot)."""
        return {loop: w for loop, w in list(watches.items()) if isinstance(w, LoopWatch) and w.engine is self}

    def _watches(self) -> list[LoopWatch]:
        return list(self.watches.values())

    def flush_detectors(self) -> None:
        """Have every detector report what it has in progress (exit, a signal)."""
        for detector in [*self._detectors.values(), *self._added]:
            try:
                detector.flush()
            except Exception as exc:
                self.disable(detector, exc)

    def report_survivors(self) -> None:
        """The program is over: have the detectors report what it left alive
        (`Detector.at_exit`), which Python reports only while it clears the
        modules, asyncwatch's among them."""
        detectors = [d for d in [*self._detectors.values(), *self._added] if overrides(d, "at_exit")]
        if not detectors or os.getpid() != self.pid:
            return
        from ._core.survivors import find_survivors  # at exit only: nothing at import

        survivors = find_survivors()
        try:
            for detector in detectors:
                try:
                    detector.at_exit(survivors)
                except Exception as exc:
                    self.disable(detector, exc)
        finally:
            survivors.tasks.clear()  # never a reference to the program's tasks past this
            survivors.coroutines.clear()

    def close(self) -> None:
        with self._lock:
            for watch in self._watches():
                watch.detach()
            for detector in [*self._detectors.values(), *self._added]:
                try:
                    detector.uninstall()
                except Exception as exc:
                    report_internal_error(detector.name, exc)
            self.pipeline.close()


def _new_engine_lock(engine: Engine) -> None:
    engine._lock = threading.RLock()


# --- Global state department -------------------------------------------------


class _State:
    """The engine of this process and what install() was asked to watch."""

    def __init__(self) -> None:
        self.lock = threading.RLock()  # renewed in a forked child
        self.engine: Engine | None = None
        #: The settings of loops that do not exist yet (install() before any loop).
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
            return engine, settings
        for name in PROCESS_OPTIONS:
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


def attach_loop(loop: asyncio.AbstractEventLoop, options: Mapping[str, Any]) -> LoopWatch:
    """Watch *loop* (the loop factory and the policy use this).

    Without options, a loop gets the settings `install()` was given.
    """
    with _state.lock:
        engine = _state.engine
        if engine is not None and not options:
            return engine.attach(loop, _state.future_loops or engine.settings)
        engine, settings = ensure_engine(options)
        watch = watches.get(loop)
        if (
            isinstance(watch, LoopWatch)
            and watch.engine is engine
            and watch.settings != settings
            and not loops.is_running(loop)
        ):
            # Attached a moment ago with install()'s settings: the base
            # factory (asyncio.new_event_loop) went through the policy that
            # install() set.  The loop factory's own options win: a
            # loop_factory(..., slow_callback_ms=50) was watched at 100 ms.
            watch.detach()
        return engine.attach(loop, settings)
