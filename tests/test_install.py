"""The four ways in, and the promise that uninstall() leaves the interpreter as it found it."""

from __future__ import annotations

import asyncio
import asyncio.base_events
import gc
import os
import subprocess
import sys
import textwrap
import time
import warnings
import weakref

import pytest

import asyncwatch
from asyncwatch import FindingKind
from asyncwatch._core.findings import counts_against_program
from asyncwatch._outputs.collect import CollectingReporter
from asyncwatch._policy import get_policy, set_policy
from asyncwatch.testing import capture_findings
from conftest import base_factory, gc_collect_harder, line_of


def blamed(collector):
    """The findings the program is blamed for (not a collector pause of the test's own)."""
    return [f for f in collector.findings if counts_against_program(f)]


async def _block() -> None:
    time.sleep(0.25)  # <- install blocks here
    await asyncio.sleep(0)


def _engine_only(collector: CollectingReporter) -> None:
    """Start asyncwatch without watching future loops, so that a test sees
    only the loops its own entry point attaches."""
    loop = asyncio.new_event_loop()
    asyncwatch.install(loop=loop, reporters=[collector], log=False)
    loop.close()


def _snapshot(loop: asyncio.AbstractEventLoop | None = None) -> dict[str, object]:
    snap: dict[str, object] = {
        "warn_unawaited": warnings._warn_unawaited_coroutine,  # type: ignore[attr-defined]
        "set_running_loop": asyncio.events._set_running_loop,
        "runner_init": asyncio.Runner.__dict__.get("_lazy_init"),
        "run_until_complete": asyncio.base_events.BaseEventLoop.__dict__["run_until_complete"],
        "gathering_future_init": asyncio.tasks._GatheringFuture.__dict__["__init__"],
        "policy": get_policy(),
        "origin_depth": sys.get_coroutine_origin_tracking_depth(),
        "gc_callbacks": list(gc.callbacks),
    }
    if loop is not None:
        snap["task_factory"] = loop.get_task_factory()
        snap["exception_handler"] = loop.get_exception_handler()
    return snap


class TestInstallInsideARunningLoop:
    def test_watches_the_running_loop(self, loop_name):
        """install() called from a coroutine watches the loop it runs on."""
        collector = CollectingReporter()

        async def main():
            asyncwatch.install(reporters=[collector], log=False, slow_callback_ms=100)
            await asyncio.sleep(0)
            await _block()

        with asyncio.Runner(loop_factory=base_factory(loop_name)) as runner:
            runner.run(main())
        slow = [f for f in collector.findings if f.kind is FindingKind.SLOW_CALLBACK]
        assert [f.site.line for f in slow] == [line_of("# <- install blocks here")]

    def test_is_idempotent(self):
        """Installing twice attaches once: one task factory, one report per mistake."""
        collector = CollectingReporter()

        async def main():
            loop = asyncio.get_running_loop()
            asyncwatch.install(reporters=[collector], log=False)
            factory = loop.get_task_factory()
            asyncwatch.install(log=False)
            assert loop.get_task_factory() is factory
            await _block()

        asyncio.run(main())
        assert [f.kind for f in collector.findings] == [FindingKind.SLOW_CALLBACK]


class TestInstallBeforeAnyLoop:
    def test_watches_loops_made_by_asyncio_run(self):
        """install() at start-up watches the loop asyncio.run() creates later."""
        collector = CollectingReporter()
        asyncwatch.install(reporters=[collector], log=False)
        asyncio.run(_block())
        assert [f.site.line for f in collector.findings] == [line_of("# <- install blocks here")]

    def test_watches_loops_made_by_hand_and_started_later(self):
        """A loop instantiated directly (not through the policy) is watched once it runs."""
        collector = CollectingReporter()
        asyncwatch.install(reporters=[collector], log=False)
        loop = asyncio.SelectorEventLoop()
        try:
            loop.run_until_complete(_block())
        finally:
            loop.close()
        assert [f.kind for f in collector.findings] == [FindingKind.SLOW_CALLBACK]

    def test_the_first_task_of_a_hand_made_loop_is_tracked(self):
        """run_until_complete(coro) makes coro's task before the loop runs: a
        loop made by hand is attached first, so that task has its creation
        site and its swallowed cancellation is seen."""
        collector = CollectingReporter()
        asyncwatch.install(reporters=[collector], log=False)

        async def swallow():
            try:
                await asyncio.sleep(10)
            except asyncio.CancelledError:
                pass

        async def main():
            task = asyncio.current_task()
            asyncio.get_running_loop().call_later(0.01, task.cancel)
            await swallow()

        loop = asyncio.SelectorEventLoop()
        try:
            loop.run_until_complete(main())  # <- first task of a hand-made loop
        finally:
            loop.close()
        [found] = [f for f in collector.findings if f.kind is FindingKind.CANCELLATION_SWALLOWED]
        assert found.created_at.line == line_of("# <- first task of a hand-made loop")

    @pytest.mark.parametrize("how", ["Runner", "uvloop.run"])
    def test_watches_uvloop_loops_given_to_a_runner(self, how):
        """uvloop keeps its own reference to asyncio's loop-start hook, so its loops
        are caught as asyncio.Runner makes them: ``uvloop.run(main())`` and
        ``asyncio.Runner(loop_factory=uvloop.new_event_loop)`` are watched."""
        uvloop = pytest.importorskip("uvloop")
        collector = CollectingReporter()
        asyncwatch.install(reporters=[collector], log=False)
        if how == "Runner":
            with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
                runner.run(_block())
        else:
            uvloop.run(_block())
        assert [(f.kind, f.site.line) for f in collector.findings] == [
            (FindingKind.SLOW_CALLBACK, line_of("# <- install blocks here"))
        ]

    def test_watches_a_uvloop_loop_run_by_hand_when_uvloop_is_imported_after_install(self, tmp_path):
        """uvloop takes asyncio's loop-start hook when it is imported: imported
        after install() (as under ``asyncwatch run``), a uvloop loop the
        program runs itself is watched (aiohttp's ``web.run_app(app,
        loop=uvloop.new_event_loop())`` went unwatched)."""
        pytest.importorskip("uvloop")
        script = tmp_path / "by_hand.py"
        script.write_text(
            textwrap.dedent(
                """\
                import asyncio, time
                import asyncwatch
                from asyncwatch._outputs.collect import CollectingReporter

                collector = CollectingReporter()
                asyncwatch.install(reporters=[collector], log=False)
                import uvloop

                async def main():
                    await asyncio.sleep(0)
                    time.sleep(0.3)  # <- blocks the hand-run uvloop loop
                    await asyncio.sleep(0)

                loop = uvloop.new_event_loop()
                loop.run_until_complete(main())
                loop.close()
                asyncwatch.uninstall()
                assert asyncio._set_running_loop is asyncio.events._set_running_loop
                print([(f.kind.value, f.site.line) for f in collector.findings])
                """
            )
        )
        out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, check=True)
        assert out.stdout.strip() == "[('slow_callback', 11)]", out.stderr

    def test_a_hand_run_uvloop_loops_runner_line_is_never_a_library_callbacks_site(self, tmp_path):
        """uvloop calls back from C: the Python caller of a library callback
        is the frame that runs the loop.  A task the library makes there, or
        a cancel() it calls, was not made by that line: the site and the
        canceller are unknown, not the program's ``run_until_complete`` line.
        The program's own callback keeps its line."""
        pytest.importorskip("uvloop")
        library = tmp_path / "lib" / "site-packages" / "spawnlib"
        library.mkdir(parents=True)
        (library / "__init__.py").write_text(
            textwrap.dedent(
                """\
                import asyncio

                async def forever():
                    await asyncio.get_running_loop().create_future()

                def spawn_later(loop):
                    loop.call_soon(_spawn, loop)

                def _spawn(loop):
                    loop.create_task(forever())  # dropped at once

                def cancel_later(loop, task):
                    loop.call_soon(_cancel, task)

                def _cancel(task):
                    task.cancel()
                """
            )
        )
        script = tmp_path / "by_hand.py"
        script.write_text(
            textwrap.dedent(
                """\
                import asyncio, gc
                import asyncwatch
                from asyncwatch._outputs.collect import CollectingReporter

                collector = CollectingReporter()
                asyncwatch.install(reporters=[collector], log=False)
                import uvloop, spawnlib

                def program_spawn(loop):
                    loop.create_task(spawnlib.forever())  # <- the program's callback

                async def swallows():
                    try:
                        await asyncio.sleep(10)
                    except asyncio.CancelledError:
                        return "carried on"

                async def main():
                    loop = asyncio.get_running_loop()
                    spawnlib.spawn_later(loop)
                    loop.call_soon(program_spawn, loop)
                    for _ in range(3):
                        await asyncio.sleep(0)
                    gc.collect()
                    task = loop.create_task(swallows())
                    await asyncio.sleep(0)
                    spawnlib.cancel_later(loop, task)
                    await task

                loop = uvloop.new_event_loop()
                loop.run_until_complete(main())  # <- runs the loop
                loop.close()
                gc.collect()
                print(sorted((f.kind.value, f.site and f.site.line or 0) for f in collector.findings
                             if f.kind.value == "task_destroyed_pending"), flush=True)
                print([f.cancelled_by for f in collector.findings if f.kind.value == "cancellation_swallowed"], flush=True)
                """
            )
        )
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(library.parent), *sys.path])}
        out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=env, check=True)
        *_, created, cancelled = out.stdout.strip().splitlines()
        assert created == "[('task_destroyed_pending', 0), ('task_destroyed_pending', 10)]", out.stdout + out.stderr
        assert cancelled == "[None]", out.stdout + out.stderr

    def test_wraps_the_current_policy_and_restores_it(self):
        """A base policy set by the program (uvloop's, say) keeps making the loops."""
        uvloop = pytest.importorskip("uvloop")
        original = get_policy()
        base = uvloop.EventLoopPolicy()
        set_policy(base)
        try:
            collector = CollectingReporter()
            asyncwatch.install(reporters=[collector], log=False)

            async def main():
                assert type(asyncio.get_running_loop()).__module__.startswith("uvloop")
                await _block()

            asyncio.run(main())
            assert [f.kind for f in collector.findings] == [FindingKind.SLOW_CALLBACK]
            asyncwatch.uninstall()
            assert get_policy() is base
        finally:
            set_policy(original)


class TestLoopFactory:
    @pytest.mark.parametrize("order", ["install first", "factory first"])
    def test_a_loop_factorys_own_options_win_over_installs(self, loop_name, order):
        """install() sets a policy, through which asyncio.new_event_loop()
        attaches the loop with install()'s settings before the loop factory
        does: its own ``slow_callback_ms`` was ignored (60 ms unreported
        at a 20 ms threshold)."""
        collector = CollectingReporter()
        if order == "install first":
            asyncwatch.install(reporters=[collector], log=False)
        factory = asyncwatch.loop_factory(base_factory(loop_name), log=False, slow_callback_ms=20)
        if order == "factory first":
            asyncwatch.install(reporters=[collector], log=False)

        async def main():
            await asyncio.sleep(0.01)
            time.sleep(0.06)  # <- 60 ms, over the factory's 20 ms
            await asyncio.sleep(0)

        with asyncio.Runner(loop_factory=factory) as runner:
            runner.run(main())
        [finding] = collector.findings
        assert finding.kind is FindingKind.SLOW_CALLBACK
        assert finding.site.line == line_of("# <- 60 ms, over the factory's 20 ms")
        assert "(threshold 20 ms)" in finding.message

    def test_runner_with_loop_factory_is_watched(self, loop_name):
        """asyncio.Runner(loop_factory=asyncwatch.loop_factory(base)) watches its loop."""
        with (
            asyncio.Runner(loop_factory=asyncwatch.loop_factory(base_factory(loop_name), log=False)) as runner,
            capture_findings() as found,
        ):
            runner.run(_block())
        assert [f.site.line for f in found] == [line_of("# <- install blocks here")]

    @pytest.mark.skipif(sys.version_info < (3, 12), reason="asyncio.run(loop_factory=) is 3.12+")
    def test_asyncio_run_with_new_event_loop_is_watched(self):
        """asyncio.run(main(), loop_factory=asyncwatch.new_event_loop) watches its loop."""
        collector = CollectingReporter()
        _engine_only(collector)
        asyncio.run(_block(), loop_factory=asyncwatch.new_event_loop)
        assert [f.kind for f in collector.findings] == [FindingKind.SLOW_CALLBACK]

    def test_bad_option_fails_at_the_call_site(self):
        """A typo in an option is an error naming the option and the valid ones."""
        with pytest.raises(
            asyncwatch.ConfigurationError, match=r"unknown asyncwatch option 'slow_ms'.*slow_callback_ms"
        ):
            asyncwatch.loop_factory(slow_ms=10)


class TestEventLoopPolicy:
    def test_policy_loops_are_watched(self, loop_name):
        """asyncio.set_event_loop_policy(asyncwatch.EventLoopPolicy(base)) watches asyncio.run's loop."""
        original = get_policy()
        base = None
        if loop_name == "uvloop":
            import uvloop

            base = uvloop.EventLoopPolicy()
        collector = CollectingReporter()
        _engine_only(collector)
        set_policy(asyncwatch.EventLoopPolicy(base))
        try:
            asyncio.run(_block())
        finally:
            set_policy(original)
        assert [f.kind for f in collector.findings] == [FindingKind.SLOW_CALLBACK]

    def test_policy_options_apply_to_its_loops(self):
        """Options given to the policy (a lower threshold) govern its loops."""
        original = get_policy()
        collector = CollectingReporter()
        _engine_only(collector)
        set_policy(asyncwatch.EventLoopPolicy(slow_callback_ms=30))

        async def main():
            time.sleep(0.08)
            await asyncio.sleep(0)

        try:
            asyncio.run(main())
        finally:
            set_policy(original)
        assert [f.kind for f in collector.findings] == [FindingKind.SLOW_CALLBACK]

    @pytest.mark.skipif(not hasattr(os, "fork"), reason="no fork on this platform")
    @pytest.mark.skipif(sys.version_info < (3, 12), reason="asyncio resets its policy at fork from 3.12")
    @pytest.mark.filterwarnings("ignore:This process .* is multi-threaded:DeprecationWarning")
    def test_a_forked_child_does_not_share_the_parents_loop(self):
        """asyncio makes a forked child forget its policy's event loop (3.12+):
        with asyncwatch's policy in place too, the child gets a loop of its own."""
        original = get_policy()
        set_policy(asyncwatch.EventLoopPolicy())
        parent = asyncio.new_event_loop()
        read_end, write_end = os.pipe()
        try:
            asyncio.set_event_loop(parent)
            pid = os.fork()
            if pid == 0:  # pragma: no cover - the child always leaves through os._exit
                try:
                    with warnings.catch_warnings():
                        warnings.simplefilter("ignore", DeprecationWarning)  # "no current event loop"
                        child = asyncio.get_event_loop_policy().get_event_loop()
                    os.write(write_end, b"parent's" if child is parent else b"its own")
                finally:
                    os._exit(0)
            os.close(write_end)
            answer = os.read(read_end, 100)
            assert os.waitpid(pid, 0)[1] == 0
        finally:
            os.close(read_end)
            asyncio.set_event_loop(None)
            parent.close()
            set_policy(original)
        assert answer == b"its own"


class TestUninstall:
    def test_restores_every_hook_of_the_loop(self, loop_name):
        """Task factory and exception handler, including the program's own, come back."""

        def their_factory(loop, coro, **kw):
            return asyncio.Task(coro, loop=loop, **kw)

        def their_handler(loop, context):
            pass

        loop = base_factory(loop_name)()
        try:
            loop.set_task_factory(their_factory)
            loop.set_exception_handler(their_handler)
            before = _snapshot(loop)
            asyncwatch.install(loop=loop, log=False)
            assert loop.get_task_factory() is not their_factory
            assert loop.get_exception_handler() is not their_handler
            asyncwatch.uninstall()
            assert _snapshot(loop) == before
        finally:
            loop.close()

    def test_restores_gathers_init_which_it_wraps_while_a_loop_is_watched(self):
        """The task detectors wrap ``_GatheringFuture.__init__`` (a gather of gathers makes no task)."""
        before = _snapshot()
        seen = []

        async def main():
            seen.append(asyncio.tasks._GatheringFuture.__dict__["__init__"])

        handle = asyncwatch.install(log=False)
        asyncio.run(main())
        handle.uninstall()
        assert seen[0] is not before["gathering_future_init"]
        assert seen[0].__wrapped__ is before["gathering_future_init"]
        assert _snapshot() == before

    def test_restores_process_wide_hooks(self):
        """Warnings hook, loop-start hook, policy, origin tracking and gc callbacks come back."""
        before = _snapshot()
        handle = asyncwatch.install(log=False, track_coroutine_origins=True)
        assert sys.get_coroutine_origin_tracking_depth() > 0
        assert asyncio.events._set_running_loop is not before["set_running_loop"]
        assert asyncio.Runner.__dict__.get("_lazy_init") is not before["runner_init"]
        assert asyncio.base_events.BaseEventLoop.__dict__["run_until_complete"] is not before["run_until_complete"]
        handle.uninstall()
        assert _snapshot() == before
        assert not asyncwatch.is_installed()

    def test_a_hook_wrapped_by_someone_else_is_left_in_place_but_inert(self):
        """If another library wrapped our task factory, uninstall keeps theirs and ours does nothing."""
        collector = CollectingReporter()

        async def main():
            loop = asyncio.get_running_loop()
            asyncwatch.install(reporters=[collector], log=False)
            ours = loop.get_task_factory()
            calls = []

            def theirs(loop, coro, **kw):
                calls.append(coro)
                return ours(loop, coro, **kw)

            loop.set_task_factory(theirs)
            asyncwatch.uninstall()
            assert loop.get_task_factory() is theirs
            task = asyncio.create_task(asyncio.sleep(0))
            await task
            assert type(task) is asyncio.Task  # ours went inert: plain asyncio tasks again
            assert len(calls) == 1

        asyncio.run(main())

    def test_context_manager_uninstalls(self):
        """`with asyncwatch.install():` uninstalls on exit."""
        with asyncwatch.install(log=False):
            assert asyncwatch.is_installed()
        assert not asyncwatch.is_installed()


class TestChaining:
    def test_program_exception_handler_still_sees_every_context(self, loop_name):
        """The program's own exception handler receives the contexts asyncwatch also reports."""
        seen = []
        collector = CollectingReporter()

        async def boom():
            raise ValueError("boom")

        async def main():
            loop = asyncio.get_running_loop()
            loop.set_exception_handler(lambda loop, ctx: seen.append(ctx["message"]))
            asyncwatch.install(reporters=[collector], log=False)
            asyncio.create_task(boom())
            await asyncio.sleep(0.01)
            gc_collect_harder()

        with asyncio.Runner(loop_factory=base_factory(loop_name)) as runner:
            runner.run(main())
        assert seen == ["Task exception was never retrieved"]
        # (gc_collect_harder in the loop over a full suite's heap is a
        # collector pause: a slow_callback of cause gc, not the program's.)
        assert [f.kind for f in blamed(collector)] == [FindingKind.TASK_EXCEPTION_UNRETRIEVED]

    def test_program_task_factory_keeps_making_the_tasks(self, loop_name):
        """A task factory the program set before install() is chained, not replaced."""
        made = []
        collector = CollectingReporter()

        class MyTask(asyncio.Task):
            pass

        async def boom():
            raise ValueError("boom")

        async def main():
            loop = asyncio.get_running_loop()

            def factory(loop, coro, **kw):
                task = MyTask(coro, loop=loop, **kw)
                made.append(coro.__qualname__)
                return task

            loop.set_task_factory(factory)
            asyncwatch.install(reporters=[collector], log=False)
            task = asyncio.create_task(boom())  # <- foreign factory task
            assert isinstance(task, MyTask)
            del task
            await asyncio.sleep(0.01)
            gc_collect_harder()

        with asyncio.Runner(loop_factory=base_factory(loop_name)) as runner:
            runner.run(main())
        assert made.count("TestChaining.test_program_task_factory_keeps_making_the_tasks.<locals>.boom") == 1
        [finding] = blamed(collector)
        assert finding.kind is FindingKind.TASK_EXCEPTION_UNRETRIEVED
        assert finding.site.line == line_of("# <- foreign factory task")

    @pytest.mark.parametrize("hook", ["task_factory", "exception_handler"])
    def test_a_loop_is_freed_though_the_hook_it_chains_refers_to_it(self, loop_name, hook):
        """A program's task factory or exception handler that refers to its loop
        (a bound method of an object that keeps the loop) does not make
        asyncwatch keep the loop alive once the program dropped it."""

        class Owner:
            def __init__(self, loop):
                self.loop = loop

            def factory(self, loop, coro, **kwargs):
                return asyncio.Task(coro, loop=loop, **kwargs)

            def handler(self, loop, context):
                loop.default_exception_handler(context)

        _engine_only(CollectingReporter())
        loop = base_factory(loop_name)()
        owner = Owner(loop)
        if hook == "task_factory":
            loop.set_task_factory(owner.factory)
        else:
            loop.set_exception_handler(owner.handler)
        asyncwatch.install(loop=loop)
        assert asyncwatch._engine.current_engine().is_watching(loop)
        assert loop.run_until_complete(asyncio.sleep(0, "ran")) == "ran"
        loop.close()
        freed = weakref.ref(loop)
        del loop, owner
        gc_collect_harder()
        assert freed() is None

    @pytest.mark.skipif(sys.version_info < (3, 12), reason="eager tasks are 3.12+")
    def test_eager_task_factory_keeps_working(self):
        """With asyncio.eager_task_factory chained, tasks still start eagerly and are tracked."""
        collector = CollectingReporter()
        order = []

        async def step():
            order.append("task ran")
            raise ValueError("eager boom")

        async def main():
            loop = asyncio.get_running_loop()
            loop.set_task_factory(asyncio.eager_task_factory)
            asyncwatch.install(reporters=[collector], log=False)
            asyncio.create_task(step())  # <- eager task
            order.append("after create_task")
            await asyncio.sleep(0)
            gc_collect_harder()

        asyncio.run(main())
        assert order == ["task ran", "after create_task"]
        [finding] = blamed(collector)
        assert finding.site.line == line_of("# <- eager task")
        # Named even on 3.12.0-3.12.4, where get_coro() of an eagerly
        # finished task would crash the interpreter (gh-122332).
        assert finding.coroutine.endswith("step")


class TestContainment:
    def test_a_failing_reporter_is_disabled_and_never_reaches_user_code(self, capsys, caplog):
        """A reporter that raises is dropped after one logged error; the program runs on."""

        class Broken:
            def report(self, finding):
                raise RuntimeError("disk on fire")

        collector = CollectingReporter()
        asyncwatch.install(reporters=[Broken(), collector], log=False)

        async def main():
            await _block()
            await _block()
            return "done"

        assert asyncio.run(main()) == "done"
        assert [f.site.line if f.site else None for f in blamed(collector)] == [line_of("# <- install blocks here")] * 2
        out = capsys.readouterr()
        assert out.out == ""  # never the program's stdout
        logged = out.err + caplog.text  # stdlib logging: structlog is not configured
        assert logged.count("asyncwatch.internal_error") == 1
        assert "disk on fire" in logged

    def test_an_error_in_the_task_factory_bookkeeping_is_contained(self, monkeypatch, capsys, caplog):
        """If recording a creation site fails, the task is still created and returned."""
        import asyncwatch._core.tasks as tasks_mod

        def explode(filename):
            raise RuntimeError("site lookup exploded")

        monkeypatch.setattr(tasks_mod, "is_library_file", explode)
        monkeypatch.setattr(tasks_mod, "_library_cache", {})  # every file a miss
        asyncwatch.install(log=False)

        async def child():
            return 42

        async def main():
            return [await asyncio.create_task(child()) for _ in range(3)]

        assert asyncio.run(main()) == [42, 42, 42]
        out = capsys.readouterr()
        assert out.out == ""  # never the program's stdout
        logged = out.err + caplog.text  # stdlib logging: structlog is not configured
        assert logged.count("asyncwatch.internal_error") == 1
        assert "site lookup exploded" in logged

    def test_an_error_in_the_exception_handler_hook_is_contained(self, monkeypatch, capsys, caplog):
        """A failure inside our handler still hands the context to the next handler."""
        seen = []
        asyncwatch.install(log=False)
        from asyncwatch._detectors.task_exception import TaskExceptionDetector

        def explode(self, watch, context):
            raise RuntimeError("handler exploded")

        monkeypatch.setattr(TaskExceptionDetector, "exception_context", explode)

        async def boom():
            raise ValueError("x")

        async def main():
            loop = asyncio.get_running_loop()
            ours = loop.get_exception_handler()
            ours.previous = lambda loop, ctx: seen.append(ctx["message"])
            asyncio.create_task(boom())
            await asyncio.sleep(0.01)
            gc_collect_harder()
            asyncio.create_task(boom())
            await asyncio.sleep(0.01)
            gc_collect_harder()

        asyncio.run(main())
        assert seen == ["Task exception was never retrieved"] * 2
        out = capsys.readouterr()
        assert out.out == ""  # never the program's stdout
        logged = out.err + caplog.text  # stdlib logging: structlog is not configured
        assert logged.count("asyncwatch.internal_error") == 1
        assert "handler exploded" in logged

    def test_an_error_in_the_coroutine_hook_keeps_the_runtime_warning(self, monkeypatch, capsys, caplog):
        """A failing never-awaited hook still lets CPython's RuntimeWarning through."""
        import asyncwatch._detectors.never_awaited as coro_mod

        def explode(self, coro, caller):
            raise RuntimeError("coroutine hook exploded")

        monkeypatch.setattr(coro_mod.NeverAwaitedDetector, "_on_never_awaited", explode)
        asyncwatch.install(log=False)

        async def save():
            pass

        with pytest.warns(RuntimeWarning, match="was never awaited"):
            save()
            gc_collect_harder()
        out = capsys.readouterr()
        assert out.out == ""  # never the program's stdout
        logged = out.err + caplog.text  # stdlib logging: structlog is not configured
        assert logged.count("asyncwatch.internal_error") == 1
        assert "coroutine hook exploded" in logged

    def test_an_error_in_the_watchdog_is_contained(self, monkeypatch, capsys, caplog):
        """A failing watchdog logs once and stops; the program and other detectors go on."""
        import asyncwatch._detectors.slow_callback as slow_mod

        def explode(self, frames, now, wake=None):
            raise RuntimeError("watchdog exploded")

        monkeypatch.setattr(slow_mod.LoopProbe, "sample", explode)
        collector = CollectingReporter()
        asyncwatch.install(reporters=[collector], log=False)

        async def save():
            pass

        async def main():
            await _block()
            save()
            return "done"

        assert asyncio.run(main()) == "done"
        assert [f.kind for f in collector.findings] == [FindingKind.COROUTINE_NEVER_AWAITED]
        out = capsys.readouterr()
        assert out.out == ""  # never the program's stdout
        logged = out.err + caplog.text  # stdlib logging: structlog is not configured
        assert logged.count("asyncwatch.internal_error") == 1
        assert "watchdog exploded" in logged


class TestLoopLifecycle:
    def test_a_stall_in_the_first_step_of_a_loop_watched_before_it_ran(self):
        """A loop attached, left idle, then run, is sampled from its very first step."""
        collector = CollectingReporter()
        asyncwatch.install(reporters=[collector], log=False)

        async def main():
            time.sleep(0.16)  # <- first step blocks
            await asyncio.sleep(0)

        with asyncio.Runner() as runner:
            runner.get_loop()
            time.sleep(0.05)  # the watchdog sees a loop that is not running yet
            runner.run(main())
        [finding] = collector.findings
        assert finding.site.line == line_of("# <- first step blocks")
        assert 0.14 <= finding.duration_s < 0.4

    def test_asyncio_debug_mode_still_says_where_a_task_was_created(self):
        """Under asyncio's debug mode, a task's repr names the caller, not asyncwatch."""

        async def main():
            task = asyncio.create_task(asyncio.sleep(0))
            text = repr(task)
            await task
            return text

        plain = asyncio.run(main(), debug=True)
        asyncwatch.install(log=False)
        watched = asyncio.run(main(), debug=True)
        assert "asyncwatch" not in watched
        assert watched.split("created at")[1] == plain.split("created at")[1]


class TestCaptureFindings:
    def test_requires_an_installation(self):
        """capture_findings() outside an installation says how to fix it."""
        with pytest.raises(RuntimeError, match=r"asyncwatch.install\(\)"), capture_findings():
            pass

    def test_filters_by_kind(self):
        """Only the kinds asked for are captured."""
        asyncwatch.install(log=False)

        async def save():
            pass

        async def main():
            with capture_findings("coroutine_never_awaited") as found:
                save()
                await _block()
            return found

        found = asyncio.run(main())
        assert [f.kind for f in found] == [FindingKind.COROUTINE_NEVER_AWAITED]


@pytest.mark.skipif(sys.version_info >= (3, 14), reason="child watchers are gone in 3.14")
def test_policy_delegates_child_watchers_to_its_base():
    """get_child_watcher() reaches the wrapped policy (the abstract class defines it)."""

    class Base(asyncio.DefaultEventLoopPolicy):
        def get_child_watcher(self):
            return "base watcher"

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        assert asyncwatch.EventLoopPolicy(Base()).get_child_watcher() == "base watcher"


class TestImportFootprint:
    """What `import asyncwatch` and `install()` add to a program that uses neither structlog nor OpenTelemetry."""

    PROGRAM = """
import asyncio, logging, sys
import asyncwatch

asyncwatch.install(slow_callback_ms=60_000)

async def main():
    asyncio.sleep(0)  # never awaited
    await asyncio.sleep(0)

asyncio.run(main())
print(sorted({m.split(".")[0] for m in sys.modules} & {"structlog", "opentelemetry", "difflib"}))
"""

    def test_structlog_and_opentelemetry_stay_unimported_and_findings_still_reach_stderr(self, tmp_path):
        """Neither is imported (each costs the collector thousands of objects); findings go to stdlib logging."""
        import subprocess

        script = tmp_path / "app.py"
        script.write_text(self.PROGRAM)
        done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, check=False)
        assert done.returncode == 0, done.stderr
        assert done.stdout.strip() == "[]"
        assert "coroutine_never_awaited at " in done.stderr
        assert f"{script.name}:8 in main" in done.stderr

    def test_structlog_configured_after_install_still_renders_findings(self, tmp_path):
        """structlog imported and configured by the program after install(): findings go through it."""
        import subprocess

        script = tmp_path / "app.py"
        script.write_text(
            self.PROGRAM.replace(
                "asyncio.run(main())",
                "import structlog\n"
                "structlog.configure(processors=[lambda _l, _m, event: {**event, 'via': 'app-structlog'},"
                " structlog.processors.KeyValueRenderer()],"
                " logger_factory=structlog.PrintLoggerFactory(sys.stderr))\n"
                "asyncio.run(main())",
            )
        )
        done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, check=False)
        assert done.returncode == 0, done.stderr
        assert "via='app-structlog'" in done.stderr
        assert "event='coroutine_never_awaited'" in done.stderr

    def test_datetime_waits_for_the_first_finding_and_type_hints_resolve_before_it(self, tmp_path):
        """datetime (192 objects for every collection to walk) comes with the
        first finding's timestamp; `typing.get_type_hints(Finding)`, which
        serialisers call, resolves `time` before and after."""
        import subprocess

        script = tmp_path / "app.py"
        script.write_text(
            "import asyncio, sys, typing\n"
            "import asyncwatch\n"
            "asyncwatch.install(slow_callback_ms=60_000)\n"
            "before = 'datetime' in sys.modules\n"
            "hint = typing.get_type_hints(asyncwatch.Finding)['time']\n"
            "finding = asyncwatch.Finding(asyncwatch.FindingKind.SLOW_CALLBACK, 'm', None)\n"
            "after = typing.get_type_hints(asyncwatch.Finding)['time']\n"
            "print(before, hint is after, type(finding.time) is after, finding.time.utcoffset())\n"
        )
        done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, check=False)
        assert done.returncode == 0, done.stderr
        assert done.stdout.split() == ["False", "True", "True", "0:00:00"]
