"""The watchdog sleeps while each loop proves it turns (issue 15).

A loop's tick pushes back its deadline; the watchdog looks only when one
passes.  A healthy loop, busy or idle, is not looked at (each look takes
the GIL from it); a stall is still found at its line; a loop whose clock or
timers are not the stock ones keeps the watchdog's own clock.
"""

from __future__ import annotations

import asyncio
import os
import random
import threading
import time
from unittest import mock

import pytest

import asyncwatch
from asyncwatch._detectors import watchdog as watchdog_module
from asyncwatch._detectors.deadline import Alarm, Deadline, deadlines_supported, ticks_safely
from asyncwatch.testing import CollectingReporter
from conftest import base_factory, line_of

pytestmark = pytest.mark.skipif(not deadlines_supported(), reason="deadlines need Linux's timerfd")


class Looks(list):
    """The looks the watchdog took (each one takes the GIL from the loops),
    and how many of the loops' deadlines passed."""

    passed = 0

    def on_its_own_clock(self) -> int:
        """Looks no passed deadline explains.  A loop thread that waits a
        tick's interval for a CPU (a loaded machine) misses its deadline,
        and the watchdog rightly looks, then once more a look later, when
        the loop has ticked again: at most two looks for each pass."""
        return max(len(self) - 2 * self.passed, 0)


@pytest.fixture
def looks(monkeypatch):
    """The watchdog's looks (`Looks`)."""
    taken = Looks()
    sample_all = watchdog_module.Watchdog._sample_all
    passed = Deadline.passed

    def counted(self, wake=None):
        taken.append(time.perf_counter())
        return sample_all(self, wake)

    def counted_pass(self):
        taken.passed += 1
        passed(self)

    monkeypatch.setattr(watchdog_module.Watchdog, "_sample_all", counted)
    monkeypatch.setattr(Deadline, "passed", counted_pass)
    return taken


async def busy_for(seconds: float) -> int:
    """Never idle: a step every few microseconds, each far under any threshold."""
    end = time.perf_counter() + seconds
    steps = 0
    while time.perf_counter() < end:
        await asyncio.sleep(0)
        steps += 1
    return steps


class TestAHealthyLoopIsNotLookedAt:
    # Threshold 1 s: a look every 100 ms on the old fixed clock, a tick every
    # 50 ms; a look comes only if the loop thread waits 50 ms for a CPU.
    def test_a_busy_loop_is_looked_at_only_as_it_starts(self, watched, looks):
        steps = watched.run(lambda: busy_for(1.5), slow_callback_ms=1000)
        assert steps > 1000
        assert watched.findings == []
        # The fixed clock took 15; the first looks come before the first tick.
        assert looks.on_its_own_clock() <= 5, (len(looks), looks.passed)

    def test_an_idle_loop_is_looked_at_only_as_it_starts(self, watched, looks):
        watched.run(lambda: asyncio.sleep(1.5), slow_callback_ms=1000)
        assert watched.findings == []
        assert looks.on_its_own_clock() <= 5, (len(looks), looks.passed)


async def healthy_then_blocks() -> None:
    await busy_for(0.4)
    time.sleep(0.25)  # <- blocks after a healthy while
    await asyncio.sleep(0)


def items_to_sort(cpu_s: float) -> list[float]:
    """A list that ``sorted()`` takes about *cpu_s* of CPU to sort: one C
    call holding the GIL (CPU time: a loaded machine does not stretch it)."""
    rng = random.Random(7)
    n = 100_000
    while True:
        items = [rng.random() for _ in range(n)]
        start = time.thread_time()
        sorted(items)
        spent = time.thread_time() - start
        if spent >= 0.02:
            return [rng.random() for _ in range(int(n * cpu_s / spent))]
        n *= 2


class TestAMissedDeadlineBringsALook:
    def test_a_sleep_after_a_healthy_while_is_reported_at_its_line(self, watched):
        watched.run(healthy_then_blocks, slow_callback_ms=100)
        [finding] = watched.of("slow_callback")
        assert finding.site is not None
        assert (finding.site.file, finding.site.line) == (__file__, line_of("# <- blocks after a healthy while"))
        assert finding.duration_s is not None and 0.2 <= finding.duration_s < 0.6

    def test_a_call_holding_the_gil_after_a_healthy_while_is_reported_at_its_line(self, watched):
        items = items_to_sort(0.3)

        async def main() -> None:
            await busy_for(0.4)
            sorted(items)  # <- holds the GIL after a healthy while
            await asyncio.sleep(0)

        watched.run(main, slow_callback_ms=100)
        [finding] = watched.of("slow_callback")
        assert finding.site is not None
        assert finding.site.line == line_of("# <- holds the GIL after a healthy while")
        assert finding.cause == "cpu", finding.cause

    def test_another_threads_hold_after_a_healthy_while_blames_no_line(self, watched):
        """The look a missed deadline brings compares clocks with the last
        tick's, not with a look long past: the loop thread, kept from the
        GIL by a worker's C call, did not hold it itself."""
        finished = threading.Event()
        items = items_to_sort(0.4)

        def hog() -> None:
            sorted(items)  # one C call holding the GIL
            finished.set()

        async def main() -> None:
            await busy_for(0.4)
            worker = threading.Thread(target=hog, name="sort-worker")
            worker.start()
            while not finished.is_set():  # spins in Python: waits for the GIL, computes nothing
                pass
            await asyncio.sleep(0)
            await asyncio.to_thread(worker.join)

        watched.run(main, slow_callback_ms=100)
        found = watched.of("slow_callback")
        assert found, "the stall was not reported"
        assert all(f.cause == "gil" and f.site is None for f in found), [
            (f.cause, f.site, f.breakdown, f.duration_s) for f in found
        ]
        assert watched.findings == []  # none counts against the program


class TestLoopsThatKeepTheFixedClock:
    def test_a_loop_with_a_clock_of_its_own_gets_no_timer_of_ours(self, looks):
        class OwnClock(asyncio.SelectorEventLoop):
            def time(self) -> float:
                return time.monotonic()

        loop = OwnClock()
        assert not ticks_safely(loop)
        seen: list[int] = []

        async def main() -> None:
            await busy_for(0.3)
            seen.append(len(loop._scheduled))  # type: ignore[attr-defined]
            time.sleep(0.25)  # <- blocks on a loop with its own clock
            await asyncio.sleep(0)

        collector = CollectingReporter()
        asyncwatch.install(log=False, reporters=[collector], slow_callback_ms=100)
        try:
            loop.run_until_complete(main())
        finally:
            loop.close()
            asyncwatch.uninstall()
        assert seen == [0]  # only the program's timers
        [finding] = [f for f in collector.findings if f.kind.value == "slow_callback"]
        assert finding.site is not None and finding.site.line == line_of("# <- blocks on a loop with its own clock")
        assert len(looks) >= 5  # the fixed clock: a look every 10 ms while busy

    @pytest.mark.parametrize("name", ["time", "call_at", "call_later"])
    def test_a_loop_with_a_timer_method_mocked_keeps_the_fixed_clock(self, name):
        loop = asyncio.new_event_loop()
        try:
            assert ticks_safely(loop)
            with mock.patch.object(loop, name):
                assert not ticks_safely(loop)
        finally:
            loop.close()

    def test_a_loop_with_a_mocked_selector_keeps_the_fixed_clock(self):
        loop = asyncio.new_event_loop()
        real = loop._selector  # type: ignore[attr-defined]
        try:
            loop._selector = mock.Mock()  # type: ignore[attr-defined]
            assert not ticks_safely(loop)
        finally:
            loop._selector = real  # type: ignore[attr-defined]
            loop.close()

    def test_stock_loops_tick(self, loop_name):
        loop = base_factory(loop_name)()
        try:
            assert ticks_safely(loop)
        finally:
            loop.close()


def open_descriptors() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


def test_watched_loops_leave_no_descriptor_open_after_uninstall(loop_name):
    asyncwatch.install(log=False)
    asyncwatch.uninstall()  # whatever the first install opens for good (logging, ...)
    before = open_descriptors()
    asyncwatch.install(log=False)
    for _ in range(5):
        with asyncio.Runner(loop_factory=asyncwatch.loop_factory(base_factory(loop_name))) as runner:
            runner.run(busy_for(0.05))
    asyncwatch.uninstall()
    assert open_descriptors() - before == set()


class TestAlarm:
    def test_a_set_before_the_wait_is_kept(self):
        alarm = Alarm()
        try:
            alarm.set()
            start = time.perf_counter()
            assert alarm.wait(5.0, []) == []
            assert time.perf_counter() - start < 2.5
        finally:
            alarm.close()

    def test_a_cleared_alarm_sleeps_until_the_timeout(self):
        alarm = Alarm()
        try:
            alarm.set()
            alarm.clear()
            start = time.perf_counter()
            assert alarm.wait(0.05, []) == []
            assert time.perf_counter() - start >= 0.045
        finally:
            alarm.close()

    def test_a_set_from_another_thread_ends_the_wait(self):
        alarm = Alarm()
        try:
            threading.Timer(0.05, alarm.set).start()
            start = time.perf_counter()
            alarm.wait(None, [])
            assert time.perf_counter() - start >= 0.04
        finally:
            alarm.close()

    def test_sets_from_another_thread_while_it_waits_never_fail(self):
        alarm = Alarm()
        errors: list[BaseException] = []
        stop = threading.Event()

        def setter() -> None:
            try:
                while not stop.is_set():
                    alarm.set()
            except BaseException as exc:
                errors.append(exc)

        thread = threading.Thread(target=setter)
        thread.start()
        try:
            for _ in range(500):
                alarm.clear()
                alarm.wait(0.001, [])
        finally:
            stop.set()
            thread.join()
            alarm.close()
        assert errors == []

    def test_a_closed_alarm_ignores_a_late_set(self):
        alarm = Alarm()
        alarm.close()
        assert alarm.closed
        alarm.set()  # a loop thread's heartbeat after uninstall: nothing written anywhere
        assert alarm.wait(0.01, []) == []

    def test_a_deadline_not_pushed_back_wakes_it_and_is_named(self):
        alarm = Alarm()
        deadline = Deadline.open(0.05)
        assert deadline is not None
        try:
            deadline.push(time.perf_counter(), None)
            assert deadline.armed
            assert alarm.wait(None, [deadline]) == [deadline]
            deadline.passed()
            assert not deadline.armed
        finally:
            deadline.close()
            alarm.close()

    def test_a_deadline_pushed_back_in_time_does_not_wake_it(self):
        alarm = Alarm()
        deadline = Deadline.open(1.0)
        assert deadline is not None
        try:
            for _ in range(6):
                deadline.push(time.perf_counter(), None)
                assert alarm.wait(0.05, [deadline]) == []
        finally:
            deadline.close()
            alarm.close()


def test_a_failing_tick_is_said_once_and_the_watchdog_keeps_its_own_clock(watched, monkeypatch, capsys):
    from asyncwatch._detectors import loop_probe

    said: list[tuple[str, str]] = []
    report = loop_probe.report_internal_error

    def recorded(part: str, exc: BaseException) -> None:
        said.append((part, str(exc)))
        report(part, exc)

    def broken(self, now, clocks):
        raise OSError("injected")

    monkeypatch.setattr(loop_probe, "report_internal_error", recorded)
    monkeypatch.setattr(Deadline, "push", broken)

    async def main() -> None:
        await busy_for(0.3)
        time.sleep(0.25)  # <- blocks after the ticks failed
        await asyncio.sleep(0)

    watched.run(main, slow_callback_ms=100)
    [finding] = watched.of("slow_callback")
    assert finding.site is not None and finding.site.line == line_of("# <- blocks after the ticks failed")
    assert said == [("slow-callback deadline", "injected")]  # once: no tick after it
    out = capsys.readouterr()
    assert "Exception in callback" not in out.out + out.err  # nothing of ours reached the loop's handler
