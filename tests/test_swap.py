"""Live checkpoint swaps: all or nothing across real workers, broken checkpoints refused."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import redis

from persona import constants as keys
from persona import swap as swaps
from persona.checkpoints import CheckpointInfo, register_checkpoint
from persona.cli.checkpoints_cmd import perform_swap
from persona.contract import GenerationRequest, Message, SamplingOverrides
from persona.heartbeat import live_worker_ids, live_workers
from persona.personas import PersonaRegistry
from persona.queue import QueueClient
from tests.fakes.checkpoints import make_checkpoint


def chat(persona: str = "tiny", **kwargs) -> GenerationRequest:
    return GenerationRequest(persona=persona, messages=[Message(role="user", content="hi")],
                             sampling=SamplingOverrides(max_new_tokens=2), **kwargs)


@pytest.fixture
def tiny(write_persona, tiny_llama_dir, settings):
    write_persona("tiny", base=str(tiny_llama_dir))
    return PersonaRegistry.from_settings(settings).get("tiny")


def wait_until(predicate, timeout: float = 30.0) -> None:
    deadline = time.time() + timeout
    while not predicate():
        assert time.time() < deadline, "condition not met in time"
        time.sleep(0.05)


def persona_keys(worker) -> list:
    return list(worker.pool.loaded_keys())


def test_swap_then_rollback_on_a_live_worker(settings, redis_client, tiny, tiny_llama_dir, running_worker, client):
    v1 = make_checkpoint(settings, tiny_llama_dir, "tiny", seed=1)
    worker = running_worker("w-one")
    assert client.ask(chat(), timeout=60).version == "base"

    outcome = perform_swap(settings, redis_client, tiny, "v1", timeout_s=60)
    assert outcome.committed, outcome.problem
    assert outcome.votes["w-one"].ready
    assert client.ask(chat(), timeout=60).version == "v1"
    assert swaps.active_versions(redis_client) == {"tiny": "v1"}
    # the base weights were freed once v1 took over: one set of weights in memory
    wait_until(lambda: persona_keys(worker) == [(str(tiny_llama_dir), str(v1.path))])

    outcome = perform_swap(settings, redis_client, tiny, "base", kind="rollback", timeout_s=60)
    assert outcome.committed
    assert client.ask(chat(), timeout=60).version == "base"
    assert swaps.version_history(redis_client, "tiny") == []
    wait_until(lambda: persona_keys(worker) == [(str(tiny_llama_dir), "base")])


def test_a_version_whose_folder_was_removed_can_be_rolled_back_away_from(
    settings, redis_client, tiny, tiny_llama_dir, running_worker, client
):
    make_checkpoint(settings, tiny_llama_dir, "tiny", seed=1)
    v2 = make_checkpoint(settings, tiny_llama_dir, "tiny", seed=2)
    settings.worker.engine = "eager"  # no GGUF written for llama.cpp: seconds faster
    running_worker("w-one", preload=["tiny"])
    assert perform_swap(settings, redis_client, tiny, "v1", timeout_s=60).committed
    assert perform_swap(settings, redis_client, tiny, "v2", timeout_s=60).committed
    shutil.rmtree(v2.path)  # a disk clean-up; the worker still holds v2's weights
    assert client.ask(chat(), timeout=60).version == "v2"

    outcome = perform_swap(settings, redis_client, tiny, swaps.rollback_target(redis_client, "tiny"),
                           kind="rollback", timeout_s=60)
    assert outcome.committed, outcome.problem
    assert client.ask(chat(), timeout=60).version == "v1"


def test_swap_with_no_workers_away_from_a_removed_version(settings, redis_client, tiny, tiny_llama_dir):
    settings.worker.engine = "eager"  # checked here, with no GGUF written for llama.cpp: seconds faster
    v1 = make_checkpoint(settings, tiny_llama_dir, "tiny", seed=1)
    assert perform_swap(settings, redis_client, tiny, "v1", timeout_s=10).committed
    shutil.rmtree(v1.path)
    # Checked here with nothing to compare against: v1 cannot load, and need not.
    assert perform_swap(settings, redis_client, tiny, "base", timeout_s=10).committed
    assert swaps.active_versions(redis_client) == {"tiny": "base"}


@pytest.mark.parametrize(
    ("broken", "named"),
    [
        ({"corrupt": True}, "its model.safetensors is unreadable"),
        ({"hidden": 64}, "wrong shapes"),
        ({"nan": True}, "NaN or infinite logits"),
        ({"base": "/somewhere/else"}, "wrong base"),
    ],
)
def test_broken_checkpoint_is_refused_and_the_old_one_keeps_serving(
    settings, redis_client, tiny, tiny_llama_dir, running_worker, client, broken, named
):
    make_checkpoint(settings, tiny_llama_dir, "tiny", seed=3, **broken)
    worker = running_worker("w-one")
    assert client.ask(chat(), timeout=60).ok
    if "base" in broken or "corrupt" in broken:  # refused by the operator's own machine, before any worker is asked
        from persona.errors import SwapRefused

        with pytest.raises(SwapRefused, match=named):
            perform_swap(settings, redis_client, tiny, "v1", timeout_s=60)
    else:
        outcome = perform_swap(settings, redis_client, tiny, "v1", timeout_s=60)
        assert not outcome.committed
        assert named in outcome.votes["w-one"].reason and "w-one" in outcome.problem
    assert swaps.active_versions(redis_client) == {}
    assert swaps.open_proposals(redis_client) == []
    reply = client.ask(chat(), timeout=60)
    assert reply.ok and reply.version == "base"
    wait_until(lambda: persona_keys(worker) == [(str(tiny_llama_dir), "base")])


def test_all_or_nothing_when_one_of_two_workers_refuses(
    settings, redis_client, tiny, tiny_llama_dir, running_worker, client
):
    """Worker B's disk holds a damaged copy of v1: neither worker switches."""
    make_checkpoint(settings, tiny_llama_dir, "tiny", seed=1)
    other = settings.model_copy(update={"data_dir": settings.data_dir.parent / "machine-b"})
    shutil.copytree(settings.data_dir, other.data_dir, symlinks=True)
    damaged = other.checkpoints_dir / "tiny" / "v1" / "model.safetensors"
    damaged.write_bytes(b"\0" * 64)

    from persona.pool import ModelPool
    from persona.worker import Worker

    settings.worker.engine = other.worker.engine = "eager"
    a = running_worker("w-a", preload=["tiny"])
    b = Worker(other, redis.Redis.from_url(settings.redis_url.get_secret_value()), ModelPool(other, "cpu"), worker_id="w-b")
    b.preload(["tiny"])
    thread = threading.Thread(target=b.run, daemon=True)
    thread.start()
    try:
        wait_until(lambda: len(live_workers(redis_client)) == 2)
        outcome = perform_swap(settings, redis_client, tiny, "v1", timeout_s=60)
        assert not outcome.committed
        # the first refusal ends the swap; w-a may not have answered by then
        assert "w-a" not in outcome.votes or outcome.votes["w-a"].ready
        assert not outcome.votes["w-b"].ready
        reason = outcome.votes["w-b"].reason
        assert "model.safetensors is unreadable" in reason and "machine-b" in reason and "copy the whole folder" in reason
        assert "worker w-b" in outcome.problem and "nothing changed" in outcome.problem
        assert swaps.active_versions(redis_client) == {}
        versions = {client.ask(chat(), timeout=60).version for _ in range(6)}
        assert versions == {"base"}
        # the worker that was ready frees the candidate once the proposal is withdrawn
        wait_until(lambda: all(k[1] == "base" for k in persona_keys(a)))
    finally:
        b.stop()
        thread.join(timeout=30)


def _active_at(log: list[dict[str, str]], moment: float) -> tuple[str, float]:
    """The version active at ``moment`` and how close the nearest flip was."""
    version, nearest = "base", float("inf")
    for entry in sorted(log, key=lambda e: float(e["at"])):
        at = float(entry["at"])
        nearest = min(nearest, abs(at - moment))
        if at <= moment:
            version = entry["version"]
    return version, nearest


def test_swap_back_and_forth_under_load_fails_nothing(
    settings, redis_client, tiny, tiny_llama_dir, running_worker, client
):
    make_checkpoint(settings, tiny_llama_dir, "tiny", seed=1)
    make_checkpoint(settings, tiny_llama_dir, "tiny", seed=2)
    settings.worker.max_batch = 4
    settings.worker.engine = "eager"  # no GGUF written for llama.cpp: seconds faster
    running_worker("w-a", preload=["tiny"])
    running_worker("w-b", preload=["tiny"])
    stop = threading.Event()
    sent: list[GenerationRequest] = []

    def load() -> None:
        feeder = QueueClient(redis.Redis.from_url(settings.redis_url.get_secret_value()), settings.queue)
        while not stop.is_set():
            sent.append(feeder.submit(chat()))
            time.sleep(0.01)

    feeder = threading.Thread(target=load, daemon=True)
    feeder.start()
    try:
        for target in ("v1", "v2", "v1", "base", "v2"):
            time.sleep(0.3)
            outcome = perform_swap(settings, redis_client, tiny, target, timeout_s=60)
            assert outcome.committed, outcome.problem
    finally:
        stop.set()
        feeder.join()
    replies = [client.wait(r, timeout=60) for r in sent]
    assert len(replies) > 50
    assert [r for r in replies if not r.ok] == []
    log = swaps.swap_log(redis_client)
    assert [e["version"] for e in reversed(log)] == ["v1", "v2", "v1", "base", "v2"]
    mismatched = []
    for request, reply in zip(sent, replies, strict=True):
        claimed = request.created_at + reply.timings.queue_ms / 1000
        expected, nearest = _active_at(log, claimed)
        # the version is read just after the claim; a flip within that instant is ambiguous
        if reply.version != expected and nearest > 0.05:
            mismatched.append((reply.version, expected, nearest))
    assert mismatched == []
    assert {r.version for r in replies} == {"base", "v1", "v2"}


def test_swap_with_no_workers_checks_locally_and_flips(settings, redis_client, tiny, tiny_llama_dir):
    settings.worker.engine = "eager"  # checked here, with no GGUF written for llama.cpp: seconds faster
    make_checkpoint(settings, tiny_llama_dir, "tiny", seed=1)
    make_checkpoint(settings, tiny_llama_dir, "tiny", seed=2, hidden=64)
    assert perform_swap(settings, redis_client, tiny, "v1", timeout_s=10).committed
    folder = str(settings.checkpoints_dir / "tiny" / "v1")
    assert perform_swap(settings, redis_client, tiny, folder, timeout_s=10).committed  # by path
    assert swaps.active_versions(redis_client) == {"tiny": folder}
    assert perform_swap(settings, redis_client, tiny, "v1", timeout_s=10).committed
    from persona.errors import SwapRefused

    with pytest.raises(SwapRefused, match="wrong shapes"):
        perform_swap(settings, redis_client, tiny, "v2", timeout_s=10)
    assert swaps.active_versions(redis_client) == {"tiny": "v1"}


@pytest.mark.parametrize(("name", "content", "said"), [
    ("checkpoint.json", "[1, 2]", r"cannot be read \(Input should be an object\)"),  # as `persona checkpoints` says
    ("config.json", '"llama"', "holds a JSON str, not an object"),
])
def test_a_checkpoint_file_that_is_json_but_no_object_is_refused(settings, redis_client, tiny, tiny_llama_dir, name,
                                                                 content, said):
    """Valid JSON of the wrong shape used to end `persona swap` in a traceback."""
    from persona.errors import SwapRefused

    v1 = make_checkpoint(settings, tiny_llama_dir, "tiny", seed=1)
    (v1.path / name).write_text(content)
    with pytest.raises(SwapRefused, match=f"{name} {said}; .*copy the whole folder again"):
        perform_swap(settings, redis_client, tiny, str(v1.path), timeout_s=10)
    assert swaps.active_versions(redis_client) == {}


def test_two_operators_rolling_back_at_once_go_back_one_version(redis_client, tiny):
    """Both read the version to go back to before either committed. The second used to
    'roll back' to where the first had just gone, and drop the version before it from
    the history, so a third rollback found nothing. (No live workers: each swap commits
    as soon as it is proposed.)"""
    assert swaps.swap_persona(redis_client, tiny, "v1", timeout_s=10).committed
    assert swaps.swap_persona(redis_client, tiny, "v2", timeout_s=10).committed
    first, second = swaps.rollback_target(redis_client, "tiny"), swaps.rollback_target(redis_client, "tiny")

    assert swaps.swap_persona(redis_client, tiny, first, kind="rollback", timeout_s=10).committed
    late = swaps.swap_persona(redis_client, tiny, second, kind="rollback", timeout_s=10)
    assert not late.committed
    assert "changed while" in late.problem and "serves v1" in late.problem and "nothing changed" in late.problem
    assert swaps.active_versions(redis_client) == {"tiny": "v1"}
    assert swaps.version_history(redis_client, "tiny") == ["base"]
    assert swaps.open_proposals(redis_client) == []


def test_a_swap_prepared_before_another_landed_is_withdrawn(redis_client, tiny):
    """The second operator's swap said it left base behind when v1 served by then: the
    history (and so the next rollback) skipped v1."""
    prepared = swaps.SwapProposal(persona="tiny", target="v2", previous=swaps.current_version(redis_client, tiny))
    assert swaps.swap_persona(redis_client, tiny, "v1", timeout_s=10).committed  # the other operator's

    late = swaps.run_swap(redis_client, prepared, timeout_s=10)
    assert not late.committed and "serves v1" in late.problem
    assert swaps.active_versions(redis_client) == {"tiny": "v1"}
    assert swaps.version_history(redis_client, "tiny") == ["base"]
    assert swaps.open_proposals(redis_client) == []



def open_swap_from_v1_to_v2(redis_client, workers: list[str]) -> swaps.SwapProposal:
    """A swap of "tiny", which serves v1, to v2, that ``workers`` must vote ready for."""
    redis_client.hset(keys.ACTIVE_VERSIONS_KEY, "tiny", "v1")
    proposal = swaps.SwapProposal(persona="tiny", target="v2", previous="v1", workers=workers, deadline=time.time() + 60)
    swaps.propose(redis_client, proposal)
    return proposal


# The commit re-checks, in the same step as the flip, what the swap read before it: a worker's
# refusal or missing vote, and another operator's swap landing meanwhile, leave v1 serving.
def test_the_commit_itself_refuses_a_worker_that_refused(redis_client):
    proposal = open_swap_from_v1_to_v2(redis_client, ["w1", "w2"])
    swaps.cast_vote(redis_client, proposal.id, swaps.Vote(worker="w1", ready=True))
    swaps.cast_vote(redis_client, proposal.id, swaps.Vote(worker="w2", ready=False, reason="cannot load the model"))
    assert swaps.commit(redis_client, proposal, ["w1", "w2"]) == "refused:w2"
    assert swaps.active_versions(redis_client) == {"tiny": "v1"} and swaps.version_history(redis_client, "tiny") == []


def test_the_commit_itself_refuses_a_worker_that_has_not_voted(redis_client):
    proposal = open_swap_from_v1_to_v2(redis_client, ["w1", "w2"])
    swaps.cast_vote(redis_client, proposal.id, swaps.Vote(worker="w1", ready=True))
    assert swaps.commit(redis_client, proposal, ["w1", "w2"]) == "missing:w2"
    assert swaps.active_versions(redis_client) == {"tiny": "v1"}
    swaps.cast_vote(redis_client, proposal.id, swaps.Vote(worker="w2", ready=True))
    assert swaps.commit(redis_client, proposal, ["w1", "w2"]) == "ok"  # once all are ready, it flips
    assert swaps.active_versions(redis_client) == {"tiny": "v2"} and swaps.version_history(redis_client, "tiny") == ["v1"]


def test_the_commit_itself_refuses_when_another_swap_landed_meanwhile(redis_client):
    proposal = open_swap_from_v1_to_v2(redis_client, ["w1"])
    swaps.cast_vote(redis_client, proposal.id, swaps.Vote(worker="w1", ready=True))
    redis_client.hset(keys.ACTIVE_VERSIONS_KEY, "tiny", "v9")  # another operator's swap to v9
    assert swaps.commit(redis_client, proposal, ["w1"]) == "moved:v9"
    assert swaps.active_versions(redis_client) == {"tiny": "v9"} and swaps.version_history(redis_client, "tiny") == []

@pytest.mark.slow
def test_checkpoints_swap_and_rollback_commands(settings, redis_url, redis_client, tiny, tiny_llama_dir, personas_dir):
    make_checkpoint(settings, tiny_llama_dir, "tiny", seed=1)
    make_checkpoint(settings, tiny_llama_dir, "tiny", seed=2, hidden=64)
    persona = _cli(settings, redis_url, personas_dir)

    listed = persona("checkpoints", "tiny", "--json")
    assert listed.returncode == 0, listed.stderr
    data = json.loads(listed.stdout)
    assert data["active"] == "base" and [v["version"] for v in data["versions"]] == ["v1", "v2"]
    assert data["versions"][0]["metrics"] == {"eval_loss": 1.1}
    swapped = persona("swap", "tiny", "v1")
    assert swapped.returncode == 0, swapped.stderr
    table = persona("checkpoints", "tiny")
    assert table.returncode == 0
    marked = [line for line in table.stdout.splitlines() if "*" in line]
    assert len(marked) == 1 and "v1" in marked[0]
    refused = persona("swap", "tiny", "v2")
    assert refused.returncode == 1 and "wrong shapes" in refused.stderr and "Traceback" not in refused.stderr
    back = persona("rollback", "tiny")
    assert back.returncode == 0, back.stderr
    assert "tiny now serves base" in back.stdout
    again = persona("rollback", "tiny")
    assert again.returncode == 1 and "no earlier version" in again.stderr
    no_wait = persona("swap", "tiny", "v1", "--timeout", "0")  # it used to lapse before any worker could answer
    assert no_wait.returncode == 2 and "--timeout" in no_wait.stderr


def test_checkpoints_lists_the_readable_versions_and_names_a_damaged_one(settings, redis_url, tiny, personas_dir):
    """A version folder whose checkpoint.json cannot be read used to stop the listing."""
    make_checkpoint(settings, Path(tiny.model.base), "tiny", seed=1)
    damaged = settings.checkpoints_dir / "tiny" / "v2"
    damaged.mkdir()
    (damaged / "checkpoint.json").write_text('{"persona": "tiny", "vers')
    persona = _cli(settings, redis_url, personas_dir)

    table = persona("checkpoints", "tiny")
    assert table.returncode == 0, table.stderr
    assert "v1" in table.stdout and "v2" in table.stdout and "checkpoint.json" in table.stdout
    listed = persona("checkpoints", "tiny", "--json")
    assert listed.returncode == 0, listed.stderr
    data = json.loads(listed.stdout)
    assert [v["version"] for v in data["versions"]] == ["v1"]
    [problem] = data["unreadable"]
    assert str(damaged) in problem and "checkpoint.json" in problem


def test_a_checkpoint_json_listed_as_unusable_is_refused_by_swap_in_the_same_words(
    settings, redis_url, redis_client, tiny, tiny_llama_dir, personas_dir
):
    """A checkpoint.json that is JSON but holds a wrong field was listed as unusable, while
    `persona swap` called "base": 5 a wrong base and swapped in a version of kind "qlora"."""
    for seed, wrong in ((1, {"base": 5}), (2, {"kind": "qlora"})):
        metadata = make_checkpoint(settings, tiny_llama_dir, "tiny", seed=seed).path / "checkpoint.json"
        metadata.write_text(json.dumps(json.loads(metadata.read_text()) | wrong))
    persona = _cli(settings, redis_url, personas_dir)

    listed = persona("checkpoints", "tiny", "--json")
    assert listed.returncode == 0, listed.stderr
    unusable = json.loads(listed.stdout)["unreadable"]
    assert "base: input should be a valid string, not 5" in unusable[0] and "kind: " in unusable[1], unusable
    for version, listed_as in zip(("v1", "v2"), unusable, strict=True):
        swapped = persona("swap", "tiny", version, "--json")
        assert swapped.returncode == 1, swapped.stdout
        assert json.loads(swapped.stdout)["problem"] == f"{listed_as}; 'tiny' keeps its current version"
    assert swaps.active_versions(redis_client) == {}


def test_checkpoints_says_what_a_rollback_returns_to_and_the_latest_swaps(
    settings, redis_url, redis_client, tiny, write_persona, personas_dir
):
    """The swap log and the rollback history were kept but shown nowhere: an operator could
    not tell what `persona rollback` would return to, or when the version serving now
    went live, until they had rolled back."""
    make_checkpoint(settings, Path(tiny.model.base), "tiny", seed=1)
    make_checkpoint(settings, Path(tiny.model.base), "tiny", seed=2)
    assert swaps.swap_persona(redis_client, tiny, "v1", timeout_s=10, by="alice@ops-laptop").committed  # no worker: nothing to ask
    assert swaps.swap_persona(redis_client, tiny, "v2", timeout_s=10).committed
    back = swaps.rollback_target(redis_client, "tiny")
    assert swaps.swap_persona(redis_client, tiny, back, kind="rollback", timeout_s=10).committed
    write_persona("other", base=tiny.model.base)
    other = PersonaRegistry.from_settings(settings).get("other")
    assert swaps.swap_persona(redis_client, other, "v9", timeout_s=10).committed  # another persona's: not listed
    persona = _cli(settings, redis_url, personas_dir)

    table = persona("checkpoints", "tiny")
    assert table.returncode == 0, table.stderr
    assert "`persona rollback tiny` returns to base" in table.stdout
    shown = [line.split()[2:] for line in table.stdout.split("latest swaps, newest first:")[1].splitlines() if line.strip()]
    me = swaps.operator_name()  # who made a swap: "who swapped this?" had no answer
    assert shown == [["rollback", "v2", "->", "v1", "by", me], ["swap", "v1", "->", "v2", "by", me],
                     ["swap", "base", "->", "v1", "by", "alice@ops-laptop"]]
    data = json.loads(persona("checkpoints", "tiny", "--json").stdout)
    assert data["rollback_to"] == "base" and [e["version"] for e in data["swaps"]] == ["v1", "v2", "v1"]
    assert [e["by"] for e in data["swaps"]] == [me, me, "alice@ops-laptop"]
    assert all(isinstance(e["at"], float) and e["at"] > 0 for e in data["swaps"])
    assert len(json.loads(persona("checkpoints", "tiny", "--json", "--history", "1").stdout)["swaps"]) == 1
    assert [e["version"] for e in json.loads(persona("checkpoints", "other", "--json").stdout)["swaps"]] == ["v9"]
    redis_client.delete(keys.version_history_key("tiny"))  # rolled back as far as it goes
    assert "rollback: nothing to return to" in persona("checkpoints", "tiny").stdout


def make_lora(settings, model_dir: Path, persona: str, recorded_base: Path, targets: list[str]) -> CheckpointInfo:
    """Register a small peft LoRA adapter trained (here: perturbed) on ``model_dir``."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(4)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(model_dir), LoraConfig(r=2, target_modules=targets))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:  # zero at init; make the adapter change something
                p.add_(torch.randn_like(p) * 0.1)
    staging = settings.data_dir / f"staging-lora-{time.monotonic_ns()}"
    model.save_pretrained(staging)
    info = CheckpointInfo(persona=persona, version="", base=str(recorded_base), kind="lora")
    return register_checkpoint(settings.checkpoints_dir, staging, info)


def test_lora_adapter_swaps_in_and_one_for_another_base_is_refused(
    settings, redis_client, tiny, tiny_llama_dir, tiny_gpt2_dir, running_worker, client
):
    make_lora(settings, tiny_llama_dir, "tiny", tiny_llama_dir, ["q_proj", "v_proj"])
    # metadata that claims the right base, weights made for another model: only loading tells
    make_lora(settings, tiny_gpt2_dir, "tiny", tiny_llama_dir, ["c_attn"])
    running_worker("w-lora")
    assert client.ask(chat(), timeout=60).version == "base"
    assert perform_swap(settings, redis_client, tiny, "v1", timeout_s=60).committed
    assert client.ask(chat(), timeout=60).version == "v1"
    refused = perform_swap(settings, redis_client, tiny, "v2", timeout_s=60)
    assert not refused.committed and "does not fit this base model" in refused.votes["w-lora"].reason
    assert client.ask(chat(), timeout=60).version == "v1"


def test_a_swap_opened_on_a_machine_whose_clock_is_behind_is_answered(
    settings, redis_client, tiny, tiny_llama_dir, running_worker, monkeypatch
):
    """A proposal lapses by Redis's clock, which the operator and the workers share: one
    opened by an operator whose clock ran 10 minutes behind had lapsed for every worker."""
    make_checkpoint(settings, tiny_llama_dir, "tiny", seed=1)
    real = time.time
    monkeypatch.setattr(time, "time", lambda: real() - 600)  # the operator's machine
    proposal = swaps.open_proposal(
        redis_client, swaps.SwapProposal(persona="tiny", target="v1", previous=""), timeout_s=60
    )
    monkeypatch.setattr(time, "time", real)
    settings.worker.engine = "eager"  # no GGUF written for llama.cpp: seconds faster
    running_worker("w-one", preload=["tiny"])  # its clock is right
    wait_until(lambda: "w-one" in swaps.votes(redis_client, proposal.id), timeout=30)
    assert swaps.votes(redis_client, proposal.id)["w-one"].ready


def _cli(settings, redis_url, personas_dir, cwd: Path | None = None):
    """Run `persona ARGS...` against the test Redis and personas, as an operator would."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PERSONA_")}
    env |= {"PERSONA_DATA_DIR": str(settings.data_dir), "PERSONA_REDIS_URL": redis_url,
            "PERSONA_PERSONAS_DIRS": json.dumps([str(personas_dir)]), "COLUMNS": "200",
            "PERSONA_WORKER__ENGINE": "eager",  # a swap with no worker checks here: no GGUF written, seconds faster
            "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}

    def persona(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "persona", *args], env=env, capture_output=True, check=False,
                              text=True, timeout=120, cwd=cwd)

    return persona


def test_swap_json_to_the_version_already_served_is_still_one_json_object(settings, redis_url, redis_client, tiny,
                                                                          personas_dir):
    """`--json` printed "tiny already serves base", which no JSON reader takes."""
    persona = _cli(settings, redis_url, personas_dir)
    same = persona("swap", "tiny", "base", "--json")
    assert same.returncode == 0, same.stderr
    outcome = json.loads(same.stdout)
    assert outcome["committed"] and outcome["unchanged"] and outcome["proposal"]["target"] == "base"
    assert swaps.active_versions(redis_client) == {} and swaps.swap_log(redis_client) == []


def test_a_versions_own_folder_named_as_a_path_is_that_version(settings, redis_url, redis_client, tiny, tiny_llama_dir,
                                                               personas_dir):
    """Swapped to by its folder's path (or by its name from inside the checkpoints folder,
    where `v1` is a folder too), v1 was stored as a path: `persona checkpoints` starred no
    version and called it "a folder outside the versioned checkpoints", and swapping to
    `v1` from it flipped for nothing."""
    v1 = make_checkpoint(settings, tiny_llama_dir, "tiny", seed=1)
    make_checkpoint(settings, tiny_llama_dir, "tiny", seed=2)
    persona = _cli(settings, redis_url, personas_dir)
    assert persona("swap", "tiny", str(v1.path)).returncode == 0
    assert swaps.active_versions(redis_client) == {"tiny": "v1"}
    again = persona("swap", "tiny", "v1")
    assert again.returncode == 0 and "already serves v1" in again.stdout
    from_inside = _cli(settings, redis_url, personas_dir, cwd=v1.path.parent)("swap", "tiny", "v2")
    assert from_inside.returncode == 0, from_inside.stderr
    assert swaps.active_versions(redis_client) == {"tiny": "v2"} and swaps.version_history(redis_client, "tiny") == ["v1", "base"]

    redis_client.hset(keys.ACTIVE_VERSIONS_KEY, "tiny", str(v1.path))  # stored as a path by an earlier swap
    listed = json.loads(persona("checkpoints", "tiny", "--json").stdout)
    assert [v["active"] for v in listed["versions"]] == [True, False]
    table = persona("checkpoints", "tiny")
    assert [line for line in table.stdout.splitlines() if "*" in line and "v1" in line] and "outside" not in table.stdout
    redis_client.hset(keys.ACTIVE_VERSIONS_KEY, "tiny", "v7")  # a version whose folder was removed
    table = persona("checkpoints", "tiny")
    assert "active: v7, whose folder was removed" in table.stdout and "outside" not in table.stdout


def test_a_live_worker_whose_heartbeat_cannot_be_read_must_vote_too(settings, redis_client, tiny, tiny_llama_dir):
    """It serves all the same: left out of the proposal, it picked up the flip without
    having loaded and checked the new weights (and with no other worker, the swap was
    checked only on the operator's machine)."""
    from persona import heartbeat

    make_checkpoint(settings, tiny_llama_dir, "tiny", seed=1)
    heartbeat.publish(redis_client, heartbeat.WorkerInfo(id="w-odd"), ttl_s=60)
    redis_client.set(keys.worker_key("w-odd"), "not a heartbeat")
    outcome = swaps.swap_persona(redis_client, tiny, "v1", timeout_s=1)
    assert not outcome.committed and outcome.proposal.workers == ["w-odd"]
    assert "no answer from worker(s) w-odd" in outcome.problem
    assert swaps.active_versions(redis_client) == {} and swaps.open_proposals(redis_client) == []


def test_a_refused_swap_or_rollback_with_json_is_one_json_object(settings, redis_url, redis_client, tiny, tiny_llama_dir,
                                                                 personas_dir):
    """With --json, a refusal made before any worker voted (nothing to roll back to, a version
    that is not there, a checkpoint for another base, another swap under way) was a red line
    on stderr and nothing on stdout: a script that asked for JSON could not read why."""
    make_checkpoint(settings, tiny_llama_dir, "tiny", seed=1, base="/somewhere/else")
    make_checkpoint(settings, tiny_llama_dir, "tiny", seed=2)
    persona = _cli(settings, redis_url, personas_dir)

    def refused(*args: str) -> dict:
        done = persona(*args, "--json")
        assert done.returncode == 1 and "error" not in done.stderr, done.stderr  # said once, in the object
        outcome = json.loads(done.stdout)
        assert not outcome["committed"] and outcome["proposal"]["persona"] == "tiny"
        return outcome

    back = refused("rollback", "tiny")
    assert "no earlier version" in back["problem"] and back["proposal"]["kind"] == "rollback"
    missing = refused("swap", "tiny", "v7")
    assert "no checkpoint version 'v7'" in missing["problem"] and missing["proposal"]["target"] == "v7"
    assert "wrong base" in refused("swap", "tiny", "v1")["problem"]
    from persona import heartbeat

    heartbeat.publish(redis_client, heartbeat.WorkerInfo(id="w-busy", personas={"tiny": "base"}), ttl_s=60)  # asked, so not loaded here
    swaps.open_proposal(redis_client, swaps.SwapProposal(persona="tiny", target="v1", previous="base"), timeout_s=60)
    busy = refused("swap", "tiny", "v2")
    assert "already under way" in busy["problem"] and busy["proposal"]["previous"] == "base"
    assert swaps.active_versions(redis_client) == {}


def test_checkpoints_shows_a_base_folder_holding_brackets_as_written(settings, redis_url, write_persona, personas_dir):
    """The table read folder names as Rich markup: a base at /models/[draft]/tiny was
    listed as /models//tiny, a folder that is not there."""
    write_persona("odd", base="/models/[draft]/tiny")
    table = _cli(settings, redis_url, personas_dir)("checkpoints", "odd")
    assert table.returncode == 0, table.stderr
    assert "/models/[draft]/tiny" in table.stdout


def test_a_swap_under_way_names_who_started_it(redis_client, tiny):
    """A second operator was told only that a swap was under way, not whose it was to ask about."""
    from persona.errors import SwapRefused

    swaps.open_proposal(redis_client, swaps.SwapProposal(persona="tiny", target="v1", previous="base", by="alice@ops-laptop"),
                        timeout_s=60)
    with pytest.raises(SwapRefused, match="to 'v1' by alice@ops-laptop is already under way"):
        swaps.swap_persona(redis_client, tiny, "v2", timeout_s=5)


def test_a_swap_under_way_says_how_long_ago_by_redis_time(redis_client, tiny):
    """The proposal was stamped by its proposer's clock and read by this machine's: opened on
    a machine ten minutes fast, a second operator was told it "started -600 s ago"."""
    import re

    from persona.errors import SwapRefused

    fast = swaps.SwapProposal(persona="tiny", target="v1", previous="base", by="bob@fast", created_at=time.time() + 600)
    swaps.open_proposal(redis_client, fast, timeout_s=60)
    with pytest.raises(SwapRefused) as refused:
        swaps.swap_persona(redis_client, tiny, "v2", timeout_s=5)
    started = re.search(r"\(started (-?\d+) s ago\)", str(refused.value))
    assert started is not None and 0 <= int(started[1]) <= 5, str(refused.value)


def test_a_worker_that_began_serving_during_a_swap_must_vote_too(redis_client, tiny):
    """A worker still loading its models when the swap opened was not asked, and the swap
    committed without it as soon as the others were ready: it then served the new version
    unchecked (from a damaged copy on its disk, as here, every request failed)."""
    from persona import heartbeat

    heartbeat.publish(redis_client, heartbeat.WorkerInfo(id="w-a", personas={"tiny": "base"}), ttl_s=60)
    done: list[swaps.SwapOutcome] = []
    swapping = threading.Thread(target=lambda: done.append(swaps.swap_persona(redis_client, tiny, "v1", timeout_s=30)))
    swapping.start()
    wait_until(lambda: swaps.open_proposals(redis_client) != [])
    [proposal] = swaps.open_proposals(redis_client)
    assert proposal.workers == ["w-a"]
    heartbeat.publish(redis_client, heartbeat.WorkerInfo(id="w-late", personas={"tiny": "base"}), ttl_s=60)  # serving now
    swaps.cast_vote(redis_client, proposal.id, swaps.Vote(worker="w-a", ready=True))
    time.sleep(5 * swaps.POLL_S)
    assert swaps.active_versions(redis_client) == {} and not done  # still waiting for w-late
    swaps.cast_vote(redis_client, proposal.id, swaps.Vote(worker="w-late", ready=False, reason="cannot load the model"))
    swapping.join(timeout=10)
    [outcome] = done
    assert not outcome.committed and "worker w-late: cannot load the model" in outcome.problem
    assert swaps.active_versions(redis_client) == {} and swaps.open_proposals(redis_client) == []


def test_a_worker_that_cannot_load_the_version_swapped_to_says_so_and_what_to_do(
    settings, redis_client, tiny, tiny_llama_dir, running_worker, client
):
    """Swapped with no worker running (checked on the operator's machine), then a worker
    started whose copy is damaged: every request was answered with the load error alone,
    naming neither the swap nor the worker, nor how to get the persona answering again."""
    v1 = make_checkpoint(settings, tiny_llama_dir, "tiny", seed=1)
    assert swaps.swap_persona(redis_client, tiny, "v1", timeout_s=10).committed  # no worker: nothing to ask
    (v1.path / "model.safetensors").write_bytes(b"\0" * 64)
    running_worker("w-late")
    reply = client.ask(chat(), timeout=60)
    assert not reply.ok and "its model.safetensors is unreadable" in reply.error.message
    assert "'tiny' was swapped to v1, which worker w-late cannot load" in reply.error.message
    assert "`persona rollback tiny`" in reply.error.message


def test_the_worker_log_says_when_a_swap_reached_it_and_which_weights_it_freed(
    settings, redis_client, tiny, tiny_llama_dir, running_worker, client, caplog
):
    """The log read "ready to swap tiny to v1", then "freed weights base" (which model's
    base?) and no line saying when this worker began answering with v1."""
    make_checkpoint(settings, tiny_llama_dir, "tiny", seed=1)
    settings.worker.engine = "eager"  # no GGUF written for llama.cpp: seconds faster
    caplog.set_level("INFO", logger="persona.swapper")
    worker = running_worker("w-one")
    assert client.ask(chat(), timeout=60).version == "base"
    assert perform_swap(settings, redis_client, tiny, "v1", timeout_s=60).committed
    assert client.ask(chat(), timeout=60).version == "v1"
    wait_until(lambda: len(persona_keys(worker)) == 1)
    lines = [r.getMessage() for r in caplog.records if r.name == "persona.swapper"]
    assert "tiny serves v1 from its next batch (was base; rows decoding finish on it)" in lines
    assert f"freed weights {tiny_llama_dir} (base)" in lines


def test_a_target_that_is_not_there_is_named_as_the_user_meant_it(settings, tiny, tiny_llama_dir, tmp_path,
                                                                    monkeypatch):
    """`persona swap tiny ./nope` said "no checkpoint version './nope'" (a folder was meant),
    and `persona swap tiny 1` said there is no version '1' when there is a v1."""
    from persona.checkpoints import resolve_checkpoint
    from persona.errors import ModelError

    make_checkpoint(settings, tiny_llama_dir, "tiny", seed=1)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ModelError, match=f"checkpoint folder {tmp_path / 'nope'} does not exist"):
        resolve_checkpoint(tiny, settings, "./nope")
    with pytest.raises(ModelError, match=r"no checkpoint version '1' .*; did you mean v1\?"):
        resolve_checkpoint(tiny, settings, "1")
    with pytest.raises(ModelError, match=r"no checkpoint version 'v7' in .*; see `persona checkpoints tiny`$"):
        resolve_checkpoint(tiny, settings, "v7")


def test_a_swap_with_no_worker_running_says_it_was_checked_here_and_what_workers_will_do(
    settings, redis_url, redis_client, tiny, tiny_llama_dir, personas_dir
):
    """It said "0 worker(s) switched", and a damaged checkpoint only "cannot load the model",
    without saying nothing had changed."""
    make_checkpoint(settings, tiny_llama_dir, "tiny", seed=1)
    make_checkpoint(settings, tiny_llama_dir, "tiny", seed=2, corrupt=True)
    persona = _cli(settings, redis_url, personas_dir)
    done = persona("swap", "tiny", "v1")
    assert done.returncode == 0, done.stderr
    assert "checked on this machine (no running worker serves tiny); workers load v1 when they next serve it" in done.stdout
    assert "0 worker(s)" not in done.stdout
    damaged = persona("swap", "tiny", "v2")
    assert damaged.returncode == 1 and "cut short or damaged" in damaged.stderr, damaged.stderr
    assert "'tiny' keeps its current version" in damaged.stderr, damaged.stderr
    assert swaps.active_versions(redis_client) == {"tiny": "v1"}


def test_a_swap_no_running_worker_serves_is_checked_here(
    settings, redis_url, redis_client, tiny, tiny_llama_dir, personas_dir, running_worker
):
    """Only workers that serve a persona vote on its swap: with workers running that serve
    others, a damaged checkpoint was committed unchecked ("0 worker(s) switched")."""
    make_checkpoint(settings, tiny_llama_dir, "tiny", seed=1, corrupt=True)
    running_worker("w-other")  # serves nothing yet
    wait_until(lambda: live_worker_ids(redis_client) == {"w-other"})
    damaged = _cli(settings, redis_url, personas_dir)("swap", "tiny", "v1")
    assert damaged.returncode == 1 and "cut short or damaged" in damaged.stderr, damaged.stderr
    assert "'tiny' keeps its current version" in damaged.stderr, damaged.stderr
    assert swaps.active_versions(redis_client) == {}


def test_a_lora_adapter_whose_weights_fit_nothing_is_refused_not_swapped_in_as_the_base(
    settings, redis_url, redis_client, tiny, personas_dir
):
    """An adapter_model.safetensors holding none of the weights its config names was
    merged as nothing: the swap committed and replies said v1 while the base model
    answered; the only sign was peft's kilobytes-long "Found missing adapter keys" warning."""
    from safetensors.torch import save_file

    staging = settings.data_dir / "staging-stray"
    staging.mkdir(parents=True)
    (staging / "adapter_config.json").write_text(json.dumps(
        {"peft_type": "LORA", "r": 2, "lora_alpha": 4, "target_modules": ["q_proj"], "task_type": "CAUSAL_LM"}))
    import torch

    save_file({"x": torch.zeros(2)}, staging / "adapter_model.safetensors")
    register_checkpoint(settings.checkpoints_dir, staging,
                        CheckpointInfo(persona="tiny", version="", base=tiny.model.base, kind="lora"))

    swapped = _cli(settings, redis_url, personas_dir)("swap", "tiny", "v1")
    assert swapped.returncode == 1, swapped.stdout
    assert "holds none of the" in swapped.stderr and "keeps its current version" in swapped.stderr, swapped.stderr
    assert "missing adapter keys" not in swapped.stderr and len(swapped.stderr) < 1000, swapped.stderr
    assert swaps.active_versions(redis_client) == {}


def test_swap_refuses_a_checkpoint_with_a_shard_cut_short_in_words_that_say_what_to_do(
    settings, redis_url, redis_client, tiny, tiny_llama_dir, personas_dir
):
    """A shard cut short (a copy that did not finish) was found only by loading it, on this
    machine or by every worker asked, and said in safetensors' words: "cannot load the model
    from …: Error while deserializing header: incomplete metadata, file not fully covered"."""
    from transformers import AutoModelForCausalLM

    staging = settings.data_dir / "staging-sharded"
    AutoModelForCausalLM.from_pretrained(tiny_llama_dir).save_pretrained(staging, max_shard_size="100KB")
    shard = staging / "model-00002-of-00002.safetensors"
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    v1 = register_checkpoint(settings.checkpoints_dir, staging,
                             CheckpointInfo(persona="tiny", version="", base=str(tiny_llama_dir), kind="full"))
    refused = _cli(settings, redis_url, personas_dir)("swap", "tiny", "v1")
    said = " ".join(refused.stderr.split())
    assert refused.returncode == 1, refused.stdout
    assert f"checkpoint {v1.path}: its model-00002-of-00002.safetensors is unreadable (it holds " in said, said
    assert "cut short or damaged; copy the whole folder again, or train again; 'tiny' keeps its current version" in said
    assert swaps.active_versions(redis_client) == {}
