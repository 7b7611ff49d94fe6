"""Mistake: a task fails and nobody ever looks at its exception.

A task started with ``asyncio.create_task`` and never awaited keeps its
exception to itself.  The program carries on as if the work succeeded; the
only trace is asyncio's "Task exception was never retrieved" log, printed
whenever the task object happens to be garbage-collected.

asyncwatch reports ``task_exception_unretrieved`` at the line that created
the failing task, with the exception in the message.

    python examples/unretrieved_exception.py
    asyncwatch run examples/unretrieved_exception.py
"""

import asyncio


async def fetch(name):
    await asyncio.sleep(0.05)
    return f"{name}: ok"


async def fetch_might_fail(name):
    await asyncio.sleep(0.01)
    raise ConnectionError(f"{name}: connection reset")


async def main():
    ok = asyncio.create_task(fetch("a"))
    risky = asyncio.create_task(fetch_might_fail("b"))  # <- asyncwatch reports this line
    print("success:", await ok)
    # Mistake: `risky` is never awaited; its ConnectionError goes unnoticed.
    print(f"main: done (risky task done: {risky.done()})")


if __name__ == "__main__":
    asyncio.run(main())
