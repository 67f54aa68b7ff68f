"""The one settings object: its sections, their defaults and bounds, and the checks on each value.

Read once at start-up (``Settings()``) and passed down; nothing else in the project
reads the environment. Precedence, highest first: constructor arguments, environment
variables (``PERSONA_`` prefix, ``__`` between nested names), the ``.env`` file in the
working directory, files in the secrets directory (``/run/secrets`` in containers),
then the defaults below. A variable set to nothing (``PERSONA_DATA_DIR=``) counts as unset.
A secret file is named as the variable is (``/run/secrets/PERSONA_TELEGRAM__TOKEN``), in any
letter case; no other file there is opened (the folder is shared with other programs). A
``PERSONA_`` name that is no setting is ignored: a misspelling, or a setting of a newer version,
which must not stop this one. Where a value came from, the names that are no
setting, and what a failed read means: persona.settings_sources.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path
from typing import Literal
from urllib.parse import ParseResult, unquote, urlparse

import platformdirs
import redis
from pydantic import (
    BaseModel,
    Field,
    SecretStr,
    ValidationInfo,
    field_validator,
)
from pydantic.fields import FieldInfo
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
)

from persona.validation import LATEST_DEADLINE_AFTER_S

__all__ = [
    "ChatAdapterSettings",
    "DashboardSettings",
    "DiscordSettings",
    "PostingSettings",
    "QueueSettings",
    "Settings",
    "TelegramSettings",
    "WorkerSettings",
    "default_data_dir",
    "env_name",
    "setting_fields",
]

SECRETS_DIR = Path("/run/secrets")
ENV_PREFIX = "PERSONA_"
ENV_FILE = ".env"


def _blank_is_unset(value: object) -> object:
    """A token set to nothing (``PERSONA_DASHBOARD__TOKEN=``) is no token, not an empty one."""
    raw = value.get_secret_value() if isinstance(value, SecretStr) else value
    return None if isinstance(raw, str) and not raw.strip() else value


def _data_dir(value: object) -> object:
    """A blank data directory is the default one, not the working directory (``Path("")`` is ".")."""
    return default_data_dir() if isinstance(value, str) and not value.strip() else value


def _absolute(value: Path | list[Path]) -> Path | list[Path]:
    """A folder as one absolute path, ``~`` expanded: written in a .env, a compose env_file or a
    systemd unit, where no shell expands it, ``~/persona-data`` was a folder named ``~`` in the
    working directory; and a relative path named another folder from each directory a command
    was run from (the queue, the checkpoints split between them)."""
    if isinstance(value, list):
        return [_absolute(path) for path in value]
    try:
        return value.expanduser().resolve()
    except RuntimeError as exc:  # ~user of no user here, or a loop of links
        raise ValueError(f"{value} cannot be made a folder: {exc}") from None


# A wait tied to one request is at most LATEST_DEADLINE_AFTER_S (a day): no request's deadline
# lies further ahead (one that does is refused, so a longer setting had every request refused).

# The longest any other interval setting may be. Past it a value is a slip (milliseconds given
# as seconds), and far past it the waits overflow: threading's timeouts, Redis's expiry times
# (PERSONA_QUEUE__REPLY_TTL_S=99999999999999999999 had every reply's EXPIRE refused).
LONGEST_INTERVAL_S = 7 * 24 * 3600.0  # a week
# A quiet conversation may be remembered longer: a week by default, a month a fair choice.
LONGEST_CONVERSATION_TTL_S = 365 * 24 * 3600  # a year
# How late a missed slot may still be posted: only compared with the time, never waited on, so any
# span a person means goes ("every slot, however late"); past it, a number given in the wrong unit.
LONGEST_GRACE_S = 1000 * LONGEST_CONVERSATION_TTL_S  # a thousand years


def _token(value: object) -> object:
    """A token as pasted, less the whitespace around it: no token holds any, and a stray space or
    the newline ending a file it was copied from made a right token a refused one. Nothing left
    is no token, as for ``_blank_is_unset``."""
    raw = value.get_secret_value() if isinstance(value, SecretStr) else value
    return (raw.strip() or None) if isinstance(raw, str) else value


REDIS_SCHEMES = ("redis://", "rediss://", "unix://")


def _redis_url(value: SecretStr | None) -> SecretStr | None:
    """A Redis URL redis-py can open; the value is never quoted, as it may hold a password."""
    problem = None if value is None else _redis_url_problem(value.get_secret_value())
    if problem is not None:
        raise ValueError(problem)
    return value


def _redis_url_problem(url: str) -> str | None:
    """Why redis-py cannot open ``url`` (it would raise at the first command, or, for a database
    that is no number, quietly use database 0); None if it can."""
    if not url.startswith(REDIS_SCHEMES):
        return f"must start with {', '.join(REDIS_SCHEMES)} (e.g. redis://127.0.0.1:6379/0)"
    if (socket := _socket_path_slip(url)) is not None:
        return socket
    # An unencoded / ? # or @ in a password ends the address early: what follows reads as
    # the port or the database.
    encoded = "; a password holding / ? # or @ must be percent-encoded (%2F %3F %23 %40)" if "@" in url else ""
    try:
        parsed = urlparse(url)
        port = parsed.port
    except ValueError as exc:
        if "IPv6" in str(exc):
            return "cannot be read: an IPv6 address must be closed by ] (e.g. redis://[::1]:6379/0)"
        return f"its port must be a number from 1 to 65535 (e.g. redis://127.0.0.1:6379/0){encoded}"
    if port == 0:  # redis-py reads it as no port, and goes to 6379
        return "its port must be a number from 1 to 65535 (e.g. redis://127.0.0.1:6379/0)"
    database = unquote(parsed.path).strip("/")
    if parsed.scheme != "unix" and database and re.fullmatch(r"[0-9]+", database) is None:
        return f"its database, the path after HOST:PORT, must be a number (e.g. redis://127.0.0.1:6379/0){encoded}"
    try:
        pool = redis.ConnectionPool.from_url(url)
        pool.connection_class(**pool.connection_kwargs)  # refuses options it does not take; connects nowhere
    except (ValueError, TypeError, redis.exceptions.RedisError) as exc:
        return _option_problem(str(exc), parsed)
    return None


def _socket_path_slip(url: str) -> str | None:
    """A ``unix://`` URL with two slashes: the path's first folder is read as a host, and
    dropped (``unix://tmp/x.sock`` opened ``/x.sock``). None for any other URL."""
    if not url.startswith("unix://"):
        return None
    try:
        parsed = urlparse(url)
    except ValueError:  # an unclosed [: said with the other URLs'
        return None
    _, at, host = parsed.netloc.rpartition("@")
    if host.lower() in ("", "localhost"):
        return None
    password = " (a password goes before the third: unix://:PASSWORD@/path/to/redis.sock)" if at else ""
    return (f"a unix:// URL's socket path is absolute, after three slashes: unix:///{host}{parsed.path}{password}; "
            f"with two, {host!r} is read as a host, and the socket looked for is {parsed.path or '/'}")


def _option_problem(said: str, parsed: ParseResult) -> str:
    """What redis-py said of a URL's query options, without the URL's passwords."""
    if (unknown := re.search(r"unexpected keyword argument '([^']+)'", said)) is not None:
        name = unknown.group(1)
        tls = " (TLS options: the URL is then rediss://)" if name.startswith("ssl") else ""
        return f"its query names {name}, which a {parsed.scheme}:// URL does not take{tls}"
    if (bad := re.search(r"Invalid value for '([^']+)'", said)) is not None:
        return f"the value of {bad.group(1)} in its query is not one it can take"
    from persona.logs import (  # here: persona.logs imports this module
        hide_secrets,
        url_secrets,
    )

    said = hide_secrets(said, url_secrets(parsed.geturl()))
    return f"redis-py refuses its query options: {said.rstrip('.')}"


def default_data_dir() -> Path:
    """Where trained personas, checkpoints and the embedded Redis live by default."""
    return platformdirs.user_data_path("persona")


class QueueSettings(BaseModel):
    """Limits of the Redis queue; every worker and client must agree on these."""

    max_length: int = Field(1000, ge=1, description="requests waiting per stream before 'busy'")
    # A job held past any request's deadline has nobody waiting for it: a day at most.
    visibility_timeout_s: float = Field(
        120.0, gt=0, le=LATEST_DEADLINE_AFTER_S, allow_inf_nan=False, description="reclaim a job held this long"
    )
    max_pending_per_user: int = Field(20, ge=1, description="one sender's requests waiting at once")
    max_deliveries: int = Field(3, ge=1, description="deliveries before a job is dead-lettered")
    reply_ttl_s: int = Field(600, ge=1, le=LONGEST_INTERVAL_S, description="how long an unread reply is kept")
    default_deadline_s: float = Field(
        120.0, gt=0, le=LATEST_DEADLINE_AFTER_S, allow_inf_nan=False,
        description="a request's deadline if it sets none (a day at most)",
    )
    max_message_chars: int = Field(8000, ge=1, description="longest single message accepted")
    max_messages: int = Field(64, ge=1, description="most conversation turns in one request")


class WorkerSettings(BaseModel):
    """How an inference worker runs."""

    device: Literal["auto", "cpu", "cuda"] = Field(
        "auto", description="where a worker decodes: cpu, cuda, or auto (cuda if torch finds a GPU, else cpu)"
    )
    max_batch: int = Field(16, ge=1, description="requests generated together at most")
    heartbeat_s: float = Field(2.0, gt=0, le=LONGEST_INTERVAL_S, allow_inf_nan=False, description="how often a worker reports it is alive")
    heartbeat_ttl_s: float = Field(
        10.0, gt=0, le=LONGEST_INTERVAL_S, allow_inf_nan=False, validate_default=True,  # checked against heartbeat_s
        description="a worker silent this long is dead (twice heartbeat_s at least)",
    )
    threads: int | None = Field(None, ge=1, description="CPU threads for torch and llama.cpp (default: all cores; 1 on a machine shared with other work)")
    engine: Literal["auto", "eager", "fused", "int8", "llamacpp"] = Field(
        "auto",
        description="decode path: eager (any model), fused (lean Llama loop, same logits), "
        "int8 (fused with int8 weights, CPU), llamacpp (llama.cpp's kernels on a GGUF of the "
        "weights; needs the `fast` extra), auto (on CPU, when installed: llamacpp for any "
        "Llama-family or GPT-2 model with a byte-level BPE vocabulary; else int8 for Llama "
        "models 512 wide or more, else fused; fused on a GPU; eager if not a Llama)",
    )
    cancel_check_s: float = Field(
        0.5, gt=0, le=LONGEST_INTERVAL_S, allow_inf_nan=False, description="while decoding, how often withdrawn requests are looked for (they stop at once)"
    )
    load_retry_s: float = Field(
        30.0, ge=0, le=LONGEST_INTERVAL_S, allow_inf_nan=False,
        description="a persona whose model failed to load is answered with that failure for this long "
        "before loading is tried again (each try holds up the worker's other requests)",
    )
    kv_tokens: int = Field(
        8192, ge=1024,
        description="llama.cpp engine: cache tokens shared by all rows (prompt + reply each; "
        "23 MB per 1,000 for the bundled model); a row waits until its reply fits",
    )
    gguf_type: Literal["q8_0", "q4_1", "f16"] = Field(
        "q8_0",
        description="the GGUF type llama.cpp serves, written once per model and cached: q8_0 reads "
        "prompts twice as fast as q4_1; q4_1 serves the bundled file as shipped (no writing, "
        "a little faster per token at batch 1)",
    )
    compile: bool = Field(
        True,
        description="GPU only: compile the decode step with torch.compile before capturing it as a "
        "CUDA graph (fewer, fused kernels per step; the first start spends a minute or so compiling, "
        "later starts read torch's on-disk cache)",
    )
    kernels: Literal["auto", "always", "never"] = Field(
        "auto",
        description="GPU only: batches may decode through Triton kernels (five a layer; matrix-vector "
        "products up to 8 rows, tiled matrix products past that) instead of the compiled step; auto times "
        "both for each cache layout (at warm-up for 1, 2, 4, 8, 16, 32, 64 and 128 rows, else at a layout's "
        "first batch) and keeps the faster",
    )
    attention: Literal["auto", "torch", "triton"] = Field(
        "auto",
        description="GPU only: the compiled step's attention as torch ops over the whole cache, or as one "
        "Triton kernel that reads only the filled slots; auto compiles both and times them for each cache "
        "laid out for 16 rows or more (at warm-up and at a layout's first batch), keeping the faster",
    )
    personas: list[str] = Field(default_factory=list, description="preload these (default: all)")

    @field_validator("heartbeat_ttl_s")
    @classmethod
    def _outlasts_two_beats(cls, ttl_s: float, info: ValidationInfo) -> float:
        # A worker whose heartbeat has lapsed is dead to the others: they take its requests at once
        # (answered twice, dead-lettered after max_deliveries), and swaps and counts of live workers
        # leave it out. Under two beats the TTL lapsed between beats, or at one beat lost to a Redis
        # blip or a stalled thread; the defaults (2 s, 10 s) outlast four lost beats.
        beat_s = info.data.get("heartbeat_s")  # absent if it was refused itself
        if beat_s is not None and ttl_s < 2 * beat_s:
            ttl, beat = env_name(["worker", "heartbeat_ttl_s"]), env_name(["worker", "heartbeat_s"])
            raise ValueError(
                f"{ttl_s:g} s is less than twice {beat} ({beat_s:g} s): a worker would be taken for dead between "
                "heartbeats, or after one lost beat, and its requests taken from it by other workers; "
                f"set {ttl} to {2 * beat_s:g} or more, or {beat} to {ttl_s / 2:g} or less"
            )
        return ttl_s


MAX_RECONNECT_WAIT_S = 10.0
# The chat adapters' private-message settings, alike on both platforms.
DM_POLICY_DESCRIPTION = (
    "who is answered in private: open (anyone), allowlist (allowed_users and those approved), "
    "pairing (anyone else is given a code for `persona access approve`)"
)
ALLOWED_USERS_DESCRIPTION = "user ids always answered in private, whatever dm_policy says"


class ChatAdapterSettings(BaseModel):
    """What every chat adapter shares: rate limits, memory, patience."""

    user_messages_per_minute: int = Field(6, ge=1, description="one person's messages answered per minute")
    chat_messages_per_minute: int = Field(20, ge=1, description="one chat's or channel's messages per minute")
    conversation_ttl_s: int = Field(
        7 * 24 * 3600, ge=60, le=LONGEST_CONVERSATION_TTL_S, description="a quiet conversation is forgotten after this"
    )
    context_chars: int = Field(6000, ge=200, description="most characters of history sent with a message")
    reply_timeout_s: float = Field(
        120.0, gt=0, le=LATEST_DEADLINE_AFTER_S, allow_inf_nan=False,
        description="how long to wait for a worker's answer (a day at most)",
    )
    pairing_code_ttl_s: int = Field(
        24 * 3600, ge=60, le=LONGEST_INTERVAL_S, description="how long a pairing code can be approved"
    )

    @property
    def reconnect_wait_cap_s(self) -> float:
        """The longest wait between tries while the platform cannot be reached: the reply
        timeout, and never past MAX_RECONNECT_WAIT_S, so a message written as it comes back
        is heard within that (the libraries' own waits grow to 30 s, or 1,024 s)."""
        return min(self.reply_timeout_s, MAX_RECONNECT_WAIT_S)


class DiscordSettings(ChatAdapterSettings):
    """The Discord adapter (discord.py). Needs the privileged MESSAGE_CONTENT intent."""

    token: SecretStr | None = Field(
        None, description="the bot's token; `persona up` starts the Discord adapter when it is set (discord: sinks post with it)"
    )
    persona: str = Field("sage", description="the persona that speaks in a channel or DM until someone switches it")
    api_url: str = Field("https://discord.com/api/v10", description="Discord's REST API base; the gateway is the one its GET /gateway/bot names")
    operator_ids: list[int] = Field(
        default_factory=list, description="user ids that may run operator commands (queue stats, swap, switching a server channel's persona)"
    )
    operator_role: str | None = Field(
        None, description="the id of a role whose members are operators too (Developer Mode on: right-click the role, "
        "Copy Role ID); a role's name counts only in allowed_guilds, and without them the bot refuses to start with one "
        "(anyone can make a role of any name in a server of their own and invite the bot there)",
    )
    allowed_guilds: list[int] = Field(default_factory=list, description="guilds it answers in; empty: every guild")
    denied_guilds: list[int] = Field(default_factory=list, description="guilds it never answers in")
    allowed_channels: list[int] = Field(
        default_factory=list, description="channels (and their threads) it answers in; empty: every channel"
    )
    denied_channels: list[int] = Field(default_factory=list, description="channels (and their threads) it never answers in")
    dm_policy: Literal["open", "allowlist", "pairing"] = Field("open", description=DM_POLICY_DESCRIPTION)
    allowed_users: list[int] = Field(default_factory=list, description=ALLOWED_USERS_DESCRIPTION)

    _token_trimmed = field_validator("token", mode="before")(_token)

    @field_validator("operator_role", mode="before")
    @classmethod
    def _role_as_copied(cls, value: object) -> object:
        """A role as pasted: its id, or its mention as Discord writes it (``<@&123>``), less the
        whitespace around it; nothing left is no role."""
        if not isinstance(value, str):
            return value
        value = value.strip()
        mention = re.fullmatch(r"<@&(\d+)>", value)
        return (mention.group(1) if mention else value) or None


class TelegramSettings(ChatAdapterSettings):
    """The Telegram adapter (python-telegram-bot)."""

    token: SecretStr | None = Field(
        None, description="the bot's token from @BotFather; `persona up` starts the Telegram adapter when it is set "
        "(telegram: sinks post with it)",
    )
    persona: str = Field("sage", description="the persona that speaks in a chat until someone switches it")
    api_url: str = Field(
        "https://api.telegram.org/bot", description="the Bot API's base, ending in /bot (the token is written after it)"
    )
    webhook_url: str | None = Field(
        None, description="the public URL Telegram posts updates to; set: updates come by webhook instead of polling"
    )
    webhook_listen: str = Field("127.0.0.1", description="address the webhook's server listens on")
    webhook_port: int = Field(8443, ge=1, le=65535, description="port the webhook's server listens on")
    webhook_secret: SecretStr | None = Field(
        None, description="Telegram sends it with each webhook update; an update without it is refused"
    )
    dm_policy: Literal["open", "allowlist", "pairing"] = Field("open", description=DM_POLICY_DESCRIPTION)
    allowed_users: list[int] = Field(default_factory=list, description=ALLOWED_USERS_DESCRIPTION)
    allowed_chats: list[int] = Field(default_factory=list, description="groups it answers in; empty: all")
    paste_window_s: float = Field(
        1.0, ge=0, le=LONGEST_INTERVAL_S, allow_inf_nan=False,
        description="Telegram's apps send a paste over 4,096 characters as several messages: one long "
        "enough to be such a piece waits this long for the next, and the pieces are answered as one "
        "message (short messages never wait, except by webhook for an update numbered before them and still "
        "on its way, at most this long; 0: answer every piece alone)",
    )

    _tokens_trimmed = field_validator("token", "webhook_secret", mode="before")(_token)


class DashboardSettings(BaseModel):
    """The web dashboard and Prometheus metrics."""

    host: str = Field("127.0.0.1", description="address the dashboard listens on; any but loopback needs the token")
    port: int = Field(8787, ge=0, le=65535, description="port the dashboard listens on (0: any free port)")
    token: SecretStr | None = Field(None, description="set: every page but /healthz and /readyz wants it")

    _token_trimmed = field_validator("token", mode="before")(_token)


class PostingSettings(BaseModel):
    """Credentials and API bases for the scheduled-post sinks."""

    x_api_url: str = Field("https://api.twitter.com", description="X's API base")
    x_bearer_token: SecretStr | None = Field(
        None, description="X: an OAuth 2 user token with tweet.write (or the four OAuth 1.0a keys instead)"
    )
    x_consumer_key: SecretStr | None = Field(None, description="X, OAuth 1.0a: the app's consumer key")
    x_consumer_secret: SecretStr | None = Field(None, description="X, OAuth 1.0a: the app's consumer secret")
    x_access_token: SecretStr | None = Field(None, description="X, OAuth 1.0a: the account's access token")
    x_access_token_secret: SecretStr | None = Field(None, description="X, OAuth 1.0a: the account's access token secret")
    mastodon_api_url: str = Field("https://mastodon.social", description="the Mastodon instance posted to")
    mastodon_access_token: SecretStr | None = Field(
        None, description="Mastodon: a token of the account on that instance, with write:statuses"
    )
    bluesky_api_url: str = Field("https://bsky.social/xrpc", description="the Bluesky server's XRPC base")
    bluesky_handle: str | None = Field(None, description="Bluesky: the account's handle")
    bluesky_password: SecretStr | None = Field(None, description="Bluesky: an app password of that account")
    tick_s: float = Field(30.0, gt=0, le=LONGEST_INTERVAL_S, allow_inf_nan=False, description="how often the scheduler looks for due slots")
    grace_s: float = Field(900.0, ge=0, le=LONGEST_GRACE_S, allow_inf_nan=False, description="a slot this late still counts as on time (posted, not skipped)")
    lease_s: float = Field(600.0, gt=0, le=LONGEST_INTERVAL_S, allow_inf_nan=False, description="how long a slot stays held after its holder dies")
    recent_posts: int = Field(50, ge=0, description="recent posts a new one must not repeat")
    # Its candidates are requests with a deadline this far ahead: a day at most.
    wait_s: float = Field(
        300.0, gt=0, le=LATEST_DEADLINE_AFTER_S, allow_inf_nan=False,
        description="how long to wait for the candidates (a day at most)",
    )

    # Not the Bluesky password: a password may begin or end with a space.
    _tokens_trimmed = field_validator(
        "x_bearer_token", "x_consumer_key", "x_consumer_secret", "x_access_token", "x_access_token_secret",
        "mastodon_access_token", mode="before",
    )(_token)


class Settings(BaseSettings):
    """Everything the service can be told, from one place."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        env_nested_delimiter="__",
        env_file=ENV_FILE,
        env_file_encoding="utf-8",
        secrets_dir=SECRETS_DIR if SECRETS_DIR.is_dir() else None,
        # A secret file named as the variable (PERSONA_TELEGRAM__TOKEN) sets that one field: the
        # plain secrets source read only files named after a whole section, holding its JSON.
        secrets_nested_delimiter="__",
        extra="ignore",  # a name of a newer version's must not stop this one: settings_sources says it
        env_ignore_empty=True,  # PERSONA_X= is unset: "" was a data dir of ".", an adapter persona of ""
    )

    data_dir: Path = Field(
        default_factory=default_data_dir,
        description="trained personas, checkpoints, the embedded Redis, converted models, `up --chat`'s logs",
    )
    redis_url: SecretStr | None = Field(
        None, description="redis://, rediss:// or unix:// URL; unset means the embedded Redis"
    )
    personas_dirs: list[Path] = Field(
        default_factory=list, description="extra persona folders, searched after the built-in ones"
    )
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"] = Field(
        "INFO", description="any letter case (debug, Info)"
    )

    queue: QueueSettings = QueueSettings()
    worker: WorkerSettings = WorkerSettings()
    discord: DiscordSettings = DiscordSettings()
    telegram: TelegramSettings = TelegramSettings()
    dashboard: DashboardSettings = DashboardSettings()
    posting: PostingSettings = PostingSettings()

    _data_dir_blank_is_default = field_validator("data_dir", mode="before")(_data_dir)
    _folders_absolute = field_validator("data_dir", "personas_dirs")(_absolute)
    _redis_url_blank_is_unset = field_validator("redis_url", mode="before")(_blank_is_unset)
    _redis_url_opens = field_validator("redis_url")(_redis_url)

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # Imported here: persona.settings_sources imports this module.
        from persona.settings_sources import SecretFilesSource

        # A file's name is split on "__" as the environment's is, in any letter case, and only
        # files named as a setting are opened; given the plain source, it keeps its secrets_dir
        # (``Settings(_secrets_dir=...)``).
        return init_settings, env_settings, dotenv_settings, SecretFilesSource(file_secret_settings)

    @field_validator("log_level", mode="before")
    @classmethod
    def _level_in_any_case(cls, value: object) -> object:
        # logging knows only the upper-case names: "debug" was a traceback at start-up.
        if not isinstance(value, str):
            return value
        name = value.strip().upper()
        return {"WARN": "WARNING", "FATAL": "CRITICAL", "": "INFO"}.get(name, name)

    @property
    def checkpoints_dir(self) -> Path:
        """Every persona's checkpoint versions live under here."""
        return self.data_dir / "checkpoints"

    @property
    def user_personas_dir(self) -> Path:
        """Persona files that training created (the source tree is never written to)."""
        return self.data_dir / "personas"

    @property
    def model_cache_dir(self) -> Path:
        """Models converted once (the bundled GGUF as a Hugging Face folder, GGUFs for llama.cpp) so later loads are fast."""
        return self.data_dir / "model-cache"


def setting_fields() -> list[tuple[tuple[str, ...], FieldInfo]]:
    """Every setting one variable sets, in the model's order: its names (``("queue", "max_length")``)
    and its field, whose default and description it has."""
    found: list[tuple[tuple[str, ...], FieldInfo]] = []
    for name, field in Settings.model_fields.items():
        section = field.annotation
        if isinstance(section, type) and issubclass(section, BaseModel):
            found += [((name, sub), subfield) for sub, subfield in section.model_fields.items()]
        else:
            found.append(((name,), field))
    return found


def env_name(names: Sequence[str]) -> str:
    """The variable that sets a setting: ``PERSONA_QUEUE__MAX_LENGTH`` for ``("queue", "max_length")``."""
    return ENV_PREFIX + "__".join(name.upper() for name in names)
