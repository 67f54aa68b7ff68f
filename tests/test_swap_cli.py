"""`persona swap`, `rollback`, `checkpoints` and `export` as an operator meets them when a swap
is stopped halfway or Redis is out of reach: real processes on a real Redis."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import redis

from persona import heartbeat
from persona import swap as swaps
from persona.errors import SwapRefused
from persona.personas import PersonaRegistry
from tests.conftest import free_port
from tests.fakes.checkpoints import make_checkpoint
from tests.test_queue_talk import AS_IN_A_TERMINAL
from tests.test_swap import tiny  # noqa: F401 - a fixture: the persona "tiny" on the tiny Llama


def _env(settings, redis_url: str, personas_dir: Path) -> dict[str, str]:
    """The environment `persona` runs in here: the test's data, Redis and personas."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PERSONA_")}
    return env | {"PERSONA_DATA_DIR": str(settings.data_dir), "PERSONA_REDIS_URL": redis_url,
                  "PERSONA_PERSONAS_DIRS": json.dumps([str(personas_dir)]), "COLUMNS": "200",
                  "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}


def _start(env: dict[str, str], *args: str) -> subprocess.Popen:
    """`persona ARGS...` started as in a terminal (Ctrl-C raises KeyboardInterrupt)."""
    return subprocess.Popen([sys.executable, "-c", AS_IN_A_TERMINAL, *args], env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def _run(env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "persona", *args], env=env, capture_output=True, text=True,
                          timeout=120, check=False)


def _a_worker_that_never_answers(client: redis.Redis) -> None:
    """A live worker serving tiny that does not vote: the swap waits for it (until --timeout)."""
    heartbeat.publish(client, heartbeat.WorkerInfo(id="w-silent", personas={"tiny": "base"}, state="serving"), ttl_s=120)


def _waiting_for_votes(client: redis.Redis, timeout_s: float = 60.0) -> swaps.SwapProposal:
    deadline = time.monotonic() + timeout_s
    while not (opened := swaps.open_proposals(client)):
        assert time.monotonic() < deadline, "the swap never opened its proposal"
        time.sleep(0.05)
    return opened[0]


@pytest.mark.parametrize(("command", "stop_signal", "status", "json_output"), [
    ("swap", signal.SIGTERM, 143, False),
    ("swap", signal.SIGHUP, 129, True),
    ("swap", signal.SIGINT, 130, True),
    ("rollback", signal.SIGTERM, 143, True),
    ("rollback", signal.SIGINT, 130, False),
])
def test_a_swap_or_rollback_stopped_while_it_waits_is_withdrawn_and_says_nothing_changed(
    settings, redis_url, redis_client, tiny, tiny_llama_dir, personas_dir,  # noqa: F811
    command, stop_signal, status, json_output,
):
    """`kill` (SIGTERM) or a closed terminal (SIGHUP) ended the command without a word and left
    its proposal open: every later swap of the persona was refused "already under way" until
    the --timeout (300 s) ran out, the workers holding the new weights meanwhile. Ctrl-C
    withdrew it, but said nothing either, and printed no JSON under --json. Then it said
    so, but named the proposal it withdrew as "" (its id, plain and under --json)."""
    make_checkpoint(settings, tiny_llama_dir, "tiny", seed=1)
    if command == "rollback":  # tiny serves v1, swapped from base
        assert swaps.swap_persona(redis_client, tiny, "v1", timeout_s=10).committed
    serving = swaps.current_version(redis_client, tiny)
    _a_worker_that_never_answers(redis_client)
    args = ["swap", "tiny", "v1"] if command == "swap" else ["rollback", "tiny"]
    running = _start(_env(settings, redis_url, personas_dir), *args, *(["--json"] if json_output else []))
    opened = _waiting_for_votes(redis_client)
    running.send_signal(stop_signal)
    stdout, stderr = running.communicate(timeout=30)

    assert running.returncode == status and "Traceback" not in stderr, stderr
    assert swaps.open_proposals(redis_client) == [], "the next swap of tiny would be refused"
    assert swaps.current_version(redis_client, tiny) == serving
    how = {signal.SIGINT: "Ctrl-C"}.get(stop_signal, stop_signal.name)
    said = f"stopped ({how}) and withdrawn; nothing changed: 'tiny' keeps {serving}"
    if json_output:
        outcome = json.loads(stdout)
        assert outcome["committed"] is False and said in outcome["problem"] and stderr == ""
        assert outcome["ok"] is False and outcome["error"] == {"kind": "SwapRefused", "message": outcome["problem"]}
        assert outcome["proposal"]["kind"] == command and outcome["proposal"]["previous"] == serving
        assert outcome["proposal"]["id"] == opened.id and outcome["proposal"]["workers"] == ["w-silent"]
        assert f"(proposal {opened.id}) stopped" in outcome["problem"]
    else:
        assert said in stderr and stdout == ""
        assert f"(proposal {opened.id}) stopped" in stderr, stderr


@pytest.mark.parametrize("json_output", [False, True])
def test_a_swap_stopped_before_its_proposal_was_made_says_so_and_names_no_proposal(
    redis_client, tiny, json_output, capsys,  # noqa: F811
):
    """Stopped while this machine still checked the weights (no proposal opened yet), a swap
    said "stopped and withdrawn", and its --json outcome named a proposal whose id was ""."""
    import typer

    from persona.cli.checkpoints_cmd import _Command, _draft, _stop_reported

    command = _Command(_draft("tiny", "v1", "swap"), timeout_s=300, client=redis_client)
    command.draft.previous = "base"
    with pytest.raises(typer.Exit), _stop_reported(json_output, command):
        raise KeyboardInterrupt  # Ctrl-C
    stdout, stderr = capsys.readouterr()
    said = "swap of 'tiny' to 'v1' stopped (Ctrl-C) before a proposal was made, so no worker was asked; nothing changed"
    if json_output:
        outcome = json.loads(stdout)
        assert "id" not in outcome["proposal"] and outcome["committed"] is False
        assert outcome["problem"].startswith(said) and outcome["error"]["kind"] == "SwapRefused"
    else:
        assert said in " ".join(stderr.split()) and "withdrawn" not in stderr


def test_every_swap_and_rollback_json_outcome_says_ok_and_a_refusal_its_error_as_every_command_does(
    settings, redis_url, redis_client, tiny, personas_dir,  # noqa: F811
):
    """A refused `swap --json` or `rollback --json` printed its outcome with neither "ok" nor
    "error", while a bad option of the same command printed {"ok": false, "error": ...}: a
    script that read "ok", as README promises of every --json failure, saw no failure."""
    env = _env(settings, redis_url, personas_dir)
    refusals = {
        ("swap", "tny", "v1"): "UnknownPersona",
        ("rollback", "tny"): "UnknownPersona",
        ("rollback", "tiny"): "SwapRefused",  # never swapped: nothing to return to
        ("swap", "tiny", "v9"): "ModelError",  # no such version, and no worker that might hold it
    }
    for args, kind in refusals.items():
        refused = _run(env, *args, "--json")
        outcome = json.loads(refused.stdout)
        assert (refused.returncode, outcome["ok"], outcome["committed"]) == (1, False, False), refused.stdout
        assert outcome["error"] == {"kind": kind, "message": outcome["problem"]} and outcome["problem"], outcome
        assert "id" not in outcome["proposal"], outcome  # refused before a proposal: it had the id ""
    assert "Did you mean 'tiny'?" in json.loads(_run(env, "rollback", "tny", "--json").stdout)["error"]["message"]

    down = _run(_env(settings, f"redis://127.0.0.1:{free_port()}/0", personas_dir), "swap", "tiny", "v1", "--json")
    outcome = json.loads(down.stdout)
    assert (down.returncode, outcome["ok"], outcome["error"]["kind"]) == (1, False, "RedisUnavailable"), down.stdout
    assert outcome["error"]["message"] == outcome["problem"] and "Redis" in outcome["problem"]

    unchanged = _run(env, "swap", "tiny", "base", "--json")  # it serves base already: nothing to do, a success
    outcome = json.loads(unchanged.stdout)
    assert (unchanged.returncode, outcome["ok"], outcome["committed"], outcome["unchanged"]) == (0, True, True, True)
    assert "error" not in outcome and "id" not in outcome["proposal"]


def test_a_swap_under_way_says_when_it_lapses(redis_client, tiny):  # noqa: F811
    """"already under way ... wait for it to finish" gave no end: a swap whose command was
    killed stays open until its deadline, and the operator could not tell how long that was."""
    swaps.open_proposal(redis_client, swaps.SwapProposal(persona="tiny", target="v1", previous="base", by="alice@ops"),
                        timeout_s=120)
    with pytest.raises(SwapRefused) as refused:
        swaps.swap_persona(redis_client, tiny, "v2", timeout_s=5)
    said = str(refused.value)
    assert "to 'v1' by alice@ops is already under way" in said
    lapses = re.search(r"at the latest when it lapses in (\d+) s \((\d\d:\d\d:\d\d)\)", said)
    assert lapses is not None, said
    assert 115 <= int(lapses[1]) <= 120


def test_a_swap_stopped_with_redis_gone_says_so_at_once(settings, own_redis, tiny, tiny_llama_dir,  # noqa: F811
                                                        personas_dir):
    """Stopped after Redis went away, the command spent seconds in reconnects trying to withdraw
    its proposal, then ended on that error (exit 1) instead of the stop."""
    server, url, client = own_redis
    make_checkpoint(settings, tiny_llama_dir, "tiny", seed=1)
    _a_worker_that_never_answers(client)
    running = _start(_env(settings, url, personas_dir), "swap", "tiny", "v1")
    _waiting_for_votes(client)
    server.stop()
    stopped = time.monotonic()
    running.send_signal(signal.SIGTERM)
    _stdout, stderr = running.communicate(timeout=30)
    assert time.monotonic() - stopped < 6.0
    assert running.returncode == 143 and "Traceback" not in stderr, stderr
    assert "stopped (SIGTERM); nothing changed ('tiny' keeps base), but Redis cannot be reached" in stderr, stderr
    assert "may be refused until it lapses, within 300 s" in stderr


def test_checkpoints_lists_the_versions_on_disk_with_redis_down(settings, redis_url, tiny, tiny_llama_dir,  # noqa: F811
                                                                personas_dir):
    """With Redis down, `persona checkpoints` listed nothing ("cannot reach Redis"), though the
    versions, their metrics and any unfinished run are on disk: now only which one is active
    (and the swap history) is unknown, and it says why."""
    make_checkpoint(settings, tiny_llama_dir, "tiny", seed=1)
    make_checkpoint(settings, tiny_llama_dir, "tiny", seed=2)
    env = _env(settings, f"redis://127.0.0.1:{free_port()}/0", personas_dir)

    table = _run(env, "checkpoints", "tiny")
    assert table.returncode == 0, table.stderr
    assert "checkpoints (active: unknown)" in table.stdout and "eval_loss=1.1" in table.stdout
    assert "eval_loss=1.2" in table.stdout and "*" not in table.stdout
    [why] = table.stderr.splitlines()
    assert why.startswith("which version is active, and what a rollback returns to, is unknown: cannot reach Redis")
    listed = _run(env, "checkpoints", "tiny", "--json")
    assert listed.returncode == 0 and listed.stderr == "", listed.stderr
    data = json.loads(listed.stdout)
    assert data["active"] is None and data["swaps"] is None and data["rollback_to"] is None
    assert [(v["version"], v["active"]) for v in data["versions"]] == [("v1", None), ("v2", None)]
    assert data["note"].startswith("cannot reach Redis")


def test_checkpoints_json_with_redis_up_has_no_note(settings, redis_url, redis_client, tiny, personas_dir):  # noqa: F811
    data = json.loads(_run(_env(settings, redis_url, personas_dir), "checkpoints", "tiny", "--json").stdout)
    assert data["active"] == "base" and data["note"] is None and data["swaps"] == []


@pytest.mark.slow
def test_export_without_checkpoint_exports_the_version_the_persona_serves(
    settings, redis_url, redis_client, tiny, tiny_llama_dir, personas_dir, tmp_path,  # noqa: F811
):
    """Swapped to v1, a persona whose file names no checkpoint was refused by `persona export`:
    "has no fine-tuned checkpoint to export; train one": it read only the persona file."""
    make_checkpoint(settings, tiny_llama_dir, "tiny", seed=1)
    make_checkpoint(settings, tiny_llama_dir, "tiny", seed=2)
    assert swaps.swap_persona(redis_client, tiny, "v1", timeout_s=10).committed
    env = _env(settings, redis_url, personas_dir)

    exported = _run(env, "export", "tiny", "-o", str(tmp_path / "m"))
    assert exported.returncode == 0, exported.stderr
    assert "tiny serves v1 now (swapped to it): exporting v1" in exported.stderr
    assert "# Tiny (tiny v1)" in (tmp_path / "m" / "README.md").read_text()

    assert swaps.swap_persona(redis_client, tiny, "base", timeout_s=10).committed
    on_base = _run(env, "export", "tiny", "-o", str(tmp_path / "b"))
    assert on_base.returncode == 1 and "'tiny' serves its base model now (swapped to base)" in on_base.stderr
    assert "--checkpoint" in on_base.stderr and not (tmp_path / "b").exists()


@pytest.mark.slow
def test_export_with_redis_down_exports_the_persona_files_checkpoint_and_says_so(
    settings, write_persona, tiny_llama_dir, personas_dir, tmp_path,
):
    make_checkpoint(settings, tiny_llama_dir, "tiny", seed=1)
    make_checkpoint(settings, tiny_llama_dir, "tiny", seed=2)
    write_persona("tiny", base=str(tiny_llama_dir), model={"checkpoint": "v2"})
    env = _env(settings, f"redis://127.0.0.1:{free_port()}/0", personas_dir)

    exported = _run(env, "export", "tiny", "-o", str(tmp_path / "m"))
    assert exported.returncode == 0, exported.stderr
    assert "cannot tell which version tiny serves now, so exporting its persona file's checkpoint, v2" in exported.stderr
    assert "# Tiny (tiny v2)" in (tmp_path / "m" / "README.md").read_text()

    write_persona("tiny", base=str(tiny_llama_dir))  # no checkpoint in the file either
    refused = _run(env, "export", "tiny", "-o", str(tmp_path / "n"))
    assert refused.returncode == 1 and "its persona file names no checkpoint; name one with --checkpoint" in refused.stderr


@pytest.mark.slow
def test_eval_without_checkpoint_measures_the_version_the_persona_serves(
    settings, redis_url, redis_client, write_persona, tiny_llama_dir, personas_dir, tmp_path,
):
    """Swapped to v2 while its file still named v1 (`persona train` no longer rewrites it),
    `persona eval` measured v1: the file's version, not the one the workers serve."""
    make_checkpoint(settings, tiny_llama_dir, "tiny", seed=1)
    make_checkpoint(settings, tiny_llama_dir, "tiny", seed=2)
    write_persona("tiny", base=str(tiny_llama_dir), model={"checkpoint": "v1"})
    file_v1 = PersonaRegistry.from_settings(settings).get("tiny")
    assert swaps.swap_persona(redis_client, file_v1, "v2", timeout_s=10).committed
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": text, "split": split}) + "\n" for text, split in [
        ("A calm mind is a well-kept garden.", "train"), ("Patience is the art of hoping slowly.", "validation")]))
    env = _env(settings, redis_url, personas_dir)

    measured = _run(env, "eval", "tiny", "--corpus", str(corpus), "--json", "--samples", "1")
    assert measured.returncode == 0, measured.stderr
    assert json.loads(measured.stdout)["version"] == "v2"  # stdout: the report alone
    assert "tiny serves v2 now (swapped to it): measuring v2" in measured.stderr

    assert swaps.swap_persona(redis_client, file_v1, "base", timeout_s=10).committed
    on_base = _run(env, "eval", "tiny", "--corpus", str(corpus), "--samples", "1")
    assert on_base.returncode == 0, on_base.stderr
    assert "tiny serves its base model now (swapped to base): measuring the base model" in on_base.stderr
    assert "of the base model, which tiny serves now" in " ".join(on_base.stdout.split())


@pytest.mark.slow
def test_eval_with_redis_down_measures_the_persona_files_choice_and_says_so(
    settings, write_persona, tiny_llama_dir, personas_dir, tmp_path,
):
    make_checkpoint(settings, tiny_llama_dir, "tiny", seed=1)
    write_persona("tiny", base=str(tiny_llama_dir), model={"checkpoint": "v1"})
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": text, "split": split}) + "\n" for text, split in [
        ("A calm mind is a well-kept garden.", "train"), ("Patience is the art of hoping slowly.", "validation")]))
    env = _env(settings, f"redis://127.0.0.1:{free_port()}/0", personas_dir)

    measured = _run(env, "eval", "tiny", "--corpus", str(corpus), "--json", "--samples", "1")
    assert measured.returncode == 0, measured.stderr
    assert json.loads(measured.stdout)["version"] == "v1"
    said = " ".join(measured.stderr.split())
    assert "cannot tell which version tiny serves now, so measuring its persona file's checkpoint, v1" in said
