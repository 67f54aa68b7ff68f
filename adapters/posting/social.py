"""Sinks for X (tweepy, API v2), Mastodon (Mastodon.py) and Bluesky (atproto).

Each API base URL is a setting. tweepy's ``Client`` has neither a base-URL nor a
time-out option, so the narrowest hook is its own ``requests`` session: a transport
adapter mounted for ``https://api.twitter.com/`` sends those requests to the configured
base, and gives each one a time-out (one stalled connection must not freeze the scheduler).
"""

from __future__ import annotations

import logging
import re
import ssl
import traceback
from html import unescape

import requests
import urllib3
from pydantic import SecretStr

from adapters.posting.sinks import (
    Posted,
    RetrySafety,
    SinkNoAnswer,
    SinkRateLimited,
    SinkUnreachable,
    one_line,
)
from persona.errors import ConfigError, SinkError
from persona.settings import Settings

__all__ = ["BlueskySink", "MastodonSink", "XSink"]

log = logging.getLogger(__name__)

X_DEFAULT_API_URL = "https://api.twitter.com"
REQUEST_TIMEOUT_S = 30.0
BLUESKY_POST_COLLECTION = "app.bsky.feed.post"
BLUESKY_LOOKBACK_POSTS = 25
MASTODON_LOOKBACK_POSTS = 40  # the most the API lists at once
X_USER_KEYS = ("x_consumer_key", "x_consumer_secret", "x_access_token", "x_access_token_secret")  # OAuth 1.0a


def _secret(value: SecretStr | None) -> str | None:
    """The secret's value; a blank one (``PERSONA_POSTING__X_BEARER_TOKEN=``) is no secret."""
    return (value.get_secret_value().strip() or None) if value is not None else None


def _env(setting: str) -> str:
    return f"PERSONA_POSTING__{setting.upper()}"


def _never_connected(exc: requests.exceptions.ConnectionError) -> bool:
    """Whether requests failed before anything was sent: no connection made (refused, no such host,
    connect time-out), or no TLS session agreed on it (see ``_handshake_failed``)."""
    reason = getattr(exc.args[0], "reason", None) if exc.args else None
    return (isinstance(exc, requests.exceptions.ConnectTimeout) or isinstance(reason, urllib3.exceptions.NewConnectionError)
            or _handshake_failed(reason))


def _handshake_failed(reason: object) -> bool:
    """Whether urllib3's error is a failed TLS handshake: a certificate not trusted, no protocol in
    common, plain HTTP on the port. A request goes out only once the handshake is done, so
    nothing was sent; an SSL error while the answer is read (after the request) is not one."""
    error = reason.args[0] if isinstance(reason, urllib3.exceptions.SSLError) and reason.args else None
    if not isinstance(error, ssl.SSLError):
        return False
    return isinstance(error, ssl.SSLCertVerificationError) or any(
        frame.f_code.co_name == "do_handshake" for frame, _ in traceback.walk_tb(error.__traceback__)
    )


def _need(sink: str, **settings: object) -> None:
    """ConfigError naming every setting of ``settings`` that is unset or blank."""
    missing = [_env(name) for name, value in settings.items()
               if not (_secret(value) if isinstance(value, SecretStr) else str(value or "").strip())]
    if missing:
        raise ConfigError(f"sink {sink!r} needs {' and '.join(missing)} in the settings (or .env)")


def _mastodon_said(exc: Exception) -> str:
    """What a Mastodon.py error says: ``401 Unauthorized: The access token is invalid``, not the
    tuple of its arguments (``('Mastodon API returned error', 401, 'Unauthorized', '...')``)."""
    match exc.args:
        case (str(), int() as status, reason, detail):
            return f"{status} {reason}: {detail}" if detail else f"{status} {reason}"
        case _:
            return one_line(exc)


def _x_said(exc: Exception) -> str:
    """What X answered, once: ``401 Unauthorized``, ``403 Forbidden: You are not allowed to …``.

    tweepy's message is the status line and then X's own words (its ``detail``, or each
    error's), and X's words for a 401 or a 429 are the status's reason again: the message
    read "401 Unauthorized Unauthorized". Words that only repeat the reason are left out.
    """
    response = getattr(exc, "response", None)
    if response is None:
        return one_line(exc)
    reason = str(response.reason or "").strip()
    said = f"{response.status_code} {reason}".strip()
    repeated = {_plain_words(reason), ""}
    details = []
    for message in getattr(exc, "api_messages", []):
        text = " ".join(str(message).split()).rstrip(".")  # a hint may follow: "…content; if the app …"
        if _plain_words(text) not in repeated:
            repeated.add(_plain_words(text))
            details.append(text)
    return f"{said}: {'; '.join(details)}" if details else said


def _plain_words(text: str) -> str:
    """``text`` lower-cased, its punctuation and spacing dropped: what tells a repeat."""
    return " ".join(re.sub(r"[^\w\s]", " ", text.lower()).split())


def _x_forbidden_hint(exc: Exception) -> str:
    """What to do about X's 403, where its words say no more than "not permitted"."""
    said = _plain_words(" ".join(map(str, getattr(exc, "api_messages", []))))
    if "duplicate" in said:  # X's own words say it all: the same text was posted before
        return ""
    if "application only" in said:
        return f"; set {_env('x_bearer_token')} to an OAuth 2 user token (with tweet.write), or the four OAuth 1.0a user keys"
    return ("; if the app may not post, give it Read and Write permission in the X developer portal, then "
            "generate the access token again (a token keeps the permissions it was made with)")


def _said(exc: Exception) -> str:
    """What an atproto error says (its response's status and message), or, for its ``NetworkError``,
    which says nothing, the network error behind it."""
    cause = exc.__cause__
    return one_line(cause) if not str(exc) and isinstance(cause, Exception) else one_line(exc)


class _Rebase(requests.adapters.HTTPAdapter):
    """Sends requests meant for one URL prefix to another, each with a time-out."""

    def __init__(self, old: str, new: str, timeout_s: float) -> None:
        super().__init__()
        self.old, self.new, self.timeout_s = old, new.rstrip("/"), timeout_s

    def send(self, request, **kwargs):  # type: ignore[override]
        request.url = self.new + request.url[len(self.old) :]
        if kwargs.get("timeout") is None:  # requests passes None when the caller (tweepy) sets none
            kwargs["timeout"] = self.timeout_s
        return super().send(request, **kwargs)


class XSink:
    """Posts to X through tweepy's API v2 client (OAuth 1.0a user keys, or an OAuth 2 user token)."""

    platform = "x"
    retry: RetrySafety = "none"

    def __init__(self, spec: str, settings: Settings) -> None:
        import tweepy

        posting = settings.posting
        self.spec = spec
        given = [key for key in X_USER_KEYS if _secret(getattr(posting, key))]
        self.user_auth = len(given) == len(X_USER_KEYS)
        if not self.user_auth and not _secret(posting.x_bearer_token):
            if given:  # a user who set some of the four keys meant them: name the rest
                missing = ", ".join(_env(key) for key in X_USER_KEYS if key not in given)
                raise ConfigError(f"sink {spec!r}: OAuth 1.0a user keys come in fours; set {missing} too (in the settings or .env)")
            raise ConfigError(
                f"sink {spec!r} needs {_env('x_bearer_token')} (an OAuth 2 user token), or all four OAuth 1.0a "
                f"user keys: {', '.join(_env(key) for key in X_USER_KEYS)}, in the settings (or .env)"
            )
        self.client = tweepy.Client(
            bearer_token=_secret(posting.x_bearer_token), consumer_key=_secret(posting.x_consumer_key),
            consumer_secret=_secret(posting.x_consumer_secret), access_token=_secret(posting.x_access_token),
            access_token_secret=_secret(posting.x_access_token_secret),
        )
        self.api_url = posting.x_api_url
        self.client.session.mount(
            X_DEFAULT_API_URL + "/", _Rebase(X_DEFAULT_API_URL, posting.x_api_url, REQUEST_TIMEOUT_S)
        )

    def post(self, text: str, marker: str) -> Posted:
        import tweepy

        try:
            response = self.client.create_tweet(text=text, user_auth=self.user_auth)
        except requests.exceptions.ConnectionError as exc:
            if _never_connected(exc):  # a wrong x_api_url, the network down, TLS refused: X heard nothing
                raise SinkUnreachable(f"cannot reach X at {self.api_url} ({one_line(exc)})") from exc
            raise SinkNoAnswer(f"the connection broke before X answered: {one_line(exc)}") from exc
        except requests.exceptions.Timeout as exc:
            raise SinkNoAnswer(f"X did not answer in {REQUEST_TIMEOUT_S:.0f} s: {one_line(exc)}") from exc
        except tweepy.TwitterServerError as exc:  # a 5xx may or may not have posted
            raise SinkNoAnswer(f"X answered with a server error: {_x_said(exc)}") from exc
        except tweepy.TooManyRequests as exc:
            raise SinkRateLimited(f"X is rate-limiting posts: {_x_said(exc)}") from exc
        except tweepy.Unauthorized as exc:
            raise SinkError(f"X refused the credentials ({_x_said(exc)}); {self._credentials_hint()}") from exc
        except tweepy.Forbidden as exc:
            raise SinkError(f"X refused the post: {_x_said(exc)}{_x_forbidden_hint(exc)}") from exc
        except tweepy.HTTPException as exc:
            raise SinkError(f"X refused the post: {_x_said(exc)}") from exc
        tweet_id = str(response.data["id"])
        return Posted(id=tweet_id, url=f"https://x.com/i/web/status/{tweet_id}")

    def _credentials_hint(self) -> str:
        """Which settings X's 401 is about (those in use), and where they come from and go."""
        if self.user_auth:
            return (f"check {', '.join(map(_env, X_USER_KEYS))} (the app's API key and secret, and the posting account's "
                    f"access token and secret, from the X developer portal) in .env or the environment")
        return (f"check {_env('x_bearer_token')} in .env or the environment (an OAuth 2 user token, which expires "
                f"2 hours after it is made: for posts day after day, set the four OAuth 1.0a user keys instead, "
                f"{', '.join(map(_env, X_USER_KEYS))}, which do not expire)")

    def find(self, marker: str, text: str) -> Posted | None:
        return None


class MastodonSink:
    """Posts a public status through Mastodon.py, with the marker as its idempotency key.

    The server drops a repeat of the key for an hour only; a slot whose poster died
    (the machine down overnight, say) may be finished later than that, so a retry first
    looks among the account's latest statuses for the text.
    """

    platform = "mastodon"
    retry: RetrySafety = "check"

    def __init__(self, spec: str, settings: Settings) -> None:
        from mastodon import Mastodon

        posting = settings.posting
        _need(spec, mastodon_access_token=posting.mastodon_access_token)
        self.spec = spec
        self.client = Mastodon(
            access_token=_secret(posting.mastodon_access_token), api_base_url=posting.mastodon_api_url,
            request_timeout=REQUEST_TIMEOUT_S, version_check_mode="none",
            ratelimit_method="throw",  # its default, "wait", sleeps out a 429 (for hours, 5 minutes at a time)
        )

    def post(self, text: str, marker: str) -> Posted:
        from mastodon import (
            MastodonAPIError,
            MastodonNetworkError,
            MastodonRatelimitError,
            MastodonServerError,
            MastodonUnauthorizedError,
        )

        try:
            status = self.client.status_post(text, idempotency_key=marker)
        except (MastodonServerError, MastodonNetworkError) as exc:  # a retry with the same key is safe
            # Mastodon.py wraps requests' error (raising inside its handler, so it is the context).
            cause = exc.__cause__ or exc.__context__
            if isinstance(cause, requests.exceptions.ConnectionError) and _never_connected(cause):
                raise SinkUnreachable(f"cannot reach Mastodon at {self.client.api_base_url} ({one_line(cause)})") from exc
            raise SinkNoAnswer(f"no answer from Mastodon at {self.client.api_base_url}: {_mastodon_said(exc)}") from exc
        except MastodonRatelimitError as exc:
            raise SinkRateLimited(f"Mastodon is rate-limiting posts: {_mastodon_said(exc)}") from exc
        except MastodonUnauthorizedError as exc:
            raise SinkError(
                f"Mastodon refused the access token ({_mastodon_said(exc)}); check {_env('mastodon_access_token')} "
                f"(a token of the account on {self.client.api_base_url}, with write:statuses)"
            ) from exc
        except MastodonAPIError as exc:
            raise SinkError(f"Mastodon refused the post: {_mastodon_said(exc)}") from exc
        return Posted(id=str(status["id"]), url=str(status.get("url") or ""))

    def find(self, marker: str, text: str) -> Posted | None:
        """The account's status with ``text`` among its latest, if there is one."""
        from mastodon import MastodonError, MastodonRatelimitError

        try:
            latest = self.client.account_statuses(self.client.me()["id"], limit=MASTODON_LOOKBACK_POSTS, exclude_reblogs=True)
        except MastodonRatelimitError as exc:
            raise SinkRateLimited(f"Mastodon is rate-limiting requests: {_mastodon_said(exc)}") from exc
        except MastodonError as exc:
            raise SinkUnreachable(
                f"cannot look on Mastodon at {self.client.api_base_url} for the earlier post ({_mastodon_said(exc)})"
            ) from exc
        wanted = " ".join(text.split())
        for status in latest:
            if _html_text(str(status.get("content") or "")) == wanted:
                return Posted(id=str(status["id"]), url=str(status.get("url") or ""))
        return None


def _html_text(html: str) -> str:
    """A status's text from the HTML Mastodon serves it as (paragraphs and breaks as spaces)."""
    spaced = re.sub(r"(?i)<br\s*/?>|</p>\s*<p>", " ", html)
    return " ".join(unescape(re.sub(r"<[^>]+>", "", spaced)).split())


class BlueskySink:
    """Posts through atproto's client, logged in with the handle and an app password.

    After a crash mid-post it can check: it lists the account's latest posts (Bluesky's
    read API is open to the account) and looks for the exact text, which the
    near-repeat filter keeps unique among the persona's recent posts.
    """

    platform = "bluesky"
    retry: RetrySafety = "check"

    def __init__(self, spec: str, settings: Settings) -> None:
        posting = settings.posting
        _need(spec, bluesky_handle=posting.bluesky_handle, bluesky_password=posting.bluesky_password)
        self.spec = spec
        self.base_url = posting.bluesky_api_url
        self.handle = (posting.bluesky_handle or "").strip()
        self.password = _secret(posting.bluesky_password) or ""

    def _client(self):
        from atproto import Client

        client = Client(base_url=self.base_url)
        client.login(self.handle, self.password, fetch_bsky_profile=False)
        return client

    def _posted(self, uri: str) -> Posted:
        return Posted(id=uri, url=f"https://bsky.app/profile/{self.handle}/post/{uri.rsplit('/', 1)[-1]}")

    def post(self, text: str, marker: str) -> Posted:
        import httpx
        from atproto_client.exceptions import (
            BadRequestError,
            LoginRequiredError,
            RateLimitExceededError,
            RequestErrorBase,
            UnauthorizedError,
        )

        try:
            client = self._client()
        except RateLimitExceededError as exc:  # Bluesky allows few logins an hour
            raise SinkRateLimited(f"Bluesky is rate-limiting logins: {_said(exc)}") from exc
        except (BadRequestError, UnauthorizedError, LoginRequiredError) as exc:  # nothing was posted yet
            raise SinkError(
                f"Bluesky refused the login ({exc}); check {_env('bluesky_handle')} ({self.handle!r}) and "
                f"{_env('bluesky_password')} (an app password)"
            ) from exc
        except (httpx.TransportError, RequestErrorBase) as exc:  # down, or a server error: not logged in, nothing posted
            raise SinkUnreachable(f"cannot log in to Bluesky at {self.base_url} ({_said(exc)})") from exc
        try:
            created = client.send_post(text, profile_identify=self.handle)
        except RateLimitExceededError as exc:
            raise SinkRateLimited(f"Bluesky is rate-limiting posts: {_said(exc)}") from exc
        except (BadRequestError, UnauthorizedError, LoginRequiredError) as exc:
            raise SinkError(f"Bluesky refused the post: {exc}") from exc
        except (httpx.TransportError, RequestErrorBase) as exc:  # no answer, or a server error: the next try looks for it first
            raise SinkNoAnswer(f"no answer from Bluesky at {self.base_url}: {_said(exc)}") from exc
        return self._posted(created.uri)

    def find(self, marker: str, text: str) -> Posted | None:
        import httpx
        from atproto import models
        from atproto_client.exceptions import LoginRequiredError, RequestErrorBase

        params = models.ComAtprotoRepoListRecords.Params(repo=self.handle, collection=BLUESKY_POST_COLLECTION, limit=BLUESKY_LOOKBACK_POSTS)
        try:
            listed = self._client().com.atproto.repo.list_records(params)
        except (httpx.TransportError, RequestErrorBase, LoginRequiredError) as exc:
            raise SinkUnreachable(f"cannot look on Bluesky at {self.base_url} for the earlier post ({_said(exc)})") from exc
        for record in listed.records:
            if getattr(record.value, "text", None) == text:
                return self._posted(record.uri)
        return None
