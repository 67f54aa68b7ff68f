"""Telegram shows Markdown literally (``**bold**`` with its asterisks): ``telegram_html`` turns
a message, once split, into the HTML Telegram formats: bold, italic, strikethrough, inline
code, code blocks, headings (shown bold). Everything else is escaped, and tags come out
well nested by construction, so any text makes HTML Telegram accepts. A message is split
first (``adapters.splitting``) and formatted after, so no cut ever falls inside a tag, and
what the user sees (the text less its markup) is never longer than the Markdown the limit
was counted on.
"""

from __future__ import annotations

import html
import re

from adapters.splitting import FENCE, fence_opener, toggles_fence

__all__ = ["telegram_html"]

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
    else escaped. Without Markdown, no tags: the text, escaped."""
    out: list[str] = []
    fence, block = None, []  # the line that opened the code block we are in, and its lines
    for line in text.split("\n"):
        if toggles_fence(line) and fence is not None:
            out.append(_code_block(fence, block, line))
            fence, block = None, []
        elif toggles_fence(line):
            fence = line
        elif fence is not None:
            block.append(line)
        else:
            out.append(_format_line(line))
    if fence is not None:  # never closed: a block to the end
        out.append(_code_block(fence, block, None))
    return "\n".join(out)
