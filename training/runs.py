"""Training a persona: the run folder, the checkpoint it registers, the persona file.

``train_persona`` ties the trainer to the rest of the service. The run's resumable state
lives in ``<data_dir>/runs/<persona>/`` until the run finishes; its best weights then
become the persona's next checkpoint version (``persona/checkpoints.py``). A persona
that did not exist gets a file in the data directory's ``personas/`` folder naming that
version, so it answers at once. An existing persona's file is never rewritten: workers
that were never swapped serve what it names, so a new version is served only by
`persona swap` (two-phase, recorded, undone by `persona rollback`). A persona trains in one
run at a time: a second is refused while the first holds ``runs/<persona>.lock``.
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import math
import os
import shutil
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import tomli_w

from persona.checkpoints import CheckpointInfo, register_checkpoint, scan_checkpoints
from persona.errors import (
    ConfigError,
    CorpusError,
    DataDirUnwritable,
    ModelError,
    UnknownPersona,
)
from persona.models import BUNDLED_ALIASES, resolve_base
from persona.personas import (
    Persona,
    PersonaRegistry,
    Sampling,
    load_persona_file,
)
from persona.settings import Settings
from persona.whole_files import write_whole
from training.corpus import Corpus, check_trainable, read_corpus, write_corpus
from training.run_folder import (
    RUN_FILE,
    lock_path,
    run_corpus,
    run_dir,
    saved_run_config,
)
from training.train_config import TrainConfig, check_base_fits, check_run_name

# The trainer (torch: seconds to import) only where a run trains: `persona train` asks
# `existing_persona` before its other checks, which must not wait for torch.
if TYPE_CHECKING:
    from training.trainer import Reporter, TrainResult

__all__ = [
    "TrainedPersona",
    "corpus_file",
    "existing_persona",
    "lock_path",
    "model_card",
    "persona_template",
    "run_corpus",
    "run_dir",
    "run_size_bytes",
    "saved_run_config",
    "train_persona",
]

log = logging.getLogger(__name__)

# The sampling a persona that training creates gets (and its samples during that first run).
NEW_PERSONA_SAMPLING = {"temperature": 0.8, "top_p": 0.95, "max_new_tokens": 96, "repetition_penalty": 1.1}


@dataclass
class TrainedPersona:
    """What ``train_persona`` did."""

    result: TrainResult
    checkpoint: CheckpointInfo | None
    persona_file: Path | None
    persona_file_created: bool  # a new persona's file, naming this version; else nothing serves it yet


def run_size_bytes(folder: Path) -> int:
    """The disk space a run folder takes, each file counted once: the best weights and the
    saved state's link to them are one file under two names."""
    seen: set[tuple[int, int]] = set()
    total = 0
    for parent, _folders, files in os.walk(folder):
        for file in files:
            try:
                info = os.lstat(os.path.join(parent, file))
            except OSError:  # removed while we counted
                continue
            if (info.st_dev, info.st_ino) not in seen:
                seen.add((info.st_dev, info.st_ino))
                total += info.st_blocks * 512
    return total


def _absolute_base(base: str) -> str:
    """A base folder as an absolute path (the bundled alias, or a folder that is not there, as
    it is): the persona file, checkpoint and run name it for a worker, export or resume that
    starts in another directory."""
    folder = Path(base).expanduser()
    return str(folder.resolve()) if base not in BUNDLED_ALIASES and folder.is_dir() else base


@contextmanager
def _training_lock(settings: Settings, name: str) -> Iterator[None]:
    """Held while a persona trains: two runs of one persona would share its run folder, so
    one would crash or register the other's weights. The system lets go if the process dies;
    the lock file is removed when the run ends (it was left in ``runs/`` after every run)."""
    path = lock_path(settings, name)
    while True:
        lock = _open_lock(settings, path)
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.seek(0)
            pid = lock.read().strip()
            lock.close()
            holder = f"process {pid}" if pid else "another process"
            raise ModelError(
                f"persona {name!r} is already being trained (by {holder}); wait for that run "
                f"to finish, or stop it and continue it with `persona train {name} --resume`"
            ) from None
        # A run that ended between our open and our lock removed the file we hold: lock the one there now.
        if _same_file(lock, path):
            break
        lock.close()
    with lock:
        lock.truncate(0)
        lock.write(str(os.getpid()))
        lock.flush()
        try:
            yield
        finally:
            path.unlink(missing_ok=True)  # while still held: no other run holds this file


def _open_lock(settings: Settings, path: Path):
    """The lock file, opened (created if need be) for reading and writing."""
    try:  # the first thing a run writes: a data directory it cannot use is found here
        path.parent.mkdir(parents=True, exist_ok=True)
        return path.open("a+")
    except OSError as exc:  # under a file, read-only, full: was a traceback
        raise DataDirUnwritable(settings.data_dir, exc) from None


def _same_file(opened, path: Path) -> bool:
    """Whether ``path`` still names the file ``opened`` is."""
    try:
        return os.path.samestat(os.fstat(opened.fileno()), path.stat())
    except FileNotFoundError:
        return False


def corpus_file(settings: Settings, name: str, corpus_path: Path, corpus: Corpus) -> Path:
    """Where the run, its persona file and ``--resume`` find the corpus: ``corpus_path`` made
    absolute (a run resumed from another directory found no ``corpus.jsonl`` there), or for a
    corpus read from a pipe (``--corpus <(zcat c.jsonl.gz)``), which cannot be read twice, a copy
    kept in the data directory's ``corpora/``."""
    if corpus_path.is_file():
        return corpus_path.resolve()
    kept = settings.data_dir / "corpora" / f"{name}-{corpus.fingerprint}.jsonl"
    if not kept.is_file():
        try:
            write_corpus(corpus, kept)  # whole or not at all
        except OSError as exc:
            raise DataDirUnwritable(settings.data_dir, exc) from None
    return kept


def persona_template(name: str, base: str, checkpoint: str, corpus: Path) -> dict:
    """A new persona file's content: sensible defaults around the trained checkpoint."""
    speaker = name.replace("-", " ").replace("_", " ").title()
    return {
        "name": name,
        "display_name": speaker,
        "description": f"Fine-tuned on {corpus.name}.",
        "adapters": ["cli", "discord", "telegram", "scheduler"],
        "model": {"base": base, "checkpoint": checkpoint},
        "prompt": {
            "system": f"You are {speaker}. Answer briefly, in your own voice and style.",
            "post_instruction": "Write one short new post in your own voice.",
        },
        "sampling": dict(NEW_PERSONA_SAMPLING),
        "filters": {"corpus": str(corpus.resolve())},
    }


def _measure(value: float, corpus: Corpus) -> str:
    """A perplexity for the card, where a corpus with nothing held out has none (NaN)."""
    if math.isnan(value):
        return "not measured (no held-out documents)" if not corpus.validation else "not measured"
    return f"{value:.2f}"


def model_card(info: CheckpointInfo, corpus: Corpus, result: TrainResult) -> str:
    """A short README for a checkpoint folder: what it is, how it was made, how it scores."""
    m = result.metrics
    return (
        f"# {info.persona} {info.version}\n\n"
        f"A {'LoRA adapter' if info.kind == 'lora' else 'full fine-tune'} of `{info.base}` "
        f"trained by `persona train` on a corpus of {len(corpus.train)} training and "
        f"{len(corpus.validation)} held-out documents (fingerprint `{info.corpus_fingerprint}`).\n\n"
        f"| measure | value |\n|---|---|\n"
        f"| held-out perplexity, base model | {_measure(m['base_perplexity'], corpus)} |\n"
        f"| held-out perplexity, this checkpoint | {_measure(m['perplexity'], corpus)} |\n"
        f"| best step / steps run | {m['best_step']:.0f} / {m['steps']:.0f} |\n"
        f"| training tokens per second | {m['tokens_per_s']:.0f} |\n"
        f"| ended | {result.status} |\n\n"
        f"Serve it: `persona swap {info.persona} {info.version}`. Export it as a standalone "
        f"Hugging Face model: `persona export {info.persona} --checkpoint {info.version} -o DIR`.\n"
        "The training config is in `checkpoint.json`.\n"
    )


def existing_persona(settings: Settings, name: str) -> Persona | None:
    """NAME's persona, or None where it has no file yet (a run makes one); refused where a folder
    of persona files cannot be read, as NAME's file may be there.

    Taken for a new persona, a run of an existing one forgot its base model and settings, and
    failed only at its end, writing a persona file into that folder."""
    try:
        return PersonaRegistry.from_settings(settings).get(name)
    except UnknownPersona as exc:
        if not exc.unreadable:
            return None
        raise ConfigError(
            f"cannot tell whether {name!r} has a persona file: it may be in a folder that cannot be read, and a "
            "run that took it for a new persona would lose its base model and settings. "
            + "".join(f"{said}. " for said in exc.unreadable) + "Then train it again."
        ) from None


def _write_persona_file(settings: Settings, persona: Persona | None, name: str, base: str,
                        version: str, corpus_path: Path) -> tuple[Path | None, bool]:
    """A new persona's file, naming its first version; an existing persona's file is left as it is.

    Workers that were never swapped serve the version their persona file names: moving it
    switched them with no swap (no check, no vote, nothing for `persona rollback`), and did
    nothing where a swap had set the version. The new version waits for `persona swap`."""
    if persona is not None:
        return persona.source, False
    folder = settings.user_personas_dir
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.toml"
    write_whole(path, tomli_w.dumps(persona_template(name, base, version, corpus_path)))
    load_persona_file(path)  # what we wrote must load
    return path, True


def train_persona(
    settings: Settings,
    name: str,
    corpus_path: Path,
    config: TrainConfig,
    *,
    resume: bool = False,
    session_minutes: float | None = None,
    reporter: Reporter | None = None,
    corpus: Corpus | None = None,
    on_ready: Callable[[], None] | None = None,
) -> TrainedPersona:
    """Fine-tune a persona on a corpus and register the best weights as its next version
    (``corpus``: the file at ``corpus_path`` already read, so it is not read again).

    ``on_ready`` is called once the run holds the persona's lock and its checks have passed,
    just before the base model is prepared: what the caller says about the run ("loading the
    base model...") then never comes before a refusal (another run of the persona, a data
    directory it cannot write, a base that does not fit).
    """
    check_run_name(name)
    config = config.model_copy(update={"base": _absolute_base(config.base)})
    corpus = corpus if corpus is not None else read_corpus(corpus_path)
    check_trainable(corpus, corpus_path)
    corpus_path = corpus_file(settings, name, corpus_path, corpus)
    with _training_lock(settings, name):
        return _train_and_register(settings, name, corpus_path, corpus, config, resume=resume,
                                   session_minutes=session_minutes, reporter=reporter, on_ready=on_ready)


def _train_and_register(settings: Settings, name: str, corpus_path: Path, corpus: Corpus, config: TrainConfig,
                        *, resume: bool, session_minutes: float | None, reporter: Reporter | None,
                        on_ready: Callable[[], None] | None) -> TrainedPersona:
    """``train_persona``'s work, while it holds the persona's training lock."""
    persona = existing_persona(settings, name)
    check_base_fits(persona, config.base)  # `persona train` checked it before torch loaded; again, under the lock
    folder = run_dir(settings, name)
    run_id = uuid.uuid4().hex  # names the run in the version it registers, so --resume knows it did
    if resume:  # checked before the base is prepared (converting the bundled one takes a while)
        saved = json.loads((folder / RUN_FILE).read_text()) if (folder / RUN_FILE).is_file() else {}
        if saved.get("corpus_fingerprint") not in (None, corpus.fingerprint):
            began_on = f" ({saved['corpus']})" if saved.get("corpus") else ""
            raise CorpusError(f"{corpus_path} is not the corpus this run started on{began_on}; resume with the "
                              "same corpus")
        run_id = saved.get("run")
        registered = _registered_by(settings, name, run_id)
        if registered is not None:  # registered, and then a full disk stopped the rest: finished now
            return _finish_registration(settings, persona, name, registered, config.base, corpus_path)
    if on_ready is not None:
        on_ready()
    base_dir = resolve_base(config.base, settings.model_cache_dir)
    # Written by the trainer once the model has loaded, replacing an unfinished earlier run:
    # stopped while it loads, a new run leaves that one resumable.
    record = {"config": config.model_dump(), "corpus_fingerprint": corpus.fingerprint, "corpus": str(corpus_path),
              "run": run_id}
    # The samples at each evaluation are written as the persona writes now (its file's
    # sampling, hand edits included), or as the persona this run creates will.
    sampling = persona.sampling if persona is not None else Sampling.model_validate(NEW_PERSONA_SAMPLING)
    from training.trainer import train  # torch: only once a run trains

    result = train(config, corpus, base_dir, folder, resume=resume, session_minutes=session_minutes, reporter=reporter,
                   record=None if resume else record, sampling=sampling)
    if result.status == "interrupted":
        return TrainedPersona(result, None, None, False)
    # The corpus file beside the config that made it: `persona eval` on another corpus names it.
    made_by = {**config.model_dump(), "corpus": str(corpus_path)} | ({"run": run_id} if run_id else {})
    info = CheckpointInfo(persona=name, version="pending", base=config.base, kind=config.kind,
                          corpus_fingerprint=corpus.fingerprint, config=made_by,
                          metrics={k: v for k, v in result.metrics.items()})
    staging = settings.checkpoints_dir / name / f".staging-{os.getpid()}"
    with _registering("the checkpoint", staging.parent):
        staging.parent.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(staging, ignore_errors=True)
        shutil.move(result.best_dir, staging)
        try:
            info = register_checkpoint(settings.checkpoints_dir, staging, info,
                                       model_card=lambda named: model_card(named, corpus, result))
        except BaseException:
            # Ctrl-C or a full disk before the version was in place: the best weights go back
            # to the run, so --resume registers them (not the last step's).
            if staging.is_dir():
                shutil.move(staging, result.best_dir)
            raise
    return _finish_registration(settings, persona, name, info, config.base, corpus_path, result)


def _registered_by(settings: Settings, name: str, run_id: str | None) -> CheckpointInfo | None:
    """The version the run ``run_id`` registered, if it did (a full disk may have stopped it after)."""
    if not run_id:  # a run started before runs were named: none is known
        return None
    found, _unreadable = scan_checkpoints(settings.checkpoints_dir, name)
    return next((info for info in found if info.config.get("run") == run_id), None)


def _finish_registration(settings: Settings, persona: Persona | None, name: str, info: CheckpointInfo, base: str,
                         corpus_path: Path, result: TrainResult | None = None) -> TrainedPersona:
    """What follows a version's registration: a new persona's file, and the run folder removed.
    Without ``result`` (`--resume` of a run that registered ``info`` and was stopped here by a
    full disk), what it measured is read back from the version."""
    with _registering(f"the persona file of {name}", settings.user_personas_dir):
        persona_file, created = _write_persona_file(settings, persona, name, base, info.version, corpus_path)
    shutil.rmtree(run_dir(settings, name), ignore_errors=True)
    if result is None:
        from training.trainer import TrainResult

        # The perplexities a run without held-out documents did not measure are not saved: NaN, as it had them.
        unmeasured = dict.fromkeys(("base_val_loss", "base_perplexity", "val_loss", "perplexity"), math.nan)
        result = TrainResult("finished", info.path, unmeasured | info.metrics)
        log.info("%s %s was registered already; its registration is finished now", name, info.version)
    log.info("registered %s %s at %s", name, info.version, info.path)
    return TrainedPersona(result, info, persona_file, created)


@contextmanager
def _registering(what: str, folder: Path) -> Iterator[None]:
    """Say why a write of the registration failed (a full disk, mostly), as the run's own saves do.
    The run folder stays, so --resume registers its best weights, or finishes their registration."""
    try:
        yield
    except OSError as exc:
        measured = next(p for p in (folder, *folder.parents) if p.exists())
        free_mb = shutil.disk_usage(measured).free / 2**20
        then = "make room, then" if exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG) else "once that is put right,"
        raise ModelError(f"could not save {what} in {folder} ({free_mb:.0f} MB free there): {exc}; {then} continue "
                         "the run with --resume to register it") from exc
