"""The findings contract: `Site`, `Finding`, `FindingKind`.

Everything asyncwatch detects becomes a `Finding`; every output (structlog,
the JSON Lines file, OpenTelemetry, the pytest plugin) renders the same
object, so the contract lives in one place.
"""

from __future__ import annotations

import enum
import os
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import datetime as _dt
else:

    class _LazyDatetime:
        """The `datetime` module, imported when the first finding is made.

        Importing it costs 192 objects tracked by the garbage collector, which
        every full collection of the program walks again (issue 15), for a
        timestamp only a finding needs.  ``Finding.time``'s annotation names
        ``_dt.datetime``: this stand-in resolves it, so that
        ``typing.get_type_hints(Finding)`` (which serialisers call) works
        before the first finding as after it.
        """

        __slots__ = ()

        def __getattr__(self, name: str) -> Any:
            global _dt
            import datetime as _dt

            return getattr(_dt, name)

    _dt = _LazyDatetime()

__all__ = ["NOT_THE_PROGRAMS", "Finding", "FindingKind", "Site", "counts_against_program"]

#: ``Finding.cause`` values that are not a line of the program blocking the
#: loop (the collector, another thread's GIL, a machine short of CPUs, start-up
#: imports): reported, but not counted by ``--fail-on-findings`` or the pytest
#: plugin's verdict.
NOT_THE_PROGRAMS = frozenset({"gc", "gil", "starved", "import"})


def counts_against_program(finding: Finding) -> bool:
    """Whether a verdict (a failed test, ``--fail-on-findings``) counts *finding*."""
    return finding.cause not in NOT_THE_PROGRAMS


class FindingKind(str, enum.Enum):
    """The stable names of what asyncwatch detects.

    The values are part of the public contract: they appear in logs, in the
    findings file and in OpenTelemetry events, and they never change.
    """

    SLOW_CALLBACK = "slow_callback"
    TASK_DESTROYED_PENDING = "task_destroyed_pending"
    COROUTINE_NEVER_AWAITED = "coroutine_never_awaited"
    CANCELLATION_SWALLOWED = "cancellation_swallowed"
    TASK_EXCEPTION_UNRETRIEVED = "task_exception_unretrieved"
    #: Reported by the pytest plugin only: a task a test started and left
    #: running when the test ended.
    TASK_LEAKED = "task_leaked"

    def __str__(self) -> str:
        return self.value


@dataclass(frozen=True, slots=True)
class Site:
    """A place in source code: absolute file path, 1-based line, function name."""

    file: str
    line: int
    function: str

    def to_dict(self) -> dict[str, Any]:
        """Return the JSON form: ``{"file", "line", "function"}``."""
        return {"file": self.file, "line": self.line, "function": self.function}

    def __str__(self) -> str:
        return f"{self.file}:{self.line} in {self.function}"


def _utcnow() -> _dt.datetime:
    return _dt.datetime.now(_dt.UTC)


def import_timestamps() -> None:
    """Import what a finding's timestamp needs now, not at the first finding.

    For a thread that must not let the GIL go at its first finding: the
    import's file-system calls do, and the slow-callback watchdog, reporting
    one stall in the middle of a look, let a loop that ran steps holding
    the GIL back to back run two of them unseen (3.11, six tasks each
    summing a large list)."""
    _utcnow()


@dataclass(frozen=True, slots=True)
class Finding:
    """One detected mistake.

    `site` is the single most useful line to open (see the README for the
    rule of each kind); `stack` lists the frames that explain the finding,
    outermost first.  `thread` names the thread that ran the event loop the
    finding came from (for `coroutine_never_awaited`, the thread that dropped
    the coroutine), so that the findings of several loops can be told apart;
    None where that is unknown.
    """

    kind: FindingKind
    message: str
    site: Site | None
    stack: tuple[Site, ...] = ()
    task: str | None = None
    coroutine: str | None = None
    duration_s: float | None = None
    cancelled_by: Site | None = None
    created_at: Site | None = None
    time: _dt.datetime = field(default_factory=_utcnow)
    pid: int = field(default_factory=os.getpid)
    thread: str | None = None
    #: How many findings like this one (same kind and site) the rate limit
    #: held back since the last one reported (see ``report_limit``).
    suppressed: int = 0
    #: Why a ``slow_callback`` stalled the loop, when asyncwatch can tell:
    #: ``"cpu"`` (the loop thread computing), ``"blocking_io"`` (the loop
    #: thread off CPU: I/O, a sleep, a lock), ``"gc"`` (the garbage
    #: collector), ``"gil"`` (another thread held the GIL: `gil_holder`),
    #: ``"starved"`` (the loop thread waited for a CPU: an overloaded
    #: machine), ``"import"`` (the import system: start-up work).  The last
    #: four are not a line of the program (`NOT_THE_PROGRAMS`): `site` is
    #: None for the first three, and no verdict counts them by default.
    cause: str | None = None
    #: What the pipeline's enrichment stage added for the outputs to show
    #: beside the finding's own fields, as ``(key, value)`` pairs: the
    #: ``trace_id`` and ``span_id`` of the span the finding went to.  Not
    #: part of the JSON form (`to_dict`); the structlog output adds them to
    #: its event.
    extra: tuple[tuple[str, str], ...] = ()
    #: `coroutine_never_awaited`: the application line that dropped the
    #: coroutine's last reference (its finalizer ran there), where known.
    #: `created_at` is where it was created, where known; the two are the
    #: same line for ``save(x)`` as a statement.
    dropped_at: Site | None = None
    #: Of a ``slow_callback``'s duration, the seconds measured for each
    #: cause, as ``(cause, seconds)`` pairs (``"cpu"``, ``"blocking_io"``,
    #: ``"gc"``, ``"gil"``, ``"starved"``); empty where not measured.
    breakdown: tuple[tuple[str, float], ...] = ()
    #: For ``cause="gil"``: the name of the thread that ran most while the
    #: loop waited for the GIL, where it could be told.
    gil_holder: str | None = None
    #: ``cancellation_swallowed``: the statement that ended the
    #: CancelledError (an ``except``, a ``return`` in a ``finally``, a
    #: ``suppress``), read from the source around the await where it
    #: landed; None unless the source leaves no doubt.
    swallowed_at: Site | None = None
    #: ``coroutine_never_awaited`` dropped by the event loop: the line that
    #: gave the loop the callback that made it (``call_soon(flush)`` with
    #: ``async def flush``, ``call_later(5, lambda: expire(sid))``), read
    #: from the source; None unless exactly one line can have been it.
    scheduled_at: Site | None = None

    def to_dict(self) -> dict[str, Any]:
        """Return the JSON form, the same fields in every output."""
        return {
            "kind": self.kind.value,
            "message": self.message,
            "site": self.site.to_dict() if self.site else None,
            "stack": [s.to_dict() for s in self.stack],
            "task": self.task,
            "coroutine": self.coroutine,
            "duration_s": self.duration_s,
            "cancelled_by": self.cancelled_by.to_dict() if self.cancelled_by else None,
            "created_at": self.created_at.to_dict() if self.created_at else None,
            "dropped_at": self.dropped_at.to_dict() if self.dropped_at else None,
            "swallowed_at": self.swallowed_at.to_dict() if self.swallowed_at else None,
            "scheduled_at": self.scheduled_at.to_dict() if self.scheduled_at else None,
            "time": self.time.isoformat().replace("+00:00", "Z"),
            "pid": self.pid,
            "thread": self.thread,
            "suppressed": self.suppressed,
            "cause": self.cause,
            "breakdown": dict(self.breakdown) if self.breakdown else None,
            "gil_holder": self.gil_holder,
        }
