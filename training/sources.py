"""Reading an author's writing from the formats people keep it in.

Each reader takes one file and returns its documents (``RawDocument``: text plus where
it came from). A file a reader cannot make sense of raises ``SourceProblem`` naming the
file and line; the corpus builder reports it and goes on with the other files.

Formats: Markdown with YAML (``---``) or TOML (``+++``) front matter, plain text split on
``<|endoftext|>`` or blank lines, CSV (one column), JSONL (one field), PDF (``pdf.py``),
Twitter/X archives (``tweets.py``: ``tweets.js`` and its parts, with the full text of
long posts taken from the ``note-tweet.js`` beside them) and fortune files (``%`` between
entries).
"""

from __future__ import annotations

import csv
import io
import json
import re
import tomllib
from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "FORMATS",
    "RawDocument",
    "ReadOptions",
    "SourceProblem",
    "detect_format",
    "is_note_tweets",
    "is_tweet_archive",
    "json_lines",
    "read_csv",
    "read_fortune",
    "read_jsonl",
    "read_markdown",
    "read_text",
    "strip_markdown",
]

FORMATS = ("auto", "text", "markdown", "csv", "jsonl", "pdf", "tweets", "fortune")
END_OF_TEXT = "<|endoftext|>"


class SourceProblem(Exception):
    """One file cannot be read; says which file, which line and why."""

    def __init__(self, path: Path, line: int | None, reason: str) -> None:
        where = f"{path}:{line}" if line else str(path)
        super().__init__(f"{where}: {reason}")
        self.path = path
        self.line = line
        self.reason = reason


@dataclass(frozen=True)
class RawDocument:
    """One piece of writing as found in a source file, before cleaning."""

    text: str
    source: str
    line: int = 1


@dataclass
class ReadOptions:
    """What the readers need to know beyond the file itself."""

    column: str = "text"
    field: str = "text"
    author: str | None = None
    keep_replies: bool = False
    keep_retweets: bool = False


def _read_text_file(path: Path) -> str:
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise SourceProblem(path, None, f"cannot read: {exc.strerror}") from exc
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise SourceProblem(path, line, f"not UTF-8 text ({exc.reason})") from exc


# A large archive is split: tweets.js, tweets-part1.js, ... (older: tweet.js, tweet-part1.js).
# Both patterns are matched from the start of the name: "note-tweet.js" is not a tweet archive,
# and "deleted-tweets.js" / "deleted-note-tweet.js" (posts the author deleted) are neither.
_TWEET_ARCHIVE = re.compile(r"tweets?(-part\d+)?\.js(on)?$")
# Newer X exports keep the full text of posts over 280 characters in note-tweet.js (parts too).
_NOTE_TWEETS = re.compile(r"note[-_]?tweets?(-part\d+)?\.js(on)?$")


def is_tweet_archive(path: Path) -> bool:
    """Whether the file's name is that of a tweet archive (or one of its parts)."""
    return _TWEET_ARCHIVE.match(path.name.lower()) is not None


def is_note_tweets(path: Path) -> bool:
    """Whether the file's name is that of an X export's note-tweet file (or one of its parts)."""
    return _NOTE_TWEETS.match(path.name.lower()) is not None


def detect_format(path: Path) -> str:
    """A format name from the file's name and, for plain text, its first lines.

    A note-tweet file is ``"tweets"`` too: the tweets reader reads it with the archive
    beside it, or on its own when there is none.
    """
    suffix = path.suffix.lower()
    if is_tweet_archive(path) or is_note_tweets(path):
        return "tweets"
    by_suffix = {".md": "markdown", ".markdown": "markdown", ".csv": "csv", ".jsonl": "jsonl",
                 ".ndjson": "jsonl", ".pdf": "pdf"}
    if suffix in by_suffix:
        return by_suffix[suffix]
    if suffix in ("", ".txt", ".dat", ".fortune"):
        try:
            head = path.read_bytes()[:4096].decode("utf-8", "ignore")
        except OSError:
            return "text"
        if re.search(r"^%\s*$", head, re.MULTILINE):
            return "fortune"
    return "text"


# --- Markdown -----------------------------------------------------------------------

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
        raise SourceProblem(path, 1, f"front matter opened with {fence!r} is never closed")
    block = "\n".join(lines[1:end])
    try:
        if _FENCE[fence] == "toml":
            meta = tomllib.loads(block)
        else:
            import yaml

            meta = yaml.safe_load(block) or {}
    except Exception as exc:  # yaml and toml raise their own kinds; both mean a bad header
        line = getattr(getattr(exc, "problem_mark", None), "line", None)
        raise SourceProblem(path, (line or 0) + 2, f"bad {_FENCE[fence].upper()} front matter: {exc}") from exc
    if not isinstance(meta, dict):
        raise SourceProblem(path, 2, "front matter is not a table of keys")
    return meta, "\n".join(lines[end + 1 :]), end + 2


def strip_markdown(text: str) -> str:
    """Markdown to the plain prose a reader sees."""
    text = re.sub(r"^(```|~~~).*?^\1\s*$", "", text, flags=re.MULTILINE | re.DOTALL)  # code blocks
    text = re.sub(r"<!--.*?-->", "", text, flags=re.DOTALL)
    text = re.sub(r"\{\{[<%].*?[%>]\}\}|\{%.*?%\}", "", text, flags=re.DOTALL)  # Hugo/Jekyll tags
    text = re.sub(r"!\[([^\]]*)\]\([^)]*\)", "", text)  # images
    text = re.sub(r"\[([^\]]+)\]\([^)]*\)", r"\1", text)  # links keep their words
    text = re.sub(r"\[([^\]]+)\]\[[^\]]*\]", r"\1", text)
    text = re.sub(r"^\s*\[[^\]]+\]:\s*\S+.*$", "", text, flags=re.MULTILINE)  # link definitions
    text = re.sub(r"<[^>\n]+>", "", text)  # inline HTML
    text = re.sub(r"^\s{0,3}#{1,6}\s*", "", text, flags=re.MULTILINE)
    text = re.sub(r"^\s{0,3}>\s?", "", text, flags=re.MULTILINE)
    text = re.sub(r"^\s*([-*+]|\d+[.)])\s+", "", text, flags=re.MULTILINE)
    text = re.sub(r"^\s*([-*_]\s*){3,}$", "", text, flags=re.MULTILINE)  # rules
    text = re.sub(r"(\*\*|__)(.+?)\1", r"\2", text)
    text = re.sub(r"(?<![\w*])([*_])(?!\s)(.+?)(?<!\s)\1(?![\w*])", r"\2", text)
    text = re.sub(r"`([^`]*)`", r"\1", text)
    return text


def read_markdown(path: Path, options: ReadOptions) -> list[RawDocument]:
    """One document per file: the body with front matter and markup stripped."""
    # Windows line endings: TOML refuses the "\r" that splitting on "\n" would leave.
    text = _read_text_file(path).replace("\r\n", "\n")
    meta, body, start = _split_front_matter(path, text)
    if meta.get("draft") is True:
        return []
    return [RawDocument(strip_markdown(body), str(path), start)]


# --- Plain text ---------------------------------------------------------------------


def _blocks(text: str, separator: re.Pattern[str]) -> list[tuple[str, int]]:
    """Pieces of ``text`` between separator matches, with the line each starts on."""
    found = []
    position = 0
    for match in [*separator.finditer(text), None]:
        end = match.start() if match else len(text)
        piece = text[position:end]
        lead = len(piece) - len(piece.lstrip())
        line = text.count("\n", 0, position + lead) + 1
        if piece.strip():
            found.append((piece.strip(), line))
        if match:
            position = match.end()
    return found


def read_text(path: Path, options: ReadOptions) -> list[RawDocument]:
    """Documents split on ``<|endoftext|>`` when present, else on blank lines."""
    text = _read_text_file(path).replace("\r\n", "\n")
    if END_OF_TEXT in text:
        separator = re.compile(re.escape(END_OF_TEXT))
    else:
        separator = re.compile(r"\n[ \t]*\n(?:[ \t]*\n)*")
    return [RawDocument(piece, str(path), line) for piece, line in _blocks(text, separator)]


# --- Fortune files ------------------------------------------------------------------

_ATTRIBUTION = re.compile(r"^\s*(?:--|—|―|~)\s*(?P<who>[^\n]+?)\s*$")


def _attribution(entry: str) -> tuple[str, str | None]:
    """(entry without its trailing ``-- Author`` lines, the author or None)."""
    lines = entry.rstrip().split("\n")
    for i in range(len(lines) - 1, max(len(lines) - 4, 0), -1):
        match = _ATTRIBUTION.match(lines[i])
        if match:
            who = " ".join(line.strip() for line in [match.group("who"), *lines[i + 1 :]])
            return "\n".join(lines[:i]).rstrip(), who
    return entry.strip(), None


def _author_matches(author: str, attributed: str) -> bool:
    """Whether the attribution names this author: "Mark Twain" matches "Mark Twain, 1894"."""
    wanted = re.sub(r"\W+", " ", author).strip().lower()
    found = re.sub(r"\W+", " ", attributed).strip().lower()
    return bool(wanted) and re.search(rf"(^| ){re.escape(wanted)}( |$)", found) is not None


def read_fortune(path: Path, options: ReadOptions) -> list[RawDocument]:
    """Entries between ``%`` lines; with an author, only theirs, attribution removed."""
    text = _read_text_file(path).replace("\r\n", "\n")
    documents = []
    for piece, line in _blocks(text, re.compile(r"^%[ \t]*$", re.MULTILINE)):
        body, who = _attribution(piece)
        if options.author is not None:
            if who is None or not _author_matches(options.author, who):
                continue
            piece = body
        if piece.strip():
            documents.append(RawDocument(piece, str(path), line))
    return documents


# --- CSV and JSONL ------------------------------------------------------------------


def read_csv(path: Path, options: ReadOptions) -> list[RawDocument]:
    """One document per row, from the column named by ``--column``."""
    text = _read_text_file(path)
    # csv refuses fields over 128 KB by default; no field can be longer than its file.
    csv.field_size_limit(max(csv.field_size_limit(), len(text)))
    try:
        reader = csv.DictReader(io.StringIO(text, newline=""))
        header = reader.fieldnames or []
        if options.column not in header:
            raise SourceProblem(
                path, 1, f"no column {options.column!r}; columns are {', '.join(header) or 'none'} (use --column)"
            )
        documents = []
        for row in reader:
            value = row.get(options.column)
            if value:
                documents.append(RawDocument(value, str(path), reader.line_num))
        return documents
    except csv.Error as exc:
        raise SourceProblem(path, reader.line_num, f"bad CSV: {exc}") from exc


def json_lines(text: str) -> list[str]:
    """The lines of a JSONL text, split on newlines only.

    Not ``str.splitlines``: it also splits on U+0085, U+2028 and U+2029, which JSON
    writes unescaped inside strings (``ensure_ascii=False``), cutting a record in two.
    """
    return [line.removesuffix("\r") for line in text.split("\n")]


def read_jsonl(path: Path, options: ReadOptions) -> list[RawDocument]:
    """One document per line, from the field named by ``--field`` (dots go deeper)."""
    documents = []
    for number, line in enumerate(json_lines(_read_text_file(path)), start=1):
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except json.JSONDecodeError as exc:
            raise SourceProblem(path, number, f"not JSON: {exc.msg}") from exc
        if isinstance(value, str):
            documents.append(RawDocument(value, str(path), number))
            continue
        for key in options.field.split("."):
            value = value.get(key) if isinstance(value, dict) else None
        if value is None:
            continue
        if not isinstance(value, str):
            raise SourceProblem(path, number, f"field {options.field!r} is not text (use --field)")
        documents.append(RawDocument(value, str(path), number))
    return documents
