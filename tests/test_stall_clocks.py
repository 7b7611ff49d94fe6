"""The clocks the slow-callback watchdog reads at each look (`stall_cause`)."""

from __future__ import annotations

import os
import sys
import threading
import time

import pytest

from asyncwatch._detectors import stall_cause
from asyncwatch._detectors.stall_cause import ThreadClock

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
