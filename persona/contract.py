"""The typed contract between the queue's users (adapters, CLI, scheduler) and workers.

These pydantic models are the only thing the two sides share. A request travels as
JSON in one Redis Stream field; a reply travels as JSON in a per-request list.
"""

from __future__ import annotations

import re
import time
import uuid
from enum import StrEnum
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

__all__ = [
    "ErrorInfo",
    "ErrorKind",
    "GenerationReply",
    "GenerationRequest",
    "Message",
    "Priority",
    "SamplingOverrides",
    "Timings",
    "new_request_id",
]

# Characters a person cannot type on purpose; they only confuse tokenizers and logs. C1 too
# (U+0080-U+009F): U+009B is a terminal's CSI, as ESC [ is, and was kept while ESC was not.
_CONTROL_CHARS = {c for c in range(32) if c not in (9, 10, 13)} | {127} | set(range(0x80, 0xA0))
_CONTROL_TABLE = dict.fromkeys(_CONTROL_CHARS)


# Half of a UTF-16 pair (an emoji a client cut in two): no UTF-8 can carry it, so the
# request could be checked but never queued. It becomes U+FFFD, as a decoder would write.
_LONE_SURROGATE = re.compile("[\ud800-\udfff]")


def _without_controls(value: str) -> str:
    # Most texts are printable through and through, which is far quicker to check than to translate.
    if value.isprintable():
        return value
    return _LONE_SURROGATE.sub("\ufffd", value.translate(_CONTROL_TABLE))


def new_request_id() -> str:
    """A fresh, unique request id."""
    return uuid.uuid4().hex


class Priority(StrEnum):
    """Which stream a request waits in. Interactive is always served first."""

    interactive = "interactive"
    batch = "batch"


class ErrorKind(StrEnum):
    """Why a request was not answered with text."""

    invalid = "invalid"  # the request itself is wrong (unknown persona, too long...)
    timeout = "timeout"  # its deadline passed before it was generated
    cancelled = "cancelled"  # its caller withdrew it
    model = "model"  # the model or checkpoint failed
    dead_letter = "dead_letter"  # it failed too many deliveries
    internal = "internal"  # anything else; the worker logged the traceback


class Message(BaseModel):
    """One turn of a conversation."""

    model_config = ConfigDict(frozen=True)

    role: Literal["system", "user", "assistant"]
    content: str

    @field_validator("content")
    @classmethod
    def _strip_control_characters(cls, value: str) -> str:
        return _without_controls(value)


# Seeds run from 0 to the largest signed 64-bit integer (which any client's JSON and a
# torch generator take); one outside is refused with the request, not when its batch
# is being decoded.
MAX_SEED = 2**63 - 1
# The longest reply one request may ask for.
MAX_NEW_TOKENS = 4096
# A stop string ends the reply where it appears (and is cut off); empty would end every
# reply at its first token.
StopString = Annotated[str, Field(min_length=1, max_length=200)]
# Who asked ("telegram:123456789", "discord:<snowflake>": under 30 characters) and what
# sent it ("discord", "scheduler"). ``user`` names a Redis key (its fair share), so a
# longer one is refused with the request (``validation.check_request``), not stored.
MAX_USER_CHARS = 128
MAX_SOURCE_CHARS = 128


class SamplingOverrides(BaseModel):
    """Per-request changes to the persona's sampling defaults; unset means the default."""

    model_config = ConfigDict(extra="forbid")

    temperature: float | None = Field(None, ge=0.0, le=5.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    top_k: int | None = Field(None, ge=0)
    max_new_tokens: int | None = Field(None, ge=1, le=MAX_NEW_TOKENS)
    repetition_penalty: float | None = Field(None, ge=0.5, le=3.0)
    stop: list[StopString] | None = Field(None, max_length=16)
    seed: int | None = Field(None, ge=0, le=MAX_SEED)


class GenerationRequest(BaseModel):
    """Ask a persona for one piece of text.

    ``mode="chat"`` answers the last user message of ``messages`` in the persona's
    voice. ``mode="complete"`` continues ``prefix`` (or starts from nothing) as the
    author would write: posts, samples for curation, evaluation.
    """

    model_config = ConfigDict(extra="ignore")

    id: str = Field(default_factory=new_request_id, min_length=1, max_length=128)
    persona: str = Field(min_length=1, max_length=128)
    mode: Literal["chat", "complete"] = "chat"
    messages: list[Message] = Field(default_factory=list)
    prefix: str = ""
    # Factories, not shared instances: pydantic deep-copies a model default for every request.
    sampling: SamplingOverrides = Field(default_factory=SamplingOverrides)
    priority: Priority = Priority.interactive
    user: str | None = Field(None, description=f"who asked, for fairness and rate limits (at most {MAX_USER_CHARS} characters)")
    source: str = Field("cli", description=f"what sent it: cli, discord, scheduler... (at most {MAX_SOURCE_CHARS} characters)")
    created_at: float = Field(default_factory=time.time)
    deadline: float = Field(0.0, description="epoch seconds; 0 means the queue's default")

    @field_validator("prefix")
    @classmethod
    def _strip_prefix_controls(cls, value: str) -> str:
        return _without_controls(value)

    def expired(self, now: float | None = None) -> bool:
        """Whether the deadline has passed."""
        return bool(self.deadline) and (now if now is not None else time.time()) > self.deadline

    def to_json(self) -> str:
        return self.model_dump_json(exclude_defaults=False)

    @classmethod
    def from_json(cls, data: str | bytes) -> GenerationRequest:
        return cls.model_validate_json(data)


class ErrorInfo(BaseModel):
    """What went wrong, in words a user can act on."""

    kind: ErrorKind
    message: str


class Timings(BaseModel):
    """Where the time went, in milliseconds.

    ``queue_ms`` runs from when Redis queued the request to when a worker took it, both by
    Redis's clock (a caller's or a worker's own clock that is off changes nothing).
    Workers measure it on failures too (a request that timed out waiting says how long it
    waited) and set ``queue_measured`` whenever they do. A failure without it says nothing
    about its wait: no worker could read the request (a malformed entry), it was set aside
    (a dead letter), or an older worker answered it (they measured text replies only).
    """

    queue_ms: float = 0.0
    generate_ms: float = 0.0
    queue_measured: bool = False


class GenerationReply(BaseModel):
    """The answer to one request: text, or an error saying why not."""

    id: str
    ok: bool
    text: str = ""
    error: ErrorInfo | None = None
    persona: str = ""
    version: str = Field("", description="the persona checkpoint version that produced it")
    worker: str = ""
    # "length": cut off by max_new_tokens; a chat reply's text is then ended at its last
    # finished sentence or whole word and "…" (``persona.endings``), a completion's is raw.
    finish_reason: Literal["stop", "length", "error"] = "stop"
    new_tokens: int = 0  # every token generated, a trimmed chat reply's dropped ones too
    timings: Timings = Field(default_factory=Timings)
    # How many characters of the newest message the model read, where the worker had to cut
    # its start to fit the model's context (CJK text takes about two tokens a character);
    # None where it read all of it, and from workers older than this field.
    message_chars: int | None = None

    @classmethod
    def failure(
        cls,
        request_id: str,
        kind: ErrorKind,
        message: str,
        *,
        persona: str = "",
        worker: str = "",
        queue_ms: float | None = None,
    ) -> GenerationReply:
        """An error reply for a request that could not be answered with text (``queue_ms``:
        how long it waited for the worker that took it, where that is known)."""
        return cls(
            id=request_id,
            ok=False,
            error=ErrorInfo(kind=kind, message=message),
            persona=persona,
            worker=worker,
            finish_reason="error",
            timings=Timings() if queue_ms is None else Timings(queue_ms=queue_ms, queue_measured=True),
        )

    @property
    def queue_wait_ms(self) -> float | None:
        """How long it waited for a worker, in ms; None where that was not measured (see ``Timings``)."""
        timings = self.timings
        return timings.queue_ms if self.ok or timings.queue_measured else None

    def to_json(self) -> str:
        return self.model_dump_json()

    @classmethod
    def from_json(cls, data: str | bytes) -> GenerationReply:
        return cls.model_validate_json(data)
