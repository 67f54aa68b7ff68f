"""Fine-tuning tiny real models: loss falls, documents end cleanly, resume is exact."""

from __future__ import annotations

import math
import os
import resource
import signal
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch.optim.optimizer import register_optimizer_step_post_hook
from transformers import AutoTokenizer

from persona.errors import ModelError
from training.batching import batch_tensors, encode_documents
from training.corpus import Corpus
from training.trainer import TrainConfig, train

SAYINGS = [
    "Patience is the art of hoping slowly.",
    "Attend to the small things; the large ones are made of them.",
    "A calm mind is a well-kept garden.",
    "The road is long, and that is why we walk it daily.",
    "Still water shows the moon.",
    "Every storm runs out of rain.",
]


# One CPU thread: on a shared machine, two busy-waiting threads per process are far slower.
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def corpus() -> Corpus:
    return Corpus(train=SAYINGS * 3, validation=SAYINGS[:3], fingerprint="test")


def press_ctrl_c() -> None:
    """What the terminal does on Ctrl-C: SIGINT to the process, wherever it is."""
    os.kill(os.getpid(), signal.SIGINT)


@contextmanager
def ctrl_c_inside_step(step: int, presses: int = 1) -> Iterator[None]:
    """Press Ctrl-C during step ``step`` (from 1), after the optimiser moved the weights."""
    seen = 0

    def after_optimizer_step(optimizer, args, kwargs) -> None:
        nonlocal seen
        seen += 1
        if seen == step:
            for _ in range(presses):
                press_ctrl_c()

    handle = register_optimizer_step_post_hook(after_optimizer_step)
    try:
        yield
    finally:
        handle.remove()


class Recorder:
    """A reporter that remembers what it was told, and can press Ctrl-C after a step."""

    def __init__(self, stop_at: int | None = None) -> None:
        self.losses: list[float] = []
        self.evals: list[tuple[int, float, bool]] = []
        self.samples: list[str] = []
        self.stop_at = stop_at

    def on_start(self, total_steps: int, resumed_from: int) -> None:
        self.total = total_steps
        self.resumed_from = resumed_from

    def on_step(self, step: int, loss: float, average: float, elapsed_s: float) -> None:
        self.losses.append(loss)
        if step == self.stop_at:
            press_ctrl_c()

    def on_eval(self, step: int, val_loss: float, improved: bool) -> None:
        self.evals.append((step, val_loss, improved))

    def on_samples(self, step: int, texts: list[str]) -> None:
        self.samples.extend(texts)


def test_every_example_is_one_document_ending_in_end_of_text(tiny_gpt2_dir: Path):
    tokenizer = AutoTokenizer.from_pretrained(tiny_gpt2_dir)
    eos = tokenizer.eos_token_id
    examples = encode_documents(tokenizer, ["Still water.", "A calm mind is a well-kept garden. " * 6], 16)
    assert examples[0][0] == eos and examples[0][-1] == eos  # GPT-2 starts and ends with <|endoftext|>
    long_windows = examples[1:]
    assert len(long_windows) > 1 and all(len(w) <= 16 for w in long_windows)
    assert [w[-1] == eos for w in long_windows] == [False] * (len(long_windows) - 1) + [True]
    batch = batch_tensors(examples[:2], tokenizer.pad_token_id or eos, "cpu")
    short = len(examples[0])
    assert (batch["labels"][0, short:] == -100).all() and (batch["labels"][0, :short] == eos).sum() == 2


def test_llama_documents_start_like_a_served_completion(tiny_llama_dir: Path):
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_dir)
    [example] = encode_documents(tokenizer, ["Still water shows the moon."], 64)
    assert example[0] == tokenizer.bos_token_id and example[-1] == tokenizer.eos_token_id


@pytest.mark.parametrize("kind", ["lora", "full"])
def test_training_lowers_validation_loss_and_keeps_the_best(tiny_gpt2_dir: Path, tmp_path: Path, kind: str):
    config = TrainConfig(kind=kind, steps=30, batch_size=6, eval_every=10, learning_rate=3e-3 if kind == "full" else 2e-2,
                         samples=1, sample_tokens=8, seed=1)
    recorder = Recorder()
    result = train(config, corpus(), tiny_gpt2_dir, tmp_path / "run", reporter=recorder)
    assert result.status == "finished"
    assert sum(recorder.losses[-5:]) / 5 < sum(recorder.losses[:5]) / 5
    assert result.metrics["perplexity"] < result.metrics["base_perplexity"]
    best = min(recorder.evals, key=lambda e: e[1])
    assert result.metrics["best_step"] == best[0] and math.isclose(result.metrics["val_loss"], best[1])
    marker = "adapter_config.json" if kind == "lora" else "config.json"
    assert (result.best_dir / marker).is_file() and (result.best_dir / "tokenizer_config.json").is_file()
    assert len(recorder.samples) == 3 and result.metrics["tokens_per_s"] > 0


def test_early_stopping_when_validation_stops_improving(tiny_gpt2_dir: Path, tmp_path: Path):
    # A huge learning rate wrecks the model after the first evaluation.
    config = TrainConfig(kind="full", steps=60, batch_size=6, eval_every=2, patience=2, learning_rate=5.0, samples=0)
    result = train(config, corpus(), tiny_gpt2_dir, tmp_path / "run")
    assert result.status == "early-stopped" and result.metrics["steps"] < 60


def _adapter(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(folder / "adapter_model.safetensors")


def test_stopped_and_resumed_run_equals_an_uninterrupted_one(tiny_llama_dir: Path, tmp_path: Path):
    config = TrainConfig(kind="lora", steps=12, batch_size=4, eval_every=12, samples=0, seed=7, lora_dropout=0.1)
    whole = train(config, corpus(), tiny_llama_dir, tmp_path / "whole")

    interrupted = Recorder(stop_at=5)
    first = train(config, corpus(), tiny_llama_dir, tmp_path / "parts", reporter=interrupted)
    assert first.status == "interrupted" and first.metrics["steps"] == 5
    resumed = Recorder()
    second = train(config, corpus(), tiny_llama_dir, tmp_path / "parts", resume=True, reporter=resumed)
    assert second.status == "finished" and resumed.resumed_from == 5 and len(resumed.losses) == 7

    a, b = _adapter(whole.best_dir), _adapter(second.best_dir)
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name
    assert second.metrics["val_loss"] == whole.metrics["val_loss"]


def test_ctrl_c_inside_a_step_stops_after_it_and_resumes_exactly(tiny_llama_dir: Path, tmp_path: Path):
    config = TrainConfig(kind="lora", steps=12, batch_size=4, eval_every=12, samples=0, seed=7, lora_dropout=0.1)
    whole = train(config, corpus(), tiny_llama_dir, tmp_path / "whole")

    handler = signal.getsignal(signal.SIGINT)
    with ctrl_c_inside_step(6):  # between the optimiser step and the step count
        first = train(config, corpus(), tiny_llama_dir, tmp_path / "parts")
    assert first.status == "interrupted" and first.metrics["steps"] == 6
    assert signal.getsignal(signal.SIGINT) is handler
    second = train(config, corpus(), tiny_llama_dir, tmp_path / "parts", resume=True)
    assert second.status == "finished"

    a, b = _adapter(whole.best_dir), _adapter(second.best_dir)
    for name in a:
        assert torch.equal(a[name], b[name]), name


def test_a_second_ctrl_c_stops_at_once(tiny_gpt2_dir: Path, tmp_path: Path):
    handler = signal.getsignal(signal.SIGINT)
    config = TrainConfig(kind="lora", steps=6, batch_size=4, samples=0)
    with ctrl_c_inside_step(2, presses=2), pytest.raises(KeyboardInterrupt):
        train(config, corpus(), tiny_gpt2_dir, tmp_path / "run")
    assert signal.getsignal(signal.SIGINT) is handler


def test_resumed_run_without_validation_keeps_its_last_weights(tiny_gpt2_dir: Path, tmp_path: Path):
    # Too few documents to hold any out: the final weights are the result.
    no_validation = Corpus(train=SAYINGS * 3, validation=[], fingerprint="test")
    config = TrainConfig(kind="lora", steps=8, batch_size=4, samples=0, seed=7, learning_rate=2e-2)
    whole = train(config, no_validation, tiny_gpt2_dir, tmp_path / "whole")

    first = train(config, no_validation, tiny_gpt2_dir, tmp_path / "parts", reporter=Recorder(stop_at=3))
    assert first.status == "interrupted"
    second = train(config, no_validation, tiny_gpt2_dir, tmp_path / "parts", resume=True)

    a, b = _adapter(whole.best_dir), _adapter(second.best_dir)
    for name in a:
        assert torch.equal(a[name], b[name]), name
    assert second.status == "finished" and second.metrics["best_step"] == 8


def test_same_seed_same_weights_other_seed_other_weights(tiny_gpt2_dir: Path, tmp_path: Path):
    def run(seed: int, name: str) -> dict[str, torch.Tensor]:
        config = TrainConfig(kind="lora", steps=4, batch_size=4, samples=0, seed=seed)
        return _adapter(train(config, corpus(), tiny_gpt2_dir, tmp_path / name).best_dir)

    one, again, other = run(3, "a"), run(3, "b"), run(4, "c")
    assert all(torch.equal(one[k], again[k]) for k in one)
    assert not all(torch.equal(one[k], other[k]) for k in one)


def test_resume_without_a_saved_run_says_so(tiny_gpt2_dir: Path, tmp_path: Path):
    with pytest.raises(ModelError, match="nothing to resume"):
        train(TrainConfig(steps=2, samples=0), corpus(), tiny_gpt2_dir, tmp_path / "none", resume=True)


@contextmanager
def disk_refusing_files_over(size_bytes: int) -> Iterator[None]:
    """A disk with no room for a file over ``size_bytes``: the system refuses the write
    (EFBIG, as a full disk refuses with ENOSPC)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (size_bytes, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))


@pytest.mark.parametrize("room", [100_000, 400_000], ids=["best-weights", "run-state"])
def test_a_full_disk_while_saving_says_so_and_the_run_resumes_once_there_is_room(tiny_gpt2_dir: Path,
                                                                                 tmp_path: Path, room: int):
    """Full weights (200 kB here) and the run's state (600 kB) fail to save: a clear error,
    no half-written file left taking the room, and the last good save resumes."""
    config = TrainConfig(kind="full", steps=4, batch_size=4, eval_every=2, samples=0, seed=7)
    whole = train(config, corpus(), tiny_gpt2_dir, tmp_path / "whole")
    run = tmp_path / "run"
    assert train(config, corpus(), tiny_gpt2_dir, run, reporter=Recorder(stop_at=1)).status == "interrupted"

    with disk_refusing_files_over(room), pytest.raises(ModelError, match="could not save .* make room"):
        train(config, corpus(), tiny_gpt2_dir, run, resume=True)
    assert not [p.name for p in run.iterdir() if p.name.endswith(".tmp")]

    resumed = train(config, corpus(), tiny_gpt2_dir, run, resume=True)
    assert resumed.status == "finished"
    assert resumed.metrics["val_loss"] == whole.metrics["val_loss"]


def test_a_document_longer_than_the_tokenizers_limit_is_windowed_without_its_warning(
        tiny_gpt2_dir: Path, caplog: pytest.LogCaptureFixture, capfd: pytest.CaptureFixture):
    """GPT-2's tokenizer warns that a long text "will result in indexing errors": training
    windows such a document, so the warning only alarmed whoever trained on a long post."""
    tokenizer = AutoTokenizer.from_pretrained(tiny_gpt2_dir, model_max_length=16)
    with caplog.at_level("WARNING"):
        examples = encode_documents(tokenizer, ["Patience is the art of hoping slowly. " * 10], 16)
    assert len(examples) > 1 and all(len(e) <= 16 for e in examples)
    assert "indexing errors" not in caplog.text + capfd.readouterr().err


def test_the_log_says_when_there_is_nothing_to_validate_on(caplog: pytest.LogCaptureFixture):
    from training.trainer import LogReporter

    with caplog.at_level("INFO", logger="training.trainer"):
        LogReporter().on_eval(4, math.nan, False)
    assert "no held-out documents" in caplog.text and "nan" not in caplog.text
