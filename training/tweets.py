"""Tweets out of a Twitter/X archive (the export's zip, its ``data/tweets.js`` or a plain ``tweets.json``).

The archive's ``tweets.js`` is JavaScript: ``window.YTD.tweets.part0 = [...]``; each
item is ``{"tweet": {...}}``. Retweets and replies are dropped unless asked for (and counted,
so the build can say so), links (always ``t.co`` wrappers) are removed, and HTML entities are
decoded. The zip X sends is read as its unzipped folder would be.

A reply to the author's own post is theirs, and kept: a thread, often their longest writing. It
is known by the account it answers (``accountId`` in the ``account.js`` beside ``tweets.js``)
or by the post it answers being in the same file. A kept reply loses the "@friend" mentions X
puts before its text and hides (``display_text_range`` starts after them).

Long posts: newer X exports keep the whole text of a post over 280 characters (a "note
tweet") in ``note-tweet.js`` (``note-tweet-part1.js``, ...), items ``{"noteTweet": {...,
"createdAt": ..., "core": {"text": ...}}}``, while its entry in ``tweets.js`` holds only
the first part of the text, often ending in "…" and a ``t.co`` link. The note's id is not
the tweet's, so a tweet is paired with a note from the note-tweet files in its own folder
when it is visibly cut (its text ends in "…" or "...", links aside, or nearly fills a
tweet: a short complete tweet such as "Thread:" stays itself), its text (links, a trailing
"…" and entities normalised away) begins the note's text and, when both carry a time,
the two times agree within a minute; a stub shorter than
``_UNTIMED_PREFIX`` (80) characters is only paired when the times agree, and a stub two
notes fit equally well keeps its own text. A paired tweet gives
the note's whole text (links removed); retweets and replies are dropped first, so the note
of a dropped reply is never read. A note-tweet file is not a source of its own when a
tweet archive is read with it (``training.scanning.source_files`` leaves it out); read on its
own (a folder with no ``tweets.js``, or the file named by itself) each note is one
document, all of them kept: a note does not say whether it was a reply. A note-tweet file
that is not valid JSON raises ``SourceProblem`` with its own file and line, naming the
tweets file beside it, which is then not read (rather than read with long posts cut short).
"""

from __future__ import annotations

import html
import json
import re
import shlex
import zipfile
from bisect import bisect_left, bisect_right
from collections import defaultdict
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import lru_cache
from pathlib import Path, PurePosixPath

from persona.curation import x_length
from training.sources import (
    Documents,
    RawDocument,
    ReadOptions,
    SourceProblem,
    is_deleted_posts,
    is_note_tweets,
    is_tweet_archive,
)

__all__ = ["parse_archive", "read_tweets", "tweet_archive_members"]

_LINK = re.compile(r"https?://\S+")
# What a truncated tweet may end with, before its ellipsis: a link cut before its "://", an entity
# cut before its ";". Only the last characters are searched: a regex anchored at the end alone
# would try every position of a long text.
_CUT_PIECE = re.compile(r"(?:(?<!\S)h(?:t(?:t(?:p(?:s?(?::/{0,2})?)?)?)?)?|&#?\w{0,12})$")
_TIME_SLACK = 60.0  # seconds between a tweet's created_at and its note's createdAt
_UNTIMED_PREFIX = 80  # characters a stub needs to be paired with a note without agreeing times
# A tweet this long may be a note's first part cut without an ellipsis (a tweet holds 280, a
# link counting 23); a shorter one must end in an ellipsis to be a note's first part.
_NEARLY_FULL_CHARS = 250
# Twitter's own format: "Wed May 01 10:00:00 +0000 2024"; notes use ISO 8601.
_TWITTER_TIME = "%a %b %d %H:%M:%S %z %Y"


def _parse_items(path: Path, text: str, key: str, what: str, plural: str) -> list[dict]:
    body = text.lstrip("\ufeff")
    start = body.find("=") + 1 if body.lstrip().startswith("window.") else 0
    prefix_lines = body[:start].count("\n")
    try:
        items = json.loads(body[start:].strip().rstrip(";"))
    except json.JSONDecodeError as exc:
        raise SourceProblem(path, exc.lineno + prefix_lines, f"not a {what}: {exc.msg}") from exc
    if isinstance(items, dict):
        items = items.get(plural, items.get("data", [items]))
    if not isinstance(items, list):
        raise SourceProblem(path, 1, f"not a {what}: expected a list of {plural}")
    found = []
    for item in items:
        value = item.get(key, item) if isinstance(item, dict) else None
        if isinstance(value, dict):
            found.append(value)
    return found


def parse_archive(path: Path, text: str) -> list[dict]:
    """The tweet objects in an archive file's text."""
    return _parse_items(path, text, "tweet", "tweet archive", "tweets")


def _read(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise SourceProblem(path, None, f"cannot read: {exc}") from exc


def _timestamp(value: object) -> float | None:
    """Seconds since the epoch from Twitter's time format or ISO 8601; None when there is none."""
    if not isinstance(value, str) or not value.strip():
        return None
    for parse in (lambda v: datetime.strptime(v, _TWITTER_TIME), datetime.fromisoformat):
        try:
            when = parse(value.strip())
        except ValueError:
            continue
        return (when if when.tzinfo else when.replace(tzinfo=UTC)).timestamp()
    return None


def _looks_cut(text: str) -> bool:
    """Whether a tweet's text may be the first part of a longer post: it ends in an ellipsis
    (links aside) or nearly fills a tweet, as X weighs it (a Chinese, Japanese or Korean
    character counts twice: 140 of them fill one)."""
    return _LINK.sub(" ", text).rstrip().endswith(("…", "...")) or x_length(text) >= _NEARLY_FULL_CHARS


def _match_key(text: str) -> str:
    """A text as compared with a note: links, a cut-off end and entities normalised away."""
    text = _LINK.sub(" ", text).rstrip()
    for mark in ("…", "..."):
        if text.endswith(mark):
            text = text[: -len(mark)].rstrip()
            break
    tail = len(text) - 24
    if tail > 0:
        text = text[:tail] + _CUT_PIECE.sub("", text[tail:])
    else:
        text = _CUT_PIECE.sub("", text)
    return " ".join(html.unescape(text).split())


@dataclass(frozen=True)
class _Note:
    text: str  # as it goes into the corpus: entities decoded, links removed
    key: str  # as compared with a tweet's text
    times: tuple[float, ...]  # createdAt, and updatedAt when it differs


def _note(item: dict) -> _Note | None:
    core = item.get("core")
    core = core if isinstance(core, dict) else item
    text = core.get("text")
    if not isinstance(text, str):
        return None
    # The links the note lists may be written out without "https://" (example.com/page).
    urls = core.get("urls")
    written = {value for url in (urls if isinstance(urls, list) else []) if isinstance(url, dict)
               for name in ("expandedUrl", "displayUrl", "shortUrl")
               if isinstance(value := url.get(name), str) and len(value) > 3}
    for url in sorted(written, key=len, reverse=True):
        text = text.replace(url, "")
    times = tuple(dict.fromkeys(t for t in (_timestamp(item.get("createdAt")), _timestamp(item.get("updatedAt")))
                                if t is not None))
    return _Note(_LINK.sub("", html.unescape(text)).strip(), _match_key(text), times)


def _read_notes(path: Path) -> list[tuple[int, _Note]]:
    """The notes in a note-tweet file, each with its place in the file."""
    return _notes_in(path, _read(path))


def _notes_in(path: Path, text: str) -> list[tuple[int, _Note]]:
    """The notes in a note-tweet file's text, each with its place in the file."""
    items = _parse_items(path, text, "noteTweet", "note-tweet file", "notes")
    return [(number, note) for number, item in enumerate(items, start=1) if (note := _note(item)) is not None]


class _NoteIndex:
    """Notes found by their time and by their first characters: one tweet costs a lookup, not a scan."""

    def __init__(self, notes: list[_Note]) -> None:
        self.notes = notes
        timed = sorted((t, i) for i, note in enumerate(notes) for t in note.times)
        self._times = [t for t, _ in timed]
        self._timed = [i for _, i in timed]
        self._untimed = sum(1 for note in notes if not note.times)
        self._by_head: dict[str, list[int]] = defaultdict(list)
        for i, note in enumerate(notes):
            if len(note.key) >= _UNTIMED_PREFIX:
                self._by_head[note.key[:_UNTIMED_PREFIX]].append(i)

    def full_text(self, text: str, time: float | None) -> str | None:
        """The text of the one note this tweet text begins, or None."""
        if not _looks_cut(text):
            return None  # a whole tweet, however its words begin
        candidates: set[int] = set()
        if time is not None:
            low = bisect_left(self._times, time - _TIME_SLACK)
            candidates.update(self._timed[low:bisect_right(self._times, time + _TIME_SLACK)])
            if not candidates and not self._untimed:
                return None  # every note has a time, and none is this tweet's
        key = _match_key(text)
        if not key:
            return None
        if len(key) >= _UNTIMED_PREFIX:
            candidates.update(self._by_head.get(key[:_UNTIMED_PREFIX], ()))
        ranked: list[tuple[float, str]] = []
        for i in candidates:
            note = self.notes[i]
            if not note.key.startswith(key):
                continue
            if time is not None and note.times:
                gap = min(abs(t - time) for t in note.times)
                if gap > _TIME_SLACK:
                    continue
            elif len(key) < _UNTIMED_PREFIX:
                continue
            else:
                gap = _TIME_SLACK + 1  # a match by text alone ranks after any by time
            ranked.append((gap, note.text))
        if not ranked:
            return None
        ranked.sort(key=lambda r: r[0])
        best_gap, best = ranked[0]
        if any(gap == best_gap and other != best for gap, other in ranked[1:]):
            return None  # two notes fit equally well: keep the tweet's own text
        return best


def _notes_beside(path: Path) -> _NoteIndex | None:
    """The notes of the note-tweet files in the archive's folder; None when there are none."""
    try:
        files = sorted(p for p in path.parent.iterdir() if p.is_file() and is_note_tweets(p))
        # Each part of a split archive reads the same notes: they are parsed once while unchanged.
        seen = tuple((file, file.stat().st_mtime_ns, file.stat().st_size) for file in files)
    except OSError:
        return None
    try:
        return _note_index(seen)
    except SourceProblem as problem:
        raise SourceProblem(problem.path, problem.line,
                            f"{problem.reason} (it holds the full text of the long posts in {path.name},"
                            f" which was not read; fix or remove it)") from problem


@lru_cache(maxsize=1)
def _note_index(files: tuple[tuple[Path, int, int], ...]) -> _NoteIndex | None:
    """The notes of these files (each named with its time and size as last read), indexed."""
    notes = [note for file, _, _ in files for _, note in _read_notes(file)]
    return _NoteIndex(notes) if notes else None


def _is_retweet(tweet: dict, text: str) -> bool:
    return text.startswith("RT @") or "retweeted_status" in tweet or bool(tweet.get("retweeted"))


@dataclass(frozen=True)
class _Author:
    """What marks a post as the author's own: their account's ids, and the ids of the posts read."""

    accounts: frozenset[str]
    posts: frozenset[str]


def _id(tweet: dict, *keys: str) -> str | None:
    """The first of these ids the tweet has, as a string (older exports give numbers)."""
    value = next((tweet[key] for key in keys if tweet.get(key)), None)
    return None if value is None else str(value)


def _is_reply(tweet: dict) -> bool:
    return _id(tweet, "in_reply_to_status_id_str", "in_reply_to_status_id",
               "in_reply_to_user_id_str", "in_reply_to_user_id") is not None


def _answers_self(tweet: dict, author: _Author) -> bool:
    """Whether a reply answers the author's own post: a thread of theirs."""
    return (_id(tweet, "in_reply_to_user_id_str", "in_reply_to_user_id") in author.accounts
            or _id(tweet, "in_reply_to_status_id_str", "in_reply_to_status_id") in author.posts)


def _account_ids(path: Path, text: str) -> frozenset[str]:
    """The ``accountId`` values in an X export's ``account.js``; none when it cannot be read (the
    posts the replies answer still tell a thread)."""
    try:
        accounts = _parse_items(path, text, "account", "account file", "accounts")
    except SourceProblem:
        return frozenset()
    return frozenset(str(account["accountId"]) for account in accounts if account.get("accountId"))


def _accounts_beside(path: Path) -> frozenset[str]:
    account = path.parent / "account.js"
    try:
        return _account_ids(account, account.read_text(encoding="utf-8")) if account.is_file() else frozenset()
    except (OSError, UnicodeDecodeError):
        return frozenset()


_MENTIONS = re.compile(r"(?:[ \t]*@\w{1,15})+[ \t]*")


def _hidden_mentions(tweet: dict, raw: str) -> str:
    """The "@friend " a reply's text opens with that X does not show (``display_text_range`` starts
    after it); "" when there is none, or the range does not fall after mentions alone."""
    shown = tweet.get("display_text_range")
    try:
        start = int(shown[0]) if isinstance(shown, list) and shown else 0
    except (TypeError, ValueError):
        return ""
    hidden = raw[:start]
    return hidden if start > 0 and _MENTIONS.fullmatch(hidden) else ""


def _own_tweets(path: Path, tweets: list[dict], notes: _NoteIndex | None, options: ReadOptions,
                accounts: frozenset[str] = frozenset()) -> Documents:
    """The tweets the author wrote themselves, as documents (their threads too, a reply to their own
    post); the retweets and replies to others left out are counted."""
    documents = Documents()
    retweets = replies = threads = 0
    author = _Author(accounts, frozenset(filter(None, (_id(tweet, "id_str", "id") for tweet in tweets))))
    for number, tweet in enumerate(tweets, start=1):
        raw = tweet.get("full_text", tweet.get("text"))
        if not isinstance(raw, str):
            continue
        body = html.unescape(raw)
        if _is_retweet(tweet, body) and not options.keep_retweets:
            retweets += 1
            continue
        if _is_reply(tweet):
            if _answers_self(tweet, author):
                threads += 1
            elif not options.keep_replies:
                replies += 1
                continue
        whole = notes.full_text(raw, _timestamp(tweet.get("created_at", tweet.get("createdAt")))) if notes else None
        body = whole if whole is not None else _LINK.sub("", body).strip()
        if hidden := _hidden_mentions(tweet, raw).strip():
            body = body.removeprefix(hidden).lstrip()
        if body:
            documents.append(RawDocument(body, str(path), number))
    if retweets or replies:  # most of an archive may be these: say so, or the count read looks like a loss
        counted = [f"{n} {what}" for n, what in ((retweets, "retweet(s)"), (replies, "reply(ies)")) if n]
        keep = [flag for n, flag in ((retweets, "--keep-retweets"), (replies, "--keep-replies")) if n]
        among = f", {threads} in the author's own threads among them" if threads else ""
        documents.left_out.append(SourceProblem(
            path, None, f"{' and '.join(counted)} left out, as not the author's own posts (the other "
                        f"{len(documents)} were read{among}); {' and '.join(keep)} read them too"))
    return documents


_DELETED_REFUSED = ("posts the author deleted (the X export keeps them apart), left out on purpose: a persona should "
                    "not post again what its author took back. To train on them all the same, read them as an archive "
                    "of their own: `mkdir deleted && cp {copy} deleted/tweets.js`, then name deleted/tweets.js")


def read_tweets(path: Path, options: ReadOptions) -> Documents:
    """One document per tweet the author wrote themselves, long ones whole from ``note-tweet.js``;
    the retweets and replies left out are counted in ``left_out``. A zip of an X export is read
    as its folder would be.

    A note-tweet file read by itself gives one document per note. The posts the author deleted
    (``deleted-tweets.js``) are refused, saying how to read them all the same.
    """
    if path.suffix.lower() == ".zip":
        return _read_zip(path, options)
    if is_deleted_posts(path):
        raise SourceProblem(path, None, _DELETED_REFUSED.format(copy=shlex.quote(str(path))))
    if is_note_tweets(path):
        return Documents(RawDocument(note.text, str(path), number) for number, note in _read_notes(path) if note.text)
    return _own_tweets(path, parse_archive(path, _read(path)), _notes_beside(path), options, _accounts_beside(path))


# --- The export as X sends it: one zip ------------------------------------------------

def tweet_archive_members(path: Path) -> list[str] | None:
    """The names of the tweet archive files in a zip (``data/tweets.js``, its parts), sorted; None
    when the file is not a zip that can be read."""
    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
    except (OSError, zipfile.BadZipFile, ValueError):
        return None
    return sorted(name for name in names if not name.endswith("/") and is_tweet_archive(PurePosixPath(name)))


def _member_text(archive: zipfile.ZipFile, path: Path, name: str) -> str:
    try:
        return archive.read(name).decode("utf-8")
    except (OSError, zipfile.BadZipFile, RuntimeError, NotImplementedError, UnicodeDecodeError) as exc:
        # RuntimeError: a member locked with a password; NotImplementedError: a compression zipfile lacks.
        raise SourceProblem(path / name, None, f"cannot read it from the zip ({exc}); unzip it and name the folder") from exc


def _accounts_in_zip(archive: zipfile.ZipFile, path: Path, folder: PurePosixPath) -> frozenset[str]:
    """The account ids in the ``account.js`` beside a tweet archive in the zip; none when there is none."""
    name = str(folder / "account.js")
    try:
        return _account_ids(path / name, _member_text(archive, path, name)) if name in archive.namelist() else frozenset()
    except SourceProblem:  # locked or not UTF-8: the posts the replies answer still tell a thread
        return frozenset()


def _read_zip(path: Path, options: ReadOptions) -> Documents:
    """The author's tweets in an X export's zip: each archive file with the notes beside it in the zip."""
    members = tweet_archive_members(path)
    if members is None:
        raise SourceProblem(path, None, "not a zip that can be read (damaged, or cut short while downloading?); "
                                        "download the archive again, or unzip what there is and name the folder")
    if not members:
        raise SourceProblem(path, None, "a zip with no tweets.js in it, so not a Twitter/X archive; unzip it and "
                                        "name the folder, or the files of the writing in it")
    documents = Documents()
    with zipfile.ZipFile(path) as archive:
        for name in members:
            folder = PurePosixPath(name).parent
            note_names = sorted(n for n in archive.namelist()
                                if PurePosixPath(n).parent == folder and is_note_tweets(PurePosixPath(n)))
            notes = [note for n in note_names
                     for _, note in _notes_in(path / n, _member_text(archive, path, n))]
            read = _own_tweets(path / name, parse_archive(path / name, _member_text(archive, path, name)),
                               _NoteIndex(notes) if notes else None, options, _accounts_in_zip(archive, path, folder))
            documents.extend(read)
            documents.left_out.extend(read.left_out)
    return documents
