"""How much a generated text copies its author's corpus, word for word.

A persona should sound like its author without parroting them. ``CopyIndex`` holds
every run of ``n`` consecutive words in a corpus; a text that contains any of them
copies at least ``n`` words verbatim. Words are compared lower-cased, punctuation
stripped, so a copied sentence is caught however it is capitalised or punctuated.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

__all__ = ["CopyIndex", "copied_fraction", "distinct_n", "words"]

WORD = re.compile(r"[\w']+", re.UNICODE)


def words(text: str) -> list[str]:
    """The text's words, lower-cased, punctuation dropped."""
    return [w.lower() for w in WORD.findall(text)]


def _ngrams(tokens: list[str], n: int) -> Iterable[tuple[str, ...]]:
    return (tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1))


class CopyIndex:
    """Every ``n``-word run of a corpus, for fast verbatim-copy checks."""

    def __init__(self, documents: Iterable[str], n: int = 8) -> None:
        self.n = n
        self._runs: set[tuple[str, ...]] = set()
        for document in documents:
            self._runs.update(_ngrams(words(document), n))

    def __len__(self) -> int:
        return len(self._runs)

    def copies(self, text: str) -> bool:
        """Whether ``text`` contains ``n`` or more consecutive words of the corpus."""
        return any(run in self._runs for run in _ngrams(words(text), self.n))

    def longest_copied_run(self, text: str) -> int:
        """The most consecutive words of ``text`` found verbatim in the corpus (0 if < n)."""
        tokens = words(text)
        best = 0
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
    """The fraction of samples that copy a run of ``index.n`` words from the corpus."""
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
