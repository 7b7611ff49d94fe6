"""The ``cancellation_swallowed`` detector: a task that was ``cancel()``-ed and
still finished normally is reported, at the await where the cancellation was
delivered; structured cancellation (TaskGroup, timeouts, wait_for, shield,
uncancel, shutdown) that is handled properly is never reported."""

from __future__ import annotations

import asyncio
import contextlib
import sys
import time

import pytest

import asyncwatch
from asyncwatch import Finding, FindingKind
from asyncwatch._core import catchers
from asyncwatch._outputs.collect import CollectingReporter
from conftest import base_factory, gc_collect_harder, line_of

SWALLOWED = "cancellation_swallowed"
LONG = 10  # seconds a task waits when it is about to be cancelled (never elapses)
TICK = 0.01  # enough for a freshly created task to reach its first await


def the_one_swallowed(findings: list[Finding]) -> Finding:
    swallowed = [f for f in findings if f.kind.value == SWALLOWED]
    assert len(swallowed) == 1, swallowed
    return swallowed[0]


def assert_reported(
    finding: Finding,
    *,
    site: str,
    site_in: object,
    cancelled_by: str,
    created_at: str,
    task: str,
    coroutine: object,
    swallowed_at: str | None = None,
) -> None:
    """*site*, *cancelled_by*, *created_at* and *swallowed_at* (checked when
    given) name the ``# <- marker`` comments of lines in this file; *site_in*
    is the coroutine function holding the site, *coroutine* the task's
    coroutine function."""
    assert finding.kind is FindingKind.CANCELLATION_SWALLOWED
    assert finding.kind.value == SWALLOWED
    assert finding.site is not None
    assert (finding.site.file, finding.site.line) == (__file__, line_of(f"# <- {site}"))
    assert finding.site.function == site_in.__qualname__  # type: ignore[attr-defined]
    app_stack = [s for s in finding.stack if s.file == __file__]
    assert app_stack and app_stack[-1] == finding.site, finding.stack
    assert finding.cancelled_by is not None
    assert (finding.cancelled_by.file, finding.cancelled_by.line) == (__file__, line_of(f"# <- {cancelled_by}"))
    assert finding.created_at is not None
    assert (finding.created_at.file, finding.created_at.line) == (__file__, line_of(f"# <- {created_at}"))
    assert finding.task == task
    assert finding.coroutine == coroutine.__qualname__  # type: ignore[attr-defined]
    assert "swallowed" in finding.message
    assert "cancel" in finding.message
    if swallowed_at is not None:
        assert_swallowed_at(finding, swallowed_at)


def assert_swallowed_at(finding: Finding, marker: str) -> None:
    """The finding names the statement at ``# <- marker`` as the one that
    swallowed the cancellation, in its field and in its message."""
    line = line_of(f"# <- {marker}")
    assert finding.swallowed_at is not None, finding.message
    assert (finding.swallowed_at.file, finding.swallowed_at.line) == (__file__, line)
    assert "swallowed by the " in finding.message
    assert f"at test_cancellation.py:{line};" in finding.message


def assert_silent(findings: list[Finding]) -> None:
    assert [f for f in findings if f.kind.value == SWALLOWED] == []


async def swallows_plainly() -> None:
    """``except CancelledError: pass`` around an await: a plain swallow."""
    try:
        await asyncio.sleep(LONG)
    except asyncio.CancelledError:
        pass


def swallowed_by(watched, *coroutine_functions) -> Finding:
    """Run the first of *coroutine_functions* as a task (the rest are what it
    awaits), cancel it at its await, and return the one finding."""
    first = coroutine_functions[0]

    async def main():
        task = asyncio.create_task(first())
        await asyncio.sleep(TICK)
        task.cancel()
        await task

    watched.run(main)
    return the_one_swallowed(watched.findings)


class TestWhatSwallowedIt:
    """``swallowed_at`` names the ``except``, ``finally`` or ``suppress``
    that ended the CancelledError, read from the source around the awaits it
    went through, innermost first; where the source leaves a doubt, null."""

    def test_an_outer_coroutine_that_swallows_what_the_inner_re_raised(self, watched):
        async def inner():
            try:
                await asyncio.sleep(LONG)
            except asyncio.CancelledError:
                await asyncio.sleep(0)  # cleanup, then re-raise
                raise

        async def outer():
            try:
                await inner()
            except BaseException:  # <- outer: swallowed
                return None

        assert_swallowed_at(swallowed_by(watched, outer, inner), "outer: swallowed")

    def test_except_exception_lets_it_through_to_the_handler_that_catches_it(self, watched):
        async def inner():
            try:
                await asyncio.sleep(LONG)
            except Exception:
                pass

        async def outer():
            try:
                await inner()
            except (ValueError, asyncio.CancelledError):  # <- tuple: swallowed
                pass

        assert_swallowed_at(swallowed_by(watched, outer, inner), "tuple: swallowed")

    def test_a_handler_that_re_raises_does_not_pass_it_to_its_siblings(self, watched):
        async def worker():
            try:
                try:
                    await asyncio.sleep(LONG)
                except asyncio.CancelledError:
                    raise
                except BaseException:
                    pass
            except asyncio.CancelledError:  # <- sibling: swallowed
                pass

        assert_swallowed_at(swallowed_by(watched, worker), "sibling: swallowed")

    def test_a_conditional_re_raise_with_nothing_around_it_is_the_one(self, watched):
        """The task finished normally, so the only statement that could end
        the error did."""
        closing = False

        async def worker():
            try:
                await asyncio.sleep(LONG)
            except asyncio.CancelledError:  # <- conditional: swallowed
                if closing:
                    raise

        assert_swallowed_at(swallowed_by(watched, worker), "conditional: swallowed")

    def test_a_conditional_re_raise_inside_another_catcher_is_not_named(self, watched):
        """Either statement may have ended it: no line rather than a guess."""
        closing = True

        async def inner():
            try:
                await asyncio.sleep(LONG)
            except asyncio.CancelledError:
                if closing:
                    raise

        async def outer():
            with contextlib.suppress(asyncio.CancelledError):
                await inner()

        finding = swallowed_by(watched, outer, inner)
        assert finding.swallowed_at is None
        assert "swallowed by" not in finding.message
        assert "swallowed; re-raise" in finding.message

    def test_a_handler_of_a_name_it_cannot_read_inside_another_catcher_is_not_named(self, watched):
        errors = (asyncio.CancelledError,)

        async def worker():
            try:
                try:
                    await asyncio.sleep(LONG)
                except errors:
                    pass
            except BaseException:
                pass

        assert swallowed_by(watched, worker).swallowed_at is None

    def test_a_context_manager_that_swallows_is_named_when_nothing_else_could(self, watched):
        @contextlib.contextmanager
        def log_errors():
            try:
                yield
            except BaseException:  # meant Exception
                pass

        async def worker():
            with log_errors():  # <- context manager: swallowed
                await asyncio.sleep(LONG)

        finding = swallowed_by(watched, worker)
        assert_swallowed_at(finding, "context manager: swallowed")
        assert "the context manager of the `with log_errors():`" in finding.message

    def test_a_context_manager_inside_a_handler_that_swallows_is_not_named(self, watched):
        """A lock, a timeout, a session: context managers let a
        CancelledError through as a rule; the ``except`` is named."""
        lock = asyncio.Lock()

        async def worker():
            try:
                async with lock:
                    await asyncio.sleep(LONG)
            except asyncio.CancelledError:  # <- around a lock: swallowed
                pass

        assert_swallowed_at(swallowed_by(watched, worker), "around a lock: swallowed")

    def test_a_task_cancelling_itself_names_no_statement(self, watched):
        """Its CancelledError lands at its next await, unknown when cancel() runs."""

        async def worker():
            with contextlib.suppress(asyncio.CancelledError):
                asyncio.current_task().cancel()  # lands at the next await, not here
            try:
                await asyncio.sleep(LONG)
            except asyncio.CancelledError:
                pass

        async def main():
            await asyncio.create_task(worker())

        watched.run(main)
        assert the_one_swallowed(watched.findings).swallowed_at is None

    def test_a_failure_reading_the_source_costs_the_field_not_the_finding(self, watched, monkeypatch, caplog):
        def broken(chain):
            raise RuntimeError("injected")

        monkeypatch.setattr(catchers, "_swallowed_at", broken)
        monkeypatch.setattr(catchers, "_disabled", False)

        finding = swallowed_by(watched, swallows_plainly)
        assert finding.swallowed_at is None
        assert "swallowed; re-raise" in finding.message
        assert catchers._disabled
        assert "asyncwatch.internal_error" in caplog.text and "injected" in caplog.text

    def test_without_the_source_reader_the_finding_is_made(self, watched, monkeypatch):
        """Imported when a finding is made; as the interpreter shuts down
        that import fails, and the finding loses the field only."""
        monkeypatch.setitem(sys.modules, "asyncwatch._core.catchers", None)  # import raises ImportError

        finding = swallowed_by(watched, swallows_plainly)
        assert finding.swallowed_at is None
        assert "swallowed; re-raise" in finding.message

    def test_code_with_no_source_names_no_statement(self, watched):
        namespace: dict[str, object] = {"asyncio": asyncio, "LONG": LONG}
        exec(  # noqa: S102
            "async def worker():\n"
            "    try:\n"
            "        await asyncio.sleep(LONG)\n"
            "    except asyncio.CancelledError:\n"
            "        pass\n",
            namespace,
        )
        finding = swallowed_by(watched, namespace["worker"])
        assert finding.swallowed_at is None
        assert "swallowed; re-raise" in finding.message


class TestReported:
    """A cancelled task that finishes normally is reported once, at the delivery await."""

    def test_except_cancelled_error_pass_is_reported(self, watched):
        """``except CancelledError: pass`` then return."""

        async def swallower():
            try:
                await asyncio.sleep(LONG)  # <- pass: delivered
            except asyncio.CancelledError:  # <- pass: swallowed
                pass
            return "done"

        async def main():
            task = asyncio.create_task(swallower(), name="swallower")  # <- pass: created
            await asyncio.sleep(TICK)
            task.cancel()  # <- pass: cancel
            assert await task == "done"

        watched.run(main)
        assert_reported(
            the_one_swallowed(watched.findings),
            site="pass: delivered",
            site_in=swallower,
            cancelled_by="pass: cancel",
            created_at="pass: created",
            task="swallower",
            coroutine=swallower,
            swallowed_at="pass: swallowed",
        )

    def test_contextlib_suppress_is_reported(self, watched):
        """``with contextlib.suppress(CancelledError)`` around the await."""

        async def suppressor():
            with contextlib.suppress(asyncio.CancelledError):  # <- suppress: swallowed
                await asyncio.sleep(LONG)  # <- suppress: delivered
            return "done"

        async def main():
            task = asyncio.create_task(suppressor(), name="suppressor")  # <- suppress: created
            await asyncio.sleep(TICK)
            task.cancel()  # <- suppress: cancel
            assert await task == "done"

        watched.run(main)
        assert_reported(
            the_one_swallowed(watched.findings),
            site="suppress: delivered",
            site_in=suppressor,
            cancelled_by="suppress: cancel",
            created_at="suppress: created",
            task="suppressor",
            coroutine=suppressor,
            swallowed_at="suppress: swallowed",
        )

    def test_return_in_finally_is_reported(self, watched):
        """``return`` inside ``finally`` discards the CancelledError."""

        async def finally_returner():
            try:
                await asyncio.sleep(LONG)  # <- finally: delivered
            finally:
                return "done"  # noqa: B012  # <- finally: swallowed

        async def main():
            task = asyncio.create_task(finally_returner(), name="finally-returner")  # <- finally: created
            await asyncio.sleep(TICK)
            task.cancel()  # <- finally: cancel
            assert await task == "done"

        watched.run(main)
        assert_reported(
            the_one_swallowed(watched.findings),
            site="finally: delivered",
            site_in=finally_returner,
            cancelled_by="finally: cancel",
            created_at="finally: created",
            task="finally-returner",
            coroutine=finally_returner,
            swallowed_at="finally: swallowed",
        )

    def test_swallow_in_nested_coroutine_points_at_the_innermost_await(self, watched):
        """The site is the await in the nested coroutine; the stack holds both frames."""

        async def inner():
            try:
                await asyncio.sleep(LONG)  # <- nested: inner await
            except asyncio.CancelledError:
                return "swallowed inside"

        async def outer():
            return await inner()  # <- nested: outer await

        async def main():
            task = asyncio.create_task(outer(), name="outer")  # <- nested: created
            await asyncio.sleep(TICK)
            task.cancel()  # <- nested: cancel
            assert await task == "swallowed inside"

        watched.run(main)
        finding = the_one_swallowed(watched.findings)
        assert_reported(
            finding,
            site="nested: inner await",
            site_in=inner,
            cancelled_by="nested: cancel",
            created_at="nested: created",
            task="outer",
            coroutine=outer,
        )
        app_stack = [(s.line, s.function) for s in finding.stack if s.file == __file__]
        assert app_stack == [
            (line_of("# <- nested: outer await"), outer.__qualname__),
            (line_of("# <- nested: inner await"), inner.__qualname__),
        ]

    def test_swallow_inside_an_async_generator_points_at_the_generators_await(self, watched):
        """Suspended in ``async for`` over an app async generator: the site is the await in the generator."""

        async def ticks():
            while True:
                await asyncio.sleep(LONG)  # <- agen: generator await
                yield 1

        async def consumer():
            try:
                async for _ in ticks():  # <- agen: async for
                    pass
            except asyncio.CancelledError:
                return "stopped"

        async def main():
            task = asyncio.create_task(consumer(), name="consumer")  # <- agen: created
            await asyncio.sleep(TICK)
            task.cancel()  # <- agen: cancel
            assert await task == "stopped"

        watched.run(main)
        finding = the_one_swallowed(watched.findings)
        assert_reported(
            finding,
            site="agen: generator await",
            site_in=ticks,
            cancelled_by="agen: cancel",
            created_at="agen: created",
            task="consumer",
            coroutine=consumer,
        )
        app_stack = [s.line for s in finding.stack if s.file == __file__]
        assert app_stack == [line_of("# <- agen: async for"), line_of("# <- agen: generator await")]

    def test_only_the_awaited_task_that_swallowed_is_reported(self, watched):
        """A awaits task B; A is cancelled, B swallows: B is reported, A (which just got B's result) is not."""

        async def b_swallows():
            try:
                await asyncio.sleep(LONG)  # <- a-b: b await
            except asyncio.CancelledError:
                pass
            return "b result"

        async def a_awaits(b):
            return await b

        async def main():
            b = asyncio.create_task(b_swallows(), name="B")  # <- a-b: b created
            a = asyncio.create_task(a_awaits(b), name="A")
            await asyncio.sleep(TICK)
            a.cancel()  # <- a-b: a cancel
            assert await a == "b result"

        watched.run(main)
        assert_reported(
            the_one_swallowed(watched.findings),
            site="a-b: b await",
            site_in=b_swallows,
            cancelled_by="a-b: a cancel",
            created_at="a-b: b created",
            task="B",
            coroutine=b_swallows,
        )

    def test_only_the_innermost_of_a_chain_of_awaited_tasks_is_reported(self, watched):
        """A awaits B awaits C; A is cancelled and C swallows: only C is reported."""

        async def c_swallows():
            try:
                await asyncio.sleep(LONG)  # <- chain: c await
            except asyncio.CancelledError:
                pass
            return "c result"

        async def relay(task):
            return await task

        async def main():
            c = asyncio.create_task(c_swallows(), name="C")  # <- chain: c created
            b = asyncio.create_task(relay(c), name="B")
            a = asyncio.create_task(relay(b), name="A")
            await asyncio.sleep(TICK)
            a.cancel()  # <- chain: a cancel
            assert await a == "c result"

        watched.run(main)
        assert_reported(
            the_one_swallowed(watched.findings),
            site="chain: c await",
            site_in=c_swallows,
            cancelled_by="chain: a cancel",
            created_at="chain: c created",
            task="C",
            coroutine=c_swallows,
        )

    def test_awaiting_task_that_catches_the_cancel_of_its_awaited_task_is_reported(self, watched):
        """A awaits B; A is cancelled, B re-raises properly, A catches at ``await b`` and returns: A is reported."""

        async def b_reraises():
            await asyncio.sleep(LONG)

        async def a_catches(b):
            try:
                await b  # <- converse: a await
            except asyncio.CancelledError:
                return "a gave up"

        async def main():
            b = asyncio.create_task(b_reraises(), name="B")
            a = asyncio.create_task(a_catches(b), name="A")  # <- converse: a created
            await asyncio.sleep(TICK)
            a.cancel()  # <- converse: a cancel
            assert await a == "a gave up"
            assert b.cancelled()

        watched.run(main)
        assert_reported(
            the_one_swallowed(watched.findings),
            site="converse: a await",
            site_in=a_catches,
            cancelled_by="converse: a cancel",
            created_at="converse: a created",
            task="A",
            coroutine=a_catches,
        )

    def test_a_later_swallow_is_reported_after_an_earlier_cancel_was_absorbed_by_an_awaited_task(self, watched):
        """A's first cancel is swallowed by the task it awaits (B reported); A then swallows a second cancel itself."""

        async def b_swallows():
            try:
                await asyncio.sleep(LONG)  # <- twice: b await
            except asyncio.CancelledError:
                pass
            return "b result"

        async def a_swallows_later(b):
            await b
            try:
                await asyncio.sleep(LONG)  # <- twice: a await
            except asyncio.CancelledError:
                pass
            return "a result"

        async def main():
            b = asyncio.create_task(b_swallows(), name="B")
            a = asyncio.create_task(a_swallows_later(b), name="A")  # <- twice: a created
            await asyncio.sleep(TICK)
            a.cancel()  # absorbed by B
            await asyncio.sleep(TICK)
            a.cancel()  # <- twice: second cancel
            assert await a == "a result"

        watched.run(main)
        by_task = {f.task: f for f in watched.of(SWALLOWED)}
        assert sorted(by_task) == ["A", "B"], watched.of(SWALLOWED)
        assert by_task["B"].site is not None and by_task["B"].site.line == line_of("# <- twice: b await")
        assert_reported(
            by_task["A"],
            site="twice: a await",
            site_in=a_swallows_later,
            cancelled_by="twice: second cancel",
            created_at="twice: a created",
            task="A",
            coroutine=a_swallows_later,
        )

    def test_a_cancel_the_loop_calls_back_names_no_line(self, watched):
        """``loop.call_later(d, task.cancel)``: the loop calls ``cancel()``
        itself, and the line further out only started the loop
        (``asyncio.run(main())``): cancelled_by is unknown, not that line."""

        async def swallower():
            try:
                await asyncio.sleep(LONG)  # <- loop cancel: delivered
            except asyncio.CancelledError:
                pass
            return "done"

        async def main():
            task = asyncio.create_task(swallower(), name="swallower")
            asyncio.get_running_loop().call_later(TICK, task.cancel)
            assert await task == "done"

        watched.run(main)
        finding = the_one_swallowed(watched.findings)
        assert finding.site is not None
        assert (finding.site.file, finding.site.line) == (__file__, line_of("# <- loop cancel: delivered"))
        assert finding.cancelled_by is None

    def test_a_cancel_in_a_callback_of_the_program_names_its_line(self, watched):
        """A callback of the program's own that calls ``cancel()`` is the canceller."""

        async def swallower():
            try:
                await asyncio.sleep(LONG)  # <- callback cancel: delivered
            except asyncio.CancelledError:
                pass
            return "done"

        async def main():
            task = asyncio.create_task(swallower(), name="swallower")  # <- callback cancel: created

            def stop() -> None:
                task.cancel()  # <- callback cancel: cancel

            asyncio.get_running_loop().call_later(TICK, stop)
            assert await task == "done"

        watched.run(main)
        assert_reported(
            the_one_swallowed(watched.findings),
            site="callback cancel: delivered",
            site_in=swallower,
            cancelled_by="callback cancel: cancel",
            created_at="callback cancel: created",
            task="swallower",
            coroutine=swallower,
        )

    def test_swallowing_the_shutdown_cancel_of_a_runner_points_at_the_runner(self, loop_name):
        """A task swallows the cancel that ``asyncio.Runner`` sends at shutdown; cancelled_by is the app's runner line."""
        collector = CollectingReporter()
        asyncwatch.install(reporters=[collector], log=False)
        keep = set()

        async def lingerer():
            try:
                await asyncio.sleep(LONG)  # <- runner shutdown: delivered
            except asyncio.CancelledError:
                pass
            return "lingered"

        async def main():
            keep.add(asyncio.create_task(lingerer(), name="lingerer"))  # <- runner shutdown: created
            await asyncio.sleep(TICK)

        factory = asyncwatch.loop_factory(base_factory(loop_name))
        try:
            with asyncio.Runner(loop_factory=factory) as runner:  # <- runner shutdown: with
                runner.run(main())  # <- runner shutdown: run
        finally:
            gc_collect_harder()
        (task,) = keep
        assert task.result() == "lingered"
        finding = the_one_swallowed(collector.findings)
        # Runner.close() (which cancels the leftover tasks) runs at the exit of the ``with``.
        assert_reported(
            finding,
            site="runner shutdown: delivered",
            site_in=lingerer,
            cancelled_by="runner shutdown: with",
            created_at="runner shutdown: created",
            task="lingerer",
            coroutine=lingerer,
        )

    def test_swallowing_the_shutdown_cancel_of_asyncio_run_points_at_the_run_call(self):
        """A task swallows the cancel that ``asyncio.run`` sends at shutdown; cancelled_by is the ``asyncio.run`` line."""
        collector = CollectingReporter()
        asyncwatch.install(reporters=[collector], log=False)  # no loop yet: watches the loop asyncio.run makes
        keep = set()

        async def lingerer():
            try:
                await asyncio.sleep(LONG)  # <- run shutdown: delivered
            except asyncio.CancelledError:
                pass
            return "lingered"

        async def main():
            keep.add(asyncio.create_task(lingerer(), name="lingerer"))  # <- run shutdown: created
            await asyncio.sleep(TICK)

        try:
            asyncio.run(main())  # <- run shutdown: asyncio.run
        finally:
            gc_collect_harder()
        (task,) = keep
        assert task.result() == "lingered"
        assert_reported(
            the_one_swallowed(collector.findings),
            site="run shutdown: delivered",
            site_in=lingerer,
            cancelled_by="run shutdown: asyncio.run",
            created_at="run shutdown: created",
            task="lingerer",
            coroutine=lingerer,
        )


async def fails_soon():
    await asyncio.sleep(TICK)
    raise ValueError("boom")


class TestStructuredCancellationSwallowed:
    """A structure uncancels only the task it owns: a TaskGroup child, the task
    awaited under a timeout, wait_for's task, that returns normally after the
    structure's CancelledError swallowed it.  cancelled_by is the application
    line that set the structure up, never the asyncio.run line."""

    def test_taskgroup_child_swallowing_the_abort_while_the_parent_is_in_the_body(self, watched):
        """A sibling fails while the parent still runs the body; the child catches and returns."""

        async def child():
            try:
                await asyncio.sleep(LONG)  # <- tg body: delivered
            except asyncio.CancelledError:
                pass
            return "kept going"

        async def main():
            with contextlib.suppress(ExceptionGroup):
                async with asyncio.TaskGroup() as tg:  # <- tg body: async with
                    tg.create_task(child(), name="child")  # <- tg body: created
                    tg.create_task(fails_soon())
                    await asyncio.sleep(LONG)

        watched.run(main)
        finding = the_one_swallowed(watched.findings)
        assert_reported(
            finding,
            site="tg body: delivered",
            site_in=child,
            cancelled_by="tg body: async with",
            created_at="tg body: created",
            task="child",
            coroutine=child,
        )
        assert "by the TaskGroup, set up at test_cancellation.py:" in finding.message

    def test_taskgroup_child_swallowing_the_abort_while_the_parent_waits_in_aexit(self, watched):
        """The same when the parent already waits at the end of the ``async with``."""

        async def child():
            try:
                await asyncio.sleep(LONG)  # <- tg aexit: delivered
            except asyncio.CancelledError:
                pass

        async def main():
            with contextlib.suppress(ExceptionGroup):
                async with asyncio.TaskGroup() as tg:  # <- tg aexit: async with
                    tg.create_task(child(), name="child")  # <- tg aexit: created
                    tg.create_task(fails_soon())

        watched.run(main)
        assert_reported(
            the_one_swallowed(watched.findings),
            site="tg aexit: delivered",
            site_in=child,
            cancelled_by="tg aexit: async with",
            created_at="tg aexit: created",
            task="child",
            coroutine=child,
        )

    def test_taskgroup_child_swallowing_the_abort_after_the_body_raised(self, watched):
        """The body raises: the group aborts its children; one returns normally."""

        async def child():
            try:
                await asyncio.sleep(LONG)  # <- tg raise: delivered
            except asyncio.CancelledError:
                return "ignored"

        async def main():
            with contextlib.suppress(ExceptionGroup, ValueError):
                async with asyncio.TaskGroup() as group:  # <- tg raise: async with
                    group.create_task(child(), name="child")  # <- tg raise: created
                    await asyncio.sleep(TICK)
                    raise ValueError("body failed")

        watched.run(main)
        assert_reported(
            the_one_swallowed(watched.findings),
            site="tg raise: delivered",
            site_in=child,
            cancelled_by="tg raise: async with",
            created_at="tg raise: created",
            task="child",
            coroutine=child,
        )

    def test_task_awaited_under_an_expiring_timeout_that_swallows(self, watched):
        """The timeout cancels its task, which forwards it to the task it awaits; that one returns."""

        async def inner():
            try:
                await asyncio.sleep(LONG)  # <- timeout: delivered
            except asyncio.CancelledError:
                pass
            return "late"

        async def main():
            task = asyncio.create_task(inner(), name="inner")  # <- timeout: created
            async with asyncio.timeout(TICK):  # <- timeout: async with
                assert await task == "late"

        watched.run(main)
        assert_reported(
            the_one_swallowed(watched.findings),
            site="timeout: delivered",
            site_in=inner,
            cancelled_by="timeout: async with",
            created_at="timeout: created",
            task="inner",
            coroutine=inner,
        )

    def test_gather_child_under_an_expiring_timeout_that_swallows(self, watched):
        """The timeout's cancellation reaches gather's tasks; the one that returns is reported."""

        async def swallows():
            try:
                await asyncio.sleep(LONG)  # <- timeout gather: delivered
            except asyncio.CancelledError:
                pass

        async def reraises():
            await asyncio.sleep(LONG)

        async def main():
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(TICK):  # <- timeout gather: async with
                    await asyncio.gather(swallows(), reraises())  # <- timeout gather: created

        watched.run(main)
        finding = the_one_swallowed(watched.findings)
        assert (finding.site.file, finding.site.line) == (__file__, line_of("# <- timeout gather: delivered"))
        assert finding.cancelled_by is not None
        assert finding.cancelled_by.line == line_of("# <- timeout gather: async with")
        assert finding.created_at.line == line_of("# <- timeout gather: created")
        assert "by the timeout" in finding.message

    def test_task_given_to_wait_for_that_swallows(self, watched):
        """wait_for times out and cancels the task; the task returns a value instead."""

        async def inner():
            try:
                await asyncio.sleep(LONG)  # <- wait_for: delivered
            except asyncio.CancelledError:
                pass
            return "late"

        async def main():
            task = asyncio.create_task(inner(), name="inner")  # <- wait_for: created
            assert await asyncio.wait_for(task, TICK) == "late"  # <- wait_for: call

        watched.run(main)
        assert_reported(
            the_one_swallowed(watched.findings),
            site="wait_for: delivered",
            site_in=inner,
            cancelled_by="wait_for: call",
            created_at="wait_for: created",
            task="inner",
            coroutine=inner,
        )

    def test_a_timeout_whose_own_block_swallows_its_cancellation(self, watched):
        """The same task: ``except CancelledError: pass`` inside the block, so the
        block runs on past its deadline and no TimeoutError is raised."""
        went_on = []

        async def fetch():
            try:
                await asyncio.sleep(LONG)  # <- own block: delivered
            except asyncio.CancelledError:
                pass
            return "partial"

        async def handler():
            async with asyncio.timeout(TICK):  # <- own block: async with
                await fetch()
                went_on.append(True)

        async def main():
            await asyncio.create_task(handler(), name="handler")  # <- own block: created

        watched.run(main)
        assert went_on == [True]
        finding = the_one_swallowed(watched.findings)
        assert_reported(
            finding,
            site="own block: delivered",
            site_in=fetch,
            cancelled_by="own block: async with",
            created_at="own block: created",
            task="handler",
            coroutine=handler,
        )
        assert "by the timeout" in finding.message
        assert "TimeoutError" in finding.message

    def test_wait_for_on_a_coroutine_that_swallows(self, watched):
        """wait_for returns the coroutine's value instead of raising TimeoutError;
        the same finding whether wait_for runs it in a task (3.11) or under a timeout (3.12+)."""

        async def fetch():
            try:
                await asyncio.sleep(LONG)  # <- wait_for coro: delivered
            except asyncio.CancelledError:
                return None
            return "data"

        async def handler():
            return await asyncio.wait_for(fetch(), TICK)  # <- wait_for coro: call

        async def main():
            return await asyncio.create_task(handler(), name="handler")  # <- wait_for coro: created

        assert watched.run(main) is None
        finding = the_one_swallowed(watched.findings)
        assert (finding.site.file, finding.site.line) == (__file__, line_of("# <- wait_for coro: delivered"))
        assert finding.cancelled_by is not None
        assert finding.cancelled_by.line == line_of("# <- wait_for coro: call")
        assert "swallowed" in finding.message

    def test_a_deliberate_uncancel_inside_a_timeout_block_is_silent(self, watched):
        async def resilient():
            try:
                await asyncio.sleep(LONG)
            except asyncio.CancelledError:
                asyncio.current_task().uncancel()  # on purpose: carry on
            return "carried on"

        async def main():
            async with asyncio.timeout(TICK):
                return await resilient()

        assert watched.run(main) == "carried on"
        assert_silent(watched.findings)

    def test_the_timeout_exit_is_asyncios_own_again_after_uninstall_and_in_no_traceback(self, watched):
        original = asyncio.Timeout.__dict__["__aexit__"]
        frames = []

        async def main():
            try:
                async with asyncio.timeout(TICK):
                    await asyncio.sleep(LONG)
            except TimeoutError as exc:
                tb = exc.__traceback__
                while tb is not None:
                    frames.append(tb.tb_frame.f_code.co_filename)
                    tb = tb.tb_next

        watched.run(main)
        assert frames and not [f for f in frames if "asyncwatch" in f], frames
        assert_silent(watched.findings)
        asyncwatch.uninstall()
        assert asyncio.Timeout.__dict__["__aexit__"] is original

    def test_taskgroup_child_that_cleans_up_then_reraises_is_silent(self, watched):
        """``except CancelledError: await cleanup(); raise`` inside a TaskGroup child."""
        cleaned = []

        async def child():
            try:
                await asyncio.sleep(LONG)
            except asyncio.CancelledError:
                await asyncio.sleep(0)
                cleaned.append(True)
                raise

        async def main():
            with contextlib.suppress(ExceptionGroup):
                async with asyncio.TaskGroup() as tg:
                    tg.create_task(child())
                    tg.create_task(fails_soon())

        watched.run(main)
        assert cleaned == [True]
        assert_silent(watched.findings)

    def test_taskgroup_parent_catching_its_own_abort_is_silent(self, watched):
        """The parent's cancellation is the group's own bookkeeping (gh-116720), handled with except*."""

        async def main():
            try:
                async with asyncio.TaskGroup() as tg:
                    tg.create_task(fails_soon())
                    await asyncio.sleep(LONG)
            except* ValueError:
                pass
            return "handled"

        assert watched.run(main) == "handled"
        assert_silent(watched.findings)


class TestNeverReported:
    """Cancellation that is propagated, or structured and handled by asyncio, is never reported."""

    def test_taskgroup_cancelling_siblings_of_a_failing_child(self, watched):
        """A child fails while the parent is in the TaskGroup body; siblings and parent re-raise."""
        caught = []

        async def sibling():
            await asyncio.sleep(LONG)

        async def failing():
            await asyncio.sleep(TICK)
            raise ValueError("boom")

        async def main():
            try:
                async with asyncio.TaskGroup() as tg:
                    tg.create_task(sibling())
                    tg.create_task(sibling())
                    tg.create_task(failing())
                    await asyncio.sleep(LONG)
            except* ValueError as eg:
                caught.append(eg)
            return "handled"

        assert watched.run(main) == "handled"
        assert len(caught) == 1
        assert_silent(watched.findings)

    def test_taskgroup_child_failing_while_parent_waits_in_aexit(self, watched):
        """gh-116720: the child fails while the parent waits in ``__aexit__``; the parent catches with ``except*``."""
        cancelling_after = []

        async def sibling():
            await asyncio.sleep(LONG)

        async def failing():
            await asyncio.sleep(TICK)
            raise ValueError("boom")

        async def parent():
            try:
                async with asyncio.TaskGroup() as tg:
                    tg.create_task(sibling())
                    tg.create_task(failing())
                # the body is done at once: the parent waits in __aexit__ when the child fails
            except* ValueError:
                pass
            cancelling_after.append(asyncio.current_task().cancelling())
            return "parent done"

        async def main():
            return await asyncio.create_task(parent(), name="parent")

        assert watched.run(main) == "parent done"
        # The scenario really happened: 3.11/3.12 leave the parent's cancelling() at 1.
        assert cancelling_after == [1 if sys.version_info < (3, 13) else 0]
        assert_silent(watched.findings)

    def test_taskgroup_parent_cancelled_from_outside_reraises(self, watched):
        """The parent of a TaskGroup is cancelled from outside; children and parent re-raise."""

        async def child():
            await asyncio.sleep(LONG)

        async def parent():
            async with asyncio.TaskGroup() as tg:
                tg.create_task(child())
                tg.create_task(child())

        async def main():
            task = asyncio.create_task(parent())
            await asyncio.sleep(TICK)
            task.cancel()
            await asyncio.wait([task])
            assert task.cancelled()

        watched.run(main)
        assert_silent(watched.findings)

    def test_asyncio_timeout_expiring(self, watched):
        """``asyncio.timeout`` expires: TimeoutError, the task's cancellation is undone by asyncio."""
        timed_out = []

        async def main():
            try:
                async with asyncio.timeout(TICK):
                    await asyncio.sleep(LONG)
            except TimeoutError:
                timed_out.append(True)
            return "after timeout"

        assert watched.run(main) == "after timeout"
        assert timed_out == [True]
        assert_silent(watched.findings)

    def test_asyncio_timeout_expiring_around_an_awaited_task(self, watched):
        """``asyncio.timeout`` expires while awaiting a task; the task re-raises, the awaiter gets TimeoutError."""
        timed_out = []

        async def slow():
            await asyncio.sleep(LONG)

        async def main():
            task = asyncio.create_task(slow())
            try:
                async with asyncio.timeout(TICK):
                    await task
            except TimeoutError:
                timed_out.append(task.cancelled())
            return "after timeout"

        assert watched.run(main) == "after timeout"
        assert timed_out == [True]
        assert_silent(watched.findings)

    def test_wait_for_timing_out_on_a_coroutine(self, watched):
        """``asyncio.wait_for`` on a coroutine times out."""
        timed_out = []

        async def slow():
            await asyncio.sleep(LONG)

        async def main():
            try:
                await asyncio.wait_for(slow(), TICK)
            except TimeoutError:
                timed_out.append(True)
            return "after wait_for"

        assert watched.run(main) == "after wait_for"
        assert timed_out == [True]
        assert_silent(watched.findings)

    def test_wait_for_timing_out_on_a_task(self, watched):
        """``asyncio.wait_for`` on a task times out; the task is cancelled and re-raises."""
        timed_out = []

        async def slow():
            await asyncio.sleep(LONG)

        async def main():
            task = asyncio.create_task(slow(), name="inner")
            try:
                await asyncio.wait_for(task, TICK)
            except TimeoutError:
                timed_out.append(task.cancelled())
            return "after wait_for"

        assert watched.run(main) == "after wait_for"
        assert timed_out == [True]
        assert_silent(watched.findings)

    def test_wait_for_timing_out_inside_a_task(self, watched):
        """``asyncio.wait_for`` times out inside a created task, which handles the TimeoutError and returns."""

        async def slow():
            await asyncio.sleep(LONG)

        async def worker():
            try:
                await asyncio.wait_for(asyncio.create_task(slow()), TICK)
            except TimeoutError:
                return "timed out"

        async def main():
            assert await asyncio.create_task(worker()) == "timed out"

        watched.run(main)
        assert_silent(watched.findings)

    def test_shield_outer_cancelled_and_reraising_while_inner_continues(self, watched):
        """The task awaiting ``shield(inner)`` is cancelled and re-raises; the shielded task finishes."""

        async def inner():
            await asyncio.sleep(TICK * 3)
            return "inner done"

        async def outer(inner_task):
            await asyncio.shield(inner_task)

        async def main():
            inner_task = asyncio.create_task(inner())
            outer_task = asyncio.create_task(outer(inner_task))
            await asyncio.sleep(TICK)
            outer_task.cancel()
            await asyncio.wait([outer_task])
            assert outer_task.cancelled()
            assert await inner_task == "inner done"

        watched.run(main)
        assert_silent(watched.findings)

    def test_deliberate_uncancel(self, watched):
        """The task catches CancelledError, calls ``uncancel()`` and carries on."""

        async def resilient():
            try:
                await asyncio.sleep(LONG)
            except asyncio.CancelledError:
                assert asyncio.current_task().uncancel() == 0
            await asyncio.sleep(0)
            return "carried on"

        async def main():
            task = asyncio.create_task(resilient())
            await asyncio.sleep(TICK)
            task.cancel()
            assert await task == "carried on"

        watched.run(main)
        assert_silent(watched.findings)

    def test_catching_the_cancellation_of_a_future_someone_else_cancelled(self, watched):
        """Another task cancels the future; the awaiting task (never cancelled itself) catches and returns."""

        async def waiter(fut):
            try:
                await fut
            except asyncio.CancelledError:
                return "future was cancelled"

        async def canceller(fut):
            await asyncio.sleep(TICK)
            fut.cancel()

        async def main():
            fut = asyncio.get_running_loop().create_future()
            waiting = asyncio.create_task(waiter(fut))
            await asyncio.create_task(canceller(fut))
            assert await waiting == "future was cancelled"

        watched.run(main)
        assert_silent(watched.findings)

    def test_catching_the_cancellation_of_a_task_someone_else_cancelled(self, watched):
        """B is cancelled directly (not through A) and re-raises; A catches at ``await b`` and returns."""

        async def b_reraises():
            await asyncio.sleep(LONG)

        async def a_catches(b):
            try:
                await b
            except asyncio.CancelledError:
                return "b was cancelled"

        async def main():
            b = asyncio.create_task(b_reraises())
            a = asyncio.create_task(a_catches(b))
            await asyncio.sleep(TICK)
            b.cancel()
            assert await a == "b was cancelled"

        watched.run(main)
        assert_silent(watched.findings)

    def test_task_cancelled_before_its_first_step(self, watched):
        """A task cancelled before it ever ran is cancelled; its body (which would swallow) never runs."""

        async def would_swallow():
            try:
                await asyncio.sleep(LONG)
            except asyncio.CancelledError:
                pass
            return "never"

        async def main():
            task = asyncio.create_task(would_swallow())
            task.cancel()
            await asyncio.wait([task])
            assert task.cancelled()

        watched.run(main)
        assert_silent(watched.findings)

    def test_cleanup_then_reraise(self, watched):
        """``except CancelledError: await cleanup(); raise``."""
        cleaned = []

        async def cleanup():
            await asyncio.sleep(0)
            cleaned.append(True)

        async def worker():
            try:
                await asyncio.sleep(LONG)
            except asyncio.CancelledError:
                await cleanup()
                raise

        async def main():
            task = asyncio.create_task(worker())
            await asyncio.sleep(TICK)
            task.cancel()
            await asyncio.wait([task])
            assert task.cancelled()

        watched.run(main)
        assert cleaned == [True]
        assert_silent(watched.findings)

    def test_background_task_set_cancelled_and_reraising(self, watched):
        """The "set of background tasks" pattern, cancelled, re-raising."""

        async def background():
            try:
                await asyncio.sleep(LONG)
            finally:
                await asyncio.sleep(0)

        async def main():
            tasks = set()
            for _ in range(3):
                task = asyncio.create_task(background())
                tasks.add(task)
                task.add_done_callback(tasks.discard)
            await asyncio.sleep(TICK)
            for task in list(tasks):
                task.cancel()
            await asyncio.sleep(TICK)
            assert not tasks

        watched.run(main)
        assert_silent(watched.findings)

    def test_to_thread_awaiter_cancelled_and_reraising(self, watched):
        """The task awaiting ``asyncio.to_thread`` is cancelled and re-raises."""

        async def worker():
            await asyncio.to_thread(time.sleep, TICK * 3)

        async def main():
            task = asyncio.create_task(worker())
            await asyncio.sleep(TICK)
            task.cancel()
            await asyncio.wait([task])
            assert task.cancelled()

        watched.run(main)
        assert_silent(watched.findings)

    def test_tasks_cancelled_at_runner_shutdown_that_reraise(self, watched):
        """Leftover tasks that ``asyncio.Runner`` cancels at shutdown re-raise (one after cleanup)."""
        keep = []

        async def plain():
            await asyncio.sleep(LONG)

        async def with_cleanup():
            try:
                await asyncio.sleep(LONG)
            except asyncio.CancelledError:
                await asyncio.sleep(0)
                raise

        async def main():
            keep.append(asyncio.create_task(plain()))
            keep.append(asyncio.create_task(with_cleanup()))
            await asyncio.sleep(TICK)

        watched.run(main)
        assert [t.cancelled() for t in keep] == [True, True]
        assert_silent(watched.findings)

    def test_tasks_cancelled_at_asyncio_run_shutdown_that_reraise(self):
        """Leftover tasks that ``asyncio.run`` cancels at shutdown re-raise."""
        collector = CollectingReporter()
        asyncwatch.install(reporters=[collector], log=False)
        keep = []

        async def plain():
            await asyncio.sleep(LONG)

        async def main():
            keep.append(asyncio.create_task(plain()))
            await asyncio.sleep(TICK)

        try:
            asyncio.run(main())
        finally:
            gc_collect_harder()
        assert [t.cancelled() for t in keep] == [True]
        assert_silent(collector.findings)


# An installed library with a staggered race of its own (aiohappyeyeballs',
# under aiohttp's connections): each attempt runs in the library's wrapper,
# which records whatever the attempt raised, CancelledError included, and
# the library cancels the attempts that lose.
RACELIB = """
import asyncio

async def race(first, second):
    async def attempt(make):
        try:
            return await make()
        except BaseException as exc:  # recorded, as a staggered race does
            return exc

    tasks = [asyncio.create_task(attempt(first)), asyncio.create_task(attempt(second))]
    done, pending = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    for task in pending:
        task.cancel()
    await asyncio.wait(pending)
    return done.pop().result()

async def cancel_soon(make):
    task = asyncio.create_task(make())
    await asyncio.sleep(0.01)
    task.cancel()
    return await asyncio.wait([task])

_keep = set()

def start_pool():
    # anyio's process pool: a task that waits for the loop's shutdown to
    # cancel it, then stops the workers and returns.
    async def shutdown_on_exit():
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            pass  # the workers are stopped here

    _keep.add(asyncio.create_task(shutdown_on_exit()))

def attempt_task(make):
    async def attempt():
        try:
            return await make()
        except BaseException as exc:
            return exc
    return asyncio.create_task(attempt())
"""


@pytest.fixture
def racelib(tmp_path, monkeypatch):
    """`racelib`, installed: in a site-packages directory, so library code to asyncwatch."""
    site_packages = tmp_path / "lib" / "site-packages"
    (site_packages / "racelib").mkdir(parents=True)
    (site_packages / "racelib" / "__init__.py").write_text(RACELIB, encoding="utf-8")
    monkeypatch.syspath_prepend(str(site_packages))
    import racelib

    yield racelib
    sys.modules.pop("racelib", None)


class TestALibrarysOwnStructure:
    """A library that cancels its own tasks, running its own coroutines, has a
    structure of its own, as asyncio's staggered race is; the program's
    coroutines and the program's cancel() stay reported."""

    def test_a_library_race_cancelling_its_own_attempts_is_silent(self, watched, racelib):
        async def slow():
            await asyncio.sleep(LONG)

        async def fast():
            await asyncio.sleep(TICK)
            return "fast"

        async def main():
            return await racelib.race(slow, fast)

        assert watched.run(main) == "fast"
        assert_silent(watched.findings)

    def test_a_library_task_that_cleans_up_at_asyncio_runs_shutdown_is_silent(self, watched, racelib):
        async def main():
            racelib.start_pool()
            await asyncio.sleep(TICK)
            return "done"

        assert watched.run(main) == "done"
        assert_silent(watched.findings)

    def test_the_programs_coroutine_cancelled_by_a_library_is_still_reported(self, watched, racelib):
        async def swallows():
            try:
                await asyncio.sleep(LONG)  # <- the library's cancel lands here
            except asyncio.CancelledError:
                return "carried on"

        async def main():
            await racelib.cancel_soon(swallows)  # <- asks the library to cancel

        watched.run(main)
        finding = the_one_swallowed(watched.findings)
        assert (finding.site.file, finding.site.line) == (__file__, line_of("# <- the library's cancel lands here"))
        assert finding.cancelled_by is not None
        assert finding.cancelled_by.line == line_of("# <- asks the library to cancel")

    def test_the_programs_cancel_of_a_library_task_is_still_reported(self, watched, racelib):
        async def main():
            task = racelib.attempt_task(lambda: asyncio.sleep(LONG))
            await asyncio.sleep(TICK)
            task.cancel()  # <- the program cancels
            await task

        watched.run(main)
        finding = the_one_swallowed(watched.findings)
        assert finding.cancelled_by is not None
        assert finding.cancelled_by.line == line_of("# <- the program cancels")
