"""The Telegram adapter (python-telegram-bot): Telegram updates in, persona replies out.

In a private chat it answers every message (subject to the ``dm_policy``); in a group
only a message that mentions it (@its_name) or replies to one of its messages, in the
forum topic that message was written in. A message written as a chat (by an anonymous
admin, as the group; by anyone, as their channel) is answered too; its conversation and
rate limits are that chat's, not those of the placeholder user Telegram names as its
author. It reads text only: a photo, sticker, voice message or file gets a sentence
asking for text instead (in a group, only one addressed to it). A group upgraded to a
supergroup gets a new chat id; its persona choice and conversations move to it, and so
does an answer that was on its way then. Replies are split at Telegram's 4,096-character
limit, and again where a part holds more formatting than the 100 entities Telegram shows
(``split_for_formatting``), then each part's Markdown (bold, italic, code, code blocks) is sent as
Telegram's HTML, everything else escaped (``telegram_html``); a part Telegram still cannot parse ("can't
parse entities") goes again as the plain text it was, so formatting never costs an answer; an
@username in a reply pings no one (``quiet_mentions``). While the
queue works it shows "typing", refreshed every 4.5 s (Telegram shows it for 5 s). Flood
control (``RetryAfter``) delays a message; it never drops it. A paste longer than a
message, which Telegram's apps send in pieces, is answered once, as one message
(``telegram_pastes``), in whatever order a webhook's requests bring its pieces. A group
message edited to mention the bot is answered, once (a photo's caption too; an edited piece
of a paste answers the whole paste); no other edit is (``on_edit``). A command it does not have gets the list of those it has. Long polling
by default; a webhook when ``PERSONA_TELEGRAM__WEBHOOK_URL`` is set. A token refused while it
serves (revoked with @BotFather), to the long poll or to any other call, ends ``run`` and
``serve`` as one refused at start does. The token is kept out
of every log line (httpx logs request URLs, which hold it: ``token_redaction``). Every message and
command counts against the rate limits as it arrives, before the ``dm_policy`` is read (not when
its turn comes, after the answers to those before it): past them the one notice at once, then
nothing, however many come.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import re
from collections.abc import Awaitable, Callable

from telegram import BotCommand, Chat, Message, Update
from telegram.constants import ChatAction, ChatMemberStatus, ChatType
from telegram.ext import (
    Application,
    CommandHandler,
    ContextTypes,
    MessageHandler,
    TypeHandler,
    filters,
)

from adapters.access import AccessControl
from adapters.answered import AnsweredMessages
from adapters.posting.chat_sinks import telegram_api_url
from adapters.responder import (
    BARE_MENTION_TEXT,
    Deliver,
    Notify,
    Responder,
    Where,
    check_default_persona,
    connect_with_backoff,
)
from adapters.telegram_order import InOrder
from adapters.telegram_pastes import Pastes, join_pieces
from adapters.telegram_polling import (
    TOKEN_REFUSED_TEXT,
    PatientPolling,
    WatchedCalls,
    quiet_start_up_tracebacks,
    start_failures_in_one_line,
)
from adapters.telegram_sending import send_text, with_flood_control
from adapters.token_redaction import guard_token_in_logs
from adapters.typing_indicator import keep_typing
from persona.errors import ConfigError
from persona.settings import Settings

__all__ = ["TelegramBot", "run_telegram", "unknown_command_text"]

log = logging.getLogger(__name__)

TYPING_REFRESH_S = 4.5
# The local path the webhook server listens on (http://LISTEN:PORT/telegram); the public
# PERSONA_TELEGRAM__WEBHOOK_URL is what Telegram calls, usually a proxy forwarding here.
WEBHOOK_PATH = "telegram"
# How long an edit of a group message can still draw an answer, and so how long the bot
# remembers which messages it answered (in this process; see ``on_edit``).
EDIT_ANSWERED_WITHIN_S = 3600.0
# Group messages remembered as answered at most: more than the rate limits let through in that hour
# in any but the busiest deployments; past it, the oldest are forgotten first.
MAX_REMEMBERED_ANSWERS = 100_000


COMMANDS = [
    ("start", "say hello and see who you are talking to"),
    ("help", "what I can do"),
    ("persona", "show the persona, or switch it: /persona NAME"),
    ("reset", "forget our conversation"),
    ("retry", "answer your last message again, differently"),
    ("cancel", "withdraw the answer I am working on"),
]
NOT_TEXT_TEXT = (
    "I can only read text: I can't see pictures or stickers, hear voice messages or open files. "
    "Please write your message as text (a photo's caption too)."
)
HELP_TEXT = (
    "Talk to me: in a private chat just write; in a group mention me or reply to me.\n"
    + "\n".join(f"/{name} - {about}" for name, about in COMMANDS)
)


def unknown_command_text(command: str) -> str:
    """What a command the bot does not have gets: that, and the commands it has."""
    return f"I don't know the command {command}.\n\n{HELP_TEXT}"


class _Application(Application):
    """PTB's Application, telling the bot when it begins to stop (SIGTERM, Ctrl-C, ``stop()``):
    before it waits for the handlers still running, so questions waiting for a worker are
    withdrawn and their askers told, not waited for until the process is killed. It keeps
    nothing per chat or user: the bot's state is in Redis, and PTB's persistence is not used."""

    def __init__(self, *, on_stopping: Callable[[], None], **kwargs) -> None:
        super().__init__(**kwargs)
        self._on_stopping = on_stopping

    async def stop(self) -> None:
        self._on_stopping()
        await super().stop()

    def _mark_for_persistence_update(self, **kwargs) -> None:
        """Note the update's chat and user for PTB's persistence, if there is one. Without one,
        nothing ever emptied those sets (``update_persistence`` returns early): every chat and
        user id ever seen stayed in memory, about 150 bytes each, until a restart."""
        if self.persistence is not None:
            super()._mark_for_persistence_update(**kwargs)


class TelegramBot:
    """One Telegram bot serving the persona chosen in the settings."""

    def __init__(self, settings: Settings) -> None:
        options = settings.telegram
        if options.token is None:
            raise ConfigError("no Telegram token: set PERSONA_TELEGRAM__TOKEN (from @BotFather)")
        telegram_api_url(options.api_url, "persona telegram")  # a URL PTB cannot use is a setting to fix
        check_default_persona(settings, "telegram")
        self.settings = settings
        self.options = options
        token = options.token.get_secret_value()
        guard_token_in_logs(token)
        quiet_start_up_tracebacks()
        self.application = (
            Application.builder()
            .application_class(_Application, kwargs={"on_stopping": self._withdraw_questions})
            .token(token)
            .base_url(options.api_url)
            .base_file_url(re.sub(r"/bot$", "/file/bot", options.api_url))
            .request(WatchedCalls(serving=lambda: self.application.running, on_refused=self._token_refused))
            .get_updates_request(PatientPolling(
                options.api_url, options.reconnect_wait_cap_s,
                polling=lambda: self.application.updater.running, on_refused=self._token_refused,
            ))
            .concurrent_updates(True)  # /cancel must get through while an answer is pending
            .post_init(self._connect)
            .build()
        )
        self.responder: Responder | None = None
        self.access: AccessControl | None = None
        self._pastes = Pastes(options.paste_window_s, keep_s=EDIT_ANSWERED_WITHIN_S)
        self._in_order = InOrder(options.paste_window_s)  # a webhook's updates, as polling hands them out
        # Group messages answered (or being answered), by (chat id, message id): an edit never
        # answers one of them again.
        self.answered = AnsweredMessages(EDIT_ANSWERED_WITHIN_S, MAX_REMEMBERED_ANSWERS)
        self._started = dt.datetime.now(dt.UTC).replace(microsecond=0)  # Telegram's dates are whole seconds
        self._mode = "start"  # or "run", "serve": how a refused token ends the bot (``_token_refused``)
        self._refused = False  # the token was refused while serving
        self._stopping: asyncio.Task | None = None  # stopping by itself, the token refused
        self._stopped = asyncio.Event()  # stopped, by ``stop`` or by itself
        self._closed = False
        self._add_handlers()

    def _add_handlers(self) -> None:
        app = self.application
        if self.options.webhook_url and self.options.paste_window_s > 0:
            # Before every other handler (group -1). Updates run concurrently, so one waiting
            # for its turn holds no other.
            app.add_handler(TypeHandler(Update, self.in_turn), group=-1)
        # New messages only: an edit of a message already answered (or a command already
        # run) arrives as an edited_message update, and must not be answered again.
        new = filters.UpdateType.MESSAGE
        for name, handler in (
            ("start", self.on_start), ("help", self.on_help), ("persona", self.on_persona),
            ("reset", self.on_reset), ("retry", self.on_retry), ("cancel", self.on_cancel),
        ):
            app.add_handler(CommandHandler(name, handler, filters=new))
        app.add_handler(MessageHandler(new & filters.COMMAND, self.on_unknown_command))  # none of the above
        app.add_handler(MessageHandler(new & filters.TEXT & ~filters.COMMAND, self.on_message))
        edited = filters.UpdateType.EDITED_MESSAGE
        app.add_handler(MessageHandler(edited & ((filters.TEXT & ~filters.COMMAND) | filters.ATTACHMENT), self.on_edit))
        app.add_handler(MessageHandler(new & filters.ATTACHMENT, self.on_not_text))
        app.add_handler(MessageHandler(filters.StatusUpdate.MIGRATE, self.on_migrate))
        app.add_error_handler(self.on_error)

    async def _connect(self, app: Application) -> None:
        """Reach Redis (waiting for it if need be) and tell Telegram the command list."""
        client = await connect_with_backoff(self.settings)
        self.responder = Responder(client, self.settings, "telegram")
        self.access = AccessControl(
            client, "telegram", self.options.dm_policy, self.options.allowed_users, self.options.pairing_code_ttl_s
        )
        await with_flood_control(lambda: app.bot.set_my_commands([BotCommand(n, a) for n, a in COMMANDS]))
        log.info("Telegram bot @%s serving persona %s", app.bot.username, self.options.persona)

    def _token_refused(self) -> None:
        """The token was refused while serving (revoked with @BotFather): nothing more comes in or
        goes out. ``run`` stops and ends with the ConfigError a refused token gets at start (status
        78: `persona up` does not restart the adapter for it); a bot started by ``serve`` or
        ``start`` stops by itself, and ``serve`` ends with that error (after ``start``, the log says it)."""
        if self._refused:
            return
        self._refused = True
        if self._mode == "run":
            self.application.stop_running()
            return
        if self._mode == "start":
            log.error("%s; the Telegram bot stopped", TOKEN_REFUSED_TEXT)
        self._stopping = asyncio.get_running_loop().create_task(self._stop_serving())

    async def _stop_serving(self) -> None:
        """Stop taking updates and answering; ``stop`` closes the rest."""
        if self.application.updater.running:
            await self.application.updater.stop()
        if self.application.running:
            await self.application.stop()
        self._stopped.set()

    def _withdraw_questions(self) -> None:
        if self.responder is not None:
            self.responder.stop()

    async def start(self) -> None:
        """Start polling inside a running event loop (tests, or an embedding program)."""
        with start_failures_in_one_line(self.options):
            await self.application.initialize()
        await self._connect(self.application)
        await self.application.start()
        if self.options.webhook_url:
            await self.application.updater.start_webhook(**self._webhook_options())
        else:
            await self.application.updater.start_polling(poll_interval=0.0, timeout=dt.timedelta(seconds=1))

    async def serve(self) -> None:
        """Start, then serve until ``stop`` (for a program running the bot among its own tasks); a
        token refused meanwhile (revoked with @BotFather) stops the bot and ends this with the
        ConfigError a refused token gets at start, as ``run`` ends."""
        self._mode = "serve"
        await self.start()
        await self._stopped.wait()
        if self._refused:
            await self.stop()
            raise ConfigError(TOKEN_REFUSED_TEXT)

    async def stop(self) -> None:
        """Stop polling and close the connections."""
        if self._stopping is not None:
            await self._stopping
        if self.application.updater.running:
            await self.application.updater.stop()
        if self.application.running:
            await self.application.stop()
        if not self._closed:
            self._closed = True
            await self.application.shutdown()
            if self.responder is not None:
                await self.responder.redis.aclose()
        self._stopped.set()

    def _webhook_options(self) -> dict:
        """Where Telegram posts updates, and where we listen for them."""
        secret = self.options.webhook_secret
        return {
            "listen": self.options.webhook_listen, "port": self.options.webhook_port,
            "url_path": WEBHOOK_PATH, "webhook_url": self.options.webhook_url,
            "secret_token": secret.get_secret_value() if secret else None,
            "allowed_updates": Update.ALL_TYPES,
        }

    def run(self) -> None:
        """Serve until interrupted: long polling, or a webhook if one is configured; a token refused
        at start or meanwhile ends it with a ConfigError."""
        self._mode = "run"
        with start_failures_in_one_line(self.options):
            if self.options.webhook_url:
                self.application.run_webhook(**self._webhook_options())
            else:
                self.application.run_polling(allowed_updates=Update.ALL_TYPES)
        if self._refused:
            raise ConfigError(TOKEN_REFUSED_TEXT)

    # --- who is talking, and may they -------------------------------------------------

    async def _admitted(self, update: Update) -> bool:
        """Whether to serve this chat and user. The message counts against the rate limits (over
        them the one notice is sent, then nothing), and only then is a private user's access
        checked (a refused one is told why): a flood of refusals would answer a flood. A message
        written as a chat (``sender_chat``) is served: its ``from`` is a placeholder bot."""
        chat, user, message = update.effective_chat, update.effective_user, update.effective_message
        if chat is None or user is None or message is None or (user.is_bot and message.sender_chat is None):
            return False
        if chat.type != ChatType.PRIVATE and self.options.allowed_chats and chat.id not in self.options.allowed_chats:
            return False
        limits, notice = await self.responder.admit(self._where(update))
        if not limits.allowed:
            if notice:
                await self.say(update, notice, quote=True)
            return False
        if chat.type != ChatType.PRIVATE:
            return True
        decision = await self.access.check(str(user.id), user.full_name)
        if not decision.allowed:
            await self.say(update, decision.reply)
        return decision.allowed

    def _addressed_text(self, messages: list[Message], chat: Chat, context: ContextTypes.DEFAULT_TYPE) -> str | None:
        """The text (or caption) of these messages (the pieces of one paste, or one message) meant
        for the bot, perhaps empty; None when, in a group, none of them is addressed to it."""
        text = join_pieces([message.text or message.caption or "" for message in messages])
        if chat.type == ChatType.PRIVATE:
            return text
        # Usernames are letters, digits and underscores: @name_fan is someone else.
        mention = re.compile(rf"(?<![\w@])@{re.escape(context.bot.username or '')}(?!\w)", re.IGNORECASE | re.ASCII)
        if context.bot.username and mention.search(text):
            return mention.sub("", text).strip()
        if any(self._replies_to_bot(message, context) for message in messages):
            return text
        return None

    @staticmethod
    def _replies_to_bot(message: Message, context: ContextTypes.DEFAULT_TYPE) -> bool:
        replied = message.reply_to_message
        return replied is not None and replied.from_user is not None and replied.from_user.id == context.bot.id

    def _first_answer(self, chat: Chat, messages: list[Message]) -> bool:
        """Whether these group messages are answered for the first time; from now on they count
        as answered (a private chat's edits are never answered: nothing to remember there)."""
        return chat.type == ChatType.PRIVATE or self.answered.claim((chat.id, m.message_id) for m in messages)

    async def _admitted_once(self, updates: list[Update]) -> bool:
        """``_admitted`` for messages ``_first_answer`` took on: one refused is forgotten again, so a
        flood over the rate limits is not remembered for an hour."""
        if await self._admitted(updates[0]):
            return True
        self.answered.release((u.effective_chat.id, u.effective_message.message_id) for u in updates)
        return False

    @staticmethod
    def _where(update: Update) -> Where:
        """The conversation, and rate limit, a message counts in: its author's in its chat, or
        that of the chat it was written as. An anonymous admin writes as the group, anyone may
        write as their channel, and ``from`` then names a placeholder (GroupAnonymousBot,
        Channel_Bot) shared by every such message in every group."""
        sender = update.effective_message.sender_chat or update.effective_user
        return Where(chat=str(update.effective_chat.id), user=str(sender.id))

    def _paste_key(self, update: Update) -> tuple:
        """The pieces of one paste share this: their chat, topic and sender."""
        where = self._where(update)
        return where.chat, self._topic(update.effective_message), where.user

    @staticmethod
    def _topic(message: Message | None) -> int | None:
        """The forum topic a message was written in (None: not a topic). Without it, whatever
        the bot sends goes to the group's General topic, away from the question."""
        return message.message_thread_id if message is not None and message.is_topic_message else None

    # --- handlers -----------------------------------------------------------------------

    async def in_turn(self, update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
        """Handle a webhook's updates in the order Telegram numbered them, as polling does: the
        pieces of a paste that came out of order are gathered as one (``InOrder``)."""
        await self._in_order.turn(update.update_id)

    async def on_message(self, update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
        """Answer a text message, or the pieces of a paste as one (in groups, only one addressed
        to the bot)."""
        message, chat = update.effective_message, update.effective_chat
        if message is None or chat is None or (message.sender_chat or update.effective_user) is None:
            return
        pieces = await self._pastes.gather(self._paste_key(update), update)
        if pieces:
            await self._reply_to(pieces, context)

    async def on_edit(self, update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
        """Answer a group message edited to mention the bot: its author wrote the question, then
        remembered to address it, and expects the answer a message written that way gets. No
        other edit is answered: in private every message was answered as it came, and a group
        message addressed to the bot before was answered then, so an edit there fixes a typo,
        and a second answer to one message would surprise. Only what this process answered is
        known, so an edit of a message sent before it started (a bot before a restart may have
        answered it), or older than EDIT_ANSWERED_WITHIN_S, is left alone too. An edited piece of
        a paste answers the whole paste (still being gathered: it stands in it). A photo or file
        whose caption is edited to mention the bot gets what one captioned so gets (``on_not_text``)."""
        message, chat = update.effective_message, update.effective_chat
        if message is None or chat is None or chat.type == ChatType.PRIVATE:
            return
        age_s = (dt.datetime.now(dt.UTC) - message.date).total_seconds()
        if message.date < self._started or age_s > EDIT_ANSWERED_WITHIN_S:
            return
        if message.text is None:
            await self.on_not_text(update, context)
            return
        paste = self._pastes.edited(update)  # a piece of a paste: the paste is answered whole
        if paste is None:
            await self._reply_to([update], context)
        elif paste:
            await self._reply_to(paste, context)

    async def _reply_to(self, updates: list[Update], context: ContextTypes.DEFAULT_TYPE) -> None:
        """Answer these messages (one, or the pieces of a paste) as one, quoting the first: in a
        group only if addressed to the bot, and never a message answered already. A bare @mention
        is told to write its question too, rather than met with silence."""
        update, chat = updates[0], updates[0].effective_chat
        messages = [u.effective_message for u in updates]
        text = self._addressed_text(messages, chat, context)
        if text is None or not self._first_answer(chat, messages):
            return
        # Counted as it comes (a flood hears at once that it is over the limits), then answered in
        # its turn; both taken before anything awaits, so quick messages are answered in order.
        async with self.responder.admitted_turn(self._where(update), lambda: self._admitted_once(updates)) as admitted:
            if not admitted:
                return
            if not text:
                await self.say(update, BARE_MENTION_TEXT, quote=True)
                return
            await self._answer(update, context, lambda where, notify, deliver: self.responder.answer(
                where, text, notify=notify, deliver=deliver))

    async def on_not_text(self, update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
        """A photo, sticker, voice message, file...: say that only text is read, rather than
        nothing (in a group, only to one addressed to the bot, by a mention in its caption or
        as a reply). A caption is not answered on its own: it mostly speaks of what it
        captions ("what do you think of this?"), and an answer without that would pretend to
        have seen it; asking for text misleads nobody."""
        message, chat = update.effective_message, update.effective_chat
        if message is None or chat is None or self._addressed_text([message], chat, context) is None:
            return
        if not self._first_answer(chat, [message]):  # asked already; its caption edited since
            return
        if await self._admitted_once([update]):
            await self.say(update, NOT_TEXT_TEXT, quote=chat.type != ChatType.PRIVATE)

    async def on_migrate(self, update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
        """A group upgraded to a supergroup has a new chat id: its persona choice and
        conversations move to it. Telegram tells both chats (``migrate_to_chat_id`` in the old
        one, ``migrate_from_chat_id`` in the new); the first to arrive moves everything, the
        other finds nothing left to move."""
        message = update.effective_message
        if message.migrate_to_chat_id:
            old, new = message.chat_id, message.migrate_to_chat_id
        else:
            old, new = message.migrate_from_chat_id, message.chat_id
        await self._move_chat(old, new)

    async def _move_chat(self, old: int, new: int) -> None:
        """Carry a chat's persona choice and conversations over to its new id."""
        await self.responder.move_chat(str(old), str(new))
        allowed = self.options.allowed_chats
        if allowed and old in allowed and new not in allowed:
            log.warning("chat %s is now %s: add %s to PERSONA_TELEGRAM__ALLOWED_CHATS, or I stay quiet there",
                        old, new, new)

    async def _answer(
        self, update: Update, context: ContextTypes.DEFAULT_TYPE,
        make: Callable[[Where, Notify, Deliver], Awaitable[str]],
    ) -> None:
        """Show typing while ``make`` works (it may ``notify`` the asker meanwhile) and sends what it
        says (``deliver``); the message was ``_admitted``."""
        chat, message = update.effective_chat, update.effective_message
        where = self._where(update)
        topic = self._topic(message)
        quote = chat.type != ChatType.PRIVATE
        typing = lambda: context.bot.send_chat_action(chat.id, ChatAction.TYPING, message_thread_id=topic)

        async def notify(text: str) -> None:
            await self.say(update, text, quote=quote)

        async def deliver(text: str) -> bool:
            return await self.say(update, text, quote=quote)

        async with keep_typing(typing, TYPING_REFRESH_S):
            await make(where, notify, deliver)

    async def on_start(self, update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
        """Greet, and say who the user is talking to."""
        if not await self._admitted(update):
            return
        persona = await self.responder.persona_text(str(update.effective_chat.id), available=False)
        await self.say(update, f"Hello! {persona}\n\n{HELP_TEXT}")

    async def on_help(self, update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
        """List the commands."""
        if await self._admitted(update):
            await self.say(update, HELP_TEXT)

    async def on_persona(self, update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
        """Show this chat's persona, or switch it (in groups, administrators only)."""
        if not await self._admitted(update):
            return
        chat = update.effective_chat
        if not context.args:
            text = await self.responder.persona_text(str(chat.id))
        elif chat.type != ChatType.PRIVATE and not await self._is_admin(update):
            text = "Only the group's administrators can switch the persona here."
        else:
            text = await self.responder.set_persona(str(chat.id), context.args[0].lower())
        await self.say(update, text)

    async def _is_admin(self, update: Update) -> bool:
        """Whether the message's author administers its group. Only an anonymous admin writes
        as the group itself; one writing as a channel is not known to be an admin."""
        chat, written_as = update.effective_chat, update.effective_message.sender_chat
        if written_as is not None:
            return written_as.id == chat.id
        member = await with_flood_control(lambda: chat.get_member(update.effective_user.id))
        return member.status in (ChatMemberStatus.ADMINISTRATOR, ChatMemberStatus.OWNER)

    async def on_unknown_command(self, update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
        """A command the bot does not have (/ask, a typo): say so and list those it has, rather
        than stay silent, as if the bot were down. In a group, only one addressed to it
        (/command@its_name): a bare /command there may be another bot's."""
        message, chat = update.effective_message, update.effective_chat
        command, _, addressee = (message.text or "").split(maxsplit=1)[0].partition("@")
        if addressee.lower() != (context.bot.username or "").lower() and (addressee or chat.type != ChatType.PRIVATE):
            return
        if await self._admitted(update):
            await self.say(update, unknown_command_text(command))

    async def on_reset(self, update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
        """Forget the conversation."""
        if await self._admitted(update):
            await self.say(update, await self.responder.reset(self._where(update)))

    async def on_retry(self, update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
        """Answer the last message again, with a new seed."""
        if await self._admitted(update):
            await self._answer(update, context, lambda where, notify, deliver: self.responder.retry(
                where, notify=notify, deliver=deliver))

    async def on_cancel(self, update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
        """Withdraw the request still waiting or running."""
        if await self._admitted(update):
            await self.say(update, await self.responder.cancel(self._where(update)))

    async def on_error(self, update: object, context: ContextTypes.DEFAULT_TYPE) -> None:
        """The one place errors end up: log them with the traceback."""
        log.error("error while handling a Telegram update", exc_info=context.error)

    async def say(self, update: Update, text: str, *, quote: bool = False) -> bool:
        """Answer in the chat, and the forum topic, the update came from (quoting it if ``quote``);
        whether it all went out."""
        message = update.effective_message
        reply_to = message.message_id if quote and message is not None else None
        return await self.send(update.effective_chat.id, text, reply_to=reply_to, topic=self._topic(message))

    async def send(self, chat_id: int, text: str, reply_to: int | None = None, topic: int | None = None) -> bool:
        """Send text as ``send_text`` does; whether all of it went out. A chat found to have moved
        on the way takes its persona and conversations along (as ``on_migrate`` does)."""
        return await send_text(self.application.bot, chat_id, text, reply_to=reply_to, topic=topic,
                               on_moved=self._move_chat)

def run_telegram(settings: Settings) -> None:
    """Run the Telegram adapter until interrupted (``persona telegram``)."""
    TelegramBot(settings).run()
