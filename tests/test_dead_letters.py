"""Dead letters: listed with their reason, re-queued once with their original arguments."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest

from persona import constants as keys
from persona.contract import (
    ErrorKind,
    GenerationReply,
    GenerationRequest,
    Message,
    Priority,
    SamplingOverrides,
)
from persona.dead_letters import dead_ids, list_dead, retry_all, retry_dead
from persona.errors import InvalidRequest, QueueBusy
from persona.queue import QueueClient, WorkQueue


def chat(persona: str = "tiny", text: str = "hi", **kwargs) -> GenerationRequest:
    return GenerationRequest(persona=persona, messages=[Message(role="user", content=text)],
                             sampling=SamplingOverrides(max_new_tokens=3, seed=5), **kwargs)


def dead_letter(settings, redis_client, request: GenerationRequest) -> GenerationRequest:
    client = QueueClient(redis_client, settings.queue)
    queue = WorkQueue(redis_client, settings.queue)
    client.submit(request)
    [job] = queue.claim("w-crashing", 1, block_ms=0)
    queue.dead_letter(job, "it crashed the worker", 3, "w-crashing")
    reply = client.wait(request, timeout=5)
    assert reply.error.kind is ErrorKind.dead_letter
    return job.request


def test_retry_requeues_with_original_arguments_and_answers(settings, redis_client, write_persona, tiny_llama_dir, running_worker):
    write_persona("tiny", base=str(tiny_llama_dir))
    sent = dead_letter(settings, redis_client, chat(text="come back"))
    [letter] = list_dead(redis_client)
    assert (letter.request_id, letter.persona, letter.reason, letter.deliveries) == (sent.id, "tiny", "it crashed the worker", 3)

    assert retry_dead(redis_client, letter.id)
    assert retry_dead(redis_client, letter.id) is None  # a second retry finds nothing
    assert list_dead(redis_client) == []
    running_worker()
    reply = QueueClient(redis_client, settings.queue).wait(sent, timeout=60)
    assert reply.ok and reply.id == sent.id and reply.persona == "tiny"
    assert int(redis_client.hget("persona:stats", "retried")) == 1


def test_retry_all_and_the_cli(settings, redis_client, redis_url):
    for text in ("one", "two", "three"):
        dead_letter(settings, redis_client, chat(text=text))
    env = {k: v for k, v in os.environ.items() if not k.startswith("PERSONA_")}
    env |= {"PERSONA_DATA_DIR": str(settings.data_dir), "PERSONA_REDIS_URL": redis_url, "COLUMNS": "200"}

    def persona(*args: str, stdin: str = "") -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "persona", *args], env=env, input=stdin,
                              capture_output=True, check=False, text=True, timeout=120)

    listed = persona("queue", "dead", "--json")
    assert listed.returncode == 0, listed.stderr
    rows = [json.loads(line) for line in listed.stdout.splitlines()]
    assert [r["reason"] for r in rows] == ["it crashed the worker"] * 3 and rows[0]["deliveries"] == 3
    declined = persona("queue", "retry", "--all", stdin="n\n")
    assert declined.returncode == 1 and len(list_dead(redis_client)) == 3
    one = persona("queue", "retry", rows[0]["id"])
    assert one.returncode == 0, one.stderr
    assert persona("queue", "retry", rows[0]["id"]).returncode == 1
    typo = persona("queue", "retry", rows[1]["id"] + "x")  # not an id: said so, no traceback
    assert typo.returncode == 1 and "no dead letter" in typo.stderr and "Traceback" not in typo.stderr
    rest = persona("queue", "retry", "--all", "--yes")
    assert rest.returncode == 0 and "re-queued 2" in rest.stdout
    assert redis_client.xlen("persona:q:chat") == 3
    # completed and failed count replies sent: stats says how many letters came back for another try
    assert re.search(r"retried from dead letters\W+3\b", persona("queue", "stats").stdout)


@pytest.mark.parametrize("payload", [b"not json", b'{"id": "x"}'])
def test_unreadable_dead_letter_is_listed_but_not_retried(redis_client, payload):
    redis_client.xadd("persona:q:dead", {"r": payload, "reason": "malformed", "deliveries": 1})
    [letter] = list_dead(redis_client)
    assert letter.reason == "malformed"
    with pytest.raises(ValueError):
        retry_dead(redis_client, letter.id)
    report = retry_all(redis_client)
    assert report.requeued == [] and report.unreadable == 1 and report.left == 1


def test_retry_all_reaches_readable_letters_behind_a_page_of_unreadable_ones(settings, redis_client):
    """It used to read the newest page only, and stop there when none of it was readable."""
    older = [dead_letter(settings, redis_client, chat(text=text)) for text in ("one", "two")]
    for _ in range(5):
        redis_client.xadd("persona:q:dead", {"r": b"not json", "reason": "malformed", "deliveries": 1})
    retried = retry_all(redis_client, page=3)
    assert len(retried.requeued) == 2 and retried.unreadable == 5 and redis_client.xlen("persona:q:dead") == 5
    requeued = [GenerationRequest.from_json(fields[b"r"]).id for _, fields in redis_client.xrange("persona:q:chat")]
    assert sorted(requeued) == sorted(request.id for request in older)


def test_retry_waits_for_room_in_the_queue_as_callers_do(settings, redis_client, redis_url):
    """`retry --all` used to re-queue every dead letter whatever the queue held: a day of
    them went thousands past PERSONA_QUEUE__MAX_LENGTH, and every caller heard "busy"."""
    for text in ("one", "two", "three"):
        dead_letter(settings, redis_client, chat(text=text))
    env = {k: v for k, v in os.environ.items() if not k.startswith("PERSONA_")}
    env |= {"PERSONA_DATA_DIR": str(settings.data_dir), "PERSONA_REDIS_URL": redis_url, "COLUMNS": "200",
            "PERSONA_QUEUE__MAX_LENGTH": "2"}

    def persona(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "persona", *args], env=env, capture_output=True, check=False,
                              text=True, timeout=120)

    some = persona("queue", "retry", "--all", "--yes")
    assert some.returncode == 0, some.stderr
    assert "re-queued 2" in some.stdout and "1 left:" in some.stdout
    assert "1 for the chat stream, which holds 2 requests" in some.stdout
    assert redis_client.xlen("persona:q:chat") == 2
    [left] = list_dead(redis_client)
    refused = persona("queue", "retry", left.id)
    assert refused.returncode == 1 and "the chat stream already holds 2 requests" in refused.stderr
    assert "Traceback" not in refused.stderr and "persona:q:" not in refused.stderr  # the stream as people call it
    assert list_dead(redis_client) == [left] and redis_client.xlen("persona:q:chat") == 2
    redis_client.delete("persona:q:chat")  # drained
    assert persona("queue", "retry", left.id).returncode == 0
    assert list_dead(redis_client) == [] and redis_client.xlen("persona:q:chat") == 1


def test_retry_all_goes_on_with_letters_for_a_stream_that_has_room(settings, redis_client, redis_url):
    """`retry --all` stopped at the first letter whose stream was full: a full chat stream
    kept every batch letter behind it in the dead-letter stream, though batch had room."""
    dead_letter(settings, redis_client, chat(text="batch work", priority=Priority.batch))
    dead_letter(settings, redis_client, chat(text="a chat"))  # newer: retried first
    redis_client.xadd("persona:q:dead", {"r": b"not json", "reason": "malformed", "deliveries": 1})
    settings.queue.max_length = 2
    client = QueueClient(redis_client, settings.queue)
    for text in ("waiting", "also waiting"):
        client.submit(chat(text=text))  # the chat stream is full
    env = {k: v for k, v in os.environ.items() if not k.startswith("PERSONA_")}
    env |= {"PERSONA_DATA_DIR": str(settings.data_dir), "PERSONA_REDIS_URL": redis_url, "COLUMNS": "200",
            "PERSONA_QUEUE__MAX_LENGTH": "2"}
    done = subprocess.run([sys.executable, "-m", "persona", "queue", "retry", "--all", "--yes"], env=env,
                          capture_output=True, check=False, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert redis_client.xlen("persona:q:batch") == 1, done.stdout
    assert "re-queued 1 dead letter(s)" in done.stdout and "2 left:" in done.stdout
    assert "1 for the chat stream, which holds 2 requests" in done.stdout
    assert "1 holding no readable request" in done.stdout
    assert sorted(letter.stream for letter in list_dead(redis_client)) == ["", "persona:q:chat"]


def test_a_retried_letter_counts_again_in_its_senders_fair_share(settings, redis_client, work):
    """Setting a request aside answers it, so its sender's count of requests waiting went
    down; its retry did not count it again, so its new answer took the count below the
    truth, and the sender could then queue more than their share."""
    settings.queue.max_pending_per_user = 2
    client = QueueClient(redis_client, settings.queue)
    pending = keys.user_pending_key("alice")
    sent = dead_letter(settings, redis_client, chat(text="first", user="alice"))
    waiting = client.submit(chat(text="second", user="alice"))
    assert int(redis_client.get(pending)) == 1  # the second; the first was answered (set aside)
    [letter] = list_dead(redis_client)
    assert retry_dead(redis_client, letter.id)
    assert int(redis_client.get(pending)) == 2 and redis_client.ttl(pending) > 0
    with pytest.raises(QueueBusy, match="2 requests waiting"):
        client.submit(chat(text="one more than the share", user="alice"))
    jobs = work.claim("w", 10, block_ms=0)
    [retried] = [job for job in jobs if job.request.id == sent.id]
    work.deliver([(retried, GenerationReply(id=sent.id, ok=True, text="at last"))], "w")
    assert int(redis_client.get(pending)) == 1  # the second is still waiting
    [second] = [job for job in jobs if job.request.id == waiting.id]
    work.deliver([(second, GenerationReply(id=waiting.id, ok=True, text="done"))], "w")
    assert int(redis_client.get(pending)) == 0


def test_a_dead_letter_can_be_shown_whole_and_dropped_for_good(settings, redis_client, redis_url):
    """A letter holding no readable request could be neither retried nor removed: it sat in
    `persona queue dead` (and the dead-letter gauge) for ever, and `retry` answered with
    pydantic's three-line error and no next step."""
    sent = dead_letter(settings, redis_client, chat(text="come back [soon]", user="telegram:42", source="telegram"))
    bad = redis_client.xadd("persona:q:dead", {"r": b"not json", "reason": "malformed", "deliveries": 1}).decode()
    [_, good] = list_dead(redis_client)
    env = {k: v for k, v in os.environ.items() if not k.startswith("PERSONA_")}
    env |= {"PERSONA_DATA_DIR": str(settings.data_dir), "PERSONA_REDIS_URL": redis_url, "COLUMNS": "200"}

    def persona(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "persona", "queue", *args], env=env, capture_output=True,
                              check=False, text=True, timeout=120)

    refused = persona("retry", bad)
    assert refused.returncode == 1 and f"persona queue drop {bad}" in refused.stderr
    assert "Invalid JSON" in refused.stderr and "errors.pydantic.dev" not in refused.stderr
    shown = persona("show", bad)
    assert shown.returncode == 0 and "not json" in shown.stdout and f"persona queue drop {bad}" in shown.stdout
    shown = persona("show", good.id)
    assert shown.returncode == 0, shown.stderr
    assert all(part in shown.stdout for part in (sent.id, "come back [soon]", "telegram:42", "it crashed the worker"))
    assert "bound for  the chat stream" in shown.stdout  # not its Redis key, persona:q:chat
    assert json.loads(persona("show", good.id, "--json").stdout)["request_id"] == sent.id
    assert persona("show", "1-1").returncode == 1

    dropped = persona("drop", "--unreadable", "--yes")
    assert dropped.returncode == 0 and "dropped 1 dead letter" in dropped.stdout
    assert list_dead(redis_client) == [good]
    typo = persona("drop", good.id, "1-1", "1-1")  # one unknown id (named twice, said once): nothing dropped
    assert typo.returncode == 1 and "no dead letter 1-1; nothing dropped" in typo.stderr
    assert list_dead(redis_client) == [good]
    assert persona("drop", good.id).returncode == 0
    assert list_dead(redis_client) == [] and int(redis_client.hget(keys.STATS_KEY, "dropped")) == 2
    assert persona("dead").stdout == "no dead letters\n"  # not an empty table


def test_dead_letters_holding_brackets_are_listed_as_written(settings, redis_client, redis_url):
    """The table read reasons as Rich markup: "[bold]" vanished, and a reason quoting a
    path in brackets ("see [/var/log/x]", a closing tag) ended `persona queue dead` with
    a MarkupError traceback, so no dead letter could be listed at all."""
    client = QueueClient(redis_client, settings.queue)
    queue = WorkQueue(redis_client, settings.queue)
    client.submit(chat())
    [job] = queue.claim("w-[gpu0]", 1, block_ms=0)
    queue.dead_letter(job, "CUDA error in [bold]kernel[/bold]: see [/var/log/x]", 3, "w-[gpu0]")
    env = {k: v for k, v in os.environ.items() if not k.startswith("PERSONA_")}
    env |= {"PERSONA_DATA_DIR": str(settings.data_dir), "PERSONA_REDIS_URL": redis_url, "COLUMNS": "250"}
    listed = subprocess.run([sys.executable, "-m", "persona", "queue", "dead"], env=env, capture_output=True,
                            check=False, text=True, timeout=120)
    assert listed.returncode == 0, listed.stderr
    assert "CUDA error in [bold]kernel[/bold]: see [/var/log/x]" in listed.stdout


def test_letters_deleted_at_the_streams_cap_are_counted_and_the_cap_is_warned_of(settings, redis_client, redis_url):
    """The stream keeps about DEAD_STREAM_MAX_LEN letters and Redis trimmed the oldest
    silently: `persona queue dead` and stats showed about 10,000 however many were lost,
    and nothing said the cap was near."""
    from persona.dead_letters import drop_dead

    for text in ("one", "two", "three"):
        dead_letter(settings, redis_client, chat(text=text))
    [newest, middle, _] = list_dead(redis_client)
    assert retry_dead(redis_client, newest.id) and drop_dead(redis_client, [middle.id]) == 1
    env = {k: v for k, v in os.environ.items() if not k.startswith("PERSONA_")}
    env |= {"PERSONA_DATA_DIR": str(settings.data_dir), "PERSONA_REDIS_URL": redis_url, "COLUMNS": "400"}

    def persona(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "persona", "queue", *args], env=env, capture_output=True,
                              check=False, text=True, timeout=120)

    def stats() -> dict:
        return json.loads(persona("stats", "--json").stdout)

    assert stats()["dead_letters_trimmed"] == 0  # retried and dropped letters are not lost ones
    # Past the cap, as WorkQueue.dead_letter writes each letter (a real worker takes
    # seconds per thousand): XADD with MAXLEN ~ the cap, then the count.
    payload = chat().to_json()
    pipe = redis_client.pipeline(transaction=False)
    for i in range(keys.DEAD_STREAM_MAX_LEN + 300):
        pipe.xadd(keys.STREAM_DEAD, {"r": payload, "stream": keys.STREAM_INTERACTIVE, "reason": f"crash {i}",
                                     "deliveries": 3, "worker": "w-x", "at": 1.0},
                  maxlen=keys.DEAD_STREAM_MAX_LEN, approximate=True)
        pipe.hincrby(keys.STATS_KEY, "dead_lettered", 1)
    pipe.execute()
    held = redis_client.xlen(keys.STREAM_DEAD)
    lost = keys.DEAD_STREAM_MAX_LEN + 301 - held
    assert lost > 0

    listed = persona("dead", "--limit", "1")
    assert listed.returncode == 0, listed.stderr
    assert f"holds {held:,} of about {keys.DEAD_STREAM_MAX_LEN:,}" in listed.stdout and f"({lost:,} so far)" in listed.stdout
    assert persona("dead", "--limit", "1", "--json").stderr.startswith("warning:")  # JSON lines stay clean
    assert stats()["dead_letters_trimmed"] == lost
    from persona.dashboard_metrics import QueueCollector

    gauges = {m.name: m.samples[0].value for m in QueueCollector(redis_client).collect() if m.samples}
    assert gauges["persona_dead_letters_trimmed"] == lost
    dropped = drop_dead(redis_client, [list_dead(redis_client, count=1)[0].id])  # one by one: not emptied yet
    assert dropped == 1 and f"({lost:,} so far)" in persona("dead").stdout


def test_a_clean_up_clears_the_deleted_unseen_note_and_metrics_keep_the_total(settings, redis_client, redis_url):
    """The count of letters deleted unseen at the cap was a running total: after an operator
    retried or dropped every letter, `persona queue dead`, stats and the page still said
    "N older dead letter(s) were deleted unseen" for good. Emptying the stream clears it;
    /metrics keeps the total (it only grows), and letters trimmed later are said anew."""
    from persona.dashboard_metrics import QueueCollector
    from persona.dead_letters import count_dead, drop_dead

    env = {k: v for k, v in os.environ.items() if not k.startswith("PERSONA_")}
    env |= {"PERSONA_DATA_DIR": str(settings.data_dir), "PERSONA_REDIS_URL": redis_url, "COLUMNS": "400"}

    def persona(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "persona", "queue", *args], env=env, capture_output=True,
                              check=False, text=True, timeout=120)

    for text in ("one", "two", "three"):
        dead_letter(settings, redis_client, chat(text=text))
    redis_client.hincrby(keys.STATS_KEY, "dead_lettered", 40)  # as 40 letters set aside, then trimmed at the cap
    assert count_dead(redis_client) == (3, 40) and "40 older dead letter(s) were deleted unseen" in persona("dead").stdout
    newest = list_dead(redis_client)[0]
    assert retry_dead(redis_client, newest.id)
    assert count_dead(redis_client) == (2, 40)  # letters still held: not cleaned up yet
    queue = WorkQueue(redis_client, settings.queue)
    [job] = queue.claim("w", 1, block_ms=0)  # the retried request is answered
    queue.deliver([(job, GenerationReply(id=job.request.id, ok=True, text="back", persona="tiny"))], "w")
    assert persona("drop", "--all", "--yes").returncode == 0

    assert "deleted unseen" not in persona("dead").stdout
    figures = json.loads(persona("stats", "--json").stdout)
    assert figures["dead_letters_trimmed"] == 40 and figures["dead_letters_trimmed_since_cleared"] == 0
    assert "deleted at the cap" not in persona("stats").stdout
    gauges = {m.name: m.samples[0].value for m in QueueCollector(redis_client).collect() if m.samples}
    assert gauges["persona_dead_letters_trimmed"] == 40  # Prometheus's count never goes back

    dead_letter(settings, redis_client, chat(text="four"))
    redis_client.hincrby(keys.STATS_KEY, "dead_lettered", 5)  # trimmed after the clean-up: said again
    assert count_dead(redis_client) == (1, 5) and "5 older dead letter(s) were deleted unseen" in persona("dead").stdout
    assert drop_dead(redis_client, [list_dead(redis_client)[0].id]) == 1  # emptied one by one (or by retries) too
    assert count_dead(redis_client) == (0, 0)


@pytest.mark.parametrize("columns", ["80", "60"])
def test_the_dead_letters_listed_into_a_pipe_are_whole_one_line_each(settings, redis_client, redis_url, columns):
    """Into a pipe (80 columns, or what COLUMNS says), `persona queue dead` cut every id to
    "1795810641…", and the ids are what `show`, `retry` and `drop` take: the operator had
    nothing to copy; then, the id kept, the request and reason folded a word a line (every
    test here ran it 200 columns wide). A pipe gets each letter whole on one line."""
    dead_letter(settings, redis_client, chat(text="a long reason follows " * 5))
    [letter] = list_dead(redis_client)
    env = {k: v for k, v in os.environ.items() if not k.startswith("PERSONA_")}
    env |= {"PERSONA_DATA_DIR": str(settings.data_dir), "PERSONA_REDIS_URL": redis_url, "COLUMNS": columns}
    listed = subprocess.run([sys.executable, "-m", "persona", "queue", "dead"], env=env, capture_output=True,
                            check=False, text=True, timeout=120)
    assert listed.returncode == 0, listed.stderr
    [row] = [line for line in listed.stdout.splitlines() if letter.id in line]
    assert letter.request_id in row and letter.reason in row and "…" not in listed.stdout, listed.stdout


@pytest.mark.parametrize("command", [["retry", "--all"], ["drop", "--all"], ["drop", "--unreadable"]])
def test_a_confirmation_nobody_can_answer_says_to_pass_yes(settings, redis_client, redis_url, command):
    """Run from cron, a script or ssh without a terminal (stdin closed), `retry --all` and
    `drop --all` printed their question and then "Aborted.", exit 1: no word of what was
    not done or of --yes, the flag that runs them unattended."""
    dead_letter(settings, redis_client, chat())
    redis_client.xadd(keys.STREAM_DEAD, {"r": b"not json", "reason": "malformed", "deliveries": 1})
    env = {k: v for k, v in os.environ.items() if not k.startswith("PERSONA_")}
    env |= {"PERSONA_DATA_DIR": str(settings.data_dir), "PERSONA_REDIS_URL": redis_url, "COLUMNS": "200"}
    asked = subprocess.run([sys.executable, "-m", "persona", "queue", *command], env=env, stdin=subprocess.DEVNULL,
                           capture_output=True, check=False, text=True, timeout=120)
    assert asked.returncode == 1 and "Aborted" not in asked.stderr
    assert "--yes" in asked.stderr and "nothing" in asked.stderr, asked.stderr
    assert len(list_dead(redis_client)) == 2  # nothing done


def _queue_command(settings, redis_url: str, *args: str) -> subprocess.CompletedProcess:
    """`persona queue ...` as an operator runs it, on this test's Redis."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PERSONA_")}
    env |= {"PERSONA_DATA_DIR": str(settings.data_dir), "PERSONA_REDIS_URL": redis_url, "COLUMNS": "200"}
    return subprocess.run([sys.executable, "-m", "persona", "queue", *args], env=env, capture_output=True,
                          check=False, text=True, timeout=120)


def test_a_letter_whose_fields_cannot_be_read_is_listed_as_unreadable_and_dropped(settings, redis_client, redis_url):
    """A letter whose delivery count was no number (a foreign writer's) ended `queue dead`,
    `drop`, `drop --unreadable`, `retry --all` and the page with a ValueError: it could not
    be listed, nor deleted, and hid every other letter."""
    sent = dead_letter(settings, redis_client, chat(text="come back"))
    bad = redis_client.xadd(keys.STREAM_DEAD, {"deliveries": b"abc", "at": b"xyz"}).decode()
    odd = redis_client.xadd(keys.STREAM_DEAD, {"r": b"not json", "deliveries": b"2.5", "at": b"nan"}).decode()
    unreadable = {bad, odd}

    listed = {letter.id: letter for letter in list_dead(redis_client)}
    assert [(listed[i].request_id, listed[i].deliveries, listed[i].at) for i in (bad, odd)] == [("", 0, 0.0)] * 2
    assert listed[next(iter(listed.keys() - unreadable))].request_id == sent.id
    assert set(dead_ids(redis_client, unreadable=True)) == unreadable
    report = retry_all(redis_client)
    assert len(report.requeued) == 1 and report.unreadable == 2
    shown = _queue_command(settings, redis_url, "dead")
    assert shown.returncode == 0, shown.stderr
    assert all(f"│ {i} │ (malformed) │" in shown.stdout for i in unreadable), shown.stdout
    assert _queue_command(settings, redis_url, "drop", bad).returncode == 0
    dropped = _queue_command(settings, redis_url, "drop", "--unreadable", "--yes")
    assert dropped.returncode == 0 and "dropped 1 dead letter" in dropped.stdout, dropped.stderr
    assert list_dead(redis_client) == []


@pytest.mark.parametrize(("command", "said"), [
    (["drop", "--all", "--unreadable"], "--all and --unreadable were given together: pass only one of them"),
    (["drop", "1-0", "--unreadable"], "dead-letter IDs and --unreadable were given together: pass only one of them"),
    (["retry", "1-0", "--all"], "name one dead-letter ID or pass --all, not both"),
], ids=["drop --all --unreadable", "drop ID --unreadable", "retry ID --all"])
def test_options_that_cannot_go_together_are_named(settings, redis_client, redis_url, command, said):
    """`drop --all --unreadable` answered "name dead-letter IDs, or pass --all or --unreadable",
    though both were passed: it did not say which was wrong."""
    dead_letter(settings, redis_client, chat())
    refused = _queue_command(settings, redis_url, *command, "--yes")
    assert refused.returncode == 1 and said in refused.stderr, refused.stderr
    assert len(list_dead(redis_client)) == 1  # nothing done


def test_counters_redis_cannot_add_to_cost_the_dead_letter_commands_nothing_but_their_counts(
    settings, redis_client, redis_url
):
    """With `retried`, `dropped` or `dead_lettered` no number (`HSET persona:stats retried
    abc`), `persona queue dead` ended in a traceback, and a retry failed after the letter
    was deleted and before its request was queued again: the request was lost."""
    first = dead_letter(settings, redis_client, chat(text="one", user="ann"))
    dead_letter(settings, redis_client, chat(text="two"))
    redis_client.hset(keys.STATS_KEY, mapping={"dead_lettered": "abc", "retried": "abc", "dropped": "abc"})
    redis_client.set(keys.user_pending_key("ann"), "abc")
    env = {k: v for k, v in os.environ.items() if not k.startswith("PERSONA_")}
    env |= {"PERSONA_DATA_DIR": str(settings.data_dir), "PERSONA_REDIS_URL": redis_url, "COLUMNS": "200"}

    def persona(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "persona", "queue", *args], env=env, capture_output=True,
                              check=False, text=True, timeout=120)

    [two, one] = list_dead(redis_client)
    retried = persona("retry", one.id)
    assert retried.returncode == 0, retried.stderr
    [job] = WorkQueue(redis_client, settings.queue).claim("w", 1, block_ms=0)
    assert job.request.id == first.id  # queued again, counted again for its sender
    assert redis_client.get(keys.user_pending_key("ann")) == b"1"
    listed = persona("dead", "--json")
    assert listed.returncode == 0 and "Traceback" not in listed.stderr, listed.stderr
    assert [json.loads(line)["id"] for line in listed.stdout.splitlines()] == [two.id]
    assert "redis-cli HDEL persona:stats retried" in listed.stderr  # the repair, said
    assert persona("drop", two.id).returncode == 0
    assert list_dead(redis_client) == []
    stats = {k.decode(): v.decode() for k, v in redis_client.hgetall(keys.STATS_KEY).items()}
    assert (stats["dead_lettered"], stats["retried"], stats["dropped"]) == ("abc", "abc", "abc")


def test_retry_and_drop_json_print_one_object_and_a_refusal_as_the_json_failure(settings, redis_client, redis_url):
    """`queue show` and `queue dead` had --json and `retry` and `drop` did not: a script read
    "re-queued 2 dead letter(s)", and a "no" to the question ended it with nothing on stdout."""
    for text in ("one", "two", "three"):
        dead_letter(settings, redis_client, chat(text=text))
    bad = redis_client.xadd(keys.STREAM_DEAD, {"r": b"not json", "reason": "malformed", "deliveries": 1}).decode()
    [_, newest, middle, oldest] = [letter.id for letter in list_dead(redis_client)]
    env = {k: v for k, v in os.environ.items() if not k.startswith("PERSONA_")}
    env |= {"PERSONA_DATA_DIR": str(settings.data_dir), "PERSONA_REDIS_URL": redis_url, "COLUMNS": "200"}

    def queue_json(*args: str, stdin: str = "") -> tuple[int, dict, str]:
        done = subprocess.run([sys.executable, "-m", "persona", "queue", *args, "--json"], env=env, input=stdin,
                              capture_output=True, check=False, text=True, timeout=120)
        return done.returncode, json.loads(done.stdout), done.stderr

    assert queue_json("retry", oldest)[:2] == (0, {"ok": True, "requeued": [oldest], "full": {}, "unreadable": 0, "refused": {}, "left": 0})
    status, shown, _ = queue_json("retry", oldest)
    assert (status, shown) == (1, {"ok": False, "error": {"kind": "QueueError",
                                                          "message": f"no dead letter {oldest}; see `persona queue dead`"}})
    # A "no" (asked on stderr, so stdout holds one object) is a failure that says what was not done.
    status, shown, asked = queue_json("retry", "--all", stdin="n\n")
    assert (status, shown["ok"], shown["error"]["message"]) == (1, False, "the answer was no, so nothing was re-queued")
    assert "re-queue all 3 dead letter(s)?" in asked
    assert queue_json("retry", "--all", "--yes")[:2] == (0, {"ok": True, "requeued": [newest, middle], "full": {},
                                                             "unreadable": 1, "refused": {}, "left": 1})
    assert queue_json("drop", bad)[:2] == (0, {"ok": True, "dropped": 1})
    assert queue_json("drop", "--all", "--yes")[:2] == (0, {"ok": True, "dropped": 0})
    assert queue_json("retry", "--all")[:2] == (0, {"ok": True, "requeued": [], "full": {}, "unreadable": 0, "refused": {}, "left": 0})


def test_a_letter_whose_request_names_no_id_is_refused_not_requeued_under_a_made_up_one(
    settings, redis_client, redis_url, work
):
    """Re-queued under an id from_json made up, it was generated and answered into a list nobody reads."""
    anonymous = {"persona": "tiny", "messages": [{"role": "user", "content": "hi"}]}
    redis_client.xadd(keys.STREAM_INTERACTIVE, {"r": json.dumps(anonymous)})  # a client in another language
    [job] = work.claim("w1", 1, block_ms=0)
    assert work.dead_letter(job, job.problem, 1, "w1", kind=ErrorKind.invalid)  # as a worker sets it aside
    [letter] = list_dead(redis_client)
    assert letter.request_id == ""  # no id made up at each reading

    with pytest.raises(InvalidRequest, match=f"persona queue drop {letter.id}") as refused:
        retry_dead(redis_client, letter.id)
    assert "without an id" in str(refused.value) and '"id"' in str(refused.value)
    report = retry_all(redis_client)
    assert report.requeued == [] and report.unreadable == 1
    assert dead_ids(redis_client, unreadable=True) == [letter.id]  # what `drop --unreadable` deletes
    shown = _queue_command(settings, redis_url, "retry", letter.id)
    assert shown.returncode == 1 and "Traceback" not in shown.stderr
    assert f"persona queue drop {letter.id}" in shown.stderr and "without an id" in shown.stderr, shown.stderr
    assert redis_client.xlen(keys.STREAM_INTERACTIVE) == 0 and list_dead(redis_client) == [letter]


def test_a_retry_clears_the_requests_digest_with_its_answered_mark(settings, redis_client):
    """The two are one record of who holds the id: the retry cleared the mark and left the digest behind (up to a day)."""
    sent = dead_letter(settings, redis_client, chat(text="come back"))
    assert redis_client.exists(keys.answered_key(sent.id), keys.digest_key(sent.id)) == 2
    [letter] = list_dead(redis_client)
    assert retry_dead(redis_client, letter.id)
    assert redis_client.exists(keys.answered_key(sent.id), keys.digest_key(sent.id)) == 0


def test_a_letter_set_aside_because_its_id_was_in_use_is_refused_a_retry_that_would_take_the_holders_reply(
    settings, redis_client, redis_url, work
):
    """The retry cleared the answered mark, reply list and digest of the id whoever held them:
    the holder's caller then read the other request's reply as its own."""
    client = QueueClient(redis_client, settings.queue)
    first = client.submit(chat(text="question from A", id="order-42"))
    other = chat(text="question from B", id="order-42").to_json()
    redis_client.xadd(keys.STREAM_INTERACTIVE, {"r": other})  # a client in another language reuses the id
    [job] = work.claim("w1", 10, block_ms=100)
    assert job.request == first
    [letter] = list_dead(redis_client)
    assert letter.payload == other

    with pytest.raises(InvalidRequest, match=r"request id order-42 is in use by another request.*new id.*"
                                             rf"`persona queue drop {letter.id}`"):
        retry_dead(redis_client, letter.id)
    report = retry_all(redis_client)
    assert report.requeued == [] and list(report.refused) == [letter.id] and report.left == 1
    shown = _queue_command(settings, redis_url, "retry", "--all", "--yes")
    assert shown.returncode == 0 and "re-queued 0" in shown.stdout and "in use by another request" in shown.stdout
    assert work.deliver([(job, GenerationReply(id=first.id, ok=True, text="for A"))], "w1") == 1
    assert client.wait(first, timeout=2).text == "for A"
    assert list_dead(redis_client) == [letter] and redis_client.xlen(keys.STREAM_INTERACTIVE) == 0


@pytest.mark.parametrize(("newer", "said"), [
    ({"version": 2}, "contract version 2"),
    ({"stop_words": ["bye"]}, "stop_words"),
], ids=["version 2", "a field this contract lacks"])
def test_a_letter_of_a_newer_contract_is_listed_under_its_id_kept_and_refused_only_at_retry(
    settings, redis_client, redis_url, work, newer, said
):
    """Listed as "(malformed)", `drop --unreadable` deleted it: the request an upgrade was to retry."""
    request = {"id": "v2-req-1", "persona": "tiny", "messages": [{"role": "user", "content": "hi"}], **newer}
    redis_client.xadd(keys.STREAM_INTERACTIVE, {"r": json.dumps(request)})  # a newer client, an older worker
    [job] = work.claim("w1", 1, block_ms=0)
    assert work.dead_letter(job, job.problem, 1, "w1", kind=ErrorKind.invalid)  # as the worker sets it aside
    [letter] = list_dead(redis_client)
    assert (letter.request_id, letter.persona) == ("v2-req-1", "tiny")
    assert dead_ids(redis_client, unreadable=True) == []

    with pytest.raises(InvalidRequest, match=rf"{said}.*upgraded.*`persona queue drop {letter.id}`"):
        retry_dead(redis_client, letter.id)
    assert list(retry_all(redis_client).refused) == [letter.id]
    listed = _queue_command(settings, redis_url, "dead")
    assert "v2-req-1" in listed.stdout and "(malformed)" not in listed.stdout, listed.stdout
    shown = _queue_command(settings, redis_url, "show", letter.id)
    assert shown.returncode == 0 and said in shown.stdout and "Traceback" not in shown.stderr, shown.stderr
    assert _queue_command(settings, redis_url, "drop", "--unreadable", "--yes").returncode == 0
    assert list_dead(redis_client) == [letter]
