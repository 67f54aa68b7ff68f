"""The text of HTML as a reader sees it: a page saved from a blog, or a post's HTML in an export.

Mastodon's outbox (``object.content``), Ghost's ``html`` field and a saved ``.html`` page hold the
author's words inside tags and entities. Their text is kept as it reads: a block tag (``<p>``,
``<div>``, ``<h2>``, ``<li>``...) starts a paragraph or a line, ``<br>`` a line, entities
(``&amp;``, ``&mdash;``) are the characters they show, and what is no prose (scripts, styles, a
page's ``<head>``, its navigation and forms) goes whole. A page with an ``<article>`` (or a
``<main>``) gives the text inside it alone: the rest is the site around the post.

A reply's HTML in a Mastodon outbox opens with links to the people it answers
(``<span class="h-card"><a href=... class="u-url mention">@<span>bob</span></a></span>``), put there
by the reply, as X puts its hidden "@bob" before a reply's text: ``html_to_text(...,
leading_mentions=False)`` leaves out those before its first word, and keeps a mention in a sentence.
"""

from __future__ import annotations

import re
from html.parser import HTMLParser
from pathlib import Path

from training.sources import RawDocument, ReadOptions, read_text_file

__all__ = ["BLOCK_TAGS", "CELL_TAGS", "LINE_TAGS", "html_to_text", "looks_like_html", "read_html"]

# How tags part the words either side, here and in the inline HTML of Markdown (``markdown.strip_markdown``).
# Each starts and ends a paragraph (the rows of a table are lines: not its thead, tbody or tfoot).
BLOCK_TAGS = frozenset({"p", "div", "section", "article", "main", "header", "footer", "nav", "aside", "blockquote",
                        "pre", "figure", "figcaption", "h1", "h2", "h3", "h4", "h5", "h6", "ul", "ol", "dl", "table",
                        "hr", "address", "details", "center", "hgroup", "body", "html"})
LINE_TAGS = frozenset({"br", "li", "dt", "dd", "tr", "summary", "caption"})  # each starts a line
CELL_TAGS = frozenset({"td", "th"})  # cells of a row: a space between them
# Their contents are no prose: code run by the page, its styles, the page's head, the site's navigation,
# forms and embedded objects.
_DROPPED_TAGS = frozenset({"script", "style", "head", "title", "template", "noscript", "svg", "math", "nav",
                           "footer", "aside", "form", "button", "select", "textarea", "iframe", "object", "canvas"})
_VOID_TAGS = frozenset({"br", "hr", "img", "input", "meta", "link", "wbr", "source", "area", "base", "col",
                        "embed", "param", "track"})
_PARAGRAPH, _LINE = "\0P", "\0L"  # breaks, resolved once all the text is in
# A tag that only HTML writes: text that has one is HTML, not prose that mentions "<" or ">".
_HTML_TAG = re.compile(r"<(?:/?(?:p|div|span|a|b|i|em|strong|u|s|ul|ol|li|h[1-6]|blockquote|pre|code|figure|"
                       r"table|tr|td|th|article|section|body|html|head|sup|sub|small|mark)|br|hr|img)\b[^<>]*>",
                       re.IGNORECASE)


def looks_like_html(text: str) -> bool:
    """Whether a text holds HTML tags (``<p>``, ``<br/>``, ``<a href=...>``), not only "<" and ">" signs."""
    return _HTML_TAG.search(text) is not None


class _TextParser(HTMLParser):
    """Collects the text of a page, with its breaks, and that of its articles and main part apart."""

    def __init__(self, *, leading_mentions: bool = True) -> None:
        super().__init__(convert_charrefs=True)
        self.cut_mentions = not leading_mentions  # until the first word
        self.in_mention = False
        self.mention = ""  # the last leading mention's text, cut once a space or a line end follows it
        self.everything: list[str] = []
        self.articles: list[str] = []
        self.main: list[str] = []
        self.dropped = 0  # how deep inside tags whose contents go
        self.inside = {"article": 0, "main": 0}
        self.pre = 0

    def _add(self, piece: str) -> None:
        if self.dropped:
            return
        self.everything.append(piece)
        if self.inside["article"]:
            self.articles.append(piece)
        if self.inside["main"]:
            self.main.append(piece)

    def _break(self, tag: str) -> None:
        if tag in BLOCK_TAGS:
            self._add(_PARAGRAPH)
        elif tag in LINE_TAGS:
            self._add(_LINE)
        elif tag in CELL_TAGS:
            self._add(" ")
        else:
            return
        self.mention = ""

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if self.cut_mentions and tag == "a" and _is_mention(attrs):
            self.in_mention, self.mention = True, ""
            return
        if tag in _DROPPED_TAGS:
            self.dropped += 1
            return
        if tag in self.inside:
            self.inside[tag] += 1
        self._break(tag)
        if tag == "pre":
            self.pre += 1
        if tag == "article":  # articles apart, as paragraphs
            self.articles.append(_PARAGRAPH)

    def handle_startendtag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self._break(tag)  # <br/>, <hr/>: nothing inside them to drop

    def handle_endtag(self, tag: str) -> None:
        if self.in_mention and tag == "a":
            self.in_mention = False
            return
        if tag in _DROPPED_TAGS:
            self.dropped = max(0, self.dropped - 1)
            return
        if tag in _VOID_TAGS:  # "</br>", written by some editors, is a <br> to browsers
            self._break(tag)
            return
        if tag not in LINE_TAGS:  # a list item's line ends where the next starts: "</li><li>" is one line end
            self._break(tag)
        if tag == "pre":
            self.pre = max(0, self.pre - 1)
        if tag in self.inside:
            self.inside[tag] = max(0, self.inside[tag] - 1)

    def handle_data(self, data: str) -> None:
        if self.in_mention:
            self.mention += data
            return
        if self.cut_mentions and not self.dropped:
            if data[:1].isspace():
                self.mention = ""
            if data.strip():  # the first word: a mention right before it is the sentence's own ("@bob, thanks")
                self.cut_mentions = False
                self._add(self.mention)
        # Outside <pre>, spaces and line ends in HTML are one space, as a browser shows them.
        self._add(data if self.pre else re.sub(r"\s+", " ", data))


def _is_mention(attrs: list[tuple[str, str | None]]) -> bool:
    """Whether a link is a Mastodon mention of someone (``class="u-url mention"``), not of a hashtag
    (``class="mention hashtag"``)."""
    classes = (dict(attrs).get("class") or "").split()
    return "mention" in classes and "hashtag" not in classes


def _joined(pieces: list[str]) -> str:
    """The collected pieces as text: paragraphs apart by a blank line, lines by a line end."""
    text = "".join(pieces)
    text = re.sub(rf"[ \t]*(?:{_PARAGRAPH}|{_LINE})[ \t]*", lambda m: m.group().strip(" \t"), text)
    text = re.sub(rf"(?:{_LINE}|{_PARAGRAPH})*{_PARAGRAPH}(?:{_LINE}|{_PARAGRAPH})*", "\n\n", text)
    text = text.replace(_LINE, "\n")
    text = re.sub(r"[ \t]+\n", "\n", text)
    return re.sub(r"\n{3,}", "\n\n", text).strip()


def html_to_text(html: str, *, leading_mentions: bool = True) -> str:
    """The text of HTML as it reads: paragraphs apart by a blank line, ``<br>`` a line end, entities decoded,
    scripts, styles, navigation and the page's head left out; only the articles' (or main part's) text when
    the page has them. ``leading_mentions`` False: a reply's mentions before its first word left out."""
    parser = _TextParser(leading_mentions=leading_mentions)
    parser.feed(html)
    parser.close()
    for region in (parser.articles, parser.main, parser.everything):
        text = _joined(region)
        if text:
            return text
    return ""


def read_html(path: Path, options: ReadOptions) -> list[RawDocument]:
    """A saved page or post: one document, its text (see ``html_to_text``)."""
    text = html_to_text(read_text_file(path))
    return [RawDocument(text, str(path))] if text else []
