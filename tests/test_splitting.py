"""Splitting long replies: every piece fits, nothing is lost, code fences stay balanced."""

from __future__ import annotations

import re

import pytest
import regex
from hypothesis import given, settings
from hypothesis import strategies as st

from adapters.splitting import (
    DISCORD_MESSAGE_LIMIT_CHARS,
    TELEGRAM_MESSAGE_LIMIT_CHARS,
    split_message,
)
from adapters.telegram_format import MAX_ENTITIES, split_for_formatting, telegram_html
from tests.fakes.telegram_api import visible_text


def normalized(text: str) -> str:
    """The text without whitespace and without code fences (which a split may repeat)."""
    return re.sub(r"\s+", "", re.sub(r"```\w*", "", text))


def fences_balanced(chunk: str) -> bool:
    toggles = [line for line in chunk.split("\n") if line.strip().startswith("```") and "```" not in line.strip()[3:]]
    return len(toggles) % 2 == 0


words = st.text(alphabet=st.characters(codec="utf-8", exclude_categories=["Cs", "Zs", "Cc"]), min_size=1, max_size=30)
separators = st.sampled_from([" ", " ", " ", "\n", "\n\n", "  "])
fence_lines = st.sampled_from(["\n```\n", "\n```python\n", "\n```\n"])
pieces = st.lists(st.one_of(words, separators, fence_lines), max_size=300)


@settings(max_examples=300, deadline=None)
@given(pieces, st.sampled_from([40, 64, 200]))
def test_chunks_fit_lose_nothing_and_keep_fences_balanced(parts: list[str], limit: int):
    text = "".join(parts)
    chunks = split_message(text, limit)
    assert all(len(chunk) <= limit for chunk in chunks)
    assert all(chunk.strip() for chunk in chunks)
    assert all(fences_balanced(chunk) for chunk in chunks)
    assert normalized("\n".join(chunks)) == normalized(text)


def test_short_text_is_one_message():
    assert split_message("  hello there  ", DISCORD_MESSAGE_LIMIT_CHARS) == ["hello there"]
    assert split_message("", DISCORD_MESSAGE_LIMIT_CHARS) == []


def test_a_reply_of_exactly_the_limit_is_one_message():
    reply = " ".join(["word"] * 400) + "."  # 2,000 characters, with spaces to cut at
    assert len(reply) == DISCORD_MESSAGE_LIMIT_CHARS
    assert split_message(reply, DISCORD_MESSAGE_LIMIT_CHARS) == [reply]


def test_a_cut_falls_at_a_paragraph_break_rather_than_a_later_line_break():
    """A paragraph of short lines (a list, a poem) is kept whole: the last line break that fits
    would end the first message thirty lines into the second paragraph."""
    first = "\n".join(f"first paragraph, line {n}" for n in range(50))  # 1,239 characters
    second = "\n".join(f"second paragraph, line {n}" for n in range(50))
    assert split_message(first + "\n\n" + second, DISCORD_MESSAGE_LIMIT_CHARS) == [first, second]


def test_words_are_never_broken_and_paragraphs_are_preferred():
    paragraph = " ".join(["word"] * 300)  # 1,499 characters
    text = paragraph + "\n\n" + paragraph
    chunks = split_message(text, DISCORD_MESSAGE_LIMIT_CHARS)
    assert chunks == [paragraph, paragraph]
    long_text = " ".join(f"w{i}" for i in range(3000))
    for chunk in split_message(long_text, TELEGRAM_MESSAGE_LIMIT_CHARS):
        assert all(re.fullmatch(r"w\d+", w) for w in chunk.split())


def test_a_long_code_block_is_closed_and_reopened_with_its_language():
    code = "\n".join(f"    print({i})" for i in range(400))
    text = "Here you go:\n```python\n" + code + "\n```\nDone."
    chunks = split_message(text, DISCORD_MESSAGE_LIMIT_CHARS)
    assert len(chunks) >= 3
    assert chunks[0].startswith("Here you go:")
    for chunk in chunks[1:-1]:
        assert chunk.startswith("```python\n    print(") and chunk.endswith("\n```")
    # indentation survives the cut
    assert all("\n    print(" in chunk or chunk.startswith("```python\n    print(") for chunk in chunks[1:-1])
    assert chunks[-1].endswith("Done.")


def graphemes(text: str) -> list[str]:
    return regex.findall(r"\X", text)


def test_an_emoji_counts_as_one_character_as_on_both_platforms():
    # Telegram's Bot API counts code points (tdlib's utf8_length), as Discord's API does
    # (Python's len): 4,096 emoji are one Telegram message, though 8,192 UTF-16 units.
    assert split_message("😀" * TELEGRAM_MESSAGE_LIMIT_CHARS, TELEGRAM_MESSAGE_LIMIT_CHARS) == ["😀" * 4096]
    chunks = split_message("😀" * 3000, DISCORD_MESSAGE_LIMIT_CHARS)
    assert len(chunks) == 2 and all(len(c) <= 2000 for c in chunks) and "".join(chunks) == "😀" * 3000


CLUSTERS = [
    "👨\u200d👩\u200d👧\u200d👦",  # a family: four emoji joined by ZWJ, one character on screen
    "🇬🇧", "🇯🇵",  # flags: two regional indicators each
    "👍🏽",  # a skin tone
    "e\u0301", "n\u0303\u0323",  # accents as combining marks
    "❤\ufe0f",  # a variation selector
    "a", "😀", "字",
]


@pytest.mark.parametrize("cluster", CLUSTERS[:6])
def test_a_cut_never_falls_inside_a_character_on_screen(cluster: str):
    text = cluster * 700  # no spaces: the cut must fall between characters
    for limit in (DISCORD_MESSAGE_LIMIT_CHARS, TELEGRAM_MESSAGE_LIMIT_CHARS, 41):
        chunks = split_message(text, limit)
        assert all(len(c) <= limit for c in chunks)
        assert all(graphemes(c) == [cluster] * len(graphemes(c)) for c in chunks), "a character was cut"
        assert "".join(chunks) == text


@settings(max_examples=200, deadline=None)
@given(st.lists(st.sampled_from(CLUSTERS), min_size=1, max_size=400), st.sampled_from([40, 64, 200]))
def test_every_message_holds_whole_characters(parts: list[str], limit: int):
    text = "".join(parts)
    chunks = split_message(text, limit)
    assert all(len(chunk) <= limit for chunk in chunks)
    assert [g for chunk in chunks for g in graphemes(chunk)] == graphemes(text)


def test_a_character_longer_than_a_message_is_cut_rather_than_lost():
    zalgo = "z" + "\u0301" * 100  # one character on screen, 101 code points
    chunks = split_message(zalgo, 40)
    assert all(len(c) <= 40 for c in chunks) and "".join(chunks) == zalgo


def test_surrogates_become_valid_text():
    # Joined into the emoji they spell, or replaced when alone: a lone one cannot be sent as UTF-8.
    chunks = split_message("smile \ud83d\ude00 and \ud83d alone", 100)
    assert chunks == ["smile 😀 and \ufffd alone"]
    chunks[0].encode("utf-8")


def test_an_unclosed_fence_is_closed():
    assert split_message("```\ncode", 100) == ["```\ncode\n```"]


def test_a_fence_opened_after_text_on_its_line_is_a_fence_when_split_and_formatted():
    """Models write "Here is the code: ```python": the code was shown as prose on Telegram, the prose
    after it as code, and a message cut inside it for Discord was left with its fence open."""
    code = "".join(f"    result_{i} = compute_value({i}, scale=2)  # step {i}\n" for i in range(60))
    text = "Sure! Here is the code: ```python\n" + code + "```\nThat's all you need."
    parts = split_message(text, 2000)
    assert len(parts) == 2 and all(part.count("```") == 2 for part in parts)
    assert parts[0].startswith("Sure! Here is the code:\n```python\n") and parts[1].startswith("```python\n")
    assert parts[1].endswith("```\nThat's all you need.")
    short = 'Sure! Here is the code: ```python\nprint("hi")\nx = 1```\nThat is all you need.'
    assert telegram_html(short) == ('Sure! Here is the code:\n<pre><code class="language-python">print("hi")\nx = 1'
                                    "</code></pre>\nThat is all you need.")
    assert split_message("The fence is ``` and that is all.", 100) == ["The fence is ``` and that is all."]


def test_a_fence_mentioned_before_a_block_and_one_ending_a_code_line_stay_where_they_are():
    """Moving every fence that ends a line broke correct blocks: "fence code with ```" before a
    "```python" block put print(1) outside the block and "Done." in one, and a code line ending in
    ``` closed its block early, leaving the rest of the code as prose."""
    mentioned = "In Markdown you fence code with ```\n```python\nprint(1)\n```\nDone."
    assert split_message(mentioned, 2000) == [mentioned]
    assert telegram_html(mentioned) == (
        'In Markdown you fence code with ```\n<pre><code class="language-python">print(1)</code></pre>\nDone.'
    )
    code = "```\ncode line ending with ```\nmore\n```"
    assert split_message(code, 2000) == [code]
    assert telegram_html(code) == "<pre>code line ending with ```\nmore</pre>"
    assert split_message("Run this:```\nls\n```", 2000) == ["Run this:\n```\nls\n```"]


def test_a_line_that_opens_and_closes_triple_backticks_opens_no_code_block():
    """Read as the opening fence of a block, "```ls -la``` lists the files." had every message
    after it closed with a stray fence and the next one opened with a bogus "```ls"."""
    text = "```ls -la``` lists the files.\n\n" + " ".join(["word"] * 600)
    chunks = split_message(text, DISCORD_MESSAGE_LIMIT_CHARS)
    assert len(chunks) == 2 and chunks[0].startswith("```ls -la``` lists the files.\n\nword word")
    assert [chunk.count("```") for chunk in chunks] == [2, 0]


def test_limit_too_small_is_refused():
    with pytest.raises(ValueError):
        split_message("x", 10)


def test_a_message_with_no_code_block_open_fills_the_whole_limit():
    """Room for a closing fence was kept in every message, code or not: a paragraph of 1,998
    characters lost its last word to the next message, and a long link was cut in two."""
    paragraph = " ".join(["word"] * 399) + " end"  # 1,998 characters
    assert split_message(paragraph + "\n\nnext paragraph", DISCORD_MESSAGE_LIMIT_CHARS) == [paragraph, "next paragraph"]
    link = "https://example.com/" + "x" * 1975
    assert split_message(f"see {link} ok", DISCORD_MESSAGE_LIMIT_CHARS) == [f"see {link}", "ok"]
    code = "```\n" + "\n".join(["x = 1"] * 400) + "\n```"  # a block still open at a cut keeps room to close
    assert all(len(chunk) <= DISCORD_MESSAGE_LIMIT_CHARS and fences_balanced(chunk)
               for chunk in split_message(code, DISCORD_MESSAGE_LIMIT_CHARS))


def test_markdown_becomes_the_html_telegram_formats():
    """Telegram showed a reply's Markdown as written: ``**bold**`` with its asterisks."""
    text = (
        "## **Steps**\n**Bold**, *italic*, _italic_, ***both***, ~~gone~~ and `x < y && z`.\n"
        "snake_case_name, 2 * 3 * 4, a <tag> & more\n"
        "```python\nif a < b:\n    print('**not bold**')\n```\n* a bullet"
    )
    assert telegram_html(text) == (
        "<b>Steps</b>\n<b>Bold</b>, <i>italic</i>, <i>italic</i>, <b><i>both</i></b>, <s>gone</s> and "
        "<code>x &lt; y &amp;&amp; z</code>.\nsnake_case_name, 2 * 3 * 4, a &lt;tag&gt; &amp; more\n"
        '<pre><code class="language-python">if a &lt; b:\n    print(\'**not bold**\')</code></pre>\n* a bullet'
    )
    assert visible_text(telegram_html(text)).startswith("Steps\nBold, italic, italic, both, gone and x < y && z.")


def test_text_without_markdown_gets_no_tags():
    assert telegram_html("plain <text> & 5 * 3 = 15, file_name_here") == "plain &lt;text&gt; &amp; 5 * 3 = 15, file_name_here"


def test_markers_that_do_not_pair_stay_as_written():
    assert visible_text(telegram_html("**a *b** c*")) == "a *b c*"  # tags nest: the inner * stays
    assert telegram_html("**open only, `and code") == "**open only, `and code"
    assert telegram_html("```\n```") == "```\n```"  # an empty block is no block


markdownish = st.lists(
    st.one_of(words, separators, fence_lines, st.sampled_from(["*", "**", "***", "_", "__", "~~", "`", "``", "<", "&", "#", "## ", "\n> "])),
    max_size=200,
)


@settings(max_examples=300, deadline=None)
@given(markdownish, st.sampled_from([40, 200, TELEGRAM_MESSAGE_LIMIT_CHARS]))
def test_every_split_part_makes_html_telegram_accepts_and_no_longer_to_see(parts: list[str], limit: int):
    """Split, then formatted: the HTML parses as the Bot API parses it (nested tags, nothing
    unescaped), and what the user sees of each part is no longer than the limit it was split to."""
    for chunk in split_message("".join(parts), limit):
        entities: list[str] = []
        shown = visible_text(telegram_html(chunk), entities)
        assert len(shown) <= len(chunk) <= limit
        assert len(entities) <= MAX_ENTITIES


def test_past_telegrams_100_entities_a_message_goes_on_as_written():
    """Telegram formats a message's first 100 entities and silently ignores the rest: the 101st
    bold line showed as plain text, its asterisks gone, and a code block after it as prose."""
    lines = [f"**point {n}** and `code {n}`" for n in range(60)]
    text = "\n".join([*lines, "```python", "print('hi')", "```", "*last*"])
    entities: list[str] = []
    shown = visible_text(telegram_html(text), entities)
    assert len(entities) == 100 and set(entities) == {"b", "code"}
    assert shown.startswith("point 0 and code 0\npoint 1 and code 1\n")
    assert shown.endswith("\npoint 49 and code 49\n" + "\n".join([*lines[50:], "```python", "print('hi')", "```", "*last*"]))


def test_a_message_with_more_than_100_entities_is_cut_so_each_part_is_formatted_whole():
    text = " ".join(f"**word{n}** & `code{n}`" for n in range(150)) + "\n```python\nprint(1)\n```"
    parts = split_for_formatting(text)
    assert len(parts) > 1 and split_for_formatting("**a** b") == ["**a** b"]
    shown = []
    for part in parts:
        entities: list[str] = []
        shown.append(visible_text(telegram_html(part), entities))
        assert 0 < len(entities) <= MAX_ENTITIES
    together = " ".join(shown)
    assert "**" not in together and "```" not in together and "word149 & code149" in together


def test_formatting_a_long_line_of_markup_is_fast():
    import time

    started = time.monotonic()
    for line in ("*a* " * 1000, "**x " + "_y_ " * 1000, "`" * 4000, "*" * 4000, "_a" * 2000):
        visible_text(telegram_html(line))
    assert time.monotonic() - started < 2.0
