"""Every Redis key the service uses, and the limits that carry units in their names."""

from __future__ import annotations

KEY_PREFIX = "persona:"

# Streams: interactive chat is always served before batch work (posts, evals, samples).
STREAM_INTERACTIVE = KEY_PREFIX + "q:chat"
STREAM_BATCH = KEY_PREFIX + "q:batch"
STREAMS_BY_PRIORITY = (STREAM_INTERACTIVE, STREAM_BATCH)
STREAM_DEAD = KEY_PREFIX + "q:dead"
CONSUMER_GROUP = "workers"

# One list per request; the worker LPUSHes the reply, the caller BLPOPs it.
REPLY_KEY_PREFIX = KEY_PREFIX + "reply:"
# Set once per request by the first worker that answers it: a retry never answers twice.
ANSWERED_KEY_PREFIX = KEY_PREFIX + "answered:"
# Set by a caller that no longer wants its answer (/cancel).
CANCEL_KEY_PREFIX = KEY_PREFIX + "cancel:"
# How many requests one sender has waiting or running (fair share under a flood).
USER_PENDING_KEY_PREFIX = KEY_PREFIX + "user-pending:"
# A worker's heartbeat (JSON, with a TTL): host, device, loaded persona versions.
WORKER_KEY_PREFIX = KEY_PREFIX + "worker:"
# Counters that survive a restart (a hash of name -> integer).
STATS_KEY = KEY_PREFIX + "stats"
# Active checkpoint version per persona (a hash persona -> version).
ACTIVE_VERSIONS_KEY = KEY_PREFIX + "active"
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
ANSWERED_TTL_S = 24 * 3600
BLOCK_MS = 1000
EMBEDDED_REDIS_START_TIMEOUT_S = 20.0


def reply_key(request_id: str) -> str:
    return REPLY_KEY_PREFIX + request_id


def answered_key(request_id: str) -> str:
    return ANSWERED_KEY_PREFIX + request_id


def cancel_key(request_id: str) -> str:
    return CANCEL_KEY_PREFIX + request_id


def user_pending_key(user: str) -> str:
    return USER_PENDING_KEY_PREFIX + user


def worker_key(worker_id: str) -> str:
    return WORKER_KEY_PREFIX + worker_id


def swap_votes_key(proposal_id: str) -> str:
    return SWAP_VOTES_KEY_PREFIX + proposal_id


def version_history_key(persona: str) -> str:
    return VERSION_HISTORY_KEY_PREFIX + persona


def histogram_key(name: str) -> str:
    return HISTOGRAM_KEY_PREFIX + name
