"""How much a generated text copies its author's corpus, word for word.

A persona should sound like its author without parroting them. ``CopyIndex`` holds
every run of ``n`` consecutive words in a corpus; a text that contains any of them
copies at least ``n`` words verbatim. A document shorter than ``n`` words (a tweet, a
one-line fortune) has no such run, so it is held whole: a text that repeats all of it
copies it too, if it has at least ``MIN_WHOLE_COPY_WORDS`` words. Words are compared
lower-cased, punctuation stripped, so a copied sentence is caught however it is
capitalised or punctuated.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

__all__ = ["MIN_WHOLE_COPY_WORDS", "CopyIndex", "copied_fraction", "distinct_n", "words"]

# Shorter documents ("Thank you!") are phrases anyone writes, not the author's to copy.
MIN_WHOLE_COPY_WORDS = 4
WORD = re.compile(r"[\w']+", re.UNICODE)


def words(text: str) -> list[str]:
    """The text's words, lower-cased, punctuation dropped."""
    return [w.lower() for w in WORD.findall(text)]


def _ngrams(tokens: list[str], n: int) -> Iterable[tuple[str, ...]]:
    return (tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1))


class CopyIndex:
    """Every ``n``-word run of a corpus, and its shorter documents whole, for fast verbatim-copy checks."""

    def __init__(self, documents: Iterable[str], n: int = 8) -> None:
        self.n = n
        self._runs: set[tuple[str, ...]] = set()
        self._whole: set[tuple[str, ...]] = set()  # documents shorter than n words
        for document in documents:
            tokens = words(document)
            if MIN_WHOLE_COPY_WORDS <= len(tokens) < n:
                self._whole.add(tuple(tokens))
            self._runs.update(_ngrams(tokens, n))
        self._whole_lengths = sorted({len(w) for w in self._whole}, reverse=True)

    def __len__(self) -> int:
        return len(self._runs) + len(self._whole)

    def copies(self, text: str) -> bool:
        """Whether ``text`` contains ``n`` consecutive words of the corpus, or a whole short document."""
        tokens = words(text)
        return self._longest_whole_copy(tokens) > 0 or any(run in self._runs for run in _ngrams(tokens, self.n))

    def _longest_whole_copy(self, tokens: list[str]) -> int:
        """The length of the longest short corpus document found whole in ``tokens`` (0 if none)."""
        for length in self._whole_lengths:
            if any(gram in self._whole for gram in _ngrams(tokens, length)):
                return length
        return 0

    def longest_copied_run(self, text: str) -> int:
        """The most consecutive words of ``text`` found verbatim in the corpus (0: nothing copied)."""
        tokens = words(text)
        best = self._longest_whole_copy(tokens)
        i = 0
        while i + self.n <= len(tokens):
            if tuple(tokens[i : i + self.n]) in self._runs:
                j = i + self.n
                while j < len(tokens) and tuple(tokens[j - self.n + 1 : j + 1]) in self._runs:
                    j += 1
                best = max(best, j - i)
                i = j
            else:
                i += 1
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
