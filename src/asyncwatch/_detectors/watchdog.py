"""The watchdog thread: one daemon thread, shared by every watched loop,
that looks at each loop's `LoopProbe` and sleeps until the next look is due.

It takes the GIL only to look.  While a loop turns, its ticks push back its
`Deadline` and the thread sleeps in ``poll(2)`` (`deadline.Alarm`) until
one passes: a healthy loop is never looked at (issue 15).  A loop without a
deadline (no timerfd; a test loop's own clock) is looked at every
``threshold / LOOKS_PER_THRESHOLD`` while it is busy, as is one whose
deadline passed until it ticks again.  A loop starting to run, or a
heartbeat ending a stall, wakes the thread at once.  How late each wake-up
came is measured: a long C call on the loop thread holds the GIL, so the
wake-up due during it arrives when the call returns, late by about the
call's length (issue 12), and the probe dates the stall from when the
wake-up was due.
"""

from __future__ import annotations

import _thread
import gc
import sys
import threading
import time
from collections.abc import Callable
from types import FrameType

from .._core import loops
from .._core.findings import Finding, import_timestamps
from .._core.runtime import (
    HiddenThread,
    ShuttingDown,
    in_forked_child,
    report_internal_error,
    start_hidden_thread,
)
from .deadline import Alarm, Deadline
from .loop_probe import Look, LoopProbe
from .outbox import Outbox
from .stall_cause import GcClock, ThreadClock
from .stall_meter import Wake

__all__ = ["Watchdog"]

_now = time.perf_counter
#: The longest an exit waits for a look in progress (a look takes a few
#: milliseconds; its clock reads wait for a CPU on a loaded machine).
_FLUSH_WAIT_S = 1.0


if sys.version_info < (3, 11, 9):

    def _current_frames() -> dict[int, FrameType]:
        """``sys._current_frames()`` without gh-106883's deadlock.

        Before 3.11.9 it holds the runtime's thread-list lock while it makes
        frame objects; a collection triggered by one of those allocations
        that frees a ``threading.local`` (an event-loop policy's, say) takes
        the same lock and hangs the whole process.  CPython's own fix turns
        the collector off for the call; so do we, unless it is already off.
        """
        if not gc.isenabled():
            return sys._current_frames()
        gc.disable()
        try:
            return sys._current_frames()
        finally:
            gc.enable()

else:
    _current_frames = sys._current_frames


class Watchdog:
    """One daemon thread sampling every registered `LoopProbe`."""

    def __init__(self) -> None:
        self._probes: list[LoopProbe] = []
        self._lock = threading.Lock()
        self._wake = Alarm()
        #: Deadlines of loops no longer watched, closed by the watchdog
        #: thread (it may be polling them; a number closed under poll(2)
        #: and reused by the program must never be read or waited on).
        self._retired: list[Deadline | ThreadClock] = []
        self._thread: HiddenThread | None = None
        self._stopping = False
        self._woken_at = 0.0  # when a loop starting to run last woke us
        self._done_looking = threading.Event()  # clear while a look is in progress
        self._done_looking.set()
        #: Time spent in garbage collection (installed by the detector).
        self.gc_clock = GcClock()
        #: Told when sampling fails (the detector disables itself through the
        #: engine); without one, the error is reported here.
        self.on_failure: Callable[[Exception], None] | None = None
        #: What a look found, reported off the watchdog thread (`outbox`).
        self._outbox = Outbox()
        #: The last look found a loop in a step, or following a stall.
        self._in_a_step = False
        in_forked_child(self, Watchdog._after_fork)

    def add(self, probe: LoopProbe) -> None:
        probe.wake = self._wake_up
        probe.nudge = self._nudge
        probe.emit = self._reported_off_the_watchdog(probe.emit)
        with self._lock:
            self._probes.append(probe)
            self._ensure_thread()
        self._wake.set()

    def remove(self, probe: LoopProbe) -> None:
        # A look in progress settles first, with the clocks it compares
        # with: retired under it, they were gone when it read them, and a
        # stall it had just seen went unreported.  The engine detaches its
        # loops at exit before the watchdog's flush (a program whose last
        # step held the GIL in sorted() for 0.4 s, then returned: 1 run in
        # 12 on 3.12/uvloop, most runs beside a busy process).
        self._wait_for_a_look()
        with self._lock:
            probe.enabled = False
            if probe in self._probes:
                self._probes.remove(probe)
            # Its descriptors: the deadline, and the loop thread's clock (one
            # schedstat file a loop, left open for ever before).
            deadline, probe.deadline = probe.deadline, None
            retired: list[Deadline | ThreadClock] = [deadline] if deadline is not None else []
            clock = probe.meter.retire()
            if clock is not None:
                retired.append(clock)
            self._retired.extend(retired)
        if retired:
            thread = self._thread
            if thread is None or thread.ident == threading.get_ident() or not thread.is_alive():
                self._close_retired()
            else:
                self._wake.set()
        # A stall a heartbeat ended just before the loop closed is reported
        # here if the watchdog thread has not yet (or waited for, if it has begun).
        try:
            probe.finish(_now())
        except Exception as exc:
            self._failed(exc)
        probe.seen = None
        self._outbox.drain()  # what a look of ours found is out before the loop is let go

    def flush(self) -> None:
        """Report any stall in progress now (at exit or uninstall).

        A look in progress is waited for first (a bounded wait, which lets
        the GIL go): a late look captures a stall, then reads clocks before
        it records it, and a program that ended meanwhile (a task's last
        step held the GIL in sorted(), then the program returned) exited
        with that stall unreported, 1 run in 3 on 3.12 at load 9."""
        self._wait_for_a_look()
        now = _now()
        for probe in list(self._probes):
            try:
                probe.finish(now)
            except Exception as exc:
                self._failed(exc)
        self._outbox.drain()

    def _reported_off_the_watchdog(self, emit: Callable[[Finding], None]) -> Callable[[Finding], None]:
        """*emit*, which from the watchdog thread queues the finding for the
        outbox's thread (`outbox`); from any other thread it reports at once."""

        def emit_finding(finding: Finding) -> None:
            thread = self._thread
            if thread is not None and thread.ident == _thread.get_ident():
                self._outbox.put(emit, finding, _now())
            else:
                emit(finding)

        return emit_finding

    def _wait_for_a_look(self) -> None:
        """Wait, a bounded time, for a look in progress to settle (never
        from the watchdog thread itself, whose look it would be)."""
        thread = self._thread
        if thread is not None and thread.ident != threading.get_ident():
            self._done_looking.wait(_FLUSH_WAIT_S)

    def stop(self) -> None:
        with self._lock:
            self._stopping = True
            thread = self._thread
            self._thread = None
        self._wake.set()
        if thread is not None:
            thread.join(timeout=1.0)
        self.flush()
        self._outbox.stop()
        for probe in list(self._probes):
            self.remove(probe)
        with self._lock:
            self._stopping = False
        if thread is None or not thread.is_alive():
            self._close_retired()
            self._wake.close()

    def _close_retired(self) -> None:
        with self._lock:
            retired, self._retired = self._retired, []
        for item in retired:
            item.close()

    def _failed(self, exc: Exception) -> None:
        on_failure = self.on_failure
        if on_failure is not None:
            on_failure(exc)
        else:
            report_internal_error("slow-callback watchdog", exc)

    def _nudge(self) -> None:
        """Look now (loop thread: a heartbeat ended a stall for us to report)."""
        self._wake.set()

    def _wake_up(self) -> None:
        """A parked probe's loop started running (loop thread)."""
        if self._thread is None:  # a forked child that had no loop running
            with self._lock:
                if self._probes and not self._stopping:
                    self._ensure_thread()
        self._woken_at = _now()
        self._wake.set()

    def _ensure_thread(self) -> None:
        if self._thread is None or not self._thread.is_alive():
            if self._wake.closed:  # stopped before: a new thread sleeps on a new alarm
                self._wake = Alarm()
            # Here, on the thread watching a loop, not in the watchdog's look.
            import_timestamps()
            self._outbox.start()
            # Its first look is late if the loop's first step holds the GIL.
            self._woken_at = _now()
            try:
                self._thread = start_hidden_thread(self._run, "asyncwatch-watchdog")
            except ShuttingDown:
                # A loop an exit function runs on 3.12: not watched for
                # blocking (README, Limits), and nothing to say about it.
                self._thread = None

    def _after_fork(self) -> None:
        """In a forked child: only the thread that called fork() survives.

        The watchdog thread is gone, and a lock or event some parent thread
        held at that moment stays held forever: make them all new.  A loop
        that was running is the parent's: its thread is gone, or, for the
        thread that forked, asyncio no longer sees it as running (its running
        loop is per process); stop watching it.  No thread starts here: a
        loop the child runs (an inherited one that was not running wakes its
        parked probe, a new one is added) starts one then.
        """
        self._lock = threading.Lock()
        # What the parent's watchdog found is the parent's to report.
        self._outbox = Outbox()
        # The parent's eventfd and timers, shared with it: pushed or written
        # here, they would move the parent's deadlines or wake its watchdog.
        self._wake.close(forked=True)
        self._wake = Alarm()
        for deadline in self._retired:
            deadline.close()
        self._retired = []
        self._done_looking = threading.Event()
        self._done_looking.set()
        self._thread = None
        self._stopping = False
        kept: list[LoopProbe] = []
        for probe in self._probes:
            probe._stall_lock = threading.Lock()
            probe.meter.forget_after_fork()
            probe.wake = self._wake_up
            probe.nudge = self._nudge
            # What the parent's watchdog was following is the parent's to report.
            probe.held = None
            probe.tentative = None
            probe.stall = None
            inherited, probe.deadline = probe.deadline, None
            if inherited is not None:
                inherited.close()
            loop = probe.loop_ref()
            if loop is None or loops.is_closed(loop) or loops.is_running(loop) or not probe.enabled:
                probe.enabled = False
                continue
            if inherited is not None:  # a timer of the child's own (its ticks, inherited, push it)
                probe.deadline = Deadline.open(inherited.after)
            # Parked, with a heartbeat queued, so that the child running it wakes us.
            probe.parked = True
            if not probe.beat_pending:
                probe.beat_pending = True
                loops.call_soon(loop, probe.beat)
            kept.append(probe)
        self._probes = kept

    def _run(self) -> None:
        me = _thread.get_ident()  # not threading.current_thread(): that would register us
        # Our clock is opened after the first look: opening it releases the
        # GIL, and a loop whose first step held the GIL since we started
        # would move on from that step before we looked (3.12, loaded: the
        # first step's json.loads went unreported one run in six).
        own: ThreadClock | None = None
        wake = Wake(max(_now() - self._woken_at, 0.0))
        try:
            while True:
                # Cleared before looking, so a wake-up that comes while we sample
                # is never lost: the wait below then returns at once.
                self._wake.clear()
                with self._lock:
                    if self._stopping or self._thread is None or self._thread.ident != me:
                        return
                    has_probes = bool(self._probes)
                if not has_probes:
                    self._close_retired()
                    self._outbox.send(_now(), quiet=True)
                    self._wake.wait(None, [])
                    wake = Wake(0.0)
                    continue
                # Our own run-queue wait as the look begins: a look taken at
                # once after it (below) is late by the time since, less that.
                at_look = own.waits() if own is not None else None
                sampled = self._sample_all(wake)
                del wake
                if sampled is None:
                    return
                delay, deadlines, following, looked = sampled
                # Closed after the look, never between a wake-up and it:
                # os.close lets the GIL go, and a loop thread that was
                # waiting for it to return from a long C call moved on
                # from the line, ended its step and stopped its loop before
                # the look (a first step's json.loads of 3x the threshold,
                # unreported 1 run in 10 on 3.12).
                if self._retired:
                    self._close_retired()
                if own is None:
                    own = ThreadClock(threading.get_ident(), threading.get_native_id(), steal=False)
                began = _now()
                overdue = self._overdue(began, looked, delay)
                if overdue is not None:
                    # The next look fell due during our own work since this
                    # one, well past it: taken now, late by the time since.
                    # That work lets the GIL go (asyncio's call_soon_threadsafe
                    # writes to a socket; a finding's first report reads
                    # files; Python work past the switch interval), and a loop
                    # thread waiting for it runs on: six tasks each summing a
                    # large list, back to back, gave two findings, one of them
                    # three steps long, as the look after a wait saw a step
                    # two holds on (3.11-3.13, both loops).  Looked at now,
                    # the loop thread is where the hold let the GIL go.
                    wake = Wake(overdue, own, at_look)
                    continue
                delay = self._send_findings(began, delay)
                waited = own.waits()
                passed = self._wake.wait(delay, deadlines, following)
                # How late this wake-up came: the GIL held by someone, or no
                # CPU free (our own run-queue wait, subtracted when asked).
                now = _now()
                head = 0.0
                if passed:
                    # Due when the earliest deadline passed (a tick since
                    # moved it on: not late).  Marked seen with no read of
                    # the timer, which would let the GIL go before the look:
                    # the next tick re-arms it and clears its expiry.
                    due = min(deadline.due for deadline in passed)
                    head = min(deadline.tick_every for deadline in passed)
                    for deadline in passed:
                        deadline.passed()
                else:
                    due = began + delay if delay is not None else now
                late = now - due
                if self._woken_at > looked:
                    # Woken by a loop that started to run after our look
                    # (its first heartbeat), whose first step may have held
                    # the GIL since.  Compared with the look, not with when
                    # we began to sleep: the look's clock reads and our own
                    # clock's opening let the GIL go, the loop's first
                    # callbacks run then, and a first step's json.loads
                    # that began there kept us from sleeping until it
                    # returned: dated from after it, the wake-up looked on
                    # time and the step went unreported (2 runs in 30 of
                    # the first-step test on uvloop, under load).
                    late = max(late, now - self._woken_at)
                del passed, deadlines
                wake = Wake(max(late, 0.0), own, waited, head)
        finally:
            if own is not None:
                own.close()

    @staticmethod
    def _overdue(began: float, looked: float, delay: float | None) -> float | None:
        """How late the next look is already, if well past due (`_run`)."""
        if delay is None:
            return None
        overdue = began - looked - delay
        return overdue if overdue >= max(delay, 2 * sys.getswitchinterval()) else None

    def _send_findings(self, now: float, delay: float | None) -> float | None:
        """Let the outbox's thread report, if the loops are quiet (`Outbox.send`);
        how long to wait: no longer than a finding held back may wait."""
        self._outbox.send(now, quiet=not self._in_a_step)
        if self._outbox.since is None:
            return delay
        return min(delay, Outbox.HOLD_S) if delay is not None else Outbox.HOLD_S

    def _sample_all(
        self, wake: Wake | None = None
    ) -> tuple[float | None, list[Deadline], tuple[Deadline, ...], float] | None:
        """Sample every probe once; return how long to sleep (None: until a
        deadline passes or we are woken), the deadlines to wait on, those
        of loops in no stall (whose stack the wait reads, `Alarm.wait`) and
        when the stacks were read, or None to stop.  A loop whose armed deadline
        will wake us needs no look on our clock (`LoopProbe.covered`).

        A method of its own so that no probe (and through it the loop's
        watch) stays referenced from the thread's locals while it sleeps:
        a closed loop's state is freed as soon as its probe is dropped.
        """
        with self._lock:
            probes = list(self._probes)
        delay: float | None = None
        frames: dict[int, FrameType] = {}
        self._done_looking.clear()
        try:
            # Only the stacks of threads running a watched loop: every frame
            # read is an object that keeps its locals, and the program runs
            # again whenever the look is made to let the GIL go.  A loop
            # closing on the main thread while we looked (at another loop, or
            # to close its timer) stayed alive through close()'s frames past
            # the program's next collection (test_install's chained hooks).
            running = {probe.running_on() for probe in probes}
            running.discard(None)
            frames = {t: f for t, f in _current_frames().items() if t in running} if running else {}
            now = _now()
            # Every stack first (nothing releases the GIL), then every clock:
            # while the reads let the loops run, we hold none of their frames
            # (a finished loop is freed by the program's next collection).
            looks: list[tuple[LoopProbe, Look]] = []
            for probe in probes:
                seen = probe.sample(frames, now, wake)
                if seen is None:
                    self.remove(probe)
                elif isinstance(seen, Look):
                    looks.append((probe, seen))
                elif not probe.covered():
                    delay = seen if delay is None else min(delay, seen)
            frames.clear()
            self._in_a_step = any(not look.idle for _, look in looks) or any(p.stall is not None for p in probes)
            for probe, look in looks:
                seen = probe.settle(look, now, wake)
                if not probe.covered():
                    delay = seen if delay is None else min(delay, seen)
            deadlines = [p.deadline for p in probes if p.deadline is not None and p.deadline.armed]
            # Every loop's: a look on our clock at a loop not yet seen busy
            # (its deadline not yet armed, the step begun before its ticks
            # did) may wait for the GIL as much as one after a deadline.
            following = tuple(p.deadline for p in probes if p.deadline is not None and p.stall is None)
        except Exception as exc:
            self._failed(exc)
            with self._lock:
                for probe in self._probes:
                    probe.enabled = False
                self._probes.clear()
            return None
        finally:
            # The dict holds this thread's own frame, which holds the dict:
            # a cycle that would keep every thread's frames, and their
            # locals, alive until the next collection.
            frames.clear()
            self._done_looking.set()
        return delay, deadlines, following, now
