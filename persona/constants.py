"""Every Redis key the service uses, and the limits that carry units in their names."""

from __future__ import annotations

KEY_PREFIX = "persona:"

# Streams: interactive chat is always served before batch work (posts, evals, samples).
STREAM_INTERACTIVE = KEY_PREFIX + "q:chat"
STREAM_BATCH = KEY_PREFIX + "q:batch"
STREAMS_BY_PRIORITY = (STREAM_INTERACTIVE, STREAM_BATCH)
STREAM_DEAD = KEY_PREFIX + "q:dead"
CONSUMER_GROUP = "workers"

# One list per request; the worker LPUSHes the reply, the caller reads it with a BLMOVE
# of the list onto itself (so a retry after a dropped connection reads it again) and
# deletes the list with its next call.
REPLY_KEY_PREFIX = KEY_PREFIX + "reply:"
# One mark per request: '' once it is queued (so a re-sent submission is not queued
# again), then the name of the first worker that answers it (so no one answers twice).
ANSWERED_KEY_PREFIX = KEY_PREFIX + "answered:"
# Beside each mark, and lasting as long: a digest of the request queued under that id, so a
# different request sent under an id in use is refused while the same one sent again still
# counts as queued (``queue_scripts.SUBMIT_SCRIPT``).
DIGEST_KEY_PREFIX = KEY_PREFIX + "digest:"
# A refused request's mark (its value: why it was refused first), so that a refusal is
# counted once per request however often it is sent again (``queue_scripts.SUBMIT_SCRIPT``).
REFUSED_KEY_PREFIX = KEY_PREFIX + "refused:"
# Set by a caller that no longer wants its answer (/cancel).
CANCEL_KEY_PREFIX = KEY_PREFIX + "cancel:"
# Counts cancellations. Each queued entry carries its value at submission, so a worker
# checks a request's cancel flag only when some request was cancelled since it was sent.
CANCEL_EPOCH_KEY = KEY_PREFIX + "cancel-epoch"
# How many requests one sender has waiting or running (fair share under a flood).
USER_PENDING_KEY_PREFIX = KEY_PREFIX + "user-pending:"
# Passed to a script in place of an optional key it has none for (a sender's counter
# for an anonymous caller, the marks of an entry with no readable request id). Never
# written or read: the scripts compare against it. '' used to stand there, and Redis
# checks every key a script is passed against the user's ACL: a user limited to
# persona's keys (`~persona:*`) was refused every anonymous `ask` and `generate`.
NO_KEY = KEY_PREFIX + "no-key"
# A worker's heartbeat (JSON, with a TTL): host, device, loaded persona versions.
WORKER_KEY_PREFIX = KEY_PREFIX + "worker:"
WORKER_INDEX_KEY = KEY_PREFIX + "workers"  # sorted set: worker id -> when its heartbeat lapses
# A worker still loading its models (JSON, with a short TTL): what it loads, since when.
# Kept apart from the heartbeats: a starting worker serves nothing, so swaps, reclaiming
# and every count of live workers leave it out; only notices and monitoring show it.
STARTING_KEY_PREFIX = KEY_PREFIX + "starting:"
STARTING_INDEX_KEY = KEY_PREFIX + "starting"  # sorted set: worker id -> when its starting key lapses
# Counters that survive a restart (a hash of name -> integer).
STATS_KEY = KEY_PREFIX + "stats"
# Active checkpoint version per persona (a hash persona -> version).
ACTIVE_VERSIONS_KEY = KEY_PREFIX + "active"
# Chat adapters. {platform} is "telegram" or "discord"; {scope} names a chat and a user.
# A conversation's turns (JSON list, with a TTL); /reset deletes it.
CONVERSATION_KEY_PREFIX = KEY_PREFIX + "conv:"
# The request a user is waiting on (for /cancel), with a TTL.
INFLIGHT_KEY_PREFIX = KEY_PREFIX + "inflight:"
# Fixed-window message counters per user and per chat.
RATE_KEY_PREFIX = KEY_PREFIX + "rate:"
# The persona a chat or channel talks to, when switched from the default.
CHAT_PERSONA_KEY_PREFIX = KEY_PREFIX + "chat-persona:"
# Private-chat access: a set of approved user ids per platform, pending pairing codes.
ACCESS_KEY_PREFIX = KEY_PREFIX + "access:"
PAIRING_CODE_KEY_PREFIX = KEY_PREFIX + "pairing:code:"
PAIRING_USER_KEY_PREFIX = KEY_PREFIX + "pairing:user:"

# Scheduled posts. A (persona, slot) is worked on by one owner at a time (a lock with a
# lease), and its ledger record (a hash) says what went out where, with the platforms'
# post ids; an intent is written before each platform call so a crash is never silent.
POST_LOCK_KEY_PREFIX = KEY_PREFIX + "post-lock:"
POST_RECORD_KEY_PREFIX = KEY_PREFIX + "post:"
POST_HISTORY_STREAM = KEY_PREFIX + "posts"
RECENT_POSTS_KEY_PREFIX = KEY_PREFIX + "recent-posts:"
# Each persona's slots whose records still matter (open, waiting for approval, or with a sink
# that got no answer): a set, so that no reader scans every record (a closed slot's record
# expires); the personas that have had one; a mark that the sets were built from the records
# written before them; and each persona's newest closed scheduled slot, whose record is kept.
POST_OPEN_KEY_PREFIX = KEY_PREFIX + "post-open:"
POST_OPEN_PERSONAS_KEY = KEY_PREFIX + "post-open-personas"
POST_OPEN_BUILT_KEY = KEY_PREFIX + "post-open-built"
POST_NEWEST_KEY_PREFIX = KEY_PREFIX + "post-newest:"
# The approval queue: one hash per waiting post, and a sorted set of the pending ids.
APPROVAL_KEY_PREFIX = KEY_PREFIX + "approval:"
APPROVALS_PENDING_KEY = KEY_PREFIX + "approvals"
# When each persona's schedule was last looked at (hash persona -> epoch seconds).
SCHEDULER_CHECKED_KEY = KEY_PREFIX + "scheduler:checked"

POST_HISTORY_MAX_LEN = 10_000
RECENT_POSTS_KEPT = 100
# Checkpoint swaps in progress (a hash persona -> proposal JSON; one per persona at once).
SWAPS_KEY = KEY_PREFIX + "swaps"
# Each worker's answer to one swap proposal (a hash worker -> vote JSON).
SWAP_VOTES_KEY_PREFIX = KEY_PREFIX + "swap-votes:"
# Versions a persona was swapped away from, newest first (what `rollback` returns to).
VERSION_HISTORY_KEY_PREFIX = KEY_PREFIX + "history:"
# Every committed swap, with when it took effect.
SWAP_LOG_STREAM = KEY_PREFIX + "swap-log"
# Per-reply timings (a capped stream) and durable histograms/counters behind the figures.
REPLY_LOG_STREAM = KEY_PREFIX + "reply-log"
HISTOGRAM_KEY_PREFIX = KEY_PREFIX + "hist:"
VERSION_REPLIES_KEY = KEY_PREFIX + "stats:versions"

DEAD_STREAM_MAX_LEN = 10_000
REPLY_LOG_MAX_LEN = 10_000
SWAP_LOG_MAX_LEN = 1_000
VERSION_HISTORY_MAX_LEN = 50
SWAP_VOTES_TTL_S = 3600
# A request's answered mark lasts this long past its deadline, and the reply TTL after
# its answer at least (see ``pending_entries.answered_until``)...
ANSWERED_PAST_DEADLINE_S = 60
# ...or, where its deadline is unknown (an older client's entry), this long: the latest
# deadline a request may have (a day), and a minute.
ANSWERED_TTL_S = 24 * 3600 + ANSWERED_PAST_DEADLINE_S
BLOCK_MS = 1000
EMBEDDED_REDIS_START_TIMEOUT_S = 20.0


def reply_key(request_id: str) -> str:
    return REPLY_KEY_PREFIX + request_id


def answered_key(request_id: str) -> str:
    return ANSWERED_KEY_PREFIX + request_id


def digest_key(request_id: str) -> str:
    return DIGEST_KEY_PREFIX + request_id


def refused_key(request_id: str) -> str:
    return REFUSED_KEY_PREFIX + request_id


def cancel_key(request_id: str) -> str:
    return CANCEL_KEY_PREFIX + request_id


def user_pending_key(user: str) -> str:
    return USER_PENDING_KEY_PREFIX + user


def worker_key(worker_id: str) -> str:
    return WORKER_KEY_PREFIX + worker_id


def starting_key(worker_id: str) -> str:
    return STARTING_KEY_PREFIX + worker_id


def conversation_key(platform: str, scope: str) -> str:
    return f"{CONVERSATION_KEY_PREFIX}{platform}:{scope}"


def inflight_key(platform: str, scope: str) -> str:
    return f"{INFLIGHT_KEY_PREFIX}{platform}:{scope}"


def rate_key(platform: str, kind: str, ident: str, window: int) -> str:
    return f"{RATE_KEY_PREFIX}{platform}:{kind}:{ident}:{window}"


def chat_persona_key(platform: str, chat: str) -> str:
    return f"{CHAT_PERSONA_KEY_PREFIX}{platform}:{chat}"


def access_key(platform: str) -> str:
    return ACCESS_KEY_PREFIX + platform


def pairing_code_key(code: str) -> str:
    return PAIRING_CODE_KEY_PREFIX + code


def pairing_user_key(platform: str, user: str) -> str:
    return f"{PAIRING_USER_KEY_PREFIX}{platform}:{user}"


def post_lock_key(persona: str, slot: str) -> str:
    return f"{POST_LOCK_KEY_PREFIX}{persona}:{slot}"


def post_record_key(persona: str, slot: str) -> str:
    return f"{POST_RECORD_KEY_PREFIX}{persona}:{slot}"


def recent_posts_key(persona: str) -> str:
    return RECENT_POSTS_KEY_PREFIX + persona


def post_open_key(persona: str) -> str:
    return POST_OPEN_KEY_PREFIX + persona


def post_newest_key(persona: str) -> str:
    return POST_NEWEST_KEY_PREFIX + persona


def approval_key(approval_id: str) -> str:
    return APPROVAL_KEY_PREFIX + approval_id


def swap_votes_key(proposal_id: str) -> str:
    return SWAP_VOTES_KEY_PREFIX + proposal_id


def version_history_key(persona: str) -> str:
    return VERSION_HISTORY_KEY_PREFIX + persona


def histogram_key(name: str) -> str:
    return HISTOGRAM_KEY_PREFIX + name
