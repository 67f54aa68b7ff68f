"""Showing "typing…" for as long as a reply is being made, refreshed at the platform's pace."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable

__all__ = ["keep_typing"]

log = logging.getLogger(__name__)


@contextlib.asynccontextmanager
async def keep_typing(send: Callable[[], Awaitable[object]], interval_s: float) -> AsyncIterator[None]:
    """Call ``send`` now and every ``interval_s`` until the block ends; failures only log."""

    async def refresh() -> None:
        while True:
            try:
                await send()
            except Exception as exc:  # a lost "typing" must never cost the reply
                log.debug("could not show typing: %s", exc)
            await asyncio.sleep(interval_s)

    task = asyncio.create_task(refresh())
    try:
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
