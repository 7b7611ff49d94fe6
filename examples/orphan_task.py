"""Mistake: a background task whose reference is dropped.

From the chapter ("keep a reference to the Task"): the event loop keeps only
a weak reference to tasks.  If nobody else holds the Task returned by
``asyncio.create_task``, the garbage collector may destroy it while it is
still pending, and the background work silently disappears.

Here the background task waits for a reply on a future that only it knows
about (think of a request to a peer that went away), so the only references
to the task form a cycle through that future: ``gc.collect()`` (or any
automatic collection) destroys it mid-flight.

asyncwatch reports ``task_destroyed_pending`` at the line that created the
task.  (asyncio itself logs "Task was destroyed but it is pending!", with no
line number.)

    python examples/orphan_task.py
    asyncwatch run examples/orphan_task.py
"""

import asyncio
import gc


async def background_work():
    loop = asyncio.get_running_loop()
    reply = loop.create_future()  # only this coroutine holds the future
    print("background work: waiting for a reply")
    await reply
    print("background work: done")  # never printed


async def main():
    asyncio.create_task(background_work())  # <- asyncwatch reports this line
    await asyncio.sleep(0.01)  # the task starts and suspends on its future
    gc.collect()  # an automatic collection can happen at any moment; force one
    await asyncio.sleep(0.01)
    print("main: finished; the background work vanished without a word")


if __name__ == "__main__":
    asyncio.run(main())
