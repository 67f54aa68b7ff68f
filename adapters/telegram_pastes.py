"""A long paste that Telegram's apps sent in pieces, gathered to be answered as one message.

Telegram's apps send a paste longer than 4,096 characters as several messages, and each
was answered alone: several answers, each to a fragment (in a group, only the piece
holding the mention). ``Pastes.gather`` holds a message long enough to be a piece for a
short window; the next messages of the same sender in the same chat and topic join it,
and a short one, which only a paste's last piece can be, ends it at once. A short message
that follows no long one never waits.
"""

from __future__ import annotations

import asyncio
import itertools
import logging

from telegram import Update

from adapters.splitting import TELEGRAM_MESSAGE_LIMIT_CHARS

__all__ = ["PASTE_PIECE_MIN_UNITS", "Paste", "Pastes", "join_pieces", "utf16_units"]

log = logging.getLogger(__name__)

# Telegram's apps send a paste longer than a message in pieces, counting UTF-16 units: the
# desktop app cuts each past half the limit (at a line break or space, which Telegram then
# trims), the mobile apps at the limit. A message this long may be such a piece.
PASTE_PIECE_MIN_UNITS = 2000


def utf16_units(text: str) -> int:
    """A text's length as Telegram's apps count it when they cut a paste into pieces."""
    return len(text.encode("utf-16-le")) // 2


def join_pieces(texts: list[str]) -> str:
    """A paste from its pieces: one that fills a message was cut mid-word (as the mobile apps
    cut); any other at a line break or space that Telegram trimmed away."""
    joined = texts[0]
    for previous, text in itertools.pairwise(texts):
        joined += ("" if utf16_units(previous) >= TELEGRAM_MESSAGE_LIMIT_CHARS else "\n") + text
    return joined


class Paste:
    """The pieces of one paste, as they arrive."""

    def __init__(self, first: Update) -> None:
        self.updates = [first]
        self.ended = False
        self._more = asyncio.Event()

    def add(self, update: Update, *, last: bool) -> None:
        self.updates.append(update)
        self.ended = self.ended or last
        self._more.set()

    async def complete(self, window_s: float) -> list[Update]:
        """The pieces, oldest first, once the last came (a short one) or none came for ``window_s``."""
        while not self.ended:
            self._more.clear()
            try:
                await asyncio.wait_for(self._more.wait(), window_s)
            except TimeoutError:
                break
        return sorted(self.updates, key=lambda update: update.effective_message.message_id)


class Pastes:
    """Pastes sent in pieces, gathered. Telegram's apps send a paste longer than 4,096 characters
    as several messages, and each was answered alone: several answers, each to a fragment (in a
    group, only the piece holding the mention). A message long enough to be a piece waits
    ``window_s`` for the next; the messages of the same sender in the same chat and topic that
    follow within that window join it, and a short one, which only a paste's last piece can be,
    ends it at once. A short message that follows no long one never waits."""

    def __init__(self, window_s: float) -> None:
        self.window_s = window_s
        self._open: dict[tuple, Paste] = {}

    async def gather(self, key: tuple, update: Update) -> list[Update]:
        """The messages to answer as one, oldest first; [] when this one joined a paste, which
        the handler of its first piece answers. Nothing awaits before a message is placed, so
        the pieces, handed to their handlers in order, join in order."""
        long = utf16_units(update.effective_message.text or "") >= PASTE_PIECE_MIN_UNITS
        paste = self._open.get(key)
        if paste is not None:
            paste.add(update, last=not long)
            if paste.ended:
                del self._open[key]
            return []
        if not long or self.window_s <= 0:
            return [update]
        paste = self._open[key] = Paste(update)
        try:
            updates = await paste.complete(self.window_s)
        finally:
            if self._open.get(key) is paste:
                del self._open[key]
        if len(updates) > 1:
            log.info("a paste in %d pieces from %s is answered as one message", len(updates), key)
        return updates
