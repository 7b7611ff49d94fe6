"""How the watchdog sleeps without waking on a healthy loop (issue 15).

A watchdog that looks at a busy loop on a fixed clock takes the GIL from it
at every look, and the hand-offs, not the looks' own work, cost the loop
5-11 % of its wall time (``benchmarks/run.py --modes plain
asyncwatch-watchdog``: 1.11x producer/consumer, 1.065x call_soon, 15
rounds, quiet machine).  Instead each loop proves it is turning: a timer of
its own (`LoopProbe.tick`) pushes back a `Deadline`, a Linux timerfd, that
the watchdog waits on with ``poll(2)``, holding no GIL.  The kernel wakes
the watchdog only when the loop missed its deadline: a step has held the
loop since the tick before it, which is exactly when a look is worth its
GIL.  A step is first seen at most one deadline after it began, as it was
with a look every ``threshold / LOOKS_PER_THRESHOLD``.

The loop pays a timer callback every half deadline (about 6 us: a
``timerfd_settime`` through ctypes' ``PyDLL``, which keeps the GIL, three
clock reads and one of its schedstat file); an idle loop wakes from its
selector for it, which costs less than the watchdog's looks did.  Where
there is no timerfd (not Linux), or a loop's clock or timers are not the
stock ones (a test loop with a virtual clock, a mocked ``call_at``: the
tick would change what the loop schedules), the watchdog looks on its
fixed clock as before.

`Alarm` is the watchdog's sleep: woken by another thread (`Alarm.set`), a
timeout, or a deadline that passed.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import os
import select
import sys
import threading
from typing import Any

__all__ = ["Alarm", "Deadline", "deadlines_supported", "thread_state", "ticks_safely"]

_CLOCK_MONOTONIC = 1  # the clock time.perf_counter reads on Linux
_TFD_NONBLOCK = os.O_NONBLOCK
_TFD_CLOEXEC = os.O_CLOEXEC

_timerfd: tuple[Any, Any, Any] | None = None  # (create, settime, itimerspec type)
_tried = False
#: Writes 1 to an eventfd keeping the GIL (loaded with the timerfd functions).
_eventfd_add_one: Any = None


_peek_loaded = False
_peek: Any = None


def _peek_module() -> Any:
    """``_core/_peek``, or None (see `peeked.module`); loaded with the
    first wait, not at ``import asyncwatch``."""
    global _peek_loaded, _peek
    if not _peek_loaded:
        _peek_loaded = True
        from .peeked import module

        _peek = module()
    return _peek


def thread_state() -> int:
    """The calling thread's state, for `Alarm.wait` to read its stack by;
    0 where the stack cannot be read."""
    peek = _peek_module()
    return int(peek.thread_state()) if peek is not None else 0


def _timerfd_functions() -> tuple[Any, Any, Any] | None:
    """``timerfd_create`` and ``timerfd_settime`` through ``PyDLL`` (the GIL
    kept over the call: letting it go from the loop thread would hand it to
    any thread waiting), or None.  Loaded when the first loop is watched,
    not at ``import asyncwatch`` (ctypes adds ~550 objects to the heap the
    collector walks)."""
    global _timerfd, _tried, _eventfd_add_one
    if _tried:
        return _timerfd
    _tried = True
    if not sys.platform.startswith("linux"):
        return None
    try:
        import ctypes

        libc = ctypes.PyDLL(None, use_errno=True)
        create, settime = libc.timerfd_create, libc.timerfd_settime
    except (ImportError, OSError, AttributeError):
        return None

    class Timespec(ctypes.Structure):
        _fields_ = (("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long))

    class Itimerspec(ctypes.Structure):
        _fields_ = (("it_interval", Timespec), ("it_value", Timespec))

    create.restype = ctypes.c_int
    create.argtypes = (ctypes.c_int, ctypes.c_int)
    with contextlib.suppress(AttributeError):
        write = libc.write
        write.restype = ctypes.c_ssize_t
        write.argtypes = (ctypes.c_int, ctypes.c_void_p, ctypes.c_size_t)
        one = ctypes.c_uint64(1)
        address = ctypes.addressof(one)

        def add_one(fd: int, _one: Any = one) -> None:  # _one: kept alive with the function
            write(fd, address, 8)

        _eventfd_add_one = add_one
    settime.restype = ctypes.c_int
    settime.argtypes = (ctypes.c_int, ctypes.c_int, ctypes.POINTER(Itimerspec), ctypes.c_void_p)
    _timerfd = (create, settime, Itimerspec)
    return _timerfd


def deadlines_supported() -> bool:
    return _timerfd_functions() is not None


def ticks_safely(loop: asyncio.AbstractEventLoop) -> bool:
    """Whether a timer of ours on *loop* changes nothing but when its selector
    wakes: the stock clock and timers of asyncio's selector loops and of
    uvloop.  A subclass that overrides them (CPython's test loop, whose
    clock a generator drives and checks every timer against; a virtual-time
    plugin, which would fast-forward to each of our ticks) or an instance
    with them patched or mocked keeps the fixed clock."""
    for name in ("time", "call_at", "call_later"):
        owner = next((c for c in type(loop).__mro__ if name in c.__dict__), None)
        if owner is None or not (
            owner is asyncio.base_events.BaseEventLoop or owner.__module__.partition(".")[0] == "uvloop"
        ):
            return False
        # Patched or mocked on the instance: not a method bound to it.  (Never
        # ``loop.__dict__``: reading it turns the loop's attributes into a
        # real dict, and CPython's specialised attribute reads of the loop's
        # own fields in every iteration fall back to dict lookups: 1.2x on a
        # call_soon chain.)
        if getattr(getattr(loop, name, None), "__self__", None) is not loop:
            return False
    if isinstance(loop, asyncio.base_events.BaseEventLoop):
        import selectors

        if not isinstance(getattr(loop, "_selector", None), selectors.BaseSelector):
            return False  # a mocked selector: a test that checks what it is asked
    return True


class Deadline:
    """A timerfd the loop thread pushes back (`push`) and the watchdog waits on.

    ``ticks`` counts the pushes (loop thread), ``seen_ticks`` the count when
    the watchdog last found it passed: while they are equal the deadline
    is not armed, and the watchdog looks on its own clock.  ``clocks`` is
    what the loop thread read at the last push: the baseline a late
    wake-up's look compares with (`stall_meter.Clocks`)."""

    __slots__ = ("_settime", "_spec", "after", "clocks", "due", "fd", "peeked", "seen_ticks", "ticks", "tstate")

    def __init__(self, fd: int, after: float, settime: Any, spec: Any) -> None:
        self.fd = fd
        self.after = after
        self._settime = settime
        self._spec = spec
        self.due = 0.0
        self.ticks = 0
        self.seen_ticks = 0
        self.clocks: Any = None
        #: The loop thread's state, for `Alarm.wait` to read its stack by
        #: when the deadline passes (`peeked`); 0 when not yet read, -1
        #: where it cannot be.
        self.tstate = 0
        #: That stack, read without the GIL as the deadline passed, for the
        #: look that follows (`peeked.vouched`); None when none was.
        self.peeked: Any = None

    @classmethod
    def open(cls, after: float) -> Deadline | None:
        """A deadline *after* seconds past each push; None without timerfd."""
        functions = _timerfd_functions()
        if functions is None:
            return None
        create, settime, itimerspec = functions
        fd = create(_CLOCK_MONOTONIC, _TFD_NONBLOCK | _TFD_CLOEXEC)
        if fd < 0:
            return None
        spec = itimerspec()
        nanoseconds = max(int(after * 1e9), 1)
        spec.it_value.tv_sec, spec.it_value.tv_nsec = divmod(nanoseconds, 1_000_000_000)
        return cls(fd, after, settime, spec)

    def push(self, now: float, clocks: Any) -> None:
        """The loop is turning (loop thread): fire `after` from *now*."""
        self._settime(self.fd, 0, self._spec, None)  # an error (closed meanwhile) changes nothing
        self.clocks = clocks
        self.due = now + self.after
        self.ticks += 1

    @property
    def tick_every(self) -> float:
        """How often the loop pushes it back: half of it, so that a tick
        late by less than that (a long loop iteration) misses nothing."""
        return self.after / 2

    @property
    def armed(self) -> bool:
        return self.ticks != self.seen_ticks

    def passed(self) -> None:
        """The watchdog found it passed: not armed until the next push,
        which also clears the expiry (never read: a read lets the GIL go)."""
        self.seen_ticks = self.ticks

    def close(self) -> None:
        """Only ever by the watchdog thread, which may be polling it."""
        fd, self.fd = self.fd, -1
        if fd >= 0:
            with contextlib.suppress(OSError):
                os.close(fd)


class Alarm:
    """The watchdog's sleep, with `threading.Event`'s set/clear.  With
    eventfd, ``poll(2)`` waits on it together with the loops' deadlines;
    without, an Event and a timeout.

    Nothing here reads the eventfd before a look: ``os.eventfd_read`` lets
    the GIL go, and a loop thread waiting to return from a long C call
    would move on from the line the look is for.  `clear` only lowers a
    flag; `wait` empties the eventfd first, then sleeps unless the flag
    went up meanwhile (a `set` after the emptying leaves it readable).

    Closed only once the watchdog thread is gone, and written under a lock
    that closing takes: a descriptor number closed and reused by the
    program must never be written to or read from."""

    def __init__(self) -> None:
        self._fd = -1
        self._flag = False
        self._lock = threading.Lock()
        self._event: threading.Event | None = None
        if hasattr(os, "eventfd"):  # Linux
            with contextlib.suppress(OSError):
                self._fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        if self._fd < 0:
            self._event = threading.Event()

    @property
    def closed(self) -> bool:
        return self._fd < 0 and self._event is None

    def set(self) -> None:
        """Wake the watchdog (any thread); a wake-up before it sleeps is kept."""
        if self._event is not None:
            self._event.set()
            return
        self._flag = True
        with self._lock:
            if self._fd >= 0:
                # From the loop thread (a heartbeat), keeping the GIL as
                # threading.Event.set did: os.eventfd_write lets it go, and
                # the watchdog, woken by that very write, took it and looked
                # before the loop's first step began.
                add_one = _eventfd_add_one
                if add_one is not None:
                    add_one(self._fd)
                    return
                with contextlib.suppress(OSError):
                    os.eventfd_write(self._fd, 1)

    def clear(self) -> None:
        if self._event is not None:
            self._event.clear()
        self._flag = False

    def wait(
        self, timeout: float | None, deadlines: list[Deadline], following: tuple[Deadline, ...] = ()
    ) -> list[Deadline]:
        """Sleep until set, *timeout* (None: none) or one of *deadlines*
        passes; the deadlines that passed.  Where the stack can be read
        without the GIL (`peeked`), the loop thread's is read into
        `Deadline.peeked` as the wait ends, for the deadlines that passed
        and those *following* (loops in no stall yet)."""
        event, fd = self._event, self._fd
        if event is not None or fd < 0:
            if event is not None:
                event.wait(timeout)
            return []
        if self._flag:
            # Set since the look (a loop's first heartbeat): look again with
            # no read first, which would let the GIL go once more, and the
            # loop thread, given it, move on from the line to be seen.  The
            # next wait empties the eventfd.
            return []
        with contextlib.suppress(OSError):  # BlockingIOError: nothing written
            os.eventfd_read(fd)
        if self._flag:
            return []
        by_fd = {d.fd: d for d in deadlines if d.fd >= 0}
        # poll(2) counts milliseconds: rounded up, a look lands late by
        # less than one (early, it would only look again).
        milliseconds = None if timeout is None else max(math.ceil(timeout * 1000), 0)
        peek = _peek_module()
        if peek is not None:
            # The same wait, in C, which also reads the stack of the loop
            # thread whose deadline passed, before taking the GIL back.
            always = {d.fd for d in following if d.tstate > 0}
            seen = {*by_fd.values(), *following}
            watched = tuple((d.fd, d.tstate, d.fd in always) for d in seen if d.tstate > 0)
            ready_fds, stacks = peek.poll((fd, *by_fd), -1 if milliseconds is None else milliseconds, watched)
            for deadline in seen:
                deadline.peeked = stacks.get(deadline.fd)
            return [by_fd[ready_fd] for ready_fd in ready_fds if ready_fd in by_fd]
        poller = select.poll()
        poller.register(fd, select.POLLIN)
        for deadline_fd in by_fd:
            poller.register(deadline_fd, select.POLLIN)
        ready = poller.poll(milliseconds)
        return [by_fd[ready_fd] for ready_fd, _ in ready if ready_fd in by_fd]

    def close(self, *, forked: bool = False) -> None:
        """Close its eventfd (with no watchdog thread waiting on it).  In a
        forked child the lock may be held for ever by a parent's thread:
        the child's copy is closed without it."""
        if forked:
            self._close()
            return
        with self._lock:
            self._close()

    def _close(self) -> None:
        fd, self._fd = self._fd, -1
        self._event = None
        if fd >= 0:
            with contextlib.suppress(OSError):
                os.close(fd)
