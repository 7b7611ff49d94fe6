"""coroutine_never_awaited: a coroutine object created and dropped without being awaited.

The hook is process-wide: it sees coroutines dropped on any loop, and in plain
synchronous code, as long as asyncwatch is installed.  Tests on a loop use the
``watched`` harness; synchronous ones install asyncwatch and use
`asyncwatch.testing.capture_findings`.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import gc
import json
import sys
import threading
import warnings

import pytest

import asyncwatch
from asyncwatch._core import callsites
from asyncwatch._detectors.never_awaited import ORIGIN_DEPTH
from asyncwatch.testing import capture_findings
from conftest import base_factory, line_of

NEVER_AWAITED = "coroutine_never_awaited"


async def save(item):
    """The coroutine the tests forget to await."""
    return item


async def refresh_in_a_cycle(box):
    """Called unawaited on one line of this file only, and awaited or handed
    to asyncio elsewhere: the source can tell which line made it."""
    await asyncio.wait_for(refresh_in_a_cycle(box), 1)


async def poll_in_a_thread():
    """Given to a thread on one line of this file."""


async def poll_in_a_timer():
    """Given to a timer on one line of this file."""


async def save_report(rows):
    """Given to an executor inside a lambda, on one line of this file."""


def create_save():
    return save("made by a helper")  # <- created in helper


def drop_in_helper():
    save("dropped by a helper")  # <- dropped in helper


def drop_one():
    save("warned")  # <- warned line


class GivenToTheLoop:
    """Each way of giving the loop a coroutine function as a callback; each
    coroutine function is given on one line of this file only."""

    async def refresh_later(self):
        pass

    async def refresh_partial(self, _n):
        pass

    async def refresh_method(self):
        pass

    async def refresh_done(self, _future):
        pass

    async def refresh_lambda(self):
        pass

    async def refresh_multiline(self):
        pass

    def give_call_later(self, loop):
        loop.call_later(0, self.refresh_later)  # <- given: call_later

    def give_partial(self, loop):
        loop.call_soon(functools.partial(self.refresh_partial, 1))  # <- given: partial

    def give_method(self, loop):
        loop.call_soon(self.refresh_method)  # <- given: method

    def give_done_callback(self, loop):
        future = loop.create_future()
        future.add_done_callback(self.refresh_done)  # <- given: done_callback
        future.set_result(None)

    def give_lambda(self, loop):
        loop.call_soon(lambda: self.refresh_lambda())  # <- given: lambda

    def give_multiline(self, loop):
        loop.call_later(  # <- given: multiline
            0,
            self.refresh_multiline,
        )


@pytest.fixture
def installed():
    """asyncwatch installed for synchronous code (no loop); uninstalled by conftest."""
    asyncwatch.install(log=False)


@pytest.fixture
def installed_with_origins():
    """asyncwatch installed with exact coroutine origins; uninstalled by conftest."""
    asyncwatch.install(log=False, track_coroutine_origins=True)


def assert_site(finding, label, function):
    """The finding's site is the line marked ``# <- label`` in this file, in *function*."""
    assert finding.site is not None, finding.message
    assert finding.site.file == __file__
    assert finding.site.line == line_of(f"# <- {label}")
    assert finding.site.function == function


def assert_origin_site(finding, label, function):
    """Like `assert_site`, for sites read from ``cr_origin``.

    ``cr_origin`` records ``co_name``, not ``co_qualname``, so only the last
    part of the qualified name is compared here.
    """
    assert finding.site is not None, finding.message
    assert finding.site.file == __file__
    assert finding.site.line == line_of(f"# <- {label}")
    assert finding.site.function.rpartition(".")[2] == function.rpartition(".")[2]


class TestDroppedCoroutineOnALoop:
    """A coroutine dropped in a coroutine is reported at the line that dropped it."""

    def test_call_without_await_is_reported_at_its_line(self, watched):
        """``save(x)`` instead of ``await save(x)``: the site is that line."""

        async def main():
            save(1)  # <- forgot await in main
            await asyncio.sleep(0)

        watched.run(main)

        [finding] = watched.findings
        assert finding.kind.value == NEVER_AWAITED
        assert_site(finding, "forgot await in main", main.__qualname__)
        assert finding.coroutine == save.__qualname__
        assert "save" in finding.message
        data = json.loads(json.dumps(finding.to_dict()))
        assert data["kind"] == NEVER_AWAITED
        assert data["site"]["line"] == line_of("# <- forgot await in main")

    def test_a_coroutine_function_given_to_call_soon_is_never_said_to_be_garbage(self, watched):
        """The loop calls it and drops the coroutine: no line of the program is
        running, and the message says what happened, never "the garbage
        collector"; the line that gave it to the loop is read from the source."""

        async def flush_metrics():
            pass

        async def main():
            asyncio.get_running_loop().call_soon(flush_metrics)  # <- given to call_soon
            await asyncio.sleep(0.01)

        watched.run(main)

        [finding] = watched.findings
        assert finding.kind.value == NEVER_AWAITED
        assert (finding.created_at, finding.dropped_at) == (None, None)
        assert_site(finding, "given to call_soon", main.__qualname__)
        assert finding.scheduled_at == finding.site
        assert "garbage collector" not in finding.message
        if watched.loop_name == "asyncio":
            # asyncio's Handle runs in Python: the callback is seen.
            assert f"was given to the event loop as a callback at test_coroutines.py:{finding.site.line}" in (
                finding.message
            )
            assert "asyncio.create_task(flush_metrics(...))" in finding.message
        else:
            # uvloop's handle runs in C: what can have done it is said.
            assert "the event loop dropped it from compiled code" in finding.message
            assert f"the callback given to the loop at test_coroutines.py:{finding.site.line}" in finding.message

    def test_a_coroutine_an_executor_returned_is_reported_where_the_source_made_it(self, watched):
        """``run_in_executor(None, lambda: save_report(rows))``: the executor
        returns the coroutine as the future's result, and the loop frees it
        (uvloop from C, with no callback of the program's to blame): the one
        line of the source that made it is the site, on both loops."""

        async def main():
            await asyncio.get_running_loop().run_in_executor(None, lambda: save_report(3))  # <- made in an executor
            await asyncio.sleep(0.01)

        watched.run(main)

        [finding] = watched.of(NEVER_AWAITED)
        assert_site(finding, "made in an executor", f"{main.__qualname__}.<locals>.<lambda>")
        assert finding.created_at == finding.site
        line = finding.site.line
        assert f"the source tells: at test_coroutines.py:{line}, the only call of save_report()" in finding.message
        assert "a callback given to the loop" not in finding.message

    @pytest.mark.parametrize("shape", ["call_later", "partial", "method", "done_callback", "lambda", "multiline"])
    def test_the_line_that_gave_the_loop_a_coroutine_function_is_the_site(self, watched, shape):
        """Every way of handing the loop a callback that makes a coroutine:
        the registration is the line to fix, on both loops."""
        give = getattr(GivenToTheLoop(), f"give_{shape}")

        async def main():
            give(asyncio.get_running_loop())
            await asyncio.sleep(0.01)

        watched.run(main)

        [finding] = watched.of(NEVER_AWAITED)
        label = f"given: {shape}"
        assert finding.scheduled_at is not None and finding.scheduled_at.file == __file__
        assert (finding.scheduled_at.line, finding.scheduled_at.function) == (
            line_of(f"# <- {label}"),
            give.__qualname__,
        )
        if shape == "lambda" and watched.loop_name == "asyncio":
            # The lambda is seen: its call made the coroutine, on that line.
            assert finding.created_at == finding.site
            assert_site(finding, label, f"{give.__qualname__}.<locals>.<lambda>")
        else:
            assert finding.created_at is None
            assert finding.site == finding.scheduled_at

    @pytest.mark.parametrize("shape", ["twice", "variable"])
    def test_a_callback_the_source_does_not_pin_to_one_line_has_no_scheduled_line(self, watched, shape):
        """Two lines give the loop the same function, or it goes through a
        variable: no line is named rather than a guess."""

        async def poll_twice():
            pass

        async def poll_through_a_variable():
            pass

        async def main():
            loop = asyncio.get_running_loop()
            if shape == "twice":
                loop.call_soon(poll_twice)
                if loop.time() < 0:
                    loop.call_soon(poll_twice)  # never runs: the source still has two
            else:
                callback = poll_through_a_variable
                loop.call_soon(callback)
            await asyncio.sleep(0.01)

        watched.run(main)

        [finding] = watched.of(NEVER_AWAITED)
        assert (finding.site, finding.scheduled_at, finding.created_at) == (None, None, None)
        if watched.loop_name == "asyncio":
            assert "where it was scheduled is unknown" in finding.message
        else:
            assert "where it was created and scheduled is unknown on this loop" in finding.message

    def test_a_failure_reading_the_registration_costs_the_field_not_the_finding(self, watched, monkeypatch, caplog):
        def broken(*args):
            raise RuntimeError("injected")

        monkeypatch.setattr(callsites, "_registrations", broken)
        monkeypatch.setattr(callsites, "_disabled", False)
        finding = self._given_to_call_later(watched)
        assert (finding.site, finding.scheduled_at) == (None, None)
        assert callsites._disabled
        assert "asyncwatch.internal_error" in caplog.text and "injected" in caplog.text

    def test_without_the_registration_reader_the_finding_is_made(self, watched, monkeypatch):
        """Imported when a finding is made; as the interpreter shuts down
        that import fails, and the finding loses the field only."""
        monkeypatch.setitem(sys.modules, "asyncwatch._core.callsites", None)  # import raises ImportError
        finding = self._given_to_call_later(watched)
        assert (finding.site, finding.scheduled_at) == (None, None)
        assert "refresh_later" in finding.message

    @staticmethod
    def _given_to_call_later(watched):
        give = GivenToTheLoop().give_call_later

        async def main():
            give(asyncio.get_running_loop())
            await asyncio.sleep(0.01)

        watched.run(main)
        [finding] = watched.of(NEVER_AWAITED)
        return finding

    @pytest.mark.parametrize("shape", ["lambda", "function", "method", "partial"])
    def test_a_coroutine_a_callback_returned_is_reported_where_the_callback_made_it(self, watched, shape):
        """``call_later(5, lambda: expire(sid))``: the loop ignores what a
        callback returns.  On asyncio the callback is seen, and the line in
        it that made the coroutine is read from its code."""

        class Session:
            def expire(self):
                return save("session")  # <- made by a method callback

        def expire(sid):
            return save(sid)  # <- made by a function callback

        async def main():
            loop = asyncio.get_running_loop()
            if shape == "lambda":
                loop.call_soon(lambda: save("s-1"))  # <- made by a lambda callback
            elif shape == "function":
                loop.call_soon(expire, "s-1")
            elif shape == "method":
                loop.call_soon(Session().expire)
            else:
                loop.call_soon(functools.partial(expire, "s-1"))
            await asyncio.sleep(0.01)

        watched.run(main)

        [finding] = watched.findings
        assert finding.kind.value == NEVER_AWAITED
        assert finding.dropped_at is None
        if watched.loop_name == "uvloop":
            assert (finding.site, finding.created_at) == (None, None)
            assert "the event loop dropped it from compiled code" in finding.message
            return
        label, function = {
            "lambda": ("made by a lambda callback", "<lambda>"),
            "function": ("made by a function callback", "expire"),
            "method": ("made by a method callback", "Session.expire"),
            "partial": ("made by a function callback", "expire"),
        }[shape]
        assert finding.site is not None and finding.site.line == line_of(f"# <- {label}")
        assert finding.site.file == __file__
        assert finding.site.function.endswith(function)
        assert finding.created_at == finding.site
        assert f"was created at test_coroutines.py:{finding.site.line} and returned by" in finding.message
        assert "a callback the event loop called" in finding.message

    def test_a_callback_that_returns_a_coroutine_it_did_not_make_has_no_line(self, watched):
        """A callback returning a coroutine made elsewhere (kept earlier): no
        line of the callback made it, and none is given as its creation; on
        asyncio the line that gave the loop the callback is, said to be that.
        (uvloop gives no handle to tell one callback from another: there the
        line is read from the coroutine function's file alone.)"""
        kept = []

        async def main():
            kept.append(save("made earlier"))
            asyncio.get_running_loop().call_soon(lambda: kept.pop())  # <- gives the loop a lambda
            await asyncio.sleep(0.01)

        watched.run(main)

        [finding] = watched.findings
        assert finding.created_at is None
        if watched.loop_name == "asyncio":
            # The line that gave the loop the lambda is known, and said to be that.
            assert_site(finding, "gives the loop a lambda", main.__qualname__)
            assert finding.scheduled_at == finding.site
            assert f"(given to the loop at test_coroutines.py:{finding.site.line})" in finding.message
            assert "was made and returned by 'TestDroppedCoroutineOnALoop." in finding.message
            assert "track_coroutine_origins=True records where" in finding.message

    def test_call_in_a_sync_helper_is_reported_inside_the_helper(self, watched):
        """Dropped inside a plain function called from the coroutine: the helper's line."""

        async def main():
            drop_in_helper()
            await asyncio.sleep(0)

        watched.run(main)

        [finding] = watched.of(NEVER_AWAITED)
        assert_site(finding, "dropped in helper", drop_in_helper.__qualname__)

    def test_coroutine_dropped_later_is_reported_where_it_was_dropped(self, watched):
        """Without origin tracking, the site is the line that dropped the last reference."""

        async def main():
            pending = save(2)  # <- kept for a while
            await asyncio.sleep(0)
            del pending  # <- dropped later
            await asyncio.sleep(0)

        watched.run(main)

        [finding] = watched.of(NEVER_AWAITED)
        assert_site(finding, "dropped later", main.__qualname__)

    def test_each_dropped_coroutine_is_its_own_finding(self, watched):
        """Three coroutines dropped in a loop: three findings at the same line."""

        async def main():
            for i in range(3):
                save(i)  # <- dropped three times
            await asyncio.sleep(0)

        watched.run(main)

        found = watched.of(NEVER_AWAITED)
        assert [f.site.line for f in found] == [line_of("# <- dropped three times")] * 3

    def test_coroutine_function_used_as_a_callback_has_no_misleading_site(self, watched):
        """``add_done_callback(async_fn)``: asyncio creates and drops the coroutine; the site
        is unknown or the scheduling line, never the line that runs the loop."""

        async def main():
            loop = asyncio.get_running_loop()
            future = loop.create_future()
            future.add_done_callback(save)  # <- async function as a callback
            future.set_result(None)
            await asyncio.sleep(0)

        watched.run(main)

        [finding] = watched.of(NEVER_AWAITED)
        assert finding.coroutine == save.__qualname__
        if finding.site is not None:
            assert (finding.site.file, finding.site.line) == (__file__, line_of("# <- async function as a callback"))


class Client:
    """A coroutine created in one place and dropped in another (issue 12)."""

    async def _ping(self):
        return "pong"

    @property
    def ping(self):
        return self._ping()  # <- created by the property

    async def close(self):
        pass

    def close_soon(self):
        self.close()  # <- method called without await


CLIENT = Client()  # a global whose async method a truth test forgets to await


def forgotten_in_a_condition(form):
    """The await forgotten in a condition: the coroutine is made, tested
    (always true) and dropped on the marked line."""
    if form == "if not obj.method()":
        if not CLIENT.close():  # <- if not obj.method()
            pass
    elif form == "if function()":
        if save(1):  # <- if function()
            pass
    elif form == "is None":
        if save(2) is None:  # <- is None
            pass
    elif form == "while not":
        while not save(3):  # <- while not
            pass
    elif form == "a helper's, in a condition":  # noqa: SIM102 (the marked line tests the call alone)
        if not create_save():  # <- a helper's, in a condition
            pass


class TestCreatedAtAndDroppedAt:
    """A site never misleads: ``created_at`` and ``dropped_at`` say which line is which,
    and so does the message; the site is the creation line when it is known."""

    def test_statement_call_is_created_and_dropped_on_one_line(self, installed):
        """``save(x)`` as a statement: both fields and the site are that line."""
        with capture_findings(NEVER_AWAITED) as found:
            save(7)  # <- created and dropped here

        [finding] = found
        assert_site(
            finding,
            "created and dropped here",
            TestCreatedAtAndDroppedAt.test_statement_call_is_created_and_dropped_on_one_line.__qualname__,
        )
        assert finding.created_at == finding.dropped_at == finding.site
        assert (
            f"created and dropped at test_coroutines.py:{line_of('# <- created and dropped here')}" in finding.message
        )
        assert finding.to_dict()["dropped_at"] == finding.site.to_dict()

    @pytest.mark.parametrize("form", ["if not obj.method()", "if function()", "is None", "while not"])
    def test_a_call_forgotten_in_a_condition_is_created_and_dropped_on_its_line(self, installed, form):
        """``if not store.exists(key):``, the await forgotten: the condition
        made the coroutine and dropped it once tested."""
        with capture_findings(NEVER_AWAITED) as found:
            forgotten_in_a_condition(form)

        [finding] = found
        line = line_of(f"# <- {form}")
        assert finding.created_at is not None and finding.created_at.line == line
        assert finding.created_at == finding.dropped_at == finding.site
        assert f"created and dropped at test_coroutines.py:{line}" in finding.message

    def test_a_helpers_coroutine_forgotten_in_a_condition_is_not_said_to_be_created_there(self, installed):
        with capture_findings(NEVER_AWAITED) as found:
            forgotten_in_a_condition("a helper's, in a condition")

        [finding] = found
        assert finding.created_at is None
        assert finding.dropped_at is not None and finding.dropped_at.line == line_of("# <- a helper's, in a condition")

    def test_without_the_bytecode_reader_the_finding_is_made_at_the_drop_line(self, installed, monkeypatch):
        """The reader is imported when a finding is made; as the interpreter
        shuts down that import fails, and the finding loses its creation
        line, not its existence."""
        monkeypatch.setitem(sys.modules, "asyncwatch._core.bytecode", None)  # import raises ImportError
        with capture_findings(NEVER_AWAITED) as found:
            save(7)  # <- dropped with no reader

        [finding] = found
        assert finding.created_at is None
        assert finding.dropped_at is not None and finding.dropped_at.line == line_of("# <- dropped with no reader")
        assert finding.site == finding.dropped_at

    def test_module_function_called_through_its_module_is_created_there(self, installed):
        """``asyncio.sleep(0)`` as a statement: the call is resolved without running code."""
        with capture_findings(NEVER_AWAITED) as found:
            asyncio.sleep(0)  # <- module function dropped

        [finding] = found
        assert finding.created_at is not None
        assert finding.created_at.line == line_of("# <- module function dropped")
        assert finding.dropped_at == finding.created_at == finding.site

    def test_property_returning_a_coroutine_is_reported_where_it_was_dropped_and_says_so(self, installed):
        """``client.ping`` (a property returning ``self._ping()``): without origin tracking the
        creation line is unknown; the site is the drop line, labelled as such."""
        client = Client()
        with capture_findings(NEVER_AWAITED) as found:
            client.ping  # <- property result dropped  # noqa: B018

        [finding] = found
        drop = line_of("# <- property result dropped")
        assert finding.created_at is None
        assert finding.dropped_at is not None
        assert (finding.dropped_at.file, finding.dropped_at.line) == (__file__, drop)
        assert finding.site == finding.dropped_at
        assert f"dropped at test_coroutines.py:{drop}" in finding.message
        assert "where it was created is not known" in finding.message
        assert "created and dropped" not in finding.message
        assert f"{__file__}:{Client._ping.__code__.co_firstlineno}" in finding.message  # where it is defined

    @pytest.mark.parametrize("kind", ["list", "set", "dict"])
    def test_a_comprehension_of_calls_dropped_as_a_statement_is_created_on_its_line(self, installed, kind):
        """``[send(u) for u in users]`` as a statement (a forgotten gather):
        each coroutine was made and dropped on that line (inlined on 3.12+,
        a nested function before)."""
        with capture_findings(NEVER_AWAITED) as found:
            if kind == "list":
                [save(i) for i in range(3)]  # <- list of coroutines
            elif kind == "set":
                {save(i) for i in range(3)}  # <- set of coroutines
            else:
                {i: save(i) for i in range(3)}  # <- dict of coroutines

        assert len(found) == 3
        line = line_of(f"# <- {kind} of coroutines")
        for finding in found:
            assert finding.created_at is not None and finding.created_at.line == line
            assert finding.created_at == finding.dropped_at == finding.site
            assert "created and dropped at" in finding.message

    def test_a_comprehension_of_a_helpers_coroutines_is_not_said_to_create_them(self, installed):
        """Its elements came from a helper that made them on a line of its own."""
        with capture_findings(NEVER_AWAITED) as found:
            [create_save() for _ in range(2)]  # <- comprehension of a helper's coroutines

        assert len(found) == 2
        for finding in found:
            assert finding.created_at is None
            assert finding.dropped_at.line == line_of("# <- comprehension of a helper's coroutines")

    def test_coroutine_returned_by_a_helper_is_not_said_to_be_created_by_its_caller(self, installed):
        """``create_save()`` as a statement: the call did not make the coroutine itself."""
        with capture_findings(NEVER_AWAITED) as found:
            create_save()  # <- helper's coroutine dropped

        [finding] = found
        assert finding.created_at is None
        assert finding.dropped_at.line == line_of("# <- helper's coroutine dropped")

    def test_method_called_without_await_on_self(self, installed):
        """``self.close()``: created and dropped on that line; the creation is read from
        ``self`` only where reading a frame's locals is free (3.13's f_locals view)."""
        with capture_findings(NEVER_AWAITED) as found:
            Client().close_soon()

        [finding] = found
        line = line_of("# <- method called without await")
        assert finding.dropped_at.line == finding.site.line == line
        if sys.version_info >= (3, 13):
            assert finding.created_at == finding.dropped_at
        else:
            assert finding.created_at is None

    def test_with_origin_tracking_both_lines_are_known(self, installed_with_origins):
        """The property case with ``track_coroutine_origins``: created in the property, dropped by the caller."""
        client = Client()
        with capture_findings(NEVER_AWAITED) as found:
            client.ping  # <- tracked property result dropped  # noqa: B018

        [finding] = found
        created, dropped = line_of("# <- created by the property"), line_of("# <- tracked property result dropped")
        assert_origin_site(finding, "created by the property", "ping")
        assert finding.created_at == finding.site
        assert finding.dropped_at.line == dropped
        assert f"created at test_coroutines.py:{created} and dropped at test_coroutines.py:{dropped}" in finding.message

    def test_coroutine_collected_by_the_gc_has_no_drop_line(self, installed):
        """Freed by the collector: neither line is known (``save`` is called
        unawaited on many lines of this file, so the source cannot tell
        either), and the message says so."""
        with capture_findings(NEVER_AWAITED) as found:
            box = []
            box.append(save(box))
            del box
            gc.collect()

        [finding] = found
        assert finding.dropped_at is None
        assert finding.created_at is None
        assert "garbage collector" in finding.message

    def test_coroutine_collected_by_the_gc_is_placed_by_the_source_when_one_call_can_have_made_it(self, installed):
        """No frame saw it made or dropped, but only one line of the source
        calls its function without awaiting it or handing it to asyncio:
        that line, and the message says how it was found."""
        with capture_findings(NEVER_AWAITED) as found:
            box = []
            box.append(refresh_in_a_cycle(box))  # <- the only unawaited call
            del box
            gc.collect()

        [finding] = found
        test = type(self).test_coroutine_collected_by_the_gc_is_placed_by_the_source_when_one_call_can_have_made_it
        assert_site(finding, "the only unawaited call", test.__qualname__)
        assert finding.created_at == finding.site and finding.dropped_at is None
        assert "the garbage collector freed it" in finding.message
        assert (
            f"the source tells: at test_coroutines.py:{finding.site.line}, the only call of refresh_in_a_cycle() "
            "there that is neither awaited nor given to asyncio" in finding.message
        )

    def test_on_a_loop_too(self, watched):
        """The same fields for a coroutine dropped inside a task, on either loop."""

        async def main():
            Client().ping  # <- dropped in a task  # noqa: B018
            save(8)  # <- statement in a task
            await asyncio.sleep(0)

        watched.run(main)

        by_line = {f.dropped_at.line: f for f in watched.of(NEVER_AWAITED)}
        prop = by_line[line_of("# <- dropped in a task")]
        assert prop.created_at is None and prop.site == prop.dropped_at
        statement = by_line[line_of("# <- statement in a task")]
        assert statement.created_at == statement.dropped_at == statement.site


class TestDroppedCoroutineInSyncCode:
    """The hook is process-wide: plain synchronous code is watched too."""

    def test_call_in_sync_code_is_reported_at_its_line(self, installed):
        """A coroutine dropped outside any loop is reported at its line."""
        with capture_findings(NEVER_AWAITED) as found:
            save(3)  # <- forgot await in sync code

        [finding] = found
        test_name = type(self).test_call_in_sync_code_is_reported_at_its_line.__qualname__
        assert_site(finding, "forgot await in sync code", test_name)
        assert finding.coroutine == save.__qualname__

    def test_coroutine_collected_by_the_gc_has_no_misleading_site(self, installed):
        """A coroutine freed by the garbage collector: the site is unknown (or exact), never a random line."""
        with capture_findings(NEVER_AWAITED) as found:
            box = []
            box.append(save(box))  # <- created in a cycle
            del box
            gc.collect()

        [finding] = found
        assert finding.coroutine == save.__qualname__
        if finding.site is None:
            # documented: the message at least says which coroutine function
            assert f"{__file__}:{save.__code__.co_firstlineno}" in finding.message
        else:
            assert (finding.site.file, finding.site.line) == (__file__, line_of("# <- created in a cycle"))

    @pytest.mark.parametrize("given", ["Thread", "Timer"])
    def test_a_coroutine_function_a_thread_calls_is_reported_where_it_was_given(self, installed, given):
        """``Thread(target=poll)`` with ``async def poll``: the thread calls it
        and drops the coroutine in the threading module, with no line of the
        program running; the source names the line that gave it."""
        with capture_findings(NEVER_AWAITED) as found:
            if given == "Thread":
                worker = threading.Thread(target=poll_in_a_thread)  # <- given to Thread
            else:
                worker = threading.Timer(0, poll_in_a_timer)  # <- given to Timer
            worker.start()
            worker.join()

        [finding] = found
        test = type(self).test_a_coroutine_function_a_thread_calls_is_reported_where_it_was_given
        assert_site(finding, f"given to {given}", test.__qualname__)
        assert finding.created_at == finding.site and finding.dropped_at is None
        function = "poll_in_a_thread" if given == "Thread" else "poll_in_a_timer"
        assert (
            f"the source tells: at test_coroutines.py:{finding.site.line}, the only line there that gives "
            f"{function} to threading.{given}(), which calls it as a plain function" in finding.message
        )

    def test_closed_coroutine_is_silent(self, installed):
        """A coroutine closed on purpose with ``close()`` was not forgotten."""
        with capture_findings(NEVER_AWAITED) as found:
            coro = save(4)
            coro.close()
            del coro
        assert found == []


class TestWithOriginTracking:
    """With ``track_coroutine_origins=True`` the site is the line that created the coroutine."""

    def test_coroutine_dropped_later_is_reported_where_it_was_created(self, watched, installed_with_origins):
        """``c = save(1)`` … ``del c`` on another line: the site is the ``save(1)`` line."""

        async def main():
            pending = save(5)  # <- created, tracked
            await asyncio.sleep(0)
            del pending  # <- dropped, tracked
            await asyncio.sleep(0)

        watched.run(main)

        [finding] = watched.of(NEVER_AWAITED)
        assert_origin_site(finding, "created, tracked", main.__qualname__)
        assert finding.stack, "the creation stack is known"
        assert finding.stack[-1] == finding.site, "stack is outermost first, ending at the creation"

    def test_coroutine_created_in_a_helper_is_reported_in_the_helper(self, watched, installed_with_origins):
        """Created by a helper, dropped by its caller: the helper's line, the caller in the stack."""

        async def main():
            pending = create_save()  # <- calls the creating helper
            del pending
            await asyncio.sleep(0)

        watched.run(main)

        [finding] = watched.of(NEVER_AWAITED)
        assert_origin_site(finding, "created in helper", create_save.__qualname__)
        lines = [(s.file, s.line) for s in finding.stack]
        caller = (__file__, line_of("# <- calls the creating helper"))
        assert caller in lines
        assert lines.index(caller) < lines.index((__file__, line_of("# <- created in helper")))

    def test_coroutine_collected_by_the_gc_is_reported_where_it_was_created(self, installed_with_origins):
        """Even when the garbage collector frees it, the creation site is exact."""
        with capture_findings(NEVER_AWAITED) as found:
            box = []
            box.append(save(box))  # <- cycle, tracked
            del box
            gc.collect()

        [finding] = found
        assert finding.site is not None
        assert (finding.site.file, finding.site.line) == (__file__, line_of("# <- cycle, tracked"))

    def test_loop_factory_option_turns_tracking_on(self, loop_name):
        """``loop_factory(track_coroutine_origins=True)`` alone (no install()) tracks origins."""
        factory = asyncwatch.loop_factory(base_factory(loop_name), track_coroutine_origins=True, log=False)

        async def main():
            with capture_findings(NEVER_AWAITED) as found:
                pending = save(6)  # <- made under the factory option
                await asyncio.sleep(0)
                del pending
            return found

        with asyncio.Runner(loop_factory=factory) as runner:
            found = runner.run(main())

        [finding] = found
        assert_origin_site(finding, "made under the factory option", main.__qualname__)

    def test_tracking_depth_is_restored_on_uninstall(self):
        """Origin tracking costs time on every coroutine: uninstall turns it back off."""
        before = sys.get_coroutine_origin_tracking_depth()
        asyncwatch.install(log=False, track_coroutine_origins=True)
        assert sys.get_coroutine_origin_tracking_depth() > 0
        asyncwatch.uninstall()
        assert sys.get_coroutine_origin_tracking_depth() == before


def record_warnings(action):
    """Run *action* and return the RuntimeWarnings it emitted (each one shown)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        action()
    return [(w.category, str(w.message), w.filename, w.lineno) for w in caught if w.category is RuntimeWarning]


class TestCPythonWarningIsKept:
    """asyncwatch reports the mistake and CPython's RuntimeWarning is still emitted, unchanged."""

    def test_warning_points_at_the_users_line(self, installed):
        """The warning's file and line are the user's, not asyncwatch's."""
        with pytest.warns(RuntimeWarning, match="coroutine '.*save' was never awaited") as record:
            drop_one()
        [warning] = [w for w in record if w.category is RuntimeWarning]
        assert warning.filename == __file__
        assert warning.lineno == line_of("# <- warned line")

    def test_warning_is_the_same_as_without_asyncwatch(self):
        """Category, text, file and line are exactly what CPython emits on its own."""
        emitted = []
        for watching in (False, True):
            if watching:
                asyncwatch.install(log=False)
            emitted.append(record_warnings(drop_one))
        plain, watched_warnings = emitted
        assert len(plain) == 1
        assert watched_warnings == plain

    def test_warning_with_origins_is_the_same_as_without_asyncwatch(self):
        """With origin tracking, the 'Coroutine created at' text is CPython's too."""
        previous = sys.get_coroutine_origin_tracking_depth()
        emitted = []
        try:
            for watching in (False, True):
                if watching:
                    sys.set_coroutine_origin_tracking_depth(previous)
                    asyncwatch.install(log=False, track_coroutine_origins=True)
                else:
                    sys.set_coroutine_origin_tracking_depth(ORIGIN_DEPTH)
                emitted.append(record_warnings(drop_one))
        finally:
            asyncwatch.uninstall()
            sys.set_coroutine_origin_tracking_depth(previous)
        plain, watched_warnings = emitted
        assert "Coroutine created at" in plain[0][1]
        assert watched_warnings == plain

    def test_warning_inside_a_running_loop_points_at_the_users_line(self, watched):
        """On a watched loop the warning still points at the line in the coroutine."""
        caught = []

        def forget():
            save(7)  # <- warned in loop

        async def main():
            caught.extend(record_warnings(forget))
            await asyncio.sleep(0)

        watched.run(main)

        assert [(c[2], c[3]) for c in caught] == [(__file__, line_of("# <- warned in loop"))]
        assert len(watched.of(NEVER_AWAITED)) == 1

    def test_error_filter_still_applies(self):
        """``-W error``: the warning becomes an unraisable RuntimeWarning, as without asyncwatch."""

        def unraisable_of(action):
            seen = []
            old_hook = sys.unraisablehook
            sys.unraisablehook = lambda unraisable: seen.append(unraisable.exc_type)
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("error", RuntimeWarning)
                    action()
            finally:
                sys.unraisablehook = old_hook
            return seen

        errors = []
        for watching in (False, True):
            if watching:
                asyncwatch.install(log=False)
            with capture_findings(NEVER_AWAITED) if watching else contextlib.nullcontext([]) as found:
                errors.append(unraisable_of(drop_one))
        plain, watched_errors = errors
        assert plain == [RuntimeWarning]
        assert watched_errors == plain
        assert len(found) == 1


class TestAwaitedOrHandledCoroutinesAreSilent:
    """Coroutines that are awaited, scheduled or closed are not reported."""

    def test_awaited_coroutine_is_silent(self, watched):
        """``await save(x)`` is the fix."""

        async def main():
            await save(8)

        watched.run(main)
        assert watched.findings == []

    def test_scheduled_coroutine_is_silent(self, watched):
        """A coroutine wrapped in an awaited task was awaited by the task."""

        async def main():
            await asyncio.create_task(save(9))

        watched.run(main)
        assert watched.findings == []

    def test_closed_coroutine_on_a_loop_is_silent(self, watched):
        """``close()`` on purpose inside a coroutine is not a mistake."""

        async def main():
            coro = save(10)
            coro.close()
            await asyncio.sleep(0)

        watched.run(main)
        assert watched.findings == []
