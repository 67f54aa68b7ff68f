"""Reading JSON Lines, and JSON files of records: a JSON array of them, or an object wrapping them.

One document per record, from the field named by ``--field`` (dots go deeper). A file that is one
object without that field is taken for the wrapper of a list of records, found by walking down it
through objects and lists of one object, up to ``WRAPPER_DEPTH`` steps: a blog's ``{"posts": [...]}``,
Ghost's ``{"db": [{"data": {"posts": [...]}}]}``, a Reddit listing's ``{"data": {"children": [...]}}``,
a feed converted from RSS, ``{"rss": {"channel": {"item": [...]}}}``. The list whose records hold the field
is read, one of the object's own first; several alike are named, with the ``jq`` path that saves one alone.

A record its author has not published (``"status": "draft"``, as Ghost and WordPress export drafts) is left out,
and so is a reply to other people's posts in a Mastodon outbox (an ActivityPub note ``inReplyTo`` a post that is
not its author's; ``--keep-replies`` keeps them): both counted and said, as the Markdown and X readers do. So are an
outbox's boosts (``Announce`` activities): other people's posts the author shared, held in it only by their address.
A reply that is read loses the mentions its HTML opens with (``html_text``), as a reply out of an X archive does.
"""

from __future__ import annotations

import json
import re
import shlex
from collections import Counter
from pathlib import Path

from training.html_text import html_to_text, looks_like_html
from training.sources import (
    Documents,
    RawDocument,
    ReadOptions,
    SourceProblem,
    json_lines,
    read_text_file,
    some_lines,
)

__all__ = ["WRAPPER_DEPTH", "read_jsonl"]

WRAPPER_DEPTH = 6  # steps (a key, or the one item of a list) from the wrapping object down to its list of records
# Fields that hold a post's text in the exports people have, the likelier first: suggested when --field
# names none. Not mobiledoc or lexical (Ghost's), which are JSON of the post's structure; html last: a field
# that holds HTML is read as its text, but one that holds the text itself (Ghost's plaintext) is the closer copy.
_TEXT_FIELDS = ("text", "full_text", "plaintext", "content_text", "selftext", "body", "content", "message",
                "description", "caption", "html")
# Fields that hold HTML in the exports that have them (Ghost's html, Mastodon's object.content, JSON Feed's
# content_html): what they hold with a tag is read as HTML. In another field, text is read as HTML only when it is
# plainly so (``_is_html``), not prose that mentions "the <b> tag".
_HTML_FIELDS = frozenset({"html", "content", "content_html", "body_html"})
_BLOCK_START = re.compile(r"\s*<(?:p|div|h[1-6]|ul|ol|blockquote|pre|figure|section|article|table|html|body)\b[^<>]*>",
                          re.IGNORECASE)
_PAIRED_TAG = re.compile(r"<([a-z][a-z0-9]*)\b[^<>]*>.*?</\1\s*>", re.IGNORECASE | re.DOTALL)
_BLANK_LINE = re.compile(r"\n[ \t]*\n")
_JQ_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_JQ_KEYWORDS = frozenset({"and", "as", "catch", "def", "elif", "else", "end", "foreach", "if", "import",
                          "include", "label", "not", "or", "reduce", "then", "try", "__loc__"})

Step = str | int  # a key of an object, or 0: the one item of a list


def _json_records(path: Path, text: str) -> tuple[list[tuple[int, object]], list[tuple[int, str]]]:
    """(line, record) for each line of a JSONL text, and (line, why) for each line that is not JSON.
    A line holding an array gives its items, and so does a file that is one JSON array over many
    lines (or one pretty-printed object gives itself).

    A few broken lines (a record cut short by a crash, a stray line) are only those lines: the
    rest is read. A file with as many broken lines as good ones is no JSONL: ``SourceProblem``.
    """
    records: list[tuple[int, object]] = []
    broken: list[tuple[int, str]] = []
    good = 0
    whole_error: SourceProblem | None = None
    for number, line in enumerate(json_lines(text), start=1):
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except json.JSONDecodeError as exc:
            if not good and not broken:  # the first line: perhaps of one value over many lines
                try:
                    return _whole_json_records(text), []
                except json.JSONDecodeError as whole_exc:  # says where an array breaks, not at its "["
                    whole_error = SourceProblem(path, whole_exc.lineno, f"not JSON: {whole_exc.msg}")
            broken.append((number, f"{exc.msg} (column {exc.colno})"))
            continue
        good += 1
        records.extend((number, item) for item in (value if isinstance(value, list) else [value]))
    if broken and len(broken) >= good:  # read as JSON for its name (.json, .jsonl) or --format
        problem = whole_error or SourceProblem(path, broken[0][0], f"not JSON: {broken[0][1]}")
        raise SourceProblem(path, problem.line, f"{problem.reason}; --format text reads it as plain text")
    return records, broken


_BLANK = re.compile(r"[ \t\n\r]*")


def _whole_json_records(text: str) -> list[tuple[int, object]]:
    """(line, record) for a text that is one JSON value over many lines: each item of an array
    with the line it starts on (each was named by the array's first line), or the one value."""
    position = _BLANK.match(text).end()
    if not text.startswith("[", position):
        value, end = json.JSONDecoder().raw_decode(text, position)
        records = [(text.count("\n", 0, position) + 1, value)]
    else:
        records, end = _array_records(text, position)
    if (rest := _BLANK.match(text, end).end()) != len(text):
        raise json.JSONDecodeError("Extra data", text, rest)
    return records


def _array_records(text: str, position: int) -> tuple[list[tuple[int, object]], int]:
    """(line, item) for each item of the JSON array whose "[" is at ``position``, each with the line
    it starts on, and where the array ends."""
    decoder = json.JSONDecoder()
    records: list[tuple[int, object]] = []
    line, counted = 1, 0
    end = _BLANK.match(text, position + 1).end()
    while not (text.startswith("]", end) and not records):
        line += text.count("\n", counted, end)
        counted = end
        item, end = decoder.raw_decode(text, end)
        records.append((line, item))
        end = _BLANK.match(text, end).end()
        if text.startswith("]", end):
            break
        if not text.startswith(",", end):
            raise json.JSONDecodeError("Expecting ',' delimiter", text, end)
        end = _BLANK.match(text, end + 1).end()
    return records, end + 1  # past the "]"


def _records_at(text: str, position: int, steps: tuple[Step, ...]) -> tuple[list[tuple[int, object]], int]:
    """(line, item) for each item of the array reached by ``steps`` from the JSON value at ``position``
    (a text known to be JSON), each with the line it starts on; and where that value ends. A value
    of another shape on the way (a key written twice, the first time otherwise) is a ``JSONDecodeError``."""
    if not text.startswith("[" if not steps or isinstance(steps[0], int) else "{", position):
        raise json.JSONDecodeError("Not the value walked through", text, position)
    if not steps:
        return _array_records(text, position)
    step, rest = steps[0], steps[1:]
    if isinstance(step, int):  # the one item of a list
        records, end = _records_at(text, _BLANK.match(text, position + 1).end(), rest)
        if not text.startswith("]", end := _BLANK.match(text, end).end()):
            raise json.JSONDecodeError("Not a list of one item", text, end)
        return records, end + 1
    decoder = json.JSONDecoder()
    records: list[tuple[int, object]] = []
    end = _BLANK.match(text, position + 1).end()  # past the "{"
    while not text.startswith("}", end):
        name, end = decoder.raw_decode(text, end)
        end = _BLANK.match(text, _BLANK.match(text, end).end() + 1).end()  # past the ":"
        try:  # the last of a key written twice is the one json.loads keeps, and walked through
            if name != step:
                raise json.JSONDecodeError("Another key", text, end)
            records, end = _records_at(text, end, rest)
        except json.JSONDecodeError:
            end = decoder.raw_decode(text, end)[1]
        end = _BLANK.match(text, end).end()
        if text.startswith(",", end):
            end = _BLANK.match(text, end + 1).end()
    return records, end + 1  # past the "}"


_ABSENT = object()


def _field(record: object, dotted: str) -> object:
    """The value at a dotted path in a record, ``_ABSENT`` where the record has no such field."""
    for key in dotted.split("."):
        if not isinstance(record, dict) or key not in record:
            return _ABSENT
        record = record[key]
    return record


def _lists_within(value: dict, steps: tuple[Step, ...] = ()) -> list[tuple[tuple[Step, ...], list, bool]]:
    """(steps, items, wraps more) for each list (not empty) in an object, and in each object and list of one
    object it holds, down to ``WRAPPER_DEPTH`` steps; ``wraps more``: a list of one object that holds lists."""
    found = []
    for key, items in value.items():
        here = (*steps, key)
        if isinstance(items, dict) and len(here) < WRAPPER_DEPTH:
            found += _lists_within(items, here)
        elif isinstance(items, list) and items:
            within = []
            if len(items) == 1 and isinstance(items[0], dict) and len(here) + 1 < WRAPPER_DEPTH:
                within = _lists_within(items[0], (*here, 0))
            found += [(here, items, bool(within)), *within]
    return found


def _nearest(found: list[tuple[tuple[Step, ...], list]]) -> list[tuple[tuple[Step, ...], list]]:
    """The lists of the wrapping object itself if it has any, as were read before lists further down were
    looked for (a blog's posts beside a list of links in its settings); else all."""
    return [(steps, items) for steps, items in found if len(steps) == 1] or found


def _named(steps: tuple[Step, ...]) -> str:
    """A list's place for a person: ``posts``, ``db[0].data.posts``."""
    return "".join(f"[{step}]" if isinstance(step, int) else f".{step}" for step in steps).removeprefix(".")


def _jq_path(steps: tuple[Step, ...]) -> str:
    """A list's place as jq's filter for it: ``.db[0].data.posts``, ``.["my posts"]``."""
    path = ""
    for step in steps:
        if isinstance(step, int):
            path += f"[{step}]"
        elif _JQ_NAME.fullmatch(step) and step not in _JQ_KEYWORDS:
            path += f".{step}"
        else:  # ."a b" is refused by jq 1.6 after another step; ["a b"] is read by every jq
            path += f"[{json.dumps(step)}]" if path else f".[{json.dumps(step)}]"
    return path


def _text_fields(record: object) -> list[str]:
    """The fields of a record, or of an object in it, whose name says it holds the text, likelier first:
    ``plaintext``, ``data.selftext``."""
    if not isinstance(record, dict):
        return []
    found = [(name, name) for name, value in record.items() if name in _TEXT_FIELDS and isinstance(value, str)]
    found += [(name, f"{key}.{name}") for key, inner in record.items() if isinstance(inner, dict)
              for name, value in inner.items() if name in _TEXT_FIELDS and isinstance(value, str)]
    return [dotted for name, dotted in sorted(found, key=lambda pair: _TEXT_FIELDS.index(pair[0]))]


def _suggested(lists: list[tuple[tuple[Step, ...], list]]) -> str:
    """", e.g. --field plaintext (the records of db[0].data.posts)": where a list's first record has a field named
    like text; else nothing."""
    for steps, items in lists:
        if fields := _text_fields(items[0]):
            return f", e.g. --field {fields[0]}" + (f" (the records of {_named(steps)})" if steps else "")
    return ""


def _listed_records(path: Path, text: str, line: int, record: dict, field: str) -> list[tuple[int, object]]:
    """The records of a JSON object that wraps them in a list (``{"posts": [...]}``, a JSON feed's
    ``"items"``, Ghost's ``{"db": [{"data": {"posts": [...]}}]}``), or the object itself when it holds no such list.

    The list is the one whose records have the field; else the one list of records (the error then names their
    fields), not counting a list of one object that holds lists; else the one list of strings; of the object's
    own lists if it has such, else of those further down. Two lists alike cannot be told apart: ``SourceProblem``
    naming them, with jq's path to each.
    """
    found = list(_lists_within(record))
    with_field = [(steps, items) for steps, items, _ in found
                  if any(isinstance(item, dict) and _field(item, field) is not _ABSENT for item in items)]
    of_records = [(steps, items) for steps, items, wraps in found
                  if not wraps and all(isinstance(item, dict) for item in items)]
    of_strings = [(steps, items) for steps, items, _ in found if all(isinstance(item, str) for item in items)]
    for lists in (with_field, of_records, of_strings):
        nearest = _nearest(lists)
        if len(nearest) == 1:
            return _records_at(text, text.index("{"), nearest[0][0])[0]  # the lines before the "{" are blank
        if len(nearest) > 1 and lists is of_records:
            fields = "; ".join(f"{_named(steps)!r}: {', '.join(map(str, items[0]))}" for steps, items in nearest[:4])
            more = f"; and {len(nearest) - 4} more lists" if len(nearest) > 4 else ""
            raise SourceProblem(path, line, f"no record has the field {field!r}, in any of the lists of records the "
                                            f"object holds (their first records' fields are {fields}{more}); use "
                                            f"--field{_suggested(nearest)}")
        if len(nearest) > 1:
            held = ", ".join(f"{_named(steps)!r} ({len(items)} record(s))" for steps, items in nearest)
            last = nearest[0][0][-1]
            name = last if isinstance(last, str) and _JQ_NAME.fullmatch(last) else "records"
            raise SourceProblem(path, line, f"the object holds several lists of writing: {held}, and which to read "
                                            f"cannot be told; save the one to read as a file of its own (jq "
                                            f"{_shell_quoted(_jq_path(nearest[0][0]))} {shlex.quote(path.name)} > "
                                            f"{name}.json) and name that")
    return [(line, record)]


def _shell_quoted(word: str) -> str:
    """A word in single quotes for the shell, whatever it holds: jq's filter, quoted even when it need not be."""
    return "'" + word.replace("'", "'\"'\"'") + "'"


def read_jsonl(path: Path, options: ReadOptions) -> Documents:
    """One document per line, from the field named by ``--field`` (dots go deeper); the records
    without text in it (missing, null, a number...), and a few lines that are not JSON, are left out and
    said so, and so are drafts and replies to others (see the module's docstring). One object without the field that
    wraps the records in a list (``{"posts": [...]}``, or a few levels down: ``{"db": [{"data": {"posts": [...]}}]}``)
    gives them."""
    documents = Documents()
    first: tuple[int, dict] | None = None  # the first record that is an object, for the error
    present = False
    lacking: list[int] = []
    not_text: list[tuple[int, str]] = []  # (line, what the field holds instead)
    text = read_text_file(path)
    records, broken = _json_records(path, text)
    if (len(records) == 1 and not broken and isinstance(records[0][1], dict)
            and _field(records[0][1], options.field) is _ABSENT):  # one object: perhaps the wrapper of a list
        records = _listed_records(path, text, *records[0], options.field)
    drafts = [number for number, record in records if _is_draft(record)]
    boosts = [number for number, record in records if _is_boost(record)]
    replies = [] if options.keep_replies else [number for number, record in records if _answers_others(record)]
    if drafts or boosts or replies:
        records = [(number, record) for number, record in records if not _is_draft(record) and not _is_boost(record)
                   and (options.keep_replies or not _answers_others(record))]
    answering: set[int] = set()  # the documents that reply to a post: their leading mentions go with their HTML
    for number, record in records:
        if isinstance(record, str):
            documents.append(RawDocument(record, str(path), number))
            continue
        if isinstance(record, dict) and first is None:
            first = number, record
        value = _field(record, options.field)
        present = present or value is not _ABSENT
        if value is _ABSENT or value is None:
            lacking.append(number)
        elif not isinstance(value, str):
            not_text.append((number, _JSON_KINDS.get(type(value), "a value")))
        else:
            if _in_reply_to(record):
                answering.add(len(documents))
            documents.append(RawDocument(value, str(path), number))
    if first is not None and not present:  # a wrong --field would otherwise read nothing, and say nothing
        line, record = first
        raise SourceProblem(path, line, f"no record has the field {options.field!r}; the first record's fields are "
                                        f"{', '.join(map(str, record)) or 'none'} (use --field{_suggested([((), [record])])})")
    from_field = len(documents) - sum(isinstance(record, str) for _, record in records)
    if not_text and not documents:  # the field holds something else in every record: the wrong field
        line, kind = not_text[0]
        raise SourceProblem(path, line, f"field {options.field!r} holds no text in any record ({kind} at line {line}); "
                                        "use --field to name the field that holds the text (a.b for one inside another)")
    if lacking or not_text:
        lines = lacking + [number for number, _ in not_text]
        kinds = Counter(kind for _, kind in not_text)
        held = "".join(f", {n} of them {kind}" for kind, n in kinds.items())
        hint = "" if from_field else "; --field names the field that holds the text"
        documents.left_out.append(SourceProblem(
            path, min(lines), f"{len(lines)} record(s) with no text in the field {options.field!r} (line(s) "
                              f"{some_lines(lines)}{held}; the other {len(documents)} were read){hint}"))
    if drafts:
        documents.left_out.append(SourceProblem(
            path, drafts[0], f"{len(drafts)} draft(s) left out, records whose \"status\" is \"draft\" (line(s) "
                             f"{some_lines(drafts)}): not published, so not the author's to post; publish them (or set "
                             "their status to \"published\" in the file) to read them"))
    if boosts:
        documents.left_out.append(SourceProblem(
            path, boosts[0], f"{len(boosts)} boost(s) of other people's posts left out (line(s) {some_lines(boosts)}), as "
                             "not the author's own posts: the outbox holds only their address (\"type\": \"Announce\"), "
                             "not their text"))
    if replies:
        documents.left_out.append(SourceProblem(
            path, replies[0], f"{len(replies)} reply(ies) to other people's posts left out (line(s) {some_lines(replies)}), "
                              "as not the author's own posts (replies in their own threads are read); --keep-replies "
                              "reads them too"))
    _read_html_as_text(path, documents, options.field, answering)
    if broken:
        (line, why), *_ = broken
        gave = "" if len(documents) == len(records) else f": {len(documents)} gave text, {len(records) - len(documents)} had none"
        documents.left_out.append(SourceProblem(
            path, line, f"{len(broken)} line(s) not JSON, left out (line(s) {some_lines(n for n, _ in broken)}; the "
                         f"first: {why}); the other {len(records)} record(s) were read{gave}; fix those lines to "
                         "read them too"))
    return documents


def _is_draft(record: object) -> bool:
    """Whether a record is a post its author has not published: a Ghost or WordPress export's ``"status": "draft"``."""
    status = record.get("status") if isinstance(record, dict) else None
    return isinstance(status, str) and status.strip().lower() == "draft"


def _is_boost(record: object) -> bool:
    """Whether a record is a boost in a Mastodon outbox: an ActivityPub ``Announce`` activity (by an
    ``actor``, of an ``object`` that is a post's address or the post) -- not any record whose own
    ``type`` a blog or newsletter export happens to call "Announce"."""
    return (isinstance(record, dict) and record.get("type") == "Announce" and isinstance(record.get("actor"), str)
            and isinstance(record.get("object"), (str, dict)))


def _in_reply_to(record: object) -> str:
    """The post an ActivityPub note (a Mastodon outbox's ``Create`` activity, or its ``object``) replies to
    (its ``inReplyTo``); "" when it is none."""
    if not isinstance(record, dict):
        return ""
    note = record["object"] if isinstance(record.get("object"), dict) else record
    answered = note.get("inReplyTo")
    answered = answered.get("id") if isinstance(answered, dict) else answered
    return answered if isinstance(answered, str) else ""


def _answers_others(record: object) -> bool:
    """Whether a record is a reply to someone else's post: an ActivityPub note with an ``inReplyTo`` that is not
    a post of the note's own author (its ``attributedTo``, or the activity's ``actor``): the next part of an
    author's own thread is theirs."""
    answered = _in_reply_to(record)
    if not answered or not isinstance(record, dict):
        return False
    note = record["object"] if isinstance(record.get("object"), dict) else record
    author = note.get("attributedTo") or record.get("actor")
    return not (isinstance(author, str) and author and answered.startswith(author.rstrip("/") + "/"))


def _is_html(text: str, field: str) -> bool:
    """Whether a record's text is HTML: a tag in a field that holds HTML, or text that opens with a block tag, or
    has a tag closed and no paragraphs of its own between blank lines (which HTML would not need)."""
    if not looks_like_html(text):
        return False
    return (field.rsplit(".", 1)[-1] in _HTML_FIELDS or _BLOCK_START.match(text) is not None
            or (_PAIRED_TAG.search(text) is not None and _BLANK_LINE.search(text.strip()) is None))


def _read_html_as_text(path: Path, documents: Documents, field: str, answering: set[int]) -> None:
    """The documents that hold HTML (Mastodon's ``object.content``, Ghost's ``html``) made its text, in place, and
    said so: its tags and entities would otherwise be trained on as the author's words. Those ``answering`` a post
    (their indices) lose the mentions they open with."""
    marked = [i for i, document in enumerate(documents) if _is_html(document.text, field)]
    for i in marked:
        text = html_to_text(documents[i].text, leading_mentions=i not in answering)
        documents[i] = RawDocument(text, documents[i].source, documents[i].line)
    if marked:
        lines = [documents[i].line for i in marked]
        documents.left_out.append(SourceProblem(
            path, lines[0], f"{len(marked)} record(s) hold HTML in the field {field!r} (line(s) {some_lines(lines)}): "
                            "read as the text it shows, tags left out and entities such as &amp; decoded"))


_JSON_KINDS = {bool: "true or false", int: "a number", float: "a number", list: "a list", dict: "an object"}
