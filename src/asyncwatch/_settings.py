"""One `Settings` object; the ``ASYNCWATCH_*`` names and their parsing in one place.

Every option of `install()`, the loop factory, the policy and the command
line resolves here, so an unknown name or a bad value gets the same error
wherever it came from: the option, the value, and what is accepted.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, fields, replace
from typing import Any

from ._findings import FindingKind

__all__ = ["ENV_VARS", "ConfigurationError", "Settings"]


class ConfigurationError(ValueError):
    """An option or environment variable has a value asyncwatch cannot use."""


ALL_KINDS: frozenset[FindingKind] = frozenset(FindingKind)

#: Environment variable for each option (the CLI-only ones are in `_cli`).
ENV_VARS: Mapping[str, str] = {
    "slow_callback_ms": "ASYNCWATCH_SLOW_CALLBACK_MS",
    "detect": "ASYNCWATCH_DETECT",
    "findings": "ASYNCWATCH_FINDINGS",
    "track_coroutine_origins": "ASYNCWATCH_TRACK_COROUTINE_ORIGINS",
    "log": "ASYNCWATCH_LOG",
    "spans": "ASYNCWATCH_SPANS",
    "spans_min_duration_ms": "ASYNCWATCH_SPANS_MIN_DURATION_MS",
    "metrics": "ASYNCWATCH_METRICS",
}

#: The values of the ``spans`` option (see `Settings`).
SPAN_MODES: tuple[str, ...] = ("notable", "all", "off")

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off", ""}


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
    """

    slow_callback_ms: float = 100.0
    detect: frozenset[FindingKind] = ALL_KINDS
    findings: str | None = None
    track_coroutine_origins: bool = False
    log: bool = True
    spans: str = "off"
    spans_min_duration_ms: float = 1000.0
    metrics: bool = False

    @property
    def slow_callback_s(self) -> float:
        return self.slow_callback_ms / 1000.0

    def enabled(self, kind: FindingKind) -> bool:
        return kind in self.detect

    def with_options(self, options: Mapping[str, Any]) -> Settings:
        """Return a copy with *options* (keyword arguments) validated and applied."""
        known = {f.name for f in fields(self)}
        changes: dict[str, Any] = {}
        for name, value in options.items():
            if name not in known:
                raise ConfigurationError(
                    f"unknown asyncwatch option {name!r}; valid options are: {', '.join(sorted(known))}"
                )
            changes[name] = _PARSERS[name](value, name)
        return replace(self, **changes)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Settings:
        """Read the ``ASYNCWATCH_*`` variables; raise `ConfigurationError` on a bad one."""
        env = os.environ if environ is None else environ
        changes: dict[str, Any] = {}
        for name, var in ENV_VARS.items():
            raw = env.get(var)
            if raw is None:
                continue
            changes[name] = _PARSERS[name](raw, var)
        return replace(cls(), **changes)


# --- parsers: each takes the raw value and the name to put in the error ------


def parse_ms(value: Any, name: str) -> float:
    """Parse a positive, finite number of milliseconds; *name* is what the error blames."""
    if isinstance(value, bool):
        raise ConfigurationError(f"{name}={value!r} is not a number of milliseconds; give a number > 0, e.g. 100")
    try:
        ms = float(value)
    except (TypeError, ValueError):
        raise ConfigurationError(
            f"{name}={value!r} is not a number of milliseconds; give a number > 0, e.g. 100"
        ) from None
    if not ms > 0 or ms == float("inf"):
        raise ConfigurationError(f"{name}={value!r} must be a finite number of milliseconds > 0, e.g. 100")
    return ms


def parse_kinds(value: Any, name: str) -> frozenset[FindingKind]:
    """Parse a collection (or comma-separated string) of kind names; "all" means every kind."""
    if isinstance(value, str):
        items: Iterable[Any] = [p.strip() for p in value.split(",") if p.strip()]
    elif isinstance(value, Iterable):
        items = value
    else:
        raise ConfigurationError(f"{name}={value!r} must be a list of finding kinds")
    kinds: set[FindingKind] = set()
    valid = ", ".join(k.value for k in FindingKind)
    for item in items:
        if item == "all":
            kinds.update(FindingKind)
            continue
        try:
            kinds.add(FindingKind(item))
        except ValueError:
            raise ConfigurationError(
                f"{name}: unknown finding kind {item!r}; valid kinds are: {valid} (or 'all')"
            ) from None
    return frozenset(kinds)


def parse_bool(value: Any, name: str) -> bool:
    """Parse a boolean (or 1/0, true/false, yes/no, on/off); *name* is what the error blames."""
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in _TRUE | _FALSE:
        return value.strip().lower() in _TRUE
    raise ConfigurationError(f"{name}={value!r} is not a boolean; use one of: 1, 0, true, false, yes, no, on, off")


def _span_mode(value: Any, name: str) -> str:
    mode = value.strip().lower() if isinstance(value, str) else value
    if mode not in SPAN_MODES:
        raise ConfigurationError(f"{name}={value!r} is not a span mode; use one of: {', '.join(SPAN_MODES)}")
    return str(mode)


def _path(value: Any, name: str) -> str | None:
    if value is None:
        return None
    try:
        path: str | bytes = os.fspath(value)
    except TypeError:
        raise ConfigurationError(f"{name}={value!r} must be a file path") from None
    if isinstance(path, bytes):
        path = os.fsdecode(path)
    if not path:
        return None
    return os.path.abspath(path)


_PARSERS: dict[str, Any] = {
    "slow_callback_ms": parse_ms,
    "detect": parse_kinds,
    "findings": _path,
    "track_coroutine_origins": parse_bool,
    "log": parse_bool,
    "spans": _span_mode,
    "spans_min_duration_ms": parse_ms,
    "metrics": parse_bool,
}
