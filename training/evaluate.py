"""How good a trained persona is: held-out perplexity against its base, and originality.

Perplexity is measured on the corpus's validation split (the documents training never
saw), framed exactly as in training. Originality samples texts as the persona writes a
post (from the start token alone, with its sampling settings) and asks how many copy a
run of ``copy_words`` words verbatim from the corpus, and how varied they are (distinct-1
and distinct-2, ``persona/originality.py``). Measured on another
corpus than the checkpoint's (a corpus rebuilt with more writing holds other documents
out), the held-out documents may be ones it trained on: the report says so.
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Protocol

import torch

from persona.checkpoints import CheckpointInfo, read_checkpoint
from persona.errors import CorpusError, ModelError
from persona.models import LoadedModel, load_model, pick_device
from persona.originality import CopyIndex, copied_fraction, distinct_n
from persona.personas import Persona
from persona.pool import BASE_VERSION, resolve_checkpoint
from persona.settings import Settings
from training.batching import encode_documents, evaluate_loss, perplexity
from training.corpus import Corpus, read_corpus
from training.trainer import max_positions, sample_texts

__all__ = ["EvalProgress", "EvalReport", "evaluate_persona", "held_out_loss"]

log = logging.getLogger(__name__)


class EvalProgress(Protocol):
    """What an evaluation tells the person waiting for it: a minute or more on a CPU."""

    # A new stage of ``total`` units (examples measured, tokens written); 0: no count to show.
    def on_stage(self, stage: str, total: int) -> None: ...
    # The units of the current stage done so far.
    def on_advance(self, done: int) -> None: ...


class _Quiet:
    """The progress of an evaluation nobody watches."""

    def on_stage(self, stage: str, total: int) -> None:
        log.debug("evaluation: %s", stage)

    def on_advance(self, done: int) -> None:
        pass


@dataclass
class EvalReport:
    """A persona checkpoint's scores on its corpus."""

    persona: str
    version: str
    base: str
    validation_documents: int
    base_loss: float
    loss: float
    base_perplexity: float
    perplexity: float
    copied_fraction: float
    longest_copied_run: int
    distinct_1: float
    distinct_2: float
    samples: list[str]
    seconds: float
    threads: int  # torch's CPU threads, which ``seconds`` depends on
    # Whether the corpus is the one the checkpoint was trained on (None: not known, or the base).
    trained_on_this_corpus: bool | None = None
    # When it is not: the corpus file it was trained on, where its checkpoint or persona file names
    # one that still holds that corpus (None: none does).
    trained_on_corpus: str | None = None
    # The run of words a sample must share with the corpus to count as copied (or a short entry whole).
    copy_words: int = 8

    def as_dict(self) -> dict:
        return asdict(self)

    def as_json(self) -> str:
        """The report as one JSON object any parser reads: a measure that is not finite (a
        wrecked model's perplexity overflows to infinity) is null, and ``not_finite`` maps its
        name to the value it had ("inf" or "nan"); ``json.dumps`` wrote a bare ``Infinity``."""
        data = self.as_dict()
        not_finite = {key: str(value) for key, value in data.items()
                      if isinstance(value, float) and not math.isfinite(value)}
        for key in not_finite:
            data[key] = None
        data["not_finite"] = not_finite
        return json.dumps(data, allow_nan=False)


def held_out_loss(loaded: LoadedModel, corpus: Corpus, max_tokens: int = 256, *, stage: str = "",
                  progress: EvalProgress | None = None) -> float:
    """Mean loss per token of a loaded model on the corpus's validation split, windowed as in
    training: ``max_tokens`` at most, and no more than the model has positions for.
    ``progress`` is told ``stage`` and the examples measured."""
    max_tokens = min(max_tokens, max_positions(loaded.model) or max_tokens)
    examples = encode_documents(loaded.tokenizer, corpus.validation, max_tokens)
    pad_id = loaded.tokenizer.pad_token_id if loaded.tokenizer.pad_token_id is not None else loaded.tokenizer.eos_token_id
    progress = progress or _Quiet()
    progress.on_stage(stage or f"measuring on {len(corpus.validation)} held-out documents", len(examples))
    return evaluate_loss(loaded.model, examples, pad_id, loaded.device, on_batch=progress.on_advance)


def _training_record(checkpoint: Path) -> CheckpointInfo | None:
    """How a checkpoint was made, if its metadata says."""
    try:
        return read_checkpoint(checkpoint)
    except ModelError:  # a folder named by path, made elsewhere
        return None


def _training_corpus(record: CheckpointInfo, persona: Persona) -> str | None:
    """The corpus file a checkpoint was trained on, where one named for it still holds that
    corpus: the one its run recorded, else the persona file's ``filters.corpus`` (the corpus a
    persona's first run was trained on). "Measure with the corpus it was trained on" named none."""
    named = [record.config.get("corpus"), persona.filters.corpus]
    for name in dict.fromkeys(n for n in named if n):
        path = Path(name).expanduser()
        if not path.is_absolute() and persona.source is not None:  # as the persona file reads it
            path = persona.source.parent / path
        try:
            if path.is_file() and read_corpus(path).fingerprint == record.corpus_fingerprint:
                return str(path)
        except (CorpusError, OSError):  # rebuilt into something unreadable since: not it
            continue
    return None


def _load(settings: Settings, persona: Persona, checkpoint: Path | None, label: str, device: str,
          progress: EvalProgress) -> LoadedModel:
    """The persona's base, with ``checkpoint`` on top when given, in float32 for measuring."""
    progress.on_stage(f"loading {label}", 0)
    return load_model(persona.model.base, checkpoint, cache_dir=settings.model_cache_dir, device=device,
                      dtype="float32")


def evaluate_persona(
    settings: Settings,
    persona: Persona,
    corpus: Corpus,
    *,
    version: str | None = None,
    samples: int = 16,
    sample_tokens: int = 48,
    copy_words: int = 8,
    seed: int = 0,
    device: str | None = None,
    progress: EvalProgress | None = None,
) -> EvalReport:
    """Base and persona perplexity on the held-out split, and originality of samples written
    as the persona writes a post, on ``device`` (None: the worker's setting); ``progress`` hears
    of each stage as it goes."""
    if not corpus.validation:
        raise CorpusError("the corpus has no held-out documents to measure on; build it with more entries")
    started = time.perf_counter()
    device = pick_device(device or settings.worker.device)
    version_name, checkpoint = resolve_checkpoint(persona, settings, version)
    record = _training_record(checkpoint) if checkpoint is not None else None
    trained_on = (record.corpus_fingerprint or None) if record is not None else None
    progress = progress or _Quiet()
    documents = f"{len(corpus.validation)} held-out documents"
    # As long as the persona's posts may be, at most ``sample_tokens``: a sample of each.
    length = min(sample_tokens, persona.sampling.max_new_tokens)

    def measure(loaded: LoadedModel, who: str) -> float:
        return held_out_loss(loaded, corpus, stage=f"measuring {who} on {documents}", progress=progress)

    def write_samples(loaded: LoadedModel) -> list[str]:
        progress.on_stage(f"writing {samples} samples, as its posts are written", length)
        return sample_texts(loaded.model, loaded.tokenizer, samples, length, seed, device,
                            sampling=persona.sampling, on_token=progress.on_advance)

    if checkpoint is None:
        base = _load(settings, persona, None, f"the base model {persona.model.base}", device, progress)
        base_loss = loss = measure(base, "the base model")
        texts = write_samples(base)
    else:
        # The checkpoint first: weights cut short, or an adapter that fits nothing, were found only
        # once the base had been loaded and measured (a minute on a CPU, lost). Measured and sampled,
        # it makes way for the base: one model in memory at a time, each loaded once.
        tuned = _load(settings, persona, checkpoint, f"{persona.name} {version_name}", device, progress)
        loss = measure(tuned, f"{persona.name} {version_name}")
        texts = write_samples(tuned)
        del tuned
        base = _load(settings, persona, None, f"the base model {persona.model.base}", device, progress)
        base_loss = measure(base, "the base model")
    index = CopyIndex(corpus.documents, n=copy_words)
    same_corpus = None if trained_on is None else trained_on == corpus.fingerprint
    return EvalReport(
        persona=persona.name,
        version=version_name if checkpoint is not None else BASE_VERSION,
        base=persona.model.base,
        validation_documents=len(corpus.validation),
        base_loss=base_loss,
        loss=loss,
        base_perplexity=perplexity(base_loss),
        perplexity=perplexity(loss),
        copied_fraction=copied_fraction(texts, index),
        longest_copied_run=max((index.longest_copied_run(t) for t in texts), default=0),
        distinct_1=distinct_n(texts, 1),
        distinct_2=distinct_n(texts, 2),
        samples=texts,
        seconds=time.perf_counter() - started,
        threads=torch.get_num_threads(),
        trained_on_this_corpus=same_corpus,
        trained_on_corpus=_training_corpus(record, persona) if same_corpus is False and record else None,
        copy_words=copy_words,
    )
