"""The typed contract between the queue's users (adapters, CLI, scheduler) and workers.

These pydantic models are the only thing the two sides share. A request travels as
JSON in one Redis Stream field; a reply travels as JSON in a per-request list.
"""

from __future__ import annotations

import difflib
import json
import re
import time
import uuid
from enum import StrEnum
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

__all__ = [
    "CONTRACT_VERSION",
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


# The version of this contract a request speaks (``GenerationRequest.version``; one without
# speaks the reader's own). Raised when a change means an older worker would misread a
# request: it then refuses the request, saying to upgrade, rather than serve half of it.
CONTRACT_VERSION = 1
# How many unknown fields a refusal names, and how much of each it quotes.
MAX_UNKNOWN_NAMED = 5
MAX_NAME_CHARS = 40


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


def _id_required(schema: dict[str, Any]) -> None:
    """The schema a client sees: ``id`` required, as on the wire."""
    schema["required"] = ["id", *(name for name in schema.get("required", []) if name != "id")]


class GenerationRequest(BaseModel):
    """Ask a persona for one piece of text.

    ``mode="chat"`` answers the last user message of ``messages`` in the persona's
    voice. ``mode="complete"`` continues ``prefix`` (or starts from nothing) as the
    author would write: posts, samples for curation, evaluation.
    """

    # Unknown fields are refused: "temperature" at the top level (it belongs in sampling)
    # used to be dropped without a word, and the persona's own temperature served.
    model_config = ConfigDict(extra="forbid", json_schema_extra=_id_required)

    # Required on the wire (``from_wire``: the caller waits on the list named after it);
    # Python code may leave it to the default.
    id: str = Field(default_factory=new_request_id, min_length=1, max_length=128,
                    description="the caller's own, unique for a day: the reply goes to the list persona:reply:{id}")
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
    deadline: float = Field(
        0.0, description="a Unix time in seconds, by the caller's clock; 0 means the queue's default after its arrival"
    )
    version: int = Field(
        CONTRACT_VERSION, ge=1, le=CONTRACT_VERSION,
        description="the contract version it speaks (CONTRACT_VERSION); left out, the worker's own",
    )

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
        """Read a request's JSON; raises ValueError (ValidationError) saying what is wrong.

        JSON that only pydantic's parser refuses is read as Python's json reads it: a lone
        surrogate escape ("\\ud83c", what JSON.stringify and json.dumps write for half an
        emoji) was refused "Invalid JSON", though the model turns it into U+FFFD.
        """
        try:
            return cls.model_validate_json(data)
        except ValidationError as exc:
            if not _not_json(exc):
                raise
            return cls.model_validate(_loaded(data, exc))

    @classmethod
    def from_wire(cls, data: str | bytes) -> GenerationRequest:
        """Read a request as a worker reads it off the queue (``from_json``), and refuse with
        ValueError, saying why, one without an ``id`` (its reply would go to a list nobody
        reads), one of a newer contract than this one, and fields this contract does not have
        (naming them, and the field each may have meant)."""
        try:
            request = cls.model_validate_json(data)
        except ValidationError as exc:
            fields = _loaded(data, exc)
            if isinstance(fields, dict):
                _check_fields(fields)
            if not _not_json(exc):
                raise
            request = cls.model_validate(fields)
        if "id" not in request.model_fields_set:
            raise ValueError(
                'malformed request: it has no id: give each request an "id" of its own (1 to 128 characters, '
                "not used again for a day); its reply is pushed to the list persona:reply:ID"
            )
        return request


def _not_json(exc: ValidationError) -> bool:
    """Whether pydantic refused the payload as JSON (not a field in it)."""
    return any(error["type"] == "json_invalid" for error in exc.errors())


def _loaded(data: str | bytes, exc: ValidationError) -> Any:
    """The payload as Python's json reads it, every lone surrogate in it U+FFFD (one in an id
    or a user could not be written to Redis); ``exc`` (pydantic's words) where it cannot."""
    try:
        return _mended(json.loads(data))
    except (ValueError, RecursionError):  # not UTF-8, not JSON, nested too deep
        raise exc from None


def _mended(value: Any) -> Any:
    """``value`` with every lone surrogate in its strings replaced by U+FFFD."""
    if isinstance(value, str):
        return _LONE_SURROGATE.sub("\ufffd", value)
    if isinstance(value, list):
        return [_mended(item) for item in value]
    if isinstance(value, dict):
        return {_mended(key): _mended(item) for key, item in value.items()}
    return value


def _check_fields(fields: dict[str, Any]) -> None:
    """Raise ValueError for a request of a newer contract, or with fields this one lacks."""
    version = fields.get("version")
    if isinstance(version, int | float) and not isinstance(version, bool) and version > CONTRACT_VERSION:
        raise ValueError(
            f"the request speaks contract version {str(version)[:MAX_NAME_CHARS]}: this worker speaks contract version "
            f"{CONTRACT_VERSION}; upgrade it"
        )
    unknown = sorted(name for name in fields if name not in GenerationRequest.model_fields)
    if not unknown:
        return
    named = ", ".join(_unknown(name) for name in unknown[:MAX_UNKNOWN_NAMED])
    more = f" (and {len(unknown) - MAX_UNKNOWN_NAMED} more)" if len(unknown) > MAX_UNKNOWN_NAMED else ""
    raise ValueError(
        f"malformed request: unknown field{'s' if len(unknown) > 1 else ''} {named}{more}; a request of contract "
        f"version {CONTRACT_VERSION} has only {', '.join(GenerationRequest.model_fields)} (docs/wire-protocol.md)"
    )


def _unknown(name: str) -> str:
    """An unknown field's name, quoted, with the field it may have meant."""
    known = {f: f for f in GenerationRequest.model_fields} | {f: f"sampling.{f}" for f in SamplingOverrides.model_fields}
    close = difflib.get_close_matches(name.lower()[:MAX_NAME_CHARS], known, n=1, cutoff=0.6)
    quoted = repr(name[:MAX_NAME_CHARS] + ("…" if len(name) > MAX_NAME_CHARS else ""))
    return quoted + (f" (did you mean {known[close[0]]!r}?)" if close else "")


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
