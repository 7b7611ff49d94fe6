"""The public surface, pinned.

Internals move (issue 11 reshapes the package); what users import, call and
configure must not move with them.  A change here is a deliberate change of
the public API: it goes in CHANGELOG.md, and this file changes with it.
"""

from __future__ import annotations

import dataclasses
import inspect
from importlib import metadata

import pytest

import asyncwatch
import asyncwatch.instrumentation
import asyncwatch.pytest_plugin
import asyncwatch.testing


def test_top_level_all_is_the_documented_surface() -> None:
    assert sorted(asyncwatch.__all__) == [
        "ConfigurationError",
        "EventLoopPolicy",
        "Finding",
        "FindingKind",
        "Installation",
        "JsonLinesReporter",
        "Reporter",
        "Settings",
        "Site",
        "StructlogReporter",
        "__version__",
        "install",
        "is_installed",
        "loop_factory",
        "new_event_loop",
        "uninstall",
    ]
    for name in asyncwatch.__all__:
        assert hasattr(asyncwatch, name), name


def test_testing_module_exports_capture_findings() -> None:
    assert asyncwatch.testing.__all__ == ["capture_findings"]
    assert str(inspect.signature(asyncwatch.testing.capture_findings)) == (
        "(*kinds: 'FindingKind | str') -> 'Iterator[list[Finding]]'"
    )


@pytest.mark.parametrize(
    ("name", "signature"),
    [
        (
            "install",
            "(*, loop: 'asyncio.AbstractEventLoop | None' = None, reporters: 'Iterable[Reporter]' = (), "
            "tracer_provider: 'Any' = None, meter_provider: 'Any' = None, **options: 'Any') -> 'Installation'",
        ),
        ("uninstall", "() -> 'None'"),
        ("is_installed", "() -> 'bool'"),
        ("loop_factory", "(base: 'LoopFactory | None' = None, /, **options: 'Any') -> 'LoopFactory'"),
        ("new_event_loop", "() -> 'asyncio.AbstractEventLoop'"),
        ("EventLoopPolicy", "(base: 'Any' = None, **options: 'Any') -> 'None'"),
    ],
)
def test_entry_point_signatures(name: str, signature: str) -> None:
    assert str(inspect.signature(getattr(asyncwatch, name))) == signature


def test_installation_handle() -> None:
    """The handle install() returns: reporters, settings, uninstall, and a context manager."""
    public = sorted(m for m in vars(asyncwatch.Installation) if not m.startswith("_"))
    assert public == ["add_reporter", "remove_reporter", "settings", "uninstall"]
    assert str(inspect.signature(asyncwatch.Installation.add_reporter)) == "(self, reporter: 'Reporter') -> 'None'"
    assert str(inspect.signature(asyncwatch.Installation.remove_reporter)) == "(self, reporter: 'Reporter') -> 'None'"
    assert hasattr(asyncwatch.Installation, "__enter__")
    assert hasattr(asyncwatch.Installation, "__exit__")


def test_reporter_interface_is_one_method() -> None:
    assert [m for m in vars(asyncwatch.Reporter) if not m.startswith("_")] == ["report"]
    assert str(inspect.signature(asyncwatch.JsonLinesReporter)) == (
        "(path: 'str | os.PathLike[str]', *, append: 'bool' = False, max_queued: 'int' = 10000) -> 'None'"
    )


def test_finding_kinds_are_stable_names() -> None:
    assert [k.value for k in asyncwatch.FindingKind] == [
        "slow_callback",
        "task_destroyed_pending",
        "coroutine_never_awaited",
        "cancellation_swallowed",
        "task_exception_unretrieved",
        "task_leaked",
    ]


def test_finding_and_site_fields_only_grow() -> None:
    """New fields may be added; the existing ones keep their names and order."""
    finding = [f.name for f in dataclasses.fields(asyncwatch.Finding)]
    pinned = ["kind", "message", "site", "stack", "task", "coroutine", "duration_s", "cancelled_by", "created_at"]
    assert [name for name in finding if name in pinned] == pinned
    assert {"time", "pid", "thread", "suppressed"} <= set(finding)
    assert [f.name for f in dataclasses.fields(asyncwatch.Site)] == ["file", "line", "function"]


def test_settings_option_names() -> None:
    names = [f.name for f in dataclasses.fields(asyncwatch.Settings)]
    for option in (
        "slow_callback_ms",
        "detect",
        "findings",
        "track_coroutine_origins",
        "log",
        "spans",
        "spans_min_duration_ms",
        "metrics",
        "report_limit",
    ):
        assert option in names


def test_packaging_entry_points() -> None:
    """The console script, the pytest plugin and the OpenTelemetry instrumentor."""
    eps = metadata.entry_points()
    (script,) = [ep for ep in eps.select(group="console_scripts") if ep.name == "asyncwatch"]
    assert script.value == "asyncwatch._cli:main"
    (plugin,) = [ep for ep in eps.select(group="pytest11") if ep.name == "asyncwatch"]
    assert plugin.load() is asyncwatch.pytest_plugin
    (instrumentor,) = [ep for ep in eps.select(group="opentelemetry_instrumentor") if ep.name == "asyncwatch"]
    assert instrumentor.load() is asyncwatch.instrumentation.AsyncwatchInstrumentor
