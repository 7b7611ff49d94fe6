"""One hook after each garbage collection, per thread, for every detector
that holds findings while the collector runs (`asyncwatch._core.collecting`)."""

from __future__ import annotations

import gc
import threading
from collections.abc import Iterator
from typing import Any

import pytest

import asyncwatch
from asyncwatch._core import collecting
from asyncwatch._outputs.collect import CollectingReporter

# A hang guard only: the other thread needs milliseconds.
HANG_GUARD_S = 600


def _ours() -> list[Any]:
    return [cb for cb in gc.callbacks if cb is collecting._gc_callback]


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
