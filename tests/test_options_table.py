"""Every option is declared once, in the options table; what derives from it agrees."""

from __future__ import annotations

import dataclasses

import pytest

from asyncwatch import ConfigurationError, FindingKind, Settings
from asyncwatch._core.settings import OPTIONS, PROCESS_OPTIONS, RunSettings, environ_for, resolve_run


def test_every_settings_field_is_one_row_of_the_table():
    fields = [f.name for f in dataclasses.fields(Settings)] + [f.name for f in dataclasses.fields(RunSettings)]
    assert sorted(fields) == sorted(o.name for o in OPTIONS)
    assert len({o.name for o in OPTIONS}) == len(OPTIONS)


def test_run_only_options_are_the_fields_of_run_settings():
    assert {o.name for o in OPTIONS if o.scope == "run"} == {f.name for f in dataclasses.fields(RunSettings)}
    assert set(PROCESS_OPTIONS) | {"slow_callback_ms", "detect"} == {f.name for f in dataclasses.fields(Settings)}


@pytest.mark.parametrize("option", OPTIONS, ids=lambda o: o.name)
def test_each_variable_is_read_and_a_bad_value_blames_it(option):
    """``ASYNCWATCH_<NAME>`` reaches the option's parser, and its error names the variable."""
    bad = "/nonexistent-dir/x.jsonl" if option.name == "findings" else "not-a-value"
    with pytest.raises(ConfigurationError, match=option.variable):
        resolve_run({}, {option.variable: bad})


@pytest.mark.parametrize("option", [o for o in OPTIONS if o.flag], ids=lambda o: o.name)
def test_each_flag_is_on_the_command_line(option):
    from asyncwatch._cli import _parsers

    _, run = _parsers()
    flags = {flag for action in run._actions for flag in action.option_strings}
    assert option.flag in flags


def test_a_child_gets_back_the_settings_it_inherits():
    """environ_for() and the variables' parsers are inverses, for every inherited option."""
    settings = Settings(
        slow_callback_ms=12.5,
        detect=frozenset({FindingKind.SLOW_CALLBACK, FindingKind.CANCELLATION_SWALLOWED}),
        track_coroutine_origins=True,
        log=False,
        spans="all",
        spans_min_duration_ms=250.0,
        metrics=True,
        report_limit=3,
    )
    run = RunSettings(loop="uvloop", log_format="json", otlp=True)
    again, run_again = resolve_run({}, environ_for(settings, run))
    assert again == settings
    inherited = {o.name for o in OPTIONS if o.scope == "run" and o.inherit is not None}
    assert {name: getattr(run_again, name) for name in inherited} == {name: getattr(run, name) for name in inherited}


@pytest.mark.parametrize(
    ("environ", "metrics"),
    [
        ({}, True),
        ({"OTEL_METRICS_EXPORTER": "otlp"}, True),
        ({"OTEL_METRICS_EXPORTER": " None "}, False),
        ({"OTEL_METRICS_EXPORTER": "none", "ASYNCWATCH_METRICS": "1"}, True),
    ],
)
def test_otlp_turns_metrics_on_unless_opentelemetry_exports_none(environ, metrics):
    """--otlp means notable spans and metrics, but metrics nobody exports
    (``OTEL_METRICS_EXPORTER=none``) are left off: their task counts cost every task something."""
    settings, _ = resolve_run({"otlp": (True, "--otlp")}, environ)
    assert settings.spans == "notable" and settings.metrics is metrics
