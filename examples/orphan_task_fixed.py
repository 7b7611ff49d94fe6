"""Fixed: keep a reference to every background task.

The chapter's pattern: put each task in a set and let the task remove itself
when it is done (``add_done_callback(background_tasks.discard)``).  The set
keeps the task alive until it finishes.  (``asyncio.TaskGroup``, 3.11+, does
this for you and also waits for the tasks.)

Same background work as orphan_task.py; after the same ``gc.collect()`` the
task is still alive, and main shuts it down explicitly at the end.

asyncwatch reports nothing.

    python examples/orphan_task_fixed.py
    asyncwatch run examples/orphan_task_fixed.py
"""

import asyncio
import gc


async def background_work():
    loop = asyncio.get_running_loop()
    reply = loop.create_future()
    print("background work: waiting for a reply")
    await reply
    print("background work: done")


async def main():
    background_tasks = set()
    task = asyncio.create_task(background_work())
    background_tasks.add(task)  # a strong reference: the GC cannot take it
    task.add_done_callback(background_tasks.discard)  # ...and it cleans up after itself

    await asyncio.sleep(0.01)
    gc.collect()
    await asyncio.sleep(0.01)
    print(f"main: after gc.collect() the background task is still there (pending: {not task.done()})")

    # Shut the background work down on purpose before leaving.
    for t in background_tasks:
        t.cancel()
    await asyncio.gather(*background_tasks, return_exceptions=True)
    print(f"main: background task cancelled: {task.cancelled()}; tasks left: {len(background_tasks)}")


if __name__ == "__main__":
    asyncio.run(main())
