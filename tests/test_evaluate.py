"""Evaluating a persona on its corpus's held-out split, and exporting it."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from persona.errors import ConfigError, CorpusError, ModelError
from persona.originality import CopyIndex, copied_fraction
from persona.personas import PersonaRegistry
from persona.settings import Settings
from training.corpus import Corpus, read_corpus
from training.evaluate import evaluate_persona
from training.export import export_persona
from training.runs import train_persona
from training.trainer import TrainConfig

# The tiny GPT-2's tokenizer was trained on these (tests/conftest.py), so they are easy to learn.
LONG_SAYINGS = [
    "Attend to the small things; the large ones are made of them.",
    "The road is long, and that is why we walk it daily.",
    "Patience is the art of hoping slowly.",
    "A calm mind is a well-kept garden.",
]


# One CPU thread: on a shared machine, two busy-waiting threads per process are far slower.
pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture
def corpus_file(tmp_path: Path) -> Path:
    rows = [{"text": t, "split": "train"} for t in LONG_SAYINGS]
    rows.append({"text": LONG_SAYINGS[0], "split": "validation"})
    path = tmp_path / "corpus.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture
def memorised(settings: Settings, tiny_gpt2_dir: Path, corpus_file: Path) -> str:
    """A persona that learned its four sayings by heart (full fine-tune, high rate)."""
    config = TrainConfig(base=str(tiny_gpt2_dir), kind="full", steps=100, batch_size=4, learning_rate=1e-2,
                         eval_every=100, samples=0)
    train_persona(settings, "parrot", corpus_file, config)
    return "parrot"


def test_eval_of_a_memorising_persona_shows_low_perplexity_and_copying(settings: Settings, memorised: str,
                                                                      corpus_file: Path):
    persona = PersonaRegistry.from_settings(settings).get(memorised)
    report = evaluate_persona(settings, persona, read_corpus(corpus_file), samples=8, sample_tokens=30)
    assert report.version == "v1" and report.validation_documents == 1
    assert report.perplexity < report.base_perplexity / 2
    assert report.copied_fraction > 0 and report.longest_copied_run >= 8
    assert len(report.samples) == 8 and 0 < report.distinct_2 <= 1
    assert {"base_perplexity", "perplexity", "copied_fraction"} <= set(report.as_dict())


def test_eval_of_a_persona_without_checkpoint_measures_the_base(settings: Settings, write_persona,
                                                                tiny_gpt2_dir: Path, corpus_file: Path):
    write_persona("plain", base=str(tiny_gpt2_dir))
    persona = PersonaRegistry.from_settings(settings).get("plain")
    report = evaluate_persona(settings, persona, read_corpus(corpus_file), samples=2, sample_tokens=5)
    assert report.version == "base" and report.perplexity == report.base_perplexity
    with pytest.raises(CorpusError, match="no held-out documents"):
        evaluate_persona(settings, persona, Corpus(train=["a"], validation=[], fingerprint="x"))
    with pytest.raises(ModelError, match="no fine-tuned checkpoint"):
        export_persona(settings, persona, settings.data_dir / "out")


def test_export_of_full_weights_loads_with_plain_transformers(settings: Settings, memorised: str, tmp_path: Path):
    persona = PersonaRegistry.from_settings(settings).get(memorised)
    folder = export_persona(settings, persona, tmp_path / "parrot-model")
    model = AutoModelForCausalLM.from_pretrained(folder)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    start = torch.tensor([[tokenizer.eos_token_id]])
    out = model.generate(start, max_new_tokens=20, do_sample=False, pad_token_id=tokenizer.eos_token_id)
    text = tokenizer.decode(out[0], skip_special_tokens=True)
    assert any(text.strip() and saying.startswith(text.strip()[:20]) for saying in LONG_SAYINGS), text
    assert (folder / "README.md").is_file()
    with pytest.raises(ConfigError, match="not empty"):
        export_persona(settings, persona, folder)


def test_copying_counts_a_short_entry_repeated_whole():
    # Fortunes and tweets are often shorter than the 8-word run: repeating one is still copying.
    index = CopyIndex(["Nothing succeeds like excess.", "Patience is the art of hoping slowly.", "Thanks, all!"], n=8)
    samples = ["Patience is the art of hoping slowly.", "As I said: nothing succeeds like EXCESS, dear.",
               "Patience is the art of waiting.", "Thanks, all!"]
    assert [index.copies(s) for s in samples] == [True, True, False, False]
    assert copied_fraction(samples, index) == 0.5
    assert [index.longest_copied_run(s) for s in samples] == [7, 4, 0, 0]


def test_the_longest_copied_run_is_one_passage_not_two_joined_where_they_share_words():
    """Two entries share "the small things matter more than we think": a sample that starts as
    the first and ends as the second was said to copy a 20-word run found nowhere in the corpus."""
    first = "Every morning I remind myself that the small things matter more than we think, and I start there."
    second = "My grandmother said the small things matter more than we think about love and bread and sleep."
    index = CopyIndex([first, second], n=8)
    joined = "Every morning I remind myself that the small things matter more than we think about love and bread and sleep."
    assert index.copies(joined)
    assert index.longest_copied_run(joined) == 14  # "every morning ... than we think", the first's
    # The shared words are in both entries: a copy may go on into either.
    assert index.longest_copied_run(first) == 18 and index.longest_copied_run(second) == 17
    assert index.longest_copied_run("She said the small things matter more than we think about love.") == 11


def _lora_persona(settings: Settings, tiny_gpt2_dir: Path, corpus_file: Path) -> str:
    train_persona(settings, "quick", corpus_file, TrainConfig(base=str(tiny_gpt2_dir), steps=2, batch_size=4, samples=0))
    return "quick"


def test_export_into_the_empty_folder_you_are_in(settings: Settings, tiny_gpt2_dir: Path, corpus_file: Path,
                                                 tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """`mkdir model && cd model && persona export NAME -o .` ended in a traceback (os.rmdir('.'))."""
    persona = PersonaRegistry.from_settings(settings).get(_lora_persona(settings, tiny_gpt2_dir, corpus_file))
    here = tmp_path / "quick-model"
    here.mkdir()
    monkeypatch.chdir(here)
    assert export_persona(settings, persona, Path(".")) == here.resolve()
    assert Path.cwd().samefile(here)  # the folder the shell is in is filled, not replaced
    assert AutoModelForCausalLM.from_pretrained(here) is not None and (here / "README.md").is_file()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging left behind


def test_eval_on_another_corpus_than_the_trained_one_says_so(settings: Settings, tiny_gpt2_dir: Path,
                                                            corpus_file: Path, tmp_path: Path):
    """A corpus rebuilt with more writing holds other documents out, some of them trained on:
    its perplexity looked better than the persona is, without a word."""
    persona = PersonaRegistry.from_settings(settings).get(_lora_persona(settings, tiny_gpt2_dir, corpus_file))
    same = evaluate_persona(settings, persona, read_corpus(corpus_file), samples=1, sample_tokens=4)
    assert same.trained_on_this_corpus is True
    grown = tmp_path / "grown.jsonl"
    grown.write_text(corpus_file.read_text() + json.dumps({"text": "Still water shows the moon."}) + "\n")
    other = evaluate_persona(settings, persona, read_corpus(grown), samples=1, sample_tokens=4)
    assert other.trained_on_this_corpus is False and other.as_dict()["trained_on_this_corpus"] is False


def test_eval_on_another_corpus_names_the_corpus_file_it_was_trained_on(settings: Settings, tiny_gpt2_dir: Path,
                                                                         corpus_file: Path, tmp_path: Path):
    """"measure with the corpus file it was trained on" did not name it, though training knew it. Now
    the one its checkpoint records, else the persona file's, as long as it still holds that corpus."""
    persona = PersonaRegistry.from_settings(settings).get(_lora_persona(settings, tiny_gpt2_dir, corpus_file))
    grown = tmp_path / "grown.jsonl"
    grown.write_text(corpus_file.read_text() + json.dumps({"text": "Still water shows the moon."}) + "\n")

    def trained_on() -> str | None:
        report = evaluate_persona(settings, persona, read_corpus(grown), samples=1, sample_tokens=4)
        assert report.trained_on_this_corpus is False
        return report.trained_on_corpus

    assert trained_on() == str(corpus_file)
    record = settings.checkpoints_dir / "quick" / "v1" / "checkpoint.json"
    made = json.loads(record.read_text())
    del made["config"]["corpus"]  # as checkpoints made before it was recorded
    record.write_text(json.dumps(made))
    assert trained_on() == str(corpus_file)  # the persona file's filters.corpus
    corpus_file.write_text(grown.read_text())  # rebuilt in place with more writing: it is not that corpus now
    assert trained_on() is None


def test_an_exported_model_is_readable_as_any_folder_you_make(settings: Settings, tiny_gpt2_dir: Path,
                                                              corpus_file: Path, tmp_path: Path):
    """The folder came out 0700 (mkdtemp) and its weights 0600 (safetensors): an Ollama or
    llama.cpp service running as another user could not load the export it was made for."""
    import stat

    persona = PersonaRegistry.from_settings(settings).get(_lora_persona(settings, tiny_gpt2_dir, corpus_file))
    folder = export_persona(settings, persona, tmp_path / "shared")
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(folder.stat().st_mode) == 0o777 & ~umask
    assert {p.name: stat.S_IMODE(p.stat().st_mode) for p in folder.iterdir()} == {
        p.name: 0o666 & ~umask for p in folder.iterdir()}


class _Stages:
    """An evaluation's progress as it was told: each stage with its total, and the last count."""

    def __init__(self) -> None:
        self.stages: list[list] = []

    def on_stage(self, stage: str, total: int) -> None:
        self.stages.append([stage, total, 0])

    def on_advance(self, done: int) -> None:
        self.stages[-1][2] = done


def test_eval_samples_as_the_persona_writes_its_posts_and_tells_each_stage(settings: Settings, write_persona,
                                                                          tiny_gpt2_dir: Path, corpus_file: Path):
    """Samples were drawn at a fixed temperature, whatever the persona's own settings, and the
    minute an evaluation takes went by without a word."""
    write_persona("terse", base=str(tiny_gpt2_dir), sampling={"max_new_tokens": 6, "stop": ["e"]})
    persona = PersonaRegistry.from_settings(settings).get("terse")
    progress = _Stages()
    report = evaluate_persona(settings, persona, read_corpus(corpus_file), samples=4, sample_tokens=48,
                              progress=progress)
    assert any(report.samples) and all("e" not in text for text in report.samples), report.samples
    assert progress.stages == [
        [f"loading the base model {tiny_gpt2_dir}", 0, 0],
        ["measuring the base model on 1 held-out documents", 1, 1],
        ["writing 4 samples, as its posts are written", 6, 6],  # no longer than its posts
    ]


def test_eval_of_a_checkpoint_that_cannot_load_says_so_before_measuring_the_base(
        settings: Settings, write_persona, tiny_gpt2_dir: Path, corpus_file: Path, personas_dir: Path):
    """The base model was loaded and measured (18 s for the bundled one) before the checkpoint
    was found unloadable."""
    import subprocess
    import sys

    from persona.checkpoints import CheckpointInfo, register_checkpoint

    write_persona("sage", base=str(tiny_gpt2_dir))
    staging = settings.data_dir / "staging"
    staging.mkdir(parents=True)
    (staging / "adapter_config.json").write_text('{"r": 4, "target_modules": [')  # a copy cut short
    (staging / "adapter_model.safetensors").write_bytes(b"")
    register_checkpoint(settings.checkpoints_dir, staging, CheckpointInfo(persona="sage", version="", base=str(tiny_gpt2_dir), kind="lora"))
    env = {k: v for k, v in os.environ.items() if not k.startswith("PERSONA_")}
    env |= {"PERSONA_DATA_DIR": str(settings.data_dir), "PERSONA_PERSONAS_DIRS": json.dumps([str(personas_dir)]),
            "COLUMNS": "300"}
    told = subprocess.run([sys.executable, "-m", "persona", "eval", "sage", "--corpus", str(corpus_file),
                           "--checkpoint", "v1"], env=env, capture_output=True, text=True, check=False, timeout=120)
    assert told.returncode == 1 and "adapter_config.json is not valid JSON" in told.stderr, told.stderr
    assert "nothing measured" in told.stderr and "base model" not in told.stderr + told.stdout, told.stderr


def _unloadable_checkpoint(staging: Path, base: Path, damage: str) -> str:
    """A checkpoint folder that does not load (the CLI's checks refuse the first before that); the kind it is."""
    import shutil

    from peft import LoraConfig, get_peft_model
    from transformers import GPT2Config, GPT2LMHeadModel

    if damage == "weights cut short":  # a copy that did not finish
        shutil.copytree(base, staging)
        weights = staging / "model.safetensors"
        weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
        return "full"
    wider = GPT2LMHeadModel(GPT2Config(vocab_size=400, n_embd=48, n_layer=2, n_head=2, n_positions=64))
    get_peft_model(wider, LoraConfig(r=4, target_modules=["c_attn"], fan_in_fan_out=True)).save_pretrained(staging)
    return "lora"


@pytest.mark.parametrize("damage", ["weights cut short", "an adapter for another model's shapes"])
def test_eval_of_a_checkpoint_that_fails_to_load_measures_nothing_first(
        settings: Settings, write_persona, tiny_gpt2_dir: Path, corpus_file: Path, damage: str):
    """A checkpoint whose folder looked whole but would not load was refused only after the base
    model had been loaded and measured: 47 s lost on a small model's 400 held-out documents."""
    from persona.checkpoints import CheckpointInfo, register_checkpoint

    write_persona("sage", base=str(tiny_gpt2_dir))
    staging = settings.data_dir / "staging"
    kind = _unloadable_checkpoint(staging, tiny_gpt2_dir, damage)
    register_checkpoint(settings.checkpoints_dir, staging,
                        CheckpointInfo(persona="sage", version="", base=str(tiny_gpt2_dir), kind=kind))
    persona = PersonaRegistry.from_settings(settings).get("sage")
    progress = _Stages()
    with pytest.raises(ModelError, match=r"model\.safetensors is unreadable .*cut short|does not fit this base model "
                                         r"\(.*\): all 4 of its weights have other shapes than this model's"):
        evaluate_persona(settings, persona, read_corpus(corpus_file), version="v1", samples=1, progress=progress)
    assert progress.stages == [["loading sage v1", 0, 0]]  # the base was neither loaded nor measured


def test_the_longest_copied_run_counts_from_where_the_copy_began_when_its_last_words_are_in_two_entries():
    """A sample copies the first entry to its seventh word; its last three words are also the
    start of the second entry. The copy is seven words, from the first entry's start, not the
    three the second entry shares."""
    index = CopyIndex(["one two three four five six seven eight", "five six seven and more"], n=3)
    assert index.longest_copied_run("one two three four five six seven") == 7


def test_samples_with_no_words_to_compare_are_not_reported_as_perfectly_varied():
    """Distinct-n is 1.0 only where there are n-grams and none repeats: samples too short for
    one (empty replies, a single word) have no variety to report, 0.0, not a perfect score."""
    from persona.originality import distinct_n

    assert distinct_n(["", "   "], 1) == 0.0
    assert distinct_n(["Hello."], 2) == 0.0
    assert distinct_n(["one two three"], 2) == 1.0
