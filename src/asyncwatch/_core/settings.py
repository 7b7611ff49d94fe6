"""Options, declared once: the `OPTIONS` table, `Settings`, `RunSettings`.

Each `Option` says its name, what scope it has (one loop, the whole
process, or ``asyncwatch run`` only), how its value is parsed, and how the
command line offers it; its ``ASYNCWATCH_*`` variable, the parser table,
the command line's flags and help, and the environment a child process of
``asyncwatch run`` inherits are all derived from that one row.  Every option
of `install()`, the loop factory, the policy and the command line resolves
here, so an unknown name or a bad value gets the same error wherever it
came from: the option, the value, and what is accepted (with a "did you
mean" where a close name exists).
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields, replace
from typing import Any, Literal

from .findings import FindingKind
from .parsers import (
    ConfigurationError,
    check_install_arguments,
    check_loop_factory_base,
    check_policy_base,
    did_you_mean,
    parse_bool,
    parse_choice,
    parse_count,
    parse_detect,
    parse_findings_path,
    parse_kinds,
    parse_ms,
)

__all__ = [
    "ENV_VARS",
    "OPTIONS",
    "RUN_ENV_VARS",
    "ConfigurationError",
    "Option",
    "RunSettings",
    "Settings",
    "check_install_arguments",
    "check_loop_factory_base",
    "check_policy_base",
    "did_you_mean",
    "parse_bool",
    "parse_kinds",
    "parse_ms",
]


ALL_KINDS: frozenset[FindingKind] = frozenset(FindingKind)

#: Set by ``asyncwatch run`` for its child processes (a JSON object: where
#: their findings go); private, but a known name.
RUN_MARKER = "ASYNCWATCH_RUN"
#: Set (to anything), asyncwatch uses its pure-Python Task and task factory
#: even where its C extension was built; also read by setup.py, which then
#: builds none.  Not an option: it changes what asyncwatch costs, not what it does.
NO_EXTENSIONS = "ASYNCWATCH_NO_EXTENSIONS"


def extension(name: str = "_ctask") -> Any:
    """One of asyncwatch's C extension modules (``_core/_ctask.c``, the
    default, or ``_core/_peek.c``), or None where it was not built (no
    compiler, not CPython, another system) or `NO_EXTENSIONS` is set."""
    if os.environ.get(NO_EXTENSIONS):
        return None
    try:
        return importlib.import_module(f"{__package__}.{name}")
    except ImportError:
        return None


#: The values of the ``spans`` option (see `Settings`).
SPAN_MODES: tuple[str, ...] = ("notable", "all", "off")
#: The values of ``asyncwatch run --loop``.
LOOPS: tuple[str, ...] = ("asyncio", "uvloop")
#: The values of ``asyncwatch run --log-format``.
LOG_FORMATS: tuple[str, ...] = ("console", "json", "off")


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
      default: "all" times every step of every task ("notable" times none).
      Spans go to the application's tracer provider; with none configured,
      asyncwatch does not trace at all.
    * ``spans_min_duration_ms``: how long a task must live to be notable
      (default 1000).
    * ``metrics``: OpenTelemetry metrics (loop lag, tasks, findings) to the
      application's meter provider, when it configured one (default False;
      the task counts cost each task a call when it is freed).
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
        changes.setdefault("metrics", metrics_exported(environ))
    return replace(Settings(), **changes), run


def metrics_exported(environ: Mapping[str, str]) -> bool:
    """Whether OpenTelemetry's ``OTEL_METRICS_EXPORTER`` leaves metrics on
    (``none``: a receiver that takes traces only).  Metrics nobody exports
    are not worth their cost: the task counts cost each task a call."""
    return environ.get("OTEL_METRICS_EXPORTER", "").strip().lower() != "none"


def unknown_variables(environ: Mapping[str, str]) -> list[tuple[str, str]]:
    """Each ``ASYNCWATCH_*`` variable asyncwatch does not know, with the error to give."""
    public = sorted(KNOWN_ENV_VARS - {RUN_MARKER})
    unknown = []
    for var in sorted(environ):
        if var.startswith("ASYNCWATCH_") and var not in KNOWN_ENV_VARS:
            message = f"{var} is not an asyncwatch variable{did_you_mean(var, public)}; the variables are: "
            unknown.append((var, message + ", ".join(public)))
    return unknown


def _fail(on_error: ErrorHandler | None, blame: str, value: Any, message: str) -> None:
    if on_error is None:
        raise ConfigurationError(message)
    on_error(blame, value, message)


# --- the options table ------------------------------------------------------------

#: Where an option applies: ``"loop"`` per loop (`install()`, the loop
#: factory and the policy may differ per loop), ``"process"`` once for the
#: process (the engine's: whoever installs first owns them), ``"run"`` only
#: under ``asyncwatch run`` (`RunSettings`).
Scope = Literal["loop", "process", "run"]


def _flag(value: bool) -> str:
    return "1" if value else "0"


def _kinds_text(kinds: frozenset[FindingKind]) -> str:
    return ",".join(sorted(k.value for k in kinds))


@dataclass(frozen=True, slots=True)
class Option:
    """One option of asyncwatch, declared once.

    *cli* says how ``asyncwatch run`` takes it: ``"value"`` (``--name VALUE``),
    ``"on"`` (``--name`` turns it on), ``"off"`` (``--no-name`` turns it
    off), ``"both"`` (``--name`` / ``--no-name``), or ``""`` (no flag).
    *inherit* turns a value into its variable's text for the children of
    ``asyncwatch run`` (None: children do not get it that way).
    """

    name: str
    scope: Scope
    parse: Callable[[Any, str], Any]
    help: str
    cli: str = "value"
    metavar: str | None = None
    inherit: Callable[[Any], str] | None = None

    @property
    def variable(self) -> str:
        """Its environment variable."""
        return "ASYNCWATCH_" + self.name.upper()

    @property
    def flag(self) -> str | None:
        """Its command-line flag (the one an error blames), or None."""
        if not self.cli:
            return None
        return ("--no-" if self.cli == "off" else "--") + self.name.replace("_", "-")


OPTIONS: tuple[Option, ...] = (
    Option(
        "slow_callback_ms",
        "loop",
        parse_ms,
        "report callbacks holding the loop at least N ms (default 100)",
        metavar="N",
        inherit=repr,
    ),
    Option(
        "detect",
        "loop",
        parse_detect,
        "comma-separated finding kinds to detect (default all)",
        metavar="KINDS",
        inherit=_kinds_text,
    ),
    Option("findings", "process", parse_findings_path, "write each finding as one JSON line to PATH", metavar="PATH"),
    Option(
        "track_coroutine_origins",
        "process",
        parse_bool,
        "record where every coroutine is created, for exact never-awaited sites (slower)",
        cli="on",
        inherit=_flag,
    ),
    Option("log", "process", parse_bool, "log each finding (see --log-format)", cli="", inherit=_flag),
    Option(
        "spans",
        "process",
        lambda value, name: parse_choice(value, name, SPAN_MODES, "span mode"),
        "OpenTelemetry spans for tasks: only notable ones, every task, or none (default; notable with --otlp)",
        metavar="{" + ",".join(SPAN_MODES) + "}",
        inherit=str,
    ),
    Option(
        "spans_min_duration_ms",
        "process",
        parse_ms,
        "a task living at least N ms is notable (default 1000)",
        metavar="N",
        inherit=repr,
    ),
    Option(
        "metrics",
        "process",
        parse_bool,
        "no OpenTelemetry metrics (they are on with --otlp)",
        cli="off",
        inherit=_flag,
    ),
    Option(
        "report_limit",
        "process",
        parse_count,
        "log at most N findings of one kind at one site, then one a minute with a count; "
        "0: no limit (default 10; the summary counts all)",
        metavar="N",
        inherit=str,
    ),
    Option(
        "loop",
        "run",
        lambda value, name: parse_choice(value, name, LOOPS, "event loop"),
        "the event loop to use (default asyncio)",
        metavar="{" + ",".join(LOOPS) + "}",
        inherit=str,
    ),
    Option(
        "fail_on_findings",
        "run",
        parse_bool,
        "exit with status 3 if anything was found and the program itself succeeded "
        "(stalls inside an import, start-up work, are reported but not counted)",
        cli="on",
    ),
    Option(
        "log_format",
        "run",
        lambda value, name: parse_choice(value, name, LOG_FORMATS, "log format"),
        "how findings are logged to stderr when the program's structlog or logging configuration does not take "
        "them (default console)",
        metavar="{" + ",".join(LOG_FORMATS) + "}",
        inherit=str,
    ),
    Option("summary", "run", parse_bool, "do not print the summary on stderr at exit", cli="off"),
    Option(
        "otlp",
        "run",
        parse_bool,
        "unless the program configures OpenTelemetry itself, set up the SDK and send spans and metrics over "
        "OTLP/HTTP (OTEL_EXPORTER_OTLP_ENDPOINT, OTEL_SERVICE_NAME, OTEL_TRACES_SAMPLER ...; needs asyncwatch[otlp])",
        cli="on",
        inherit=_flag,
    ),
    Option(
        "children",
        "run",
        parse_bool,
        "watch the Python processes the program starts, with the same settings (default; "
        "--no-children: this process and its forks only)",
        cli="both",
    ),
)

#: The options by name.
OPTIONS_BY_NAME: Mapping[str, Option] = {o.name: o for o in OPTIONS}
#: Environment variable for each option of `install()` (and of the command line).
ENV_VARS: Mapping[str, str] = {o.name: o.variable for o in OPTIONS if o.scope != "run"}
#: Environment variable for each option that only ``asyncwatch run`` has (see `RunSettings`).
RUN_ENV_VARS: Mapping[str, str] = {o.name: o.variable for o in OPTIONS if o.scope == "run"}
#: The options that belong to the whole process rather than to one loop.
PROCESS_OPTIONS: tuple[str, ...] = tuple(o.name for o in OPTIONS if o.scope == "process")
#: Every ``ASYNCWATCH_*`` name asyncwatch reads; any other is a typo.
KNOWN_ENV_VARS: frozenset[str] = frozenset([*(o.variable for o in OPTIONS), RUN_MARKER, NO_EXTENSIONS])
_PARSERS: Mapping[str, Callable[[Any, str], Any]] = {o.name: o.parse for o in OPTIONS}


def environ_for(settings: Settings, run: RunSettings) -> dict[str, str]:
    """The ``ASYNCWATCH_*`` variables that give *settings* and *run* again
    (for child processes); ``findings`` is left out (see `_children`)."""
    return {
        o.variable: o.inherit(getattr(run if o.scope == "run" else settings, o.name))
        for o in OPTIONS
        if o.inherit is not None
    }


def _check_table() -> None:
    """Every field of `Settings` and `RunSettings` is a row of the table, and
    every row a field (checked at import: a missing row is a bug)."""
    fields_of = {f.name for f in fields(Settings)} | {f.name for f in fields(RunSettings)}
    if fields_of != set(OPTIONS_BY_NAME):
        raise AssertionError(f"options table and settings differ: {sorted(fields_of ^ set(OPTIONS_BY_NAME))}")


_check_table()
