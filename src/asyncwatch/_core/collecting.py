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
rather than held behind a collection it has nothing to do with.  CPython
runs one collection at a time, so the thread collecting is the whole state.

A detector that holds something says so (`hold`); the flushes are called
right after a collection that held something, in the collecting thread,
and contain their own errors (they report them to their detector's
context).  After any other collection no Python runs: the entry is
`_ctask.Collecting` where asyncwatch's extension was built (a Python entry
lets signal handlers run inside a long C call: see _ctask.c), else
`pygc.Collecting`.
"""

from __future__ import annotations

import gc
import threading
from collections.abc import Callable
from typing import Any

from .settings import extension

__all__ = ["after_collections", "collecting", "gc_entry", "hold", "no_longer_after_collections"]


def gc_entry(kind: str, *args: Any) -> Any:
    """A ``gc.callbacks`` entry of asyncwatch's: ``_ctask.<kind>(*args)``
    where the extension was built, else ``pygc.<kind>(*args)`` (the same
    fields and protocol, in Python)."""
    ctask = extension()
    if ctask is not None and hasattr(ctask, kind):
        return getattr(ctask, kind)(*args)
    from . import pygc

    return getattr(pygc, kind)(*args)


_lock = threading.Lock()
#: The ``gc.callbacks`` entry, made at the first `after_collections`.
_callback: Any = None
_get_ident = threading.get_ident


def collecting() -> bool:
    """Whether the garbage collector is running in this thread."""
    callback = _callback
    return callback is not None and callback.thread == _get_ident()


def hold() -> None:
    """Have this collection's flushes called when it is over (a detector
    kept something for them).  Nothing outside a collection in this thread."""
    callback = _callback
    if callback is not None and callback.thread == _get_ident():
        callback.held = True


def after_collections(flush: Callable[[], None]) -> None:
    """Call *flush* after every collection that held something (`hold`),
    until `no_longer_after_collections`."""
    global _callback
    with _lock:
        if _callback is None:
            _callback = gc_entry("Collecting")
        if flush not in _callback.flushes:
            _callback.flushes = (*_callback.flushes, flush)
        if _callback not in gc.callbacks:
            gc.callbacks.append(_callback)


def no_longer_after_collections(flush: Callable[[], None]) -> None:
    """Undo `after_collections`; the ``gc.callbacks`` entry goes with the last one."""
    with _lock:
        if _callback is None:
            return
        _callback.flushes = tuple(f for f in _callback.flushes if f != flush)
        if not _callback.flushes:
            while _callback in gc.callbacks:
                gc.callbacks.remove(_callback)
            # Removed during a collection (by a finalizer), it would not
            # hear that collection end.
            _callback.thread = 0
            _callback.held = False
