"""Why the loop stalled: the clocks the slow-callback watchdog reads, and the
cause they give.

Everything here runs in the watchdog thread (or, for the collector's clock,
in whichever thread collects), never on the loop's hot path: the loop
thread reads none of these clocks or files for us.  Over a stall
the watchdog compares, for the loop thread, its wall time with:

* its CPU time (``/proc/self/task/<tid>/schedstat``, field 1, or the
  thread's CPU clock): on CPU, the step is CPU-bound;
* its run-queue wait (schedstat, field 2): runnable but no CPU free, the
  machine is overloaded (``starved``); on a virtual machine, also the time
  the hypervisor gave the thread's CPU to another machine (`Steal`);
* the time the garbage collector ran (``gc.callbacks``): a collection stops
  every thread, whatever line the loop was at (``gc``);
* the CPU time of the process's other threads, and how late the watchdog's
  own wake-ups were while it was not waiting for a CPU: the GIL held by
  someone else (``gil``; the thread that ran most is named);
* what is left is the loop thread off CPU by its own doing: blocking I/O,
  a sleep, a lock (``blocking_io``).

The cause is what the stall would not have reached the threshold without:
if the time left after the collector, the run-queue wait and the GIL wait
is under the threshold, the stall is theirs (the largest one names it) and
no line of the program is blamed.  Otherwise it is the program's own,
``cpu`` or ``blocking_io`` by the larger of the two.
"""

from __future__ import annotations

import collections
import contextlib
import gc
import os
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

from .._core.collecting import gc_entry
from .._core.findings import NOT_THE_PROGRAMS

__all__ = [
    "BLOCKING_IO",
    "CPU",
    "GC",
    "GIL",
    "IMPORT",
    "STARVED",
    "Breakdown",
    "GcClock",
    "ThreadClock",
    "classify",
    "tasks_wait",
    "thread_cpu",
]

CPU = "cpu"
BLOCKING_IO = "blocking_io"
GC = "gc"
GIL = "gil"
STARVED = "starved"
IMPORT = "import"

assert frozenset({GC, GIL, STARVED, IMPORT}) == NOT_THE_PROGRAMS


class GcClock:
    """CPU time spent in garbage collection, from ``gc.callbacks``.

    CPU time, not wall time: a collection preempted by the machine's other
    work is counted once, as the wait for a CPU.  One append to the list
    while installed (removed, never replaced, on uninstall); the callback
    (`_ctask.GcTimer`, in C where it can be) costs three clock reads per
    collection, which already walks hundreds of objects.
    """

    #: Collections at least this long (CPU) are remembered one by one.
    PAUSE_FLOOR_S = 0.005

    def __init__(self) -> None:
        #: (when it ended, CPU seconds, when it began, the thread that ran
        #: it) of the last long collections
        self.pauses: collections.deque[tuple[float, float, float, int]] = collections.deque(maxlen=64)
        self.timer = gc_entry("GcTimer", self.pauses, self.PAUSE_FLOOR_S)

    def pauses_since(
        self, since: float, now: float, floor: float, thread_id: int | None = None, thread_cpu: float | None = None
    ) -> float:
        """CPU time of the collections, each at least *floor* long, that
        ended after *since* (one in progress that long included, as `read`
        counts it)."""
        total = sum(spent for end, spent, _, _ in list(self.pauses) if end > since and spent >= floor)
        running = self._running(now, thread_id, thread_cpu)
        if running >= floor:
            total += running
        return total

    def began_since(self, since: float) -> float | None:
        """When the first long collection that ended after *since*, or the
        one in progress, began (wall clock); None if there was none."""
        began = [start for end, _, start, _ in list(self.pauses) if end > since]
        started = self.timer.started
        if started:
            began.append(started)
        return min(began) if began else None

    def others_since(self, since: float, now: float, thread_id: int) -> tuple[float, float]:
        """The long collections other threads than *thread_id* ran that
        ended after *since*, and one running now on another thread: the
        time `read` counts for them (CPU time once over, wall time while
        running), and the time they held the GIL since *since* (wall time:
        a collection holds the GIL while its thread waits for a CPU)."""
        counted = held = 0.0
        for end, spent, began, by in list(self.pauses):
            if end > since and by != thread_id:
                counted += spent
                held += end - max(began, since)
        timer = self.timer
        started, by = timer.started, timer.started_by
        if started and by != thread_id and now > started:
            counted += now - max(started, since)
            held += now - max(started, since)
        return counted, held

    def read(self, now: float, thread_id: int | None = None, thread_cpu: float | None = None) -> float:
        """Collection time so far.  One in progress counts its CPU time when
        it runs on the thread *thread_id*, whose CPU time now is
        *thread_cpu* (the loop thread's, read from the same clock), else its
        wall time (another thread's collection holds the GIL the loop
        waits for)."""
        return float(self.timer.total) + self._running(now, thread_id, thread_cpu)

    def _running(self, now: float, thread_id: int | None, thread_cpu: float | None) -> float:
        timer = self.timer
        started, started_cpu, by = timer.started, timer.started_cpu, timer.started_by
        if not started or now <= started:
            return 0.0
        if thread_cpu is not None and by == thread_id:
            # Its wall time counted a loaded machine's wait for a CPU twice,
            # as the collector's and as the wait: a full collection after a
            # json.loads at load 4, 45 ms of CPU in 145 ms, took the parse's
            # CPU time out of the step's, which came out `gc` (3.12, 10 in 12).
            return float(max(thread_cpu - started_cpu, 0.0))
        return float(now - started)

    def install(self) -> None:
        if self.timer not in gc.callbacks:
            gc.callbacks.append(self.timer)

    def uninstall(self) -> None:
        while self.timer in gc.callbacks:
            gc.callbacks.remove(self.timer)


def _pread_holding_the_gil() -> Any:
    """``pread(2)`` called through ctypes' ``PyDLL``, which keeps the GIL
    over the call; None where ctypes or the C library's symbol is missing.

    ``os.pread`` lets the GIL go around the call, and taking it back from a
    loop that never idles costs a forced switch (the loop thread runs on for
    a switch interval, then hands over and waits for us): each look at a busy
    loop read two schedstat files, and those hand-offs, not the reads, were
    the watchdog's wall-time cost (issue 15; under strace, futex calls per
    look fell from 14 to 6).  A read of schedstat never blocks (the kernel
    formats three numbers).  Made when the watchdog opens its first clock,
    not at ``import asyncwatch``: ctypes adds ~550 objects to the heap the
    collector walks.
    """
    try:
        import ctypes

        pread = ctypes.PyDLL(None).pread
    except (ImportError, OSError, AttributeError):
        return None
    pread.restype = ctypes.c_ssize_t
    pread.argtypes = (ctypes.c_int, ctypes.c_char_p, ctypes.c_size_t, ctypes.c_long)
    return pread


def _read_without_letting_go() -> Callable[[int, int], bytes]:
    """How a look reads a file of /proc (see `_pread_holding_the_gil`)."""
    pread = _pread_holding_the_gil()
    if pread is None:
        return lambda fd, size: os.pread(fd, size, 0)
    import ctypes

    make_buffer = ctypes.create_string_buffer

    def read(fd: int, size: int) -> bytes:
        buffer = make_buffer(size)  # one a call: a clock may be read from two threads
        got: int = pread(fd, buffer, size, 0)
        if got < 0:
            raise OSError(f"pread of a /proc file failed on descriptor {fd}")
        return buffer.raw[:got]

    return read


_read_stat: Callable[[int, int], bytes] | None = None

#: Ticks a second of /proc/stat's columns (USER_HZ).
_USER_HZ = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
#: How much of /proc/stat a read takes: its aggregate line and one line a
#: CPU (60 to 150 bytes each) come first; the interrupt counts after them
#: are never needed.
_PROC_STAT_SIZE = 256 + 160 * (os.cpu_count() or 1)


class Steal:
    """What the hypervisor took from the loop thread's CPU: the CPU the
    thread last ran on (``/proc/self/task/<tid>/stat``, field 39) and every
    CPU's steal time so far (``/proc/stat``'s eighth column), in seconds.

    A virtual machine's CPU that the host gives to another guest stops
    mid-instruction: the thread on it is neither running (the guest
    kernel's paravirtual steal clock takes that time out of its CPU time)
    nor waiting in the run queue, so without this the stall looked like the
    program's own time off CPU, ``blocking_io`` at whatever line the loop
    was at (a benchmark's healthy loop, once in a 15-round run on this
    project's VM).  Read at a look, never by the loop thread.
    """

    __slots__ = ("cpu", "stolen")

    def __init__(self, cpu: int, stolen: dict[int, float]) -> None:
        self.cpu = cpu
        self.stolen = stolen

    def since(self, before: Steal) -> float:
        """Time stolen since *before* from the CPUs the thread was seen on
        at both readings: the least of them, as the thread may have moved
        between the two (a stall is never excused by steal from a CPU it
        may not have been on)."""
        cpus = {before.cpu, self.cpu}
        deltas = [self.stolen.get(cpu, 0.0) - before.stolen.get(cpu, 0.0) for cpu in cpus]
        return max(min(deltas), 0.0)


def parse_steal(proc_stat: bytes) -> dict[int, float]:
    """Each CPU's steal time in seconds, from the start of ``/proc/stat``
    (a kernel older than 2.6.11 has no steal column: none taken)."""
    stolen: dict[int, float] = {}
    # The last piece is cut short, or what follows the last newline.
    for line in proc_stat.split(b"\n")[1:-1]:
        if not line.startswith(b"cpu"):
            break
        fields = line.split()
        if len(fields) > 8:
            stolen[int(fields[0][3:])] = int(fields[8]) / _USER_HZ
    return stolen


def _os_open(path: str) -> int | None:
    try:
        return os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None


def _open_without_letting_go() -> Callable[[str], int | None]:
    """How a clock opens its /proc files: ``open(2)`` through ctypes'
    ``PyDLL``, keeping the GIL (see `_pread_holding_the_gil`).  Each
    ``os.open`` lets it go: the two steal files opened with the loop
    thread's clock, at the watchdog's first look, let a uvloop loop's first
    step, holding the GIL, move on before the look saw it (4 runs in 8 of
    its test).  Opening /proc never blocks."""
    try:
        import ctypes

        libc_open = ctypes.PyDLL(None).open
    except (ImportError, OSError, AttributeError):
        return _os_open
    libc_open.restype = ctypes.c_int
    libc_open.argtypes = (ctypes.c_char_p, ctypes.c_int)
    flags = os.O_RDONLY | os.O_CLOEXEC

    def open_file(path: str) -> int | None:
        fd: int = libc_open(os.fsencode(path), flags)
        return fd if fd >= 0 else None

    return open_file


_open_file: Callable[[str], int | None] | None = None


def _open(path: str) -> int | None:
    global _open_file
    if _open_file is None:
        _open_file = _open_without_letting_go()
    return _open_file(path)


class ThreadClock:
    """One thread's CPU time and run-queue wait, in seconds, and the time
    the hypervisor stole from its CPU (`Steal`).

    Linux's schedstat gives both; where it is missing (another system) or
    reads zero (a kernel without schedstats), the thread's CPU clock gives
    the CPU time and the wait is unknown (None).  Its descriptors are
    opened with it and closed with it (`close`): none stays open once the
    loop is no longer watched.
    """

    __slots__ = ("_clock", "_fd", "_proc_stat_fd", "_task_stat_fd", "slices")

    def __init__(self, ident: int, native_id: int | None, *, steal: bool = True) -> None:
        self._fd: int | None = None
        self._clock: int | None = None
        self._task_stat_fd: int | None = None
        self._proc_stat_fd: int | None = None
        #: How many times the thread was put on a CPU, as of the last `read`
        #: (schedstat's third field); None where unknown.
        self.slices: int | None = None
        if native_id is not None:
            self._fd = _open(f"/proc/self/task/{native_id}/schedstat")
            if self._fd is not None and steal:
                self._task_stat_fd = _open(f"/proc/self/task/{native_id}/stat")
                self._proc_stat_fd = _open("/proc/stat") if self._task_stat_fd is not None else None
        self._clock = cpu_clock_id(ident, native_id)
        global _read_stat
        if _read_stat is None and self._fd is not None:
            _read_stat = _read_without_letting_go()

    def read(self) -> tuple[float, float | None]:
        fd = self._fd
        if fd is not None:
            try:
                run, wait, slices = _stat(fd).split()[:3]
                if int(run):
                    self.slices = int(slices)
                    return int(run) / 1e9, int(wait) / 1e9
            except (OSError, ValueError):
                self.close()
        if self._clock is not None:
            try:
                return time.clock_gettime(self._clock), None
            except OSError:
                self._clock = None
        return 0.0, None

    def waits(self) -> tuple[float, int] | None:
        """The run-queue wait so far and how many times the thread was put
        on a CPU (schedstat fields 2 and 3); None where unknown."""
        fd = self._fd
        if fd is None:
            return None
        try:
            fields = _stat(fd).split()
            return int(fields[1]) / 1e9, int(fields[2])
        except (OSError, ValueError, IndexError):
            return None

    def steal(self) -> Steal | None:
        """The CPU the thread last ran on and the steal time of every CPU;
        None where either cannot be read (not Linux, no steal column)."""
        task_fd, proc_fd = self._task_stat_fd, self._proc_stat_fd
        if task_fd is None or proc_fd is None:
            return None
        try:
            # Field 39, counted after the command name, which may hold spaces.
            cpu = int(_stat(task_fd, 1024).rpartition(b")")[2].split()[36])
            stolen = parse_steal(_stat(proc_fd, _PROC_STAT_SIZE))
        except (OSError, ValueError, IndexError):
            self._close_steal()
            return None
        return Steal(cpu, stolen) if cpu in stolen else None

    def _close_steal(self) -> None:
        for fd in (self._task_stat_fd, self._proc_stat_fd):
            if fd is not None:
                with contextlib.suppress(OSError):
                    os.close(fd)
        self._task_stat_fd = self._proc_stat_fd = None

    def close(self) -> None:
        fd, self._fd = self._fd, None
        if fd is not None:
            with contextlib.suppress(OSError):
                os.close(fd)
        self._close_steal()

    def forget_after_fork(self) -> None:
        """In a forked child the descriptor names the parent's thread."""
        self.close()
        self._clock = None


def _stat(fd: int, size: int = 128) -> bytes:
    read = _read_stat
    return read(fd, size) if read is not None else os.pread(fd, size, 0)


def cpu_clock_id(ident: int, native_id: int | None) -> int | None:
    """The CPU-time clock of a thread, which may have ended.

    On Linux, from its kernel thread id, as glibc makes it
    (MAKE_THREAD_CPUCLOCK(tid, CPUCLOCK_SCHED)): a thread that ended then
    reads EINVAL.  ``pthread_getcpuclockid`` reads the thread's pthread
    structure, freed once a detached thread ends: asking it for a thread
    that just ended crashed the process (3.12, the pytest plugin's tests)."""
    if sys.platform == "linux":
        return ((~native_id) << 3) | 6 if native_id is not None else None
    try:
        return time.pthread_getcpuclockid(ident)
    except (AttributeError, OSError, OverflowError):
        return None


def thread_cpu(ident: int, native_id: int | None) -> float | None:
    """A thread's CPU time (None when its clock cannot be read)."""
    clock = cpu_clock_id(ident, native_id)
    if clock is None:
        return None
    try:
        return time.clock_gettime(clock)
    except (OSError, OverflowError):
        return None


def threads_cpu(skip: tuple[int | None, ...]) -> dict[int, float]:
    """The CPU time of every Python thread but those in *skip*."""
    times: dict[int, float] = {}
    for thread in threading.enumerate():
        ident = thread.ident
        if ident is None or ident in skip:
            continue
        cpu = thread_cpu(ident, thread.native_id)
        if cpu is not None:
            times[ident] = cpu
    return times


def tasks_wait(skip: tuple[int | None, ...]) -> float | None:
    """The run-queue wait of every thread of the process but those in
    *skip* (native ids), summed; None where schedstat cannot be read.
    A directory listing and a read a thread: only at a stall's start and end."""
    total = 0.0
    try:
        for name in os.listdir("/proc/self/task"):
            if int(name) in skip:
                continue
            try:
                with open(f"/proc/self/task/{name}/schedstat", "rb") as f:
                    total += int(f.read().split()[1]) / 1e9
            except (OSError, ValueError, IndexError):
                continue  # a thread that just ended
    except (OSError, ValueError):
        return None
    return total


def busiest_thread(
    before: dict[int, float], after: dict[int, float], names: dict[int, str] | None = None
) -> tuple[str | None, float]:
    """The thread that used most CPU between two `threads_cpu` readings
    (*names*: the threads' names read with *after*, for one that ended since)."""
    best: int | None = None
    most = 0.0
    for ident, cpu in after.items():
        used = cpu - before.get(ident, 0.0)  # a thread new since: all of its time
        if used > most:
            best, most = ident, used
    if best is None:
        return None, 0.0
    if names is None or best not in names:
        names = {t.ident: t.name for t in threading.enumerate() if t.ident is not None}
    return names.get(best, f"thread {best}"), most


class Breakdown:
    """Where the wall time of a stall went, in seconds.

    *cpu*: the loop thread on CPU (collections it ran included).  *starved*:
    the loop thread runnable, waiting for a CPU.  *gc*: the collector running
    (CPU time), in any thread.  *gil*: the loop thread waiting for a GIL
    another thread held.  *others_cpu*: CPU time of the process's other
    threads (not the watchdog).  *gc_pauses*: of *gc*, the collections that
    each lasted at least `GcClock.PAUSE_FLOOR_S` (the full ones, in
    practice), a pause of their own; the hundreds of young ones a step's
    allocations trigger (json.loads of a large body) stay the step's; -1
    means as *gc*.
    *steal*: of *starved*, the time the hypervisor ran another machine on
    the loop thread's CPU (`Steal`).

    A slots class, not a NamedTuple (about 30 objects for the collector to
    walk, against 9: issue 15's import footprint).
    """

    __slots__ = ("cpu", "gc", "gc_pauses", "gil", "others_cpu", "starved", "steal", "wall")

    def __init__(
        self,
        wall: float,
        cpu: float,
        starved: float,
        gc: float,
        gil: float,
        others_cpu: float,
        gc_pauses: float = -1.0,
        steal: float = 0.0,
    ) -> None:
        self.wall = wall
        self.cpu = cpu
        self.starved = starved
        self.gc = gc
        self.gil = gil
        self.others_cpu = others_cpu
        self.gc_pauses = gc_pauses
        self.steal = steal

    def __repr__(self) -> str:  # read in test failures and internal-error reports
        shares = ", ".join(f"{name}={getattr(self, name):.4f}" for name in self.__slots__)
        return f"Breakdown({shares})"

    @property
    def off_cpu(self) -> float:
        """The loop thread neither running nor runnable."""
        return max(self.wall - self.cpu - self.starved, 0.0)

    def scaled(self, factor: float) -> Breakdown:
        """The same shares over a stall *factor* times as long (a stall's
        tail after the watchdog's last look, measured like the rest)."""
        pauses = self.gc_pauses * factor if self.gc_pauses >= 0 else self.gc_pauses
        return Breakdown(
            self.wall * factor,
            self.cpu * factor,
            self.starved * factor,
            self.gc * factor,
            self.gil * factor,
            self.others_cpu * factor,
            pauses,
            self.steal * factor,
        )

    def as_pairs(self) -> tuple[tuple[str, float], ...]:
        """The finding's ``breakdown`` field: seconds per cause."""
        blocking = max(self.off_cpu - self.gil, 0.0)
        own_cpu = max(self.cpu - self.gc, 0.0)
        return (
            (CPU, round(own_cpu, 6)),
            (BLOCKING_IO, round(blocking, 6)),
            (GC, round(self.gc, 6)),
            (GIL, round(self.gil, 6)),
            (STARVED, round(self.starved, 6)),
        )


#: Of the threshold, the CPU time the loop thread must have spent at the
#: program's line for a stall stretched by the machine to stay the
#: program's (see `classify`).  A quarter blamed steps of 10-16 ms of CPU
#: (measured unloaded) that allocate, at load 4 to 5 on two cores: there
#: each measured 25-41 ms of CPU (a busy machine slows the CPU a step
#: needs, its caches shared) and waited 130 ms for one, cause cpu at the
#: line in 1 run of 6 (a field corpus's trap, session 11).
RUNNING_SHARE = 1 / 2


def classify(breakdown: Breakdown, threshold_s: float, program_line: bool = False) -> str:
    """The cause of a stall (one of `CPU`, `BLOCKING_IO`, `GC`, `GIL`, `STARVED`).

    The program's own share is what is left once the collector, the wait
    for a CPU and the wait for another thread's GIL are taken out; under the
    threshold, the stall would not have been one without them.

    *program_line*: the stall was captured at a line of the program, which
    the watchdog saw on the loop thread's stack.  A step that computes until
    a deadline (a busy loop on the clock) gets, on a machine with L runnable
    threads a CPU, about 1/L of its wall time: measured in CPU it looks like
    a short step the machine stretched, and the two cannot be told apart by
    clocks.  When the wait for a CPU alone made the stall (the collector's
    pauses and the GIL's waits leave it over the threshold) and the loop
    thread ran the program's frames for a meaningful time (`RUNNING_SHARE`
    of the threshold: 50 ms at 100 ms, which a step busy for 2.5 thresholds
    gets up to about 5 runnable threads a CPU; short steps, stretched,
    measured 13 ms to 41 ms), the stall is the program's: its line held the
    loop, the machine only slowed it down.  Work of a fixed size needs no
    such rule: its CPU time does not shrink with the load, and over the
    threshold it is the program's in any case.
    """
    gil = min(breakdown.gil, breakdown.off_cpu)
    pauses = breakdown.gc if breakdown.gc_pauses < 0 else min(breakdown.gc_pauses, breakdown.gc)
    excused = {GC: pauses, STARVED: breakdown.starved, GIL: gil}
    # Collections the step's own allocations trigger (json.loads of a large
    # body runs hundreds, a few of them full) leave its own work over the
    # threshold: that is the step's doing; one long pause in a short step is not.
    own = breakdown.wall - sum(excused.values())
    own_cpu = max(breakdown.cpu - max(breakdown.gc, 0.0), 0.0)
    stretched = program_line and breakdown.wall - pauses - gil >= threshold_s
    if own < threshold_s and not (stretched and own_cpu >= threshold_s * RUNNING_SHARE):
        # The collector or another thread that alone made a stall is named
        # before a busy machine that only stretched it.  Another thread's
        # collection holds the GIL the loop waits for, so its time is in
        # both shares: the GIL is named only when its wait is longer than
        # the collector's even if all of that overlapped it.  (A young
        # collection on the watchdog's own thread, 110 ms walking a fresh
        # 1.6M-item list, beside a worker's 760 ms sort came out `gc`:
        # 4 runs in 6 with a large heap, once in CI.)
        gc_time, gil_time = excused[GC], excused[GIL]
        if gc_time >= threshold_s and gil_time <= 2 * gc_time:
            return GC
        if gil_time >= threshold_s:
            return GIL
        return max(excused, key=lambda cause: excused[cause])
    blocking = max(breakdown.off_cpu - gil, 0.0)
    return CPU if own_cpu >= blocking else BLOCKING_IO
