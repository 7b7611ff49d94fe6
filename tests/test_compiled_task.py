"""asyncwatch's Task as a C type (``asyncwatch._core._ctask``, issue 15).

The C type must be indistinguishable from the Python class it mirrors, and
from asyncio's Task, in everything but its cost: the same repr, the same
methods, a cycle through one of its slots collected, asyncio's finalizer
still seeing its slots (the creation site of a task destroyed pending) and
free to keep the task alive.  Every behaviour is checked on both classes.
"""

from __future__ import annotations

import asyncio
import gc
import os
import platform
import re
import shutil
import subprocess
import sys
import sysconfig
import weakref

import pytest

from asyncwatch._core import tasks

# Turned off (ASYNCWATCH_NO_EXTENSIONS=1), the extension counts as not built,
# even where an earlier build left it in the source tree.
try:
    from asyncwatch._core import _ctask  # type: ignore[attr-defined]
except ImportError:
    _ctask = None
if os.environ.get("ASYNCWATCH_NO_EXTENSIONS"):
    _ctask = None


def _classes():
    yield pytest.param(tasks.PythonTask, id="python")
    if _ctask is None:
        yield pytest.param(None, id="compiled", marks=pytest.mark.skip(reason="the C extension is not built"))
    else:
        yield pytest.param(tasks._compiled(tasks.PythonTask), id="compiled")


CLASSES = list(_classes())


async def pending():
    await asyncio.get_running_loop().create_future()


async def returns(value):
    await asyncio.sleep(0)
    return value


async def raises():
    await asyncio.sleep(0)
    raise KeyError("k")


def test_the_extension_is_built_wherever_it_can_be():
    if os.environ.get("ASYNCWATCH_NO_EXTENSIONS"):
        assert tasks.Task is tasks.PythonTask
        return
    if (
        platform.python_implementation() != "CPython"
        or sysconfig.get_config_var("Py_GIL_DISABLED")
        or not (shutil.which("cc") or shutil.which("gcc"))
    ):
        pytest.skip("no compiler or not a GIL CPython: the Python class is the one used")
    assert _ctask is not None, "setup.py's optional extension was not built: see pip's log"
    assert tasks.Task is not tasks.PythonTask
    assert type(tasks.Task.__dict__["result"]).__name__ == "method_descriptor"
    assert tasks.Task.__dict__["cancel"] is tasks.PythonTask.__dict__["cancel"]


def test_no_extensions_in_the_environment_gives_the_python_class():
    code = "import asyncwatch._core.tasks as t; print(t.Task is t.PythonTask)"
    env = {**os.environ, "ASYNCWATCH_NO_EXTENSIONS": "1"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "True"


@pytest.mark.parametrize("cls", CLASSES)
def test_it_looks_like_asyncios_task(cls):
    async def main():
        ours, theirs = cls(pending(), name="t"), asyncio.Task(pending(), name="t")
        try:
            assert isinstance(ours, asyncio.Task)
            assert type(ours).__name__ == "Task"
            assert re.sub(r"0x[0-9a-f]+", "0x", repr(ours)) == re.sub(r"0x[0-9a-f]+", "0x", repr(theirs))
        finally:
            ours.cancel()
            theirs.cancel()
            await asyncio.gather(ours, theirs, return_exceptions=True)

    asyncio.run(main())


@pytest.mark.parametrize("cls", CLASSES)
def test_asyncios_methods_answer_as_they_do_on_asyncios_task(cls):
    async def main():
        done, failed, cancelled = cls(returns(7)), cls(raises()), cls(pending())
        seen = []
        done.add_done_callback(seen.append)
        assert not done.done()
        with pytest.raises(asyncio.InvalidStateError):
            done.result()
        await asyncio.sleep(0)
        cancelled.cancel("stop")
        assert (await asyncio.gather(done, failed, cancelled, return_exceptions=True))[:1] == [7]
        assert done.done() and done.result() == 7 and done.exception() is None
        assert isinstance(failed.exception(), KeyError)
        with pytest.raises(KeyError):
            failed.result()
        assert cancelled.cancelled() and cancelled.cancelling() == 1
        with pytest.raises(asyncio.CancelledError, match="stop"):
            cancelled.result()
        assert seen == [done]
        assert done.get_loop() is asyncio.get_running_loop()
        assert done.remove_done_callback(seen.append) == 0

    asyncio.run(main())


@pytest.mark.parametrize("cls", CLASSES)
def test_a_cycle_through_a_slot_is_collected(cls):
    class Sub(cls):  # a Python subclass of it, as TellingTask is
        __slots__ = ("extra",)

    async def main():
        for make in (cls, Sub):
            task = make(returns(1))
            await task
            task._aw_cancel = [task]
            if make is Sub:
                task.extra = {"task": task}
            ref = weakref.ref(task)
            del task
            await asyncio.sleep(0)  # off the handle that woke us with the task
            gc.collect()
            assert ref() is None, make

    asyncio.run(main())


@pytest.mark.parametrize("cls", CLASSES)
@pytest.mark.parametrize("how", ["destroyed pending, in a cycle", "failed, freed at once"])
def test_asyncios_finalizer_sees_the_slots_and_may_keep_the_task(cls, how):
    kept = []

    def handler(loop, context):
        task = context.get("task", context.get("future"))
        kept.append((task, task._aw_site))  # keeps the task alive from its finalizer

    async def main():
        asyncio.get_running_loop().set_exception_handler(handler)
        # Pending, the task and the future it waits on reference each other:
        # the collector finalizes it.  Failed, nothing else references it: it
        # is finalized as it is freed, from the type's dealloc.
        task = cls(pending() if how.startswith("destroyed") else raises())
        task._aw_site = ("here", 1)
        await asyncio.sleep(0)
        await asyncio.sleep(0)
        del task
        gc.collect()

    asyncio.run(main())
    assert len(kept) == 1
    task, site = kept.pop()
    assert site == ("here", 1) and task._aw_site == ("here", 1)
    ref = weakref.ref(task)
    del task
    gc.collect()
    assert ref() is None


@pytest.mark.parametrize("cls", CLASSES)
def test_an_unset_slot_is_an_attribute_error_naming_it(cls):
    async def main():
        task = cls(returns(1))
        with pytest.raises(AttributeError, match="_aw_coro"):
            task._aw_coro  # noqa: B018
        assert getattr(task, "_aw_coro", None) is None
        await task

    asyncio.run(main())


@pytest.mark.skipif(_ctask is None, reason="the C extension is not built")
def test_an_asyncio_the_extension_cannot_subclass_gets_the_python_class_and_one_report(monkeypatch, caplog, capsys):
    from asyncwatch._core import runtime

    def refuse(*args):
        raise TypeError("<class '_asyncio.Task'> is not a C type this module can subclass")

    monkeypatch.setattr(_ctask, "subclass", refuse)
    runtime.forget_internal_errors()
    try:
        assert tasks._compiled(tasks.PythonTask) is tasks.PythonTask
        assert tasks._compiled(tasks.PythonTask) is tasks.PythonTask
    finally:
        runtime.forget_internal_errors()
    reported = caplog.text + capsys.readouterr().err
    assert reported.count("asyncwatch.internal_error") == 1
    assert "compiled Task" in reported and "not a C type this module can subclass" in reported


@pytest.mark.skipif(_ctask is None, reason="the C extension is not built")
class TestTheFactorysCommonPathInC:
    """`_ctask.FanOut` takes only a gather child made with no keywords but
    uvloop's ``context=None``/``eager_start=None``, on the running loop,
    while enabled; every other call reaches the Python factory unchanged."""

    def fan_out(self, calls, enabled=True):
        class State:
            pass

        state = State()
        state.enabled = enabled

        def slow(*args, **kwargs):
            calls.append((args, kwargs))
            return "slow"

        fast = _ctask.FanOut(
            slow, tasks.Task, state, sys._getframe, asyncio.events._get_running_loop, lambda task: None
        )
        return fast, state

    def run_in_fan_out(self, fast, make):
        """Call *make* two frames below a frame registered as the fan-out's
        gather frame (as gather -> ensure_future -> factory)."""

        def gather_like():
            return inner()

        def inner():
            # Seen from the Python factory: itself at depth 0, *make* at 1,
            # inner at 2, gather_like at 3.
            fast.fan(sys._getframe(1), 3, ("code", 7))
            return make()

        return gather_like()

    def test_a_gather_child_gets_the_gathers_site_without_the_python_factory(self):
        calls = []
        fast, _ = self.fan_out(calls)

        async def main():
            loop = asyncio.get_running_loop()
            task = self.run_in_fan_out(fast, lambda: fast(loop, returns(1)))
            assert type(task) is tasks.Task and task._aw_site == ("code", 7)
            assert await task == 1
            # uvloop's keywords, all None, stay on the common path.
            task = self.run_in_fan_out(fast, lambda: fast(loop, returns(2), context=None, eager_start=None))
            assert task._aw_site == ("code", 7) and await task == 2

        asyncio.run(main())
        assert calls == []

    @pytest.mark.parametrize(
        "case", ["a keyword with a value", "another keyword", "disabled", "another loop", "fan-out over", "too deep"]
    )
    def test_every_other_call_reaches_the_python_factory_unchanged(self, case):
        calls = []
        fast, _ = self.fan_out(calls, enabled=case != "disabled")

        async def main():
            loop = asyncio.get_running_loop()
            coro = returns(1)
            other = asyncio.new_event_loop()
            try:
                if case == "a keyword with a value":
                    make = lambda: fast(loop, coro, context=contextvars_copy())  # noqa: E731
                elif case == "another keyword":
                    make = lambda: fast(loop, coro, name=None)  # noqa: E731
                elif case == "another loop":
                    make = lambda: fast(other, coro)  # noqa: E731
                else:
                    make = lambda: fast(loop, coro)  # noqa: E731
                if case == "fan-out over":
                    fast.fan(None, 0, None)
                    result = make()
                elif case == "too deep":
                    fast.fan(sys._getframe(), 10_000, ("code", 7))
                    result = make()
                else:
                    result = self.run_in_fan_out(fast, make)
            finally:
                other.close()
                coro.close()
            return result

        assert asyncio.run(main()) == "slow"
        [(args, kwargs)] = calls
        assert len(args) == 2
        expected = {
            "a keyword with a value": {"context"},
            "another keyword": {"name"},
        }.get(case, set())
        assert set(kwargs) == expected


def contextvars_copy():
    import contextvars

    return contextvars.copy_context()


def test_each_child_of_a_gather_in_debug_mode_says_where_asyncio_says():
    """In asyncio's debug mode, every task of a gather (its first through the
    Python factory, the rest through the C one) says it was created where
    plain asyncio says: asyncwatch's frames are trimmed from both."""
    import asyncwatch

    async def main():
        gathered = asyncio.gather(returns(1), returns(2), returns(3))
        children = list(gathered._children)
        texts = [repr(child).split("created at")[1] for child in children]
        await gathered
        return texts

    plain = asyncio.run(main(), debug=True)
    asyncwatch.install(log=False)
    try:
        watched = asyncio.run(main(), debug=True)
    finally:
        asyncwatch.uninstall()
    assert watched == plain
    assert len(set(watched)) == 1 and "asyncwatch" not in watched[0]
