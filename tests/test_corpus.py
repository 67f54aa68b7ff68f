"""Corpus building: every source format, cleaning, the saved split, and fuzzed parsers."""

from __future__ import annotations

import codecs
import json
import os
import random
import re
import shutil
import struct
import subprocess
import sys
import time
import tracemalloc
from difflib import SequenceMatcher
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st

from persona.errors import CorpusError
from training.cleaning import (
    CleanOptions,
    clean_documents,
    has_mojibake,
    normalize_text,
)
from training.corpus import Corpus, build_corpus, read_corpus, write_corpus
from training.fortune import read_fortune
from training.json_records import read_jsonl
from training.markdown import read_markdown, strip_markdown
from training.pdf import clean_pages, read_pdf
from training.sources import (
    ReadOptions,
    SourceProblem,
    detect_format,
    read_csv,
    read_text,
)
from training.tweets import read_tweets

OPTIONS = ReadOptions()


def texts(documents) -> list[str]:
    return [d.text.strip() for d in documents]


def test_markdown_with_yaml_front_matter_keeps_only_the_prose(tmp_path: Path):
    post = tmp_path / "2020-01-01-hello.md"
    post.write_text(
        "---\ntitle: Hello\ntags: [a, b]\n---\n# A heading\n\n"
        "Some **bold** and _italic_ words with [a link](https://x.org).\n\n"
        "```python\nprint('code')\n```\n![img](p.png)\n- a list item\n"
    )
    [doc] = read_markdown(post, OPTIONS)
    assert "title" not in doc.text and "code" not in doc.text and "p.png" not in doc.text
    assert "A heading" in doc.text
    assert "Some bold and italic words with a link." in doc.text
    assert "a list item" in doc.text and "- a list" not in doc.text


def test_markdown_with_toml_front_matter_and_drafts(tmp_path: Path):
    post = tmp_path / "post.md"
    post.write_text('+++\ntitle = "Hugo"\ndate = 2021-01-01\n+++\nBody text here.\n')
    assert texts(read_markdown(post, OPTIONS)) == ["Body text here."]
    draft = tmp_path / "draft.md"
    draft.write_text("---\ndraft: true\n---\nNot yet.\n")
    assert read_markdown(draft, OPTIONS) == []
    [why] = read_markdown(draft, OPTIONS).left_out
    assert str(why) == f"{draft}:2: a draft (its front matter sets draft to true); set it to false to read the post"
    unpublished = tmp_path / "jekyll.md"  # Jekyll's way of saying the same
    unpublished.write_text("---\ntitle: Soon\npublished: false\n---\nNot yet.\n")
    [why] = read_markdown(unpublished, OPTIONS).left_out
    assert str(why) == f"{unpublished}:3: a draft (its front matter sets published to false); set it to true to read the post"
    assert read_markdown(unpublished, OPTIONS) == []


def test_markdown_saved_with_windows_line_endings(tmp_path: Path):
    toml = tmp_path / "hugo.md"
    toml.write_bytes(b'+++\r\ntitle = "Hugo"\r\ntags = ["a"]\r\n+++\r\nBody text here.\r\n\r\nSecond paragraph.\r\n')
    assert texts(read_markdown(toml, OPTIONS)) == ["Body text here.\n\nSecond paragraph."]
    yaml = tmp_path / "jekyll.md"
    yaml.write_bytes(b"---\r\ndraft: true\r\n---\r\nNot yet.\r\n")
    assert read_markdown(yaml, OPTIONS) == []


def test_markdown_with_broken_front_matter_names_file_and_line(tmp_path: Path):
    post = tmp_path / "bad.md"
    post.write_text("---\ntitle: [unclosed\nother: 1\n---\nBody\n")
    with pytest.raises(SourceProblem) as caught:
        read_markdown(post, OPTIONS)
    assert "bad.md:" in str(caught.value) and "YAML" in str(caught.value)
    unclosed = tmp_path / "open.md"
    unclosed.write_text("+++\ntitle = 'x'\nBody\n")
    with pytest.raises(SourceProblem, match="never closed"):
        read_markdown(unclosed, OPTIONS)


def test_front_matter_errors_are_one_line_with_the_file_s_line(tmp_path: Path):
    """YAML's message ran over four lines and quoted the line and column within the header."""
    tabbed = tmp_path / "tab.md"
    tabbed.write_text("---\ntitle: A\nother:\tx\n---\nBody\n")
    with pytest.raises(SourceProblem) as caught:
        read_markdown(tabbed, OPTIONS)
    assert str(caught.value).startswith(f"{tabbed}:3: bad YAML front matter: found character") and "\n" not in str(caught.value)
    toml = tmp_path / "hugo.md"
    toml.write_text('+++\ntitle = "ok"\ndate = someday\n+++\nBody\n')
    with pytest.raises(SourceProblem) as caught:
        read_markdown(toml, OPTIONS)
    assert str(caught.value) == f"{toml}:3: bad TOML front matter: Invalid value"


def test_markdown_keeps_the_prose_around_markup_and_drops_code(tmp_path: Path):
    """"3 < 5 and 7 > 2" lost its middle as an HTML tag; a footnote lost its words and kept its
    mark; a linked badge left "[](...)"; script, style and highlight blocks were read as prose."""
    text = normalize_text(strip_markdown(
        "Since 3 < 5 and 7 > 2, we win<br> and <3 you.\n"
        "A claim[^1] and a badge [![build](https://ci/b.svg)](https://ci) here.\n\n"
        "[^1]: The footnote's own words.\n\n"
        "<script>\nvar x = 1;\n</script>\n<style>.a { color: red }</style>\n"
        "{% highlight python %}\nprint('liquid')\n{% endhighlight %}\n"
        '{{< highlight go "linenos=table" >}}\nfmt.Println("hugo")\n{{< /highlight >}}\n'
        "See <https://example.org/page> too.\n"
    ))
    assert "Since 3 < 5 and 7 > 2, we win\nand <3 you." in text  # the <br> breaks the line
    assert "A claim and a badge here." in text and "The footnote's own words." in text
    assert "var x" not in text and "color" not in text and "print" not in text and "Println" not in text
    assert "See https://example.org/page too." in text


def test_markdown_html_entities_are_read_as_the_characters_they_show():
    """Blogs write "&amp;", "&mdash;" and "&nbsp;": they went into the corpus as written, to be learned."""
    post = "AT&amp;T &mdash; a <em>phone</em>&nbsp;company; 3 &lt; 5 and &lt;b&gt; is a tag &#8217;s &copy;"
    assert normalize_text(strip_markdown(post)) == "AT&T — a phone company; 3 < 5 and <b> is a tag ’s ©"


def test_markdown_with_many_brackets_is_read_in_time():
    """Each "[" or "<" was scanned to the line's end: 20,000 "[" took 4 seconds, 100,000 minutes."""
    started = time.perf_counter()
    strip_markdown("[" * 100_000 + " and " + "a <b " * 20_000)
    assert time.perf_counter() - started < 5


def test_markdown_with_many_unclosed_blocks_is_read_in_time():
    """Each "<script" or "{% highlight" never closed was scanned to the text's end: 4,000 of each
    took about 10 seconds, 40,000 a quarter of an hour; 20,000 blank lines took 10 seconds."""
    openers = ["<script>x\n", "<style a=b>\n", "{% highlight py %}\n", "{{< highlight go >}}\n", "<!-- note\n",
               "{% raw\n", "{{< ref\n", "```python\n", "[a](b\n", "_a *b "]
    started = time.perf_counter()
    stripped = [strip_markdown(opener * 4_000) for opener in openers]
    blank = strip_markdown("\n" * 20_000 + "- a list")
    assert time.perf_counter() - started < 3
    assert all(len(text) >= 4_000 for text in stripped)  # nothing closed: nothing goes whole
    assert blank.endswith("\n\na list")


def test_markdown_blocks_are_dropped_when_closed_and_kept_when_not():
    text = strip_markdown(
        "Before.\n<SCRIPT src=x>code()</script >\n<script>never closed\nAfter.\n"
        "{% highlight py %}\nx = 1\n{%- endhighlight -%}\n{% highlight js %} left open\n"
        "{{% highlight go %}}\ngo()\n{{% /highlight %}}\n{{< ref page >}} and {{< unclosed\n"
        "```\nfenced\n```\n```py\nopen fence\n<!-- gone --> and <!-- open\n"
        "A _word_ and *stars* and _open\n"
    )
    for gone in ("code()", "x = 1", "go()", "ref page", "fenced", "gone"):
        assert gone not in text
    for kept in ("Before.", "never closed", "After.", "left open", "{{< unclosed", "open fence", "<!-- open",
                 "A word and stars and _open"):
        assert kept in text


def test_markdown_link_definitions_and_lists_keep_the_lines_around_them():
    """A "[" opening a line and never closed there swallowed every line down to a link definition;
    the blank line before a list or a link definition was eaten with it."""
    text = strip_markdown("Notes.\n\n[draft: fix this later\n\nA paragraph the author wrote.\n\n"
                          "[1]: https://example.com\nIntro:\n\n- one\n- two\n")
    assert "A paragraph the author wrote." in text and "https://example.com" not in text
    assert "Intro:\n\none\ntwo" in text


def test_markdown_tables_and_indented_code_go_and_indented_prose_stays():
    """Tables and indented code blocks were kept as prose: the persona learned to write "| 2019 | 3 |"
    rows and Python. A list item's second paragraph and a poem set in by hand are the author's words."""
    text = normalize_text(strip_markdown(
        "Here are the numbers.\n\n| Year | Books |\n|:-----|------:|\n| 2019 | 3 |\n| 2020 | 5 |\n\n"
        "Name | Age\n--- | ---\nAnn | 3\n\n| a row with no rule under a header |\n\n"
        "To install it:\n\n    pip install -r requirements.txt\n\n"
        "The code:\n\n    def greet(name):\n        return f\"hello {name}\"\n\n\tprint(greet('Ann'))\n\n"
        "A poem I love:\n\n    Whose woods these are I think I know.\n    His house is in the village though;\n\n"
        "- a list item\n\n    that goes on in a second paragraph.\n\n"
        "Tea | coffee: choose one.\n"
    ))
    for gone in ("Year", "2019", "---", "Ann", "a row with no rule", "pip install", "greet", "hello"):
        assert gone not in text
    assert text == ("Here are the numbers.\n\nTo install it:\n\nThe code:\n\nA poem I love:\n\n"
                    "Whose woods these are I think I know.\nHis house is in the village though;\n\n"
                    "a list item\n\nthat goes on in a second paragraph.\n\nTea | coffee: choose one.")


def test_text_splits_on_end_of_text_markers_else_blank_lines(tmp_path: Path):
    marked = tmp_path / "marked.txt"
    marked.write_text("first post\nstill first\n<|endoftext|>\nsecond post<|endoftext|>third")
    assert texts(read_text(marked, OPTIONS)) == ["first post\nstill first", "second post", "third"]
    blank = tmp_path / "blank.txt"
    blank.write_text("one\ntwo\n\n\nthree\n  \nfour\n")
    docs = read_text(blank, OPTIONS)
    assert texts(docs) == ["one\ntwo", "three", "four"]
    assert [d.line for d in docs] == [1, 5, 7]


def test_text_in_windows_1252_is_read_with_a_warning_saying_so(tmp_path: Path, caplog: pytest.LogCaptureFixture):
    """An old fortune file or a Windows export (é as the byte 0xE9) was skipped whole as "not UTF-8 text"."""
    old = tmp_path / "latin1.txt"
    old.write_bytes(b"fine\nalso fine\ncaf\xe9 and \x93quotes\x94 \x96 dashes\n")
    with caplog.at_level("WARNING", logger="training.text_decoding"):
        assert texts(read_text(old, OPTIONS)) == ["fine\nalso fine\ncafé and “quotes” – dashes"]
    [warning] = caplog.messages
    assert f"{old}: not UTF-8, so read as Windows-1252" in warning
    assert "byte 0xE9 at offset 18 (line 3), is 'é'" in warning and "iconv -f ENCODING -t UTF-8" in warning


def test_utf8_text_with_a_part_in_windows_1252_reads_both_parts(tmp_path: Path, caplog: pytest.LogCaptureFixture):
    """Read whole as Windows-1252, the UTF-8 part would come out as "Ã©"; a byte of neither encoding
    is reported with its offset, after a byte-order mark too."""
    mixed = tmp_path / "notes.txt"
    mixed.write_bytes(codecs.BOM_UTF8 + "Crème brûlée, naïvely.\n\n".encode() + b"Caf\xe9 society.\n")
    with caplog.at_level("WARNING", logger="training.text_decoding"):
        assert texts(read_text(mixed, OPTIONS)) == ["Crème brûlée, naïvely.", "Café society."]
    assert "UTF-8 but for 1 byte(s)" in caplog.text and "byte 0xE9 at offset 34 (line 3)" in caplog.text
    dos = tmp_path / "dos.txt"
    dos.write_bytes(b"fine\nbox \x81 and caf\xe9\n")
    with pytest.raises(SourceProblem) as caught:
        read_text(dos, OPTIONS)
    assert caught.value.line == 2 and "neither UTF-8 nor Windows-1252 text (byte 0x81 at offset 9)" in str(caught.value)
    assert "iconv -f ENCODING -t UTF-8" in str(caught.value)


def test_cli_reads_a_latin1_fortune_file_and_says_how(tmp_path: Path):
    """Debian's fortunes converted back to Latin-1, as older releases shipped them: every entry was skipped."""
    fortunes = tmp_path / "wisdom"
    fortunes.write_bytes("Die Gedanken sind frei.\n%\nDer bestirnte Himmel über mir\n-- Kant\n%\n".encode("latin-1"))
    out = tmp_path / "corpus.jsonl"
    result = _persona_cli(str(fortunes), "--format", "fortune", "-o", str(out))
    assert result.returncode == 0, result.stderr
    assert "Der bestirnte Himmel über mir" in read_corpus(out).documents  # "-- Kant" removed
    assert f"{fortunes}: not UTF-8, so read as Windows-1252 (Latin-1): the first, byte 0xFC at offset 47 (line 3)" in result.stderr


def test_text_saved_as_utf16_with_a_byte_order_mark_is_read(tmp_path: Path):
    """Notepad's "Unicode" (UTF-16 with a BOM) was refused as "not UTF-8 text"."""
    for codec in ("utf-16", "utf-16-be", "utf-32"):
        path = tmp_path / f"{codec}.txt"
        bom = codecs.BOM_UTF16_BE if codec == "utf-16-be" else b""
        path.write_bytes(bom + "Première note.\r\n\r\nSeconde note.".encode(codec))
        assert texts(read_text(path, OPTIONS)) == ["Première note.", "Seconde note."]
    binary = tmp_path / "photo.md"
    binary.write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\xff\xfe")
    with pytest.raises(SourceProblem, match="a binary file, not text"):
        read_markdown(binary, OPTIONS)


def test_text_saved_as_utf16_without_a_byte_order_mark_is_read(tmp_path: Path):
    """UTF-16 with no byte-order mark (Python's "utf-16-le", some Windows tools) was refused as "a binary
    file", or, all ASCII, read as UTF-8 with a NUL byte after each letter."""
    notes = {"latin": "Première note.\r\n\r\nSeconde note.", "ascii": "First note.\n\nSecond note.",
             "japanese": "一日一歩。\n\n三日坊主。"}
    for codec in ("utf-16-le", "utf-16-be"):
        for kind, text in notes.items():
            path = tmp_path / f"{kind}-{codec}.txt"
            path.write_bytes(text.encode(codec))
            assert texts(read_text(path, OPTIONS)) == text.replace("\r", "").split("\n\n"), (kind, codec)
    counts = tmp_path / "counts.md"  # NUL bytes where UTF-16 text has them, but numbers, not letters
    counts.write_bytes(struct.pack("<200H", *range(200)))
    with pytest.raises(SourceProblem, match="a binary file, not text"):
        read_markdown(counts, OPTIONS)


def test_a_long_text_file_is_split_in_time(tmp_path: Path):
    """Each piece's line was counted from the file's start: 80,000 paragraphs (4 MB) took a minute."""
    path = tmp_path / "journal.txt"
    path.write_text("".join(f"Entry {i}, a line.\nAnd another.\n\n" for i in range(60_000)))
    started = time.perf_counter()
    documents = read_text(path, OPTIONS)
    assert time.perf_counter() - started < 5
    assert len(documents) == 60_000 and documents[-1].line == 3 * 59_999 + 1


FORTUNES = """\
The only thing we learn from history is that we learn nothing.
\t\t-- Hegel
%
Clothes make the man. Naked people have little or no influence on society.
\t\t-- Mark Twain
%
An unattributed saying
on two lines.
%
Get your facts first, and then you can distort them as much as you please.
\t\t-- Mark Twain, 1894
%
"""


def test_fortune_entries_with_and_without_an_author(tmp_path: Path):
    path = tmp_path / "fortunes"
    path.write_text(FORTUNES)
    assert detect_format(path) == "fortune"
    everything = texts(read_fortune(path, OPTIONS))
    assert len(everything) == 4 and everything[0] == "The only thing we learn from history is that we learn nothing."
    twain = texts(read_fortune(path, ReadOptions(author="Mark Twain")))
    assert twain == [
        "Clothes make the man. Naked people have little or no influence on society.",
        "Get your facts first, and then you can distort them as much as you please.",
    ]
    assert read_fortune(path, ReadOptions(author="Mark")) != []
    assert read_fortune(path, ReadOptions(author="Twainy")) == []


def test_a_fortune_file_saved_as_utf16_is_known_by_its_percent_lines(tmp_path: Path):
    """Its format was told from its bytes read as UTF-8, where UTF-16 has a NUL after each "%": a fortune
    file saved so, with a byte-order mark or without, was read as plain text, "%" lines and all."""
    for codec in ("utf-16", "utf-16-le", "utf-16-be", "utf-32"):
        path = tmp_path / codec / "wisdom"
        path.parent.mkdir()
        path.write_bytes(FORTUNES.encode(codec))
        assert detect_format(path) == "fortune", codec
        twain = build_corpus([path], read_options=ReadOptions(author="Mark Twain")).corpus.documents
        assert sorted(twain) == [
            "Clothes make the man. Naked people have little or no influence on society.",
            "Get your facts first, and then you can distort them as much as you please.",
        ], codec


def _strfile_index(path: Path, flags: int) -> None:
    """The header of the index strfile writes beside a fortune file (version 2, network order)."""
    path.with_name(path.name + ".dat").write_bytes(struct.pack(">5I", 2, 4, 80, 20, flags) + b"%\0\0\0")


def test_fortune_files_as_debian_ships_them(tmp_path: Path):
    """Debian's fortune files: "kids" with its index "kids.dat" and a link "kids.u8"; fortunes-es
    names them "proverbios.fortunes". A ".u8" or ".fortunes" file named was read as plain text
    ("%" lines and all), a folder of ".fortunes" files was passed over in silence, and a
    "kids.dat" named said only "not UTF-8 text"."""
    games = tmp_path / "fortunes"
    games.mkdir()
    (games / "kids").write_text(FORTUNES)
    _strfile_index(games / "kids", 0)
    (games / "kids.u8").symlink_to("kids")
    (games / "proverbios.fortunes").write_text("Más vale tarde que nunca.\n%\nPoco a poco se va lejos.\n%\n")
    for name in ("kids.u8", "proverbios.fortunes"):
        assert detect_format(games / name) == "fortune"
    result = build_corpus([games])
    assert result.files == 2 and result.left_out == [] and result.cleaning.dropped == {}
    assert "Poco a poco se va lejos." in result.corpus.documents and len(result.corpus.documents) == 6
    assert not any("%" in document for document in result.corpus.documents)
    with pytest.raises(SourceProblem, match="the index `strfile` made for the fortune file kids, not text; name"):
        read_text(games / "kids.dat", OPTIONS)


def test_a_fortune_file_of_one_entry_is_known_by_its_index(tmp_path: Path):
    """Debian's "off/it/norm-o" holds one entry, so no "%" line: it was read as plain text, its
    "-- Woody Allen" kept and --author passed over."""
    path = tmp_path / "norm-o"
    path.write_text("Sono mulatto: mio padre e' negro, mia madre bianca e viceversa.\n\t\t-- Woody Allen\n")
    _strfile_index(path, 0)
    assert detect_format(path) == "fortune"
    other = build_corpus([tmp_path], read_options=ReadOptions(author="Oscar Wilde"))
    assert other.corpus.documents == [] and other.files == 1


def test_offensive_fortunes_stored_in_rot13_are_read_decoded(tmp_path: Path):
    """fortunes-es-off's files are ROT13, as "strfile -x" left them (their index says so): they
    were read as they are, and a persona would have learned "Ry zrwbe zngevzbavb"."""
    plain = "El mejor matrimonio sería aquel que reuniese a una mujer ciega con un marido sordo.\n\t\t-- Montaigne\n"
    rotated = codecs.encode(plain, "rot13") + "%\n"
    indexed = tmp_path / "misogino.fortunes"
    indexed.write_text(rotated)
    _strfile_index(indexed, 0x4)
    assert texts(read_fortune(indexed, OPTIONS)) == [plain.split("\n")[0]]
    assert texts(read_fortune(indexed, ReadOptions(author="Montaigne"))) == [plain.split("\n")[0]]
    # Without an index, the letters tell: ROT13 turns most vowels into consonants.
    bare = tmp_path / "copied"
    bare.write_text((rotated + codecs.encode("Poco a poco se va lejos, y lejos se va poco a poco.\n%\n", "rot13")) * 3)
    assert texts(read_fortune(bare, OPTIONS))[0] == plain.split("\n")[0]
    # Text that is itself, with its index saying nothing, stays as it is.
    _strfile_index(bare, 0)
    assert texts(read_fortune(bare, OPTIONS))[0] == codecs.encode(plain, "rot13").split("\n")[0]
    unrotated = tmp_path / "fortunes"
    unrotated.write_text(FORTUNES * 4)
    assert texts(read_fortune(unrotated, OPTIONS))[0].startswith("The only thing we learn")


def test_csv_column_and_missing_column(tmp_path: Path):
    path = tmp_path / "posts.csv"
    path.write_text('id,body\n1,"Hello, world"\n2,"multi\nline"\n3,\n')
    assert texts(read_csv(path, ReadOptions(column="body"))) == ["Hello, world", "multi\nline"]
    with pytest.raises(SourceProblem, match="no column 'text'; columns are id, body"):
        read_csv(path, OPTIONS)


def test_csv_with_semicolons_or_tabs_and_a_column_in_another_case(tmp_path: Path):
    """Excel writes ";" between cells in much of Europe: "columns are id;text"; a ".tsv" was read
    as plain text; a column "Text" was not the column "text"."""
    semicolons = tmp_path / "export.csv"
    semicolons.write_text('id;Text\n1;"Hello, world; again"\n2;Second row\n', encoding="utf-8")
    assert texts(read_csv(semicolons, OPTIONS)) == ["Hello, world; again", "Second row"]
    tabs = tmp_path / "posts.tsv"
    tabs.write_text("id\ttext\n1\tTabbed row, with a comma\n")
    assert detect_format(tabs) == "csv"
    assert texts(read_csv(tabs, OPTIONS)) == ["Tabbed row, with a comma"]
    both = tmp_path / "both.csv"
    both.write_text("text,TEXT\na,b\n")
    with pytest.raises(SourceProblem, match="no column 'Text'; columns are text, TEXT"):
        read_csv(both, ReadOptions(column="Text"))


def test_csv_with_a_quote_never_closed_is_reported_where_it_opens(tmp_path: Path):
    """The rest of the file became one document: "never closed...\n3,next row\n4,...", in silence."""
    path = tmp_path / "posts.csv"
    path.write_text('id,text\n1,"A ""quoted"" word\non two lines"\n2,"never closed\n3,next row\n4,last row\n')
    with pytest.raises(SourceProblem) as caught:
        read_csv(path, OPTIONS)
    assert caught.value.line == 4 and "never closed" in str(caught.value)
    path.write_text('id,text\n1,"A ""quoted"" word\non two lines"\n2,He is 5\'11" tall\n')
    documents = read_csv(path, OPTIONS)
    assert texts(documents) == ['A "quoted" word\non two lines', "He is 5'11\" tall"]
    assert [d.line for d in documents] == [2, 4]


def test_csv_quotes_that_are_text_or_hold_a_name_are_not_taken_for_structure(tmp_path: Path):
    """A comma file whose header quotes a name with semicolons in it was read as a semicolon
    file ("no column 'text'"); a last row with an inch mark, then a blank line, was refused
    as a quote never closed. Both were read before."""
    named = tmp_path / "named.csv"
    named.write_text('text,"note; with; semicolons"\nHello there,a\nSecond row,b\n')
    assert texts(read_csv(named, OPTIONS)) == ["Hello there", "Second row"]
    inches = tmp_path / "inches.csv"
    inches.write_text('text\nFirst row\nShe is 5" tall\n\n')
    assert texts(read_csv(inches, OPTIONS)) == ["First row", 'She is 5" tall']


def test_csv_text_holding_an_unquoted_delimiter_is_not_cut_short(tmp_path: Path):
    """"1,Hello, world" gave "Hello": the rest of a text with a comma in it was dropped without a word."""
    path = tmp_path / "posts.csv"
    path.write_text("id,text\n1,Hello, world, and more\n2,A plain post\n")
    assert texts(read_csv(path, OPTIONS)) == ["Hello, world, and more", "A plain post"]
    path.write_text("id;text\n1;Hello; there\n")
    assert texts(read_csv(path, OPTIONS)) == ["Hello; there"]
    # Not the last column: which cell is the text cannot be told, so the row is left out and said so.
    path.write_text("text,id\nHello, world,1\nA plain post,2\nThird, with, commas,3\n")
    documents = read_csv(path, OPTIONS)
    assert texts(documents) == ["A plain post"]
    [why] = documents.left_out
    assert why.line == 2 and why.reason == (
        "2 row(s) left out, with more cells than the header (line(s) 2, 4): an unquoted ',' in a text splits it, "
        "so which cell holds the 'text' cannot be told; quote the cells that hold ','")


def test_csv_with_a_very_long_cell(tmp_path: Path):
    path = tmp_path / "essays.csv"
    essay = "word " * 40_000  # 200 KB, over the csv module's default field limit
    path.write_text(f'text\n"{essay}"\nshort one\n')
    assert texts(read_csv(path, OPTIONS)) == [essay.strip(), "short one"]


def test_jsonl_field_nested_and_malformed_line(tmp_path: Path):
    path = tmp_path / "posts.jsonl"
    path.write_text('{"post": {"body": "one"}}\n\n{"post": {"body": "two"}}\n{"other": 1}\n')
    assert texts(read_jsonl(path, ReadOptions(field="post.body"))) == ["one", "two"]
    path.write_text('{"text": "fine"}\n{"text": broken\n')
    with pytest.raises(SourceProblem) as caught:
        read_jsonl(path, OPTIONS)
    assert caught.value.line == 2


def test_jsonl_that_is_a_json_array_or_lacks_the_field(tmp_path: Path):
    """A JSON array saved as .jsonl read nothing in silence (on one line) or failed at its "[";
    a --field no record has read nothing and said nothing."""
    records = [{"text": "one"}, {"text": "two"}, {"text": None}]
    path = tmp_path / "export.jsonl"
    for dump in (json.dumps(records), json.dumps(records, indent=2), json.dumps(records[0], indent=2)):
        path.write_text(dump)
        assert texts(read_jsonl(path, OPTIONS)) == ["one", "two"][: len(json.loads(dump)) if dump[0] == "[" else 1]
    path.write_text('[\n  {"text": "one"},\n  {"text": broken}\n]')
    with pytest.raises(SourceProblem) as caught:
        read_jsonl(path, OPTIONS)
    assert caught.value.line == 3
    path.write_text('{"id": 1, "body": "one"}\n{"id": 2, "body": "two"}\n')
    with pytest.raises(SourceProblem, match="no record has the field 'text'; the first record's fields are id, body"):
        read_jsonl(path, OPTIONS)
    path.write_text('{"text": null}\n{"text": "kept"}\n')  # deleted posts: the field is there, empty
    assert texts(read_jsonl(path, OPTIONS)) == ["kept"]


def test_records_of_a_pretty_printed_json_array_are_named_by_their_own_lines(tmp_path: Path):
    """Every record of an indented JSON array was named by the array's first line: "line(s) 1, 1, 1"."""
    path = tmp_path / "export.json"
    path.write_text(json.dumps([{"text": "one"}, {"body": "two"}, {"text": "three"}, {"text": None}], indent=2))
    documents = read_jsonl(path, OPTIONS)
    assert [(d.line, d.text) for d in documents] == [(2, "one"), (8, "three")]
    assert "(line(s) 5, 11; the other 2 were read)" in str(documents.left_out[0])
    path.write_text(json.dumps([{"text": "one"}, {"text": 2}], indent=2))
    documents = read_jsonl(path, OPTIONS)
    assert texts(documents) == ["one"] and documents.left_out[0].line == 5
    path.write_text('[\n  {"text": "one"}\n  {"text": "two"}\n]\n')  # a comma forgotten
    with pytest.raises(SourceProblem, match="Expecting ',' delimiter") as caught:
        read_jsonl(path, OPTIONS)
    assert caught.value.line == 3
    path.write_text('\n\n{\n  "text": "one object"\n}\n')
    assert [(d.line, d.text) for d in read_jsonl(path, OPTIONS)] == [(3, "one object")]


def test_a_json_object_that_wraps_its_records_in_a_list_gives_them(tmp_path: Path):
    """A blog export ({"posts": [...]}) or a JSON feed ({"items": [...]}) was one record without the field:
    "no record has the field 'text'; the first record's fields are posts", and nothing was read."""
    path = tmp_path / "export.json"
    export = {"site": "My garden", "tags": ["roses", "soil"],
              "posts": [{"title": "One", "text": "The first post."}, {"title": "Soon"}, {"text": "The third."}]}
    path.write_text(json.dumps(export, indent=2))
    documents = read_jsonl(path, OPTIONS)
    assert [(d.line, d.text) for d in documents] == [(8, "The first post."), (15, "The third.")]
    assert "1 record(s) with no text in the field 'text' (line(s) 12;" in str(documents.left_out[0])
    feed = {"version": "https://jsonfeed.org/version/1.1", "title": "My blog", "authors": [{"name": "Me"}],
            "items": [{"id": "1", "content_text": "A post in a feed."}, {"id": "2", "content_text": "Another."}]}
    path.write_text(json.dumps(feed))  # on one line, as feeds are served
    with pytest.raises(SourceProblem, match="no record has the field 'text', in any of the lists of records the "
                                            r"object holds \(their first records' fields are 'authors': name; "
                                            r"'items': id, content_text\); use --field"):
        read_jsonl(path, OPTIONS)
    assert texts(read_jsonl(path, ReadOptions(field="content_text"))) == ["A post in a feed.", "Another."]
    path.write_text(json.dumps({"quotes": ["Be brief.", "Be kind."]}))
    assert texts(read_jsonl(path, OPTIONS)) == ["Be brief.", "Be kind."]
    path.write_text(json.dumps({"posts": [{"text": "A post."}], "pages": [{"text": "About me."}, {"text": "Now."}]}))
    with pytest.raises(SourceProblem, match=r"several lists of writing: 'posts' \(1 record\(s\)\), 'pages' \(2 "
                                            r"record\(s\)\), and which to read cannot be told; save the one to read "
                                            r"as a file of its own \(jq '.posts' export.json > posts.json\)"):
        read_jsonl(path, OPTIONS)
    path.write_text(json.dumps({"text": "One post.", "comments": [{"text": "A comment."}]}))  # a record, as before
    assert texts(read_jsonl(path, OPTIONS)) == ["One post."]


GHOST_EXPORT = {"db": [{"meta": {"exported_on": 1700000000000, "version": "5.75.0"},
                        "data": {"posts": [{"id": "1", "title": "Bread", "html": "<p>On bread.</p>", "plaintext": "On bread.",
                                            "mobiledoc": None, "status": "published"},
                                           {"id": "2", "title": "Soil", "html": "<p>On soil.</p>", "plaintext": "On soil.",
                                            "mobiledoc": None, "status": "published"}],
                                 "tags": [{"id": "t1", "name": "garden", "description": None}],
                                 "users": [{"id": "u1", "name": "Me", "bio": "I grow things."}],
                                 "emails": [{"id": "e1", "post_id": "1", "html": "<p>On bread.</p>", "plaintext": "On bread."}]}}]}


def test_exports_that_wrap_their_records_a_few_levels_down_give_them(tmp_path: Path):
    """Ghost's {"db": [{"data": {"posts": [...]}}]}, a Reddit listing and a feed converted from RSS were read as one
    record without the field: "no record has the field 'text'; the first record's fields are db", and nothing more."""
    path = tmp_path / "export.json"
    reddit = {"kind": "Listing", "data": {"after": None, "children": [
        {"kind": "t3", "data": {"title": "A", "selftext": "My first post.", "ups": 3}},
        {"kind": "t3", "data": {"title": "B", "selftext": "My second post.", "ups": 1}}]}}
    path.write_text(json.dumps(reddit))
    with pytest.raises(SourceProblem, match=r"the first record's fields are kind, data \(use --field, e.g. "
                                            r"--field data.selftext\)"):
        read_jsonl(path, OPTIONS)
    assert texts(read_jsonl(path, ReadOptions(field="data.selftext"))) == ["My first post.", "My second post."]
    rss = {"rss": {"@version": "2.0", "channel": {"title": "Blog", "link": ["https://example.org"], "item": [
        {"title": "One", "description": "The first entry."}, {"title": "Two", "description": "The second entry."}]}}}
    path.write_text(json.dumps(rss, indent=2))
    documents = read_jsonl(path, ReadOptions(field="description"))
    assert [(d.line, d.text) for d in documents] == [(10, "The first entry."), (14, "The second entry.")]
    path.write_text(json.dumps(GHOST_EXPORT, indent=2))
    with pytest.raises(SourceProblem, match=r"in any of the lists of records the object holds \(their first records' "
                                            r"fields are 'db\[0\].data.posts': id, title, html, .*; use --field, e.g. "
                                            r"--field plaintext \(the records of db\[0\].data.posts\)"):
        read_jsonl(path, OPTIONS)
    del GHOST_EXPORT["db"][0]["data"]["emails"]  # a blog that sends no newsletters
    try:
        path.write_text(json.dumps(GHOST_EXPORT, indent=2))
        assert texts(read_jsonl(path, ReadOptions(field="plaintext"))) == ["On bread.", "On soil."]
    finally:
        GHOST_EXPORT["db"][0]["data"]["emails"] = [{"id": "e1", "post_id": "1", "html": "<p>On bread.</p>",
                                                   "plaintext": "On bread."}]
    # The last of a key written twice is the one read, as json.loads reads it.
    path.write_text('{"db": [1, 2], "db": [{"data": {"posts": [{"text": "Kept."}]}}], "version": 5}')
    assert texts(read_jsonl(path, OPTIONS)) == ["Kept."]
    # The object's own list is read as before; lists further down, when it has none, are told apart or named.
    nav = {"settings": {"links": {"nav": [{"text": "Home"}, {"text": "About"}]}}}
    path.write_text(json.dumps({"posts": [{"text": "A post."}], **nav}))
    assert texts(read_jsonl(path, OPTIONS)) == ["A post."]
    path.write_text(json.dumps({"db": [{"data": {"posts": [{"text": "A post."}]}}], **nav}))
    with pytest.raises(SourceProblem, match=r"several lists of writing: 'db\[0\].data.posts' \(1 record\(s\)\), "
                                            r"'settings.links.nav' \(2 record\(s\)\)"):
        read_jsonl(path, OPTIONS)


def test_several_nested_lists_of_writing_are_named_with_the_jq_path_that_saves_one(tmp_path: Path):
    """The command said to save one list alone named only a key of the top object: jq '.posts' where the posts
    were under .db[0].data, which jq answers with null."""
    path = tmp_path / "ghost's export.json"
    path.write_text(json.dumps(GHOST_EXPORT, indent=2))
    with pytest.raises(SourceProblem) as caught:
        read_jsonl(path, ReadOptions(field="plaintext"))
    said = caught.value.reason
    assert said.startswith("the object holds several lists of writing: 'db[0].data.posts' (2 record(s)), "
                           "'db[0].data.emails' (1 record(s)), and which to read cannot be told")
    command = re.search(r"\(jq (.*) > (posts\.json)\) and name that$", said)
    assert command and command[1] == """'.db[0].data.posts' 'ghost'"'"'s export.json'"""
    odd = tmp_path / "odd.json"
    odd.write_text(json.dumps({"export": [{"my posts": [{"text": "Mine."}], "if": [{"text": "Theirs."}]}]}))
    with pytest.raises(SourceProblem, match=r"""\(jq '.export\[0\]\["my posts"\]' odd.json > records.json\)"""):
        read_jsonl(odd, OPTIONS)
    if shutil.which("jq"):  # the command as said, run by a shell
        subprocess.run(f"jq {command[1]} > {command[2]}", shell=True, cwd=tmp_path, check=True, timeout=30)
        assert texts(read_jsonl(tmp_path / "posts.json", ReadOptions(field="plaintext"))) == ["On bread.", "On soil."]
        saved = subprocess.run(["jq", '.export[0]["my posts"]', "odd.json"], cwd=tmp_path, check=True, timeout=30,
                               capture_output=True, text=True).stdout
        assert json.loads(saved) == [{"text": "Mine."}]


def test_cli_reads_a_blog_export_that_wraps_its_posts_in_an_object(tmp_path: Path):
    export = tmp_path / "export.json"
    export.write_text(json.dumps({"posts": [{"text": "A post about the tomatoes."}, {"text": "One on bread."}]}))
    result = _persona_cli(str(export), "-o", str(tmp_path / "corpus.jsonl"))
    assert result.returncode == 0, result.stderr
    assert "2 documents (2 jsonl)" in result.stdout
    assert sorted(read_corpus(tmp_path / "corpus.jsonl").documents) == ["A post about the tomatoes.", "One on bread."]


def test_jsonl_records_without_the_field_are_counted_and_named(tmp_path: Path):
    """Records with no text in the field (missing, null, or not an object) were dropped without a word."""
    path = tmp_path / "posts.jsonl"
    path.write_text('{"text": "one"}\n{"body": "two"}\n{"text": null}\n{"text": "four"}\n[5, 6]\n')
    documents = read_jsonl(path, OPTIONS)
    assert texts(documents) == ["one", "four"]
    [why] = documents.left_out
    assert why.line == 2 and why.reason == "4 record(s) with no text in the field 'text' (line(s) 2, 3, 5; the other 2 were read)"
    path.write_text("".join(json.dumps({"text": f"kept {n}"}) + "\n" + json.dumps({"id": n}) + "\n" for n in range(8)))
    assert "(line(s) 2, 4, 6, 8, 10 and 3 more;" in str(read_jsonl(path, OPTIONS).left_out[0])
    path.write_text('{"text": "all there"}\n')
    assert read_jsonl(path, OPTIONS).left_out == []


def test_a_jsonl_record_whose_text_is_not_a_string_is_counted_not_the_whole_file(tmp_path: Path):
    """One record with a number in its field skipped the whole file ("field 'text' is not text (use
    --field)") and nothing was written, though its other records held text; null and missing were counted."""
    path = tmp_path / "posts.jsonl"
    path.write_text('{"text": "First record about cats."}\n{"title": "no text"}\nnot JSON\n'
                    '{"text": "Second record about dogs."}\n{"text": 42}\n{"text": null}\n')
    documents = read_jsonl(path, OPTIONS)
    assert texts(documents) == ["First record about cats.", "Second record about dogs."]
    assert [str(why) for why in documents.left_out] == [
        (f"{path}:2: 3 record(s) with no text in the field 'text' (line(s) 2, 5, 6, 1 of them a number; the other "
         "2 were read)"),  # the field is right: --field is not suggested
        (f"{path}:3: 1 line(s) not JSON, left out (line(s) 3; the first: Expecting value (column 1)); the other 5 "
         "record(s) were read: 2 gave text, 3 had none; fix those lines to read them too")]
    result = _persona_cli(str(path), "-o", str(tmp_path / "corpus.jsonl"))
    assert result.returncode == 0 and "skipped" not in result.stderr, result.stderr
    assert "read 1 file(s): 2 documents (2 jsonl)" in result.stdout
    # No record has text there: the field named is the wrong one.
    path.write_text('{"text": {"en": "Hello."}}\n{"text": null}\n{"text": {"en": "Bye."}}\n')
    with pytest.raises(SourceProblem, match=r"field 'text' holds no text in any record \(an object at line 1\); "
                                            r"use --field to name the field that holds the text") as caught:
        read_jsonl(path, OPTIONS)
    assert caught.value.line == 1
    assert texts(read_jsonl(path, ReadOptions(field="text.en"))) == ["Hello.", "Bye."]


def test_cli_says_which_files_were_empty(tmp_path: Path):
    """An empty file gave only "error: no documents found in 1 file(s)", and a CSV one "no column 'text';
    columns are none (use --column)"."""
    (tmp_path / "notes.txt").write_text("")
    result = _persona_cli(str(tmp_path / "notes.txt"), "-o", str(tmp_path / "corpus.jsonl"))
    assert result.returncode == 1
    assert result.stderr.splitlines()[0] == f"skipped {tmp_path / 'notes.txt'}: empty (0 bytes), nothing in it to read"
    (tmp_path / "posts.csv").write_text("\n  \n")
    with pytest.raises(SourceProblem, match="blank, nothing in it to read but spaces and line ends"):
        read_csv(tmp_path / "posts.csv", OPTIONS)


def test_cli_names_drafts_and_records_it_left_out(tmp_path: Path):
    """A blog's drafts and the JSONL records without the field were left out of the corpus in silence."""
    blog = tmp_path / "blog"
    blog.mkdir()
    (blog / "out.md").write_text("---\ntitle: Out\n---\nA published post about gardens.\n")
    (blog / "wip.md").write_text("---\ntitle: Soon\ndraft: true\n---\nAn unfinished post.\n")
    (blog / "later.md").write_text('+++\ntitle = "Later"\ndraft = true\n+++\nAnother one.\n')
    posts = tmp_path / "posts.jsonl"
    posts.write_text('{"text": "A post about rain."}\n{"body": "in another field"}\n')
    result = _persona_cli(str(blog), str(posts), "-o", str(tmp_path / "corpus.jsonl"))
    assert result.returncode == 0, result.stderr
    assert f"skipped {blog / 'wip.md'}:3: a draft (its front matter sets draft to true)" in result.stderr
    assert f"skipped {blog / 'later.md'}:3: a draft" in result.stderr
    assert f"\n{posts}:2: 1 record(s) with no text in the field 'text' (line(s) 2; the other 1 were read)\n" in result.stderr
    assert sorted(read_corpus(tmp_path / "corpus.jsonl").documents) == ["A post about rain.", "A published post about gardens."]


def test_cli_sums_up_a_blog_s_many_drafts_in_one_line(tmp_path: Path):
    """A blog with hundreds of drafts printed a line for each, burying everything else said."""
    blog = tmp_path / "blog"
    blog.mkdir()
    (blog / "out.md").write_text("---\ntitle: Out\n---\nA published post about gardens.\n")
    (blog / "rain.md").write_text("A published post about rain, with no front matter.\n")
    for n in range(40):
        (blog / f"wip-{n:02}.md").write_text(f"---\ndraft: true\n---\nUnfinished post {n}.\n")
    (blog / "later.md").write_text('+++\npublished = false\n+++\nAnother one.\n')
    result = _persona_cli(str(blog), "-o", str(tmp_path / "corpus.jsonl"))
    assert result.returncode == 0, result.stderr
    said = result.stderr.strip().splitlines()
    assert len(said) == 1 and "skipped" not in result.stderr, result.stderr
    assert " ".join(result.stderr.split()) == (
        f"left out 41 drafts, whose front matter sets draft to true or published to false: {blog / 'later.md'}, "
        f"{blog / 'wip-00.md'}, {blog / 'wip-01.md'} and 38 more; to read one, set draft to false or published "
        "to true in its front matter")


def test_a_few_broken_jsonl_lines_are_left_out_and_named_not_the_whole_file(tmp_path: Path):
    """One line cut short (a crash while exporting) skipped the whole file: "skipped posts.jsonl:3: not
    JSON", and with it the 999 good records, though the line named made it look like one line."""
    path = tmp_path / "posts.jsonl"
    good = [json.dumps({"text": f"Post {n} about the garden."}) for n in range(12)]
    path.write_text("\n".join([*good[:2], '{"text": "cut sho', *good[2:8], "oops", *good[8:]]) + "\n")
    documents = read_jsonl(path, OPTIONS)
    assert texts(documents) == [f"Post {n} about the garden." for n in range(12)]
    [why] = documents.left_out
    assert why.line == 3 and why.reason == (
        "2 line(s) not JSON, left out (line(s) 3, 10; the first: Unterminated string starting at (column 10)); "
        "the other 12 record(s) were read; fix those lines to read them too")
    result = _persona_cli(str(path), "-o", str(tmp_path / "corpus.jsonl"))
    assert result.returncode == 0 and f"{path}:3: 2 line(s) not JSON, left out" in result.stderr
    assert "skipped" not in result.stderr  # the file was read
    assert len(read_corpus(tmp_path / "corpus.jsonl").documents) == 12
    # A file mostly not JSON is no JSONL: it is skipped whole, named by its first bad line.
    path.write_text('{"text": "fine"}\nid,text\n1,hello\n')
    with pytest.raises(SourceProblem, match="not JSON") as caught:
        read_jsonl(path, OPTIONS)
    assert caught.value.line == 2


def test_jsonl_strings_may_hold_unicode_line_separators(tmp_path: Path):
    path = tmp_path / "posts.jsonl"
    odd = ["line one\u2028line two", "para\u2029graph", "next\x85line"]
    path.write_text("".join(json.dumps({"text": t}, ensure_ascii=False) + "\r\n" for t in odd), encoding="utf-8")
    assert [d.text for d in read_jsonl(path, OPTIONS)] == odd


def test_tweet_archive_drops_retweets_replies_and_links(tmp_path: Path):
    tweets = [
        {"tweet": {"full_text": "My own thought &amp; more https://t.co/abc", "id_str": "1"}},
        {"tweet": {"full_text": "RT @other: someone else's words", "id_str": "2"}},
        {"tweet": {"full_text": "@friend a reply", "in_reply_to_status_id_str": "9", "id_str": "3"}},
        {"tweet": {"full_text": "Another original", "id_str": "4"}},
    ]
    path = tmp_path / "tweets.js"
    path.write_text("window.YTD.tweets.part0 = " + json.dumps(tweets, indent=2))
    assert detect_format(path) == "tweets"
    assert texts(read_tweets(path, OPTIONS)) == ["My own thought & more", "Another original"]
    with_replies = read_tweets(path, ReadOptions(keep_replies=True, keep_retweets=True))
    assert len(with_replies) == 4
    plain = tmp_path / "tweets.json"
    plain.write_text(json.dumps([t["tweet"] for t in tweets]))
    assert len(read_tweets(plain, OPTIONS)) == 2
    broken = tmp_path / "tweets-part1.js"
    broken.write_text('window.YTD.tweets.part1 = [\n  {"tweet": {\n  "full_text": oops}}\n]')
    with pytest.raises(SourceProblem) as caught:
        read_tweets(broken, OPTIONS)
    assert caught.value.line == 3


def test_tweet_archive_split_into_parts_is_read_whole(tmp_path: Path):
    # Older exports name the parts tweet.js, tweet-part1.js...; newer ones tweets.js, tweets-part1.js...
    data = tmp_path / "twitter-2021" / "data"
    data.mkdir(parents=True)
    for name, first in [("tweet.js", 0), ("tweet-part1.js", 10), ("tweets-part2.js", 20)]:
        part = [{"tweet": {"id_str": str(i), "full_text": f"Thought {i} on gardens."}} for i in (first, first + 1)]
        (data / name).write_text(f"window.YTD.tweet.part{first // 10} = " + json.dumps(part, indent=2))
    (data / "manifest.js").write_text("window.__THAR_CONFIG = {}")
    assert detect_format(data / "tweet-part1.js") == "tweets"
    result = build_corpus([tmp_path / "twitter-2021"])
    assert result.files == 3 and result.by_format == {"tweets": 6}
    assert len(result.corpus.documents) == 6
    assert len(build_corpus([data / "tweet-part1.js"]).corpus.documents) == 2


# Long posts in a newer X export: tweets.js holds the first part of the text, note-tweet.js the whole.
LONG_GARDEN = (
    "Gardens teach patience & more than any book I have read: the seeds do not care about my calendar, "
    "the frost comes when it likes, and the beans climb at their own pace. See https://t.co/plan for the plan. "
    "I used to plant everything in one weekend and lose half of it to a late cold night. "
    "Now I sow a row every week from March to June, and whatever the weather does, something always comes up. "
    "The lesson carries over to writing: a page a day beats a chapter once a month."
)
LONG_RIVER = (
    "The river behind the house floods every spring, and every spring the neighbours ask why we stay. "
    "Because the water brings the soil back, and the soil brings the willows back, and the willows bring the "
    "herons. Forty years of floods have given us the best garden on the street, even counting the mud. "
    "Nobody believes it until they walk the bank in May and see what the water left behind."
)


def _stub(text: str) -> str:
    """What tweets.js keeps of a long post: its first part, an ellipsis and a link, entities escaped."""
    return text[:262].replace("&", "&amp;").rstrip() + "… https://t.co/stub"


def _tweet(id_: str, text: str, created_at: str | None, **extra) -> dict:
    tweet = {"id_str": id_, "full_text": text, **extra}
    if created_at:
        tweet["created_at"] = created_at
    return {"tweet": tweet}


def _note(id_: str, text: str, created_at: str | None) -> dict:
    note = {"noteTweetId": id_, "core": {"text": text, "styletags": [], "mentions": [], "cashtags": [],
                                          "hashtags": [], "urls": [{"shortUrl": "https://t.co/plan",
                                                                    "expandedUrl": "https://example.org/plan",
                                                                    "displayUrl": "example.org/plan"}]}}
    if created_at:
        note.update(createdAt=created_at, updatedAt=created_at)
    return {"noteTweet": note}


def _export(data: Path, tweets: list[dict], notes: list[dict], notes_name: str = "note-tweet.js") -> None:
    data.mkdir(parents=True, exist_ok=True)
    (data / "tweets.js").write_text("window.YTD.tweets.part0 = " + json.dumps(tweets, indent=2))
    (data / notes_name).write_text("window.YTD.note_tweet.part0 = " + json.dumps(notes, indent=2))


def test_tweet_archive_long_post_is_read_whole_from_note_tweet_js(tmp_path: Path):
    data = tmp_path / "data"
    _export(data, [
        _tweet("1790000000000000001", _stub(LONG_GARDEN), "Wed May 01 10:00:00 +0000 2024"),
        _tweet("1790000000000000005", "A short one of my own.", "Wed May 01 11:00:00 +0000 2024"),
    ], [_note("1790000000000000002", LONG_GARDEN.replace("https://t.co/plan", "example.org/plan"),
              "2024-05-01T10:00:00.000Z")])
    # The note's link is gone as a tweet's would be; the note's id is not the tweet's.
    whole = LONG_GARDEN.replace("https://t.co/plan", "")
    assert texts(read_tweets(data / "tweets.js", OPTIONS)) == [whole, "A short one of my own."]
    # A plain tweets.json with no times at all: a long enough stub is still paired by its text.
    (data / "tweets.js").unlink()
    (data / "tweets.json").write_text(json.dumps([_tweet("1", _stub(LONG_GARDEN), None)["tweet"]]))
    (data / "note-tweet.js").write_text(json.dumps([_note("2", LONG_GARDEN, None)]))
    assert texts(read_tweets(data / "tweets.json", OPTIONS)) == [whole]


def test_tweet_archive_reply_with_a_note_stays_dropped(tmp_path: Path):
    data = tmp_path / "data"
    _export(data, [
        _tweet("1", _stub(LONG_GARDEN), "Wed May 01 10:00:00 +0000 2024", in_reply_to_status_id_str="7",
               in_reply_to_user_id_str="8"),
        _tweet("3", _stub(LONG_RIVER), "Thu May 02 08:30:00 +0000 2024"),
    ], [_note("2", LONG_GARDEN, "2024-05-01T10:00:00.000Z"), _note("4", LONG_RIVER, "2024-05-02T08:30:00.000Z")])
    assert texts(read_tweets(data / "tweets.js", OPTIONS)) == [LONG_RIVER]
    with_replies = texts(read_tweets(data / "tweets.js", ReadOptions(keep_replies=True)))
    assert with_replies == [LONG_GARDEN.replace("https://t.co/plan", ""), LONG_RIVER]


def test_tweet_archive_short_stub_takes_only_the_note_of_its_own_time(tmp_path: Path):
    # Two long posts open with the same words; each stub takes the note written at its moment,
    # and a short tweet of another time (or of no time) takes none, though its words begin one.
    first = "Gardens are slow. " + LONG_GARDEN
    second = "Gardens are slow. " + LONG_RIVER
    data = tmp_path / "data"
    _export(data, [
        _tweet("1", "Gardens are slow… https://t.co/a", "Wed May 01 10:00:00 +0000 2024"),
        _tweet("3", "Gardens are slow… https://t.co/b", "Fri May 03 18:00:30 +0000 2024"),
        _tweet("5", "Gardens are slow. The river", "Sat May 04 09:00:00 +0000 2024"),
        _tweet("6", "Gardens are slow. The riv\u2026", None),
    ], [_note("2", first, "2024-05-01T10:00:00.000Z"), _note("4", second, "2024-05-03T18:00:00.000Z")])
    assert texts(read_tweets(data / "tweets.js", OPTIONS)) == [
        first.replace("https://t.co/plan", ""), second, "Gardens are slow. The river", "Gardens are slow. The riv\u2026"]


def test_a_short_whole_tweet_keeps_its_text_beside_a_note_that_begins_with_it(tmp_path: Path):
    """A whole tweet ("Thread:") posted a moment before a long post that opens with its words
    took the long post's text: a tweet is a note's first part only when it is visibly cut."""
    thread = "Thread: " + LONG_GARDEN
    data = tmp_path / "data"
    _export(data, [
        _tweet("1", "Thread:", "Wed May 01 10:00:00 +0000 2024"),
        _tweet("3", _stub(thread), "Wed May 01 10:00:30 +0000 2024"),
    ], [_note("2", thread, "2024-05-01T10:00:30.000Z")])
    assert texts(read_tweets(data / "tweets.js", OPTIONS)) == ["Thread:", thread.replace("https://t.co/plan", "")]


def test_a_japanese_tweet_that_fills_its_280_is_read_whole_from_its_note(tmp_path: Path):
    """X weighs a Chinese, Japanese or Korean character twice: 140 of them fill a tweet, and
    such a tweet may be the first part of a long post though it is far from 250 characters."""
    post = "庭の話をしよう。" * 40  # 320 characters
    data = tmp_path / "data"
    _export(data, [_tweet("1", post[:140], "Wed May 01 10:00:00 +0000 2024")], [_note("2", post, "2024-05-01T10:00:00.000Z")])
    assert texts(read_tweets(data / "tweets.js", OPTIONS)) == [post]


def test_folder_with_note_tweets_reads_each_post_once(tmp_path: Path):
    export = tmp_path / "twitter-2024"
    data = export / "data"
    _export(data, [
        _tweet("1", _stub(LONG_GARDEN), "Wed May 01 10:00:00 +0000 2024"),
        _tweet("5", "A short one of my own.", "Wed May 01 11:00:00 +0000 2024"),
    ], [_note("2", LONG_GARDEN, "2024-05-01T10:00:00.000Z")])
    (data / "tweets-part1.js").write_text("window.YTD.tweets.part1 = " + json.dumps(
        [_tweet("3", _stub(LONG_RIVER), "Thu May 02 08:30:00 +0000 2024")]))
    (data / "note-tweet-part1.js").write_text("window.YTD.note_tweet.part1 = " + json.dumps(
        [_note("4", LONG_RIVER, "2024-05-02T08:30:00.000Z")]))
    # Cleaning closes the gap the link leaves.
    whole = [LONG_GARDEN.replace(" https://t.co/plan", ""), "A short one of my own.", LONG_RIVER]
    for sources in ([export], [data / "tweets.js", data / "tweets-part1.js", data / "note-tweet.js",
                               data / "note-tweet-part1.js"]):
        result = build_corpus(sources)
        assert result.files == 2 and result.by_format == {"tweets": 3} and not result.problems
        assert sorted(result.corpus.documents) == sorted(whole)
    assert detect_format(data / "note-tweet.js") == "tweets"
    # Notes with no tweet archive beside them are read as documents of their own.
    (data / "tweets.js").unlink()
    (data / "tweets-part1.js").unlink()
    result = build_corpus([export])
    assert result.files == 2 and not result.problems
    assert sorted(result.corpus.documents) == sorted([whole[0], LONG_RIVER])


def test_note_tweets_are_parsed_once_for_all_the_parts_of_an_archive(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """Each part of a split archive parsed every note-tweet file again."""
    import training.tweets

    data = tmp_path / "data"
    _export(data, [_tweet("1", _stub(LONG_GARDEN), "Wed May 01 10:00:00 +0000 2024")],
            [_note("2", LONG_GARDEN, "2024-05-01T10:00:00.000Z"), _note("4", LONG_RIVER, "2024-05-02T08:30:00.000Z")])
    for part in (1, 2, 3):
        (data / f"tweets-part{part}.js").write_text(f"window.YTD.tweets.part{part} = " + json.dumps(
            [_tweet(str(10 + part), _stub(LONG_RIVER), "Thu May 02 08:30:00 +0000 2024")]))
    parsed: list[Path] = []
    read_notes = training.tweets._read_notes
    monkeypatch.setattr(training.tweets, "_read_notes", lambda path: parsed.append(path) or read_notes(path))
    result = build_corpus([data])
    assert result.files == 4 and not result.problems and len(result.corpus.documents) == 2
    assert parsed == [data / "note-tweet.js"]
    # A note-tweet file changed since is read again.
    (data / "note-tweet.js").write_text("window.YTD.note_tweet.part0 = " + json.dumps(
        [_note("4", LONG_RIVER + " Edited later.", "2024-05-02T08:30:00.000Z")]))
    assert texts(read_tweets(data / "tweets-part1.js", OPTIONS)) == [LONG_RIVER + " Edited later."]


def test_broken_note_tweet_file_is_reported_with_its_line(tmp_path: Path):
    data = tmp_path / "data"
    _export(data, [_tweet("1", _stub(LONG_GARDEN), "Wed May 01 10:00:00 +0000 2024")], [])
    (data / "note-tweet.js").write_text('window.YTD.note_tweet.part0 = [\n  {"noteTweet": {\n    "core": oops}}\n]')
    with pytest.raises(SourceProblem) as caught:
        read_tweets(data / "tweets.js", OPTIONS)
    assert caught.value.path == data / "note-tweet.js" and caught.value.line == 3
    assert "tweets.js" in caught.value.reason
    result = build_corpus([tmp_path])
    assert result.files == 1 and [p.path for p in result.problems] == [data / "note-tweet.js"]
    (data / "note-tweet.js").write_text('window.YTD.note_tweet.part0 = "no list here"')
    with pytest.raises(SourceProblem) as caught:
        read_tweets(data / "tweets.js", OPTIONS)
    assert caught.value.line == 1


def test_cli_counts_the_retweets_and_replies_it_left_out(tmp_path: Path):
    """An archive of 4 tweets said "2 documents (2 tweets)": the retweets and replies dropped went unsaid."""
    data = tmp_path / "twitter-2024" / "data"
    _export(data, [
        _tweet("1", "My own thought &amp; more https://t.co/abc", None),
        _tweet("2", "RT @other: someone else's words", None),
        _tweet("3", "@friend a reply", None, in_reply_to_status_id_str="9"),
        _tweet("4", "@friend another reply", None, in_reply_to_user_id_str="8"),
        _tweet("5", "Another original", None),
    ], [])
    result = _persona_cli(str(tmp_path / "twitter-2024"), "-o", str(tmp_path / "corpus.jsonl"))
    assert result.returncode == 0, result.stderr
    assert (f"{data / 'tweets.js'}: 1 retweet(s) and 2 reply(ies) left out, as not the author's own posts (the "
            "other 2 were read); --keep-retweets and --keep-replies read them too") in result.stderr
    assert "skipped" not in result.stderr  # the archive was read: only some of its posts were left out
    kept = _persona_cli(str(data / "tweets.js"), "--keep-replies", "-o", str(tmp_path / "corpus.jsonl"))
    assert "1 retweet(s) left out" in kept.stderr and "reply" not in kept.stderr
    assert "read 1 file(s): 4 documents (4 tweets)" in kept.stdout


def _zip(path: Path, members: dict[str, str]) -> Path:
    import zipfile

    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, text in members.items():
            archive.writestr(name, text)
    return path


def test_an_x_export_zip_is_read_as_its_folder_would_be(tmp_path: Path):
    """The zip X sends was "a binary file, not text" when named, and passed over in a folder:
    every user had to unzip it first, and was not told so."""
    tweets = [_tweet("1", _stub(LONG_GARDEN), "Wed May 01 10:00:00 +0000 2024"),
              _tweet("3", "RT @other: not mine", "Wed May 01 10:30:00 +0000 2024"),
              _tweet("5", "A short one of my own.", "Wed May 01 11:00:00 +0000 2024")]
    export = _zip(tmp_path / "twitter-2024-05-02-abc.zip", {
        "Your archive.html": "<html></html>",
        "data/tweets.js": "window.YTD.tweets.part0 = " + json.dumps(tweets, indent=2),
        "data/tweets-part1.js": "window.YTD.tweets.part1 = " + json.dumps([_tweet("7", "Part one's own.", None)]),
        "data/note-tweet.js": "window.YTD.note_tweet.part0 = " + json.dumps(
            [_note("2", LONG_GARDEN, "2024-05-01T10:00:00.000Z")]),
        "data/deleted-tweets.js": "window.YTD.deleted_tweets.part0 = " + json.dumps([_tweet("9", "Deleted.", None)]),
        "data/account.js": "window.YTD.account.part0 = []",
    })
    assert detect_format(export) == "tweets"
    documents = read_tweets(export, OPTIONS)
    assert texts(documents) == ["Part one's own.", LONG_GARDEN.replace("https://t.co/plan", ""), "A short one of my own."]
    [why] = documents.left_out
    assert why.path == export / "data" / "tweets.js" and why.reason.startswith("1 retweet(s) left out")
    folder = tmp_path / "downloads"
    folder.mkdir()
    export.rename(folder / export.name)
    result = build_corpus([folder])
    assert result.files == 1 and result.left_out == [] and result.by_format == {"tweets": 3}


def test_a_zip_that_is_no_x_export_says_to_unzip_it(tmp_path: Path):
    other = _zip(tmp_path / "essays.zip", {"essays/one.txt": "An essay.", "essays/two.md": "Another."})
    with pytest.raises(SourceProblem, match=r"essays.zip: a zip with no tweets.js in it, so not a Twitter/X archive; "
                                            r"unzip it and name the folder"):
        read_tweets(other, OPTIONS)
    cut = tmp_path / "twitter-2024.zip"
    cut.write_bytes(_zip(tmp_path / "whole.zip", {"data/tweets.js": "[]"}).read_bytes()[:40])
    with pytest.raises(SourceProblem, match="not a zip that can be read .*download the archive again"):
        read_tweets(cut, OPTIONS)
    result = build_corpus([other, tmp_path / "whole.zip"])
    assert [p.path for p in result.problems] == [other] and result.files == 2


def _write_pdf(path: Path, pages: list[list[str]]) -> None:
    from fpdf import FPDF

    pdf = FPDF()
    pdf.set_font("Helvetica", size=11)
    for number, lines in enumerate(pages, start=1):
        pdf.add_page()
        pdf.cell(0, 8, "THE BOOK OF CALM", new_x="LMARGIN", new_y="NEXT")
        for line in lines:
            pdf.cell(0, 8, line, new_x="LMARGIN", new_y="NEXT")
        pdf.set_y(-20)
        pdf.cell(0, 8, f"Page {number}")
    pdf.output(str(path))


def test_pdf_drops_headers_footers_and_repairs_hyphens(tmp_path: Path):
    path = tmp_path / "book.pdf"
    _write_pdf(path, [
        ["The garden grows in its own", "time, and the gardener learns pa-", "tience from it."],
        ["A second thought about the", "river and the stones."],
        ["Third page, with a single line."],
    ])
    whole = " ".join(texts(read_pdf(path, OPTIONS)))
    assert "THE BOOK OF CALM" not in whole and "Page" not in whole
    assert "learns patience from it." in whole
    assert "The garden grows in its own time," in whole


def test_pdf_page_cleanup_keeps_a_paragraph_across_pages():
    pages = ["Header\nIt was the best of\n1", "Header\ntimes, it was the worst.\n2", "Header\nEnd.\n3"]
    assert clean_pages(pages) == "It was the best of times, it was the worst.\n\nEnd."


def test_broken_pdf_is_reported(tmp_path: Path):
    path = tmp_path / "broken.pdf"
    path.write_bytes(b"%PDF-1.4\nnot really a pdf")
    with pytest.raises(SourceProblem, match="broken.pdf"):
        read_pdf(path, OPTIONS)


def test_pdf_without_a_text_layer_says_to_ocr_it(tmp_path: Path):
    """A scanned book gave no documents and no word: "no documents found in 1 file(s)"."""
    from fpdf import FPDF

    scanned = tmp_path / "scanned.pdf"
    pdf = FPDF()
    for _ in range(2):
        pdf.add_page()
        pdf.rect(10, 10, 100, 140, "F")  # a page that is a picture
    pdf.output(str(scanned))
    with pytest.raises(SourceProblem, match="no text on its 2 page"):
        read_pdf(scanned, OPTIONS)


def test_pdf_locked_with_a_password_says_to_unlock_it(tmp_path: Path):
    """It said "not a readable PDF: File has not been decrypted"."""
    from pypdf import PdfWriter

    book = tmp_path / "book.pdf"
    _write_pdf(book, [["Some words of prose."]] * 3)
    locked = tmp_path / "locked.pdf"
    writer = PdfWriter(clone_from=book)
    writer.encrypt(user_password="secret", owner_password="owner")
    writer.write(locked)
    with pytest.raises(SourceProblem, match="locked with a password; save an unlocked copy"):
        read_pdf(locked, OPTIONS)


def test_pdf_damaged_in_a_way_pypdf_does_not_expect_is_reported(tmp_path: Path):
    """An unknown stream filter raised NotImplementedError: a traceback that ended the whole build."""
    book = tmp_path / "book.pdf"
    _write_pdf(book, [["Some words of prose."]] * 3)
    damaged = tmp_path / "damaged.pdf"
    damaged.write_bytes(book.read_bytes().replace(b"/FlateDecode", b"/FlateDecodX", 1))
    with pytest.raises(SourceProblem, match="not a readable PDF: Unsupported filter"):
        read_pdf(damaged, OPTIONS)


def test_cleaning_normalises_and_drops_duplicates():
    docs = [
        "  Ｆｕｌｌ-width   text\t here \n\n\n\nnext ",
        "The quick brown fox jumps over the lazy dog today.",
        "the quick brown fox jumps over the lazy dog today!",  # same words: duplicate
        "The quick brown fox jumps over the lazy dog today again.",  # near duplicate
        "   ",
        "Visit https://example.com now @someone",
    ]
    kept, report = clean_documents(docs, CleanOptions(strip_urls=True, strip_handles=True))
    assert kept == ["Full-width text here\n\nnext", "The quick brown fox jumps over the lazy dog today.", "Visit now"]
    assert report.dropped == {"duplicate": 1, "near-duplicate": 1, "empty": 1}
    assert normalize_text("a<|endoftext|>b") == "ab"


def test_cleaning_drops_a_short_saying_told_again_with_one_word_changed():
    # Both are in Debian's fortunes; one was held out for validation while its twin was trained on.
    wilde = "The one charm of marriage is that it makes a life of deception a necessity."
    docs = [
        wilde.replace("necessity", "neccessity") + "\n-- Oscar Wilde",
        "Whenever people agree with me, I always think I must be wrong.",
        "Whenever people agree with me I always feel I must be wrong.",
        f'"{wilde}"\n-- Oscar Wilde',
        "You will be married within a year.",
        "You will be rich within a year, and poor within two.",
    ]
    kept, report = clean_documents(docs)
    assert kept == [docs[0], docs[1], docs[4], docs[5]]
    assert report.dropped == {"near-duplicate": 2}


def test_cleaning_many_texts_that_open_alike_is_quick():
    """Each text was measured against every kept one that shared a 3-gram with it: an author who opens
    every post the same way ("Today I learned that ...") took minutes for a few thousand posts."""
    words = [f"word{n}" for n in range(30_000)]
    docs = [f"Today I learned that {' '.join(words[6 * n : 6 * n + 6])}." for n in range(5_000)]
    started = time.perf_counter()
    kept, report = clean_documents(docs)
    # A guard against the quadratic reading, not a speed goal: 0.2 s now, over a minute before.
    assert time.perf_counter() - started < 15
    assert kept == docs and not report.dropped


def test_cleaning_many_short_texts_of_a_few_common_words_measures_few_pairs(monkeypatch):
    """Texts of 15 words drawn from 25 common ones share some of their rarest words with thousands of others,
    and each was measured against them all: 3,000 took 9 s, 200,000 were at 10% after ten minutes. Only
    those sharing enough words to be near are measured now (counted by wrapping the measure, unchanged)."""
    from training import cleaning

    measured = 0
    measure = cleaning._NearIndex._near

    def counted(self, *args):
        nonlocal measured
        measured += 1
        return measure(self, *args)

    monkeypatch.setattr(cleaning._NearIndex, "_near", counted)
    rng = random.Random(1)
    common = ["the", "of", "and", "to", "a", "in", "is", "it", "you", "that", "he", "was", "for", "on", "are", "with",
              "as", "his", "they", "be", "at", "one", "have", "this", "from"]
    docs = [" ".join(rng.choices(common, k=15)) for _ in range(1_000)]
    kept, report = clean_documents(docs)
    assert kept == docs and not report.dropped
    assert measured < 5 * len(docs)  # 2 now; 658 before the 3-grams shared were counted first; 172,806 before


def test_cleaning_measures_each_short_text_against_a_bounded_number_however_many_share_its_words(monkeypatch):
    """Texts of 15 words drawn from 25 share a rare 3-gram with hundreds of others and some of their rarest words
    with thousands, a number that grew with the corpus: 20,000 took 30 s, 200,000 more than ten minutes. Now each
    is counted against at most 1,000 of the latest that share its words, and only those that may then be near are
    measured (counted by wrapping the counts and the measure, unchanged)."""
    from training import cleaning

    measured, most_counted = 0, 0
    measure, share_words = cleaning._NearIndex._near, cleaning._NearIndex._share_words

    def counted_measure(self, *args):
        nonlocal measured
        measured += 1
        return measure(self, *args)

    def counted_share(self, number, others):
        nonlocal most_counted
        most_counted = max(most_counted, len(others))
        return share_words(self, number, others)

    monkeypatch.setattr(cleaning._NearIndex, "_near", counted_measure)
    monkeypatch.setattr(cleaning._NearIndex, "_share_words", counted_share)
    rng = random.Random(2)
    common = ["the", "of", "and", "to", "a", "in", "is", "it", "you", "that", "he", "was", "for", "on", "are", "with",
              "as", "his", "they", "be", "at", "one", "have", "this", "from"]
    docs = [" ".join(rng.choices(common, k=15)) for _ in range(6_000)]
    kept, report = clean_documents(docs)
    assert kept == docs and not report.dropped
    assert most_counted <= 1_000  # 3,055 for the last texts before
    assert measured < len(docs) / 10  # 44 now; 25,983 before


def test_cleaning_holds_little_more_than_the_texts():
    """Near-duplicate removal held every kept text's 3-grams, as sets of tuples, and every rare one in a dict:
    some 45 times the texts' size, two gigabytes for 100,000 posts."""
    clean_documents(["One text, to import what cleaning needs before measuring."])
    rng = random.Random(1)
    vocabulary = [f"w{n}" for n in range(5_000)]
    docs = [" ".join(rng.choices(vocabulary, k=100)) for _ in range(1_000)]
    tracemalloc.start()
    try:
        kept, _ = clean_documents(docs)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert kept == docs
    assert peak < 8 * sum(map(len, docs))  # 3.4 times now: the texts cleaned, folded and their rarest 3-grams


def _kept_by_reading_every_pair(docs: list[str]) -> list[str]:
    """The near-duplicate rule read plainly: each text against every text kept before it."""
    kept: list[tuple[str, list[str], set[tuple[str, ...]]]] = []
    for doc in docs:
        text = normalize_text(doc)
        words = re.findall(r"\w+", text.casefold())
        grams = {tuple(words[i : i + 3]) for i in range(max(1, len(words) - 2))}
        if words and not any(words == other or _near_pair(words, grams, other, other_grams)
                             for _, other, other_grams in kept):
            kept.append((text, words, grams))
    return [text for text, _, _ in kept]


def _near_pair(a: list[str], a_grams: set[tuple[str, ...]], b: list[str], b_grams: set[tuple[str, ...]]) -> bool:
    """Near: sharing a 3-gram, and 80% of them (Jaccard), or, both under 30 words and sharing all but six
    3-grams of the one with fewer, the same words in order at 85% (difflib's ratio)."""
    shared = len(a_grams & b_grams)
    if not shared:
        return False
    if shared / len(a_grams | b_grams) >= 0.8:
        return True
    return (len(a) < 30 and len(b) < 30 and shared >= min(len(a_grams), len(b_grams)) - 6
            and SequenceMatcher(None, a, b, autojunk=False).ratio() >= 0.85)


def test_cleaning_drops_the_near_duplicates_that_reading_every_pair_finds():
    """Near duplicates are looked for only among the texts that share a rare word or 3-gram with each
    one: on texts retold with one to six words changed, added, dropped, swapped or repeated, that finds
    what comparing every pair finds."""
    rng = random.Random(1)
    vocabulary = ["the", "of", "and", "to", "a", "in", "is", "it", "you", "that", "he", "was", "for", "on", "are",
                  *(f"w{n}" for n in range(200))]
    docs: list[list[str]] = []
    for _ in range(800):
        if docs and rng.random() < 0.5:
            words = list(rng.choice(docs[-200:]))
            for _ in range(rng.randint(1, 6)):
                at = rng.randrange(len(words))
                edit = rng.choice(["change", "add", "drop", "swap", "repeat"])
                if edit == "change":
                    words[at] = rng.choice(vocabulary)
                elif edit == "add":
                    words.insert(at, rng.choice(vocabulary))
                elif edit == "drop" and len(words) > 1:
                    del words[at]
                elif edit == "swap" and at + 1 < len(words):
                    words[at], words[at + 1] = words[at + 1], words[at]
                elif edit == "repeat":
                    words += words[:3]
            docs.append(words)
        else:
            length = rng.choice([1, 3, 5, rng.randint(6, 35), rng.randint(20, 60)])
            docs.append(rng.choices(vocabulary[: rng.choice([25, 225])], k=length))
    texts = [" ".join(words) + rng.choice(["", ".", "!"]) for words in docs]
    kept, report = clean_documents(texts)
    assert report.dropped["near-duplicate"] > 50  # the corpus does hold many
    assert kept == _kept_by_reading_every_pair(texts)


def test_cleaning_shows_overstruck_text_as_a_terminal_does():
    """Old fortune files underline with "_\\b": "*____\\b\\b\\b\\bonly*" was kept as "*____only*"."""
    assert normalize_text("Calm down, it's *____\b\b\b\bonly* ones and zeroes.") == "Calm down, it's *only* ones and zeroes."
    assert normalize_text("a group of _\bN persons\nB\bBo\bol\bld\bd") == "a group of N persons\nBold"


def test_cleaning_keeps_the_joiners_of_persian_words_and_emoji():
    persian = "می\u200cخواهم"  # "I want": the zero-width non-joiner is part of its spelling
    family = "\U0001F469\u200d\U0001F469\u200d\U0001F467"  # one emoji, joined by ZWJ
    assert normalize_text(f"{persian} {family}") == f"{persian} {family}"
    assert normalize_text("zero\u200bwidth\u200e space\ufeff") == "zerowidth space"


def test_build_reports_bad_files_and_keeps_the_rest(tmp_path: Path):
    folder = tmp_path / "blog"
    folder.mkdir()
    (folder / "a.md").write_text("---\ntitle: A\n---\nFirst post body.\n")
    (folder / "b.md").write_text("---\ntitle: [broken\n---\nLost.\n")
    (folder / "notes.txt").write_text("one note\n\nanother note\n")
    (folder / ".hidden.txt").write_text("secret")
    (folder / "package.json").write_text('{"name": "not writing"}')
    (folder / "tweets.js").write_text('window.YTD.tweets.part0 = [{"tweet": {"full_text": "A tweet"}}]')
    result = build_corpus([folder])
    assert result.files == 4
    assert [p.path.name for p in result.problems] == ["b.md"]
    assert sorted(result.corpus.documents) == ["A tweet", "First post body.", "another note", "one note"]


def test_build_tells_how_far_reading_and_cleaning_have_got(tmp_path: Path):
    """Twenty thousand posts took two silent minutes, 100,000 tweets one: nothing said it was working."""
    for n in range(3):
        (tmp_path / f"post-{n}.md").write_text(f"Post {n} about the garden.\n\n")
    (tmp_path / "more.txt").write_text("One.\n\nTwo.\n")
    told: list[tuple[str, int, int]] = []
    result = build_corpus([tmp_path], progress=lambda *step: told.append(step))
    assert told == [("reading", n, 4) for n in range(4)] + [(stage, n, 5) for stage in ("indexing", "cleaning")
                                                           for n in range(5)]
    assert len(result.corpus.documents) == 5


def test_build_skips_its_own_output_inside_the_folder(tmp_path: Path):
    folder = tmp_path / "blog"
    folder.mkdir()
    (folder / "kept.txt").write_text("A post that stays.")
    (folder / "deleted.txt").write_text("A post the author deletes.")
    out = folder / "corpus.jsonl"
    write_corpus(build_corpus([folder], exclude=[out]).corpus, out)
    (folder / "deleted.txt").unlink()
    again = build_corpus([folder], exclude=[tmp_path / "blog" / ".." / "blog" / "corpus.jsonl"])
    assert again.corpus.documents == ["A post that stays."] and again.files == 1


def test_build_reads_each_file_once_and_says_what_it_left_out(tmp_path: Path):
    """A file named twice, or reached through a link too, was read twice ("dropped 2 duplicate");
    files of kinds it does not read were passed over without a word."""
    blog = tmp_path / "blog"
    (blog / "posts").mkdir(parents=True)
    (blog / "posts" / "one.md").write_text("A first post.\n")
    (blog / "posts" / "link.md").symlink_to("one.md")
    (blog / "logo.png").write_bytes(b"\x89PNG")
    (blog / "site.css").write_text("a { color: red }")
    (blog / ".git").mkdir()
    (blog / ".git" / "HEAD").write_text("ref: refs/heads/main")
    result = build_corpus([blog, blog / "posts" / "one.md"])
    assert result.files == 1 and result.cleaning.dropped == {}
    assert sorted(p.name for p in result.left_out) == ["logo.png", "site.css"]


def _persona_cli(*args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PERSONA_")} | {"COLUMNS": "300"}
    return subprocess.run([sys.executable, "-m", "persona", "corpus", "build", *args, "--base", ""], env=env,
                          capture_output=True, text=True, check=False, timeout=120)


def test_cli_reports_a_skipped_file_once_in_plain_words(tmp_path: Path):
    """Each skipped file was printed twice, once as "[yellow]skipped[/yellow] ..." in those words."""
    folder = tmp_path / "my [draft] notes"
    folder.mkdir()
    (folder / "good.txt").write_text("One note.\n\nAnother note.\n")
    (folder / "bad.jsonl").write_text('{"text": "fine"}\n{oops\n')
    result = _persona_cli(str(folder), "-o", str(tmp_path / "corpus.jsonl"))
    assert result.returncode == 0, result.stderr
    assert result.stderr.count("bad.jsonl:2") == 1 and "[yellow]" not in result.stderr
    assert f"skipped {folder / 'bad.jsonl'}:2: not JSON" in result.stderr


def test_cli_never_writes_the_corpus_over_a_source(tmp_path: Path):
    """-o naming the CSV being read replaced the author's CSV with the corpus."""
    essays = tmp_path / "essays.csv"
    essays.write_text("id,text\n1,My first essay.\n2,My second essay.\n")
    before = essays.read_text()
    refused = _persona_cli(str(essays), "-o", str(tmp_path / "." / "essays.csv"))
    assert refused.returncode == 1 and "is one of the files to read" in refused.stderr
    assert essays.read_text() == before


def test_cli_never_writes_over_a_file_of_the_writing_inside_a_folder_it_reads(tmp_path: Path):
    """-o naming the author's notes.txt inside the folder being read left it out of the
    build, then wrote the corpus over it. A corpus built before may be written over."""
    writing = tmp_path / "writing"
    writing.mkdir()
    (writing / "essay.md").write_text("An essay about patience, and the garden, and the years.\n")
    notes = writing / "notes.txt"
    notes.write_text("My only copy of these notes.\n")
    refused = _persona_cli(str(writing), "-o", str(notes))
    assert refused.returncode == 1 and "is not a corpus this command wrote" in refused.stderr
    assert notes.read_text() == "My only copy of these notes.\n"
    corpus = writing / "corpus.jsonl"
    for _ in range(2):  # built, then built again over the first
        built = _persona_cli(str(writing), "-o", str(corpus))
        assert built.returncode == 0, built.stderr


def test_corpus_with_line_separators_in_its_text_reads_back(tmp_path: Path):
    source = tmp_path / "notes.txt"
    source.write_text("Wait for it\x85 then laugh.\n\nSecond note.\n\nThird note.", encoding="utf-8")
    built = build_corpus([source]).corpus
    assert "Wait for it\x85 then laugh." in built.documents  # cleaning keeps U+0085
    out = tmp_path / "corpus.jsonl"
    write_corpus(built, out)
    again = read_corpus(out)
    assert again.documents == built.documents and again.fingerprint == built.fingerprint


def test_hand_written_corpus_may_start_with_a_byte_order_mark(tmp_path: Path):
    path = tmp_path / "notepad.jsonl"
    path.write_bytes('\ufeff{"text": "hello there"}\r\n{"text": "second"}\r\n'.encode())
    assert sorted(read_corpus(path).documents) == ["hello there", "second"]


def test_a_post_cut_in_the_middle_of_an_emoji_is_read_without_its_half(tmp_path: Path):
    """A lone surrogate ("\\ud83d", half an emoji, from a post cut short) crashed the build with a traceback:
    "UnicodeEncodeError: 'utf-8' codec can't encode character '\\ud83d'"."""
    path = tmp_path / "posts.jsonl"
    path.write_text('{"text": "Cut short \\ud83d"}\n{"text": "Whole \\ud83d\\ude00"}\n')
    result = build_corpus([path])
    write_corpus(result.corpus, tmp_path / "corpus.jsonl")
    assert sorted(read_corpus(tmp_path / "corpus.jsonl").documents) == ["Cut short", "Whole \U0001F600"]


def test_writing_a_corpus_holds_a_line_at_a_time_and_a_failure_leaves_the_old_one_whole(tmp_path: Path):
    """The corpus was built as one string before it was written: three times the file's size in memory (peak RSS
    723 MB, not 623, building 100,000 posts); and the file was emptied first, so a failure lost the last corpus."""
    rng = random.Random(1)
    corpus = Corpus(train=[" ".join(rng.choices(["bread", "soil", "rain", "ünïcode"], k=150)) for _ in range(2_000)],
                    validation=["held out"], fingerprint="")
    path = tmp_path / "corpus.jsonl"
    write_corpus(corpus, tmp_path / "first.jsonl")  # imports and warms what writing needs
    tracemalloc.start()
    try:
        write_corpus(corpus, path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    written = path.read_bytes()
    assert written == (tmp_path / "first.jsonl").read_bytes() and len(written) > 1_000_000
    assert peak < len(written) / 10  # 24 KB now, for 2 MB; 3 times the file before
    assert read_corpus(path).documents == [*corpus.train, "held out"]
    broken = Corpus(train=["A fine post.", "A bad one \ud83d"], validation=[], fingerprint="")
    with pytest.raises(UnicodeEncodeError):
        write_corpus(broken, path)
    assert path.read_bytes() == written
    assert sorted(p.name for p in tmp_path.iterdir()) == ["corpus.jsonl", "first.jsonl"]  # nothing half written


def test_split_is_saved_and_reused(tmp_path: Path):
    source = tmp_path / "all.txt"
    source.write_text("\n\n".join(f"Entry number {i} says something different {i * 7}." for i in range(40)))
    result = build_corpus([source])
    assert len(result.corpus.validation) == 4 and len(result.corpus.train) == 36
    out = tmp_path / "corpus.jsonl"
    write_corpus(result.corpus, out)
    again = read_corpus(out)
    assert again.validation == result.corpus.validation and again.fingerprint == result.corpus.fingerprint
    # A hand-written corpus without splits gets the same split from the same texts.
    bare = tmp_path / "bare.jsonl"
    bare.write_text("".join(json.dumps({"text": t}) + "\n" for t in result.corpus.documents))
    assert sorted(read_corpus(bare).validation) == sorted(result.corpus.validation)


def test_one_long_document_holds_out_its_end(tmp_path: Path):
    """A book in one file was one document, so nothing was held out: training could not
    measure perplexity or stop early. Its last tenth is held out, cut at a paragraph break."""
    paragraphs = [f"Paragraph {i} of the book, on patience and gardens and the moon. " * 5 for i in range(40)]
    source = tmp_path / "book.md"
    source.write_text("\n\n".join(p.strip() for p in paragraphs))
    result = build_corpus([source])
    [head], [tail] = result.corpus.train, result.corpus.validation
    assert result.tail_held_out and result.cleaning.kept == 1
    assert tail.startswith("Paragraph ") and head.endswith("moon.")
    assert 0.05 < len(tail) / (len(head) + len(tail)) < 0.2
    out = tmp_path / "corpus.jsonl"
    write_corpus(result.corpus, out)
    assert read_corpus(out).validation == [tail]
    short = tmp_path / "note.md"
    short.write_text(paragraphs[0])
    assert not build_corpus([short]).corpus.validation  # too short to spare a tenth


def test_reading_missing_or_empty_corpus_says_what_to_do(tmp_path: Path):
    with pytest.raises(CorpusError, match="persona corpus build"):
        read_corpus(tmp_path / "nope.jsonl")
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(CorpusError, match="no documents"):
        read_corpus(empty)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n[1, 2]\n')
    with pytest.raises(CorpusError, match="bad.jsonl:2"):
        read_corpus(bad)


def test_a_pipe_or_a_folder_named_as_a_corpus_is_said_to_be_one(tmp_path: Path):
    """A pipe (`<(cat notes.txt)`) was said not to exist; a folder given as the corpus to train on too."""
    pipe = tmp_path / "pipe"
    os.mkfifo(pipe)
    with pytest.raises(CorpusError, match="is a pipe or device, not a file; .* save it to a file"):
        build_corpus([pipe])
    with pytest.raises(CorpusError, match="is a folder; name the corpus file in it"):
        read_corpus(tmp_path)


READERS = [read_text, read_markdown, read_fortune, read_csv, read_jsonl, read_tweets, read_pdf]


@pytest.mark.parametrize("reader", READERS, ids=lambda r: r.__name__)
@hypothesis_settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.binary(max_size=400) | st.text(max_size=400).map(str.encode))
def test_parsers_never_crash(reader, data: bytes, tmp_path: Path):
    path = tmp_path / "fuzzed"
    path.write_bytes(data)
    try:
        documents = reader(path, OPTIONS)
    except SourceProblem as problem:
        assert "fuzzed" in str(problem)
    else:
        assert all(isinstance(d.text, str) for d in documents)


def test_cli_on_a_data_directory_it_cannot_write_says_so_and_writes_nothing(tmp_path: Path):
    """The bundled tokenizer counts the tokens, and its cache could not be made: a
    NotADirectoryError traceback, after the corpus was written."""
    (tmp_path / "notes.txt").write_text("One note.\n\nAnother note.\n")
    (tmp_path / "a-file").write_text("")
    env = {k: v for k, v in os.environ.items() if not k.startswith("PERSONA_")}
    env |= {"COLUMNS": "300", "PERSONA_DATA_DIR": str(tmp_path / "a-file")}
    result = subprocess.run([sys.executable, "-m", "persona", "corpus", "build", str(tmp_path / "notes.txt"),
                             "-o", str(tmp_path / "corpus.jsonl")], env=env, capture_output=True, text=True,
                            check=False, timeout=120)
    assert result.returncode != 0 and "Traceback" not in result.stderr, result.stderr
    assert f"cannot keep data in {tmp_path / 'a-file'} (" in result.stderr, result.stderr
    assert "set PERSONA_DATA_DIR to a folder you can write" in result.stderr
    assert not (tmp_path / "corpus.jsonl").exists()


def test_cli_reads_a_json_file_named_as_json_and_one_in_a_folder_only_when_named(tmp_path: Path):
    """A .json file named was read as plain text: one document holding the raw JSON. In a
    folder, a .json is left out (package.json is no writing) and the line says to name it."""
    folder = tmp_path / "export"
    folder.mkdir()
    posts = folder / "posts.json"
    posts.write_text(json.dumps([{"text": "The first post, in a JSON array."}, {"text": "The second post."}], indent=2))
    (folder / "notes.txt").write_text("A note beside them.\n")
    named = _persona_cli(str(posts), "-o", str(tmp_path / "named.jsonl"))
    assert named.returncode == 0, named.stderr
    assert "2 documents (2 jsonl)" in named.stdout
    assert sorted(read_corpus(tmp_path / "named.jsonl").documents) == ["The first post, in a JSON array.", "The second post."]

    in_folder = _persona_cli(str(folder), "-o", str(tmp_path / "folder.jsonl"))
    assert in_folder.returncode == 0, in_folder.stderr
    assert "left out 1 file(s) in the folders that are no kind of writing it reads (1 .json); name a file to read it" in in_folder.stderr
    assert read_corpus(tmp_path / "folder.jsonl").documents == ["A note beside them."]

    posts.write_text("Not JSON at all, only a note.\n")
    wrong = _persona_cli(str(posts), "-o", str(tmp_path / "wrong.jsonl"))
    assert wrong.returncode == 1, wrong.stderr
    assert f"skipped {posts}:1: not JSON: Expecting value; --format text reads it as plain text" in wrong.stderr


def test_cleaning_keeps_the_authors_characters_and_merges_only_one_letter_spelled_two_ways():
    """NFKC rewrote the text: "ㅋㅋㅋ" became jamo that do not show as the laughing ㅋ, "E=mc²" became "E=mc2"."""
    for written in ["ㅋㅋㅋ 진짜", "ㅋㅠ", "E=mc² and H₂O", "x⁻¹", "①②③", "10㎏", "Brand™", "ｶﾀｶﾅ", "…"]:
        assert normalize_text(written) == written
    assert normalize_text("cafe\u0301") == "café"
    kept, report = clean_documents(["10㎏ of rice", "10kg of rice", "café", "cafe\u0301"])
    assert kept == ["10㎏ of rice", "café"] and report.dropped["duplicate"] == 2  # NFKC still finds duplicates


def test_c1_control_characters_are_removed():
    assert normalize_text("a\x9dmenu\x80 b") == "amenu b"


def test_mojibake_is_kept_with_one_warning_naming_the_file_and_a_count(tmp_path: Path, caplog: pytest.LogCaptureFixture):
    source = tmp_path / "notes.txt"
    source.write_text("CafÃ© and its â€œmenuâ€\x9d.\n\nA plain line.\n\nSÃO PAULO is not garbled.\n", encoding="utf-8")
    with caplog.at_level("WARNING", logger="training.corpus"):
        result = build_corpus([source])
    [warning] = caplog.messages
    assert f"{source}: 1 of 3 document(s) hold UTF-8 read as another encoding" in warning and "iconv" in warning
    assert "CafÃ© and its â€œmenuâ€." in result.corpus.documents  # not repaired, only said
    assert not has_mojibake("São Paulo, naïve, Â. 5°C")


def test_stripping_handles_leaves_email_addresses_whole():
    """--strip-handles drops @mentions, not the @ inside an address: "me@example.com" is not
    "me.com"."""
    options = CleanOptions(strip_handles=True)
    assert normalize_text("Write to me@example.com, @ann", options) == "Write to me@example.com,"


def test_a_no_break_space_or_sign_read_as_latin_1_is_mojibake():
    """UTF-8's no-break space and "©" read as Latin-1 or Windows-1252 show as "Â" and the
    character: a page copied that way is told, as "Ã©" for "é" is."""
    assert has_mojibake("Copyright Â© 2020")
    assert has_mojibake("10\u00c2\u00a0km away")


def test_old_mac_line_endings_are_line_breaks():
    """A file saved with lone carriage returns (classic Mac OS) has lines, not one line with
    "\\r" in it: they are read as line breaks, as Windows's "\\r\\n" is."""
    assert normalize_text("first line\rsecond line\r\rnext paragraph") == "first line\nsecond line\n\nnext paragraph"
    assert normalize_text("first line\r\nsecond line") == "first line\nsecond line"
