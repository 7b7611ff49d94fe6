"""What a program leaves alive when it ends: reported before Python's shutdown frees it.

A failed task kept in a module-level list, a coroutine kept "for later",
a pending task on a loop run by hand and left: Python frees them only as it
clears the modules, and asyncio reports them then, after asyncwatch's
summary and findings file were written (and, under ``install()``, with an
internal error of asyncwatch's on stderr).  Run in subprocesses, as a user
runs them.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest

from asyncwatch._core.settings import extension
from test_cli import line_in, run

FAILED_TASK_IN_A_LIST = """\
    import asyncio

    JOBS = []

    async def reindex(shard):
        await asyncio.sleep(0)
        raise RuntimeError(f"shard {shard} unavailable")

    async def main():
        JOBS.append(asyncio.create_task(reindex(3)))  # <- the failed task
        await asyncio.sleep(0.05)

    asyncio.run(main())
"""

COROUTINE_IN_A_LIST = """\
    import asyncio

    DEFERRED = []

    async def flush_metrics(name):
        await asyncio.sleep(0)

    async def main():
        DEFERRED.append(flush_metrics("requests"))  # <- the coroutine
        await flush_metrics("awaited")
        await asyncio.wait_for(flush_metrics("scheduled"), 1)
        later = flush_metrics("awaited later")
        await later
        await asyncio.sleep(0)

    asyncio.run(main())
"""

PENDING_ON_A_LOOP_LEFT = """\
    import asyncio

    BACKGROUND = []

    async def heartbeat():
        await asyncio.Event().wait()

    async def main():
        BACKGROUND.append(asyncio.create_task(heartbeat()))  # <- the pending task
        await asyncio.sleep(0)

    loop = asyncio.new_event_loop()
    loop.run_until_complete(main())
"""


def script(tmp_path: Path, source: str, name: str = "app.py") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(source))
    return path


def findings_of(out: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in out.read_text().splitlines()] if out.exists() else []


def run_watched(tmp_path: Path, program: Path, *options: str) -> tuple[subprocess.CompletedProcess[str], list[Any]]:
    out = tmp_path / "findings.jsonl"
    result = run("run", "--findings", str(out), *options, str(program), cwd=tmp_path)
    return result, findings_of(out)


def the_finding(tmp_path: Path, source: str, *options: str) -> tuple[Path, subprocess.CompletedProcess[str], Any]:
    """Run *source* under ``asyncwatch run``: it exits 0 with one finding."""
    program = script(tmp_path, source)
    result, found = run_watched(tmp_path, program, *options)
    assert result.returncode == 0, result.stderr
    [finding] = found
    return program, result, finding


class TestUnderAsyncwatchRun:
    def test_a_failed_task_kept_in_a_module_list_is_reported_at_its_creation_line(self, tmp_path):
        program, result, finding = the_finding(tmp_path, FAILED_TASK_IN_A_LIST)
        assert finding["kind"] == "task_exception_unretrieved"
        assert finding["site"]["line"] == line_in(program, "# <- the failed task")
        assert "RuntimeError: shard 3 unavailable" in finding["message"]
        assert "still referenced when the program ended" in finding["message"]
        # Counted in the summary, which comes after it now.
        assert "1 finding" in result.stderr and f"app.py:{finding['site']['line']}" in result.stderr
        # asyncio's own report as Python shuts down is left as it is (3.13's
        # fails in linecache, "sys.meta_path is None", under plain python too).

    def test_a_coroutine_kept_in_a_module_list_is_reported_with_what_holds_it(self, tmp_path):
        """No frame saw it made; the one line of the source that calls its
        function unawaited did (the awaited and the scheduled calls could not)."""
        program, result, finding = the_finding(tmp_path, COROUTINE_IN_A_LIST)
        assert finding["kind"] == "coroutine_never_awaited"
        line = line_in(program, "# <- the coroutine")
        assert finding["site"] == finding["created_at"] == {"file": str(program), "line": line, "function": "main"}
        assert finding["dropped_at"] is None
        assert "a list in global 'DEFERRED' of module __main__" in finding["message"]
        assert f"the source tells: at app.py:{line}, the only call of flush_metrics()" in finding["message"]
        assert "coroutine 'flush_metrics' was never awaited" in result.stderr  # CPython's own warning

    def test_a_kept_coroutine_two_lines_can_have_made_has_no_site(self, tmp_path):
        """A helper returning another call: either line can have made it."""
        source = COROUTINE_IN_A_LIST.replace(
            "async def main():", "def for_later():\n        return flush_metrics('errors')\n\n    async def main():"
        )
        assert "return flush_metrics" in source
        _program, _result, finding = the_finding(tmp_path, source)
        assert finding["site"] is None and finding["created_at"] is None
        assert "where it was created is not known; track_coroutine_origins=True records it" in finding["message"]

    def test_a_kept_coroutine_made_in_a_third_module_is_reported_there(self, tmp_path):
        """Defined in jobs.py, made and kept in deferred.py, run from app.py:
        the first two files read have no such call, the program's other
        modules have one."""
        script(tmp_path, "async def flush_metrics(name):\n    pass\n", "jobs.py")
        deferred = script(
            tmp_path,
            """\
            import jobs

            DEFERRED = []

            def later():
                DEFERRED.append(jobs.flush_metrics("requests"))  # <- the coroutine
            """,
            "deferred.py",
        )
        _program, _result, finding = the_finding(
            tmp_path,
            """\
            import asyncio
            import deferred

            async def main():
                deferred.later()
                await asyncio.sleep(0)

            asyncio.run(main())
            """,
        )
        assert finding["kind"] == "coroutine_never_awaited"
        line = line_in(deferred, "# <- the coroutine")
        assert finding["site"] == {"file": str(deferred), "line": line, "function": "later"}
        assert f"the source tells: at deferred.py:{line}, the only call of flush_metrics()" in finding["message"]

    def test_a_coroutine_function_registered_with_atexit_is_reported_where_it_was_registered(self, tmp_path):
        program, _result, finding = the_finding(
            tmp_path,
            """\
            import asyncio, atexit

            async def close_pool():
                await asyncio.sleep(0)

            async def main():
                atexit.register(close_pool)  # <- registered
                await asyncio.sleep(0)

            asyncio.run(main())
            """,
        )
        assert finding["kind"] == "coroutine_never_awaited"
        line = line_in(program, "# <- registered")
        assert finding["site"] == finding["created_at"] == {"file": str(program), "line": line, "function": "main"}
        assert f"at app.py:{line}, the only line there that gives close_pool to atexit.register()" in finding["message"]

    def test_with_origins_tracked_its_creation_line_is_the_site(self, tmp_path):
        program, _result, finding = the_finding(tmp_path, COROUTINE_IN_A_LIST, "--track-coroutine-origins")
        line = line_in(program, "# <- the coroutine")
        assert finding["site"]["line"] == finding["created_at"]["line"] == line
        assert f"created at app.py:{line} but never awaited" in finding["message"]

    def test_a_pending_task_on_a_loop_run_by_hand_and_left_is_reported(self, tmp_path):
        program, _result, finding = the_finding(tmp_path, PENDING_ON_A_LOOP_LEFT)
        assert finding["kind"] == "task_destroyed_pending"
        assert finding["site"]["line"] == line_in(program, "# <- the pending task")
        assert "still pending when the program ended, its loop no longer running" in finding["message"]

    def test_what_the_programs_exit_functions_finish_is_not_reported(self, tmp_path):
        """Work kept for an exit function, which awaits the coroutines and
        asks the failed task for its exception: nothing left to report."""
        program = script(
            tmp_path,
            """\
            import asyncio, atexit

            DEFERRED = []
            JOBS = []

            async def flush(name):
                await asyncio.sleep(0)
                print("flushed", name)

            async def fail():
                raise ValueError("checked at exit")

            async def drain():
                await asyncio.gather(*DEFERRED)
                print("job said", repr(JOBS[0].exception()))

            async def main():
                DEFERRED.append(flush("metrics"))
                JOBS.append(asyncio.create_task(fail()))
                await asyncio.sleep(0.01)

            atexit.register(lambda: asyncio.run(drain()))
            asyncio.run(main())
            """,
        )
        result, found = run_watched(tmp_path, program)
        assert result.returncode == 0, result.stderr
        assert found == []
        assert result.stdout == "flushed metrics\njob said ValueError('checked at exit')\n"
        assert "asyncwatch: no findings" in result.stderr

    def test_a_mistake_in_an_exit_function_is_watched_and_counted(self, tmp_path):
        program = script(
            tmp_path,
            """\
            import asyncio, atexit, time

            async def close_pool():
                time.sleep(0.25)  # <- blocks at exit
                await asyncio.sleep(0)

            atexit.register(lambda: asyncio.run(close_pool()))
            """,
        )
        result, found = run_watched(tmp_path, program, "--fail-on-findings")
        assert [(f["kind"], f["site"]["line"]) for f in found if f["cause"] not in ("starved", "gil")] == [
            ("slow_callback", line_in(program, "# <- blocks at exit"))
        ]
        assert result.returncode == 3, result.stderr

    def test_a_loop_still_running_in_a_daemon_thread_is_left_alone(self, tmp_path):
        """Its pending tasks are not finished, not abandoned: Python never frees them."""
        program = script(
            tmp_path,
            """\
            import asyncio, threading

            started = threading.Event()
            CONNECTIONS = []

            async def serve():
                CONNECTIONS.append(asyncio.get_running_loop().create_task(asyncio.Event().wait()))
                started.set()
                await asyncio.Event().wait()

            threading.Thread(target=asyncio.run, args=(serve(),), daemon=True).start()
            started.wait()
            """,
        )
        result, found = run_watched(tmp_path, program)
        assert result.returncode == 0, result.stderr
        assert found == []

    def test_the_exit_status_and_the_exit_functions_output_are_pythons(self, tmp_path):
        program = script(
            tmp_path,
            """\
            import atexit, sys

            atexit.register(print, "second")
            atexit.register(print, "first")
            print("main")
            sys.exit(4)
            """,
        )
        plain = subprocess.run([sys.executable, str(program)], capture_output=True, text=True, check=False)
        result, found = run_watched(tmp_path, program)
        assert (result.returncode, result.stdout) == (plain.returncode, plain.stdout) == (4, "main\nfirst\nsecond\n")
        assert found == []


class TestUnderInstall:
    def test_they_are_reported_with_no_error_of_asyncwatchs_at_shutdown(self, tmp_path):
        """Before, asyncio's report as Python cleared the modules reached a
        detector whose modules were half gone: "sys.meta_path is None", an
        internal error on stderr, and no finding."""
        out = tmp_path / "findings.jsonl"
        source = textwrap.dedent(FAILED_TASK_IN_A_LIST).replace(
            "import asyncio\n", f"import asyncio\nimport asyncwatch\nasyncwatch.install(findings={str(out)!r})\n", 1
        )
        program = tmp_path / "app.py"
        program.write_text(source)
        result = subprocess.run(
            [sys.executable, str(program)], capture_output=True, text=True, check=False, cwd=tmp_path, timeout=900
        )
        assert result.returncode == 0, result.stderr
        assert [(f["kind"], f["site"]["line"]) for f in findings_of(out)] == [
            ("task_exception_unretrieved", line_in(program, "# <- the failed task"))
        ]
        assert "internal_error" not in result.stderr

    def test_an_exit_functions_loop_is_watched_where_python_starts_threads(self, tmp_path):
        """Python 3.12 starts no thread while it shuts down, exit functions
        included: there the watchdog cannot run, and says nothing of it
        (it reported an internal error); 3.11 and 3.13 watch that loop."""
        out = tmp_path / "findings.jsonl"
        program = tmp_path / "app.py"
        program.write_text(
            textwrap.dedent(
                f"""\
                import asyncio, atexit, time
                import asyncwatch

                asyncwatch.install(findings={str(out)!r})

                async def close_pool():
                    time.sleep(0.25)  # <- blocks at exit
                    await asyncio.sleep(0)

                atexit.register(lambda: asyncio.run(close_pool()))
                """
            )
        )
        result = subprocess.run(
            [sys.executable, str(program)], capture_output=True, text=True, check=False, cwd=tmp_path, timeout=900
        )
        assert result.returncode == 0, result.stderr
        assert "internal_error" not in result.stderr
        found = [(f["kind"], f["site"]["line"]) for f in findings_of(out) if f["cause"] not in ("starved", "gil")]
        if sys.version_info[:2] == (3, 12):
            assert found == []
        else:
            assert found == [("slow_callback", line_in(program, "# <- blocks at exit"))]


CRASH = """\
    import asyncio
    import os

    if os.environ.get("WATCH_WITH_INSTALL"):
        import asyncwatch

        asyncwatch.install()

    async def charge(order):
        raise ValueError(f"card declined for order {{order}}")

    async def main():
        await asyncio.gather(charge(7))

    {run}
"""

RUNS = {
    "asyncio.run": "asyncio.run(main())",
    "Runner": "with asyncio.Runner() as runner:\n        runner.run(main())",
    "by hand": "loop = asyncio.new_event_loop()\n    loop.run_until_complete(main())",
}


def _frames(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("  File ")]


@pytest.mark.skipif(
    extension() is None, reason="without the extension, the loop-start hook is a Python frame (README, Limits)"
)
class TestAProgramThatCrashes:
    """asyncwatch sees a loop start through hooks on asyncio's methods; a
    hook written in Python was a frame of asyncwatch's in the traceback of
    every program that crashed under ``asyncio.run()``."""

    @pytest.mark.parametrize("how", list(RUNS))
    @pytest.mark.parametrize("watched_by", ["asyncwatch run", "install()"])
    def test_its_traceback_is_plain_pythons(self, tmp_path: Path, how: str, watched_by: str) -> None:
        program = script(tmp_path, CRASH.format(run=RUNS[how]))
        env = {k: v for k, v in os.environ.items() if not k.startswith("ASYNCWATCH_")}
        plain = subprocess.run(
            [sys.executable, str(program)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900
        )
        if watched_by == "install()":
            watched = subprocess.run(
                [sys.executable, str(program)],
                cwd=tmp_path,
                env={**env, "WATCH_WITH_INSTALL": "1"},
                capture_output=True,
                text=True,
                timeout=900,
            )
        else:
            watched, _ = run_watched(tmp_path, program)
        assert plain.returncode == watched.returncode == 1
        assert "ValueError: card declined for order 7" in watched.stderr
        assert _frames(watched.stderr) == _frames(plain.stderr), watched.stderr
        assert "asyncwatch" not in "".join(_frames(watched.stderr))
