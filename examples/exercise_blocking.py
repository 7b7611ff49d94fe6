"""Exercise 3: heavy synchronous code inside a coroutine.

The chapter's exercise: put a long ``for i in range(...)`` loop with no
``await`` inside a coroutine and run it with ``asyncio.run(main(),
debug=True)`` to see what asyncio warns about.  Debug mode logs
"Executing <Task ... coro=<main() ...>> took 0.3 seconds" after the fact:
it names the task and its coroutine, not the line inside heavy() that did
the blocking.

asyncwatch reports ``slow_callback`` at the loop line, without debug mode.
Pass ``--debug`` to turn asyncio's debug mode on as well and compare.

    python examples/exercise_blocking.py --debug
    asyncwatch run examples/exercise_blocking.py
"""

# ruff: noqa: E701

import asyncio
import sys
import time

N = 10_000_000  # the chapter's range: about 0.3 s on a slow machine


async def heavy():
    total = 0
    # No await: the event loop is stuck on this line until the for loop ends.
    # (One line, as in the chapter, so that "the blocking line" is one line.)
    for i in range(N): total += i  # <- asyncwatch reports this line  # fmt: skip
    return total


async def main():
    start = time.perf_counter()
    await heavy()  # runs in this same task step: nothing else can run meanwhile
    print(f"heavy() held the event loop for {time.perf_counter() - start:.3f} s")


if __name__ == "__main__":
    asyncio.run(main(), debug="--debug" in sys.argv[1:])
