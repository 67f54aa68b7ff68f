"""Checks a request must pass before it is queued or generated."""

from __future__ import annotations

from persona.contract import GenerationRequest
from persona.errors import InvalidRequest
from persona.settings import QueueSettings

__all__ = ["check_request", "request_problem"]


def request_problem(request: GenerationRequest, limits: QueueSettings) -> str | None:
    """What is wrong with a request, in words for its sender; None if nothing."""
    if request.mode == "chat":
        if not request.messages or request.messages[-1].role != "user":
            return "a chat request must end with the user's message"
        if not request.messages[-1].content.strip():
            return "the message is empty; say something"
    if len(request.messages) > limits.max_messages:
        return f"the conversation has {len(request.messages)} turns; at most {limits.max_messages} are accepted"
    for message in request.messages:
        if len(message.content) > limits.max_message_chars:
            return (
                f"a message is {len(message.content)} characters long; "
                f"at most {limits.max_message_chars} are accepted"
            )
    if len(request.prefix) > limits.max_message_chars:
        return f"the prefix is {len(request.prefix)} characters long; at most {limits.max_message_chars} are accepted"
    return None


def check_request(request: GenerationRequest, limits: QueueSettings) -> None:
    """Raise InvalidRequest if the request breaks the limits."""
    problem = request_problem(request, limits)
    if problem:
        raise InvalidRequest(problem)
