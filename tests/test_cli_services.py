"""`asyncwatch run` around real services, compared with the same run under plain python.

Each test starts subprocesses: the program under ``asyncwatch run`` and, where
the point is "as python does", the same program under plain ``python``.
Nothing here measures time: servers are waited for by polling their port
while the process lives, and `HANG_GUARD_S` only stops a deadlocked run.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

import pytest

#: A deadlock guard, not a timing check: every run here takes seconds.
HANG_GUARD_S = 900

try:
    import uvloop as _uvloop  # noqa: F401

    LOOPS = ["asyncio", "uvloop"]
except ImportError:  # pragma: no cover - uvloop is in the test extra on POSIX
    LOOPS = ["asyncio"]


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ASYNCWATCH_")}
    env.update(extra)
    return env


def asyncwatch(*args: str) -> list[str]:
    return [sys.executable, "-m", "asyncwatch", "run", *args]


def run(cmd: list[str], cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        cmd, cwd=cwd, env=env or clean_env(), capture_output=True, text=True, timeout=HANG_GUARD_S, check=False
    )


def line_of(path: Path, marker: str) -> int:
    [n] = [i for i, text in enumerate(path.read_text().splitlines(), 1) if marker in text]
    return n


def findings(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


# --- the program's arguments --------------------------------------------------

SHOW = textwrap.dedent(
    """\
    import json, sys
    main = sys.modules["__main__"]
    print(json.dumps({
        "argv": sys.argv, "file": __file__, "path0": sys.path[0], "name": __name__,
        "spec": None if __spec__ is None else [__spec__.name, __spec__.origin],
        "package": __package__, "main_is_me": main.__dict__ is globals(),
        "code_file": sys._getframe().f_code.co_filename,
    }))
    """
)


@pytest.fixture
def show(tmp_path: Path) -> Path:
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "showargs.py").write_text(SHOW)
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "__init__.py").write_text("")
    (tmp_path / "pkg" / "__main__.py").write_text(SHOW)
    (tmp_path / "showargs.py").write_text(SHOW)
    return tmp_path


class TestTheProgramsArguments:
    @pytest.mark.parametrize(
        "program",
        [
            ["-m", "showargs", "--json", "x", "--loop", "asyncio", "--host", "127.0.0.1"],
            ["-m", "showargs", "--help"],
            ["-m", "showargs", "--", "-q"],
            ["-m", "showargs", "-m", "other", "--findings", "f"],
            ["-mshowargs", "-q"],
            ["-m", "pkg", "--version"],
        ],
    )
    def test_everything_after_the_module_is_the_modules_as_with_python_m(self, show, program):
        """argv, __file__, __spec__, sys.path[0] and __main__ of a -m run equal plain python -m's."""
        plain = run([sys.executable, *program], cwd=show)
        watched = run(asyncwatch("--no-summary", "--fail-on-findings", *program), cwd=show)
        assert plain.returncode == 0, plain.stderr
        assert watched.returncode == 0, watched.stderr
        assert json.loads(watched.stdout) == json.loads(plain.stdout)
        assert json.loads(watched.stdout)["argv"][1:] == program[2 if program[0] == "-m" else 1 :]

    @pytest.mark.parametrize(
        "program",
        [
            ["showargs.py", "--findings", "x", "--help"],
            ["sub/../showargs.py", "--", "-q"],
            ["sub/showargs.py", "-m", "pytest"],
        ],
    )
    def test_everything_after_the_script_is_the_scripts_as_with_python(self, show, program):
        """argv, absolute __file__ (joined as python joins it), sys.path[0] and __main__ equal plain python's."""
        plain = run([sys.executable, *program], cwd=show)
        watched = run(asyncwatch("--no-summary", *program), cwd=show)
        assert watched.returncode == 0, watched.stderr
        assert json.loads(watched.stdout) == json.loads(plain.stdout)
        assert os.path.isabs(json.loads(watched.stdout)["file"])

    def test_a_double_dash_ends_asyncwatchs_options_as_it_ends_pythons(self, show):
        """asyncwatch run [options] -- script.py args: the script gets args, not the --."""
        plain = run([sys.executable, "--", "showargs.py", "a"], cwd=show)
        watched = run(asyncwatch("--no-summary", "--", "showargs.py", "a"), cwd=show)
        assert json.loads(watched.stdout) == json.loads(plain.stdout)
        assert json.loads(watched.stdout)["argv"] == ["showargs.py", "a"]

    def test_asyncwatchs_options_before_the_module_are_still_asyncwatchs(self, show):
        """--findings before -m is ours (the file is made), and the module never sees it."""
        out = show / "found.jsonl"
        watched = run(asyncwatch("--findings", str(out), "--no-summary", "-m", "showargs", "--findings", "y"), cwd=show)
        assert watched.returncode == 0, watched.stderr
        assert out.exists()
        assert json.loads(watched.stdout)["argv"][1:] == ["--findings", "y"]

    def test_help_after_the_module_is_the_modules_and_before_it_ours(self, show):
        """--help before the module prints asyncwatch's help; after it, the module gets it."""
        ours = run(asyncwatch("--help"), cwd=show)
        assert ours.returncode == 0 and "asyncwatch run [options]" in ours.stdout
        theirs = run(asyncwatch("--no-summary", "-m", "showargs", "--help"), cwd=show)
        assert json.loads(theirs.stdout)["argv"][1:] == ["--help"]

    def test_an_unknown_option_before_the_script_is_refused_naming_it(self, show):
        """An option asyncwatch does not have, before the script, exits 2 naming it."""
        result = run(asyncwatch("--host", "x", "showargs.py"), cwd=show)
        assert result.returncode == 2
        assert "unknown option '--host'" in result.stderr and "go after the script" in result.stderr
        assert result.stdout == ""


# --- signals -------------------------------------------------------------------

WAITS = textwrap.dedent(
    """\
    import asyncio, os, signal, sys, time

    async def save():
        pass

    async def main():
        save()  # <- never awaited
        time.sleep(0.25)  # <- blocks
        print("ready", flush=True)
        # Short sleeps, not one long one: a Python signal handler runs only when
        # the main thread returns to the interpreter, and a signal that lands
        # between asyncio's last bytecode and its epoll_wait() leaves plain
        # python asleep for the whole timeout (seen once in CI: a 900 s hang).
        while True:
            await asyncio.sleep(0.05)

    if os.environ.get("OWN_HANDLER"):
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    if os.environ.get("LOOP") == "uvloop":
        import uvloop
        uvloop.run(main())
    else:
        asyncio.run(main())
    """
)


def signalled(
    cmd: list[str], cwd: Path, signum: int, env: dict[str, str], when: Callable[[], bool] = lambda: True
) -> tuple[int, str]:
    """Start *cmd*, wait for its "ready" line (and *when*), send *signum*; its status and stderr."""
    err = cwd / f"stderr-{os.getpid()}-{len(list(cwd.iterdir()))}.txt"
    # A background job of a shell without job control inherits SIGINT
    # ignored, and so would both pythons (plain python then never dies by
    # Ctrl-C: a hang seen when the suite ran under `( ... & )`).  Start them
    # as a terminal's foreground program is started: SIGINT at its default.
    ignored = signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    if ignored:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with open(err, "w") as stderr:
            proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=stderr, text=True)
    finally:
        if ignored:
            signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line == "ready\n", (line, err.read_text())
        while not when():
            assert proc.poll() is None, err.read_text()
            time.sleep(0.01)
        proc.send_signal(signum)
        proc.wait(timeout=HANG_GUARD_S)
    finally:
        proc.kill()
        proc.wait()
        assert proc.stdout is not None
        proc.stdout.close()
    return proc.returncode, err.read_text()


@pytest.fixture
def waits(tmp_path: Path) -> Path:
    path = tmp_path / "waits.py"
    path.write_text(WAITS)
    return path


class TestSignals:
    @pytest.mark.parametrize("loop", LOOPS)
    @pytest.mark.parametrize("name", ["SIGTERM", "SIGHUP"])
    def test_a_fatal_signal_saves_every_finding_prints_the_summary_and_kills_as_python(self, waits, loop, name):
        """SIGTERM/SIGHUP mid-run: findings file complete, summary printed, same death as plain python."""
        signum = getattr(signal, name)
        env = clean_env(LOOP=loop)
        plain, _ = signalled([sys.executable, str(waits)], waits.parent, signum, env)
        out = waits.parent / "findings.jsonl"
        status, stderr = signalled(
            asyncwatch("--fail-on-findings", "--findings", str(out), str(waits)), waits.parent, signum, env
        )
        assert plain == -signum
        assert status == plain, stderr
        found = findings(out)
        assert sorted(f["kind"] for f in found) == ["coroutine_never_awaited", "slow_callback"], stderr
        assert {f["site"]["line"] for f in found} == {
            line_of(waits, "# <- never awaited"),
            line_of(waits, "# <- blocks"),
        }
        assert "asyncwatch: 2 findings in 2 places" in stderr
        assert f"ended by {name}" in stderr

    @pytest.mark.parametrize("loop", LOOPS)
    def test_ctrl_c_raises_keyboardinterrupt_and_dies_by_sigint_as_python_not_130(self, waits, loop):
        """SIGINT: KeyboardInterrupt's traceback, the summary, the findings, then death by SIGINT."""
        env = clean_env(LOOP=loop)
        plain, plain_err = signalled([sys.executable, str(waits)], waits.parent, signal.SIGINT, env)
        out = waits.parent / "findings.jsonl"
        status, stderr = signalled(
            asyncwatch("--fail-on-findings", "--findings", str(out), str(waits)), waits.parent, signal.SIGINT, env
        )
        assert plain == -signal.SIGINT and "KeyboardInterrupt" in plain_err
        assert status == plain, stderr
        assert "KeyboardInterrupt" in stderr and "asyncwatch/_cli.py" not in stderr
        assert len(findings(out)) == 2
        assert "asyncwatch: 2 findings in 2 places" in stderr

    def test_a_programs_own_handler_is_kept_and_the_run_ends_normally(self, waits):
        """A SIGTERM handler that exits 0 runs; the exit is normal, so --fail-on-findings gives 3."""
        env = clean_env(OWN_HANDLER="1")
        plain, _ = signalled([sys.executable, str(waits)], waits.parent, signal.SIGTERM, env)
        out = waits.parent / "findings.jsonl"
        # The handler's SystemExit may land anywhere, asyncwatch's reporting
        # included: this test is about the exit, so it waits for both findings.
        status, stderr = signalled(
            asyncwatch("--findings", str(out), str(waits)),
            waits.parent,
            signal.SIGTERM,
            env,
            when=lambda: len(findings(out)) == 2,
        )
        failing, _ = signalled(asyncwatch("--fail-on-findings", str(waits)), waits.parent, signal.SIGTERM, env)
        assert plain == 0 and status == 0, stderr
        assert failing == 3
        assert len(findings(out)) == 2 and "ended by" not in stderr

    def test_a_watched_child_killed_by_sigterm_keeps_its_findings(self, waits, tmp_path):
        """A child Python process of the run, terminated: its findings are in the file, it dies by SIGTERM."""
        parent = tmp_path / "parent.py"
        parent.write_text(
            textwrap.dedent(
                f"""\
                import signal, subprocess, sys
                child = subprocess.Popen([sys.executable, {str(waits)!r}], stdout=subprocess.PIPE, text=True)
                assert child.stdout.readline() == "ready\\n"
                child.send_signal(signal.SIGTERM)
                print("child status", child.wait())
                """
            )
        )
        out = tmp_path / "findings.jsonl"
        result = run(asyncwatch("--findings", str(out), str(parent)), cwd=tmp_path)
        assert result.returncode == 0, result.stderr
        assert "child status -15" in result.stdout
        found = findings(out)
        assert sorted(f["kind"] for f in found) == ["coroutine_never_awaited", "slow_callback"], result.stderr
        assert "2 of them from child process" in result.stderr


# --- logging ------------------------------------------------------------------

LOGGING_APP = textwrap.dedent(
    """\
    import asyncio, json, logging, sys, time
    import asyncwatch

    class Keep(logging.Handler):
        def emit(self, record):
            with open(sys.argv[1], "a") as f:
                f.write(json.dumps({"logger": record.name, "level": record.levelname,
                                    "message": record.getMessage(), "fields": getattr(record, "asyncwatch", None)}) + "\\n")

    if sys.argv[2] == "configured":
        logging.basicConfig(level=logging.INFO, handlers=[Keep()])

    async def main():
        asyncwatch.install()
        time.sleep(0.25)  # <- blocks

    asyncio.run(main())
    print(json.dumps({"result": "the program's own stdout"}))
    """
)


class TestLogging:
    def test_an_application_using_logging_gets_the_finding_in_its_handler_and_nothing_on_stdout(self, tmp_path):
        """logging.basicConfig + install(): one WARNING record on 'asyncwatch' with the fields; stdout untouched."""
        app = tmp_path / "app.py"
        app.write_text(LOGGING_APP)
        kept = tmp_path / "records.jsonl"
        result = run([sys.executable, str(app), str(kept), "configured"], cwd=tmp_path)
        assert result.returncode == 0, result.stderr
        assert result.stdout == '{"result": "the program\'s own stdout"}\n'
        [record] = findings(kept)
        assert record["logger"] == "asyncwatch" and record["level"] == "WARNING"
        assert record["message"].startswith(f"slow_callback at app.py:{line_of(app, '# <- blocks')} in main: ")
        assert "\n" not in record["message"]
        assert record["fields"]["site"] == {"file": str(app), "line": line_of(app, "# <- blocks"), "function": "main"}
        assert "slow_callback" not in result.stderr

    def test_with_nothing_configured_the_finding_is_one_line_on_stderr(self, tmp_path):
        """No structlog, no logging configuration: logging's last resort prints one line on stderr."""
        app = tmp_path / "app.py"
        app.write_text(LOGGING_APP)
        result = run([sys.executable, str(app), str(tmp_path / "unused"), "bare"], cwd=tmp_path)
        assert result.returncode == 0, result.stderr
        assert result.stdout == '{"result": "the program\'s own stdout"}\n'
        [line] = [x for x in result.stderr.splitlines() if "slow_callback" in x]
        assert line.startswith(f"slow_callback at app.py:{line_of(app, '# <- blocks')} in main: Task ")

    def test_under_the_cli_an_application_with_logging_configured_gets_the_finding(self, tmp_path):
        """asyncwatch run and an application whose logging reaches 'asyncwatch': its handler has the finding."""
        app = tmp_path / "app.py"
        app.write_text(LOGGING_APP.replace("        asyncwatch.install()\n", ""))
        kept = tmp_path / "records.jsonl"
        result = run(asyncwatch("--no-summary", str(app), str(kept), "configured"), cwd=tmp_path)
        assert result.returncode == 0, result.stderr
        assert result.stdout == '{"result": "the program\'s own stdout"}\n'
        [record] = findings(kept)
        assert record["fields"]["kind"] == "slow_callback" and record["fields"]["pid"] > 0


# --- start-up stalls ------------------------------------------------------------


class TestStartUpStalls:
    def test_a_stall_inside_an_import_says_so_and_does_not_fail_the_run(self, tmp_path):
        """A module imported in the loop blocks it: cause "import", the module named, exit 0 with --fail-on-findings."""
        (tmp_path / "heavy.py").write_text("import time\ntime.sleep(0.3)  # <- start-up work\n")
        app = tmp_path / "app.py"
        app.write_text(
            "import asyncio, importlib, sys\n"
            "async def main():\n"
            "    importlib.import_module('heavy')\n"
            "    await asyncio.sleep(0)\n"
            "    if sys.argv[1:] == ['and-a-real-stall']:\n"
            "        import time; time.sleep(0.3)\n"
            "asyncio.run(main())\n"
        )
        out = tmp_path / "findings.jsonl"
        result = run(asyncwatch("--fail-on-findings", "--findings", str(out), str(app)), cwd=tmp_path)
        assert result.returncode == 0, result.stderr
        [finding] = findings(out)
        assert finding["cause"] == "import"
        assert finding["site"] == {"file": str(tmp_path / "heavy.py"), "line": 2, "function": "<module>"}
        assert "while importing module 'heavy'" in finding["message"]
        assert "not counted by --fail-on-findings" in result.stderr
        real = run(asyncwatch("--fail-on-findings", str(app), "and-a-real-stall"), cwd=tmp_path)
        assert real.returncode == 3, real.stderr


# --- uvicorn --------------------------------------------------------------------

ASGI_APP = textwrap.dedent(
    """\
    import asyncio, json, os, sys, time

    async def app(scope, receive, send):
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    with open(os.environ["STARTED"], "a") as f:
                        f.write(json.dumps({"loop": type(asyncio.get_running_loop()).__module__,
                                            "argv": sys.argv[1:]}) + "\\n")
                    await send({"type": "lifespan.startup.complete"})
                elif message["type"] == "lifespan.shutdown":
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        if scope["path"] == "/block":
            time.sleep(0.25)  # <- blocks the loop
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})
    """
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def serve(
    cmd: list[str], cwd: Path, env: dict[str, str], started: Path, workers: int, paths: list[str]
) -> tuple[int, str]:
    """Start a server, wait until *workers* processes started the app, GET *paths*, SIGTERM it."""
    err = cwd / f"server-{len(list(cwd.iterdir()))}.txt"
    port = int(env["PORT"])
    with open(err, "w") as stderr:
        proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=stderr, stderr=stderr)
        try:
            while not (started.exists() and len(started.read_text().splitlines()) >= workers):
                assert proc.poll() is None, err.read_text()
                try:
                    proc.wait(timeout=0.05)
                except subprocess.TimeoutExpired:
                    pass
            for path in paths:
                while True:  # the socket may still be binding
                    try:
                        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=HANG_GUARD_S) as r:
                            assert r.read() == b"ok"
                        break
                    except OSError:
                        assert proc.poll() is None, err.read_text()
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=HANG_GUARD_S)
        finally:
            proc.kill()
            proc.wait()
    return proc.returncode, err.read_text()


@pytest.fixture
def asgi(tmp_path: Path) -> Path:
    pytest.importorskip("uvicorn")
    (tmp_path / "app.py").write_text(ASGI_APP)
    (tmp_path / "slowapp.py").write_text("import time\ntime.sleep(0.3)  # <- start-up work\nfrom app import app\n")
    return tmp_path


class TestUvicorn:
    @pytest.mark.parametrize("loop", LOOPS)
    def test_uvicorn_keeps_its_own_options_and_sigterm_ends_the_run_as_under_python(self, asgi, loop):
        """-m uvicorn --host --port --loop: uvicorn's loop; a blocking request found; SIGTERM: same status as python."""
        results = {}
        for mode in ("plain", "watched"):
            port = free_port()
            started = asgi / f"started-{mode}.jsonl"
            uvicorn = ["-m", "uvicorn", "--host", "127.0.0.1", "--port", str(port), "--loop", loop, "app:app"]
            out = asgi / "findings.jsonl"
            cmd = [sys.executable, *uvicorn] if mode == "plain" else asyncwatch("--findings", str(out), *uvicorn)
            env = clean_env(PORT=str(port), STARTED=str(started))
            status, stderr = serve(cmd, asgi, env, started, 1, ["/block", "/"])
            [start] = findings(started)
            assert start["argv"] == uvicorn[2:]  # uvicorn's options, all uvicorn's
            results[mode] = status, stderr, start
        plain, watched = results["plain"], results["watched"]
        assert watched[0] == plain[0], watched[1]
        assert watched[2]["loop"] == plain[2]["loop"]
        assert watched[2]["loop"] == ("uvloop" if loop == "uvloop" else "asyncio.unix_events")
        [finding] = [f for f in findings(asgi / "findings.jsonl") if f["cause"] not in ("gc", "gil", "starved")]
        # A time.sleep in a request handler: the loop thread off CPU by its
        # own doing, the program's line (--fail-on-findings counts it).
        assert finding["kind"] == "slow_callback" and finding["cause"] == "blocking_io"
        assert finding["site"]["line"] == line_of(asgi / "app.py", "# <- blocks the loop")
        assert "asyncio.to_thread()" in finding["message"]
        assert "asyncwatch: 1 finding in 1 place" in watched[1]

    @pytest.mark.parametrize("loop", LOOPS)
    def test_two_workers_importing_the_app_are_start_up_not_a_failure(self, asgi, loop):
        """--workers 2: each worker's import of the app is a cause="import" stall, and --fail-on-findings passes."""
        port = free_port()
        started = asgi / "started.jsonl"
        out = asgi / "findings.jsonl"
        uvicorn = ["-m", "uvicorn", "--host", "127.0.0.1", "--port", str(port), "--workers", "2", "--loop", loop]
        env = clean_env(PORT=str(port), STARTED=str(started))
        plain_started = asgi / "plain-started.jsonl"
        plain, _ = serve(
            [sys.executable, *uvicorn, "slowapp:app"],
            asgi,
            {**env, "STARTED": str(plain_started)},
            plain_started,
            2,
            ["/"],
        )
        status, stderr = serve(
            asyncwatch("--fail-on-findings", "--findings", str(out), *uvicorn, "slowapp:app"),
            asgi,
            env,
            started,
            2,
            ["/"],
        )
        assert status == plain, stderr
        found = [f for f in findings(out) if f["cause"] not in ("gc", "gil", "starved")]  # a loaded machine's stalls
        assert len({f["pid"] for f in found}) == 2, stderr
        assert all(f["cause"] == "import" and f["site"]["file"] == str(asgi / "slowapp.py") for f in found), found
        assert all("while importing module 'slowapp'" in f["message"] for f in found)
        assert "not counted by --fail-on-findings" in stderr


class TestAProgramsSignalHandlerInsideReporting:
    def test_every_reporter_gets_the_finding_and_the_programs_exception_goes_on(self):
        """SystemExit raised by the program's handler inside one reporter: the others still report, then it propagates."""
        from asyncwatch import Finding, FindingKind
        from asyncwatch._outputs.collect import CollectingReporter
        from asyncwatch._outputs.pipeline import Pipeline

        class HandlerRanHere:
            def report(self, finding):
                raise SystemExit(0)  # what `signal.signal(SIGTERM, lambda *_: sys.exit(0))` does mid-report

        before, after = CollectingReporter(), CollectingReporter()
        pipeline = Pipeline([before, HandlerRanHere(), after])
        finding = Finding(kind=FindingKind.SLOW_CALLBACK, message="m", site=None)
        with pytest.raises(SystemExit):
            pipeline.emit(finding)
        assert before.findings == [finding] and after.findings == [finding]
        assert len(pipeline.reporters) == 3  # not a broken reporter: nothing disabled
