"""X, Mastodon, Bluesky, Discord and Telegram posting APIs on one loopback port.

Enough of each for the real client libraries (tweepy, Mastodon.py, atproto, discord.py,
python-telegram-bot) to post, and to look for an earlier post. ``seen`` records every
request answered; ``fail_with`` makes the posting endpoints answer with that HTTP status,
each as its platform words it (on Bluesky, a post's, and for 401 the login's too;
``bluesky_login_fails_with`` is the login's alone). ``drop_next(n)`` makes the next ``n``
posting requests be read (and, on Mastodon, Bluesky, Discord and Telegram, stored) and
then have their connection closed with no answer: the post may have gone out, the client
cannot know.

What each platform holds, as it would list it: Mastodon's ``statuses`` (by idempotency
key, so a repeat gets the first back, until ``expire_mastodon_keys()``; listed newest
first, as HTML), Bluesky's ``records`` (newest first, for ``listRecords``), Discord's
``discord_messages`` (a repeat of an enforced nonce gets the first message back until
``expire_discord_nonces()``; a channel's are listed newest first, as the bot's, unless
``discord_history_forbidden``), Telegram's ``telegram_messages``. ``discord_limits``
holds the ``retry_after`` seconds of the 429s Discord answers the next posts with, one
each, worded and headed as Discord's (``fail_with = 429`` is the others'). ``slow_s`` makes
each posting endpoint make the post, then wait that long before it answers.

In a test, use the ``platform`` fixture of ``tests/test_sinks.py`` (or ``serve()``). By
hand: ``python -m tests.fakes.social_api [--drop N]`` prints the settings that point
``persona`` at it, then serves until Ctrl-C.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import html
import json
import ssl
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

from aiohttp import web

__all__ = ["FakePlatform", "serve"]

POSTING_PATHS = ("/2/tweets", "/api/v1/statuses", "/xrpc/com.atproto.repo.createRecord")
DISCORD_MESSAGE_ID = 1200000000000000001
TELEGRAM_MESSAGE_ID = 77
MASTODON_ACCOUNT = {"id": "1", "username": "sage", "acct": "sage"}
X_ERRORS = {401: ("Unauthorized", "Unauthorized"), 429: ("Too Many Requests", "Too Many Requests")}  # else 403's


@dataclass
class FakePlatform:
    """Every platform's state: what was asked, what to answer, what Bluesky holds."""

    url: str = ""
    seen: list[dict] = field(default_factory=list)
    fail_with: int | None = None
    slow_s: float = 0.0  # how long each posting endpoint takes to answer, the post made first (a slow platform)
    x_detail: str | None = None  # X's words for ``fail_with`` (default: as X words a 401, a 429, a duplicate's 403)
    records: list[dict] = field(default_factory=list)
    dropping: int = 0
    dropping_path: str = ""
    dropped: list[dict] = field(default_factory=list)
    statuses: dict[str, dict] = field(default_factory=dict)  # Mastodon's, by idempotency key
    discord_messages: list[dict] = field(default_factory=list)  # as sent, each with its nonce
    discord_limits: list[float] = field(default_factory=list)  # retry_after of the next posts' 429s
    bluesky_login_fails_with: int | None = None  # createSession's status (401 is fail_with's)
    discord_history_forbidden: bool = False  # reading a channel's messages answers 403
    discord_guild_id: str | None = "777"  # the server of every channel (None: a direct message's)
    telegram_messages: list[dict] = field(default_factory=list)  # as sent
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def drop_next(self, count: int = 1, path: str = "") -> None:
        """Read the next ``count`` posting requests (to ``path`` only, if given), then hang up without answering."""
        with self._lock:
            self.dropping, self.dropping_path = count, path

    def expire_mastodon_keys(self) -> None:
        """Let the hour pass after which Mastodon no longer drops a repeat of an idempotency key."""
        with self._lock:
            self.statuses = {made["id"]: made for made in self.statuses.values()}

    def expire_discord_nonces(self) -> None:
        """Let the minutes pass after which Discord no longer drops a repeat of a nonce."""
        with self._lock:
            for message in self.discord_messages:
                message["nonce_expired"] = True

    def _take_drop(self, path: str) -> bool:
        with self._lock:
            if self.dropping <= 0 or self.dropping_path not in ("", path):
                return False
            self.dropping -= 1
            return True


def _jwt() -> str:
    def part(obj: dict) -> str:
        return base64.urlsafe_b64encode(json.dumps(obj).encode()).rstrip(b"=").decode()

    now = int(time.time())
    return f"{part({'alg': 'HS256', 'typ': 'JWT'})}.{part({'sub': 'did:plc:fake', 'iat': now, 'exp': now + 3600})}.c2ln"


def _discord_json(data: dict, status: int = 200) -> web.Response:
    # discord.py parses a body only when the content type is exactly application/json, as Discord sends it.
    return web.Response(body=json.dumps(data).encode(), status=status, headers={"Content-Type": "application/json"})


def _discord_rate_limited(retry_after_s: float) -> web.Response:
    """Discord's 429: discord.py reads it as a rate limit only with these headers (else a Cloudflare ban)."""
    response = _discord_json({"message": "You are being rate limited.", "retry_after": retry_after_s, "global": False}, 429)
    response.headers.update({
        "Via": "1.1 google", "Retry-After": str(retry_after_s), "X-RateLimit-Limit": "5", "X-RateLimit-Remaining": "0",
        "X-RateLimit-Reset-After": str(retry_after_s), "X-RateLimit-Bucket": "fake", "X-RateLimit-Scope": "user",
    })
    return response


def _bluesky_error(status: int) -> web.Response:
    """An error as Bluesky's PDS words it."""
    error, message = {429: ("RateLimitExceeded", "Rate Limit Exceeded"), 400: ("InvalidRequest", "Invalid record")}.get(
        status, ("InternalServerError", "Internal Server Error"))
    return web.json_response({"error": error, "message": message}, status=status)


class _Dropped(Exception):
    """The connection was closed on purpose: no answer goes back."""


def _routes(fake: FakePlatform) -> web.Application:
    async def record(request: web.Request) -> dict:
        body = await request.read()
        try:
            payload = json.loads(body) if body else {}
        except ValueError:
            payload = dict(await request.post()) if body else {}
        seen = {"path": request.path, "headers": dict(request.headers), "json": payload}
        fake.seen.append(seen)
        return seen

    def hang_up(request: web.Request, seen: dict) -> None:
        """Close the connection with the request handled and no answer sent."""
        fake.dropped.append(seen)
        request.transport.close()
        raise _Dropped

    async def tweet(request):
        seen = await record(request)
        if fake._take_drop(request.path):
            hang_up(request, seen)
        if fake.fail_with:  # worded as X words each
            title, detail = X_ERRORS.get(fake.fail_with, ("Forbidden", "You are not allowed to create a Tweet with duplicate content."))
            detail = fake.x_detail or detail
            return web.json_response({"title": title, "detail": detail, "type": "about:blank", "status": fake.fail_with},
                                     status=fake.fail_with)
        await asyncio.sleep(fake.slow_s)
        return web.json_response({"data": {"id": "1790000000000000001", "text": seen["json"]["text"]}}, status=201)

    async def status(request):
        seen = await record(request)
        if fake.fail_with:
            return web.json_response({"error": "Validation failed"}, status=fake.fail_with)
        # As Mastodon does, a repeat of an idempotency key gets the first status back, not a second one.
        key = request.headers.get("Idempotency-Key", "")
        made = fake.statuses.get(key) if key else None
        if made is None:
            number = 109000000000000001 + len(fake.statuses)
            made = {
                "id": str(number), "url": f"https://masto.test/@sage/{number}",
                "content": f"<p>{html.escape(seen['json'].get('status') or '')}</p>",  # served as HTML, as Mastodon does "created_at": "2026-01-01T09:00:00.000Z",
                "visibility": "public", "account": MASTODON_ACCOUNT,
            }
            fake.statuses[key or made["id"]] = made
        if fake._take_drop(request.path):  # made, then the answer lost
            hang_up(request, seen)
        await asyncio.sleep(fake.slow_s)
        return web.json_response(made)

    async def verify_credentials(request):
        await record(request)
        return web.json_response(MASTODON_ACCOUNT)

    async def account_statuses(request):
        await record(request)
        newest = sorted(fake.statuses.values(), key=lambda made: int(made["id"]), reverse=True)
        return web.json_response(newest[: int(request.query.get("limit", 20))])

    async def session(request):
        await record(request)
        if fake.fail_with == 401:
            return web.json_response({"error": "AuthenticationRequired", "message": "Invalid identifier or password"}, status=401)
        if fake.bluesky_login_fails_with:
            return _bluesky_error(fake.bluesky_login_fails_with)
        return web.json_response({"accessJwt": _jwt(), "refreshJwt": _jwt(), "handle": "sage.test", "did": "did:plc:fake"})

    async def create_record(request):
        seen = await record(request)
        if fake.fail_with:
            return _bluesky_error(fake.fail_with)
        uri = f"at://did:plc:fake/app.bsky.feed.post/3kabcdefghij{len(fake.records)}"
        fake.records.insert(0, {"uri": uri, "cid": "bafyreifake", "value": seen["json"]["record"]})
        if fake._take_drop(request.path):  # stored, then the answer lost
            hang_up(request, seen)
        await asyncio.sleep(fake.slow_s)
        return web.json_response({"uri": uri, "cid": "bafyreifake"})

    async def list_records(request):
        await record(request)
        assert request.query["collection"] == "app.bsky.feed.post"
        return web.json_response({"records": fake.records[: int(request.query.get("limit", 50))]})

    async def me(request):
        await record(request)
        if fake.fail_with == 401:
            return _discord_json({"message": "401: Unauthorized", "code": 0}, status=fake.fail_with)
        return _discord_json({"id": "42", "username": "sagebot", "discriminator": "0", "avatar": None, "bot": True})

    async def channel_message(request):
        seen = await record(request)
        if fake.discord_limits:
            return _discord_rate_limited(fake.discord_limits.pop(0))
        body = seen["json"]
        # As Discord does, a repeat of an enforced nonce (within minutes) gets the first message back.
        nonce = body.get("nonce") if body.get("enforce_nonce") else None
        made = next((m for m in fake.discord_messages if nonce and m["nonce"] == nonce and not m.get("nonce_expired")), None)
        if made is None:
            made = {"id": str(DISCORD_MESSAGE_ID + len(fake.discord_messages)), "channel_id": request.match_info["channel"],
                    "content": body.get("content"), "nonce": nonce}
            fake.discord_messages.append(made)
        if fake._take_drop(request.path):  # sent, then the answer lost
            hang_up(request, seen)
        await asyncio.sleep(fake.slow_s)
        return _discord_json(made)

    async def channel_history(request):
        await record(request)
        if fake.discord_history_forbidden:  # the bot lacks Read Message History
            return _discord_json({"message": "Missing Access", "code": 50001}, status=403)
        channel = request.match_info["channel"]
        mine = [{"id": m["id"], "channel_id": channel, "content": m["content"], "author": {"id": "42", "username": "sagebot", "bot": True}}
                for m in fake.discord_messages if m["channel_id"] == channel]  # a listed message has no nonce, as on Discord
        return web.Response(body=json.dumps(mine[::-1][: int(request.query.get("limit", 50))]).encode(),
                            headers={"Content-Type": "application/json"})

    async def channel(request):
        await record(request)
        made = {"id": request.match_info["channel"], "type": 1 if fake.discord_guild_id is None else 0}
        return _discord_json(made if fake.discord_guild_id is None else made | {"guild_id": fake.discord_guild_id})

    async def telegram(request):
        seen = await record(request)
        method = request.match_info["method"]
        if fake.fail_with == 401:  # a token Telegram does not know
            return web.json_response({"ok": False, "error_code": 401, "description": "Unauthorized"}, status=401)
        if method == "getMe":
            return web.json_response({"ok": True, "result": {"id": 7, "is_bot": True, "first_name": "Sage", "username": "sagebot"}})
        if fake.fail_with == 429:
            return web.json_response({"ok": False, "error_code": 429, "description": "Too Many Requests: retry after 7",
                                      "parameters": {"retry_after": 7}}, status=429)
        if fake.fail_with:
            return web.json_response({"ok": False, "error_code": 400, "description": "Bad Request: chat not found"}, status=400)
        message = {
            "message_id": TELEGRAM_MESSAGE_ID + len(fake.telegram_messages), "date": int(time.time()), "text": seen["json"].get("text"),
            "chat": {"id": -1001234567890, "type": "channel", "title": "Sage", "username": "sagechannel"},
        }
        fake.telegram_messages.append(message)
        if method == "sendMessage" and fake._take_drop(request.path):  # sent, then the answer lost
            hang_up(request, seen)
        if method == "sendMessage":
            await asyncio.sleep(fake.slow_s)
        return web.json_response({"ok": True, "result": message})

    @web.middleware
    async def quiet_drops(request, handler):
        try:
            return await handler(request)
        except _Dropped:
            return web.Response(status=499)  # written to a closed transport: nobody reads it

    app = web.Application(middlewares=[quiet_drops])
    app.router.add_post("/2/tweets", tweet)
    app.router.add_post("/api/v1/statuses", status)
    app.router.add_get("/api/v1/accounts/verify_credentials", verify_credentials)
    app.router.add_get("/api/v1/accounts/{id}/statuses", account_statuses)
    app.router.add_post("/xrpc/com.atproto.server.createSession", session)
    app.router.add_post("/xrpc/com.atproto.repo.createRecord", create_record)
    app.router.add_get("/xrpc/com.atproto.repo.listRecords", list_records)
    app.router.add_get("/api/v10/users/@me", me)
    app.router.add_post("/api/v10/channels/{channel}/messages", channel_message)
    app.router.add_get("/api/v10/channels/{channel}/messages", channel_history)
    app.router.add_get("/api/v10/channels/{channel}", channel)
    app.router.add_post("/bot{token}/{method}", telegram)
    return app


@contextmanager
def serve(port: int = 0, ssl_context: ssl.SSLContext | None = None) -> Iterator[FakePlatform]:
    """Every fake platform API on one loopback port, served from a background thread; with
    ``ssl_context``, over TLS (``url`` is then ``https://localhost:PORT``)."""
    fake = FakePlatform()
    loop = asyncio.new_event_loop()
    ready = threading.Event()
    runner = web.AppRunner(_routes(fake))

    async def start():
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", port, ssl_context=ssl_context)
        await site.start()
        bound = site._server.sockets[0].getsockname()[1]
        fake.url = f"https://localhost:{bound}" if ssl_context else f"http://127.0.0.1:{bound}"
        ready.set()

    thread = threading.Thread(target=lambda: (loop.run_until_complete(start()), loop.run_forever()), daemon=True)
    thread.start()
    assert ready.wait(10), "the fake platform did not start"
    try:
        yield fake
    finally:
        asyncio.run_coroutine_threadsafe(runner.cleanup(), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()


def settings_env(url: str) -> dict[str, str]:
    """Environment variables that send every posting sink to the fake at ``url``, with fake credentials."""
    return {
        "PERSONA_POSTING__X_API_URL": url, "PERSONA_POSTING__MASTODON_API_URL": url,
        "PERSONA_POSTING__BLUESKY_API_URL": url + "/xrpc", "PERSONA_DISCORD__API_URL": url + "/api/v10",
        "PERSONA_TELEGRAM__API_URL": url + "/bot", "PERSONA_POSTING__X_BEARER_TOKEN": "fake-x-token",
        "PERSONA_POSTING__MASTODON_ACCESS_TOKEN": "fake-mastodon-token",
        "PERSONA_POSTING__BLUESKY_HANDLE": "sage.test", "PERSONA_POSTING__BLUESKY_PASSWORD": "fake-app-password",
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--drop", type=int, default=0, help="hang up on this many posting requests first")
    parser.add_argument("--fail-with", type=int, default=None, help="answer posting requests with this status")
    args = parser.parse_args()
    with serve(args.port) as fake:
        fake.drop_next(args.drop)
        fake.fail_with = args.fail_with
        for name, value in settings_env(fake.url).items():
            print(f"export {name}={value}", flush=True)
        shown = 0
        try:
            while True:
                time.sleep(0.5)
                for seen in fake.seen[shown:]:
                    dropped = " (dropped, no answer)" if seen in fake.dropped else ""
                    print(f"# {seen['path']} {json.dumps(seen['json'])[:120]}{dropped}", flush=True)
                shown = len(fake.seen)
        except KeyboardInterrupt:
            pass


if __name__ == "__main__":
    main()
