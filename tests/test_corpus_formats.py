"""What each source format gives the corpus as an author's own writing: drafts, threads, attributions
and the markup of their posts (training/markdown.py, training/tweets.py, training/fortune.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import zipfile
from pathlib import Path

from training.cleaning import normalize_text
from training.corpus import read_corpus
from training.fortune import read_fortune
from training.html_text import html_to_text
from training.markdown import read_markdown, strip_markdown
from training.sources import ReadOptions, read_text
from training.tweets import read_tweets

OPTIONS = ReadOptions()


def texts(documents) -> list[str]:
    return [d.text.strip() for d in documents]


def _persona_cli(*args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PERSONA_")} | {"COLUMNS": "300"}
    return subprocess.run([sys.executable, "-m", "persona", "corpus", "build", *args, "--base", ""], env=env,
                          capture_output=True, text=True, check=False, timeout=120)


def _post(folder: Path, name: str, header: str, body: str, fence: str = "---") -> Path:
    path = folder / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"{fence}\n{header}\n{fence}\n{body}\n")
    return path


# --- Drafts -----------------------------------------------------------------------------


def test_drafts_marked_in_any_case_or_with_a_quoted_value_are_left_out(tmp_path: Path):
    """Only "draft: true" and "draft: yes" were drafts: "true" in quotes (YAML or TOML), "Draft:" as
    Hugo's archetypes write it, and "published: 'false'" went into the corpus to be trained on."""
    drafts = {
        _post(tmp_path, "quoted.md", 'title: a\ndraft: "true"', "A quoted YAML draft."): ("draft", 3, "true"),
        _post(tmp_path, "toml.md", 'title = "b"\ndraft = "true"', "A quoted TOML draft.", "+++"): ("draft", 3, "true"),
        _post(tmp_path, "capital.md", "Title: c\nDraft: true", "A capitalised draft."): ("Draft", 3, "true"),
        _post(tmp_path, "yes.md", "draft: 'yes'", "A draft said yes."): ("draft", 2, "true"),
        _post(tmp_path, "one.md", "draft: 1", "A draft said 1."): ("draft", 2, "true"),
        _post(tmp_path, "jekyll.md", 'title: d\nPublished: "false"', "Not published yet."): ("Published", 3, "false"),
    }
    for path, (key, line, said) in drafts.items():
        documents = read_markdown(path, OPTIONS)
        assert documents == [], path.name
        [why] = documents.left_out
        assert str(why).startswith(f"{path}:{line}: a draft (its front matter sets {key} to {said})"), str(why)
    published = [_post(tmp_path, "out.md", 'draft: "false"', "Out in the world."),
                 _post(tmp_path, "live.md", "Published: 'yes'\nDraft: no", "Live too.")]
    assert [texts(read_markdown(path, OPTIONS)) for path in published] == [["Out in the world."], ["Live too."]]


def test_posts_in_jekylls_drafts_folder_are_left_out_and_said_to_be_drafts(tmp_path: Path):
    """Jekyll's drafts are the files in _drafts/, whatever their front matter: they were read as posts."""
    site = tmp_path / "jekyll"
    _post(site / "_posts", "2022-01-15-hello.md", "title: Hello", "A published post about the sea.")
    unfinished = _post(site / "_drafts", "unfinished.md", "title: never", "An unfinished post about rain.")
    result = _persona_cli(str(site), "-o", str(tmp_path / "corpus.jsonl"))
    assert result.returncode == 0, result.stderr
    assert (f"skipped {unfinished}: a draft (it is in a _drafts folder, whose posts Jekyll does not publish); "
            "move it to _posts to read it") in result.stderr
    assert read_corpus(tmp_path / "corpus.jsonl").documents == ["A published post about the sea."]
    for n in range(5):  # past five, drafts are counted in one line: these among them
        _post(site / "_drafts", f"idea-{n}.md", "title: idea", f"Idea number {n}.")
    many = _persona_cli(str(site), "-o", str(tmp_path / "corpus.jsonl"))
    assert many.returncode == 0, many.stderr
    assert "left out 6 drafts" in many.stderr and "Idea number" not in (tmp_path / "corpus.jsonl").read_text()


def test_many_drafts_in_a_drafts_folder_are_summed_up_as_drafts_by_place(tmp_path: Path):
    """Past five, the line said "6 drafts, whose front matter sets nothing (it is in _drafts/) ...; to read one,
    set nothing (move a post in _drafts/ to _posts/) in its front matter": a folder's drafts are drafts by place."""
    site = tmp_path / "jekyll"
    _post(site / "_posts", "2022-01-15-hello.md", "title: Hello", "A published post about the sea.")
    _post(site / "_posts", "2022-01-20-wind.md", "title: Wind", "A published post about the wind.")
    for n in range(6):
        _post(site / "_drafts", f"idea-{n}.md", "title: idea", f"Idea number {n}.")
    result = _persona_cli(str(site), "-o", str(tmp_path / "corpus.jsonl"))
    assert result.returncode == 0, result.stderr
    folder = site / "_drafts"
    assert " ".join(result.stderr.split()) == (
        f"left out 6 drafts, in a _drafts/ folder, whose posts Jekyll does not publish: {folder / 'idea-0.md'}, "
        f"{folder / 'idea-1.md'}, {folder / 'idea-2.md'} and 3 more; to read one, move it from _drafts/ to _posts/")
    _post(site / "_posts", "2022-02-01-soon.md", "title: Soon\npublished: false", "Not yet.")
    mixed = _persona_cli(str(site), "-o", str(tmp_path / "corpus.jsonl"))
    assert mixed.returncode == 0, mixed.stderr
    assert " ".join(mixed.stderr.split()) == (
        f"left out 7 drafts, 1 whose front matter sets published to false and 6 in a _drafts/ folder, whose posts "
        f"Jekyll does not publish: {folder / 'idea-0.md'}, {folder / 'idea-1.md'}, {folder / 'idea-2.md'} and 4 more; "
        "to read one, set published to true in its front matter, or move it from _drafts/ to _posts/")


# --- Line ends --------------------------------------------------------------------------


def test_old_mac_line_ends_part_documents_as_other_line_ends_do(tmp_path: Path):
    """A file saved with a lone CR at each line's end (classic Mac OS, some exports) was one document: its
    blank lines, its front matter's fences and its "%" lines were not found."""
    notes = tmp_path / "notes.txt"
    notes.write_bytes(b"First post, old Mac.\rSecond line.\r\rSecond post.\r")
    assert texts(read_text(notes, OPTIONS)) == ["First post, old Mac.\nSecond line.", "Second post."]
    post = tmp_path / "post.md"
    post.write_bytes(b"---\rtitle: Rain\r---\rOne paragraph.\r\rAnother.\r")
    assert texts(read_markdown(post, OPTIONS)) == ["One paragraph.\n\nAnother."]
    draft = tmp_path / "draft.md"
    draft.write_bytes(b"+++\rdraft = true\r+++\rNot yet.\r")
    assert read_markdown(draft, OPTIONS) == [] and read_markdown(draft, OPTIONS).left_out
    wisdom = tmp_path / "wisdom.fortune"
    wisdom.write_bytes(b"One saying.\r\t\t-- Hegel\r%\rAnother saying.\r%\r")
    assert texts(read_fortune(wisdom, OPTIONS)) == ["One saying.", "Another saying."]


# --- Markup -----------------------------------------------------------------------------


def test_markdown_s_inline_html_and_an_html_page_part_words_at_the_same_tags():
    """The two kept lists of tags apart: an HTML page glued "Centred.After." where Markdown parted them."""
    for fragment in ("<center>Centred.</center>After.", "<p>One.</p><hr><p>Two.</p>", "Line one<br><br>Line two",
                     "<figure><img src=x><figcaption>A caption.</figcaption></figure>After.",
                     "<ul><li>a</li><li>b</li></ul>", "<dl><dt>Term</dt><dd>Meaning</dd></dl>"):
        assert normalize_text(strip_markdown(fragment)) == html_to_text(fragment), fragment
    assert html_to_text("<center>Centred.</center>After.") == "Centred.\n\nAfter."


def test_html_line_and_block_tags_keep_the_words_either_side_apart():
    """Stripping "<br>" and "</p><p>" glued words: "softupon", "First para.Second para.", "SpoilerHidden"."""
    text = normalize_text(strip_markdown(
        "The rain fell soft<br>upon the sleeping town<br/>and no one woke.\n\n"
        "<p>First para.</p><p>Second para.</p>\n\n"
        "<details><summary>Spoiler</summary>Hidden bit.</details>\n\n"
        "<div>Cell one</div><div>Cell two</div>\n\n"
        "<ul><li>apples</li><li>pears</li></ul>\n\n"
        "<table><tr><td>left</td><td>right</td></tr></table>\n\n"
        "<h2>A heading</h2>Then prose, with <em>emphasis</em> and H<sub>2</sub>O.\n"
    ))
    assert text == ("The rain fell soft\nupon the sleeping town\nand no one woke.\n\n"
                    "First para.\n\nSecond para.\n\nSpoiler\nHidden bit.\n\nCell one\n\nCell two\n\n"
                    "apples\npears\n\nleft right\n\nA heading\n\nThen prose, with emphasis and H2O.")


def test_backslash_escapes_show_the_character_they_escape():
    r""""\_underscore\_" became "\underscore\": the emphasis rule took the escaped underscores."""
    text = normalize_text(strip_markdown(
        "\\* literal asterisk and \\_underscore\\_.\n\n"
        "Not a heading: \\# one, not a link: \\[two\\](three), and a backslash: \\\\.\n\n"
        "Code keeps its own: `a\\_b` and `C:\\*`.\n\n"
        "\\<br> is written, and AT\\&amp;T stays as typed.\n"
    ))
    assert text == ("* literal asterisk and _underscore_.\n\n"
                    "Not a heading: # one, not a link: [two](three), and a backslash: \\.\n\n"
                    "Code keeps its own: a\\_b and C:\\*.\n\n"
                    "<br> is written, and AT&amp;T stays as typed.")


def test_struck_text_keeps_its_words_and_loses_its_tildes():
    assert normalize_text(strip_markdown("Here is ~~struck~~ text, ~~two words~~ too, and a ~ alone.")) == (
        "Here is struck text, two words too, and a ~ alone.")


def test_an_image_gives_its_alt_text_and_a_badge_or_a_file_name_gives_nothing():
    """"or see ![a map](...)." left "or see ." """
    text = normalize_text(strip_markdown(
        "Take the north path, or see ![a map of the valley](/img/map.png).\n\n"
        "![A photo of a tree in the rain](/img/tree.jpg)\n\n"
        "Built with care [![build passing](https://ci/b.svg)](https://ci) and ![IMG_0042.JPG](/x.jpg) here.\n"
    ))
    assert text == ("Take the north path, or see a map of the valley.\n\nA photo of a tree in the rain\n\n"
                    "Built with care and here.")


def test_liquid_output_tags_go_as_the_other_template_tags_do(tmp_path: Path):
    """Jekyll's "{{ site.title }}" stayed in the prose while "{% ... %}" tags were removed."""
    post = _post(tmp_path, "2022-02-01-liquid.markdown", "layout: post",
                 '{% include figure.html src="x.png" %}\nSome writing about {{ site.title }} and the weather,'
                 " {{- page.date | date: '%Y' -}} and {{< shortcode >}} too.\n\nA {{ never closed stays.")
    assert texts(read_markdown(post, OPTIONS)) == [("Some writing about  and the weather,  and  too.\n\n"
                                                    "A {{ never closed stays.")]


# --- Tweets -----------------------------------------------------------------------------


def _tweet(id_: str, text: str, **extra) -> dict:
    return {"tweet": {"id_str": id_, "full_text": text, **extra}}


def _account(account_id: str) -> str:
    return "window.YTD.account.part0 = " + json.dumps(
        [{"account": {"username": "me_author", "accountId": account_id}}])


THREAD = [
    _tweet("1", "The first part of my thread about rain.", display_text_range=["0", "39"]),
    _tweet("2", "@friend I agree with you there", display_text_range=["8", "30"],
           in_reply_to_status_id_str="99", in_reply_to_user_id_str="43"),
    # A thread goes on from a post that is not in the file (deleted, or in another part): its account tells.
    _tweet("3", "The second part: the rain never lies.", display_text_range=["0", "37"],
           in_reply_to_status_id_str="77", in_reply_to_user_id_str="44"),
    # An older thread, "@me_author" hidden before the text; answered by its post, no account.js needed.
    _tweet("4", "@me_author The third part, and the last.", display_text_range=["11", "40"],
           in_reply_to_status_id_str="1", in_reply_to_user_id="44"),
]


def _archive(folder: Path, tweets: list[dict], account: str | None) -> Path:
    folder.mkdir(parents=True)
    (folder / "tweets.js").write_text("window.YTD.tweets.part0 = " + json.dumps(tweets, indent=2))
    if account is not None:
        (folder / "account.js").write_text(_account(account))
    return folder / "tweets.js"


def test_an_authors_own_thread_is_kept_and_only_replies_to_others_left_out(tmp_path: Path):
    """A reply to the author's own post was left out "as not the author's own posts"."""
    tweets = _archive(tmp_path / "data", THREAD, account="44")
    documents = read_tweets(tweets, OPTIONS)
    assert texts(documents) == ["The first part of my thread about rain.", "The second part: the rain never lies.",
                                "The third part, and the last."]
    [why] = documents.left_out
    assert why.reason == ("1 reply(ies) left out, as not the author's own posts (the other 3 were read, 2 in the "
                          "author's own threads among them); --keep-replies read them too")
    without_account = _archive(tmp_path / "bare", THREAD, account=None)
    assert texts(read_tweets(without_account, OPTIONS)) == ["The first part of my thread about rain.",
                                                            "The third part, and the last."]


def test_an_x_export_zip_knows_the_author_by_its_account_js(tmp_path: Path):
    export = tmp_path / "twitter-2024.zip"
    with zipfile.ZipFile(export, "w") as archive:
        archive.writestr("data/tweets.js", "window.YTD.tweets.part0 = " + json.dumps(THREAD))
        archive.writestr("data/account.js", _account("44"))
    assert "The second part: the rain never lies." in texts(read_tweets(export, OPTIONS))


def test_a_reply_kept_loses_the_mentions_x_hides_before_it(tmp_path: Path):
    """--keep-replies kept the "@friend" that X shows above a reply, not in it."""
    tweets = _archive(tmp_path / "data", [
        *THREAD,
        _tweet("5", "@one @two Both of you, read this", display_text_range=["9", "33"], in_reply_to_user_id_str="7"),
        _tweet("6", "@friend: a mention I wrote myself", display_text_range=["0", "33"], in_reply_to_user_id_str="7"),
        _tweet("7", "Not mentions before the start", display_text_range=["4", "29"], in_reply_to_user_id_str="7"),
    ], account="44")
    replies = texts(read_tweets(tweets, ReadOptions(keep_replies=True)))
    assert replies[1] == "I agree with you there" and replies[3] == "The third part, and the last."
    assert replies[4:] == ["Both of you, read this", "@friend: a mention I wrote myself", "Not mentions before the start"]


# --- Fortunes ---------------------------------------------------------------------------


FORTUNES = """\
The only thing we learn from history is that we learn nothing.
\t\t-- Hegel
%
An unattributed saying
on two lines.
%
Get your facts first, and then you can distort them as much as you please.
\t\t-- Mark Twain, in "Rudyard Kipling,
\t\t   From Sea to Sea", 1899
%
-- Eschew the implement of correction and vitiate the scion.
-- The temperature of the aqueous content of an unremittingly
\tgalled saucepan does not reach 212 degrees Farenheit.
%
"""


def test_fortune_attributions_are_removed_without_author_and_counted(tmp_path: Path):
    """Read without --author, 246 of the 424 entries of Debian's "wisdom" ended in "-- Someone": a
    persona trained on them would sign its posts with other people's names."""
    path = tmp_path / "wisdom"
    path.write_text(FORTUNES)
    documents = read_fortune(path, OPTIONS)
    assert texts(documents) == [
        "The only thing we learn from history is that we learn nothing.",
        "An unattributed saying\non two lines.",
        "Get your facts first, and then you can distort them as much as you please.",
        # A list of "-- " lines at the margin is not signed by its last item ("platitudes" has these).
        ("-- Eschew the implement of correction and vitiate the scion.\n-- The temperature of the aqueous content "
         "of an unremittingly\n\tgalled saucepan does not reach 212 degrees Farenheit."),
    ]
    [why] = documents.left_out
    assert str(why) == (f'{path}: 2 attribution(s) removed ("-- Hegel" ...), so that the persona does not sign its '
                        "posts with other people's names")
    twain = read_fortune(path, ReadOptions(author="Mark Twain"))
    assert texts(twain) == ["Get your facts first, and then you can distort them as much as you please."]
    assert twain.left_out == []  # removing the signature is what --author says it does


def test_a_dash_line_of_the_author_s_own_at_an_entry_s_end_is_kept_without_author(tmp_path: Path):
    """Any "-- " line of an entry's last three was taken for an attribution and cut with all after it:
    "-- every single day, for a whole year." was lost, and "I told her the plan" kept alone."""
    path = tmp_path / "mine.fortune"
    path.write_text("He came back tomorrow, and the day after\n-- every single day, for a whole year.\n%\n"
                    "I told her the plan\n-- the whole plan,\nand she laughed.\n%\n"
                    "Well begun is half done.\n-- Aristotle, Politics 5.4\n%\n"
                    "Strike while the iron is hot.\n\t-- J. R. R. Tolkien\n\t   (not really)\n%\n")
    documents = read_fortune(path, OPTIONS)
    assert texts(documents) == [
        "He came back tomorrow, and the day after\n-- every single day, for a whole year.",
        "I told her the plan\n-- the whole plan,\nand she laughed.",
        "Well begun is half done.",
        "Strike while the iron is hot.",
    ]
    assert documents.left_out[0].count == 2


def test_cli_builds_fortunes_without_signatures_and_says_so(tmp_path: Path):
    path = tmp_path / "wisdom"
    path.write_text(FORTUNES)
    result = _persona_cli(str(path), "-o", str(tmp_path / "corpus.jsonl"))
    assert result.returncode == 0, result.stderr
    assert f"{path}: 2 attribution(s) removed" in result.stderr and "skipped" not in result.stderr
    assert not any("Hegel" in document or "Twain" in document
                   for document in read_corpus(tmp_path / "corpus.jsonl").documents)


def test_attributions_removed_from_many_fortune_files_are_said_in_one_line(tmp_path: Path):
    """Debian's fortunes folder printed a line per file, forty of them: "FILE: N attribution(s) removed ..."."""
    for name in ("wisdom", "people", "science"):
        (tmp_path / "fortunes" / name).parent.mkdir(exist_ok=True)
        (tmp_path / "fortunes" / name).write_text(FORTUNES.replace("nothing", f"nothing of {name}"))
    result = _persona_cli(str(tmp_path / "fortunes"), "-o", str(tmp_path / "corpus.jsonl"))
    assert result.returncode == 0, result.stderr
    assert result.stderr.splitlines() == [("6 attribution(s) removed from 3 fortune files (\"-- Hegel\" ...), so that "
                                           "the persona does not sign its posts with other people's names")]


def test_markdown_with_many_unclosed_liquid_struck_or_escaped_openers_is_read_in_time():
    """Each opener never closed costs one look ahead, not a scan to the text's end."""
    started = time.perf_counter()
    stripped = [strip_markdown(opener * 20_000) for opener in ("{{ x\n", "~~a ", "`a\\* ", "![a](", "<li>x ")]
    assert time.perf_counter() - started < 3
    assert all(len(text) >= 20_000 for text in stripped)


def test_full_width_punctuation_of_chinese_and_japanese_is_kept_as_written():
    """All of U+FF01-FF5E was folded: "你好，世界！" became "你好,世界!". Only full-width letters and digits fold."""
    assert normalize_text("你好，世界！真的吗？（是的）") == "你好，世界！真的吗？（是的）"
    assert normalize_text("Ｆｕｌｌ ｗｉｄｔｈ ２０２４。") == "Full width 2024。"
