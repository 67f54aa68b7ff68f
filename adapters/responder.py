"""What every chat adapter does with a message, whatever the platform.

An adapter translates a platform event into a ``Where`` (which chat, which user) and
text, and sends back the text this returns. Here: the rate limits, the conversation
(from Redis, or a history the platform supplies, such as Discord's reply chain), the
round trip through the queue, ``/retry`` (of the last answer, or of a question that got
none: it timed out, the queue was full), ``/reset``, ``/cancel`` and the per-chat
persona, which moves with its conversations when a chat changes id (``move_chat``); a chat whose
persona is no longer offered on the platform (its file edited while the bot runs) is told so,
and which ones are, rather than answered as it. An
answer can also be kept under a name of the adapter's choosing (``keep_as``, ``kept``),
for an answer that cannot quote its question. A conversation's messages are answered one
at a time, in the order they came, when the adapter takes each one's turn (``in_turn``)
before it awaits anything; each counts against the rate limits as it arrives, not when its
turn comes (``admitted_turn``), so a flood hears at once that it is over them. Every failure
becomes a polite sentence ("busy" for a client out of connections, not "restarting"); nothing
here raises to the adapter for a queue or Redis problem. When the adapter stops (``stop``),
the questions still waiting are withdrawn from the queue and answered with a sentence saying so. When no
worker is running, the asker hears so within seconds (through the adapter's ``notify``)
rather than watching "typing…" for minutes, and the question keeps waiting for one; if
none starts in time, the answer says that no worker ran, not that thinking took too long.
A worker still loading its models is not "none running": the asker hears that the persona
is waking up.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import secrets
import weakref
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass

import redis.asyncio

from adapters.conversation import ConversationStore, build_request
from adapters.ratelimit import RateDecision, RateLimiter, rate_limited_text
from persona import constants as keys
from persona.connection import connect_async
from persona.contract import ErrorKind, GenerationReply, GenerationRequest, Message
from persona.errors import (
    ConfigError,
    InvalidRequest,
    QueueBusy,
    QueueError,
    RedisUnavailable,
    ReplyTimeout,
    UnknownPersona,
)
from persona.heartbeat import LIVE_SCRIPT
from persona.personas import PersonaRegistry
from persona.queue import AsyncQueueClient
from persona.settings import ChatAdapterSettings, Settings

__all__ = ["Deliver", "Responder", "Where", "check_default_persona", "connect_with_backoff", "persona_words"]

log = logging.getLogger(__name__)

BUSY_TEXT = "I'm answering a lot of people right now. Please try again in a moment."
TIMEOUT_TEXT = "I couldn't finish my thought in time, sorry. Please try again, or use /retry."
UNREACHABLE_TEXT = "I can't reach my thoughts right now (the service is restarting). Please try again shortly."
FAILED_TEXT = "Something went wrong on my side while answering. Please try again."
CANCELLED_TEXT = "Cancelled."
EMPTY_REPLY_TEXT = "(…) I had nothing to say to that. Try /retry for another attempt."
NOTHING_TO_RETRY_TEXT = "There is nothing to retry yet: send me a message first."
NOTHING_TO_CANCEL_TEXT = "Nothing to cancel: I'm not working on anything for you."
RESET_TEXT = "Done: I've forgotten our conversation. Let's start afresh."
RESTARTING_TEXT = "I'm restarting, so I had to drop your message. Please send it again in a minute."
BARE_MENTION_TEXT = "Yes? Write your question in the same message as the mention, or reply to one of my messages."
NO_WORKER_TEXT = (
    "Your message is waiting: none of my workers is running right now, so nobody can write my "
    "answer yet. I'll answer as soon as one starts."
)
NO_WORKER_TIMEOUT_TEXT = (
    "Sorry, I couldn't answer: none of my workers is running. Please send your message again later."
)
# A worker is loading its models (seconds on a CPU, minutes of warm-up on a GPU): "none of my
# workers is running" was not true then, and sent people away from an answer on its way.
STARTING_TEXT = (
    "Your message is waiting: I'm just waking up (loading my model), so this answer takes a little "
    "longer. I'll answer as soon as I'm ready."
)
STARTING_TIMEOUT_TEXT = (
    "Sorry, I couldn't answer in time: I'm still waking up (loading my model). Please send your message "
    "again in a minute."
)
# The chat's persona (chosen, or the default) was withdrawn from the platform while the bot ran.
WITHDRAWN_TEXT = "I can't answer as {name}: it is not offered here any more."
NONE_OFFERED_TEXT = "No persona is offered here right now; please try again later."
LONG_MESSAGE_NOTE = "\n\n(Your message was long, so I read only its last {chars} characters.)"
# What the bot says that the persona did not: notices, refusals and apologies. A conversation
# rebuilt from what was said (Discord's reply chain) leaves them out, as the store never saves
# them: a reply to "none of my workers is running" read that notice as the persona's own words.
NOTICE_TEXTS = frozenset({
    BUSY_TEXT, TIMEOUT_TEXT, UNREACHABLE_TEXT, FAILED_TEXT, CANCELLED_TEXT, EMPTY_REPLY_TEXT,
    NOTHING_TO_RETRY_TEXT, NOTHING_TO_CANCEL_TEXT, RESET_TEXT, RESTARTING_TEXT, BARE_MENTION_TEXT,
    NO_WORKER_TEXT, NO_WORKER_TIMEOUT_TEXT, STARTING_TEXT, STARTING_TIMEOUT_TEXT,
})
# (Not "I can't answer that: ...", which the persona may well say too.)
RATE_LIMITED_PATTERN = re.compile(re.escape(rate_limited_text(0)).replace("0", r"\d+"))
WITHDRAWN_PATTERN = re.compile(
    re.escape(WITHDRAWN_TEXT).replace(re.escape("{name}"), "'[^']*'") + r" (Available: .*|" + re.escape(NONE_OFFERED_TEXT) + ")"
)
LONG_MESSAGE_NOTE_PATTERN = re.compile(
    r"\s*" + re.escape(LONG_MESSAGE_NOTE.strip()).replace(re.escape("{chars}"), r"\d+") + r"\s*$"
)
# Failed replies whose question is not kept for /retry: one withdrawn by its asker, or one
# that would be refused again.
NOT_RETRIED = frozenset({ErrorKind.cancelled, ErrorKind.invalid})
# Not only an outage: a Redis that refuses writes (OOM when full, READONLY after a
# failover, MISCONF on a full disk) must also get the user a polite answer.
REDIS_ERRORS = (QueueError, redis.exceptions.RedisError)
# Redis errors the asker hears as "busy", not "restarting": Redis is full, or this bot's client has
# every connection it may open in use (MaxConnectionsError), each by a question waiting.
BUSY_ERRORS = (redis.exceptions.OutOfMemoryError, redis.exceptions.MaxConnectionsError)
MAX_CONNECT_PAUSE_S = 30.0
# How long a question waits before its asker hears that no worker is running (at most a
# quarter of the reply timeout). A worker that stopped still counts as live for up to its
# heartbeat TTL, so a restart in progress goes unmentioned.
NO_WORKER_NOTICE_S = 5.0
MAX_REMEMBERED_MOVES = 1000  # chats moved (Telegram groups upgraded: rare) that answers still follow
# How long a chat's /persona choice outlives its last answer (or the conversation's TTL, if that is
# longer): each answer renews it, so a chat that is heard from keeps its choice, and one gone
# quiet is forgotten (it gets the default persona again) instead of kept in Redis for good.
CHAT_PERSONA_TTL_S = 90 * 24 * 3600

Notify = Callable[[str], Awaitable[object]]
# How an adapter sends what ``answer`` or ``retry`` says: whether all of it went out.
Deliver = Callable[[str], Awaitable[bool]]


async def connect_with_backoff(settings: Settings) -> redis.asyncio.Redis:
    """Connect to the queue's Redis, waiting (with a growing pause) until it answers."""
    pause = 0.5
    while True:
        try:
            return await connect_async(settings)
        except RedisUnavailable as exc:
            log.warning("%s; trying again in %.0f s", exc, pause)
            await asyncio.sleep(pause)
            pause = min(MAX_CONNECT_PAUSE_S, pause * 2)


def check_default_persona(settings: Settings, platform: str) -> None:
    """Refuse to start an adapter whose persona (``PERSONA_<PLATFORM>__PERSONA``) is not there, or
    not enabled on the platform: it started, and then every question got the worker's refusal."""
    setting = f"PERSONA_{platform.upper()}__PERSONA"
    name = getattr(settings, platform).persona
    try:
        persona = PersonaRegistry.from_settings(settings).get(name)
    except ConfigError as exc:
        raise ConfigError(f"{setting} names {name!r}, which cannot be served: {exc} Fix the setting") from None
    if platform not in persona.adapters:
        raise ConfigError(
            f"{setting} names {name!r}, whose adapters list has no {platform!r} (it lists "
            f"{', '.join(persona.adapters) or 'none'}): add it there, or name another persona"
        )


def _sentence(text: str) -> str:
    """``text`` ending as a sentence does: a full stop added unless it ends with one already ("?.")."""
    text = text.rstrip()
    return text if text.endswith((".", "?", "!", "…")) else text + "."


def _cut_note(message: str, request: GenerationRequest, reply: GenerationReply) -> str:
    """The note that only the end of ``message`` was read, or '' where all of it was. What
    was read is what the request kept of it (cut to the bot's budget, in characters) or,
    where the worker cut it further to fit the model's context (in tokens: a CJK
    character takes about two), what the worker says it kept."""
    sent = len(request.messages[-1].content)
    read = sent if reply.message_chars is None else min(sent, reply.message_chars)
    return LONG_MESSAGE_NOTE.format(chars=read) if read < len(message) else ""


def persona_words(text: str) -> str:
    """What the persona said in a message the bot sent: '' for a notice (``NOTICE_TEXTS``), and an
    answer without the note that only the end of a long question was read."""
    text = text.strip()
    if text in NOTICE_TEXTS or RATE_LIMITED_PATTERN.fullmatch(text) or WITHDRAWN_PATTERN.fullmatch(text):
        return ""
    return LONG_MESSAGE_NOTE_PATTERN.sub("", text)


@dataclass(frozen=True)
class Where:
    """One conversation: a chat (or channel) and a user in it."""

    chat: str
    user: str

    @property
    def scope(self) -> str:
        return f"{self.chat}:{self.user}"


class Responder:
    """The platform-neutral heart of a chat adapter."""

    def __init__(self, client: redis.asyncio.Redis, settings: Settings, platform: str) -> None:
        self.redis = client
        self.settings = settings
        self.platform = platform
        self.options: ChatAdapterSettings = getattr(settings, platform)
        self.default_persona: str = getattr(self.options, "persona")
        self.queue = AsyncQueueClient(client, settings.queue)
        self.store = ConversationStore(client, platform, self.options.conversation_ttl_s)
        self.limiter = RateLimiter(
            client, platform,
            per_user=self.options.user_messages_per_minute, per_chat=self.options.chat_messages_per_minute,
        )
        self.registry = PersonaRegistry.from_settings(settings)
        self.persona_ttl_s = max(CHAT_PERSONA_TTL_S, self.options.conversation_ttl_s)
        # One answer at a time per conversation, so a quick second message sees the first; and
        # the handler holding each conversation's turn (``in_turn``).
        self._locks: weakref.WeakValueDictionary[str, asyncio.Lock] = weakref.WeakValueDictionary()
        # One message at a time per conversation counted as it arrives (``admitted_turn``).
        self._arrivals: weakref.WeakValueDictionary[str, asyncio.Lock] = weakref.WeakValueDictionary()
        self._turn_holders: dict[str, asyncio.Task] = {}
        # Set when the adapter stops: every question still waiting for its answer is withdrawn.
        self._stopping = asyncio.Event()
        # Conversations waiting for an answer, and those of them /reset since it was asked: that
        # answer must not store the forgotten turns again when it arrives.
        self._answering: set[str] = set()
        self._forgotten: set[str] = set()
        # Chats that moved (``move_chat``), old id → new, oldest first: an answer sent once its chat
        # moved (the send itself may find out) is kept in the conversation at the new id.
        self._moved: dict[str, str] = {}
        # Whether the default persona was found no longer offered here (said once in the log).
        self._default_withdrawn = False

    def stop(self) -> None:
        """Withdraw every question still waiting for its answer, and any asked from now on: each
        asker hears at once that the bot is restarting (rather than nothing, when the process is
        gone before the answer comes), and no worker spends its time on an answer nobody reads."""
        self._stopping.set()

    @property
    def source(self) -> str:
        return self.platform

    @property
    def _max_chars(self) -> int:
        return min(self.options.context_chars, self.settings.queue.max_message_chars)

    @staticmethod
    def _lock(locks: weakref.WeakValueDictionary[str, asyncio.Lock], scope: str) -> asyncio.Lock:
        lock = locks.get(scope)
        if lock is None:
            lock = asyncio.Lock()
            locks[scope] = lock
        return lock

    @contextlib.asynccontextmanager
    async def in_turn(self, where: Where) -> AsyncIterator[None]:
        """Hold this conversation's turn: its messages are handled one at a time, in the order
        their handlers took their turns. A handler that takes it before it first awaits anything
        (the platform calls handlers in the order messages came) answers its message after the
        one before, and with that answer in the conversation. ``answer`` and ``retry`` take it
        too, unless their handler holds it already."""
        task = asyncio.current_task()
        if task is not None and self._turn_holders.get(where.scope) is task:
            yield
            return
        async with self._lock(self._locks, where.scope):
            self._turn_holders[where.scope] = task
            try:
                yield
            finally:
                del self._turn_holders[where.scope]

    @contextlib.asynccontextmanager
    async def admitted_turn(self, where: Where, admitted: Callable[[], Awaitable[bool]]) -> AsyncIterator[bool]:
        """Let a message in as it arrives, then hold its conversation's turn (``in_turn``) if it
        was: ``admitted`` (the rate limits through ``admit``, and whoever else may refuse it) runs
        at once, one message of the conversation at a time, in the order their handlers took this.
        Counted when its turn came, after the answers before it, a flood was told to slow down only
        once they were written, and got more answers than the limit once the count spread over
        later minutes. Yields whether it was let in; take it before awaiting anything."""
        async with self._lock(self._arrivals, where.scope):
            let_in = await admitted()
        if not let_in:
            yield False
            return
        # Nothing awaits between the count and taking the turn: turns keep the order of arrival.
        async with self.in_turn(where):
            yield True

    async def admit(self, where: Where) -> tuple[RateDecision, str]:
        """Count a message against the limits: the decision, and the notice to send (or '')."""
        decision = await self.limiter.check(where.user, where.chat)
        notice = rate_limited_text(decision.retry_after_s) if decision.notify else ""
        return decision, notice

    async def persona_for(self, chat: str) -> str:
        """The persona that speaks in this chat: the one it chose, else the adapter's default.
        It may no longer be offered here (``withdrawn_text`` says so)."""
        return await self._chosen(chat) or self.default_persona

    async def _chosen(self, chat: str) -> str | None:
        """The persona this chat chose with /persona, None if none, or forgotten after
        ``persona_ttl_s`` without a word (or while Redis cannot say). Reading it renews it: the
        chat is in use (GETEX, the same one round trip as a GET). A Redis refusing writes (a
        replica after a failover, a full disk) is still read, without renewing."""
        key = keys.chat_persona_key(self.platform, chat)
        try:
            try:
                chosen = await self.redis.getex(key, ex=self.persona_ttl_s)
            except redis.exceptions.ResponseError:  # the write refused, not Redis out of reach
                chosen = await self.redis.get(key)
        except REDIS_ERRORS:
            return None
        return chosen.decode() if chosen else None

    def persona_names(self) -> list[str]:
        """Personas enabled on this platform."""
        return sorted(name for name, p in self.registry.all().items() if self.platform in p.adapters)

    def _offered(self, name: str) -> bool:
        """Whether ``name`` may speak here now: its file is there and lists this platform in
        ``adapters``. Read at each question, as files are edited while the bot runs. A file
        that cannot be read right now (being saved, or broken) counts as offered: the worker's
        refusal says what is wrong with it, as before."""
        try:
            return self.platform in self.registry.get(name).adapters
        except UnknownPersona:
            return False
        except ConfigError:
            return True

    def describe_persona(self, name: str) -> str:
        """A line or two about a persona, for "You are talking to ..." (its name alone when its
        file is gone)."""
        try:
            persona = self.registry.get(name)
        except UnknownPersona:
            return name
        except ConfigError:
            return f"{name} (its persona file cannot be read right now)"
        return f"{persona.speaker}: {persona.description}".rstrip(": ")

    async def persona_text(self, chat: str, *, available: bool = True) -> str:
        """The reply to /persona: who this chat is talking to, and (``available``) which personas
        are offered here; for a persona no longer offered here, that, and which are, in one
        sentence (whatever ``available`` says: the chat must pick one)."""
        name = await self.persona_for(chat)
        known = self.persona_names()
        if not self._offered(name):
            if not known:
                return f"This chat's persona, {name!r}, is not offered here any more, and none is right now; please try again later."
            return (f"This chat's persona, {name!r}, is not offered here any more; pick another with "
                    f"/persona NAME (offered here: {', '.join(known)}).")
        talking = f"You are talking to {self.describe_persona(name)}"
        return f"{talking}\nAvailable: {', '.join(known)}" if available else talking

    def unknown_persona_text(self, name: str) -> str:
        """What to say when ``name`` is no persona on this platform; '' when it is one."""
        if name in self.persona_names():
            return ""
        known = ", ".join(self.persona_names()) or "none"
        return f"There is no persona called {name!r} here. Available: {known}."

    def withdrawn_text(self, name: str, *, default: bool) -> str:
        """What to tell a chat whose persona ``name`` is no longer offered here (its file was
        deleted, or its ``adapters`` no longer lists this platform); '' while it is offered.
        ``default``: the chat chose none, and ``name`` is the adapter's default, which the
        operator is told of once (in the log) each time it goes."""
        if self._offered(name):
            if default and self._default_withdrawn:
                log.info("%s: the default persona %r is offered here again", self.platform, name)
                self._default_withdrawn = False
            return ""
        known = self.persona_names()
        if default and not self._default_withdrawn:
            log.warning(
                "%s: the default persona %r (PERSONA_%s__PERSONA) is no longer offered here (its file is gone, or "
                "its adapters no longer lists %r), so chats that chose no persona are not answered: add %r back to "
                "its adapters, or set PERSONA_%s__PERSONA to one of %s and restart",
                self.platform, name, self.platform.upper(), self.platform, self.platform, self.platform.upper(),
                ", ".join(known) or "the personas that list it",
            )
            self._default_withdrawn = True
        then = f"Available: {', '.join(known)}. Pick one with /persona NAME." if known else NONE_OFFERED_TEXT
        return WITHDRAWN_TEXT.format(name=repr(name)) + " " + then

    async def set_persona(self, chat: str, name: str) -> str:
        """Switch this chat's persona (kept while the chat is heard from: ``_chosen``); the reply
        says what happened."""
        unknown = self.unknown_persona_text(name)
        if unknown:
            return unknown
        try:
            await self.redis.set(keys.chat_persona_key(self.platform, chat), name, ex=self.persona_ttl_s)
        except REDIS_ERRORS as exc:
            return self._explain(exc)
        return f"From now on you are talking to {self.describe_persona(name)}"

    async def answer(
        self, where: Where, text: str, *, history: list[Message] | None = None, keep_as: str | None = None,
        notify: Notify | None = None, opening: Callable[[], Awaitable[list[Message]]] | None = None,
        deliver: Deliver | None = None,
    ) -> str:
        """Answer ``text``: the conversation so far (or ``history``) plus it, through the queue.
        ``keep_as``: also keep the exchange under that name (see ``kept``). ``notify``: how to
        tell the asker something before the answer (that no worker is running). ``opening``:
        what the conversation opens with while none is kept (a Discord thread started from a
        message: that message's conversation). ``deliver``: how to send the answer (see ``_say``)."""
        async with self.in_turn(where):
            try:
                turns = history if history is not None else await self.store.load(where.scope)
                if not turns and history is None and opening is not None:
                    turns = await opening()
                turns = [*turns, Message(role="user", content=text)]
                reply = await self._generate(where, turns, keep_as=keep_as, notify=notify, deliver=deliver)
            except REDIS_ERRORS as exc:
                reply = self._explain(exc)
        return await self._say(reply, deliver)

    async def retry(
        self, where: Where, *, keep_as: str | None = None, notify: Notify | None = None, deliver: Deliver | None = None,
    ) -> str:
        """Answer the last message again, with a fresh seed (``keep_as``, ``notify``, ``deliver``: as
        for ``answer``); also a message that got no answer (it timed out, the queue was full, the
        bot restarted, the answer could not be sent)."""
        async with self.in_turn(where):
            try:
                turns = await self.store.load(where.scope)
                while turns and turns[-1].role == "assistant":
                    turns.pop()
                if not turns:
                    reply = NOTHING_TO_RETRY_TEXT
                else:
                    reply = await self._generate(
                        where, turns, seed=secrets.randbelow(2**31), keep_as=keep_as, notify=notify, deliver=deliver
                    )
            except REDIS_ERRORS as exc:
                reply = self._explain(exc)
        return await self._say(reply, deliver)

    @staticmethod
    async def _say(text: str, deliver: Deliver | None) -> str:
        """What is left for the adapter to send. Given ``deliver``, the responder sends all it says
        through it: the persona's answer once it is ready, before the conversation keeps it as seen
        (one that does not go out is kept unanswered, so /retry answers it), and any sentence
        saying why there is none; nothing is left then ('')."""
        if deliver is None or not text:
            return text
        await deliver(text)
        return ""

    async def reset(self, where: Where) -> str:
        """Forget the conversation, including an exchange whose answer is still on its way."""
        if where.scope in self._answering:
            self._forgotten.add(where.scope)
        try:
            await self.store.forget(where.scope)
        except REDIS_ERRORS as exc:
            return self._explain(exc)
        return RESET_TEXT

    async def cancel(self, where: Where) -> str:
        """Withdraw the request this user is waiting for."""
        try:
            request_id = await self.store.get_inflight(where.scope)
            if not request_id:
                return NOTHING_TO_CANCEL_TEXT
            await self.queue.cancel(request_id)
        except REDIS_ERRORS as exc:
            return self._explain(exc)
        return "Withdrawing your request…"

    async def kept(self, name: str) -> list[Message]:
        """The exchange an answer kept under ``name`` (``keep_as``), oldest turn first: how a
        platform finds the conversation an answer ended when that answer cannot quote its
        question (a Discord slash command's). Empty when expired, or while Redis cannot say:
        the caller then goes on with what it has."""
        try:
            return await self.store.load(name)
        except REDIS_ERRORS as exc:
            log.warning("%s: could not read the exchange kept as %s: %s", self.platform, name, exc)
            return []

    async def move_chat(self, old: str, new: str) -> None:
        """Carry a chat's persona choice and conversations over to its new id (a Telegram group
        upgraded to a supergroup gets one). Best effort: a Redis failure is logged, and the chat
        then starts afresh with the default persona, as before the move existed."""
        try:
            await self.store.move_key(keys.chat_persona_key(self.platform, old), keys.chat_persona_key(self.platform, new))
            moved = await self.store.move_chat(old, new)
        except REDIS_ERRORS as exc:
            log.warning("%s: could not move chat %s to %s: %s", self.platform, old, new, exc)
            return
        log.info("%s: chat %s is now %s; moved its persona choice and %d conversation(s)", self.platform, old, new, moved)
        self._moved[old] = new
        if len(self._moved) > MAX_REMEMBERED_MOVES:
            del self._moved[next(iter(self._moved))]

    def _scope_now(self, where: Where) -> str:
        """The conversation's scope now: at its chat's new id if the chat moved."""
        chat = where.chat
        for _ in range(len(self._moved)):  # each move is to a newer id; the bound only guards a loop
            if chat not in self._moved:
                break
            chat = self._moved[chat]
        return Where(chat=chat, user=where.user).scope

    async def _generate(
        self, where: Where, turns: list[Message], seed: int | None = None, keep_as: str | None = None,
        notify: Notify | None = None, deliver: Deliver | None = None,
    ) -> str:
        """One round trip through the queue; stores the exchange when it succeeds (under the
        conversation's scope, and under ``keep_as`` if given): with ``deliver``, only once the
        answer (with its note, where only the end of the message was read) went out through
        it, and then returns ''."""
        chosen = await self._chosen(where.chat)
        persona = chosen or self.default_persona
        request = build_request(
            persona, turns, user=f"{self.platform}:{where.user}", source=self.source,
            max_turns=self.settings.queue.max_messages,
            max_chars=self._max_chars,
            seed=seed,
            patience_s=self.options.reply_timeout_s,
        )
        if withdrawn := self.withdrawn_text(persona, default=chosen is None):
            # Kept, so that /retry answers it once the chat has picked a persona that is offered.
            await self._keep_unanswered(where, request)
            return withdrawn
        await self.store.set_inflight(where.scope, request.id)
        # The scope counts as answering until the exchange is saved: a /reset at any moment
        # before that (it takes no lock) must hold, not be undone by the save.
        self._answering.add(where.scope)
        try:
            try:
                reply = await self._ask(request, notify)
            except InvalidRequest as exc:
                return _sentence(f"I can't take that message: {exc}")
            except (ReplyTimeout, QueueBusy) as exc:
                await self._keep_unanswered(where, request)
                if isinstance(exc, QueueBusy) or await self._workers_live():
                    raise
                return STARTING_TIMEOUT_TEXT if await self._workers_starting() else NO_WORKER_TIMEOUT_TEXT
            finally:
                await self.store.clear_inflight(where.scope, request.id)
            if reply is None or (not reply.ok and (reply.error is None or reply.error.kind not in NOT_RETRIED)):
                await self._keep_unanswered(where, request)
            if reply is None:
                return RESTARTING_TEXT
            if not reply.ok:
                return self._explain_reply(reply)
            text = reply.text.strip()
            log.info("%s answered %s in %.0f ms (%s@%s)", self.platform, where.scope,
                     reply.timings.queue_ms + reply.timings.generate_ms, reply.persona, reply.version)
            said = (text or EMPTY_REPLY_TEXT) + _cut_note(turns[-1].content, request, reply)
            if deliver is not None and not await deliver(said):
                # Never seen: the next message must not read as if it had been, and /retry answers it.
                await self._keep_unanswered(where, request)
                return ""
            exchange = [*request.messages, Message(role="assistant", content=text)]
            for scope in filter(None, (self._scope_now(where), keep_as)):
                if where.scope in self._forgotten:
                    break
                await self.store.save(scope, exchange)
            if where.scope in self._forgotten:  # a /reset while saving: its forget may have gone first
                await self.store.forget(where.scope)
            return "" if deliver is not None else said
        finally:
            self._answering.discard(where.scope)
            self._forgotten.discard(where.scope)

    async def _keep_unanswered(self, where: Where, request: GenerationRequest) -> None:
        """Keep a question that got no answer (it timed out, the queue was full, the worker
        failed, the bot stopped) as the conversation's last turn, so that ``/retry``, which
        those apologies suggest, answers it rather than the message before it, and the next
        message is read with it. Best effort: a Redis that cannot take it leaves the
        conversation as it was."""
        if where.scope in self._forgotten:
            return
        try:
            await self.store.save(self._scope_now(where), list(request.messages))
        except REDIS_ERRORS as exc:
            log.warning("%s: could not keep the unanswered question of %s: %s", self.platform, where.scope, exc)

    async def _ask(self, request: GenerationRequest, notify: Notify | None = None) -> GenerationReply | None:
        """The queue's reply, or None when the adapter stops first (the request is withdrawn).
        Meanwhile the asker is told (``notify``) if no worker is running to answer it."""
        if self._stopping.is_set():
            return None
        asking = asyncio.ensure_future(self.queue.ask(request, timeout=self.options.reply_timeout_s))
        stopping = asyncio.ensure_future(self._stopping.wait())
        watching = asyncio.ensure_future(self._tell_if_no_worker(notify))
        try:
            await asyncio.wait((asking, stopping), return_when=asyncio.FIRST_COMPLETED)
        except asyncio.CancelledError:
            asking.cancel()
            raise
        finally:
            stopping.cancel()
            watching.cancel()
        if asking.done():
            return asking.result()
        asking.cancel()
        with contextlib.suppress(asyncio.CancelledError, *REDIS_ERRORS):
            await asking
        with contextlib.suppress(*REDIS_ERRORS):  # best effort: the worker then skips it
            await self.queue.cancel(request.id)
        log.info("%s: withdrew request %s, stopping", self.platform, request.id)
        return None

    async def _tell_if_no_worker(self, notify: Notify | None) -> None:
        """After a short wait, tell the asker if no worker is running, or only starting (the
        question keeps waiting)."""
        if notify is None:
            return
        await asyncio.sleep(min(NO_WORKER_NOTICE_S, self.options.reply_timeout_s / 4))
        if await self._workers_live():
            return
        if await self._workers_starting():
            log.info("%s: a worker is still loading its models; questions wait for it", self.platform)
            text = STARTING_TEXT
        else:
            log.warning("%s: no worker is running, so questions wait; start one (`persona worker`, or `persona up`)",
                        self.platform)
            text = NO_WORKER_TEXT
        try:
            await notify(text)
        except Exception:  # the answer still comes; a notice that could not be sent is only logged
            log.exception("%s: could not say that no worker is running", self.platform)

    async def _workers_live(self) -> bool:
        """Whether any worker's heartbeat is current (True while Redis cannot say)."""
        try:
            return bool(await self.redis.eval(LIVE_SCRIPT, 1, keys.WORKER_INDEX_KEY))
        except REDIS_ERRORS:
            return True

    async def _workers_starting(self) -> bool:
        """Whether a worker is loading its models, not serving yet (False while Redis cannot say)."""
        try:
            return bool(await self.redis.eval(LIVE_SCRIPT, 1, keys.STARTING_INDEX_KEY))
        except REDIS_ERRORS:
            return False

    def _explain(self, exc: Exception) -> str:
        if isinstance(exc, QueueBusy):
            return BUSY_TEXT
        if isinstance(exc, ReplyTimeout):
            return TIMEOUT_TEXT
        log.warning("%s: the queue failed: %s: %s", self.platform, type(exc).__name__, exc)
        # A full Redis, or a client with all its connections in use (Redis is fine): "busy".
        return BUSY_TEXT if isinstance(exc, BUSY_ERRORS) else UNREACHABLE_TEXT

    def _explain_reply(self, reply: GenerationReply) -> str:
        kind = reply.error.kind if reply.error else ErrorKind.internal
        if kind is ErrorKind.cancelled:
            return CANCELLED_TEXT
        if kind in (ErrorKind.timeout, ErrorKind.dead_letter):
            return TIMEOUT_TEXT
        if kind is ErrorKind.invalid and reply.error:
            return _sentence(f"I can't answer that: {reply.error.message}")
        log.warning("%s: request %s failed: %s", self.platform, reply.id, reply.error)
        return FAILED_TEXT
