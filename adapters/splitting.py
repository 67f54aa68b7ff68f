"""Splitting a long reply into messages a platform accepts.

Cuts fall at a paragraph break if one is near the limit, else a line break, else a
space; a word is cut only when it alone is longer than a message. A code block that
must be cut is closed at the end of one message and reopened (same language) at the
start of the next, so no message ever carries an unbalanced fence. Lengths are counted
in UTF-16 code units, as both Telegram and Discord count them, so emoji never push a
message over the limit.
"""

from __future__ import annotations

import re

__all__ = [
    "DISCORD_MESSAGE_LIMIT_CHARS",
    "TELEGRAM_MESSAGE_LIMIT_CHARS",
    "split_message",
    "utf16_length",
]

TELEGRAM_MESSAGE_LIMIT_CHARS = 4096
DISCORD_MESSAGE_LIMIT_CHARS = 2000

FENCE = "```"
CLOSE_FENCE = "\n" + FENCE
MIN_LIMIT_CHARS = 40
# A cut earlier than this share of the budget wastes too much of a message.
GOOD_CUT_SHARE = 0.5
_LANGUAGE = re.compile(r"\w{0,20}")


def utf16_length(text: str) -> int:
    """Length as Telegram and Discord count it (astral characters count twice)."""
    return len(text) + sum(1 for ch in text if ord(ch) > 0xFFFF)


def _fits(text: str, units: int) -> int:
    """How many leading characters of ``text`` fit in ``units`` UTF-16 code units."""
    used = 0
    for index, ch in enumerate(text):
        used += 2 if ord(ch) > 0xFFFF else 1
        if used > units:
            return index
    return len(text)


def _toggles(line: str) -> bool:
    """Whether this line opens or closes a fenced code block."""
    stripped = line.strip()
    return stripped.startswith(FENCE) and FENCE not in stripped[len(FENCE):]


def _opener(line: str) -> str:
    """The fence that reopens a block whose opening line was ``line``."""
    language = _LANGUAGE.match(line.strip()[len(FENCE):])
    return FENCE + (language.group(0) if language else "") + "\n"


def _fence_state(text: str, opener: str) -> str:
    """The opener of the code block open at the end of ``text`` ('' when none)."""
    for line in text.split("\n"):
        if _toggles(line):
            opener = "" if opener else _opener(line)
    return opener


def _best_cut(window: str, opener: str) -> int:
    """Where to end a message that may hold ``window``; the character there is dropped."""
    floor = int(len(window) * GOOD_CUT_SHARE)
    outside_para = outside_line = any_line = 0
    inside = opener
    position = 0
    lines = window.split("\n")
    for number, line in enumerate(lines[:-1]):
        position += len(line)
        if _toggles(line):
            inside = "" if inside else _opener(line)
        if position > 0:
            any_line = position
            if not inside:
                outside_line = position
                if number + 1 < len(lines) and not lines[number + 1].strip():
                    outside_para = position
        position += 1
    for cut in (outside_para, outside_line, any_line):
        if cut >= max(1, floor):
            return cut
    space = max((i for i, ch in enumerate(window) if ch.isspace() and i > 0), default=0)
    return space or len(window)


def split_message(text: str, limit: int) -> list[str]:
    """Split ``text`` into messages of at most ``limit`` UTF-16 units each."""
    if limit < MIN_LIMIT_CHARS:
        raise ValueError(f"a message limit below {MIN_LIMIT_CHARS} characters cannot hold a code fence")
    chunks: list[str] = []
    opener = ""  # the fence to reopen at the start of the next message
    rest = text.strip()
    while rest:
        ends_inside = _fence_state(rest, opener)
        whole = opener + rest + (CLOSE_FENCE if ends_inside else "")
        if utf16_length(whole) <= limit:
            chunks.append(whole)
            break
        budget = limit - utf16_length(opener) - len(CLOSE_FENCE)
        window_chars = _fits(rest, budget)
        # A whitespace character just past the window is as good a cut as any inside.
        window = rest[: window_chars + 1] if window_chars < len(rest) else rest[:window_chars]
        cut = _best_cut(window, opener)
        cut = min(cut, window_chars)
        piece, rest = rest[:cut].rstrip(), rest[cut:]
        # Drop the separator: newlines only, so the next line keeps its indentation.
        rest = rest.lstrip("\n") if rest[:1] == "\n" else rest.lstrip()
        inside = _fence_state(piece, opener)
        if piece.strip():
            chunks.append(opener + piece + (CLOSE_FENCE if inside else ""))
        opener = inside
    return chunks
