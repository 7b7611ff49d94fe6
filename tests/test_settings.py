"""Options and ASYNCWATCH_* variables: one parser, errors that name the value and the fix."""

from __future__ import annotations

import pytest
from structlog.testing import capture_logs

import asyncwatch
from asyncwatch import ConfigurationError, FindingKind, Settings


class TestOptions:
    def test_defaults(self):
        """Out of the box: all five kinds, 100 ms, structlog on, no file, no origin tracking."""
        s = Settings()
        assert s.slow_callback_ms == 100 and s.detect == frozenset(FindingKind)
        assert s.log and s.findings is None and not s.track_coroutine_origins

    @pytest.mark.parametrize("value", [0, -5, "abc", float("nan"), float("inf"), True, None])
    def test_bad_threshold_is_refused_with_an_example(self, value):
        """A threshold that is not a positive number is refused, with what to give instead."""
        with pytest.raises(ConfigurationError, match=r"slow_callback_ms=.*e\.g\. 100"):
            Settings().with_options({"slow_callback_ms": value})

    def test_unknown_option_lists_the_valid_ones(self):
        """A typo gets the list of real option names."""
        with pytest.raises(ConfigurationError, match=r"unknown asyncwatch option 'treshold'.*slow_callback_ms"):
            asyncwatch.install(treshold=5)

    def test_unknown_kind_lists_the_valid_ones(self):
        """detect= with a wrong kind name lists the five kinds."""
        with pytest.raises(ConfigurationError, match=r"unknown finding kind 'slow'.*slow_callback.*task_exception_unretrieved"):
            Settings().with_options({"detect": ["slow"]})

    def test_detect_accepts_names_strings_and_all(self):
        """Kinds can be given as enum members, names, a comma string, or 'all'."""
        assert Settings().with_options({"detect": "slow_callback, task_destroyed_pending"}).detect == {
            FindingKind.SLOW_CALLBACK,
            FindingKind.TASK_DESTROYED_PENDING,
        }
        assert Settings().with_options({"detect": [FindingKind.SLOW_CALLBACK]}).detect == {FindingKind.SLOW_CALLBACK}
        assert Settings().with_options({"detect": "all"}).detect == frozenset(FindingKind)


class TestEnvironment:
    def test_variables_set_the_defaults(self):
        """ASYNCWATCH_* variables are read by Settings.from_env()."""
        s = Settings.from_env(
            {
                "ASYNCWATCH_SLOW_CALLBACK_MS": "25",
                "ASYNCWATCH_DETECT": "slow_callback",
                "ASYNCWATCH_TRACK_COROUTINE_ORIGINS": "yes",
                "ASYNCWATCH_LOG": "off",
            }
        )
        assert s.slow_callback_ms == 25 and s.detect == {FindingKind.SLOW_CALLBACK}
        assert s.track_coroutine_origins and not s.log

    def test_bad_variable_names_itself(self):
        """The error names the variable, the value and what is accepted."""
        with pytest.raises(ConfigurationError, match=r"ASYNCWATCH_LOG='maybe' is not a boolean; use one of"):
            Settings.from_env({"ASYNCWATCH_LOG": "maybe"})

    def test_install_warns_and_keeps_running_on_a_bad_variable(self, monkeypatch):
        """At a production start-up a bad variable is logged, not fatal; the default is used."""
        monkeypatch.setenv("ASYNCWATCH_SLOW_CALLBACK_MS", "fast")
        with capture_logs() as logs:
            handle = asyncwatch.install(log=False)
        assert handle.settings.slow_callback_ms == 100
        [event] = [e for e in logs if e["event"] == "asyncwatch.bad_environment"]
        assert event["variable"] == "ASYNCWATCH_SLOW_CALLBACK_MS" and event["value"] == "fast"

    def test_explicit_options_win_over_variables(self, monkeypatch):
        """An option passed to install() overrides the environment."""
        monkeypatch.setenv("ASYNCWATCH_SLOW_CALLBACK_MS", "20")
        assert asyncwatch.install(slow_callback_ms=70, log=False).settings.slow_callback_ms == 70
