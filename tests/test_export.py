"""Two exports of a persona into one folder at once: one writes it, the other stops and says so."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import training.export
from persona.errors import ConfigError
from persona.personas import PersonaRegistry
from persona.settings import Settings
from training.export import export_persona
from training.runs import train_persona
from training.trainer import TrainConfig

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture
def two_versions(settings: Settings, tiny_gpt2_dir: Path, tmp_path: Path) -> str:
    """A persona with versions v1 and v2."""
    corpus = tmp_path / "corpus.jsonl"
    sayings = ["Patience is the art of hoping slowly.", "A calm mind is a well-kept garden."]
    corpus.write_text("".join(json.dumps({"text": t, "split": "train"}) + "\n" for t in sayings))
    for _ in range(2):
        train_persona(settings, "twice", corpus, TrainConfig(base=str(tiny_gpt2_dir), steps=1, batch_size=2, samples=0))
    return "twice"


def _export_with_another_finishing_meanwhile(settings: Settings, name: str, out: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> tuple[str, dict[str, bytes]]:
    """v1 exported into ``out`` while, as its model loads, an export of v2 into ``out`` runs
    start to end (as a second `persona export` started a moment later and quicker would);
    what v1's export said ("wrote", or its refusal), and the files v2's left in ``out``."""
    persona = PersonaRegistry.from_settings(settings).get(name)
    load_model = training.export.load_model
    v2_wrote: dict[str, bytes] = {}

    def load_while_v2_is_exported(*args, **kwargs):
        loaded = load_model(*args, **kwargs)
        monkeypatch.setattr(training.export, "load_model", load_model)
        export_persona(settings, persona, out, version="v2")
        v2_wrote.update(_files(out))
        return loaded

    monkeypatch.setattr(training.export, "load_model", load_while_v2_is_exported)
    try:
        export_persona(settings, persona, out, version="v1")
    except ConfigError as refusal:
        return str(refusal), v2_wrote
    return "wrote", v2_wrote


def _files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in folder.iterdir()}


@pytest.mark.parametrize("made_empty_first", [False, True], ids=["new folder", "empty folder made for it"])
def test_an_export_into_a_folder_another_export_filled_meanwhile_is_refused(
    settings: Settings, two_versions: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, made_empty_first: bool
):
    """Two exports into one new folder both said "wrote", and the later one's files replaced the
    other's (with different file sets, one version's weights beside the other's GGUF)."""
    out = tmp_path / "model"
    if made_empty_first:
        out.mkdir()
    said, v2_wrote = _export_with_another_finishing_meanwhile(settings, two_versions, out, monkeypatch)
    assert said == (f"{out} was filled while this export ran (by another `persona export` to it?); "
                    "nothing was written there; choose a new folder")
    assert _files(out) == v2_wrote and v2_wrote["README.md"].startswith(b"# Twice (twice v2)")
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".model-")]  # its staging is cleaned up
