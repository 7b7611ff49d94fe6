"""Mistake: CPU-bound work inside a coroutine blocks the event loop.

From the chapter: ``slow()`` has no ``await`` inside its loop, so it never
yields to the event loop.  ``gather(slow(), slow(), slow())`` looks concurrent
but runs the three calls one after another, and while each one runs nothing
else on the loop (timers, I/O, other tasks) can make progress.

asyncwatch reports ``slow_callback`` three times (one per task step that held
the loop longer than ``--slow-callback-ms``, default 100 ms), each at the
blocking line below.

    python examples/slow_callback.py
    asyncwatch run examples/slow_callback.py
"""

# ruff: noqa: E701

import asyncio
import time

# Small enough that each call takes roughly 0.2-0.4 s on a slow machine.
N = 7_000_000


async def slow():
    total = 0
    # CPU-bound and no await: the event loop is stuck on this line until the
    # for loop ends.  (It is written on one line so that "the blocking line"
    # is a single line; asyncwatch samples where the loop thread is.)
    for i in range(N): total += i  # <- asyncwatch reports this line  # fmt: skip
    return total


async def main():
    start = time.perf_counter()
    await asyncio.gather(slow(), slow(), slow())  # three "at once"?
    print(f"3 x slow() with gather: {time.perf_counter() - start:.2f} s (serial: the loop was blocked)")


if __name__ == "__main__":
    asyncio.run(main())
