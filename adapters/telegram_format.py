"""Telegram shows Markdown literally (``**bold**`` with its asterisks): ``telegram_html`` turns
a message, once split, into the HTML Telegram formats: bold, italic, strikethrough, inline
code, code blocks, headings (shown bold). Everything else is escaped, and tags come out
well nested by construction, so any text makes HTML Telegram accepts. A message is split
first (``adapters.splitting``) and formatted after, so no cut ever falls inside a tag, and
what the user sees (the text less its markup) is never longer than the Markdown the limit
was counted on. Telegram formats only the first 100 entities of a message and silently drops
the rest (their markers already gone): ``split_for_formatting`` cuts a message holding more,
and past ``MAX_ENTITIES`` (one line holding more) the message goes on as written.

Telegram links every ``@username`` in a message's text (not in its code) and notifies that user if
they are in the chat: a persona copying its author's corpus ("as @someone said") would ping
strangers in a group. ``quiet_mentions`` (plain text), ``quiet_html_mentions`` (``telegram_html``'s
output) and ``quiet_markdown_mentions`` (Markdown sent as plain text) put an invisible word joiner
after each such "@", so Telegram links no one; the text reads the same. Each adds a character per
mention, which the sender allows for. Code is left as written (the last two), to be copied, and so
is every link (all three): Telegram makes no mention inside a link ("medium.com/@jane/post"), and
its link would end at the word joiner.
"""

from __future__ import annotations

import bisect
import html
import re

from telegram.constants import MessageLimit

from adapters.splitting import (
    FENCE,
    MIN_LIMIT_CHARS,
    fence_opener,
    fences_on_own_lines,
    split_message,
    toggles_fence,
)

__all__ = [
    "MAX_ENTITIES", "quiet_html_mentions", "quiet_markdown_mentions", "quiet_mentions", "split_for_formatting",
    "telegram_html",
]

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
# Telegram formats this many entities of a message and silently ignores the rest (found by
# experiment; python-telegram-bot's ``MessageLimit.MESSAGE_ENTITIES``). Past it, Markdown stays as written.
MAX_ENTITIES = MessageLimit.MESSAGE_ENTITIES
_OPENING_TAG = re.compile(r"<(?!/|code class=)")  # an entity each; ``<pre><code class=…>`` is one
# An "@" that Telegram reads as the start of a mention: not after a letter, digit or underscore (an
# e-mail address), and before a username's first character. Telegram links only usernames of 4 to 32
# characters; every such "@" is quieted, as one quieted needlessly costs nothing.
_MENTION_AT = re.compile(r"(?<!\w)@(?=[A-Za-z0-9_])")
WORD_JOINER = "\u2060"  # invisible, and no break: "@\u2060name" reads "@name" and is no username
# A link as Telegram finds one (tdlib's URL finder, in short): a dotted host after http://, https://,
# ftp:// or tonsite://, or a dotted domain with no scheme when a path, query or fragment follows
# ("medium.com/@jane"), to the first space, "<", ">", '"', « or », or U+2000 to U+206F (the word
# joiner among them). "&lt;" and "&gt;" end one too: they are "<" and ">" in ``telegram_html``'s output.
_URL_PATH = r"(?:(?!&[lg]t;)[^\s<>\"«»\u2000-\u206f])*"
_URL = re.compile(
    rf"(?i:https?|ftp|tonsite)://(?:[^\s/@<>\"]+@)?[\w~-]+(?:\.[\w~-]+)+(?::\d{{1,5}})?(?:[/?#]{_URL_PATH})?"
    rf"|(?<![\w~./#@-])[\w~-]+(?:\.[\w~-]+)*\.[^\W\d_]{{2,}}(?::\d{{1,5}})?[/?#]{_URL_PATH}"
)
# ``telegram_html``'s code: Telegram links nothing inside it. Its text is escaped: no "<" in it.
_HTML_CODE = re.compile(r"(<pre>(?:<code[^>]*>)?[^<]*(?:</code>)?</pre>|<code>[^<]*</code>)")


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
    language = fence_opener(fence).strip()[len(FENCE):]
    if language:
        return f'<pre><code class="language-{language}">{body}</code></pre>'
    return f"<pre>{body}</pre>"


def telegram_html(text: str) -> str:
    """``text`` (a message, split already) with its Markdown as Telegram's HTML; everything
    else escaped. Without Markdown, no tags: the text, escaped. Past ``MAX_ENTITIES``, as written."""
    return "\n".join(_within_entity_limit(_html_parts(text)))


def quiet_mentions(text: str) -> str:
    """``text`` with every @mention outside its links unlinked (a word joiner after its "@"): sent
    as it is, it notifies no one."""
    return _quiet_outside(text, _spans(_URL, text))


def quiet_html_mentions(markup: str) -> str:
    """``telegram_html``'s ``markup`` with every @mention outside its code and links unlinked (code
    is shown, and copied, as written: Telegram links nothing there)."""
    return _quiet_outside(markup, _spans(_HTML_CODE, markup) + _spans(_URL, markup))


def quiet_markdown_mentions(text: str) -> str:
    """``text``, Markdown to be sent as plain text (Telegram refused its HTML), with every @mention
    outside its code and links unlinked: code copied from it runs as written."""
    return _quiet_outside(text, _markdown_code(text) + _spans(_URL, text))


def _spans(pattern: re.Pattern[str], text: str) -> list[tuple[int, int]]:
    return [match.span() for match in pattern.finditer(text)]


def _quiet_outside(text: str, kept: list[tuple[int, int]]) -> str:
    """``text`` with a word joiner after each mention's "@" that lies in none of the ``kept`` spans."""
    merged: list[tuple[int, int]] = []  # the spans in order, overlapping ones (a link in code) as one
    for start, end in sorted(kept):
        if merged and start <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(end, merged[-1][1]))
        else:
            merged.append((start, end))
    starts = [start for start, _end in merged]
    out: list[str] = []
    position = 0
    for match in _MENTION_AT.finditer(text):
        before = bisect.bisect_right(starts, match.start())  # the spans starting at or before the "@"
        if before and match.start() < merged[before - 1][1]:
            continue
        out += [text[position:match.end()], WORD_JOINER]
        position = match.end()
    return "".join(out) + text[position:]


def _markdown_code(text: str) -> list[tuple[int, int]]:
    """Where ``text``'s code blocks (fence lines included) and code spans are, as ``telegram_html``
    finds them line by line."""
    code: list[tuple[int, int]] = []
    offset = 0
    inside = False
    for line in text.split("\n"):
        toggles = toggles_fence(line)
        if inside or toggles:
            code.append((offset, offset + len(line)))
        else:
            code += [(offset + start, offset + end) for start, end in _spans(_CODE_SPAN, line)]
        inside ^= toggles
        offset += len(line) + 1
    return code


def split_for_formatting(text: str) -> list[str]:
    """``text`` (a message, split already) in as few messages as keep each within Telegram's
    ``MAX_ENTITIES`` once formatted, cut where ``split_message`` cuts: none then shows plain."""
    if _entity_count(text) <= MAX_ENTITIES or len(text) < 2 * MIN_LIMIT_CHARS:
        return [text]
    return [part for half in split_message(text, len(text) // 2 + 1) for part in split_for_formatting(half)]


def _entity_count(text: str) -> int:
    return sum(len(_OPENING_TAG.findall(markup)) for markup, _written in _html_parts(text))


def _html_parts(text: str) -> list[tuple[str, str]]:
    """Each line, or code block, of ``text``: its HTML, and its text as written."""
    parts: list[tuple[str, str]] = []
    fence, block = None, []  # the line that opened the code block we are in, and its lines
    for line in fences_on_own_lines(text).split("\n"):
        if toggles_fence(line) and fence is not None:
            parts.append((_code_block(fence, block, line), "\n".join([fence, *block, line])))
            fence, block = None, []
        elif toggles_fence(line):
            fence = line
        elif fence is not None:
            block.append(line)
        else:
            parts.append((_format_line(line), line))
    if fence is not None:  # never closed: a block to the end
        parts.append((_code_block(fence, block, None), "\n".join([fence, *block])))
    return parts


def _within_entity_limit(parts: list[tuple[str, str]]) -> list[str]:
    """The parts' HTML while the message's entities stay within ``MAX_ENTITIES``; from the part
    that would pass it on, each as written (escaped). Telegram would show those with their
    Markdown markers gone and no formatting in their place: a code block as prose."""
    out: list[str] = []
    entities = 0
    for index, (markup, written) in enumerate(parts):
        entities += len(_OPENING_TAG.findall(markup))
        if entities > MAX_ENTITIES:
            return out + [_escape(as_written) for _markup, as_written in parts[index:]]
        out.append(markup)
    return out
