"""Checks a request must pass before it is queued or generated."""

from __future__ import annotations

import unicodedata
from typing import TYPE_CHECKING

from persona.contract import MAX_SOURCE_CHARS, MAX_USER_CHARS, GenerationRequest
from persona.errors import InvalidRequest

if TYPE_CHECKING:  # persona.settings takes LATEST_DEADLINE_AFTER_S from here
    from persona.settings import QueueSettings

__all__ = ["LATEST_DEADLINE_AFTER_S", "check_request", "has_visible_text", "request_problem"]


def request_problem(request: GenerationRequest, limits: QueueSettings) -> str | None:
    """What is wrong with a request, in words for its sender; None if nothing."""
    if request.mode == "chat":
        if not request.messages or request.messages[-1].role != "user":
            return "a chat request must end with the user's message"
        if not has_visible_text(request.messages[-1].content):
            return "the message is empty; say something"
    if any(message.role == "system" for message in request.messages):
        # It was dropped without a word: the persona answered as if it had not been sent.
        return (
            "a request cannot carry a system message: a persona's system prompt is prompt.system "
            "in its file (`persona personas show NAME`); send the conversation as user and assistant turns"
        )
    if len(request.messages) > limits.max_messages:
        return (
            f"the conversation has {len(request.messages)} turns; at most {limits.max_messages} are accepted: "
            f"send only the latest {limits.max_messages}, or {_raise('MAX_MESSAGES')}"
        )
    for message in request.messages:
        if len(message.content) > limits.max_message_chars:
            return (
                f"a message is {len(message.content):,} characters long; at most {limits.max_message_chars:,} "
                f"are accepted: shorten it or send it in parts, or {_raise('MAX_MESSAGE_CHARS')}"
            )
    if len(request.prefix) > limits.max_message_chars:
        return (
            f"the prefix is {len(request.prefix):,} characters long; at most {limits.max_message_chars:,} "
            f"are accepted: shorten it, or {_raise('MAX_MESSAGE_CHARS')}"
        )
    # The user names a Redis key (its count of requests waiting): a megabyte one was stored as one.
    if request.user and len(request.user) > MAX_USER_CHARS:
        return (
            f"the user is {len(request.user):,} characters long; at most {MAX_USER_CHARS} are accepted: "
            "send an id for who asked (\"telegram:123456789\"), not their name or message"
        )
    if len(request.source) > MAX_SOURCE_CHARS:
        return (
            f"the source is {len(request.source):,} characters long; at most {MAX_SOURCE_CHARS} are accepted: "
            "name what sent the request (\"discord\", \"scheduler\")"
        )
    return _deadline_problem(request, limits)


# What shows nothing on its own: format characters (zero-width space and joiner, direction
# marks and overrides, the byte-order mark) and controls. Whitespace is told by isspace().
_INVISIBLE_CATEGORIES = frozenset({"Cf", "Cc"})


def has_visible_text(text: str) -> bool:
    """Whether ``text`` shows anything: a message of zero-width spaces, or of a lone
    right-to-left override, was answered as if something had been said. Only the question
    is asked: a joiner inside an emoji, or a direction mark inside words, stays as sent."""
    return any(not char.isspace() and unicodedata.category(char) not in _INVISIBLE_CATEGORIES for char in text)


def _raise(setting: str) -> str:
    """How to raise a queue limit: the same for the whole service, as the workers check it too."""
    return f"raise the limit with PERSONA_QUEUE__{setting} (set it alike for the workers and every client)"


# A deadline is a time (epoch seconds); one before this was meant as a duration ("30").
EARLIEST_DEADLINE = 1_000_000_000.0  # September 2001
# The furthest a deadline may lie after the request was made: a day (inf crashed the queue's
# submit script; `ask`/`generate --timeout` take at most this too).
LATEST_DEADLINE_AFTER_S = 24 * 3600.0


def check_request(request: GenerationRequest, limits: QueueSettings) -> None:
    """Raise InvalidRequest if the request breaks the limits (``request_problem``)."""
    problem = request_problem(request, limits)
    if problem:
        raise InvalidRequest(problem)


def _deadline_problem(request: GenerationRequest, limits: QueueSettings) -> str | None:
    """What is wrong with a request's deadline: not a time, or further off than a day; None if nothing.

    Checked by the worker too: a writer that goes straight to Redis sent "deadline": 30,
    queued, and it was answered at once with "waited past its deadline; please ask again",
    and asking again did the same. (A deadline that has only just passed still goes: its
    worker answers it with a timeout, as it would a moment later.)
    """
    if not request.deadline:
        return None
    if request.deadline < EARLIEST_DEADLINE:
        after = f"{request.deadline:g}" if request.deadline >= 1 else "30"
        return (
            f"the deadline {request.deadline:g} is not a time: it is in epoch seconds "
            f"(time.time() + {after} for {after} s from now), the Unix time in seconds when the request "
            f"is no longer wanted, or 0 for the queue's default ({limits.default_deadline_s:g} s)"
        )
    if not request.deadline - request.created_at <= LATEST_DEADLINE_AFTER_S:  # inf, nan too
        return (
            f"the deadline {request.deadline:g} is more than {LATEST_DEADLINE_AFTER_S:g} s after the request was made; "
            f"give one within a day, as a Unix time in seconds, or 0 for the queue's default "
            f"({limits.default_deadline_s:g} s)"
        )
    return None
