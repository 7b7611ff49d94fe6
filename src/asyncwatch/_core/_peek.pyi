# asyncwatch's optional stack reader (_peek.c): present when it was built
# (CPython 3.11-3.13 on Linux).

def thread_state() -> int: ...
def poll(
    fds: tuple[int, ...], timeout_ms: int, watched: tuple[tuple[int, int, bool], ...], /
) -> tuple[list[int], dict[int, tuple[tuple[tuple[str, int, str, int], ...], ...]]]: ...
