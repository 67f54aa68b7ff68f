"""A Discord on loopback, enough for discord.py to log in, connect and talk.

REST: /users/@me, /oauth2/applications/@me, /gateway/bot, a thread's channel object,
channel messages (create and fetch), typing, application commands (sync), interaction
callbacks, follow-ups, and editing or deleting an interaction's original response.
Gateway (websocket, JSON text frames): HELLO, IDENTIFY → READY and GUILD_CREATE,
RESUME → RESUMED (counted in ``resumes``), heartbeat ACKs, and dispatches the tests ask for (MESSAGE_CREATE, MESSAGE_UPDATE for
``edit_message``, INTERACTION_CREATE, THREAD_CREATE). Tests read back what the bot did: ``sent`` (messages it posted, replies
to interactions included), ``typing`` (channel ids), ``interaction_responses``.
``rate_limit(route_prefix, seconds)`` answers the next matching request with a 429.
``delete(message)`` removes a message; a reply to it then fails with 400 "Unknown
message", as on Discord, unless the reply says ``fail_if_not_exists: false``.
An interaction must get its first response within 3 s of being created, as on Discord;
a later one fails with 404 "Unknown interaction" (follow-ups stay open). A follow-up
message carries ``interaction_metadata`` (and the older ``interaction``) naming the
interaction and its user, as Discord's do. As on Discord, the first follow-up after a
deferred response ("thinking…") fills that response in, which keeps the visibility it was
deferred with (the follow-up's ephemeral flag, 64, is ignored); once the original response
is deleted (``deleted_originals``), a follow-up is a message of its own, with its own flags.
Editing the original response while it is "thinking…" fills it in the same way; a later edit
changes its content in place (in ``sent`` too).
``public_texts()`` is what everyone in the channel sees.
``fail_sends("503", "drop", "drop after posting")`` makes the next messages the bot posts fail
(in a channel, as a follow-up, or as an edit of an interaction's original response), one way
each: 503 from the proxy in front of the API, the connection dropped before any answer, or
dropped once the message was posted (or edited); ``"ok"`` posts one as usual. A message sent with ``enforce_nonce`` and a
nonce already used is not posted again: the one posted is answered, as on Discord.
``end_sessions(code)`` closes the gateway's connections with that close code (4004: the token
was reset). ``go_down()`` plays an outage of the gateway until ``come_back()``: the connections open are
closed (1001, going away) and each new one is refused with 502 before it opens, its time kept
in ``refused_connections``.
The guild has the role Discord makes for a bot when it joins (``BOT_ROLE_ID``, named like the
bot, tagged with its id); ``user_message(mention_bot_role=True)`` mentions that role, as people
do who pick it from the mention menu, and ``attachment=`` adds a file (a picture, say; or the
``message.txt`` Discord's app makes of a message longer than 2,000 characters, with
``attachment_bytes=``). The fake serves a file's bytes itself, at ``/attachments/...`` on its own
port (the ``url`` and ``proxy_url`` in the payload), so ``Attachment.read()`` downloads them over
a real socket; each download is counted in ``downloads``, and a file named in ``gone_files``
answers 404, as Discord's CDN does once a file is deleted.
Mentions of people and channels: ``user_message(mentions=[(id, name)])`` lists the people that
``<@id>`` in the content names, as Discord's payload does (``slash(mentions=...)``: in the
interaction's ``resolved`` users); the guild has the channels
``general`` and ``off-topic`` and the roles ``persona-ops`` and ``persona``.
``stranger_guild()`` adds a server someone else made and invited the bot to (GUILD_CREATE), with
a channel ``lobby`` and a role its owner named ``persona-ops`` too; ``slash(guild_id=...)`` runs
a command there.
Content longer than 2,000 characters is refused with 400 (50035, BASE_TYPE_MAX_LENGTH), and a
message with no content at all with 400 (50006), wherever a message is sent (channel,
interaction response, follow-up), as on Discord, whose API counts code points (Python's
``len``), not UTF-16 code units.
``thread(announced=False)`` makes a thread the bot never hears of, so discord.py cannot
cache it; ``GET /channels/{id}`` (counted in ``requests``) is how the bot learns its parent,
answered with 403 for the ids in ``forbidden_channels``.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import mimetypes
import time
from dataclasses import dataclass, field

from aiohttp import WSMsgType, web

BOT_ID = 900000000000000001
APP_ID = 900000000000000002
GUILD_ID = 910000000000000001
CHANNEL_ID = 920000000000000001
OTHER_CHANNEL_ID = 920000000000000002
OPERATOR_ROLE_ID = 930000000000000001
BOT_ROLE_ID = 930000000000000002  # the managed role Discord gives the bot in a guild
STRANGER_GUILD_ID = 910000000000000002  # someone else's server, which invited the bot
STRANGER_CHANNEL_ID = 920000000000000003
STRANGER_ROLE_ID = 930000000000000003  # named like the operators' role, made by that server's owner
TIMESTAMP = "2025-01-01T00:00:00.000000+00:00"
INTERACTION_RESPONSE_S = 3.0  # Discord's window for an interaction's first response
MESSAGE_LIMIT_CHARS = 2000  # content, in code points


def _json(data, status: int = 200, headers: dict | None = None) -> web.Response:
    # discord.py reads a body as JSON only when the content type is exactly this (no charset).
    return web.Response(body=json.dumps(data).encode(), status=status,
                        headers={"Content-Type": "application/json", **(headers or {})})


def user(user_id: int, name: str, bot: bool = False) -> dict:
    return {"id": str(user_id), "username": name, "discriminator": "0", "global_name": name, "avatar": None, "bot": bot}


def _role(role_id: int, name: str, *, position: int = 0, permissions: str = "0") -> dict:
    return {"id": str(role_id), "name": name, "permissions": permissions, "position": position, "color": 0,
            "hoist": False, "managed": False, "mentionable": False}


def _guild(guild_id: int, name: str, roles: list[dict], channels: dict[int, str]) -> dict:
    """A GUILD_CREATE payload: the bot is a member, its text channels are ``channels`` (id → name)."""
    channel = {"type": 0, "position": 0, "permission_overwrites": [], "nsfw": False, "parent_id": None}
    return {
        "id": str(guild_id), "name": name, "icon": None, "owner_id": "1", "unavailable": False,
        "member_count": 3, "large": False, "features": [], "emojis": [], "stickers": [], "voice_states": [],
        "presences": [], "threads": [], "stage_instances": [], "guild_scheduled_events": [], "roles": roles,
        "channels": [{**channel, "id": str(i), "name": n} for i, n in channels.items()],
        "members": [{"user": user(BOT_ID, "persona", bot=True), "roles": [], "joined_at": TIMESTAMP,
                     "deaf": False, "mute": False, "flags": 0}],
    }


@dataclass
class FakeDiscord:
    """A fake Discord API and gateway for one bot."""

    token: str
    sent: list[dict] = field(default_factory=list)
    typing: list[tuple[int, float]] = field(default_factory=list)
    interaction_responses: list[dict] = field(default_factory=list)
    deleted_originals: list[str] = field(default_factory=list)  # interaction ids
    commands: list[dict] = field(default_factory=list)
    requests: list[tuple[str, str]] = field(default_factory=list)
    messages: dict[int, dict] = field(default_factory=dict)
    threads: dict[int, dict] = field(default_factory=dict)
    forbidden_channels: set[int] = field(default_factory=set)
    limits: dict[str, list[float]] = field(default_factory=dict)
    api_url: str = ""
    identified: asyncio.Event = field(default_factory=asyncio.Event)
    message_content_allowed: bool = True  # False: refuse the privileged intent (close 4014)
    files: dict[str, bytes] = field(default_factory=dict)  # an attachment's path → its bytes
    downloads: list[str] = field(default_factory=list)  # attachment paths, as fetched
    gone_files: set[str] = field(default_factory=set)  # file names whose download answers 404
    down: bool = False  # True: the gateway refuses every connection (``go_down``)
    refused_connections: list[float] = field(default_factory=list)  # when each was refused (monotonic)
    resumes: int = 0  # sessions resumed (RESUME answered with RESUMED)
    failing_sends: list[str] = field(default_factory=list)  # how the next messages posted fail (``fail_sends``)

    def __post_init__(self) -> None:
        self._ids = itertools.count(950000000000000001)
        self._sequence = itertools.count(1)
        self._sockets: list[web.WebSocketResponse] = []
        self._interactions_created: dict[str, float] = {}  # interaction id → when it was created
        self._interactions_by_token: dict[str, dict] = {}
        # token → the original response: {"loading": deferred and not filled in yet,
        # "flags": its visibility, "message": its message's id, once it has one}
        self._originals: dict[str, dict] = {}
        self._runner: web.AppRunner | None = None
        self.base_url = self.ws_url = ""

    async def start(self) -> str:
        """Serve REST and gateway on a free loopback port; returns the API base URL."""
        app = web.Application()
        app.router.add_get("/gateway-ws/", self._gateway)
        app.router.add_get("/attachments/{path:.*}", self._download)
        app.router.add_route("*", "/api/v10/{path:.*}", self._rest)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]
        self.base_url = f"http://127.0.0.1:{port}"
        self.api_url = f"{self.base_url}/api/v10"
        self.ws_url = f"ws://127.0.0.1:{port}/gateway-ws/"
        return self.api_url

    async def stop(self) -> None:
        for socket in self._sockets:
            await socket.close()
        if self._runner is not None:
            await self._runner.cleanup()

    # --- what tests do ------------------------------------------------------------------

    async def dispatch(self, event: str, data: dict) -> None:
        """Send a gateway event to every connected client."""
        frame = json.dumps({"op": 0, "t": event, "s": next(self._sequence), "d": data})
        for socket in self._sockets:
            if not socket.closed:
                await socket.send_str(frame)

    async def user_message(
        self, content: str, *, author_id: int = 111, author_name: str = "ada", channel_id: int = CHANNEL_ID,
        guild: bool = True, mention_bot: bool = False, reply_to: dict | None = None, roles: list[int] | None = None,
        mention_bot_role: bool = False, attachment: str | None = None, attachment_bytes: bytes | None = None,
        content_type: str | None = None, mentions: list[tuple[int, str]] | None = None,
    ) -> dict:
        """A person's message, dispatched as MESSAGE_CREATE; returns its payload. ``attachment``:
        the name of a file sent with it, holding ``attachment_bytes`` (1 KiB of zeros if not given),
        of ``content_type`` (by default guessed from the name, as Discord does: ``message.txt`` is
        ``text/plain; charset=utf-8``). ``mentions``: the people (id, name) the content mentions."""
        files = [self._attachment(attachment, attachment_bytes, content_type, channel_id)] if attachment else []
        message = {
            "id": str(next(self._ids)), "channel_id": str(channel_id), "author": user(author_id, author_name),
            **self._content(content, mention_bot, mention_bot_role), "timestamp": TIMESTAMP,
            "edited_timestamp": None, "tts": False, "mention_everyone": False,
            "attachments": files, "embeds": [], "pinned": False, "type": 19 if reply_to else 0, "flags": 0,
        }
        message["mentions"] += [user(person_id, name) for person_id, name in mentions or []]
        if guild:
            message["guild_id"] = str(GUILD_ID)
            message["member"] = {"roles": [str(r) for r in roles or []], "joined_at": TIMESTAMP, "deaf": False, "mute": False, "flags": 0}
        if reply_to is not None:
            message["message_reference"] = {"message_id": reply_to["id"], "channel_id": reply_to["channel_id"],
                                            **({"guild_id": str(GUILD_ID)} if guild else {})}
            message["referenced_message"] = reply_to
        self.messages[int(message["id"])] = message
        await self.dispatch("MESSAGE_CREATE", message)
        return message

    def _attachment(self, name: str, data: bytes | None, content_type: str | None, channel_id: int) -> dict:
        """An attachment's payload; its bytes are served at its ``url`` (see ``_download``)."""
        data = bytes(1024) if data is None else data
        if content_type is None:
            guessed = mimetypes.guess_type(name)[0]
            content_type = f"{guessed}; charset=utf-8" if guessed and guessed.startswith("text/") else guessed
        file_id = str(next(self._ids))
        path = f"{channel_id}/{file_id}/{name}"
        self.files[path] = data
        url = f"{self.base_url}/attachments/{path}"
        return {"id": file_id, "filename": name, "size": len(data), "url": url, "proxy_url": url,
                **({"content_type": content_type} if content_type else {})}

    async def edit_message(
        self, message: dict, content: str, *, mention_bot: bool = False, mention_bot_role: bool = False
    ) -> dict:
        """The author edits a message: MESSAGE_UPDATE with the whole message as it now reads, as
        Discord sends when the content changes; returns it."""
        edited = {**message, **self._content(content, mention_bot, mention_bot_role), "edited_timestamp": TIMESTAMP}
        self.messages[int(edited["id"])] = edited
        await self.dispatch("MESSAGE_UPDATE", edited)
        return edited

    @staticmethod
    def _content(content: str, mention_bot: bool, mention_bot_role: bool) -> dict:
        """A message's content and the mentions Discord parses out of it."""
        return {
            "content": (f"<@{BOT_ID}> " if mention_bot else "") + (f"<@&{BOT_ROLE_ID}> " if mention_bot_role else "")
            + content,
            "mentions": [user(BOT_ID, "persona", bot=True)] if mention_bot else [],
            "mention_roles": [str(BOT_ROLE_ID)] if mention_bot_role else [],
        }

    def delete(self, message: dict) -> None:
        """The author (or a moderator) deletes a message."""
        del self.messages[int(message["id"])]

    async def thread(self, parent_id: int = CHANNEL_ID, name: str = "side talk", *, announced: bool = True) -> int:
        """A public thread started in a channel, dispatched as THREAD_CREATE; returns its id.

        ``announced=False``: no THREAD_CREATE, like a thread from before the bot connected or an
        archived one; discord.py then gives its messages a PartialMessageable, without a parent.
        """
        thread = {
            "id": str(next(self._ids)), "guild_id": str(GUILD_ID), "parent_id": str(parent_id), "type": 11,
            "name": name, "owner_id": "111", "last_message_id": None, "rate_limit_per_user": 0,
            "message_count": 0, "member_count": 1, "flags": 0, "newly_created": True,
            "thread_metadata": {"archived": False, "auto_archive_duration": 1440, "archive_timestamp": TIMESTAMP,
                                "locked": False},
        }
        self.threads[int(thread["id"])] = thread
        if announced:
            await self.dispatch("THREAD_CREATE", thread)
        return int(thread["id"])

    async def slash(
        self, name: str, options: dict | None = None, *, author_id: int = 111, roles: list[int] | None = None,
        channel_id: int = CHANNEL_ID, guild: bool = True, mentions: list[tuple[int, str]] | None = None,
        guild_id: int = GUILD_ID,
    ) -> dict:
        """A slash command, dispatched as INTERACTION_CREATE; returns its payload. ``guild=False``:
        used in a DM with the bot (``channel_id`` is then the DM's). ``mentions``: the people (id,
        name) its string options mention, which the payload's ``resolved`` names, as Discord's does.
        ``guild_id``: the server it was used in (``channel_id`` one of its channels)."""
        asker = user(author_id, "ada")
        interaction = {
            "id": str(next(self._ids)), "application_id": str(APP_ID), "type": 2, "token": f"itoken{next(self._ids)}",
            "version": 1, "channel_id": str(channel_id),
            "app_permissions": "2147483647", "locale": "en-US", "entitlements": [], "attachment_size_limit": 8388608,
            "data": {"id": str(next(self._ids)), "name": name, "type": 1,
                     "options": [{"name": k, "type": 3, "value": v} for k, v in (options or {}).items()]},
        }
        if mentions:
            interaction["data"]["resolved"] = {"users": {str(i): user(i, name) for i, name in mentions}}
        if guild:
            interaction |= {
                "guild_id": str(guild_id), "guild_locale": "en-US", "context": 0,
                "channel": self.threads.get(channel_id) or {
                    "id": str(channel_id), "type": 0, "guild_id": str(guild_id), "name": "general", "position": 0,
                    "permission_overwrites": []},
                "member": {"user": asker, "roles": [str(r) for r in roles or []], "joined_at": TIMESTAMP,
                           "permissions": "2147483647", "deaf": False, "mute": False, "flags": 0},
                "authorizing_integration_owners": {"0": str(guild_id)},
            }
        else:
            interaction |= {
                "context": 1, "user": asker, "authorizing_integration_owners": {"0": "0"},
                "channel": {"id": str(channel_id), "type": 1, "recipients": [asker], "last_message_id": None},
            }
        self._interactions_created[interaction["id"]] = time.monotonic()
        self._interactions_by_token[interaction["token"]] = interaction
        await self.dispatch("INTERACTION_CREATE", interaction)
        return interaction

    async def stranger_guild(self) -> None:
        """Someone else's server joins (they invited the bot): GUILD_CREATE with its channel
        ``lobby`` (STRANGER_CHANNEL_ID) and the role ``persona-ops`` they made (STRANGER_ROLE_ID)."""
        roles = [_role(STRANGER_GUILD_ID, "@everyone"), _role(STRANGER_ROLE_ID, "persona-ops", position=1)]
        await self.dispatch("GUILD_CREATE", _guild(STRANGER_GUILD_ID, "a stranger's server", roles, {STRANGER_CHANNEL_ID: "lobby"}))

    async def go_down(self) -> None:
        """Close the gateway's connections and refuse new ones (502) until ``come_back``."""
        self.down = True
        for socket in self._sockets:
            await socket.close(code=1001)

    def come_back(self) -> None:
        self.down = False

    async def end_sessions(self, code: int, reason: str = "") -> None:
        """Close the gateway's connections with a close code Discord ends a session with for good
        (4004 when the token was reset in the Developer Portal: set ``token`` too)."""
        for socket in self._sockets:
            await socket.close(code=code, message=reason.encode())

    def fail_sends(self, *ways: str) -> None:
        """Make the next messages the bot posts (in a channel, as follow-ups, as edits of an original
        response) fail, one each way: ``"503"``, ``"drop"`` (the connection closes before any
        answer), ``"drop after posting"`` (it closes once the message was posted, so the bot never
        hears that it was); ``"ok"`` lets one through, so that a later one fails."""
        self.failing_sends.extend(ways)

    def rate_limit(self, route_prefix: str, seconds: float, times: int = 1) -> None:
        """Answer the next ``times`` requests whose path starts with ``route_prefix`` with 429."""
        self.limits.setdefault(route_prefix, []).extend([seconds] * times)

    def texts(self, channel_id: int | None = None) -> list[str]:
        return [m["content"] for m in self.sent if channel_id is None or int(m["channel_id"]) == channel_id]

    def public_texts(self) -> list[str]:
        """What the bot posted for everyone to see: not ephemeral, and not deleted since."""
        return [m["content"] for m in self.sent if not m["flags"] & 64 and int(m["id"]) in self.messages]

    async def wait_for(self, predicate, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while not predicate():
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out; sent so far: {self.texts()!r}; interactions: {self.interaction_responses!r}")
            await asyncio.sleep(0.05)

    # --- the gateway --------------------------------------------------------------------

    async def _gateway(self, request: web.Request) -> web.StreamResponse:
        if self.down:
            self.refused_connections.append(time.monotonic())
            return web.Response(status=502, text="Bad Gateway")
        socket = web.WebSocketResponse()
        await socket.prepare(request)
        self._sockets.append(socket)
        await socket.send_str(json.dumps({"op": 10, "d": {"heartbeat_interval": 41250}}))
        async for frame in socket:
            if frame.type != WSMsgType.TEXT:
                continue
            payload = json.loads(frame.data)
            if payload["op"] == 1:
                await socket.send_str(json.dumps({"op": 11}))
            elif payload["op"] == 2:
                if payload["d"]["token"] != self.token:
                    await socket.close(code=4004)
                    break
                self.intents = payload["d"].get("intents")
                if not self.message_content_allowed and self.intents & (1 << 15):
                    await socket.close(code=4014, message=b"Disallowed intent(s).")
                    break
                await self._ready(socket)
            elif payload["op"] == 6:
                self.resumes += 1
                await socket.send_str(json.dumps({"op": 0, "t": "RESUMED", "s": next(self._sequence), "d": {}}))
        return socket

    async def _ready(self, socket: web.WebSocketResponse) -> None:
        ready = {
            "v": 10, "user": user(BOT_ID, "persona", bot=True), "guilds": [{"id": str(GUILD_ID), "unavailable": True}],
            "session_id": "fake-session", "resume_gateway_url": self.ws_url, "private_channels": [],
            "application": {"id": str(APP_ID), "flags": 0},
        }
        await socket.send_str(json.dumps({"op": 0, "t": "READY", "s": next(self._sequence), "d": ready}))
        roles = [
            _role(GUILD_ID, "@everyone", permissions="2147483647"),
            _role(OPERATOR_ROLE_ID, "persona-ops", position=1),
            _role(BOT_ROLE_ID, "persona", position=2) | {"managed": True, "tags": {"bot_id": str(BOT_ID)}},
        ]
        guild = _guild(GUILD_ID, "fake guild", roles, {CHANNEL_ID: "general", OTHER_CHANNEL_ID: "off-topic"})
        guild["members"][0]["roles"] = [str(BOT_ROLE_ID)]
        await socket.send_str(json.dumps({"op": 0, "t": "GUILD_CREATE", "s": next(self._sequence), "d": guild}))
        self.identified.set()

    # --- the CDN ------------------------------------------------------------------------

    async def _download(self, request: web.Request) -> web.Response:
        """An attachment's bytes, as Discord's CDN serves them (no token needed)."""
        path = request.match_info["path"]
        self.downloads.append(path)
        data = self.files.get(path)
        if data is None or path.rsplit("/", 1)[-1] in self.gone_files:
            return web.Response(status=404, text="Not Found")
        return web.Response(body=data, content_type="application/octet-stream")

    # --- REST ---------------------------------------------------------------------------

    async def _rest(self, request: web.Request) -> web.Response:
        path = "/" + request.match_info["path"]
        self.requests.append((request.method, path))
        for prefix, pending in self.limits.items():
            if pending and path.startswith(prefix) and request.method == "POST":
                seconds = pending.pop(0)
                return _json(
                    {"message": "You are being rate limited.", "retry_after": seconds, "global": False}, status=429,
                    headers={"Via": "1.1 google", "Retry-After": str(seconds), "X-RateLimit-Limit": "5",
                             "X-RateLimit-Remaining": "0", "X-RateLimit-Reset-After": str(seconds),
                             "X-RateLimit-Bucket": "fake", "X-RateLimit-Scope": "user"},
                )
        if not path.startswith(("/interactions/", "/webhooks/")) and request.headers.get("Authorization") != f"Bot {self.token}":
            return _json({"message": "401: Unauthorized", "code": 0}, status=401)
        body = await self._body(request)
        parts = path.strip("/").split("/")
        refused = self._refuse_content(request.method, parts, body)
        if refused is not None:
            return refused
        match request.method, parts:
            case "GET", ["users", "@me"]:
                return _json(user(BOT_ID, "persona", bot=True))
            case "GET", ["oauth2", "applications", "@me"]:
                return _json({
                    "id": str(APP_ID), "name": "persona", "description": "", "icon": None, "bot_public": True,
                    "bot_require_code_grant": False, "owner": user(1, "owner"), "verify_key": "00", "flags": 0,
                    "rpc_origins": [], "summary": "",
                })
            case "GET", ["gateway", "bot"]:
                return _json({"url": self.ws_url, "shards": 1, "session_start_limit": {
                    "total": 1000, "remaining": 999, "reset_after": 0, "max_concurrency": 1}})
            case "PUT", ["applications", _, "commands"]:
                self.commands = [{**c, "id": str(next(self._ids)), "application_id": str(APP_ID), "version": "1"} for c in body]
                return _json(self.commands)
            case "GET", ["channels", channel_id]:
                if int(channel_id) in self.forbidden_channels:
                    return _json({"message": "Missing Access", "code": 50001}, status=403)
                found = self.threads.get(int(channel_id))
                if found is None:
                    return _json({"message": "Unknown Channel", "code": 10003}, status=404)
                return _json({k: v for k, v in found.items() if k != "newly_created"})
            case "POST", ["channels", channel_id, "typing"]:
                self.typing.append((int(channel_id), time.monotonic()))
                return web.Response(status=204)
            case "POST", ["channels", channel_id, "messages"]:
                failing, failed = self._failing_send(request)
                if failed is not None:
                    return failed
                posted = self._posted_with_nonce(body)
                if posted is not None:
                    return _json(posted)
                reference = body.get("message_reference")
                if reference and int(reference["message_id"]) not in self.messages:
                    if reference.get("fail_if_not_exists", True):
                        return _json({"code": 50035, "message": "Invalid Form Body", "errors": {"message_reference": {
                            "_errors": [{"code": "REPLIES_UNKNOWN_MESSAGE", "message": "Unknown message"}]}}}, status=400)
                    body = {k: v for k, v in body.items() if k != "message_reference"}  # sent as a plain message
                recorded = self._record(channel_id, body)
                if failing == "drop after posting":
                    request.transport.close()
                return _json(recorded)
            case "GET", ["channels", channel_id, "messages", message_id]:
                found = self.messages.get(int(message_id))
                if found is None:
                    return _json({"message": "Unknown Message", "code": 10008}, status=404)
                return _json(found)
            case "POST", ["interactions", interaction_id, token, "callback"]:
                created = self._interactions_created.get(interaction_id, time.monotonic())
                if time.monotonic() - created > INTERACTION_RESPONSE_S:
                    return _json({"message": "Unknown interaction", "code": 10062}, status=404)
                self.interaction_responses.append({"interaction": interaction_id, **body})
                data = body.get("data") or {}
                original = self._originals[token] = {"loading": body.get("type") == 5, "flags": data.get("flags", 0)}
                if "content" in data:
                    original["message"] = self._record(str(CHANNEL_ID), data, self._answering(token))["id"]
                return _json({"interaction": {
                    "id": interaction_id, "type": 2, "response_message_loading": body.get("type") == 5,
                    "response_message_ephemeral": bool(data.get("flags", 0) & 64)}})
            case "POST", ["webhooks", _, token]:
                failing, failed = self._failing_send(request)
                if failed is not None:
                    return failed
                followed = self._follow_up(token, body)
                if failing == "drop after posting":
                    request.transport.close()
                return _json(followed)
            case "PATCH", ["webhooks", _, token, "messages", "@original"]:
                failing, failed = self._failing_send(request)
                if failed is not None:
                    return failed
                edited = self._edit_original(token, body)
                if edited is None:
                    return _json({"message": "Unknown Message", "code": 10008}, status=404)
                if failing == "drop after posting":
                    request.transport.close()
                return _json(edited)
            case "DELETE", ["webhooks", _, token, "messages", "@original"]:
                original = self._originals.pop(token, None)
                if original is None:
                    return _json({"message": "Unknown Message", "code": 10008}, status=404)
                self.messages.pop(int(original.get("message", 0)), None)
                self.deleted_originals.append(self._interactions_by_token[token]["id"])
                return web.Response(status=204)
        return _json({"message": f"fake has no {request.method} {path}", "code": 0}, status=404)

    def _failing_send(self, request: web.Request) -> tuple[str | None, web.Response | None]:
        """How this message fails (``fail_sends``: the next way, if any), and what to answer
        instead of posting it when it fails before being posted."""
        failing = self.failing_sends.pop(0) if self.failing_sends else None
        if failing == "503":
            return failing, web.Response(status=503, text="upstream connect error or disconnect/reset before headers")
        if failing == "drop":
            request.transport.close()
            return failing, web.Response(status=500)  # never written: the connection is gone
        return failing, None

    def _posted_with_nonce(self, body: dict) -> dict | None:
        """The message posted before with this one's nonce, if it asks for them to be unique."""
        nonce = body.get("nonce")
        if not body.get("enforce_nonce") or nonce is None:
            return None
        return next((m for m in self.messages.values() if m.get("nonce") == str(nonce)), None)

    @staticmethod
    def _refuse_content(method: str, parts: list[str], body: dict | list) -> web.Response | None:
        """Discord's checks on a message's content: at most 2,000 characters, and not nothing."""
        if method not in ("POST", "PATCH") or not isinstance(body, dict):
            return None
        if parts[:1] == ["channels"] and parts[2:] == ["messages"] or parts[:1] == ["webhooks"]:
            message = body
        elif parts[:1] == ["interactions"] and body.get("type") == 4:  # a response with a message
            message = body.get("data") or {}
        else:
            return None
        content = message.get("content") or ""
        if len(content) > MESSAGE_LIMIT_CHARS:
            return _json({"code": 50035, "message": "Invalid Form Body", "errors": {"content": {"_errors": [
                {"code": "BASE_TYPE_MAX_LENGTH", "message": f"Must be {MESSAGE_LIMIT_CHARS} or fewer in length."}]}}},
                status=400)
        if not content.strip() and not message.get("embeds") and not message.get("attachments"):
            return _json({"message": "Cannot send an empty message", "code": 50006}, status=400)
        return None

    async def _body(self, request: web.Request) -> dict | list:
        if not request.can_read_body:
            return {}
        if request.content_type == "multipart/form-data":
            form = await request.post()
            return json.loads(form.get("payload_json", "{}"))
        return await request.json()

    def _follow_up(self, token: str, body: dict) -> dict:
        """A follow-up message. The first after a deferred response fills that response in, and
        keeps the visibility it was deferred with, whatever the follow-up asks."""
        original = self._originals.get(token)
        fills_original = original is not None and original["loading"]
        if fills_original:
            body = {**body, "flags": (body.get("flags", 0) & ~64) | (original["flags"] & 64)}
        message = self._record(str(CHANNEL_ID), body, self._answering(token))
        if fills_original:
            original |= {"loading": False, "message": message["id"]}
        message["followup_of"] = token
        return message

    def _edit_original(self, token: str, body: dict) -> dict | None:
        """Edit an interaction's original response: while it is "thinking…" that fills it in, as
        the first follow-up would (with the visibility it was deferred with); after, its content
        changes in place. None if it is not there (deleted, or never sent)."""
        original = self._originals.get(token)
        if original is None:
            return None
        if original["loading"]:
            message = self._record(str(CHANNEL_ID), {**body, "flags": original["flags"] & 64}, self._answering(token))
            original |= {"loading": False, "message": message["id"]}
            return message
        message = self.messages.get(int(original.get("message", 0)))
        if message is None:
            return None
        message |= {"content": body.get("content", message["content"]), "edited_timestamp": TIMESTAMP}
        for sent in self.sent:
            if sent["id"] == message["id"]:
                sent |= {"content": message["content"], "edited_timestamp": TIMESTAMP}
        return message

    def _answering(self, token: str) -> dict:
        """What Discord adds to a message that answers an interaction: which one, and whose."""
        interaction = self._interactions_by_token.get(token)
        if interaction is None:
            return {}
        asker = interaction["member"]["user"] if "member" in interaction else interaction["user"]
        return {
            "type": 20,  # CHAT_INPUT_COMMAND
            "interaction_metadata": {"id": interaction["id"], "type": 2, "user": asker,
                                     "authorizing_integration_owners": interaction["authorizing_integration_owners"]},
            "interaction": {"id": interaction["id"], "type": 2, "name": interaction["data"]["name"], "user": asker},
        }

    def _record(self, channel_id: str, body: dict, extra: dict | None = None) -> dict:
        message = {
            "id": str(next(self._ids)), "channel_id": channel_id, "author": user(BOT_ID, "persona", bot=True),
            "content": body.get("content", ""), "timestamp": TIMESTAMP, "edited_timestamp": None, "tts": False,
            "mention_everyone": False, "mentions": [], "mention_roles": [], "attachments": [], "embeds": [],
            "pinned": False, "type": 19 if body.get("message_reference") else 0, "flags": body.get("flags", 0),
        }
        if body.get("message_reference"):
            message["message_reference"] = body["message_reference"]
        if body.get("nonce") is not None:
            message["nonce"] = str(body["nonce"])
        message |= extra or {}
        self.messages[int(message["id"])] = message
        self.sent.append({**message, "allowed_mentions": body.get("allowed_mentions")})
        return message
