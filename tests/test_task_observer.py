"""The task hooks of the detector interface, which OpenTelemetry spans build on."""

from __future__ import annotations

import asyncio
import gc
import inspect
import sys
import time
import types
import weakref

import pytest

import asyncwatch
from asyncwatch._core.detector import Detector, Hooks
from asyncwatch._core.stepping import TimedCoroutine
from asyncwatch._core.tasks import Task
from asyncwatch._engine import current_engine
from conftest import base_factory, gc_collect_harder, line_of


class Recorder(Detector):
    """A detector that records the task events per task object (kept alive,
    so that no id is reused): create_task(name=...) names the task only after
    the factory returned, so after task_created."""

    def __init__(self):
        self.events = []
        self.tasks = []

    def _add(self, task, *event):
        if task not in self.tasks:
            self.tasks.append(task)
        self.events.append((task, *event))

    def wrap_coroutine(self, coro):
        return TimedCoroutine(coro, self)

    def task_created(self, task, coro, site):
        self._add(task, "created", site)

    def task_step(self, task, start, duration):
        self._add(task, "step", duration)

    def task_cancel_requested(self, task, caller, message):
        self._add(task, "cancel", caller.f_lineno, message)

    def task_done(self, task, coro):
        state = "cancelled" if task.cancelled() else "exception" if task._exception else "finished"
        self._add(task, "done", state)

    def of(self, name):
        [task] = [t for t in self.tasks if t.get_name() == name]
        return [(e[1], name, *e[2:]) for e in self.events if e[0] is task]


def run_observed(loop_name, main, recorder):
    return run_observed_on(base_factory(loop_name), main, recorder)


def run_observed_on(base, main, recorder):
    factory = asyncwatch.loop_factory(base, log=False)
    engine_loop = asyncio.new_event_loop()
    asyncwatch.install(loop=engine_loop, log=False)
    engine_loop.close()
    current_engine().add_detector(recorder)
    with asyncio.Runner(loop_factory=factory) as runner:
        return runner.run(main())


def test_only_the_hooks_a_detector_overrides_are_dispatched():
    """A detector of task hooks adds nothing to the loop and exception hooks."""
    hooks = Hooks([Recorder()], on_failure=lambda detector, exc: None)
    assert (hooks.loop_attached, hooks.loop_detached, hooks.exception_context) == ((), (), ())
    assert [
        len(h) for h in (hooks.wrap_coroutine, hooks.task_created, hooks.task_cancel_requested, hooks.task_done)
    ] == [1] * 4
    assert hooks.observes_tasks and hooks.needs_task_factory
    assert not Hooks([Detector()], on_failure=lambda detector, exc: None).needs_task_factory


def test_lifecycle_of_a_task(loop_name):
    """created (with its site), each step timed, done; busy time is the sum of steps."""
    recorder = Recorder()

    async def work():
        time.sleep(0.03)
        await asyncio.sleep(0)
        time.sleep(0.02)
        return 7

    async def main():
        task = asyncio.create_task(work(), name="worker")  # <- observed task
        # Still asyncio's C Task (our slotted subclass): isinstance checks hold.
        assert type(task) is Task and isinstance(task, asyncio.Task)
        assert type(asyncio.Task.get_coro(task)) is TimedCoroutine  # the program's get_coro() shows its own
        assert task.get_coro().__qualname__.endswith("work") and "work()" in repr(task)
        return await task

    assert run_observed(loop_name, main, recorder) == 7
    events = recorder.of("worker")
    assert events[0][0] == "created" and events[0][2].line == line_of("# <- observed task")
    steps = [e[2] for e in events if e[0] == "step"]
    assert len(steps) == 2
    assert 0.028 <= steps[0] < 0.2 and 0.018 <= steps[1] < 0.2
    assert events[-1] == ("done", "worker", "finished")


def test_cancel_is_reported_with_the_canceller(loop_name):
    """cancel() reports who cancelled; the task ends cancelled."""
    recorder = Recorder()

    async def main():
        task = asyncio.create_task(asyncio.sleep(10), name="sleeper")
        await asyncio.sleep(0)
        task.cancel("enough")  # <- canceller
        with pytest.raises(asyncio.CancelledError):
            await task

    run_observed(loop_name, main, recorder)
    [cancel] = [e for e in recorder.of("sleeper") if e[0] == "cancel"]
    assert cancel[2] == line_of("# <- canceller") and cancel[3] == "enough"
    assert recorder.of("sleeper")[-1] == ("done", "sleeper", "cancelled")


def test_swallowed_cancellation_is_still_detected_on_traced_tasks(loop_name):
    """The detectors keep working when tasks are traced."""
    recorder = Recorder()
    found = []

    async def swallow():
        try:
            await asyncio.sleep(10)  # <- traced swallow
        except asyncio.CancelledError:
            pass

    async def main():
        current_engine().pipeline.add(type("C", (), {"report": lambda self, f: found.append(f)})())
        task = asyncio.create_task(swallow())
        await asyncio.sleep(0)
        task.cancel()
        await task

    run_observed(loop_name, main, recorder)
    assert [(f.kind.value, f.site.line) for f in found] == [("cancellation_swallowed", line_of("# <- traced swallow"))]


@pytest.mark.skipif(sys.version_info < (3, 12), reason="eager tasks are 3.12+")
def test_eager_first_step_is_observed():
    """With eager_task_factory chained, the eager first step is announced and timed."""
    recorder = Recorder()

    async def quick():
        return 1

    def eager_loop():
        loop = asyncio.new_event_loop()
        loop.set_task_factory(asyncio.eager_task_factory)
        return loop

    async def main():
        task = asyncio.create_task(quick(), name="eager")
        assert task.done()
        return await task

    # asyncwatch chains the eager factory it finds on the loop.
    run_observed_on(eager_loop, main, recorder)
    kinds = [e[0] for e in recorder.of("eager")]
    assert kinds == ["created", "step", "done"]


def test_exceptions_and_timeouts_pass_through_the_wrapper(loop_name):
    """What a task raises, TimeoutError from asyncio.timeout included, is unchanged."""
    recorder = Recorder()

    async def fails():
        await asyncio.sleep(0)
        raise KeyError("k")

    async def times_out():
        async with asyncio.timeout(0.01):
            await asyncio.sleep(10)

    async def gen():
        for i in range(3):
            await asyncio.sleep(0)
            yield i

    async def uses_async_generator():
        return [i async for i in gen()]

    async def main():
        with pytest.raises(KeyError):
            await asyncio.create_task(fails(), name="fails")
        with pytest.raises(TimeoutError):
            await asyncio.create_task(times_out(), name="times_out")
        return await asyncio.create_task(uses_async_generator(), name="agen")

    assert run_observed(loop_name, main, recorder) == [0, 1, 2]
    assert recorder.of("fails")[-1] == ("done", "fails", "exception")
    assert recorder.of("times_out")[-1] == ("done", "times_out", "exception")
    assert recorder.of("agen")[-1] == ("done", "agen", "finished")


def test_a_cancelled_traced_task_frees_its_frames_without_the_collector(loop_name):
    """The timing wrapper's throw() leaves no reference cycle: what a cancelled
    task's frames held is freed as soon as the task is, as without asyncwatch
    (a socket or an SSL context is not kept until the next collection)."""

    class Quiet(Detector):
        """A step timer that keeps nothing (Recorder keeps the tasks)."""

        def wrap_coroutine(self, coro):
            return TimedCoroutine(coro, self)

        def task_step(self, task, start, duration):
            pass

    class Held:
        pass

    held = []

    async def victim():
        resource = Held()
        held.append(weakref.ref(resource))
        await asyncio.sleep(3600)

    async def main():
        task = asyncio.create_task(victim())
        await asyncio.sleep(0)
        assert type(asyncio.Task.get_coro(task)) is TimedCoroutine
        task.cancel()
        await asyncio.wait([task])
        assert task.cancelled()

    gc_collect_harder()
    gc.disable()
    try:
        run_observed(loop_name, main, Quiet())
        assert held[0]() is None
    finally:
        gc.enable()


def test_a_failing_observer_is_dropped_and_the_program_runs_on(loop_name, capsys, caplog):
    """An observer that raises is logged once and switched off."""

    class Broken(Recorder):
        def task_step(self, task, start, duration):
            raise RuntimeError("observer exploded")

    async def child():
        await asyncio.sleep(0)
        return 2

    async def main():
        return sum([await asyncio.create_task(child()) for _ in range(3)])

    assert run_observed(loop_name, main, Broken()) == 6
    out = capsys.readouterr()
    # Through structlog when a test before configured it, else the standard
    # library's "asyncwatch" logger (caught by pytest's log capture).
    assert (out.out + out.err + caplog.text).count("asyncwatch.internal_error") == 1


def test_a_traced_task_gives_the_program_its_own_coroutine(loop_name):
    """The timing wrapper stays asyncwatch's: task.get_coro() is the program's
    coroutine, as without asyncwatch (CPython's test_tasks checks the type)."""

    async def work():
        await asyncio.sleep(0)

    async def main():
        coro = work()
        task = asyncio.create_task(coro)
        seen = task.get_coro()
        await task
        return seen is coro and isinstance(seen, types.CoroutineType) and inspect.iscoroutine(seen), type(
            asyncio.Task.get_coro(task)
        )

    assert run_observed(loop_name, main, Recorder()) == (True, TimedCoroutine)


def test_a_traced_tasks_coroutine_can_be_weakly_referenced(loop_name):
    """A traced task's coroutine takes a weak reference, as without asyncwatch
    (libraries keep such references)."""
    recorder = Recorder()

    async def work():
        await asyncio.sleep(0)

    async def main():
        task = asyncio.create_task(work())
        ref = weakref.ref(task.get_coro())
        wrapper = weakref.ref(asyncio.Task.get_coro(task))  # asyncwatch's, which asyncio holds
        alive = ref() is task.get_coro() and wrapper() is asyncio.Task.get_coro(task)
        await task
        return alive

    assert run_observed(loop_name, main, recorder)
