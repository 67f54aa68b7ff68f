"""The Discord adapter (discord.py): mentions, DMs and replies in, persona replies out.

It answers when mentioned (or the role Discord made for it, which the mention menu
offers under the same name), in a DM (subject to the ``dm_policy``), and when someone
replies to one of its messages; one addressed to it with no text (a picture, a bare
mention) gets a sentence saying what to write instead of silence. A text file sent with a
message is read as part of it, as a paste: Discord's app makes a message longer than 2,000
characters into a file (``message.txt``), and a person cannot write it any other way (up to
``discord_reading.TEXT_FILE_MAX_BYTES``; a bigger file, or one not in UTF-8, gets a sentence saying so). The
persona reads mentions of people, roles and channels as Discord shows them (``@ada``,
``#general``), not as the codes in the message (``<@123>``), and the bot's own not at all;
/ask's text likewise.
A server message edited to mention the bot is answered, once; no other edit is (``on_message_edit``). The
reply chain, fetched message by message as llmcord does, is the conversation, less the
bot's notices (``persona_words``). A slash command's answer quotes nothing, so the chain ends
there; the exchange it answered is kept in Redis under its interaction's id, and the
chain goes on from that. Elsewhere the conversation is the one kept in Redis; a thread
started from a message opens with that message's conversation (``thread_opening``). The
slash commands (/ask, /persona, /reset, /retry, /cancel; /queue, /swap and /rollback for
operators) are answered by ``discord_commands.SlashCommands``, which the bot inherits.
Replies are split at 2,000 characters and never ping anyone; 429s are waited out by
discord.py itself. While the gateway cannot be reached, discord.py tries again with waits cut
to the reply timeout (``bound_reconnect_waits``), and the outage is logged as it begins and ends.

The bot needs the privileged **Message Content** intent (Developer Portal → Bot →
Privileged Gateway Intents) to read what people write; without it Discord closes the
connection (4014) and the bot says so.

``PERSONA_DISCORD__API_URL`` points the whole client elsewhere: discord.py's REST base
(``discord.http.Route.BASE``) is set to it, and the websocket goes where that API's
``GET /gateway/bot`` says, instead of discord.py's built-in gateway address.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import signal
from collections import OrderedDict
from collections.abc import Iterator

import aiohttp
import discord
import yarl
from discord import app_commands
from discord.gateway import DiscordWebSocket

from adapters.access import AccessControl
from adapters.delivery import Failure, send_parts
from adapters.discord_commands import (
    NO_MENTIONS,
    OPERATOR_ONLY_TEXT,
    SlashCommands,
    kept_name,
    operator_role_name_text,
)
from adapters.discord_gateway import (
    INTENT_REFUSED_TEXT,
    TOKEN_REFUSED_TEXT,
    OneLinePerOutage,
    bound_reconnect_waits,
    gateway_refusal,
    point_client_at,
)
from adapters.discord_reading import (
    FILE_NOTICE_PATTERN,
    TextFiles,
    UnreadableFile,
    is_text_file,
    readable,
)
from adapters.responder import (
    BARE_MENTION_TEXT,
    Responder,
    Where,
    check_default_persona,
    connect_with_backoff,
    persona_words,
)
from adapters.splitting import DISCORD_MESSAGE_LIMIT_CHARS, split_message
from adapters.typing_indicator import keep_typing
from persona.contract import Message
from persona.errors import ConfigError, PlatformUnreachable
from persona.settings import Settings

__all__ = ["OPERATOR_ONLY_TEXT", "PersonaBot", "bound_reconnect_waits", "point_client_at", "run_discord"]

log = logging.getLogger(__name__)

DEFAULT_API_URL = "https://discord.com/api/v10"
TYPING_REFRESH_S = 8.0  # Discord shows "typing" for 10 s
MAX_CHAIN_MESSAGES = 24
NOT_TEXT_TEXT = (
    "I can only read text and text files: I can't see pictures or stickers, or open other files. "
    "Please write your message as text."
)
# Threads whose parent was asked of the API; a thread never moves, so an entry never goes stale.
MAX_REMEMBERED_PARENTS = 10_000
# How long closing waits for the handlers still answering to say their last words.
CLOSE_WAIT_S = 10.0
# Messages answered (or being answered), newest last: an edit never answers one of them again.
# An edit is answered only while its message is in discord.py's message cache (``before`` is
# known), which holds the last 1,000 messages received: every one of those that was answered
# is among the last 1,000 answered, so this many are more than enough.
MAX_REMEMBERED_ANSWERS = 10_000
_UNKNOWN = object()  # a channel whose parent the API could not tell


class PersonaBot(SlashCommands, discord.Client):
    """A Discord client that speaks as a persona."""

    def __init__(self, settings: Settings) -> None:
        if settings.discord.token is None:
            raise ConfigError("no Discord token: set PERSONA_DISCORD__TOKEN")
        check_default_persona(settings, "discord")
        role = settings.discord.operator_role
        if role and not role.isdigit() and not settings.discord.allowed_guilds:
            raise ConfigError(operator_role_name_text(role))
        intents = discord.Intents.default()
        intents.message_content = True  # privileged: enable it in the Developer Portal
        # The bot never joins a voice channel: no "PyNaCl is not installed" warning at start.
        discord.VoiceClient.warn_nacl = discord.VoiceClient.warn_dave = False
        super().__init__(intents=intents, allowed_mentions=NO_MENTIONS)
        self.settings = settings
        self.options = settings.discord
        self.tree = app_commands.CommandTree(self)
        self.responder: Responder | None = None
        self.access: AccessControl | None = None
        self._parent_ids: dict[int, int | None] = {}  # channel id → parent id, oldest first
        self._answered: OrderedDict[int, None] = OrderedDict()  # message ids, see MAX_REMEMBERED_ANSWERS
        self._answering: set[asyncio.Task] = set()  # handlers waiting for an answer, or sending it
        self._files = TextFiles()  # read lately: a reply chain holding a paste downloads it once
        self._outages = OneLinePerOutage(self.options.reconnect_wait_cap_s)
        self._add_commands()

    # --- start-up -----------------------------------------------------------------------

    async def start_with_settings(self) -> None:
        """Log in and connect, at the configured API (and the gateway it names), trying again
        while the gateway cannot be reached at most the reply timeout apart."""
        point_client_at(self.options.api_url)
        bound_reconnect_waits(self._outages.wait_cap_s)
        logging.getLogger("discord.client").addFilter(self._outages)
        try:
            await self.start(self.options.token.get_secret_value())
        finally:
            logging.getLogger("discord.client").removeFilter(self._outages)

    async def serve(self) -> None:
        """Run until closed; a refused token or intent becomes a ConfigError saying what to fix."""
        try:
            await self.start_with_settings()
        except discord.PrivilegedIntentsRequired:
            raise ConfigError(INTENT_REFUSED_TEXT) from None
        except discord.LoginFailure:
            raise ConfigError(TOKEN_REFUSED_TEXT) from None
        except discord.ConnectionClosed as exc:  # a session the gateway ended for good (discord.py resumes the rest)
            raise gateway_refusal(exc) from None
        except (aiohttp.ClientError, OSError) as exc:  # only while logging in: the gateway reconnects by itself
            raise PlatformUnreachable(
                f"cannot reach Discord at {self.options.api_url} ({exc}): check the network, "
                "or PERSONA_DISCORD__API_URL"
            ) from None

    async def setup_hook(self) -> None:
        """Reach Redis, find the gateway of a non-default API, and register the slash commands."""
        client = await connect_with_backoff(self.settings)
        self.responder = Responder(client, self.settings, "discord")
        self.access = AccessControl(
            client, "discord", self.options.dm_policy, self.options.allowed_users, self.options.pairing_code_ttl_s
        )
        if self.options.api_url.rstrip("/") != DEFAULT_API_URL:
            _shards, url, _limits = await self.http.get_bot_gateway()
            DiscordWebSocket.DEFAULT_GATEWAY = yarl.URL(url)
            log.info("using the gateway %s named by %s", url, self.options.api_url)
        await self.tree.sync()

    async def close(self) -> None:
        """Withdraw the questions still waiting for a worker and let their askers hear so, then
        disconnect and close the Redis connection."""
        if self.responder is not None:
            self.responder.stop()
            pending = self._answering - {asyncio.current_task()}
            if pending:
                await asyncio.wait(pending, timeout=CLOSE_WAIT_S)
        await super().close()
        if self.responder is not None:
            await self.responder.redis.aclose()
            self.responder = None

    @contextlib.contextmanager
    def _answering_now(self) -> Iterator[None]:
        """Mark the running handler as one that ``close`` lets finish."""
        task = asyncio.current_task()
        self._answering.add(task)
        try:
            yield
        finally:
            self._answering.discard(task)

    async def on_ready(self) -> None:
        self._outages.connected()
        log.info("Discord bot %s serving persona %s", self.user, self.options.persona)

    async def on_resumed(self) -> None:
        self._outages.connected()

    async def on_error(self, event_method: str, /, *args, **kwargs) -> None:
        """The one place event errors end up: log them with the traceback."""
        log.exception("error while handling Discord event %s", event_method)

    # --- who is talking, and may they -------------------------------------------------

    async def _place_allowed(self, guild_id: int | None, channel: discord.abc.Snowflake | None) -> bool:
        """The guild and channel allow/deny lists; a thread is also judged by its parent channel."""
        o = self.options
        if guild_id is not None and ((o.allowed_guilds and guild_id not in o.allowed_guilds) or guild_id in o.denied_guilds):
            return False
        if not (o.allowed_channels or o.denied_channels):
            return True
        parent_id = None if channel is None else await self._parent_id(channel)
        if parent_id is _UNKNOWN:
            return False  # the lists cannot be applied: stay quiet rather than talk where denied
        places = set() if channel is None else {channel.id, parent_id} - {None}
        return not ((o.allowed_channels and not places & set(o.allowed_channels)) or places & set(o.denied_channels))

    async def _parent_id(self, channel: discord.abc.Snowflake) -> int | None | object:
        """A thread's parent channel (None: not a thread). A thread discord.py has not cached
        (from before the bot connected, or archived) comes as a PartialMessageable without
        one: ask the API, once; ``_UNKNOWN`` while the API cannot say."""
        parent_id = getattr(channel, "parent_id", None)
        if parent_id is not None or isinstance(channel, discord.abc.GuildChannel):
            return parent_id
        if channel.id in self._parent_ids:
            return self._parent_ids[channel.id]
        try:
            fetched = await self.fetch_channel(channel.id)
        except (discord.DiscordException, aiohttp.ClientError, OSError) as exc:
            # Not remembered, so the next message asks again.
            log.warning("not answering in channel %s: could not look up where it is: %s", channel.id, exc)
            return _UNKNOWN
        if len(self._parent_ids) >= MAX_REMEMBERED_PARENTS:
            del self._parent_ids[next(iter(self._parent_ids))]
        parent_id = self._parent_ids[channel.id] = getattr(fetched, "parent_id", None)
        log.debug("channel %s is in channel %s", channel.id, parent_id)
        return parent_id

    def is_operator(self, user: discord.abc.User) -> bool:
        """Whether this user may run operator commands: by their id, or the operators' role in the
        server they are in. That role is matched by its id, which Discord gives; by its name only
        in the servers of PERSONA_DISCORD__ALLOWED_GUILDS: anyone can make a server, invite the
        bot and give themselves a role of any name there."""
        if user.id in self.options.operator_ids:
            return True
        role, guild = self.options.operator_role, getattr(user, "guild", None)
        roles = getattr(user, "roles", [])  # a Member's, in that server; none in a DM
        if not role or guild is None:
            return False
        if role.isdigit():
            return any(r.id == int(role) for r in roles)
        return guild.id in self.options.allowed_guilds and any(r.name == role for r in roles)

    async def _parent(self, message: discord.Message) -> discord.Message | None:
        """The message this one replies to, from the payload, the cache, or the API."""
        reference = message.reference
        if reference is None or reference.message_id is None:
            return None
        if isinstance(reference.resolved, discord.Message):
            return reference.resolved
        if reference.cached_message is not None:
            return reference.cached_message
        try:
            return await message.channel.fetch_message(reference.message_id)
        except discord.HTTPException:
            return None

    def _mentioned(self, message: discord.Message) -> bool:
        """Whether the message mentions the bot: its user, or the role Discord made for it in the
        server, which the mention menu offers under the bot's name and many people pick."""
        if self.user in message.mentions:
            return True
        role = message.guild.self_role if message.guild is not None else None
        return role is not None and role in message.role_mentions

    def _clean(self, message: discord.Message) -> str:
        """The message's text without the bot's own mention, the rest of Discord's markup as people see it."""
        text = message.content
        role = message.guild.self_role if message.guild is not None else None
        for form in (f"<@{self.user.id}>", f"<@!{self.user.id}>", *([f"<@&{role.id}>"] if role else [])):
            text = text.replace(form, "")
        return readable(self, message, text).strip()

    async def _words(self, message: discord.Message, *, strict: bool) -> str:
        """What a person wrote: the text of the message's text files (a message too long for
        Discord, which its app made a file of), then the message's own. ``strict``: a text file
        that cannot be read raises ``UnreadableFile`` saying why; otherwise it is left out."""
        parts = []
        for attachment in message.attachments:
            if not is_text_file(attachment):
                continue
            try:
                parts.append(await self._files.read(attachment))
            except UnreadableFile as exc:
                if strict:
                    raise
                log.debug("left out of a conversation: %s", exc)
        parts.append(self._clean(message))
        return "\n\n".join(part for part in parts if part)

    async def reply_chain(self, message: discord.Message) -> list[Message]:
        """The conversation a reply continues: its ancestors, oldest first. The parts of one
        long answer (each quoting the part before it) come back as one turn; an answer to a
        slash command brings the conversation it ended (``_slash_exchange``)."""
        return await self._chain_from(await self._parent(message))

    async def thread_opening(self, channel: discord.abc.Messageable) -> list[Message]:
        """The conversation a thread started from a message ("Create Thread" on it) opens with:
        that message and its reply chain, oldest first. [] for a thread started on its own, any
        other channel, or while the API cannot say."""
        starter = channel.starter_message if isinstance(channel, discord.Thread) else None
        if starter is None:
            parent_id = await self._parent_id(channel)
            if not isinstance(parent_id, int):
                return []
            try:  # a thread started from a message has that message's id
                starter = await self.get_partial_messageable(parent_id).fetch_message(channel.id)
            except (discord.DiscordException, aiohttp.ClientError, OSError) as exc:
                log.debug("thread %s: no message it was started from: %s", channel.id, exc)
                return []
        return await self._chain_from(starter)

    async def _chain_from(self, current: discord.Message | None) -> list[Message]:
        """The conversation that ends with ``current``: it and its ancestors, oldest first."""
        turns: list[Message] = []
        for _ in range(MAX_CHAIN_MESSAGES):
            if current is None:
                break
            exchange = await self._slash_exchange(current)
            if exchange:
                turns.extend(reversed(exchange))
                break
            role = "assistant" if current.author == self.user else "user"
            text = await self._words(current, strict=False)
            if role == "assistant":  # a notice (no worker running, slow down...) is not the persona's
                text = "" if text == NOT_TEXT_TEXT or FILE_NOTICE_PATTERN.fullmatch(text) else persona_words(text)
            if text and role == "assistant" and turns and turns[-1].role == "assistant":
                turns[-1] = Message(role=role, content=f"{text}\n{turns[-1].content}")
            elif text:
                turns.append(Message(role=role, content=text))
            current = await self._parent(current)
        turns.reverse()
        return turns

    async def _slash_exchange(self, message: discord.Message) -> list[Message]:
        """The conversation that ends with this answer to /ask or /retry, or [] if it is not one.

        A slash command's answer quotes nothing: the question was the command's option, which
        Discord shows on no message and keeps nowhere the bot can fetch. The answer's
        ``interaction_metadata`` does say which interaction it answers (every part of a long
        answer says the same), so the exchange is kept in Redis under that id when answering
        (``keep_as``). That, not the user's latest conversation in the channel, which may have
        moved on or been /reset since, is exactly what the answer answered. Once it expires
        (with the conversation TTL) the chain holds the answer alone.
        """
        metadata = message.interaction_metadata
        if message.author != self.user or metadata is None or self.responder is None:
            return []
        return await self.responder.kept(kept_name(metadata.id))

    # --- messages -----------------------------------------------------------------------

    async def on_message(self, message: discord.Message) -> None:
        """Answer a mention, a DM, or a reply to the bot."""
        if not message.author.bot and self.responder is not None:
            await self._reply_to(message)

    async def on_message_edit(self, before: discord.Message, after: discord.Message) -> None:
        """Answer a server message edited to mention the bot: its author wrote the question, then
        remembered to address it, and expects the answer a message written that way gets. No
        other edit is answered: in a DM every message was answered as it came, and a message
        addressed to the bot before was answered then, so an edit there fixes a typo, and a
        second answer to one message would surprise. discord.py calls this only for a message
        in its cache, received while the bot ran; an older one may have been answered before a
        restart, and is left alone."""
        if after.author.bot or self.responder is None or after.guild is None:
            return
        if self._mentioned(after) and not self._mentioned(before):
            await self._reply_to(after)

    def _first_answer(self, message: discord.Message) -> bool:
        """Whether this message is answered for the first time; from now on it counts as answered."""
        if message.id in self._answered:
            return False
        self._answered[message.id] = None
        if len(self._answered) > MAX_REMEMBERED_ANSWERS:
            self._answered.popitem(last=False)
        return True

    async def _reply_to(self, message: discord.Message) -> None:
        """Answer a message addressed to the bot (a mention, a DM, a reply to it), once, after the
        messages its author sent there before it: it is let in (``_admitted``) as it arrives, and
        its turn in the conversation taken, before anything awaits (discord.py hands the messages
        over in order; the Redis calls before the answer may return in any order, and quick
        messages were answered last first). Counted when its turn came, a flood was told to slow
        down only once the answers before it were written."""
        is_dm = message.guild is None
        if not (is_dm or self._mentioned(message) or message.reference is not None):
            return
        where = Where(chat=str(message.channel.id), user=str(message.author.id))
        parent: discord.Message | None = None

        async def admitted() -> bool:
            nonlocal parent
            parent = await self._parent(message)
            return await self._admitted(message, where, parent)

        with self._answering_now():
            async with self.responder.admitted_turn(where, admitted) as let_in:
                if let_in:
                    await self._reply_in_turn(message, where, parent)

    async def _admitted(self, message: discord.Message, where: Where, parent: discord.Message | None) -> bool:
        """Whether to answer a message (replying to ``parent``, if any): addressed to the bot, not
        answered before, in a place allowed, within the rate limits (over them the one notice is
        sent, then nothing), and, in a DM, from someone the ``dm_policy`` lets in (told why not)."""
        is_dm = message.guild is None
        replied_to_bot = parent is not None and parent.author == self.user
        if not (is_dm or self._mentioned(message) or replied_to_bot) or not self._first_answer(message):
            return False
        if not is_dm and not await self._place_allowed(message.guild.id, message.channel):
            return False
        # The limits first: a flood of DMs refused by the dm_policy is not met with a flood of refusals.
        limits, notice = await self.responder.admit(where)
        if not limits.allowed:
            if notice:
                await self.send_reply(message, notice)
            return False
        if is_dm:
            decision = await self.access.check(str(message.author.id), message.author.name)
            if not decision.allowed:
                await self.send_reply(message, decision.reply)
            return decision.allowed
        return True

    async def _reply_in_turn(self, message: discord.Message, where: Where, parent: discord.Message | None) -> None:
        """``_reply_to``, holding the conversation's turn, for a message let in."""
        is_dm = message.guild is None
        replied_to_bot = parent is not None and parent.author == self.user
        try:
            text = await self._words(message, strict=True)
        except UnreadableFile as exc:
            await self.send_reply(message, str(exc))
            return
        if not text:  # a picture, a sticker, or the mention alone: silence would look like a dead bot
            await self.send_reply(message, NOT_TEXT_TEXT if message.attachments or message.stickers else BARE_MENTION_TEXT)
            return
        # In a DM the conversation kept in Redis is the whole of it; a chain there would end
        # at the replied-to answer (DM answers quote nothing) and forget all before it.
        history = await self.reply_chain(message) if replied_to_bot and not is_dm else None
        # A thread's first question goes on from the message the thread was started from.
        may_open_thread = not is_dm and parent is None
        async with keep_typing(message.channel.typing, TYPING_REFRESH_S):
            await self.responder.answer(
                where, text, history=history, notify=lambda notice: self.send_reply(message, notice),
                opening=(lambda: self.thread_opening(message.channel)) if may_open_thread else None,
                deliver=lambda reply: self.send_reply(message, reply),
            )

    async def send_reply(self, message: discord.Message, text: str) -> bool:
        """Reply in as many messages as it takes; whether all went out (each part is tried again
        while nothing arrived: ``delivery``). In a server each quotes the one before it (the
        first quotes the question, if it still exists), so a reply to any part of a long answer
        leads back through all of it to the question: the reply chain is the conversation."""
        quoted = message if message.guild is not None else None
        # A part keeps its nonce on every try: Discord then drops a second copy of one that had
        # arrived though its answer was lost (discord.py sends the nonce with enforce_nonce).
        parts = [(chunk, secrets.randbits(63)) for chunk in split_message(text, DISCORD_MESSAGE_LIMIT_CHARS)]

        async def send(part: tuple[str, int]) -> None:
            nonlocal quoted
            chunk, nonce = part
            if quoted is None:
                await message.channel.send(chunk, nonce=nonce, allowed_mentions=NO_MENTIONS)
                return
            # The question may be deleted while the bot thinks: then the answer goes out unquoted.
            quote = quoted.to_reference(fail_if_not_exists=False)
            quoted = await message.channel.send(
                chunk, nonce=nonce, reference=quote, mention_author=False, allowed_mentions=NO_MENTIONS
            )

        return await send_parts(parts, send, _send_failure, to=f"Discord channel {message.channel.id}")


def _send_failure(exc: Exception) -> Failure | None:
    """What a failed send means: a 5xx, a dropped connection or one that timed out is tried again
    (a copy that had arrived is dropped by its nonce); any other answer is a refusal."""
    if isinstance(exc, discord.DiscordServerError | aiohttp.ClientError | OSError | asyncio.TimeoutError):
        return Failure.TRY_AGAIN
    if isinstance(exc, discord.DiscordException):
        return Failure.REFUSED  # no permission there, the channel is gone...
    return None


def _close_on_sigterm(bot: PersonaBot) -> None:
    """SIGTERM (``persona up`` stopping, ``docker stop``) closes the bot as Ctrl-C does, rather
    than ending the process mid-answer: questions in flight are withdrawn, their askers told."""
    loop = asyncio.get_running_loop()
    closing: set[asyncio.Task] = set()  # holds the closing task while it runs

    def close() -> None:
        task = loop.create_task(bot.close())
        closing.add(task)
        task.add_done_callback(closing.discard)

    with contextlib.suppress(NotImplementedError):  # no signal handlers in this event loop (Windows)
        loop.add_signal_handler(signal.SIGTERM, close)


def run_discord(settings: Settings) -> None:
    """Run the Discord adapter until interrupted (``persona discord``)."""

    async def main() -> None:
        async with PersonaBot(settings) as bot:
            _close_on_sigterm(bot)
            await bot.serve()

    try:
        asyncio.run(main())
    except KeyboardInterrupt:
        pass
