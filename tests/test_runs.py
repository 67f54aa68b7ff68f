"""Training a persona end to end: checkpoint versions, its persona file, served by a worker."""

from __future__ import annotations

import json
import tomllib
from pathlib import Path

import pytest
from pydantic import ValidationError

from persona.checkpoints import list_checkpoints, read_checkpoint, scan_checkpoints
from persona.contract import GenerationRequest, Priority
from persona.errors import ConfigError, CorpusError, ModelError
from persona.models import load_model
from persona.personas import PersonaRegistry
from persona.queue import QueueClient
from persona.settings import Settings
from tests.reporters import Recorder
from tests.sayings import SAYINGS
from training.runs import run_dir, saved_run_config, train_persona
from training.trainer import TrainConfig

# One CPU thread: on a shared machine, two busy-waiting threads per process are far slower.
pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture
def corpus_file(tmp_path: Path) -> Path:
    path = tmp_path / "sayings.jsonl"
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in SAYINGS))
    return path


def config(base: Path, **changes) -> TrainConfig:
    return TrainConfig(base=str(base), steps=4, batch_size=4, samples=0, **changes)


def test_new_persona_gets_a_file_in_the_data_dir_and_later_versions_wait_for_a_swap(settings: Settings,
                                                                                   tiny_gpt2_dir: Path,
                                                                                   corpus_file: Path):
    """A second run moved the persona file to v2: workers never swapped followed it at once (no
    check, no vote, nothing for `persona rollback`)."""
    first = train_persona(settings, "calm", corpus_file, config(tiny_gpt2_dir))
    assert first.checkpoint.version == "v1" and first.persona_file_created
    assert first.persona_file == settings.user_personas_dir / "calm.toml"
    persona = PersonaRegistry.from_settings(settings).get("calm")
    assert persona.model.checkpoint == "v1" and persona.model.base == str(tiny_gpt2_dir)
    assert persona.filters.corpus == str(corpus_file.resolve())

    file_before = first.persona_file.read_text()
    second = train_persona(settings, "calm", corpus_file, config(tiny_gpt2_dir, seed=2))
    assert second.checkpoint.version == "v2" and not second.persona_file_created
    assert first.persona_file.read_text() == file_before  # still serves v1 until `persona swap calm v2`
    versions = list_checkpoints(settings.checkpoints_dir, "calm")
    assert [v.version for v in versions] == ["v1", "v2"]
    for info in versions:
        assert info.corpus_fingerprint and info.config["kind"] == "lora" and "perplexity" in info.metrics
        card = (info.path / "README.md").read_text()
        assert f"calm {info.version}" in card and "perplexity" in card
    assert not (settings.data_dir / "runs" / "calm").exists()  # finished runs leave nothing behind


def test_a_persona_from_elsewhere_is_not_rewritten(settings: Settings, write_persona, tiny_gpt2_dir: Path, corpus_file: Path):
    path = write_persona("keeper", base=str(tiny_gpt2_dir))
    before = path.read_text()
    done = train_persona(settings, "keeper", corpus_file, config(tiny_gpt2_dir))
    assert done.checkpoint.version == "v1" and not done.persona_file_created
    assert path.read_text() == before
    with pytest.raises(ConfigError, match="would not fit"):
        train_persona(settings, "keeper", corpus_file, config(Path("/elsewhere")))


def test_clear_errors_before_any_training(settings: Settings, tiny_gpt2_dir: Path, tmp_path: Path):
    with pytest.raises(CorpusError, match="does not exist"):
        train_persona(settings, "x", tmp_path / "missing.jsonl", config(tiny_gpt2_dir))
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(CorpusError, match="no documents"):
        train_persona(settings, "x", empty, config(tiny_gpt2_dir))
    one = tmp_path / "one.jsonl"
    one.write_text('{"text": "only one", "split": "validation"}\n')
    with pytest.raises(CorpusError, match="no training documents"):
        train_persona(settings, "x", one, config(tiny_gpt2_dir))
    one.with_name("two.jsonl").write_text('{"text": "a"}\n{"text": "b"}\n')
    with pytest.raises(ModelError, match="neither the bundled"):
        train_persona(settings, "x", one.with_name("two.jsonl"), TrainConfig(base="gpt-17"))
    with pytest.raises(ConfigError, match="not a persona name"):
        train_persona(settings, "Bad Name", empty, config(tiny_gpt2_dir))


def test_a_trained_persona_answers_through_the_worker(settings: Settings, tiny_llama_dir: Path, corpus_file: Path,
                                                      running_worker, redis_client):
    from persona.connection import connect

    train_persona(settings, "sayer", corpus_file, config(tiny_llama_dir))
    running_worker()
    client = QueueClient(connect(settings), settings.queue)  # the CLI's client, made for long waits
    reply = client.ask(GenerationRequest(persona="sayer", mode="complete", prefix="Still",
                                         priority=Priority.batch), timeout=60)
    assert reply.ok, reply.error
    assert reply.version == "v1" and reply.persona == "sayer"
    chat = client.ask(GenerationRequest(persona="sayer", messages=[{"role": "user", "content": "hi"}]), timeout=60)
    assert chat.ok and chat.version == "v1"
    assert tomllib.loads((settings.user_personas_dir / "sayer.toml").read_text())["model"]["checkpoint"] == "v1"


class _StartsAnotherTraining:
    """A reporter that, once its run has started, tries a second run of the same persona."""

    def __init__(self, start_another) -> None:
        self.start_another = start_another
        self.refusal: Exception | None = None

    def on_start(self, total_steps: int, resumed_from: int) -> None:
        try:
            self.start_another()
        except Exception as exc:  # noqa: BLE001 - the test looks at what was raised
            self.refusal = exc

    def on_step(self, step: int, loss: float, average: float, elapsed_s: float) -> None: ...
    def on_eval(self, step: int, val_loss: float, improved: bool) -> None: ...
    def on_samples(self, step: int, texts: list[str]) -> None: ...
    def on_full_eval(self, best_step: int, documents: int) -> None: ...


def test_a_second_training_of_the_same_persona_is_refused_while_one_runs(settings: Settings, tiny_gpt2_dir: Path,
                                                                         corpus_file: Path):
    """Two runs would share one run folder: one would crash or register the other's weights."""
    reporter = _StartsAnotherTraining(
        lambda: train_persona(settings, "twin", corpus_file, config(tiny_gpt2_dir, seed=2)))
    first = train_persona(settings, "twin", corpus_file, config(tiny_gpt2_dir), reporter=reporter)
    assert isinstance(reporter.refusal, ModelError), reporter.refusal
    assert "already being trained" in str(reporter.refusal)
    assert first.checkpoint.version == "v1" and first.checkpoint.config["seed"] == 0
    assert [v.version for v in list_checkpoints(settings.checkpoints_dir, "twin")] == ["v1"]
    # Once it has finished, the persona trains again.
    assert train_persona(settings, "twin", corpus_file, config(tiny_gpt2_dir, seed=2)).checkpoint.version == "v2"


def test_a_run_leaves_no_lock_file_behind(settings: Settings, tiny_gpt2_dir: Path, corpus_file: Path):
    """Every run, finished or refused, left ``runs/NAME.lock`` in the data directory for good."""
    lock = settings.data_dir / "runs" / "tidy.lock"
    held: list[bool] = []
    reporter = _StartsAnotherTraining(lambda: held.append(lock.is_file()))
    train_persona(settings, "tidy", corpus_file, config(tiny_gpt2_dir), reporter=reporter)
    assert held == [True] and not lock.exists()
    with pytest.raises(ConfigError, match="would not fit"):  # refused while it held the lock
        train_persona(settings, "tidy", corpus_file, config(Path("/elsewhere")))
    assert not lock.exists()
    assert list((settings.data_dir / "runs").iterdir()) == []


def test_a_base_named_relative_to_here_is_found_from_anywhere(settings: Settings, tiny_gpt2_dir: Path,
                                                              corpus_file: Path, tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch):
    """The persona file, checkpoint and run name the base folder absolutely: the worker, export
    and a resumed run may well start in another directory than `persona train` did."""
    monkeypatch.chdir(tiny_gpt2_dir.parent)
    done = train_persona(settings, "here", corpus_file, config(Path(tiny_gpt2_dir.name)))
    monkeypatch.chdir(tmp_path)
    persona = PersonaRegistry.from_settings(settings).get("here")
    assert persona.model.base == str(tiny_gpt2_dir.resolve()) == done.checkpoint.base
    assert load_model(persona.model.base, done.checkpoint.path, cache_dir=settings.model_cache_dir).fine_tuned
    # Training it again from here, naming the base the same way, is the same base.
    monkeypatch.chdir(tiny_gpt2_dir.parent)
    assert train_persona(settings, "here", corpus_file, config(Path(tiny_gpt2_dir.name))).checkpoint.version == "v2"


def test_the_bundled_base_by_another_of_its_names_fits_its_persona(settings: Settings, write_persona,
                                                                   corpus_file: Path):
    """`persona train sage --base bundled` was refused: "base 'smollm2' ... would not fit it"."""
    write_persona("stoic", base="smollm2")
    runs = settings.data_dir / "runs" / "stoic"
    runs.mkdir(parents=True)
    (runs / "run.json").write_text(json.dumps({"config": {}, "corpus_fingerprint": "another corpus"}))
    # Past the base check, the run's own check speaks (before the bundled model is prepared).
    with pytest.raises(CorpusError, match="not the corpus this run started on"):
        train_persona(settings, "stoic", corpus_file, TrainConfig(base="bundled"), resume=True)
    with pytest.raises(ConfigError, match="would not fit"):
        train_persona(settings, "stoic", corpus_file, TrainConfig(base="/elsewhere"), resume=True)


def test_the_card_of_a_run_with_nothing_held_out_says_so(settings: Settings, tiny_gpt2_dir: Path, tmp_path: Path):
    one = tmp_path / "one.jsonl"
    one.write_text(json.dumps({"text": " ".join(SAYINGS)}) + "\n")
    done = train_persona(settings, "single", one, config(tiny_gpt2_dir))
    card = (done.checkpoint.path / "README.md").read_text()
    assert "not measured (no held-out documents)" in card and "nan" not in card


def test_a_run_with_nothing_held_out_registers_a_checkpoint_its_reader_accepts(settings: Settings,
                                                                             tiny_gpt2_dir: Path, tmp_path: Path):
    """Its perplexity (NaN: not measured) was written as null, and its own checkpoint.json was then
    "unreadable" to `checkpoints`, `personas validate`, `eval` and `swap`, while a worker served it.
    Not measured is now left out; a checkpoint.json written with nulls before still reads."""
    one = tmp_path / "one.jsonl"
    one.write_text(json.dumps({"text": " ".join(SAYINGS)}) + "\n")
    done = train_persona(settings, "unmeasured", one, config(tiny_gpt2_dir))
    written = json.loads((done.checkpoint.path / "checkpoint.json").read_text())["metrics"]
    assert None not in written.values() and "perplexity" not in written and written["steps"] == 4
    found, unreadable = scan_checkpoints(settings.checkpoints_dir, "unmeasured")
    assert unreadable == [] and [c.metrics for c in found] == [written]

    as_written_before = dict(written, base_val_loss=None, base_perplexity=None, val_loss=None, perplexity=None)
    metadata = done.checkpoint.path / "checkpoint.json"
    metadata.write_text(json.dumps(dict(json.loads(metadata.read_text()), metrics=as_written_before)))
    assert read_checkpoint(done.checkpoint.path).metrics == written


def test_steps_and_epochs_together_are_refused_but_a_run_saved_with_both_resumes(settings: Settings):
    """Both given, --steps silently won; a run saved that way before still resumes as it ran."""
    with pytest.raises(ValidationError, match="keep --steps for an exact number of optimiser steps, or --epochs"):
        TrainConfig(steps=40, epochs=2)
    folder = run_dir(settings, "old")
    folder.mkdir(parents=True)
    (folder / "run.json").write_text(json.dumps({"config": {"steps": 40, "epochs": 2.0}}))
    saved = saved_run_config(settings, "old")
    assert (saved.steps, saved.epochs) == (40, None)


def test_a_new_run_stopped_while_it_loads_leaves_the_unfinished_one_resumable(settings: Settings,
                                                                             tiny_gpt2_dir: Path,
                                                                             corpus_file: Path, tmp_path: Path):
    """A new run wrote its run.json over the unfinished run's before loading its model: stopped
    there (or failing to load), the old run's state was left under the new run's config."""
    first = config(tiny_gpt2_dir, eval_every=1)
    assert train_persona(settings, "again", corpus_file, first, reporter=Recorder(stop_at=1)).checkpoint is None
    unloadable = tmp_path / "not-a-model"
    unloadable.mkdir()
    (unloadable / "config.json").write_text("{}")
    with pytest.raises(ModelError, match="cannot load the base model"):
        train_persona(settings, "again", corpus_file, config(unloadable, seed=5))
    assert saved_run_config(settings, "again") == first.model_copy(update={"base": str(tiny_gpt2_dir)})
    resumed = train_persona(settings, "again", corpus_file, saved_run_config(settings, "again"), resume=True)
    assert resumed.result.status == "finished" and resumed.checkpoint.config["seed"] == 0


def test_a_corpus_already_read_is_not_read_again(settings: Settings, tiny_gpt2_dir: Path, corpus_file: Path):
    """`persona train` read the corpus for its held-out count, then train_persona read it again."""
    from training.corpus import read_corpus

    data = read_corpus(corpus_file)
    corpus_file.write_text("not a corpus any more\n")  # read again, it would be refused
    done = train_persona(settings, "once", corpus_file, config(tiny_gpt2_dir), corpus=data)
    assert done.checkpoint.corpus_fingerprint == data.fingerprint


def test_an_interrupted_run_names_its_corpus_absolutely(settings: Settings, tiny_gpt2_dir: Path, corpus_file: Path,
                                                        monkeypatch: pytest.MonkeyPatch):
    """run.json kept --corpus as typed ("sayings.jsonl"): `--resume` from another directory,
    and the command it was told to run, read a corpus that is not there."""
    monkeypatch.chdir(corpus_file.parent)
    done = train_persona(settings, "where", Path(corpus_file.name), config(tiny_gpt2_dir, eval_every=1),
                         reporter=Recorder(stop_at=1))
    assert done.checkpoint is None
    assert json.loads((run_dir(settings, "where") / "run.json").read_text())["corpus"] == str(corpus_file.resolve())


def test_a_run_folder_counts_its_linked_weights_once(tmp_path: Path):
    """The saved state links the best weights: `du` counts them once, and so must the size an
    interrupted run says it keeps."""
    from training.runs import run_size_bytes

    folder = tmp_path / "run"
    (folder / "best").mkdir(parents=True)
    (folder / "best" / "model.safetensors").write_bytes(b"w" * 100_000)
    (folder / "weights-3").mkdir()
    (folder / "weights-3" / "model.safetensors").hardlink_to(folder / "best" / "model.safetensors")
    one = run_size_bytes(folder)
    assert 100_000 <= one < 200_000
    (folder / "state.pt").write_bytes(b"s" * 100_000)
    assert run_size_bytes(folder) >= one + 100_000


def test_samples_during_a_run_are_written_with_the_personas_own_sampling(settings: Settings, tiny_gpt2_dir: Path,
                                                                         corpus_file: Path):
    """A persona file hand-edited to greedy, two-token posts still showed, at every evaluation,
    samples of 40 tokens drawn at the default temperature: nothing like what it would post."""
    import tomli_w
    from transformers import AutoTokenizer

    made = train_persona(settings, "terse", corpus_file, config(tiny_gpt2_dir))
    data = tomllib.loads(made.persona_file.read_text())
    data["sampling"].update(temperature=0.0, max_new_tokens=2)  # as a user edits it
    made.persona_file.write_text(tomli_w.dumps(data))

    seen = Recorder()
    train_persona(settings, "terse", corpus_file, TrainConfig(base=str(tiny_gpt2_dir), steps=2, batch_size=4, eval_every=1, samples=2),
                  reporter=seen)
    tokenizer = AutoTokenizer.from_pretrained(tiny_gpt2_dir)
    assert len(seen.samples) == 4
    assert seen.samples[0] == seen.samples[1] and seen.samples[2] == seen.samples[3]  # greedy: one text
    assert all(len(tokenizer.encode(text)) <= 2 for text in seen.samples), seen.samples
