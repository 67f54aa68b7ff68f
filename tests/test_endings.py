"""A chat reply cut off at its token limit ends at a finished sentence or a whole word."""

from __future__ import annotations

import pytest

from persona.endings import end_cut_off


@pytest.mark.parametrize(("cut", "ended"), [
    # Back to the last finished sentence, when that keeps a fair share of the reply.
    ("A river's life - an endless tapestry woven from threads of growth. Each drop represents a different season: "
     + "spring brings blooming", "A river's life - an endless tapestry woven from threads of growth."),
    ("Rivers keep their secrets. A river's soul, a river's story. That which flows from earth to",
     "Rivers keep their secrets. A river's soul, a river's story."),
    ('Be still. "Wait," she said. And the riv', 'Be still. "Wait," she said.'),
    ("It was done.\n\nNext,", "It was done."),
    # The stop of a title or an initial is no sentence's end.
    ("Ask the river, said Dr. Wood, and it will tell you of the sea and", "Ask the river, said Dr. Wood, and it will tell you of the sea…"),
    # Otherwise back to the last whole word, and an ellipsis: the last word may be unfinished.
    ("the way of the riv", "the way of the…"),
    ("A river's end may not always be easy to explain but", "A river's end may not always be easy to explain…"),
    ("Short. Then the river went on and on past the old mill wheel, and", "Short. Then the river went on and on past the old mill wheel…"),
    ("He spoke softly to Mr.", "He spoke softly to…"),
    ('He said: "the', "He said…"),
])
def test_a_cut_off_reply_ends_at_a_sentence_or_a_whole_word(cut: str, ended: str):
    assert end_cut_off(cut) == ended


@pytest.mark.parametrize(("cut", "ended"), [
    ("A river's soul lies within her waters...", "A river's soul lies within her waters..."),  # trails off already
    ("Be still, and wait.", "Be still, and wait."),  # the limit fell right after a sentence
    ('She said "go"', 'She said "go"…'),  # a closing quote ends a word
    ("Riv", "Riv…"),  # one word: nothing else is left
    ("", ""),
])
def test_what_needs_no_cutting_is_kept(cut: str, ended: str):
    assert end_cut_off(cut) == ended
