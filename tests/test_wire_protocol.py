"""A client in another language, as docs/wire-protocol.md tells it: raw XADD of the JSON, a
BLPOP of the reply list, no persona import on its side. A real worker on the tiny model answers."""

from __future__ import annotations

import json
import re
import time
import uuid
from pathlib import Path

import pytest

from persona import constants as keys
from persona.contract import (
    CONTRACT_VERSION,
    GenerationReply,
    GenerationRequest,
    SamplingOverrides,
)
from persona.dead_letters import list_dead
from persona.errors import QueueBusy

DOC = Path(__file__).resolve().parents[1] / "docs" / "wire-protocol.md"


def ask(text: str = "hello there", **fields) -> dict:
    """A request as a foreign client builds it: only what it needs, with an id of its own."""
    return {"id": "c-" + uuid.uuid4().hex[:12], "persona": "tiny", "messages": [{"role": "user", "content": text}],
            **fields}


def xadd(redis_client, payload: dict | str | bytes, **fields) -> None:
    """Queue a payload as a direct writer does: the JSON in field r, nothing else unless given."""
    body = json.dumps(payload) if isinstance(payload, dict) else payload
    redis_client.xadd(keys.STREAM_INTERACTIVE, {"r": body, **fields})


def reply_to(redis_client, request_id: str, timeout_s: float = 60) -> dict | None:
    """The reply, read as a foreign client reads it (BLPOP of its list, JSON); None if none came."""
    give_up = time.monotonic() + timeout_s
    while time.monotonic() < give_up:  # in slices: the test client's socket times out sooner
        if got := redis_client.blpop([keys.reply_key(request_id)], timeout=1):
            return json.loads(got[1])
    return None


def letters_once(redis_client, count: int, timeout_s: float = 30) -> list:
    """The dead letters, once there are ``count`` of them."""
    give_up = time.monotonic() + timeout_s
    while len(letters := list_dead(redis_client)) < count:
        assert time.monotonic() < give_up, f"{len(letters)} dead letters, {count} expected: {letters}"
        time.sleep(0.05)
    return letters


@pytest.fixture
def tiny_worker(write_persona, tiny_llama_dir, running_worker):
    """A worker that serves persona ``tiny`` (the tiny random Llama)."""
    write_persona("tiny", base=str(tiny_llama_dir))
    return running_worker


def test_a_request_without_an_id_is_set_aside_not_answered_into_a_list_nobody_reads(redis_client, tiny_worker):
    """It was generated and its reply pushed to persona:reply:<a uuid the worker made up>."""
    anonymous = ask()
    del anonymous["id"]
    xadd(redis_client, anonymous)
    tiny_worker()

    [letter] = letters_once(redis_client, 1)
    assert "no id" in letter.reason and '"id"' in letter.reason
    assert redis_client.keys(keys.REPLY_KEY_PREFIX + "*") == []
    assert int(redis_client.hget(keys.STATS_KEY, "failed:unanswerable")) == 1
    # What a client generates its code from says so; Python code may still leave it to the default.
    assert "id" in GenerationRequest.model_json_schema()["required"]
    assert GenerationRequest(persona="tiny").id


def test_half_an_emoji_cut_by_a_json_encoder_is_answered(redis_client, tiny_worker):
    """JSON.stringify('🍕'.slice(0, 1)) and json.dumps write "\\ud83c": refused "Invalid JSON"."""
    request = ask("I love pizza \ud83c")
    payload = json.dumps(request)
    assert "\\ud83c" in payload
    xadd(redis_client, payload)
    tiny_worker()

    reply = reply_to(redis_client, request["id"])
    assert reply["ok"], reply["error"]
    assert GenerationRequest.from_json(payload).messages[0].content == "I love pizza \ufffd"
    assert list_dead(redis_client) == []


def test_a_deadline_left_at_0_or_out_is_the_queues_default_from_arrival(settings, redis_client, tiny_worker):
    """A direct writer's request without a deadline never expired, and kept its answered mark a day."""
    settings.queue.default_deadline_s = 1.0
    zero, absent, explicit = ask(deadline=0), ask(), ask(created_at=time.time(), deadline=time.time() + 1)
    for request in (zero, absent, explicit):
        xadd(redis_client, request)
    time.sleep(1.5)  # no worker yet: each waits past its deadline
    tiny_worker()

    for request in (zero, absent, explicit):
        reply = reply_to(redis_client, request["id"])
        assert reply["error"]["kind"] == "timeout", reply
        # Its mark lasts the reply's TTL (a minute past its deadline, had that been later), not a day.
        assert 0 < redis_client.ttl(keys.answered_key(request["id"])) <= settings.queue.reply_ttl_s


@pytest.mark.parametrize("deadline", ["NaN", "Infinity", "-Infinity", "30"])
def test_a_deadline_that_is_not_a_time_is_refused_as_invalid(redis_client, tiny_worker, deadline):
    """NaN and Infinity never expired; 30 (meant as 30 s) was answered "waited past its
    deadline; please ask again", and asking again did the same."""
    request = ask()
    xadd(redis_client, json.dumps(request)[:-1] + f', "deadline": {deadline}}}')
    tiny_worker()

    reply = reply_to(redis_client, request["id"])
    assert reply["error"]["kind"] == "invalid", reply
    assert "deadline" in reply["error"]["message"] and "seconds" in reply["error"]["message"]
    if deadline == "30":
        assert "is not a time: it is in epoch seconds" in reply["error"]["message"]
        assert "Unix time in seconds" in reply["error"]["message"]


@pytest.mark.parametrize("payload", [
    b'{"id":"not-utf8","persona":"tiny","messages":[{"role":"user","content":"caf\xe9"}]}',
    b'{"id":"cut-short","persona":"tiny",',
    b'{"id": "spaced-out", "persona": "tiny", "messa',  # as json.dumps writes it, cut short
])
def test_a_malformed_entry_whose_id_is_readable_is_answered_invalid(redis_client, tiny_worker, payload):
    """Its caller heard nothing, and waited to its own timeout; the payload was set aside."""
    request_id = re.match(rb'{"id": ?"([^"]+)"', payload)[1].decode()
    xadd(redis_client, payload)
    tiny_worker()

    reply = reply_to(redis_client, request_id)
    assert reply is not None and reply["error"]["kind"] == "invalid", reply
    assert "malformed request" in reply["error"]["message"]
    [letter] = letters_once(redis_client, 1)
    assert letter.payload == payload.decode(errors="replace")


def test_the_worker_reads_a_malformed_entrys_id_wherever_the_queues_scripts_do(redis_client):
    """``REQUEST_ID`` (the scripts' reading of an entry's id) and the worker's agree: an id the
    scripts can find (a withdrawn request's, a held one's) is one the worker answers."""
    from persona.jobs import Job
    from persona.queue_scripts import REQUEST_ID

    payloads = [
        b'{"id":"cut-short","persona":"tiny",', b'{"id":"bad-byte","content":"caf\xe9"}', b'{"persona":"tiny","id":"second"}',
        b'{"persona":"tiny","id":"second-cut', b'{"id":"with space","persona"', b'not json', b'',
        b'{"id": "spaced", "persona": "ti',
    ]
    for payload in payloads:
        by_script = redis_client.eval(REQUEST_ID + "return request_id(ARGV[1])", 0, payload)
        by_worker = Job.parse(keys.STREAM_INTERACTIVE, b"1-0", {b"r": payload}).request_id
        assert by_script is None or by_script.decode() == by_worker, payload
    assert by_worker == "spaced"  # the spaces json.dumps writes: the worker reads it, the script does not


def test_unknown_top_level_fields_and_newer_versions_are_refused_naming_them(redis_client, tiny_worker):
    """"temperature" at the top level was ignored (the persona's default served), and a
    request of a contract this worker does not know was served as if it knew it."""
    misplaced = ask(temperature=0.1, max_tokens=3)
    newer = ask(version=CONTRACT_VERSION + 1, stream=True)
    current = ask(version=CONTRACT_VERSION)
    for request in (misplaced, newer, current):
        xadd(redis_client, request)
    tiny_worker()

    said = reply_to(redis_client, misplaced["id"])["error"]["message"]
    assert "unknown fields 'max_tokens' (did you mean 'sampling.max_new_tokens'?)" in said
    assert "'temperature' (did you mean 'sampling.temperature'?)" in said
    said = reply_to(redis_client, newer["id"])["error"]["message"]
    assert f"this worker speaks contract version {CONTRACT_VERSION}; upgrade it" in said
    assert reply_to(redis_client, current["id"])["ok"]


def test_what_python_clients_send_is_a_request_of_the_current_contract():
    """Every field a Python client writes is one the worker knows; the reply's fields are as they were."""
    sent = json.loads(GenerationRequest(persona="tiny", sampling=SamplingOverrides(temperature=0.5)).to_json())
    assert set(sent) == set(GenerationRequest.model_fields) and sent["version"] == CONTRACT_VERSION
    assert "version" not in SamplingOverrides.model_fields
    assert set(GenerationReply.model_fields) == {
        "id", "ok", "text", "error", "persona", "version", "worker", "finish_reason", "new_tokens", "timings",
        "message_chars",
    }


def _doc_table(heading: str) -> dict[str, str]:
    """The rows of the table under a heading of the wire-protocol document, by the field each names."""
    section = re.split(rf"^#+ {heading}$", DOC.read_text(), maxsplit=1, flags=re.MULTILINE)[1]
    section = re.split(r"^#", section, maxsplit=1, flags=re.MULTILINE)[0]
    return {m[1]: m[0] for m in re.finditer(r"^\| `([a-z_]+)` \|.*$", section, re.MULTILINE)}


def test_the_wire_protocol_document_names_every_field_of_the_contract():
    """A client written from the document alone sends and reads exactly the contract's fields."""
    assert set(_doc_table("Request")) == set(GenerationRequest.model_fields)
    assert set(_doc_table("Sampling")) == set(SamplingOverrides.model_fields)
    assert set(_doc_table("Reply")) == set(GenerationReply.model_fields)
    assert "required" in _doc_table("Request")["id"] and "required" in _doc_table("Request")["persona"]
    assert f"`{CONTRACT_VERSION}`" in _doc_table("Request")["version"]


def test_a_full_queue_counts_a_direct_write_past_the_default_deadline_as_past_it(settings, client, redis_client):
    """It names no deadline: the refusal's look (FULL_SCRIPT) was given no default deadline
    to time it by, and counted it as waiting for good."""
    settings.queue.max_length, settings.queue.default_deadline_s = 1, 5.0
    arrived_ms = int((time.time() - 10) * 1000)  # 10 s ago: past the 5 s default, far inside the 120 s one
    redis_client.xadd(keys.STREAM_INTERACTIVE, {"r": json.dumps(ask())}, id=f"{arrived_ms}-0")
    with pytest.raises(QueueBusy, match=r"holds 1 request .*: 1 past their deadline; no worker is running"):
        client.submit(GenerationRequest.from_json(json.dumps(ask())))
