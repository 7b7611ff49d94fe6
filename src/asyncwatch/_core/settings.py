"""One `Settings` object; the ``ASYNCWATCH_*`` names and their parsing in one place.

Every option of `install()`, the loop factory, the policy and the command
line resolves here, so an unknown name or a bad value gets the same error
wherever it came from: the option, the value, and what is accepted (with a
"did you mean" where a close name exists).
"""

from __future__ import annotations

import difflib
import math
import os
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, fields, replace
from typing import Any

from .findings import FindingKind

__all__ = ["ENV_VARS", "ConfigurationError", "Settings"]


class ConfigurationError(ValueError):
    """An option or environment variable has a value asyncwatch cannot use."""


ALL_KINDS: frozenset[FindingKind] = frozenset(FindingKind)

#: Environment variable for each option of `install()` (and of the command line).
ENV_VARS: Mapping[str, str] = {
    "slow_callback_ms": "ASYNCWATCH_SLOW_CALLBACK_MS",
    "detect": "ASYNCWATCH_DETECT",
    "findings": "ASYNCWATCH_FINDINGS",
    "track_coroutine_origins": "ASYNCWATCH_TRACK_COROUTINE_ORIGINS",
    "log": "ASYNCWATCH_LOG",
    "spans": "ASYNCWATCH_SPANS",
    "spans_min_duration_ms": "ASYNCWATCH_SPANS_MIN_DURATION_MS",
    "metrics": "ASYNCWATCH_METRICS",
    "report_limit": "ASYNCWATCH_REPORT_LIMIT",
}

#: Environment variable for each option that only ``asyncwatch run`` has (see `RunSettings`).
RUN_ENV_VARS: Mapping[str, str] = {
    "loop": "ASYNCWATCH_LOOP",
    "fail_on_findings": "ASYNCWATCH_FAIL_ON_FINDINGS",
    "log_format": "ASYNCWATCH_LOG_FORMAT",
    "summary": "ASYNCWATCH_SUMMARY",
    "otlp": "ASYNCWATCH_OTLP",
    "children": "ASYNCWATCH_CHILDREN",
}

#: Set by ``asyncwatch run`` for its child processes (a JSON object: where
#: their findings go); private, but a known name.
RUN_MARKER = "ASYNCWATCH_RUN"

#: Every ``ASYNCWATCH_*`` name asyncwatch reads; any other is a typo.
KNOWN_ENV_VARS: frozenset[str] = frozenset([*ENV_VARS.values(), *RUN_ENV_VARS.values(), RUN_MARKER])

#: The values of the ``spans`` option (see `Settings`).
SPAN_MODES: tuple[str, ...] = ("notable", "all", "off")
#: The values of ``asyncwatch run --loop``.
LOOPS: tuple[str, ...] = ("asyncio", "uvloop")
#: The values of ``asyncwatch run --log-format``.
LOG_FORMATS: tuple[str, ...] = ("console", "json", "off")

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off", ""}

#: Told about a bad value instead of raising: (name to blame, value, message).
ErrorHandler = Callable[[str, Any, str], None]


@dataclass(frozen=True, slots=True)
class Settings:
    """What asyncwatch watches for and where findings go.

    * ``slow_callback_ms``: a callback or task step holding the loop at least
      this long is a ``slow_callback`` (default 100).
    * ``detect``: the finding kinds to detect (default: all five).
    * ``findings``: a JSON Lines file to write each finding to, or None.
    * ``track_coroutine_origins``: record where every coroutine is created
      (exact ``coroutine_never_awaited`` sites; costs time on every coroutine,
      so it is meant for tests and debugging).
    * ``log``: emit each finding as a structlog event on the ``asyncwatch``
      logger (default True).
    * ``spans``: OpenTelemetry spans for tasks: ``"off"`` (default), ``"notable"`` (only
      tasks with a finding, an exception, a cancellation, or a life of at
      least ``spans_min_duration_ms``) or ``"all"`` (every task).  Off by
      default: any mode but "off" times every step of every task.
      Spans go to the application's tracer provider; with none configured,
      asyncwatch does not trace at all.
    * ``spans_min_duration_ms``: how long a task must live to be notable
      (default 1000).
    * ``metrics``: OpenTelemetry metrics (loop lag, tasks, findings) to the
      application's meter provider, when it configured one (default False;
      they too time every task).
    * ``report_limit``: at most this many findings of one kind at one site
      are reported one by one; after that, one a minute, which says how many
      like it were held back (default 10; 0: no limit).  Counting (the exit
      summary, the test helpers) always sees every finding.
    """

    slow_callback_ms: float = 100.0
    detect: frozenset[FindingKind] = ALL_KINDS
    findings: str | None = None
    track_coroutine_origins: bool = False
    log: bool = True
    spans: str = "off"
    spans_min_duration_ms: float = 1000.0
    metrics: bool = False
    report_limit: int = 10

    @property
    def slow_callback_s(self) -> float:
        return self.slow_callback_ms / 1000.0

    def with_options(self, options: Mapping[str, Any]) -> Settings:
        """Return a copy with *options* (keyword arguments) validated and applied."""
        known = [f.name for f in fields(self)]
        changes: dict[str, Any] = {}
        for name, value in options.items():
            if name not in known:
                raise ConfigurationError(
                    f"unknown asyncwatch option {name!r}{did_you_mean(name, known)}; "
                    f"valid options are: {', '.join(sorted(known))}"
                )
            changes[name] = _PARSERS[name](value, name)
        return replace(self, **changes)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, *, on_error: ErrorHandler | None = None) -> Settings:
        """Read the ``ASYNCWATCH_*`` variables.

        A bad value, or an ``ASYNCWATCH_*`` name asyncwatch does not know,
        raises `ConfigurationError`; with *on_error*, it is passed there
        instead and ignored (the default stays).
        """
        env = os.environ if environ is None else environ
        changes: dict[str, Any] = {}
        for var, message in unknown_variables(env):
            _fail(on_error, var, env[var], message)
        for name, var in ENV_VARS.items():
            raw = env.get(var)
            if raw is None:
                continue
            try:
                changes[name] = _PARSERS[name](raw, var)
            except ConfigurationError as exc:
                _fail(on_error, var, raw, str(exc))
        return replace(cls(), **changes)


@dataclass(frozen=True, slots=True)
class RunSettings:
    """The options only ``asyncwatch run`` has (each with its ``ASYNCWATCH_*`` variable).

    * ``loop``: the event loop the program's ``asyncio.run()`` gets (`LOOPS`).
    * ``fail_on_findings``: exit with status 3 if anything was found.
    * ``log_format``: how findings are rendered on stderr (`LOG_FORMATS`).
    * ``summary``: print the summary on stderr at exit.
    * ``otlp``: set up the OpenTelemetry SDK with OTLP/HTTP exporters.
    * ``children``: watch the child Python processes the program starts.
    """

    loop: str = "asyncio"
    fail_on_findings: bool = False
    log_format: str = "console"
    summary: bool = True
    otlp: bool = False
    children: bool = True


def resolve_run(
    given: Mapping[str, tuple[Any, str]],
    environ: Mapping[str, str],
    *,
    on_error: ErrorHandler | None = None,
) -> tuple[Settings, RunSettings]:
    """Resolve ``asyncwatch run``'s options: *given* (option name -> value and
    the name to blame, e.g. ``"--slow-callback-ms"``) first, else the variable.

    A bad value, or an unknown ``ASYNCWATCH_*`` name, raises
    `ConfigurationError`, or is passed to *on_error* and ignored.
    """
    for var, message in unknown_variables(environ):
        _fail(on_error, var, environ[var], message)
    changes: dict[str, Any] = {}
    run_changes: dict[str, Any] = {}
    for name, var in [*ENV_VARS.items(), *RUN_ENV_VARS.items()]:
        if name in given:
            value, blame = given[name]
        elif var in environ:
            value, blame = environ[var], var
        else:
            continue
        try:
            parsed = _PARSERS[name](value, blame)
        except ConfigurationError as exc:
            _fail(on_error, blame, value, str(exc))
            continue
        (changes if name in ENV_VARS else run_changes)[name] = parsed
    run = replace(RunSettings(), **run_changes)
    if run.otlp:
        # Asking for OTLP is asking for telemetry: notable spans and metrics,
        # unless the option or its variable says otherwise.
        changes.setdefault("spans", "notable")
        changes.setdefault("metrics", True)
    return replace(Settings(), **changes), run


def unknown_variables(environ: Mapping[str, str]) -> list[tuple[str, str]]:
    """Each ``ASYNCWATCH_*`` variable asyncwatch does not know, with the error to give."""
    public = sorted(KNOWN_ENV_VARS - {RUN_MARKER})
    unknown = []
    for var in sorted(environ):
        if var.startswith("ASYNCWATCH_") and var not in KNOWN_ENV_VARS:
            message = f"{var} is not an asyncwatch variable{did_you_mean(var, public)}; the variables are: "
            unknown.append((var, message + ", ".join(public)))
    return unknown


def did_you_mean(word: str, candidates: Iterable[str]) -> str:
    """`` (did you mean 'x'?)`` for the closest of *candidates*, or an empty string."""
    close = difflib.get_close_matches(word, list(candidates), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _fail(on_error: ErrorHandler | None, blame: str, value: Any, message: str) -> None:
    if on_error is None:
        raise ConfigurationError(message)
    on_error(blame, value, message)


# --- parsers: each takes the raw value and the name to put in the error ------


def parse_ms(value: Any, name: str) -> float:
    """Parse a positive, finite number of milliseconds; *name* is what the error blames."""
    if isinstance(value, bool):
        raise ConfigurationError(f"{name}={value!r} is not a number of milliseconds; give a number > 0, e.g. 100")
    try:
        ms = float(value)
    except (TypeError, ValueError, OverflowError):
        raise ConfigurationError(
            f"{name}={value!r} is not a number of milliseconds; give a number > 0, e.g. 100"
        ) from None
    if not ms > 0 or math.isinf(ms):
        raise ConfigurationError(f"{name}={value!r} must be a finite number of milliseconds > 0, e.g. 100")
    return ms


def parse_kinds(value: Any, name: str) -> frozenset[FindingKind]:
    """Parse a collection (or comma-separated string) of kind names; "all" means every kind."""
    if isinstance(value, str):
        items: Iterable[Any] = [p.strip() for p in value.split(",") if p.strip()]
    elif isinstance(value, Iterable) and not isinstance(value, bytes | bytearray):
        items = value
    else:
        raise ConfigurationError(
            f"{name}={value!r} must be a list of finding kinds (or a comma-separated string), "
            "e.g. ['slow_callback', 'cancellation_swallowed']"
        )
    kinds: set[FindingKind] = set()
    names = [k.value for k in FindingKind]
    for item in items:
        if item == "all":
            kinds.update(FindingKind)
            continue
        try:
            kinds.add(FindingKind(item))
        except ValueError:
            hint = did_you_mean(item, names) if isinstance(item, str) else ""
            raise ConfigurationError(
                f"{name}: unknown finding kind {item!r}{hint}; valid kinds are: {', '.join(names)} (or 'all')"
            ) from None
    return frozenset(kinds)


def parse_detect(value: Any, name: str) -> frozenset[FindingKind]:
    """`parse_kinds`, refusing a string that names no kind (``ASYNCWATCH_DETECT=``
    would otherwise turn every detector off without a word)."""
    kinds = parse_kinds(value, name)
    if not kinds and isinstance(value, str):
        raise ConfigurationError(
            f"{name}={value!r} names no finding kind; give a comma-separated list of kinds, or 'all' "
            "(to watch nothing, do not install asyncwatch)"
        )
    return kinds


def parse_count(value: Any, name: str) -> int:
    """Parse a whole number >= 0; *name* is what the error blames."""
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise ConfigurationError(f"{name}={value!r} is not a whole number; give one >= 0, e.g. 10")
    try:
        count = int(value)
    except ValueError:
        raise ConfigurationError(f"{name}={value!r} is not a whole number; give one >= 0, e.g. 10") from None
    if count < 0:
        raise ConfigurationError(f"{name}={value!r} must be >= 0 (0 means no limit)")
    return count


def parse_bool(value: Any, name: str) -> bool:
    """Parse a boolean (or 1/0, true/false, yes/no, on/off); *name* is what the error blames."""
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in _TRUE | _FALSE:
        return value.strip().lower() in _TRUE
    if isinstance(value, str):
        raise ConfigurationError(
            f"{name}={value!r} is not a boolean; use one of: 1, 0, true, false, yes, no, on, off"
        )
    raise ConfigurationError(f"{name}={value!r} is not a boolean; give True or False")


def parse_choice(value: Any, name: str, choices: Iterable[str], what: str = "value") -> str:
    """Parse one of *choices* (case and surrounding spaces do not matter)."""
    valid = list(choices)
    choice = value.strip().lower() if isinstance(value, str) else value
    if choice not in valid:
        hint = did_you_mean(choice, valid) if isinstance(choice, str) else ""
        raise ConfigurationError(f"{name}={value!r} is not a valid {what}{hint}; use one of: {', '.join(valid)}")
    return str(choice)


def parse_findings_path(value: Any, name: str) -> str | None:
    """Parse the findings file's path (None or empty: no file) and check that
    it can be written, so that a mistake shows where the option is given."""
    if value is None:
        return None
    try:
        raw: str | bytes = os.fspath(value)
    except TypeError:
        raise ConfigurationError(f"{name}={value!r} must be a file path (a str or os.PathLike)") from None
    path = os.fsdecode(raw)
    if not path:
        return None
    path = os.path.abspath(path)
    check_writable(path, name)
    return path


def check_writable(path: str, name: str) -> None:
    """Raise `ConfigurationError` naming *path* unless a file there can be appended to.

    Opens it to find out (root passes every permission check, but not a
    read-only file system), and removes it again if it did not exist.
    """
    if os.path.isdir(path):
        raise ConfigurationError(
            f"{name}={path!r} is a directory; give a file path, e.g. {os.path.join(path, 'findings.jsonl')!r}"
        )
    directory = os.path.dirname(path)
    if not os.path.isdir(directory):
        raise ConfigurationError(
            f"{name}={path!r}: the directory {directory!r} does not exist; create it, or give a path in an "
            "existing, writable directory"
        )
    existed = os.path.lexists(path)
    try:
        # O_NONBLOCK: a named pipe without a reader fails here rather than hangs.
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | getattr(os, "O_NONBLOCK", 0), 0o666)
    except OSError as exc:
        raise ConfigurationError(
            f"{name}={path!r} cannot be written ({exc.strerror}); give a path in a writable directory"
        ) from None
    os.close(fd)
    if not existed:
        try:
            os.unlink(path)
        except OSError:
            pass


# --- the arguments that are objects, not settings -------------------------------


def check_install_arguments(
    loop: Any = None, reporters: Any = (), tracer_provider: Any = None, meter_provider: Any = None
) -> list[Any]:
    """Check the object arguments of `install()`; return the reporters as a list.

    Wrong ones would otherwise fail later, far from the call (an internal
    error the first time a finding is reported), or half-install asyncwatch.
    """
    if loop is not None:
        if not all(callable(getattr(loop, m, None)) for m in ("set_task_factory", "set_exception_handler")):
            raise ConfigurationError(
                f"loop={loop!r} is not an event loop; pass the loop to watch (e.g. asyncio.get_running_loop()), "
                "or no loop to watch every loop"
            )
        if loop.is_closed():
            raise ConfigurationError(f"loop={loop!r} is closed; pass a loop that has not been closed")
    if isinstance(reporters, str | bytes) or not isinstance(reporters, Iterable):
        raise ConfigurationError(
            f"reporters={reporters!r} must be a list of reporters, e.g. [asyncwatch.JsonLinesReporter('f.jsonl')]"
        )
    checked = list(reporters)
    for i, reporter in enumerate(checked):
        if not callable(getattr(reporter, "report", None)):
            raise ConfigurationError(
                f"reporters[{i}]={reporter!r} has no report(finding) method; give objects that implement "
                "asyncwatch.Reporter"
            )
    for name, provider, method, example in (
        ("tracer_provider", tracer_provider, "get_tracer", "opentelemetry.sdk.trace.TracerProvider()"),
        ("meter_provider", meter_provider, "get_meter", "opentelemetry.sdk.metrics.MeterProvider()"),
    ):
        if provider is not None and (isinstance(provider, type) or not callable(getattr(provider, method, None))):
            raise ConfigurationError(
                f"{name}={provider!r} is not an OpenTelemetry provider (it has no {method}()); "
                f"pass an instance such as {example}, or None for the global one"
            )
    return checked


def check_loop_factory_base(base: Any) -> None:
    """Check the base of `loop_factory()`: something that makes a loop when called."""
    if base is not None and not callable(base):  # a loop class is fine: calling it makes a loop
        raise ConfigurationError(
            f"loop_factory({base!r}): the base must be a function that returns a new event loop, "
            "e.g. asyncio.new_event_loop or uvloop.new_event_loop"
        )


def check_policy_base(base: Any) -> None:
    """Check the base of `EventLoopPolicy()`: an event-loop policy instance."""
    if base is None:
        return
    if isinstance(base, type):
        raise ConfigurationError(
            f"EventLoopPolicy({base.__qualname__}): pass an instance of the policy, "
            f"e.g. EventLoopPolicy({base.__qualname__}()), not the class"
        )
    if not all(callable(getattr(base, m, None)) for m in ("new_event_loop", "get_event_loop", "set_event_loop")):
        raise ConfigurationError(
            f"EventLoopPolicy({base!r}): the base must be an event-loop policy, e.g. uvloop.EventLoopPolicy()"
        )


def _span_mode(value: Any, name: str) -> str:
    return parse_choice(value, name, SPAN_MODES, "span mode")


def _loop(value: Any, name: str) -> str:
    return parse_choice(value, name, LOOPS, "event loop")


def _log_format(value: Any, name: str) -> str:
    return parse_choice(value, name, LOG_FORMATS, "log format")


_PARSERS: dict[str, Callable[[Any, str], Any]] = {
    "slow_callback_ms": parse_ms,
    "detect": parse_detect,
    "findings": parse_findings_path,
    "track_coroutine_origins": parse_bool,
    "log": parse_bool,
    "spans": _span_mode,
    "spans_min_duration_ms": parse_ms,
    "metrics": parse_bool,
    "report_limit": parse_count,
    "loop": _loop,
    "fail_on_findings": parse_bool,
    "log_format": _log_format,
    "summary": parse_bool,
    "otlp": parse_bool,
    "children": parse_bool,
}


def environ_for(settings: Settings, run: RunSettings) -> dict[str, str]:
    """The ``ASYNCWATCH_*`` variables that give *settings* and *run* again
    (for child processes); ``findings`` is left out (see `_children`)."""
    return {
        ENV_VARS["slow_callback_ms"]: repr(settings.slow_callback_ms),
        ENV_VARS["detect"]: ",".join(sorted(k.value for k in settings.detect)),
        ENV_VARS["track_coroutine_origins"]: _flag(settings.track_coroutine_origins),
        ENV_VARS["log"]: _flag(settings.log),
        ENV_VARS["spans"]: settings.spans,
        ENV_VARS["spans_min_duration_ms"]: repr(settings.spans_min_duration_ms),
        ENV_VARS["metrics"]: _flag(settings.metrics),
        ENV_VARS["report_limit"]: str(settings.report_limit),
        RUN_ENV_VARS["loop"]: run.loop,
        RUN_ENV_VARS["log_format"]: run.log_format,
        RUN_ENV_VARS["otlp"]: _flag(run.otlp),
    }


def _flag(value: bool) -> str:
    return "1" if value else "0"
