"""Cleaning documents: Unicode and whitespace normalised, duplicates dropped.

The text kept is the author's, in NFC: spelled one way where Unicode has two for the same
letter ("é" as one character or as "e" and an accent), and otherwise as written ("E=mc²",
"ㅋㅋㅋ", "①" stay) but for full-width Latin, ligatures and wide spaces (``_COMPATIBILITY_FOLD``). Exact duplicates are found on a folded form of the text (NFKC, so "ﬁ" is
"fi" and "ＡＢＣ" "abc"; case, punctuation and spacing ignored), near duplicates by the overlap of their word 3-grams (Jaccard similarity at
or above ``NEAR_DUPLICATE_JACCARD``): the same joke told twice with a changed word is
one document, not two, and would otherwise be learned by heart (or be held out for
validation while its twin is trained on). One changed word alters up to three 3-grams,
too many of a short text's for the Jaccard rule, so texts under ``_SHORT_WORDS`` words
are also compared word by word (``NEAR_DUPLICATE_WORD_RATIO``). Each text is measured only
against the kept texts that share one of its rarest 3-grams or words (``_NearIndex``): those
are all that can be near it. Of those, the latest ``_MOST_CANDIDATES`` are looked at: a corpus of
texts made of a few common words has thousands for each (writing has tens), and looking at them
all grew with the square of the corpus.
"""

from __future__ import annotations

import math
import re
import unicodedata
from array import array
from collections import Counter, defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from difflib import SequenceMatcher

from persona.originality import UNSPACED_SCRIPTS, split_unspaced

__all__ = ["CleanOptions", "CleanReport", "Progress", "clean_documents", "has_mojibake", "normalize_text"]

NEAR_DUPLICATE_JACCARD = 0.8
NEAR_DUPLICATE_WORD_RATIO = 0.85  # one word changed in seven, or a misspelling in a tweet
_SHINGLE_WORDS = 3
# Told how far a long step has got: (what it is doing, how many done, of how many); a corpus of
# 100,000 tweets takes half a minute or more to clean, and twenty thousand blog posts minutes to read.
Progress = Callable[[str, int, int], None]
_SHORT_WORDS = 30  # from about here on, one changed word keeps Jaccard at or above 0.8
# Of the kept texts that share a rare 3-gram with a text, the most looked at for each 3-gram, and of those that share
# its rarest words, for all of them (the latest): texts of a few common words share them with thousands, and 200,000
# such texts took more than ten minutes. Writing has few so alike: 26 at most in Debian's 15,217 fortunes.
_MOST_CANDIDATES = 1000
_URL = re.compile(r"(?:https?://|www\.)\S+", re.IGNORECASE)
_HANDLE = re.compile(r"(?<![\w@])@\w{1,30}\b")
# Invisible characters that carry nothing, but not ZWNJ and ZWJ (U+200C, U+200D): they
# are part of Persian and Indic spelling and join emoji sequences. And half an emoji: a lone surrogate
# (JSON's "\ud83d" from a post cut short), which no file can hold as UTF-8. And the C1 controls
# (U+0080-U+009F: bytes of another encoding read as Latin-1) but U+0085, a line break (NEL).
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x84\x86-\x9f\u200b\u200e\u200f\u2028\u2029\ufeff\ud800-\udfff]")
# UTF-8 read as Windows-1252 or Latin-1 ("mojibake"): "Ã©" was "é", "â€™" was "’", "Â " a no-break space.
# What follows the lead letter is the second byte of a UTF-8 character, as those encodings show it.
_UTF8_SECOND_BYTE = "\x80-\xbf€‚ƒ„…†‡ˆ‰Š‹ŒŽ‘’“”•–—˜™š›œžŸ"
_MOJIBAKE = re.compile(f"Ã[{_UTF8_SECOND_BYTE}]|Â[\xa0-\xbf]|â€[{_UTF8_SECOND_BYTE}]")
# The few compatibility characters the kept text does fold, as NFKC would: full-width Latin letters and
# digits ("Ｆｕｌｌ" is "Full"; full-width punctuation is Chinese and Japanese writing's own, "你好，世界！"), the Latin ligatures ("ﬁ" is "fi") and the spaces of other widths (a
# no-break space from a web page). What else NFKC folds is the author's ("E=mc²", "ㅋ", "①", "™").
_COMPATIBILITY_FOLD = str.maketrans(
    {chr(c): chr(c - 0xFEE0) for c in [*range(0xFF10, 0xFF1A), *range(0xFF21, 0xFF3B), *range(0xFF41, 0xFF5B)]}
    | dict(zip("\ufb00\ufb01\ufb02\ufb03\ufb04\ufb05\ufb06", ["ff", "fi", "fl", "ffi", "ffl", "st", "st"], strict=True))
    | dict.fromkeys([0xA0, *range(0x2000, 0x200B), 0x202F, 0x205F, 0x3000], " ")
)
_FOLD_WORD = re.compile(f"[\\w{UNSPACED_SCRIPTS}]+")


@dataclass
class CleanOptions:
    """Which cleaning steps to apply."""

    strip_urls: bool = False
    strip_handles: bool = False
    min_chars: int = 1
    near_duplicates: bool = True


@dataclass
class CleanReport:
    """What cleaning kept and why it dropped the rest."""

    kept: int = 0
    dropped: Counter[str] = field(default_factory=Counter)


def _overstrike(text: str) -> str:
    """Text typed over itself with backspaces as a terminal shows it: "_\\bN" (nroff's underline,
    found in old fortune files) is "N", not "_N"."""
    lines = text.split("\n")
    for number, line in enumerate(lines):
        if "\b" in line:
            shown: list[str] = []
            for char in line:
                if char != "\b":
                    shown.append(char)
                elif shown:
                    shown.pop()
            lines[number] = "".join(shown)
    return "\n".join(lines)


def normalize_text(text: str, options: CleanOptions | None = None) -> str:
    """NFC Unicode (full-width Latin, ligatures and wide spaces folded), no control characters, single
    spaces, at most one blank line."""
    options = options or CleanOptions()
    text = unicodedata.normalize("NFC", text).translate(_COMPATIBILITY_FOLD).replace("\r\n", "\n").replace("\r", "\n")
    text = text.replace("<|endoftext|>", "")  # a leaked marker must never be learned
    if "\b" in text:
        text = _overstrike(text)
    text = _CONTROL.sub("", text.replace("\t", " "))
    if options.strip_urls:
        text = _URL.sub("", text)
    if options.strip_handles:
        text = _HANDLE.sub("", text)
    lines = [re.sub(r" {2,}", " ", line).strip() for line in text.split("\n")]
    text = "\n".join(lines)
    return re.sub(r"\n{3,}", "\n\n", text).strip()


def has_mojibake(text: str) -> bool:
    """Whether ``text`` holds UTF-8 that was read as Windows-1252 or Latin-1 ("cafÃ©" for "café")."""
    return _MOJIBAKE.search(text) is not None


def _folded(text: str) -> str:
    """The words of ``text`` as compared for duplicates: NFKC, case folded, punctuation dropped; in
    scripts written without spaces (Chinese, Japanese, Thai...), each character a word."""
    return " ".join(split_unspaced(_FOLD_WORD.findall(unicodedata.normalize("NFKC", text).casefold())))


def _shingles(tokens: list[str]) -> set[tuple[str, ...]]:
    if len(tokens) < _SHINGLE_WORDS:
        return {tuple(tokens)}
    return {tuple(tokens[i : i + _SHINGLE_WORDS]) for i in range(len(tokens) - _SHINGLE_WORDS + 1)}


def _words(tokens: list[str]) -> list[tuple[str, int]]:
    """The words of a text as distinct items: the second "the" is ("the", 1)."""
    times: dict[str, int] = {}
    words = []
    for token in tokens:
        times[token] = nth = times.get(token, -1) + 1
        words.append((token, nth))
    return words


def _prefix_length(size: int, share: float) -> int:
    """How many of a set's items, rarest first, hold one of those of any set that shares ``share`` of
    them with it: two sets sharing k items share one of the first size - k + 1 of each, in any order
    fixed for all."""
    # The least share * size rounds up to is never this near an integer, but an integer itself may be
    # computed a hair above it.
    return size - math.ceil(share * size - 1e-9) + 1


# How many of the words two texts must share for ``_similar_short`` to find them alike, at the least,
# as a share of the longer one's: its quick ratio 2 * shared / (a + b) must reach the bar, and shared <= b.
_SHARED_WORDS_SHORT = NEAR_DUPLICATE_WORD_RATIO / (2 - NEAR_DUPLICATE_WORD_RATIO)
# For each length of a short text, in words, the lengths of those ``_similar_short`` reads it against, each
# with the fewest words such texts share.
_ALIKE_LENGTHS = {a: {b: math.ceil(_SHARED_WORDS_SHORT * max(a, b) - 1e-9) for b in range(1, _SHORT_WORDS)
                      if 2 * min(a, b) >= NEAR_DUPLICATE_WORD_RATIO * (a + b)}
                  for a in range(1, _SHORT_WORDS)}


class _NearIndex:
    """Kept documents, each found again only by the rarest of its shingles and words (prefix filtering).

    Near duplicates share at least ``NEAR_DUPLICATE_JACCARD`` of their shingles, or (short texts)
    ``_SHARED_WORDS_SHORT`` of their words, so they share one of the first few of each, rarest first
    (``_prefix_length``): only those are indexed and looked up. Every text found so is then measured
    as before. Looking up every shingle, a common one ("one of the") made each new text count its
    overlap with thousands of others: minutes for 100,000 tweets. ``folds``: every text to come, folded;
    how many of them hold each word fixes the order.

    Only a shingle among the rarest of two texts or more can find one, and few are (most rare 3-grams are
    in one text alone): those are told first, from every text's rarest kept as 8-byte hashes, and only
    they are indexed. A kept text is measured again from its folded form. Holding every kept text's
    shingles, and every rare one, took two gigabytes for 100,000 posts.

    A short text is measured only against the texts that share enough of its 3-grams (``_share_shingles``)
    or words (``_share_words``) to be near it, counted for all of them at once from their hashes; and
    only against the latest ``_MOST_CANDIDATES`` that share a rare one with it.
    """

    def __init__(self, folds: Sequence[str], progress: Progress | None = None) -> None:
        import numpy as np  # here: train's checks import this module, and would wait for numpy (0.1 s)

        self.folds = folds
        self.word_counts: Counter[tuple[str, int]] = Counter()  # how many texts hold each word (its nth time)
        # Each short text's words as numbers (row n, text n's; -1 after its last) and every text's length,
        # to count the words two texts share all at once: see ``_share_words``.
        self.word_rows = np.full((len(folds), _SHORT_WORDS - 1), -1, dtype=np.int32)
        self.lengths = np.zeros(len(folds), dtype=np.int64)
        numbers: dict[tuple[str, int], int] = {}
        for number, fold in enumerate(folds):
            words = _words(fold.split())
            self.word_counts.update(words)
            self.lengths[number] = len(words)
            if len(words) < _SHORT_WORDS:
                self.word_rows[number, : len(words)] = [numbers.setdefault(word, len(numbers)) for word in words]
        self.marked = np.zeros(len(numbers) + 1, dtype=bool)  # the words of the text admitted; the last for -1
        # Each short text's 3-grams, hashed to 31 bits (-1 after its last), and how many it has: to count the 3-grams
        # two short texts share all at once (``_share_shingles``). Two of one hash only count one more.
        self.shingle_rows = np.full((len(folds), _SHORT_WORDS - _SHINGLE_WORDS), -1, dtype=np.int32)
        self.shingle_counts = np.zeros(len(folds), dtype=np.int64)
        for number, fold in enumerate(folds):
            if len(tokens := fold.split()) < _SHORT_WORDS:
                shingles = _shingles(tokens)
                self.shingle_rows[number, : len(shingles)] = [hash(shingle) & 0x7FFFFFFF for shingle in shingles]
                self.shingle_counts[number] = len(shingles)
        self.np = np
        # Text n's rarest shingles, hashed, are rarest[starts[n] : starts[n + 1]]. Two shingles of one hash
        # only bring a text more to measure: nothing is found near that is not.
        self.rarest = array("q")
        self.starts = array("q", [0])
        for done, fold in enumerate(folds):
            if progress:
                progress("indexing", done, len(folds))
            self.rarest.extend({hash(shingle) for shingle in self._rarest_shingles(fold.split())})
            self.starts.append(len(self.rarest))
        hashes = np.sort(np.frombuffer(self.rarest, dtype=np.int64))
        shared = hashes[1:][hashes[1:] == hashes[:-1]]
        self.by_shingle: dict[int, list[int]] = {key: [] for key in shared.tolist()}  # -> kept texts holding it
        # word -> text's length -> where the word is in the text's order of rarity -> texts
        self.by_word: dict[tuple[str, int], dict[int, list[list[int]]]] = defaultdict(lambda: defaultdict(list))

    def _rarest_shingles(self, tokens: list[str]) -> list[tuple[str, ...]]:
        """The first of a text's shingles in the order of rarity, guessed from their words' counts
        (counting every 3-gram took as much memory as the texts); ties go by the 3-gram itself."""
        if len(tokens) < _SHINGLE_WORDS:
            return [tuple(tokens)]
        counts = [self.word_counts[(token, 0)] for token in tokens]
        ranked = sorted({(counts[i] * counts[i + 1] * counts[i + 2], *tokens[i : i + _SHINGLE_WORDS])
                         for i in range(len(tokens) - _SHINGLE_WORDS + 1)})  # one for each distinct 3-gram
        return [shingle[1:] for shingle in ranked[: _prefix_length(len(ranked), NEAR_DUPLICATE_JACCARD)]]

    def _rarest_words(self, tokens: list[str]) -> list[tuple[str, int]]:
        if len(tokens) >= _SHORT_WORDS:  # too long for ``_similar_short``: its shingles find it
            return []
        ranked = sorted((self.word_counts[word], word) for word in _words(tokens))
        return [word for _, word in ranked[: _prefix_length(len(tokens), _SHARED_WORDS_SHORT)]]

    def admit(self, number: int) -> bool:
        """Keep text ``number`` unless it is near one kept; whether it was kept."""
        tokens = self.folds[number].split()
        shared = [key for key in self.rarest[self.starts[number] : self.starts[number + 1]] if key in self.by_shingle]
        rarest_words = self._rarest_words(tokens)
        found: set[int] = set()
        for key in shared:
            found.update(self.by_shingle[key][-_MOST_CANDIDATES:])
        candidates = self._share_shingles(number, found) if found and len(tokens) < _SHORT_WORDS else found
        if alike := self._alike_short(rarest_words, len(tokens)) - found:
            candidates.update(self._share_words(number, alike))
        if candidates:
            shingles = _shingles(tokens)
            if any(self._near(shingles, tokens, other) for other in candidates):
                return False
        for key in shared:
            self.by_shingle[key].append(number)
        for place, word in enumerate(rarest_words):
            by_place = self.by_word[word][len(tokens)]
            by_place += [[] for _ in range(place + 1 - len(by_place))]
            by_place[place].append(number)
        return True

    def _alike_short(self, rarest_words: list[tuple[str, int]], length: int) -> set[int]:
        """The kept texts that may share enough words with a short one for ``_similar_short``: the latest
        ``_MOST_CANDIDATES`` of them, found by its rarest words first."""
        found: set[int] = set()
        for place, word in enumerate(rarest_words):
            if (by_length := self.by_word.get(word)) is None:
                continue
            for other_length, least in _ALIKE_LENGTHS[length].items():
                # Texts that share this word, the place-th and other_place-th in their orders of rarity,
                # share no more words than follow it in either (a rarer shared word only raises the bound).
                if length - place >= least:
                    for others in by_length.get(other_length, [])[: other_length - least + 1]:
                        if (room := _MOST_CANDIDATES - len(found)) <= 0:
                            return found
                        found.update(others[-room:])
        return found

    def _share_words(self, number: int, others: set[int]) -> list[int]:
        """Those of ``others`` that share enough of text ``number``'s words for ``_similar_short``.

        A text found only by its words can be near only so (one near by Jaccard shares one of the rarest
        3-grams), and ``_similar_short`` needs difflib's quick ratio at the bar: twice the words two texts
        share over their lengths. Counted here for all at once: texts of a few common words (25 words in
        all) share some of their rarest with thousands of others, and measuring each one by one had 200,000
        of them a tenth done after ten minutes."""
        np = self.np
        found = np.fromiter(others, dtype=np.int64, count=len(others))
        length = int(self.lengths[number])
        row = self.word_rows[number, :length]
        self.marked[row] = True
        shared = self.marked[self.word_rows[found]].sum(axis=1)
        self.marked[row] = False
        alike = 2.0 * shared / (length + self.lengths[found]) >= NEAR_DUPLICATE_WORD_RATIO  # as difflib computes it
        return found[alike].tolist()

    def _share_shingles(self, number: int, others: set[int]) -> set[int]:
        """Those of ``others`` that may share enough 3-grams with short text ``number`` for ``_near``: the long
        ones, and the short ones whose 3-grams counted by their hashes (as many as they share, or more) reach
        Jaccard's bar or the one for ``_similar_short``. Texts of a few common words share a rare 3-gram with
        hundreds of others, and few more: measured one by one, they grew with the square of their number."""
        np = self.np
        found = np.fromiter(others, dtype=np.int64, count=len(others))
        own = self.shingle_rows[number, : self.shingle_counts[number]]
        shared = np.isin(self.shingle_rows[found], own).sum(axis=1)
        size, sizes = int(self.shingle_counts[number]), self.shingle_counts[found]
        may = ((shared >= 1) & ((shared * (1 + NEAR_DUPLICATE_JACCARD) >= NEAR_DUPLICATE_JACCARD * (size + sizes) - 1e-9)
                                | (shared >= np.minimum(size, sizes) - 6))) | (sizes == 0)  # sizes 0: a long text
        return set(found[may].tolist())

    def _near(self, shingles: set[tuple[str, ...]], tokens: list[str], other: int) -> bool:
        other_tokens = self.folds[other].split()
        other_shingles = _shingles(other_tokens)
        overlap = len(shingles & other_shingles)
        if not overlap:  # only texts that share a 3-gram are compared
            return False
        union = len(shingles) + len(other_shingles) - overlap
        if overlap / union >= NEAR_DUPLICATE_JACCARD:
            return True
        # Two edits change at most six 3-grams: fewer shared and the texts differ more.
        return overlap >= min(len(shingles), len(other_shingles)) - 6 and _similar_short(tokens, other_tokens)


def _similar_short(a: list[str], b: list[str]) -> bool:
    """Whether two short texts are the same words in order but for a few changed, added or dropped."""
    if len(a) >= _SHORT_WORDS or len(b) >= _SHORT_WORDS:
        return False
    if 2 * min(len(a), len(b)) < NEAR_DUPLICATE_WORD_RATIO * (len(a) + len(b)):
        return False  # the ratio cannot reach the bar: skip the comparison
    matcher = SequenceMatcher(None, a, b, autojunk=False)
    return matcher.quick_ratio() >= NEAR_DUPLICATE_WORD_RATIO and matcher.ratio() >= NEAR_DUPLICATE_WORD_RATIO


def clean_documents(texts: Sequence[str], options: CleanOptions | None = None,
                    progress: Progress | None = None) -> tuple[list[str], CleanReport]:
    """The cleaned documents in their original order, and a report of what was dropped;
    ``progress`` is told ("indexing", done, total) as the near-duplicate index reads each document, then
    ("cleaning", done, total) after each."""
    options = options or CleanOptions()
    report = CleanReport()
    kept: list[str] = []
    seen: set[str] = set()
    normalized = [normalize_text(raw, options) for raw in texts]
    folded = [_folded(text) for text in normalized]
    near = _NearIndex(folded, progress) if options.near_duplicates else None
    for done, (text, fold) in enumerate(zip(normalized, folded)):
        if progress:
            progress("cleaning", done, len(texts))
        if len(text) < options.min_chars or not fold:
            report.dropped["empty"] += 1
            continue
        if fold in seen:
            report.dropped["duplicate"] += 1
            continue
        if near is not None and not near.admit(done):
            report.dropped["near-duplicate"] += 1
            continue
        seen.add(fold)
        kept.append(text)
    report.kept = len(kept)
    return kept, report
