"""The dashboard's Prometheus figures (``/metrics``), read from Redis at each scrape,
and what the page shares with them: whether Redis could be read (``RedisWatch``) and the
posts a sink never answered (``PostsToSettle``, read at most every ``UNSETTLED_EVERY_S``:
finding them scans the keyspace).

With Redis out of reach a scrape still answers, with ``persona_redis_up 0`` and nothing
else, as an exporter does when what it watches is down.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Iterator

import redis
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)

from persona.ledger import PostLedger
from persona.logs import hide_secrets
from persona.monitoring import QueueStats, RedisMemory, collect_stats, read_memory
from persona.personas import PersonaRegistry
from persona.redis_refusals import is_full, refusal_text
from persona.settings import Settings
from persona.swap import served_versions
from persona.telemetry_reading import read_histogram

__all__ = ["PostsToSettle", "QueueCollector", "RedisWatch"]

log = logging.getLogger("persona.dashboard")  # one logger for the dashboard, as its log lines always said

BYTES_PER_MB = 1024 * 1024  # a heartbeat's memory_mb is ru_maxrss (KiB) / 1024
UNSETTLED_EVERY_S = 15.0  # posts to settle: a SCAN of the keyspace, not run at every poll of the page


class RedisWatch:
    """Whether the dashboard could read Redis last time; says so in the log once per change
    (the page asks every two seconds and Prometheus scrapes too: one line, not a traceback each).

    What it says hides ``secrets`` (the settings' passwords and tokens): it is the body of
    ``/readyz``, which answers anyone who can reach the dashboard, token or not, and a
    server that is not quite Redis may quote the password back ("unknown command 'AUTH',
    with args beginning with: ...")."""

    def __init__(
        self, secrets: list[str] | None = None, *, reachable: bool = True, client: redis.Redis | None = None,
        recovered: str = "the dashboard reads Redis again",
    ) -> None:
        self.reachable = reachable  # False: out of reach already said (at start), so not said again
        self.secrets = secrets or []
        self.client = client  # asked its user, and its maxmemory when it is full
        self.recovered = recovered  # logged once it works again

    def failed(self, exc: redis.exceptions.RedisError) -> str:
        """Note a failure; the sentence the page and the log show."""
        said = self._refused(exc) or (
            f"the dashboard cannot read the queue from Redis ({str(exc).rstrip('.')}); is Redis running? "
            "`persona up` starts it; `persona queue stats` checks"
        )
        said = hide_secrets(said, self.secrets)
        if self.reachable:
            log.warning("%s", said)
        self.reachable = False
        return said

    def _refused(self, exc: redis.exceptions.RedisError) -> str | None:
        """Redis answered, refusing (full, a user its ACL denies, ...): that said, not "is it running?"."""
        if self.client is None:
            return refusal_text(exc)
        user = self.client.connection_pool.connection_kwargs.get("username") or "default"
        memory = None
        if is_full(exc):
            with contextlib.suppress(redis.exceptions.RedisError):
                memory = read_memory(self.client)
        return refusal_text(exc, user=user, max_bytes=memory.max_bytes if memory else None)

    def read(self) -> None:
        """Note a success."""
        if not self.reachable:
            log.info("%s", self.recovered)
        self.reachable = True


class PostsToSettle:
    """The posts that got no answer from a sink, as `persona posts uncertain` lists them, each
    with the command that finishes it; read again at most every ``every_s`` seconds."""

    def __init__(self, client: redis.Redis, every_s: float = UNSETTLED_EVERY_S, *, grace_s: float = 0.0) -> None:
        self.ledger = PostLedger(client, grace_s=grace_s)
        self.every_s = every_s
        self._read_at = float("-inf")
        self._items: list[dict[str, str]] = []

    def __call__(self) -> list[dict[str, str]]:
        if time.monotonic() - self._read_at >= self.every_s:
            self._items = self.ledger.unsettled()
            self._read_at = time.monotonic()
        return self._items


class QueueCollector:
    """Prometheus figures read from Redis at each scrape, so every worker's work counts."""

    def __init__(
        self, client: redis.Redis, watch: RedisWatch | None = None, settings: Settings | None = None,
        posts: Callable[[], list[dict[str, str]]] | None = None,
    ) -> None:
        self.redis = client
        self.watch = watch or RedisWatch()
        self.settings = settings  # where the persona files are: each one's version is shown, swapped or not
        self.posts = posts or PostsToSettle(client)

    def collect(self) -> Iterator[Metric]:
        """Yield every metric family; with Redis out of reach, only ``persona_redis_up 0``."""
        try:
            families, up = self._families(), 1
        except redis.exceptions.RedisError as exc:
            self.watch.failed(exc)
            families, up = [], 0
        else:
            self.watch.read()
        yield GaugeMetricFamily("persona_redis_up", "1 if the dashboard could read Redis at this scrape", value=up)
        yield from families

    def _families(self) -> list[Metric]:
        """Every family, read whole before any is yielded: Redis failing half way yields none."""
        timed = {} if self.settings is None else {"default_deadline_s": self.settings.queue.default_deadline_s}
        stats = collect_stats(self.redis, **timed)
        families = []
        if self.settings is None:
            served = stats.active_versions
        else:
            found, invalid = PersonaRegistry.from_settings(self.settings).scan()
            served = served_versions(found, stats.active_versions)
            # Absent from persona_active_version, with no trace: a broken file looked like no file.
            families.append(GaugeMetricFamily(
                "persona_personas_invalid", "Persona files that are invalid or cannot be read, and folders of them "
                "that cannot be read (`persona personas validate` names the problems): their personas are not "
                "served", value=len(invalid),
            ))
        families += [*_queue_families(stats), *_reply_families(stats, served), *_worker_families(stats)]
        if stats.redis_memory is not None:  # INFO denied (an ACL): these figures are absent, not 0
            families += _memory_families(stats.redis_memory)
        unsettled = GaugeMetricFamily(
            "persona_posts_unsettled", "Posts a sink never answered, left for a person (`persona posts uncertain`): "
            "uncertain (look, then settle), intent (safe to post again), or approved and begun (their poster "
            "stopped before reaching the sink)", labels=["state"],
        )
        posts = self.posts()
        for state in ("uncertain", "intent", "approved", "begun"):
            unsettled.add_metric([state], sum(1 for item in posts if item["state"] == state))
        families.append(unsettled)
        for name, help_text in (
            ("queue_wait_seconds", "Time requests waited in the queue (failed ones too, where measured)"),
            ("generate_seconds", "Time the batch that answered a request took to generate"),
            ("batch_size", "Requests generated together"),
        ):
            buckets, total, _ = read_histogram(self.redis, name)
            families.append(HistogramMetricFamily(f"persona_{name}", help_text, buckets=buckets, sum_value=total))
        return families


def _queue_families(stats: QueueStats) -> Iterator[Metric]:
    waiting = GaugeMetricFamily("persona_queue_waiting", "Requests waiting per stream (chat, batch)", labels=["stream"])
    in_flight = GaugeMetricFamily("persona_queue_in_flight", "Requests being generated per stream (chat, batch)", labels=["stream"])
    oldest = GaugeMetricFamily("persona_queue_oldest_waiting_seconds", "Age of the oldest waiting request", labels=["stream"])
    # Not taken yet and no longer wanted: not waiting work (a worker discards them).
    withdrawn = GaugeMetricFamily(
        "persona_queue_withdrawn", "Requests not taken yet whose callers withdrew them, per stream", labels=["stream"]
    )
    expired = GaugeMetricFamily(
        "persona_queue_expired", "Requests not taken yet whose deadline has passed, per stream", labels=["stream"]
    )
    for s in stats.streams:  # labelled chat and batch, as people call them, not by Redis key
        waiting.add_metric([s.label], s.waiting)
        in_flight.add_metric([s.label], s.in_flight)
        oldest.add_metric([s.label], s.oldest_waiting_s)
        withdrawn.add_metric([s.label], s.withdrawn)
        expired.add_metric([s.label], s.expired)
    yield from (waiting, in_flight, oldest, withdrawn, expired)
    yield GaugeMetricFamily("persona_dead_letters", "Requests in the dead-letter stream", value=stats.dead_letters)
    # A gauge, not a counter: it is worked out from other counts, which a moment's race
    # can leave one low, and a counter that dips reads as a reset.
    # Every one ever, a clean-up too: what the page and the CLI still warn of is the part
    # since the stream was last emptied (QueueStats.dead_letters_trimmed_since_cleared).
    yield GaugeMetricFamily(
        "persona_dead_letters_trimmed", "Dead letters deleted unseen at the stream's cap (never retried or dropped)",
        value=stats.dead_letters_trimmed,
    )
    yield GaugeMetricFamily("persona_stuck_requests", "Requests in flight past their deadline or held by a dead worker", value=len(stats.stuck))


def _reply_families(stats: QueueStats, served: dict[str, str]) -> Iterator[Metric]:
    replies = CounterMetricFamily("persona_replies", "Replies with text, per persona version", labels=["persona", "version"])
    for key, value in sorted(stats.version_replies.items()):
        persona, _, version = key.partition("@")
        replies.add_metric([persona, version], value)
    yield replies
    errors = CounterMetricFamily(
        "persona_request_errors", "Requests answered with an error, by kind (neither withdrawn nor expired)", labels=["kind"]
    )
    for name, value in sorted(stats.counters.items()):
        if name.startswith("failed:"):
            errors.add_metric([name.removeprefix("failed:")], value)
    yield errors
    yield CounterMetricFamily("persona_requests_withdrawn", "Requests discarded because their callers withdrew them",
                              value=stats.withdrawn)
    yield CounterMetricFamily("persona_requests_expired", "Requests whose deadline passed before they were generated",
                              value=stats.expired)
    # Both reasons always sampled (0 included): an alert on their rate has a series from the start.
    refused = CounterMetricFamily(
        "persona_requests_refused", "Requests refused as they were submitted, never queued, by reason "
        "(full: the queue was at its limit; user_share: their user already had their share waiting)", labels=["reason"]
    )
    refused.add_metric(["full"], stats.refused_full)
    refused.add_metric(["user_share"], stats.refused_user_share)
    yield refused
    yield CounterMetricFamily("persona_tokens_generated", "Tokens generated", value=stats.counters.get("tokens", 0))
    yield CounterMetricFamily("persona_requests_completed", "Requests answered with text", value=stats.completed)
    # Every persona, not only those swapped at least once: a panel or an alert on a
    # persona's version found nothing until its first swap.
    active = GaugeMetricFamily(
        "persona_active_version", "1 for the version each persona serves (base when never swapped)",
        labels=["persona", "version"],
    )
    for persona, version in sorted(served.items()):
        active.add_metric([persona, version], 1)
    yield active


def _worker_families(stats: QueueStats) -> Iterator[Metric]:
    # The counts, always one sample each (0 included): persona_worker_up has no sample with
    # no worker, so `sum(persona_worker_up) < 1` never fired, and it cannot name a worker
    # whose heartbeat it cannot read (a newer version's), which `queue stats` counts live.
    unreadable = len(stats.unreadable_workers)
    yield GaugeMetricFamily("persona_workers_live", "Workers with a live heartbeat, those whose heartbeat cannot be "
                            "read included (as `persona queue stats` counts them); alert on < 1",
                            value=len(stats.workers) + unreadable)
    yield GaugeMetricFamily("persona_workers_starting", "Workers still loading their models (not live: they serve nothing yet)",
                            value=len(stats.starting_workers))
    yield GaugeMetricFamily("persona_workers_unreadable", "Live workers whose heartbeat cannot be read (another version's?): "
                            "counted in persona_workers_live, absent from persona_worker_up", value=unreadable)
    # software_version: the persona each runs (`persona --version`; "unknown" from one too old to
    # say), so a rolling upgrade's progress is a query; one value per worker, as host and device.
    up = GaugeMetricFamily("persona_worker_up", "1 for each live worker whose heartbeat can be read (no sample when none: "
                           "count workers with persona_workers_live)", labels=["worker", "host", "device", "software_version"])
    # In bytes, Prometheus's base unit (it was megabytes, which no byte-formatting panel reads right).
    memory = GaugeMetricFamily(
        "persona_worker_peak_resident_memory_bytes", "Peak resident memory of each worker", labels=["worker"]
    )
    loaded = GaugeMetricFamily("persona_worker_persona_version", "1 for each persona version a worker serves", labels=["worker", "persona", "version"])
    for w in stats.workers:
        up.add_metric([w.id, w.host, w.device, w.version or "unknown"], 1)
        memory.add_metric([w.id], w.memory_mb * BYTES_PER_MB)
        for persona, version in sorted(w.personas.items()):
            loaded.add_metric([w.id, persona, version], 1)
    # Apart from persona_worker_up: a worker loading its models serves nothing yet.
    starting = GaugeMetricFamily(
        "persona_worker_starting_seconds", "How long each worker still loading its models has been starting",
        labels=["worker", "host", "device"],
    )
    for w in stats.starting_workers:
        starting.add_metric([w.id, w.host, w.device], w.loading_s)
    yield from (up, memory, loaded, starting)


def _memory_families(memory: RedisMemory) -> Iterator[Metric]:
    # An evicting Redis deletes persona's keys (queued work, counters, versions) without a
    # word: alert on persona_redis_evicts == 1, or on persona_redis_evicted_keys rising.
    yield GaugeMetricFamily("persona_redis_evicts", "1 if Redis deletes keys to make room once full (maxmemory set and "
                            "maxmemory-policy not noeviction): it can lose queued requests, counters and versions",
                            value=int(memory.evicts))
    yield CounterMetricFamily("persona_redis_evicted_keys", "Keys Redis has deleted to make room since it started "
                              "(INFO stats evicted_keys)", value=memory.evicted_keys)
    yield GaugeMetricFamily("persona_redis_used_memory_bytes", "Memory Redis uses (INFO memory used_memory)",
                            value=memory.used_bytes)
    yield GaugeMetricFamily("persona_redis_maxmemory_bytes", "Redis's maxmemory (0: no limit); under noeviction, "
                            "writes are refused once used memory reaches it", value=memory.max_bytes)
