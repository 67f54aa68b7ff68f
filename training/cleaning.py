"""Cleaning documents: Unicode and whitespace normalised, duplicates dropped.

Exact duplicates are found on a folded form of the text (case, punctuation and spacing
ignored), near duplicates by the overlap of their word 3-grams (Jaccard similarity at
or above ``NEAR_DUPLICATE_JACCARD``): the same joke told twice with a changed word is
one document, not two, and would otherwise be learned by heart (or be held out for
validation while its twin is trained on). One changed word alters up to three 3-grams,
too many of a short text's for the Jaccard rule, so texts under ``_SHORT_WORDS`` words
are also compared word by word (``NEAR_DUPLICATE_WORD_RATIO``).
"""

from __future__ import annotations

import re
import unicodedata
from collections import Counter, defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from difflib import SequenceMatcher

__all__ = ["CleanOptions", "CleanReport", "Progress", "clean_documents", "normalize_text"]

NEAR_DUPLICATE_JACCARD = 0.8
NEAR_DUPLICATE_WORD_RATIO = 0.85  # one word changed in seven, or a misspelling in a tweet
_SHINGLE_WORDS = 3
# Told how far a long step has got: (what it is doing, how many done, of how many); a corpus of
# 100,000 tweets takes a minute or more to clean, and twenty thousand blog posts minutes to read.
Progress = Callable[[str, int, int], None]
_SHORT_WORDS = 30  # from about here on, one changed word keeps Jaccard at or above 0.8
_URL = re.compile(r"(?:https?://|www\.)\S+", re.IGNORECASE)
_HANDLE = re.compile(r"(?<![\w@])@\w{1,30}\b")
# Invisible characters that carry nothing, but not ZWNJ and ZWJ (U+200C, U+200D): they
# are part of Persian and Indic spelling and join emoji sequences.
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f\u200b\u200e\u200f\u2028\u2029\ufeff]")


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
    """NFKC Unicode, no control characters, single spaces, at most one blank line."""
    options = options or CleanOptions()
    text = unicodedata.normalize("NFKC", text).replace("\r\n", "\n").replace("\r", "\n")
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


def _folded(text: str) -> str:
    return " ".join(re.findall(r"\w+", text.casefold()))


def _shingles(folded: str) -> set[tuple[str, ...]]:
    tokens = folded.split()
    if len(tokens) < _SHINGLE_WORDS:
        return {tuple(tokens)}
    return {tuple(tokens[i : i + _SHINGLE_WORDS]) for i in range(len(tokens) - _SHINGLE_WORDS + 1)}


class _NearIndex:
    """Kept documents' shingles, so each new one is compared only with those it shares some with."""

    def __init__(self) -> None:
        self.sets: list[set[tuple[str, ...]]] = []
        self.tokens: list[list[str]] = []
        self.postings: dict[tuple[str, ...], list[int]] = defaultdict(list)

    def is_near(self, shingles: set[tuple[str, ...]], tokens: list[str]) -> bool:
        shared: Counter[int] = Counter()
        for shingle in shingles:
            shared.update(self.postings.get(shingle, ()))
        for other, overlap in shared.items():
            union = len(shingles) + len(self.sets[other]) - overlap
            if union and overlap / union >= NEAR_DUPLICATE_JACCARD:
                return True
            # Two edits change at most six 3-grams: fewer shared and the texts differ more.
            if overlap >= min(len(shingles), len(self.sets[other])) - 6 and _similar_short(tokens, self.tokens[other]):
                return True
        return False

    def add(self, shingles: set[tuple[str, ...]], tokens: list[str]) -> None:
        number = len(self.sets)
        self.sets.append(shingles)
        self.tokens.append(tokens)
        for shingle in shingles:
            self.postings[shingle].append(number)


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
    ``progress`` is told ("cleaning", done, total) after each document."""
    options = options or CleanOptions()
    report = CleanReport()
    kept: list[str] = []
    seen: set[str] = set()
    near = _NearIndex()
    for done, raw in enumerate(texts):
        if progress:
            progress("cleaning", done, len(texts))
        text = normalize_text(raw, options)
        folded = _folded(text)
        if len(text) < options.min_chars or not folded:
            report.dropped["empty"] += 1
            continue
        if folded in seen:
            report.dropped["duplicate"] += 1
            continue
        shingles = _shingles(folded)
        tokens = folded.split()
        if options.near_duplicates and near.is_near(shingles, tokens):
            report.dropped["near-duplicate"] += 1
            continue
        seen.add(folded)
        near.add(shingles, tokens)
        kept.append(text)
    report.kept = len(kept)
    return kept, report
