"""Fine-tuning a causal LM on an author's corpus, LoRA or full, resumable exactly.

Reads top to bottom: prepare (seed, model, examples, optimiser) → train (step, report,
evaluate, keep the best, stop early or on time) → hand back the best weights. The data
order of epoch ``e`` is a permutation seeded with ``seed + e``, so the position in the
data is just the step number, as is the learning rate (``schedule.lr_factor``; with a time budget,
the time spent too); with the optimiser and random states saved in the run folder,
``resume=True`` continues as if the run had never stopped. Ctrl-C stops
the run after the step it lands in, so the saved state is always that of a whole step;
a second Ctrl-C stops it at once, leaving the state saved at the last evaluation.

Beside it: the settings of a run (``train_config.py``), the state saved for ``resume``
(``run_state.py``) and the samples shown at each evaluation (``sampling.py``).
"""

from __future__ import annotations

import logging
import math
import random
import resource
import shutil
import signal
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol

import torch

from persona.errors import ModelError
from persona.personas import Sampling
from training.batching import (
    Example,
    batch_tensors,
    encode_documents,
    evaluate_loss,
    perplexity,
    summed_loss,
)
from training.corpus import Corpus
from training.run_folder import PROGRESS_FILE, STATE_FILE
from training.run_state import RunState, SavedState, remove_leftovers, write_record
from training.sampling import max_positions, sample_texts
from training.schedule import eval_sample, lr_factor
from training.train_config import DEFAULT_EPOCHS, TrainConfig
from training.weights import load_weights, save_weights

__all__ = ["LogReporter", "Reporter", "TrainConfig", "TrainResult", "max_positions", "sample_texts", "train"]

log = logging.getLogger(__name__)

BEST_DIR = "best"
AVERAGE_DECAY = 0.99  # gpt-2-simple's running average of the loss
# With --max-minutes, the evaluations during the run (and their samples) take at most about
# this share of the budget: spaced by what the last one cost, not by the step plan alone.
EVAL_SHARE_OF_BUDGET = 0.15


class Reporter(Protocol):
    """What a run tells the person watching it."""

    def on_start(self, total_steps: int, resumed_from: int) -> None: ...
    def on_step(self, step: int, loss: float, average: float, elapsed_s: float) -> None: ...
    def on_eval(self, step: int, val_loss: float, improved: bool) -> None: ...
    def on_samples(self, step: int, texts: list[str]) -> None: ...
    # Before the best weights are measured on every held-out document (evaluations used a sample).
    def on_full_eval(self, best_step: int, documents: int) -> None: ...


class LogReporter:
    """A reporter that writes to the log, for runs without a terminal."""

    def __init__(self) -> None:
        self.said_nothing_held_out = False

    def on_start(self, total_steps: int, resumed_from: int) -> None:
        log.info("training %d steps (from step %d)", total_steps, resumed_from)

    def on_step(self, step: int, loss: float, average: float, elapsed_s: float) -> None:
        log.debug("[%d | %.2f] loss=%.2f avg=%.2f", step, elapsed_s, loss, average)

    def on_eval(self, step: int, val_loss: float, improved: bool) -> None:
        if math.isnan(val_loss):  # a corpus with no held-out documents: said once, not at every evaluation
            if not self.said_nothing_held_out:
                log.info("step %d: no held-out documents to validate on; the last weights are kept", step)
                self.said_nothing_held_out = True
            return
        log.info("step %d: validation loss %.3f, perplexity %.1f%s", step, val_loss,
                 perplexity(val_loss), " (best)" if improved else "")

    def on_samples(self, step: int, texts: list[str]) -> None:
        for text in texts:
            log.info("sample at step %d: %s", step, text)

    def on_full_eval(self, best_step: int, documents: int) -> None:
        log.info("the evaluations used a sample of the held-out writing; measuring the best weights "
                 "(step %d) on all %d held-out documents", best_step, documents)


@dataclass
class TrainResult:
    """How a run ended and where its best weights are."""

    status: Literal["finished", "early-stopped", "time-limit", "interrupted"]
    best_dir: Path
    metrics: dict[str, float]
    history: list[dict[str, float]] = field(default_factory=list)


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


def _device(preference: str) -> str:
    if preference == "cuda" and not torch.cuda.is_available():
        raise ModelError("--device cuda was asked for, but torch sees no GPU; use --device cpu")
    return "cuda" if preference != "cpu" and torch.cuda.is_available() else "cpu"


def _load(config: TrainConfig, base_dir: Path, device: str) -> tuple[Any, Any]:
    """The tokenizer and the model to train (wrapped in LoRA when asked)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(base_dir)
        model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    except Exception as exc:  # transformers raises many kinds; the user needs one message
        raise ModelError(f"cannot load the base model from {base_dir}: {exc}") from exc
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    if config.kind == "lora":
        from peft import LoraConfig, get_peft_model

        lora = LoraConfig(r=config.lora_r, lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout,
                          target_modules="all-linear", task_type="CAUSAL_LM")
        model = get_peft_model(model, lora)
    model.to(device)
    model.train()
    return tokenizer, model


class _StopRequest:
    """Whether Ctrl-C asked the run to stop; checked between whole steps."""

    def __init__(self) -> None:
        self.requested = False


@contextmanager
def _ctrl_c_between_steps() -> Iterator[_StopRequest]:
    """While training, the first Ctrl-C only asks to stop; a second one interrupts at once.
    SIGTERM (`kill`, systemd, `docker stop`) asks the same way: it killed the run mid-step,
    without a word, its lock file left behind; a second SIGTERM still ends it at once.

    A KeyboardInterrupt raised wherever the signal lands (mid-forward, or between the
    optimiser step and the step count) would save a state no uninterrupted run ever had.
    Signal handlers can only be set from the main thread; elsewhere, or where a signal is
    ignored (Ctrl-C in a background job), nothing changes for it.
    """
    stop = _StopRequest()
    if threading.current_thread() is not threading.main_thread():
        yield stop
        return
    previous = {signum: signal.getsignal(signum) for signum in (signal.SIGINT, signal.SIGTERM)}
    previous = {signum: handler for signum, handler in previous.items() if handler is not signal.SIG_IGN}
    if previous.get(signal.SIGINT, 0) is None:  # a handler not set from Python; the interpreter's own stands in
        previous[signal.SIGINT] = signal.default_int_handler
    if previous.get(signal.SIGTERM, 0) is None:
        previous[signal.SIGTERM] = signal.SIG_DFL

    def ask_to_stop(signum: int, frame: Any) -> None:
        stop.requested = True
        signal.signal(signum, previous[signum])
        again = "Ctrl-C" if signum == signal.SIGINT else "SIGTERM"
        log.warning("stopping after this step and saving (%s again to stop at once)", again)

    for signum in previous:
        signal.signal(signum, ask_to_stop)
    try:
        yield stop
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


class _Run:
    """One training run: the model, its data, its optimiser and its progress."""

    def __init__(self, config: TrainConfig, corpus: Corpus, base_dir: Path, run_dir: Path) -> None:
        self.config = config
        self.run_dir = run_dir
        self.device = _device(config.device)
        _seed_everything(config.seed)
        self.tokenizer, self.model = _load(config, base_dir, self.device)
        self.pad_id = self.tokenizer.pad_token_id
        # A longer example would index past the model's positions (a toy model may have 64).
        max_tokens = min(config.max_tokens, max_positions(self.model) or config.max_tokens)
        if max_tokens < config.max_tokens:
            log.info("examples are cut at %d tokens, the model's positions (max_tokens %d)",
                     max_tokens, config.max_tokens)
        self.train_examples = encode_documents(self.tokenizer, corpus.train, max_tokens)
        self.val_examples = encode_documents(self.tokenizer, corpus.validation, max_tokens)
        self.eval_examples = eval_sample(self.val_examples, config.eval_tokens, config.seed)
        if not self.train_examples:
            raise ModelError("the corpus has no training documents; build a bigger corpus")
        self.steps_per_epoch = math.ceil(len(self.train_examples) / config.batch_size)
        epochs = config.epochs if config.epochs is not None else DEFAULT_EPOCHS
        self.total_steps = config.steps or max(1, math.ceil(epochs * self.steps_per_epoch))
        self.eval_every = config.eval_every or max(1, self.total_steps // 10)
        params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(params, lr=config.lr(), weight_decay=config.weight_decay)
        self.state = RunState()
        self._order: tuple[int, list[int]] = (-1, [])
        self.saved = SavedState(run_dir)  # the state saved for resume, in the run folder
        self.sampling = Sampling()  # how the samples at each evaluation are written

    def batch_for(self, step: int) -> list[Example]:
        """The examples of a step: position ``step`` in the seeded epoch orders."""
        epoch, index = divmod(step, self.steps_per_epoch)
        if self._order[0] != epoch:
            generator = torch.Generator().manual_seed(self.config.seed + epoch)
            self._order = (epoch, torch.randperm(len(self.train_examples), generator=generator).tolist())
        chosen = self._order[1][index * self.config.batch_size : (index + 1) * self.config.batch_size]
        return [self.train_examples[i] for i in chosen]

    def save_state(self, best_dir: Path) -> None:
        """Everything ``resume`` needs, written atomically (``SavedState.save``)."""
        self.saved.save(self.model, self.optimizer, self.state, self.config, self.total_steps, best_dir)

    def resumable(self) -> bool:
        """Whether the run has saved a state ``resume`` can continue from."""
        return self.saved.resumable()

    def load_state(self) -> None:
        """The saved state, to continue from (``SavedState.load``)."""
        self.state = self.saved.load(self.model, self.optimizer, self.config.kind)

    def evaluate(self, examples: list[Example] | None = None) -> float:
        """Mean loss per token on ``examples`` (default: the in-run sample); NaN with none."""
        examples = self.eval_examples if examples is None else examples
        if not examples:
            return math.nan
        with self._autocast():
            return evaluate_loss(self.model, examples, self.pad_id, self.device, self.config.batch_size)

    def _autocast(self):
        # bf16 on a GPU that has it; the CPU trains in fp32 (its bf16 is slower here).
        enabled = self.device == "cuda" and torch.cuda.is_bf16_supported()
        return torch.autocast(device_type=self.device, dtype=torch.bfloat16, enabled=enabled)

    def step(self) -> float:
        """One optimiser step on the next batch; the batch's mean loss per token."""
        budget_s = self.config.max_minutes * 60 if self.config.max_minutes is not None else None
        time_used = self.state.elapsed_s / budget_s if budget_s else None
        factor = lr_factor(self.state.step, self.total_steps, self.config.warmup_fraction, time_used)
        for group in self.optimizer.param_groups:
            group["lr"] = self.config.lr() * factor
        batch = batch_tensors(self.batch_for(self.state.step), self.pad_id, self.device)
        with self._autocast():
            loss_sum, tokens = summed_loss(self.model, batch)
        loss = loss_sum / max(tokens, 1)
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for p in self.model.parameters() if p.requires_grad], 1.0)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        value = float(loss.detach())
        total, weight = self.state.average
        self.state.average = (total * AVERAGE_DECAY + value, weight * AVERAGE_DECAY + 1.0)
        self.state.tokens += tokens
        self.state.step += 1
        return value


def train(
    config: TrainConfig,
    corpus: Corpus,
    base_dir: Path,
    run_dir: Path,
    *,
    resume: bool = False,
    reporter: Reporter | None = None,
    record: dict[str, Any] | None = None,
    sampling: Sampling | None = None,
) -> TrainResult:
    """Fine-tune on the corpus; the best weights (by validation loss) end up in ``run_dir/best``.

    The samples shown at each evaluation are written with ``sampling``, the persona's own
    settings (default: those a trained persona gets), so they read as its posts will.

    A new run writes ``record`` (what ``--resume`` needs to know) as ``run.json`` once the
    model has loaded, as it discards an earlier unfinished run's state: stopped while it
    loads, it leaves that run whole and resumable.
    """
    reporter = reporter or LogReporter()
    run = _Run(config, corpus, base_dir, run_dir)
    run.sampling = sampling or Sampling()
    best_dir = run_dir / BEST_DIR
    if resume:
        run.load_state()
    else:
        shutil.rmtree(best_dir, ignore_errors=True)
        (run_dir / STATE_FILE).unlink(missing_ok=True)
        (run_dir / PROGRESS_FILE).unlink(missing_ok=True)
        if record is not None:
            write_record(run_dir, record)
        run.state.base_val_loss = run.evaluate(run.val_examples)
    remove_leftovers(run_dir, keep=run.saved.linked)  # a crash mid-save left a partial state as big as a whole one
    state = run.state
    reporter.on_start(run.total_steps, state.step)
    status = "finished"
    started = time.perf_counter() - state.elapsed_s
    session_tokens, session_started = state.tokens, time.perf_counter()
    with _ctrl_c_between_steps() as stop:
        while state.step < run.total_steps:
            if stop.requested:
                status = "interrupted"
                state.elapsed_s = time.perf_counter() - started
                run.save_state(best_dir)
                break
            step_started = time.perf_counter()
            loss = run.step()
            state.step_seconds += time.perf_counter() - step_started
            state.elapsed_s = time.perf_counter() - started
            total, weight = state.average
            reporter.on_step(state.step, loss, total / weight, state.elapsed_s)
            out_of_time = config.max_minutes is not None and state.elapsed_s >= config.max_minutes * 60
            if _eval_due(run) or state.step == run.total_steps or out_of_time:
                eval_started = time.perf_counter()
                if _evaluate_and_keep(run, reporter, best_dir):
                    status = "early-stopped"
                    break
                state.elapsed_s = time.perf_counter() - started
                cost_s = state.elapsed_s - (eval_started - started)
                state.next_eval_s = state.elapsed_s + cost_s * (1 - EVAL_SHARE_OF_BUDGET) / EVAL_SHARE_OF_BUDGET
                run.save_state(best_dir)
            if out_of_time:
                status = "time-limit"
                break
    # Without validation documents the last weights are the best we know (a resumed run's
    # best/ holds those it was interrupted with); with them, until the first evaluation.
    if not run.val_examples or not best_dir.is_dir():
        save_weights(run.model, run.tokenizer, best_dir, resumable=run.resumable())
        state.best_step = state.step
    session_s = time.perf_counter() - session_started
    val_loss = state.best_val_loss if math.isfinite(state.best_val_loss) else math.nan
    if status != "interrupted" and run.eval_examples is not run.val_examples and math.isfinite(val_loss):
        val_loss = _measure_best_on_all(run, reporter, best_dir, len(corpus.validation))
    metrics = {
        "base_val_loss": state.base_val_loss,
        "base_perplexity": perplexity(state.base_val_loss),
        # Both over every held-out example; the evaluations in ``history`` over the sample.
        "val_loss": val_loss,
        "perplexity": perplexity(val_loss),
        "best_step": float(state.best_step),
        "steps": float(state.step),
        "train_tokens": float(state.tokens),
        "train_seconds": state.elapsed_s,
        # Throughput of the optimiser steps alone, and of the whole run with its evaluations.
        "tokens_per_s": state.tokens / state.step_seconds if state.step_seconds > 0 else 0.0,
        "run_tokens_per_s": (state.tokens - session_tokens) / session_s if session_s > 0 else 0.0,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }
    return TrainResult(status, best_dir, metrics, list(state.history))


def _measure_best_on_all(run: _Run, reporter: Reporter, best_dir: Path, documents: int) -> float:
    """The best weights' loss on every held-out example, when the evaluations used a sample."""
    reporter.on_full_eval(run.state.best_step, documents)
    if run.state.best_step != run.state.step:  # the weights in hand are later ones
        load_weights(run.model, run.config.kind, best_dir)
    return run.evaluate(run.val_examples)


def _eval_due(run: _Run) -> bool:
    """Whether an evaluation falls after this step (the last one and one out of time aside).

    Without a time budget, every ``eval_every`` steps, so ``resume`` stays exact. With one, also
    not before the training since the last evaluation has made its cost (its samples and the
    best weights' save included) at most ``EVAL_SHARE_OF_BUDGET`` of the time: on the bundled
    model with one thread, an evaluation every three 5-second steps cost 13 s, 40% of a 2-minute run.
    """
    state = run.state
    if run.config.max_minutes is None:
        return state.step % run.eval_every == 0
    last = int(state.history[-1]["step"]) if state.history else 0
    return state.step - last >= run.eval_every and state.elapsed_s >= state.next_eval_s


def _evaluate_and_keep(run: _Run, reporter: Reporter, best_dir: Path) -> bool:
    """Evaluate, keep the weights if they are the best yet; True when it is time to stop early."""
    state = run.state
    val_loss = run.evaluate()
    improved = math.isfinite(val_loss) and val_loss < state.best_val_loss
    if improved:
        state.best_val_loss, state.best_step, state.bad_evals = val_loss, state.step, 0
        save_weights(run.model, run.tokenizer, best_dir, resumable=run.resumable())
    elif math.isfinite(val_loss):
        state.bad_evals += 1
    total, weight = state.average
    state.history.append({"step": float(state.step), "train_loss": total / weight, "val_loss": val_loss})
    reporter.on_eval(state.step, val_loss, improved)
    # As the persona writes: its sampling, and no longer than its posts may be. With the defaults,
    # a persona file edited to temperature 0 or a stop string still showed default samples.
    length = min(run.config.sample_tokens, run.sampling.max_new_tokens)
    samples = sample_texts(run.model, run.tokenizer, run.config.samples, length, run.config.seed + state.step,
                           run.device, sampling=run.sampling)
    if samples:
        reporter.on_samples(state.step, samples)
    return state.bad_evals >= run.config.patience
