"""Exercise 2: producer / consumer over asyncio.Queue(maxsize=10) in a TaskGroup.

The chapter's exercise: a producer and a consumer share a bounded queue and
pass 100 items.  The consumer is slower than the producer, so the queue fills
up; then ``await queue.put()`` makes the producer wait until the consumer
takes an item.  That is backpressure: the queue never grows past maxsize.

This is correct code: asyncwatch reports nothing.

    python examples/exercise_producer_consumer.py
    asyncwatch run examples/exercise_producer_consumer.py
"""

import asyncio

ITEMS = 100
MAXSIZE = 10


async def producer(queue, stats):
    for i in range(ITEMS):
        if queue.full():
            stats["producer_waits"] += 1  # the put() below will wait: backpressure
        await queue.put(i)
        stats["max_qsize"] = max(stats["max_qsize"], queue.qsize())
    await queue.put(None)  # end-of-stream signal


async def process(item):
    await asyncio.sleep(0.002)  # the consumer is the slow side
    return item * item


async def consumer(queue, stats):
    while True:
        item = await queue.get()
        if item is None:
            queue.task_done()
            break
        await process(item)
        stats["consumed"] += 1
        queue.task_done()


async def main():
    queue = asyncio.Queue(maxsize=MAXSIZE)
    stats = {"max_qsize": 0, "producer_waits": 0, "consumed": 0}
    async with asyncio.TaskGroup() as tg:
        tg.create_task(producer(queue, stats))
        tg.create_task(consumer(queue, stats))
    print(f"consumed {stats['consumed']} items")
    print(f"largest queue size seen: {stats['max_qsize']} (maxsize {MAXSIZE})")
    print(f"the producer found the queue full and waited {stats['producer_waits']} times")


if __name__ == "__main__":
    asyncio.run(main())
