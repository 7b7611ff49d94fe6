"""Fixed: run the CPU-bound work in a thread with ``asyncio.to_thread``.

The chapter's advice: CPU-bound work belongs in ``asyncio.to_thread`` or an
executor (``loop.run_in_executor``, a ``ProcessPoolExecutor`` for real
parallelism).  ``slow`` is now a plain function run in worker threads, so the
event loop stays free to run other tasks and callbacks meanwhile.

Note: for pure-Python CPU work, ``to_thread`` does not make the three calls
faster, because the GIL lets only one thread run Python bytecode at a time
(use ``ProcessPoolExecutor`` for that).  What it buys is a responsive loop.
The ticker below shows that the loop keeps running while the work happens.

asyncwatch reports nothing against it.  (On a loaded machine the three
worker threads can keep the loop from the GIL past the threshold: that
stall is reported as another thread's, cause ``gil``, with no line of
yours blamed and no verdict counting it.)

    python examples/slow_callback_fixed.py
    asyncwatch run examples/slow_callback_fixed.py
"""

# Same loop as in slow_callback.py, kept on one line.
# ruff: noqa: E701

import asyncio
import time

N = 7_000_000


def slow():  # a plain function now: it runs in a worker thread
    total = 0
    for i in range(N): total += i  # fmt: skip
    return total


async def ticker(stop):
    ticks = 0
    while not stop.is_set():
        await asyncio.sleep(0.02)
        ticks += 1
    return ticks


async def main():
    start = time.perf_counter()
    stop = asyncio.Event()
    tick_task = asyncio.create_task(ticker(stop))
    await asyncio.gather(*(asyncio.to_thread(slow) for _ in range(3)))
    stop.set()
    ticks = await tick_task
    elapsed = time.perf_counter() - start
    print(f"3 x slow() in threads: {elapsed:.2f} s; the loop ticked {ticks} times meanwhile")


if __name__ == "__main__":
    asyncio.run(main())
