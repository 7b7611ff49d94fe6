# asyncwatch's optional C extension (_ctask.c): present when it was built.
from collections.abc import Callable
from typing import Any

def subclass(base: type, name: str, slots: tuple[str, ...], redeclare: tuple[str, ...], /) -> type: ...

class FanOut:
    slow: Callable[..., Any]
    def __init__(
        self,
        slow: Callable[..., Any],
        task_type: type,
        state: object,
        getframe: Callable[[int], Any],
        running_loop: Callable[[], Any],
        trim: Callable[[Any], None],
        /,
    ) -> None: ...
    def __call__(self, loop: Any, coro: Any, /, **kwargs: Any) -> Any: ...
    def fan(self, frame: Any, depth: int, site: Any, /) -> None: ...

class GcTimer:
    total: float
    started: float
    started_cpu: float
    started_by: int
    def __init__(self, pauses: Any, floor: float, /) -> None: ...
    def __call__(self, phase: str, info: dict[str, Any], /) -> None: ...

class Collecting:
    thread: int
    held: bool
    flushes: tuple[Callable[[], None], ...]
    def __init__(self) -> None: ...
    def __call__(self, phase: str, info: dict[str, Any], /) -> None: ...
