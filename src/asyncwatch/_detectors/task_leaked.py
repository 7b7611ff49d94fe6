"""Tasks a test left running: the creation sites the pytest plugin reports.

The pytest plugin makes the ``task_leaked`` finding itself, at the end of a
test (only it knows when a test ends); what it needs from the engine is the
creation site of every task, which this detector asks for.
"""

from __future__ import annotations

from .._core.detector import Detector
from .._core.findings import FindingKind

__all__ = ["TaskLeakDetector"]


class TaskLeakDetector(Detector):
    """Asks for creation sites on loops that detect ``task_leaked``."""

    kind = FindingKind.TASK_LEAKED
    needs_task_factory = True
