"""A Telegram Bot API on loopback, enough for python-telegram-bot to poll and reply.

Tests queue updates (``push_message``, written as oneself or as a chat, as an anonymous group
admin or a channel writes; ``push_media`` for a photo, sticker, voice message or document,
``edit_message``, ``push_migration`` for a group upgraded to a supergroup, ``paste`` for a text
longer than a message, sent in pieces as Telegram's apps send one) that
``getUpdates`` hands out, or that ``deliver`` posts to the webhook the bot set (``setWebhook``),
one request each, in the order a test chooses, as Telegram's servers post them over several
connections at once; and read back what the bot did: ``sent`` (sendMessage),
``actions`` (sendChatAction), ``commands`` (setMyCommands), and every call in ``calls``.
``flood(method, seconds)`` makes the next call of a method fail with 429 "retry after", as
Telegram's flood control does. Once a group is upgraded, a call naming its old chat id
fails with 400 and the new id in ``migrate_to_chat_id``, as on Telegram. A text longer than
4,096 characters is refused with 400 "message is too long", and an empty one with "message
text is empty", as the Bot API does; it counts code points (tdlib's ``utf8_length``), not
UTF-16 code units, so 4,096 emoji pass.
A text sent with ``parse_mode`` HTML is parsed as the Bot API parses it (``visible_text``): only
Telegram's tags, properly nested, ``pre`` and ``code`` holding no other tag (but ``pre`` its one
``code``), and only its four named entities; anything else is refused with 400 "can't parse
entities", and the limit counts the text the user sees, not the markup. As on Telegram, only
the first 100 entities (tags) of a message are formatted and the rest silently ignored: a sent
message's ``ignored_entities`` lists those, the text showing them as plain. ``texts()`` is what
the user sees; ``sent`` holds the parameters as sent. ``refuse_html = True`` refuses every
HTML text that way, as Telegram would one the bot's formatting got wrong.
``fail_sends("502", "drop", "late", "ok")`` makes the next ``sendMessage`` calls fail, one each way: 502
"Bad Gateway", the connection dropped before any answer, or ("late") the message posted and its
answer held ``late_answer_s``, as a Telegram slow to confirm ("ok": that one goes through).
As Telegram does, the Bot API links each ``@username`` in a message's text, outside its code, and
notifies that user if they are in the chat: a sent message's ``mentions`` lists those usernames.
It links each URL, and makes no mention inside one: ``links`` lists them, each to where Telegram
ends it.
``other_instance = True`` plays a second bot polling with the same token: every ``getUpdates``
is answered 409 "Conflict", as Telegram answers all but one long poll per token, its time kept in
``conflicting_polls``. ``go_down()`` plays an outage of the Bot API until ``come_back()``: every call is answered with
502 "Bad Gateway", as Telegram's front answers while the API behind it is down, and the time
of each ``getUpdates`` so turned away is kept in ``refused_polls``.
"""

from __future__ import annotations

import asyncio
import contextlib
import html
import itertools
import json
import re
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import aiohttp
from aiohttp import web

BOT_ID = 777000
BOT_USERNAME = "persona_test_bot"
# The placeholder authors Telegram puts in ``from`` of a message written as a chat.
ANONYMOUS_ADMIN = {"id": 1087968824, "is_bot": True, "first_name": "Group", "username": "GroupAnonymousBot"}
CHANNEL_BOT = {"id": 136817688, "is_bot": True, "first_name": "Channel", "username": "Channel_Bot"}
MESSAGE_LIMIT_CHARS = 4096  # the Bot API's "message_text_length_max", in code points
MESSAGE_ENTITIES_MAX = 100  # formatted per message; Telegram silently ignores the rest


# The tags the Bot API's HTML knows (besides ``a``, ``span`` and ``tg-emoji``, which need attributes).
HTML_TAGS = {"b", "strong", "i", "em", "u", "ins", "s", "strike", "del", "code", "pre", "blockquote", "tg-spoiler"}
_HTML_TOKEN = re.compile(
    r"<(/?)([a-zA-Z][\w-]*)([^<>]*)>|&(lt|gt|amp|quot|#\d+|#x[0-9a-fA-F]+);|<|&"
)


# A mention as Telegram finds one (tdlib's find_mentions): "@" not after a letter, digit or
# underscore, then a username of 4 to 32 letters, digits and underscores, not running on.
_MENTION = re.compile(r"(?<!\w)@([A-Za-z0-9_]{4,32})(?!\w)")


def linked_mentions(text: str, code: list[tuple[int, int]] = ()) -> list[str]:
    """The usernames Telegram links, and notifies, in a message's ``text``: none inside ``code``
    (the shown text's spans in code or pre, where Telegram links nothing)."""
    return [m.group(1) for m in _MENTION.finditer(text) if not any(s < m.end() and m.start() < e for s, e in code)]


# A link as Telegram finds one (tdlib's find_urls, in short): from "http(s)://", or a dotted domain
# followed by a path, to the first space, "<", ">", '"' or character from U+2000 to U+206F (a word
# joiner among them), less a trailing ".:;,('?!`" or unmatched ")". Telegram makes no mention inside a link.
_LINK = re.compile(r"(?:https?://|(?<![\w./@-])[\w-]+(?:\.[\w-]+)*\.[A-Za-z]{2,}/)[^\s<>\"\u2000-\u206f]*")


def linked_urls(text: str) -> list[tuple[int, int]]:
    """Where Telegram links a URL in a message's shown ``text``."""
    spans = []
    for match in _LINK.finditer(text):
        link = match.group()
        while link[-1] in ".:;,('?!`" or link[-1] == ")" and link.count(")") > link.count("("):
            link = link[:-1]
        spans.append((match.start(), match.start() + len(link)))
    return spans


def visible_text(markup: str, entities: list[str] | None = None, code: list[tuple[int, int]] | None = None) -> str:
    """What a user sees of an HTML text, as the Bot API parses it; BadRequest where it would refuse it.
    ``entities`` gets the formatting it holds, a tag name each (``pre`` with its ``code``: one);
    ``code`` the spans of the text shown in code or pre."""
    shown: list[str] = []
    open_tags: list[str] = []
    position = 0
    for token in _HTML_TOKEN.finditer(markup):
        if code is not None and {"code", "pre"} & set(open_tags):
            start = sum(map(len, shown))
            code.append((start, start + token.start() - position))
        shown.append(markup[position:token.start()])
        position = token.end()
        closing, tag, attributes, entity = token.groups()
        where = f"at byte offset {len(markup[:token.start()].encode())}"
        if entity:
            shown.append(html.unescape(token.group(0)))
        elif tag is None:
            if token.group(0) == "<":
                raise BadRequest(f"can't parse entities: unexpected \"<\" {where}")
            shown.append("&")  # a lone ampersand is taken as one
        elif closing:
            if not open_tags or open_tags[-1] != tag.lower():
                raise BadRequest(f"can't parse entities: unexpected end tag {where}")
            open_tags.pop()
        else:
            tag = tag.lower()
            inside = open_tags[-1] if open_tags else ""
            allowed_here = inside not in ("code", "pre") or (inside == "pre" and tag == "code")
            plain = attributes.strip() == "" or (tag == "code" and re.fullmatch(r'\s*class="language-[\w+-]+"\s*', attributes))
            if tag not in HTML_TAGS or not plain:
                raise BadRequest(f"can't parse entities: unsupported start tag \"{tag}\" {where}")
            if not allowed_here:
                raise BadRequest(f"can't parse entities: entity \"{tag}\" inside \"{inside}\" {where}")
            if entities is not None and not (inside == "pre" and tag == "code"):
                entities.append(tag)
            open_tags.append(tag)
    if open_tags:
        raise BadRequest(f"can't parse entities: can't find end tag corresponding to start tag \"{open_tags[-1]}\"")
    shown.append(markup[position:])
    return "".join(shown)


def _utf16_units(text: str) -> int:
    """A text's length as Telegram's apps count it when they split a long message."""
    return len(text.encode("utf-16-le")) // 2


class BadRequest(Exception):
    """A call the Bot API refuses with 400 and this description."""


@dataclass
class FakeTelegram:
    """A fake Bot API for one bot token."""

    token: str
    updates: list[dict] = field(default_factory=list)
    sent: list[dict] = field(default_factory=list)
    actions: list[dict] = field(default_factory=list)
    commands: list[dict] = field(default_factory=list)
    calls: list[tuple[str, dict]] = field(default_factory=list)
    admins: set[int] = field(default_factory=set)
    floods: dict[str, list[int]] = field(default_factory=dict)
    migrated: dict[int, int] = field(default_factory=dict)  # a group's old chat id → its supergroup's
    refuse_html: bool = False  # True: refuse every text sent with parse_mode HTML
    down: bool = False  # True: every call is answered 502 Bad Gateway (``go_down``)
    refused_polls: list[float] = field(default_factory=list)  # when each getUpdates was turned away (monotonic)
    webhook: dict | None = None  # setWebhook's parameters, until deleteWebhook
    failing_sends: list[str] = field(default_factory=list)  # how the next sendMessage calls fail (``fail_sends``)
    late_answer_s: float = 2.0  # how long a "late" send's answer is held
    other_instance: bool = False  # True: another bot polls with this token; getUpdates answers 409
    conflicting_polls: list[float] = field(default_factory=list)  # when each getUpdates got 409 (monotonic)
    base_url: str = ""

    def __post_init__(self) -> None:
        self._ids = itertools.count(1)
        self._update_ids = itertools.count(1)  # sequential, as Telegram numbers a bot's updates
        self._new_update = asyncio.Event()
        self._runner: web.AppRunner | None = None

    async def start(self) -> str:
        """Serve on a free loopback port; returns the base URL to give the library."""
        app = web.Application()
        app.router.add_route("*", "/bot{token}/{method}", self._handle)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]
        self.base_url = f"http://127.0.0.1:{port}/bot"
        return self.base_url

    async def stop(self) -> None:
        # A long poll still waiting (up to a second) would hold the clean-up until it ends:
        # a second of every test. Answered now, it returns at once.
        self._new_update.set()
        if self._runner is not None:
            await self._runner.cleanup()

    # --- what tests do ------------------------------------------------------------------

    def push_message(
        self, text: str, *, chat_id: int = 1001, user_id: int = 1001, chat_type: str = "private",
        reply_to: dict | None = None, first_name: str = "Ada", topic: int | None = None,
        as_chat: int | None = None,
    ) -> dict:
        """Queue a user's message as an update; returns the message. ``topic``: written in that
        topic of a forum supergroup. ``as_chat``: written as that chat, not as oneself: the group's
        own id for an anonymous admin, a channel's id for "send as channel"."""
        message = self._message(chat_id, user_id, chat_type, reply_to, first_name, topic) | {"text": text}
        if as_chat is not None:
            own = as_chat == chat_id
            message["sender_chat"] = message["chat"] if own else {"id": as_chat, "type": "channel", "title": "a channel"}
            message["from"] = ANONYMOUS_ADMIN if own else CHANNEL_BOT
        command = re.match(r"/\w{1,64}(@\w+)?", text, re.ASCII)  # as Telegram marks one: not "//x" or "/ x"
        if command:
            message["entities"] = [{"type": "bot_command", "offset": 0, "length": command.end()}]
        return self._push(message)

    def paste(self, text: str, *, reply_to: dict | None = None, **kwargs) -> list[dict]:
        """Queue a paste longer than a message as Telegram's desktop app sends it: pieces of at most
        4,096 UTF-16 units, each cut at the last line break (else space, else mid-word) past half
        of that, and trimmed, as Telegram trims every message; only the first piece replies to
        ``reply_to``. Returns the messages; ``kwargs`` as for ``push_message``."""
        pieces, left = [], text
        while _utf16_units(left) > MESSAGE_LIMIT_CHARS:
            units, cut, newline, space = 0, 0, 0, 0
            for cut, char in enumerate(left):
                units += _utf16_units(char)
                if units > MESSAGE_LIMIT_CHARS:
                    break
                if units > MESSAGE_LIMIT_CHARS // 2 and char == "\n":
                    newline = cut
                elif units > MESSAGE_LIMIT_CHARS // 2 and char.isspace():
                    space = cut
            cut = newline or space or cut
            pieces.append(left[:cut].strip())
            left = left[cut:]
        pieces.append(left.strip())
        return [self.push_message(piece, reply_to=reply_to if n == 0 else None, **kwargs) for n, piece in enumerate(pieces)]

    def push_media(
        self, kind: str, *, caption: str | None = None, chat_id: int = 1001, user_id: int = 1001,
        chat_type: str = "private", reply_to: dict | None = None, topic: int | None = None,
    ) -> dict:
        """Queue a user's ``photo``, ``sticker``, ``voice`` or ``document`` (with ``caption``)."""
        file = {"file_id": f"file{next(self._ids)}", "file_unique_id": f"u{next(self._ids)}"}
        content = {
            "photo": [file | {"width": 90, "height": 90}],
            "sticker": file | {"type": "regular", "width": 512, "height": 512, "is_animated": False, "is_video": False},
            "voice": file | {"duration": 3},
            "document": file | {"file_name": "notes.pdf"},
        }[kind]
        message = self._message(chat_id, user_id, chat_type, reply_to, "Ada", topic) | {kind: content}
        if caption is not None:
            message["caption"] = caption
        return self._push(message)

    def push_migration(self, old_chat_id: int, new_chat_id: int, *, user_id: int = 1001) -> None:
        """A group upgraded to a supergroup: Telegram tells the old chat where it went, and the
        new chat where it came from (two service messages). From now on the old id is refused."""
        self.migrated[old_chat_id] = new_chat_id
        self._push(self._message(old_chat_id, user_id, "group", None, "Ada", None) | {"migrate_to_chat_id": new_chat_id})
        self._push(self._message(new_chat_id, user_id, "supergroup", None, "Ada", None) | {"migrate_from_chat_id": old_chat_id})

    def _message(
        self, chat_id: int, user_id: int, chat_type: str, reply_to: dict | None, first_name: str, topic: int | None
    ) -> dict:
        message = {
            "message_id": next(self._ids),
            "date": int(time.time()),
            "chat": {"id": chat_id, "type": chat_type, **({"title": "a group"} if chat_type != "private" else {"first_name": first_name})},
            "from": {"id": user_id, "is_bot": False, "first_name": first_name},
        }
        if reply_to is not None:
            message["reply_to_message"] = reply_to
        if topic is not None:
            message |= {"message_thread_id": topic, "is_topic_message": True}
            message["chat"] |= {"type": "supergroup", "is_forum": True}
        return message

    def _push(self, message: dict) -> dict:
        self.updates.append({"update_id": next(self._update_ids), "message": message})
        self._new_update.set()
        return message

    def edit_message(self, message: dict, text: str) -> dict:
        """Queue the user's edit of an earlier message (an ``edited_message`` update): of its text,
        or of its caption if it is a photo, file...: that is what Telegram lets one edit there."""
        field_name = "text" if "text" in message else "caption"
        edited = {**message, field_name: text, "edit_date": int(time.time())}
        self.updates.append({"update_id": next(self._update_ids), "edited_message": edited})
        self._new_update.set()
        return edited

    async def deliver(self, *messages: dict) -> None:
        """Post the updates that queued these messages to the bot's webhook, one request each, in
        this order, each once the one before was answered (200): as Telegram's servers post a
        webhook's updates, over several connections at once, so that a later one may come first."""
        assert self.webhook is not None, "no webhook set: start the bot with a webhook_url"
        secret = self.webhook.get("secret_token")
        headers = {"X-Telegram-Bot-Api-Secret-Token": secret} if secret else {}
        async with aiohttp.ClientSession() as session:
            for message in messages:
                update = next(u for u in self.updates if message in (u.get("message"), u.get("edited_message")))
                async with session.post(self.webhook["url"], json=update, headers=headers) as answer:
                    assert answer.status == 200, f"the webhook answered {answer.status}"

    def go_down(self) -> None:
        """Answer every call with 502 Bad Gateway until ``come_back``; a long poll waiting now ends."""
        self.down = True
        self._new_update.set()

    def come_back(self) -> None:
        self.down = False

    def fail_sends(self, *ways: str) -> None:
        """Make the next ``sendMessage`` calls fail, one each way: ``"502"``, ``"drop"`` (the
        connection closes before any answer), ``"late"`` (posted, then answered only after
        ``late_answer_s``), or ``"ok"`` (that one goes through)."""
        self.failing_sends.extend(ways)

    def flood(self, method: str, seconds: int, times: int = 1) -> None:
        """Make the next ``times`` calls of ``method`` fail with flood control."""
        self.floods.setdefault(method, []).extend([seconds] * times)

    def texts(self, chat_id: int | None = None) -> list[str]:
        """What the user sees of each message sent (to ``chat_id``): its text, less any HTML markup."""
        return [m["visible"] for m in self.sent if chat_id is None or m["chat_id"] == chat_id]

    async def wait_for(self, predicate, timeout: float = 30.0) -> None:
        """Wait until ``predicate()`` holds; fail with what was sent if it never does."""
        deadline = time.monotonic() + timeout
        while not predicate():
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out; sent so far: {self.texts()!r}")
            await asyncio.sleep(0.05)

    # --- the API ------------------------------------------------------------------------

    async def _params(self, request: web.Request) -> dict:
        if request.content_type == "application/json":
            return await request.json()
        form = await request.post()
        params = {}
        for key, value in form.items():
            try:
                params[key] = json.loads(value) if isinstance(value, str) else value
            except ValueError:
                params[key] = value
        return params

    async def _handle(self, request: web.Request) -> web.Response:
        if request.match_info["token"] != self.token:
            return web.json_response({"ok": False, "error_code": 401, "description": "Unauthorized"}, status=401)
        method = request.match_info["method"]
        if self.down:
            if method == "getUpdates":
                self.refused_polls.append(time.monotonic())
            return web.json_response({"ok": False, "error_code": 502, "description": "Bad Gateway"}, status=502)
        if method == "getUpdates" and self.other_instance:
            self.conflicting_polls.append(time.monotonic())
            return web.json_response({"ok": False, "error_code": 409, "description": (
                "Conflict: terminated by other getUpdates request; make sure that only one bot instance is running")},
                status=409)
        params = await self._params(request)
        self.calls.append((method, params))
        failing = self.failing_sends.pop(0) if method == "sendMessage" and self.failing_sends else None
        if failing == "502":
            return web.json_response({"ok": False, "error_code": 502, "description": "Bad Gateway"}, status=502)
        if failing == "drop":
            request.transport.close()
            return web.Response(status=500)  # never written: the connection is gone
        pending_floods = self.floods.get(method)
        if pending_floods:
            seconds = pending_floods.pop(0)
            return web.json_response(
                {"ok": False, "error_code": 429, "description": f"Too Many Requests: retry after {seconds}",
                 "parameters": {"retry_after": seconds}},
                status=429,
            )
        moved_to = self.migrated.get(params.get("chat_id"))
        if moved_to is not None:
            return web.json_response(
                {"ok": False, "error_code": 400, "description": "Bad Request: group chat was upgraded to a supergroup chat",
                 "parameters": {"migrate_to_chat_id": moved_to}},
                status=400,
            )
        handler = getattr(self, f"_api_{method}", None)
        try:
            result = await handler(params) if handler else True
        except BadRequest as exc:
            return web.json_response({"ok": False, "error_code": 400, "description": f"Bad Request: {exc}"}, status=400)
        if failing == "late":  # posted; the answer comes after the client may have stopped waiting
            await asyncio.sleep(self.late_answer_s)
        return web.json_response({"ok": True, "result": result})

    @staticmethod
    def bot_user() -> dict:
        return {"id": BOT_ID, "is_bot": True, "first_name": "Persona", "username": BOT_USERNAME,
                "can_join_groups": True, "can_read_all_group_messages": False, "supports_inline_queries": False}

    async def _api_getMe(self, params: dict) -> dict:
        return self.bot_user()

    async def _api_getUpdates(self, params: dict) -> list[dict]:
        offset = int(params.get("offset") or 0)
        wait_s = min(float(params.get("timeout") or 0), 1.0)
        ready = [u for u in self.updates if u["update_id"] >= offset]
        if not ready and wait_s:
            self._new_update.clear()
            try:
                await asyncio.wait_for(self._new_update.wait(), wait_s)
            except TimeoutError:
                pass
            ready = [u for u in self.updates if u["update_id"] >= offset]
        return ready

    async def _api_sendMessage(self, params: dict) -> dict:
        text = str(params.get("text", ""))
        code: list[tuple[int, int]] = []
        if str(params.get("parse_mode", "")).lower() == "html":
            if self.refuse_html:
                raise BadRequest("can't parse entities: unsupported start tag \"b\" at byte offset 0")
            entities: list[str] = []
            text = visible_text(text, entities, code)
            params["ignored_entities"] = entities[MESSAGE_ENTITIES_MAX:]  # shown unformatted
        code += linked_urls(text)  # Telegram makes no mention inside a link either
        params["links"] = [text[start:end] for start, end in linked_urls(text)]  # each as Telegram links it
        params["mentions"] = linked_mentions(text, code)  # before the trim, which moves no mention
        text = text.strip()
        if not text:
            raise BadRequest("message text is empty")
        if len(text) > MESSAGE_LIMIT_CHARS:
            raise BadRequest("message is too long")
        params["visible"] = text  # what the user sees (``texts``); ``text`` is as sent
        self.sent.append(params)
        chat_id = int(params["chat_id"])
        return {
            "message_id": next(self._ids), "date": int(time.time()),
            "chat": {"id": chat_id, "type": "private" if chat_id > 0 else "group"},
            "from": self.bot_user(), "text": text,
        }

    async def _api_setWebhook(self, params: dict) -> bool:
        self.webhook = params
        return True

    async def _api_deleteWebhook(self, params: dict) -> bool:
        self.webhook = None
        return True

    async def _api_sendChatAction(self, params: dict) -> bool:
        self.actions.append({**params, "at": time.monotonic()})
        return True

    async def _api_setMyCommands(self, params: dict) -> bool:
        self.commands = params.get("commands", [])
        return True

    async def _api_getChatMember(self, params: dict) -> dict:
        user_id = int(params["user_id"])
        status = "administrator" if user_id in self.admins else "member"
        member = {"status": status, "user": {"id": user_id, "is_bot": False, "first_name": "Someone"}}
        if status == "administrator":
            member |= {"can_be_edited": False, "is_anonymous": False, "can_manage_chat": True,
                       "can_delete_messages": True, "can_manage_video_chats": True, "can_restrict_members": True,
                       "can_promote_members": False, "can_change_info": True, "can_invite_users": True,
                       "can_post_stories": False, "can_edit_stories": False, "can_delete_stories": False}
        return member


@contextlib.contextmanager
def in_a_thread(token: str) -> Iterator[FakeTelegram]:
    """The fake Bot API on its own loop and thread, for code that runs its own event loop
    (``run_telegram``, or the adapter a ``persona up`` starts)."""
    loop = asyncio.new_event_loop()
    fake = FakeTelegram(token=token)
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    asyncio.run_coroutine_threadsafe(fake.start(), loop).result(10)
    try:
        yield fake
    finally:
        asyncio.run_coroutine_threadsafe(fake.stop(), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()
