"""Detectors: one module per kind of finding.

The interface is `asyncwatch._core.detector.Detector`; `BUILTIN` says which
class detects which kind.  A new detector goes in a module of its own here,
with a line in `BUILTIN` and its kind in `FindingKind`.
"""

from __future__ import annotations

from .._core.detector import Detector
from .._core.findings import FindingKind
from .cancellation import CancellationDetector
from .never_awaited import NeverAwaitedDetector
from .slow_callback import SlowCallbackDetector
from .task_exception import TaskExceptionDetector
from .task_gc import TaskGarbageDetector
from .task_leaked import TaskLeakDetector

__all__ = ["BUILTIN", "PROCESS_WIDE"]

#: The detector of each kind.
BUILTIN: dict[FindingKind, type[Detector]] = {
    FindingKind.SLOW_CALLBACK: SlowCallbackDetector,
    FindingKind.TASK_DESTROYED_PENDING: TaskGarbageDetector,
    FindingKind.COROUTINE_NEVER_AWAITED: NeverAwaitedDetector,
    FindingKind.CANCELLATION_SWALLOWED: CancellationDetector,
    FindingKind.TASK_EXCEPTION_UNRETRIEVED: TaskExceptionDetector,
    FindingKind.TASK_LEAKED: TaskLeakDetector,
}

#: Kinds detected for the whole process rather than per loop: installed
#: with the engine when its settings detect them.
PROCESS_WIDE = frozenset({FindingKind.COROUTINE_NEVER_AWAITED})
