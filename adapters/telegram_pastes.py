"""A long paste that Telegram's apps sent in pieces, gathered to be answered as one message.

Telegram's apps send a paste longer than 4,096 characters as several messages, and each
was answered alone: several answers, each to a fragment (in a group, only the piece
holding the mention). ``Pastes.gather`` holds a message long enough to be a piece for a
short window; the next messages of the same sender in the same chat and topic join it,
and a short one, which only a paste's last piece can be, ends it at once. A short message
that follows no long one never waits. An edit of a piece (``Pastes.edited``) stands for it
in its paste, so a paste edited to mention the bot is answered whole, not that piece alone.

Gathering needs the pieces in the order they were sent, as long polling hands them out; by
webhook, ``telegram_order.InOrder`` restores that order first.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections import OrderedDict

from telegram import Update

from adapters.splitting import TELEGRAM_MESSAGE_LIMIT_CHARS

__all__ = ["PASTE_PIECE_MIN_UNITS", "Paste", "Pastes", "join_pieces", "utf16_units"]

log = logging.getLogger(__name__)

# Telegram's apps send a paste longer than a message in pieces, counting UTF-16 units: the
# desktop app cuts each past half the limit (at a line break or space, which Telegram then
# trims), the mobile apps at the limit. A message this long may be such a piece.
PASTE_PIECE_MIN_UNITS = 2000
# Pastes gathered, kept so that an edit of one of their pieces finds the others.
MAX_REMEMBERED_PASTES = 256


def utf16_units(text: str) -> int:
    """A text's length as Telegram's apps count it when they cut a paste into pieces (half an emoji,
    a lone surrogate from a webhook sender or a Bot API server of one's own, counts one)."""
    return len(text.encode("utf-16-le", "surrogatepass")) // 2


def join_pieces(texts: list[str]) -> str:
    """A paste from its pieces: one that fills a message was cut mid-word (as the mobile apps
    cut); any other at a line break or space that Telegram trimmed away. Halves of an emoji
    (surrogates) side by side are joined, and one alone becomes U+FFFD: it has no UTF-8 to send."""
    joined = texts[0]
    for previous, text in itertools.pairwise(texts):
        joined += ("" if utf16_units(previous) >= TELEGRAM_MESSAGE_LIMIT_CHARS else "\n") + text
    return joined.encode("utf-16-le", "surrogatepass").decode("utf-16-le", "replace")


def _identity(update: Update) -> tuple[int, int]:
    """A message's chat and id: message ids are counted per chat."""
    return update.effective_message.chat_id, update.effective_message.message_id


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

    def holds(self, update: Update) -> bool:
        """Whether that message (in its first version, or an edit) is a piece of this paste."""
        return any(_identity(u) == _identity(update) for u in self.updates)

    def replace(self, update: Update) -> None:
        """Put an edited piece where the piece it edits was."""
        self.updates = [update if _identity(u) == _identity(update) else u for u in self.updates]

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

    def __init__(self, window_s: float, keep_s: float = 3600.0) -> None:
        self.window_s = window_s
        self.keep_s = keep_s
        self._open: dict[tuple, Paste] = {}
        self._ending: set[Paste] = set()  # ended by their last piece, not yet handed back
        # Every piece of a gathered paste, by (chat id, message id).
        self._pieces: dict[tuple[int, int], Paste] = {}
        self._gathered: OrderedDict[Paste, float] = OrderedDict()  # oldest first

    def edited(self, update: Update) -> list[Update] | None:
        """The paste an edited message is a piece of, with the edit in its place, oldest first;
        [] when that paste is still being gathered (the edit then stands in it, and the handler
        of its first piece answers it); None when the message is no piece of a paste known."""
        for paste in [*self._open.values(), *self._ending]:
            if paste.holds(update):
                paste.replace(update)
                return []
        found = self._pieces.get(_identity(update))
        if found is None:
            return None
        found.replace(update)
        return sorted(found.updates, key=lambda u: u.effective_message.message_id)

    def _remember(self, paste: Paste) -> None:
        """Keep a gathered paste for ``keep_s`` (and at most MAX_REMEMBERED_PASTES of them)."""
        now = time.monotonic()
        self._gathered[paste] = now
        self._pieces.update(dict.fromkeys(map(_identity, paste.updates), paste))
        while self._gathered and (
            len(self._gathered) > MAX_REMEMBERED_PASTES or next(iter(self._gathered.values())) < now - self.keep_s
        ):
            old, _ = self._gathered.popitem(last=False)
            for update in old.updates:
                self._pieces.pop(_identity(update), None)

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
                self._ending.add(paste)
            return []
        if not long or self.window_s <= 0:
            return [update]
        paste = self._open[key] = Paste(update)
        try:
            updates = await paste.complete(self.window_s)
        finally:
            if self._open.get(key) is paste:
                del self._open[key]
            self._ending.discard(paste)
        if len(updates) > 1:
            log.info("a paste in %d pieces from %s is answered as one message", len(updates), key)
            self._remember(paste)
        return updates
