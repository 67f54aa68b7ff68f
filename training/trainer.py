"""Fine-tuning a causal LM on an author's corpus, LoRA or full, resumable exactly.

Reads top to bottom: prepare (seed, model, examples, optimiser) → train (step, report,
evaluate, keep the best, stop early or on time) → hand back the best weights. The data
order of epoch ``e`` is a permutation seeded with ``seed + e``, so the position in the
data is just the step number, as is the learning rate (``schedule.lr_factor``; with a time budget,
the time spent too); with the optimiser and random states saved in the run folder,
``resume=True`` continues as if the run had never stopped. The state is saved at each
evaluation and every few minutes between them (``_save_due``). Ctrl-C, SIGTERM and SIGHUP
(a closed terminal) stop the run after the step they land in, so the saved state is always
that of a whole step; a second Ctrl-C or SIGTERM stops it at once, keeping the last save.

Beside it: the settings of a run (``train_config.py``), the state saved for ``resume``
(``run_state.py``) and the samples shown at each evaluation (``sampling.py``).
"""

from __future__ import annotations

import itertools
import logging
import math
import random
import resource
import shutil
import time
from collections.abc import Callable
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
from training.stopping import Reporting, StopRequest, stop_between_steps
from training.train_config import DEFAULT_EPOCHS, TrainConfig
from training.weights import load_weights, save_weights

__all__ = ["LogReporter", "Reporter", "TrainConfig", "TrainResult", "max_positions", "sample_texts", "train"]

log = logging.getLogger(__name__)

BEST_DIR = "best"
AVERAGE_DECAY = 0.99  # gpt-2-simple's running average of the loss
# With --max-minutes, the evaluations during the run (and their samples) take at most about
# this share of the budget: spaced by what the last one cost, not by the step plan alone.
EVAL_SHARE_OF_BUDGET = 0.15
# Between evaluations, the state is saved at most this often, and where a save is slow (a full
# fine-tune), so that saving takes at most about this share of the training time: see _save_due.
SAVE_EVERY_S = 300.0
SAVE_SHARE = 0.02


class Reporter(Protocol):
    """What a run tells the person watching it."""

    def on_start(self, total_steps: int, resumed_from: int) -> None: ...
    def on_step(self, step: int, loss: float, average: float, elapsed_s: float) -> None: ...
    def on_eval(self, step: int, val_loss: float, improved: bool) -> None: ...
    def on_samples(self, step: int, texts: list[str]) -> None: ...
    # Before the best weights are measured on every held-out document (evaluations used a sample).
    def on_full_eval(self, best_step: int, documents: int) -> None: ...
    # A measurement of every held-out document starts (the base model's before the first step, the
    # best weights' after the last; minutes each on a CPU for a thousand): ``stage`` says which, and
    # ``on_measure_advance`` how many of its ``total_tokens`` are done. Optional, as on_time_budget.
    def on_measure(self, stage: str, total_tokens: int) -> None: ...
    def on_measure_advance(self, done_tokens: int) -> None: ...
    # With a time limit, at the start: the training time (``on_step``'s ``elapsed_s``, which counts
    # the run's earlier sessions) at which it stops. Optional: reporters written before it lack it.
    def on_time_budget(self, until_s: float) -> None: ...


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

    def on_time_budget(self, until_s: float) -> None:
        log.info("training until %.0f s of training time", until_s)

    def on_full_eval(self, best_step: int, documents: int) -> None:
        log.info("the evaluations used a sample of the held-out writing; the final figure measures all of it")

    def on_measure(self, stage: str, total_tokens: int) -> None:
        log.info("%s (%d tokens)", stage, total_tokens)


@dataclass
class TrainResult:
    """How a run ended and where its best weights are."""

    status: Literal["finished", "early-stopped", "time-limit", "interrupted"]
    best_dir: Path
    metrics: dict[str, float]
    history: list[dict[str, float]] = field(default_factory=list)
    stopped_by: int | None = None  # the signal that stopped an interrupted run (its number), if one did


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
        self.budget: tuple[float, float] | None = None  # with a time limit: the training time it counts from, and to

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

    def evaluate(self, examples: list[Example] | None = None, on_batch: Callable[[int], None] | None = None) -> float:
        """Mean loss per token on ``examples`` (default: the in-run sample); NaN with none.
        ``on_batch``: told how many examples are done after each batch (``evaluate_loss``)."""
        examples = self.eval_examples if examples is None else examples
        if not examples:
            return math.nan
        with self._autocast():
            return evaluate_loss(self.model, examples, self.pad_id, self.device, self.config.batch_size,
                                 on_batch=on_batch)

    def measure_held_out(self, report: Reporting, stage: str) -> float:
        """Mean loss per token on every held-out example, its progress reported in tokens measured."""
        if not self.val_examples:
            return math.nan
        # evaluate_loss measures the shortest examples first and counts the examples done; in tokens
        # the pace holds, so the time left shown is not that of the short ones.
        done_tokens = list(itertools.accumulate(sorted(map(len, self.val_examples)), initial=0))
        report("on_measure", stage, done_tokens[-1])
        return self.evaluate(self.val_examples, on_batch=lambda done: report("on_measure_advance", done_tokens[done]))

    def _autocast(self):
        # bf16 on a GPU that has it; the CPU trains in fp32 (its bf16 is slower here).
        enabled = self.device == "cuda" and torch.cuda.is_bf16_supported()
        return torch.autocast(device_type=self.device, dtype=torch.bfloat16, enabled=enabled)

    def step(self) -> float:
        """One optimiser step on the next batch; the batch's mean loss per token."""
        time_used = None
        if self.budget is not None:
            since_s, until_s = self.budget
            time_used = (self.state.elapsed_s - since_s) / max(until_s - since_s, 1e-9)
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
    session_minutes: float | None = None,
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
    run = _Run(config, corpus, base_dir, run_dir)
    run.sampling = sampling or Sampling()
    reporter = reporter or LogReporter()
    best_dir = run_dir / BEST_DIR
    if resume:
        run.load_state()
    else:
        shutil.rmtree(best_dir, ignore_errors=True)
        (run_dir / STATE_FILE).unlink(missing_ok=True)
        (run_dir / PROGRESS_FILE).unlink(missing_ok=True)
        if record is not None:
            write_record(run_dir, record)
        # Before the run's signals are set (Ctrl-C here stops at once: nothing is saved yet to lose). Its
        # output failing asks a stop nobody reads: the run's own reporting finds the failure at its first line.
        before_run = Reporting(reporter, StopRequest(run.saved))
        run.state.base_val_loss = run.measure_held_out(
            before_run, f"measuring the base model on {len(corpus.validation)} held-out documents")
        run.state.run_minutes = config.max_minutes
    remove_leftovers(run_dir, keep={run.saved.linked})  # a crash mid-save left a partial state as big as a whole one
    state = run.state
    # Resumed, the run's own limit is the one it started with, whatever ``config`` says now.
    run.budget = _time_budget(state.run_minutes if resume else config.max_minutes, state, resume, session_minutes)
    status = "finished"
    started = time.perf_counter() - state.elapsed_s
    session_tokens, session_started = state.tokens, time.perf_counter()
    with stop_between_steps(run.saved) as stop:
        report = Reporting(reporter, stop)
        report("on_start", run.total_steps, state.step)
        if run.budget is not None:
            report("on_time_budget", run.budget[1])
        while state.step < run.total_steps:
            if stop.requested:
                status = "interrupted"
                if run.saved.step != state.step:
                    state.elapsed_s = time.perf_counter() - started
                    run.save_state(best_dir)
                break
            step_started = time.perf_counter()
            loss = run.step()
            state.step_seconds += time.perf_counter() - step_started
            state.elapsed_s = time.perf_counter() - started
            total, weight = state.average
            report("on_step", state.step, loss, total / weight, state.elapsed_s)
            out_of_time = run.budget is not None and state.elapsed_s >= run.budget[1]
            if _eval_due(run) or state.step == run.total_steps or out_of_time:
                eval_started = time.perf_counter()
                stopping = _evaluate_and_keep(run, report, best_dir)
                if not stopping:  # saved before the samples, which take a while (they leave the random state be)
                    state.elapsed_s = time.perf_counter() - started
                    run.save_state(best_dir)
                _show_samples(run, report)
                if stopping:
                    status = "early-stopped"
                    break
                state.elapsed_s = time.perf_counter() - started
                cost_s = time.perf_counter() - eval_started - run.saved.cost_s  # the state's save aside
                state.next_eval_s = state.elapsed_s + cost_s * (1 - EVAL_SHARE_OF_BUDGET) / EVAL_SHARE_OF_BUDGET
            elif _save_due(run):
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
        val_loss = _measure_best_on_all(run, report, best_dir, len(corpus.validation))
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
    return TrainResult(status, best_dir, metrics, list(state.history), stopped_by=stop.signum)


def _measure_best_on_all(run: _Run, report: Reporting, best_dir: Path, documents: int) -> float:
    """The best weights' loss on every held-out example, when the evaluations used a sample."""
    report("on_full_eval", run.state.best_step, documents)
    if run.state.best_step != run.state.step:  # the weights in hand are later ones
        load_weights(run.model, run.config.kind, best_dir)
    return run.measure_held_out(report, f"measuring the best weights (step {run.state.best_step}) on all "
                                        f"{documents} held-out documents")


def _eval_due(run: _Run) -> bool:
    """Whether an evaluation falls after this step (the last one and one out of time aside).

    Without a time budget, every ``eval_every`` steps, so ``resume`` stays exact. With one, also
    not before the training since the last evaluation has made its cost (its samples and the
    best weights' save included) at most ``EVAL_SHARE_OF_BUDGET`` of the time: on the bundled
    model with one thread, an evaluation every three 5-second steps cost 13 s, 40% of a 2-minute run.
    """
    state = run.state
    if run.budget is None:
        return state.step % run.eval_every == 0
    last = int(state.history[-1]["step"]) if state.history else 0
    return state.step - last >= run.eval_every and state.elapsed_s >= state.next_eval_s


def _evaluate_and_keep(run: _Run, report: Reporting, best_dir: Path) -> bool:
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
    report("on_eval", state.step, val_loss, improved)
    return state.bad_evals >= run.config.patience


def _show_samples(run: _Run, report: Reporting) -> None:
    """Samples of the writing at this step, as the persona writes: its sampling, and no longer
    than its posts may be. With the defaults, a persona file edited to temperature 0 or a stop
    string still showed default samples."""
    length = min(run.config.sample_tokens, run.sampling.max_new_tokens)
    samples = sample_texts(run.model, run.tokenizer, run.config.samples, length, run.config.seed + run.state.step,
                           run.device, sampling=run.sampling)
    if samples:
        report("on_samples", run.state.step, samples)


def _save_due(run: _Run) -> bool:
    """Whether to save the state between evaluations: a crash, an OOM kill or a second Ctrl-C
    lost everything since the last one, a tenth of a run by default. At least ``SAVE_EVERY_S``
    of training apart, and further where a save costs more than ``SAVE_SHARE`` of that."""
    since_s = run.state.elapsed_s - run.saved.at_elapsed_s
    return since_s >= max(SAVE_EVERY_S, run.saved.cost_s / SAVE_SHARE)


def _time_budget(max_minutes: float | None, state: RunState, resume: bool,
                 session_minutes: float | None = None) -> tuple[float, float] | None:
    """The training time (``state.elapsed_s``) a time limit counts from, and the time it stops at.

    A run's own ``--max-minutes`` counts all its sessions; ``session_minutes`` (``--max-minutes``
    given to ``--resume``) limits the session alone, whatever the run started with: a run stopped
    after 579 s and resumed with ``--max-minutes 1`` trained one step.
    """
    if resume and session_minutes is not None:
        log.warning("this session trains for at most %g minutes (--max-minutes), on top of the %.1f minutes the "
                    "run has trained", session_minutes, state.elapsed_s / 60)
        return state.elapsed_s, state.elapsed_s + session_minutes * 60
    if max_minutes is None:
        return None
    if resume:
        left_min = max(0.0, max_minutes - state.elapsed_s / 60)
        log.warning("the run has trained %.1f of the %g minutes it started with (--max-minutes); %.1f left. To "
                    "train longer, resume with --max-minutes MINUTES for this session", state.elapsed_s / 60,
                    max_minutes, left_min)
    return 0.0, max_minutes * 60
