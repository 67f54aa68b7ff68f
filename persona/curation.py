"""Curation: which generated candidates may be posted, and which one is best.

Generations are hit-and-miss, so a post is chosen from several candidates. Each is
cleaned, then checked by the filters in order (the first that fails names the reason):

    empty        nothing left after cleaning
    cut_off      the model stopped at its token limit (``sampling.max_new_tokens``) mid-thought,
                 with no finished sentence worth keeping before it (see below)
    too_short    under the persona's ``filters.min_chars``
    too_long     over the tightest limit of the persona and every target platform
    blocklist    contains a blocked word or phrase (case-insensitive, whole words; in scripts
                 written without spaces, Chinese or Japanese, anywhere: see ``originality.words``)
    degenerate   the model looped (a word or phrase over and over)
    copied       a verbatim run from the persona's corpus longer than ``max_copied_words``,
                 or a whole corpus entry of 4 words or more (see ``originality.CopyIndex``)
    near_repeat  too close to one of the persona's recent posts (or an earlier candidate)

A candidate cut off at the token limit is first trimmed back to its last finished
sentence (its ``trimmed`` says what was dropped), and that goes through the filters: a
cut-off second sentence does not spoil a fine first one. The stop of an abbreviation or an
initial ("Mr.", "e.g.", "J. R. R.") ends no sentence, so a post never ends "... said Mr.".
What is kept must be at least ``filters.min_chars`` and ``SALVAGE_MIN_SHARE`` of what was
written, so a stray full stop early in a text does not make a post of its first few words.
A chat reply cut off the same way is trimmed by this same rule (``trim_to_sentence``,
used by ``persona.endings``).

The survivors are ranked: one without flaws always beats one with them (see
``flaws``: it ends mid-sentence or in an ellipsis, or a double quote is left open),
then by score (a comfortable length, varied words, a finished sentence); ties go to
the earlier candidate. A winner with flaws means no candidate was free of them.
Pure functions, no I/O except ``load_corpus``.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from difflib import SequenceMatcher
from itertools import pairwise
from pathlib import Path

from persona.errors import CorpusError
from persona.originality import UNSPACED_SCRIPTS, CopyIndex, distinct_n, words

__all__ = [
    "Candidate",
    "Curated",
    "Draft",
    "clean_text",
    "curate",
    "flaws",
    "is_degenerate",
    "is_finished",
    "is_near_repeat",
    "limit_for",
    "load_corpus",
    "over_limits",
    "score",
    "trim_to_sentence",
    "x_length",
]

# Platform limits, in characters (X's counted its own way: see ``x_length``).
X_LIMIT_CHARS = 280
MASTODON_LIMIT_CHARS = 500
BLUESKY_LIMIT_CHARS = 300
DISCORD_LIMIT_CHARS = 2000
TELEGRAM_LIMIT_CHARS = 4096
PLATFORM_LIMITS_CHARS = {
    "x": X_LIMIT_CHARS,
    "mastodon": MASTODON_LIMIT_CHARS,
    "bluesky": BLUESKY_LIMIT_CHARS,
    "discord": DISCORD_LIMIT_CHARS,
    "telegram": TELEGRAM_LIMIT_CHARS,
}

# X's weights (twitter-text v3): code points in these ranges count 1 (Latin, Greek,
# Cyrillic, Hebrew, Arabic, Indic scripts..., some punctuation); every other one 2 (CJK,
# emoji); a link 23, however long. (X counts an emoji sequence as 2 in all; counted per
# code point here, a post is at worst a little shorter than X would allow.)
X_LIGHT_RANGES = ((0, 4351), (8192, 8205), (8208, 8223), (8242, 8247))
X_LINK_LENGTH = 23
# The characters that count 2: one regex pass (a corpus's tweets are weighed too).
_X_HEAVY = re.compile("[^" + "".join(f"\\U{low:08x}-\\U{high:08x}" for low, high in X_LIGHT_RANGES) + "]")
# A link as X finds one (twitter-text's ``extract_urls``, in part): with "http(s)://", or a bare
# domain ("example.com"). Its path or query does not end in punctuation: "See example.com/a."
# links "example.com/a". Each counts ``X_LINK_LENGTH``, however long. A bare domain is a link
# only when its top-level domain is one X knows (every country's, the common others): words a
# stop joins ("Mr.Smith", "Node.js", "index.html") count as written.
_COUNTRY_TLDS = (
    "ac ad ae af ag ai al am an ao aq ar as at au aw ax az ba bb bd be bf bg bh bi bj bl bm bn bo bq br bs bt bv "
    "bw by bz ca cc cd cf cg ch ci ck cl cm cn co cr cu cv cw cx cy cz de dj dk dm do dz ec ee eg eh er es et eu fi "
    "fj fk fm fo fr ga gb gd ge gf gg gh gi gl gm gn gp gq gr gs gt gu gw gy hk hm hn hr ht hu id ie il im in io iq "
    "ir is it je jm jo jp ke kg kh ki km kn kp kr kw ky kz la lb lc li lk lr ls lt lu lv ly ma mc md me mf mg mh mk "
    "ml mm mn mo mp mq mr ms mt mu mv mw mx my mz na nc ne nf ng ni nl no np nr nu nz om pa pe pf pg ph pk pl pm pn "
    "pr ps pt pw py qa re ro rs ru rw sa sb sc sd se sg sh si sj sk sl sm sn so sr ss st su sv sx sy sz tc td tf tg "
    "th tj tk tl tm tn to tp tr tt tv tw tz ua ug uk um us uy uz va vc ve vg vi vn vu wf ws ye yt za zm zw"
)
_COMMON_TLDS = (
    "com net org edu gov mil int info biz name pro mobi app dev xyz online site tech blog news shop store club "
    "live art page cloud wiki media link social world today email space website design studio agency games "
    "global network digital life fun top icu vip work one lol wtf ninja guru photo photos video music bar "
    "church travel codes software systems solutions support center company bio eco gay moe xxx"
)
X_KNOWN_TLDS = frozenset((_COUNTRY_TLDS + " " + _COMMON_TLDS).split())
_LINK_LETTERS = "\u00c0-\u00d6\u00d8-\u00f6\u00f8-\u024f\u0300-\u036f\u0400-\u04ff\u1e00-\u1eff"  # X's accents, Cyrillic
_LINK = re.compile(
    r"(?<![a-z0-9@\uff20$#\uff03])"  # not inside a word, an address (a@b.com), a hashtag or a cashtag
    r"(?:https?://(?:[^\W_](?:[\w-]*[^\W_])?\.)+"
    rf"|(?<![-_./])(?:[-a-z0-9{_LINK_LETTERS}]+\.)+)"
    r"(?P<tld>xn--[-0-9a-z]+|[a-z]{2,63})(?![0-9a-z@+-])(?::[0-9]{1,5})?"
    rf"(?P<rest>[/?][a-z0-9!*';:=+,.$/%#\[\]\-\u2013_~@|&?(){_LINK_LETTERS}]*)?",
    re.IGNORECASE,
)
# What a link's path or query may end in (else the character is the sentence's, not the link's).
_LINK_END = re.compile(f"[-+a-z0-9=_#/&{_LINK_LETTERS}]", re.IGNORECASE)

NEAR_REPEAT_SIMILARITY = 0.8  # difflib ratio over words at or above which two posts are "the same"
REPEATED_WORD_RUN = 3  # the same word this many times in a row is a loop
REPEATED_CHAR_RUN = 8  # the same character this many times in a row ("!!!!!!!!")
MIN_DISTINCT_BIGRAMS = 0.6  # fewer distinct word pairs than this (over 8+ words) is a loop
SWEET_SPOT_CHARS = (60, 180)
CLOSERS = "\"'”’)]»」』）］】〕〉》"  # what may follow a sentence's last stop: "Be still." (she said)
ELLIPSES = ("..", "…", ". .", "‥", "。。")  # a trail, not an ending: "...with each step anew..."
# The stops that end a sentence: Chinese and Japanese write theirs full width, "。！？".
SENTENCE_STOPS = ".!?。！？｡．"
# Each of ``flaws``'s names, as a message says it of a text.
FLAW_WORDS = {"unfinished": "does not end as a finished sentence", "open_quote": "leaves a double quote open"}
LEAKED_MARKERS = re.compile(r"<\|[a-z_]+\|>|</?s>")
# A cut-off text keeps its finished sentences only if they are at least this share of it.
SALVAGE_MIN_SHARE = 1 / 3
# Where a sentence may end inside a text: a stop (and closers) before a space, or a full-width
# stop anywhere (Chinese and Japanese put no space after one); "３．１４" is a number.
_SENTENCE_END = re.compile(rf"[.!?][{re.escape(CLOSERS)}]*(?=\s)|(?:[。！？｡]|．(?![0-9０-９]))[{re.escape(CLOSERS)}]*")
# A stop after one of these ends a word, never a sentence: a title before a name ("Mr."),
# or what introduces more ("e.g."). A text that ends in one was cut off mid-thought.
NEVER_FINAL_ABBREVIATIONS = frozenset({
    "mr", "mrs", "ms", "mx", "dr", "prof", "rev", "fr", "st", "mt", "gen", "col", "capt", "lt", "sgt", "sen",
    "gov", "hon", "messrs", "mme", "mlle", "e.g", "i.e", "cf", "vs", "viz", "ca", "approx",
})
# A stop after one of these may end a sentence ("bread, wine, etc."), or not ("etc. and so"):
# a cut-off text is not trimmed back to one (nor to a lone letter, "J. R. R.", or to dotted
# letters, "J.R.R.", "U.S."), but a text the model ended there is finished.
ABBREVIATIONS = NEVER_FINAL_ABBREVIATIONS | {"etc", "jr", "sr", "inc", "ltd", "co", "al", "esq"}
_DOTTED_LETTERS = re.compile(r"(?:[^\W\d_]\.)+[^\W\d_]")
_OPENERS = "\"'“‘([«「『（［【〔〈《"
_UNSPACED_CHARACTER = re.compile(f"[{UNSPACED_SCRIPTS}]")


@dataclass(frozen=True)
class Draft:
    """A generated text as the model ended it: ``finish_reason`` "length" means it was cut
    off at the token limit (``GenerationReply.finish_reason``)."""

    text: str
    finish_reason: str = "stop"


@dataclass
class Candidate:
    """One generated text, what became of it, and its score and flaws if it passed."""

    index: int
    raw: str
    text: str
    rejected: str | None = None
    trimmed: str = ""  # what was cut from a text the model was cut off in, back to its last finished sentence
    score: float = 0.0
    flaws: list[str] = field(default_factory=list)


@dataclass
class Curated:
    """The outcome of curating a batch: the winner (if any) and every candidate."""

    candidates: list[Candidate]
    best: Candidate | None = None
    rejected: dict[str, int] = field(default_factory=dict)

    @property
    def passed(self) -> list[Candidate]:
        """Candidates that passed every filter, best first: fewest flaws, then highest score."""
        return sorted(
            (c for c in self.candidates if c.rejected is None), key=lambda c: (len(c.flaws), -c.score, c.index)
        )


def limit_for(platforms: Iterable[str], persona_max_chars: int) -> int:
    """The tightest character limit of the persona and the platforms posted to."""
    limits = [PLATFORM_LIMITS_CHARS[p] for p in platforms if p in PLATFORM_LIMITS_CHARS]
    return min([persona_max_chars, *limits])


def over_limits(text: str, platforms: Iterable[str]) -> list[str]:
    """Each platform whose limit ``text`` breaks, with its count ("x: 301 of 280"): for a text
    a person wrote, which no filter but the platforms' own applies to."""
    over = []
    for platform in dict.fromkeys(platforms):
        limit = PLATFORM_LIMITS_CHARS.get(platform)
        size = x_length(text) if platform == "x" else len(text)
        if limit is not None and size > limit:
            over.append(f"{platform}: {size} of {limit}")
    return over


def x_length(text: str) -> int:
    """How long X counts a post: a 140-character Japanese post is 280, X's whole limit; a link
    ("https://example.com/a", or "example.com") 23, whatever its length."""
    links = 0  # what the links count
    pieces: list[str] = []
    position = 0
    for match in _LINK.finditer(text):
        end = match.end()
        rest = match["rest"] or ""
        while rest and not _ends_link(rest):
            rest, end = rest[:-1], end - 1
        if not _is_link(match):
            continue
        pieces.append(text[position : match.start()])
        links += X_LINK_LENGTH
        position = end
    pieces.append(text[position:])
    plain = "".join(pieces)
    return links + len(plain) + len(_X_HEAVY.findall(plain))


def _is_link(match: re.Match[str]) -> bool:
    """Whether X links what ``_LINK`` matched: anything with a scheme, a bare domain only with a
    top-level domain X knows ("x.com" is a link, "Mr.Smith" two words)."""
    tld = match["tld"].lower()
    return match[0].lower().startswith(("http://", "https://")) or tld in X_KNOWN_TLDS or tld.startswith("xn--")


def _ends_link(rest: str) -> bool:
    """Whether a link's path or query may end where ``rest`` does: in a letter, digit or "/", or a
    ")" that closes a "(" of its own ("wiki/Pisa_(city)"), not the sentence's stop or bracket."""
    if rest[-1] == ")":
        return rest.count("(") >= rest.count(")")
    return _LINK_END.match(rest[-1]) is not None


def clean_text(raw: str) -> str:
    """Trim whitespace, leaked special tokens and wrapping quotes; one space between words."""
    text = LEAKED_MARKERS.sub(" ", raw)
    text = " ".join(text.split())
    if len(text) >= 2 and text[0] in "\"'“" and text[-1] in "\"'”" and text.count(text[0]) <= 2:
        text = text[1:-1].strip()
    return text


def is_degenerate(text: str) -> bool:
    """Whether the text loops: a word or short phrase repeated, or a character run."""
    if re.search(rf"(.)\1{{{REPEATED_CHAR_RUN - 1},}}", text):
        return True
    tokens = words(text)
    run = 1
    for previous, current in pairwise(tokens):
        # A character of Chinese or Japanese is no word: "哈哈哈" (ha ha ha) is one, as "hahaha" is.
        run = run + 1 if current == previous and not _UNSPACED_CHARACTER.fullmatch(current) else 1
        if run >= REPEATED_WORD_RUN:
            return True
    return len(tokens) >= 8 and distinct_n([text], 2) < MIN_DISTINCT_BIGRAMS


def is_near_repeat(text: str, others: Iterable[str]) -> bool:
    """Whether the text says nearly the same words as any of ``others``."""
    mine = words(text)
    for other in others:
        theirs = words(other)
        if mine == theirs or SequenceMatcher(None, mine, theirs, autojunk=False).ratio() >= NEAR_REPEAT_SIMILARITY:
            return True
    return False


def _blocked(text: str, blocklist: list[str]) -> bool:
    lowered = " ".join(words(text))
    return any(
        re.search(rf"(?<![\w']){re.escape(' '.join(words(term)))}(?![\w'])", lowered)
        for term in blocklist
        if words(term)
    )


def is_finished(text: str) -> bool:
    """Whether the text ends as a finished sentence: a full stop, "!" or "?" (then perhaps a
    closing quote or bracket), not an ellipsis that trails off, nor the stop of a title or an
    initial that a name should follow ("said Mr.", "by J.") or of "e.g."."""
    body = text.rstrip(CLOSERS)
    if not body or body[-1] not in SENTENCE_STOPS or body.endswith(ELLIPSES):
        return False
    return not (body.endswith(".") and _ends_in_abbreviation(body, may_end=False))


def _ends_in_abbreviation(body: str, *, may_end: bool) -> bool:
    """Whether the full stop ending ``body`` (closers stripped) belongs to an abbreviation or
    an initial ("said Mr.", "by J."): ``may_end`` counts those that may also end a sentence
    ("etc.", "U.S.", a lone lowercase letter) too."""
    word = (body[:-1].rsplit(maxsplit=1)[-1:] or [""])[0].lstrip(_OPENERS)
    if word.lower() in (ABBREVIATIONS if may_end else NEVER_FINAL_ABBREVIATIONS):
        return True
    if len(word) == 1 and word.isalpha():  # an initial; "I." is a word, "a." rarely ends a sentence
        return may_end or (word.isupper() and word != "I")
    return may_end and bool(_DOTTED_LETTERS.fullmatch(word))


def flaws(text: str) -> list[str]:
    """What makes a passing text look broken, which a clean candidate should win over:
    ``unfinished`` (no sentence end, an ellipsis trail, or a title's stop, "Mr.": see
    ``is_finished``) and ``open_quote`` (an odd number of straight double quotes, or
    unmatched curly ones: a model that garbles words often leaves a stray quote behind)."""
    found = [] if is_finished(text) else ["unfinished"]
    if text.count('"') % 2 or text.count("“") != text.count("”"):
        found.append("open_quote")
    return found


def score(text: str) -> float:
    """How good a passing candidate looks: length in the sweet spot, varied, finished."""
    low, high = SWEET_SPOT_CHARS
    size = len(text)
    if size < low:
        length = size / low
    elif size > high:
        length = max(0.0, 1.0 - (size - high) / high)
    else:
        length = 1.0
    variety = distinct_n([text], 1) if words(text) else 0.0
    finished = 1.0 if is_finished(text) else 0.0
    capital = 0.25 if text[:1].isupper() else 0.0
    return round(length + variety + finished + capital, 4)


def trim_to_sentence(text: str, min_chars: int = 1) -> str:
    """A cut-off text up to its last finished sentence, or "" if none is worth keeping (at
    least ``min_chars`` and ``SALVAGE_MIN_SHARE`` of the text; an abbreviation's stop is no end)."""
    if is_finished(text):  # stopped right after a sentence: nothing was cut mid-thought
        return text
    floor = max(min_chars, 1, len(text) * SALVAGE_MIN_SHARE)
    for end in reversed([m.end() for m in _SENTENCE_END.finditer(text)]):
        kept = text[:end]
        if len(kept) < floor:
            return ""
        body = kept.rstrip(CLOSERS)
        if is_finished(kept) and not (body.endswith(".") and _ends_in_abbreviation(body, may_end=True)):
            return kept
    return ""


def curate(
    raws: Sequence[str | Draft],
    *,
    max_chars: int,
    min_chars: int = 1,
    blocklist: list[str] | None = None,
    recent: list[str] | None = None,
    corpus: CopyIndex | None = None,
    platforms: Iterable[str] = (),
) -> Curated:
    """Filter the candidates, score the survivors, and pick the best one. Posting to X
    (``platforms``), a candidate must also fit X's own count (``x_length``). A plain string
    is a text the model finished; a ``Draft`` says whether it was cut off (and is trimmed
    back to its last finished sentence, if one is worth keeping)."""
    x_limit = X_LIMIT_CHARS if "x" in set(platforms) else None
    recent = list(recent or [])
    accepted: list[str] = []
    candidates: list[Candidate] = []
    for index, raw in enumerate(raws):
        draft = raw if isinstance(raw, Draft) else Draft(raw)
        candidate = Candidate(index=index, raw=draft.text, text=clean_text(draft.text))
        if candidate.text and draft.finish_reason == "length":
            kept = trim_to_sentence(candidate.text, min_chars)
            if kept:
                candidate.text, candidate.trimmed = kept, candidate.text[len(kept):].strip()
            else:  # shown whole, so a person sees where it stopped
                candidate.rejected = "cut_off"
        if candidate.rejected is None:
            candidate.rejected = _first_failure(
                candidate.text, max_chars, min_chars, blocklist or [], corpus, recent + accepted, x_limit
            )
        if candidate.rejected is None:
            candidate.score = score(candidate.text)
            candidate.flaws = flaws(candidate.text)
            accepted.append(candidate.text)
        candidates.append(candidate)
    curated = Curated(candidates=candidates, rejected=dict(Counter(c.rejected for c in candidates if c.rejected)))
    passed = curated.passed
    curated.best = passed[0] if passed else None
    return curated


def _first_failure(
    text: str, max_chars: int, min_chars: int, blocklist: list[str], corpus: CopyIndex | None, seen: list[str],
    x_limit: int | None = None,
) -> str | None:
    if not text:
        return "empty"
    if len(text) < min_chars:
        return "too_short"
    if len(text) > max_chars or (x_limit is not None and x_length(text) > x_limit):
        return "too_long"
    if _blocked(text, blocklist):
        return "blocklist"
    if is_degenerate(text):
        return "degenerate"
    if corpus is not None and corpus.copies(text):
        return "copied"
    if is_near_repeat(text, seen):
        return "near_repeat"
    return None


def load_corpus(path: Path, max_copied_words: int) -> CopyIndex:
    """The copy index of a corpus (JSONL of ``{"text": ...}``, or plain text, one per line)."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as exc:
        raise CorpusError(f"cannot read the corpus {path}: {exc.strerror}; fix filters.corpus in the persona file") from exc
    except UnicodeDecodeError as exc:  # a text saved as Windows-1252 or Latin-1, say
        raise CorpusError(
            f"the corpus {path} is not UTF-8 (byte {exc.start}: {exc.object[exc.start:exc.start + 1]!r}); "
            f"`persona corpus build {path} -o corpus.jsonl` reads it, then point filters.corpus at corpus.jsonl"
        ) from exc
    documents: list[str] = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        if path.suffix != ".jsonl":
            documents.append(line)
            continue
        try:
            documents.append(str(json.loads(line)["text"]))
        except (ValueError, KeyError, TypeError) as exc:
            raise CorpusError(f"{path}:{number}: not a {{\"text\": ...}} line ({exc}); rebuild it with `persona corpus build`") from exc
    # A run one word longer than allowed is the shortest one that breaks the rule.
    return CopyIndex(documents, n=max_copied_words + 1)
