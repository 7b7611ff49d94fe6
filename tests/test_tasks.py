"""Task detectors: task_destroyed_pending and task_exception_unretrieved.

Both are reported from the task's finalizer, so every test drops the task and
the harness collects garbage after the run.  The finding's site is the
application line that created the task.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import re
import weakref

import pytest

import asyncwatch
from asyncwatch._outputs.collect import CollectingReporter
from conftest import base_factory, gc_collect_harder, line_of


async def wait_forever():
    """Wait on a future only this coroutine references: the task is unreachable once dropped."""
    await asyncio.get_running_loop().create_future()  # <- waits forever


async def wait_forever_holding(box):
    """Like `wait_forever`, with an argument the caller can make point back at the task."""
    await asyncio.get_running_loop().create_future()


async def fail():
    raise ValueError("boom")  # <- raises


async def let_tasks_run():
    """Let freshly created tasks take their first step, then collect the dropped ones."""
    await asyncio.sleep(0)
    await asyncio.sleep(0)
    gc_collect_harder()


def sites_of(findings):
    return [(f.site.file, f.site.line) if f.site else None for f in findings]


# Each spawner creates a task of `wait_forever()` and drops it; its marker is
# the line the finding must point at.


def spawn_with_create_task():
    asyncio.create_task(wait_forever(), name="dropped")  # <- spawned by create_task


def spawn_with_ensure_future():
    asyncio.ensure_future(wait_forever())  # <- spawned by ensure_future


def spawn_with_loop_create_task():
    asyncio.get_running_loop().create_task(wait_forever())  # <- spawned by loop.create_task


SPAWNERS = {
    "create_task": (spawn_with_create_task, "spawned by create_task"),
    "ensure_future": (spawn_with_ensure_future, "spawned by ensure_future"),
    "loop.create_task": (spawn_with_loop_create_task, "spawned by loop.create_task"),
}


class TestTaskDestroyedPending:
    """A pending task the garbage collector destroys is reported where it was created."""

    @pytest.mark.parametrize("how", list(SPAWNERS))
    def test_dropped_task_is_reported_at_its_creation(self, watched, how):
        """The site is the line that created the task, whatever created it."""
        spawn, marker = SPAWNERS[how]

        async def main():
            spawn()
            await let_tasks_run()

        watched.run(main)

        assert watched.kinds() == ["task_destroyed_pending"]
        [finding] = watched.findings
        assert finding.site is not None
        assert finding.site.file == __file__
        assert finding.site.line == line_of(f"# <- {marker}")
        assert finding.site.function == spawn.__qualname__
        assert finding.created_at == finding.site
        assert finding.coroutine == wait_forever.__qualname__
        assert finding.task is not None
        if how != "create_task":  # unnamed: asyncio's default name is kept
            assert re.fullmatch(r"Task-\d+", finding.task), finding.task

    def test_finding_names_the_task_and_has_a_json_form(self, watched):
        """The task's name is in the finding and its message; ``to_dict()`` is JSON."""

        async def main():
            spawn_with_create_task()
            await let_tasks_run()

        watched.run(main)

        [finding] = watched.of("task_destroyed_pending")
        assert finding.task == "dropped"
        assert "dropped" in finding.message
        data = json.loads(json.dumps(finding.to_dict()))
        assert data["kind"] == "task_destroyed_pending"
        assert data["site"] == {
            "file": __file__,
            "line": line_of("# <- spawned by create_task"),
            "function": spawn_with_create_task.__qualname__,
        }

    def test_task_group_task_is_reported_at_create_task(self, watched):
        """A task of a TaskGroup that is dropped unfinished points at ``tg.create_task``."""

        async def main():
            # Entered by hand and never exited: `async with` would wait for
            # the task, and nothing outside the group would reference it.
            group = asyncio.TaskGroup()
            await group.__aenter__()
            group.create_task(wait_forever())  # <- tg.create_task
            await asyncio.sleep(0)
            del group  # the group and its task now only reference each other
            await let_tasks_run()

        watched.run(main)

        [finding] = watched.of("task_destroyed_pending")
        assert finding.site is not None
        assert finding.site.file == __file__
        assert finding.site.line == line_of("# <- tg.create_task")
        assert finding.coroutine == wait_forever.__qualname__

    def test_each_dropped_task_is_its_own_finding(self, watched):
        """Three tasks dropped from one line: three findings, all at that line."""

        async def main():
            for _ in range(3):
                asyncio.create_task(wait_forever())  # <- in a loop
            await let_tasks_run()

        watched.run(main)

        found = watched.of("task_destroyed_pending")
        assert sites_of(found) == [(__file__, line_of("# <- in a loop"))] * 3

    def test_task_that_never_started_is_one_finding(self, watched):
        """A pending task destroyed before its first step: one finding, no never-awaited duplicate."""
        asyncwatch.install(reporters=[watched.collector], log=False)
        loop = asyncwatch.loop_factory(base_factory(watched.loop_name))()
        try:
            loop.create_task(wait_forever())  # <- never started, dropped
        finally:
            loop.close()  # drops the ready queue, and with it the only reference to the task
        del loop
        gc_collect_harder()

        assert watched.kinds() == ["task_destroyed_pending"]
        [finding] = watched.findings
        assert finding.site is not None
        assert finding.site.line == line_of("# <- never started, dropped")
        assert finding.coroutine == wait_forever.__qualname__

    def test_task_that_never_started_collected_by_gc_is_one_finding(self, watched):
        """The same when the task is in a reference cycle, so the garbage collector destroys it."""
        asyncwatch.install(reporters=[watched.collector], log=False)
        loop = asyncwatch.loop_factory(base_factory(watched.loop_name))()
        box = []
        try:
            box.append(loop.create_task(wait_forever_holding(box)))  # <- never started, in a cycle
        finally:
            loop.close()
        del loop, box
        gc_collect_harder()

        assert watched.kinds() == ["task_destroyed_pending"]
        [finding] = watched.findings
        assert finding.site is not None
        assert finding.site.line == line_of("# <- never started, in a cycle")
        assert finding.coroutine == wait_forever_holding.__qualname__

    def test_a_task_library_code_makes_when_the_loop_calls_it_has_no_site(self, watched):
        """The loop calls ``asyncio.ensure_future`` back: no line of the
        program asked for the task, and the one further out only started
        the loop (``asyncio.run(main())``): the site is unknown, not that line."""

        async def main():
            asyncio.get_running_loop().call_soon(asyncio.ensure_future, wait_forever())
            await let_tasks_run()

        watched.run(main)

        assert watched.kinds() == ["task_destroyed_pending"]
        [finding] = watched.findings
        assert finding.site is None and finding.created_at is None
        assert finding.coroutine == wait_forever.__qualname__

    def test_a_task_a_callback_of_the_program_makes_is_at_that_line(self, watched):
        """A callback of the program's own is the application line that asked."""

        def spawn_later() -> None:
            asyncio.ensure_future(wait_forever())  # <- spawned by a callback

        async def main():
            asyncio.get_running_loop().call_soon(spawn_later)
            await let_tasks_run()

        watched.run(main)

        [finding] = watched.findings
        assert finding.site is not None
        assert (finding.site.file, finding.site.line) == (__file__, line_of("# <- spawned by a callback"))


class TestPendingTasksThatAreNotLost:
    """Tasks kept alive, or cancelled by asyncio.run at shutdown, are not destroyed-pending."""

    def test_background_task_set_is_silent(self, watched):
        """The documented pattern: keep tasks in a set, discard them when done."""
        background = set()

        async def main():
            task = asyncio.create_task(wait_forever())
            background.add(task)
            task.add_done_callback(background.discard)
            del task
            await let_tasks_run()

        watched.run(main)
        assert watched.findings == []

    def test_task_cancelled_at_shutdown_is_silent(self, watched):
        """A task still pending when main returns is cancelled by the runner, not destroyed."""

        async def main():
            asyncio.create_task(asyncio.sleep(10))  # the loop's timer keeps it alive
            await asyncio.sleep(0)

        watched.run(main)
        assert watched.findings == []

    def test_task_referenced_until_shutdown_is_silent(self, watched):
        """A task held by the program, never finished, is cancelled at shutdown: silent."""
        held = []

        async def main():
            held.append(asyncio.create_task(wait_forever()))
            await let_tasks_run()

        watched.run(main)
        held.clear()
        gc_collect_harder()
        assert watched.findings == []

    def test_a_task_stepping_an_async_generator_is_named_after_it(self, watched):
        """``ensure_future(anext(agen))`` runs the generator's ``asend``, which has no name of its own."""

        async def ticks():
            while True:
                await wait_forever()
                yield 1

        async def main():
            asyncio.ensure_future(anext(ticks()))  # <- task stepping a generator, dropped
            await let_tasks_run()

        watched.run(main)

        [finding] = watched.of("task_destroyed_pending")
        assert finding.site.line == line_of("# <- task stepping a generator, dropped")
        assert finding.coroutine == ticks.__qualname__
        assert f"(coroutine {ticks.__qualname__!r})" in finding.message

    def test_a_task_whose_coroutine_has_no_name_is_named_without_it(self, watched):
        """A hand-written coroutine object: the message names the task only, never "coroutine None"."""
        import collections.abc

        class Waiter(collections.abc.Coroutine):
            def __init__(self):
                self._inner = wait_forever().__await__()

            def send(self, value):
                return self._inner.send(value)

            def throw(self, *exc):
                return self._inner.throw(*exc)

            def close(self):
                self._inner.close()

            def __await__(self):
                return self

        async def main():
            asyncio.ensure_future(Waiter())  # <- nameless coroutine, dropped
            await let_tasks_run()

        watched.run(main)

        [finding] = watched.of("task_destroyed_pending")
        assert finding.site.line == line_of("# <- nameless coroutine, dropped")
        assert finding.coroutine is None
        assert finding.message.startswith(f"Task {finding.task!r} was destroyed"), finding.message
        assert "None" not in finding.message

    def test_awaited_task_is_silent(self, watched):
        """A task awaited to completion is not lost."""

        async def main():
            await asyncio.create_task(asyncio.sleep(0))

        watched.run(main)
        assert watched.findings == []


async def await_a_gather():
    await asyncio.gather(wait_forever(), wait_forever())


class TestLostGathers:
    """asyncio does not warn when gather's tasks are destroyed while pending
    (it sets ``_log_destroy_pending = False`` on them): asyncwatch reports the
    gather itself, at the gather line, and nothing for a gather that was
    awaited, cancelled or finished."""

    def test_gather_neither_awaited_nor_kept_is_reported_at_the_gather_line(self, watched):
        """One finding for the lost gather, at its line, saying it was a gather."""

        async def main():
            asyncio.gather(wait_forever(), wait_forever())  # <- gather dropped
            await let_tasks_run()

        watched.run(main)

        assert watched.kinds() == ["task_destroyed_pending"]
        [finding] = watched.findings
        assert finding.site is not None
        assert (finding.site.file, finding.site.line) == (__file__, line_of("# <- gather dropped"))
        assert finding.site.function == main.__qualname__
        assert finding.created_at == finding.site
        assert finding.coroutine == wait_forever.__qualname__
        assert "gather() of 2 awaitables" in finding.message
        assert "await the gather" in finding.message

    def test_gather_from_a_helper_is_reported_at_the_helper_line(self, watched):
        """A gather made by an application helper and dropped by its caller points at the helper."""

        def fan_out():
            return asyncio.gather(*[wait_forever() for _ in range(3)])  # <- helper's gather

        async def main():
            fan_out()
            await let_tasks_run()

        watched.run(main)

        [finding] = watched.of("task_destroyed_pending")
        assert (finding.site.file, finding.site.line) == (__file__, line_of("# <- helper's gather"))
        assert "gather() of 3 awaitables" in finding.message

    def test_two_gathers_dropped_in_one_step_are_two_findings(self, watched):
        """Each lost gather is reported at its own line."""

        async def main():
            asyncio.gather(wait_forever())  # <- first lost gather
            asyncio.gather(wait_forever(), wait_forever())  # <- second lost gather
            await let_tasks_run()

        watched.run(main)

        assert sorted(sites_of(watched.of("task_destroyed_pending"))) == [
            (__file__, line_of("# <- first lost gather")),
            (__file__, line_of("# <- second lost gather")),
        ]
        assert watched.kinds() == ["task_destroyed_pending"] * 2
        assert sorted(f.message.split(" (")[0] for f in watched.findings) == [
            "A gather() of 1 awaitable",
            "A gather() of 2 awaitables",
        ]

    def test_awaited_gather_is_silent(self, watched):
        """The ordinary use: gather awaited to completion, then dropped."""

        async def main():
            await asyncio.gather(asyncio.sleep(0), asyncio.sleep(0))
            await let_tasks_run()

        watched.run(main)
        assert watched.findings == []

    def test_finished_gather_dropped_unawaited_is_silent(self, watched):
        """A gather whose tasks all finished is not lost, awaited or not."""

        async def main():
            gathering = asyncio.gather(asyncio.sleep(0), asyncio.sleep(0))
            for _ in range(3):
                await asyncio.sleep(0)
            assert gathering.done()
            del gathering
            await let_tasks_run()

        watched.run(main)
        assert watched.findings == []

    def test_cancelled_gather_is_silent(self, watched):
        """A gather cancelled (and its cancellation seen) is not lost."""

        async def main():
            gathering = asyncio.gather(wait_forever(), wait_forever())
            await asyncio.sleep(0)
            gathering.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await gathering
            del gathering
            await let_tasks_run()

        watched.run(main)
        assert watched.findings == []

    def test_gather_kept_until_shutdown_is_silent(self, watched):
        """A gather the program holds is cancelled with its tasks when asyncio.run ends."""
        held = []

        async def main():
            held.append(asyncio.gather(wait_forever(), wait_forever()))
            await let_tasks_run()

        watched.run(main)
        with contextlib.suppress(asyncio.CancelledError):
            held[0].exception()  # retrieved, as a program that keeps it would
        held.clear()
        gc_collect_harder()
        assert watched.findings == []

    def test_a_gather_of_gathers_neither_awaited_nor_kept_is_reported_at_the_outer_gather_line(self, watched):
        """The outer gather makes no task (its awaitables are futures): its line is still known."""

        def query_all(regions):
            per_region = [asyncio.gather(*(wait_forever() for _ in shards)) for shards in regions]
            asyncio.gather(*per_region)  # <- gather of gathers, dropped

        async def main():
            query_all([["eu-1", "eu-2"], ["us-1"]])
            await let_tasks_run()

        watched.run(main)

        assert watched.kinds() == ["task_destroyed_pending"]
        [finding] = watched.findings
        assert (finding.site.file, finding.site.line) == (__file__, line_of("# <- gather of gathers, dropped"))
        assert finding.site.function == query_all.__qualname__
        assert finding.created_at == finding.site
        assert finding.coroutine == wait_forever.__qualname__
        assert "gather() of 2 awaitables (the first task of the gathers it gathered runs" in finding.message

    def test_a_gather_of_gathers_and_tasks_is_one_finding(self, watched):
        """Its own task and its gathers' tasks lead to the same lost gather: reported once."""

        async def main():
            asyncio.gather(asyncio.gather(wait_forever()), wait_forever())  # <- mixed gather, dropped
            await let_tasks_run()

        watched.run(main)

        assert watched.kinds() == ["task_destroyed_pending"]
        assert sites_of(watched.findings) == [(__file__, line_of("# <- mixed gather, dropped"))]

    def test_gathers_made_a_step_before_the_lost_gather_of_them_are_its_one_finding(self, watched):
        """The gathers were kept a step (each unawaited then), then handed to a gather that is dropped."""

        async def main():
            inner = [asyncio.gather(wait_forever()) for _ in range(2)]
            await asyncio.sleep(0)
            asyncio.gather(*inner)  # <- later gather of gathers, dropped
            del inner
            await let_tasks_run()

        watched.run(main)

        assert watched.kinds() == ["task_destroyed_pending"]
        assert sites_of(watched.findings) == [(__file__, line_of("# <- later gather of gathers, dropped"))]

    def test_a_gather_of_gathers_on_a_closed_loop_is_made_as_without_asyncwatch(self, capsys, caplog):
        """Nothing to watch there, and no error of asyncwatch's (it would disable the gather wrapper)."""
        handle = asyncwatch.install(log=False)
        try:
            asyncio.run(asyncio.sleep(0))  # a loop attached: the task detectors wrap gather
            loop = asyncio.new_event_loop()
            loop.close()
            outer = asyncio.gather(asyncio.gather(loop.create_future()), asyncio.gather(loop.create_future()))
            assert type(outer) is asyncio.tasks._GatheringFuture and not outer.done()
        finally:
            handle.uninstall()
        out = capsys.readouterr()
        assert "internal_error" not in out.out + out.err + caplog.text

    def test_an_awaited_gather_of_gathers_is_silent(self, watched):
        async def main():
            await asyncio.gather(asyncio.gather(asyncio.sleep(0), asyncio.sleep(0)), asyncio.sleep(0))
            inner = [asyncio.gather(asyncio.sleep(0)) for _ in range(2)]
            await asyncio.gather(*inner)
            await let_tasks_run()

        watched.run(main)
        assert watched.findings == []

    def test_gathers_kept_then_gathered_and_awaited_later_are_silent(self, watched):
        """The gathers wait unawaited for a step, then are awaited through a gather of them."""

        async def main():
            inner = [asyncio.gather(asyncio.sleep(0.01)) for _ in range(2)]
            await asyncio.sleep(0)
            gc.collect()
            await asyncio.gather(*inner)
            await let_tasks_run()

        watched.run(main)
        assert watched.findings == []

    def test_gather_awaited_by_a_lost_task_is_the_task_finding_only(self, watched):
        """The task awaiting the gather is what was lost: reported once, at its create_task line."""

        async def main():
            asyncio.create_task(await_a_gather())  # <- task awaiting a gather, dropped
            await let_tasks_run()

        watched.run(main)

        assert watched.kinds() == ["task_destroyed_pending"]
        [finding] = watched.findings
        assert finding.site.line == line_of("# <- task awaiting a gather, dropped")
        assert finding.coroutine == await_a_gather.__qualname__


class TestTaskExceptionUnretrieved:
    """A task that failed and whose exception nobody looked at is reported where it was created."""

    def test_dropped_failed_task_is_reported_at_its_creation(self, watched):
        """``create_task(fail())`` never awaited: the site is the create_task line."""

        async def main():
            asyncio.create_task(fail(), name="doomed")  # <- failing create_task
            await let_tasks_run()

        watched.run(main)

        [finding] = watched.of("task_exception_unretrieved")
        assert finding.site is not None
        assert finding.site.file == __file__
        assert finding.site.line == line_of("# <- failing create_task")
        assert finding.site.function == main.__qualname__
        assert finding.created_at == finding.site
        assert finding.task == "doomed"
        assert finding.coroutine == fail.__qualname__
        assert "ValueError" in finding.message
        assert (__file__, line_of("# <- raises")) in [(s.file, s.line) for s in finding.stack]
        assert watched.of("task_destroyed_pending") == []
        data = json.loads(json.dumps(finding.to_dict()))
        assert data["kind"] == "task_exception_unretrieved"

    def test_ensure_future_task_is_reported_at_its_creation(self, watched):
        """``ensure_future(fail())`` dropped: the site is the ensure_future line."""

        async def main():
            asyncio.ensure_future(fail())  # <- failing ensure_future
            await let_tasks_run()

        watched.run(main)

        [finding] = watched.of("task_exception_unretrieved")
        assert finding.site is not None
        assert finding.site.line == line_of("# <- failing ensure_future")

    def test_loop_create_task_is_reported_at_its_creation(self, watched):
        """``loop.create_task(fail())`` dropped: the site is that line."""

        async def main():
            asyncio.get_running_loop().create_task(fail())  # <- failing loop.create_task
            await let_tasks_run()

        watched.run(main)

        [finding] = watched.of("task_exception_unretrieved")
        assert finding.site is not None
        assert finding.site.line == line_of("# <- failing loop.create_task")

    def test_task_held_until_the_end_is_reported_when_dropped(self, watched):
        """A failed task kept in a variable is reported once it is finally dropped."""

        async def main():
            task = asyncio.create_task(fail())  # <- kept, failing
            await asyncio.sleep(0)
            await asyncio.sleep(0)
            assert task.done()
            del task
            gc.collect()

        watched.run(main)

        [finding] = watched.of("task_exception_unretrieved")
        assert finding.site is not None
        assert finding.site.line == line_of("# <- kept, failing")

    def test_a_gather_neither_awaited_nor_kept_whose_task_fails_is_reported_at_the_gather_line(self, watched):
        """asyncio says "_GatheringFuture exception was never retrieved", with no line."""

        async def main():
            asyncio.gather(fail(), wait_forever())  # <- failing gather, dropped
            await let_tasks_run()

        watched.run(main)

        assert watched.kinds() == ["task_exception_unretrieved"]
        [finding] = watched.findings
        assert finding.site is not None
        assert (finding.site.file, finding.site.line) == (__file__, line_of("# <- failing gather, dropped"))
        assert finding.created_at == finding.site
        assert finding.coroutine == fail.__qualname__
        assert "gather() of 2 awaitables" in finding.message
        assert "ValueError: boom" in finding.message
        assert finding.stack and finding.stack[-1].function == fail.__qualname__

    def test_a_failed_gather_of_gathers_neither_awaited_nor_kept_is_reported_at_the_outer_line(self, watched):
        """The inner gather's exception is retrieved by the outer one, whose own nobody retrieves."""

        async def main():
            inner = asyncio.gather(fail(), wait_forever())
            asyncio.gather(inner, wait_forever())  # <- failing gather of a gather, dropped
            del inner
            await let_tasks_run()

        watched.run(main)

        assert watched.kinds() == ["task_exception_unretrieved"]
        [finding] = watched.findings
        assert (finding.site.file, finding.site.line) == (
            __file__,
            line_of("# <- failing gather of a gather, dropped"),
        )
        assert finding.coroutine == fail.__qualname__
        assert "ValueError: boom" in finding.message

    def test_a_failed_gather_asked_for_its_exception_is_silent(self, watched):
        """A done callback that checks the gather retrieves its exception."""

        async def main():
            gathering = asyncio.gather(fail(), wait_forever())
            gathering.add_done_callback(lambda g: g.exception())
            del gathering
            await let_tasks_run()

        watched.run(main)
        assert watched.findings == []


class TestRetrievedExceptionsAreSilent:
    """Looking at a task's exception in any of the usual ways means it was retrieved."""

    def test_awaited_task_is_silent(self, watched):
        """``await task`` inside try/except retrieves the exception."""

        async def main():
            task = asyncio.create_task(fail())
            try:
                await task
            except ValueError:
                pass

        watched.run(main)
        assert watched.findings == []

    def test_exception_method_is_silent(self, watched):
        """``task.exception()`` retrieves the exception."""

        async def main():
            task = asyncio.create_task(fail())
            await asyncio.wait([task])
            assert isinstance(task.exception(), ValueError)

        watched.run(main)
        assert watched.findings == []

    def test_result_method_in_try_is_silent(self, watched):
        """``task.result()`` that raises retrieves the exception."""

        async def main():
            task = asyncio.create_task(fail())
            await asyncio.wait([task])
            try:
                task.result()
            except ValueError:
                pass

        watched.run(main)
        assert watched.findings == []

    def test_gather_with_return_exceptions_is_silent(self, watched):
        """``gather(..., return_exceptions=True)`` retrieves every exception."""

        async def main():
            results = await asyncio.gather(fail(), asyncio.create_task(fail()), return_exceptions=True)
            assert all(isinstance(r, ValueError) for r in results)

        watched.run(main)
        assert watched.findings == []

    def test_done_callback_that_checks_is_silent(self, watched):
        """A done callback calling ``exception()`` retrieves it."""
        seen = []

        async def main():
            task = asyncio.create_task(fail())
            task.add_done_callback(lambda t: seen.append(t.exception()))
            del task
            await let_tasks_run()

        watched.run(main)
        assert len(seen) == 1
        assert watched.findings == []

    def test_task_group_failure_is_silent(self, watched):
        """A TaskGroup collects its tasks' exceptions into an ExceptionGroup."""

        async def main():
            try:
                async with asyncio.TaskGroup() as group:
                    group.create_task(fail())
            except* ValueError:
                pass

        watched.run(main)
        assert watched.findings == []

    def test_cancelled_task_is_silent(self, watched):
        """A task that ends cancelled has no exception to retrieve."""

        async def main():
            task = asyncio.create_task(wait_forever())
            await asyncio.sleep(0)
            task.cancel()
            await asyncio.sleep(0)
            assert task.cancelled()
            del task
            gc.collect()

        watched.run(main)
        assert watched.findings == []


class TestCreationSitesOfGatheredTasks:
    """gather() creates its tasks through asyncio's own code; each one's creation
    site is the gather() call, even when gather frames are reused."""

    @staticmethod
    def sites_of(gathering):
        from asyncwatch._core.tasks import created_at

        return [created_at(child) for child in gathering._children]

    def test_each_gather_call_has_its_own_site(self, watched):
        """Two gathers in a row from different lines: each child points at its own line."""

        async def child():
            await asyncio.sleep(0)

        async def main():
            first = asyncio.gather(child(), child())  # <- first gather
            sites_first = self.sites_of(first)
            await first
            second = asyncio.gather(child(), child())  # <- second gather
            sites_second = self.sites_of(second)
            await second
            return sites_first, sites_second

        sites_first, sites_second = watched.run(main)
        assert [s.line for s in sites_first] == [line_of("# <- first gather")] * 2
        assert [s.line for s in sites_second] == [line_of("# <- second gather")] * 2

    def test_gathers_in_one_step_each_have_their_own_site(self, watched):
        """Gathers started one after the other without an await between them
        (all in one step of the task) still each point at their own line."""

        async def child():
            await asyncio.sleep(0)

        async def main():
            first = asyncio.gather(child(), child(), child())  # <- gather one
            second = asyncio.gather(child(), child())  # <- gather two
            sites = self.sites_of(first), self.sites_of(second)
            await asyncio.gather(first, second)
            return sites

        first, second = watched.run(main)
        assert [s.line for s in first] == [line_of("# <- gather one")] * 3
        assert [s.line for s in second] == [line_of("# <- gather two")] * 2

    def test_a_finished_gather_is_not_kept_alive(self, watched):
        """Telling gather's tasks apart holds gather's frame for one step at
        most: once awaited and dropped, the gathering future is collected."""

        async def child():
            await asyncio.sleep(0)

        async def main():
            gathering = asyncio.gather(child(), child())
            ref = weakref.ref(gathering)
            await gathering
            del gathering
            await asyncio.sleep(0)
            gc.collect()
            return ref() is None

        assert watched.run(main)

    def test_gather_called_from_a_helper_points_at_the_helper(self, watched):
        """A gather inside an application helper points at the helper's line, each time."""

        async def child():
            await asyncio.sleep(0)

        def fan_out(n):
            return asyncio.gather(*[child() for _ in range(n)])  # <- helper gather

        async def main():
            sites = []
            for n in (3, 2):
                gathering = fan_out(n)
                sites.append(self.sites_of(gathering))
                await gathering
            return sites

        for sites in watched.run(main):
            assert {(s.file, s.line) for s in sites} == {(__file__, line_of("# <- helper gather"))}


class TestAChainedFactoryMayReturnAnyFutureLikeObject:
    def test_the_factory_stays_on_and_later_tasks_keep_their_sites(self, loop_name, capsys):
        """asyncio.Runner accepts any future-like object from a task factory
        (CPython's test_runners makes one): asyncwatch passes it through,
        records nothing about it, and stays on for the tasks made after it."""

        class FutureLike:
            """Wraps a task; not an asyncio Future."""

            def __init__(self, loop, coro, **kwargs):
                self.task = asyncio.Task(coro, loop=loop, **kwargs)

            def set_name(self, name):  # 3.13's create_task names what the factory made
                pass

        def factory(loop, coro, **kwargs):
            if coro.__qualname__.endswith("wrapped"):
                return FutureLike(loop, coro, **kwargs)
            return asyncio.Task(coro, loop=loop, **kwargs)

        def new_loop():
            loop = base_factory(loop_name)()
            loop.set_task_factory(factory)  # the program's, before asyncwatch chains it
            return loop

        async def wrapped():
            return "inner"

        async def boom():
            raise ValueError("boom")

        async def main():
            loop = asyncio.get_running_loop()
            future_like = loop.create_task(wrapped())
            assert type(future_like) is FutureLike
            assert await future_like.task == "inner"
            loop.create_task(boom())  # <- after the future-like one
            await asyncio.sleep(0.01)

        collector = CollectingReporter()
        engine_loop = asyncio.new_event_loop()  # start the engine; watch only the loop below
        asyncwatch.install(loop=engine_loop, reporters=[collector], log=False)
        engine_loop.close()
        with asyncio.Runner(loop_factory=asyncwatch.loop_factory(new_loop)) as runner:
            runner.run(main())
        gc_collect_harder()
        out = capsys.readouterr()
        assert "asyncwatch.internal_error" not in out.out + out.err
        [finding] = collector.findings
        assert finding.kind is asyncwatch.FindingKind.TASK_EXCEPTION_UNRETRIEVED
        assert finding.site.line == line_of("# <- after the future-like one")


def test_a_task_an_installed_server_makes_is_not_said_to_come_from_its_console_script(tmp_path):
    """A virtual environment's bin/ holds the scripts pip wrote (uvicorn's,
    three lines that call the package): never the application's line.  The
    task a server made in a callback has no creation site there, rather
    than "created at venv/bin/uvicorn:4"."""
    import os
    import subprocess
    import sysconfig
    import venv

    env_dir = tmp_path / "env"
    venv.EnvBuilder(with_pip=False, symlinks=True).create(env_dir)
    site_packages = tmp_path / "lib" / "site-packages"
    site_packages.mkdir(parents=True)
    (site_packages / "fakeserver.py").write_text(
        "import asyncio, gc, sys\n"
        "import asyncwatch\n"
        "async def handler():\n"
        "    raise ValueError('nobody retrieves this')\n"
        "def main():\n"
        "    asyncwatch.install(findings=sys.argv[1], log=False)\n"
        "    async def serve():\n"
        "        loop = asyncio.get_running_loop()\n"
        "        loop.call_soon(lambda: loop.create_task(handler()))\n"
        "        await asyncio.sleep(0.05)\n"
        "        gc.collect()\n"
        "    asyncio.run(serve())\n"
        "    return 0\n",
        encoding="utf-8",
    )
    bin_dir = env_dir / ("Scripts" if os.name == "nt" else "bin")
    script = bin_dir / "fakeserver"
    script.write_text("import sys\nfrom fakeserver import main\nsys.exit(main())\n", encoding="utf-8")
    findings = tmp_path / "findings.jsonl"
    src = os.path.dirname(os.path.dirname(asyncwatch.__file__))
    ours = sysconfig.get_paths()["purelib"]  # structlog and the rest, from the running environment
    path = os.pathsep.join([src, str(site_packages), ours])
    result = subprocess.run(
        [str(bin_dir / "python"), str(script), str(findings)],
        env={**os.environ, "PYTHONPATH": path},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    [record] = [json.loads(line) for line in findings.read_text(encoding="utf-8").splitlines()]
    assert record["kind"] == "task_exception_unretrieved"
    assert record["site"] is None, record["site"]
