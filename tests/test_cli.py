"""`asyncwatch run` end to end, in subprocesses, as a user runs it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from test_settings import READ_ONLY_CASES, read_only_path
from test_watchdog_deadline import items_to_sort

MISTAKES = textwrap.dedent(
    """\
    import asyncio, sys, time

    async def save(x):
        pass

    async def block():
        time.sleep(0.25)  # <- blocking

    async def main():
        save(1)  # <- never awaited
        await block()

    if __name__ == "__main__":
        asyncio.run(main())
        print("argv", sys.argv[1:])
    """
)

CLEAN = textwrap.dedent(
    """\
    import asyncio, json, sys

    async def main():
        await asyncio.sleep(0.01)
        return type(asyncio.get_running_loop()).__module__

    loop_module = asyncio.run(main())
    print(json.dumps({"argv": sys.argv, "name": __name__, "loop": loop_module}))
    sys.exit(int(sys.argv[1]) if len(sys.argv) > 1 else 0)
    """
)


def run(*args: str, cwd: Path | None = None, env: dict[str, str] | None = None, module: bool = True):
    """Run the CLI (as ``python -m asyncwatch`` or the console script)."""
    full_env = {**os.environ, **(env or {})}
    for key in [k for k in full_env if k.startswith("ASYNCWATCH_") and not (env and k in env)]:
        del full_env[key]
    if module:
        cmd = [sys.executable, "-m", "asyncwatch", *args]
    else:
        cmd = [str(Path(sys.executable).parent / "asyncwatch"), *args]
    return subprocess.run(cmd, check=False, cwd=cwd, env=full_env, capture_output=True, text=True, timeout=900)


def line_in(path: Path, marker: str) -> int:
    [n] = [i for i, text in enumerate(path.read_text().splitlines(), 1) if marker in text]
    return n


@pytest.fixture
def mistakes(tmp_path: Path) -> Path:
    path = tmp_path / "mistakes.py"
    path.write_text(MISTAKES)
    return path


@pytest.fixture
def clean(tmp_path: Path) -> Path:
    path = tmp_path / "clean.py"
    path.write_text(CLEAN)
    return path


class TestFindingsFile:
    def test_writes_each_finding_as_a_json_line_with_exact_sites(self, mistakes, tmp_path):
        """--findings gets one JSON object per finding, with the user's lines."""
        out = tmp_path / "findings.jsonl"
        result = run("run", "--findings", str(out), str(mistakes), "a", "b")
        assert result.returncode == 0, result.stderr
        found = [json.loads(line) for line in out.read_text().splitlines()]
        by_kind = {f["kind"]: f for f in found}
        assert sorted(by_kind) == ["coroutine_never_awaited", "slow_callback"]
        assert by_kind["slow_callback"]["site"] == {
            "file": str(mistakes),
            "line": line_in(mistakes, "# <- blocking"),
            "function": "block",
        }
        assert by_kind["slow_callback"]["duration_s"] >= 0.2
        assert by_kind["coroutine_never_awaited"]["site"]["line"] == line_in(mistakes, "# <- never awaited")
        assert all(f["pid"] != os.getpid() and f["time"].endswith("Z") for f in found)

    def test_a_run_starts_its_findings_file_empty(self, mistakes, tmp_path):
        """The README's promise: a file from an earlier run is not mixed in."""
        out = tmp_path / "findings.jsonl"
        out.write_text('{"kind": "from an earlier run"}\n')
        result = run("run", "--findings", str(out), str(mistakes))
        assert result.returncode == 0, result.stderr
        kinds = sorted(json.loads(line)["kind"] for line in out.read_text().splitlines())
        assert kinds == ["coroutine_never_awaited", "slow_callback"]

    def test_environment_variable_sets_the_file(self, mistakes, tmp_path):
        """ASYNCWATCH_FINDINGS works like --findings."""
        out = tmp_path / "env.jsonl"
        result = run("run", str(mistakes), env={"ASYNCWATCH_FINDINGS": str(out)})
        assert result.returncode == 0, result.stderr
        assert len(out.read_text().splitlines()) == 2

    @pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
    def test_a_coroutine_function_wired_up_in_the_main_script_is_reported_there(self, tmp_path, loop):
        """Defined in one module, given to the loop in the main script (where
        programs wire things up): the registration line is found there."""
        pytest.importorskip(loop)
        (tmp_path / "jobs.py").write_text("async def flush_metrics():\n    pass\n")
        app = tmp_path / "app.py"
        app.write_text(
            textwrap.dedent(
                """\
                import asyncio
                from jobs import flush_metrics

                async def main():
                    asyncio.get_running_loop().call_soon(flush_metrics)  # <- wired up here
                    await asyncio.sleep(0.01)

                asyncio.run(main())
                """
            )
        )
        out = tmp_path / "findings.jsonl"
        result = run("run", "--findings", str(out), "--loop", loop, "--no-summary", str(app), cwd=tmp_path)
        assert result.returncode == 0, result.stderr
        [finding] = [json.loads(line) for line in out.read_text().splitlines()]
        assert finding["kind"] == "coroutine_never_awaited"
        site = {"file": str(app), "line": line_in(app, "# <- wired up here"), "function": "main"}
        assert finding["site"] == finding["scheduled_at"] == site

    @pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
    def test_steps_holding_the_gil_back_to_back_are_each_reported_with_the_console_log_on(self, tmp_path, loop):
        """The console log and the findings file are written off the
        watchdog thread: written from it, in the middle of its looks, each
        write let the loop thread run one more sum unseen (two findings of
        six, one of them five steps long)."""
        pytest.importorskip(loop)
        app = tmp_path / "app.py"
        app.write_text(
            textwrap.dedent(
                """\
                import asyncio, random

                ITEMS = [random.random() for _ in range(SORTED_ITEMS)]  # ~0.3 s of CPU to sort

                async def handle():
                    await asyncio.sleep(0.05)
                    sorted(ITEMS)  # <- one of several requests' sorts

                async def main():
                    await asyncio.gather(*(handle() for _ in range(4)))

                asyncio.run(main())
                """
            ).replace("SORTED_ITEMS", str(len(items_to_sort(0.3))))
        )
        out = tmp_path / "findings.jsonl"
        result = run("run", "--findings", str(out), "--loop", loop, "--no-summary", str(app), cwd=tmp_path)
        assert result.returncode == 0, result.stderr
        found = [json.loads(line) for line in out.read_text().splitlines()]
        assert "slow_callback" in result.stderr  # the console log was on
        line = line_in(app, "# <- one of several requests' sorts")
        # All at the line, every one or all but one: a loaded machine can
        # still merge two, or make one the machine's stall (no line).
        placed = [f["site"]["line"] for f in found if f["site"]]
        assert placed == [line] * len(placed) and len(placed) >= 3, found
        assert all(f["kind"] == "slow_callback" for f in found)
        unplaced = [f for f in found if not f["site"]]
        over = "over before the watchdog could look"
        assert all(f["cause"] in ("starved", "gil", "gc") or over in f["message"] for f in unplaced), found

    def _package_wired_in(self, tmp_path, *registrations):
        """jobs.py defines the coroutine function; each registration is a
        module of that name whose start() gives it to the loop; app.py, the
        main script, only calls each start()."""
        (tmp_path / "jobs.py").write_text("async def flush_metrics():\n    pass\n")
        for name in registrations:
            (tmp_path / f"{name}.py").write_text(
                textwrap.dedent(
                    """\
                    import asyncio
                    import jobs

                    def start():
                        asyncio.get_running_loop().call_soon(jobs.flush_metrics)  # <- wired up here
                    """
                )
            )
        app = tmp_path / "app.py"
        imports = "".join(f"import {name}\n" for name in registrations)
        starts = "".join(f"    {name}.start()\n" for name in registrations)
        app.write_text(
            f"import asyncio\n{imports}\nasync def main():\n{starts}    await asyncio.sleep(0.01)\n\nasyncio.run(main())\n"
        )
        return app

    @pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
    def test_a_coroutine_function_wired_up_in_a_third_module_is_reported_there(self, tmp_path, loop):
        """Defined in one module, given to the loop in another that is not
        the main script (a package's server module): neither first file has
        the registration, and the program's other modules do, once."""
        pytest.importorskip(loop)
        app = self._package_wired_in(tmp_path, "server")
        out = tmp_path / "findings.jsonl"
        result = run("run", "--findings", str(out), "--loop", loop, "--no-summary", str(app), cwd=tmp_path)
        assert result.returncode == 0, result.stderr
        [finding] = [json.loads(line) for line in out.read_text().splitlines()]
        assert finding["kind"] == "coroutine_never_awaited"
        server = tmp_path / "server.py"
        site = {"file": str(server), "line": line_in(server, "# <- wired up here"), "function": "start"}
        assert finding["site"] == finding["scheduled_at"] == site
        assert f"server.py:{site['line']}" in finding["message"]

    @pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
    def test_two_modules_wiring_it_up_give_no_line(self, tmp_path, loop):
        """Two registrations, in two modules: either can have made the
        coroutine the loop dropped, and neither is named."""
        pytest.importorskip(loop)
        app = self._package_wired_in(tmp_path, "server", "worker")
        out = tmp_path / "findings.jsonl"
        result = run("run", "--findings", str(out), "--loop", loop, "--no-summary", str(app), cwd=tmp_path)
        assert result.returncode == 0, result.stderr
        found = [json.loads(line) for line in out.read_text().splitlines()]
        assert [f["kind"] for f in found] == ["coroutine_never_awaited"] * 2
        assert all(f["site"] is None and f["scheduled_at"] is None for f in found)
        assert all("scheduled is unknown" in f["message"] for f in found)


class TestTheProgramSeesPlainPython:
    def test_argv_name_and_exit_status_are_unchanged(self, clean):
        """sys.argv, __name__ and the exit status are those of `python script.py`."""
        result = run("run", str(clean), "7", "--flag")
        assert result.returncode == 7
        report = json.loads(result.stdout)
        assert report["argv"] == [str(clean), "7", "--flag"]
        assert report["name"] == "__main__"

    def test_uncaught_exception_exits_1_with_the_programs_traceback(self, tmp_path):
        """A crash prints the program's traceback (not asyncwatch's frames) and exits 1."""
        script = tmp_path / "crash.py"
        script.write_text("def f():\n    raise KeyError('boom')\nf()\n")
        result = run("run", str(script))
        assert result.returncode == 1
        assert "KeyError: 'boom'" in result.stderr
        assert 'crash.py", line 2, in f' in result.stderr
        assert "runpy" not in result.stderr and "_cli.py" not in result.stderr

    def test_module_mode_runs_a_package_module_as_main(self, tmp_path):
        """`-m pkg.mod` runs like `python -m pkg.mod` from the current directory."""
        pkg = tmp_path / "pkg"
        pkg.mkdir()
        (pkg / "__init__.py").write_text("")
        (pkg / "mod.py").write_text(CLEAN)
        result = run("run", "-m", "pkg.mod", "3", cwd=tmp_path)
        assert result.returncode == 3, result.stderr
        report = json.loads(result.stdout)
        assert report["name"] == "__main__"
        assert report["argv"] == [str(pkg / "mod.py"), "3"]

    def test_console_script_works_like_python_dash_m(self, clean):
        """The `asyncwatch` command and `python -m asyncwatch` are the same program."""
        result = run("run", str(clean), module=False)
        assert result.returncode == 0, result.stderr
        assert json.loads(result.stdout)["name"] == "__main__"

    def test_uvloop_is_used_when_asked(self, clean):
        """--loop uvloop runs the program's asyncio.run() on uvloop."""
        pytest.importorskip("uvloop")
        result = run("run", "--loop", "uvloop", str(clean))
        assert result.returncode == 0, result.stderr
        assert json.loads(result.stdout)["loop"].startswith("uvloop")


class TestExitStatusForCI:
    def test_fail_on_findings_exits_3(self, mistakes):
        """--fail-on-findings makes a successful run with findings exit 3."""
        assert run("run", "--fail-on-findings", str(mistakes)).returncode == 3

    def test_fail_on_findings_is_0_when_clean(self, clean):
        """A clean run still exits 0 with --fail-on-findings."""
        assert run("run", "--fail-on-findings", str(clean)).returncode == 0

    def test_the_programs_own_failure_wins(self, clean):
        """A program that fails keeps its own status, findings or not."""
        assert run("run", "--fail-on-findings", str(clean), "5").returncode == 5

    def test_environment_variable_turns_it_on(self, mistakes):
        """ASYNCWATCH_FAIL_ON_FINDINGS=1 works like the flag."""
        assert run("run", str(mistakes), env={"ASYNCWATCH_FAIL_ON_FINDINGS": "1"}).returncode == 3


class TestOutput:
    def test_summary_on_stderr_groups_by_kind_and_site(self, mistakes):
        """At exit, stderr has a short summary with counts per kind and site."""
        result = run("run", "--log-format", "off", str(mistakes))
        assert "asyncwatch: 2 findings in 2 places" in result.stderr
        assert f"mistakes.py:{line_in(mistakes, '# <- blocking')} in block" in result.stderr
        assert "argv" in result.stdout  # the program's own output is untouched

    def test_console_log_lines_are_readable(self, mistakes):
        """By default each finding is a readable console line on stderr."""
        result = run("run", "--no-summary", str(mistakes))
        lines = [line for line in result.stderr.splitlines() if "slow_callback" in line]
        assert len(lines) == 1
        assert "blocked the event loop" in lines[0] and "mistakes.py:" in lines[0]

    def test_json_flag_renders_json_events(self, mistakes):
        """--json logs each finding as one JSON object on stderr."""
        result = run("run", "--json", "--no-summary", str(mistakes))
        events = [json.loads(line) for line in result.stderr.splitlines() if line.startswith("{")]
        assert sorted(e["event"] for e in events) == ["coroutine_never_awaited", "slow_callback"]
        assert all(e["level"] == "warning" for e in events)

    def test_a_program_that_configures_structlog_decides_the_rendering(self, tmp_path):
        """If the program configured structlog, findings go through its configuration."""
        script = tmp_path / "configured.py"
        script.write_text(
            textwrap.dedent(
                """\
                import asyncio, sys, time, structlog
                def mark(logger, method, event):
                    return "PROGRAM-RENDERED " + event["event"]
                structlog.configure(processors=[mark], logger_factory=structlog.PrintLoggerFactory(sys.stderr))
                async def main():
                    time.sleep(0.25)
                asyncio.run(main())
                """
            )
        )
        result = run("run", "--no-summary", str(script))
        assert "PROGRAM-RENDERED slow_callback" in result.stderr


def main_error(args: list[str], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], env=None) -> str:
    """Run ``asyncwatch`` in this process; return stderr of a run refused with status 2."""
    from asyncwatch._cli import main

    for key in [k for k in os.environ if k.startswith("ASYNCWATCH_")]:
        monkeypatch.delenv(key)
    for key, value in (env or {}).items():
        monkeypatch.setenv(key, value)
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    captured = capsys.readouterr()
    assert exit_info.value.code == 2, captured.err
    assert captured.out == ""  # the program did not run
    return captured.err


class TestBadInput:
    @pytest.mark.parametrize(
        ("args", "env", "expected"),
        [
            (["--slow-callback-ms", "-3"], {}, "--slow-callback-ms='-3' must be a finite number of milliseconds > 0"),
            (["--slow-callback-ms", "0"], {}, "--slow-callback-ms='0' must be a finite number of milliseconds > 0"),
            (["--slow-callback-ms", "nan"], {}, "--slow-callback-ms='nan' must be a finite number"),
            (["--slow-callback-ms", "inf"], {}, "--slow-callback-ms='inf' must be a finite number"),
            (["--slow-callback-ms", "soon"], {}, "--slow-callback-ms='soon' is not a number of milliseconds; give a"),
            ([], {"ASYNCWATCH_SLOW_CALLBACK_MS": "soon"}, "ASYNCWATCH_SLOW_CALLBACK_MS='soon' is not a number"),
            (["--spans-min-duration-ms", "-1"], {}, "--spans-min-duration-ms='-1' must be a finite number"),
            ([], {"ASYNCWATCH_SPANS_MIN_DURATION_MS": "1e400"}, "ASYNCWATCH_SPANS_MIN_DURATION_MS='1e400' must be"),
            (["--loop", "trio"], {}, "--loop='trio' is not a valid event loop; use one of: asyncio, uvloop"),
            (["--loop", "uvlop"], {}, "--loop='uvlop' is not a valid event loop (did you mean 'uvloop'?)"),
            ([], {"ASYNCWATCH_LOOP": "curio"}, "ASYNCWATCH_LOOP='curio' is not a valid event loop"),
            (["--log-format", "xml"], {}, "--log-format='xml' is not a valid log format; use one of: console, json"),
            ([], {"ASYNCWATCH_LOG_FORMAT": "jsn"}, "ASYNCWATCH_LOG_FORMAT='jsn' is not a valid log format (did you"),
            (["--detect", "slow"], {}, "--detect: unknown finding kind 'slow'; valid kinds are: slow_callback,"),
            (["--detect", "slow_calback"], {}, "unknown finding kind 'slow_calback' (did you mean 'slow_callback'?)"),
            (["--detect", ","], {}, "--detect=',' names no finding kind; give a comma-separated list"),
            ([], {"ASYNCWATCH_DETECT": ""}, "ASYNCWATCH_DETECT='' names no finding kind"),
            (["--spans", "some"], {}, "--spans='some' is not a valid span mode; use one of: notable, all, off"),
            (["--report-limit", "-2"], {}, "--report-limit='-2' must be >= 0 (0 means no limit)"),
            ([], {"ASYNCWATCH_REPORT_LIMIT": "lots"}, "ASYNCWATCH_REPORT_LIMIT='lots' is not a whole number"),
            ([], {"ASYNCWATCH_SPANS": "notible"}, "ASYNCWATCH_SPANS='notible' is not a valid span mode (did you mean"),
            ([], {"ASYNCWATCH_FAIL_ON_FINDINGS": "perhaps"}, "ASYNCWATCH_FAIL_ON_FINDINGS='perhaps' is not a boolean"),
            ([], {"ASYNCWATCH_SUMMARY": "maybe"}, "ASYNCWATCH_SUMMARY='maybe' is not a boolean; use one of: 1, 0"),
            ([], {"ASYNCWATCH_OTLP": "2"}, "ASYNCWATCH_OTLP='2' is not a boolean"),
            ([], {"ASYNCWATCH_CHILDREN": "sometimes"}, "ASYNCWATCH_CHILDREN='sometimes' is not a boolean"),
            ([], {"ASYNCWATCH_TRACK_COROUTINE_ORIGINS": "always"}, "ASYNCWATCH_TRACK_COROUTINE_ORIGINS='always'"),
            ([], {"ASYNCWATCH_LOG": "loud"}, "ASYNCWATCH_LOG='loud' is not a boolean"),
            ([], {"ASYNCWATCH_METRICS": "many"}, "ASYNCWATCH_METRICS='many' is not a boolean"),
            (
                [],
                {"ASYNCWATCH_SLOW_CALLBACK": "50"},
                "ASYNCWATCH_SLOW_CALLBACK is not an asyncwatch variable (did you mean 'ASYNCWATCH_SLOW_CALLBACK_MS'?)",
            ),
            (
                ["--slow-calback-ms", "5"],
                {},
                "unknown option '--slow-calback-ms' (did you mean '--slow-callback-ms'?)",
            ),
        ],
    )
    def test_bad_values_exit_2_naming_the_value_and_the_fix(self, clean, args, env, expected, monkeypatch, capsys):
        """Every bad option or variable names itself, the value and what is accepted."""
        assert expected in main_error(["run", *args, str(clean)], monkeypatch, capsys, env)

    def test_a_bad_value_stops_the_real_command_before_the_program_runs(self, clean):
        """End to end: status 2, the message on stderr, nothing from the program."""
        result = run("run", "--loop", "trio", str(clean))
        assert result.returncode == 2
        assert "asyncwatch: error: --loop='trio' is not a valid event loop" in result.stderr
        assert result.stdout == ""

    def test_missing_script(self, tmp_path):
        """A script that does not exist is a usage error, not a traceback."""
        result = run("run", str(tmp_path / "nope.py"))
        assert result.returncode == 2
        assert "nope.py' does not exist" in result.stderr and "Traceback" not in result.stderr

    def test_missing_module(self, tmp_path):
        """A module that cannot be found is a usage error."""
        result = run("run", "-m", "no_such_module_here", cwd=tmp_path)
        assert result.returncode == 2 and "no module named 'no_such_module_here'" in result.stderr

    def test_nothing_to_run(self):
        """`asyncwatch run` alone says what to give."""
        result = run("run")
        assert result.returncode == 2 and "nothing to run" in result.stderr


class TestUnwritableFindings:
    @pytest.mark.parametrize("source", ["--findings", "ASYNCWATCH_FINDINGS"])
    def test_a_missing_directory_is_refused_naming_it(self, clean, tmp_path, source, monkeypatch, capsys):
        """--findings (or its variable) in a directory that does not exist: status 2, naming it."""
        path = tmp_path / "no" / "f.jsonl"
        args, env = (["--findings", str(path)], {}) if source == "--findings" else ([], {source: str(path)})
        err = main_error(["run", *args, str(clean)], monkeypatch, capsys, env)
        assert f"{source}={str(path)!r}: the directory {str(tmp_path / 'no')!r} does not exist; create it" in err
        assert not path.parent.exists()

    def test_a_directory_is_refused_with_a_file_name_to_give(self, clean, tmp_path, monkeypatch, capsys):
        """--findings naming a directory suggests a file in it."""
        err = main_error(["run", "--findings", str(tmp_path), str(clean)], monkeypatch, capsys)
        assert f"--findings={str(tmp_path)!r} is a directory; give a file path, e.g. " in err

    @pytest.mark.parametrize("how", READ_ONLY_CASES)
    def test_a_path_that_cannot_be_written_is_refused(self, clean, tmp_path, how, monkeypatch, capsys):
        """A findings file the process may not create is refused with the system's reason."""
        path = read_only_path(how, tmp_path)
        err = main_error(["run", "--findings", str(path), str(clean)], monkeypatch, capsys)
        assert f"--findings={str(path)!r} cannot be written (" in err
        assert "give a path in a writable directory" in err


class TestOptionsReachTheLoops:
    def test_the_threshold_option_applies_to_the_programs_loops(self, tmp_path):
        """--slow-callback-ms 1000 lets a 250 ms step pass, and the variable does too."""
        script = tmp_path / "block.py"
        script.write_text("import asyncio, time\nasync def main():\n    time.sleep(0.25)\nasyncio.run(main())\n")
        for args, env in ((["--slow-callback-ms", "1000"], {}), ([], {"ASYNCWATCH_SLOW_CALLBACK_MS": "1000"})):
            result = run("run", "--fail-on-findings", *args, str(script), env=env)
            assert result.returncode == 0, result.stderr
            assert "asyncwatch: no findings" in result.stderr
        assert run("run", "--fail-on-findings", "--slow-callback-ms", "50", str(script)).returncode == 3

    def test_the_detect_option_applies_to_the_programs_loops(self, mistakes):
        """--detect coroutine_never_awaited leaves the slow step unreported."""
        result = run("run", "--log-format", "off", "--detect", "coroutine_never_awaited", str(mistakes))
        assert result.returncode == 0, result.stderr
        assert "asyncwatch: 1 finding in 1 place" in result.stderr
        assert "slow_callback" not in result.stderr


def test_asyncwatchs_own_events_go_to_stderr_never_the_programs_stdout(tmp_path):
    """An internal error under ``asyncwatch run`` is said on stderr: the program's
    stdout (which may be piped into another program) carries only its own output."""
    script = tmp_path / "app.py"
    script.write_text(
        textwrap.dedent(
            """\
            import asyncio
            import asyncwatch._detectors.cancellation

            def broken(*args):
                raise RuntimeError("injected")

            asyncwatch._detectors.cancellation._delivery_point = broken  # asyncwatch's own bookkeeping fails

            async def main():
                task = asyncio.create_task(asyncio.sleep(10))
                await asyncio.sleep(0)
                task.cancel()
                print("program output")

            asyncio.run(main())
            """
        )
    )
    result = run("run", str(script), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout == "program output\n"
    assert "asyncwatch.internal_error" in result.stderr and "injected" in result.stderr
