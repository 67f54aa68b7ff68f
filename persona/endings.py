"""How a chat reply that its token limit cut off ends: at a finished sentence, or a whole word.

A reply that runs to ``max_new_tokens`` stops wherever the limit falls, often mid-word
("... the way of the riv"). It is trimmed back to its last finished sentence when that
keeps a fair share of it (``curation.trim_to_sentence``, which daily posts use too: an
abbreviation's stop, "Mr.", ends no sentence), or else to its last whole word, followed
by an ellipsis ("... the way of the…"). The last word is always dropped then: the limit
falls between tokens, a word may be several of them, and nothing in the text says
whether it was finished.
"""

from __future__ import annotations

from persona.curation import CLOSERS, ELLIPSES, trim_to_sentence

__all__ = ["ELLIPSIS", "end_cut_off"]

ELLIPSIS = "…"
# What a text cut back to a whole word sheds before its ellipsis: "the river, and" ends
# "the river…", not "the river,…".
_DANGLING = " \t\r\n,;:-–—/([{“‘«"


def end_cut_off(text: str) -> str:
    """``text``, cut off at the token limit, ended cleanly: at its last finished sentence,
    or at its last whole word and "…" (a text of one word keeps it: nothing else is left)."""
    body = text.rstrip()
    if not body:
        return text
    kept = trim_to_sentence(body)
    if kept:
        return kept
    if body.rstrip(CLOSERS).endswith(ELLIPSES):  # it already trails off: "the waters..."
        return body
    return _to_whole_word(body) + ELLIPSIS


def _to_whole_word(body: str) -> str:
    """``body`` without its last word where that may be unfinished: one ending in a letter or
    digit, or in a stop that is no sentence's end ("said Mr.": a finished sentence would
    have been kept whole), and without the punctuation left dangling before it."""
    parts = body.rsplit(maxsplit=1)
    head = parts[0] if len(parts) == 2 and (body[-1].isalnum() or body[-1] == ".") else body
    return head.rstrip(_DANGLING) or body
