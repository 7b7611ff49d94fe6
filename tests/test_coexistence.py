"""asyncwatch next to other libraries that hook the same loop.

Error trackers and monitors set the loop's task factory and exception
handler too: Sentry's asyncio integration (``patch_asyncio``: its
``_sentry_task_factory`` wraps every coroutine in one that opens a span and
captures exceptions, then calls the previous factory or ``Task(...)``),
aiomonitor (a factory making its own ``TracedTask``, restoring what it saved
on ``close()``).  `tracklib` below is such a library, written to a module of
its own in a directory asyncwatch treats as library code, so that creation
sites must still point at the application's line, not into the library.

The promise (README, "How it works"): either may be installed first, either
may be uninstalled first; both keep working meanwhile, and uninstall restores
each hook or, where someone chained on top, leaves it in place and inert.
"""

from __future__ import annotations

import asyncio
import collections
import gc
import importlib.util
import os
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

import asyncwatch
import asyncwatch._core.frames as frames_mod
from asyncwatch import FindingKind
from asyncwatch._outputs.collect import CollectingReporter
from conftest import base_factory, line_of

# --- the other library -----------------------------------------------------------

TRACKLIB_SOURCE = '''\
"""tracklib: an error tracker's asyncio integration, modelled on
sentry_sdk.integrations.asyncio (patch_asyncio, _sentry_task_factory)."""

import asyncio
import functools


def get_name(coro):
    return getattr(coro, "__qualname__", None) or getattr(coro, "__name__", None) or "coroutine without __name__"


def _wrap_coroutine(wrapped):
    # Like Sentry: only __name__ and __qualname__ go from the coroutine to the wrapper.
    return functools.partial(
        functools.update_wrapper, wrapped=wrapped, assigned=("__name__", "__qualname__"), updated=()
    )


def summary(context):
    exc = context.get("exception")
    return (context.get("message"), type(exc).__name__ if exc is not None else None, str(exc) if exc else None)


class AsyncioIntegration:
    """Chains the loop's task factory and exception handler; uninstall
    restores them, or stays in place and inert if someone chained on top."""

    def __init__(self):
        self.created = []  # the coroutine of every task the factory made
        self.ran = []  # every wrapped coroutine that started
        self.captured = []  # exceptions the wrapper captured (and re-raised)
        self.contexts = []  # summaries of the contexts the handler received
        self.active = False
        self.loop = None

    def install(self, loop):
        self.loop = loop
        self.orig_task_factory = loop.get_task_factory()
        self.orig_handler = loop.get_exception_handler()
        self.active = True
        loop.set_task_factory(self._sentry_task_factory)
        loop.set_exception_handler(self._exception_handler)

    def uninstall(self):
        self.active = False
        loop = self.loop
        # Bound methods: compared with ==, a new one is made at each access.
        if loop.get_task_factory() == self._sentry_task_factory:
            loop.set_task_factory(self.orig_task_factory)
        if loop.get_exception_handler() == self._exception_handler:
            loop.set_exception_handler(self.orig_handler)

    def _sentry_task_factory(self, loop, coro, **kwargs):
        if self.active:
            coro = self._wrap(coro)
        task = None
        if self.orig_task_factory:
            task = self.orig_task_factory(loop, coro, **kwargs)
        if task is None:
            task = asyncio.Task(coro, loop=loop, **kwargs)
            if task._source_traceback:
                del task._source_traceback[-1]
        return task

    def _wrap(self, coro):
        name = get_name(coro)
        self.created.append(name)

        @_wrap_coroutine(coro)
        async def _task_with_sentry_span_creation():
            self.ran.append(name)
            try:
                return await coro
            except Exception as exc:
                self.captured.append(type(exc).__name__)
                raise

        return _task_with_sentry_span_creation()

    def _exception_handler(self, loop, context):
        if self.active:
            self.contexts.append(summary(context))
        if self.orig_handler is not None:
            self.orig_handler(loop, context)
        else:
            loop.default_exception_handler(context)


class TracedTask(asyncio.Task):
    pass


class Monitor:
    """Replaces both hooks without chaining (aiomonitor's hook_task_factory
    makes its own TracedTask; its exception handler never calls the
    previous one), and on close() puts back what it saved, whatever is there."""

    def __init__(self, loop):
        self.loop = loop
        self.contexts = []
        self.made = 0

    def start(self):
        self.saved = (self.loop.get_task_factory(), self.loop.get_exception_handler())
        self.loop.set_task_factory(self._create_task)
        self.loop.set_exception_handler(self._handler)

    def close(self):
        self.loop.set_task_factory(self.saved[0])
        self.loop.set_exception_handler(self.saved[1])

    def _create_task(self, loop, coro, **kwargs):
        self.made += 1
        return TracedTask(coro, loop=loop, **kwargs)

    def _handler(self, loop, context):
        self.contexts.append(summary(context))
'''


@pytest.fixture(scope="module")
def tracklib_module(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """`tracklib`, imported from a file of its own outside the tests' directory."""
    path = tmp_path_factory.mktemp("thirdparty") / "tracklib.py"
    path.write_text(TRACKLIB_SOURCE, encoding="utf-8")
    spec = importlib.util.spec_from_file_location("tracklib", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def tracklib(tracklib_module: Any, monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    """`tracklib`, whose directory asyncwatch treats as library code (like site-packages)."""
    directory = os.path.dirname(os.path.abspath(tracklib_module.__file__)) + os.sep
    monkeypatch.setattr(frames_mod, "_LIBRARY_PREFIXES", (*frames_mod.library_prefixes(), directory))
    frames_mod._is_library_cache.clear()  # the same dict the task factory reads
    assert frames_mod.is_library_file(tracklib_module.__file__)
    assert not frames_mod.is_library_file(__file__)
    yield tracklib_module
    frames_mod._is_library_cache.clear()


@pytest.fixture(scope="module", autouse=True)
def _no_earlier_garbage() -> None:
    """Collect what earlier test modules left (a coroutine never awaited would
    be reported by the first installation here)."""
    gc.collect()


@pytest.fixture
def no_internal_error(capsys: pytest.CaptureFixture[str]) -> Iterator[None]:
    """asyncwatch never failed inside (it would log asyncwatch.internal_error once)."""
    yield
    out = capsys.readouterr()
    assert "asyncwatch.internal_error" not in out.out + out.err
    assert "asyncwatch: internal error" not in out.err


# --- the application -----------------------------------------------------------


async def _work(i: int) -> int:
    await asyncio.sleep(0)
    return i


async def _fail() -> None:
    raise ValueError("boom")


async def _hang() -> None:
    await asyncio.get_running_loop().create_future()


async def _swallow() -> None:
    try:
        await asyncio.sleep(3600)  # <- swallowed here
    except asyncio.CancelledError:
        pass


def _bad_callback() -> None:
    raise RuntimeError("callback failed")


async def _program() -> dict[str, Any]:
    """The application: tasks kept and awaited, a gather, a task that fails
    unnoticed, one dropped while pending, one that swallows its cancellation,
    a failing callback, a context of its own, and a failure it does retrieve."""
    loop = asyncio.get_running_loop()
    kept = [asyncio.create_task(_work(i)) for i in range(2)]
    results = [await t for t in kept] + await asyncio.gather(_work(2), _work(3))
    asyncio.create_task(_fail())  # <- unretrieved
    hung = asyncio.create_task(_hang())  # <- destroyed
    swallower = asyncio.create_task(_swallow())  # <- swallower created
    await asyncio.sleep(0)
    swallower.cancel()  # <- cancel
    await swallower
    del hung
    loop.call_soon(_bad_callback)
    loop.call_exception_handler({"message": "reported by the application"})
    await asyncio.sleep(0)
    await asyncio.sleep(0)
    gc.collect()  # the pending task is in a reference cycle with the future it waits on
    try:
        await asyncio.create_task(_fail())
    except ValueError:
        results.append(-1)
    return {"results": results, "task_types": {type(t) for t in kept}}


EXPECTED_RESULTS = [0, 1, 2, 3, -1]
# The coroutine of every task _program() makes, its own task included.
PROGRAM_TASKS = collections.Counter(
    ["_program", "_work", "_work", "_work", "_work", "_fail", "_hang", "_swallow", "_fail"]
)
# What the library captures on its way through (then re-raises): the two _fail()s.
PROGRAM_CAPTURED = ["ValueError", "ValueError"]


def _summary(context: dict[str, Any]) -> tuple[Any, ...]:
    exc = context.get("exception")
    return (context.get("message"), type(exc).__name__ if exc is not None else None, str(exc) if exc else None)


class ProgramHandler:
    """The exception handler the application set before any library."""

    def __init__(self) -> None:
        self.contexts: list[tuple[Any, ...]] = []

    def __call__(self, loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        self.contexts.append(_summary(context))


def _run(loop: asyncio.AbstractEventLoop, main: Callable[[], Any]) -> Any:
    return loop.run_until_complete(main())


def _hooks(loop: asyncio.AbstractEventLoop) -> tuple[Any, Any]:
    return loop.get_task_factory(), loop.get_exception_handler()


def _same_hooks(a: tuple[Any, Any], b: tuple[Any, Any]) -> bool:
    # == rather than `is`: tracklib's hooks are bound methods.
    return a[0] == b[0] and a[1] == b[1]


def _install_asyncwatch(loop: asyncio.AbstractEventLoop, collector: CollectingReporter) -> None:
    # No slow_callback findings from the collections the program triggers.
    asyncwatch.install(loop=loop, reporters=[collector], log=False, slow_callback_ms=60_000)


_BASELINES: dict[tuple[str, str], tuple[list[Any], list[Any]]] = {}


def _baseline(loop_name: str, tracklib: Any, library: str = "integration") -> tuple[list[Any], list[Any]]:
    """What tracklib's handler and the program's receive without asyncwatch,
    with tracklib's integration (or its monitor) alone on the loop."""
    key = (loop_name, library)
    if key not in _BASELINES:
        loop = base_factory(loop_name)()
        try:
            program_handler = ProgramHandler()
            loop.set_exception_handler(program_handler)
            if library == "integration":
                lib = tracklib.AsyncioIntegration()
                lib.install(loop)
            else:
                lib = tracklib.Monitor(loop)
                lib.start()
            assert _run(loop, _program)["results"] == EXPECTED_RESULTS
            _BASELINES[key] = (sorted(lib.contexts, key=repr), sorted(program_handler.contexts, key=repr))
        finally:
            loop.close()
    return _BASELINES[key]


# --- the matrix --------------------------------------------------------------------

ORDERS = ["library_first", "asyncwatch_first"]
UNINSTALLS = ["library_then_asyncwatch", "asyncwatch_then_library", "only_library", "only_asyncwatch"]


class Scenario:
    """One loop; tracklib and asyncwatch installed in *order*; the program
    run; both uninstalled as *uninstall* says; the program run again."""

    def __init__(self, loop_name: str, tracklib: Any, order: str, uninstall: str) -> None:
        self.order, self.uninstall = order, uninstall
        self.collector = CollectingReporter()
        self.program_handler = ProgramHandler()
        self.lib = tracklib.AsyncioIntegration()
        loop = base_factory(loop_name)()
        try:
            loop.set_exception_handler(self.program_handler)
            self.hooks_before = _hooks(loop)
            first, second = self._installers(loop)
            first()
            self.hooks_after_first = _hooks(loop)
            second()
            self.hooks_both = _hooks(loop)

            self.first = _run(loop, _program)
            self.findings_first = list(self.collector.findings)
            self.lib_created_first = list(self.lib.created)
            self.lib_ran_first = list(self.lib.ran)
            self.lib_captured_first = list(self.lib.captured)
            self.lib_contexts_first = sorted(self.lib.contexts, key=repr)
            self.program_contexts_first = sorted(self.program_handler.contexts, key=repr)
            del self.program_handler.contexts[:], self.lib.contexts[:]

            self.library_uninstalled = uninstall != "only_asyncwatch"
            self.asyncwatch_uninstalled = uninstall != "only_library"
            if uninstall == "asyncwatch_then_library":
                asyncwatch.uninstall()
                self.lib.uninstall()
            else:
                if self.library_uninstalled:
                    self.lib.uninstall()
                if self.asyncwatch_uninstalled:
                    asyncwatch.uninstall()
            self.hooks_after = _hooks(loop)

            self.second = _run(loop, _program)
            self.findings_second = self.collector.findings[len(self.findings_first) :]
            self.lib_created_second = self.lib.created[len(self.lib_created_first) :]
            self.lib_ran_second = self.lib.ran[len(self.lib_ran_first) :]
            self.lib_contexts_second = sorted(self.lib.contexts, key=repr)
            self.program_contexts_second = sorted(self.program_handler.contexts, key=repr)
        finally:
            loop.close()
            asyncwatch.uninstall()

    def _installers(self, loop: asyncio.AbstractEventLoop) -> tuple[Callable[[], None], Callable[[], None]]:
        def lib() -> None:
            self.lib.install(loop)

        def aw() -> None:
            _install_asyncwatch(loop, self.collector)

        return (lib, aw) if self.order == "library_first" else (aw, lib)


@pytest.mark.parametrize("uninstall", UNINSTALLS)
@pytest.mark.parametrize("order", ORDERS)
def test_the_library_wraps_every_task_and_sees_every_context(loop_name, tracklib, order, uninstall, no_internal_error):
    """While both are installed, in either order, tracklib's factory wraps
    every task the program creates and its wrapper runs, and its exception
    handler, like the program's own, receives exactly the contexts it
    receives without asyncwatch.  Once tracklib alone is left, or asyncwatch
    alone is gone, it goes on doing so; once it is uninstalled, it sees nothing."""
    lib_alone, program_alone = _baseline(loop_name, tracklib)
    s = Scenario(loop_name, tracklib, order, uninstall)

    assert s.first["results"] == EXPECTED_RESULTS
    assert collections.Counter(s.lib_created_first) == PROGRAM_TASKS
    assert collections.Counter(s.lib_ran_first) == PROGRAM_TASKS
    assert s.lib_captured_first == PROGRAM_CAPTURED
    assert s.lib_contexts_first == lib_alone
    assert s.program_contexts_first == program_alone
    assert len(lib_alone) == 4  # unretrieved, destroyed, the callback's, the program's own

    assert s.second["results"] == EXPECTED_RESULTS
    assert s.program_contexts_second == program_alone
    if s.library_uninstalled:
        assert (s.lib_created_second, s.lib_ran_second, s.lib_contexts_second) == ([], [], [])
    else:
        assert collections.Counter(s.lib_created_second) == PROGRAM_TASKS
        assert collections.Counter(s.lib_ran_second) == PROGRAM_TASKS
        assert s.lib_contexts_second == lib_alone


@pytest.mark.parametrize("order", ORDERS)
def test_asyncwatch_reports_while_both_are_installed(loop_name, tracklib, order, no_internal_error):
    """With tracklib installed before or after it, asyncwatch reports the
    unretrieved exception and the task destroyed while pending, once each.
    The swallowed cancellation only when tracklib chains asyncwatch's factory
    (asyncwatch installed first): a task made by a foreign factory chained
    under asyncwatch gets no swallowed-cancellation tracking (README, Limits)."""
    s = Scenario(loop_name, tracklib, order, "library_then_asyncwatch")
    kinds = collections.Counter(f.kind for f in s.findings_first)
    expected = {FindingKind.TASK_EXCEPTION_UNRETRIEVED: 1, FindingKind.TASK_DESTROYED_PENDING: 1}
    if order == "asyncwatch_first":
        expected[FindingKind.CANCELLATION_SWALLOWED] = 1
        [swallowed] = [f for f in s.findings_first if f.kind is FindingKind.CANCELLATION_SWALLOWED]
        assert swallowed.site.line == line_of("# <- swallowed here")
        assert swallowed.site.file == __file__
        assert swallowed.cancelled_by.line == line_of("# <- cancel")
        assert swallowed.created_at.line == line_of("# <- swallower created")
        assert swallowed.coroutine == "_swallow"
    assert kinds == expected


@pytest.mark.parametrize("order", ["library_first", "asyncwatch_first"])
def test_findings_point_at_the_application_line(loop_name, tracklib, order, no_internal_error):
    """Both findings name the application line that created the task and its
    coroutine, not tracklib's factory nor its wrapper (tracklib is library code)."""
    s = Scenario(loop_name, tracklib, order, "library_then_asyncwatch")
    [unretrieved] = [f for f in s.findings_first if f.kind is FindingKind.TASK_EXCEPTION_UNRETRIEVED]
    [destroyed] = [f for f in s.findings_first if f.kind is FindingKind.TASK_DESTROYED_PENDING]
    assert (unretrieved.site.file, unretrieved.site.line) == (__file__, line_of("# <- unretrieved"))
    assert (destroyed.site.file, destroyed.site.line) == (__file__, line_of("# <- destroyed"))
    assert unretrieved.created_at == unretrieved.site and destroyed.created_at == destroyed.site
    assert (unretrieved.coroutine, destroyed.coroutine) == ("_fail", "_hang")
    assert "ValueError: boom" in unretrieved.message


@pytest.mark.parametrize("uninstall", UNINSTALLS)
@pytest.mark.parametrize("order", ORDERS)
def test_uninstall_in_any_order_restores_or_leaves_inert(loop_name, tracklib, order, uninstall, no_internal_error):
    """Uninstalled in the reverse order, the loop's task factory and exception
    handler are back to what the program had set.  Otherwise whichever went
    first and had the other chained on top stays in place, inert: the hooks
    are those the second left when it went (or put there, if it stays), and
    the program runs as before.  asyncwatch reports on the second run exactly
    when it is still installed."""
    s = Scenario(loop_name, tracklib, order, uninstall)
    first_is_library = order == "library_first"
    first_out = s.library_uninstalled if first_is_library else s.asyncwatch_uninstalled
    second_out = s.asyncwatch_uninstalled if first_is_library else s.library_uninstalled
    if first_out and second_out:
        reverse = uninstall == ("asyncwatch_then_library" if first_is_library else "library_then_asyncwatch")
        # In reverse order: fully restored.  In the same order: the first one's hooks, inert.
        expected = s.hooks_before if reverse else s.hooks_after_first
    elif second_out:
        expected = s.hooks_after_first  # the second restored the first one's hooks
    else:
        expected = s.hooks_both  # the first went inert under the second, which stays on top
    assert _same_hooks(s.hooks_after, expected), (s.hooks_after, expected)
    if uninstall in ("library_then_asyncwatch", "asyncwatch_then_library"):
        assert s.second["task_types"] == {asyncio.Task}  # plain asyncio tasks again
        assert s.lib_created_second == []
    if s.asyncwatch_uninstalled:
        assert s.findings_second == []
    else:
        # tracklib is gone or inert: asyncwatch reports as if alone, at the
        # application's lines; the swallowed cancellation only where its own
        # factory makes the tasks (it was installed first: tracklib had chained it).
        sites = {f.kind: f.site.line for f in s.findings_second}
        expected_sites = {
            FindingKind.TASK_EXCEPTION_UNRETRIEVED: line_of("# <- unretrieved"),
            FindingKind.TASK_DESTROYED_PENDING: line_of("# <- destroyed"),
        }
        if order == "asyncwatch_first":
            expected_sites[FindingKind.CANCELLATION_SWALLOWED] = line_of("# <- swallowed here")
        assert sites == expected_sites
        assert len(s.findings_second) == len(expected_sites)


def test_unmarked_library_code_would_be_taken_for_the_application_on_uvloop(tracklib_module, no_internal_error):
    """Why the library lives in its own directory, marked as library code: on
    uvloop (whose create_task is compiled) the first frame above asyncwatch's
    factory is tracklib's factory; only because it is library code does the
    site skip it.  Unmarked (code in the application's own tree), tracklib's
    line would be taken for the application's."""
    pytest.importorskip("uvloop")
    frames_mod._is_library_cache.clear()
    assert not frames_mod.is_library_file(tracklib_module.__file__)
    try:
        s = Scenario("uvloop", tracklib_module, "asyncwatch_first", "library_then_asyncwatch")
    finally:
        frames_mod._is_library_cache.clear()
    [unretrieved] = [f for f in s.findings_first if f.kind is FindingKind.TASK_EXCEPTION_UNRETRIEVED]
    assert unretrieved.site.file == os.path.abspath(tracklib_module.__file__)


# --- a library that replaces rather than chains -------------------------------------


@pytest.mark.parametrize("closes", ["asyncwatch_first", "monitor_first"])
def test_a_library_replacing_the_hooks_without_chaining(loop_name, tracklib, closes, no_internal_error):
    """A monitor that replaces asyncwatch's task factory and exception handler
    without chaining them: the program runs, the monitor makes the tasks and
    gets every context, asyncwatch (which now sees nothing) does not fail.
    asyncwatch's uninstall leaves the monitor's hooks in place; when the
    monitor later puts back what it saved (asyncwatch's, inert), the program
    still runs and its own handler gets every context again.  Closed first,
    the monitor hands the loop back to asyncwatch, which reports again, and
    uninstall then restores the program's hooks exactly."""
    monitor_alone, _ = _baseline(loop_name, tracklib, "monitor")
    _, program_alone = _baseline(loop_name, tracklib)
    collector = CollectingReporter()
    program_handler = ProgramHandler()
    loop = base_factory(loop_name)()
    try:
        loop.set_exception_handler(program_handler)
        before = _hooks(loop)
        _install_asyncwatch(loop, collector)
        monitor = tracklib.Monitor(loop)
        monitor.start()
        result = _run(loop, _program)
        assert result["results"] == EXPECTED_RESULTS
        assert result["task_types"] == {tracklib.TracedTask}
        assert monitor.made == sum(PROGRAM_TASKS.values())
        assert sorted(monitor.contexts, key=repr) == monitor_alone
        assert program_handler.contexts == []  # the monitor does not chain
        assert collector.findings == []

        if closes == "asyncwatch_first":
            asyncwatch.uninstall()
            assert loop.get_task_factory() == monitor._create_task
            assert loop.get_exception_handler() == monitor._handler
            monitor.close()
            assert _run(loop, _program)["results"] == EXPECTED_RESULTS
            assert sorted(program_handler.contexts, key=repr) == program_alone
            assert collector.findings == []
        else:
            monitor.close()
            assert _run(loop, _program)["results"] == EXPECTED_RESULTS
            assert sorted(program_handler.contexts, key=repr) == program_alone
            assert collections.Counter(f.kind for f in collector.findings) == {
                FindingKind.TASK_EXCEPTION_UNRETRIEVED: 1,
                FindingKind.TASK_DESTROYED_PENDING: 1,
                FindingKind.CANCELLATION_SWALLOWED: 1,
            }
            asyncwatch.uninstall()
            assert _hooks(loop) == before
    finally:
        loop.close()


def test_a_handler_replaced_after_asyncwatch_is_not_clobbered(loop_name, no_internal_error):
    """The application (or a library) sets its exception handler after
    asyncwatch, dropping asyncwatch's: asyncwatch still tracks what its task
    factory sees (a swallowed cancellation), and uninstall restores the task
    factory but leaves that handler alone."""
    collector = CollectingReporter()
    program_handler = ProgramHandler()
    loop = base_factory(loop_name)()
    try:
        _install_asyncwatch(loop, collector)
        loop.set_exception_handler(program_handler)
        assert _run(loop, _program)["results"] == EXPECTED_RESULTS
        assert [f.kind for f in collector.findings] == [FindingKind.CANCELLATION_SWALLOWED]
        assert len(program_handler.contexts) == 4
        asyncwatch.uninstall()
        assert loop.get_exception_handler() is program_handler
        assert loop.get_task_factory() is None
        assert _run(loop, _program)["results"] == EXPECTED_RESULTS
        assert len(program_handler.contexts) == 8
    finally:
        loop.close()


# --- eager task factories (3.12+) --------------------------------------------------

needs_eager = pytest.mark.skipif(sys.version_info < (3, 12), reason="eager task factories are 3.12+")


class CustomTask(asyncio.Task):  # type: ignore[type-arg]
    pass


def _eager_factories() -> dict[str, Any]:
    if sys.version_info < (3, 12):
        return {}
    return {
        "eager_task_factory": asyncio.eager_task_factory,
        "custom_eager_factory": asyncio.create_eager_task_factory(CustomTask),
    }


EAGER = _eager_factories()


async def _eager_done(order: list[str]) -> str:
    order.append("done ran")
    return "done"


async def _eager_fail(order: list[str]) -> None:
    order.append("fail ran")
    raise ValueError("eager boom")


async def _eager_hang(order: list[str]) -> None:
    order.append("hang ran")
    await asyncio.get_running_loop().create_future()


async def _eager_program(order: list[str]) -> dict[str, Any]:
    """Each task's first step must run inside create_task, before the next line."""
    done = asyncio.create_task(_eager_done(order))
    order.append("after done")
    asyncio.create_task(_eager_fail(order))  # <- eager unretrieved
    order.append("after fail")
    hung = asyncio.create_task(_eager_hang(order))  # <- eager destroyed
    order.append("after hang")
    swallower = asyncio.create_task(_swallow())
    assert not swallower.done()
    swallower.cancel()
    await swallower
    state = {"done_at_once": done.done() and done.result() == "done", "task_types": {type(done), type(hung)}}
    del hung
    await asyncio.sleep(0)
    gc.collect()
    return state


EAGER_ORDER = ["done ran", "after done", "fail ran", "after fail", "hang ran", "after hang"]


def _works_without_asyncwatch(loop_name: str, factory: Any) -> None:
    """Skip where the factory does not work on this loop even without asyncwatch
    (uvloop 0.23 on 3.13 passes eager_start=None, which asyncio's eager factories refuse)."""
    loop = base_factory(loop_name)()
    loop.set_task_factory(factory)
    coro = asyncio.sleep(0)
    try:
        loop.run_until_complete(coro)
    except TypeError as exc:
        coro.close()  # never started: not to be reported as never awaited by a later test
        pytest.skip(f"{factory!r} fails on {loop_name} without asyncwatch: {exc}")
    finally:
        loop.close()


@needs_eager
@pytest.mark.parametrize("factory_name", ["eager_task_factory", "custom_eager_factory"])
def test_eager_task_factory_set_before_asyncwatch(loop_name, factory_name, no_internal_error):
    """An eager factory the program set before asyncwatch keeps starting tasks
    eagerly (a task that finishes in its first step is done when create_task
    returns).  asyncio.eager_task_factory: asyncwatch makes the tasks itself,
    eagerly, as its own Task, so even the swallowed cancellation is tracked.
    create_eager_task_factory(CustomTask): asyncwatch chains it, so the tasks
    are CustomTask; creation sites are kept, swallowed cancellations are not
    (a foreign factory: README, Limits).  Uninstall puts the factory back."""
    factory = EAGER[factory_name]
    _works_without_asyncwatch(loop_name, factory)
    collector = CollectingReporter()
    order: list[str] = []
    loop = base_factory(loop_name)()
    try:
        loop.set_task_factory(factory)
        _install_asyncwatch(loop, collector)
        state = _run(loop, lambda: _eager_program(order))
        asyncwatch.uninstall()
        assert loop.get_task_factory() is factory
    finally:
        loop.close()
    assert order == EAGER_ORDER
    assert state["done_at_once"]
    kinds = collections.Counter(f.kind for f in collector.findings)
    if factory_name == "custom_eager_factory":
        assert state["task_types"] == {CustomTask}
        assert kinds == {FindingKind.TASK_EXCEPTION_UNRETRIEVED: 1, FindingKind.TASK_DESTROYED_PENDING: 1}
    else:
        assert state["task_types"] == {asyncwatch._core.tasks.Task}
        assert all(issubclass(t, asyncio.Task) for t in state["task_types"])
        assert kinds == {
            FindingKind.TASK_EXCEPTION_UNRETRIEVED: 1,
            FindingKind.TASK_DESTROYED_PENDING: 1,
            FindingKind.CANCELLATION_SWALLOWED: 1,
        }
    [unretrieved] = [f for f in collector.findings if f.kind is FindingKind.TASK_EXCEPTION_UNRETRIEVED]
    [destroyed] = [f for f in collector.findings if f.kind is FindingKind.TASK_DESTROYED_PENDING]
    assert unretrieved.site.line == line_of("# <- eager unretrieved")
    assert destroyed.site.line == line_of("# <- eager destroyed")
    assert destroyed.coroutine == "_eager_hang"


@needs_eager
def test_custom_eager_factory_findings_name_the_coroutine(loop_name):
    """An eagerly failed CustomTask's finding still names its coroutine, as
    the README promises for eagerly completed tasks."""
    factory = EAGER["custom_eager_factory"]
    _works_without_asyncwatch(loop_name, factory)
    collector = CollectingReporter()
    loop = base_factory(loop_name)()
    try:
        loop.set_task_factory(factory)
        _install_asyncwatch(loop, collector)
        _run(loop, lambda: _eager_program([]))
    finally:
        loop.close()
    [unretrieved] = [f for f in collector.findings if f.kind is FindingKind.TASK_EXCEPTION_UNRETRIEVED]
    assert unretrieved.coroutine == "_eager_fail"


@needs_eager
def test_eager_factory_asyncwatch_then_a_wrapping_library(loop_name, tracklib, no_internal_error):
    """The program's eager factory, asyncwatch on it, tracklib on top: tasks
    still start eagerly (inside tracklib's wrapper), tracklib wraps each one,
    asyncwatch reports every finding at the application's lines; both
    uninstalled in reverse order, the eager factory is back."""
    factory = asyncio.eager_task_factory
    _works_without_asyncwatch(loop_name, factory)
    collector = CollectingReporter()
    lib = tracklib.AsyncioIntegration()
    order: list[str] = []
    loop = base_factory(loop_name)()
    try:
        loop.set_task_factory(factory)
        _install_asyncwatch(loop, collector)
        lib.install(loop)
        state = _run(loop, lambda: _eager_program(order))
        lib.uninstall()
        asyncwatch.uninstall()
        assert loop.get_task_factory() is factory
    finally:
        loop.close()
    assert order == EAGER_ORDER
    assert state["done_at_once"]
    assert collections.Counter(lib.ran) == {
        "_eager_program": 1,
        "_eager_done": 1,
        "_eager_fail": 1,
        "_eager_hang": 1,
        "_swallow": 1,
    }
    by_kind = {f.kind: f for f in collector.findings}
    assert len(by_kind) == len(collector.findings) == 3
    assert by_kind[FindingKind.TASK_EXCEPTION_UNRETRIEVED].site.line == line_of("# <- eager unretrieved")
    assert by_kind[FindingKind.TASK_DESTROYED_PENDING].site.line == line_of("# <- eager destroyed")
    assert by_kind[FindingKind.CANCELLATION_SWALLOWED].site.line == line_of("# <- swallowed here")


# --- a test's own patches of its loop ------------------------------------------


@pytest.mark.parametrize("loop_name", ["asyncio"])  # uvloop's loop takes no instance attributes
def test_a_program_patching_its_loop_counts_only_its_own_calls(watched, no_internal_error):
    """janus's suite patches ``loop.is_closed`` to return True and asserts
    one call: the watchdog's looks are not the program's calls, and the
    patch's answer does not make asyncwatch stop watching the loop."""
    from unittest import mock

    seen: dict[str, int] = {}

    async def main() -> None:
        loop = asyncio.get_running_loop()
        with (
            mock.patch.object(loop, "is_closed", return_value=True) as is_closed,
            mock.patch.object(loop, "is_running", return_value=False) as is_running,
            mock.patch.object(loop, "call_later", wraps=loop.call_later) as call_later,
            mock.patch.object(loop, "call_soon", wraps=loop.call_soon) as call_soon,
        ):
            for _ in range(4):  # steps past a deadline, each looked at, none a stall
                spin_until = time.perf_counter() + 0.04
                while time.perf_counter() < spin_until:
                    pass
                await asyncio.sleep(0.01)  # one call_later of the program's
            seen.update(
                is_closed=is_closed.call_count,
                is_running=is_running.call_count,
                call_later=call_later.call_count,
                call_soon=call_soon.call_count,
            )
        time.sleep(0.3)  # <- blocks after the patches: still watched
        await asyncio.sleep(0)

    asyncio.run(main())
    plain = dict(seen)  # the program's own calls (asyncio's sleep and futures)
    watched.run(main, slow_callback_ms=100)
    assert seen == plain
    assert plain["is_closed"] == 0 and plain["call_later"] == 4
    [stall] = watched.of("slow_callback")
    assert stall.site is not None and stall.site.line == line_of("# <- blocks after the patches")
