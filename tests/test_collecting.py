"""One hook after each garbage collection, per thread, for every detector
that holds findings while the collector runs (`asyncwatch._core.collecting`)."""

from __future__ import annotations

import asyncio
import gc
import pickle
import signal
import threading
from collections.abc import Iterator
from typing import Any

import pytest

import asyncwatch
from asyncwatch._core import collecting
from asyncwatch._core.settings import extension
from asyncwatch._outputs.collect import CollectingReporter
from conftest import line_of

# A hang guard only: the other thread needs milliseconds.
HANG_GUARD_S = 600


def _ours() -> list[Any]:
    return [cb for cb in gc.callbacks if cb is collecting._callback]


def test_one_gc_callback_serves_every_detector_and_goes_with_the_last() -> None:
    before = list(gc.callbacks)
    asyncwatch.install(log=False, detect=["task_destroyed_pending", "coroutine_never_awaited"])
    try:
        assert len(_ours()) == 1
    finally:
        asyncwatch.uninstall()
    assert gc.callbacks == before


def test_a_program_callback_added_after_install_is_kept_on_uninstall() -> None:
    def programs(phase: str, info: dict[str, Any]) -> None:
        pass

    asyncwatch.install(log=False)
    gc.callbacks.append(programs)
    try:
        asyncwatch.uninstall()
        assert programs in gc.callbacks
        assert not _ours()
    finally:
        gc.callbacks.remove(programs)


@pytest.fixture
def collector() -> Iterator[CollectingReporter]:
    """asyncwatch installed, watching for never-awaited coroutines."""
    reporter = CollectingReporter()
    asyncwatch.install(reporters=[reporter], log=False, detect=["coroutine_never_awaited"])
    yield reporter
    asyncwatch.uninstall()


class OtherCollection:
    """Another thread inside a collection, held there after asyncwatch's callback ran."""

    def __init__(self) -> None:
        self.inside = threading.Event()
        self.release = threading.Event()
        self.collecting_there: list[bool] = []
        self.thread = threading.Thread(target=gc.collect, name="collector")

    def hold(self, phase: str, info: dict[str, Any]) -> None:
        if phase == "start" and threading.current_thread() is self.thread and not self.inside.is_set():
            self.collecting_there.append(collecting.collecting())
            self.inside.set()
            self.release.wait(HANG_GUARD_S)

    def let_go(self) -> None:
        self.release.set()
        self.thread.join()


@pytest.fixture
def other_collection(collector: CollectingReporter) -> Iterator[OtherCollection]:
    other = OtherCollection()
    gc.callbacks.append(other.hold)
    try:
        other.thread.start()
        assert other.inside.wait(HANG_GUARD_S)
        yield other
    finally:
        other.let_go()
        gc.callbacks.remove(other.hold)


def test_collecting_is_true_only_in_the_thread_that_collects(other_collection: OtherCollection) -> None:
    here = collecting.collecting()
    other_collection.let_go()
    assert other_collection.collecting_there == [True]
    assert here is False


def test_a_finding_in_this_thread_is_not_held_behind_another_threads_collection(
    collector: CollectingReporter, other_collection: OtherCollection
) -> None:
    async def ping() -> None:
        pass

    with pytest.warns(RuntimeWarning, match="never awaited"):
        ping()  # <- dropped here, while the other thread still collects
    kinds = [f.kind.value for f in collector.findings]
    other_collection.let_go()
    assert kinds == ["coroutine_never_awaited"]


def _extension_callbacks() -> bool:
    ctask = extension()
    return ctask is not None and hasattr(ctask, "Collecting") and hasattr(ctask, "GcTimer")


@pytest.mark.skipif(
    not _extension_callbacks(),
    reason="without the extension the callbacks are Python, and let signal handlers run inside a C call (README, Limits)",
)
class TestASignalDuringALongCCall:
    """The interpreter runs a Python signal handler at its next check
    between two instructions: after a C call returns, under plain python.
    A ``gc.callbacks`` entry in Python is such a check inside any C call
    that allocates, and asyncwatch had two: a Ctrl-C during a json.loads
    raised KeyboardInterrupt inside one, which the collector drops, and the
    program ran on; uvicorn's handler ran once per signal, not once, and
    two Ctrl-C skipped its graceful shutdown."""

    #: One C call (pickle's) that makes this many containers: thousands of
    #: young collections, tens of milliseconds at least on any machine.
    CONTAINERS = 1_000_000

    @pytest.fixture
    def installed(self) -> Iterator[list[Any]]:
        """asyncwatch, every detector on; yields what gc.callbacks holds
        while a loop runs (the collector clock comes with the first loop)."""
        asyncwatch.install(log=False)
        try:
            yield []
        finally:
            asyncwatch.uninstall()

    @staticmethod
    def _alarms_during_one_call(handler: Any, callbacks: list[Any]) -> Any:
        blob = pickle.dumps([[i] for i in range(TestASignalDuringALongCCall.CONTAINERS)])

        async def main() -> Any:
            callbacks.extend(gc.callbacks)
            previous = signal.signal(signal.SIGALRM, handler)
            # From the kernel, every millisecond: no thread of ours needs
            # the GIL to send them while the call holds it.
            signal.setitimer(signal.ITIMER_REAL, 0.001, 0.001)
            try:
                return pickle.loads(blob)  # <- the long C call
            finally:
                signal.setitimer(signal.ITIMER_REAL, 0)
                signal.signal(signal.SIGALRM, previous)

        return asyncio.run(main())

    def test_its_handler_runs_once_after_the_call_at_the_programs_line(self, installed: list[Any]) -> None:
        ran: list[tuple[str, int]] = []

        def handler(signum: int, frame: Any) -> None:
            ran.append((frame.f_code.co_name, frame.f_lineno))

        made = self._alarms_during_one_call(handler, installed)
        assert len(installed) == 2  # the collector clock's, and collecting's
        assert len(made) == self.CONTAINERS
        # The next alarm can land as the handler itself starts (the
        # interpreter checks again on entering it), and that nested call
        # appends first: it interrupted the handler, not the C call.
        interrupted = [site for site in ran if site[0] != "handler"]
        assert interrupted[0] == ("main", line_of("# <- the long C call"))

    def test_a_keyboard_interrupt_it_raises_reaches_the_program(self, installed: list[Any]) -> None:
        with pytest.raises(KeyboardInterrupt):
            self._alarms_during_one_call(signal.default_int_handler, installed)
        assert len(installed) == 2
