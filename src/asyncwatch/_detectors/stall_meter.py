"""One loop's clocks over time, read by the watchdog thread: what held the
GIL while a wake-up of the watchdog came late, and where a stall's time went.

`stall_cause` has the clocks and turns a `Breakdown` into a cause; this
module keeps, per watched loop, the readings between two looks of the
watchdog and over a stall.  Everything here runs in the watchdog thread
but the reads `LoopProbe.tick` makes of the loop thread's clock (see
`loop_probe`): the baseline a missed deadline's look compares with.
"""

from __future__ import annotations

import collections
import sys
import threading
import time

from . import stall_cause
from .stall_cause import Breakdown, GcClock, Steal, ThreadClock

__all__ = ["Clocks", "StallMeter", "Wake", "held_from", "loop_busy", "mark_at"]


class Clocks:
    """What the watchdog reads at a look at a running loop.

    *loop_wait* is None where the kernel does not say; *foreign* is the GIL
    held by other threads so far (late wake-ups).  *own_cpu* is the CPU time
    of the thread that read these clocks (the watchdog's, but for the clocks
    a parked loop's first look compares with), and *reader* that thread:
    the process's CPU time includes our own reads.  *steal* is read by the
    watchdog's looks only (two more reads of /proc); None in the loop's own
    ticks and where unknown.

    A slots class, not a NamedTuple: a NamedTuple costs about 30 objects
    that every full collection of the program walks again (issue 15).
    """

    __slots__ = (
        "foreign",
        "gc",
        "loop_cpu",
        "loop_slices",
        "loop_wait",
        "own_cpu",
        "process_cpu",
        "reader",
        "steal",
        "wall",
    )

    def __init__(
        self,
        wall: float,
        loop_cpu: float,
        loop_wait: float | None,
        process_cpu: float,
        gc: float,
        foreign: float,
        own_cpu: float = 0.0,
        reader: int = 0,
        steal: Steal | None = None,
        loop_slices: int | None = None,
    ) -> None:
        self.wall = wall
        self.loop_cpu = loop_cpu
        self.loop_wait = loop_wait
        self.process_cpu = process_cpu
        self.gc = gc
        self.foreign = foreign
        self.own_cpu = own_cpu
        self.reader = reader
        self.steal = steal
        self.loop_slices = loop_slices


def _waited_for_the_gil(before: int | None, after: int | None, held: float) -> bool:
    """Whether the loop thread, between two counts of its runs on a CPU,
    may have waited for a GIL another thread held for *held* seconds: a
    thread waiting for the GIL wakes every switch interval to ask for it
    (CPython's ``take_gil``), one that sleeps or blocks in a system call
    once.  Unknown counts (no schedstat) say it may."""
    if before is None or after is None:
        return True
    return after - before >= max(3, held / sys.getswitchinterval() / 4)


def loop_busy(prev: Clocks, clocks: Clocks) -> float:
    """How long the loop thread ran, or waited for a CPU while runnable
    (preempted holding the GIL, where the kernel says), between two readings."""
    busy = clocks.loop_cpu - prev.loop_cpu
    if clocks.loop_wait is not None and prev.loop_wait is not None:
        busy += clocks.loop_wait - prev.loop_wait
    return busy


def held_from(prev: Clocks, clocks: Clocks, due: float) -> float:
    """When a step seen by a late look began, given *due*, when the wake-up
    was due: earlier where the loop thread has been busy since before then,
    but never before *prev* was read (the last tick, or a look that saw the
    loop elsewhere: the step began after).  A wake-up is due a deadline
    after the last tick, so a step that began right after a tick was dated
    10 ms late by *due* alone."""
    return min(due, max(prev.wall, clocks.wall - loop_busy(prev, clocks)))


def others_cpu(prev: Clocks, clocks: Clocks) -> float:
    """CPU time the process's other threads (neither the loop's nor ours)
    used between two readings.  Our own counted as another thread's made a
    watchdog late only by waiting for a CPU (a sleeping loop on a loaded
    machine) look like it waited for the GIL: cause gil, the sleep's line
    never blamed."""
    used = (clocks.process_cpu - prev.process_cpu) - (clocks.loop_cpu - prev.loop_cpu)
    if clocks.reader == prev.reader:
        used -= clocks.own_cpu - prev.own_cpu
    return max(used, 0.0)


class Wake:
    """How late a wake-up of the watchdog came (`raw`), and, read only when
    asked (the read releases the GIL), less its own wait for a CPU."""

    __slots__ = ("_before", "_clock", "_late", "head", "known", "raw")

    def __init__(
        self,
        raw: float,
        clock: ThreadClock | None = None,
        before: tuple[float, int] | None = None,
        head: float = 0.0,
    ) -> None:
        self.raw = raw
        #: For a wake-up by a missed deadline: the least time between the
        #: loop's last tick and the deadline (half of it).  A step that began
        #: with the tick (a timer's callback, run in the same iteration) was
        #: already that old when the wake-up was due, where a look on the
        #: fixed clock came anywhere from 0 to one interval into it: the
        #: hold the wake-up was late for is looked into from this much less
        #: lateness (a first sort of 30 ms after a timer, late 20-25 ms,
        #: was never dated with a gate of 25: the step went unreported).
        self.head = head
        self._clock = clock
        self._before = before
        self._late: float | None = None
        self.known = False

    def late(self) -> float:
        if self._late is None:
            after = self._clock.waits() if self._clock is not None else None
            before = self._before
            self.known = before is not None and after is not None
            if before is not None and after is not None:
                # All of our waits for a CPU: a hand-off of the GIL takes
                # three runs of ours (the wake-up, take_gil's timed-out wait
                # that asks for it, the signal once it is let go), and the
                # loop thread waits for us after it lets go, so no share of
                # them can be told to have passed while someone held it.
                self._late = max(self.raw - (after[0] - before[0]), 0.0)
            else:
                self._late = self.raw
        return self._late


def _gate(threshold_s: float) -> float:
    """How late a wake-up must be for a hold of the GIL to be looked into:
    longer than a few switch intervals (the hand-off's own delay)."""
    return max(threshold_s / 4, 4 * sys.getswitchinterval())


class StallMeter:
    """The loop thread's clocks as the watchdog reads them, and the other
    threads' when they matter.  Holds numbers and thread ids only: never
    the loop, a frame or a task."""

    def __init__(self, gc_clock: GcClock) -> None:
        self.gc_clock = gc_clock
        self.clock: ThreadClock | None = None
        self.clock_ident: tuple[int, int | None] | None = None
        self.prev: Clocks | None = None  # at the previous look
        self.mark: Clocks | None = None  # when the followed callback was first seen
        self.foreign = 0.0  # total GIL hold by other threads seen by late wake-ups
        self.others_before: dict[int, float] = {}  # other threads' CPU, when last busy
        #: Each foreign hold: (`foreign` after it, the thread named, its length).
        self.holds: collections.deque[tuple[float, str | None, float]] = collections.deque(maxlen=64)
        self.stall_threads: dict[int, float] = {}  # other threads' CPU at the stall's capture
        self.stall_waits: float | None = None  # other threads' run-queue wait then (library-only stalls)
        #: The other threads' CPU clocks and names, read by a late wake-up
        #: before anything of ours let the GIL go (`glance`).
        self.glanced: tuple[dict[int, float], dict[int, str]] | None = None
        #: No longer watched (`retire`): a look still in progress reads with
        #: a clock it closes at once, never one left open.
        self.retired = False

    def glance(self, thread_id: int, late: float, threshold_s: float) -> None:
        """A late wake-up, holding the GIL since it took it: read the other
        threads' CPU clocks now (no read here lets the GIL go), for
        `late_hold` to name the one that held the GIL.  Read later, after a
        clock read of ours let the program run, a worker that ended right
        after its hold was gone, and no thread was named (a test's
        regex-worker, 1 run in 4 on a loaded machine)."""
        self.glanced = None
        if late >= _gate(threshold_s):
            skip = (thread_id, threading.get_ident())
            names = {t.ident: t.name for t in threading.enumerate() if t.ident is not None and t.ident not in skip}
            self.glanced = (stall_cause.threads_cpu(skip), names)

    def forget(self) -> None:
        """The loop stopped: the next run's clocks start with its first look."""
        self.prev = None

    def retire(self) -> ThreadClock | None:
        """The loop is no longer watched: its clock, for the watchdog to close."""
        clock, self.clock = self.clock, None
        self.clock_ident = None
        self.prev = self.mark = None
        self.retired = True
        return clock

    def forget_after_fork(self) -> None:
        if self.clock is not None:  # names the parent's loop thread
            self.clock.forget_after_fork()
        self.clock = None
        self.prev = self.mark = None

    def read(self, now: float, thread_id: int, native_id: int | None) -> Clocks:
        """The loop thread's clocks now (see `stall_cause`)."""
        if self.clock is None or self.clock_ident != (thread_id, native_id):
            if self.clock is not None:
                self.clock.close()
            self.clock = ThreadClock(thread_id, native_id)
            self.clock_ident = (thread_id, native_id)
            self.prev = self.mark = None
            self.others_before = stall_cause.threads_cpu((thread_id, threading.get_ident()))
        cpu, wait = self.clock.read()
        slices = self.clock.slices
        steal = self.clock.steal()
        if self.retired:
            self.clock.close()
            self.clock = None
        own = time.thread_time()
        return Clocks(
            now,
            cpu,
            wait,
            time.process_time(),
            self.gc_clock.read(now, thread_id, cpu),
            self.foreign,
            own,
            threading.get_ident(),
            steal,
            slices,
        )

    def note_others(self, prev: Clocks | None, clocks: Clocks, thread_id: int) -> None:
        """Other threads are busy: keep their CPU clocks, so that one that
        takes the GIL next can be named (only then: ~1 us a thread)."""
        if prev is None:
            return
        if others_cpu(prev, clocks) > (clocks.wall - prev.wall) / 4:
            self.others_before = stall_cause.threads_cpu((thread_id, threading.get_ident()))

    def late_hold(
        self, prev: Clocks | None, clocks: Clocks, wake: Wake | None, thread_id: int, threshold_s: float
    ) -> str | None:
        """Who held the GIL while this wake-up was late: "loop", "gc",
        "foreign" (another thread; added to `foreign`, its name to
        `holder`), or None (not late, or cannot tell)."""
        gate = _gate(threshold_s)
        glanced, self.glanced = self.glanced, None
        if wake is None or prev is None or wake.raw + wake.head < gate:
            return None
        late = wake.late()
        gc_held = clocks.gc - prev.gc
        # A collection still running on the loop thread counts its CPU time
        # in the clocks (`GcClock.read`); it kept the GIL from us for its
        # wall time, preempted or not.
        gc_held += max(
            self.gc_clock.read(clocks.wall) - self.gc_clock.read(clocks.wall, thread_id, clocks.loop_cpu), 0.0
        )
        if gc_held >= late / 2:
            return "gc"
        if self.loop_held(prev, clocks, wake):
            return "loop"
        others = others_cpu(prev, clocks)
        # Another thread held the GIL only if the wake-up was late by more
        # than our own waits for a CPU (a loaded machine delays us by tens of
        # milliseconds while the loop thread sleeps with the GIL let go).
        if wake.known and late >= gate / 2 and others >= late / 4:
            # The whole wait, ours for a CPU included: the holder kept the
            # GIL until we took it, and the loop could not have it before.
            hold = max(wake.raw - loop_busy(prev, clocks), 0.0)
            self.foreign += hold
            if glanced is None:
                skip = (thread_id, threading.get_ident())
                glanced = (stall_cause.threads_cpu(skip), {})
            now_cpu, names = glanced
            holder, _ = stall_cause.busiest_thread(self.others_before, now_cpu, names)
            self.holds.append((self.foreign, holder, hold))
            self.others_before = now_cpu
            return "foreign"
        return None

    @staticmethod
    def loop_held(prev: Clocks | None, clocks: Clocks, wake: Wake | None) -> bool:
        """Whether the loop thread held the GIL through this wake-up's
        lateness, however short: under `late_hold`'s gate a hold is no
        stall's cause, but it is time the step seen had run (`LoopProbe`
        dates it back)."""
        if wake is None or prev is None:
            return False
        # Only the thread holding the GIL runs Python: the loop thread ran
        # more than all the others together.  (A thread waiting for the GIL
        # wakes every switch interval to ask for it, so on a loaded machine
        # it waits in the run queue too: its wait alone proves nothing.)
        # Without the run-queue wait, a watchdog that waited for a CPU looks
        # late too: ask the loop thread to have run almost all the time.
        return clocks.loop_cpu - prev.loop_cpu >= others_cpu(prev, clocks) and loop_busy(
            prev, clocks
        ) >= wake.late() * (0.5 if wake.known else 0.8)

    def holder_since(self, foreign: float) -> str | None:
        """The thread named for the most GIL time held since `foreign` was
        *foreign*: a short hold that came later (a pool's new thread
        starting as the stall ends) never renames the one that made it."""
        held: dict[str | None, float] = {}
        for after, name, hold in list(self.holds):
            if after > foreign:
                held[name] = held.get(name, 0.0) + hold
        return max(held, key=lambda name: held[name]) if held else None

    def captured(self, thread_id: int | None, native_id: int | None, library_only: bool) -> None:
        """A stall was just captured: the other threads' clocks, to name the
        one that ran meanwhile (and, for a wait inside the library, their
        waits for a CPU)."""
        if thread_id is not None:
            self.stall_threads = stall_cause.threads_cpu((thread_id, threading.get_ident()))
        if library_only:
            self.stall_waits = stall_cause.tasks_wait((native_id, threading.get_native_id()))

    def breakdown(
        self, library_only: bool, end: float, thread_id: int | None, native_id: int | None
    ) -> tuple[Breakdown | None, str | None]:
        """Where the stall's time went since `mark`, and the other thread
        that ran most meanwhile."""
        mark, clock = self.mark, self.clock
        if mark is None or clock is None:
            return None, None
        cpu, wait = clock.read()
        loop_cpu = cpu - mark.loop_cpu
        others = time.process_time() - mark.process_cpu - loop_cpu
        if mark.reader == threading.get_ident():
            others = max(others - (time.thread_time() - mark.own_cpu), 0.0)
        starved = wait - mark.loop_wait if wait is not None and mark.loop_wait is not None else 0.0
        wall = end - mark.wall
        stolen = 0.0
        if mark.steal is not None:
            steal = clock.steal()
            if steal is not None:
                # The hypervisor's wait for a CPU is the machine's as the
                # run queue's is, and comes out of the time off CPU only.
                stolen = min(steal.since(mark.steal), max(wall - loop_cpu - starved, 0.0))
                starved += stolen
        gil = self.foreign - mark.foreign
        holder = self.holder_since(mark.foreign) if gil > 0 else None
        off_cpu = wall - loop_cpu - starved
        if library_only and off_cpu >= wall / 2:
            # Waiting inside asyncio or the standard library for other threads
            # (a new executor thread that must get the GIL from busy ones, or
            # a CPU on a loaded machine): no line of the program.  Theirs is
            # the time they ran (the GIL) or waited for a CPU.
            waits = None
            if self.stall_waits is not None:
                now_waits = stall_cause.tasks_wait((native_id, threading.get_native_id()))
                waits = now_waits - self.stall_waits if now_waits is not None else None
            if waits is not None and waits >= off_cpu / 2 and waits > others:
                starved = max(starved, off_cpu)
            elif others >= off_cpu / 4 or (waits is not None and others + waits >= off_cpu / 2):
                gil = max(gil, off_cpu)
                after = stall_cause.threads_cpu((thread_id, threading.get_ident()))
                holder, _ = stall_cause.busiest_thread(self.stall_threads, after)
        # A collection in progress at the mark counted its CPU time so far
        # on the loop thread, its wall time on another thread (`GcClock.read`),
        # and its CPU time once over: never less than none.
        gc_time = max(self.gc_clock.read(end, thread_id, cpu) - mark.gc, 0.0)
        pauses = self.gc_clock.pauses_since(mark.wall, end, GcClock.PAUSE_FLOOR_S, thread_id, cpu)
        if thread_id is not None:
            counted, held = self.gc_clock.others_since(mark.wall, end, thread_id)
            if held > 0 and not _waited_for_the_gil(mark.loop_slices, clock.slices, held):
                # Another thread's collection, while the loop thread slept
                # or blocked on its own: a loop sleeping 300 ms beside a
                # 270 ms collection elsewhere came out `gc`, no line.
                gc_time, pauses = max(gc_time - counted, 0.0), max(pauses - counted, 0.0)
            elif held > counted:
                # The collection held the GIL for its wall time, its thread's
                # waits for a CPU included: at load 3, 110 ms of CPU in 218 ms
                # left the rest as the loop's own time off CPU (cause
                # blocking_io, at the line after which it asked for the GIL
                # back).  Only time the loop thread was off CPU can have been
                # such a wait: a step hashing beside it, on CPU with the GIL
                # let go, came out `gc` (3.12, uvloop, in a loaded run).
                extra = min(held - counted, max(off_cpu - gil, 0.0))
                gc_time, pauses = gc_time + extra, pauses + extra
        return Breakdown(wall, loop_cpu, max(starved, 0.0), gc_time, gil, others, pauses, stolen), holder


def mark_at(prev: Clocks, clocks: Clocks, since: float, fresh_s: float, held: bool = True) -> Clocks:
    """The clocks a late stall's breakdown starts from: the previous look's,
    or, when that look is older than *fresh_s* (the loop's first step,
    compared with clocks read while it was parked), the clocks now taken back
    to *since*.

    Over that span the loop thread ran, waited for a CPU or, unless *held*
    (the late wake-up waited for the loop thread's own hold of the GIL), waited
    for the GIL or slept; two readings cannot say which part came before
    *since*.  Its wait counted is what cannot have (no more of it than the
    time between the readings could), and, held, what the CPU time measured
    leaves of the span, never more than was measured; its CPU time is the
    rest of the span, up to what was measured.  Taken back with no wait, as
    it was, a first step's json.loads that a loaded machine stretched to
    0.86 s, 0.69 s of it in the run queue, kept 0.67 s as time off CPU: cause
    blocking_io and advice to use a thread (two CPU burners; the parked
    loop's clocks read 21 ms before the step).  A wait before *since* (the
    loop thread outside its loop on a loaded machine) is never the stall's,
    and the CPU time never takes the place of a wait that is: a step the
    machine starved stays starved.
    """
    if prev.wall >= since - fresh_s:
        if prev.steal is None and clocks.steal is not None:
            # A tick's clocks (no steal read): the steal from this look on.
            prev = Clocks(
                prev.wall,
                prev.loop_cpu,
                prev.loop_wait,
                prev.process_cpu,
                prev.gc,
                prev.foreign,
                prev.own_cpu,
                prev.reader,
                clocks.steal,
                prev.loop_slices,
            )
        return prev
    span = max(clocks.wall - since, 0.0)
    before = max(since - prev.wall, 0.0)
    ran = max(clocks.loop_cpu - prev.loop_cpu, 0.0)
    loop_wait = clocks.loop_wait
    waited = 0.0
    if loop_wait is not None and prev.loop_wait is not None:
        measured = max(loop_wait - prev.loop_wait, 0.0)
        waited = max(measured - before, span - ran if held else 0.0, 0.0)
        waited = min(waited, measured, span)
        loop_wait -= waited
    loop_cpu = min(ran, span - waited)
    gc_time = min(clocks.gc - prev.gc, span)
    return Clocks(
        since,
        clocks.loop_cpu - loop_cpu,
        loop_wait,
        clocks.process_cpu - loop_cpu,
        clocks.gc - gc_time,
        prev.foreign,
        clocks.own_cpu,
        clocks.reader,
        clocks.steal,  # what was stolen before this look: unknown, none counted
        # Its runs on a CPU since are unknown: the previous look's count
        # makes more of them, and another thread's collection is counted
        # as the loop's wait (`breakdown`), as it was before they were read.
        prev.loop_slices,
    )
