"""Parsing and checking what users give asyncwatch: each error names the
value, the option it was given for, and what is accepted."""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Iterable
from typing import Any

from .findings import FindingKind

__all__ = [
    "ConfigurationError",
    "check_install_arguments",
    "check_loop_factory_base",
    "check_policy_base",
    "check_writable",
    "did_you_mean",
    "parse_bool",
    "parse_choice",
    "parse_count",
    "parse_detect",
    "parse_findings_path",
    "parse_kinds",
    "parse_ms",
]


class ConfigurationError(ValueError):
    """An option or environment variable has a value asyncwatch cannot use."""


_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off", ""}


def did_you_mean(word: str, candidates: Iterable[str]) -> str:
    """`` (did you mean 'x'?)`` for the closest of *candidates*, or an empty string."""
    import difflib  # only for a bad option: ~300 objects the collector would walk for ever (issue 15)

    close = difflib.get_close_matches(word, list(candidates), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


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
        raise ConfigurationError(f"{name}={value!r} is not a boolean; use one of: 1, 0, true, false, yes, no, on, off")
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
        with contextlib.suppress(OSError):
            os.unlink(path)


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
