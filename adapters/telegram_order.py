"""A webhook's Telegram updates, handed on in the order they were sent.

Long polling hands a bot its updates in order. A webhook's come one per request, several at
once, so a paste's short last piece could arrive first: answered alone at once, then the rest
again (``telegram_pastes`` gathers pieces in the order they come). Telegram numbers a bot's
updates one after another (``update_id``) so that a webhook can restore their order.
"""

from __future__ import annotations

import asyncio
import logging

__all__ = ["InOrder"]

log = logging.getLogger(__name__)


class InOrder:
    """Updates handed on in the order Telegram numbered them: its ``update_id`` counts up by one, so
    that a webhook, whose updates come one per request, several at once, can restore their order.
    One that comes before an earlier one waits for it, at most ``wait_s`` from its own arrival (an
    update lost on the way holds the next no longer); one in order, or late, never waits. The first
    update seen starts the count: what came before it is unknown."""

    def __init__(self, wait_s: float) -> None:
        self.wait_s = wait_s
        self._next: int | None = None  # every update numbered below it was handed on, or given up
        self._waiting: dict[int, tuple[asyncio.Future[None], float]] = {}  # id → (its turn, deadline)

    async def turn(self, update_id: int) -> None:
        """Return once every update numbered before this one was handed on, or waited for long enough."""
        try:
            if self._next is not None and update_id > self._next and update_id not in self._waiting:
                await self._wait(update_id)
        finally:
            self._next = max(self._next or 0, update_id + 1)
            self._wake_first()

    async def _wait(self, update_id: int) -> None:
        loop = asyncio.get_running_loop()
        turn = loop.create_future()
        self._waiting[update_id] = turn, loop.time() + self.wait_s
        try:
            await asyncio.wait_for(asyncio.shield(turn), self.wait_s)
        except TimeoutError:
            if update_id != min(self._waiting):  # an earlier one waits too: it goes first
                await turn
            else:
                log.info("update %d came %g s ago, and updates %d to %d never did: handling it now",
                         update_id, self.wait_s, self._next, update_id - 1)
        finally:
            del self._waiting[update_id]

    def _wake_first(self) -> None:
        """Let the earliest update waiting go, if its turn came or it waited long enough. Its task
        runs once the one handed on now awaits, its handler having placed it (``Pastes.gather``)."""
        if not self._waiting:
            return
        first = min(self._waiting)
        turn, deadline = self._waiting[first]
        if not turn.done() and (first <= self._next or asyncio.get_running_loop().time() >= deadline):
            turn.set_result(None)
