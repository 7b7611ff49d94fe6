"""Fixed: clean up, then re-raise CancelledError.

The chapter's rule: always put ``raise`` after the cleanup in an
``except asyncio.CancelledError:`` block, so the task ends cancelled and the
canceller (timeout, TaskGroup, shutdown code) sees that it did.

asyncwatch reports nothing.

    python examples/swallowed_cancel_fixed.py
    asyncwatch run examples/swallowed_cancel_fixed.py
"""

import asyncio


async def long_operation():
    await asyncio.sleep(10)


async def cleanup():
    await asyncio.sleep(0.01)  # cleanup can be async too
    print("work: cleaned up")


async def work():
    try:
        await long_operation()
    except asyncio.CancelledError:
        await cleanup()
        raise  # re-raise: the task ends cancelled


async def main():
    task = asyncio.create_task(work())
    await asyncio.sleep(0.05)
    task.cancel()
    await asyncio.wait([task])
    print(f"main: task.cancelled() = {task.cancelled()}")  # True


if __name__ == "__main__":
    asyncio.run(main())
