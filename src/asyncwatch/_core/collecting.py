"""After a collection: what a detector holds while the garbage collector runs.

A collection finalizes a cycle's objects in an order of its own: a
coroutine before the task that owns it, a gather's future before the task
waiting on it.  Each finalizer may look like a mistake of its own, but the
task destroyed while pending is the one mistake, reported once.  So a
detector that sees a finalizer while this thread collects holds its
finding, and decides after the collection, when every finalizer of it has
run and claimed what is its own.

One ``gc.callbacks`` entry serves every such detector (asyncwatch had one
per detector, with different semantics).  "Collecting" is per thread: the
callbacks run in the thread that collects, and a finding made meanwhile in
another thread is not part of that collection, so it is reported at once
rather than held behind a collection it has nothing to do with.

Each flush is called in the collecting thread right after the collection,
and contains its own errors (it reports them to its detector's context).
"""

from __future__ import annotations

import gc
import threading
from collections.abc import Callable
from typing import Any

__all__ = ["after_collections", "collecting", "no_longer_after_collections"]


class _State(threading.local):
    collecting = False


_state = _State()
_lock = threading.Lock()
_flushes: tuple[Callable[[], None], ...] = ()


def collecting() -> bool:
    """Whether the garbage collector is running in this thread."""
    return _state.collecting


def after_collections(flush: Callable[[], None]) -> None:
    """Call *flush* after every collection, until `no_longer_after_collections`."""
    global _flushes
    with _lock:
        if flush not in _flushes:
            _flushes = (*_flushes, flush)
        if _gc_callback not in gc.callbacks:
            gc.callbacks.append(_gc_callback)


def no_longer_after_collections(flush: Callable[[], None]) -> None:
    """Undo `after_collections`; the ``gc.callbacks`` entry goes with the last one."""
    global _flushes
    with _lock:
        _flushes = tuple(f for f in _flushes if f != flush)
        if not _flushes:
            while _gc_callback in gc.callbacks:
                gc.callbacks.remove(_gc_callback)


def _gc_callback(phase: str, _info: dict[str, Any]) -> None:
    # Named like the collector clock's callback: the watchdog skips frames
    # of that name (loop_probe.callback_frame) to find the program's line.
    if phase == "start":
        _state.collecting = True
        return
    _state.collecting = False
    for flush in _flushes:
        flush()
