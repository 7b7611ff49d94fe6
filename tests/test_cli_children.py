"""`asyncwatch run` watches the Python processes the program starts, end to end."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest

from asyncwatch._children import BOOTSTRAP_DIR

# A child's mistake: a coroutine never awaited (deterministic, no timing).
CHILD = textwrap.dedent(
    """\
    import asyncio, json, os, sys

    async def save(x):
        pass

    async def main():
        save(1)  # <- child never awaited

    asyncio.run(main())
    print(json.dumps({"child_pid": os.getpid(), "path": sys.path}))
    """
)

# A parent that starts CHILD with `subprocess` and reports what it saw.
SUBPROCESS_PARENT = textwrap.dedent(
    """\
    import json, os, subprocess, sys

    child = os.path.join(os.path.dirname(os.path.abspath(__file__)), "child.py")
    done = subprocess.run([sys.executable, child], capture_output=True, text=True, env=ENV)
    print(json.dumps({
        "parent_pid": os.getpid(),
        "pythonpath": os.environ.get("PYTHONPATH"),
        "marker": os.environ.get("ASYNCWATCH_RUN"),
        "returncode": done.returncode,
        "child": json.loads(done.stdout) if done.returncode == 0 else done.stdout,
        "child_stderr": done.stderr,
    }))
    """
)

# A parent that runs the mistake in a multiprocessing child.
MULTIPROCESSING_PARENT = textwrap.dedent(
    """\
    import asyncio, json, multiprocessing, os, sys

    async def save(x):
        pass

    async def main():
        save(1)  # <- mp child never awaited

    def work(queue):
        asyncio.run(main())
        queue.put(os.getpid())

    if __name__ == "__main__":
        ctx = multiprocessing.get_context(sys.argv[1])
        queue = ctx.Queue()
        process = ctx.Process(target=work, args=(queue,))
        process.start()
        child_pid = queue.get(timeout=900)
        process.join(60)
        print(json.dumps({"parent_pid": os.getpid(), "child_pid": child_pid, "exitcode": process.exitcode}))
    """
)


def run_cli(*args: str, cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """``python -m asyncwatch ...`` with no ASYNCWATCH_* variable but those given."""
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("ASYNCWATCH_")}
    full_env.pop("PYTHONPATH", None)
    full_env.update(env or {})
    cmd = [sys.executable, "-m", "asyncwatch", *args]
    return subprocess.run(cmd, check=False, cwd=cwd, env=full_env, capture_output=True, text=True, timeout=900)


def line_in(path: Path, marker: str) -> int:
    [n] = [i for i, text in enumerate(path.read_text().splitlines(), 1) if marker in text]
    return n


def findings_in(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def summaries(stderr: str) -> list[str]:
    """The summary headers on stderr (one per process that printed one)."""
    return [line for line in stderr.splitlines() if line.startswith("asyncwatch: ") and " in " in line]


@pytest.fixture
def child(tmp_path: Path) -> Path:
    path = tmp_path / "child.py"
    path.write_text(CHILD)
    return path


def subprocess_parent(tmp_path: Path, env: str = "None") -> Path:
    path = tmp_path / "parent.py"
    path.write_text(SUBPROCESS_PARENT.replace("env=ENV", f"env={env}"))
    return path


class TestSubprocessChildren:
    def test_a_python_child_is_watched_with_its_own_pid_and_no_summary(self, tmp_path, child):
        """subprocess.run([sys.executable, ...]): the child's finding, with its pid and
        site, goes to the shared file, its log line to its stderr, and only the parent
        prints a summary, which counts it."""
        parent = subprocess_parent(tmp_path)
        out = tmp_path / "findings.jsonl"
        result = run_cli("run", "--findings", str(out), str(parent), cwd=tmp_path)
        assert result.returncode == 0, result.stderr
        report = json.loads(result.stdout)
        child_pid = report["child"]["child_pid"]
        [finding] = findings_in(out)
        assert finding["kind"] == "coroutine_never_awaited"
        assert finding["pid"] == child_pid != report["parent_pid"]
        assert finding["site"] == {
            "file": str(child),
            "line": line_in(child, "# <- child never awaited"),
            "function": "main",
        }
        assert "coroutine_never_awaited" in report["child_stderr"]
        assert summaries(report["child_stderr"]) == []  # the child prints no summary
        assert summaries(result.stderr) == ["asyncwatch: 1 finding in 1 place"]
        assert f"asyncwatch: 1 of them from child process (pid {child_pid})" in result.stderr

    def test_fail_on_findings_fails_when_only_a_child_found_something(self, tmp_path, child):
        """--fail-on-findings exits 3 for a child's finding, the parent being clean."""
        result = run_cli(
            "run", "--fail-on-findings", "--log-format", "off", str(subprocess_parent(tmp_path)), cwd=tmp_path
        )
        assert result.returncode == 3, result.stderr
        assert "asyncwatch: 1 finding in 1 place" in result.stderr

    def test_children_get_the_runs_settings(self, tmp_path, child):
        """--detect reaches the child: a kind the run does not detect is not reported there."""
        out = tmp_path / "findings.jsonl"
        parent = subprocess_parent(tmp_path)
        result = run_cli("run", "--detect", "slow_callback", "--findings", str(out), str(parent), cwd=tmp_path)
        assert result.returncode == 0, result.stderr
        assert json.loads(result.stdout)["returncode"] == 0
        assert findings_in(out) == []

    def test_a_grandchild_started_by_a_shell_is_watched(self, tmp_path, child):
        """A non-Python child passes the environment on: its Python children are watched."""
        script = tmp_path / "parent.py"
        script.write_text(
            textwrap.dedent(
                """\
                import os, subprocess, sys
                env = dict(os.environ, PY=sys.executable)
                subprocess.run(["sh", "-c", '"$PY" child.py > /dev/null'], check=True, env=env)
                """
            )
        )
        out = tmp_path / "findings.jsonl"
        result = run_cli("run", "--findings", str(out), str(script), cwd=tmp_path)
        assert result.returncode == 0, result.stderr
        assert [f["kind"] for f in findings_in(out)] == ["coroutine_never_awaited"]

    def test_no_children_leaves_the_environment_and_children_alone(self, tmp_path, child):
        """--no-children (and ASYNCWATCH_CHILDREN=0): children run unwatched, PYTHONPATH untouched."""
        parent = subprocess_parent(tmp_path)
        for args, env in ((["--no-children"], {}), ([], {"ASYNCWATCH_CHILDREN": "0"})):
            out = tmp_path / "findings.jsonl"
            result = run_cli("run", *args, "--findings", str(out), str(parent), cwd=tmp_path, env=env)
            assert result.returncode == 0, result.stderr
            report = json.loads(result.stdout)
            assert report["pythonpath"] is None and report["marker"] is None
            assert "asyncwatch" not in report["child_stderr"]
            assert findings_in(out) == []
            assert "asyncwatch: no findings" in result.stderr

    def test_a_child_is_watched_from_its_import_of_asyncio_and_not_before(self, tmp_path):
        """A child that never imports asyncio does not load asyncwatch (it costs nothing);
        one that does is watched from then on."""
        script = tmp_path / "parent.py"
        script.write_text(
            textwrap.dedent(
                """\
                import subprocess, sys
                probe = "import sys; print('asyncwatch' in sys.modules, 'asyncio' in sys.modules)"
                with_asyncio = "import asyncio, asyncwatch; print(asyncwatch.is_installed())"
                for code in (probe, with_asyncio):
                    subprocess.run([sys.executable, "-c", code], check=True)
                """
            )
        )
        result = run_cli("run", str(script), cwd=tmp_path)
        assert result.returncode == 0, result.stderr
        assert result.stdout.split("\n") == ["False False", "True", ""]


SLOW_DISK_CHILD = textwrap.dedent(
    """\
    import asyncio, json, multiprocessing, os, sys, time

    async def save(x):
        pass

    async def main():
        save(1)  # <- slow disk child

    def slow_write(fd, data):
        time.sleep(0.5)  # the child ends (os._exit) long before this returns, unless flushed
        return os.write(fd, data)

    def work():
        from asyncwatch._outputs.jsonl import _open_files

        for reporter in list(_open_files):
            reporter._write = slow_write
        asyncio.run(main())

    if __name__ == "__main__":
        ctx = multiprocessing.get_context(sys.argv[1])
        process = ctx.Process(target=work)
        process.start()
        process.join()
        print(json.dumps({"exitcode": process.exitcode}))
    """
)


class TestMultiprocessing:
    @pytest.mark.parametrize("method", ["spawn", "fork", "forkserver"])
    def test_a_childs_queued_finding_is_written_before_it_exits(self, tmp_path, method):
        """fork and forkserver children leave through os._exit(): the line still waiting
        for a slow disk is written first (a forkserver child's reporter, made while it
        unpickles its target, used to race the exit)."""
        script = tmp_path / "mp.py"
        script.write_text(SLOW_DISK_CHILD)
        out = tmp_path / "findings.jsonl"
        result = run_cli("run", "--findings", str(out), str(script), method, cwd=tmp_path)
        assert result.returncode == 0, result.stderr
        assert json.loads(result.stdout)["exitcode"] == 0
        [finding] = findings_in(out)
        assert finding["kind"] == "coroutine_never_awaited"
        assert finding["site"]["line"] == line_in(script, "# <- slow disk child")

    @pytest.mark.parametrize(
        "method",
        [
            "spawn",
            pytest.param("fork", marks=pytest.mark.skipif(sys.platform == "win32", reason="no fork")),
            pytest.param("forkserver", marks=pytest.mark.skipif(sys.platform == "win32", reason="no fork")),
        ],
    )
    def test_a_multiprocessing_child_is_watched(self, tmp_path, method):
        """spawn and forkserver start a new interpreter (bootstrapped); fork copies the
        watched parent.  Either way the child's finding is in the file and the summary."""
        script = tmp_path / "mp.py"
        script.write_text(MULTIPROCESSING_PARENT)
        out = tmp_path / "findings.jsonl"
        result = run_cli("run", "--findings", str(out), str(script), method, cwd=tmp_path)
        assert result.returncode == 0, result.stderr
        report = json.loads(result.stdout)
        assert report["exitcode"] == 0
        [finding] = findings_in(out)
        assert finding["pid"] == report["child_pid"] != report["parent_pid"]
        assert finding["site"]["line"] == line_in(script, "# <- mp child never awaited")
        assert summaries(result.stderr) == ["asyncwatch: 1 finding in 1 place"]
        assert f"1 of them from child process (pid {report['child_pid']})" in result.stderr

    @pytest.mark.skipif(not hasattr(os, "fork"), reason="no os.fork")
    def test_a_forked_child_leaving_through_the_program_prints_no_summary(self, tmp_path):
        """A bare os.fork() child that finishes the script exits with its status and no
        summary of its own; the parent's summary counts its finding."""
        script = tmp_path / "forks.py"
        script.write_text(
            textwrap.dedent(
                """\
                import asyncio, os, sys

                async def save(x):
                    pass

                async def main():
                    save(1)  # <- forked never awaited

                pid = os.fork()
                if pid == 0:
                    asyncio.run(main())
                    sys.exit(0)
                _, status = os.waitpid(pid, 0)
                print(os.waitstatus_to_exitcode(status), pid)
                """
            )
        )
        result = run_cli("run", "--fail-on-findings", "--log-format", "off", str(script), cwd=tmp_path)
        assert result.returncode == 3, result.stderr
        exitcode, child_pid = result.stdout.split()
        assert exitcode == "0"
        assert summaries(result.stderr) == ["asyncwatch: 1 finding in 1 place"]
        assert f"1 of them from child process (pid {child_pid})" in result.stderr


class TestSharedFindingsFile:
    def test_lines_of_concurrent_processes_never_interleave(self, tmp_path):
        """Four children write 200 findings each at once, the parent 200 meanwhile and 200
        after them: every line is one whole finding, and each process's count is exact."""
        (tmp_path / "many.py").write_text(
            textwrap.dedent(
                """\
                import asyncio, os

                async def save(x):
                    pass

                async def main():
                    for i in range(200):
                        save(i)  # <- many never awaited

                asyncio.run(main())
                """
            )
        )
        script = tmp_path / "parent.py"
        script.write_text(
            textwrap.dedent(
                """\
                import runpy, subprocess, sys
                children = [subprocess.Popen([sys.executable, "many.py"]) for _ in range(4)]
                runpy.run_path("many.py")  # while the children start
                assert all(c.wait() == 0 for c in children)
                runpy.run_path("many.py")  # after their lines: appended, not written over them
                """
            )
        )
        out = tmp_path / "findings.jsonl"
        # No rate limit: every finding of the same line must reach the file.
        result = run_cli(
            "run", "--log-format", "off", "--report-limit", "0", "--findings", str(out), str(script), cwd=tmp_path
        )
        assert result.returncode == 0, result.stderr
        found = findings_in(out)  # fails on any torn or interleaved line
        by_pid: dict[int, int] = {}
        for finding in found:
            assert finding["kind"] == "coroutine_never_awaited"
            by_pid[finding["pid"]] = by_pid.get(finding["pid"], 0) + 1
        assert sorted(by_pid.values()) == [200, 200, 200, 200, 400]
        assert "asyncwatch: 1200 findings in 1 place" in result.stderr
        assert "800 of them from child processes" in result.stderr


class TestEnvironment:
    def test_pythonpath_is_kept_and_its_sitecustomize_still_runs(self, tmp_path, child):
        """The user's PYTHONPATH follows asyncwatch's directory; the sitecustomize on it
        still runs in the child (after asyncwatch's), and its modules import."""
        lib = tmp_path / "lib"
        lib.mkdir()
        (lib / "sitecustomize.py").write_text("import sys\nsys.stderr.write('USER SITECUSTOMIZE\\n')\n")
        (lib / "helper.py").write_text("VALUE = 42\n")
        (tmp_path / "child.py").write_text("import helper\n" + CHILD)
        out = tmp_path / "findings.jsonl"
        parent = subprocess_parent(tmp_path)
        result = run_cli("run", "--findings", str(out), str(parent), cwd=tmp_path, env={"PYTHONPATH": str(lib)})
        assert result.returncode == 0, result.stderr
        report = json.loads(result.stdout)
        assert report["pythonpath"] == BOOTSTRAP_DIR + os.pathsep + str(lib)
        assert str(lib) in report["child"]["path"]
        assert report["child_stderr"].count("USER SITECUSTOMIZE") == 1
        assert [f["pid"] for f in findings_in(out)] == [report["child"]["child_pid"]]

    def test_a_child_that_adds_its_own_sitecustomize_is_watched_and_runs_it(self, tmp_path, child):
        """A program that appends a directory with a sitecustomize to its child's
        PYTHONPATH gets both: the child is watched and its sitecustomize runs."""
        own = tmp_path / "own"
        own.mkdir()
        (own / "sitecustomize.py").write_text("import sys\nsys.stderr.write('OWN SITECUSTOMIZE\\n')\n")
        env = f"dict(os.environ, PYTHONPATH=os.environ['PYTHONPATH'] + os.pathsep + {str(own)!r})"
        out = tmp_path / "findings.jsonl"
        result = run_cli("run", "--findings", str(out), str(subprocess_parent(tmp_path, env)), cwd=tmp_path)
        assert result.returncode == 0, result.stderr
        report = json.loads(result.stdout)
        assert report["child_stderr"].count("OWN SITECUSTOMIZE") == 1
        assert [f["pid"] for f in findings_in(out)] == [report["child"]["child_pid"]]

    def test_a_child_whose_own_sitecustomize_comes_first_runs_unwatched(self, tmp_path, child):
        """A sitecustomize put before asyncwatch's hides it: that child is not watched,
        and nothing else changes (a documented limit)."""
        own = tmp_path / "own"
        own.mkdir()
        (own / "sitecustomize.py").write_text("import sys\nsys.stderr.write('OWN SITECUSTOMIZE\\n')\n")
        env = f"dict(os.environ, PYTHONPATH={str(own)!r} + os.pathsep + os.environ['PYTHONPATH'])"
        out = tmp_path / "findings.jsonl"
        result = run_cli("run", "--findings", str(out), str(subprocess_parent(tmp_path, env)), cwd=tmp_path)
        assert result.returncode == 0, result.stderr
        report = json.loads(result.stdout)
        assert report["returncode"] == 0
        assert report["child_stderr"].startswith("OWN SITECUSTOMIZE\n")
        assert "asyncwatch" not in report["child_stderr"]
        assert findings_in(out) == []

    def test_a_bad_variable_in_a_child_is_one_warning_and_the_child_runs(self, tmp_path, child):
        """A child given a bad ASYNCWATCH_* value says so in one line and is watched
        with the default for it."""
        env = "dict(os.environ, ASYNCWATCH_SLOW_CALLBACK_MS='soon')"
        out = tmp_path / "findings.jsonl"
        result = run_cli("run", "--findings", str(out), str(subprocess_parent(tmp_path, env)), cwd=tmp_path)
        assert result.returncode == 0, result.stderr
        report = json.loads(result.stdout)
        warnings = [line for line in report["child_stderr"].splitlines() if line.startswith("asyncwatch: child")]
        assert len(warnings) == 1
        assert "ASYNCWATCH_SLOW_CALLBACK_MS='soon' is not a number of milliseconds" in warnings[0]
        assert [f["kind"] for f in findings_in(out)] == ["coroutine_never_awaited"]


class TestChildrenWithoutAsyncwatch:
    def test_a_broken_asyncwatch_in_the_child_is_one_warning_and_the_child_runs(self, tmp_path, child):
        """A child whose asyncwatch fails to import runs normally, with one line on stderr."""
        fake = tmp_path / "fake" / "asyncwatch"
        fake.mkdir(parents=True)
        (fake / "__init__.py").write_text("raise RuntimeError('a broken install')\n")
        env = f"dict(os.environ, PYTHONPATH=os.environ['PYTHONPATH'] + os.pathsep + {str(fake.parent)!r})"
        result = run_cli("run", str(subprocess_parent(tmp_path, env)), cwd=tmp_path)
        assert result.returncode == 0, result.stderr
        report = json.loads(result.stdout)
        assert report["returncode"] == 0 and "child_pid" in report["child"]
        lines = report["child_stderr"].splitlines()
        expected = (
            f"asyncwatch: child process {report['child']['child_pid']} ({sys.executable}): not watched: "
            "cannot import asyncwatch: RuntimeError: a broken install"
        )
        assert [line for line in lines if line.startswith("asyncwatch")] == [expected]

    def test_another_python_without_asyncwatch_runs_silently(self, tmp_path):
        """Another interpreter (not this virtual environment's) runs as without asyncwatch."""
        others = []
        for name in ("python3", "python2", "python3.8", "python3.10"):  # imports asyncio if it has it
            for directory in ("/usr/bin", "/usr/local/bin"):
                path = os.path.join(directory, name)
                if os.path.exists(path) and os.path.realpath(path) != os.path.realpath(sys.executable):
                    others.append(path)
        others = [
            p
            for p in dict.fromkeys(others)
            if subprocess.run([p, "-c", "import asyncwatch"], check=False, capture_output=True).returncode
        ]
        if not others:
            pytest.skip("no other Python without asyncwatch on this machine")
        script = tmp_path / "other.py"
        script.write_text(
            textwrap.dedent(
                f"""\
                import subprocess
                code = "try:\\n    import asyncio\\nexcept ImportError:\\n    pass\\nprint('hello')"
                for python in {others!r}:
                    done = subprocess.run([python, "-c", code], capture_output=True, text=True)
                    assert (done.returncode, done.stdout, done.stderr) == (0, "hello\\n", ""), (python, done)
                print("ok")
                """
            )
        )
        result = run_cli("run", str(script), cwd=tmp_path)
        assert result.returncode == 0, result.stderr
        assert result.stdout == "ok\n"

    def test_a_non_python_child_runs_as_before(self, tmp_path):
        """A non-Python child runs as before: same output, nothing added to its stderr."""
        if shutil.which("sh") is None:
            pytest.skip("no sh")
        script = tmp_path / "shell.py"
        script.write_text("import subprocess\nsubprocess.run(['sh', '-c', 'echo hi; echo err >&2'], check=True)\n")
        result = run_cli("run", "--log-format", "off", str(script), cwd=tmp_path)
        assert result.returncode == 0
        assert result.stdout == "hi\n"
        assert result.stderr == "err\nasyncwatch: no findings\n"


class TestBootstrap:
    """The child's side, in this process: it never raises, and says at most one line."""

    @pytest.fixture(autouse=True)
    def _no_exit_hook(self, monkeypatch):
        import atexit

        monkeypatch.setattr(atexit, "register", lambda *args: None)

    def test_a_garbled_marker_is_one_line_and_nothing_installed(self, capsys):
        """A marker that asyncwatch run did not write leaves the process unwatched."""
        import asyncwatch
        from asyncwatch._children import bootstrap

        bootstrap({"ASYNCWATCH_RUN": "{not json"})
        err = capsys.readouterr().err.splitlines()
        assert len(err) == 1 and "not watched: ASYNCWATCH_RUN='{not json' is not what asyncwatch run sets" in err[0]
        assert not asyncwatch.is_installed()

    def test_a_finished_run_and_an_unwritable_file_still_watch_the_process(self, tmp_path, capsys):
        """The spool gone (the run ended) is silent; a findings file that cannot be
        appended to is one line; the process is watched either way."""
        import asyncwatch
        from asyncwatch._children import bootstrap

        marker = {"spool": str(tmp_path / "gone.jsonl"), "findings": str(tmp_path / "no" / "f.jsonl")}
        bootstrap({"ASYNCWATCH_RUN": json.dumps(marker), "ASYNCWATCH_LOG": "0"})
        err = capsys.readouterr().err.splitlines()
        assert len(err) == 1 and f"cannot append to the findings file {marker['findings']!r}" in err[0]
        assert asyncwatch.is_installed()
        assert not (tmp_path / "gone.jsonl").exists()

    def test_an_error_inside_is_one_line_and_never_raised(self, monkeypatch, capsys, tmp_path):
        """Whatever fails while installing, the child starts, with one line on stderr."""
        from asyncwatch import _children

        def broken(*args: object) -> None:
            raise RuntimeError("engine trouble")

        monkeypatch.setattr(_children, "start_watching", broken)
        spool = tmp_path / "spool.jsonl"
        spool.write_text("")
        _children.bootstrap({"ASYNCWATCH_RUN": json.dumps({"spool": str(spool), "findings": None})})
        err = capsys.readouterr().err.splitlines()
        assert len(err) == 1 and err[0].endswith("not watched: RuntimeError: engine trouble")

    def test_without_the_marker_it_does_nothing(self, capsys):
        """A PYTHONPATH copied without the marker watches nothing and says nothing."""
        import asyncwatch
        from asyncwatch._children import bootstrap

        bootstrap({"ASYNCWATCH_SLOW_CALLBACK_MS": "50"})
        assert capsys.readouterr().err == ""
        assert not asyncwatch.is_installed()
