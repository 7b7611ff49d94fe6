"""Fixed: ``await`` the coroutine.

``await save(record)`` runs the coroutine to completion before moving on.
(To save the records concurrently, ``await asyncio.gather(*(save(r) for r in
records))`` or a ``TaskGroup`` would do, also awaited.)

asyncwatch reports nothing.

    python examples/never_awaited_fixed.py
    asyncwatch run examples/never_awaited_fixed.py
"""

import asyncio

saved = []


async def save(record):
    await asyncio.sleep(0.01)  # stands in for a database write
    saved.append(record)


async def main():
    for record in ["alice", "bob", "carol"]:
        await save(record)
    print(f"saved: {saved}")  # saved: ['alice', 'bob', 'carol']


if __name__ == "__main__":
    asyncio.run(main())
