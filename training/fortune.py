"""Fortune files, as Debian's ``fortunes`` packages ship them.

Entries are separated by ``%`` lines, and many end with an attribution (``-- Mark Twain``),
which is removed (and counted): a persona trained on them would learn to sign its posts with
other people's names. With ``--author`` only that author's entries are kept. The
offensive files are stored in ROT13 (``strfile -x``) and read decoded, as ``fortune``
shows them. A file is known as a fortune file by its suffix or by the index ``strfile``
made beside it (``NAME.dat``; see ``sources.strfile_flags``), even with one entry and no
``%`` line.
"""

from __future__ import annotations

import codecs
import re
from pathlib import Path

from training.sources import (
    Documents,
    RawDocument,
    ReadOptions,
    SourceProblem,
    read_text_file,
    strfile_flags,
    text_blocks,
)

__all__ = ["AttributionsRemoved", "read_fortune"]

_ATTRIBUTION = re.compile(r"^\s*(?:--|—|―|~)\s*(?P<who>[^\n]+?)\s*$")


# Lower-case words a name may hold: "Ludwig van Beethoven", "Mark Twain, in ...", "Letter to W. D. Howells".
_NAME_PARTICLES = frozenset({"a", "and", "at", "da", "de", "del", "der", "di", "du", "el", "et", "from", "in", "la",
                             "le", "of", "on", "the", "to", "van", "von", "y", "zu"})
_NAME_MAX_CHARS = 60


def _looks_like_name(who: str) -> bool:
    """Whether a margin "-- ..." line names someone ("-- Mark Twain, 1894", "-- J. R. R. Tolkien") rather than
    going on with the entry ("-- every single day, for a whole year.", "-- the whole plan,"): short, its words
    capitalised, and no sentence ending or pausing before its end (an initial's or "Dr."'s stop aside)."""
    words = re.findall(r"[^\W\d_][\w'’-]*", who)
    if len(who) > _NAME_MAX_CHARS or not words or not words[0][0].isupper() or who.endswith((",", ";", ":")):
        return False
    if re.search(r"[!?;:](?=\s*\S)|(?<!\b[A-Z])(?<!\b[A-Z][a-z])(?<!\b[A-Z][a-z][a-z])\.(?=\s*[^\s\d])", who):
        return False
    return all(word[0].isupper() or word.lower() in _NAME_PARTICLES for word in words)


def _is_list_item(lines: list[str], i: int) -> bool:
    """Whether a "-- ..." line at the margin follows another: the next item of a list (Debian's "platitudes")."""
    return bool(lines[i][:1].strip()) and any(line[:1].strip() and _ATTRIBUTION.match(line) for line in lines[:i])


def _attribution(entry: str, loose: bool = False) -> tuple[str, str | None]:
    """(entry without its trailing ``-- Author`` lines, the author or None).

    An attribution is the entry's last line, set in ("\t\t-- Kant", and its lines carried on as deep), or a
    margin "-- Name" that reads as a name; a "-- ..." line with the entry going on after it, or that is
    a sentence, is the author's own. ``loose`` (with ``--author``, where an entry is kept only if the
    author is found) takes any "-- ..." line of the last three, set in or standing alone, and what follows.
    """
    lines = entry.rstrip().split("\n")
    for i in range(len(lines) - 1, max(len(lines) - 4, 0), -1):
        match = _ATTRIBUTION.match(lines[i])
        if not match or _is_list_item(lines, i):
            continue
        indent = len(lines[i]) - len(lines[i].lstrip())
        set_in = indent > 0 and all(len(line) - len(line.lstrip()) >= indent for line in lines[i + 1 :])
        if loose or set_in or (i == len(lines) - 1 and _looks_like_name(match.group("who"))):
            who = " ".join(line.strip() for line in [match.group("who"), *lines[i + 1 :]])
            return "\n".join(lines[:i]).rstrip(), who
        if not loose:
            break
    return entry.strip(), None


def _author_matches(author: str, attributed: str) -> bool:
    """Whether the attribution names this author: "Mark Twain" matches "Mark Twain, 1894"."""
    wanted = re.sub(r"\W+", " ", author).strip().lower()
    found = re.sub(r"\W+", " ", attributed).strip().lower()
    return bool(wanted) and re.search(rf"(^| ){re.escape(wanted)}( |$)", found) is not None


class AttributionsRemoved(SourceProblem):
    """How many attributions were removed from a fortune file read without ``--author`` (``count``), and the
    first of them (``first``): said, since they are gone from the corpus, but not left out of it."""

    def __init__(self, path: Path, signed: list[str]) -> None:
        self.count, self.first = len(signed), signed[0]
        super().__init__(path, None, f"{self.count} attribution(s) removed (\"-- {self.first}\" ...), so that the "
                                     "persona does not sign its posts with other people's names")


_STR_ROTATED = 0x4  # strfile's flag: the entries are stored in ROT13 (fortune's offensive files)


def _vowel_share(text: str) -> float:
    letters = re.findall(r"[A-Za-z]", text)
    return sum(c in "aeiouAEIOU" for c in letters) / max(len(letters), 1)


def _is_rotated(path: Path, text: str) -> bool:
    """Whether a fortune file is stored in ROT13: its index says so, or, with no index, its letters do
    (a third or more of a European language's letters are vowels; ROT13 turns most into consonants)."""
    flags = strfile_flags(path)
    if flags is not None:
        return bool(flags & _STR_ROTATED)
    sample = text[:20_000]
    return (len(re.findall(r"[A-Za-z]", sample)) >= 200 and _vowel_share(sample) < 0.25
            and _vowel_share(codecs.decode(sample, "rot13")) > 0.33)


def read_fortune(path: Path, options: ReadOptions) -> Documents:
    """Entries between ``%`` lines, attributions removed; with an author, only theirs. How many
    attributions went is said in ``left_out`` (with an author, removing them is what was asked)."""
    text = read_text_file(path)
    if _is_rotated(path, text):  # as `fortune` shows it
        text = codecs.decode(text, "rot13")
    documents = Documents()
    signed: list[str] = []
    for piece, line in text_blocks(text, re.compile(r"^%[ \t]*$", re.MULTILINE)):
        body, who = _attribution(piece, loose=options.author is not None)
        if options.author is not None and (who is None or not _author_matches(options.author, who)):
            continue
        if body:
            documents.append(RawDocument(body, str(path), line))
            if who is not None:
                signed.append(who)
    if signed and options.author is None:
        documents.left_out.append(AttributionsRemoved(path, signed))
    return documents
