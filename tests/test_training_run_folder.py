"""Unfinished training runs: a run stopped with Ctrl-C, or one training now, shown by `persona
personas list` and `persona checkpoints` with the command that continues it; and `persona train`
stopped the ways runs are stopped, a terminal closed on it, a second Ctrl-C, each keeping the work
it had done for `--resume` to go on from."""

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


# A real `persona train` in a terminal whose window closes inside optimiser step CLOSE_AT_STEP:
# its output then fails (EIO), and SIGHUP comes, maybe twice (from the shell and from the kernel).
_CLOSED_TERMINAL = """
import os, pty, select, signal, sys, threading
from torch.optim.optimizer import register_optimizer_step_post_hook
master, slave = pty.openpty()
for fd in (1, 2):
    os.dup2(slave, fd)
closing = threading.Event()
def terminal():  # shows what the run writes until its window closes
    while not closing.is_set():
        if select.select([master], [], [], 0.05)[0]:
            os.read(master, 65536)
    os.close(master)
window = threading.Thread(target=terminal)
window.start()
seen = []
def close_the_window(optimizer, args, kwargs):
    seen.append(1)
    if len(seen) == int(os.environ["CLOSE_AT_STEP"]):
        closing.set()
        window.join()
        for _ in range(2):
            os.kill(os.getpid(), signal.SIGHUP)
register_optimizer_step_post_hook(close_the_window)
from persona.cli import main
sys.argv[0] = "persona"
main()
"""

# Ctrl-C pressed twice inside optimiser step PRESS_AT_STEP, the state saved after every step
# (a real run saves every few minutes between its evaluations).
_TWO_PRESSES_SAVING_EVERY_STEP = """
import os, signal, sys
from torch.optim.optimizer import register_optimizer_step_post_hook
import training.trainer
training.trainer.SAVE_EVERY_S, training.trainer.SAVE_SHARE = 0.0, float("inf")
seen = []
def press(optimizer, args, kwargs):
    seen.append(1)
    if len(seen) == int(os.environ["PRESS_AT_STEP"]):
        for _ in range(2):
            os.kill(os.getpid(), signal.SIGINT)
register_optimizer_step_post_hook(press)
from persona.cli import main
sys.argv[0] = "persona"
main()
"""


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


def persona(*args: str, env: dict[str, str], script: str | None = None) -> subprocess.CompletedProcess:
    """`persona ARGS`, or ``script`` (a `persona` run set up to be stopped a certain way) given ARGS."""
    command = [sys.executable, "-c", script] if script else [sys.executable, "-m", "persona"]
    return subprocess.run([*command, *args], env=env, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                          check=False, timeout=120)


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


def saved_step(settings: Settings, name: str) -> int | None:
    progress = settings.data_dir / "runs" / name / "progress.json"
    return json.loads(progress.read_text())["step"] if progress.is_file() else None


def test_a_terminal_closed_on_a_run_stops_it_after_its_step_saved(env, settings: Settings, corpus: Path,
                                                                  tiny_gpt2_dir: Path):
    """Closing the terminal killed the run at once and without a word: its folder held nothing
    to continue ("unfinished training run that saved nothing to continue")."""
    train = ["train", "closed", "--corpus", str(corpus), "--base", str(tiny_gpt2_dir), "--steps", "6",
             "--eval-every", "3", "--batch-size", "2"]
    persona(*train, env=env | {"CLOSE_AT_STEP": "3"}, script=_CLOSED_TERMINAL)
    assert saved_step(settings, "closed") == 3

    listed = persona("personas", "list", env=env)
    assert "closed: unfinished training run (stopped at step 3 of 6" in listed.stderr, listed.stderr
    resumed = persona("train", "closed", "--resume", env=env)
    assert resumed.returncode == 0, resumed.stderr
    assert "registered closed v1" in resumed.stdout


def test_a_second_ctrl_c_between_evaluations_keeps_the_last_save(env, settings: Settings, corpus: Path,
                                                                 tiny_gpt2_dir: Path):
    """The state was saved only at evaluations: a second Ctrl-C (or a crash) before the first
    one lost the whole run, and after it everything since."""
    train = ["train", "hasty", "--corpus", str(corpus), "--base", str(tiny_gpt2_dir), "--steps", "6",
             "--eval-every", "6", "--batch-size", "2"]
    stopped = persona(*train, env=env | {"PRESS_AT_STEP": "4"}, script=_TWO_PRESSES_SAVING_EVERY_STEP)
    assert stopped.returncode == 130, stopped.stderr
    assert "Ctrl-C again to stop at once, keeping the state saved at step 3" in stopped.stderr
    assert "stopped at once; continue from the run's last save with `persona train hasty" in stopped.stdout
    assert saved_step(settings, "hasty") == 3

    resumed = persona("train", "hasty", "--resume", env=env)
    assert resumed.returncode == 0, resumed.stderr
    assert "registered hasty v1" in resumed.stdout


@pytest.mark.parametrize("killed", ["with the old set aside", "before the old were removed"])
def test_a_run_killed_while_it_replaced_its_best_weights_resumes_with_its_best(settings: Settings, corpus: Path,
                                                                              tiny_gpt2_dir: Path, killed: str):
    """A save of better weights moves the best ones aside (best.old) before the new take their place,
    and removes them after. Killed with them set aside (no best/), the resumed run took the weights
    it stopped with for its best; killed before their removal, best.old stayed for good."""
    four_evals = TrainConfig(base=str(tiny_gpt2_dir), steps=8, batch_size=2, eval_every=4, samples=0)
    assert train_persona(settings, "calm", corpus, four_evals, reporter=Recorder(stop_at=5)).checkpoint is None
    best = settings.data_dir / "runs" / "calm" / "best"  # the best weights, evaluated at step 4
    kept = {file.name: file.read_bytes() for file in best.iterdir()}
    if killed == "with the old set aside":  # the new weights were never put in place
        best.rename(best.with_name("best.old"))
    else:  # in place, and the old weights, copies here, still beside them
        (best.with_name("best.old")).mkdir()
        for name, data in kept.items():
            (best.with_name("best.old") / name).write_bytes(data)

    stopped = train_persona(settings, "calm", corpus, four_evals, resume=True, reporter=Recorder(stop_at=6))
    assert stopped.result.status == "interrupted" and stopped.result.metrics["best_step"] == 4
    assert {file.name: file.read_bytes() for file in best.iterdir()} == kept
    assert not best.with_name("best.old").exists()


def test_the_command_that_resumes_a_run_names_an_old_relative_corpus_as_recorded(tmp_path: Path, monkeypatch):
    """After a second Ctrl-C while resuming a run an older version started, the command printed
    made its relative corpus absolute from here (`--corpus /work/main/../corpus.jsonl`), a file
    that was never there; one that is here is still named from here."""
    from persona.cli.unfinished_runs import resume_command

    monkeypatch.chdir(tmp_path)
    assert resume_command("wilde", Path("../gone.jsonl")) == "persona train wilde --corpus ../gone.jsonl --resume"
    (tmp_path / "here.jsonl").write_text("")
    assert resume_command("wilde", Path("here.jsonl")) == f"persona train wilde --corpus {tmp_path / 'here.jsonl'} --resume"
