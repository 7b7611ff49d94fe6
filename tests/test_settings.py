"""Options and ASYNCWATCH_* variables: one parser, errors that name the value and the fix."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest
from structlog.testing import capture_logs

import asyncwatch
from asyncwatch import ConfigurationError, FindingKind, Settings

pytest_plugins = ["pytester"]

READ_ONLY_CASES = [
    pytest.param(
        "chmod",
        marks=pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() == 0, reason="root writes anywhere"),
    ),
    pytest.param(
        "sysfs",
        marks=pytest.mark.skipif(not os.path.isdir("/sys/kernel"), reason="needs Linux sysfs (read-only to root too)"),
    ),
]


def read_only_path(how: str, tmp_path: Path) -> Path:
    """A findings path that cannot be written: in a read-only directory, or on sysfs
    (where even root cannot create a file)."""
    if how == "sysfs":
        return Path("/sys/asyncwatch-findings.jsonl")
    directory = tmp_path / "ro"
    directory.mkdir()
    directory.chmod(0o500)
    return directory / "f.jsonl"


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
        with pytest.raises(
            ConfigurationError, match=r"unknown finding kind 'slow'.*slow_callback.*task_exception_unretrieved"
        ):
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


# --- every option of the API: a wrong value is an error naming it ---------------


def _closed_loop() -> asyncio.AbstractEventLoop:
    loop = asyncio.new_event_loop()
    loop.close()
    return loop


class _NoReport:
    def __repr__(self) -> str:
        return "<NoReport>"


BAD_OPTIONS = [
    # (options, text the error must contain)
    ({"slow_callback_ms": -5}, "slow_callback_ms=-5 must be a finite number of milliseconds > 0, e.g. 100"),
    ({"slow_callback_ms": float("nan")}, "slow_callback_ms=nan must be a finite number"),
    ({"slow_callback_ms": "1e400"}, "slow_callback_ms='1e400' must be a finite number"),
    ({"slow_callback_ms": [100]}, "slow_callback_ms=[100] is not a number of milliseconds"),
    ({"spans_min_duration_ms": 0}, "spans_min_duration_ms=0 must be a finite number of milliseconds > 0"),
    ({"spans_min_duration_ms": float("inf")}, "spans_min_duration_ms=inf must be a finite number"),
    ({"detect": "slow_calback"}, "unknown finding kind 'slow_calback' (did you mean 'slow_callback'?); valid kinds"),
    ({"detect": ["all", "nope"]}, "detect: unknown finding kind 'nope'; valid kinds are:"),
    ({"detect": 5}, "detect=5 must be a list of finding kinds (or a comma-separated string)"),
    ({"detect": b"slow_callback"}, "detect=b'slow_callback' must be a list of finding kinds"),
    ({"detect": " , "}, "detect=' , ' names no finding kind"),
    ({"findings": 5}, "findings=5 must be a file path (a str or os.PathLike)"),
    ({"track_coroutine_origins": "maybe"}, "track_coroutine_origins='maybe' is not a boolean; use one of: 1, 0"),
    ({"log": 1}, "log=1 is not a boolean; give True or False"),
    ({"metrics": None}, "metrics=None is not a boolean; give True or False"),
    ({"spans": "notible"}, "spans='notible' is not a valid span mode (did you mean 'notable'?); use one of"),
    ({"spans": 3}, "spans=3 is not a valid span mode; use one of: notable, all, off"),
    ({"slow_callback": 50}, "unknown asyncwatch option 'slow_callback' (did you mean 'slow_callback_ms'?)"),
    ({"treshold": 5}, "unknown asyncwatch option 'treshold'; valid options are: detect, findings, log"),
    ({"report_limit": -1}, "report_limit=-1 must be >= 0 (0 means no limit)"),
    ({"report_limit": 2.5}, "report_limit=2.5 is not a whole number; give one >= 0, e.g. 10"),
    ({"report_limit": "ten"}, "report_limit='ten' is not a whole number"),
    ({"report_limit": True}, "report_limit=True is not a whole number"),
    ({"report_limit_per_site": 3}, "unknown asyncwatch option 'report_limit_per_site' (did you mean 'report_limit'?)"),
]


class TestBadOptions:
    @pytest.mark.parametrize(("options", "expected"), BAD_OPTIONS)
    def test_install_refuses_naming_the_value_and_installs_nothing(self, options, expected):
        """install() with a bad option raises ConfigurationError and changes nothing."""
        with pytest.raises(ConfigurationError) as exc_info:
            asyncwatch.install(**options)
        assert expected in str(exc_info.value)
        assert not asyncwatch.is_installed()

    @pytest.mark.parametrize(("options", "expected"), BAD_OPTIONS)
    def test_loop_factory_and_policy_refuse_at_the_call_site(self, options, expected):
        """loop_factory() and EventLoopPolicy() check their options when called, not in the loop."""
        with pytest.raises(ConfigurationError) as exc_info:
            asyncwatch.loop_factory(**options)
        assert expected in str(exc_info.value)
        with pytest.raises(ConfigurationError) as exc_info:
            asyncwatch.EventLoopPolicy(**options)
        assert expected in str(exc_info.value)

    @pytest.mark.parametrize(
        ("arguments", "expected"),
        [
            ({"loop": "x"}, "loop='x' is not an event loop; pass the loop to watch"),
            ({"loop": _closed_loop()}, "is closed; pass a loop that has not been closed"),
            ({"reporters": "abc"}, "reporters='abc' must be a list of reporters"),
            ({"reporters": 5}, "reporters=5 must be a list of reporters"),
            ({"reporters": [_NoReport()]}, "reporters[0]=<NoReport> has no report(finding) method"),
            ({"tracer_provider": object}, "tracer_provider=<class 'object'> is not an OpenTelemetry provider"),
            ({"meter_provider": 5}, "meter_provider=5 is not an OpenTelemetry provider (it has no get_meter())"),
        ],
    )
    def test_install_refuses_objects_that_are_not_what_it_takes(self, arguments, expected):
        """A wrong loop, reporter or provider fails at install(), not later inside the loop."""
        with pytest.raises(ConfigurationError) as exc_info:
            asyncwatch.install(**arguments)
        assert expected in str(exc_info.value)
        assert not asyncwatch.is_installed()

    @pytest.mark.parametrize(
        ("make", "expected"),
        [
            (lambda: asyncwatch.loop_factory("uvloop"), "loop_factory('uvloop'): the base must be a function"),
            (lambda: asyncwatch.loop_factory(5), "loop_factory(5): the base must be a function"),
            (lambda: asyncwatch.EventLoopPolicy("uvloop"), "EventLoopPolicy('uvloop'): the base must be an event-loop"),
            (
                lambda: asyncwatch.EventLoopPolicy(asyncio.DefaultEventLoopPolicy),
                "pass an instance of the policy, e.g. EventLoopPolicy(",
            ),
        ],
    )
    def test_a_wrong_base_is_refused_with_an_example(self, make, expected):
        """The base of a loop factory or policy is checked when it is given."""
        with pytest.raises(ConfigurationError) as exc_info:
            make()
        assert expected in str(exc_info.value)

    def test_a_loop_class_is_a_fine_base(self):
        """A loop class makes a loop when called, so it is accepted."""
        loop = asyncwatch.loop_factory(asyncio.SelectorEventLoop, log=False)()
        try:
            assert isinstance(loop, asyncio.SelectorEventLoop)
        finally:
            loop.close()


class TestUnwritableFindings:
    def test_a_missing_directory_is_an_error_at_install(self, tmp_path):
        """install(findings=...) in a directory that does not exist names it and the fix."""
        path = tmp_path / "no" / "f.jsonl"
        with pytest.raises(ConfigurationError, match=r"the directory '.*no' does not exist; create it"):
            asyncwatch.install(findings=path)
        assert not asyncwatch.is_installed()

    def test_a_directory_is_an_error_suggesting_a_file(self, tmp_path):
        """findings= naming a directory suggests a file in it."""
        with pytest.raises(ConfigurationError, match=r"is a directory; give a file path, e\.g\. '.*findings\.jsonl'"):
            asyncwatch.install(findings=tmp_path)

    @pytest.mark.parametrize("how", READ_ONLY_CASES)
    def test_a_file_that_cannot_be_created_is_an_error(self, tmp_path, how):
        """A findings file the process may not create is refused with the system's reason."""
        path = read_only_path(how, tmp_path)
        with pytest.raises(ConfigurationError, match=r"cannot be written \(.+\); give a path in a writable directory"):
            asyncwatch.install(findings=str(path))

    def test_checking_leaves_no_file_behind(self, tmp_path):
        """Checking that the file can be written does not create it: install() does."""
        path = tmp_path / "f.jsonl"
        Settings().with_options({"findings": path})
        assert not path.exists()


class TestBadEnvironmentAtInstall:
    """install() at a production start-up: a bad variable is a warning, not a crash."""

    @pytest.mark.parametrize(
        ("variable", "value", "error"),
        [
            ("ASYNCWATCH_SLOW_CALLBACK_MS", "-1", "ASYNCWATCH_SLOW_CALLBACK_MS='-1' must be a finite number"),
            ("ASYNCWATCH_SLOW_CALLBACK_MS", "nan", "ASYNCWATCH_SLOW_CALLBACK_MS='nan' must be a finite number"),
            ("ASYNCWATCH_DETECT", "slow_calback", "(did you mean 'slow_callback'?)"),
            ("ASYNCWATCH_DETECT", "", "ASYNCWATCH_DETECT='' names no finding kind"),
            ("ASYNCWATCH_LOG", "loud", "ASYNCWATCH_LOG='loud' is not a boolean"),
            ("ASYNCWATCH_SPANS", "everything", "ASYNCWATCH_SPANS='everything' is not a valid span mode"),
            (
                "ASYNCWATCH_SLOWCALLBACK_MS",
                "5",
                "is not an asyncwatch variable (did you mean 'ASYNCWATCH_SLOW_CALLBACK_MS'?)",
            ),
            ("ASYNCWATCH_FINDINGS", "/nonexistent-dir/f.jsonl", "the directory '/nonexistent-dir' does not exist"),
        ],
    )
    def test_a_bad_variable_is_logged_and_the_default_used(self, monkeypatch, variable, value, error):
        """The warning names the variable, the value and the fix; install() goes on with the default."""
        for key in [k for k in os.environ if k.startswith("ASYNCWATCH_")]:
            monkeypatch.delenv(key)
        monkeypatch.setenv(variable, value)
        with capture_logs() as logs:
            handle = asyncwatch.install(log=False)
        assert handle.settings == Settings(log=False)
        [event] = [e for e in logs if e["event"] == "asyncwatch.bad_environment"]
        assert event["variable"] == variable and event["value"] == value
        assert error in event["error"]

    def test_an_unwritable_findings_variable_starts_without_the_file(self, monkeypatch, tmp_path):
        """ASYNCWATCH_FINDINGS in a missing directory: a warning, no file, findings still logged."""
        monkeypatch.setenv("ASYNCWATCH_FINDINGS", str(tmp_path / "no" / "f.jsonl"))
        with capture_logs() as logs:
            handle = asyncwatch.install()
        assert handle.settings.findings is None
        assert [e["variable"] for e in logs if e["event"] == "asyncwatch.bad_environment"] == ["ASYNCWATCH_FINDINGS"]
        assert not (tmp_path / "no").exists()

    def test_the_strict_reader_raises_for_an_unknown_name(self):
        """Settings.from_env() without on_error raises for a typo in a name, suggesting the right one."""
        with pytest.raises(
            ConfigurationError, match=r"ASYNCWATCH_DETETC is not .* \(did you mean 'ASYNCWATCH_DETECT'\?\)"
        ):
            Settings.from_env({"ASYNCWATCH_DETETC": "all"})


# --- the pytest plugin: options, ini values and the marker -------------------------


class TestPytestPluginUsageErrors:
    @pytest.mark.parametrize(
        ("args", "ini", "marker", "expected"),
        [
            (
                ["--asyncwatch-mode=faill"],
                "",
                "",
                "*--asyncwatch-mode='faill' is not a valid mode (did you mean 'fail'?)*",
            ),
            (
                ["--asyncwatch-slow-callback-ms=nan"],
                "",
                "",
                "*--asyncwatch-slow-callback-ms='nan' must be a finite number*",
            ),
            (["--asyncwatch-slow-callback-ms=-1"], "", "", "*--asyncwatch-slow-callback-ms='-1' must be a finite*"),
            (
                ["--asyncwatch-allow=slow_calback"],
                "",
                "",
                "*unknown finding kind 'slow_calback' (did you mean 'slow_callback'?)*",
            ),
            ([], "asyncwatch_slow_callback_ms = 0", "", "*asyncwatch_slow_callback_ms='0' must be a finite number*"),
            ([], "asyncwatch_log = loud", "", "*asyncwatch_log='loud' is not a boolean*"),
            (
                [],
                "asyncwatch_track_coroutine_origins = sometimes",
                "",
                "*asyncwatch_track_coroutine_origins='sometimes'*",
            ),
            (
                [],
                "asyncwatch_mode = reprot",
                "",
                "*asyncwatch_mode='reprot' is not a valid mode (did you mean 'report'?)*",
            ),
            ([], "", "(slow_callback=5)", "*got slow_callback (did you mean 'slow_callback_ms'?); it takes keyword*"),
            ([], "", "(allow=5)", "*(allow=...)=5 must be a list of finding kinds*"),
            ([], "", "(slow_callback_ms=float('inf'))", "*slow_callback_ms=inf must be a finite number*"),
        ],
    )
    def test_a_bad_value_stops_the_run_naming_it(self, pytester, args, ini, marker, expected):
        """Each bad option, ini value or marker argument is a usage error that names it."""
        pytester.makeini(f"[pytest]\nasyncio_default_fixture_loop_scope = function\n{ini}\n")
        pytester.makepyfile(f"import pytest\n\n@pytest.mark.asyncwatch{marker}\ndef test_it():\n    pass\n")
        result = pytester.runpytest(*args)
        assert result.ret == pytest.ExitCode.USAGE_ERROR
        result.stderr.fnmatch_lines([expected])

    @pytest.mark.parametrize("where", ["missing", "directory"])
    def test_an_unwritable_findings_file_stops_the_run_naming_it(self, pytester, where):
        """--asyncwatch-findings in a missing directory, or naming a directory, is a usage error."""
        path = pytester.path / "no" / "f.jsonl" if where == "missing" else pytester.path
        pytester.makepyfile("def test_it():\n    pass\n")
        result = pytester.runpytest("--asyncwatch", f"--asyncwatch-findings={path}")
        assert result.ret == pytest.ExitCode.USAGE_ERROR
        result.stderr.fnmatch_lines(
            [f"*cannot write the findings file '{path}' (*); give a path in a writable directory*"]
        )
