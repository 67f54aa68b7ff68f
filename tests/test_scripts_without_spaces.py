"""Post filters and corpus cleaning on Chinese, Japanese and Korean, which put no space between
words: each character is compared as a word, so a clause is not one "word" no other text shares."""

from __future__ import annotations

from persona.curation import Draft, _blocked, curate, is_degenerate, is_finished
from persona.endings import end_cut_off
from persona.originality import CopyIndex, words
from training.cleaning import clean_documents

JA_POST = "静けさの中にこそ、本当の答えがある。焦らず、自分の心の声に耳を傾けなさい。"


def test_words_of_a_script_without_spaces_are_its_characters_and_other_words_stay_whole():
    assert words("GPUを使う, don't") == ["gpu", "を", "使", "う", "don't"]


def test_a_blocked_word_is_found_inside_a_japanese_or_korean_sentence():
    assert _blocked("今日はいい天気です", ["天気"])
    assert _blocked("바보야 그만해", ["바보"])
    assert not _blocked("今日はいい天気です", ["雨"])
    assert not _blocked("a weathered sign", ["weather"])  # English: whole words, as before


def test_a_post_that_copies_a_japanese_corpus_entry_is_rejected_as_copied():
    corpus = "静けさの中にこそ本当の答えがある焦らず自分の心の声に耳を傾けなさいそうすれば道は自ずと開けるでしょう。"
    index = CopyIndex([corpus], n=9)
    assert index.copies("ある人が言った。" + corpus[5:30])
    assert curate([corpus], max_chars=280, corpus=index).candidates[0].rejected == "copied"
    assert not index.copies("明日は雨が降るかもしれないので、傘を持って出かけましょう。")


def test_two_characters_weigh_one_word_so_a_short_stock_phrase_is_not_a_copy():
    index = CopyIndex(["おはよう！", "Thank you!"], n=9)  # shorter than MIN_WHOLE_COPY_WORDS: anyone writes them
    assert not index.copies("おはよう、みんな。今日も頑張ろう。")
    assert CopyIndex(["静けさの中にこそ本当の答えがある"], n=9).longest_copied_run("静けさの中にこそ本当の答えがある") == 8


def test_a_japanese_copied_run_is_one_passage_not_two_joined_where_they_share_characters():
    shared = "本当の答えは心の中にあるのだと私は思う"  # 19 characters, in both entries
    index = CopyIndex(["毎朝わたしは" + shared + "から始める", "祖母はいつも" + shared + "と言っていた"], n=9)
    joined = "毎朝わたしは" + shared + "と言っていた"  # 31 characters, 25 of them from one entry
    assert index.copies(joined) and index.longest_copied_run(joined) == 12


def test_a_looping_japanese_text_is_degenerate_but_laughter_is_not():
    assert is_degenerate("静かな心" * 6)
    assert not is_degenerate("哈哈哈，今天天气真好！")
    assert not is_degenerate(JA_POST)


def test_corpus_cleaning_drops_a_japanese_near_duplicate():
    first = "今日は公園で犬と一緒に長い時間散歩をしました。とても楽しかったです。"
    kept, report = clean_documents([first, first.replace("犬", "猫"), "明日は雨が降るらしいので、家で本を読みます。"])
    assert kept == [first, "明日は雨が降るらしいので、家で本を読みます。"] and report.dropped["near-duplicate"] == 1


def test_full_width_stops_end_a_sentence():
    assert is_finished(JA_POST) and is_finished("「本当ですか？」") and is_finished("太好了！")
    curated = curate([JA_POST, Draft(JA_POST + "そして明日の朝", "length")], max_chars=280, min_chars=10)
    assert curated.candidates[0].flaws == []
    assert curated.candidates[1].rejected == "near_repeat" and curated.candidates[1].trimmed == "そして明日の朝"


def test_a_cut_off_japanese_reply_ends_at_its_last_sentence_not_mid_word():
    assert end_cut_off("今日はいい天気です。明日は雨が降るでしょう。そして明後") == "今日はいい天気です。明日は雨が降るでしょう。"
