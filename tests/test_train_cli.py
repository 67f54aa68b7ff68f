"""The training commands, run as a user runs them: a real process, real files, real exit codes."""

from __future__ import annotations

import io
import json
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from rich.console import Console
from rich.progress import Progress
from transformers import AutoModelForCausalLM

from persona.cli.train_cmd import RichReporter
from persona.models import load_model
from persona.settings import Settings

SAYINGS = "\n%\n".join([
    "Patience is the art of hoping slowly.\n\t-- Sage",
    "Attend to the small things; the large ones are made of them.\n\t-- Sage",
    "A calm mind is a well-kept garden.\n\t-- Sage",
    "The road is long, and that is why we walk it daily.\n\t-- Sage",
    "Still water shows the moon.\n\t-- Sage",
    "Every storm runs out of rain.\n\t-- Sage",
    "Somebody else entirely.\n\t-- Other",
    "A lamp does not ask who is reading.\n\t-- Sage",
    "Seeds keep their promises quietly.\n\t-- Sage",
    "Patience is the art of hoping slowly!\n\t-- Sage",
]) + "\n%\n"


# One CPU thread: on a shared machine, two busy-waiting threads per process are far slower.
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def persona(*args: str, env: dict[str, str], timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "persona", *args], env=env, capture_output=True, text=True, check=False,
                          timeout=timeout)


@pytest.fixture
def env(settings: Settings) -> dict[str, str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("PERSONA_")}
    return clean | {"PERSONA_DATA_DIR": str(settings.data_dir), "COLUMNS": "200", "OMP_NUM_THREADS": "1",
                    "PERSONA_REDIS_URL": settings.redis_url.get_secret_value()}


def test_corpus_build_reports_kept_dropped_and_bad_files(env, tmp_path: Path, tiny_gpt2_dir: Path):
    (tmp_path / "sage.txt").write_text(SAYINGS)
    (tmp_path / "broken.jsonl").write_text('{"text": "fine"}\n{oops\n')
    out = tmp_path / "corpus.jsonl"
    result = persona("corpus", "build", str(tmp_path / "sage.txt"), str(tmp_path / "broken.jsonl"),
                     "-o", str(out), "--author", "Sage", "--base", str(tiny_gpt2_dir), env=env)
    assert result.returncode == 0, result.stderr
    assert "broken.jsonl:2" in result.stderr
    assert "kept 8, dropped 1 duplicate" in result.stdout and "7 train, 1 validation" in result.stdout
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 8 and all("-- Sage" not in r["text"] for r in rows)
    assert " train tokens, " in result.stdout
    nobody = persona("corpus", "build", str(tmp_path / "sage.txt"), "-o", str(out), "--author", "Nobody",
                     "--base", "", env=env)
    assert nobody.returncode == 1 and "no documents signed by 'Nobody'" in nobody.stderr


def test_train_errors_say_what_to_do(env, tmp_path: Path, tiny_gpt2_dir: Path):
    missing = persona("train", "x", "--corpus", str(tmp_path / "nope.jsonl"), "--base", str(tiny_gpt2_dir), env=env)
    assert missing.returncode == 1 and "persona corpus build" in missing.stderr
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    result = persona("train", "x", "--corpus", str(empty), "--base", str(tiny_gpt2_dir), env=env)
    assert result.returncode == 1 and "holds no documents" in result.stderr
    good = tmp_path / "good.jsonl"
    good.write_text('{"text": "a"}\n{"text": "b"}\n')
    unknown = persona("train", "x", "--corpus", str(good), "--base", "gpt-17", env=env)
    assert unknown.returncode == 1 and "neither the bundled 'smollm2'" in unknown.stderr
    for result in (missing, unknown):
        assert "Traceback" not in result.stderr


def test_resume_refuses_to_change_what_the_run_is_made_of(env, tmp_path: Path):
    """--resume continues the run exactly: a new --steps or --full was silently dropped."""
    result = persona("train", "x", "--corpus", str(tmp_path / "c.jsonl"), "--resume", "--steps", "40", "--full", env=env)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert "cannot change --lora/--full, --steps" in " ".join(result.stderr.split())


def test_errors_quote_paths_with_brackets_as_they_are(env, tmp_path: Path, tiny_gpt2_dir: Path):
    for folder in ("my [draft] notes", "old [/b]"):
        corpus = tmp_path / folder / "c.jsonl"
        result = persona("train", "x", "--corpus", str(corpus), "--base", str(tiny_gpt2_dir), env=env)
        assert result.returncode == 1 and "Traceback" not in result.stderr
        assert f"corpus {corpus} does not exist" in result.stderr


def test_samples_print_as_the_model_wrote_them():
    out = io.StringIO()
    with Progress(console=Console(file=out, width=200)) as progress:
        RichReporter(progress).on_samples(10, ["a quote [b]bold[/b] from a forum", "see [/quote] here"])
    assert "'a quote [b]bold[/b] from a forum'" in out.getvalue()
    assert "'see [/quote] here'" in out.getvalue()


def test_corpus_written_inside_its_source_folder_is_not_read_back(env, tmp_path: Path):
    blog = tmp_path / "blog"
    blog.mkdir()
    (blog / "kept.txt").write_text("A post that stays.")
    (blog / "deleted.txt").write_text("A post the author deletes.")
    out = blog / "corpus.jsonl"
    build = ("corpus", "build", str(blog), "-o", str(out), "--base", "")
    assert persona(*build, env=env).returncode == 0
    (blog / "deleted.txt").unlink()
    again = persona(*build, env=env)
    assert again.returncode == 0, again.stderr
    assert [json.loads(line)["text"] for line in out.read_text().splitlines()] == ["A post that stays."]


def test_ctrl_c_tells_how_to_resume_in_words_a_shell_reads_back(env, settings: Settings, tmp_path: Path,
                                                               tiny_gpt2_dir: Path):
    corpus = tmp_path / "my [draft] notes" / "it's mine.jsonl"
    corpus.parent.mkdir()
    corpus.write_text("".join(json.dumps({"text": line.split("\n")[0]}) + "\n" for line in SAYINGS.split("%")))
    args = ["train", "scribe", "--corpus", str(corpus), "--base", str(tiny_gpt2_dir), "--steps", "100000",
            "--eval-every", "1", "--batch-size", "2"]
    run = subprocess.Popen([sys.executable, "-m", "persona", *args], env=env, stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True)
    state = settings.data_dir / "runs" / "scribe" / "state.pt"
    deadline = time.monotonic() + 60
    while not state.exists() and run.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)  # saved after the first step: the run is in its training loop
    run.send_signal(signal.SIGINT)
    stdout, stderr = run.communicate(timeout=60)
    assert run.returncode == 130, stderr
    hint = stdout.split("continue with `")[1].split("`")[0]
    assert shlex.split(hint) == ["persona", "train", "scribe", "--corpus", str(corpus), "--resume"]


@pytest.mark.slow
def test_train_eval_generate_export_from_the_command_line(env, settings: Settings, tmp_path: Path,
                                                         tiny_gpt2_dir: Path, running_worker):
    (tmp_path / "sage.txt").write_text(SAYINGS)
    corpus = tmp_path / "corpus.jsonl"
    assert persona("corpus", "build", str(tmp_path / "sage.txt"), "-o", str(corpus), "--base", "", env=env).returncode == 0

    trained = persona("train", "sage2", "--corpus", str(corpus), "--base", str(tiny_gpt2_dir), "--steps", "6",
                      "--batch-size", "4", "--eval-every", "3", "--learning-rate", "0.01", env=env)
    assert trained.returncode == 0, trained.stderr
    assert "registered sage2 v1" in trained.stdout and "loss=" in trained.stdout
    assert (settings.user_personas_dir / "sage2.toml").is_file()

    evaluated = persona("eval", "sage2", "--corpus", str(corpus), "--json", "--samples", "4", env=env)
    assert evaluated.returncode == 0, evaluated.stderr
    report = json.loads(evaluated.stdout)
    assert report["version"] == "v1" and len(report["samples"]) == 4
    assert report["perplexity"] < report["base_perplexity"] and 0.0 <= report["copied_fraction"] <= 1.0

    running_worker()
    out = tmp_path / "samples.jsonl"
    generated = persona("generate", "sage2", "--prefix", "A calm", "-n", "3", "--out", str(out), "--seed", "1",
                        "--max-new-tokens", "6", env=env)
    assert generated.returncode == 0, generated.stderr
    samples = [json.loads(line)["text"] for line in out.read_text().splitlines()]
    assert len(samples) == 3 and all(s.startswith("A calm") for s in samples)

    exported = tmp_path / "standalone"
    result = persona("export", "sage2", "-o", str(exported), env=env)
    assert result.returncode == 0, result.stderr
    plain = AutoModelForCausalLM.from_pretrained(exported)  # plain transformers, no peft
    served = load_model(str(tiny_gpt2_dir), settings.checkpoints_dir / "sage2" / "v1", cache_dir=tmp_path)
    ids = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad():
        assert torch.allclose(plain(ids).logits, served.model(ids).logits, atol=1e-5)
    again = persona("export", "sage2", "-o", str(exported), env=env)
    assert again.returncode == 1 and "not empty" in again.stderr
    as_gguf = persona("export", "sage2", "-o", str(tmp_path / "gguf"), "--gguf", "q8_0", env=env)
    assert as_gguf.returncode == 0, as_gguf.stderr  # a GPT-2 checkpoint: llama.cpp has a graph for it
    assert [p.name for p in (tmp_path / "gguf").glob("*.gguf")] == ["sage2-v1.q8_0.gguf"]
    as_gguf = persona("export", "sage2", "-o", str(tmp_path / "gguf2"), "--gguf", "q5_k", env=env)
    assert as_gguf.returncode == 1 and "unknown GGUF type" in as_gguf.stderr
    assert not (tmp_path / "gguf2").exists()
