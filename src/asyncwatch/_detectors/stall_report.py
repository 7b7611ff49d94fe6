"""What a stall of the loop becomes: the captured `Stall` (the line that was
running, the task, the stack) and the ``slow_callback`` finding made of it,
with the cause's message and advice (see `stall_cause`)."""

from __future__ import annotations

import threading

from .._core.findings import Finding, FindingKind, Site
from .._core.frames import describe_task, source_path
from . import stall_cause
from .stall_cause import Breakdown

__all__ = ["COMPILED", "Compiled", "Stall", "stall_finding"]


class Stall:
    __slots__ = (
        "after_import",
        "callback",
        "coroutine",
        "created_at",
        "ended",
        "explicit_gc",
        "fresh",
        "importing",
        "interrupted",
        "late",
        "left_import_at",
        "library_only",
        "peeked",
        "site",
        "stack",
        "task",
    )

    def __init__(
        self,
        site: Site | None,
        stack: tuple[Site, ...],
        task: str | None,
        coroutine: str | None,
        callback: str | None,
        importing: str | None = None,
        created_at: Site | None = None,
        library_only: bool = False,
        explicit_gc: bool = False,
    ) -> None:
        self.importing = importing
        self.site = site
        self.stack = stack
        self.task = task
        self.coroutine = coroutine
        self.callback = callback
        self.created_at = created_at
        # Python frames, none of them the application's: the loop waited
        # inside asyncio or the standard library (starting an executor's
        # thread, say), not at a line of the program.
        self.library_only = library_only
        # The line was calling gc.collect(): a collection the program asked
        # for, at that line (cause gc all the same: its length is the heap's).
        self.explicit_gc = explicit_gc
        # Seen only once the GIL was free again (a late wake-up): the line
        # running then, which is the call's when the watchdog asked for the
        # GIL during it, and may be one just after when it asked later.
        self.late = False
        # Its line read while the operation ran, without the GIL
        # (`peeked.vouched`): the line itself, not the one after.
        self.peeked = False
        # Read only by the peek, in a step that had ended when the look
        # came (`peeked.elsewhere`): its line, but not its task.
        self.ended = False
        # Read by a late look at a step that had not yet run the program's
        # code (at its start, or resumed inside asyncio under its await):
        # a hold of the loop thread's own in it was the step before's.
        self.fresh = False
        # Read by a look that waited for the GIL, with code the interpreter
        # entered inside the call (a finalizer) left out, which a later
        # look on time may find still running (`LoopProbe._still_inside`).
        self.interrupted = False
        # Read inside an import: the same step as later looks saw it, out
        # of every import, and since when (`LoopProbe._past_import`).
        self.after_import: Stall | None = None
        self.left_import_at: float | None = None

    def past_import(self, end: float, threshold_s: float) -> Stall:
        """The stall to report once it ended at *end*: this one, or, when
        it was read inside an import and the step then ran on outside any
        import for a threshold or more (a stall of its own), the line it
        ran at then.  A look that landed in a step's lazy import (int() of
        a long string starts with _pylong's) excused the whole step as
        start-up work."""
        after, left = self.after_import, self.left_import_at
        if after is None or left is None or end - left < threshold_s:
            return self
        return after


class Compiled:
    """Stands for a callback with no Python frame (a C function, on uvloop)."""


COMPILED = Compiled()


def stall_finding(
    stall: Stall,
    duration: float,
    threshold_s: float,
    breakdown: Breakdown | None,
    holder: str | None,
) -> Finding:
    """The ``slow_callback`` finding for *stall*, which held the loop for
    *duration* seconds (*breakdown*: where that time went, when measured)."""
    if stall.ended and stall.site is not None:
        what = f"A step running {stall.site.function!r} (over before the watchdog could look: its task is not known)"
    elif stall.task:
        what = describe_task(stall.task, stall.coroutine)
    elif stall.callback:
        what = f"Callback {stall.callback!r}"
    else:
        what = "A callback with no Python frame (compiled code)"
    cause = stall_cause.IMPORT if stall.importing is not None else None
    starting = False  # the loop waited in Thread.start(), and only that made the cause
    if cause is None and breakdown is not None:
        # A line calling gc.collect() ran the collector, whose time is
        # judged as the collector's: no program work was stretched there.
        program_line = stall.site is not None and not stall.library_only and not stall.explicit_gc
        cause = stall_cause.classify(breakdown, threshold_s, program_line)
        if cause == stall_cause.BLOCKING_IO and _starting_a_thread(stall):
            # Thread.start() waits, off CPU, for the new thread to run its
            # first lines: no I/O, only that thread's wait for a CPU and the
            # GIL, which a quiet machine grants in well under a millisecond.
            # asyncio.run()'s shutdown_default_executor and an executor's
            # first jobs start threads on the loop thread: 130 ms of it at
            # load 8 was reported as blocking I/O that no line of the
            # program did (and the verdicts counted it).
            others_ran = breakdown.others_cpu >= breakdown.off_cpu / 4
            cause = stall_cause.GIL if others_ran else stall_cause.STARVED
            starting = True
    site = stall.site
    task, coroutine, created_at, stack = stall.task, stall.coroutine, stall.created_at, stall.stack
    if stall.fresh and cause in (stall_cause.CPU, stall_cause.BLOCKING_IO):
        # The loop thread's own time was the step before's, not this one's.
        what = "A step that was over before the watchdog could look (its task and line are not known)"
        site, task, coroutine, created_at, stack = None, None, None, None, ()
    if cause in (stall_cause.GC, stall_cause.GIL, stall_cause.STARVED) and not (
        cause == stall_cause.GC and stall.explicit_gc
    ):
        site = None  # never blamed on the line the loop happened to be at
    return Finding(
        kind=FindingKind.SLOW_CALLBACK,
        message=(
            f"{what} blocked the event loop for {duration * 1000:.0f} ms "
            f"(threshold {threshold_s * 1000:.0f} ms)" + _why(cause, stall, breakdown, holder, starting)
        ),
        site=site,
        stack=stack,
        task=task,
        coroutine=coroutine,
        duration_s=round(duration, 6),
        created_at=created_at,
        cause=cause,
        breakdown=breakdown.as_pairs() if breakdown is not None else (),
        gil_holder=holder if cause == stall_cause.GIL else None,
    )


# As a `Site` names it (`frames.code_site`).
_THREAD_START = (source_path(threading.Thread.start.__code__.co_filename), threading.Thread.start.__qualname__)


def _starting_a_thread(stall: Stall) -> bool:
    """Whether the loop thread was inside ``threading.Thread.start()``."""
    return any((site.file, site.function) == _THREAD_START for site in stall.stack)


def _held_where(stall: Stall) -> str:
    """What the site is, for a stall seen only once the GIL was free again."""
    if not stall.late or stall.fresh:
        return ""  # (a fresh step's stall that is the program's has no line)
    if stall.peeked:
        return "; one operation held the GIL: the site is the line it was running, read while it ran"
    return "; one call held the GIL: the site is the line running when it returned, the call's or just after it"


def _ms(seconds: float) -> str:
    return f"{max(seconds, 0.0) * 1000:.0f} ms"


def _why(
    cause: str | None, stall: Stall, breakdown: Breakdown | None, holder: str | None, starting: bool = False
) -> str:
    """The message's second half: the cause, what was measured, the advice
    (*starting*: a wait in ``Thread.start()`` made the cause)."""
    if cause == stall_cause.IMPORT:
        module = f"module {stall.importing!r}" if stall.importing else "a module"
        return (
            f" while importing {module} (cause: import; start-up work, such as a server importing "
            "the application in its loop: the site is the line the import was running); import it "
            "before the loop starts to keep it off the loop"
        )
    if breakdown is None or cause is None:
        return "; move blocking or CPU-bound work to asyncio.to_thread() or an executor"
    measured = f"{_ms(breakdown.wall)} measured"
    if starting:
        if cause == stall_cause.GIL:
            who = f"thread {holder!r}" if holder else "other threads"
            by, advice = f"{who} holding the GIL", "move their CPU-bound work to a process pool"
        else:
            by, advice = "a machine short of CPUs", "give the process more CPU or run less beside it"
        return (
            f" (cause: {cause}; the loop thread waited {_ms(breakdown.off_cpu)} of {measured} in "
            f"threading.Thread.start() for the new thread to run, kept waiting by {by}): not a line "
            f"of the program; {advice}"
        )
    if cause == stall_cause.CPU:
        where = _held_where(stall)
        # The collections its own allocations triggered are its work too,
        # and said so: "on CPU 404 ms of 1024 ms" alone, for a json.loads
        # whose other 594 ms were the collector's, read as time off CPU.
        collected = (
            f", and {_ms(breakdown.gc)} in the collections its allocations triggered" if breakdown.gc >= 0.001 else ""
        )
        return (
            f" (cause: cpu; the loop thread was on CPU {_ms(breakdown.cpu - breakdown.gc)} of {measured}"
            f"{collected}{where}): CPU-bound work; run it in a process pool "
            "(loop.run_in_executor(ProcessPoolExecutor(), ...)), since threads share the GIL"
        )
    if cause == stall_cause.BLOCKING_IO:
        return (
            f" (cause: blocking_io; the loop thread was off CPU {_ms(breakdown.off_cpu - breakdown.gil)} "
            f"of {measured}): blocking I/O, a sleep or a lock; use an async API or asyncio.to_thread()"
        )
    if cause == stall_cause.GC and stall.explicit_gc:
        return (
            f" (cause: gc; the garbage collector ran {_ms(breakdown.gc)} of {measured}): this line called "
            "gc.collect(), a full collection whose length is the whole heap's (in any thread it holds the "
            "GIL); call it before the loop starts, or leave collecting to the collector"
        )
    if cause == stall_cause.GC:
        return (
            f" (cause: gc; the garbage collector ran {_ms(breakdown.gc)} of {measured}): a collection "
            "pauses every thread, so no line of the program is blamed; many long-lived objects make "
            "full collections long (gc.freeze() after start-up, or fewer objects, shortens them)"
        )
    if cause == stall_cause.GIL:
        who = f"thread {holder!r}" if holder else "another thread"
        return (
            f" (cause: gil; the loop thread waited {_ms(breakdown.gil)} of {measured} for the GIL while "
            f"{who} held it): not the line the loop was at; move that thread's CPU-bound work "
            "(or long C calls that hold the GIL) to a process pool"
        )
    if breakdown.steal > 0 and breakdown.steal >= breakdown.starved / 2:
        return (
            f" (cause: starved; the hypervisor gave the loop thread's CPU to another machine for "
            f"{_ms(breakdown.steal)} of {measured}, steal time): the host is overloaded, not a line of the "
            "program; a machine with dedicated CPUs, or less load on its host, avoids it"
        )
    return (
        f" (cause: starved; the loop thread waited {_ms(breakdown.starved)} of {measured} for a CPU): "
        "the machine is overloaded, not a line of the program; give the process more CPU or run less beside it"
    )
