"""Tweets out of a Twitter/X archive (``data/tweets.js`` or a plain ``tweets.json``).

The archive's ``tweets.js`` is JavaScript: ``window.YTD.tweets.part0 = [...]``; each
item is ``{"tweet": {...}}``. Retweets and replies are dropped unless asked for, links
(always ``t.co`` wrappers) are removed, and HTML entities are decoded.
"""

from __future__ import annotations

import html
import json
import re
from pathlib import Path

from training.sources import RawDocument, ReadOptions, SourceProblem

__all__ = ["parse_archive", "read_tweets"]

_LINK = re.compile(r"https?://\S+")


def parse_archive(path: Path, text: str) -> list[dict]:
    """The tweet objects in an archive file's text."""
    body = text.lstrip("\ufeff")
    start = body.find("=") + 1 if body.lstrip().startswith("window.") else 0
    prefix_lines = body[:start].count("\n")
    try:
        items = json.loads(body[start:].strip().rstrip(";"))
    except json.JSONDecodeError as exc:
        raise SourceProblem(path, exc.lineno + prefix_lines, f"not a tweet archive: {exc.msg}") from exc
    if isinstance(items, dict):
        items = items.get("tweets", items.get("data", [items]))
    if not isinstance(items, list):
        raise SourceProblem(path, 1, "not a tweet archive: expected a list of tweets")
    tweets = []
    for item in items:
        tweet = item.get("tweet", item) if isinstance(item, dict) else None
        if isinstance(tweet, dict):
            tweets.append(tweet)
    return tweets


def _is_retweet(tweet: dict, text: str) -> bool:
    return text.startswith("RT @") or "retweeted_status" in tweet or bool(tweet.get("retweeted"))


def _is_reply(tweet: dict) -> bool:
    return any(tweet.get(key) for key in ("in_reply_to_status_id_str", "in_reply_to_status_id",
                                          "in_reply_to_user_id_str", "in_reply_to_user_id"))


def read_tweets(path: Path, options: ReadOptions) -> list[RawDocument]:
    """One document per tweet the author wrote themselves."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise SourceProblem(path, None, f"cannot read: {exc}") from exc
    documents = []
    for number, tweet in enumerate(parse_archive(path, text), start=1):
        body = tweet.get("full_text", tweet.get("text"))
        if not isinstance(body, str):
            continue
        body = html.unescape(body)
        if _is_retweet(tweet, body) and not options.keep_retweets:
            continue
        if _is_reply(tweet) and not options.keep_replies:
            continue
        body = _LINK.sub("", body).strip()
        if body:
            documents.append(RawDocument(body, str(path), number))
    return documents
