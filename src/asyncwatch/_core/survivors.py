"""What a program leaves alive when it ends, for the reports Python's
shutdown makes of it.

Once the program's code and its exit functions have run, the interpreter
clears every module's globals, and what they held is freed then: a failed
task nobody asked for its exception ("Task exception was never retrieved"),
a pending task whose loop stopped ("Task was destroyed but it is
pending!"), a coroutine never started ("coroutine ... was never awaited").
asyncio and CPython report them at that moment, when asyncwatch's own
modules are being cleared too (such a report failed on "sys.meta_path is
None": an internal error and no finding) and its findings file and summary
are already written.  A task kept in a module-level list is a common
pattern (a field corpus's: missed on every interpreter and loop).  So at
exit asyncwatch finds them itself, in one pass over the collector's objects
(about 40 ms a million objects), and its detectors report them
(`Detector.at_exit`).
"""

from __future__ import annotations

import asyncio
import collections
import gc
import sys
import types
from typing import Any

from .runtime import PACKAGE_DIR

__all__ = ["Survivors", "find_survivors", "held_by"]

_CONTAINERS = (list, tuple, set, frozenset, dict, collections.deque)


class Survivors:
    """The tasks alive at exit, and the coroutines alive at exit that never
    started and belong to no task (asyncwatch's own wrappers left out).
    Held only while the detectors look at them."""

    __slots__ = ("coroutines", "tasks")

    def __init__(self, tasks: list[asyncio.Task[Any]], coroutines: list[Any]) -> None:
        self.tasks = tasks
        self.coroutines = coroutines


def find_survivors() -> Survivors:
    """One pass over the objects the collector tracks (tasks and coroutines
    are among them)."""
    tasks: list[asyncio.Task[Any]] = []
    coroutines: list[Any] = []
    is_task: dict[type, bool] = {}
    coroutine_type = types.CoroutineType
    for obj in gc.get_objects():
        kind = type(obj)
        if kind is coroutine_type:
            if obj.cr_frame is not None and not obj.cr_running and not _suspended(obj):
                coroutines.append(obj)
            continue
        known = is_task.get(kind)
        if known is None:
            known = is_task[kind] = issubclass(kind, asyncio.Task)
        if known:
            tasks.append(obj)
    owned = set()
    for task in tasks:
        coro = task.get_coro()
        if coro is not None:
            owned.add(id(coro))
    coroutines = [c for c in coroutines if id(c) not in owned and not c.cr_code.co_filename.startswith(PACKAGE_DIR)]
    return Survivors(tasks, coroutines)


def _suspended(coro: Any) -> bool:
    """Whether *coro* has started (3.11's ``cr_suspended``; before it, a
    frame that ran no instruction yet)."""
    suspended = getattr(coro, "cr_suspended", None)
    if suspended is not None:
        return bool(suspended)
    return bool(coro.cr_frame.f_lasti >= 0)  # pragma: no cover - 3.10 and older are not supported


def held_by(obj: Any, ignore: tuple[Any, ...] = ()) -> str | None:
    """Which module's global holds *obj*, directly or in a list, tuple, set,
    dict or deque it holds, in words; None when neither does.

    Two walks over the heap (``gc.get_referrers``): for a few objects only.
    *ignore*: containers of the caller's own that refer to *obj*.
    """
    modules = {id(vars(m)): name for name, m in list(sys.modules.items()) if isinstance(m, types.ModuleType)}
    skip = {id(c) for c in ignore}
    containers = []
    for referrer in gc.get_referrers(obj):
        if id(referrer) in skip:
            continue
        if id(referrer) in modules:
            return f"global {_key_of(referrer, obj)!r} of module {modules[id(referrer)]}"
        if isinstance(referrer, _CONTAINERS):
            containers.append(referrer)
    for container in containers[:4]:
        for referrer in gc.get_referrers(container):
            if id(referrer) in modules:
                return (
                    f"a {type(container).__name__} in global {_key_of(referrer, container)!r} "
                    f"of module {modules[id(referrer)]}"
                )
    return None


def _key_of(namespace: dict[str, Any], value: Any) -> str:
    return next((key for key, held in list(namespace.items()) if held is value), "?")
