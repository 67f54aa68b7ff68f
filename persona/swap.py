"""All-or-nothing checkpoint swaps across every live worker (two-phase).

1. The operator's command writes a *proposal* for one persona into Redis (one at a
   time per persona) naming the live workers that must agree: those that serve the
   persona (``voters``).
2. Each of those workers loads the new weights beside the old ones (on a CPU in a
   thread, decoding meanwhile), checks them, and votes ready, or refused with the
   reason (``persona/swapper.py``).
3. When every voter still alive (and any that began serving the persona meanwhile) has
   voted ready, one Lua script checks the votes again and flips the active version; if
   any refused (or time ran out) the proposal is withdrawn and nothing changes. Workers
   pick up a flip at their next batch and free the old weights.

The active version per persona lives in the ``ACTIVE_VERSIONS_KEY`` hash: a version
name (``v3``), ``base``, or an absolute checkpoint folder. No entry means the persona
file's own choice. The versions swapped away from are kept in a list, for rollback.
"""

from __future__ import annotations

import datetime as dt
import getpass
import logging
import os
import socket
import time
import uuid
from collections.abc import Callable, Mapping
from typing import Literal

import redis
from pydantic import BaseModel, Field

from persona import constants as keys
from persona.checkpoints import BASE_VERSION
from persona.connection import retrying_until
from persona.errors import SwapRefused
from persona.heartbeat import WorkerInfo, live_worker_ids, redis_now
from persona.personas import Persona

__all__ = [
    "SwapOutcome",
    "SwapProposal",
    "Vote",
    "abort",
    "active_versions",
    "cast_vote",
    "commit",
    "current_version",
    "open_proposal",
    "open_proposals",
    "operator_name",
    "propose",
    "rollback_target",
    "run_swap",
    "served_versions",
    "swap_log",
    "swap_persona",
    "version_history",
    "voters",
    "votes",
]

log = logging.getLogger(__name__)

POLL_S = 0.1
WITHDRAW_WAIT_S = 2.0  # a stopped swap gives up withdrawing its proposal after this long
SWAP_LOG_SCAN = 1000  # the swap log's cap (COMMIT_SCRIPT's MAXLEN)

# Flip the active version only if the proposal is still the open one, the persona still
# serves what the proposal was made from (and a rollback still returns to the newest
# version in the history: another operator's swap or rollback may have landed since it
# was read), and every named worker has voted ready; record the version left behind
# (or pop it on a rollback), and log the change with who asked for it (ARGV[7]).
COMMIT_SCRIPT = """
local raw = redis.call('HGET', KEYS[1], ARGV[1])
if not raw then return 'gone' end
if cjson.decode(raw)['id'] ~= ARGV[2] then return 'gone' end
local serving = redis.call('HGET', KEYS[2], ARGV[1])
if serving and serving ~= ARGV[4] then return 'moved:' .. serving end
if ARGV[5] == 'rollback' and redis.call('LINDEX', KEYS[3], 0) ~= ARGV[3] then return 'history:' .. ARGV[4] end
for i = 8, #ARGV do
  local vote = redis.call('HGET', KEYS[5], ARGV[i])
  if not vote then return 'missing:' .. ARGV[i] end
  if not cjson.decode(vote)['ready'] then return 'refused:' .. ARGV[i] end
end
redis.call('HSET', KEYS[2], ARGV[1], ARGV[3])
if ARGV[5] == 'rollback' then
  redis.call('LPOP', KEYS[3])
else
  redis.call('LPUSH', KEYS[3], ARGV[4])
  redis.call('LTRIM', KEYS[3], 0, tonumber(ARGV[6]) - 1)
end
redis.call('HDEL', KEYS[1], ARGV[1])
local t = redis.call('TIME')
redis.call('XADD', KEYS[4], 'MAXLEN', '~', 1000, '*', 'persona', ARGV[1], 'version', ARGV[3],
  'previous', ARGV[4], 'kind', ARGV[5], 'at', t[1] .. '.' .. string.format('%06d', t[2]), 'by', ARGV[7])
return 'ok'
"""

# Withdraw a proposal, but only the one this caller opened.
ABORT_SCRIPT = """
local raw = redis.call('HGET', KEYS[1], ARGV[1])
if raw and cjson.decode(raw)['id'] == ARGV[2] then
  redis.call('HDEL', KEYS[1], ARGV[1])
  return 1
end
return 0
"""


def operator_name() -> str:
    """Who is asking, as the swap log records it: ``user@host`` of this process."""
    try:
        user = getpass.getuser()
    except (KeyError, OSError):  # a container's uid with no name and no $USER
        user = f"uid{os.getuid()}"
    return f"{user}@{socket.gethostname()}"


class SwapProposal(BaseModel):
    """One persona's pending switch to another version."""

    id: str = Field(default_factory=lambda: uuid.uuid4().hex[:12])
    persona: str
    target: str = Field(description="version name, 'base', or an absolute checkpoint folder")
    previous: str = Field(description="what was active before ('' for the persona file's choice)")
    kind: Literal["swap", "rollback"] = "swap"
    by: str = Field("", description="who asked for it, kept in the swap log (opened without it: user@host of this process)")
    workers: list[str] = Field(default_factory=list, description="workers that must vote ready")
    created_at: float = Field(default_factory=time.time,
                              description="when it was opened, by Redis's clock (``open_proposal`` stamps it)")
    deadline: float = Field(0.0, description="when it lapses, by Redis's clock (as every party reads it)")

    def expired(self, now: float) -> bool:
        """Whether it has lapsed, ``now`` being Redis's time: the operator's and the
        workers' clocks may disagree, Redis's is the one they share."""
        return now > self.deadline


class Vote(BaseModel):
    """One worker's answer to a proposal."""

    worker: str
    ready: bool
    reason: str = ""
    seconds: float = 0.0


class SwapOutcome(BaseModel):
    """How a swap ended: committed, or refused with each worker's answer."""

    proposal: SwapProposal
    committed: bool
    unchanged: bool = Field(False, description="the persona already served the target: no worker was asked")
    votes: dict[str, Vote] = Field(default_factory=dict)
    problem: str = ""


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def active_versions(client: redis.Redis) -> dict[str, str]:
    """persona -> active version, for every persona an operator has swapped."""
    return {_text(k): _text(v) for k, v in client.hgetall(keys.ACTIVE_VERSIONS_KEY).items()}


def version_history(client: redis.Redis, persona: str) -> list[str]:
    """Versions this persona was swapped away from, newest first."""
    return [_text(v) for v in client.lrange(keys.version_history_key(persona), 0, -1)]


def current_version(client: redis.Redis, persona: Persona) -> str:
    """What serves the persona now: the active version in Redis, else its file's choice."""
    return served_versions({persona.name: persona}, active_versions(client))[persona.name]


def served_versions(personas: Mapping[str, Persona], active: Mapping[str, str]) -> dict[str, str]:
    """persona -> the version serving it, for each of ``personas``: the one swapped to
    (``active``, as ``active_versions`` reads it), else its file's checkpoint, else base."""
    return {name: active.get(name) or p.model.checkpoint or BASE_VERSION for name, p in personas.items()}


def rollback_target(client: redis.Redis, persona: str) -> str:
    """The version a rollback returns to; SwapRefused if the persona was never swapped."""
    history = version_history(client, persona)
    if not history:
        raise SwapRefused(
            f"{persona!r} has no earlier version to roll back to; "
            f"pick one with `persona checkpoints {persona}` and `persona swap {persona} VERSION`"
        )
    return history[0]


def open_proposals(client: redis.Redis) -> list[SwapProposal]:
    """Every swap waiting for votes."""
    return [SwapProposal.model_validate_json(v) for v in client.hgetall(keys.SWAPS_KEY).values()]


def votes(client: redis.Redis, proposal_id: str) -> dict[str, Vote]:
    """The votes cast on one proposal so far."""
    return {_text(k): Vote.model_validate_json(v) for k, v in client.hgetall(keys.swap_votes_key(proposal_id)).items()}


def cast_vote(client: redis.Redis, proposal_id: str, vote: Vote) -> None:
    """Record one worker's answer."""
    key = keys.swap_votes_key(proposal_id)
    pipe = client.pipeline()
    pipe.hset(key, vote.worker, vote.model_dump_json())
    pipe.expire(key, keys.SWAP_VOTES_TTL_S)
    pipe.execute()


def swap_log(client: redis.Redis, count: int = 100, persona: str | None = None) -> list[dict[str, str]]:
    """The latest committed swaps (of one persona, if named), newest first, each with the
    time it took effect and who asked for it (``by``; absent from swaps logged before it was kept)."""
    if persona is None:
        rows = client.xrevrange(keys.SWAP_LOG_STREAM, count=count)
        return [{_text(k): _text(v) for k, v in fields.items()} for _, fields in rows]
    # One log for every persona, capped at about a thousand swaps: read it all, keep this one's.
    everyone = swap_log(client, count=SWAP_LOG_SCAN)
    return [entry for entry in everyone if entry.get("persona") == persona][:count]


def propose(client: redis.Redis, proposal: SwapProposal) -> None:
    """Open a proposal; SwapRefused if another swap of this persona is under way."""
    encoded = proposal.model_dump_json()
    if client.hsetnx(keys.SWAPS_KEY, proposal.persona, encoded):
        return
    raw = client.hget(keys.SWAPS_KEY, proposal.persona)
    if raw is not None:
        other = SwapProposal.model_validate_json(raw)
        now = redis_now(client)
        if not other.expired(now):
            raise SwapRefused(_under_way_text(proposal.persona, other, now))
        abort(client, other)  # its operator gave up; clear it
    if not client.hsetnx(keys.SWAPS_KEY, proposal.persona, encoded):
        raise SwapRefused(f"another swap of {proposal.persona!r} started just now; try again")


def _under_way_text(persona: str, other: SwapProposal, now: float) -> str:
    """Why a swap cannot start while ``other`` is open (``now``: Redis's time), and until when:
    one whose command was killed before it could withdraw it stays open until its deadline
    (``--timeout``, 300 s by default), and the refusal gave no hint of how long that was."""
    left_s = max(0.0, other.deadline - now)
    lapses_at = dt.datetime.fromtimestamp(time.time() + left_s).strftime("%H:%M:%S")  # on this machine's clock
    return (
        f"a swap of {persona!r} to {other.target!r}{f' by {other.by}' if other.by else ''} is already under way "
        f"(started {max(0.0, now - other.created_at):.0f} s ago); wait for it to finish, at the latest when it "
        f"lapses in {left_s:.0f} s ({lapses_at})"
    )


def commit(client: redis.Redis, proposal: SwapProposal, ready_workers: list[str]) -> str:
    """Flip the active version atomically; 'ok', or why not ('refused:W', 'missing:W', 'gone',
    'moved:V': the persona serves V, not what the proposal was made from; 'history:V': it
    serves V, but the version a rollback returns to is no longer the one before V)."""
    result = client.eval(
        COMMIT_SCRIPT,
        5,
        keys.SWAPS_KEY,
        keys.ACTIVE_VERSIONS_KEY,
        keys.version_history_key(proposal.persona),
        keys.SWAP_LOG_STREAM,
        keys.swap_votes_key(proposal.id),
        proposal.persona,
        proposal.id,
        proposal.target,
        proposal.previous,
        proposal.kind,
        keys.VERSION_HISTORY_MAX_LEN,
        proposal.by,
        *ready_workers,
    )
    return _text(result)


def abort(client: redis.Redis, proposal: SwapProposal) -> bool:
    """Withdraw a proposal (if it is still the open one); workers free what they loaded."""
    return bool(client.eval(ABORT_SCRIPT, 1, keys.SWAPS_KEY, proposal.persona, proposal.id))


def _refusal_text(proposal: SwapProposal, refused: dict[str, Vote]) -> str:
    lines = [f"swap of {proposal.persona!r} to {proposal.target!r} refused; nothing changed:"]
    lines += [f"  worker {w}: {v.reason}" for w, v in sorted(refused.items())]
    return "\n".join(lines)


def _not_committed_text(proposal: SwapProposal, result: str) -> str:
    kind, _, serving = result.partition(":")
    if kind in ("moved", "history"):
        now = f"it serves {serving} now" + (f", and {proposal.target} is not the version before it" if kind == "history" else "")
        return (
            f"{proposal.persona!r} changed while this {proposal.kind} was prepared (another operator's swap or "
            f"rollback?): {now}; nothing changed; see "
            f"`persona checkpoints {proposal.persona}` and run it again if it is still wanted"
        )
    return f"{proposal.kind} of {proposal.persona!r} to {proposal.target!r} not committed ({result}); nothing changed"


def voters(client: redis.Redis, persona: str) -> set[str]:
    """The live workers that must vote on a swap of ``persona``: those whose heartbeat says
    they serve it, and any whose heartbeat cannot be read (it may serve it all the same, and
    would otherwise pick up the flip without having checked the weights).

    A worker that does not serve the persona is not asked: it used to load and check
    weights it would never serve. If it comes to serve the persona later, it loads the
    active version then, as a worker started after the swap does.
    """
    ids = sorted(live_worker_ids(client))
    if not ids:
        return set()
    found = set()
    for worker_id, raw in zip(ids, client.mget([keys.worker_key(i) for i in ids]), strict=True):
        if raw is None:  # its heartbeat lapsed since it was listed
            continue
        try:
            info = WorkerInfo.model_validate_json(raw)
        except ValueError:
            found.add(worker_id)
            continue
        if persona in info.personas:
            found.add(worker_id)
    return found


def open_proposal(client: redis.Redis, proposal: SwapProposal, timeout_s: float) -> SwapProposal:
    """Open a proposal for the workers that serve the persona now (``voters``), lapsing
    ``timeout_s`` from now by Redis's clock; the proposal as opened (SwapRefused if another
    is under way)."""
    now = redis_now(client)  # both by Redis's clock: the proposer's may disagree with whoever reads them
    proposal = proposal.model_copy(update={
        "workers": sorted(voters(client, proposal.persona)), "created_at": now, "deadline": now + timeout_s,
        "by": proposal.by or operator_name(),
    })
    propose(client, proposal)
    return proposal


def run_swap(
    client: redis.Redis,
    proposal: SwapProposal,
    timeout_s: float,
    on_progress: Callable[[int, int], None] | None = None,
    on_open: Callable[[SwapProposal], None] | None = None,
) -> SwapOutcome:
    """Open a proposal, wait for the vote of every live worker that serves the persona,
    then commit or withdraw it. ``on_open`` is given the proposal as opened (its id), so a
    caller stopped during the vote can name it."""
    give_up = time.monotonic() + timeout_s
    proposal = open_proposal(client, proposal, timeout_s)
    log.info("swap %s by %s: %s -> %s, waiting for %d worker(s)", proposal.id, proposal.by, proposal.persona, proposal.target,
             len(proposal.workers))
    try:
        if on_open:
            on_open(proposal)
        while True:
            cast = votes(client, proposal.id)
            refused = {w: v for w, v in cast.items() if not v.ready}
            if refused:
                abort(client, proposal)
                return SwapOutcome(proposal=proposal, committed=False, votes=cast, problem=_refusal_text(proposal, refused))
            # A worker that died meanwhile is not waited for: it reads the active
            # version when it starts again. One that began serving the persona meanwhile
            # (it was still loading its models when the proposal opened) is: it answers
            # the proposal like the others, and would otherwise serve the new weights
            # without having loaded and checked them (a damaged copy on its disk too).
            # Every vote cast counts, whoever cast it.
            expected = sorted(voters(client, proposal.persona).union(cast))
            if on_progress:
                on_progress(sum(1 for w in expected if w in cast), len(expected))
            if all(w in cast for w in expected):
                result = commit(client, proposal, expected)
                if result == "ok":
                    log.info("swap %s committed: %s now serves %s", proposal.id, proposal.persona, proposal.target)
                    return SwapOutcome(proposal=proposal, committed=True, votes=cast)
                if not result.startswith("missing:"):
                    abort(client, proposal)
                    return SwapOutcome(proposal=proposal, committed=False, votes=cast, problem=_not_committed_text(proposal, result))
            if time.monotonic() > give_up:
                silent = sorted(w for w in expected if w not in cast)
                abort(client, proposal)
                return SwapOutcome(
                    proposal=proposal, committed=False, votes=cast,
                    problem=f"swap of {proposal.persona!r} timed out after {timeout_s:.0f} s; nothing changed; "
                    f"no answer from worker(s) {', '.join(silent)} (busy with a long batch? see `persona queue stats`)",
                )
            time.sleep(POLL_S)
    except BaseException:
        _withdraw_quickly(client, proposal)  # Ctrl-C, SIGTERM or a lost connection: leave nothing half-open
        raise


def _withdraw_quickly(client: redis.Redis, proposal: SwapProposal) -> None:
    """Withdraw the proposal of a swap that stopped, giving up on Redis after
    ``WITHDRAW_WAIT_S``: with Redis gone, redis-py's reconnects held the command for
    seconds and then raised their own error in place of the stop. One not withdrawn
    lapses at its deadline, and nothing changes."""
    try:
        with retrying_until(time.monotonic() + WITHDRAW_WAIT_S):
            abort(client, proposal)
    except redis.exceptions.RedisError as exc:
        log.warning("could not withdraw swap %s of %s (%s); it lapses at its deadline", proposal.id, proposal.persona, exc)


def swap_persona(
    client: redis.Redis,
    persona: Persona,
    target: str,
    *,
    kind: Literal["swap", "rollback"] = "swap",
    timeout_s: float,
    on_progress: Callable[[int, int], None] | None = None,
    by: str | None = None,
    on_open: Callable[[SwapProposal], None] | None = None,
) -> SwapOutcome:
    """Move a persona from what serves it now to ``target`` on every live worker that serves
    it, or on none.

    ``by`` names who asked, for the swap log (default: ``user@host`` of this process; an
    adapter that swaps for a person should name that person). ``on_open``: see ``run_swap``."""
    proposal = SwapProposal(persona=persona.name, target=target, previous=current_version(client, persona), kind=kind,
                            by=by or "")
    return run_swap(client, proposal, timeout_s, on_progress, on_open)
