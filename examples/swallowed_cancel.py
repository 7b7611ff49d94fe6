"""Mistake: catching CancelledError for cleanup and not re-raising it.

From the chapter's cancellation section: when a task is cancelled,
CancelledError is thrown in at the ``await`` where it is suspended.  If the
coroutine catches it, cleans up and then just returns, the task ends
*normally*: ``task.cancelled()`` is False, the result is None, and whoever
cancelled it (a timeout, a shutdown, a TaskGroup) believes the work finished.

asyncwatch reports ``cancellation_swallowed`` at the await where the
cancellation landed (inside long_operation), and says who cancelled it.

    python examples/swallowed_cancel.py
    asyncwatch run examples/swallowed_cancel.py
"""

import asyncio


async def long_operation():
    await asyncio.sleep(10)  # <- asyncwatch reports this line


async def cleanup():
    await asyncio.sleep(0.01)  # cleanup can be async too
    print("work: cleaned up")


async def work():
    try:
        await long_operation()
    except asyncio.CancelledError:  # <- ...and this one as what swallowed it
        await cleanup()
        # Mistake: no `raise` here, so the cancellation is swallowed.


async def main():
    task = asyncio.create_task(work())
    await asyncio.sleep(0.05)
    task.cancel()  # <- asyncwatch names this line as the canceller
    await asyncio.wait([task])
    print(f"main: task.cancelled() = {task.cancelled()}, result = {task.result()!r}")  # False, None


if __name__ == "__main__":
    asyncio.run(main())
