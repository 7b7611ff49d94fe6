"""The shared harness itself works on both loops."""

import asyncio
import time

from conftest import line_of


def test_blocking_sleep_is_reported_at_its_line(watched):
    async def main():
        time.sleep(0.25)  # <- blocking
        await asyncio.sleep(0)

    watched.run(main, slow_callback_ms=100)
    slow = watched.of("slow_callback")
    assert len(slow) == 1
    assert slow[0].site.line == line_of("# <- blocking")
    assert slow[0].site.file == __file__
    assert 0.2 <= slow[0].duration_s < 0.5
