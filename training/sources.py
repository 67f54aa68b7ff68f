"""Reading an author's writing from the formats people keep it in.

Each reader takes one file and returns its documents (``RawDocument``: text plus where
it came from). A file a reader cannot make sense of raises ``SourceProblem`` naming the
file and line; the corpus builder reports it and goes on with the other files.

Formats: Markdown with YAML (``---``) or TOML (``+++``) front matter (``markdown.py``), plain text split on
``<|endoftext|>`` or blank lines, CSV (one column; comma, semicolon, tab or bar between
cells), JSONL (``json_records.py``: one field; a JSON array of records too, or an object wrapping them,
a few levels down too: ``{"posts": [...]}``, ``{"db": [{"data": {"posts": [...]}}]}``),
PDF (``pdf.py``), HTML pages (``html_text.py``: the text they show), Twitter/X archives (``tweets.py``: the
export's zip, or ``tweets.js`` and its parts, with the full text of long posts taken from the ``note-tweet.js``
beside them) and fortune files (``fortune.py``: ``%`` between entries; the offensive ones that ``strfile -x``
stored in ROT13 are read decoded). Word, EPUB, OpenDocument, RTF and Pages files are refused, saying how to
convert them to text.

Text is UTF-8, UTF-16/32, or Windows-1252 with a warning, its lines ending in a line feed however they
were saved (``text_decoding.py``).

What a reader leaves out on purpose, a draft, the JSONL records without the field asked for or
a few lines that are not JSON, CSV rows whose text cannot be told, retweets and replies, it
returns in ``Documents.left_out``; the corpus builder reports it like a file it could not read.
"""

from __future__ import annotations

import csv
import io
import re
import shlex
import struct
import zipfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from training.text_decoding import SNIFF_BYTES, NotText, decode_text, one_line_end

__all__ = [
    "DOCUMENT_SUFFIXES",
    "FORMATS",
    "Documents",
    "Draft",
    "RawDocument",
    "ReadOptions",
    "SourceProblem",
    "detect_format",
    "is_deleted_posts",
    "is_note_tweets",
    "is_tweet_archive",
    "json_lines",
    "read_csv",
    "read_text",
    "read_text_file",
    "some_lines",
    "strfile_flags",
    "text_blocks",
]

FORMATS = ("auto", "text", "markdown", "csv", "jsonl", "pdf", "tweets", "fortune", "html")
END_OF_TEXT = "<|endoftext|>"


class SourceProblem(Exception):
    """One file cannot be read; says which file, which line and why. Returned in ``Documents.left_out``,
    it is instead a part of a file that was read, left out on purpose (``whole_file`` False)."""

    def __init__(self, path: Path, line: int | None, reason: str) -> None:
        where = f"{path}:{line}" if line else str(path)
        super().__init__(f"{where}: {reason}")
        self.path = path
        self.line = line
        self.reason = reason
        self.whole_file = True  # the file was skipped whole, not read


class Draft(SourceProblem):
    """A post its author has not published, left out on purpose and reported so: ``setting``, what its front
    matter says ("draft to true"), and ``undo``, what would publish it; both None for a post that is a draft
    by where it is (``folder``: Jekyll's "_drafts")."""

    def __init__(self, path: Path, line: int | None, key: str, value: bool) -> None:
        said, undo = str(value).lower(), str(not value).lower()
        super().__init__(path, line, f"a draft (its front matter sets {key} to {said}); set it to {undo} to read the post")
        self.setting: str | None = f"{key} to {said}"
        self.undo: str | None = f"{key} to {undo}"
        self.folder: str | None = None


@dataclass(frozen=True)
class RawDocument:
    """One piece of writing as found in a source file, before cleaning."""

    text: str
    source: str
    line: int = 1


class _LeftOut(list[SourceProblem]):
    """What a reader left out of a file it read: each problem put in it is marked so (``whole_file`` False),
    but a draft, whose whole file is left out. The readers only append and extend."""

    def __init__(self, problems: Iterable[SourceProblem] = ()) -> None:
        super().__init__()
        self.extend(problems)

    def append(self, problem: SourceProblem) -> None:
        problem.whole_file = isinstance(problem, Draft)
        super().append(problem)

    def extend(self, problems: Iterable[SourceProblem]) -> None:
        for problem in problems:
            self.append(problem)


class Documents(list[RawDocument]):
    """A reader's documents, and what it found in the file but left out on purpose (a draft, records
    without the field asked for), each as a ``SourceProblem`` so the corpus builder reports it."""

    def __init__(self, documents: Iterable[RawDocument] = (), left_out: Iterable[SourceProblem] = ()) -> None:
        super().__init__(documents)
        self.left_out: list[SourceProblem] = _LeftOut(left_out)


@dataclass
class ReadOptions:
    """What the readers need to know beyond the file itself."""

    column: str = "text"
    field: str = "text"
    author: str | None = None
    keep_replies: bool = False
    keep_retweets: bool = False


def read_text_file(path: Path) -> str:
    """A text file's contents, every line ending in a line feed (Windows' CR LF and old Macs' lone CR made one):
    UTF-8, UTF-16/32 with a byte-order mark, or Windows-1252 guessed (with a warning naming the file) when it is
    none of those; else a ``SourceProblem`` saying what to do."""
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise SourceProblem(path, None, f"cannot read: {exc.strerror}") from exc
    fortune = path.with_suffix("")
    if path.suffix.lower() == ".dat" and fortune.is_file() and strfile_flags(fortune) is not None:
        raise SourceProblem(path, None, f"the index `strfile` made for the fortune file {fortune.name}, "
                                        "not text; name that file instead")
    if (kind := _document_kind(raw)) is not None:
        raise SourceProblem(path, None, _convert_first(path, kind))
    try:
        text = one_line_end(decode_text(path, raw))
    except NotText as exc:
        raise SourceProblem(path, exc.line, exc.reason) from exc
    if not text.strip():  # else said only as "no documents found", or as a CSV with no columns
        raise SourceProblem(path, None, "empty (0 bytes), nothing in it to read" if not raw else
                                        "blank, nothing in it to read but spaces and line ends")
    return text


# Word processors' and e-books' files: the author's writing, in a format not read here.
_OLE_MAGIC = b"\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1"  # old Word's .doc (and Excel's .xls)
_ZIPPED_DOCUMENTS = {"word/document.xml": "a Word document", "application/epub+zip": "an EPUB book",
                     "application/vnd.oasis.opendocument.text": "an OpenDocument text (LibreOffice, .odt)",
                     "Index/Document.iwa": "an Apple Pages document"}
DOCUMENT_SUFFIXES = frozenset({".docx", ".doc", ".odt", ".epub", ".rtf", ".pages"})


def _document_kind(raw: bytes) -> str | None:
    """What kind of word processor's or e-book's file these bytes are, or None if none."""
    if raw.startswith(b"{\\rtf"):
        return "RTF (rich text)"
    if raw.startswith(_OLE_MAGIC):
        return "an old Word document (.doc)"
    if not raw.startswith(b"PK\x03\x04"):
        return None
    try:
        with zipfile.ZipFile(io.BytesIO(raw)) as archive:
            names = set(archive.namelist())
            mimetype = archive.read("mimetype").decode("ascii", "replace").strip() if "mimetype" in names else ""
    except (zipfile.BadZipFile, OSError):
        return None
    found = [kind for key, kind in _ZIPPED_DOCUMENTS.items() if key in names or key == mimetype]
    return found[0] if found else "a zip archive"


def _convert_first(path: Path, kind: str) -> str:
    """Why a document cannot be read, and how to make a text of it that can."""
    name, text = shlex.quote(str(path)), shlex.quote(str(path.with_suffix(".txt")))
    pandoc = f"`pandoc {name} -t plain --wrap=none -o {text}`"
    if kind == "a zip archive":
        return "a zip archive, not text; unzip it and name the folder of writing"
    if kind.startswith("an old Word"):
        how = f"save it as plain text from Word or LibreOffice (`soffice --headless --convert-to txt {name}`)"
    elif kind.startswith("an Apple Pages"):
        how = "export it from Pages as plain text (File > Export To > Plain Text)"
    elif kind.startswith("an EPUB"):
        how = f"convert it to plain text: {pandoc}, or Calibre's `ebook-convert {name} {text}`"
    else:  # Word, OpenDocument and RTF: their editors save plain text, pandoc reads all three
        how = f"save it as plain text from its editor (File > Save As > Plain Text), or convert it: {pandoc}"
    return f"{kind}, a format not read here; {how}, then name that file"


# A large archive is split: tweets.js, tweets-part1.js, ... (older: tweet.js, tweet-part1.js).
# The patterns are matched from the start of the name: "note-tweet.js" is not a tweet archive,
# and "deleted-tweets.js" / "deleted-note-tweet.js" (posts the author deleted) are neither.
_TWEET_ARCHIVE = re.compile(r"tweets?(-part\d+)?\.js(on)?$")
# Newer X exports keep the full text of posts over 280 characters in note-tweet.js (parts too).
_NOTE_TWEETS = re.compile(r"note[-_]?tweets?(-part\d+)?\.js(on)?$")
# An X export's posts the author deleted: deleted-tweets.js (and its parts), deleted-note-tweet.js,
# deleted-tweet-headers.js; only these names, not any "deleted_scenes.json" of the author's.
_DELETED_POSTS = re.compile(r"deleted-(?:tweets?|note-tweets?|tweet-headers)(-part\d+)?\.js$")


def is_tweet_archive(path: Path) -> bool:
    """Whether the file's name is that of a tweet archive (or one of its parts)."""
    return _TWEET_ARCHIVE.match(path.name.lower()) is not None


def is_note_tweets(path: Path) -> bool:
    """Whether the file's name is that of an X export's note-tweet file (or one of its parts)."""
    return _NOTE_TWEETS.match(path.name.lower()) is not None


def is_deleted_posts(path: Path) -> bool:
    """Whether the file's name is that of an X export's posts the author deleted (``deleted-tweets.js``...)."""
    return _DELETED_POSTS.match(path.name.lower()) is not None


def detect_format(path: Path) -> str:
    """A format name from the file's name and, for plain text, its first lines.

    A note-tweet file is ``"tweets"`` too: the tweets reader reads it with the archive
    beside it, or on its own when there is none; and so are the deleted posts, which it refuses.
    """
    suffix = path.suffix.lower()
    if is_tweet_archive(path) or is_note_tweets(path) or is_deleted_posts(path):
        return "tweets"
    # A .json file named is a JSON array of records, an object wrapping them, or JSON Lines: the JSONL reader reads them.
    by_suffix = {".md": "markdown", ".markdown": "markdown", ".csv": "csv", ".tsv": "csv", ".jsonl": "jsonl",
                 ".ndjson": "jsonl", ".json": "jsonl", ".pdf": "pdf", ".fortune": "fortune", ".fortunes": "fortune",
                 ".zip": "tweets",  # the zip of an X export; the tweets reader says what any other zip is
                 ".html": "html", ".htm": "html", ".xhtml": "html"}
    if suffix in by_suffix:
        return by_suffix[suffix]
    if suffix in ("", ".txt", ".dat", ".u8"):  # Debian's fortune files have no suffix, or ".u8" (UTF-8)
        if strfile_flags(path) is not None:  # indexed by strfile: a fortune file, even of one entry (no "%")
            return "fortune"
        try:  # decoded as it is read: UTF-16's "%" lines were not found in its bytes read as UTF-8
            head = one_line_end(decode_text(path, path.read_bytes(), warn=False)[:SNIFF_BYTES])
        except (OSError, NotText):  # its reader says what is wrong with it
            return "text"
        if re.search(r"^%\s*$", head, re.MULTILINE):
            return "fortune"
    return "text"


# --- Plain text ---------------------------------------------------------------------


def text_blocks(text: str, separator: re.Pattern[str]) -> list[tuple[str, int]]:
    """Pieces of ``text`` between separator matches, with the line each starts on."""
    found = []
    position = 0
    line, counted = 1, 0  # newlines are counted on from the last piece: from the start each time is quadratic
    for match in [*separator.finditer(text), None]:
        end = match.start() if match else len(text)
        piece = text[position:end]
        if piece.strip():
            start = position + len(piece) - len(piece.lstrip())
            line += text.count("\n", counted, start)
            counted = start
            found.append((piece.strip(), line))
        if match:
            position = match.end()
    return found


def read_text(path: Path, options: ReadOptions) -> list[RawDocument]:
    """Documents split on ``<|endoftext|>`` when present, else on blank lines."""
    text = read_text_file(path)
    if END_OF_TEXT in text:
        separator = re.compile(re.escape(END_OF_TEXT))
    else:
        separator = re.compile(r"\n[ \t]*\n(?:[ \t]*\n)*")
    return [RawDocument(piece, str(path), line) for piece, line in text_blocks(text, separator)]


# --- Fortune files: their index (the reader is in fortune.py) ---------------------


def strfile_flags(path: Path) -> int | None:
    """The flags in the index ``strfile`` made beside a fortune file (``NAME.dat``), None if none."""
    real = path.resolve()  # Debian's "kids.u8" links to "kids", whose index is "kids.dat"
    try:
        with real.with_name(real.name + ".dat").open("rb") as index:
            header = index.read(20)
    except OSError:
        return None
    if len(header) < 20:
        return None
    version, _count, _longest, _shortest, flags = struct.unpack(">5I", header)
    return flags if version in (1, 2) else None


# --- CSV, and JSONL's lines (its reader is in json_records.py) ---------------------


def _delimiter(header: str) -> str:
    """The character between the header's cells: of comma, semicolon (Excel's in much of Europe),
    tab and bar, the one it holds most outside quoted names; a comma if none."""
    between = re.sub(r'"[^"]*"', "", header)  # "note; with; semicolons" is one name, its marks not between cells
    counts = {mark: between.count(mark) for mark in ",;\t|"}
    best = max(counts, key=lambda mark: counts[mark])
    return best if counts[best] else ","


def _column(path: Path, header: list[str], wanted: str) -> str:
    """The header's name for the column asked for: as written, else the one that differs only in case."""
    if wanted in header:
        return wanted
    alike = [name for name in header if name.strip().casefold() == wanted.strip().casefold()]
    if len(alike) == 1:
        return alike[0]
    raise SourceProblem(path, 1, f"no column {wanted!r}; columns are {', '.join(header) or 'none'} (use --column)")


def read_csv(path: Path, options: ReadOptions) -> Documents:
    """One document per row, from the column named by ``--column``. A row with more cells than the
    header (text holding the delimiter, unquoted: ``1,Hello, world``) keeps its whole text when the
    column is the last one; else it is left out, and said so."""
    text = read_text_file(path)
    # csv refuses fields over 128 KB by default; no field can be longer than its file.
    csv.field_size_limit(max(csv.field_size_limit(), len(text)))
    lines = io.StringIO(text, newline="").readlines()
    delimiter = _delimiter(lines[0] if lines else "")
    reader = csv.DictReader(lines, delimiter=delimiter)
    try:
        column = _column(path, reader.fieldnames or [], options.column)
        last_column = column == (reader.fieldnames or [])[-1]
        documents = Documents()
        spilled: list[int] = []  # rows with more cells than the header, whose text cannot be told
        empty: list[int] = []  # rows with nothing in the column
        # The lines the last row started and ended on, and the line the next one starts on
        # (blank lines after the last row are read past once the rows run out: not its lines).
        last, ended, starts = None, 0, reader.line_num + 1
        for row in reader:
            value = row.get(column)
            if row.get(None) and value is not None:  # csv puts the cells past the header's under None
                if last_column:  # the cells the delimiter split off the end of the text, put back
                    value = delimiter.join([value, *row[None]])
                else:
                    spilled.append(starts)
                    value = None
            if value and value.strip():
                documents.append(RawDocument(value, str(path), starts))
            elif value is not None or not row.get(None):
                empty.append(starts)
            last, ended, starts = starts, reader.line_num, reader.line_num + 1
    except csv.Error as exc:
        raise SourceProblem(path, reader.line_num, f"bad CSV: {exc}") from exc
    # A quote left open makes the rest of the file one cell: the last row then spans many lines
    # and holds an odd number of quotes (a quote inside a quoted cell is doubled).
    if last is not None and last < ended and "".join(lines[last - 1 : ended]).count('"') % 2:
        raise SourceProblem(path, last, 'a quoted cell opened on this line is never closed, so every line after '
                                        'it would be one text; add the closing " where the cell ends')
    if spilled:
        documents.left_out.append(SourceProblem(
            path, spilled[0], f"{len(spilled)} row(s) left out, with more cells than the header (line(s) "
                              f"{some_lines(spilled)}): an unquoted {delimiter!r} in a text splits it, so which cell holds "
                              f"the {column!r} cannot be told; quote the cells that hold {delimiter!r}"))
    if empty:
        documents.left_out.append(SourceProblem(
            path, empty[0], f"{len(empty)} row(s) left out, with no text in the {column!r} column (line(s) "
                            f"{some_lines(empty)})"))
    return documents


def json_lines(text: str) -> list[str]:
    """The lines of a JSONL text, split on newlines only.

    Not ``str.splitlines``: it also splits on U+0085, U+2028 and U+2029, which JSON
    writes unescaped inside strings (``ensure_ascii=False``), cutting a record in two.
    """
    return [line.removesuffix("\r") for line in text.split("\n")]


def some_lines(numbers: Iterable[int], shown: int = 5) -> str:
    """Line numbers, the first few of them: "2, 5, 9 and 12 more"."""
    lines = sorted(set(numbers))
    return ", ".join(map(str, lines[:shown])) + (f" and {len(lines) - shown} more" if len(lines) > shown else "")
