"""Fine-tuning tiny real models: loss falls, documents end cleanly, resume is exact."""

from __future__ import annotations

import math
import os
import signal
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch.nn.modules.module import register_module_forward_hook
from torch.optim.optimizer import register_optimizer_step_post_hook
from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

from persona.errors import ModelError
from persona.models import load_model
from tests.fakes.full_disk import disk_refusing_files_over
from tests.reporters import Recorder, press_ctrl_c
from tests.sayings import SIX_SAYINGS as SAYINGS
from training.batching import batch_tensors, encode_documents
from training.corpus import Corpus
from training.evaluate import held_out_loss
from training.trainer import TrainConfig, train

# One CPU thread: on a shared machine, two busy-waiting threads per process are far slower.
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def corpus() -> Corpus:
    return Corpus(train=SAYINGS * 3, validation=SAYINGS[:3], fingerprint="test")


@contextmanager
def ctrl_c_inside_step(step: int, presses: int = 1, send=press_ctrl_c) -> Iterator[None]:
    """Press Ctrl-C (or ``send`` another signal) during step ``step`` (from 1), after the
    optimiser moved the weights."""
    seen = 0

    def after_optimizer_step(optimizer, args, kwargs) -> None:
        nonlocal seen
        seen += 1
        if seen == step:
            for _ in range(presses):
                send()

    handle = register_optimizer_step_post_hook(after_optimizer_step)
    try:
        yield
    finally:
        handle.remove()


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


@contextmanager
def recorded_learning_rates() -> Iterator[list[float]]:
    """The learning rate of every optimiser step taken inside the block."""
    rates: list[float] = []
    handle = register_optimizer_step_post_hook(lambda optimizer, args, kwargs: rates.append(
        optimizer.param_groups[0]["lr"]))
    try:
        yield rates
    finally:
        handle.remove()


def test_a_run_cut_short_by_its_time_budget_ends_with_the_learning_rate_at_its_floor(tiny_gpt2_dir: Path,
                                                                                     tmp_path: Path):
    """With only a time budget the rate followed a five-epoch plan, so a run cut by time
    (here 1,000 steps an epoch, a 2-second budget) ended still warming up or near its peak."""
    big = Corpus(train=SAYINGS * 1000, validation=SAYINGS[:3], fingerprint="test")
    config = TrainConfig(kind="lora", max_minutes=0.03, batch_size=6, learning_rate=1e-3, samples=0)
    with recorded_learning_rates() as rates:
        result = train(config, big, tiny_gpt2_dir, tmp_path / "run")
    assert result.status == "time-limit" and len(rates) >= 5
    assert max(rates) > 0.9e-3  # warmed up within the budget
    assert rates[-1] < 0.3e-3  # and decayed towards a tenth of the peak by its end


class SlowEvaluations(Recorder):
    """Each evaluation and its samples take ``seconds`` longer, as the bundled model's do on a CPU."""

    def __init__(self, seconds: float) -> None:
        super().__init__()
        self.seconds = seconds

    def on_eval(self, step: int, val_loss: float, improved: bool) -> None:
        super().on_eval(step, val_loss, improved)
        time.sleep(self.seconds)


def test_evaluations_take_a_bounded_share_of_a_time_budget(tiny_gpt2_dir: Path, tmp_path: Path):
    """Evaluations came every ``eval_every`` steps however long they took: on the bundled model
    with one thread, 13 s each between 5 s steps, 40% of a 2-minute run. Now, after the first,
    they are spaced by its cost; the one at the end of the run still comes."""
    big = Corpus(train=SAYINGS * 1000, validation=SAYINGS[:3], fingerprint="test")
    budget_s, eval_s = 4.0, 0.25
    config = TrainConfig(kind="lora", max_minutes=budget_s / 60, batch_size=6, eval_every=1, samples=0)
    recorder = SlowEvaluations(eval_s)
    result = train(config, big, tiny_gpt2_dir, tmp_path / "run", reporter=recorder)
    assert result.status == "time-limit"
    during = recorder.evals[:-1]  # the last one comes as the budget runs out
    assert 2 <= len(during) and len(during) * eval_s <= 0.25 * budget_s, [e[0] for e in recorder.evals]
    assert recorder.evals[-1][0] == result.metrics["steps"] and result.metrics["steps"] > 10 * len(recorder.evals)


@contextmanager
def tokens_measured() -> Iterator[list[int]]:
    """The held-out tokens each forward pass without gradients (an evaluation's) reads."""
    read: list[int] = []

    def count(module, args, kwargs, output) -> None:
        if isinstance(module, GPT2LMHeadModel) and not torch.is_grad_enabled():
            read.append(int(kwargs["attention_mask"].sum()))

    handle = register_module_forward_hook(count, with_kwargs=True)
    try:
        yield read
    finally:
        handle.remove()


class EvalCostRecorder(Recorder):
    """Also how many held-out tokens each evaluation read."""

    def __init__(self, read: list[int]) -> None:
        super().__init__()
        self.read, self.seen, self.eval_tokens = read, 0, []

    def on_start(self, total_steps: int, resumed_from: int) -> None:
        super().on_start(total_steps, resumed_from)
        self.base_tokens, self.seen = sum(self.read), len(self.read)

    def on_eval(self, step: int, val_loss: float, improved: bool) -> None:
        super().on_eval(step, val_loss, improved)
        self.eval_tokens.append(sum(self.read[self.seen:]))
        self.seen = len(self.read)


def test_evaluations_during_a_run_measure_a_sample_and_the_result_all_held_out_documents(
        tiny_gpt2_dir: Path, tmp_path: Path):
    """Evaluating on every held-out document (up to a thousand: minutes each on two cores) ate
    a --max-minutes budget. Evaluations now read a fixed sample of about ``eval_tokens``;
    the base and the best weights are still measured on all of them, as `persona eval` does."""
    held_out = [f"{saying} ({n})" for n in range(20) for saying in SAYINGS]
    data = Corpus(train=SAYINGS * 3, validation=held_out, fingerprint="test")
    config = TrainConfig(kind="lora", steps=6, batch_size=6, eval_every=2, eval_tokens=100, learning_rate=2e-2,
                         samples=0, seed=1)
    with tokens_measured() as read:
        recorder = EvalCostRecorder(read)
        result = train(config, data, tiny_gpt2_dir, tmp_path / "run", reporter=recorder)
    assert recorder.base_tokens > 1000 and len(recorder.eval_tokens) == 3
    assert all(0 < tokens <= 100 for tokens in recorder.eval_tokens)
    assert recorder.full_eval == (result.metrics["best_step"], len(held_out))
    assert sum(read) == 2 * recorder.base_tokens + sum(recorder.eval_tokens)

    tuned = load_model(str(tiny_gpt2_dir), result.best_dir, cache_dir=tmp_path, dtype="float32")
    assert math.isclose(result.metrics["val_loss"], held_out_loss(tuned, data), rel_tol=1e-5)
    assert result.metrics["perplexity"] < result.metrics["base_perplexity"]


class MeasureRecorder(Recorder):
    """Also each measurement of every held-out document: its stage, its tokens, how far it got."""

    def __init__(self) -> None:
        super().__init__()
        self.measures: list[tuple[str, int, list[int]]] = []

    def on_measure(self, stage: str, total_tokens: int) -> None:
        self.measures.append((stage, total_tokens, []))

    def on_measure_advance(self, done_tokens: int) -> None:
        self.measures[-1][2].append(done_tokens)


def test_both_measurements_of_every_held_out_document_say_how_far_they_are(tiny_gpt2_dir: Path, tmp_path: Path):
    """Measuring the base model on a thousand held-out fortunes took 6.5 minutes before step 1,
    and the best weights 5 more after the last, with not a word between (the run's 15 s of
    training took 12m44s): both now tell the reporter how many of their tokens are done."""
    held_out = [f"{saying} ({n})" for n in range(20) for saying in SAYINGS]
    data = Corpus(train=SAYINGS * 3, validation=held_out, fingerprint="test")
    config = TrainConfig(kind="lora", steps=4, batch_size=6, eval_every=2, eval_tokens=100, samples=0, seed=1)
    recorder = MeasureRecorder()
    with tokens_measured() as read:
        result = train(config, data, tiny_gpt2_dir, tmp_path / "run", reporter=recorder)
    best = int(result.metrics["best_step"])
    assert [stage for stage, _, _ in recorder.measures] == [
        "measuring the base model on 120 held-out documents",
        f"measuring the best weights (step {best}) on all 120 held-out documents"]
    base_tokens = sum(read[: len(recorder.measures[0][2])])  # one forward pass a batch
    for _, total, done in recorder.measures:
        assert total == base_tokens and len(done) == math.ceil(120 / config.batch_size)
        assert done == sorted(done) and done[0] > 0 and done[-1] == total


def test_a_model_with_few_positions_trains_evaluates_and_samples_within_them(tiny_gpt2_dir: Path, tmp_path: Path):
    """Examples were cut at max_tokens (256) alone: a toy model with 32 positions failed with
    "index out of range" on any longer document, and when asked for 40-token samples."""
    short = tmp_path / "short-gpt2"
    config = GPT2Config.from_pretrained(tiny_gpt2_dir)
    config.n_positions = 32
    torch.manual_seed(0)
    GPT2LMHeadModel(config).save_pretrained(short)
    AutoTokenizer.from_pretrained(tiny_gpt2_dir).save_pretrained(short)
    long = " ".join(SAYINGS)
    data = Corpus(train=[*SAYINGS, long], validation=[long], fingerprint="test")
    recorder = Recorder()
    result = train(TrainConfig(kind="lora", steps=2, batch_size=7, samples=1, sample_tokens=40), data, short,
                   tmp_path / "run", reporter=recorder)
    assert result.status == "finished" and math.isfinite(result.metrics["val_loss"]) and recorder.samples
    assert math.isfinite(held_out_loss(load_model(str(short), result.best_dir, cache_dir=tmp_path), data))


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


class KilledMidStep(Exception):
    """What SIGTERM's default did to a run (it ended the process there), made catchable."""


def test_sigterm_stops_after_the_step_and_saves_as_ctrl_c_does(tiny_gpt2_dir: Path, tmp_path: Path):
    """`kill`, systemd or `docker stop` send SIGTERM: the run died mid-step without a word,
    its lock file left behind; it now stops after the step and saves, as Ctrl-C does."""

    def killed(signum, frame):
        raise KilledMidStep

    before = signal.signal(signal.SIGTERM, killed)
    try:
        config = TrainConfig(kind="lora", steps=6, batch_size=4, samples=0)
        with ctrl_c_inside_step(3, send=lambda: os.kill(os.getpid(), signal.SIGTERM)):
            result = train(config, corpus(), tiny_gpt2_dir, tmp_path / "run")
        assert result.status == "interrupted" and result.metrics["steps"] == 3
        assert signal.getsignal(signal.SIGTERM) is killed
        assert train(config, corpus(), tiny_gpt2_dir, tmp_path / "run", resume=True).status == "finished"
    finally:
        signal.signal(signal.SIGTERM, before)


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


@pytest.mark.parametrize("room", [100_000, 300_000], ids=["best-weights", "run-state"])
def test_a_full_disk_while_saving_says_so_and_the_run_resumes_once_there_is_room(tiny_gpt2_dir: Path,
                                                                                 tmp_path: Path, room: int):
    """Full weights (200 kB here) and the run's state (its optimiser's 400 kB, linked to the best
    weights) fail to save: a clear error,
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


def _disk_use(folder: Path) -> int:
    """Bytes the files under ``folder`` take, a file reached by two hard links counted once."""
    files = {(f.stat().st_dev, f.stat().st_ino): f.stat().st_size for f in folder.rglob("*") if f.is_file()}
    return sum(files.values())


def test_a_saved_state_links_the_best_weights_and_leftovers_of_a_crash_go(tiny_gpt2_dir: Path, tmp_path: Path):
    """A full fine-tune saved its weights twice, in the state and in best/ (0.5 GB each for the
    bundled model), and a crash mid-save left a partial state as big as the whole one for good."""
    config = TrainConfig(kind="full", steps=4, batch_size=4, eval_every=1, samples=0, seed=7, learning_rate=1e-3)
    whole = train(config, corpus(), tiny_gpt2_dir, tmp_path / "whole")
    run = tmp_path / "run"
    recorder = Recorder(stop_at=2)
    assert train(config, corpus(), tiny_gpt2_dir, run, reporter=recorder).status == "interrupted"
    assert recorder.evals[-1][0] == 2 and recorder.evals[-1][2]  # the weights in hand are the best
    weights = sum(f.stat().st_size for f in (run / "best").glob("*.safetensors"))
    state = (run / "state.pt").stat().st_size
    assert state < 2.2 * weights  # the optimiser's two moments, not a third copy of the weights
    assert _disk_use(run) < 3.3 * weights  # was 4x: the state's copy, the optimiser, best/

    (run / "state.pt.tmp").write_bytes(b"\0" * state)  # what a crash mid-save leaves
    (run / "weights-1").mkdir()
    resumed = train(config, corpus(), tiny_gpt2_dir, run, resume=True)
    assert resumed.status == "finished" and resumed.metrics["val_loss"] == whole.metrics["val_loss"]
    assert not (run / "state.pt.tmp").exists() and not (run / "weights-1").exists()
    assert [p.name for p in run.iterdir() if p.name.startswith("weights-")] == ["weights-4"]


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


def test_the_log_says_once_that_there_is_nothing_to_validate_on(caplog: pytest.LogCaptureFixture):
    from training.trainer import LogReporter

    reporter = LogReporter()
    with caplog.at_level("INFO", logger="training.trainer"):
        for step in (2, 4, 6):
            reporter.on_eval(step, math.nan, False)
    assert caplog.text.count("no held-out documents") == 1


def test_writing_that_spells_special_tokens_is_trained_on_as_text(tiny_llama_dir: Path, tiny_gpt2_dir: Path):
    """An author who writes "<|im_end|>" wrote those characters: the only special tokens
    in an example are its own start and end-of-text, so the model is never taught to end
    a post (or open a turn) wherever such text appears."""
    from training.batching import start_token_id

    for folder in (tiny_llama_dir, tiny_gpt2_dir):
        tokenizer = AutoTokenizer.from_pretrained(folder)
        writing = "Chat logs look like <|im_start|>user\nhi<|im_end|> and end with <|endoftext|>, I hear."
        [example] = encode_documents(tokenizer, [writing], 256)
        assert example[0] == start_token_id(tokenizer) and example[-1] == tokenizer.eos_token_id
        assert not set(example[1:-1]) & set(tokenizer.added_tokens_decoder)
        assert tokenizer.decode(example[1:-1]) == writing


@pytest.mark.parametrize("damage", ["cut-short", "not-a-save"])
def test_a_damaged_run_state_says_so_and_how_to_go_on(tiny_gpt2_dir: Path, tmp_path: Path, damage: str):
    """A run state cut short (a crash mid-copy) or written over ended --resume in a traceback
    from deep inside torch.load ("OSError: [Errno 22] Invalid argument")."""
    config = TrainConfig(steps=4, batch_size=4, eval_every=2, samples=0)
    run = tmp_path / "run"
    assert train(config, corpus(), tiny_gpt2_dir, run, reporter=Recorder(stop_at=1)).status == "interrupted"
    state = run / "state.pt"
    state.write_bytes(state.read_bytes()[:5000] if damage == "cut-short" else b"garbage\n")
    with pytest.raises(ModelError, match="cannot be read .* start the run over with --restart"):
        train(config, corpus(), tiny_gpt2_dir, run, resume=True)


def test_a_full_disk_at_the_first_save_does_not_send_the_user_to_resume(tiny_gpt2_dir: Path, tmp_path: Path):
    """With nothing saved yet, "continue the run with --resume" led to "nothing to resume"."""
    config = TrainConfig(kind="full", steps=2, batch_size=4, eval_every=1, samples=0)
    with disk_refusing_files_over(100_000), pytest.raises(ModelError, match="could not save") as refused:
        train(config, corpus(), tiny_gpt2_dir, tmp_path / "run")
    assert "--resume" not in str(refused.value) and "start the run again" in str(refused.value)


def test_sighup_stops_after_the_step_and_saves_and_a_second_one_still_only_asks(tiny_gpt2_dir: Path,
                                                                                 tmp_path: Path):
    """A closed terminal (or a dropped ssh session) sends SIGHUP, maybe twice (the shell's and
    the kernel's): the run died mid-step without a word, losing everything since its last save."""
    def killed(signum, frame):
        raise KilledMidStep

    before = signal.signal(signal.SIGHUP, killed)
    try:
        config = TrainConfig(kind="lora", steps=6, batch_size=4, eval_every=6, samples=0)
        with ctrl_c_inside_step(3, presses=2, send=lambda: os.kill(os.getpid(), signal.SIGHUP)):
            result = train(config, corpus(), tiny_gpt2_dir, tmp_path / "run")
        assert result.status == "interrupted" and result.metrics["steps"] == 3
        assert signal.getsignal(signal.SIGHUP) is killed
        resumed = Recorder()
        assert train(config, corpus(), tiny_gpt2_dir, tmp_path / "run", resume=True, reporter=resumed).status == \
            "finished"
        assert resumed.resumed_from == 3
    finally:
        signal.signal(signal.SIGHUP, before)


class PrintsEvaluations(Recorder):
    """A reporter that prints each evaluation to ``out``, as the command line's does to the terminal."""

    def __init__(self, out) -> None:
        super().__init__()
        self.out = out

    def on_eval(self, step: int, val_loss: float, improved: bool) -> None:
        super().on_eval(step, val_loss, improved)
        print(f"step {step}: validation loss {val_loss:.3f}", file=self.out, flush=True)


def test_output_that_fails_stops_the_run_after_its_step_and_saves_it(tiny_gpt2_dir: Path, tmp_path: Path):
    """Printed to a terminal that has closed (EIO) or a pipe nobody reads (EPIPE), the next
    evaluation's line raised out of the run, losing everything since its last save."""
    read_end, write_end = os.pipe()
    out = os.fdopen(write_end, "w")
    try:
        config = TrainConfig(kind="lora", steps=6, batch_size=4, eval_every=3, samples=0)
        reporter = PrintsEvaluations(out)
        with ctrl_c_inside_step(3, send=lambda: os.close(read_end)):  # the reader goes
            result = train(config, corpus(), tiny_gpt2_dir, tmp_path / "run", reporter=reporter)
        assert result.status == "interrupted" and result.metrics["steps"] == 3
        assert train(config, corpus(), tiny_gpt2_dir, tmp_path / "run", resume=True).status == "finished"
    finally:
        try:
            out.close()
        except BrokenPipeError:  # what it still held for the pipe
            pass


@pytest.fixture
def save_at_every_step(monkeypatch: pytest.MonkeyPatch) -> None:
    """The state saved after every step, where a real run saves every few minutes."""
    import training.trainer

    monkeypatch.setattr(training.trainer, "SAVE_EVERY_S", 0.0, raising=False)
    monkeypatch.setattr(training.trainer, "SAVE_SHARE", math.inf, raising=False)


@pytest.mark.usefixtures("save_at_every_step")
def test_a_second_ctrl_c_keeps_the_last_save_between_evaluations_and_resumes_exactly(
        tiny_llama_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture):
    """The state was saved only at evaluations (a tenth of a run apart) or when a stop was asked
    for: a crash, an OOM kill or a second Ctrl-C lost everything since."""
    config = TrainConfig(kind="lora", steps=12, batch_size=4, eval_every=12, samples=0, seed=7, lora_dropout=0.1)
    whole = train(config, corpus(), tiny_llama_dir, tmp_path / "whole")

    with caplog.at_level("WARNING", logger="training.trainer"), ctrl_c_inside_step(6, presses=2), \
            pytest.raises(KeyboardInterrupt):
        train(config, corpus(), tiny_llama_dir, tmp_path / "parts")
    assert "Ctrl-C again to stop at once, keeping the state saved at step 5" in caplog.text
    resumed = Recorder()
    second = train(config, corpus(), tiny_llama_dir, tmp_path / "parts", resume=True, reporter=resumed)
    assert second.status == "finished" and resumed.resumed_from == 5

    a, b = _adapter(whole.best_dir), _adapter(second.best_dir)
    for name in a:
        assert torch.equal(a[name], b[name]), name
    assert second.metrics["val_loss"] == whole.metrics["val_loss"]


class SlowSteps(Recorder):
    """Each step takes ``seconds`` longer, as the bundled model's do."""

    def __init__(self, seconds: float, stop_at: int | None = None) -> None:
        super().__init__(stop_at)
        self.seconds = seconds

    def on_step(self, step: int, loss: float, average: float, elapsed_s: float) -> None:
        time.sleep(self.seconds)
        super().on_step(step, loss, average, elapsed_s)


def test_max_minutes_on_resume_limits_the_session_and_without_it_the_runs_own_counts_it_all(
        tiny_gpt2_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture):
    """A run stopped after 579 s and resumed with --max-minutes 1 trained one step: the limit
    counted the earlier session's time too. Given the value the run started with, it was read
    as the run's own limit, and still counted it."""
    big = Corpus(train=SAYINGS * 1000, validation=SAYINGS[:3], fingerprint="test")
    unlimited = TrainConfig(kind="lora", batch_size=6, eval_every=10_000, samples=0)
    assert train(unlimited, big, tiny_gpt2_dir, tmp_path / "a", reporter=SlowSteps(0.5, stop_at=3)).status == \
        "interrupted"  # 1.5 s of training
    with caplog.at_level("WARNING", logger="training.trainer"):
        resumed = train(unlimited, big, tiny_gpt2_dir, tmp_path / "a", resume=True, session_minutes=1 / 60,
                        reporter=SlowSteps(0.1))
    assert resumed.status == "time-limit" and resumed.metrics["steps"] >= 3 + 3
    assert "this session trains for at most 0.0166667 minutes (--max-minutes)" in caplog.text

    limited = TrainConfig(kind="lora", batch_size=6, eval_every=10_000, samples=0, max_minutes=2 / 60)
    assert train(limited, big, tiny_gpt2_dir, tmp_path / "b", reporter=SlowSteps(0.5, stop_at=3)).status == \
        "interrupted"
    caplog.clear()
    with caplog.at_level("WARNING", logger="training.trainer"):
        resumed = train(limited, big, tiny_gpt2_dir, tmp_path / "b", resume=True, reporter=SlowSteps(0.1))
    # The run's own 2 s, counted in all: under the 1.5 + 2 s a fresh session's limit would allow
    # (a step may overrun on a loaded machine, which the limit only checks between steps).
    assert resumed.status == "time-limit" and resumed.metrics["train_seconds"] < 1.5 + 2
    assert "of the 0.0333333 minutes it started with (--max-minutes)" in caplog.text

    # The same value again, given for this session: two more seconds, not what was left of two.
    assert train(limited, big, tiny_gpt2_dir, tmp_path / "c", reporter=SlowSteps(0.5, stop_at=3)).status == \
        "interrupted"
    caplog.clear()
    with caplog.at_level("WARNING", logger="training.trainer"):
        resumed = train(limited, big, tiny_gpt2_dir, tmp_path / "c", resume=True, session_minutes=2 / 60,
                        reporter=SlowSteps(0.1))
    assert resumed.status == "time-limit" and resumed.metrics["train_seconds"] >= 1.5 + 2
    assert "this session trains for at most 0.0333333 minutes (--max-minutes)" in caplog.text
