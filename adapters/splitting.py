"""Splitting a long reply into messages a platform accepts.

Cuts fall at a paragraph break if one is near the limit, else a line break, else a
space; a word is cut only when it alone is longer than a message. A code block that
must be cut is closed at the end of one message and reopened (same language) at the
start of the next, so no message ever carries an unbalanced fence. A fence written at the end
of a line of prose ("Here is the code: ```python"), as models often write one, is first moved
to a line of its own (``fences_on_own_lines``): Discord opens a block there too, and a fence
is only found at the start of a line.

Lengths are counted in Unicode code points (Python's ``len``), as both platforms count
them: the Bot API server refuses a text whose ``utf8_length`` (tdlib's count of code
points) passes 4,096 with "message is too long", and Discord's API measures content with
Python's ``len`` (2,000). Neither counts UTF-16 code units, so an emoji is one
character, not two. A cut never falls inside a user-perceived character (a grapheme
cluster: an emoji with its skin tone or ZWJ family, a flag's two letters, a letter and
its accents) unless that one character is longer than a whole message; and any surrogate
code points in the text are paired up, or replaced when alone, so every message is
valid UTF-8 a platform can read.
"""

from __future__ import annotations

import re

import regex

__all__ = [
    "DISCORD_MESSAGE_LIMIT_CHARS",
    "TELEGRAM_MESSAGE_LIMIT_CHARS",
    "fence_opener",
    "fences_on_own_lines",
    "split_message",
    "toggles_fence",
]

TELEGRAM_MESSAGE_LIMIT_CHARS = 4096
DISCORD_MESSAGE_LIMIT_CHARS = 2000

FENCE = "```"
CLOSE_FENCE = "\n" + FENCE
MIN_LIMIT_CHARS = 40
# A cut earlier than this share of the budget wastes too much of a message.
GOOD_CUT_SHARE = 0.5
_LANGUAGE = re.compile(r"\w{0,20}")
# A fence that ends a line after other text, with its language if it names one: "The code: ```python".
_FENCE_AFTER_TEXT = re.compile(r"(?P<text>(?:(?!```).)*?\S)[ \t]*(?P<fence>```\w{0,20})[ \t\r]*")
_GRAPHEME = regex.compile(r"\X")


def _valid(text: str) -> str:
    """``text`` with surrogate pairs joined into the characters they encode and lone
    surrogates replaced (U+FFFD): a lone surrogate cannot be sent as UTF-8 at all."""
    if not any("\ud800" <= ch <= "\udfff" for ch in text):
        return text
    return text.encode("utf-16-le", "surrogatepass").decode("utf-16-le", "replace")


def _grapheme_floor(text: str, cut: int) -> int:
    """The last boundary between grapheme clusters at or before ``cut`` (``cut`` itself when
    the first cluster is longer than that: only then is a cluster cut)."""
    if cut >= len(text):
        return cut
    # A boundary before ``cut`` depends only on the characters up to the one after it.
    best = 0
    for match in _GRAPHEME.finditer(text, 0, cut + 1):
        if match.end() > cut:
            break
        best = match.end()
    return best or cut


def toggles_fence(line: str) -> bool:
    """Whether this line opens or closes a fenced code block."""
    stripped = line.strip()
    return stripped.startswith(FENCE) and FENCE not in stripped[len(FENCE):]


def fence_opener(line: str) -> str:
    """The fence that reopens a block whose opening line was ``line``."""
    language = _LANGUAGE.match(line.strip()[len(FENCE):])
    return FENCE + (language.group(0) if language else "") + "\n"


def fences_on_own_lines(text: str) -> str:
    """``text`` with each fence that ends a line of text and really opens or closes a block moved to
    a line of its own: "Here it is: ```python" when the next fence line is a bare closing one, and
    "x = 1```" when it closes such a block and no fence follows. Prose about fences ("you fence
    code with ```" before a "```python" line) and code ending in ``` inside a block stay as written."""
    if FENCE not in text:
        return text
    lines = text.split("\n")
    found = [_FENCE_AFTER_TEXT.fullmatch(line) if not toggles_fence(line) else None for line in lines]
    fence_lines = [n for n, line in enumerate(lines) if found[n] or toggles_fence(line)]
    last_fence = max(fence_lines, default=-1)
    out: list[str] = []
    inside = False
    for number, (line, match) in enumerate(zip(lines, found)):
        closes = match is not None and match["fence"] == FENCE and number == last_fence
        if match and (closes if inside else _opens_block(number, lines, found, fence_lines)):
            out += [match["text"], match["fence"]]
            inside = not inside
        else:
            out.append(line)
            inside ^= toggles_fence(line)
    return "\n".join(out)


def _opens_block(number: int, lines: list[str], found: list[re.Match[str] | None], fence_lines: list[int]) -> bool:
    """Whether the fence that ends line ``number`` opens a block: the next fence line closes one
    (a bare fence, or a last "x = 1```"), and is not the very next line ("with ```" then "```python")."""
    later = next((n for n in fence_lines if n > number), None)
    if later is None or later == number + 1 and toggles_fence(lines[later]):
        return False
    closing = found[later]
    if closing is not None:
        return closing["fence"] == FENCE and later == fence_lines[-1]
    return lines[later].strip() == FENCE


def _fence_state(text: str, opener: str) -> str:
    """The opener of the code block open at the end of ``text`` ('' when none)."""
    for line in text.split("\n"):
        if toggles_fence(line):
            opener = "" if opener else fence_opener(line)
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
        if toggles_fence(line):
            inside = "" if inside else fence_opener(line)
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


def _cut(rest: str, opener: str, window_chars: int) -> int:
    """Where to end a message that may hold ``window_chars`` characters of ``rest``."""
    # A whitespace character just past the window is as good a cut as any inside.
    window = rest[: window_chars + 1] if window_chars < len(rest) else rest[:window_chars]
    cut = _best_cut(window, opener)
    return _grapheme_floor(rest, min(cut, window_chars))


def split_message(text: str, limit: int) -> list[str]:
    """Split ``text`` into messages of at most ``limit`` characters (code points) each."""
    if limit < MIN_LIMIT_CHARS:
        raise ValueError(f"a message limit below {MIN_LIMIT_CHARS} characters cannot hold a code fence")
    chunks: list[str] = []
    opener = ""  # the fence to reopen at the start of the next message
    rest = fences_on_own_lines(_valid(text)).strip()
    while rest:
        ends_inside = _fence_state(rest, opener)
        whole = opener + rest + (CLOSE_FENCE if ends_inside else "")
        if len(whole) <= limit:
            chunks.append(whole)
            break
        room = limit - len(opener)
        cut = _cut(rest, opener, room)
        piece = rest[:cut].rstrip()
        if _fence_state(piece, opener) and len(piece) + len(CLOSE_FENCE) > room:
            # It ends inside a code block, so its closing fence must fit too: cut earlier.
            cut = _cut(rest, opener, room - len(CLOSE_FENCE))
        piece, rest = rest[:cut].rstrip(), rest[cut:]
        # Drop the separator: newlines only, so the next line keeps its indentation.
        rest = rest.lstrip("\n") if rest[:1] == "\n" else rest.lstrip()
        inside = _fence_state(piece, opener)
        if piece.strip():
            chunks.append(opener + piece + (CLOSE_FENCE if inside else ""))
        opener = inside
    return chunks

