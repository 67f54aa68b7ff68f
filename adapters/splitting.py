"""Splitting a long reply into messages a platform accepts.

Cuts fall at a paragraph break if one is near the limit, else a line break, else a
space; a word is cut only when it alone is longer than a message. A code block that
must be cut is closed at the end of one message and reopened (same language) at the
start of the next, so no message ever carries an unbalanced fence.

Lengths are counted in Unicode code points (Python's ``len``), as both platforms count
them: the Bot API server refuses a text whose ``utf8_length`` (tdlib's count of code
points) passes 4,096 with "message is too long", and Discord's API measures content with
Python's ``len`` (2,000). Neither counts UTF-16 code units, so an emoji is one
character, not two. A cut never falls inside a user-perceived character (a grapheme
cluster: an emoji with its skin tone or ZWJ family, a flag's two letters, a letter and
its accents) unless that one character is longer than a whole message; and any surrogate
code points in the text are paired up, or replaced when alone, so every message is
valid UTF-8 a platform can read.

Telegram shows Markdown literally (``**bold**`` with its asterisks), so ``telegram_html``
turns a message, once split, into the HTML Telegram formats: bold, italic, strikethrough,
inline code, code blocks, headings (shown bold). Everything else is escaped, and tags come
out well nested by construction, so any text makes HTML Telegram accepts. A message is
split first and formatted after, so no cut ever falls inside a tag, and what the user sees
(the text less its markup) is never longer than the Markdown the limit was counted on.
"""

from __future__ import annotations

import html
import re

import regex

__all__ = [
    "DISCORD_MESSAGE_LIMIT_CHARS",
    "TELEGRAM_MESSAGE_LIMIT_CHARS",
    "split_message",
    "telegram_html",
]

TELEGRAM_MESSAGE_LIMIT_CHARS = 4096
DISCORD_MESSAGE_LIMIT_CHARS = 2000

FENCE = "```"
CLOSE_FENCE = "\n" + FENCE
MIN_LIMIT_CHARS = 40
# A cut earlier than this share of the budget wastes too much of a message.
GOOD_CUT_SHARE = 0.5
_LANGUAGE = re.compile(r"\w{0,20}")
_GRAPHEME = regex.compile(r"\X")
_HEADING = re.compile(r" {0,3}#{1,6}[ \t]+(.+?)(?:[ \t]+#+)?[ \t]*")
_CODE_SPAN = re.compile(r"(`+)(?!`)(.+?)(?<!`)\1(?!`)")
_HELD_CODE = re.compile("\x00(\\d+)\x00")  # where a code span waits while emphasis is found
# Emphasis, as Markdown writes it: the earliest in a line wins, and at one place the first
# listed (``**`` before ``*``). An underscore inside a word (snake_case) is a letter.
_EMPHASIS = (
    (re.compile(r"\*\*\*(?=\S)(.+?)(?<=\S)\*\*\*"), ("b", "i")),
    (re.compile(r"\*\*(?=\S)(.+?)(?<=\S)\*\*"), ("b",)),
    (re.compile(r"(?<![\w_])__(?=\S)(.+?)(?<=\S)__(?![\w_])"), ("b",)),
    (re.compile(r"~~(?=\S)(.+?)(?<=\S)~~"), ("s",)),
    (re.compile(r"(?<!\*)\*(?=[^\s*])(.+?)(?<=[^\s*])\*(?!\*)"), ("i",)),
    (re.compile(r"(?<![\w_])_(?=[^\s_])(.+?)(?<=[^\s_])_(?![\w_])"), ("i",)),
)
_BOLD_ALREADY = re.compile(r"\*\*(?=\S)(.+)(?<=\S)\*\*")
MAX_EMPHASIS_DEPTH = 8  # deeper than any real text nests; past it, markers stay as written


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
    rest = _valid(text).strip()
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


def _escape(text: str) -> str:
    return html.escape(text, quote=False)


def _emphasize(text: str, depth: int = 0) -> str:
    """``text`` (one line, code spans held out) as HTML: each emphasis a tag around its content,
    formatted the same way, so tags always nest; the rest escaped."""
    if depth > MAX_EMPHASIS_DEPTH:
        return _escape(text)
    out: list[str] = []
    position = 0
    # Each pattern's next match at or after ``position``: searched again only once passed,
    # so a long line costs a few searches per pattern, not one per emphasis.
    upcoming: list[re.Match | None] = [pattern.search(text) for pattern, _tag in _EMPHASIS]
    while True:
        for n, (pattern, _tag) in enumerate(_EMPHASIS):
            match = upcoming[n]
            if match is not None and match.start() < position:
                upcoming[n] = pattern.search(text, position)
        found = [(match.start(), n) for n, match in enumerate(upcoming) if match is not None]
        if not found:
            break
        _start, n = min(found)
        match, tags = upcoming[n], _EMPHASIS[n][1]
        out.append(_escape(text[position:match.start()]))
        opening, closing = "".join(f"<{t}>" for t in tags), "".join(f"</{t}>" for t in reversed(tags))
        out.append(f"{opening}{_emphasize(match.group(1), depth + 1)}{closing}")
        position = match.end()
    out.append(_escape(text[position:]))
    return "".join(out)


def _format_line(line: str) -> str:
    """One line outside code blocks as Telegram HTML: a heading bold; code spans, then emphasis."""
    if "\x00" in line:  # the placeholder for code spans: a line holding it stays as written
        return _escape(line)
    heading = _HEADING.fullmatch(line)
    if heading:  # "## **Title**" too: one bold
        title = heading.group(1)
        bold = _BOLD_ALREADY.fullmatch(title)
        return f"<b>{_format_line(bold.group(1) if bold else title)}</b>"
    spans: list[str] = []

    def hold(match: re.Match) -> str:
        code = match.group(2)
        if len(code) > 2 and code[0] == code[-1] == " " and code.strip():
            code = code[1:-1]  # Markdown's padding, so a span can hold a backtick: `` `x` ``
        spans.append(code)
        return f"\x00{len(spans) - 1}\x00"

    formatted = _emphasize(_CODE_SPAN.sub(hold, line))
    return _HELD_CODE.sub(lambda match: f"<code>{_escape(spans[int(match.group(1))])}</code>", formatted)


def _code_block(fence: str, lines: list[str], closing: str | None) -> str:
    """A fenced code block (its opening line, its lines, its closing line if any) as Telegram's
    ``<pre>``, with its language if it names one; an empty one as written."""
    body = _escape("\n".join(lines))
    if not body.strip():
        return _escape("\n".join([fence, *lines, *([closing] if closing is not None else [])]))
    language = _opener(fence).strip()[len(FENCE):]
    if language:
        return f'<pre><code class="language-{language}">{body}</code></pre>'
    return f"<pre>{body}</pre>"


def telegram_html(text: str) -> str:
    """``text`` (a message, split already) with its Markdown as Telegram's HTML; everything
    else escaped. Without Markdown, no tags: the text, escaped."""
    out: list[str] = []
    fence, block = None, []  # the line that opened the code block we are in, and its lines
    for line in text.split("\n"):
        if _toggles(line) and fence is not None:
            out.append(_code_block(fence, block, line))
            fence, block = None, []
        elif _toggles(line):
            fence = line
        elif fence is not None:
            block.append(line)
        else:
            out.append(_format_line(line))
    if fence is not None:  # never closed: a block to the end
        out.append(_code_block(fence, block, None))
    return "\n".join(out)
