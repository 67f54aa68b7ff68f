""""typing…" is refreshed at the given pace, and a failing refresh never breaks the reply."""

from __future__ import annotations

import asyncio
import time

from adapters.typing_indicator import keep_typing


async def test_refreshes_at_the_interval_and_stops():
    calls: list[float] = []

    async def send() -> None:
        calls.append(time.monotonic())

    async with keep_typing(send, 0.2):
        await asyncio.sleep(0.5)
    count = len(calls)
    await asyncio.sleep(0.3)
    assert count == 3 and len(calls) == count
    assert all(b - a >= 0.19 for a, b in zip(calls, calls[1:]))


async def test_a_failing_send_is_only_logged():
    async def send() -> None:
        raise ConnectionError("platform down")

    async with keep_typing(send, 0.05):
        await asyncio.sleep(0.12)
