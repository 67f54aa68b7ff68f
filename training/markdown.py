"""Blog posts in Markdown: front matter (YAML between ``---`` lines, TOML between ``+++``)
read for ``draft``, and the markup stripped to the prose a reader sees (HTML entities decoded).

A draft is left out as Hugo and Jekyll leave it out of the site: ``draft`` or ``published`` in
any case, true or false as a boolean or a string ("true", "yes", "1"), and every post in a
``_drafts`` folder (Jekyll's).

Code blocks, comments, scripts and highlighted code go whole; an opener never closed stays
as text. Every pattern runs in linear time: a post with thousands of unclosed ``<script``
openers or blank lines is read in a second, not minutes (``_sub_spans``). Tables go whole too,
and so do indented code blocks, but not indented prose (``_drop_indented_code`` says which is which).
"""

from __future__ import annotations

import html
import re
import tomllib
from collections.abc import Callable, Iterable
from pathlib import Path

from training.html_text import BLOCK_TAGS, CELL_TAGS, LINE_TAGS
from training.sources import (
    Documents,
    Draft,
    RawDocument,
    ReadOptions,
    SourceProblem,
    read_text_file,
)

__all__ = ["read_markdown", "strip_markdown"]

_FENCE = {"---": "yaml", "+++": "toml"}


def _split_front_matter(path: Path, text: str) -> tuple[dict, str, int]:
    """(front matter, body, line the body starts on); no front matter gives {}."""
    lines = text.split("\n")
    fence = lines[0].strip() if lines else ""
    if fence not in _FENCE:
        return {}, text, 1
    for end in range(1, len(lines)):
        if lines[end].strip() == fence:
            break
    else:
        raise SourceProblem(path, 1, f"front matter opened with {fence!r} is never closed; end it with a {fence!r} "
                                     "line (or, for a rule at the top of the post, put a blank line above it)")
    block = "\n".join(lines[1:end])
    try:
        if _FENCE[fence] == "toml":
            meta = tomllib.loads(block)
        else:
            import yaml

            meta = yaml.safe_load(block) or {}
    except Exception as exc:  # yaml and toml raise their own kinds; both mean a bad header
        line, reason = _header_error(exc)
        raise SourceProblem(path, line + 1, f"bad {_FENCE[fence].upper()} front matter: {reason}") from exc
    if not isinstance(meta, dict):
        raise SourceProblem(path, 2, f"front matter is not a table of keys (for a rule at the top of the "
                                     f"post, put a blank line above its {fence!r})")
    return meta, "\n".join(lines[end + 1 :]), end + 2


def _header_error(exc: Exception) -> tuple[int, str]:
    """(line within the header, reason on one line) for a YAML or TOML error."""
    mark = getattr(exc, "problem_mark", None)  # YAML's, 0-based
    if mark is not None:
        return mark.line + 1, getattr(exc, "problem", None) or str(exc).split("\n")[0]
    found = re.search(r"\s*\(at line (\d+), column \d+\)$", str(exc))  # TOML's
    if found:
        return int(found.group(1)), str(exc)[: found.start()]
    return 1, str(exc).split("\n")[0]


def _sub_spans(text: str, opener: re.Pattern[str], closer_for: Callable[[re.Match[str]], re.Pattern[str]],
               keep: Callable[[re.Match[str], str], str] = lambda opened, inner: "", *, one_line: bool = False,
               inner_min: int = 0) -> str:
    """``re.sub(opener + ".*?" + closer, keep(opener's match, inner))`` (``.`` crossing lines unless
    ``one_line``; ``inner_min`` characters at least between), in linear time.

    The regex looks for a closer after every opener: many openers never closed (``<script`` with no
    ``</script>``) scan to the end many times. Here a closer not found after one place is not looked
    for again after a later one (up to the same line end).
    """
    out: list[str] = []
    done = look = 0
    missing: dict[tuple[str, int], int] = {}  # (closer, where looking stops) -> from where it is absent
    while (start := opener.search(text, look)) is not None:
        closer = closer_for(start)
        stop = text.find("\n", start.end()) if one_line else -1
        stop = len(text) if stop < 0 else stop
        begin = start.end() + inner_min
        key = (closer.pattern, stop)
        close = None if begin >= missing.get(key, stop + 1) else closer.search(text, begin, stop)
        if close is None:
            missing[key] = min(begin, missing.get(key, begin))
            look = start.start() + 1
            continue
        out += [text[done : start.start()], keep(start, text[start.end() : close.start()])]
        done = look = close.end()
    return "".join(out) + text[done:]


_FENCE_OPEN = re.compile(r"^(```|~~~)", re.MULTILINE)
_HTML_COMMENT = re.compile("<!--")
_SCRIPT_OPEN = re.compile(r"<(script|style)\b", re.IGNORECASE)
_JEKYLL_HIGHLIGHT = re.compile(r"\{%-?\s*highlight\b")
_HUGO_HIGHLIGHT = re.compile(r"\{\{([<%])\s*highlight\b")
# Hugo's shortcodes {{< >}} and {{% %}}, and Jekyll's Liquid tags {% %} and output {{ }}.
_TEMPLATE_TAG = re.compile(r"\{\{[<%]?|\{%")
_EMPHASIS_OPEN = re.compile(r"(?<![\w*])([*_])(?!\s)")
# Brackets inside link text are not looked for: each "[" is scanned past once, not to the line's end.
_IMAGE_OPEN = re.compile(r"(?<!\[)!\[([^\[\]]*)\]\(")
_BADGE_OPEN = re.compile(r"(?<=\[)!\[[^\[\]]*\]\(")  # an image that is a link's text: "[![build](...)](...)"
_FILE_NAME = re.compile(r"\S+\.(?:png|jpe?g|gif|svg|webp|avif)", re.IGNORECASE)
_STRUCK_OPEN = re.compile(r"~~(?!\s)")
_LINK_OPEN = re.compile(r"\[([^\[\]]*)\]\(")
_CLOSE_PARENTHESIS = re.compile(r"\)")


# A table's rule under its header: "|---|:---:|", "--- | ---"; a pipe is required ("---" alone is a rule).
_TABLE_RULE = re.compile(r"^ {0,3}\|?[ \t]*:?-+:?[ \t]*(?:\|[ \t]*:?-+:?[ \t]*)*\|?[ \t]*$")
_TABLE_ROW = re.compile(r"^[ \t]*\|.*\|[ \t]*$")  # "| a | b |", a row even with no rule in sight


def _drop_tables(text: str) -> str:
    """Text without its tables: a rule with its header (the line above, if it holds a "|") and its rows
    (the lines below that hold one), and any line that starts and ends with "|"."""
    lines = text.split("\n")
    dropped: set[int] = set()
    for number, line in enumerate(lines):
        if number in dropped:
            continue
        if _TABLE_ROW.match(line):
            dropped.add(number)
        elif "|" in line and _TABLE_RULE.match(line):
            if number and "|" in lines[number - 1]:
                dropped.add(number - 1)
            row = number
            while row < len(lines) and "|" in lines[row]:
                dropped.add(row)
                row += 1
    return "\n".join(line for number, line in enumerate(lines) if number not in dropped)


_LIST_ITEM = re.compile(r"^[ \t]*(?:[-*+]|\d{1,9}[.)])(?:[ \t]+|$)")
# What shows code, not verse: an address (one sign, however many "/" it holds), brackets, operators, a
# call "f(", snake_case, "os.path" or "notes.txt", a command's "-x" or "--flag", a line ending in ":"
# or ";". Prose has some too ("and/or", a link): it is how many there are for the words that tells.
_CODE_SIGN = re.compile(r"(?:https?|ftp)://\S+|[{}\[\]<>=|\\/$#@~^`+]|\w\(|\w_\w|[A-Za-z]{2,}\.[A-Za-z]{2,}"
                        r"|(?:^|\s)--?[a-z]|[:;][ \t]*$")
_CODE_WORDS_PER_SIGN = 4  # at most this many words for each sign: a block of code
_CODE_INDENT_COLUMNS = 4


def _columns(prefix: str) -> int:
    """How many columns a line's start takes (a tab reaches the next multiple of four)."""
    return len(prefix.expandtabs(_CODE_INDENT_COLUMNS))


def _indent(line: str) -> int:
    return _columns(line[: len(line) - len(line.lstrip(" \t"))])


def _looks_like_code(block: list[str]) -> bool:
    """Whether an indented block is code: a sign of code (``_CODE_SIGN``) for every few words."""
    signs = sum(len(_CODE_SIGN.findall(line.strip())) for line in block)
    words = sum(len(line.split()) for line in block)
    return _CODE_WORDS_PER_SIGN * signs >= words


def _drop_indented_code(text: str) -> str:
    """Text without its indented code blocks.

    Markdown's rule, that lines indented four columns after a blank line are code, would also take
    indented prose that a writer means as prose: a list item's next paragraph (indented under its
    item, as Markdown reads it too) and a poem or quotation set in by hand (which a blog shows as
    code, and the author still wrote). So a block is dropped only when it is indented four columns
    more than the list item it follows (if any), and looks like code (``_looks_like_code``): a
    command with no sign of code in it ("    make install") stays, as the price of keeping verse.
    """
    lines = text.split("\n")
    kept: list[str] = []
    item_column = 0  # where the text of the list item the lines belong to starts; 0 outside lists
    after_blank = True
    number = 0
    while number < len(lines):
        line = lines[number]
        if after_blank and line.strip() and _indent(line) >= item_column + _CODE_INDENT_COLUMNS:
            end = following = number  # the block runs on over blank lines to its last indented line
            while following < len(lines) and (not lines[following].strip()
                                               or _indent(lines[following]) >= item_column + _CODE_INDENT_COLUMNS):
                following += 1
                if lines[following - 1].strip():
                    end = following
            if not _looks_like_code(lines[number:end]):
                kept += lines[number:end]
            number, after_blank = end, False
            continue
        if not line.strip():
            after_blank = True
        else:
            if item := _LIST_ITEM.match(line):
                item_column = _columns(item[0])
            elif after_blank and _indent(line) < item_column:  # a paragraph set out of the list ends it
                item_column = 0
            after_blank = False
        kept.append(line)
        number += 1
    return "\n".join(kept)


_SHORTCODE_CLOSE = re.compile(r"[%>]\}\}")
_TEMPLATE_CLOSE = {"{{<": _SHORTCODE_CLOSE, "{{%": _SHORTCODE_CLOSE, "{{": re.compile(r"\}\}"), "{%": re.compile(r"%\}")}
# A backslash before punctuation shows the punctuation (CommonMark); one ending a line breaks it. In
# inline code it is itself: a code span is matched first and given back as it is.
_ESCAPE = re.compile(r"(`[^`\n]*`)|\\([!-/:-@\[-`{-~])|\\(?=\n)")
_ESCAPED_BASE = 0xF0000  # a private-use character stands for an escaped one until the markup is gone
_SHOW_ESCAPED = {_ESCAPED_BASE + code: chr(code) for code in range(0x21, 0x7F) if not chr(code).isalnum()}


def _hide_escaped(match: re.Match[str]) -> str:
    if match[1]:
        return match[1]
    return chr(_ESCAPED_BASE + ord(match[2])) if match[2] else ""


def _tag(names: Iterable[str]) -> str:
    """A pattern for an opening or closing tag of any of these names."""
    return rf"</?(?:{'|'.join(sorted(names))})\b[^<>\n]*>"


# Tags that end a line or a paragraph in the page (as ``html_text`` reads a page): what they part must not
# run together. "<br><br>" is a blank line, "</li><li>" one line break.
_BREAK_TAG = re.compile(r"<br\b[^<>\n]*>", re.IGNORECASE)
_ITEM_TAGS = re.compile(rf"{_tag(LINE_TAGS - {'br'})}(?:[ \t]*{_tag(LINE_TAGS - {'br'})})*", re.IGNORECASE)
_BLOCK_TAG = re.compile(_tag(BLOCK_TAGS), re.IGNORECASE)
_CELL_TAG = re.compile(_tag(CELL_TAGS), re.IGNORECASE)


def _alt_text(opened: re.Match[str], inner: str) -> str:
    """An image's alt text, the author's description of it; not a bare file name ("IMG_0042.jpg")."""
    alt = opened[1].strip()
    return "" if _FILE_NAME.fullmatch(alt) else alt


def strip_markdown(text: str) -> str:
    """Markdown to the plain prose a reader sees."""
    # Code blocks, comments, scripts and Jekyll/Hugo highlighted code go whole; an opener never
    # closed stays (as the regex ".*?" between them would leave it), and costs one look ahead.
    text = _sub_spans(text, _FENCE_OPEN, lambda m: re.compile(rf"^{re.escape(m[1])}\s*$", re.MULTILINE))
    text = _sub_spans(text, _HTML_COMMENT, lambda m: re.compile("-->"))
    text = _sub_spans(text, _SCRIPT_OPEN, lambda m: re.compile(rf"</{m[1].lower()}\s*>", re.IGNORECASE))
    text = _sub_spans(text, _JEKYLL_HIGHLIGHT, lambda m: re.compile(r"\{%-?\s*endhighlight\s*-?%\}"))
    text = _sub_spans(text, _HUGO_HIGHLIGHT, lambda m: re.compile(rf"\{{\{{{re.escape(m[1])}\s*/highlight\s*[%>]\}}\}}"))
    # The other Hugo/Jekyll tags: {{< ... >}}, {{% ... %}}, {% ... %}, {{ ... }}.
    text = _sub_spans(text, _TEMPLATE_TAG, lambda m: _TEMPLATE_CLOSE[m[0]])
    # After the blocks above: a line of theirs read as indented code or a table row could take their closer.
    text = _drop_tables(_drop_indented_code(text))
    text = _ESCAPE.sub(_hide_escaped, text)  # "\*" is a "*" to show, not emphasis: hidden from the markup below
    text = _sub_spans(text, _BADGE_OPEN, lambda m: _CLOSE_PARENTHESIS)  # a linked badge leaves "[](...)"
    text = _sub_spans(text, _IMAGE_OPEN, lambda m: _CLOSE_PARENTHESIS, _alt_text)  # "see ![a map](...)" reads on
    text = _sub_spans(text, _LINK_OPEN, lambda m: _CLOSE_PARENTHESIS, lambda opened, inner: opened[1])  # keep words
    text = re.sub(r"\[([^\[\]]+)\]\[[^\[\]]*\]", r"\1", text)
    text = re.sub(r"^[ \t]*\[\^[^\[\]]+\]:[ \t]*", "", text, flags=re.MULTILINE)  # a footnote keeps its words
    text = re.sub(r"\[\^[^\[\]\s]+\]", "", text)  # footnote marks
    # "^\s*" would try every blank line after each: thousands of them in a row took seconds.
    text = re.sub(r"^[ \t]*\[[^\]\n]+\]:\s*\S+.*$", "", text, flags=re.MULTILINE)  # link definitions
    text = re.sub(r"<((?:https?|ftp)://[^\s<>]+)>", r"\1", text)  # autolinks keep their address
    # A tag starts with a letter, so "3 < 5 and 7 > 2" stays; no "<" inside keeps it linear. Where a
    # tag breaks a line or a paragraph, the words either side must stay apart: "soft<br>upon".
    text = _BREAK_TAG.sub("\n", text)
    text = _ITEM_TAGS.sub("\n", text)
    text = _BLOCK_TAG.sub("\n\n", text)
    text = _CELL_TAG.sub(" ", text)
    text = re.sub(r"</?[A-Za-z][^<>\n]*>", "", text)  # inline HTML
    text = re.sub(r"^\s{0,3}#{1,6}\s*", "", text, flags=re.MULTILINE)
    text = re.sub(r"^\s{0,3}>\s?", "", text, flags=re.MULTILINE)
    text = re.sub(r"^[ \t]*([-*+]|\d+[.)])\s+", "", text, flags=re.MULTILINE)
    text = re.sub(r"^[ \t]*([-*_][ \t]*){3,}$", "", text, flags=re.MULTILINE)  # rules
    text = re.sub(r"(\*\*|__)(.+?)\1", r"\2", text)
    text = _sub_spans(text, _EMPHASIS_OPEN, lambda m: re.compile(rf"(?<!\s){re.escape(m[1])}(?![\w*])"),
                      lambda opened, inner: inner, one_line=True, inner_min=1)
    text = _sub_spans(text, _STRUCK_OPEN, lambda m: re.compile(r"(?<!\s)~~"), lambda opened, inner: inner,
                      one_line=True, inner_min=1)  # struck out, and still the author's words
    text = re.sub(r"`([^`]*)`", r"\1", text)
    # Last, so "&lt;b&gt;" written in the prose stays the text "<b>" a reader sees, not a tag to strip.
    text = html.unescape(text)  # "AT&amp;T", "&mdash;", "&nbsp;" as a reader sees them
    return text.translate(_SHOW_ESCAPED)


_YES_WORDS = frozenset({"true", "yes", "on", "1"})
_NO_WORDS = frozenset({"false", "no", "off", "0"})
_DRAFTS_FOLDER = "_drafts"  # Jekyll's: its posts are drafts by where they are


def _flag(value: object) -> bool | None:
    """A front matter value as true or false, as Hugo casts one ("true", "yes" and 1 are true too);
    None when it is neither."""
    if isinstance(value, bool | int):
        return bool(value)
    if isinstance(value, str):
        word = value.strip().lower()
        return True if word in _YES_WORDS else False if word in _NO_WORDS else None
    return None


class _InDraftsFolder(Draft):
    """A post in Jekyll's ``_drafts`` folder: a draft whatever its front matter says; left out, and said so."""

    def __init__(self, path: Path) -> None:
        SourceProblem.__init__(self, path, None, f"a draft (it is in a {_DRAFTS_FOLDER} folder, whose posts Jekyll "
                                                 "does not publish); move it to _posts to read it")
        self.setting = self.undo = None
        self.folder = _DRAFTS_FOLDER


def _unpublished(path: Path, text: str, meta: dict, start: int) -> Draft | None:
    """Why the post is a draft (its front matter, in any case, or its folder); None when it is not one."""
    for key, unpublished in (("draft", True), ("published", False)):
        for written, value in meta.items():
            if str(written).lower() == key and _flag(value) is unpublished:
                header = text.split("\n")[1:start]
                line = next((n for n, row in enumerate(header, start=2)
                             if re.match(rf"\s*[\"']?{re.escape(str(written))}\b", row)), 1)
                return Draft(path, line, str(written), unpublished)
    if _DRAFTS_FOLDER in path.parent.parts:
        return _InDraftsFolder(path)
    return None


def read_markdown(path: Path, options: ReadOptions) -> Documents:
    """One document per file: the body with front matter and markup stripped; a draft (Hugo's
    ``draft: true``, Jekyll's ``published: false`` or a post in ``_drafts``) is left out, and said so."""
    text = read_text_file(path)  # every line ending in a line feed: TOML refuses a "\r" left at a line's end
    meta, body, start = _split_front_matter(path, text)
    if (draft := _unpublished(path, text, meta, start)) is not None:
        return Documents(left_out=[draft])
    return Documents([RawDocument(strip_markdown(body), str(path), start)])
