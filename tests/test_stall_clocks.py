"""The clocks the slow-callback watchdog reads at each look (`stall_cause`)."""

from __future__ import annotations

import os
import sys
import threading
import time

import pytest

from asyncwatch._detectors import stall_cause
from asyncwatch._detectors.stall_cause import ThreadClock
from asyncwatch._detectors.stall_meter import Clocks, held_from

linux_only = pytest.mark.skipif(sys.platform != "linux", reason="schedstat is Linux's")


@linux_only
def test_a_schedstat_read_keeps_the_gil() -> None:
    """Each read that let the GIL go cost a busy loop a forced switch to take
    it back: the watchdog reads schedstat through a foreign call that holds it."""
    ctypes = pytest.importorskip("ctypes")
    read = stall_cause._read_without_letting_go()
    path = f"/proc/self/task/{threading.get_native_id()}/schedstat"
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        ours = read(fd, 128).split()
        theirs = os.pread(fd, 128, 0).split()
    finally:
        os.close(fd)
    assert len(ours) == len(theirs) == 3
    assert int(ours[0]) <= int(theirs[0])  # the CPU time so far, read first
    pread = stall_cause._pread_holding_the_gil()
    assert pread._flags_ & ctypes._FUNCFLAG_PYTHONAPI  # PyDLL: the GIL is held over the call


@linux_only
def test_a_thread_clock_reads_cpu_time_and_run_queue_wait() -> None:
    clock = ThreadClock(threading.get_ident(), threading.get_native_id())
    try:
        cpu_before, wait = clock.read()
        deadline = time.thread_time() + 0.02
        while time.thread_time() < deadline:
            pass
        cpu_after, _ = clock.read()
        assert wait is not None and wait >= 0.0
        assert cpu_after - cpu_before >= 0.015
        waits = clock.waits()
        assert waits is not None and waits[1] >= 1
    finally:
        clock.close()


def clocks_at(wall: float, loop_cpu: float, loop_wait: float | None = 0.0) -> Clocks:
    return Clocks(wall, loop_cpu, loop_wait, process_cpu=loop_cpu, gc=0.0, foreign=0.0)


class TestWhenAStepSeenLateBegan:
    """`held_from`: a step seen by a late look is dated from when the loop
    thread has been busy since, never before the clocks it is compared with
    (the last tick) nor after the wake-up was due."""

    def test_a_loop_busy_since_the_tick_began_the_step_at_the_tick(self) -> None:
        tick, look = clocks_at(10.000, 1.0), clocks_at(10.060, 1.060)
        assert held_from(tick, look, due=10.010) == pytest.approx(10.000)

    def test_a_loop_idle_after_the_tick_began_the_step_when_it_got_busy(self) -> None:
        tick, look = clocks_at(10.000, 1.0), clocks_at(10.060, 1.052)
        assert held_from(tick, look, due=10.010) == pytest.approx(10.008)

    def test_time_preempted_while_holding_the_gil_counts_as_busy(self) -> None:
        tick, look = clocks_at(10.000, 1.0, 0.5), clocks_at(10.060, 1.040, 0.520)
        assert held_from(tick, look, due=10.010) == pytest.approx(10.000)

    def test_never_before_the_tick(self) -> None:
        """Busy time counted from an older reading is no reason to date the
        step before the loop was last seen turning."""
        tick, look = clocks_at(10.000, 1.0), clocks_at(10.060, 1.200)
        assert held_from(tick, look, due=10.010) == pytest.approx(10.000)

    def test_never_after_the_wake_up_was_due(self) -> None:
        tick, look = clocks_at(10.000, 1.0), clocks_at(10.060, 1.010)
        assert held_from(tick, look, due=10.010) == pytest.approx(10.010)
