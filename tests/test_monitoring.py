"""Queue figures from a real Redis and real workers: latency, waiting age, stuck work, restarts."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from persona import constants as keys
from persona import heartbeat
from persona.contract import (
    ErrorKind,
    GenerationReply,
    GenerationRequest,
    Message,
    SamplingOverrides,
    Timings,
)
from persona.embedded_redis import EmbeddedRedis
from persona.monitoring import ALWAYS_COUNTED, collect_stats, find_stuck
from persona.queue import QueueClient, WorkQueue
from persona.telemetry import record_replies
from persona.telemetry_reading import read_histogram, summarize
from tests.conftest import free_port


def chat(persona: str = "tiny", **kwargs) -> GenerationRequest:
    return GenerationRequest(persona=persona, messages=[Message(role="user", content="hi")],
                             sampling=SamplingOverrides(max_new_tokens=3), **kwargs)


def test_figures_after_real_replies(settings, redis_client, write_persona, tiny_llama_dir, running_worker):
    write_persona("tiny", base=str(tiny_llama_dir))
    client = QueueClient(redis_client, settings.queue)
    waiting = [client.submit(chat()) for _ in range(3)]
    time.sleep(0.3)
    before = collect_stats(redis_client)
    interactive = before.streams[0]
    assert interactive.waiting == 3 and interactive.oldest_waiting_s >= 0.3
    running_worker("w-stats")
    replies = [client.wait(r, timeout=60) for r in waiting] + [client.ask(chat(), timeout=60) for _ in range(2)]
    assert all(r.ok for r in replies)
    deadline = time.time() + 10  # the worker records its replies' timings with its next claim
    while collect_stats(redis_client).latency.replies < 5:
        assert time.time() < deadline
        time.sleep(0.05)
    stats = collect_stats(redis_client)  # read again: one reading is not atomic
    assert stats.streams[0].waiting == 0 and stats.streams[0].oldest_waiting_s == 0
    assert stats.latency.replies == 5
    assert stats.latency.generate_ms.p50 > 0 and stats.latency.queue_ms.p99 >= 300
    assert stats.latency.replies_per_s > 0
    assert stats.version_replies == {"tiny@base": 5}
    assert stats.counters["tokens"] == sum(r.new_tokens for r in replies)
    assert [w.id for w in stats.workers] == ["w-stats"]
    deadline = time.time() + 30  # the next heartbeat names what the worker loaded
    while collect_stats(redis_client).workers[0].personas != {"tiny": "base"}:
        assert time.time() < deadline
        time.sleep(0.2)
    buckets, total, count = read_histogram(redis_client, "generate_seconds")
    assert count == 5 and buckets[-1] == ("+Inf", 5) and total > 0
    assert read_histogram(redis_client, "batch_size")[2] >= 2


def test_an_unreadable_heartbeat_is_skipped_and_its_worker_still_counts_as_alive(settings, redis_client, caplog):
    heartbeat.publish(redis_client, heartbeat.WorkerInfo(id="w-good"), ttl_s=30)
    redis_client.zadd(keys.WORKER_INDEX_KEY, {"w-odd": time.time() + 30})  # something else beats for it
    redis_client.set(keys.worker_key("w-odd"), "not a heartbeat, as something else writes it")  # said once per value
    with caplog.at_level(logging.WARNING, logger="persona.heartbeat"):
        stats = collect_stats(redis_client)  # the CLI, the dashboard and /metrics still read
    assert [w.id for w in stats.workers] == ["w-good"]
    assert "unreadable heartbeat of worker w-odd" in caplog.text
    assert heartbeat.live_worker_ids(redis_client) == {"w-good", "w-odd"}
    # What it holds waits for the visibility timeout, as a live worker's work does.
    work = WorkQueue(redis_client, settings.queue)
    QueueClient(redis_client, settings.queue).submit(chat())
    [held] = work.claim("w-odd", 1, block_ms=0)
    assert work.reclaim("w-other", heartbeat.live_worker_ids(redis_client), holding=set()) == ([], [])


def test_percentiles_from_the_reply_log(redis_client):
    replies = [GenerationReply(id=str(i), ok=True, persona="p", version="v1", new_tokens=2,
                               timings=Timings(queue_ms=i, generate_ms=10 * i)) for i in range(1, 101)]
    record_replies(redis_client, replies, batch_size=100)
    summary = summarize(redis_client)
    assert (summary.queue_ms.p50, summary.queue_ms.p95, summary.queue_ms.p99) == (50, 95, 99)
    assert summary.generate_ms.p99 == 990
    assert summary.tokens_per_s == round(200 / 60, 1)
    assert summarize(redis_client, now=time.time() + 3600).replies == 0


def test_percentiles_are_nearest_rank():
    """They were one rank high whenever q times the count was whole: the median of 10 and 1000 read 1000."""
    from persona.telemetry_reading import percentile

    assert percentile([1000, 10], 0.5) == 10 and percentile([10, 1000], 0.99) == 1000
    assert percentile([7], 0.5) == 7 and percentile([], 0.5) == 0.0
    assert [percentile(range(1, 21), q) for q in (0.5, 0.95, 0.99)] == [10, 19, 20]


def _replies_at_300_a_second_for_a_minute(redis_client) -> float:
    """A reply log of 300 replies a second over the last minute, trimmed as the workers
    trim it (it keeps the last 33 s or so); returns the time it ends."""
    redis_client.delete(keys.REPLY_LOG_STREAM)
    now = time.time()
    start_ms = int((now - 60) * 1000)
    pipe = redis_client.pipeline(transaction=False)
    for n in range(18_000):
        pipe.xadd(keys.REPLY_LOG_STREAM, {"r": b"1 4 1.5 20.0 - p v1"}, id=f"{start_ms + n * 10 // 3}-{n}",
                  maxlen=keys.REPLY_LOG_MAX_LEN, approximate=True)
    pipe.execute()
    return now


def test_throughput_past_what_the_reply_log_keeps_is_still_measured(redis_client):
    """The log keeps the last 10,000 replies: at 300 replies/s that is 33 s, and the
    throughput over the last minute read 10,000 / 60 = 167 replies/s."""
    now = _replies_at_300_a_second_for_a_minute(redis_client)
    summary = summarize(redis_client, now=now)
    assert summary.replies_per_s == pytest.approx(300, rel=0.03)
    assert summary.tokens_per_s == pytest.approx(1200, rel=0.03)
    assert 30 <= summary.window_s <= 36  # how far back the percentiles reach


def test_a_reply_log_written_before_rows_is_still_read(redis_client):
    """Entries of the older layout (a field per value) count beside the rows that follow them."""
    redis_client.xadd(keys.REPLY_LOG_STREAM, {"p": "p", "v": "v1", "ok": 1, "t": 3, "q": 900.5, "g": 7.25, "k": ""})
    record_replies(redis_client, [GenerationReply(id="new", ok=True, persona="p", version="v1", new_tokens=5,
                                                  timings=Timings(queue_ms=40, generate_ms=9))])
    summary = summarize(redis_client)
    assert summary.replies == 2 and summary.queue_ms.p99 == 900.5 and summary.generate_ms.p99 == 9
    assert summary.tokens_per_s == round(8 / 60, 1)


def test_stuck_work_is_flagged(settings, redis_client):
    client = QueueClient(redis_client, settings.queue)
    queue = WorkQueue(redis_client, settings.queue)
    client.submit(chat())
    queue.claim("ghost", 1, block_ms=0)  # a worker that died without a heartbeat
    late = chat()
    client.submit(late.model_copy(update={"deadline": time.time() + 0.2}))
    queue.claim("w-live", 1, block_ms=0)
    heartbeat.publish(redis_client, heartbeat.WorkerInfo(id="w-live"), ttl_s=30)
    time.sleep(0.3)
    stuck = {s.worker: s for s in find_stuck(redis_client, {"w-live"})}
    assert "heartbeat has lapsed" in stuck["ghost"].reason
    assert "past its deadline" in stuck["w-live"].reason and stuck["w-live"].request_id == late.id
    assert {s.worker for s in collect_stats(redis_client).stuck} == {"ghost", "w-live"}


def test_requests_from_a_caller_whose_clock_is_behind_are_not_flagged_stuck(settings, redis_client):
    """A deadline falls by Redis's clock (the entry says when), as workers judge it. Stuck
    work was judged by the caller's own deadline against this machine's clock: each
    request in flight from an adapter 200 s behind showed as 80 s past its deadline."""
    QueueClient(redis_client, settings.queue).submit(chat(created_at=time.time() - 200))  # stamped by its clock
    WorkQueue(redis_client, settings.queue).claim("w-live", 1, block_ms=0)
    heartbeat.publish(redis_client, heartbeat.WorkerInfo(id="w-live"), ttl_s=30)
    assert find_stuck(redis_client, {"w-live"}) == []
    assert collect_stats(redis_client).stuck == []


def test_figures_read_on_a_machine_whose_clock_is_ahead_are_timed_by_redis(settings, redis_client, monkeypatch):
    """Entry ids and deadlines carry Redis's time: a dashboard 90 s ahead showed a request
    queued just now as waiting 90 s, the last minute's replies as none, and work in hand
    as past its deadline."""
    client, queue = QueueClient(redis_client, settings.queue), WorkQueue(redis_client, settings.queue)
    client.submit(chat())
    queue.claim("w-live", 1, block_ms=0)
    heartbeat.publish(redis_client, heartbeat.WorkerInfo(id="w-live"), ttl_s=30)
    client.submit(chat())
    record_replies(redis_client, [GenerationReply(id="a", ok=True, persona="tiny", version="base", new_tokens=4)])
    real = time.time
    monkeypatch.setattr(time, "time", lambda: real() + 90)  # the dashboard's machine
    stats = collect_stats(redis_client)
    assert stats.streams[0].waiting == 1 and stats.streams[0].oldest_waiting_s < 5
    assert stats.latency.replies == 1 and stats.latency.replies_per_s > 0
    assert stats.stuck == []


def test_counters_and_dead_letters_survive_a_restart(tmp_path, settings):
    server = EmbeddedRedis(tmp_path / "persisted")
    url = server.start()
    try:
        client = redis.Redis.from_url(url)
        record_replies(client, [GenerationReply(id="a", ok=True, persona="p", version="v2", new_tokens=4)], batch_size=1)
        client.xadd(keys.STREAM_DEAD, {"r": "{}", "reason": "crashed", "deliveries": 3})
        client.close()
    finally:
        server.stop()
    url = server.start()
    try:
        client = redis.Redis.from_url(url)
        stats = collect_stats(client)
        assert stats.dead_letters == 1 and stats.version_replies == {"p@v2": 1} and stats.counters["tokens"] == 4
        client.close()
    finally:
        server.stop()


def test_queue_stats_and_watch_commands(settings, redis_url, redis_client):
    import signal

    QueueClient(redis_client, settings.queue).submit(chat())
    record_replies(redis_client, [GenerationReply(id="a", ok=True, persona="tiny", version="v3", new_tokens=2,
                                                  timings=Timings(queue_ms=12, generate_ms=80))], batch_size=1)
    env = {k: v for k, v in os.environ.items() if not k.startswith("PERSONA_")}
    env |= {"PERSONA_DATA_DIR": str(settings.data_dir), "PERSONA_REDIS_URL": redis_url, "COLUMNS": "200"}
    command = [sys.executable, "-m", "persona", "queue"]
    shown = subprocess.run([*command, "stats", "--json"], env=env, capture_output=True, check=False, text=True, timeout=120)
    assert shown.returncode == 0, shown.stderr
    figures = json.loads(shown.stdout)
    assert figures["streams"][0]["waiting"] == 1 and figures["latency"]["generate_ms"]["p50"] == 80
    table = subprocess.run([*command, "stats"], env=env, capture_output=True, check=False, text=True, timeout=120)
    assert "oldest waiting" in table.stdout and "p95 ms" in table.stdout and "replies/s" in table.stdout
    before = len(redis_client.client_list())
    # As in a terminal, Ctrl-C must reach it: a suite started in the background (where the
    # shell sets SIGINT to be ignored, and children inherit that) would otherwise hang here.
    ctrl_c_restored = "import signal; signal.signal(signal.SIGINT, signal.default_int_handler); import runpy; runpy.run_module('persona', run_name='__main__')"
    watching = subprocess.Popen(
        [sys.executable, "-c", ctrl_c_restored, "queue", "watch", "--interval", "0.3"], env=env, stdout=subprocess.PIPE, text=True
    )
    deadline = time.time() + 90
    while len(redis_client.client_list()) <= before:  # it has connected: it is watching
        assert time.time() < deadline and watching.poll() is None
        time.sleep(0.2)
    time.sleep(1.5)
    watching.send_signal(signal.SIGINT)
    out, _ = watching.communicate(timeout=30)
    assert watching.returncode == 0, out
    # Into a pipe (`| tee`, a file) a live display wrote only its last frame, when it ended:
    # now one timestamped line a period, the versions said once.
    lines = out.splitlines()
    figures = [line for line in lines if "waiting 1 (chat 1, batch 0); in flight 0" in line]
    assert len(figures) >= 3 and all("p95 queue wait 12 ms, generation 80 ms" in line for line in figures), out
    assert all(re.match(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d ", line) for line in lines), out  # each line stamped
    assert sum(line[20:].startswith("active versions: ") for line in lines) == 1, out
    assert "┃" not in out and "\x1b[" not in out  # no table frames, no cursor movement


def test_queue_stats_shows_names_holding_brackets_as_written(settings, redis_url, redis_client):
    """Worker ids, personas and versions were read as Rich markup: a worker named
    "w-[bold]gpu0" was listed (stuck work, the workers table) as "w-gpu0", a name no
    command knows, and a version folder such as "/ckpt/[draft]" lost its brackets."""
    QueueClient(redis_client, settings.queue).submit(chat())
    WorkQueue(redis_client, settings.queue).claim("w-[bold]gpu0", 1, block_ms=0)  # its worker died: stuck
    heartbeat.publish(redis_client, heartbeat.WorkerInfo(id="w-[red]live", personas={"tiny": "/ckpt/[draft]"}), ttl_s=30)
    redis_client.hset(keys.ACTIVE_VERSIONS_KEY, "tiny", "/ckpt/[draft]")
    env = {k: v for k, v in os.environ.items() if not k.startswith("PERSONA_")}
    env |= {"PERSONA_DATA_DIR": str(settings.data_dir), "PERSONA_REDIS_URL": redis_url, "COLUMNS": "250"}
    shown = subprocess.run([sys.executable, "-m", "persona", "queue", "stats"], env=env, capture_output=True,
                           check=False, text=True, timeout=120)
    assert shown.returncode == 0, shown.stderr
    assert "held by w-[bold]gpu0, whose heartbeat has lapsed" in shown.stdout
    assert "w-[red]live" in shown.stdout and "tiny@/ckpt/[draft]" in shown.stdout
    [versions] = [line for line in shown.stdout.splitlines() if line.startswith("active versions: ")]
    assert "tiny@/ckpt/[draft]" in versions


def test_watch_says_redis_is_out_of_reach_and_goes_on_when_it_is_back(settings, tmp_path):
    """`persona queue watch` ended at the first failed read: a Redis restart, just when
    the operator was watching to see the service come back, left them at a shell prompt."""
    import signal

    server = EmbeddedRedis(tmp_path / "restarting")
    url = server.start()
    env = {k: v for k, v in os.environ.items() if not k.startswith("PERSONA_")}
    # As in a terminal (rich draws a live display's frames only there), Ctrl-C included.
    env |= {"PERSONA_DATA_DIR": str(settings.data_dir), "PERSONA_REDIS_URL": url, "COLUMNS": "200", "TTY_COMPATIBLE": "1"}
    ctrl_c_restored = "import signal; signal.signal(signal.SIGINT, signal.default_int_handler); import runpy; runpy.run_module('persona', run_name='__main__')"
    shown = tmp_path / "watch.out"
    with shown.open("w") as out:
        watching = subprocess.Popen([sys.executable, "-c", ctrl_c_restored, "queue", "watch", "--interval", "0.3"],
                                    env=env, stdout=out, stderr=subprocess.STDOUT, text=True)

    def wait_for(text: str, after: int = 0) -> int:
        deadline = time.time() + 90
        while (at := shown.read_text().find(text, after)) < 0:
            assert watching.poll() is None, shown.read_text()[-2000:]
            assert time.time() < deadline, shown.read_text()[-2000:]
            time.sleep(0.2)
        return at

    try:
        wait_for("│ chat ")  # the table: its chat stream row
        server.stop()
        lost = wait_for("cannot read the queue since")
        assert "still trying" in shown.read_text()
        server.start()
        wait_for("│ chat ", after=lost)  # back: the figures again
        watching.send_signal(signal.SIGINT)
        watching.wait(timeout=30)
        assert watching.returncode == 0 and "Traceback" not in shown.read_text()
    finally:
        if watching.poll() is None:
            watching.kill()
        server.stop()


def test_live_workers_are_found_by_their_index_and_leave_it_when_silent(redis_client):
    """A lapsed heartbeat or a withdrawn worker is not live; finding them scans nothing."""
    redis_client.flushall()
    heartbeat.publish(redis_client, heartbeat.WorkerInfo(id="w-steady"), ttl_s=30)
    heartbeat.publish(redis_client, heartbeat.WorkerInfo(id="w-brief"), ttl_s=0.2)
    heartbeat.publish(redis_client, heartbeat.WorkerInfo(id="w-leaving"), ttl_s=30)
    heartbeat.withdraw(redis_client, "w-leaving")
    assert [w.id for w in heartbeat.live_workers(redis_client)] == ["w-brief", "w-steady"]
    time.sleep(0.3)
    assert [w.id for w in heartbeat.live_workers(redis_client)] == ["w-steady"]
    heartbeat.publish(redis_client, heartbeat.WorkerInfo(id="w-steady"), ttl_s=30)  # prunes lapsed ids
    assert redis_client.zcard("persona:workers") == 1


def test_a_worker_whose_clock_is_off_neither_drops_the_others_nor_is_dropped(redis_client, monkeypatch):
    """Heartbeats are timed by Redis. A worker whose clock ran 15 s ahead used to prune
    every other worker from the index at its first beat, and its reclaims then took their
    work as if they had died; one 15 s behind saw itself alone."""
    redis_client.flushall()
    heartbeat.publish(redis_client, heartbeat.WorkerInfo(id="w-b"), ttl_s=10)
    real = time.time
    for skew in (15.0, -15.0):
        monkeypatch.setattr(time, "time", lambda skew=skew: real() + skew)  # this machine's clock is off
        heartbeat.publish(redis_client, heartbeat.WorkerInfo(id="w-a"), ttl_s=10)
        assert heartbeat.live_worker_ids(redis_client) == {"w-a", "w-b"}


def test_work_held_by_a_worker_whose_heartbeat_cannot_be_read_is_not_stuck(settings, redis_client):
    """Such a worker is alive (``live_worker_ids`` says so, and its work is not reclaimed),
    but the stats judged it by the readable heartbeats alone: all it held was listed as
    stuck, "held by w-odd, whose heartbeat has lapsed", and it counted as no worker."""
    heartbeat.publish(redis_client, heartbeat.WorkerInfo(id="w-odd"), ttl_s=30)
    redis_client.set(keys.worker_key("w-odd"), "not a heartbeat")
    QueueClient(redis_client, settings.queue).submit(chat())
    WorkQueue(redis_client, settings.queue).claim("w-odd", 1, block_ms=0)
    stats = collect_stats(redis_client)
    assert stats.streams[0].in_flight == 1 and stats.stuck == []
    assert stats.workers == [] and stats.unreadable_workers == ["w-odd"]
    heartbeat.withdraw(redis_client, "w-odd")  # gone: now it is stuck
    [stuck] = collect_stats(redis_client).stuck
    assert stuck.worker == "w-odd" and "heartbeat has lapsed" in stuck.reason


def _queue_stats_command(settings, redis_url: str, *options: str) -> subprocess.CompletedProcess:
    """`persona queue stats` as a user runs it, on this test's Redis."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PERSONA_")}
    env |= {"PERSONA_DATA_DIR": str(settings.data_dir), "PERSONA_REDIS_URL": redis_url, "COLUMNS": "200"}
    return subprocess.run([sys.executable, "-m", "persona", "queue", "stats", *options], env=env, capture_output=True,
                          check=False, text=True, timeout=120)


def _first_column(table: str) -> dict[str, str]:
    """Each row of a printed table by its first cell: the second cell (the first row of a name wins)."""
    rows: dict[str, str] = {}
    for line in table.splitlines():
        cells = [cell.strip() for cell in line.split("│")[1:-1]]
        if len(cells) >= 2:
            rows.setdefault(cells[0], cells[1])
    return rows


def test_withdrawn_and_expired_requests_are_neither_waiting_nor_failed(
    settings, redis_url, redis_client, write_persona, tiny_llama_dir, client
):
    """A request its caller withdrew (Ctrl-C in `persona ask`), or whose deadline passed
    before a worker took it, read as waiting in `persona queue stats` (work looked stuck),
    and once a worker had discarded it, as failed (workers looked broken)."""
    from persona.bench_queue import InstantEngine
    from persona.pool import ModelPool
    from persona.worker import Worker

    write_persona("tiny", base=str(tiny_llama_dir))
    withdrawn = client.submit(chat())
    expired = client.submit(chat(deadline=time.time() + 0.5))
    assert client.cancel(withdrawn.id)
    time.sleep(1.0)
    wanted = client.submit(chat())
    [stream, _] = collect_stats(redis_client).streams
    assert (stream.waiting, stream.withdrawn, stream.expired) == (1, 1, 1)
    assert stream.oldest_waiting_s < 0.5  # the age of the one still wanted
    shown = _queue_stats_command(settings, redis_url, "--json")
    assert shown.returncode == 0, shown.stderr
    figures = json.loads(shown.stdout)["streams"][0]
    assert (figures["waiting"], figures["withdrawn"], figures["expired"]) == (1, 1, 1)

    worker = Worker(settings, redis_client, ModelPool(settings, "cpu", engine_factory=InstantEngine), worker_id="w-discard")
    worker.step(block_ms=0)
    worker.record_telemetry()
    replies = [client.wait(r, timeout=5) for r in (withdrawn, expired, wanted)]
    assert [r.error.kind if r.error else "text" for r in replies] == [ErrorKind.cancelled, ErrorKind.timeout, "text"]
    stats = collect_stats(redis_client)
    assert (stats.completed, stats.withdrawn, stats.expired, stats.failed) == (1, 1, 1, 0)
    assert (stats.streams[0].waiting, stats.streams[0].withdrawn, stats.streams[0].expired) == (0, 0, 0)
    assert (stats.latency.replies, stats.latency.failed, stats.latency.withdrawn, stats.latency.expired) == (1, 0, 1, 1)
    table = _queue_stats_command(settings, redis_url)
    assert table.returncode == 0, table.stderr
    rows = _first_column(table.stdout)
    assert (rows["completed"], rows["withdrawn"], rows["expired"], rows["failed"]) == ("1", "1", "1", "0")
    assert "failed:" not in table.stdout
    assert "1 replies, 0 failed, 1 withdrawn, 1 expired" in table.stdout


def test_older_workers_counts_of_withdrawn_and_expired_requests_are_not_failures(redis_client):
    """Older workers counted them as failed:cancelled and failed:timeout; one Redis may hold
    both kinds of count, and they are read as one."""
    redis_client.hset(keys.STATS_KEY, mapping={"failed:cancelled": 2, "failed:timeout": 3, "failed:model": 1, "withdrawn": 1})
    stats = collect_stats(redis_client)
    assert stats.counters == dict.fromkeys(ALWAYS_COUNTED, 0) | {"withdrawn": 3, "expired": 3, "failed:model": 1}
    assert (stats.withdrawn, stats.expired, stats.failed) == (3, 3, 1)


def test_queue_stats_names_the_version_of_every_persona(settings, redis_url, redis_client):
    """`persona queue stats` listed only the personas swapped at least once, where /metrics
    and the dashboard list every persona (a never-swapped one serves base, or its file's
    checkpoint); one swapped on the workers whose file this machine lacks is still named."""
    redis_client.hset(keys.ACTIVE_VERSIONS_KEY, mapping={"sage": "v3", "gone": "v1"})  # as a committed swap leaves it
    shown = _queue_stats_command(settings, redis_url)
    assert shown.returncode == 0, shown.stderr
    assert "active versions: bofh@base, gone@v1, sage@v3" in shown.stdout
    figures = collect_stats(redis_client, personas={})
    assert figures.served_versions == {"gone": "v1", "sage": "v3"} and figures.active_versions == figures.served_versions


def test_queue_wait_percentiles_count_the_requests_that_timed_out_waiting(
    settings, redis_url, redis_client, write_persona, tiny_llama_dir, client
):
    """Only text replies carried timings, so under overload the requests that timed out
    in the queue (the worst waits) were left out, and queue-wait p99 looked healthy:
    here 4 ms in `persona queue stats`, on the dashboard and in /metrics, with half of
    all requests having waited a second and a half."""
    from persona.bench_queue import InstantEngine
    from persona.pool import ModelPool
    from persona.worker import Worker

    write_persona("tiny", base=str(tiny_llama_dir))
    worker = Worker(settings, redis_client, ModelPool(settings, "cpu", engine_factory=InstantEngine), worker_id="w-over")
    late = [client.submit(chat(deadline=time.time() + 1.0)) for _ in range(3)]
    time.sleep(1.5)
    fresh = [client.submit(chat()) for _ in range(3)]
    worker.step(block_ms=0)
    worker.record_telemetry()
    assert [client.wait(r, timeout=5).ok for r in late + fresh] == [False] * 3 + [True] * 3
    latency = collect_stats(redis_client).latency
    assert latency.queue_ms.p99 >= 1500 and latency.queue_ms.p50 < 1000
    assert (latency.replies, latency.expired, latency.queue_waits) == (3, 3, 6)
    _, total, count = read_histogram(redis_client, "queue_wait_seconds")
    assert count == 6 and total >= 3 * 1.5
    assert read_histogram(redis_client, "generate_seconds")[2] == 3  # a timeout generated nothing
    shown = _queue_stats_command(settings, redis_url)
    assert shown.returncode == 0, shown.stderr
    assert "3 replies, 0 failed, 3 expired" in shown.stdout
    [wait] = [line for line in shown.stdout.splitlines() if "queue wait" in line]
    assert int(wait.split("│")[4]) >= 1500, wait


def test_failures_from_older_workers_do_not_count_as_instant_waits(redis_client):
    """Older workers logged every failure with a 0 ms queue wait that nobody measured;
    read as measured, each would pull the percentiles towards 0. Their replies (without
    the new field) still parse: old and new workers share one Redis."""
    redis_client.xadd(keys.REPLY_LOG_STREAM, {"r": b"0 0 0.00 0.00 timeout p v1"})  # an older worker's row
    old_failure = GenerationReply.from_json(
        '{"id": "d", "ok": false, "error": {"kind": "timeout", "message": "late"}, "finish_reason": "error",'
        ' "timings": {"queue_ms": 0.0, "generate_ms": 0.0}}'
    )
    old_text = GenerationReply.from_json(
        '{"id": "e", "ok": true, "text": "hi", "persona": "p", "version": "v1", "timings": {"queue_ms": 300.0, "generate_ms": 9.0}}'
    )
    assert old_failure.queue_wait_ms is None and old_text.queue_wait_ms == 300
    record_replies(redis_client, [
        GenerationReply.failure("a", ErrorKind.timeout, "late", persona="p", queue_ms=900.0),
        GenerationReply.failure("b", ErrorKind.invalid, "malformed"),  # no worker could read it: no wait
        GenerationReply(id="c", ok=True, persona="p", version="v1", new_tokens=2, timings=Timings(queue_ms=100)),
        old_failure, old_text,
    ])
    summary = summarize(redis_client)
    assert (summary.replies, summary.failed, summary.expired, summary.queue_waits) == (2, 1, 3, 3)
    assert summary.queue_ms.p50 == 300 and summary.queue_ms.p99 == 900
    _, total, count = read_histogram(redis_client, "queue_wait_seconds")
    assert count == 3 and total == pytest.approx(1.3)


def test_when_a_worker_was_seen_is_timed_by_redis_not_by_either_machine(settings, redis_url, redis_client, monkeypatch):
    """A worker whose clock ran ten minutes ahead stamped its heartbeat with that clock,
    and `persona queue stats` showed it "seen -600.0s ago" (the dashboard the same)."""
    real = time.time
    monkeypatch.setattr(time, "time", lambda: real() + 600)  # the worker's machine
    info = heartbeat.WorkerInfo(id="w-ahead")
    heartbeat.publish(redis_client, info, ttl_s=60)
    monkeypatch.setattr(time, "time", real)
    shown = _queue_stats_command(settings, redis_url)
    assert shown.returncode == 0, shown.stderr
    [row] = [line for line in shown.stdout.splitlines() if "w-ahead" in line]
    ago = float(row.split("│")[-2].strip().removesuffix("s ago"))
    assert 0 <= ago < 30, row
    stats = collect_stats(redis_client)
    [seen] = stats.workers
    assert 0 <= stats.redis_time - seen.last_seen < 30 and abs(info.last_seen - seen.last_seen) < 0.001


def test_stats_on_a_fresh_redis_show_no_figures_rather_than_zero_latency(settings, redis_url, redis_client):
    """With no replies yet, p50/p95/p99 read "0" ms (instant answers) and an empty
    workers table said nothing of why nothing was answered."""
    shown = _queue_stats_command(settings, redis_url)
    assert shown.returncode == 0, shown.stderr
    [wait] = [line for line in shown.stdout.splitlines() if "queue wait" in line]
    assert [cell.strip() for cell in wait.split("│")[2:5]] == ["-"] * 3, wait
    assert "no live worker" in shown.stdout and "persona worker" in shown.stdout



def test_throughput_says_how_far_back_it_was_measured_when_the_reply_log_is_short(redis_client):
    """Past what the reply log keeps, throughput is taken over the span it covers; the
    table still said "(last minute)"."""
    import io

    from rich.console import Console

    from persona.cli.queue_cmd import render_latency

    def shown() -> str:
        console = Console(width=200, file=io.StringIO())
        console.print(render_latency(collect_stats(redis_client)))
        return " ".join(console.file.getvalue().split())  # the caption wraps at the table's width

    redis_client.delete(keys.REPLY_LOG_STREAM)
    record_replies(redis_client, [GenerationReply(id="a", ok=True, persona="p", version="v1", new_tokens=2,
                                                  timings=Timings(queue_ms=12, generate_ms=80))])
    assert "(last minute)" in shown()
    _replies_at_300_a_second_for_a_minute(redis_client)
    text = shown()
    assert "s: all the reply log holds)" in text and "last minute" not in text, text


def test_workers_loading_their_models_are_shown_apart_from_the_live_ones(redis_client):
    """A worker loading its models was shown nowhere: `queue watch` said "workers 0
    (nothing is answered: start `persona worker`)" while one was starting. It is listed
    apart now, and never among the live workers the stuck work is judged by."""
    from persona.cli.queue_cmd import summary_line

    heartbeat.publish(redis_client, heartbeat.WorkerInfo(id="w-serving"), ttl_s=30)
    heartbeat.announce_starting(redis_client, heartbeat.StartingWorker(id="w-loading", persona="sage", model="smollm2"), 30)
    stats = collect_stats(redis_client)
    assert [w.id for w in stats.workers] == ["w-serving"] and stats.unreadable_workers == []
    assert [(w.id, w.doing()) for w in stats.starting_workers] == [("w-loading", "loading smollm2 for sage")]
    assert "workers 1 (1 starting);" in summary_line(stats) + ";"
    heartbeat.withdraw(redis_client, "w-serving")
    assert "workers 0 (1 starting: nothing is answered until it serves)" in summary_line(collect_stats(redis_client))
    heartbeat.publish(redis_client, heartbeat.WorkerInfo(id="w-loading"), ttl_s=30)  # it serves: listed once
    stats = collect_stats(redis_client)
    heartbeat.withdraw(redis_client, "w-loading")
    assert [w.id for w in stats.workers] == ["w-loading"] and stats.starting_workers == []


def test_entries_whose_fields_cannot_be_read_are_counted_not_a_traceback(settings, redis_url, redis_client):
    """An entry whose deadline was no number (a foreign writer's), once a worker held it,
    ended `persona queue stats`, /metrics and the page with a ValueError; one whose request
    was a JSON list, or whose deadline overflowed, did so too."""
    damaged = [
        {"r": b'{"x": 1}', "d": b"notanumber"},
        {"r": b"[1, 2]"},
        {"r": b'{"id": "q", "deadline": "soon"}'},
        {"r": b'{"id": "q", "deadline": 1' + b"0" * 400 + b"}"},
    ]
    redis_client.xgroup_create(keys.STREAM_INTERACTIVE, keys.CONSUMER_GROUP, id="0", mkstream=True)
    for fields in damaged:
        redis_client.xadd(keys.STREAM_INTERACTIVE, fields)
    redis_client.xreadgroup(keys.CONSUMER_GROUP, "ghost", {keys.STREAM_INTERACTIVE: ">"})  # died holding them
    for fields in damaged:
        redis_client.xadd(keys.STREAM_INTERACTIVE, fields)

    stats = collect_stats(redis_client)
    # Waiting (a worker sets each aside as a dead letter when it takes it), never judged expired.
    assert (stats.streams[0].waiting, stats.streams[0].in_flight, stats.streams[0].expired) == (4, 4, 0)
    assert [s.worker for s in stats.stuck] == ["ghost"] * 4
    assert all(s.reason == "held by ghost, whose heartbeat has lapsed" for s in stats.stuck)
    shown = _queue_stats_command(settings, redis_url)
    assert shown.returncode == 0, shown.stderr
    assert _first_column(shown.stdout)["chat"] == "4" and "stuck work (4)" in shown.stdout


def test_counters_that_cannot_be_read_are_reported_once_and_read_as_missing(
    settings, redis_url, redis_client, caplog
):
    """A counter that was no whole number (a foreign or damaged writer's, or a person's
    `HSET persona:stats completed abc`) ended `persona queue stats`, /api/stats and
    /metrics with a ValueError. Redis cannot add to it either, so it is named once, with
    how to repair it. (Each value here is this test's own: a value is reported once per process.)"""
    record_replies(redis_client, [GenerationReply(id="a", ok=True, text="ok", new_tokens=4, persona="tiny", version="base",
                                                  timings=Timings(queue_ms=20, generate_ms=200))], batch_size=1)
    redis_client.hset(keys.STATS_KEY, mapping={"completed": "abc-1", "failed:invalid": "1.5", "expired": "0012"})
    redis_client.hset(keys.VERSION_REPLIES_KEY, "tiny@old", "x-1")
    generate = keys.histogram_key("generate_seconds")
    redis_client.hset(generate, mapping={"0.25": "x-2", "sum": "nan"})
    redis_client.xadd(keys.REPLY_LOG_STREAM, {"r": "garbage-1"})

    with caplog.at_level(logging.WARNING, logger="persona.telemetry_reading"):
        stats = collect_stats(redis_client)
        buckets, total, count = read_histogram(redis_client, "generate_seconds")
    # What can be read is still shown: the tokens and the reply recorded above.
    assert stats.counters == dict.fromkeys(ALWAYS_COUNTED, 0) | {"tokens": 4} and stats.completed == 0 and stats.failed == 0
    assert stats.version_replies == {"tiny@base": 1}
    assert stats.latency.replies == 1 and stats.latency.generate_ms.p50 == 200
    assert (dict(buckets)["+Inf"], total, count) == (0, 0.0, 1)  # its one observation (0.2 s) was in 0.25
    said = [r.getMessage() for r in caplog.records]
    for key, field in [(keys.STATS_KEY, "completed"), (keys.STATS_KEY, "failed:invalid"), (keys.STATS_KEY, "expired"),
                       (keys.VERSION_REPLIES_KEY, "tiny@old"), (generate, "0.25"), (generate, "sum")]:
        assert sum(f"redis-cli HDEL {key} {field}" in line for line in said) == 1, (key, field, said)
    assert any("counter completed in persona:stats is not a whole number ('abc-1')" in line for line in said), said
    assert any("1 reply-log entry" in line and "'garbage-1'" in line for line in said), said

    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="persona.telemetry_reading"):
        collect_stats(redis_client)  # the dashboard reads every few seconds: named once is enough
        read_histogram(redis_client, "generate_seconds")
    assert caplog.records == []
    shown = _queue_stats_command(settings, redis_url)
    assert shown.returncode == 0, shown.stderr
    assert "redis-cli HDEL persona:stats completed" in shown.stderr


def test_stats_and_a_full_queues_refusal_judge_withdrawn_and_expired_entries_by_one_rule(redis_client, client):
    """A request withdrawn and then past its deadline counted as expired, in `persona queue
    stats` and in a full queue's refusal alike: the user withdrew it. The stats (Python) and
    the refusal (FULL_SCRIPT, in Redis) each hold the rule: the same entries, the same counts."""
    from persona.queue_scripts import FULL_SCRIPT

    def soon(**kwargs) -> GenerationRequest:  # its deadline passes a moment after it is queued
        return chat(created_at=time.time(), deadline=time.time() + 0.05, **kwargs)

    withdrawn_late, withdrawn, _late, _wanted = [client.submit(r) for r in (soon(), chat(), soon(), chat())]
    for request in (withdrawn_late, withdrawn):
        assert client.cancel(request.id)
    ahead = soon()
    client.cancel(ahead.id)  # withdrawn before it was even sent: its entry carries 'x'
    client.submit(ahead)
    client.submit(soon())  # late, and sent after the last withdrawal: no flag is read for it
    past = json.loads(chat(deadline=time.time() - 60).to_json())
    older = [dict(past, id="older-withdrawn"), dict(past, id="older-late")]  # from clients that wrote no 'd'
    client.cancel("older-withdrawn")
    for request in older:
        redis_client.xadd(keys.STREAM_INTERACTIVE, {"r": json.dumps(request), "e": "0"})
    redis_client.xadd(keys.STREAM_INTERACTIVE, {"r": json.dumps(dict(past, id="unreadable-due")), "e": "0", "d": "soon"})
    time.sleep(0.1)

    [stream, _] = collect_stats(redis_client).streams
    *_, expired, withdrawn_count, scanned = redis_client.eval(
        FULL_SCRIPT, 3, keys.STREAM_INTERACTIVE, keys.CANCEL_EPOCH_KEY, keys.WORKER_INDEX_KEY,
        keys.CONSUMER_GROUP, keys.CANCEL_KEY_PREFIX, 200)
    assert scanned == 9
    assert (stream.withdrawn, stream.expired) == (4, 3)  # withdrawn late, withdrawn, ahead, older-withdrawn
    assert (withdrawn_count, expired) == (stream.withdrawn, stream.expired)
    assert stream.waiting == 2  # wanted, and the one whose deadline cannot be read: a worker sets it aside


def test_a_direct_writers_request_without_a_deadline_expires_by_the_default_as_a_worker_times_it(
    redis_client, client, work
):
    """No field d, its deadline 0 or left out: a worker answers it "timeout" once the queue's
    default (120 s) has passed since it arrived, but the stats and a full queue's refusal
    counted it as waiting for good, and `queue stats` never listed it in flight past its deadline."""
    from persona.queue_scripts import FULL_SCRIPT

    seconds, micros = redis_client.time()
    arrived_ms = seconds * 1000 + micros // 1000 - 200_000  # 200 s ago, by Redis's clock

    def direct(**fields) -> str:  # as a client in another language writes it: the JSON in field r alone
        body = {"persona": "tiny", "messages": [{"role": "user", "content": "hi"}], **fields}
        redis_client.xadd(keys.STREAM_INTERACTIVE, {"r": json.dumps(body)}, id=f"{arrived_ms}-{redis_client.xlen(keys.STREAM_INTERACTIVE)}")
        return fields.get("id", "")

    late = [direct(id="no-deadline"), direct(id="deadline-0", deadline=0)]
    direct()  # no id: a worker sets it aside unanswered, it is not judged
    direct(id="nan-deadline", deadline=float("nan"))  # answered "invalid": not judged
    client.submit(chat())  # the submit script's, with d: still wanted

    [stream, _] = collect_stats(redis_client).streams
    *_, expired, withdrawn, scanned = redis_client.eval(
        FULL_SCRIPT, 3, keys.STREAM_INTERACTIVE, keys.CANCEL_EPOCH_KEY, keys.WORKER_INDEX_KEY,
        keys.CONSUMER_GROUP, keys.CANCEL_KEY_PREFIX, 200, 120)
    assert (stream.waiting, stream.withdrawn, stream.expired) == (3, 0, 2)
    assert (scanned, withdrawn, expired) == (5, 0, 2)
    # With a longer default in effect (PERSONA_QUEUE__DEFAULT_DEADLINE_S=300), still wanted.
    [stream, _] = collect_stats(redis_client, default_deadline_s=300).streams
    assert (stream.waiting, stream.expired) == (5, 0)

    work.claim("w1", 10, block_ms=0)  # in flight now, held by a live worker
    stuck = find_stuck(redis_client, {"w1"})
    assert sorted(entry.request_id for entry in stuck) == sorted(late)
    assert all("past its deadline" in entry.reason for entry in stuck)


def test_stats_read_a_cancel_epoch_of_another_type_as_none(redis_client, client):
    """`persona queue stats` ended with WRONGTYPE while the cancel epoch was a hash (until
    the next submission started it again). Such an epoch is as unknown: every flag is read,
    by the stats and by a full queue's refusal (FULL_SCRIPT) alike."""
    from persona.queue_scripts import FULL_SCRIPT

    withdrawn = client.submit(chat())
    assert client.cancel(withdrawn.id)
    client.submit(chat())
    redis_client.delete(keys.CANCEL_EPOCH_KEY)
    redis_client.hset(keys.CANCEL_EPOCH_KEY, "epoch", 3)
    [stream, _] = collect_stats(redis_client).streams
    assert (stream.waiting, stream.withdrawn, stream.expired) == (1, 1, 0)
    *_, expired, withdrawn_count, _scanned = redis_client.eval(
        FULL_SCRIPT, 3, keys.STREAM_INTERACTIVE, keys.CANCEL_EPOCH_KEY, keys.WORKER_INDEX_KEY,
        keys.CONSUMER_GROUP, keys.CANCEL_KEY_PREFIX, 200)
    assert (withdrawn_count, expired) == (1, 0)


def test_an_unreadable_heartbeat_is_named_once_per_value_not_at_every_read(redis_client, caplog):
    """The dashboard reads the stats every two seconds and at each scrape: the same
    unreadable heartbeat was warned of each time (87 lines in a minute and a half)."""
    worker = f"w-newer-{time.time_ns()}"  # what was said is remembered for the process: a name no other test used
    heartbeat.publish(redis_client, heartbeat.WorkerInfo(id=worker), ttl_s=30)
    redis_client.set(keys.worker_key(worker), '{"format": 2}')  # a newer version's heartbeat
    with caplog.at_level(logging.WARNING, logger="persona.heartbeat"):
        for _ in range(5):
            assert collect_stats(redis_client).unreadable_workers == [worker]
        redis_client.set(keys.worker_key(worker), '{"format": 3}')  # it changed: said again
        collect_stats(redis_client)
    said = [r.getMessage() for r in caplog.records if f"unreadable heartbeat of worker {worker}:" in r.getMessage()]
    assert len(said) == 2, said


def test_queue_stats_json_holds_every_counter_and_the_totals_on_a_fresh_install(settings, redis_url, redis_client):
    """On a fresh install `queue stats --json` had an empty "counters" (a script reading
    ["completed"] failed), and completed, failed, withdrawn and expired, which the table
    shows, were not in it at all."""
    shown = _queue_stats_command(settings, redis_url, "--json")
    assert shown.returncode == 0, shown.stderr
    figures = json.loads(shown.stdout)
    assert figures["counters"] == {"completed": 0, "tokens": 0, "withdrawn": 0, "expired": 0,
                                   "dead_lettered": 0, "retried": 0, "dropped": 0}
    assert (figures["completed"], figures["failed"], figures["withdrawn"], figures["expired"]) == (0, 0, 0, 0)
    redis_client.hset(keys.STATS_KEY, mapping={"completed": 5, "failed:model": 2, "failed:cancelled": 1})
    figures = json.loads(_queue_stats_command(settings, redis_url, "--json").stdout)
    assert (figures["completed"], figures["failed"], figures["withdrawn"], figures["expired"]) == (5, 2, 1, 0)
    table = _queue_stats_command(settings, redis_url).stdout  # the table reads the same figures, unchanged
    assert "retried from dead letters" not in table and "failed:model" in table


@contextlib.contextmanager
def redis_unable_to_save(client: redis.Redis, folder: Path) -> Iterator[None]:
    """Redis fails to save, as on a full or unwritable disk: while inside, it answers every
    write with MISCONF (its working folder is gone; stop-writes-on-bgsave-error, the default).
    Mended after, so that it saves as it stops."""
    before = client.config_get("dir")["dir"]
    folder.mkdir()
    client.config_set("dir", str(folder))
    folder.rmdir()
    client.bgsave()
    deadline = time.monotonic() + 10
    while (persistence := client.info("persistence"))["rdb_last_bgsave_status"] != "err" or \
            persistence["rdb_bgsave_in_progress"]:
        assert time.monotonic() < deadline, "the save did not fail"
        time.sleep(0.05)
    try:
        yield
    finally:
        client.config_set("dir", before)
        client.bgsave()
        while client.info("persistence")["rdb_last_bgsave_status"] != "ok":
            assert time.monotonic() < deadline + 10, "the save did not succeed again"
            time.sleep(0.05)


def test_stats_say_redis_refuses_writes_rather_than_that_no_worker_runs(settings, own_redis, tmp_path):
    """A Redis that cannot save to disk refuses every change, a worker's heartbeat too: `queue
    stats` said "no live worker ... start one with `persona worker`" while one ran, its --json
    had "full": false and no warning, and nothing said Redis refused writes."""
    _, url, client = own_redis
    heartbeat.publish(client, heartbeat.WorkerInfo(id="w-running"), ttl_s=0.5)
    with redis_unable_to_save(client, tmp_path / "gone"):
        with pytest.raises(redis.exceptions.ResponseError, match="MISCONF"):
            heartbeat.publish(client, heartbeat.WorkerInfo(id="w-running"), ttl_s=0.5)  # its next beat
        time.sleep(0.6)  # the last beat Redis took has lapsed
        figures = json.loads(_queue_stats_command(settings, url, "--json").stdout)
        table = _queue_stats_command(settings, url)
    assert table.returncode == 0, table.stderr
    first_line = table.stdout.splitlines()[0]
    assert first_line.startswith("warning: Redis cannot write its data to disk"), table.stdout  # before any figure
    assert "start one with `persona worker`" not in table.stdout
    assert "no worker can be listed live while Redis refuses changes: their heartbeats are refused too" in table.stdout
    assert figures["workers"] == [] and figures["redis_memory"]["full"] is False
    assert figures["writes_refused"].startswith("Redis cannot write its data to disk (full, or not writable), so it "
                                                "refuses every change until it can (MISCONF ")
    assert collect_stats(client).writes_refused == ""  # it saves again: nothing to say


def test_a_read_only_replica_and_a_full_redis_are_each_said_once_as_refusing_changes(own_redis, redis_client):
    """Redis refuses every change as a replica, and when full; `watch`'s line says why, and
    no longer "start `persona worker`". Full is said once, not as both refusal and memory."""
    from persona.cli.queue_cmd import summary_line
    from tests.fakes.full_redis import redis_refusing_writes

    _, _, client = own_redis
    client.replicaof("127.0.0.1", free_port())  # a primary that never answers: it stays a read-only replica
    try:
        line = summary_line(collect_stats(client))
    finally:
        client.replicaof("NO", "ONE")
    assert line.startswith("warning: Redis is a read-only replica, which refuses every change ("), line
    assert "point PERSONA_REDIS_URL at its primary" in line and "start `persona worker`" not in line
    assert "workers 0 (heartbeats refused: Redis refuses changes)" in line
    with redis_refusing_writes(redis_client):
        figures = collect_stats(redis_client)
    line = summary_line(figures)
    assert figures.writes_refused == figures.redis_memory.warning and figures.writes_refused.startswith("Redis is full")
    assert line.startswith("warning: Redis is full") and line.count("Redis is full") == 1, line


def test_redis_warnings_are_one_ordered_list_that_queue_stats_and_its_json_share(settings, own_redis, tmp_path):
    """`queue stats` and the page each worked out the order of Redis's warnings on their own
    (the refusal first, then the memory warning unless it says the same); the figures carry
    it once, as ``redis_warnings`` (in --json too), and the table says it in that order."""
    from tests.test_redis_limits import evicting

    _, url, client = own_redis
    assert collect_stats(client).redis_warnings == []  # nothing to fix
    with evicting(client), redis_unable_to_save(client, tmp_path / "gone"):
        figures = json.loads(_queue_stats_command(settings, url, "--json").stdout)
        table = _queue_stats_command(settings, url).stdout
    refusal, memory = figures["redis_warnings"]
    assert refusal == figures["writes_refused"] and refusal.startswith("Redis cannot write its data to disk")
    assert memory == figures["redis_memory"]["warning"] and memory.startswith("Redis deletes keys when full")
    lines = table.rstrip().splitlines()
    assert lines[0] == f"warning: {refusal}", table  # above the figures: it explains them (no worker live)
    assert lines[-1] == f"warning: {memory}", table  # below them


def test_a_full_redis_is_one_warning_in_redis_warnings(redis_client):
    """Full is both a refusal of changes and a memory warning, in the same words: listed once."""
    from tests.fakes.full_redis import redis_refusing_writes

    with redis_refusing_writes(redis_client):
        figures = collect_stats(redis_client)
    assert figures.redis_warnings == [figures.writes_refused] and figures.writes_refused.startswith("Redis is full")


def test_queue_stats_times_a_direct_write_by_the_configured_default_deadline(settings, redis_client, redis_url):
    """`persona queue stats` timed an entry that names no deadline by the built-in 120 s,
    whatever PERSONA_QUEUE__DEFAULT_DEADLINE_S said: one the workers discard was "waiting"."""
    arrived_ms = int((time.time() - 10) * 1000)  # 10 s ago: past a 5 s default, inside the built-in one
    direct = {"id": "direct-1", "persona": "tiny", "messages": [{"role": "user", "content": "hi"}]}
    redis_client.xadd(keys.STREAM_INTERACTIVE, {"r": json.dumps(direct)}, id=f"{arrived_ms}-0")
    env = {k: v for k, v in os.environ.items() if not k.startswith("PERSONA_")}
    env |= {"PERSONA_DATA_DIR": str(settings.data_dir), "PERSONA_REDIS_URL": redis_url,
            "PERSONA_QUEUE__DEFAULT_DEADLINE_S": "5"}
    shown = subprocess.run([sys.executable, "-m", "persona", "queue", "stats", "--json"], env=env,
                           capture_output=True, check=False, text=True, timeout=120)
    assert shown.returncode == 0, shown.stderr
    [chat_stream] = [s for s in json.loads(shown.stdout)["streams"] if s["name"] == keys.STREAM_INTERACTIVE]
    assert chat_stream["expired"] == 1
