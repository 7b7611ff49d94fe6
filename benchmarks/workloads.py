"""The benchmark's workloads: small asyncio programs that stress one hot path each.

Each workload is a coroutine function taking its sizes (a dict of ints) and
returning a dict of facts about what it did (counts, checks), so that the
runner can show that every mode did the same work.  Every loop in here is
bounded by its sizes, so a workload always stops by itself; the TCP echo has a
timeout on top, in case a connection ever stalls.

Sizes: ``full`` is calibrated so that each workload takes roughly 0.3 to 1 s
in plain asyncio on a small (2-core) machine with Python 3.11; ``smoke`` is
tiny, only to prove that the code still runs.  ``benchmarks/run.py --size
workload.name=value`` overrides any of them.

The workloads must produce no asyncwatch findings: they are correct code.  A
finding here is a false positive, and the child runner fails loudly on one.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import os
import resource
import sys
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

__all__ = ["MEMORY", "TIMED", "WORKLOADS", "Workload", "current_rss_bytes"]

Sizes = dict[str, int]
Info = dict[str, Any]


@dataclass(frozen=True)
class Workload:
    """One benchmark program: what it is, its sizes, and the coroutine that runs it."""

    name: str
    description: str
    run: Callable[[Sizes], Awaitable[Info]]
    full: Sizes
    smoke: Sizes
    #: Give the child a longer subprocess timeout than usual (seconds), or None.
    timeout_s: float | None = None
    #: Run once with the smoke sizes before the timed run (see `_child.run_one`).
    warmup: bool = True
    tags: frozenset[str] = field(default_factory=frozenset)

    def sizes(self, smoke: bool, overrides: Sizes | None = None) -> Sizes:
        """The sizes to run with: full or smoke, then *overrides* on top."""
        sizes = dict(self.smoke if smoke else self.full)
        for key, value in (overrides or {}).items():
            if key not in sizes:
                raise KeyError(f"workload {self.name!r} has no size {key!r}; it has: {', '.join(sorted(sizes))}")
            sizes[key] = value
        return sizes


# --- task churn ----------------------------------------------------------------


async def _two_steps(i: int) -> int:
    """A short task: two suspensions, then a result."""
    await asyncio.sleep(0)
    await asyncio.sleep(0)
    return i


async def task_churn(sizes: Sizes) -> Info:
    """Tens of thousands of short tasks through ``gather``, in batches."""
    total, batch = sizes["tasks"], sizes["batch"]
    done = 0
    checksum = 0
    while done < total:
        n = min(batch, total - done)
        results = await asyncio.gather(*[_two_steps(i) for i in range(n)])
        checksum += sum(results)
        done += n
    return {"tasks": done, "checksum": checksum}


# --- call_soon chain -----------------------------------------------------------


async def call_soon_chain(sizes: Sizes) -> Info:
    """A chain of plain callbacks: each one schedules the next with ``call_soon``.

    ``chains`` chains run side by side, so the ready queue is never just one
    handle long (as in a real program with several things going on).
    """
    loop = asyncio.get_running_loop()
    per_chain = sizes["callbacks"] // sizes["chains"]
    remaining = sizes["chains"]
    finished = loop.create_future()
    counted = 0

    def step(left: int) -> None:
        nonlocal remaining, counted
        counted += 1
        if left > 1:
            loop.call_soon(step, left - 1)
            return
        remaining -= 1
        if remaining == 0:
            finished.set_result(None)

    for _ in range(sizes["chains"]):
        loop.call_soon(step, per_chain)
    await finished
    return {"callbacks": counted}


# --- allocating --------------------------------------------------------------


async def allocating(sizes: Sizes) -> Info:
    """Steps that build many small containers, as a parser's output: a young
    collection every ~700 of them, so what ``gc.callbacks`` entries cost each
    collection shows (the other workloads barely collect)."""
    rounds, containers = sizes["rounds"], sizes["containers"]
    made = 0
    for done in range(rounds):
        batch = [[i, [i]] for i in range(containers)]
        made += len(batch)
        if done % 10 == 9:
            await asyncio.sleep(0)
    return {"containers": made * 2}


# --- TCP echo ------------------------------------------------------------------


async def tcp_echo(sizes: Sizes) -> Info:
    """An echo server on 127.0.0.1 (port 0) and N clients x M line messages, with asyncio streams.

    Each client sends a line, waits for the echo, checks it, and repeats M
    times, then closes; the server's handler echoes until end of file.  The
    whole exchange runs under a timeout, so a stalled connection cannot hang.
    """
    clients, messages = sizes["clients"], sizes["messages"]
    payload_size = sizes["payload"]
    handlers_left = clients
    all_handled = asyncio.Event()
    echoed = 0

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal handlers_left
        try:
            while line := await reader.readline():  # ends at the client's EOF
                writer.write(line)
                await writer.drain()
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()
            handlers_left -= 1
            if handlers_left == 0:
                all_handled.set()

    async def client(number: int, port: int) -> int:
        nonlocal echoed
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        body = (f"client {number} ".encode() + b"x" * payload_size)[: max(payload_size - 1, 1)] + b"\n"
        try:
            for _ in range(messages):
                writer.write(body)
                await writer.drain()
                answer = await reader.readline()
                if answer != body:
                    raise AssertionError(f"client {number}: echo mismatch: {answer[:40]!r}")
                echoed += 1
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()
        return messages

    async with asyncio.timeout(sizes["timeout_s"]):
        server = await asyncio.start_server(handle, "127.0.0.1", 0)
        async with server:
            port = server.sockets[0].getsockname()[1]
            sent = await asyncio.gather(*[client(i, port) for i in range(clients)])
            await all_handled.wait()
    return {"clients": clients, "messages": sum(sent), "echoed": echoed}


# --- bounded queue producer / consumer with a Semaphore --------------------------


async def producer_consumer(sizes: Sizes) -> Info:
    """The reference chapter's pattern: ``asyncio.Queue(maxsize=10)`` between a
    producer and consumers in a TaskGroup, with a ``Semaphore`` limiting how many
    items are processed at once.

    One producer puts ``items`` items (backpressure: it waits whenever the queue
    is full), then one ``None`` per consumer as the end-of-stream signal.
    ``consumers`` consumers take items; each processes an item inside
    ``async with sem`` (``Semaphore(concurrency)``, fewer than consumers, so
    the semaphore really blocks) with one suspension as the "work".
    """
    items, consumers = sizes["items"], sizes["consumers"]
    queue: asyncio.Queue[int | None] = asyncio.Queue(maxsize=sizes["maxsize"])
    sem = asyncio.Semaphore(sizes["concurrency"])
    processed = 0
    producer_waits = 0

    async def producer() -> None:
        nonlocal producer_waits
        for i in range(items):
            if queue.full():
                producer_waits += 1
            await queue.put(i)
        for _ in range(consumers):
            await queue.put(None)  # end-of-stream signal, one per consumer

    async def process(item: int) -> int:
        async with sem:
            await asyncio.sleep(0)
            return item

    async def consumer() -> None:
        nonlocal processed
        while True:
            item = await queue.get()
            if item is None:
                queue.task_done()
                break
            await process(item)
            processed += 1
            queue.task_done()

    async with asyncio.TaskGroup() as tg:
        tg.create_task(producer())
        for _ in range(consumers):
            tg.create_task(consumer())
    if processed != items:
        raise AssertionError(f"processed {processed} of {items} items")
    return {"items": processed, "producer_waits": producer_waits}


# --- memory: a million short tasks -------------------------------------------------


def current_rss_bytes() -> int:
    """The process's resident set size now (Linux: /proc/self/statm).

    Elsewhere, fall back to the peak RSS from ``getrusage`` (an upper bound).
    """
    try:
        with open("/proc/self/statm", encoding="ascii") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return peak_rss_bytes()


def peak_rss_bytes() -> int:
    """The process's peak resident set size, from ``getrusage``."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # bytes on macOS, KiB elsewhere


async def _sleeper() -> None:
    await asyncio.sleep(3600)  # cancelled long before that


async def _failing(i: int) -> int:
    await asyncio.sleep(0)
    raise ValueError(i)


async def million_tasks(sizes: Sizes) -> Info:
    """Run ``segments`` x ``segment`` short tasks in batches through ``gather``,
    sampling the RSS (after a full garbage collection) before the first and
    after each segment.

    The mix exercises every per-task path of asyncwatch: most tasks take two
    steps and return, one in ``fail_every`` raises (the exception is retrieved
    by ``gather(return_exceptions=True)``), one in ``cancel_every`` is
    cancelled while it sleeps and re-raises the cancellation, as it should.
    """
    segment, segments, batch = sizes["segment"], sizes["segments"], sizes["batch"]
    fail_every, cancel_every = sizes["fail_every"], sizes["cancel_every"]
    gc.collect()
    samples = [current_rss_bytes()]
    counts = {"tasks": 0, "failed": 0, "cancelled": 0}
    for _ in range(segments):
        done = 0
        while done < segment:
            n = min(batch, segment - done)
            tasks: list[asyncio.Task[Any]] = []
            to_cancel: list[asyncio.Task[Any]] = []
            for i in range(n):
                if cancel_every and i % cancel_every == 0:
                    task: asyncio.Task[Any] = asyncio.create_task(_sleeper())
                    to_cancel.append(task)
                elif fail_every and i % fail_every == 1:
                    task = asyncio.create_task(_failing(i))
                else:
                    task = asyncio.create_task(_two_steps(i))
                tasks.append(task)
            await asyncio.sleep(0)  # let every task take its first step
            for task in to_cancel:
                task.cancel()
            results = await asyncio.gather(*tasks, return_exceptions=True)
            for result in results:
                if isinstance(result, asyncio.CancelledError):
                    counts["cancelled"] += 1
                elif isinstance(result, ValueError):
                    counts["failed"] += 1
            counts["tasks"] += n
            done += n
            del tasks, to_cancel, results
        gc.collect()
        samples.append(current_rss_bytes())
    return {**counts, "segment": segment, "rss_samples": samples}


# --- the registry ------------------------------------------------------------------

WORKLOADS: dict[str, Workload] = {
    w.name: w
    for w in (
        Workload(
            name="task_churn",
            description="short tasks (two steps each) through gather, in batches",
            run=task_churn,
            full={"tasks": 60_000, "batch": 10_000},
            smoke={"tasks": 300, "batch": 100},
        ),
        Workload(
            name="call_soon",
            description="chains of plain call_soon callbacks, each scheduling the next",
            run=call_soon_chain,
            full={"callbacks": 400_000, "chains": 4},
            smoke={"callbacks": 2_000, "chains": 4},
        ),
        Workload(
            name="tcp_echo",
            description="echo server on 127.0.0.1, clients x line messages with asyncio streams",
            run=tcp_echo,
            full={"clients": 40, "messages": 500, "payload": 100, "timeout_s": 120},
            smoke={"clients": 3, "messages": 10, "payload": 100, "timeout_s": 20},
        ),
        Workload(
            name="producer_consumer",
            description="Queue(maxsize=10) producer -> consumers, processing under a Semaphore",
            run=producer_consumer,
            full={"items": 150_000, "consumers": 8, "concurrency": 4, "maxsize": 10},
            smoke={"items": 1_000, "consumers": 8, "concurrency": 4, "maxsize": 10},
        ),
        Workload(
            name="allocating",
            description="steps building small containers: young collections, what gc.callbacks cost",
            run=allocating,
            full={"rounds": 3_000, "containers": 1_000},
            smoke={"rounds": 20, "containers": 1_000},
            tags=frozenset({"collector"}),
        ),
        Workload(
            name="million_tasks",
            description="memory: segments of short tasks (some failing, some cancelled), RSS sampled",
            run=million_tasks,
            full={
                "segment": 500_000,
                "segments": 3,
                "batch": 10_000,
                "fail_every": 20,
                "cancel_every": 20,
            },
            smoke={"segment": 5_000, "segments": 3, "batch": 1_000, "fail_every": 20, "cancel_every": 20},
            timeout_s=900,
            warmup=False,  # the RSS before the first task is the baseline
            tags=frozenset({"memory"}),
        ),
    )
}

#: The workloads `run.py` times by default (``allocating`` is counted in
#: instructions only, by instructions.py).
TIMED: tuple[str, ...] = tuple(name for name, w in WORKLOADS.items() if not w.tags)
#: The workload `memory.py` runs.
MEMORY = "million_tasks"
