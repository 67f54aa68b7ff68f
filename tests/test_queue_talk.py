"""`persona ask` and `persona chat` as a user meets them when the queue misbehaves: real
processes on a real Redis that the test stops halfway."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import redis

from persona import constants as keys
from persona.embedded_redis import EmbeddedRedis

# `python -m persona`, with Ctrl-C raising KeyboardInterrupt as in a terminal, even where the
# tests run as a background job (which starts Python with SIGINT ignored).
AS_IN_A_TERMINAL = (
    "import runpy, signal, sys; signal.signal(signal.SIGINT, signal.default_int_handler); "
    "sys.argv[0] = 'persona'; runpy.run_module('persona', run_name='__main__', alter_sys=True)"
)


def _talking(tmp_path: Path, url: str, *args: str, **settings: str) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PERSONA_")}
    env |= {"PERSONA_DATA_DIR": str(tmp_path / "data"), "PERSONA_REDIS_URL": url, "COLUMNS": "200", **settings}
    return subprocess.Popen(
        [sys.executable, "-c", AS_IN_A_TERMINAL, *args], env=env, text=True, stdin=subprocess.PIPE,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )


def _queued(client: redis.Redis, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not client.exists(keys.STREAM_INTERACTIVE) or not client.xlen(keys.STREAM_INTERACTIVE):
        assert time.monotonic() < deadline, "the request never reached the queue"
        time.sleep(0.05)


@pytest.mark.parametrize("command", ["ask", "chat"])
def test_ctrl_c_with_redis_down_answers_at_once_and_says_the_message_was_not_withdrawn(tmp_path, own_redis, command):
    """Withdrawing the message went through redis-py's reconnects: the terminal hung for 9 s
    after Ctrl-C, and the chat then said "(withdrawn)" of a message still queued."""
    server, url, client = own_redis
    talking = _talking(tmp_path, url, *(["ask", "sage", "hello"] if command == "ask" else ["chat", "sage"]))
    if command == "chat":
        talking.stdin.write("hello\n")
        talking.stdin.flush()
    _queued(client)  # no worker: it waits for the reply
    server.stop()
    pressed = time.monotonic()
    talking.send_signal(signal.SIGINT)
    stdout, stderr = talking.communicate("/quit\n" if command == "chat" else None, timeout=30)
    assert time.monotonic() - pressed < 4.0
    assert "Traceback" not in stderr
    assert "could not withdraw that message: Redis cannot be reached" in stderr
    assert "(withdrawn" not in stdout + stderr
    if command == "chat":
        assert talking.returncode == 0 and stdout.count("you>") == 2  # the chat goes on, then /quit


def test_an_ask_that_timed_out_is_past_its_deadline_so_no_worker_generates_it_later(tmp_path, own_redis):
    """`persona ask` does not withdraw a message it stopped waiting for: its deadline (the
    --timeout) has passed by then, by Redis's clock, so a worker that comes back later
    answers it "waited past its deadline" without generating (see test_worker)."""
    from persona.settings import QueueSettings
    from persona.work_queue import WorkQueue

    _server, url, client = own_redis
    talking = _talking(tmp_path, url, "ask", "sage", "hello", "--timeout", "1")
    _stdout, stderr = talking.communicate(timeout=30)
    assert talking.returncode == 1 and "no worker answered request" in stderr
    [job] = WorkQueue(client, QueueSettings()).claim("late-worker", 10, block_ms=0)
    seconds, micros = client.time()
    assert job.expired(seconds + micros / 1e6)


def _request_id(client: redis.Redis) -> str:
    import json

    _queued(client)
    [(_, fields)] = client.xrange(keys.STREAM_INTERACTIVE)
    return json.loads(fields[b"r"])["id"]


@pytest.mark.parametrize(("command", "stop_signal", "status"), [
    ("ask", signal.SIGTERM, 143), ("chat", signal.SIGTERM, 143), ("ask", signal.SIGHUP, 129),
])
def test_sigterm_or_a_closed_terminal_withdraws_the_message_waiting(tmp_path, own_redis, command, stop_signal, status):
    """`kill` or closing the terminal left the message queued, for a worker to answer for
    nobody later (and `persona chat` ended without a word): now it is withdrawn as Ctrl-C's is."""
    _server, url, client = own_redis
    talking = _talking(tmp_path, url, *(["ask", "sage", "hello"] if command == "ask" else ["chat", "sage"]))
    if command == "chat":
        talking.stdin.write("hello\n")
        talking.stdin.flush()
    request_id = _request_id(client)  # no worker: it waits for the reply
    talking.send_signal(stop_signal)
    stdout, stderr = talking.communicate(timeout=30)
    assert talking.returncode == status and "Traceback" not in stderr, stderr
    assert client.exists(keys.cancel_key(request_id)), "a worker would still answer it"
    assert "(withdrawn" in stdout + stderr


def test_ctrl_c_under_json_prints_the_withdrawal_as_json(tmp_path, own_redis):
    """A script reading `persona ask --json` got nothing on stdout after Ctrl-C (exit 130)."""
    import json

    _server, url, client = own_redis
    talking = _talking(tmp_path, url, "ask", "sage", "hello", "--json")
    request_id = _request_id(client)
    talking.send_signal(signal.SIGINT)
    stdout, stderr = talking.communicate(timeout=30)
    assert talking.returncode == 130 and "Traceback" not in stderr, stderr
    reply = json.loads(stdout)
    assert reply["ok"] is False and reply["id"] == request_id
    assert reply["error"]["kind"] == "cancelled" and "withdrawn" in reply["error"]["message"]


def test_a_message_reaches_the_queue_without_c1_controls_and_with_its_joiners_and_marks(tmp_path, own_redis):
    """U+009B, a terminal's CSI as ESC [ is, reached the persona and its logs while ESC itself
    was stripped. Format characters inside real text are not controls: the joiner of an emoji
    sequence and a right-to-left mark stay as sent."""
    import json

    _server, url, client = own_redis
    talking = _talking(tmp_path, url, "ask", "sage", "red \x1b[31mtext\x9b0m \U0001f469\u200d\U0001f4bb \u200fשלום")
    _queued(client)
    (_, fields), = client.xrange(keys.STREAM_INTERACTIVE)
    talking.send_signal(signal.SIGINT)
    talking.communicate(timeout=30)
    [message] = json.loads(fields[b"r"])["messages"]
    assert message["content"] == "red [31mtext0m \U0001f469\u200d\U0001f4bb \u200fשלום"


def test_ask_into_a_queue_full_of_dead_requests_with_no_worker_says_trying_again_will_not_help(tmp_path, own_redis):
    """It said "the queue is busy (1 requests already waiting ...); please try again in a
    moment" while `persona queue stats` showed nothing waiting: the one entry had timed out,
    and with no worker running nothing ever clears it."""
    import json

    _server, url, _client = own_redis
    timed_out = _talking(tmp_path, url, "ask", "sage", "hello", "--timeout", "1", PERSONA_QUEUE__MAX_LENGTH="1")
    assert timed_out.wait(timeout=30) == 1
    refused = _talking(tmp_path, url, "ask", "sage", "hi", "--timeout", "2", "--json", PERSONA_QUEUE__MAX_LENGTH="1")
    stdout, _stderr = refused.communicate(timeout=30)
    error = json.loads(stdout)["error"]
    assert error["kind"] == "QueueBusy"
    assert error["message"].startswith("the queue is full: persona:q:chat holds 1 request (its limit, "
                                       "PERSONA_QUEUE__MAX_LENGTH=1): 1 past their deadline; no worker is running")


def test_ask_that_times_out_while_a_worker_answers_it_says_so_and_names_its_own_option(tmp_path, own_redis):
    """A long message that a worker had taken and was generating timed out as "1 worker is
    running, but did not reach it before its deadline"."""
    from persona import heartbeat
    from persona.settings import QueueSettings
    from persona.work_queue import WorkQueue

    _server, url, client = own_redis
    heartbeat.publish(client, heartbeat.WorkerInfo(id="w-slow", state="serving"), ttl_s=30)
    work = WorkQueue(client, QueueSettings())
    talking = _talking(tmp_path, url, "ask", "sage", "x" * 6000, "--timeout", "3")
    _queued(client)
    assert work.claim("w-slow", 1, block_ms=0)  # and never answers in time
    _stdout, stderr = talking.communicate(timeout=30)
    assert talking.returncode == 1 and "Traceback" not in stderr, stderr
    said = " ".join(stderr.split())
    assert "was not answered in time: worker w-slow took it" in said and "is still answering it" in said
    assert "give it longer (`persona ask --timeout SECONDS`" in said


def _scripted_talk(tmp_path: Path, settings, *args: str, stdin: str = "") -> subprocess.CompletedProcess:
    talking = _talking(tmp_path, settings.redis_url.get_secret_value(), *args)
    stdout, stderr = talking.communicate(stdin, timeout=60)
    assert "Traceback" not in stderr, stderr
    return subprocess.CompletedProcess(talking.args, talking.returncode, stdout, stderr)


@pytest.mark.parametrize("command", ["ask", "chat"])
def test_a_reply_with_no_text_is_said_to_be_nothing(tmp_path, settings, redis_client, command):
    """A reply that ended at once was printed as an empty line with exit status 0: nothing
    told the user the persona had said nothing, or what to do."""
    from tests.fakes.scripted_worker import scripted_worker

    args = ["ask", "sage", "hello"] if command == "ask" else ["chat", "sage"]
    with scripted_worker(settings, lambda request: ""):
        result = _scripted_talk(tmp_path, settings, *args, stdin="hello\n/quit\n")
    assert result.returncode == 0
    assert "(sage said nothing: its reply ended at once; ask again, or rephrase)" in result.stderr


def test_a_reply_cut_off_before_its_first_word_says_how_to_give_it_room(tmp_path, settings, redis_client):
    from tests.fakes.scripted_worker import scripted_worker

    with scripted_worker(settings, lambda request: ("", "length")):
        result = _scripted_talk(tmp_path, settings, "ask", "sage", "hello", "--max-new-tokens", "3")
    assert result.returncode == 0
    assert ("(sage said nothing: its reply reached its token limit before a whole word; raise --max-new-tokens, "
            "or rephrase)") in " ".join(result.stderr.split()), result.stderr


def test_ask_json_of_a_reply_with_no_text_is_the_reply_alone(tmp_path, settings, redis_client):
    import json

    from tests.fakes.scripted_worker import scripted_worker

    with scripted_worker(settings, lambda request: ""):
        result = _scripted_talk(tmp_path, settings, "ask", "sage", "hello", "--json")
    assert result.returncode == 0 and result.stderr == "", result.stderr
    assert json.loads(result.stdout)["text"] == ""


def test_ask_dash_reads_the_whole_message_from_standard_input(tmp_path, settings, redis_client):
    """`persona ask sage -` sent the message "-"."""
    from tests.fakes.scripted_worker import scripted_worker

    with scripted_worker(settings, lambda request: "heard") as seen:
        result = _scripted_talk(tmp_path, settings, "ask", "sage", "-", stdin="line one\n-5 degrees\n")
    assert result.returncode == 0 and result.stdout == "heard\n", result.stderr
    [request] = seen
    assert request.messages[-1].content == "line one\n-5 degrees"
    empty = _scripted_talk(tmp_path, settings, "ask", "sage", "-", stdin="")
    assert empty.returncode == 1 and "the message is empty; say something" in empty.stderr, empty.stderr


def test_a_chat_line_with_nothing_visible_is_skipped_as_a_blank_line(tmp_path, settings, redis_client):
    """A line of zero-width spaces, or of a lone right-to-left override, was sent and came
    back refused: "the message is empty; say something"."""
    from tests.fakes.scripted_worker import scripted_worker

    with scripted_worker(settings, lambda request: "heard") as seen:
        result = _scripted_talk(tmp_path, settings, "chat", "sage", stdin="\u200b\u200b\n \u202e \u00a0\nhi\n/quit\n")
    assert result.returncode == 0 and result.stderr == "", result.stderr
    assert [request.messages[-1].content for request in seen] == ["hi"]
    assert result.stdout.count("you>") == 4 and result.stdout.count("sage> heard") == 1


@pytest.mark.parametrize("command", ["ask", "chat"])
def test_a_full_queue_with_no_worker_is_refused_without_saying_the_message_waits(tmp_path, own_redis, command):
    """With no worker running, `persona ask` said "no worker is running yet; this waits in
    the queue for one" and then was refused as busy: the message never waited anywhere."""
    from persona.contract import GenerationRequest, Message
    from persona.queue import QueueClient
    from persona.settings import QueueSettings

    _server, url, client = own_redis
    QueueClient(client, QueueSettings(max_length=1)).submit(
        GenerationRequest(persona="sage", messages=[Message(role="user", content="first")]))
    args = ["ask", "sage", "hi", "--timeout", "2"] if command == "ask" else ["chat", "sage"]
    talking = _talking(tmp_path, url, *args, PERSONA_QUEUE__MAX_LENGTH="1")
    _stdout, stderr = talking.communicate("hi\n/quit\n" if command == "chat" else None, timeout=30)
    assert "Traceback" not in stderr, stderr
    assert "the queue is full: persona:q:chat holds 1 request" in stderr, stderr
    assert "waits in the queue" not in stderr and "no worker is running yet" not in stderr
    assert client.xlen(keys.STREAM_INTERACTIVE) == 1


def test_chat_takes_asks_sampling_options_and_timeout_for_every_message(tmp_path, settings, redis_client):
    """`persona chat` had none of `ask`'s --temperature, --max-new-tokens, --seed or --timeout."""
    from tests.fakes.scripted_worker import scripted_worker

    with scripted_worker(settings, lambda request: "heard") as seen:
        result = _scripted_talk(tmp_path, settings, "chat", "sage", "--temperature", "0.3", "--max-new-tokens", "5",
                                "--seed", "7", "--timeout", "30", stdin="hi\nagain\n/quit\n")
        plain = _scripted_talk(tmp_path, settings, "chat", "sage", stdin="hi\n/quit\n")
    assert (result.returncode, plain.returncode) == (0, 0), result.stderr + plain.stderr
    [first, second, default] = seen
    for request in (first, second):
        assert (request.sampling.temperature, request.sampling.max_new_tokens, request.sampling.seed) == (0.3, 5, 7)
        assert request.deadline - request.created_at == pytest.approx(30, abs=2)  # as `ask --timeout 30` gives it
    assert (default.sampling.temperature, default.sampling.max_new_tokens, default.sampling.seed) == (None, None, None)
    assert default.deadline - default.created_at == pytest.approx(settings.queue.default_deadline_s, abs=2)


def test_a_chat_message_past_its_timeout_names_chats_own_option(tmp_path, own_redis):
    from persona import heartbeat

    _server, url, client = own_redis
    heartbeat.publish(client, heartbeat.WorkerInfo(id="w-idle", state="serving"), ttl_s=30)  # live, and never takes it
    talking = _talking(tmp_path, url, "chat", "sage", "--timeout", "1")
    _stdout, stderr = talking.communicate("hi\n/quit\n", timeout=30)
    assert talking.returncode == 0 and "Traceback" not in stderr, stderr
    said = " ".join(stderr.split())
    assert "none took it before its deadline" in said and "give it longer (`persona chat --timeout SECONDS`" in said, said
