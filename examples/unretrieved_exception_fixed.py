"""Fixed: collect every result, exceptions included.

As in the chapter: ``asyncio.gather(..., return_exceptions=True)`` returns an
exception as the result of the call that raised it, so one failure does not
hide the other results and every exception is looked at.  (Plain ``await
task``, or a TaskGroup, would retrieve it too, by raising it.)

asyncwatch reports nothing.

    python examples/unretrieved_exception_fixed.py
    asyncwatch run examples/unretrieved_exception_fixed.py
"""

import asyncio


async def fetch(name):
    await asyncio.sleep(0.05)
    return f"{name}: ok"


async def fetch_might_fail(name):
    await asyncio.sleep(0.01)
    raise ConnectionError(f"{name}: connection reset")


async def main():
    results = await asyncio.gather(
        fetch("a"),
        fetch_might_fail("b"),
        return_exceptions=True,
    )
    for r in results:
        if isinstance(r, Exception):
            print("failure:", r)
        else:
            print("success:", r)


if __name__ == "__main__":
    asyncio.run(main())
