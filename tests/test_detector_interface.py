"""The detector interface: optional hooks, only overridden ones dispatched,
a failing detector disabled everywhere and reported once."""

from __future__ import annotations

import asyncio

import asyncwatch
from asyncwatch._core.detector import Detector, Hooks
from asyncwatch._core.findings import counts_against_program
from asyncwatch._engine import current_engine
from asyncwatch._outputs.collect import CollectingReporter
from conftest import gc_collect_harder


class LoopEvents(Detector):
    """Records the loop hooks it is given."""

    def __init__(self) -> None:
        self.events: list[tuple[str, object]] = []

    def loop_attached(self, watch):
        self.events.append(("attached", watch.loop_ref()))

    def loop_detached(self, watch):
        self.events.append(("detached", watch.loop_ref()))

    def exception_context(self, watch, context):
        self.events.append(("context", context.get("message")))


class Exploding(Detector):
    """Raises from its exception hook, counting the calls."""

    calls = 0

    def exception_context(self, watch, context):
        Exploding.calls += 1
        raise RuntimeError("detector exploded")


class TestHooks:
    def test_a_detector_that_overrides_nothing_is_in_no_hook(self):
        hooks = Hooks([Detector()], on_failure=lambda detector, exc: None)
        assert all(getattr(hooks, name) == () for name in ("loop_attached", "exception_context", "task_created"))
        assert not hooks.needs_task_factory

    def test_only_the_overridden_hooks_of_each_detector_are_dispatched(self):
        events = LoopEvents()
        hooks = Hooks([events, Exploding()], on_failure=lambda detector, exc: None)
        assert hooks.loop_attached == (events.loop_attached,)
        assert len(hooks.exception_context) == 2
        assert hooks.task_created == () and not hooks.observes_tasks

    def test_without_rebuilds_the_table_in_place(self):
        """Whoever holds the table (the task factory) sees the change."""
        exploding = Exploding()
        hooks = Hooks([LoopEvents(), exploding], on_failure=lambda detector, exc: None)
        hooks.without(exploding)
        assert len(hooks.exception_context) == 1 and exploding not in hooks.detectors


class TestRegisteredDetectors:
    def test_an_added_detector_sees_loops_attached_and_detached(self):
        """Engine.add_detector: hooks for every loop attached afterwards, detached at uninstall."""
        events = LoopEvents()
        engine_loop = asyncio.new_event_loop()
        asyncwatch.install(loop=engine_loop, log=False)
        current_engine().add_detector(events)
        loop = asyncio.new_event_loop()
        try:
            asyncwatch.install(loop=loop, log=False)
            asyncwatch.uninstall()
            assert events.events == [("attached", loop), ("detached", loop)]
        finally:
            loop.close()
            engine_loop.close()

    def test_a_failing_detector_is_disabled_on_every_loop_and_reported_once(self, capsys, caplog):
        """The first failure disables it everywhere; the next handler still gets every context."""
        Exploding.calls = 0
        collector = CollectingReporter()
        seen: list[str] = []
        engine_loop = asyncio.new_event_loop()
        asyncwatch.install(loop=engine_loop, log=False, reporters=[collector])
        engine_loop.close()
        current_engine().add_detector(Exploding())

        async def boom():
            raise ValueError("x")

        async def main():
            loop = asyncio.get_running_loop()
            loop.get_exception_handler().previous = lambda loop, ctx: seen.append(ctx["message"])
            asyncio.create_task(boom())
            await asyncio.sleep(0.01)
            gc_collect_harder()

        for _ in range(2):  # two loops, each attached after the detector was added
            loop = asyncio.new_event_loop()
            try:
                asyncwatch.install(loop=loop)
                loop.run_until_complete(main())
            finally:
                loop.close()
        assert Exploding.calls == 1
        assert seen == ["Task exception was never retrieved"] * 2
        # (gc_collect_harder in the loop over a full suite's heap is a
        # collector pause, cause gc: not the program's, left out here.)
        blamed = [f for f in collector.findings if counts_against_program(f)]
        assert [f.kind.value for f in blamed] == ["task_exception_unretrieved"] * 2
        out = capsys.readouterr()
        logged = out.out + out.err + caplog.text  # structlog if a test configured it, else stdlib logging
        assert logged.count("asyncwatch.internal_error") == 1
        assert "detector exploded" in logged

    def test_flush_asks_every_detector_for_what_it_has_in_progress(self):
        """Engine.flush_detectors (exit, a signal): each detector's flush, a failing one disabled."""
        flushed = []

        class Holds(Detector):
            def flush(self):
                flushed.append("holds")

        class Broken(Detector):
            def flush(self):
                raise RuntimeError("flush exploded")

        engine_loop = asyncio.new_event_loop()
        asyncwatch.install(loop=engine_loop, log=False)
        engine_loop.close()
        engine = current_engine()
        broken = Broken()
        engine.add_detector(Holds())
        engine.add_detector(broken)
        engine.flush_detectors()
        assert flushed == ["holds"]
        loop = asyncio.new_event_loop()
        try:
            assert broken not in engine.detectors_for(loop, engine.settings)
        finally:
            loop.close()
