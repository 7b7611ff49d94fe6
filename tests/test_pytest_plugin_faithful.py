"""The pytest plugin changes nothing it was not asked to, and, asked, changes
outcomes only through findings (issue 10).  Black-box, with `pytester`."""

from __future__ import annotations

import json
import sys
import textwrap

import pytest

import asyncwatch

pytest_plugins = ["pytester"]

INI = "[pytest]\nasyncio_mode = auto\nasyncio_default_fixture_loop_scope = function\n"


@pytest.fixture
def suite(pytester: pytest.Pytester):
    class Suite:
        path = pytester.path

        def module(self, source: str, name: str = "test_it") -> None:
            pytester.makepyfile(**{name: textwrap.dedent(source)})

        def file(self, relpath: str, source: str) -> None:
            target = pytester.path / relpath
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(textwrap.dedent(source))

        def run(self, *args: str) -> pytest.RunResult:
            if not (pytester.path / "pytest.ini").exists():
                pytester.makefile(".ini", pytest=INI)
            return pytester.runpytest("-p", "no:cacheprovider", "-W", "ignore::RuntimeWarning", *args)

        def line_of(self, marker: str = "# <-", name: str = "test_it") -> int:
            text = (pytester.path / f"{name}.py").read_text().splitlines()
            return next(n for n, line in enumerate(text, 1) if marker in line)

    yield Suite()
    assert not asyncwatch.is_installed(), "the plugin left asyncwatch installed"


def outcomes(result: pytest.RunResult) -> dict[str, int]:
    return result.parseoutcomes()


# A test module holding what real suites hold at module and class level.
STRANGE_MODULE = """
    import asyncio
    from types import FunctionType
    from unittest import mock

    import pytest

    pytestmark = [pytest.mark.filterwarnings("ignore::DeprecationWarning")]

    helper = mock.Mock()
    magic = mock.MagicMock()
    FunctionType = FunctionType


    class Raises:
        def __getattr__(self, name):
            raise RuntimeError(f"no {name} here")


    test_thing = Raises()


    class Descriptor:
        def __get__(self, obj, owner):
            raise AttributeError("descriptor refuses")


    class TestMarked:
        pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")  # one MarkDecorator, not a list
        weird = Descriptor()
        mocked = mock.Mock()

        def test_method(self):
            assert True

        async def test_async_method(self):
            await asyncio.sleep(0)


    def test_plain():
        assert helper.anything() is not None


    async def test_async():
        await asyncio.sleep(0)
"""


class TestInertUntilAsked:
    """Installed, not enabled: collection and outcomes are those of ``-p no:asyncwatch``."""

    def test_whatever_a_module_holds_collects_as_without_the_plugin(self, suite):
        suite.module(STRANGE_MODULE)
        without = outcomes(suite.run("-p", "no:asyncwatch"))
        installed = suite.run()
        assert outcomes(installed) == without
        assert without.get("passed") == 4 and "errors" not in without and "error" not in without

    def test_whatever_a_module_holds_collects_with_asyncwatch_on(self, suite):
        suite.module(STRANGE_MODULE)
        result = suite.run("--asyncwatch")
        assert outcomes(result) == outcomes(suite.run("-p", "no:asyncwatch"))

    @pytest.mark.parametrize("enabled", [False, True], ids=["installed", "enabled"])
    def test_errors_in_fixtures_and_tests_show_no_frame_of_the_plugin(self, suite, enabled):
        """A fixture failing at setup or teardown, or a test failing, is reported as without asyncwatch."""
        suite.module(
            """
            import pytest

            @pytest.fixture
            def broken_setup():
                raise RuntimeError("setup broke")

            @pytest.fixture
            def broken_teardown():
                yield
                raise RuntimeError("teardown broke")

            def test_setup(broken_setup):
                pass

            def test_teardown(broken_teardown):
                pass

            async def test_body():
                raise ValueError("body broke")
            """
        )
        result = suite.run(*(["--asyncwatch"] if enabled else []))
        assert outcomes(result) == outcomes(suite.run("-p", "no:asyncwatch"))
        out = result.stdout.str()
        assert "setup broke" in out and "teardown broke" in out and "body broke" in out
        assert "pytest_plugin.py" not in out

    def test_a_test_failed_for_a_finding_shows_the_finding_and_nothing_about_frames(self, suite):
        suite.module(
            """
            import asyncio

            async def save():
                pass

            async def test_it():
                save()  # <- never awaited
            """
        )
        result = suite.run("--asyncwatch")
        assert outcomes(result) == {"failed": 1}
        out = result.stdout.str()
        assert "coroutine_never_awaited" in out and f"test_it.py:{suite.line_of('# <- never')}" in out
        assert "traceback entries are hidden" not in out and "pytest_plugin.py" not in out

    @pytest.mark.parametrize("enabled", [False, True], ids=["installed", "enabled"])
    def test_pytests_own_setup_errors_show_no_frame_of_the_plugin(self, suite, enabled):
        """aiojobs' suite run without its asyncio mode: pytest's own setup state
        fails an assertion for every test after the first, which pytest once
        reported at the plugin's hook wrapper (the only frame outside pytest)."""
        suite.file("pytest.ini", "[pytest]\nasyncio_default_fixture_loop_scope = function\n")
        suite.module(
            """
            import pytest

            @pytest.fixture
            async def scheduler():
                yield 1

            def test_first(scheduler):
                pass

            def test_second(scheduler):
                pass
            """
        )
        result = suite.run(*(["--asyncwatch"] if enabled else []))
        assert outcomes(result) == outcomes(suite.run("-p", "no:asyncwatch"))
        assert "pytest_plugin.py" not in result.stdout.str()

    def test_a_marked_function_beside_strange_objects_is_still_watched(self, suite):
        suite.module(
            STRANGE_MODULE
            + """

    @pytest.mark.asyncwatch
    async def test_marked():
        asyncio.ensure_future(asyncio.sleep(3600))  # <-
        await asyncio.sleep(0)
"""
        )
        result = suite.run()
        result.assert_outcomes(passed=5, errors=1)  # the leak fails its teardown
        result.stdout.fnmatch_lines(
            [
                "*ERROR at teardown of test_marked*",
                f"asyncwatch (teardown): task_leaked at test_it.py:{suite.line_of()}",
            ]
        )


class TestFaithfulWhenOn:
    """Watching changes no outcome except through findings."""

    def test_the_collector_is_never_frozen(self, suite):
        suite.module(
            """
            import gc

            OLD = {"payload": 1}
            HOLDER = [OLD]
            FROZEN_AT_IMPORT = gc.get_freeze_count()  # 3.12 starts with some of its own

            async def test_nothing_frozen():
                assert gc.get_freeze_count() == FROZEN_AT_IMPORT

            def test_old_referrers_are_seen():
                assert any(r is HOLDER for r in gc.get_referrers(OLD))

            def test_collect_frees_a_cycle_through_old_objects():
                import weakref

                class Node:
                    pass

                node = Node()
                node.cycle = node
                node.old = HOLDER
                ref = weakref.ref(node)
                del node
                gc.collect()
                assert ref() is None
            """
        )
        suite.run("--asyncwatch").assert_outcomes(passed=3)

    def test_asyncwatch_threads_are_invisible_to_the_tests(self, suite):
        suite.module(
            """
            import threading
            import time

            async def test_blocks():
                time.sleep(0.15)  # a slow callback: the watchdog thread has seen the loop

            def test_only_the_main_thread():
                assert threading.active_count() == 1, threading.enumerate()
                assert [t.name for t in threading.enumerate()] == ["MainThread"]
            """
        )
        result = suite.run("--asyncwatch", "--asyncwatch-findings", "f.jsonl", "-p", "no:randomly")
        result.assert_outcomes(passed=1, failed=1)
        result.stdout.fnmatch_lines(["*test_blocks*", "asyncwatch: slow_callback at test_it.py:*"])

    def test_garbage_of_a_test_is_reported_in_that_test_not_the_next(self, suite):
        suite.module(
            """
            import asyncio

            async def save():
                pass

            class Cycle:
                pass

            async def test_drops():
                cycle = Cycle()
                cycle.me = cycle
                cycle.coro = save()  # <-

            async def test_next():
                await asyncio.sleep(0)
            """
        )
        result = suite.run("--asyncwatch", "-v")
        result.assert_outcomes(passed=1, failed=1)
        result.stdout.fnmatch_lines(["*test_drops FAILED*", "*test_next PASSED*"])

    def test_garbage_that_grew_old_during_the_test_is_still_the_tests(self, suite):
        """A collection during the test moves its objects to the old
        generation; asyncwatch then collects in full at the test's end."""
        suite.module(
            """
            import asyncio
            import gc

            async def save():
                pass

            class Cycle:
                pass

            async def test_drops_old_garbage():
                cycle = Cycle()
                cycle.me = cycle
                cycle.coro = save()  # <-
                gc.collect()  # everything alive is old now
                del cycle

            async def test_next():
                await asyncio.sleep(0)
            """
        )
        result = suite.run("--asyncwatch", "-v")
        result.stdout.fnmatch_lines(["*test_drops_old_garbage FAILED*", "*test_next PASSED*"])
        result.stdout.fnmatch_lines([f"*coroutine_never_awaited at test_it.py:{suite.line_of()}*"])

    def test_what_the_collection_makes_a_finalizer_raise_is_the_dropping_tests(self, suite):
        """The garbage asyncwatch collects at a test's end is reported, by
        pytest's unraisable-exception check, in that test: never in the next
        test's setup."""
        suite.module(
            """
            import asyncio

            import pytest

            class Cycle:
                def __del__(self):
                    raise ValueError("finalizer of the first test's garbage")

            @pytest.fixture
            def holder():
                held = [Cycle()]
                held[0].me = held[0]
                yield held
                held.clear()  # garbage from the fixture's teardown on

            async def test_drops(holder):
                pass

            async def test_next():
                await asyncio.sleep(0)
            """
        )
        result = suite.run("--asyncwatch", "-v", "-W", "error::pytest.PytestUnraisableExceptionWarning")
        result.stdout.fnmatch_lines(["*test_drops ERROR*", "*test_next PASSED*"])
        result.assert_outcomes(passed=2, errors=1)
        result.stdout.fnmatch_lines(["*ValueError: finalizer of the first test's garbage*"])


class TestEveryLoop:
    """Every loop a test runs is watched, with the plugin's settings."""

    def test_a_runner_with_a_custom_loop_factory_is_watched(self, suite):
        suite.module(
            """
            import asyncio
            import time

            def factory():
                return asyncio.SelectorEventLoop()

            async def block():
                time.sleep(0.15)  # <-

            def test_runner():
                with asyncio.Runner(loop_factory=factory) as runner:
                    runner.run(block())
            """
        )
        result = suite.run("--asyncwatch")
        result.assert_outcomes(failed=1)
        result.stdout.fnmatch_lines([f"*slow_callback at test_it.py:{suite.line_of()}*"])

    @pytest.mark.skipif(sys.platform == "win32", reason="uvloop")
    def test_a_uvloop_runner_is_watched(self, suite):
        pytest.importorskip("uvloop")
        suite.module(
            """
            import asyncio
            import uvloop

            async def save():
                pass

            async def drop():
                save()  # <-

            def test_uvloop():
                with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
                    runner.run(drop())
            """
        )
        result = suite.run("--asyncwatch")
        result.assert_outcomes(failed=1)
        result.stdout.fnmatch_lines([f"*coroutine_never_awaited at test_it.py:{suite.line_of()}*"])

    def test_isolated_asyncio_test_cases_are_watched_and_judged(self, suite):
        suite.module(
            """
            import asyncio
            import unittest

            class TestCase(unittest.IsolatedAsyncioTestCase):
                async def test_cancels_and_awaits(self):
                    self.task = asyncio.ensure_future(asyncio.sleep(3600))  # <-
                    await asyncio.sleep(0)
                    self.task.cancel()
                    try:
                        await self.task
                    except asyncio.CancelledError:
                        pass

                async def test_drops(self):
                    async def save():
                        pass

                    save()  # <- dropped

                async def test_clean(self):
                    await asyncio.sleep(0)
            """
        )
        result = suite.run("--asyncwatch")
        result.assert_outcomes(passed=2, failed=1)
        result.stdout.fnmatch_lines(
            [
                "*TestCase.test_drops*",
                f"asyncwatch: coroutine_never_awaited at test_it.py:{suite.line_of('# <- dropped')}",
            ]
        )
        assert outcomes(suite.run()) == {"passed": 3}


# A library installed in a virtual environment: every frame of it is library code.
FAKE_LIBRARY = """
    import asyncio

    async def _shutdown():
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            pass  # swallowed on purpose, as a library's own shutdown task may

    async def _never():
        pass

    def drop_from_a_callback():
        _never()

    def schedule_drop():
        asyncio.get_running_loop().call_soon(drop_from_a_callback)
"""


class TestSites:
    """A useful site when no application frame exists; library findings decided by option."""

    @pytest.fixture
    def library(self, suite, monkeypatch):
        suite.file("venv/lib/site-packages/fakelib.py", FAKE_LIBRARY)
        monkeypatch.syspath_prepend(str(suite.path / "venv/lib/site-packages"))
        suite.module(
            """
            import asyncio
            import fakelib

            async def test_library_drops():  # <- test line
                fakelib.schedule_drop()
                await asyncio.sleep(0)
                await asyncio.sleep(0)
            """
        )
        return suite

    def test_no_application_frame_gives_the_tests_own_line(self, library):
        result = library.run("--asyncwatch", "--asyncwatch-findings", "f.jsonl")
        result.assert_outcomes(passed=1)  # fail_on=project: a finding in library code is reported
        line = library.line_of("# <- test line")
        result.stdout.fnmatch_lines(
            [
                "*asyncwatch findings*",
                "*test_library_drops (reported, not failing)*",
                f"*coroutine_never_awaited at test_it.py:{line}*",
                "*the site given is the test's own line*",
                "*not failing the test: no frame of the project's own code was running*",
                "*--asyncwatch-fail-on=all*",
            ]
        )
        (record,) = [json.loads(x) for x in (library.path / "f.jsonl").read_text().splitlines()]
        assert record["site"]["line"] == line and record["site"]["file"].endswith("test_it.py")
        assert record["counts"] is False and "fail_on=project" in record["not_counted"]

    def test_fail_on_all_fails_for_library_findings(self, library):
        result = library.run("--asyncwatch", "--asyncwatch-fail-on=all")
        result.assert_outcomes(failed=1)
        result.stdout.fnmatch_lines([f"*coroutine_never_awaited at test_it.py:{library.line_of('# <- test line')}*"])

    def test_an_allowed_module_never_fails_even_with_fail_on_all(self, library):
        result = library.run("--asyncwatch", "--asyncwatch-fail-on=all", "--asyncwatch-allow-site=fakelib")
        result.assert_outcomes(passed=1)
        result.stdout.fnmatch_lines(["*reported, not failing*", "*matches the allowed site 'fakelib'*"])
        other = library.run("--asyncwatch", "--asyncwatch-fail-on=all", "--asyncwatch-allow-site=fakelib.sub")
        other.assert_outcomes(failed=1)

    def test_a_stall_inside_an_import_is_reported_not_failed(self, suite):
        """Importing a slow module inside a test's loop is start-up work, as under `asyncwatch run`."""
        suite.file("slowmod.py", "import time\ntime.sleep(0.3)\n")
        suite.module(
            """
            import importlib

            async def test_imports_lazily():
                importlib.import_module("slowmod")
            """
        )
        result = suite.run("--asyncwatch", "--asyncwatch-fail-on=all", "--asyncwatch-findings", "f.jsonl")
        result.assert_outcomes(passed=1)
        result.stdout.fnmatch_lines(["*reported, not failing*", "*inside an import*cause=import*"])
        (record,) = [json.loads(x) for x in (suite.path / "f.jsonl").read_text().splitlines()]
        assert record["kind"] == "slow_callback" and record["cause"] == "import"
        assert record["site"]["file"].endswith("slowmod.py") and record["site"]["line"] == 2  # the line importing ran
        assert record["counts"] is False

    def test_a_collector_pause_is_reported_not_failed(self, suite):
        """A full collection stalling a test's loop is the collector's, not a line of the test's (cause=gc)."""
        suite.module(
            """
            import asyncio
            import gc

            HEAP = [[] for _ in range(2_000_000)]  # ~0.12 s of collector CPU a full collection

            async def test_collects():
                await asyncio.sleep(0.02)
                list(map(gc.collect, [2]))  # a collection this line does not call (as an allocation's)
            """
        )
        result = suite.run(
            "--asyncwatch",
            "--asyncwatch-fail-on=all",
            "--asyncwatch-slow-callback-ms=50",
            "--asyncwatch-findings",
            "f.jsonl",
        )
        result.assert_outcomes(passed=1)
        result.stdout.fnmatch_lines(["*reported, not failing*", "*not the program's line (cause=gc)*"])
        records = [json.loads(x) for x in (suite.path / "f.jsonl").read_text().splitlines()]
        assert [(r["kind"], r["cause"], r["site"], r["counts"]) for r in records] == [
            ("slow_callback", "gc", None, False)
        ]

    def test_a_tests_own_gc_collect_is_reported_at_its_line_not_failed(self, suite):
        """The test's gc.collect() on the loop: its line is the site, cause gc, and it fails no test."""
        suite.module(
            """
            import asyncio
            import gc

            HEAP = [[] for _ in range(2_000_000)]  # ~0.12 s of collector CPU a full collection

            async def test_collects():
                await asyncio.sleep(0.02)
                gc.collect()
            """
        )
        result = suite.run(
            "--asyncwatch",
            "--asyncwatch-fail-on=all",
            "--asyncwatch-slow-callback-ms=50",
            "--asyncwatch-findings",
            "f.jsonl",
        )
        result.assert_outcomes(passed=1)
        result.stdout.fnmatch_lines(["*reported, not failing*", "*a collection this line asked for (cause=gc)*"])
        records = [json.loads(x) for x in (suite.path / "f.jsonl").read_text().splitlines()]
        assert [(r["kind"], r["cause"], r["site"]["line"], r["counts"]) for r in records] == [
            ("slow_callback", "gc", 8, False)
        ]

    def test_bad_fail_on_is_a_usage_error(self, suite):
        suite.module("def test_it(): pass")
        result = suite.run("--asyncwatch", "--asyncwatch-fail-on=everything")
        result.stderr.fnmatch_lines(["*--asyncwatch-fail-on='everything' is not valid*project*all*"])
        assert result.ret == pytest.ExitCode.USAGE_ERROR

    def test_an_allowed_site_reports_without_failing(self, suite):
        suite.module(
            """
            async def save():
                pass

            async def test_it():
                save()  # <-
            """
        )
        line = suite.line_of()
        result = suite.run("--asyncwatch", f"--asyncwatch-allow-site=test_it.py:{line}")
        result.assert_outcomes(passed=1)
        result.stdout.fnmatch_lines([f"*coroutine_never_awaited at test_it.py:{line}*", "*allowed site*"])
        suite.run("--asyncwatch", f"--asyncwatch-allow-site=test_it.py:{line + 1}").assert_outcomes(failed=1)


class TestXdist:
    """pytest-xdist: every worker watched, one findings file of whole lines."""

    def test_workers_share_one_valid_findings_file(self, suite, pytester):
        pytest.importorskip("xdist")
        suite.module(
            "\n".join(
                f"""
async def save_{i}():
    pass

async def test_{i}():
    save_{i}()
"""
                for i in range(6)
            )
        )
        result = suite.run("-n", "2", "--asyncwatch", "--asyncwatch-findings", "f.jsonl")
        result.assert_outcomes(failed=6)
        records = [json.loads(x) for x in (pytester.path / "f.jsonl").read_text().splitlines()]
        assert sorted(r["nodeid"] for r in records) == sorted(f"test_it.py::test_{i}" for i in range(6))
        assert {r["kind"] for r in records} == {"coroutine_never_awaited"}
        assert {r["worker"] for r in records} <= {"gw0", "gw1"}
        assert all(r["coroutine"].endswith(r["nodeid"].rsplit("_", 1)[1]) for r in records)


class TestHiddenThreads:
    """asyncwatch's own threads never show in ``threading`` (they are shared with `install()`)."""

    def test_watchdog_and_findings_writer_are_not_in_threading_enumerate(self, tmp_path):
        import asyncio
        import threading
        import time

        before = threading.enumerate()
        findings = tmp_path / "f.jsonl"

        async def main():
            time.sleep(0.15)  # a slow callback: the watchdog samples, the writer writes

        with asyncwatch.install(findings=str(findings), slow_callback_ms=50):
            asyncio.run(main())
            assert threading.enumerate() == before
            assert threading.active_count() == len(before)
        assert json.loads(findings.read_text().splitlines()[0])["kind"] == "slow_callback"
        assert threading.enumerate() == before

    @pytest.mark.skipif(not hasattr(__import__("os"), "fork"), reason="fork")
    def test_a_hidden_thread_is_not_alive_in_a_forked_child(self):
        import os
        import threading

        from asyncwatch._core.runtime import start_hidden_thread

        release = threading.Event()
        thread = start_hidden_thread(lambda: release.wait(60), "asyncwatch-test")
        try:
            assert thread.is_alive()
            pid = os.fork()
            if pid == 0:
                os._exit(0 if not thread.is_alive() else 1)
            _, status = os.waitpid(pid, 0)
            assert os.waitstatus_to_exitcode(status) == 0
        finally:
            release.set()
            thread.join(60)
        assert not thread.is_alive()
