"""The dashboard over real HTTP (uvicorn on loopback), its token rules, /metrics, and a real browser."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
import redis
from prometheus_client.parser import text_string_to_metric_families
from pydantic import SecretStr

from persona import constants as keys
from persona import heartbeat
from persona.contract import GenerationReply, GenerationRequest, Message, Timings
from persona.dashboard import create_app
from persona.dashboard_access import check_binding
from persona.dashboard_page import PAGE_HTML
from persona.errors import ConfigError, QueueBusy
from persona.monitoring import WRITE_PROBE_KEY
from persona.queue import QueueClient, WorkQueue
from persona.settings import Settings
from persona.supervisor import services_for_up
from persona.telemetry import record_replies
from persona.version import persona_version
from tests.conftest import free_port
from tests.fakes.full_redis import redis_refusing_writes
from tests.fakes.old_redis import OldRedis

CHROMIUM = Path("/usr/bin/chromium")


@pytest.fixture
def dashboard(settings, redis_url):
    """Start the real app under uvicorn in a thread: dashboard(token=None, host=..., url=...) -> base URL."""
    import uvicorn

    servers: list[tuple[uvicorn.Server, threading.Thread]] = []

    def start(token: str | None = None, host: str = "127.0.0.1", url: str = redis_url, client: redis.Redis | None = None) -> str:
        settings.dashboard.token = SecretStr(token) if token else None
        check_binding(settings, host)
        port = free_port()
        app = create_app(settings, client or redis.Redis.from_url(url))
        server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning"))
        thread = threading.Thread(target=server.run, daemon=True)
        thread.start()
        deadline = time.time() + 20
        while not server.started:
            assert time.time() < deadline, "uvicorn did not start"
            time.sleep(0.05)
        servers.append((server, thread))
        return f"http://127.0.0.1:{port}"

    yield start
    for server, thread in servers:
        server.should_exit = True
        thread.join(timeout=10)


def chat(persona: str = "tiny") -> GenerationRequest:
    return GenerationRequest(persona=persona, messages=[Message(role="user", content="hi")])


def fill_queue(settings, redis_client, waiting: int = 3) -> None:
    """Some waiting requests and one dead letter."""
    client = QueueClient(redis_client, settings.queue)
    queue = WorkQueue(redis_client, settings.queue)
    client.submit(chat())
    [job] = queue.claim("w-gone", 1, block_ms=0)
    queue.dead_letter(job, "it crashed the worker", 3, "w-gone")
    for _ in range(waiting):
        client.submit(chat())


def leave_post_unanswered(redis_client, persona: str = "tiny", slot: str = "2026-11-25T09:00:00Z",
                          sink: str = "x", state: str = "uncertain") -> None:
    """A post a sink took and never answered, recorded as the publisher records it."""
    from persona.ledger import PostLedger, SinkEntry

    ledger = PostLedger(redis_client)
    assert ledger.claim(persona, slot).claimed
    ledger.save(persona, slot, text="Patience is a slow garden.", sinks=f'["{sink}"]')
    ledger.set_sink(persona, slot, sink, SinkEntry(state=state, marker="m1", error="the request timed out"))
    ledger.finish(persona, slot, state, "Patience is a slow garden.")


def test_posts_that_got_no_answer_are_on_the_page_and_in_metrics(settings, redis_client, dashboard):
    """`persona posts uncertain` listed the posts X or Telegram never answered (maybe out,
    maybe not: only a person can tell), but the dashboard an operator watches said nothing."""
    base = dashboard()
    assert httpx.get(f"{base}/api/stats").json()["posts_to_settle"] == []
    leave_post_unanswered(redis_client)
    leave_post_unanswered(redis_client, slot="2026-11-26T09:00:00Z", sink="mastodon", state="intent")
    base = dashboard()  # a fresh one: the list is read again at most every UNSETTLED_EVERY_S
    listed = httpx.get(f"{base}/api/stats").json()["posts_to_settle"]
    assert [(p["persona"], p["sink"], p["state"]) for p in listed] == [("tiny", "x", "uncertain"), ("tiny", "mastodon", "intent")]
    assert listed[0]["command"].startswith("persona posts settle tiny 2026-11-25T09:00:00Z --sink x --posted LINK")
    assert listed[1]["command"] == "persona post tiny --slot 2026-11-26T09:00:00Z"
    assert listed[0]["text"] == "Patience is a slow garden." and "timed out" in listed[0]["error"]
    assert 'id="posts"' in httpx.get(base).text
    families = {f.name: f for f in text_string_to_metric_families(httpx.get(f"{base}/metrics").text)}
    counted = {s.labels["state"]: s.value for s in families["persona_posts_unsettled"].samples}
    assert counted == {"uncertain": 1, "intent": 1, "approved": 0, "begun": 0}

    # A `persona post` stopped before it reached its sink is listed by `posts uncertain`: counted too.
    from persona.ledger import PostLedger

    stopped, ledger = "manual-2026-11-27T09:00:00.000000Z", PostLedger(redis_client)
    assert ledger.claim("tiny", stopped).claimed
    ledger.save("tiny", stopped, text="A post stopped mid-way.", sinks='["bluesky"]')
    base = dashboard()
    families = {f.name: f for f in text_string_to_metric_families(httpx.get(f"{base}/metrics").text)}
    counted = {s.labels["state"]: s.value for s in families["persona_posts_unsettled"].samples}
    assert counted == {"uncertain": 1, "intent": 1, "approved": 0, "begun": 1}


def test_json_figures_personas_and_retry(settings, redis_client, dashboard, write_persona, tiny_llama_dir):
    write_persona("tiny", base=str(tiny_llama_dir))
    fill_queue(settings, redis_client)
    redis_client.hset(keys.ACTIVE_VERSIONS_KEY, "tiny", "v7")
    base = dashboard()
    data = httpx.get(f"{base}/api/stats").json()
    assert data["stats"]["streams"][0]["waiting"] == 3 and data["stats"]["dead_letters"] == 1
    assert {p["name"]: p["active"] for p in data["personas"]}["tiny"] == "v7"
    [letter] = data["dead"]
    assert letter["reason"] == "it crashed the worker" and letter["deliveries"] == 3
    deadline = time.time() + 5
    while not httpx.get(f"{base}/api/stats").json()["history"]:  # the sampler's first point
        assert time.time() < deadline, "the sampler added no point"
        time.sleep(0.05)
    page = httpx.get(base)
    assert page.status_code == 200 and "api/stats" in page.text and "http" not in page.text.split("<script>")[1]

    forged = httpx.post(f"{base}/api/dead/{letter['id']}/retry")  # what another site's page could send
    assert forged.status_code == 403
    done = httpx.post(f"{base}/api/dead/{letter['id']}/retry", headers={"X-Persona-Action": "1"})
    assert done.status_code == 200 and done.json() == {"requeued": [letter["id"]]}
    assert httpx.post(f"{base}/api/dead/{letter['id']}/retry", headers={"X-Persona-Action": "1"}).status_code == 404
    assert httpx.get(f"{base}/api/stats").json()["stats"]["streams"][0]["waiting"] == 4


def test_a_retry_from_the_page_waits_for_room_as_callers_do(settings, redis_client, dashboard):
    """The page's retry buttons re-queued dead letters whatever the queue held, past
    PERSONA_QUEUE__MAX_LENGTH (`persona queue retry` already waited for room)."""
    settings.queue.max_length = 3
    fill_queue(settings, redis_client, waiting=3)  # the chat stream is full
    base = dashboard()
    action = {"X-Persona-Action": "1"}
    [letter] = httpx.get(f"{base}/api/stats").json()["dead"]
    refused = httpx.post(f"{base}/api/dead/{letter['id']}/retry", headers=action)
    assert refused.status_code == 503 and "holds 3 requests" in refused.json()["detail"]
    report = httpx.post(f"{base}/api/dead/retry-all", headers=action).json()
    assert report == {"requeued": [], "full": {"persona:q:chat": 1}, "unreadable": 0, "refused": {}, "left": 1}
    assert redis_client.xlen("persona:q:chat") == 3 and redis_client.xlen("persona:q:dead") == 1


def test_a_retry_from_the_page_under_an_id_in_use_is_refused_saying_why(settings, redis_client, dashboard):
    """Refused by the queue (``InvalidRequest``), it answered a bare 500 the page showed as "cannot reach"."""
    QueueClient(redis_client, settings.queue).submit(
        GenerationRequest(id="order-42", persona="tiny", messages=[Message(role="user", content="question from A")]))
    other = GenerationRequest(id="order-42", persona="tiny", messages=[Message(role="user", content="question from B")])
    redis_client.xadd(keys.STREAM_INTERACTIVE, {"r": other.to_json()})  # a direct writer reuses the id
    WorkQueue(redis_client, settings.queue).claim("w1", 10, block_ms=100)  # takes A, sets B aside
    base = dashboard()
    [letter] = httpx.get(f"{base}/api/stats").json()["dead"]
    refused = httpx.post(f"{base}/api/dead/{letter['id']}/retry", headers={"X-Persona-Action": "1"})
    assert refused.status_code == 422 and "request id order-42 is in use by another request" in refused.json()["detail"]
    assert redis_client.xlen(keys.STREAM_DEAD) == 1


def test_a_dead_letter_that_cannot_be_retried_can_be_dropped_from_the_page(settings, redis_client, dashboard, tmp_path):
    """A letter holding no readable request had no button at all: it stayed on the page,
    and in the dead-letter count, for ever."""
    fill_queue(settings, redis_client, waiting=0)
    bad = redis_client.xadd(keys.STREAM_DEAD, {"r": b"not json", "reason": "malformed", "deliveries": 1}).decode()
    base = dashboard()
    action = {"X-Persona-Action": "1"}
    assert httpx.post(f"{base}/api/dead/{bad}/drop").status_code == 403  # what another site's page could send
    dropped = httpx.post(f"{base}/api/dead/{bad}/drop", headers=action)
    assert dropped.status_code == 200 and dropped.json() == {"dropped": [bad]}
    assert httpx.post(f"{base}/api/dead/{bad}/drop", headers=action).status_code == 404
    data = httpx.get(f"{base}/api/stats").json()
    assert data["stats"]["dead_letters"] == 1 and [d["reason"] for d in data["dead"]] == ["it crashed the worker"]
    if CHROMIUM.exists():  # the page offers it: one drop button per letter
        flags = [str(CHROMIUM), "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                 "--no-first-run", f"--user-data-dir={tmp_path / 'profile'}", "--virtual-time-budget=5000"]
        dom = subprocess.run([*flags, "--dump-dom", base], capture_output=True, check=False, text=True, timeout=120)
        assert 'data-do="drop">drop</button>' in dom.stdout, dom.stderr[-2000:]


def test_a_damaged_checkpoint_folder_leaves_the_figures_and_the_other_versions_shown(
    settings, redis_client, dashboard, write_persona, tiny_llama_dir
):
    """One version whose checkpoint.json was cut short (a copy interrupted, a hand edit)
    used to fail the whole of /api/stats: the page showed no figures at all."""
    write_persona("tiny", base=str(tiny_llama_dir))
    fill_queue(settings, redis_client)
    for version, metadata in (("v1", '{"persona": "tiny", "version": "v1", "base": "b", "kind": "full"}'),
                              ("v2", '{"persona": "tiny", "vers')):
        (settings.checkpoints_dir / "tiny" / version).mkdir(parents=True)
        (settings.checkpoints_dir / "tiny" / version / "checkpoint.json").write_text(metadata)
    response = httpx.get(f"{dashboard()}/api/stats")
    assert response.status_code == 200, response.text
    data = response.json()
    assert data["stats"]["streams"][0]["waiting"] == 3
    assert {p["name"]: p["versions"] for p in data["personas"]}["tiny"] == ["v1"]


def test_token_rules(settings, redis_client, dashboard):
    fill_queue(settings, redis_client, waiting=0)
    with pytest.raises(ConfigError, match="PERSONA_DASHBOARD__TOKEN"):
        dashboard(host="0.0.0.0")
    base = dashboard(token="s3cret", host="0.0.0.0")
    assert httpx.get(base).status_code == 200 and "s3cret" not in httpx.get(base).text  # the page holds no figure
    for path in ("/api/stats", "/metrics"):
        assert httpx.get(base + path).status_code == 401
        assert httpx.get(base + path, headers={"Authorization": "Bearer wrong"}).status_code == 401
        assert httpx.get(base + path, headers={"Authorization": "Bearer s3cret"}).status_code == 200
    assert httpx.get(f"{base}/api/stats?token=s3cret").status_code == 200
    assert httpx.post(f"{base}/api/dead/retry-all", headers={"X-Persona-Action": "1"}).status_code == 401
    done = httpx.post(f"{base}/api/dead/retry-all", headers={"Authorization": "Bearer s3cret"})
    assert done.status_code == 200 and len(done.json()["requeued"]) == 1
    assert httpx.get(f"{base}/healthz").status_code == 200


@pytest.mark.parametrize("blank", ["", "   "])
def test_a_blank_token_is_no_token(settings, redis_url, monkeypatch, blank):
    monkeypatch.setenv("PERSONA_DASHBOARD__TOKEN", blank)  # PERSONA_DASHBOARD__TOKEN= left in a .env
    from_env = Settings(_env_file=None, data_dir=settings.data_dir, redis_url=redis_url)
    assert from_env.dashboard.token is None
    with pytest.raises(ConfigError, match="PERSONA_DASHBOARD__TOKEN"):
        check_binding(from_env, "0.0.0.0")
    settings.dashboard.token = SecretStr(blank)  # set in code, past the settings' own check
    with pytest.raises(ConfigError, match="PERSONA_DASHBOARD__TOKEN"):
        check_binding(settings, "0.0.0.0")


def test_a_page_that_rebinds_its_name_to_loopback_is_refused(settings, redis_client, dashboard):
    """DNS rebinding: evil.example resolves to 127.0.0.1, so the browser sends its requests
    here as same-origin ones, but they carry Host: evil.example."""
    fill_queue(settings, redis_client, waiting=0)
    base = dashboard()
    port = base.rsplit(":", 1)[1]
    rebound = {"Host": f"evil.example:{port}", "X-Persona-Action": "1"}
    assert httpx.get(f"{base}/api/stats", headers=rebound).status_code == 400
    assert httpx.post(f"{base}/api/dead/retry-all", headers=rebound).status_code == 400
    assert redis_client.xlen(keys.STREAM_DEAD) == 1
    for name in ("127.0.0.1", "localhost", "[::1]"):
        assert httpx.get(f"{base}/api/stats", headers={"Host": f"{name}:{port}"}).status_code == 200

    # With a token (as in docker-compose, bound to 0.0.0.0 behind a published port) any name will do.
    guarded = dashboard(token="s3cret", host="0.0.0.0")
    named = {"Host": "persona.internal:8787", "Authorization": "Bearer s3cret"}
    assert httpx.get(f"{guarded}/api/stats", headers=named).status_code == 200


def test_metrics_parse_with_the_prometheus_parser(settings, redis_client, dashboard):
    fill_queue(settings, redis_client, waiting=2)
    replies = [GenerationReply(id=str(i), ok=True, persona="sage", version="v2" if i % 3 else "v1", new_tokens=5,
                               timings=Timings(queue_ms=20, generate_ms=300)) for i in range(9)]
    record_replies(redis_client, replies, batch_size=9)
    redis_client.hincrby(keys.STATS_KEY, "failed:timeout", 2)  # as older workers counted expired requests
    redis_client.hincrby(keys.STATS_KEY, "failed:model", 1)
    heartbeat.publish(redis_client, heartbeat.WorkerInfo(id="w-1", personas={"sage": "v2"}, memory_mb=321), ttl_s=30)
    text = httpx.get(f"{dashboard()}/metrics").text
    families = {f.name: f for f in text_string_to_metric_families(text)}
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value for f in families.values() for s in f.samples}
    assert samples[("persona_replies_total", (("persona", "sage"), ("version", "v2")))] == 6
    assert samples[("persona_replies_total", (("persona", "sage"), ("version", "v1")))] == 3
    # Labelled as people call the streams, not by Redis key (it was stream="persona:q:chat").
    assert samples[("persona_queue_waiting", (("stream", "chat"),))] == 2
    assert samples[("persona_queue_in_flight", (("stream", "batch"),))] == 0
    assert samples[("persona_request_errors_total", (("kind", "model"),))] == 1
    assert samples[("persona_requests_expired_total", ())] == 2  # not errors: nothing failed
    assert ("persona_request_errors_total", (("kind", "timeout"),)) not in samples
    assert samples[("persona_tokens_generated_total", ())] == 45
    assert samples[("persona_dead_letters", ())] == 1
    assert samples[("persona_worker_up", (("device", "cpu"), ("host", socket.gethostname()),
                                          ("software_version", persona_version()), ("worker", "w-1")))] == 1
    assert families["persona_generate_seconds"].type == "histogram"
    assert samples[("persona_generate_seconds_bucket", (("le", "0.25"),))] == 0
    assert samples[("persona_generate_seconds_bucket", (("le", "0.5"),))] == 9
    assert samples[("persona_batch_size_count", ())] == 1
    assert samples[("persona_redis_up", ())] == 1
    assert samples[("persona_worker_peak_resident_memory_bytes", (("worker", "w-1"),))] == 321 * 1024 * 1024
    # Prometheus's naming rules: base units (seconds, bytes), never ms or megabytes.
    unit_words = {"ms", "milliseconds", "mb", "megabytes", "kb", "kilobytes", "minutes", "hours"}
    assert not [name for name in families if unit_words & set(name.split("_"))]


def test_withdrawn_and_expired_requests_are_not_waiting_on_the_page_or_in_metrics(settings, redis_client, dashboard):
    """The page and /metrics read the same figures as `persona queue stats`: a request its
    caller withdrew, or whose deadline passed before a worker took it, counted as waiting."""
    client = QueueClient(redis_client, settings.queue)
    client.cancel(client.submit(chat()).id)
    client.submit(chat().model_copy(update={"deadline": time.time() + 0.2}))
    client.submit(chat())
    time.sleep(0.3)
    redis_client.hset(keys.STATS_KEY, mapping={"withdrawn": 4, "expired": 5})  # discarded by workers before
    base = dashboard()
    [shown, _] = httpx.get(f"{base}/api/stats").json()["stats"]["streams"]
    assert (shown["waiting"], shown["withdrawn"], shown["expired"]) == (1, 1, 1)
    families = text_string_to_metric_families(httpx.get(f"{base}/metrics").text)
    samples = {(s.name, tuple(s.labels.values())): s.value for f in families for s in f.samples}
    assert samples[("persona_queue_waiting", ("chat",))] == 1
    assert samples[("persona_queue_withdrawn", ("chat",))] == 1 and samples[("persona_queue_expired", ("chat",))] == 1
    assert samples[("persona_requests_withdrawn_total", ())] == 4 and samples[("persona_requests_expired_total", ())] == 5
    assert not [name for name, _ in samples if name == "persona_request_errors_total"]


def test_refused_requests_are_counted_on_the_page_and_in_metrics_by_reason(settings, redis_client, dashboard):
    """Refused requests were in no figure: an operator could not see, or alert on, callers
    turned away because the queue was full or a user had their share waiting. Both
    reasons are sampled from the start (0 before any refusal, and on counts an older
    version left), so an alert's rate() has a series to read."""
    redis_client.hset(keys.STATS_KEY, mapping={"completed": 3})  # as an older version left them
    base = dashboard()

    def refused() -> dict[str, float]:
        families = text_string_to_metric_families(httpx.get(f"{base}/metrics").text)
        [family] = [f for f in families if f.name == "persona_requests_refused"]
        assert family.type == "counter"
        return {s.labels["reason"]: s.value for s in family.samples if s.name == "persona_requests_refused_total"}

    assert refused() == {"full": 0, "user_share": 0}
    settings.queue.max_length, settings.queue.max_pending_per_user = 2, 1
    client = QueueClient(redis_client, settings.queue)
    for user in ("ann", "ann", "bob", "cy", "dee"):  # ann over her share; cy and dee find it full
        with contextlib.suppress(QueueBusy):
            client.submit(chat().model_copy(update={"user": user}))
    assert refused() == {"full": 2, "user_share": 1}
    shown = httpx.get(f"{base}/api/stats").json()["stats"]
    assert (shown["refused"], shown["refused_full"], shown["refused_user_share"]) == (3, 2, 1)  # the page's figures


def test_active_version_metric_covers_every_persona(settings, redis_client, dashboard, write_persona, tiny_llama_dir):
    """persona_active_version named only the personas swapped at least once: one never
    swapped (serving base, as the page said) had no series for a panel or alert to read."""
    write_persona("tiny", base=str(tiny_llama_dir))
    write_persona("other", base=str(tiny_llama_dir))
    redis_client.hset(keys.ACTIVE_VERSIONS_KEY, "other", "v2")
    base = dashboard()
    text = httpx.get(f"{base}/metrics").text
    [family] = [f for f in text_string_to_metric_families(text) if f.name == "persona_active_version"]
    served = {s.labels["persona"]: s.labels["version"] for s in family.samples if s.value == 1}
    assert served["tiny"] == "base" and served["other"] == "v2"
    page = {p["name"]: p["active"] for p in httpx.get(f"{base}/api/stats").json()["personas"]}
    assert {name: served[name] for name in page} == page  # the page and /metrics agree


def test_with_redis_out_of_reach_the_page_and_metrics_say_so(settings, dashboard, caplog):
    """Every figure and action answered a bare 500 (the page then said "cannot reach the
    dashboard", which was up), each with a traceback in the log, and /metrics failed the
    scrape, which Prometheus reads as the dashboard being down, not Redis."""
    base = dashboard(url=f"redis://127.0.0.1:{free_port()}/0")  # nothing listens there
    for _ in range(2):
        figures = httpx.get(f"{base}/api/stats", timeout=60)
        assert figures.status_code == 503 and "cannot read the queue from Redis" in figures.json()["detail"]
    retried = httpx.post(f"{base}/api/dead/1-1/retry", headers={"X-Persona-Action": "1"}, timeout=60)
    assert retried.status_code == 503 and "Redis" in retried.json()["detail"]
    scraped = httpx.get(f"{base}/metrics", timeout=60)
    assert scraped.status_code == 200
    samples = {s.name: s.value for f in text_string_to_metric_families(scraped.text) for s in f.samples}
    assert samples == {"persona_redis_up": 0}
    said = [r for r in caplog.records if r.name == "persona.dashboard"]
    assert len(said) == 1 and "cannot read the queue from Redis" in said[0].getMessage()
    assert not [r for r in caplog.records if r.exc_info]


def test_entries_and_letters_whose_fields_cannot_be_read_leave_the_page_and_metrics_answering(
    settings, redis_client, dashboard
):
    """An entry in flight whose deadline was no number, or a dead letter whose delivery
    count was none, made /api/stats and /metrics answer 500 (a foreign writer's)."""
    redis_client.xgroup_create(keys.STREAM_INTERACTIVE, keys.CONSUMER_GROUP, id="0", mkstream=True)
    redis_client.xadd(keys.STREAM_INTERACTIVE, {"r": b'{"x": 1}', "d": b"notanumber"})
    redis_client.xreadgroup(keys.CONSUMER_GROUP, "ghost", {keys.STREAM_INTERACTIVE: ">"})
    bad = redis_client.xadd(keys.STREAM_DEAD, {"deliveries": b"abc", "at": b"xyz"}).decode()
    base = dashboard()
    figures = httpx.get(f"{base}/api/stats")
    assert figures.status_code == 200, figures.text
    data = figures.json()
    assert [(d["id"], d["request_id"], d["deliveries"]) for d in data["dead"]] == [(bad, "", 0)]
    assert [s["worker"] for s in data["stats"]["stuck"]] == ["ghost"]
    scraped = httpx.get(f"{base}/metrics")
    assert scraped.status_code == 200 and "persona_redis_up 1.0" in scraped.text


def test_the_sampler_outlives_an_unexpected_error_and_says_so_once(settings, redis_client, dashboard, monkeypatch, caplog):
    """The charts' sampler caught only Redis errors: anything else ended it for good, with
    not a line in the log, and the charts stood still while the figures went on."""
    import persona.dashboard

    # A fault no reading of Redis gives any more (a damaged counter is now left out, not raised):
    # the figures' reader fails, unexpectedly, until the fault is taken away.
    failing = True
    collect = persona.dashboard.collect_stats

    def collect_unless_failing(*args, **kwargs):
        if failing:
            raise ValueError("an unexpected fault")
        return collect(*args, **kwargs)

    monkeypatch.setattr(persona.dashboard, "collect_stats", collect_unless_failing)
    monkeypatch.setattr(persona.dashboard, "SAMPLE_EVERY_S", 0.05)
    base = dashboard()
    time.sleep(0.5)  # ten samples tried, all failed
    said = [r for r in caplog.records if "could not sample the queue" in r.getMessage()]
    assert len(said) == 1 and said[0].exc_info and "persona queue stats" in said[0].getMessage()
    failing = False
    deadline = time.time() + 5
    while len(history := httpx.get(f"{base}/api/stats").json()["history"]) < 5:  # the sampler's points
        assert time.time() < deadline, f"the sampler stopped: {history}"
        time.sleep(0.1)


def test_readyz_says_when_redis_cannot_be_read_and_healthz_stays_liveness(settings, dashboard, tmp_path):
    """/healthz said ok with Redis down, and there was nothing else for a probe to ask: a
    load balancer or a container healthcheck saw a ready dashboard whose every figure
    answered 503. Redis here is a real one, stopped under the running dashboard."""
    from persona.connection import connect
    from persona.embedded_redis import EmbeddedRedis

    server = EmbeddedRedis(tmp_path / "own-redis")
    url = server.start()
    try:
        base = dashboard(token="s3cret", client=connect(settings, url=url))  # the service's client, retries and all
        ready = httpx.get(f"{base}/readyz")  # a probe carries no token
        assert ready.status_code == 200 and ready.json() == {"ready": True}
        server.stop()
        started = time.monotonic()
        down = httpx.get(f"{base}/readyz", timeout=60)
        assert down.status_code == 503 and "cannot read the queue from Redis" in down.json()["detail"]
        assert time.monotonic() - started < 3  # tried once, not through seconds of backoff
        assert httpx.get(f"{base}/healthz").status_code == 200  # alive all the same
        server.start()
        assert httpx.get(f"{base}/readyz").status_code == 200
    finally:
        server.stop()


def test_a_silent_redis_is_answered_in_seconds_and_the_probes_keep_answering(settings, redis_url, dashboard, monkeypatch):
    """A Redis that stops answering (hung, its host gone) held every page read and scrape
    for 54 s (one 5 s read timeout per reconnect, eight of them): Prometheus gave up on the
    scrape at its 10 s timeout, so `persona_redis_up 0` was never seen, and the page's polls
    piled up until they held every worker thread, and /healthz went unanswered: a liveness
    probe would restart the dashboard, which brings no Redis back. Now each read gives up
    after one read timeout, and the probes never wait behind the page."""
    from concurrent.futures import ThreadPoolExecutor

    from persona import connection
    from persona import dashboard as dashboard_module
    from tests.fakes.cutting_proxy import CuttingProxy

    monkeypatch.setattr(connection, "CONNECT_TIMEOUT_S", 0.5)
    # 5 s, 3 s and 2 s in service: here a read gives up within its first timeout too.
    monkeypatch.setattr(connection, "SOCKET_TIMEOUT_S", 0.5)
    monkeypatch.setattr(dashboard_module, "READ_GIVE_UP_S", 0.3, raising=False)
    monkeypatch.setattr(dashboard_module, "READY_TIMEOUT_S", 0.5)
    proxy = CuttingProxy(redis_url)
    try:
        base = dashboard(client=connection.connect(settings, url=proxy.url))  # the service's client, retries and all
        assert httpx.get(f"{base}/api/stats", timeout=30).status_code == 200
        proxy.go_silent()
        with ThreadPoolExecutor(45) as pool:  # more polls than the 40 worker threads: tabs left open overnight
            polls = [pool.submit(httpx.get, f"{base}/api/stats", timeout=120) for _ in range(45)]
            time.sleep(0.5)
            started = time.monotonic()
            assert httpx.get(f"{base}/healthz", timeout=30).status_code == 200
            assert time.monotonic() - started < 1
            ready = httpx.get(f"{base}/readyz", timeout=30)
            assert ready.status_code == 503 and time.monotonic() - started < 2
            answered = [poll.result() for poll in polls]
        assert {a.status_code for a in answered} == {503}
        assert "cannot read the queue from Redis" in answered[0].json()["detail"]
        started = time.monotonic()
        scraped = httpx.get(f"{base}/metrics", timeout=60)
        assert time.monotonic() - started < 2  # one read timeout, not eight
        samples = {s.name: s.value for f in text_string_to_metric_families(scraped.text) for s in f.samples}
        assert scraped.status_code == 200 and samples == {"persona_redis_up": 0}
        proxy.come_back()
        assert httpx.get(f"{base}/api/stats", timeout=30).status_code == 200
    finally:
        proxy.come_back()
        proxy.close()


def test_readyz_never_shows_the_redis_password(settings, dashboard):
    """/readyz answers anyone who can reach the dashboard, token or not, with Redis's own
    words, and a Redis older than HELLO (5.x) quotes the client's greeting back, password
    and all: the body showed it."""
    redis_5 = OldRedis("5.0.14")
    url = f"redis://:hunter2-secret@127.0.0.1:{redis_5.port}/0"
    settings.redis_url = SecretStr(url)
    try:
        base = dashboard(token="s3cret", url=url)
        down = httpx.get(f"{base}/readyz", timeout=30)
        assert down.status_code == 503 and "unknown command" in down.json()["detail"], down.text
        assert "hunter2-secret" not in down.text and "***" in down.text
        page = httpx.get(f"{base}/api/stats", headers={"Authorization": "Bearer s3cret"}, timeout=30)
        assert page.status_code == 503 and "hunter2-secret" not in page.text
    finally:
        redis_5.close()


def test_persona_dashboard_command_serves_and_up_includes_it(settings, redis_url, redis_client):
    assert "dashboard" in [s.name for s in services_for_up(settings)]
    env = {k: v for k, v in os.environ.items() if not k.startswith("PERSONA_")}
    env |= {"PERSONA_DATA_DIR": str(settings.data_dir), "PERSONA_REDIS_URL": redis_url}
    refused = subprocess.run([sys.executable, "-m", "persona", "dashboard", "--host", "0.0.0.0"], env=env,
                             capture_output=True, check=False, text=True, timeout=120)
    assert refused.returncode == 1 and "PERSONA_DASHBOARD__TOKEN" in refused.stderr
    port = free_port()
    env["PERSONA_DASHBOARD__PORT"] = str(port)
    process = subprocess.Popen([sys.executable, "-m", "persona", "dashboard"], env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_until_answering(process, f"http://127.0.0.1:{port}/api/stats")
        # A second one on the same port used to announce itself, then fail in uvicorn's words.
        second = subprocess.run([sys.executable, "-m", "persona", "dashboard"], env=env,
                                capture_output=True, check=False, text=True, timeout=120)
        assert second.returncode == 1 and "dashboard on" not in second.stdout
        assert f"127.0.0.1:{port}" in second.stderr and "PERSONA_DASHBOARD__PORT" in second.stderr
        assert "Traceback" not in second.stderr
    finally:
        process.terminate()
        process.wait(timeout=30)


@pytest.mark.skipif(not CHROMIUM.exists(), reason="Debian's chromium is not installed (apt-get install chromium)")
def _chromium(tmp_path: Path) -> list[str]:
    """A headless Chromium that runs the page's script for a while (virtual time)."""
    return [str(CHROMIUM), "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
            "--no-first-run", "--disable-extensions", "--disable-background-networking",
            f"--user-data-dir={tmp_path / 'profile'}", "--window-size=1400,1100", "--virtual-time-budget=8000"]


def test_the_page_shows_no_latency_figure_where_nothing_was_measured(settings, redis_client, dashboard, tmp_path):
    """With no reply in the last five minutes the page's latency table read 0 ms at every
    percentile, as if the service answered instantly; `persona queue stats` shows a dash."""
    dom = subprocess.run([*_chromium(tmp_path), "--dump-dom", dashboard()], capture_output=True, check=False, text=True,
                         timeout=120)
    latency = dom.stdout.split('id="latency"')[1].split("</table>")[0]
    assert "<td>queue wait</td>" in latency, dom.stderr[-2000:]
    assert latency.count('<td class="n">-</td>') == 6 and '<td class="n">0</td>' not in latency


def test_dashboard_in_a_real_headless_browser(settings, redis_client, dashboard, tmp_path, write_persona, tiny_llama_dir):
    write_persona("tiny", base=str(tiny_llama_dir))
    fill_queue(settings, redis_client, waiting=3)
    client = QueueClient(redis_client, settings.queue)
    client.cancel(client.submit(chat()).id)  # withdrawn: not waiting
    redis_client.hincrby(keys.STATS_KEY, "withdrawn", 2)
    redis_client.hincrby(keys.STATS_KEY, "refused:full", 4)  # callers turned away: the queue was full
    record_replies(redis_client, [GenerationReply(id="x", ok=True, persona="tiny", version="base", new_tokens=3,
                                                  timings=Timings(queue_ms=40, generate_ms=250))], batch_size=1)
    heartbeat.publish(redis_client, heartbeat.WorkerInfo(id="w-browser", personas={"tiny": "base"}), ttl_s=60)
    leave_post_unanswered(redis_client)
    url = dashboard(token="tok") + "/?token=tok"
    shot = tmp_path / "dashboard.png"
    flags = _chromium(tmp_path)
    dom = subprocess.run([*flags, "--dump-dom", url], capture_output=True, check=False, text=True, timeout=120)
    assert 'id="waiting-total">3<' in dom.stdout, dom.stderr[-2000:]
    assert "withdrawn 2, expired 0, refused 4 (queue full 4, user's share 0)" in dom.stdout
    assert 'id="dead-count">1<' in dom.stdout and "w-browser" in dom.stdout and "it crashed the worker" in dom.stdout
    assert "<path" in dom.stdout  # the depth chart has a line
    assert "persona posts settle tiny 2026-11-25T09:00:00Z --sink x" in dom.stdout  # a post to settle, with its command
    subprocess.run([*flags, f"--screenshot={shot}", url], capture_output=True, timeout=120, check=True)
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 10_000
    keep = os.environ.get("DASHBOARD_SCREENSHOT_DIR")  # CI may collect it; the test run does not need it
    if keep:
        shutil.copy(shot, Path(keep) / shot.name)


def test_a_worker_loading_its_models_is_on_the_page_and_in_metrics_apart(
    settings, redis_client, dashboard, tmp_path, request
):
    """A worker loading its models (a GPU's warm-up takes minutes) was shown nowhere: the
    page listed no worker. It is listed as starting now, and /metrics gives it a gauge of
    its own: persona_worker_up counts only the workers that serve. Each says which persona
    it runs (a rolling upgrade's progress); one too old to say shows a dash."""
    heartbeat.publish(redis_client, heartbeat.WorkerInfo(id="w-serving"), ttl_s=60)
    heartbeat.publish(redis_client, heartbeat.WorkerInfo(id="w-old"), ttl_s=60)
    old_beat = json.loads(redis_client.get(keys.worker_key("w-old")))
    del old_beat["version"]  # as versions before this one wrote it
    redis_client.set(keys.worker_key("w-old"), json.dumps(old_beat))
    request.addfinalizer(lambda: heartbeat.withdraw(redis_client, "w-old"))
    info = heartbeat.StartingWorker(id="w-warming", device="cuda", persona="sage", model="smollm2",
                                    since=heartbeat.redis_now(redis_client) - 42)
    heartbeat.announce_starting(redis_client, info, ttl_s=60)
    request.addfinalizer(lambda: heartbeat.withdraw(redis_client, "w-warming"))  # none starting in later tests
    base = dashboard()
    [starting] = httpx.get(f"{base}/api/stats").json()["stats"]["starting_workers"]
    assert (starting["id"], starting["persona"], starting["model"]) == ("w-warming", "sage", "smollm2")
    samples = {(s.name, s.labels.get("worker")): s.value
               for f in text_string_to_metric_families(httpx.get(f"{base}/metrics").text) for s in f.samples}
    assert ("persona_worker_up", "w-warming") not in samples and samples[("persona_worker_up", "w-serving")] == 1
    assert 42 <= samples[("persona_worker_starting_seconds", "w-warming")] < 100
    up = {dict(labels)["worker"]: dict(labels)["software_version"] for name, labels in scrape(base) if name == "persona_worker_up"}
    assert up == {"w-serving": persona_version(), "w-old": "unknown"}
    dom = subprocess.run([*_chromium(tmp_path), "--dump-dom", base], capture_output=True, check=False, text=True,
                         timeout=120)
    workers = dom.stdout.split('id="workers-note"')[1].split("</table>")[0]
    assert ">2 live, 1 starting<" in workers, dom.stderr[-2000:]
    assert "w-serving" in workers and "<td>loading smollm2 for sage</td>" in workers
    shown = {row.split("</td>")[0]: row.split("<td>")[3].split("</td>")[0]  # id -> version, its fourth cell
             for row in workers.split("<tr><td>")[1:]}
    assert shown == {"w-serving": persona_version(), "w-old": "-", "w-warming": persona_version()}, workers
    shown = re.search(r"<td>starting \((\d+)s\)</td>", workers)
    assert shown and int(shown.group(1)) >= 42, workers  # 42 s and counting


def test_a_redis_that_cannot_save_is_said_above_the_page_and_not_blamed_on_workers(own_redis, dashboard, tmp_path):
    """A Redis that cannot save to disk refuses every change, workers' heartbeats too: /readyz
    said so, but the page showed no hint, only "0 live: nothing is answered; start one with
    `persona worker`" while a worker ran. What else it warns of (here: it deletes keys when
    full) follows, in the order `persona queue stats` says them (``redis_warnings``)."""
    from tests.test_monitoring import redis_unable_to_save
    from tests.test_redis_limits import evicting

    _, url, client = own_redis
    base = dashboard(url=url)
    with evicting(client), redis_unable_to_save(client, tmp_path / "gone"):
        figures = httpx.get(f"{base}/api/stats").json()["stats"]
        dom = subprocess.run([*_chromium(tmp_path), "--dump-dom", base], capture_output=True, check=False, text=True,
                             timeout=120)
    said = dom.stdout.split('<p id="redis-warning">')[1].split("</p>")[0]
    assert said.startswith("Redis cannot write its data to disk (full, or not writable), so it refuses every change"), \
        dom.stderr[-2000:]
    workers = dom.stdout.split('id="workers-note"')[1].split("</p>")[0]
    assert "0 live: no worker can be listed while Redis refuses changes (see above)" in workers, workers
    assert "start one" not in workers
    refusal, memory = figures["redis_warnings"]  # the page shows what /api/stats says, in its order
    assert said == f"{refusal}\n{memory}" and refusal == figures["writes_refused"], said
    assert memory.startswith("Redis deletes keys when full (maxmemory-policy allkeys-lru"), memory


def wait_until_answering(process: subprocess.Popen, url: str) -> None:
    """Wait (90 s at most) for a `persona dashboard` started as ``process`` to answer 200 at ``url``."""
    deadline = time.time() + 90
    while True:
        try:
            if httpx.get(url).status_code == 200:
                return
        except httpx.TransportError:
            pass
        assert time.time() < deadline and process.poll() is None, "persona dashboard did not come up"
        time.sleep(0.3)


def scrape(base: str) -> dict[tuple[str, tuple], float]:
    """/metrics as {(sample name, sorted labels): value}, read by Prometheus's own parser."""
    families = text_string_to_metric_families(httpx.get(f"{base}/metrics").text)
    return {(s.name, tuple(sorted(s.labels.items()))): s.value for f in families for s in f.samples}


def test_the_live_worker_count_is_in_metrics_when_none_is_live_and_counts_unreadable_heartbeats(
    settings, redis_client, dashboard
):
    """With no live worker persona_worker_up had no sample, so an alert on
    `sum(persona_worker_up) < 1` never fired; and a live worker whose heartbeat could not be
    read (a newer version's) was counted by `queue stats` and the page but not here."""
    base = dashboard()
    samples = scrape(base)
    assert samples[("persona_workers_live", ())] == 0
    assert samples[("persona_workers_starting", ())] == 0 and samples[("persona_workers_unreadable", ())] == 0
    heartbeat.publish(redis_client, heartbeat.WorkerInfo(id="w-good"), ttl_s=30)
    heartbeat.publish(redis_client, heartbeat.WorkerInfo(id="w-newer"), ttl_s=30)
    redis_client.set(keys.worker_key("w-newer"), '{"format": 2}')  # a newer version's heartbeat
    samples = scrape(base)
    assert samples[("persona_workers_live", ())] == 2 and samples[("persona_workers_unreadable", ())] == 1
    assert [labels for name, labels in samples if name == "persona_worker_up"] == [
        (("device", "cpu"), ("host", socket.gethostname()), ("software_version", persona_version()), ("worker", "w-good"))]


def test_every_answer_forbids_framing_and_the_page_and_api_are_never_cached(settings, redis_client, dashboard):
    """Any site could frame the dashboard (clickjacking): its own script sends
    X-Persona-Action, so a framed click on "retry all" re-queued every dead letter."""
    base = dashboard()
    port = base.rsplit(":", 1)[1]
    for path, headers in (("/", {}), ("/api/stats", {}), ("/metrics", {}), ("/healthz", {}),
                          ("/api/stats", {"Host": f"evil.example:{port}"})):
        answer = httpx.get(base + path, headers=headers)
        assert answer.headers["x-frame-options"] == "DENY", path
        assert answer.headers["content-security-policy"] == "frame-ancestors 'none'"
        assert answer.headers["referrer-policy"] == "no-referrer" and answer.headers["x-content-type-options"] == "nosniff"
    assert httpx.get(base).headers["cache-control"] == "no-store"
    assert httpx.get(f"{base}/api/stats").headers["cache-control"] == "no-store"
    handler = PAGE_HTML.split("getElementById('retry-all').onclick")[1].split("};")[0]
    assert "confirm(" in handler  # the page asks before re-queuing every dead letter


def test_probes_and_metrics_answer_head_requests(settings, redis_client, dashboard):
    """Uptime checkers that send HEAD got 405 from /healthz and /readyz."""
    base = dashboard()
    for path in ("/healthz", "/readyz", "/metrics"):
        answer = httpx.head(base + path)
        assert answer.status_code == 200 and answer.content == b"", path


def test_a_request_for_another_host_name_is_told_which_names_are_accepted_and_how_to_proxy(
    settings, redis_client, dashboard
):
    """A reverse proxy passing its own Host got a bare "Invalid host header"."""
    base = dashboard()
    refused = httpx.get(f"{base}/", headers={"Host": "dash.example.org"})
    assert refused.status_code == 400
    assert "127.0.0.1" in refused.text and "localhost" in refused.text and "'dash.example.org'" in refused.text
    assert "Host: 127.0.0.1" in refused.text and "PERSONA_DASHBOARD__TOKEN" in refused.text


class Browser:
    """A headless Chromium driven over its DevTools pipe (fds 3 and 4, no port, no websocket
    library): open a page, let it run in real time, read what its script shows."""

    def __init__(self, tmp_path: Path) -> None:
        self._to_chrome, self._from_chrome = os.pipe(), os.pipe()
        flags = [*(f for f in _chromium(tmp_path) if not f.startswith("--virtual-time")), "--remote-debugging-pipe", "about:blank"]
        self.process = subprocess.Popen(
            ["bash", "-c", f'exec "$@" 3<&{self._to_chrome[0]} 4>&{self._from_chrome[1]}', "chromium", *flags],
            pass_fds=(self._to_chrome[0], self._from_chrome[1]), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        os.close(self._to_chrome[0])
        os.close(self._from_chrome[1])
        self._buffer, self._next_id = b"", 0
        self.session = ""

    def call(self, method: str, **params) -> dict:
        """One DevTools command, answered."""
        import json

        self._next_id += 1
        message = {"id": self._next_id, "method": method, "params": params}
        if self.session:
            message["sessionId"] = self.session
        os.write(self._to_chrome[1], json.dumps(message).encode() + b"\0")
        while True:
            while b"\0" not in self._buffer:
                chunk = os.read(self._from_chrome[0], 65536)
                assert chunk, "chromium closed its DevTools pipe"
                self._buffer += chunk
            raw, self._buffer = self._buffer.split(b"\0", 1)
            answer = json.loads(raw)
            if answer.get("id") == self._next_id:
                assert "error" not in answer, answer
                return answer["result"]

    def open(self, url: str) -> None:
        target = self.call("Target.createTarget", url=url)["targetId"]
        self.session = self.call("Target.attachToTarget", targetId=target, flatten=True)["sessionId"]

    def evaluate(self, expression: str):
        return self.call("Runtime.evaluate", expression=expression, returnByValue=True)["result"].get("value")

    def wait_for(self, expression: str, timeout_s: float = 20.0):
        """The value of ``expression`` once it is truthy (polled)."""
        deadline = time.monotonic() + timeout_s
        while not (value := self.evaluate(expression)):
            assert time.monotonic() < deadline, f"never true: {expression}"
            time.sleep(0.2)
        return value

    def close(self) -> None:
        self.process.terminate()
        self.process.wait(timeout=30)
        os.close(self._to_chrome[1])
        os.close(self._from_chrome[0])


@pytest.fixture
def browser(tmp_path):
    if not CHROMIUM.exists():
        pytest.skip("Debian's chromium is not installed (apt-get install chromium)")
    opened = Browser(tmp_path)
    yield opened
    opened.close()


def test_the_token_leaves_the_address_bar_and_the_page_goes_on_reading(settings, redis_client, dashboard, browser):
    """Opened as /?token=..., the token stayed in the address bar (on a wall screen, in the
    history, in a proxy's log) for as long as the page was open."""
    fill_queue(settings, redis_client, waiting=2)
    base = dashboard(token="s3cret")
    browser.open(f"{base}/?token=s3cret")
    assert browser.wait_for("document.getElementById('waiting-total').textContent === '2'")
    assert browser.evaluate("location.href") == f"{base}/"
    QueueClient(redis_client, settings.queue).submit(chat())  # later reads still carry the token
    assert browser.wait_for("document.getElementById('waiting-total').textContent === '3'")
    assert browser.evaluate("document.getElementById('error').textContent") == ""
    browser.evaluate("location.reload()")  # a wall screen reloads: the tab still has the token
    time.sleep(0.5)
    assert browser.wait_for("document.getElementById('waiting-total').textContent === '3'")


def test_figures_read_before_redis_went_down_are_greyed_out_and_dated(
    settings, redis_url, redis_client, dashboard, browser, monkeypatch
):
    """With Redis down the page went on showing the last figures as if live, under a small
    red line an operator glancing at a wall screen did not see."""
    from persona import connection
    from persona import dashboard as dashboard_module
    from tests.fakes.cutting_proxy import CuttingProxy

    monkeypatch.setattr(dashboard_module, "READ_GIVE_UP_S", 0.3)
    proxy = CuttingProxy(redis_url)
    try:
        base = dashboard(client=connection.connect(settings, url=proxy.url))
        browser.open(base)
        assert browser.wait_for("document.getElementById('waiting-total').textContent === '0'")
        assert not browser.evaluate("document.querySelector('main').classList.contains('stale')")
        proxy.go_down()
        said = browser.wait_for("document.querySelector('main.stale') && document.getElementById('updated').textContent")
        assert re.fullmatch(r"stale since \d\d:\d\d:\d\d", said), said
        error = browser.evaluate("document.getElementById('error').textContent")
        assert error.startswith(f"the figures below are {said}: ") and "cannot read the queue from Redis" in error
        proxy.come_back()
        assert browser.wait_for("!document.querySelector('main.stale')")
        assert browser.evaluate("document.getElementById('updated').textContent").startswith("updated ")
    finally:
        proxy.come_back()
        proxy.close()


def test_the_page_names_the_spans_its_latency_and_throughput_were_measured_over(
    settings, redis_client, dashboard, browser
):
    """The page said "last 5 min" and "1 min" whatever the reply log held: at 300 replies a
    second it keeps 33 s, which `persona queue stats` says and the page did not."""
    base = dashboard()
    browser.open(base)
    title, label = "document.getElementById('latency-title').textContent", "document.getElementById('throughput-label').textContent"
    assert browser.wait_for(f"{title} === 'Latency (ms, last 300 s)'")
    assert browser.evaluate(label) == "replies/s (last 60 s)"
    redis_client.delete(keys.REPLY_LOG_STREAM)
    start_ms = int((time.time() - 60) * 1000)  # 300 replies a second for a minute, trimmed as workers trim it
    pipe = redis_client.pipeline(transaction=False)
    for n in range(18_000):
        pipe.xadd(keys.REPLY_LOG_STREAM, {"r": b"1 4 1.5 20.0 - p v1"}, id=f"{start_ms + n * 10 // 3}-{n}",
                  maxlen=keys.REPLY_LOG_MAX_LEN, approximate=True)
    pipe.execute()
    shown = browser.wait_for(f"/^Latency \\(ms, last [0-9]+ s\\)$/.test({title}) && {title} !== 'Latency (ms, last 300 s)' && {title}")
    assert 25 <= int(shown.split()[-2]) <= 45, shown
    assert re.fullmatch(r"replies/s \(last \d+ s: all the reply log holds\)", browser.evaluate(label))


def test_only_the_sampler_adds_to_the_history_and_the_charts_place_points_by_time(
    settings, redis_client, dashboard, browser, monkeypatch
):
    """Every poll of the page added a point as well as the sampler: points fell at uneven
    times, 900 of them held far less than the half hour HISTORY_POINTS is meant to, and the
    charts spread them evenly whatever time they stood for."""
    import persona.dashboard

    monkeypatch.setattr(persona.dashboard, "SAMPLE_EVERY_S", 3600.0)  # one point, at start
    base = dashboard()
    deadline = time.time() + 5
    while not httpx.get(f"{base}/api/stats").json()["history"]:
        assert time.time() < deadline, "the sampler added no point"
        time.sleep(0.05)
    for _ in range(3):
        assert len(httpx.get(f"{base}/api/stats").json()["history"]) == 1
        time.sleep(1.1)

    monkeypatch.setattr(persona.dashboard, "SAMPLE_EVERY_S", 0.2)  # the charts then reach back 180 s
    browser.open(dashboard())
    path = browser.wait_for("(document.querySelector('#depth-chart path') || {}).outerHTML")
    first_x = float(re.search(r'd="M([\d.]+) ', path).group(1))
    assert 550 < first_x < 600, path  # a second or two of 180 s: at the right edge, not spread from 0


def test_persona_files_that_cannot_be_read_and_personas_that_cannot_load_are_shown(
    settings, redis_client, dashboard, personas_dir, write_persona, tiny_llama_dir, tmp_path, browser
):
    """An invalid persona file was on neither the page nor /metrics (it was simply absent),
    and a persona whose base folder was gone showed as serving `base`, as a healthy one."""
    write_persona("tiny", base=str(tiny_llama_dir))
    write_persona("gone", base=str(tmp_path / "deleted-model"))
    (personas_dir / "broken.toml").write_text('name = "broken"\nmodel = {base = \n')
    base = dashboard()
    data = httpx.get(f"{base}/api/stats").json()
    [invalid] = data["invalid_personas"]
    assert "broken.toml" in invalid and "not valid TOML" in invalid
    problems = {p["name"]: p["problem"] for p in data["personas"]}
    assert problems["tiny"] is None and "deleted-model" in problems["gone"]
    assert scrape(base)[("persona_personas_invalid", ())] == 1
    shutil.copytree(tiny_llama_dir, tmp_path / "deleted-model")  # put back: the page sees it at once
    assert {p["name"]: p["problem"] for p in httpx.get(f"{base}/api/stats").json()["personas"]}["gone"] is None
    shutil.rmtree(tmp_path / "deleted-model")
    browser.open(base)
    table = browser.wait_for("document.querySelector('#personas tbody').textContent.includes('broken.toml') "
                             "&& document.querySelector('#personas tbody').textContent")
    assert "not valid TOML" in table and "deleted-model" in table


def test_persona_dashboard_serves_before_redis_answers_and_reads_it_once_it_does(settings, redis_url):
    """`persona dashboard` refused to start without Redis ("cannot reach Redis"): Prometheus
    saw the target down rather than `persona_redis_up 0`, and /healthz never answered."""
    from tests.fakes.cutting_proxy import CuttingProxy

    proxy = CuttingProxy(redis_url)
    proxy.go_down()
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("PERSONA_")}
    env |= {"PERSONA_DATA_DIR": str(settings.data_dir), "PERSONA_REDIS_URL": proxy.url, "PERSONA_DASHBOARD__PORT": str(port)}
    process = subprocess.Popen([sys.executable, "-m", "persona", "dashboard"], env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_until_answering(process, f"{base}/healthz")
        assert httpx.get(f"{base}/readyz", timeout=30).status_code == 503
        assert scrape(base) == {("persona_redis_up", ()): 0}
        proxy.come_back()
        assert httpx.get(f"{base}/readyz", timeout=30).status_code == 200
        assert scrape(base)[("persona_redis_up", ())] == 1
    finally:
        process.terminate()
        _, err = process.communicate(timeout=30)
        proxy.come_back()
        proxy.close()
    assert err.count("cannot reach Redis") == 1 and "cannot read the queue" not in err, err
    assert "Traceback" not in err


def test_the_dead_letter_table_says_how_many_of_them_it_shows_and_numbers_never_wrap(
    settings, redis_client, dashboard, browser
):
    """The table showed 50 rows under "60 dead letters" without saying so, and every cell
    could break anywhere: numbers and headers split mid-word in a narrow column."""
    for n in range(60):
        redis_client.xadd(keys.STREAM_DEAD, {"r": b"not json", "reason": f"malformed {n}", "deliveries": 1})
    browser.open(dashboard())
    shown = browser.wait_for("document.getElementById('dead-shown').textContent")
    assert shown == "the newest 50 of 60 shown (`persona queue dead --limit 60` lists them all)"
    assert browser.evaluate("document.querySelectorAll('#dead tbody tr').length") == 50
    style = "getComputedStyle(document.querySelector('{}'))"
    for cell in ("#dead td.n", "#dead th", "#streams td.n"):
        assert browser.evaluate(style.format(cell) + ".overflowWrap") != "anywhere", cell
        assert browser.evaluate(style.format(cell) + ".whiteSpace") == "nowrap", cell
    assert browser.evaluate(style.format("#dead td .w") + ".overflowWrap") == "anywhere"  # the reason may wrap


def _samples(text: str) -> dict:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value for f in text_string_to_metric_families(text) for s in f.samples}


def test_an_evicting_redis_is_on_the_page_and_in_metrics_for_an_alert(settings, redis_client, dashboard):
    """Under allkeys-lru, Redis deleted the queue, the counters and the swapped versions to make
    room for another app's keys; neither the page nor /metrics had anything to show or alert on."""
    from tests.test_redis_limits import evicting

    base = dashboard()
    assert _samples(httpx.get(f"{base}/metrics").text)[("persona_redis_evicts", ())] == 0
    with evicting(redis_client):
        samples = _samples(httpx.get(f"{base}/metrics").text)
        figures = httpx.get(f"{base}/api/stats").json()["stats"]
    assert samples[("persona_redis_evicts", ())] == 1 and samples[("persona_redis_evicted_keys_total", ())] == 0
    assert samples[("persona_redis_maxmemory_bytes", ())] == 1 << 30 and samples[("persona_redis_used_memory_bytes", ())] > 0
    assert "maxmemory-policy allkeys-lru" in figures["redis_memory"]["warning"]
    assert figures["redis_warnings"] == [figures["redis_memory"]["warning"]]  # what the page shows above everything


def test_a_full_redis_is_not_ready_and_said_full_while_its_figures_still_read(settings, redis_client, dashboard, caplog):
    """Full (noeviction, over maxmemory), Redis refuses every write: /readyz said ready, the page
    and /metrics could read nothing (a MULTI of reads is refused too) and blamed "is Redis running?"."""
    base = dashboard()
    assert httpx.get(f"{base}/readyz").json() == {"ready": True}
    with redis_refusing_writes(redis_client):
        ready = httpx.get(f"{base}/readyz")
        page = httpx.get(f"{base}/api/stats")
        samples = _samples(httpx.get(f"{base}/metrics").text)
    assert ready.status_code == 503 and ready.json()["detail"].startswith(
        "Redis is full (maxmemory 1 bytes reached): nothing new can be queued; free memory or raise maxmemory")
    assert page.status_code == 200 and page.json()["stats"]["redis_memory"]["full"] is True
    assert samples[("persona_redis_up", ())] == 1 and samples[("persona_queue_waiting", (("stream", "chat"),))] == 0
    assert "is Redis running" not in caplog.text
    assert httpx.get(f"{base}/readyz").json() == {"ready": True}
    assert 0 < redis_client.pttl(WRITE_PROBE_KEY) <= 10_000  # the probe's key lapses on its own


def test_readyz_and_the_figures_learn_that_redis_takes_changes_from_one_probe_key(settings, redis_client, dashboard):
    """/readyz and the page's figures (`queue stats`') each wrote a probe key of their own,
    ``persona:readyz-probe`` and ``persona:write-probe``: one does for both."""
    base = dashboard()
    assert httpx.get(f"{base}/readyz").json() == {"ready": True}
    assert httpx.get(f"{base}/api/stats").status_code == 200
    assert set(redis_client.scan_iter(match="persona:*probe*")) == {WRITE_PROBE_KEY.encode()}


def test_readyz_says_redis_refuses_changes_in_its_log_once_and_that_it_takes_them_again_once(
    settings, redis_client, dashboard, caplog
):
    """A probe asks every few seconds: a Redis that refuses changes is logged when it starts
    to, and when it stops, not at every probe."""
    base = dashboard()
    caplog.set_level(logging.INFO, logger="persona.dashboard")
    with redis_refusing_writes(redis_client):
        answers = [httpx.get(f"{base}/readyz") for _ in range(3)]
    assert [a.status_code for a in answers] == [503] * 3
    assert [httpx.get(f"{base}/readyz").status_code for _ in range(3)] == [200] * 3
    said = [r.getMessage() for r in caplog.records if r.name == "persona.dashboard"]
    assert [line for line in said if line.startswith("Redis is full")] == [answers[0].json()["detail"]], said
    assert said.count("Redis takes changes again") == 1, said


def test_a_folder_of_persona_files_that_cannot_be_read_is_counted_and_shown_as_a_folder(
    settings, redis_client, dashboard, personas_dir, browser
):
    """A folder of persona files that cannot be read is counted by persona_personas_invalid and
    listed on the page, yet both said "persona files" / "unreadable file". (A folder that is a
    symbolic link to itself: one that cannot be listed, by root too, as the dashboard runs here.)"""
    loop = personas_dir.parent / "loop"
    loop.symlink_to(loop)
    settings.personas_dirs.append(loop)
    base = dashboard()
    [family] = [f for f in text_string_to_metric_families(httpx.get(f"{base}/metrics").text)
                if f.name == "persona_personas_invalid"]
    assert [s.value for s in family.samples] == [1]
    assert family.documentation.startswith("Persona files that are invalid or cannot be read, and folders of them "
                                           "that cannot be read")
    browser.open(base)
    row = browser.wait_for("[...document.querySelectorAll('#personas tbody tr')].map(r => r.textContent)"
                           f".find(t => t.includes({json.dumps(str(loop))}))")
    assert row.startswith(f"unreadable file or folder---{loop}: cannot read this folder of persona files "
                          "(Too many levels of symbolic links), so none of its personas is served"), row
