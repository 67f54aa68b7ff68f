"""The training commands, run as a user runs them: a real process, real files, real exit codes."""

from __future__ import annotations

import io
import json
import os
import re
import shlex
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import tomli_w
import torch
from rich.console import Console
from rich.progress import Progress
from transformers import AutoModelForCausalLM, AutoTokenizer

from persona.cli.train_cmd import RichReporter
from persona.models import load_model
from persona.settings import Settings
from tests.reporters import Recorder
from tests.unreadable import unreadable
from training.runs import persona_template

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


def persona_imports(*args: str, env: dict[str, str]) -> tuple[subprocess.CompletedProcess, list[str]]:
    """A command's result, and the modules it imported (as ``python -X importtime`` lists them)."""
    result = persona(*args, env=env | {"PYTHONPROFILEIMPORTTIME": "1"})
    return result, re.findall(r"^import time:.*\|\s*([\w.]+)$", result.stderr, re.MULTILINE)


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


def test_a_corpus_missing_or_mistyped_is_refused_before_torch_loads(env, tmp_path: Path):
    """`persona train x --corpus typo.jsonl` imported torch (seconds, tens on a cold disk) before it
    said that the file was not there."""
    cases = {"does not exist; build one with `persona corpus build": ["--corpus", str(tmp_path / "typo.jsonl")],
             "is a folder; name the corpus file in it": ["--corpus", str(tmp_path)],
             "--corpus is required": []}
    for said, args in cases.items():
        result, imported = persona_imports("train", "x", *args, env=env)
        assert result.returncode == 1 and said in " ".join(result.stderr.split()), result.stderr[-2000:]
        assert "training.corpus" in imported and "torch" not in imported and "transformers" not in imported


def test_a_corpus_with_nothing_to_train_on_is_refused_before_torch_loads(env, tmp_path: Path):
    """An empty corpus, one of blank texts, notes that are no corpus, or one whose documents are all
    held out, was refused only once torch had loaded (seconds, tens on a cold disk)."""
    cases = {"holds no documents; rebuild it with `persona corpus build`": "\n",
             "holds no documents": '{"text": "  "}\n{"text": "\\n"}\n',
             'notes.jsonl:1: not JSON (Expecting value); a corpus has one {"text": ...} per line': "a note\n",
             "has no training documents; add more writing": '{"text": "only one", "split": "validation"}\n'}
    for said, content in cases.items():
        corpus = tmp_path / "notes.jsonl"
        corpus.write_text(content)
        result, imported = persona_imports("train", "x", "--corpus", str(corpus), env=env)
        assert result.returncode == 1 and said in " ".join(result.stderr.split()), result.stderr[-2000:]
        assert "training.corpus" in imported and "torch" not in imported and "transformers" not in imported



def test_a_persona_whose_folder_cannot_be_read_is_not_trained_as_a_new_one(env, settings: Settings, tmp_path: Path,
                                                                           tiny_gpt2_dir: Path):
    """With the user's personas folder unreadable, `persona train tiny` took tiny for a new persona:
    it trained the bundled model instead of tiny's base, with a new persona's settings, and failed
    only at its end, writing tiny's file into that folder. Refused now before torch loads."""
    folder = settings.user_personas_dir
    folder.mkdir(parents=True)
    (folder / "tiny.toml").write_text(f'description = "mine"\n[model]\nbase = "{tiny_gpt2_dir}"\n')
    corpus = tmp_path / "good.jsonl"
    corpus.write_text('{"text": "a"}\n{"text": "b"}\n')
    record = settings.data_dir / "runs" / "tiny" / "run.json"  # a run stopped before the folder became unreadable
    record.parent.mkdir(parents=True)
    record.write_text(json.dumps({"config": {"base": str(tiny_gpt2_dir)}, "corpus": str(corpus)}))
    with unreadable(folder) as prefix:
        for args in (["--corpus", str(corpus)], ["--resume"]):
            result = subprocess.run([*prefix, sys.executable, "-m", "persona", "train", "tiny", *args],
                                    env=env | {"PYTHONPROFILEIMPORTTIME": "1"}, capture_output=True, text=True,
                                    check=False, timeout=60)
            imported = re.findall(r"^import time:.*\|\s*([\w.]+)$", result.stderr, re.MULTILINE)
            said = " ".join(result.stderr.split())
            assert result.returncode == 1, said[-2000:]
            assert (f"cannot tell whether 'tiny' has a persona file: it may be in a folder that cannot be read, and a "
                    f"run that took it for a new persona would lose its base model and settings. {folder}: cannot "
                    "read this folder of persona files (Permission denied)") in said, said[-2000:]
            assert "change their permissions (e.g. chmod a+rx) or owner. Then train it again." in said
            assert "Traceback" not in said and "torch" not in imported and "transformers" not in imported
    assert (folder / "tiny.toml").read_text().endswith(f'base = "{tiny_gpt2_dir}"\n')
    assert sorted(p.name for p in record.parent.iterdir()) == ["run.json"]  # the stopped run as it was

def test_a_base_that_is_not_there_is_refused_before_torch_loads(env, settings: Settings, tmp_path: Path):
    """A mistyped --base, or the base folder of a run to resume moved away, was said once torch had loaded."""
    corpus = tmp_path / "good.jsonl"
    corpus.write_text('{"text": "a"}\n{"text": "b"}\n')
    record = settings.data_dir / "runs" / "x" / "run.json"
    for args in (["--base", str(tmp_path / "gpt-17")], ["--resume"]):
        if "--resume" in args:
            record.parent.mkdir(parents=True)
            record.write_text(json.dumps({"config": {"base": str(tmp_path / "gpt-17")}, "corpus": str(corpus)}))
        result, imported = persona_imports("train", "x", "--corpus", str(corpus), *args, env=env)
        assert result.returncode == 1 and f"base model {str(tmp_path / 'gpt-17')!r} is neither the bundled" in \
            " ".join(result.stderr.split()), result.stderr[-2000:]
        assert "torch" not in imported and "transformers" not in imported


def test_resume_of_a_run_not_there_or_unreadable_is_refused_before_torch_loads(env, settings: Settings,
                                                                               tmp_path: Path):
    """`--resume` read the run's record in a module that imports torch: a run not there was said once
    it had loaded, and a damaged record was a traceback."""
    record = settings.data_dir / "runs" / "x" / "run.json"
    cases = {"no unfinished training run of 'x' to resume; start one without --resume": None,
             f"its record {record} cannot be read (JSONDecodeError": '{"config": {"ste',
             "cannot be read (learning_rate: Input should be greater than 0); start the run over with --restart":
                 '{"config": {"learning_rate": 0}}',
             f"started on the corpus {tmp_path / 'gone.jsonl'}, which is not there now":
                 json.dumps({"config": {}, "corpus": str(tmp_path / "gone.jsonl")})}
    for said, saved in cases.items():
        if saved is not None:
            record.parent.mkdir(parents=True, exist_ok=True)
            record.write_text(saved)
        result, imported = persona_imports("train", "x", "--resume", env=env)
        assert result.returncode == 1 and said in " ".join(result.stderr.split()), result.stderr[-2000:]
        assert "Traceback" not in result.stderr
        assert "training.run_folder" in imported and "torch" not in imported and "transformers" not in imported


def test_a_name_no_persona_can_have_or_a_base_that_would_not_fit_is_refused_before_torch_loads(
        env, settings: Settings, tmp_path: Path, tiny_gpt2_dir: Path):
    """`persona train "Bad Name"`, and a persona trained on another base than it speaks with, were
    refused only once torch had loaded (seconds, tens on a cold disk)."""
    corpus = tmp_path / "good.jsonl"
    corpus.write_text('{"text": "a"}\n{"text": "b"}\n')
    (settings.data_dir / "personas").mkdir()
    (settings.data_dir / "personas" / "keeper.toml").write_text(
        tomli_w.dumps(persona_template("keeper", "smollm2", "v1", corpus)))
    record = settings.data_dir / "runs" / "keeper" / "run.json"
    record.parent.mkdir(parents=True)
    record.write_text(json.dumps({"config": {"base": str(tiny_gpt2_dir)}, "corpus": str(corpus)}))
    not_a_name = "'Bad Name' is not a persona name: use lower-case letters"
    would_not_fit = f"so a checkpoint trained on {str(tiny_gpt2_dir)!r} would not fit it; leave out --base"
    cases = [(not_a_name, ["Bad Name", "--corpus", str(corpus)]),
             (would_not_fit, ["keeper", "--corpus", str(corpus), "--base", str(tiny_gpt2_dir)]),
             (would_not_fit, ["keeper", "--resume"])]  # its run began on another base than the persona's now
    for said, args in cases:
        result, imported = persona_imports("train", *args, env=env)
        assert result.returncode == 1 and said in " ".join(result.stderr.split()), result.stderr[-2000:]
        assert "training.train_config" in imported and "torch" not in imported and "transformers" not in imported


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
    assert f"and {tmp_path / 'gguf' / 'sage2-v1.q8_0.gguf'} for llama.cpp" in as_gguf.stdout  # named: it was not
    as_gguf = persona("export", "sage2", "-o", str(tmp_path / "gguf2"), "--gguf", "q5_k", env=env)
    assert as_gguf.returncode == 1 and "unknown GGUF type" in as_gguf.stderr
    assert not (tmp_path / "gguf2").exists()


def test_progress_written_to_a_pipe_shows_step_lines():
    """Rich draws no bar into a pipe or a log file until the run ends: `persona train | tee`
    showed nothing between evaluations. There a step line is printed every ten seconds."""
    out = io.StringIO()  # not a terminal, as a pipe is not
    with Progress(console=Console(file=out, width=200)) as progress:
        reporter = RichReporter(progress)
        reporter.on_start(100, 0)
        for step, elapsed in [(1, 0.5), (2, 1.0), (3, 9.0), (4, 10.6), (5, 12.0)]:
            reporter.on_step(step, 4.0, 4.5, elapsed)
        lines = out.getvalue().splitlines()
    assert lines[:2] == ["[1 | 0.50] loss=4.00 avg=4.50", "[4 | 10.60] loss=4.00 avg=4.50"]

    terminal = io.StringIO()
    with Progress(console=Console(file=terminal, width=200, force_terminal=True)) as progress:
        reporter = RichReporter(progress)
        reporter.on_start(100, 0)
        reporter.on_step(1, 4.0, 4.5, 0.5)
        assert terminal.getvalue().count("[1 | 0.50]") <= 1  # the bar itself, no extra line


def test_an_evaluation_with_nothing_held_out_says_so():
    out = io.StringIO()
    with Progress(console=Console(file=out, width=200)) as progress:
        RichReporter(progress).on_eval(5, float("nan"), False)
    assert "step 5: no held-out documents to validate on" in out.getvalue()
    assert "inf" not in out.getvalue() and "nan" not in out.getvalue()


def test_a_corpus_with_nothing_held_out_is_trained_with_a_warning_and_no_nan(env, tmp_path: Path,
                                                                            tiny_gpt2_dir: Path):
    """One document (a whole book in one post): nothing can be held out. The run said
    "validation loss nan, perplexity inf" at each evaluation and "perplexity nan (base) → nan"."""
    source = tmp_path / "book.txt"
    source.write_text("Patience is the art of hoping slowly. " * 60)
    corpus = tmp_path / "book.jsonl"
    built = persona("corpus", "build", str(source), "-o", str(corpus), "--base", "", env=env)
    assert built.returncode == 0, built.stderr
    assert "too few documents to hold any out" in " ".join(built.stderr.split())

    trained = persona("train", "book", "--corpus", str(corpus), "--base", str(tiny_gpt2_dir), "--steps", "3", env=env)
    assert trained.returncode == 0, trained.stderr
    assert "holds no held-out documents" in " ".join(trained.stderr.split())
    # Said once, not at each of the three evaluations.
    assert trained.stdout.count("no held-out documents to validate on") == 1
    assert "step 1: no held-out documents to validate on" in trained.stdout
    assert "finished after 3 steps; no held-out perplexity" in trained.stdout
    assert not any(wrong in trained.stdout for wrong in ("loss nan", "perplexity inf", "perplexity nan", "→ nan"))
    # Its checkpoint.json held nulls, which `checkpoints` and `personas validate` called unreadable.
    listed = persona("checkpoints", "book", env=env)
    assert listed.returncode == 0 and "unusable" not in listed.stdout, listed.stdout
    assert re.search(r"\* │ v1 .*steps=3", listed.stdout), listed.stdout
    validated = persona("personas", "validate", env=env)
    assert validated.returncode == 0, validated.stdout + validated.stderr


def test_bad_option_values_are_one_line_naming_the_option(env, tmp_path: Path):
    result = persona("train", "x", "--corpus", str(tmp_path / "c.jsonl"), "--learning-rate", "0", env=env)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stderr == "error: --learning-rate: input should be greater than 0\n"


@pytest.mark.parametrize("command", ["train", "eval"])
def test_an_unknown_device_is_refused_as_the_worker_refuses_it(env, tmp_path: Path, command: str):
    """`train --device gpu` said "--device: input should be 'auto', 'cpu' or 'cuda'" where `worker` says
    "unknown device 'gpu'; choose one of auto, cpu, cuda"; `eval` had no --device (it took
    PERSONA_WORKER__DEVICE without a word)."""
    result = persona(command, "x", "--corpus", str(tmp_path / "c.jsonl"), "--device", "gpu", env=env)
    assert result.returncode == 1, result.stderr
    assert result.stderr == "error: unknown device 'gpu'; choose one of auto, cpu, cuda\n"


def test_steps_and_epochs_together_are_refused_saying_which_to_keep(env, tmp_path: Path):
    """Both given, --steps silently won: a run asked for 3 epochs stopped after 40 steps."""
    result = persona("train", "x", "--corpus", str(tmp_path / "c.jsonl"), "--steps", "40", "--epochs", "3", env=env)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    said = " ".join(result.stderr.split())
    assert "error: --steps and --epochs both set how long the run is; keep --steps for an exact number of " \
           "optimiser steps, or --epochs for passes over the corpus, not both" in said


def test_eval_json_of_a_wrecked_model_is_valid_json(env, settings: Settings, tmp_path: Path, tiny_gpt2_dir: Path):
    """A model that gives the held-out writing next to no probability has an infinite
    perplexity: `eval --json` printed a bare Infinity, which JSON parsers refuse."""
    wrecked = tmp_path / "wrecked"
    model = AutoModelForCausalLM.from_pretrained(tiny_gpt2_dir)
    with torch.no_grad():
        model.get_input_embeddings().weight.mul_(3000)
    model.save_pretrained(wrecked)
    AutoTokenizer.from_pretrained(tiny_gpt2_dir).save_pretrained(wrecked)
    corpus = tmp_path / "c.jsonl"
    sayings = [entry.strip().split("\n")[0] for entry in SAYINGS.split("%") if entry.strip()]
    corpus.write_text("".join(json.dumps({"text": text}) + "\n" for text in sayings))
    settings.user_personas_dir.mkdir(parents=True)
    (settings.user_personas_dir / "wreck.toml").write_text(
        tomli_w.dumps(persona_template("wreck", str(tiny_gpt2_dir), str(wrecked), corpus)))

    evaluated = persona("eval", "wreck", "--corpus", str(corpus), "--json", "--samples", "1", env=env)
    assert evaluated.returncode == 0, evaluated.stderr
    report = json.loads(evaluated.stdout, parse_constant=lambda word: pytest.fail(f"not JSON: {word}"))
    assert report["perplexity"] is None and report["not_finite"] == {"perplexity": "inf"}
    assert report["loss"] > 700 and report["base_perplexity"] > 1


# Presses Ctrl-C twice (PRESSES times) inside optimiser step STEP of a real `persona train`, as a hurried hand does;
# or sends the signal SIGNAL names (SIGTERM: `kill`; SIGHUP: the terminal closed) instead of Ctrl-C's SIGINT.
_TWO_PRESSES = """
import os, signal, sys
from torch.optim.optimizer import register_optimizer_step_post_hook
seen = []
def press(optimizer, args, kwargs):
    seen.append(1)
    if len(seen) == int(os.environ["PRESS_AT_STEP"]):
        for _ in range(int(os.environ.get("PRESSES", "2"))):
            os.kill(os.getpid(), getattr(signal, os.environ.get("SIGNAL", "SIGINT")))
register_optimizer_step_post_hook(press)
from persona.cli import main
sys.argv[0] = "persona"
main()
"""


@pytest.mark.parametrize("step", [1, 3], ids=["before-any-save", "after-a-save"])
def test_a_second_ctrl_c_says_whether_and_how_the_run_continues(env, tmp_path: Path, tiny_gpt2_dir: Path, step: int):
    """The second Ctrl-C stops at once: typer ended with status 130 and not a word, after
    "Ctrl-C again to stop at once", so nobody knew the run could be continued."""
    corpus = tmp_path / "c.jsonl"
    sayings = [entry.strip().split("\n")[0] for entry in SAYINGS.split("%") if entry.strip()]
    corpus.write_text("".join(json.dumps({"text": text}) + "\n" for text in sayings))  # 1 held out of 10
    args = ["train", "hasty", "--corpus", str(corpus), "--base", str(tiny_gpt2_dir), "--steps", "6",
            "--eval-every", "2", "--batch-size", "2"]
    stopped = subprocess.run([sys.executable, "-c", _TWO_PRESSES, *args], env=env | {"PRESS_AT_STEP": str(step)},
                             capture_output=True, text=True, timeout=120, check=False)
    assert stopped.returncode == 130, stopped.stderr
    if step == 1:
        assert "before the run saved anything; start it again without --resume" in stopped.stdout
        return
    hint = stopped.stdout.split("continue from the run's last save with `")[1].split("`")[0]
    assert "measuring the base model on 1 held-out documents..." in stopped.stdout  # said before the silent minutes
    assert "if you will not continue it, delete it with `rm -r " in " ".join(stopped.stdout.split())
    assert shlex.split(hint) == ["persona", "train", "hasty", "--corpus", str(corpus), "--resume"]
    resumed = persona(*shlex.split(hint)[1:], env=env)
    assert resumed.returncode == 0, resumed.stderr
    assert "registered hasty v1" in resumed.stdout


def test_corpus_build_into_a_folder_or_an_unwritable_place_says_so(env, tmp_path: Path):
    (tmp_path / "sage.txt").write_text("A post that stays.")
    folder = tmp_path / "out"
    folder.mkdir()
    into_folder = persona("corpus", "build", str(tmp_path / "sage.txt"), "-o", str(folder), "--base", "", env=env)
    assert into_folder.returncode == 1 and "Traceback" not in into_folder.stderr
    assert f"e.g. -o {folder / 'corpus.jsonl'}" in " ".join(into_folder.stderr.split())
    blocked = tmp_path / "a-file"
    blocked.write_text("")
    under_a_file = persona("corpus", "build", str(tmp_path / "sage.txt"), "-o", str(blocked / "c.jsonl"),
                           "--base", "", env=env)
    assert under_a_file.returncode == 1 and "Traceback" not in under_a_file.stderr
    assert "cannot write the corpus to" in " ".join(under_a_file.stderr.split())


def test_a_run_that_ends_worse_than_its_base_says_so(env, tmp_path: Path, tiny_gpt2_dir: Path):
    """Only the run's own evaluations compete for "best": a rate that wrecks the model from
    its first step was registered with no word that the base model was better."""
    corpus = tmp_path / "c.jsonl"
    sayings = [entry.strip().split("\n")[0] for entry in SAYINGS.split("%") if entry.strip()]
    corpus.write_text("".join(json.dumps({"text": text}) + "\n" for text in sayings))
    wrecked = persona("train", "wrecked", "--corpus", str(corpus), "--base", str(tiny_gpt2_dir), "--full",
                      "--learning-rate", "5", "--steps", "2", "--eval-every", "1", env=env)
    assert wrecked.returncode == 0, wrecked.stderr
    assert "predict the held-out writing worse than the base model" in " ".join(wrecked.stderr.split())


def test_a_data_dir_that_cannot_be_written_is_one_line_saying_what_to_set(env, tmp_path: Path, tiny_gpt2_dir: Path):
    """A data directory under a file (or on a read-only disk) ended `persona train` in a
    NotADirectoryError traceback from the run's lock."""
    corpus = tmp_path / "c.jsonl"
    corpus.write_text("".join(json.dumps({"text": t}) + "\n" for t in ["One saying.", "Another saying."]))
    blocked = tmp_path / "a-file"
    blocked.write_text("")
    result = persona("train", "x", "--corpus", str(corpus), "--base", str(tiny_gpt2_dir), "--steps", "1",
                     env=env | {"PERSONA_DATA_DIR": str(blocked / "data")})
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
    said = " ".join(result.stderr.split())
    assert f"cannot keep data in {blocked / 'data'}" in said and "set PERSONA_DATA_DIR" in said
    assert result.stdout == "", result.stdout  # it said "loading the base model..." first


def test_a_persona_already_training_is_refused_before_anything_loads(env, settings: Settings, tmp_path: Path,
                                                                     tiny_gpt2_dir: Path):
    """A second `persona train` of a persona in training printed "loading the base model..."
    (and warned that it would replace the first run's state) before it was refused."""
    import fcntl

    corpus = tmp_path / "c.jsonl"
    sayings = [entry.strip().split("\n")[0] for entry in SAYINGS.split("%") if entry.strip()]
    corpus.write_text("".join(json.dumps({"text": text}) + "\n" for text in sayings))
    runs = settings.data_dir / "runs"
    (runs / "busy").mkdir(parents=True)
    (runs / "busy" / "state.pt").write_bytes(b"the first run's save")
    with (runs / "busy.lock").open("a+") as lock:  # held as a run in another process holds it
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        result = persona("train", "busy", "--corpus", str(corpus), "--base", str(tiny_gpt2_dir), "--steps", "1",
                         env=env)
    assert result.returncode == 1 and "is already being trained" in result.stderr, result.stderr
    assert result.stdout == "" and "unfinished run" not in result.stderr, result.stdout + result.stderr


def test_the_time_left_never_runs_past_the_time_budget():
    """A `--max-minutes 2` run on the bundled model showed "0:06:06" left: the pace of the
    35 planned steps, most of which the budget would never reach."""
    clock = [1000.0]
    with Progress(*RichReporter.columns(), console=Console(file=io.StringIO(), width=200),
                  get_time=lambda: clock[0], auto_refresh=False) as progress:
        reporter = RichReporter(progress, max_minutes=2)
        reporter.on_start(35, 0)
        for step in range(1, 7):  # 5 s a step: 29 more steps would take 2:25
            clock[0] += 5
            reporter.on_step(step, 4.0, 4.5, 5.0 * step)
        left = [str(column.render(progress.tasks[0])) for column in progress.columns]
        assert "0:01:30" in left and "0:02:25" not in left  # 120 s of budget less the 30 spent
        clock[0] += 100  # an evaluation ran on past the budget
        assert "0:00:00" in [str(column.render(progress.tasks[0])) for column in progress.columns]

    clock = [1000.0]
    with Progress(*RichReporter.columns(), console=Console(file=io.StringIO(), width=200),
                  get_time=lambda: clock[0], auto_refresh=False) as progress:
        reporter = RichReporter(progress)  # no budget: the steps' pace alone
        reporter.on_start(35, 0)
        for step in range(1, 7):
            clock[0] += 5
            reporter.on_step(step, 4.0, 4.5, 5.0 * step)
        assert "0:02:25" in [str(column.render(progress.tasks[0])) for column in progress.columns]


def test_a_measurement_of_the_held_out_writing_shows_how_far_it_is_and_the_time_left():
    """Measuring the base model on a thousand held-out fortunes: 6.5 minutes before step 1 without
    a count or an estimate. Into a pipe, a line every ten seconds; on a terminal, a bar of its own."""
    clock = [1000.0]
    out = io.StringIO()  # not a terminal, as a pipe is not
    with Progress(*RichReporter.columns(), console=Console(file=out, width=200), get_time=lambda: clock[0],
                  auto_refresh=False) as progress:
        reporter = RichReporter(progress)
        reporter.on_measure("measuring the base model on 1000 held-out documents", 4000)
        for done in range(100, 4001, 100):  # 100 tokens every 2 s: 80 s in all
            clock[0] += 2
            reporter.on_measure_advance(done)
        reporter.on_start(10, 0)
    lines = out.getvalue().splitlines()
    assert lines[:3] == ["measuring the base model on 1000 held-out documents...",
                         "measuring the base model on 1000 held-out documents: 12%, about 1m10s left",
                         "measuring the base model on 1000 held-out documents: 25%, about 1m00s left"], lines
    assert "measuring the base model on 1000 held-out documents: done in 1m20s" in lines

    terminal = io.StringIO()
    with Progress(*RichReporter.columns(), console=Console(file=terminal, width=200, force_terminal=True),
                  get_time=lambda: clock[0], auto_refresh=False) as progress:
        reporter = RichReporter(progress)
        reporter.on_measure("measuring the best weights (step 4) on all 1000 held-out documents", 4000)
        for done in (500, 1000):
            clock[0] += 5
            reporter.on_measure_advance(done)
        shown = [str(column.render(progress.tasks[0])) for column in progress.columns]
        assert shown[0] == "measuring the best weights (step 4) on all 1000 held-out documents"
        assert shown[2:] == ["25%", "0:00:30"]
        reporter.on_measure_advance(4000)
        assert progress.tasks == []  # the bar gives way to the line saying how long it took
    assert "measuring the best weights (step 4) on all 1000 held-out documents: done in 10s" in terminal.getvalue()


def test_a_run_stopped_by_its_time_budget_ends_with_a_full_bar_saying_why():
    """A `--max-minutes 2` run's bar ended at `16/35`, as if it had broken off."""
    out = io.StringIO()
    with Progress(*RichReporter.columns(), console=Console(file=out, width=200)) as progress:
        reporter = RichReporter(progress, max_minutes=2)
        reporter.on_start(35, 0)
        reporter.on_step(16, 4.0, 4.5, 121.0)
        reporter.on_end("time-limit")
    last = out.getvalue().splitlines()[-1]
    assert "16/16" in last and "--max-minutes is up" in last, last


def test_a_sample_reads_on_from_its_prefix_as_the_model_wrote_it():
    """Replies came back stripped, so `persona generate --prefix "Life is"` printed "Life
    isoften used...". A continuation now keeps its own leading space (see
    test_engine's test_a_continuation_keeps_its_leading_space), and is joined as written:
    "Tomor" + "row" is one word, " often" another."""
    from persona.cli.generate_cmd import _finish

    assert _finish(" often used.", "Life is", True, None) == "Life is often used."
    assert _finish("row, then.", "Tomor", True, None) == "Tomorrow, then."
    assert _finish(", said he.", "Life is", True, None) == "Life is, said he."
    assert _finish(" often used.", "Life is", False, None) == "often used."
    assert _finish(" often. Then more", "Life is", True, ".") == "Life is often"


def test_a_new_run_over_an_unfinished_one_is_refused_unless_restarted(env, settings: Settings, tmp_path: Path,
                                                                      tiny_gpt2_dir: Path):
    """Forgetting --resume after a Ctrl-C threw the saved run away, with only a warning to press
    Ctrl-C in time. It is refused before torch loads, naming both ways on; --restart discards it."""
    from training.runs import train_persona
    from training.trainer import TrainConfig

    corpus = tmp_path / "c.jsonl"
    sayings = [entry.strip().split("\n")[0] for entry in SAYINGS.split("%") if entry.strip()]
    corpus.write_text("".join(json.dumps({"text": text}) + "\n" for text in sayings))
    config = TrainConfig(base=str(tiny_gpt2_dir), steps=4, batch_size=2, eval_every=1, samples=0)
    assert train_persona(settings, "redo", corpus, config, reporter=Recorder(stop_at=1)).checkpoint is None
    saved = (settings.data_dir / "runs" / "redo" / "state.pt").read_bytes()
    args = ["train", "redo", "--corpus", str(corpus), "--base", str(tiny_gpt2_dir), "--steps", "2", "--batch-size", "2"]

    refused, imported = persona_imports(*args, env=env)
    assert refused.returncode == 1 and "torch" not in imported, refused.stderr
    said = " ".join(refused.stderr.split())
    assert "persona 'redo' has an unfinished training run (stopped at step 1 of 4, saved " in said
    assert f"continue it with `{shlex.join(['persona', 'train', 'redo', '--corpus', str(corpus), '--resume'])}`" in said
    assert "or discard it and start over by running this command again with --restart" in said
    assert (settings.data_dir / "runs" / "redo" / "state.pt").read_bytes() == saved

    both = persona(*args, "--resume", "--restart", env=env)
    assert both.returncode == 1 and "give one of them" in both.stderr, both.stderr

    restarted = persona(*args, "--restart", env=env)
    assert restarted.returncode == 0, restarted.stderr
    assert "finished after 2 steps" in restarted.stdout and "registered redo v1" in restarted.stdout
    assert not (settings.data_dir / "runs" / "redo").exists()


def test_a_new_version_of_a_persona_is_served_only_by_a_swap(env, settings: Settings, tmp_path: Path,
                                                            tiny_gpt2_dir: Path):
    """Training moved an existing persona's file to the new version, so workers that were never
    swapped switched to it unasked (and `rollback` had nothing to go back to); where a swap had
    set the version, it said "now uses v2" while workers went on serving v1."""
    from training.runs import train_persona
    from training.trainer import TrainConfig

    corpus = tmp_path / "c.jsonl"
    sayings = [entry.strip().split("\n")[0] for entry in SAYINGS.split("%") if entry.strip()]
    corpus.write_text("".join(json.dumps({"text": text}) + "\n" for text in sayings))
    config = TrainConfig(base=str(tiny_gpt2_dir), steps=1, batch_size=2, samples=0)
    first = train_persona(settings, "wilde", corpus, config)  # a new persona: its file names v1, served at once
    assert first.persona_file_created
    written = first.persona_file.read_text()

    second = persona("train", "wilde", "--corpus", str(corpus), "--steps", "1", "--batch-size", "2", "--seed", "1",
                     env=env)
    assert second.returncode == 0, second.stderr
    assert "registered wilde v2 at " in second.stdout
    assert "it is not served yet: `persona swap wilde v2` serves it (and `persona rollback wilde` returns to what " \
           "is served now)" in " ".join(second.stdout.split())
    assert first.persona_file.read_text() == written


def test_a_run_stopped_by_its_time_budget_says_how_far_it_got_of_its_plan(env, tmp_path: Path, tiny_gpt2_dir: Path):
    """It said "time-limit: best at step 23 of 23" for a run planned for 255 steps."""
    corpus = tmp_path / "c.jsonl"
    sayings = [entry.strip().split("\n")[0] for entry in SAYINGS.split("%") if entry.strip()]
    corpus.write_text("".join(json.dumps({"text": text}) + "\n" for text in sayings))
    trained = persona("train", "brief", "--corpus", str(corpus), "--base", str(tiny_gpt2_dir), "--steps", "100000",
                      "--max-minutes", "0.01", "--batch-size", "2", env=env)
    assert trained.returncode == 0, trained.stderr
    ran = re.search(r"time-limit after (\d+) of 100000 planned steps; best at step (\d+); held-out perplexity",
                    trained.stdout)
    assert ran and int(ran[2]) <= int(ran[1]) < 100000, trained.stdout[-2000:]


def test_train_says_how_far_its_measurements_are_and_where_to_ask_its_persona(env, tmp_path: Path,
                                                                             tiny_gpt2_dir: Path):
    """On a thousand held-out fortunes, `persona train` sat silent 6.5 minutes measuring the base model
    and 5 more measuring the best weights; and it ended with "try `persona ask ...`", which fails
    unless the service runs."""
    corpus = tmp_path / "c.jsonl"
    sayings = [entry.strip().split("\n")[0] for entry in SAYINGS.split("%") if entry.strip()]
    rows = [{"text": text, "split": "train"} for text in sayings]
    rows += [{"text": f"{text} ({n})", "split": "validation"} for n in range(30) for text in sayings]  # past eval_tokens
    corpus.write_text("".join(json.dumps(row) + "\n" for row in rows))
    trained = persona("train", "measured", "--corpus", str(corpus), "--base", str(tiny_gpt2_dir), "--steps", "1",
                      "--batch-size", "2", env=env)
    assert trained.returncode == 0, trained.stderr
    lines = trained.stdout.splitlines()
    assert lines.index("measuring the base model on 300 held-out documents...") < \
        next(i for i, line in enumerate(lines) if line.startswith("[1 | "))
    assert "measuring the best weights (step 1) on all 300 held-out documents..." in lines
    assert len([line for line in lines if re.fullmatch(r"measuring .* held-out documents: done in \d+s", line)]) == 2
    assert "with `persona up` running (start it if it is not), try `persona ask measured hello`" in \
        " ".join(trained.stdout.split())


def test_train_shows_the_run_not_the_libraries_chatter(env, tmp_path: Path, tiny_gpt2_dir: Path):
    """Every run opened with transformers' "Loading weights" bar and warnings about peft's
    and transformers' own internals (a FutureWarning with a site-packages path)."""
    corpus = tmp_path / "c.jsonl"
    sayings = [entry.strip().split("\n")[0] for entry in SAYINGS.split("%") if entry.strip()]
    corpus.write_text("".join(json.dumps({"text": text}) + "\n" for text in sayings))
    trained = persona("train", "quiet", "--corpus", str(corpus), "--base", str(tiny_gpt2_dir), "--steps", "1",
                      env=env)
    assert trained.returncode == 0, trained.stderr
    for chatter in ("Loading weights", "FutureWarning", "UserWarning", "site-packages"):
        assert chatter not in trained.stderr + trained.stdout, trained.stderr


def test_a_corpus_from_a_pipe_is_trained_on_and_kept(env, settings: Settings, tmp_path: Path, tiny_gpt2_dir: Path):
    """`persona train NAME --corpus <(zcat c.jsonl.gz)` said the corpus "does not exist"."""
    import threading

    sayings = [entry.strip().split("\n")[0] for entry in SAYINGS.split("%") if entry.strip()]
    content = "".join(json.dumps({"text": text}) + "\n" for text in sayings)
    pipe = tmp_path / "pipe"
    os.mkfifo(pipe)

    def write() -> None:
        with pipe.open("w") as writer:  # waits for the reader, as a shell's <(...) does
            writer.write(content)

    threading.Thread(target=write, daemon=True).start()
    trained = persona("train", "piped", "--corpus", str(pipe), "--base", str(tiny_gpt2_dir), "--steps", "1",
                      env=env)
    assert trained.returncode == 0, trained.stderr
    kept = Path(tomllib.loads((settings.user_personas_dir / "piped.toml").read_text())["filters"]["corpus"])
    assert kept.parent == settings.data_dir / "corpora" and f"kept a copy at {kept}" in " ".join(trained.stdout.split())
    assert sorted(json.loads(line)["text"] for line in kept.read_text().splitlines()) == sorted(sayings)


def test_an_interrupted_run_says_what_it_keeps_and_resumes_from_anywhere(env, settings: Settings, tmp_path: Path,
                                                                        tiny_gpt2_dir: Path):
    """Ctrl-C says how to resume in words a shell reads back (a path with brackets and quotes).
    Started with a relative --corpus, it said to resume with that (and kept it in run.json), wrong
    from any other directory; it kept its folder (1.5 GB for a --full run of the bundled model)
    without a word."""
    here, elsewhere = tmp_path / "here", tmp_path / "elsewhere"
    corpus = here / "my [draft] notes" / "it's mine.jsonl"
    corpus.parent.mkdir(parents=True)
    elsewhere.mkdir()
    sayings = [entry.strip().split("\n")[0] for entry in SAYINGS.split("%") if entry.strip()]
    corpus.write_text("".join(json.dumps({"text": text}) + "\n" for text in sayings))
    args = ["train", "roving", "--corpus", str(corpus.relative_to(here)), "--base", str(tiny_gpt2_dir),
            "--steps", "6", "--eval-every", "2", "--batch-size", "2"]
    stopped = subprocess.run([sys.executable, "-c", _TWO_PRESSES, *args], env=env | {"PRESS_AT_STEP": "3",
                             "PRESSES": "1"}, cwd=here, capture_output=True, text=True, timeout=120, check=False)
    assert stopped.returncode == 130, stopped.stderr
    said = " ".join(stopped.stdout.split())
    hint = said.split("interrupted at step 3; continue with `")[1].split("`")[0]
    assert shlex.split(hint) == ["persona", "train", "roving", "--corpus", str(corpus), "--resume"]
    folder = settings.data_dir / "runs" / "roving"
    assert "the run's saved state takes " in said and f" KB in {folder};" in said
    assert f"if you will not continue it, delete it with `{shlex.join(['rm', '-r', str(folder)])}`" in said

    resumed = subprocess.run([sys.executable, "-m", "persona", "train", "roving", "--resume"], env=env, cwd=elsewhere,
                             capture_output=True, text=True, timeout=120, check=False)  # on the run's own corpus
    assert resumed.returncode == 0, resumed.stderr
    assert "registered roving v1" in resumed.stdout


@pytest.mark.parametrize(("stop_signal", "status"), [("SIGTERM", 143), ("SIGHUP", 129)])
def test_a_run_stopped_by_sigterm_or_sighup_exits_with_that_signals_status(env, tmp_path: Path, tiny_gpt2_dir: Path,
                                                                           stop_signal: str, status: int):
    """Stopped by `kill` or a closed terminal, a run exited 130, Ctrl-C's status, where `persona ask`
    exits 143 and 129: a script or supervisor could not tell who stopped it. It still says how to continue."""
    corpus = tmp_path / "c.jsonl"
    sayings = [entry.strip().split("\n")[0] for entry in SAYINGS.split("%") if entry.strip()]
    corpus.write_text("".join(json.dumps({"text": text}) + "\n" for text in sayings))
    args = ["train", "stopped", "--corpus", str(corpus), "--base", str(tiny_gpt2_dir), "--steps", "4",
            "--eval-every", "2", "--batch-size", "2"]
    stopped = subprocess.run([sys.executable, "-c", _TWO_PRESSES, *args], capture_output=True, text=True, timeout=120,
                             env=env | {"PRESS_AT_STEP": "1", "PRESSES": "1", "SIGNAL": stop_signal}, check=False)
    assert stopped.returncode == status, stopped.stderr
    assert "interrupted at step 1; continue with `persona train stopped --corpus " in " ".join(stopped.stdout.split())


def test_eval_of_a_persona_whose_first_run_was_interrupted_says_how_to_finish_it(env, settings: Settings,
                                                                                 tmp_path: Path, tiny_gpt2_dir: Path):
    """Its persona file is written when the run registers a checkpoint: `eval`, `export` and
    `generate` said "unknown persona", with no word of the run."""
    from training.runs import train_persona
    from training.trainer import TrainConfig

    corpus = tmp_path / "c.jsonl"
    sayings = [entry.strip().split("\n")[0] for entry in SAYINGS.split("%") if entry.strip()]
    corpus.write_text("".join(json.dumps({"text": text}) + "\n" for text in sayings))
    config = TrainConfig(base=str(tiny_gpt2_dir), steps=4, batch_size=2, eval_every=1, samples=0)
    assert train_persona(settings, "halfway", corpus, config, reporter=Recorder(stop_at=1)).checkpoint is None
    early = persona("eval", "halfway", "--corpus", str(corpus), env=env)
    assert early.returncode == 1 and "unknown persona" not in early.stderr, early.stderr
    said = " ".join(early.stderr.split())
    assert "persona 'halfway' has nothing to measure yet: its first training run was interrupted before it " \
           "registered a checkpoint; finish it with `persona train halfway --corpus " in said


def test_export_says_what_is_wrong_with_its_output_before_loading_the_model(settings: Settings, tmp_path: Path):
    """An -o under a file, or where nothing can be written, was a traceback, and only after the
    model had loaded (minutes for a big one); -o naming a file was "not empty"."""
    from persona.errors import ConfigError, ModelError
    from persona.personas import load_persona_file
    from training.export import export_persona

    checkpoint = tmp_path / "v1"
    checkpoint.mkdir()
    made = tmp_path / "hollow.toml"  # its base is not there: loading it would be refused
    made.write_text(tomli_w.dumps(persona_template("hollow", str(tmp_path / "no-model-here"), str(checkpoint),
                                                   tmp_path / "c.jsonl")))
    hollow = load_persona_file(made)
    a_file = tmp_path / "a-file"
    a_file.write_text("")
    with pytest.raises(ConfigError, match=f"{a_file} is a file, so {a_file / 'model'} cannot be made under it"):
        export_persona(settings, hollow, a_file / "model")
    with pytest.raises(ConfigError, match=f"{a_file} is a file; name a new folder"):
        export_persona(settings, hollow, a_file)
    with pytest.raises(ModelError, match="--checkpoint base names the base model, not a fine-tuned checkpoint"):
        export_persona(settings, hollow, tmp_path / "out", version="base")
    assert not (tmp_path / "out").exists()


def _untrained_persona(settings: Settings, tmp_path: Path, base: Path, name: str) -> Path:
    """A persona on ``base`` with no checkpoint, and a corpus of sayings to measure it on."""
    corpus = tmp_path / "c.jsonl"
    sayings = [entry.strip().split("\n")[0] for entry in SAYINGS.split("%") if entry.strip()]
    corpus.write_text("".join(json.dumps({"text": text}) + "\n" for text in sayings))
    settings.user_personas_dir.mkdir(parents=True)
    made = persona_template(name, str(base), "", corpus)
    del made["model"]["checkpoint"]
    (settings.user_personas_dir / f"{name}.toml").write_text(tomli_w.dumps(made))
    return corpus


def test_eval_of_a_persona_without_a_checkpoint_says_it_measured_the_base(env, settings: Settings, tmp_path: Path,
                                                                         tiny_gpt2_dir: Path):
    """"perplexity: base 420.08 → persona 420.08" read as a training run that did nothing."""
    corpus = _untrained_persona(settings, tmp_path, tiny_gpt2_dir, "plain")
    evaluated = persona("eval", "plain", "--corpus", str(corpus), "--samples", "1", env=env)
    assert evaluated.returncode == 0, evaluated.stderr
    said = " ".join(evaluated.stdout.split())
    assert "of the base model: plain has no fine-tuned checkpoint to compare" in said and "→" not in said


def test_eval_names_the_corpus_to_measure_with_and_says_what_no_copy_means(env, settings: Settings, tmp_path: Path,
                                                                            tiny_gpt2_dir: Path):
    """Given another corpus, eval said "measure with the corpus file it was trained on" without naming
    it; and "(longest run 0 words)" of samples that shared four-word runs with the corpus."""
    from training.runs import train_persona
    from training.trainer import TrainConfig

    corpus = tmp_path / "c.jsonl"
    sayings = [entry.strip().split("\n")[0] for entry in SAYINGS.split("%") if entry.strip()]
    corpus.write_text("".join(json.dumps({"text": text}) + "\n" for text in sayings))
    train_persona(settings, "essayist", corpus, TrainConfig(base=str(tiny_gpt2_dir), steps=1, batch_size=4, samples=0))
    grown = tmp_path / "grown.jsonl"
    grown.write_text(corpus.read_text() + json.dumps({"text": "Every lamp runs out of oil."}) + "\n")
    evaluated = persona("eval", "essayist", "--corpus", str(grown), "--samples", "2", env=env)
    assert evaluated.returncode == 0, evaluated.stderr
    warned = " ".join(evaluated.stderr.split())
    assert f"measure with the corpus file it was trained on, {corpus}: `persona eval essayist --corpus {corpus}`" in warned
    assert "copied 8+ words or a whole entry verbatim: 0% of 2 samples (no run of 8 or more words in common with " \
           "the corpus)" in " ".join(evaluated.stdout.split())


def test_eval_says_what_it_is_doing_on_stderr_and_prints_only_json_on_stdout(env, settings: Settings,
                                                                             tmp_path: Path, tiny_gpt2_dir: Path):
    """`persona eval` on the bundled model took a minute with nothing said between the model
    loading and the results."""
    corpus = _untrained_persona(settings, tmp_path, tiny_gpt2_dir, "plain")
    evaluated = persona("eval", "plain", "--corpus", str(corpus), "--samples", "2", "--json", env=env)
    assert evaluated.returncode == 0, evaluated.stderr
    assert json.loads(evaluated.stdout)["version"] == "base"  # stdout: the report alone
    # The sayings are a hand-made corpus: a warning that it was not cleaned comes first.
    said = [line for line in evaluated.stderr.splitlines() if "was not written by `persona corpus build`" not in line]
    assert said[:3] == [f"loading the base model {tiny_gpt2_dir}...",
                        "measuring the base model on 1 held-out documents...",
                        "writing 2 samples, as its posts are written..."], evaluated.stderr


def test_eval_and_export_take_threads_as_train_does(env, settings: Settings, tmp_path: Path, tiny_gpt2_dir: Path):
    """On two cores shared with other work, `persona eval` took every core: it had no --threads,
    while `persona train` did."""
    corpus = _untrained_persona(settings, tmp_path, tiny_gpt2_dir, "plain")
    all_cores = {k: v for k, v in env.items() if k != "OMP_NUM_THREADS"}
    evaluated = persona("eval", "plain", "--corpus", str(corpus), "--samples", "1", "--threads", "1", "--json",
                        env=all_cores)
    assert evaluated.returncode == 0, evaluated.stderr
    assert json.loads(evaluated.stdout)["threads"] == 1
    refused = persona("eval", "plain", "--corpus", str(corpus), "--threads", "0", env=all_cores)
    assert refused.returncode == 2 and "--threads" in refused.stderr
    assert "--threads" in persona("export", "--help", env=env).stdout


# `persona ARGS` as the console script runs it; then, last on stderr, the CPU threads torch ran on.
_THREADS_PROBE = """
import atexit, sys
atexit.register(lambda: print(f"torch threads: {sys.modules['torch'].get_num_threads()}", file=sys.stderr))
from persona.cli import main
sys.argv[0] = "persona"
main()
"""


@pytest.mark.skipif((os.cpu_count() or 1) < 2, reason="torch's default is one thread on one core")
def test_train_eval_and_export_take_their_threads_from_the_worker_setting(env, tmp_path: Path, tiny_gpt2_dir: Path):
    """The README tells a busy machine to set PERSONA_WORKER__THREADS=1: `worker` and `bench` took it,
    while `train`, `eval` and `export` ran on every core unless given --threads."""
    corpus = tmp_path / "c.jsonl"
    sayings = [entry.strip().split("\n")[0] for entry in SAYINGS.split("%") if entry.strip()]
    corpus.write_text("".join(json.dumps({"text": text}) + "\n" for text in sayings))
    busy = {k: v for k, v in env.items() if k != "OMP_NUM_THREADS"} | {"PERSONA_WORKER__THREADS": "1"}

    def probed(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-c", _THREADS_PROBE, *args], env=busy, capture_output=True, text=True,
                              timeout=120, check=False)

    trained = probed("train", "frugal", "--corpus", str(corpus), "--base", str(tiny_gpt2_dir), "--steps", "1",
                     "--batch-size", "2")
    assert trained.returncode == 0 and trained.stderr.endswith("torch threads: 1\n"), trained.stderr
    exported = probed("export", "frugal", "-o", str(tmp_path / "out"))
    assert exported.returncode == 0 and exported.stderr.endswith("torch threads: 1\n"), exported.stderr
    evaluated = persona("eval", "frugal", "--corpus", str(corpus), "--samples", "1", "--device", "cpu", "--json",
                        env=busy)
    assert evaluated.returncode == 0, evaluated.stderr
    assert json.loads(evaluated.stdout)["threads"] == 1


def test_help_names_the_arguments_and_says_each_option_whole(env):
    """`persona train --help` read `Usage: persona train [OPTIONS] {name}` (then `{NAME}`), and in an 80-column
    terminal `corpus build --help` cut --format off as "auto|text|markdown|csv|json…"."""
    narrow = env | {"COLUMNS": "80"}
    usage = persona("train", "--help", env=narrow).stdout
    assert "persona train [OPTIONS] NAME" in usage and "{name}" not in usage and "{NAME}" not in usage
    # The measurements at the start and the end took minutes each, outside --max-minutes, unsaid.
    assert "On top come loading the model, the first measurement of the base model on every held-out document, " \
           "the step in hand, and the final measurement of the best weights on every held-out document" in \
           " ".join(usage.replace("│", " ").split())
    build = persona("corpus", "build", "--help", env=narrow).stdout
    assert "…" not in build and "tweets, fortune or html" in " ".join(build.replace("│", " ").split())


def test_samples_say_once_how_they_are_written():
    """Samples that began mid-word ("-upcasting. This phrase...") read as a broken sampler: they
    are what its posts would be, and the run says so once."""
    out = io.StringIO()
    with Progress(console=Console(file=out, width=300)) as progress:
        reporter = RichReporter(progress)
        reporter.on_samples(3, ["-upcasting. This phrase"])
        reporter.on_samples(6, ["There is only one thing"])
    assert out.getvalue().count("samples are written from nothing, as its posts") == 1


def test_a_run_an_older_version_recorded_with_a_relative_corpus_is_continued_as_recorded(env, settings: Settings,
                                                                                          tmp_path: Path,
                                                                                          tiny_gpt2_dir: Path):
    """Older versions recorded --corpus as typed ("../corpus.jsonl"); `personas list` made it
    absolute from wherever it was run, and named a file that was never there (`/../corpus.jsonl`)."""
    from training.run_folder import RUN_FILE, run_dir
    from training.runs import train_persona
    from training.trainer import TrainConfig

    corpus = tmp_path / "sayings.jsonl"
    corpus.write_text("".join(json.dumps({"text": t}) + "\n" for t in SAYINGS.split("\n%\n")[:6]))
    steps = TrainConfig(base=str(tiny_gpt2_dir), steps=4, batch_size=2, eval_every=2, samples=0)
    assert train_persona(settings, "older", corpus, steps, reporter=Recorder(stop_at=1)).checkpoint is None
    record = run_dir(settings, "older") / RUN_FILE
    record.write_text(json.dumps(json.loads(record.read_text()) | {"corpus": "../sayings.jsonl"}))
    ran_in = tmp_path / "ran-in"  # where that version ran: ../sayings.jsonl is there from it
    ran_in.mkdir()

    def listed(cwd: Path) -> str:
        shown = subprocess.run([sys.executable, "-m", "persona", "personas", "list"], env=env, cwd=cwd,
                               capture_output=True, text=True, check=False, timeout=120)
        assert shown.returncode == 0, shown.stderr
        return " ".join(shown.stderr.split())

    said = listed(ran_in)
    assert "continue it with `persona train older --corpus ../sayings.jsonl --resume`" in said, said
    said = listed(Path("/"))
    assert "--corpus /../sayings.jsonl" not in said
    assert ("continue it with `persona train older --corpus FILE --resume` (it started on the corpus "
            "../sayings.jsonl, which is not there now; name where it is)") in said, said
