"""How much a generated text copies its author's corpus, word for word.

A persona should sound like its author without parroting them. ``CopyIndex`` holds
every run of ``n`` consecutive words in a corpus; a text that contains any of them
copies at least ``n`` words verbatim. A document shorter than ``n`` words (a tweet, a
one-line fortune) has no such run, so it is held whole: a text that repeats all of it
copies it too, if it has at least ``MIN_WHOLE_COPY_WORDS`` words. Words are compared
lower-cased, punctuation stripped, so a copied sentence is caught however it is
capitalised or punctuated.

Chinese, Japanese, Thai and the like are written without spaces between words, and Korean
joins its particles to its words ("학교에"): in those scripts (``UNSPACED_SCRIPTS``) each
character is a word of its own, so a clause is not one long "word" that no other text
shares. Two of them weigh as much as one word where runs are measured (a Chinese word is
one or two characters, a Japanese one two or three): a run of 9 words is 18 characters.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from itertools import accumulate

__all__ = [
    "MIN_WHOLE_COPY_WORDS",
    "UNSPACED_SCRIPTS",
    "CopyIndex",
    "copied_fraction",
    "distinct_n",
    "split_unspaced",
    "words",
]

# Shorter documents ("Thank you!") are phrases anyone writes, not the author's to copy.
MIN_WHOLE_COPY_WORDS = 4
# Scripts written without spaces between words (a regex character class): Han (with 々〆〇),
# Hiragana, Katakana (and its half-width forms), Hangul (syllables and jamo), Thai, Lao,
# Khmer, Myanmar. Their punctuation ("。", "、", "「") is outside these ranges.
UNSPACED_SCRIPTS = (
    "\u3005-\u3007\u3040-\u309f\u30a0-\u30fa\u30fc-\u30ff\u31f0-\u31ff\u3400-\u4dbf\u4e00-\u9fff"
    "\uf900-\ufaff\uff66-\uff9f\U00020000-\U0003134f"  # Han, kana
    "\u1100-\u11ff\u3131-\u318e\ua960-\ua97f\uac00-\ud7a3\ud7b0-\ud7ff\uffa0-\uffdc"  # Hangul
    "\u0e01-\u0e3a\u0e40-\u0e4e\u0e50-\u0e59\u0e81-\u0edf\u1000-\u109f\u1780-\u17dd\u17e0-\u17e9"
)
WORD = re.compile(f"[\\w'{UNSPACED_SCRIPTS}]+")
_UNSPACED = re.compile(f"[{UNSPACED_SCRIPTS}]")
_UNSPACED_SPLIT = re.compile(f"[{UNSPACED_SCRIPTS}]|[^{UNSPACED_SCRIPTS}]+")
# What a word weighs where runs are measured, and a character of ``UNSPACED_SCRIPTS`` (half a word).
_WORD_UNITS = 2
_CHARACTER_UNITS = 1


def split_unspaced(tokens: Iterable[str]) -> list[str]:
    """``tokens`` with each character of a script written without spaces (``UNSPACED_SCRIPTS``)
    a token of its own: "今日はいい天気" is seven, "GPUを使う" is "gpu", "を", "使", "う"."""
    split: list[str] = []
    for token in tokens:
        if _UNSPACED.search(token):
            split.extend(_UNSPACED_SPLIT.findall(token))
        else:
            split.append(token)
    return split


# Typographic apostrophes, read as the typewriter's: "can’t" in the corpus and "can't" in a
# sample are the same word (a copy that differed only in them was not found, longest run 0).
_APOSTROPHES = str.maketrans({"\u2019": "'", "\u2018": "'", "\u02bc": "'", "\uff07": "'"})


def words(text: str) -> list[str]:
    """The text's words, lower-cased, punctuation dropped, apostrophes all the typewriter's;
    in scripts written without spaces (``UNSPACED_SCRIPTS``), its characters."""
    return split_unspaced(w.lower() for w in WORD.findall(text.translate(_APOSTROPHES)))


def _ngrams(tokens: list[str], n: int) -> Iterable[tuple[str, ...]]:
    return (tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1))


def _units(tokens: list[str]) -> list[int]:
    """What each token weighs: a word 2, a character of a script written without spaces 1."""
    return [_CHARACTER_UNITS if len(t) == 1 and _UNSPACED.match(t) else _WORD_UNITS for t in tokens]


def _spans(units: list[int], need: int) -> Iterable[tuple[int, int]]:
    """For each start, the shortest run of tokens from it that weighs ``need`` or more: (start, end)."""
    end = total = 0
    for start in range(len(units)):
        while end < len(units) and total < need:
            total += units[end]
            end += 1
        if total < need:
            return
        yield start, end
        total -= units[start]


class CopyIndex:
    """Every ``n``-word run of a corpus, and its shorter documents whole, for fast verbatim-copy checks.

    A run is the shortest that weighs ``n`` words from where it starts: ``n`` words, or ``2 * n``
    characters of a script written without spaces, or a mix. A text that copies ``n`` words'
    weight from the corpus starts such a run where the copy starts, the same run as the corpus's.
    Each run keeps where it is in the corpus, so a longer copy is followed through one document
    only: two passages that share ``n`` words are not one passage."""

    def __init__(self, documents: Iterable[str], n: int = 8) -> None:
        self.n = n
        # Run -> where it starts in the corpus: the documents' tokens numbered in one sequence,
        # a number left out after each, so the run after a document's last is never its next.
        self._runs: dict[tuple[str, ...], int] = {}
        self._more: dict[tuple[str, ...], list[int]] = {}  # where runs found more than once also start
        self._whole: dict[tuple[str, ...], int] = {}  # documents shorter than n words -> their weight in words
        spelling: dict[str, str] = {}  # one string per distinct word, shared by all its runs
        known = self._runs.setdefault
        first = 0
        for document in documents:
            tokens = [spelling.setdefault(token, token) for token in words(document)]
            units = _units(tokens)
            if MIN_WHOLE_COPY_WORDS * _WORD_UNITS <= sum(units) < n * _WORD_UNITS:
                self._whole[tuple(tokens)] = sum(units) // _WORD_UNITS
            runs = ((tuple(tokens[i:j]), first + i) for i, j in _spans(units, n * _WORD_UNITS))
            # Most runs are new: a comprehension adds them, and sets aside the few found before.
            for run, place in [(run, place) for run, place in runs if known(run, place) != place]:
                self._more.setdefault(run, []).append(place)
            first += len(tokens) + 1
        self._whole_lengths = sorted({len(w) for w in self._whole}, reverse=True)

    def __len__(self) -> int:
        return len(self._runs) + len(self._whole)

    def copies(self, text: str) -> bool:
        """Whether ``text`` contains ``n`` consecutive words of the corpus, or a whole short document."""
        tokens = words(text)
        return self._longest_whole_copy(tokens) > 0 or any(
            tuple(tokens[i:j]) in self._runs for i, j in _spans(_units(tokens), self.n * _WORD_UNITS)
        )

    def _longest_whole_copy(self, tokens: list[str]) -> int:
        """The weight in words of the longest short corpus document found whole in ``tokens`` (0 if none)."""
        return max((self._whole.get(gram, 0) for length in self._whole_lengths for gram in _ngrams(tokens, length)),
                   default=0)

    def _places(self, run: tuple[str, ...]) -> list[int]:
        """Where ``run`` starts in the corpus (none: it is not there)."""
        first = self._runs.get(run)
        return [] if first is None else [first, *self._more.get(run, ())]

    def longest_copied_run(self, text: str) -> int:
        """The most consecutive words of ``text`` found verbatim in one place of the corpus (0: nothing copied)."""
        tokens = words(text)
        units = _units(tokens)
        weight = [0, *accumulate(units)]  # weight[j] - weight[i]: what tokens[i:j] weigh
        best = self._longest_whole_copy(tokens)
        started: dict[int, int] = {}  # the copies going on: where each is now in the corpus -> its start in text
        for i, j in _spans(units, self.n * _WORD_UNITS):
            # A copy goes on while the run starting at the next word is the corpus's next run.
            started = {place: started.get(place - 1, i) for place in self._places(tuple(tokens[i:j]))}
            if started:
                best = max(best, (weight[j] - weight[min(started.values())]) // _WORD_UNITS)
        return best


def copied_fraction(samples: list[str], index: CopyIndex) -> float:
    """The fraction of samples that copy a run of ``index.n`` words, or a whole short document, from the corpus."""
    if not samples:
        return 0.0
    return sum(index.copies(s) for s in samples) / len(samples)


def distinct_n(samples: list[str], n: int) -> float:
    """Distinct n-grams over all n-grams in the samples (1.0: no repetition at all)."""
    total = 0
    seen: set[tuple[str, ...]] = set()
    for sample in samples:
        grams = list(_ngrams(words(sample), n))
        total += len(grams)
        seen.update(grams)
    return len(seen) / total if total else 0.0
