"""Exercise 1: limit concurrency with asyncio.Semaphore, compare 1 / 10 / 100.

The chapter's exercise: fetch 100 URLs with concurrency limited by a
Semaphore, run the same job at concurrency 1, 10 and 100, compare the times,
and see why too much concurrency can be *slower*.

No network here: ``fetch`` talks to a simulated server that answers in a few
milliseconds but, like a real one, serves at most ``SERVER_CAPACITY``
requests at a time and rejects the rest ("503, try again later"); the client
then backs off and retries.  At concurrency 1 the server idles; at 10 it is
used fully; at 100 most requests are rejected and retried, and the back-offs
make the whole job slower than at 10.

This is correct code: asyncwatch reports nothing.

    python examples/exercise_semaphore.py
    asyncwatch run examples/exercise_semaphore.py
"""

import asyncio
import time

URLS = [f"https://example.com/item/{i}" for i in range(100)]
RESPONSE_TIME = 0.004  # seconds per request, when the server is not overloaded
SERVER_CAPACITY = 10  # requests the server handles at once
RETRY_AFTER = 0.02  # back-off after a "503 busy" answer


class Overloaded(Exception):
    pass


class FakeServer:
    def __init__(self):
        self.in_flight = 0
        self.rejected = 0

    async def get(self, url):
        if self.in_flight >= SERVER_CAPACITY:
            self.rejected += 1
            raise Overloaded(url)
        self.in_flight += 1
        try:
            await asyncio.sleep(RESPONSE_TIME)
            return f"<html>{url}</html>"
        finally:
            self.in_flight -= 1


async def fetch(server, url):
    while True:
        try:
            return await server.get(url)
        except Overloaded:
            await asyncio.sleep(RETRY_AFTER)


async def fetch_all(urls, concurrency):
    server = FakeServer()
    sem = asyncio.Semaphore(concurrency)

    async def fetch_one(url):
        async with sem:
            return await fetch(server, url)

    results = await asyncio.gather(*[fetch_one(u) for u in urls])
    return results, server.rejected


async def main():
    for concurrency in (1, 10, 100):
        start = time.perf_counter()
        results, rejected = await fetch_all(URLS, concurrency)
        elapsed = time.perf_counter() - start
        print(
            f"concurrency {concurrency:>3}: {len(results)} pages in {elapsed:.2f} s"
            f" ({rejected} requests rejected by the overloaded server)"
        )


if __name__ == "__main__":
    asyncio.run(main())
