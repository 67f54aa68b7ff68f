"""Unfinished training runs in the listings: a run stopped with Ctrl-C, or one training now,
shown by `persona personas list` and `persona checkpoints` with the command that continues it."""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from persona.settings import Settings
from tests.reporters import Recorder
from tests.sayings import SIX_SAYINGS as SAYINGS
from training.runs import train_persona
from training.trainer import TrainConfig

# One CPU thread: on a shared machine, two busy-waiting threads per process are far slower.
pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture
def env(settings: Settings) -> dict[str, str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("PERSONA_")}
    return clean | {"PERSONA_DATA_DIR": str(settings.data_dir), "COLUMNS": "300", "OMP_NUM_THREADS": "1",
                    "PERSONA_REDIS_URL": settings.redis_url.get_secret_value()}


@pytest.fixture
def corpus(tmp_path: Path) -> Path:
    path = tmp_path / "sayings.jsonl"
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in SAYINGS))
    return path


def persona(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "persona", *args], env=env, capture_output=True, text=True,
                          check=False, timeout=60)


def config(base: Path) -> TrainConfig:
    return TrainConfig(base=str(base), steps=4, batch_size=2, eval_every=2, samples=0)


def test_a_stopped_run_is_listed_with_the_command_that_continues_it(env, settings: Settings, corpus: Path,
                                                                     tiny_gpt2_dir: Path):
    """A run stopped with Ctrl-C was shown by neither `personas list` nor `checkpoints`; a first
    run stopped so (no persona file yet) was "unknown persona" to `checkpoints`."""
    assert train_persona(settings, "calm", corpus, config(tiny_gpt2_dir)).checkpoint is not None
    assert train_persona(settings, "calm", corpus, config(tiny_gpt2_dir), reporter=Recorder(stop_at=1)).checkpoint is None
    assert train_persona(settings, "halfway", corpus, config(tiny_gpt2_dir),
                         reporter=Recorder(stop_at=1)).checkpoint is None
    again = {name: shlex.join(["persona", "train", name, "--corpus", str(corpus), "--resume"])
             for name in ("calm", "halfway")}

    listed = persona("personas", "list", env=env)
    assert listed.returncode == 0, listed.stderr
    assert [line.split("\t")[0] for line in listed.stdout.splitlines()].count("calm") == 1
    assert "halfway" not in listed.stdout  # stdout lists persona files alone
    said = " ".join(listed.stderr.split())
    for name in ("calm", "halfway"):
        assert f"{name}: unfinished training run (stopped at step 1 of 4, saved " in said, said
        assert f"continue it with `{again[name]}`" in said

    shown = persona("checkpoints", "calm", env=env)
    assert shown.returncode == 0, shown.stderr
    assert "calm: unfinished training run (stopped at step 1 of 4" in " ".join(shown.stdout.split())
    first = persona("checkpoints", "halfway", "--json", env=env)
    assert first.returncode == 0, first.stderr
    run = json.loads(first.stdout)["unfinished_run"]
    assert (run["running"], run["step"], run["total_steps"]) == (False, 1, 4)
    assert run["resume_command"] == again["halfway"]


def test_a_run_training_now_is_listed_as_running(env, settings: Settings, corpus: Path, tiny_gpt2_dir: Path):
    """A run still training is shown as such, by the process training it, and is gone once it ends."""

    class Held(Recorder):
        """Holds the run after its first step until the listings have been read."""

        def __init__(self) -> None:
            super().__init__()
            self.stepped, self.go_on = threading.Event(), threading.Event()

        def on_step(self, step: int, loss: float, average: float, elapsed_s: float) -> None:
            self.stepped.set()
            self.go_on.wait(60)

    held = Held()
    run = threading.Thread(target=train_persona, args=(settings, "busy", corpus, config(tiny_gpt2_dir)),
                           kwargs={"reporter": held})
    run.start()
    try:
        assert held.stepped.wait(60)
        listed = persona("personas", "list", env=env)
        first = persona("checkpoints", "busy", env=env)
    finally:
        held.go_on.set()
        run.join(60)
    assert f"busy: training now (process {os.getpid()})" in " ".join(listed.stderr.split()), listed.stderr
    said = " ".join(first.stdout.split())
    assert first.returncode == 0 and "busy has no checkpoints yet" in said and "busy: training now" in said

    done = persona("personas", "list", env=env)
    assert "busy\t" in done.stdout and "unfinished" not in done.stderr
