"""A tiny order service for the Jaeger example: four requests at once, each
fanning out into tasks.  Two of them go wrong in ways asyncio keeps quiet:

* order 2 renders its invoice with blocking code, holding the event loop;
* order 3 cancels a notification task that swallows the cancellation.

Run it under asyncwatch with OTLP export (see README.md in this directory):

    asyncwatch run --otlp --spans all examples/jaeger/shop.py

It uses only the OpenTelemetry API: ``asyncwatch run --otlp`` sets up the SDK
and the exporter, as a deployment would with its own configuration.  Every
wait is short; the whole run takes about half a second.
"""

import asyncio
import time

from opentelemetry import trace

tracer = trace.get_tracer("shop")


async def fetch_price(item: str) -> float:
    await asyncio.sleep(0.03)  # a call to the pricing service
    return 1.5 * len(item)


async def reserve_stock(item: str) -> bool:
    await asyncio.sleep(0.05)  # a call to the warehouse
    return True


def render_invoice(order_id: int) -> str:
    time.sleep(0.15)  # blocking work inside a coroutine: the whole loop waits  # <- blocking
    return f"invoice-{order_id}.pdf"


async def notify_customer(order_id: int) -> None:
    try:
        await asyncio.sleep(10)  # waits for the mail server's acknowledgment  # <- swallowed here
    except asyncio.CancelledError:
        pass  # gives up quietly: the cancellation is swallowed


async def handle_order(order_id: int, items: list[str]) -> float:
    """One request: a span of its own, the tasks it starts nest under it."""
    with tracer.start_as_current_span("POST /orders", attributes={"order.id": order_id}):
        async with asyncio.TaskGroup() as group:
            prices = [group.create_task(fetch_price(item)) for item in items]
            group.create_task(reserve_stock(items[0]))
        if order_id == 2:
            render_invoice(order_id)
        if order_id == 3:
            notification = asyncio.create_task(notify_customer(order_id))
            await asyncio.sleep(0.02)
            notification.cancel("order shipped")  # <- cancelled here
            await notification
        return sum(price.result() for price in prices)


async def main() -> None:
    orders = {1: ["apple", "pear"], 2: ["plum"], 3: ["fig", "kiwi"], 4: ["lime"]}
    totals = await asyncio.gather(*(handle_order(order_id, items) for order_id, items in orders.items()))
    print("orders handled:", ", ".join(f"{total:.2f}" for total in totals))


if __name__ == "__main__":
    asyncio.run(main())
