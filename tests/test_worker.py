"""The worker answers every request through Redis: text, or an error that says why."""

from __future__ import annotations

import json
import logging
import time

import pytest
import redis

from persona import constants as keys
from persona.contract import (
    ErrorKind,
    GenerationRequest,
    Message,
    Priority,
    SamplingOverrides,
)
from persona.queue import QueueClient


def chat(persona: str, text: str = "hello there", **kwargs) -> GenerationRequest:
    return GenerationRequest(persona=persona, messages=[Message(role="user", content=text)], **kwargs)


def test_reply_round_trip_through_redis(write_persona, tiny_llama_dir, running_worker, client):
    write_persona("tiny", base=str(tiny_llama_dir))
    running_worker()
    reply = client.ask(chat("tiny"), timeout=60)
    assert reply.ok, reply.error
    assert reply.persona == "tiny" and reply.version == "base"
    assert 1 <= reply.new_tokens <= 8
    assert reply.worker


def test_the_log_names_every_persona_that_shares_loaded_weights(
    settings, redis_client, write_persona, tiny_llama_dir, running_worker, client, caplog
):
    """Two prompt-only personas on one base share one loaded copy: the log used to say
    only "loaded tiny-llama for bofh", however long someone chatted with sage."""
    write_persona("bofh", base=str(tiny_llama_dir))
    write_persona("sage", base=str(tiny_llama_dir))
    caplog.set_level(logging.INFO, logger="persona.pool")
    worker = running_worker()
    worker.preload(["bofh", "sage"])
    assert client.ask(chat("sage"), timeout=60).ok
    assert client.ask(chat("bofh"), timeout=60).ok
    lines = [r.getMessage() for r in caplog.records if r.name == "persona.pool"]
    assert len([line for line in lines if line.startswith("loaded ")]) == 1, lines  # one copy of the weights
    assert [line for line in lines if "sage" in line] == [
        f"{tiny_llama_dir} (base) serves bofh, sage with one copy of its weights"
    ], lines


def test_the_log_line_of_each_answer_names_persona_version_and_time(
    write_persona, tiny_llama_dir, running_worker, client, caplog
):
    """The decoding engines' one line per answer said only "answered 1 request(s) (batch
    of 1) tokens=8": not who was answered, by which version, nor how long it took."""
    write_persona("tiny", base=str(tiny_llama_dir))
    caplog.set_level(logging.INFO, logger="persona.worker")
    running_worker()
    assert client.ask(chat("tiny"), timeout=60).ok
    deadline = time.monotonic() + 10  # the line is written once the reply is on its way
    while not (said := [r.getMessage() for r in caplog.records if r.getMessage().startswith("answered ")]):
        assert time.monotonic() < deadline, "no line for the answer"
        time.sleep(0.02)
    [line] = said
    assert line.startswith("answered 1 request(s) for tiny version=base tokens="), line
    assert line.endswith(" ms (batch of 1)") and " in " in line, line


def test_a_whole_batch_engine_logs_its_answers_as_the_continuous_one_does(
    settings, redis_client, write_persona, tiny_llama_dir, client, caplog
):
    """An engine that answers whole batches (``generate``) wrote "answered 2 request(s) for
    /tmp/.../tiny-llama version=base ...": the model's folder, not who was answered, and
    no batch size, unlike the continuous engines' line."""
    from persona.bench_queue import InstantEngine
    from persona.pool import ModelPool
    from persona.worker import Worker

    write_persona("tiny", base=str(tiny_llama_dir))
    write_persona("calm", base=str(tiny_llama_dir))
    caplog.set_level(logging.INFO, logger="persona.worker")
    worker = Worker(settings, redis_client, ModelPool(settings, "cpu", engine_factory=InstantEngine), worker_id="w-line")
    for name in ("tiny", "calm", "tiny"):
        client.submit(chat(name))
    assert worker.step(block_ms=0) == 3
    [line] = [r.getMessage() for r in caplog.records if r.getMessage().startswith("answered ")]
    assert line.startswith("answered 3 request(s) for calm,tiny version=base tokens=3 in "), line
    assert line.endswith(" ms (batch of 3)"), line


def test_plain_gpt2_model_answers(write_persona, tiny_gpt2_dir, running_worker, client):
    write_persona("plain", base=str(tiny_gpt2_dir))
    running_worker()
    reply = client.ask(chat("plain"), timeout=60)
    assert reply.ok, reply.error


def test_unknown_persona_gets_an_error_reply_and_worker_keeps_going(write_persona, tiny_llama_dir, running_worker, client):
    write_persona("tiny", base=str(tiny_llama_dir))
    running_worker()
    bad = client.ask(chat("nobody"), timeout=60)
    assert not bad.ok and bad.error.kind is ErrorKind.invalid
    assert "unknown persona 'nobody'" in bad.error.message
    good = client.ask(chat("tiny"), timeout=60)
    assert good.ok


def test_broken_model_fails_its_request_not_the_worker(write_persona, tmp_path, tiny_llama_dir, running_worker, client):
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text("{not json")
    write_persona("broken", base=str(broken))
    write_persona("tiny", base=str(tiny_llama_dir))
    running_worker()
    bad = client.ask(chat("broken"), timeout=60)
    assert not bad.ok and bad.error.kind is ErrorKind.model
    assert client.ask(chat("tiny"), timeout=60).ok


def test_an_engine_that_cannot_start_fails_its_persona_not_the_worker(
    write_persona, tiny_llama_dir, tiny_gpt2_dir, running_worker, client
):
    """An unexpected error while making a model's engine (here: no memory left for it)
    answers that persona's requests with the reason; the worker serves the others."""
    from persona.engine import TransformersEngine

    def engines(loaded):
        if loaded.config.model_type == "gpt2":
            raise RuntimeError("out of memory while allocating the cache")
        return TransformersEngine(loaded)

    write_persona("big", base=str(tiny_gpt2_dir))
    write_persona("tiny", base=str(tiny_llama_dir))
    worker = running_worker(engine_factory=engines)
    bad = client.ask(chat("big"), timeout=60)
    assert not bad.ok and bad.error.kind is ErrorKind.model
    assert "out of memory" in bad.error.message
    assert client.ask(chat("tiny"), timeout=60).ok
    assert worker.info.state == "serving"


def test_mixed_personas_and_sampling_are_batched_together(write_persona, tiny_llama_dir, settings, redis_client, client):
    """Requests for two personas on the same weights share one batch, each with its own settings."""
    from persona.pool import ModelPool
    from persona.worker import Worker

    write_persona("one", base=str(tiny_llama_dir))
    write_persona("two", base=str(tiny_llama_dir), system="Another voice.")
    requests = [
        chat("one", sampling=SamplingOverrides(max_new_tokens=3, temperature=0.0)),
        chat("two", sampling=SamplingOverrides(max_new_tokens=6, seed=7)),
        chat("one", sampling=SamplingOverrides(max_new_tokens=5, top_k=1)),
        chat("two", sampling=SamplingOverrides(max_new_tokens=2, top_p=0.5)),
    ]
    for r in requests:
        client.submit(r)
    worker = Worker(settings, redis_client, ModelPool(settings, "cpu"), worker_id="w-batch")
    assert worker.step(block_ms=100) == 4
    assert worker.info.batches == 1 and worker.info.requests == 4
    replies = [client.wait(r, timeout=5) for r in requests]
    assert [r.ok for r in replies] == [True] * 4
    for request, reply in zip(requests, replies):
        assert reply.new_tokens <= request.sampling.max_new_tokens
        assert reply.persona == request.persona


class CutOffEngine:
    """A Generator whose every row writes the same text: cut off at its token limit when the
    row's max_new_tokens is 12, finished (by a stop string, say) otherwise."""

    TEXT = " Be still, and wait. The river knows the way of the riv"

    def __init__(self, loaded) -> None:
        self.loaded = loaded

    def generate(self, batch):
        from persona.engine import Completion

        return [
            Completion(text=self.TEXT, new_tokens=12, finish_reason="length" if w.sampling.max_new_tokens == 12 else "stop")
            for w in batch
        ]


def test_a_chat_reply_cut_off_at_its_token_limit_ends_cleanly_and_completions_stay_raw(
    write_persona, tiny_llama_dir, settings, redis_client, client
):
    """A chat reply that ran to max_new_tokens ended mid-word ("... the way of the riv"). It now
    ends at its last finished sentence, still says "length", and counts every token generated;
    a continuation, a post candidate (mode "complete": curation trims those and records what it
    dropped) and a reply the model finished keep the text as written."""
    from persona.pool import ModelPool
    from persona.worker import Worker

    write_persona("tiny", base=str(tiny_llama_dir))
    limit = SamplingOverrides(max_new_tokens=12)
    requests = {
        "chat": chat("tiny", sampling=limit),
        "finished": chat("tiny", sampling=SamplingOverrides(max_new_tokens=20)),
        "continuation": GenerationRequest(persona="tiny", mode="complete", prefix="Listen.", sampling=limit),
        "post": GenerationRequest(persona="tiny", mode="complete", priority=Priority.batch, source="scheduler", sampling=limit),
    }
    for request in requests.values():
        client.submit(request)
    worker = Worker(settings, redis_client, ModelPool(settings, "cpu", engine_factory=CutOffEngine), worker_id="w-cut")
    assert worker.step(block_ms=100) == len(requests)
    replies = {name: client.wait(request, timeout=5) for name, request in requests.items()}
    written = CutOffEngine.TEXT
    assert {name: (r.text, r.finish_reason, r.new_tokens) for name, r in replies.items()} == {
        "chat": ("Be still, and wait.", "length", 12),
        "finished": (written.lstrip(), "stop", 12),
        "continuation": (written, "length", 12),
        "post": (written.lstrip(), "length", 12),
    }


def test_interactive_requests_are_served_before_batch_work(write_persona, tiny_llama_dir, settings, redis_client, client):
    from persona.pool import ModelPool
    from persona.worker import Worker

    settings.worker.max_batch = 2
    write_persona("tiny", base=str(tiny_llama_dir))
    batch = [client.submit(chat("tiny", priority=Priority.batch)) for _ in range(3)]
    interactive = client.submit(chat("tiny"))
    worker = Worker(settings, redis_client, ModelPool(settings, "cpu"), worker_id="w-prio")
    worker.step(block_ms=100)
    assert client.wait(interactive, timeout=1).ok
    assert redis_client.llen(f"persona:reply:{batch[-1].id}") == 0


def test_expired_request_is_answered_with_timeout_not_generated(write_persona, tiny_llama_dir, running_worker, client):
    write_persona("tiny", base=str(tiny_llama_dir))
    request = client.submit(chat("tiny", deadline=time.time() - 1))
    running_worker()
    reply = client.wait(request, timeout=30)
    assert not reply.ok and reply.error.kind is ErrorKind.timeout
    assert reply.new_tokens == 0


def test_cancelled_request_is_not_generated(write_persona, tiny_llama_dir, running_worker, client):
    write_persona("tiny", base=str(tiny_llama_dir))
    request = client.submit(chat("tiny"))
    client.cancel(request.id)
    running_worker()
    reply = client.wait(request, timeout=30)
    assert not reply.ok and reply.error.kind is ErrorKind.cancelled


def test_a_request_withdrawn_and_then_past_its_deadline_is_counted_withdrawn_not_expired(
    settings, redis_client, write_persona, tiny_llama_dir, client
):
    """A worker reaching a request its caller withdrew, late, answered it as timed out and
    counted it expired: withdrawn it is, whatever its deadline, as `persona queue stats`
    judges the ones still waiting and as a row withdrawn mid-generation is answered."""
    from persona.bench_queue import InstantEngine
    from persona.pool import ModelPool
    from persona.worker import Worker

    write_persona("tiny", base=str(tiny_llama_dir))
    worker = Worker(settings, redis_client, ModelPool(settings, "cpu", engine_factory=InstantEngine), worker_id="w-late")
    request = client.submit(chat("tiny", "never mind", deadline=time.time() + 0.2))
    assert client.cancel(request.id)
    time.sleep(0.4)
    worker.step(block_ms=0)
    worker.flush()
    reply = client.wait(request, timeout=5)
    assert not reply.ok and reply.error.kind is ErrorKind.cancelled
    counted = {name.decode(): int(n) for name, n in redis_client.hgetall(keys.STATS_KEY).items()}
    assert counted.get("withdrawn") == 1 and "expired" not in counted, counted


def _long_request_decoding(worker, client: QueueClient, tokens: int) -> GenerationRequest:
    """Submit a request that decodes ``tokens`` tokens; return once the worker is decoding it."""
    request = client.submit(chat("tiny", sampling=SamplingOverrides(max_new_tokens=tokens, temperature=1.0, top_k=0, seed=5)))
    deadline = time.monotonic() + 30
    while not worker.decoding and time.monotonic() < deadline:
        time.sleep(0.001)
    assert worker.decoding, "the worker never started decoding the long request"
    return request


def test_a_short_request_is_answered_while_a_long_one_is_still_decoding(
    write_persona, tiny_llama_dir, running_worker, client, redis_client
):
    """Continuous batching through the queue: the short request joins the long one's
    batch and is answered long before the long one ends."""
    from persona import constants as keys

    write_persona("tiny", base=str(tiny_llama_dir))
    long = _long_request_decoding(running_worker(), client, 400)
    short = client.ask(chat("tiny", sampling=SamplingOverrides(max_new_tokens=2, temperature=0.0)), timeout=30)
    assert short.ok and short.new_tokens <= 2
    assert redis_client.llen(keys.reply_key(long.id)) == 0, "the short reply waited for the long one"
    answered = client.wait(long, timeout=60)
    assert answered.ok and answered.new_tokens == 400
    assert answered.timings.generate_ms > short.timings.generate_ms


def test_a_worker_told_to_stop_finishes_the_rows_it_is_decoding(write_persona, tiny_llama_dir, running_worker, client):
    write_persona("tiny", base=str(tiny_llama_dir))
    worker = running_worker()
    request = _long_request_decoding(worker, client, 300)
    worker.stop()
    reply = client.wait(request, timeout=60)
    assert reply.ok and reply.new_tokens == 300


def test_a_request_withdrawn_mid_generation_stops_and_its_caller_is_told(
    write_persona, tiny_llama_dir, running_worker, client, settings
):
    settings.worker.cancel_check_s = 0.01
    write_persona("tiny", base=str(tiny_llama_dir))
    worker = running_worker()
    request = _long_request_decoding(worker, client, 400)
    client.cancel(request.id)
    reply = client.wait(request, timeout=30)
    assert not reply.ok and reply.error.kind is ErrorKind.cancelled
    assert worker.decoding == 0
    assert client.ask(chat("tiny", sampling=SamplingOverrides(max_new_tokens=2)), timeout=30).ok  # still serving


def test_a_worker_outlives_redis_refusing_its_commands(write_persona, tiny_llama_dir, running_worker, client, redis_client, caplog):
    write_persona("long", base=str(tiny_llama_dir), sampling={"max_new_tokens": 400, "temperature": 1.0})
    running_worker("w-full")
    waiting = client.submit(chat("long"))
    deadline = time.time() + 60
    while not redis_client.xpending(keys.STREAM_INTERACTIVE, keys.CONSUMER_GROUP)["pending"]:
        assert time.time() < deadline, "the worker never claimed the request"
        time.sleep(0.01)
    redis_client.config_set("maxmemory", 1)  # Redis full while it decodes: its reply is refused (OOM)
    try:
        while not any("Redis refused a command" in r.getMessage() for r in caplog.records):
            assert time.time() < deadline, "the worker never met the refusal"
            time.sleep(0.05)
    finally:
        redis_client.config_set("maxmemory", 0)
    reply = client.wait(waiting, timeout=30)  # the reply it kept is delivered once Redis takes it
    assert reply.ok and reply.worker == "w-full"
    assert client.ask(chat("long", "and again"), timeout=60).ok  # and it goes on serving


def test_an_unexpected_error_in_a_turn_is_logged_with_its_traceback_and_serving_goes_on(
    write_persona, tiny_llama_dir, running_worker, client, redis_client, caplog
):
    write_persona("tiny", base=str(tiny_llama_dir))
    running_worker("w-odd")
    short = SamplingOverrides(max_new_tokens=2)
    assert client.ask(chat("tiny", sampling=short), timeout=60).ok
    # Something other than `persona swap` wrote the swap table: the worker fails to read it.
    redis_client.hset(keys.SWAPS_KEY, "tiny", "not a swap proposal")
    deadline = time.time() + 30
    while not (failures := [r for r in caplog.records if "unexpected error in the worker loop" in r.getMessage()]):
        assert time.time() < deadline, "the worker never met the bad proposal"
        time.sleep(0.05)
    assert failures[0].levelno == logging.ERROR and failures[0].exc_info is not None  # with its traceback
    assert "retrying in" in failures[0].getMessage()
    assert client.ask(chat("tiny", "still there?", sampling=short), timeout=60).ok  # serving between failures
    redis_client.hdel(keys.SWAPS_KEY, "tiny")
    assert client.ask(chat("tiny", "and after", sampling=short), timeout=60).ok


def test_replies_refused_behind_a_claim_are_kept_and_sent_again(settings, redis_client, write_persona, tiny_llama_dir, client):
    from persona.bench_queue import InstantEngine
    from persona.pool import ModelPool
    from persona.worker import Worker

    write_persona("tiny", base=str(tiny_llama_dir))
    settings.worker.max_batch = 2
    worker = Worker(settings, redis_client, ModelPool(settings, "cpu", engine_factory=InstantEngine), worker_id="w-kept")
    requests = [client.submit(chat("tiny", f"hello {n}")) for n in range(5)]
    assert worker.turn(block_ms=0) == 2  # answered; the replies wait to ride with the next claim
    redis_client.config_set("maxmemory", 1)  # Redis full: it still hands out work, but takes no reply
    try:
        assert worker.turn(block_ms=0) == 2  # the claim goes first; the replies behind it are refused
        with pytest.raises(redis.exceptions.ResponseError, match="OOM"):
            worker.turn(block_ms=0)  # the next claim learns it before claiming anything
    finally:
        redis_client.config_set("maxmemory", 0)
    while worker.turn(block_ms=0):
        pass
    worker.flush()
    replies = [QueueClient(redis_client, settings.queue).wait(r, timeout=5) for r in requests]  # well before any visibility timeout
    assert all(r.ok for r in replies)
    assert [redis_client.llen(keys.reply_key(r.id)) for r in requests] == [1] * 5  # each delivered once (read, not deleted)


@pytest.mark.parametrize("block_ms", [0, 100], ids=["busy", "about-to-wait"])
def test_a_batch_is_logged_once_its_replies_are_on_their_way(
    settings, redis_client, write_persona, tiny_llama_dir, client, block_ms
):
    """The log line never holds a caller's reply back: while it is written, the caller
    can already take the reply (here the log handler itself waits for it)."""
    from persona.bench_queue import InstantEngine
    from persona.pool import ModelPool
    from persona.worker import Worker

    write_persona("tiny", base=str(tiny_llama_dir))
    settings.worker.max_batch = 4
    worker = Worker(settings, redis_client, ModelPool(settings, "cpu", engine_factory=InstantEngine), worker_id="w-log")
    client.submit(chat("tiny"))
    assert worker.step(block_ms=0) == 1  # a first round loads the queue's scripts into Redis
    request = client.submit(chat("tiny"))
    seen: list = []

    class TakesTheReply(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if record.getMessage().startswith("answered 1 request(s)"):
                seen.append(redis_client.blpop([keys.reply_key(request.id)], timeout=2))

    logger = logging.getLogger("persona.worker")
    level = logger.level
    logger.addHandler(handler := TakesTheReply())
    logger.setLevel(logging.INFO)
    try:
        assert worker.turn(block_ms=0) == 1  # answered: the reply rides with the next claim
        assert worker.turn(block_ms=block_ms) == 0
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
    assert len(seen) == 1 and seen[0] is not None, "the log line was written before the reply was sent"
    assert json.loads(seen[0][1])["ok"] is True


def test_a_full_batch_is_answered_without_a_garbage_collection(settings, redis_client, write_persona, tiny_llama_dir, client):
    """Set for serving, the cyclic collector leaves a batch's objects alone while the batch
    is answered (they die together at its end): no collection during a whole turn."""
    import gc

    from persona.bench_queue import InstantEngine
    from persona.pool import ModelPool
    from persona.worker import Worker, freeze_heap

    write_persona("tiny", base=str(tiny_llama_dir))
    settings.worker.max_batch = 128
    worker = Worker(settings, redis_client, ModelPool(settings, "cpu", engine_factory=InstantEngine), worker_id="w-gc")
    client.submit(chat("tiny"))
    assert worker.step(block_ms=0) == 1  # loads the queue's scripts and the template's shape
    client.submit_many([chat("tiny", f"message number {n}, all different") for n in range(128)])
    started: list[int] = []

    def count(phase: str, info: dict) -> None:
        if phase == "start":
            started.append(info["generation"])

    thresholds = gc.get_threshold()
    freeze_heap()
    gc.callbacks.append(count)
    try:
        assert worker.step(block_ms=0) == 128
    finally:
        gc.callbacks.remove(count)
        gc.unfreeze()
        gc.set_threshold(*thresholds)
    assert started == [], f"collections of generations {started} while answering a batch"


def test_a_connection_redis_closed_between_turns_is_replaced_unnoticed(
    settings, redis_client, write_persona, tiny_llama_dir, client
):
    """The worker keeps its connection from turn to turn; one Redis has closed meanwhile
    (a restart, an idle timeout) is replaced before it is used, and the turn goes on."""
    from persona.bench_queue import InstantEngine
    from persona.pool import ModelPool
    from persona.worker import Worker

    write_persona("tiny", base=str(tiny_llama_dir))
    worker = Worker(settings, redis_client, ModelPool(settings, "cpu", engine_factory=InstantEngine), worker_id="w-reconnect")
    client.submit(chat("tiny"))
    assert worker.step(block_ms=0) == 1
    assert redis_client.client_kill_filter(_type="normal", skipme=True) >= 1  # every connection but this one
    request = client.submit(chat("tiny"))
    assert worker.step(block_ms=0) == 1
    assert client.wait(request, timeout=5).ok


def test_a_reply_longer_than_the_visibility_timeout_is_written_once_by_its_worker(
    settings, redis_client, write_persona, tiny_llama_dir, client, one_torch_thread
):
    """The worker keeps the rows it has in hand fresh in Redis: neither it nor another
    live worker takes the entry as stalled and writes the reply again (before, both did,
    and after three such deliveries the caller was told it was dead-lettered)."""
    from persona import heartbeat
    from persona.pool import ModelPool
    from persona.worker import Worker

    write_persona("tiny", base=str(tiny_llama_dir))
    settings.queue.visibility_timeout_s = 1.5  # kept every 0.375 s; a turn here takes 5-350 ms
    slow, other = (Worker(settings, redis_client, ModelPool(settings, "cpu"), worker_id=name) for name in ("w-slow", "w-other"))
    slow.preload(["tiny"])  # loaded before serving, as `persona worker` does: every turn is short
    request = client.submit(chat("tiny", sampling=SamplingOverrides(max_new_tokens=100, temperature=1.0, top_k=0)))
    started = time.monotonic()
    while not redis_client.llen(keys.reply_key(request.id)) and time.monotonic() - started < 120:
        for worker in (slow, other):
            heartbeat.publish(redis_client, worker.info, 10)  # both alive all along
        slow.turn(block_ms=0)
        slow.flush()
        other.turn(block_ms=0)
        assert not other.decoding, "a live worker's row was taken as stalled"
        time.sleep(0.05)  # each step slow: the reply takes several visibility timeouts
    assert time.monotonic() - started > 3 * settings.queue.visibility_timeout_s
    reply = client.wait(request, timeout=1)
    assert reply.ok and reply.new_tokens == 100 and reply.worker == "w-slow"
    assert slow.decoding == 0 and redis_client.xlen(keys.STREAM_DEAD) == 0
    assert redis_client.xpending(keys.STREAM_INTERACTIVE, keys.CONSUMER_GROUP)["pending"] == 0


@pytest.mark.parametrize("skew", [-200.0, 200.0], ids=["caller-behind", "caller-ahead"])
def test_deadlines_are_kept_by_redis_clock_whatever_the_callers(
    settings, redis_client, write_persona, tiny_llama_dir, client, monkeypatch, skew
):
    """A chat adapter on a machine whose clock is 200 s behind the workers' had every
    request answered 'waited past its deadline' at once; 200 s ahead, its requests never
    expired. Redis stamps when each deadline falls, and workers read Redis's clock."""
    from persona.bench_queue import InstantEngine
    from persona.pool import ModelPool
    from persona.worker import Worker

    write_persona("tiny", base=str(tiny_llama_dir))
    worker = Worker(settings, redis_client, ModelPool(settings, "cpu", engine_factory=InstantEngine), worker_id="w-clock")
    real = time.time
    monkeypatch.setattr(time, "time", lambda: real() + skew)  # the caller's machine
    fresh = client.submit(chat("tiny", "in time", created_at=time.time()))
    late = client.submit(chat("tiny", "too late", created_at=time.time(), deadline=time.time() + 0.5))
    monkeypatch.setattr(time, "time", real)
    time.sleep(0.6)
    worker.step(block_ms=0)
    assert client.wait(fresh, timeout=5).ok
    assert client.wait(late, timeout=5).error.kind is ErrorKind.timeout


@pytest.mark.parametrize("skew", [-600.0, 600.0], ids=["caller-behind", "caller-ahead"])
def test_queue_waits_are_timed_by_redis_clock_whatever_the_callers(
    settings, redis_client, write_persona, tiny_llama_dir, client, monkeypatch, skew
):
    """A caller whose clock was 10 min behind the worker's had instant replies counted as
    10 min of queue wait (in `queue stats`, the page, /metrics); one 10 min ahead had every
    wait counted as 0. The wait runs from Redis's time as the request was queued."""
    from persona.bench_queue import InstantEngine
    from persona.monitoring import collect_stats
    from persona.pool import ModelPool
    from persona.worker import Worker

    write_persona("tiny", base=str(tiny_llama_dir))
    worker = Worker(settings, redis_client, ModelPool(settings, "cpu", engine_factory=InstantEngine), worker_id="w-clock")
    real = time.time
    monkeypatch.setattr(time, "time", lambda: real() + skew)  # the caller's machine
    sent = [client.submit(chat("tiny", f"hi {n}", created_at=time.time())) for n in range(3)]
    monkeypatch.setattr(time, "time", real)
    time.sleep(0.3)  # each waits this long, and no more
    worker.step(block_ms=0)
    worker.record_telemetry()
    for reply in (client.wait(request, timeout=5) for request in sent):
        assert reply.ok and reply.timings.queue_measured and 300 <= reply.queue_wait_ms < 5000, reply.timings
    waits = collect_stats(redis_client).latency.queue_ms
    assert 300 <= waits.p50 <= waits.p99 < 5000, waits


def test_a_handed_back_request_counts_its_wait_from_when_it_was_first_queued(
    settings, redis_client, write_persona, tiny_llama_dir, client, work
):
    """A leaving worker's hand-back queues the entry again under a new id (a new time): the
    wait still runs from the request's first queueing."""
    from persona.bench_queue import InstantEngine
    from persona.pool import ModelPool
    from persona.worker import Worker

    write_persona("tiny", base=str(tiny_llama_dir))
    sent = client.submit(chat("tiny", "handed back"))
    work.claim("w-leaving", 10, block_ms=100)
    time.sleep(0.3)
    assert work.hand_back("w-leaving") == 1
    worker = Worker(settings, redis_client, ModelPool(settings, "cpu", engine_factory=InstantEngine), worker_id="w-next")
    worker.step(block_ms=0)
    assert 300 <= client.wait(sent, timeout=5).queue_wait_ms < 5000


def test_failures_say_how_long_their_request_waited_for_a_worker(
    settings, redis_client, write_persona, tiny_llama_dir, client
):
    """A failure carried no timings, so a request that timed out in the queue (the
    longest wait of all) said nothing of its wait, and queue-wait percentiles left it out."""
    from persona.bench_queue import InstantEngine
    from persona.pool import ModelPool
    from persona.worker import Worker

    write_persona("tiny", base=str(tiny_llama_dir))
    worker = Worker(settings, redis_client, ModelPool(settings, "cpu", engine_factory=InstantEngine), worker_id="w-wait")
    late = client.submit(chat("tiny", "too late", deadline=time.time() + 0.2))
    unknown = client.submit(chat("nobody", "who?"))
    answered = client.submit(chat("tiny", "in time"))
    time.sleep(0.4)
    worker.step(block_ms=0)
    late_reply, unknown_reply, answered_reply = (client.wait(r, timeout=5) for r in (late, unknown, answered))
    assert late_reply.error.kind is ErrorKind.timeout and unknown_reply.error.kind is ErrorKind.invalid
    assert answered_reply.ok
    for reply in (late_reply, unknown_reply, answered_reply):
        assert reply.timings.queue_measured and 400 <= reply.queue_wait_ms < 5000, reply.timings
    assert late_reply.timings.generate_ms == 0  # nothing was generated


def test_a_persona_that_cannot_be_loaded_is_skipped_at_start_not_the_worker(
    write_persona, personas_dir, tmp_path, tiny_llama_dir, settings, redis_client, client
):
    """`persona worker` preloads every persona: one whose base is gone (a folder removed,
    a file copied from another machine) ended the worker at start, and under `persona up`
    every worker, restarted until given up on. Named with --preload, it still stops it."""
    from persona.errors import ModelError
    from persona.personas import PersonaRegistry
    from persona.pool import ModelPool
    from persona.worker import Worker

    write_persona("gone", base=str(tmp_path / "no-such-model"))
    write_persona("tiny", base=str(tiny_llama_dir))
    registry = PersonaRegistry([personas_dir])  # these two alone: the bundled ones load slowly
    worker = Worker(settings, redis_client, ModelPool(settings, "cpu"), registry=registry, worker_id="w-start")
    worker.preload()
    assert "tiny" in worker.info.personas and "gone" not in worker.info.personas
    good, bad = client.submit(chat("tiny")), client.submit(chat("gone"))
    worker.step(block_ms=0)
    assert client.wait(good, timeout=5).ok
    refused = client.wait(bad, timeout=5)
    assert not refused.ok and refused.error.kind is ErrorKind.model and "no-such-model" in refused.error.message
    with pytest.raises(ModelError, match="no-such-model"):
        Worker(settings, redis_client, ModelPool(settings, "cpu"), registry=registry).preload(["gone"])


def test_a_persona_file_removed_while_serving_is_let_go_and_logged_once(
    write_persona, personas_dir, tiny_llama_dir, tiny_gpt2_dir, settings, redis_client, client, caplog
):
    """Removing a persona file under a running worker logged "cannot switch" every second
    for ever, and the worker then never freed the weights of a swap for any persona."""
    from persona.personas import PersonaRegistry
    from persona.pool import ModelPool
    from persona.swapper import FOLLOW_EVERY_S
    from persona.worker import Worker

    gone = write_persona("gone", base=str(tiny_gpt2_dir))
    write_persona("tiny", base=str(tiny_llama_dir))
    pool = ModelPool(settings, "cpu")
    worker = Worker(settings, redis_client, pool, registry=PersonaRegistry([personas_dir]), worker_id="w-gone")
    worker.preload()
    assert len(pool.loaded_keys()) == 2
    gone.unlink()
    with caplog.at_level(logging.INFO, logger="persona.swapper"):
        started = time.monotonic()
        while time.monotonic() - started < 3 * FOLLOW_EVERY_S:
            worker.turn(block_ms=50)
    assert [r.levelname for r in caplog.records if "gone" in r.getMessage()] == ["INFO"], caplog.text
    assert list(worker.info.personas) == ["tiny"]
    assert pool.loaded_keys() == [(str(tiny_llama_dir), "base")]  # the removed persona's weights freed
    request = client.submit(chat("gone"))
    worker.step(block_ms=0)
    assert "unknown persona 'gone'" in client.wait(request, timeout=5).error.message


def test_a_served_persona_file_pointed_at_a_missing_base_is_said_as_such(
    write_persona, personas_dir, tiny_llama_dir, tmp_path, settings, redis_client, caplog
):
    """A persona file edited under a running worker to name a base that is not there logged
    "cannot switch tiny to None": nobody had asked for a switch, and None named no version."""
    from persona.personas import PersonaRegistry
    from persona.pool import ModelPool
    from persona.swapper import FOLLOW_EVERY_S
    from persona.worker import Worker

    write_persona("tiny", base=str(tiny_llama_dir))
    worker = Worker(settings, redis_client, ModelPool(settings, "cpu"), registry=PersonaRegistry([personas_dir]),
                    worker_id="w-edited")
    worker.preload()
    time.sleep(0.05)  # a later modification time than the file the worker read
    write_persona("tiny", base=str(tmp_path / "no-such-base"))
    with caplog.at_level(logging.WARNING, logger="persona.swapper"):
        started = time.monotonic()
        while time.monotonic() - started < 3 * FOLLOW_EVERY_S:
            worker.turn(block_ms=50)
    assert "cannot serve tiny (as its file says): " in caplog.text, caplog.text
    assert "to None" not in caplog.text


def test_a_row_still_decoding_at_its_deadline_stops_and_its_caller_is_told(
    write_persona, tiny_llama_dir, settings, redis_client, client
):
    """A row kept decoding past its deadline, to its last token, for a caller that had
    stopped waiting ("no worker answered... is a worker running?"), holding a place in
    the batch all along: a 4096-token request did so for minutes."""
    from persona.pool import ModelPool
    from persona.worker import Worker

    settings.worker.cancel_check_s = 0.01
    write_persona("tiny", base=str(tiny_llama_dir))
    worker = Worker(settings, redis_client, ModelPool(settings, "cpu"), worker_id="w-late")
    worker.preload(["tiny"])
    long = SamplingOverrides(max_new_tokens=400, temperature=1.0, top_k=0, seed=5)
    late = client.submit(chat("tiny", sampling=long, deadline=time.time() + 1.0))
    in_time = client.submit(chat("tiny", sampling=long))
    started = time.monotonic()
    while not redis_client.exists(keys.reply_key(late.id)) and time.monotonic() - started < 60:
        worker.turn(block_ms=0)
        time.sleep(0.01)  # each step slow: 400 of them take four times the deadline
    reply = client.wait(late, timeout=1)
    assert not reply.ok and reply.error.kind is ErrorKind.timeout and "deadline" in reply.error.message
    assert time.monotonic() - started < 3.5, "it was decoded to its end"  # to its end: 400 turns, over 4 s
    assert worker.decoding == 1
    worker.step(block_ms=0)
    assert client.wait(in_time, timeout=1).ok  # the row beside it went on


def test_a_stopping_worker_keeps_its_heartbeat_until_it_has_finished_its_rows(
    write_persona, tiny_llama_dir, running_worker, client, redis_client, settings
):
    """Told to stop, a worker finishes the rows in hand, but its heartbeat stopped at
    once: after its TTL other workers took those rows as a dead worker's and decoded them
    again, and `persona queue stats` showed it gone while it was still answering."""
    from persona import heartbeat

    settings.worker.heartbeat_s, settings.worker.heartbeat_ttl_s = 0.05, 0.8  # room for a stall on a busy machine
    write_persona("tiny", base=str(tiny_llama_dir))
    worker = running_worker("w-draining")
    request = _long_request_decoding(worker, client, 450)
    worker.stop()
    stopped = time.monotonic()
    while worker.decoding:
        assert "w-draining" in heartbeat.live_worker_ids(redis_client), "its heartbeat lapsed while it decoded"
        time.sleep(0.01)
    took = time.monotonic() - stopped
    assert took > 1.5 * settings.worker.heartbeat_ttl_s, f"the rows were finished too soon to tell ({took:.2f} s)"
    assert client.wait(request, timeout=30).new_tokens == 450


def test_a_conversation_the_chat_template_refuses_fails_alone_not_its_batch(
    write_persona, tiny_llama_dir, tmp_path, settings, redis_client, client
):
    """Llama-2's, Mistral's and Gemma's templates raise on turns that do not alternate
    (two user messages in a row: someone who wrote again before the answer came). The
    exception failed every request built with it in one batch."""
    import shutil

    from persona.engine import TransformersEngine
    from persona.pool import ModelPool
    from persona.worker import Worker

    strict = tmp_path / "strict"
    shutil.copytree(tiny_llama_dir, strict)
    (strict / "chat_template.jinja").write_text(
        "{% for m in messages %}{% if m['role'] != 'system' and (m['role'] == 'user') != "
        "((loop.index0 - (1 if messages[0]['role'] == 'system' else 0)) % 2 == 0) %}"
        "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
        "{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
    )
    write_persona("strict", base=str(strict))
    worker = Worker(settings, redis_client, ModelPool(settings, "cpu", engine_factory=TransformersEngine), worker_id="w-strict")
    twice = [Message(role="user", content="hello?"), Message(role="user", content="are you there?")]
    good, refused = client.submit(chat("strict")), client.submit(GenerationRequest(persona="strict", messages=twice))
    assert worker.step(block_ms=0) == 2
    assert client.wait(good, timeout=5).ok
    reply = client.wait(refused, timeout=5)
    assert not reply.ok and "roles must alternate" in reply.error.message


def test_a_model_that_failed_to_load_is_not_loaded_again_at_every_request(
    write_persona, personas_dir, tmp_path, tiny_llama_dir, settings, redis_client, client
):
    """Each try at a model that cannot load holds up every other row of the worker (seconds
    for a big model); it used to be tried again for every request naming its persona."""
    import shutil

    from persona.personas import PersonaRegistry
    from persona.pool import ModelPool
    from persona.worker import Worker

    arriving = tmp_path / "arriving"  # a model still being copied into place
    write_persona("late", base=str(arriving))
    worker = Worker(settings, redis_client, ModelPool(settings, "cpu"), registry=PersonaRegistry([personas_dir]), worker_id="w-late")
    first = client.submit(chat("late"))
    worker.step(block_ms=0)
    assert client.wait(first, timeout=5).error.kind is ErrorKind.model
    shutil.copytree(tiny_llama_dir, arriving)  # now it is there, but the failure is recent
    again = client.submit(chat("late"))
    worker.step(block_ms=0)
    refused = client.wait(again, timeout=5)
    assert refused.error.kind is ErrorKind.model and "tries loading it again 30 s after it failed" in refused.error.message
    once_more = client.submit(chat("late"))
    worker.step(block_ms=0)
    assert client.wait(once_more, timeout=5).error.message == refused.error.message  # the same words: logged once
    settings.worker.load_retry_s = 0  # the retry time has come
    third = client.submit(chat("late"))
    worker.step(block_ms=0)
    assert client.wait(third, timeout=30).ok


def test_a_new_worker_s_first_heartbeat_carries_its_memory(running_worker, redis_client, settings):
    """The first heartbeat said 0 MB: memory was read only between beats, so `persona queue
    stats` and the page showed a new worker using no memory until its second beat."""
    from persona import heartbeat

    settings.worker.heartbeat_s = 3600  # only the first beat, at start
    running_worker("w-new")
    deadline = time.monotonic() + 30
    while "w-new" not in heartbeat.live_worker_ids(redis_client):
        assert time.monotonic() < deadline, "the worker never beat"
        time.sleep(0.02)
    (info,) = heartbeat.live_workers(redis_client, {"w-new"})
    assert info.memory_mb > 10


def test_a_worker_loading_its_models_is_starting_never_live_until_it_serves(
    settings, redis_client, write_persona, tiny_gpt2_dir
):
    """A worker was seen only once its models had loaded (seconds on a CPU, minutes of GPU
    warm-up): `persona ask`, the chat adapters and the monitoring said no worker ran while
    `persona up` was starting one. It is seen as starting now, with the model it loads;
    never live (swaps vote and work is reclaimed by heartbeats) until its first heartbeat,
    which ends the starting key in the same step."""
    import threading

    from persona import heartbeat
    from persona.pool import ModelPool
    from persona.worker import Worker

    write_persona("tiny", base=str(tiny_gpt2_dir))
    worker = Worker(settings, redis_client, ModelPool(settings, "cpu"), worker_id="w-loading")
    info = heartbeat.StartingWorker(id="w-loading", device="cpu")
    with heartbeat.StartingBeat(redis_client, info, ttl_s=5, every_s=0.05) as beat:
        worker.preload(["tiny"], starting=beat)
        [starting] = heartbeat.starting_workers(redis_client)
        assert heartbeat.live_worker_ids(redis_client) == set() and heartbeat.live_workers(redis_client) == []
    assert (starting.id, starting.pid, starting.doing()) == ("w-loading", info.pid, f"loading {tiny_gpt2_dir.name} for tiny")
    assert starting.since and starting.loading_s >= 0
    assert [w.id for w in heartbeat.starting_workers(redis_client)] == ["w-loading"]  # until it serves
    thread = threading.Thread(target=worker.run, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 30
        while not heartbeat.live_worker_ids(redis_client):
            assert time.monotonic() < deadline, "the worker never beat"
            time.sleep(0.01)
        assert heartbeat.starting_workers(redis_client) == []
        assert redis_client.zcard(keys.STARTING_INDEX_KEY) == 0
    finally:
        worker.stop()
        thread.join(timeout=30)


def test_a_starting_worker_names_every_persona_the_model_it_loads_is_for(
    settings, redis_client, write_persona, tiny_gpt2_dir
):
    """While sage's chat waited, the starting worker said it loaded the bundled model "for
    bofh", the first of the two personas that share it: the user thought sage was not served."""
    from persona import heartbeat
    from persona.pool import ModelPool
    from persona.worker import Worker

    write_persona("alpha", base=str(tiny_gpt2_dir))
    write_persona("beta", base=str(tiny_gpt2_dir))
    worker = Worker(settings, redis_client, ModelPool(settings, "cpu"), worker_id="w-sharing")
    info = heartbeat.StartingWorker(id="w-sharing", device="cpu")
    with heartbeat.StartingBeat(redis_client, info, ttl_s=5, every_s=0.05) as beat:
        worker.preload(["beta", "alpha"], starting=beat)
        [starting] = heartbeat.starting_workers(redis_client)
    assert starting.doing() == f"loading {tiny_gpt2_dir.name} for alpha, beta"  # the last loaded, and who shares it
    heartbeat.withdraw(redis_client, "w-sharing")


def test_a_starting_key_goes_when_loading_fails_and_lapses_when_its_process_dies(redis_client):
    """A worker that cannot load its models, or is stopped while loading, is gone at once;
    one killed while loading says nothing, and its key lapses by itself."""
    from persona import heartbeat
    from persona.errors import ModelError

    info = heartbeat.StartingWorker(id="w-broken")
    with pytest.raises(ModelError), heartbeat.StartingBeat(redis_client, info, ttl_s=30, every_s=0.05) as beat:
        beat.loading("tiny", "tiny-gpt2")
        assert [w.id for w in heartbeat.starting_workers(redis_client)] == ["w-broken"]
        raise ModelError("the weights are unreadable")
    assert heartbeat.starting_workers(redis_client) == [] and redis_client.zcard(keys.STARTING_INDEX_KEY) == 0

    heartbeat.announce_starting(redis_client, heartbeat.StartingWorker(id="w-killed"), ttl_s=0.3)
    assert [w.id for w in heartbeat.starting_workers(redis_client)] == ["w-killed"]
    time.sleep(0.4)
    assert heartbeat.starting_workers(redis_client) == []


def test_a_worker_killed_right_after_answering_leaves_its_timings_counted(
    settings, redis_client, write_persona, tiny_llama_dir, client
):
    """Replies were counted as they went out, their timings only with a claim up to a
    quarter second later: a worker killed (SIGKILL) in between left
    `persona_requests_completed_total` ahead of `persona_replies_total` and the histograms
    for good. Now the timings go in the same round trip as the replies."""
    from persona.bench_queue import InstantEngine
    from persona.monitoring import collect_stats
    from persona.pool import ModelPool
    from persona.queue_scripts import DELIVER_SCRIPT, RECORD_SCRIPT
    from persona.telemetry_reading import read_histogram
    from persona.worker import Worker

    write_persona("tiny", base=str(tiny_llama_dir))
    for script in (DELIVER_SCRIPT, RECORD_SCRIPT):  # as for a worker that has answered before
        redis_client.script_load(script)
    worker = Worker(settings, redis_client, ModelPool(settings, "cpu", engine_factory=InstantEngine), worker_id="w-killed")
    requests = [client.submit(chat("tiny")) for _ in range(3)]
    assert worker.turn(block_ms=0) == 3  # claimed and answered
    worker.turn(block_ms=0)  # the replies go out with the next claim; then it is killed: nothing more runs
    assert all(client.wait(r, timeout=5).ok for r in requests)
    deadline = time.monotonic() + 2  # Redis works through what was sent before the kill
    while True:
        stats = collect_stats(redis_client)
        counted = (stats.completed, stats.version_replies.get("tiny@base", 0), read_histogram(redis_client, "generate_seconds")[2])
        if counted == (3, 3, 3) or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert counted == (3, 3, 3), "completed, replies per version, generate_seconds observations"


@pytest.mark.parametrize(
    "damaged", [(keys.STATS_KEY, "completed"), (keys.user_pending_key("ann"), None)], ids=["completed", "senders-count"]
)
def test_a_counter_redis_cannot_add_to_costs_its_count_never_the_reply_or_the_acknowledgement(
    settings, redis_client, write_persona, tiny_llama_dir, client, damaged
):
    """A completion counter that was no number (`HSET persona:stats completed abc`) failed
    the delivery script after the reply went out, before the entry was acknowledged: every
    turn raised "hash value is not an integer" and waited out its pause, for ever. So did a
    sender's count of requests waiting that was no number. The work is done; only the count is lost."""
    from persona.bench_queue import InstantEngine
    from persona.pool import ModelPool
    from persona.worker import Worker

    write_persona("tiny", base=str(tiny_llama_dir))
    worker = Worker(settings, redis_client, ModelPool(settings, "cpu", engine_factory=InstantEngine), worker_id="w-count")
    requests = [client.submit(chat("tiny", user="ann")), client.submit(chat("nobody-has-this"))]
    key, field = damaged
    if field:
        redis_client.hset(key, field, "abc")
    else:
        redis_client.set(key, "abc")

    assert worker.step(block_ms=0) == 2  # one round: answered and settled, nothing raised

    replies = [client.wait(r, timeout=1) for r in requests]
    assert replies[0].text == "ok" and replies[1].error.kind is ErrorKind.invalid
    for stream in keys.STREAMS_BY_PRIORITY:  # acknowledged and deleted: nobody answers them again
        assert redis_client.xlen(stream) == 0
        assert redis_client.xpending(stream, keys.CONSUMER_GROUP)["pending"] == 0
    # The damaged one is left for the operator (`persona queue stats` says how); the others still count.
    assert (redis_client.hget(key, field) if field else redis_client.get(key)) == b"abc"
    assert redis_client.hget(keys.STATS_KEY, "failed:invalid") == b"1"


def test_the_batch_size_histogram_counts_each_decode_step_once_with_the_rows_it_decoded(
    settings, redis_client, write_persona, tiny_llama_dir, client
):
    """`persona_batch_size` ("requests generated together") was observed only at the decode
    steps that finished a reply, sized by the batch at that step: 225 requests gave 158
    observations, rate(_count) was neither batches nor steps a second, and sum/count leant
    to the steps where rows ended. Each step is one batch generated together: observed once,
    with the rows it decoded, so the sum is every token generated."""
    from persona.pool import ModelPool
    from persona.telemetry_reading import read_histogram
    from persona.worker import Worker

    write_persona("tiny", base=str(tiny_llama_dir))
    requests = [client.submit(chat("tiny", sampling=SamplingOverrides(max_new_tokens=n, temperature=0.0)))
                for n in (2, 2, 2, 5)]
    worker = Worker(settings, redis_client, ModelPool(settings, "cpu"), worker_id="w-steps")
    assert worker.step(block_ms=100) == 4  # all four join the first step: a batch of 4, then 1
    tokens = [client.wait(r, timeout=5).new_tokens for r in requests]
    _, total, count = read_histogram(redis_client, "batch_size")
    assert count == max(tokens), "one observation per decode step"
    assert total == sum(tokens), "each step's rows: one token each"
