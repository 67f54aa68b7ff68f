"""Sinks for X (tweepy, API v2), Mastodon (Mastodon.py) and Bluesky (atproto).

Each API base URL is a setting. tweepy's ``Client`` has neither a base-URL nor a
time-out option, so the narrowest hook is its own ``requests`` session: a transport
adapter mounted for ``https://api.twitter.com/`` sends those requests to the configured
base, and gives each one a time-out (one stalled connection must not freeze the scheduler).
"""

from __future__ import annotations

import logging

import requests
from pydantic import SecretStr

from adapters.posting.sinks import Posted, RetrySafety, SinkRateLimited
from persona.errors import ConfigError, SinkError
from persona.settings import Settings

__all__ = ["BlueskySink", "MastodonSink", "XSink"]

log = logging.getLogger(__name__)

X_DEFAULT_API_URL = "https://api.twitter.com"
REQUEST_TIMEOUT_S = 30.0
BLUESKY_POST_COLLECTION = "app.bsky.feed.post"
BLUESKY_LOOKBACK_POSTS = 25


def _secret(value: SecretStr | None) -> str | None:
    return value.get_secret_value() if value is not None else None


def _need(value: object, setting: str, sink: str) -> None:
    if not value:
        raise ConfigError(f"sink {sink!r} needs PERSONA_POSTING__{setting.upper()} in the settings (or .env)")


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
        keys = [posting.x_consumer_key, posting.x_consumer_secret, posting.x_access_token, posting.x_access_token_secret]
        self.user_auth = all(k is not None for k in keys)
        if not self.user_auth:
            _need(posting.x_bearer_token, "x_bearer_token (an OAuth 2 user token) or x_consumer_key and friends", spec)
        self.client = tweepy.Client(
            bearer_token=_secret(posting.x_bearer_token), consumer_key=_secret(posting.x_consumer_key),
            consumer_secret=_secret(posting.x_consumer_secret), access_token=_secret(posting.x_access_token),
            access_token_secret=_secret(posting.x_access_token_secret),
        )
        self.client.session.mount(
            X_DEFAULT_API_URL + "/", _Rebase(X_DEFAULT_API_URL, posting.x_api_url, REQUEST_TIMEOUT_S)
        )

    def post(self, text: str, marker: str) -> Posted:
        import tweepy

        try:
            response = self.client.create_tweet(text=text, user_auth=self.user_auth)
        except tweepy.TwitterServerError:
            raise  # a 5xx may or may not have posted: the ledger treats it as unknown
        except tweepy.TooManyRequests as exc:
            raise SinkRateLimited(f"X is rate-limiting posts: {exc}") from exc
        except tweepy.HTTPException as exc:
            raise SinkError(f"X refused the post: {exc}") from exc
        tweet_id = str(response.data["id"])
        return Posted(id=tweet_id, url=f"https://x.com/i/web/status/{tweet_id}")

    def find(self, marker: str, text: str) -> Posted | None:
        return None


class MastodonSink:
    """Posts a public status through Mastodon.py, with the marker as its idempotency key."""

    platform = "mastodon"
    retry: RetrySafety = "idempotent"  # the server drops a repeated key for about an hour

    def __init__(self, spec: str, settings: Settings) -> None:
        from mastodon import Mastodon

        posting = settings.posting
        _need(posting.mastodon_access_token, "mastodon_access_token", spec)
        self.spec = spec
        self.client = Mastodon(
            access_token=_secret(posting.mastodon_access_token), api_base_url=posting.mastodon_api_url,
            request_timeout=REQUEST_TIMEOUT_S, version_check_mode="none",
        )

    def post(self, text: str, marker: str) -> Posted:
        from mastodon import (
            MastodonAPIError,
            MastodonRatelimitError,
            MastodonServerError,
        )

        try:
            status = self.client.status_post(text, idempotency_key=marker)
        except MastodonServerError:
            raise  # may or may not have posted; a retry with the same key is safe
        except MastodonRatelimitError as exc:
            raise SinkRateLimited(f"Mastodon is rate-limiting posts: {exc}") from exc
        except MastodonAPIError as exc:
            raise SinkError(f"Mastodon refused the post: {exc}") from exc
        return Posted(id=str(status["id"]), url=str(status.get("url") or ""))

    def find(self, marker: str, text: str) -> Posted | None:
        return None


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
        _need(posting.bluesky_handle, "bluesky_handle", spec)
        _need(posting.bluesky_password, "bluesky_password", spec)
        self.spec = spec
        self.base_url = posting.bluesky_api_url
        self.handle = posting.bluesky_handle or ""
        self.password = _secret(posting.bluesky_password) or ""

    def _client(self):
        from atproto import Client

        client = Client(base_url=self.base_url)
        client.login(self.handle, self.password, fetch_bsky_profile=False)
        return client

    def _posted(self, uri: str) -> Posted:
        return Posted(id=uri, url=f"https://bsky.app/profile/{self.handle}/post/{uri.rsplit('/', 1)[-1]}")

    def post(self, text: str, marker: str) -> Posted:
        from atproto_client.exceptions import (
            BadRequestError,
            LoginRequiredError,
            UnauthorizedError,
        )

        try:
            created = self._client().send_post(text, profile_identify=self.handle)
        except (BadRequestError, UnauthorizedError, LoginRequiredError) as exc:
            raise SinkError(f"Bluesky refused the post: {exc!r}") from exc
        return self._posted(created.uri)

    def find(self, marker: str, text: str) -> Posted | None:
        from atproto import models

        params = models.ComAtprotoRepoListRecords.Params(repo=self.handle, collection=BLUESKY_POST_COLLECTION, limit=BLUESKY_LOOKBACK_POSTS)
        listed = self._client().com.atproto.repo.list_records(params)
        for record in listed.records:
            if getattr(record.value, "text", None) == text:
                return self._posted(record.uri)
        return None
