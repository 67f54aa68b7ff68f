"""Curation: every filter rejects what it should and only that; the best candidate wins."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from persona.curation import (
    clean_text,
    curate,
    is_degenerate,
    is_near_repeat,
    limit_for,
    load_corpus,
    over_limits,
    score,
    x_length,
)
from persona.errors import CorpusError

GOOD = "Patience is the slow river that carves the canyon of a life."


def reason(text: str, **options) -> str | None:
    options.setdefault("max_chars", 280)
    return curate([text], **options).candidates[0].rejected


def test_platform_limits_take_the_tightest():
    assert limit_for(["x"], 1000) == 280
    assert limit_for(["mastodon"], 1000) == 500
    assert limit_for(["bluesky"], 1000) == 300
    assert limit_for(["mastodon", "bluesky"], 1000) == 300
    assert limit_for(["file"], 120) == 120
    assert limit_for([], 280) == 280


def test_a_good_text_passes_every_filter():
    assert reason(GOOD, min_chars=10, blocklist=["hate"], recent=["Something else entirely, about gardens."]) is None


def test_empty_and_too_short():
    assert reason("   <|endoftext|> ") == "empty"
    assert reason("Be.", min_chars=10) == "too_short"


def test_too_long_for_the_platform():
    text = " ".join(f"word{i}" for i in range(60)) + "."
    assert len(text) > 300
    assert reason(text, max_chars=limit_for(["bluesky"], 1000)) == "too_long"
    assert reason(text[:290], max_chars=limit_for(["mastodon"], 1000)) is None
    assert reason(text[:290], max_chars=limit_for(["x"], 1000)) == "too_long"


def test_x_counts_cjk_emoji_and_links_its_own_way():
    """X counts a Japanese character or an emoji as two and any link as 23: a 145-character
    Japanese post passed as fitting X and was 290 by X's count."""
    phrases = ["忍耐は心の庭である", "静かに待つ者は遠くへ行く", "毎日の小さな練習が道を作る", "焦りは雨のように過ぎ去る",
               "注意は光を集める", "朝の一歩が夕べの山になる", "言葉より先に呼吸を整える", "失敗は稽古の授業料だ",
               "川は急がずに谷を刻む", "今日の手の中にあるものを世話する", "明日には明日の庭師がいる", "心の埃を毎朝払う"]
    japanese = "。".join(phrases) + "。"  # 146 characters, every one weighing 2 on X
    assert len(japanese) == 146 and x_length(japanese) == 292
    assert reason(japanese, platforms=["x"]) == "too_long"
    assert reason(japanese[:140], platforms=["x"]) is None  # 280 exactly
    assert reason(japanese, platforms=["mastodon"], max_chars=500) is None
    assert x_length("Patience 🙂") == 11
    assert x_length("Read https://example.com/a/very/long/path/that/x/shortens/anyway now") == 5 + 23 + 4


def test_x_counts_a_link_without_a_scheme_and_leaves_out_the_punctuation_after_one():
    """As twitter-text's parse_tweet counts them (twitter-text-parser 3.0.0): a post of 276 characters
    with "x.com" in it is 294 on X, and X refused it."""
    assert x_length("See x.com") == 4 + 23
    assert x_length("Read more at example.com today.") == 13 + 23 + 7
    assert x_length("Go to https://example.com.") == 6 + 23 + 1
    assert x_length("(https://example.com/a)") == 1 + 23 + 1
    assert x_length("https://en.wikipedia.org/wiki/Pisa_(city) is nice") == 23 + 8
    assert x_length("visit www.example.co.uk/path?q=1&r=2, ok") == 6 + 23 + 4
    assert x_length("http://twitter.com/これは日本語です。example.com中国語") == 23 + 2 * 9 + 23 + 2 * 3
    assert x_length("mail me at user@example.com, or #example.com") == 44  # an address and a hashtag are no links
    assert x_length("e.g. this, i.e. that, 3.14 and v1.2.3") == 37
    assert reason("a" * 270 + " x.com", platforms=["x"]) == "too_long"


def test_x_counts_words_a_stop_joins_as_written_not_as_links():
    """A bare domain is a link only with a top-level domain X knows: "Mr.Smith" (22 characters
    as written) counted 37 as a link, and a post near 280 was refused as too long for X."""
    assert x_length("Ask Mr.Smith about it.") == 22
    assert x_length("It was late.Then we left.") == 25
    assert x_length("I use Node.js daily") == 19
    assert x_length("see index.html") == 14
    assert x_length("see index.html or x.com") == 18 + 23
    assert x_length("https://example.invalidtld/a") == 23  # with a scheme, a link whatever its domain
    assert over_limits("a" * 262 + " Ask Mr.Smith.", ["x"]) == []  # 276 characters, not 291


def test_blocklist_matches_whole_words_case_insensitively():
    assert reason("Damn the torpedoes, full patience ahead.", blocklist=["DAMN"]) == "blocklist"
    assert reason("Amsterdam teaches patience to its cyclists.", blocklist=["dam"]) is None
    assert reason("Buy crypto now and wait patiently.", blocklist=["buy crypto"]) == "blocklist"


@pytest.mark.parametrize("text", [
    "Patience patience patience is all you need.",
    "Wait!!!!!!!!!! for it.",
    "the road the road the road the road the road the road",
])
def test_degenerate_repetition(text):
    assert is_degenerate(text)
    assert reason(text) == "degenerate"


def test_ordinary_sentences_are_not_degenerate():
    assert not is_degenerate(GOOD)
    assert not is_degenerate("That that is, is; and the rest is patience.")


def test_copied_from_the_corpus(tmp_path: Path):
    corpus = tmp_path / "corpus.jsonl"
    source = "the quiet mind hears the river long before the eye can see it move"
    corpus.write_text(json.dumps({"text": source}) + "\n" + json.dumps({"text": "Another line."}) + "\n")
    index = load_corpus(corpus, max_copied_words=8)
    nine_words = "As they say, the quiet mind hears the river long before the eye, friend."
    eight_words = "As they say, the quiet mind hears the river long before, friend."
    assert reason(nine_words, corpus=index) == "copied"
    assert reason(eight_words, corpus=index) is None


def test_a_copy_that_differs_only_in_its_apostrophes_is_a_copy(tmp_path: Path):
    """The corpus wrote "can’t" and the sample "can't": the copy went unseen (longest run 0)."""
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text(json.dumps({"text": "You can’t step twice into the river, and you don’t step once."}) + "\n")
    index = load_corpus(corpus, max_copied_words=8)
    assert reason("You can't step twice into the river, and you don't step once.", corpus=index) == "copied"
    assert reason("You ʼcanʼt step twice into the river, and you donʼt step once.", corpus=index) == "copied"


def test_corpus_errors_name_the_line(tmp_path: Path):
    bad = tmp_path / "corpus.jsonl"
    bad.write_text('{"text": "fine"}\nnot json\n')
    with pytest.raises(CorpusError, match="corpus.jsonl:2"):
        load_corpus(bad, 8)
    with pytest.raises(CorpusError, match="cannot read"):
        load_corpus(tmp_path / "missing.jsonl", 8)


def test_plain_text_corpus_is_one_document_per_line(tmp_path: Path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("one two three four five six seven eight nine ten\n")
    assert load_corpus(corpus, 3).copies("say one two three four now")


def test_near_repeat_of_recent_posts_and_of_earlier_candidates():
    recent = ["Patience is the slow river that carves the canyon of a life!"]
    assert is_near_repeat(GOOD, recent)
    assert reason(GOOD, recent=recent) == "near_repeat"
    assert not is_near_repeat(GOOD, ["Attention is a lamp; tend its wick each morning."])
    curated = curate([GOOD, GOOD.replace("life", "lifetime")], max_chars=280)
    assert [c.rejected for c in curated.candidates] == [None, "near_repeat"]


def test_clean_text_strips_markers_quotes_and_spaces():
    assert clean_text('  "Be  still.\n Be here."<|endoftext|>') == "Be still. Be here."
    assert clean_text("</s>Hello world") == "Hello world"


def test_score_prefers_finished_sentences_of_comfortable_length():
    assert score(GOOD) > score(GOOD.rstrip("."))
    assert score(GOOD) > score("Wait.")
    assert score(GOOD) > score(GOOD + " " + "And more words follow here to make it very long indeed." * 4)


def test_best_of_n_picks_the_highest_score_and_counts_rejections():
    raws = [
        "",
        "wait wait wait wait",
        "short one",
        GOOD,
        "Attention is a lamp; tend its wick each morning and it will light the day",
        "x" * 400,
    ]
    curated = curate(raws, max_chars=280, min_chars=10)
    assert curated.best is not None and curated.best.text == GOOD
    assert curated.rejected == {"empty": 1, "degenerate": 1, "too_short": 1, "too_long": 1}
    assert [c.text for c in curated.passed] == [GOOD, raws[4]]


def test_ties_go_to_the_earlier_candidate():
    first = "Attend to the small things today."
    second = "Listen to the quiet rivers today."
    assert score(first) == score(second)
    assert curate([first, second], max_chars=280).best.index == 0
    assert curate([second, first], max_chars=280).best.index == 0


def test_no_survivor_means_no_best():
    curated = curate(["", "a a a a a"], max_chars=280)
    assert curated.best is None and sum(curated.rejected.values()) == 2


def test_over_limits_names_each_platform_a_text_is_too_long_for():
    """For a person's edit, which no filter judges: only the platforms' own limits, each by its own count."""
    assert over_limits("a" * 301, ["x", "bluesky", "mastodon", "file", "x"]) == ["x: 301 of 280", "bluesky: 301 of 300"]
    assert over_limits("忍耐" * 71, ["x", "mastodon"]) == ["x: 284 of 280"]
    assert over_limits(GOOD, ["x", "bluesky", "telegram", "discord"]) == []


TRAIL = "...when you finally rise, with each step anew..."
GARBLED = "The simplestenbod's: Patience, Attention, Tone-Breathless Faithfulness.\""


def test_an_ellipsis_trail_is_not_a_finished_sentence():
    """A trailing "..." counted as a finished sentence, so a text that trails off won over
    finished ones."""
    assert curate([TRAIL, "Rise, and take each step anew."], max_chars=280).best.text == "Rise, and take each step anew."
    assert score(GOOD.rstrip(".") + "...") < score(GOOD)
    from persona.curation import is_finished

    for trailing in (TRAIL, "Wait for it…", "Wait for it. . .", 'He said "wait..."'):
        assert not is_finished(trailing), trailing
    for finished in (GOOD, "Really?!", 'He said "wait."', "(Be still.)", "Wait… then go."):
        assert is_finished(finished), finished


def test_a_finished_candidate_beats_an_unfinished_one_whatever_their_scores():
    """A post should end as a finished sentence: an unfinished one of a comfortable length
    outscored a short finished one, and won."""
    unfinished = "Attention is a lamp; tend its wick each morning and it will light the day"
    short = "It is what it is."
    assert score(unfinished) > score(short)
    curated = curate([unfinished, short], max_chars=280)
    assert curated.best.text == short and [c.text for c in curated.passed] == [short, unfinished]
    assert [c.flaws for c in curated.candidates] == [["unfinished"], []]


def test_an_unfinished_candidate_wins_only_when_none_is_finished_and_it_says_so():
    curated = curate([TRAIL, "Attention is a lamp; tend its wick each morning"], max_chars=280)
    assert curated.best is not None and curated.best.flaws == ["unfinished"]


def test_a_stray_quote_loses_to_a_clean_candidate():
    """A garbled candidate ending in an unbalanced quote won over clean ones: a model that
    garbles words often leaves a stray quote behind, and it cannot be balanced by a person."""
    clean = "Patience is a habit, not a mood."
    assert score(GARBLED) > score(clean)
    curated = curate([GARBLED, clean], max_chars=280)
    assert curated.best.text == clean and curated.candidates[0].flaws == ["open_quote"]
    assert curate(['She said: "wait." Then she left.'], max_chars=280).best.flaws == []  # balanced quotes are fine
    assert curate(["“Wait,” she said, “and see.", clean], max_chars=280).best.text == clean


def test_a_candidate_cut_off_at_the_token_limit_is_rejected():
    """A reply cut off at max_new_tokens (finish_reason "length") could win and go out half written."""
    from persona.curation import Draft

    cut = GOOD.removesuffix(" life.")  # mid-sentence, with no finished sentence before
    curated = curate([Draft(cut, "length"), Draft("Be still, and wait.", "stop"), Draft("", "length")], max_chars=280)
    assert [c.rejected for c in curated.candidates] == ["cut_off", None, "empty"]
    assert curated.best.text == "Be still, and wait." and curated.rejected == {"cut_off": 1, "empty": 1}


def test_a_cut_off_candidate_is_trimmed_back_to_its_last_finished_sentence():
    """A candidate cut off mid-second-sentence was thrown away whole, though its first
    sentence was a fine post: with 64 tokens, often the best of the batch."""
    from persona.curation import Draft

    cut = GOOD + " And the river, when it"
    curated = curate([Draft(cut, "length"), Draft("Be still, and wait", "stop")], max_chars=280, min_chars=10)
    first = curated.candidates[0]
    assert (first.rejected, first.text, first.trimmed, first.flaws) == (None, GOOD, "And the river, when it", [])
    assert curated.best is first  # a clean trimmed sentence beats an unfinished one
    # What is kept still goes through the filters.
    assert curate([Draft(cut, "length")], max_chars=40).candidates[0].rejected == "too_long"
    # Stopped right after a full stop: nothing to trim, and nothing is said to be.
    whole = curate([Draft(GOOD, "length")], max_chars=280).candidates[0]
    assert (whole.rejected, whole.text, whole.trimmed) == (None, GOOD, "")


@pytest.mark.parametrize("text", [
    "Patience is slow... and the river, when it",  # an ellipsis trails off; it ends nothing
    "Yes. Patience is the slow river that carves the canyon of",  # a stray early stop: too little of it
    "Ask Mr. Jones what the slow river carves when",  # an abbreviation, not a sentence's end
    "“Wait,” she said, and the river",  # no sentence finished at all
])
def test_a_cut_off_candidate_with_no_finished_sentence_worth_keeping_is_rejected(text):
    from persona.curation import Draft

    candidate = curate([Draft(text, "length")], max_chars=280).candidates[0]
    assert (candidate.rejected, candidate.text, candidate.trimmed) == ("cut_off", text, "")



@pytest.mark.parametrize("ending", ["said Mr.", "told Dr.", "as in e.g.", "wrote J. R. R.", "asked Prof.", "(see Mrs.)"])
def test_a_text_cut_off_right_after_an_abbreviation_is_not_posted_as_finished(ending):
    """A cut-off text whose last stop was a title's or an initial's ("... said Mr.") counted as
    a finished sentence: it was kept whole, not trimmed, and went out ending "said Mr."."""
    from persona.curation import Draft, is_finished

    text = "Patience is the slow river that carves the canyon of a life, as it was once put to me, " + ending
    assert not is_finished(text)
    cut = curate([Draft(text, "length")], max_chars=280).candidates[0]
    assert (cut.rejected, cut.text) == ("cut_off", text)  # nothing finished before it worth keeping
    # One finished sentence before it: trimmed back to that, the abbreviation left out.
    after = f"{GOOD} I heard it from an old sailor, who said it to me, {ending}"
    cut = curate([Draft(after, "length")], max_chars=280).candidates[0]
    assert (cut.rejected, cut.text, cut.flaws) == (None, GOOD, [])
    # The model itself stopped there: it may pass, but as unfinished, and a clean one beats it.
    curated = curate([text, "Be still, and wait."], max_chars=280)
    assert curated.candidates[0].flaws == ["unfinished"] and curated.best.text == "Be still, and wait."


@pytest.mark.parametrize("finished", ["Bring bread, wine, cheese, etc.", "I was born in the U.S.", "So said I.",
                                      "Ask Martin Luther King Jr.", "It is five p.m.", "Say no."])
def test_an_abbreviation_that_may_end_a_sentence_still_ends_a_text(finished):
    from persona.curation import is_finished

    assert is_finished(finished) and curate([finished], max_chars=280).best.flaws == []


def test_a_cut_off_text_is_trimmed_past_abbreviations_and_initials_to_a_real_sentence_end():
    from persona.curation import Draft

    text = f"{GOOD} So wrote J.R.R. Tolkien to Dr. Smith of St. Ives, e.g. in his letters, and Mrs. Jones said"
    assert curate([Draft(text, "length")], max_chars=280).candidates[0].text == GOOD
    kept = "Learn to say no. It is the start of a quiet and well-kept life."
    cut = curate([Draft(kept + " And then the river, when", "length")], max_chars=280).candidates[0]
    assert (cut.text, cut.trimmed) == (kept, "And then the river, when")


def test_a_text_of_exactly_a_platforms_limit_fits_it():
    """A post of 280 characters is one X takes, as is one of 300 on Bluesky and 500 on Mastodon."""
    assert over_limits("a" * 280, ["x"]) == []
    assert over_limits("a" * 300, ["bluesky", "mastodon"]) == []
    assert over_limits("忍耐" * 70, ["x"]) == []  # X counts each 2: 280
    assert over_limits("a" * 500, ["mastodon"]) == []


def test_quotes_that_open_and_close_inside_a_text_are_not_taken_for_wrapping_quotes():
    """Only a text wrapped whole in quotes loses them: one that begins with a quoted phrase and
    ends with another keeps all four quotes, or it would read 'Go," she said, "now'."""
    text = '"Go," she said, "now."'
    assert clean_text(text) == text
    assert clean_text('"Go now, she said."') == "Go now, she said."


def test_an_unclosed_curly_quote_is_a_flaw_whatever_the_straight_ones():
    """Curly quotes must pair up too: “ without its ” is a garbled candidate's stray quote."""
    assert curate(["“Wait,” she said, “and see."], max_chars=280).best.flaws == ["open_quote"]
    assert curate(["“Wait,” she said, “and see.”"], max_chars=280).best.flaws == []


def test_a_cut_off_candidate_keeps_a_first_sentence_of_exactly_the_minimum_length():
    """What is kept must be at least ``min_chars``: a finished sentence of exactly that many
    characters is kept, as a finished candidate of that length passes ``too_short``."""
    from persona.curation import Draft

    kept = "Be still now."
    cut = curate([Draft(kept + " And the river", "length")], max_chars=280, min_chars=len(kept)).candidates[0]
    assert (cut.rejected, cut.text, cut.trimmed) == (None, kept, "And the river")


def test_a_persona_limit_tighter_than_its_platforms_wins():
    """A persona that keeps its posts to 200 characters gets 200 on Mastodon (500) and X (280) too."""
    assert limit_for(["mastodon"], 200) == 200
    assert limit_for(["x", "bluesky"], 200) == 200
