"""Mistake: calling a coroutine function without ``await``.

``save(record)`` only creates a coroutine object; nothing runs until it is
awaited (or wrapped in a task).  The object is thrown away at once, so the
records are never saved, and all Python says is a RuntimeWarning
"coroutine 'save' was never awaited" when the object is garbage-collected.

asyncwatch reports ``coroutine_never_awaited`` once per dropped coroutine
(three here), at the line that created it.

    python examples/never_awaited.py
    asyncwatch run examples/never_awaited.py
"""

import asyncio

saved = []


async def save(record):
    await asyncio.sleep(0.01)  # stands in for a database write
    saved.append(record)


async def main():
    for record in ["alice", "bob", "carol"]:
        save(record)  # <- asyncwatch reports this line
    print(f"saved: {saved}")  # saved: [] - nothing was saved


if __name__ == "__main__":
    asyncio.run(main())
