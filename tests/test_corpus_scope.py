"""What a corpus build reads: the author's posts in a site's folder, not its theme or packages; the text of
HTML, not its tags; documents it cannot read, named with how to convert them; and a corpus written by hand,
said to be uncleaned."""

from __future__ import annotations

import io
import json
import logging
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from persona.errors import CorpusError
from training.corpus import build_corpus, read_corpus, write_corpus
from training.html_text import html_to_text
from training.json_records import read_jsonl
from training.sources import ReadOptions, SourceProblem, read_csv, read_text


def _write(root: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text, encoding="utf-8")
    return root


def _persona_cli(*args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PERSONA_")} | {"COLUMNS": "300"}
    return subprocess.run([sys.executable, "-m", "persona", "corpus", "build", *args, "--base", ""], env=env,
                          capture_output=True, text=True, check=False, timeout=120)


HUGO_SITE = {
    "content/posts/rain.md": "---\ntitle: Rain\n---\nMy own post about the rain.\n",
    "content/about.md": "---\ntitle: About\n---\nI write about weather.\n",
    "themes/ananke/exampleSite/content/post/chapter-1.md": "---\ntitle: Alice\n---\nAlice was beginning to get tired.\n",
    "themes/ananke/README.md": "# Ananke, a theme for Hugo\n",
    "node_modules/pkg/README.md": "An npm package's readme.\n",
    "node_modules/pkg/notes.txt": "A package's notes.\n",
    "static/robots.txt": "User-agent: *\n",
    "archetypes/default.md": "---\ntitle: '{{ .Name }}'\n---\n",
    "public/posts/rain/index.html": "<p>My own post about the rain.</p>",
    "README.md": "# my-blog\n\nThe source of my blog; run `hugo server`.\n",
    "LICENSE": "MIT License\n\nPermission is hereby granted, free of charge...\n",
    "Gemfile": "source 'https://rubygems.org'\n",
}


def test_a_site_root_gives_the_author_s_posts_not_the_theme_s_packages_or_readmes(tmp_path: Path):
    """Built from a Hugo site's root, the corpus held the theme's example posts (Alice in Wonderland, in the
    real Ananke theme), the READMEs, the MIT licence, npm packages' files and robots.txt, as the author's."""
    site = _write(tmp_path / "site", HUGO_SITE)
    result = build_corpus([site])
    assert sorted(result.corpus.documents) == ["I write about weather.", "My own post about the rain."]
    assert sorted(result.passed_over["folders"]) == [site / name for name in
                                                     ("archetypes", "node_modules", "public", "static", "themes")]
    assert sorted(result.passed_over["project files"]) == [site / "Gemfile", site / "LICENSE", site / "README.md"]
    assert result.read_in == {site / "content": 1, site / "content" / "posts": 1}
    # A folder passed over is read when it is named itself.
    theme = build_corpus([site / "themes" / "ananke" / "exampleSite"])
    assert theme.corpus.documents == ["Alice was beginning to get tired."]


def test_a_folder_named_like_a_site_s_is_read_outside_a_site_root(tmp_path: Path):
    """"public", "resources", "assets"... were passed over at any depth: writing/public/essay.md was lost. Only a
    site's root (a config.toml, package.json, Gemfile...) owns them; packages and virtualenvs are owned anywhere."""
    writing = _write(tmp_path / "writing", {
        "public/essay.md": "My published essay.\n",
        "resources/reading.md": "What I read this year.\n",
        "blog/config.toml": "title = 'Blog'\n",
        "blog/public/index.md": "A built page.\n",
        "blog/content/public/speech.md": "A speech I gave in public.\n",
        "tools/node_modules/pkg/notes.txt": "A package's notes.\n",
        "tools/env/pyvenv.cfg": "home = /usr/bin\n",
        "tools/env/lib/notes.txt": "A package's notes.\n",
    })
    result = build_corpus([writing])
    assert sorted(result.corpus.documents) == ["A speech I gave in public.", "My published essay.",
                                               "What I read this year."]
    assert sorted(result.passed_over["folders"]) == [writing / "blog" / "public", writing / "tools" / "env",
                                                     writing / "tools" / "node_modules"]


def test_posts_named_like_a_project_s_files_are_read(tmp_path: Path):
    """"copying-is-ok.md" and "Changelog.md" were passed over as a project's COPYING and CHANGELOG."""
    posts = ("copying-is-ok.md", "readme-if-bored.md", "license-to-ill.md", "Changelog.md", "README-xx-yy.md")
    project = ("README.fr.md", "README-de.md", "README-pt_BR.md", "LICENSE-MIT", "LICENSE.txt", "CHANGELOG.md")
    blog = _write(tmp_path / "blog", {name: f"A post called {name}.\n" for name in posts + project})
    result = build_corpus([blog])
    assert len(result.corpus.documents) == len(posts)
    assert sorted(path.name for path in result.passed_over["project files"]) == sorted(project)


def test_cli_says_what_it_passed_over_in_a_site_and_which_folders_it_read(tmp_path: Path):
    """The report said only "left out 2 file(s) ... (1 .toml, 1 .html)", as though the folder were handled."""
    site = _write(tmp_path / "site", HUGO_SITE)
    result = _persona_cli(str(site), "-o", str(tmp_path / "corpus.jsonl"))
    assert result.returncode == 0, result.stderr
    assert (f"left out 5 folder(s) that a site generator or package manager owns (a theme and its example posts, "
            f"the built site, its templates, static files, packages), not the author's writing: {site / 'archetypes'}, "
            f"{site / 'node_modules'}, {site / 'public'}, {site / 'static'}, {site / 'themes'}; name one to read it"
            ) in result.stderr
    assert (f"left out 3 project file(s), not posts (README, LICENSE, robots.txt...): {site / 'Gemfile'}, "
            f"{site / 'LICENSE'}, {site / 'README.md'}; name one to read it") in result.stderr
    assert f"files read from: {site / 'content'} (1), {site / 'content' / 'posts'} (1)\n" in result.stdout


def test_an_x_export_s_deleted_posts_and_other_records_are_passed_over_each_for_its_reason(tmp_path: Path):
    """deleted-tweets.js was counted among ".js files ... name a file to read it", which invited adding the posts
    the author deleted; so were the export's likes and messages."""
    tweet = {"tweet": {"id_str": "1", "full_text": "A post of my own.", "created_at": "Wed May 01 10:00:00 +0000 2024"}}
    data = _write(tmp_path / "export" / "data", {
        "tweets.js": "window.YTD.tweets.part0 = " + json.dumps([tweet]),
        "deleted-tweets.js": "window.YTD.deleted_tweets.part0 = " + json.dumps([tweet]),
        "like.js": "window.YTD.like.part0 = []",
        "direct-messages.js": "window.YTD.direct_messages.part0 = []",
    })
    result = build_corpus([tmp_path / "export"])
    assert result.corpus.documents == ["A post of my own."] and result.left_out == []
    assert result.passed_over["deleted posts"] == [data / "deleted-tweets.js"]
    assert sorted(result.passed_over["export records"]) == [data / "direct-messages.js", data / "like.js"]


def test_a_json_of_records_named_deleted_something_is_not_taken_for_x_s_deleted_posts(tmp_path: Path):
    """Any "deleted-*.js(on)" was refused as an X export's deleted posts: deleted_scenes.json, a plain list of
    records, was refused named and passed over in a folder."""
    scenes = _write(tmp_path / "book", {"deleted_scenes.json": json.dumps([{"text": "A scene I cut from the book."}]),
                                        "deleted-posts.jsonl": json.dumps({"text": "A post I moved."}) + "\n"})
    named = build_corpus([scenes / "deleted_scenes.json"])
    assert named.corpus.documents == ["A scene I cut from the book."] and named.problems == []
    assert "deleted posts" not in build_corpus([scenes]).passed_over


def test_deleted_tweets_named_are_refused_saying_why_and_how_to_read_them_all_the_same(tmp_path: Path):
    """Named, deleted-tweets.js was read as plain text: its raw JSON, of posts the author deleted, was the corpus."""
    tweet = {"tweet": {"id_str": "1", "full_text": "A post I took back.", "created_at": "Wed May 01 10:00:00 +0000 2024"}}
    deleted = _write(tmp_path / "data", {"deleted-tweets.js": "window.YTD.deleted_tweets.part0 = " + json.dumps([tweet])})
    deleted /= "deleted-tweets.js"
    result = build_corpus([deleted])
    assert result.corpus.documents == []
    [refused] = result.problems
    assert refused.whole_file and refused.reason == (
        "posts the author deleted (the X export keeps them apart), left out on purpose: a persona should not post "
        "again what its author took back. To train on them all the same, read them as an archive of their own: "
        f"`mkdir deleted && cp {deleted} deleted/tweets.js`, then name deleted/tweets.js")
    copy = _write(tmp_path / "deleted", {"tweets.js": deleted.read_text()}) / "tweets.js"
    assert build_corpus([copy]).corpus.documents == ["A post I took back."]  # as the refusal says


def test_a_ghost_export_s_drafts_are_left_out_and_counted(tmp_path: Path):
    """A Ghost export's drafts ("status": "draft") were trained on, as published posts are."""
    export = tmp_path / "ghost.json"
    export.write_text(json.dumps({"db": [{"data": {"posts": [
        {"plaintext": "A published post.", "status": "published", "type": "post"},
        {"plaintext": "An unfinished thought.", "status": "draft", "type": "post"},
        {"plaintext": "About me, a page.", "status": "published", "type": "page"},
        {"plaintext": "Coming on Monday.", "status": "scheduled", "type": "post"},
    ]}}]}, indent=1))
    documents = read_jsonl(export, ReadOptions(field="plaintext"))
    assert [d.text for d in documents] == ["A published post.", "About me, a page.", "Coming on Monday."]
    [said] = documents.left_out
    assert not said.whole_file and said.reason == (
        '1 draft(s) left out, records whose "status" is "draft" (line(s) 11): not published, so not the author\'s '
        'to post; publish them (or set their status to "published" in the file) to read them')


def test_a_mastodon_outbox_s_replies_to_others_are_left_out_but_its_threads_kept(tmp_path: Path):
    """Replies to other people in an outbox ("inReplyTo" another's post) were kept, their "@bob" and all."""
    me = "https://m.example/users/me"
    outbox = tmp_path / "outbox.json"
    outbox.write_text(json.dumps({"orderedItems": [
        {"type": "Create", "actor": me, "object": {"attributedTo": me, "inReplyTo": None, "content": "<p>A toot.</p>"}},
        {"type": "Create", "actor": me, "object": {"attributedTo": me, "inReplyTo": "https://o.example/users/bob/1",
                                                   "content": "<p>@bob sure</p>"}},
        {"type": "Create", "actor": me, "object": {"attributedTo": me, "inReplyTo": f"{me}/statuses/1",
                                                   "content": "<p>My thread, part two.</p>"}},
    ]}))
    documents = read_jsonl(outbox, ReadOptions(field="object.content"))
    assert [d.text for d in documents] == ["A toot.", "My thread, part two."]
    assert any(said.reason.startswith("1 reply(ies) to other people's posts left out") and "--keep-replies" in said.reason
               for said in documents.left_out)
    kept = read_jsonl(outbox, ReadOptions(field="object.content", keep_replies=True))
    assert [d.text for d in kept] == ["A toot.", "@bob sure", "My thread, part two."]


ME = "https://m.example/users/me"


def _mention(name: str) -> str:
    """A mention of someone as Mastodon writes it in a post's HTML."""
    return (f'<span class="h-card" translate="no"><a href="https://o.example/@{name}" class="u-url mention">'
            f'@<span>{name}</span></a></span>')


def _toot(number: int, content: str, in_reply_to: str | None = None) -> dict:
    """A post of the author's as a Mastodon outbox holds it: a Create activity around its Note."""
    return {"id": f"{ME}/statuses/{number}/activity", "type": "Create", "actor": ME,
            "published": "2024-05-01T10:00:00Z", "to": ["https://www.w3.org/ns/activitystreams#Public"],
            "object": {"id": f"{ME}/statuses/{number}", "type": "Note", "summary": None, "inReplyTo": in_reply_to,
                       "attributedTo": ME, "content": content, "contentMap": {"en": content}, "tag": []}}


def _boost(number: int, post: str) -> dict:
    """A boost as a Mastodon outbox holds it: an Announce activity with only the address of the post shared."""
    return {"id": f"{ME}/statuses/{number}/activity", "type": "Announce", "actor": ME,
            "published": "2024-05-01T11:00:00Z", "to": ["https://www.w3.org/ns/activitystreams#Public"],
            "object": post}


def _outbox(path: Path, items: list[dict]) -> Path:
    path.write_text(json.dumps({"@context": "https://www.w3.org/ns/activitystreams", "id": "outbox.json",
                                "type": "OrderedCollection", "totalItems": len(items), "orderedItems": items},
                               indent=2))
    return path


def test_a_mastodon_outbox_s_boosts_are_left_out_and_named_as_boosts(tmp_path: Path):
    """Boosts ("type": "Announce", other people's posts) were counted as "2 record(s) with no text in the field"."""
    outbox = _outbox(tmp_path / "outbox.json", [
        _toot(1, "<p>The rain on the roof is a kind of clock.</p>"),
        _boost(2, "https://o.example/users/bob/statuses/99"),
        _boost(3, "https://o.example/users/ann/statuses/7"),
    ])
    result = build_corpus([outbox], read_options=ReadOptions(field="object.content"))
    assert result.corpus.documents == ["The rain on the roof is a kind of clock."]
    boosts, html = result.problems
    assert boosts.reason.startswith("2 boost(s) of other people's posts left out (line(s) 28, 38), as not the "
                                    "author's own posts") and not boosts.whole_file
    assert html.reason.startswith("1 record(s) hold HTML")


def test_a_record_of_another_export_whose_type_is_announce_is_read_as_any_other(tmp_path: Path):
    """Only an ActivityPub Announce (an actor's, of a post) is a boost: a newsletter's announcement
    ("type": "Announce", its own text) was left out as another person's post."""
    export = tmp_path / "newsletter.jsonl"
    export.write_text("".join(json.dumps(record) + "\n" for record in [
        {"type": "Announce", "text": "We launch the new garden club on Saturday; bring seeds and stories."},
        {"type": "Essay", "text": "On patience, and the slow work of soil."},
    ]))
    documents = read_jsonl(export, ReadOptions(field="text"))
    assert [d.text for d in documents] == ["We launch the new garden club on Saturday; bring seeds and stories.",
                                           "On patience, and the slow work of soil."]
    assert not documents.left_out


def test_a_mastodon_reply_read_loses_the_mentions_it_opens_with_not_those_in_its_sentences(tmp_path: Path):
    """A self-reply in a thread was read as "@bob @ann And the clock...", the mentions Mastodon opens a reply with."""
    outbox = _outbox(tmp_path / "outbox.json", [
        _toot(1, f"<p>{_mention('bob')} The rain on the roof is a kind of clock.</p>"),
        _toot(2, f"<p>{_mention('bob')} {_mention('ann')} And the clock never agrees with {_mention('bob')} about "
                 "the hour.</p>", in_reply_to=f"{ME}/statuses/1"),
        _toot(3, '<p><a href="https://m.example/tags/rain" class="mention hashtag" rel="tag">#<span>rain</span></a> '
                 "again today.</p>", in_reply_to=f"{ME}/statuses/2"),
        _toot(4, f"<p>{_mention('ann')}, you were right.</p>", in_reply_to=f"{ME}/statuses/3"),
    ])
    documents = read_jsonl(outbox, ReadOptions(field="object.content"))
    assert [d.text for d in documents] == ["@bob The rain on the roof is a kind of clock.",  # no reply: as written
                                           "And the clock never agrees with @bob about the hour.",
                                           "#rain again today.",
                                           "@ann, you were right."]  # her name, in its sentence


def test_html_reads_as_its_text_with_its_paragraphs_and_lines():
    page = ("<html><head><title>Blog</title><style>p {}</style></head><body><nav>Home | About</nav>"
            "<article><h1>Rain</h1><p>The rain fell soft<br>upon the town<br/>and no one woke.</p>"
            "<p>Tom &amp; Jerry &mdash; and   more\n words.</p><ul><li>one</li><li>two</li></ul>"
            "<script>track()</script></article><footer>(c) me</footer></body></html>")
    assert html_to_text(page) == ("Rain\n\nThe rain fell soft\nupon the town\nand no one woke.\n\n"
                                  "Tom & Jerry — and more words.\n\none\ntwo")
    assert html_to_text("<p>First para.</p><p>Second para.</p>") == "First para.\n\nSecond para."


def test_a_named_html_file_gives_its_text_not_its_markup(tmp_path: Path):
    """Named, page.html was stored as "<html><body><article><p>My HTML essay...", tags and all."""
    page = tmp_path / "page.html"
    page.write_text("<html><body><article><p>My HTML essay about rain.</p></article></body></html>")
    assert build_corpus([page]).corpus.documents == ["My HTML essay about rain."]


def test_a_mastodon_outbox_s_html_content_is_read_as_text_and_said_so(tmp_path: Path):
    """--field object.content, the build's own hint for an outbox, stored '<p><span class="h-card"><a href=...'."""
    outbox = tmp_path / "outbox.json"
    outbox.write_text(json.dumps({"orderedItems": [
        {"type": "Create", "object": {"content": '<p>My first toot about <a href="https://m.s/tags/rain" '
                                                 'class="hashtag">#<span>rain</span></a> &amp; tea.</p><p>Second.</p>'}},
        {"type": "Create", "object": {"content": "A plain one, 3 < 4 and 5 > 2."}},
    ]}))
    documents = read_jsonl(outbox, ReadOptions(field="object.content"))
    assert [d.text for d in documents] == ["My first toot about #rain & tea.\n\nSecond.", "A plain one, 3 < 4 and 5 > 2."]
    [said] = documents.left_out
    assert said.reason.startswith("1 record(s) hold HTML in the field 'object.content'") and not said.whole_file


def test_prose_that_mentions_a_tag_is_read_as_written_not_as_html(tmp_path: Path):
    """Text in a "text" field with one tag-like word was read as HTML: "the <b> tag" lost its tag's name and the
    post its paragraphs. HTML in a field of text is still read as its text."""
    prose = "Today I learned the <b> tag is not for bold any more.\n\nUse CSS. The <p> tag still is.\nLine two."
    path = tmp_path / "posts.jsonl"
    path.write_text("".join(json.dumps({"text": text}) + "\n"
                            for text in (prose, "<p>One.</p><p>Two &amp; three.</p>", "A <a href='/x'>link</a>.")))
    documents = read_jsonl(path, ReadOptions(field="text"))
    assert [document.text for document in documents] == [prose, "One.\n\nTwo & three.", "A link."]


def test_ghost_s_html_field_is_read_as_text(tmp_path: Path):
    export = tmp_path / "ghost.json"
    export.write_text(json.dumps({"db": [{"data": {"posts": [
        {"html": "<p>Ghost post &amp; HTML <strong>bold</strong></p><figure><img src=x></figure>"}]}}]}))
    assert [d.text for d in read_jsonl(export, ReadOptions(field="html"))] == ["Ghost post & HTML bold"]


def _zipped(path: Path, members: dict[str, str]) -> Path:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for name, text in members.items():
            archive.writestr(name, text)
    path.write_bytes(buffer.getvalue())
    return path


def test_word_epub_and_rtf_files_are_named_as_such_with_how_to_convert_them(tmp_path: Path):
    """A .docx was "a binary file ... name the files of the author's writing", though it is the author's
    writing, and an .rtf was read as text, its {\\rtf1 markup and all."""
    docx = _zipped(tmp_path / "novel.docx", {"[Content_Types].xml": "<Types/>", "word/document.xml": "<w:document/>"})
    epub = _zipped(tmp_path / "book.epub", {"mimetype": "application/epub+zip", "META-INF/container.xml": "<c/>"})
    rtf = tmp_path / "notes.rtf"
    rtf.write_text("{\\rtf1\\ansi\\deff0 {\\fonttbl {\\f0 Times;}}\\f0 My notes about rain.\\par}")
    with pytest.raises(SourceProblem) as word:
        read_text(docx, ReadOptions())
    assert word.value.reason == (f"a Word document, a format not read here; "
                                 f"save it as plain text from its editor (File > Save As > Plain Text), or convert it: "
                                 f"`pandoc {docx} -t plain --wrap=none -o {tmp_path / 'novel.txt'}`, then name that file")
    with pytest.raises(SourceProblem, match=rf"an EPUB book, .*Calibre's `ebook-convert {epub} {tmp_path / 'book.txt'}`"):
        read_text(epub, ReadOptions())
    with pytest.raises(SourceProblem, match=r"RTF \(rich text\), a format not read here"):
        read_text(rtf, ReadOptions())
    result = build_corpus([tmp_path])
    assert sorted(result.passed_over["documents"]) == [epub, rtf, docx] and result.left_out == []


def test_a_corpus_not_written_by_corpus_build_is_said_to_be_uncleaned(tmp_path: Path, caplog: pytest.LogCaptureFixture):
    """A hand-made {"text": ...} JSONL went into `persona train` with its HTML, links and entities, without a word."""
    hand = tmp_path / "raw.jsonl"
    hand.write_text('{"text": "Some <b>writing</b> &amp; a link https://t.co/x1."}\n{"text": "More writing."}\n')
    with caplog.at_level(logging.WARNING, logger="training.corpus"):
        read_corpus(hand)
    [warning] = caplog.messages
    assert warning == (f"{hand} was not written by `persona corpus build` (not every line is a text and its split), "
                       "so it was not cleaned: HTML, links, duplicates and empty lines are trained on as they are; "
                       f"1 of its 2 documents hold HTML tags. To clean it: `persona corpus build {hand} -o "
                       f"{tmp_path / 'raw-clean.jsonl'}`, then use that one")
    caplog.clear()
    built = tmp_path / "built.jsonl"
    write_corpus(build_corpus([hand]).corpus, built)
    with caplog.at_level(logging.WARNING, logger="training.corpus"):
        assert read_corpus(built).documents == ["Some writing & a link https://t.co/x1.", "More writing."]
    assert caplog.messages == []


def test_a_source_file_given_as_the_corpus_points_to_corpus_build(tmp_path: Path):
    """`persona train --corpus tweets.js` said only "not JSON (Expecting value); a corpus has one {"text": ...}"."""
    tweets = tmp_path / "tweets.js"
    tweets.write_text('window.YTD.tweets.part0 = [{"tweet": {"full_text": "A post"}}]\n')
    with pytest.raises(CorpusError, match=rf"make a corpus of it: `persona corpus build {tweets} -o corpus.jsonl`"):
        read_corpus(tweets)
    records = tmp_path / "posts.jsonl"
    records.write_text('{"body": "A post"}\n')
    with pytest.raises(CorpusError, match=rf"`persona corpus build {records} --field FIELD -o corpus.jsonl`"):
        read_corpus(records)


def test_a_mistyped_fortune_author_is_told_the_nearest_signatures(tmp_path: Path):
    """--author "Oscar Wild" gave only "no documents signed by 'Oscar Wild' found"."""
    fortunes = tmp_path / "quotes"
    fortunes.write_text("Be yourself.\n\t\t-- Oscar Wilde\n%\nWork is love made visible.\n\t\t-- Kahlil Gibran\n"
                        "%\nI can resist anything except temptation.\n\t\t-- Oscar Wilde, \"Lady Windermere's Fan\"\n%\n")
    result = _persona_cli(str(fortunes), "--author", "Oscar Wild", "-o", str(tmp_path / "corpus.jsonl"))
    assert result.returncode == 1
    assert result.stderr.strip() == ("error: no documents signed by 'Oscar Wild' found in 1 file(s); nothing written. "
                                     "Nearest signatures: 'Oscar Wilde' (2 entries); try --author 'Oscar Wilde'")


def test_an_empty_csv_text_cell_is_counted_not_lost_in_silence(tmp_path: Path):
    """Row 3's empty cell disappeared while the report said "dropped none"."""
    posts = tmp_path / "posts.csv"
    posts.write_text("id,text,likes\n1,First post.,5\n2,Second post.,3\n3,,0\n4,   ,1\n5\n")
    documents = read_csv(posts, ReadOptions())
    assert [d.text for d in documents] == ["First post.", "Second post."]
    [said] = documents.left_out
    assert said.line == 4 and said.reason == "3 row(s) left out, with no text in the 'text' column (line(s) 4, 5, 6)"


def test_project_files_are_known_by_their_names_not_posts_whose_slug_begins_alike(tmp_path: Path):
    blog = _write(tmp_path / "blog", {"README-fr.md": "Le blog.\n", "LICENSE-MIT": "MIT License\n",
                                      "CODE_OF_CONDUCT.md": "Be kind.\n", "license-to-kill.md": "A post about Bond.\n",
                                      "authors.md": "The writers I love.\n", "AUTHORS": "Me <me@example.org>\n"})
    result = build_corpus([blog])
    assert sorted(result.corpus.documents) == ["A post about Bond.", "The writers I love."]
    assert sorted(path.name for path in result.passed_over["project files"]) == [
        "AUTHORS", "CODE_OF_CONDUCT.md", "LICENSE-MIT", "README-fr.md"]
