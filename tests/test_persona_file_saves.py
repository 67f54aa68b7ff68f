"""A persona file saved while it is served: the service keeps answering as the file says.

A save in place (truncate, then write: `cp`, `cat >`, Python's ``write_text``, many editors)
leaves the file empty, then part-written, for a moment. A worker that caught one of those
moments read the empty file as a persona on the bundled model, and answered with a model
error (or without the file's system prompt) until it read the file again.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from persona.contract import GenerationRequest, Message
from persona.errors import ConfigError, UnknownPersona
from persona.personas import (
    BROKEN_SETTLE_S,
    SAVE_SETTLE_S,
    PersonaRegistry,
    load_persona_file,
)

PERSONA_FILE = """\
name = "tiny"
adapters = ["cli", "discord", "telegram", "scheduler"]
[model]
base = "{base}"
[prompt]
system = "You are a lighthouse keeper who answers in riddles."
[sampling]
max_new_tokens = 6
seed = 7
"""


def chat(persona: str) -> GenerationRequest:
    return GenerationRequest(persona=persona, messages=[Message(role="user", content="hello there")])


def _stood_still(path: Path, seconds: float) -> None:
    """Date the file's last write ``seconds`` back, as if nothing had written it since."""
    then = time.time() - seconds
    os.utime(path, (then, then))


# -- an empty file is no persona ------------------------------------------------


@pytest.mark.parametrize("text", ["", "  \n\n", "# a persona, one day\n"])
def test_an_empty_file_is_no_persona_and_says_what_one_needs(tmp_path: Path, text: str):
    """An empty file read as a persona on the bundled model, every field at its default:
    `personas validate` passed it, and a worker that read a file mid-save served it."""
    path = tmp_path / "ghost.toml"
    path.write_text(text)
    with pytest.raises(ConfigError) as refused:
        load_persona_file(path)
    said = str(refused.value)
    assert said.startswith(f"{path}: empty: a persona file needs at least"), said
    assert '[model] base = "smollm2"' in said and "persona personas show sage" in said


def test_personas_validate_refuses_an_empty_file(tmp_path: Path):
    empty = tmp_path / "ghost.toml"
    empty.write_bytes(b"")
    env = {k: v for k, v in os.environ.items() if not k.startswith("PERSONA_")}
    env |= {"PERSONA_DATA_DIR": str(tmp_path / "data"), "COLUMNS": "200"}
    result = subprocess.run([sys.executable, "-m", "persona", "personas", "validate", str(empty)],
                            check=False, env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 1, result.stdout
    assert "✓" not in result.stdout
    assert f"✗ {empty}: empty: a persona file needs at least" in result.stderr, result.stderr


# -- a long-running reader keeps its last good read --------------------------------


@pytest.fixture
def served(tmp_path: Path, tiny_llama_dir: Path) -> tuple[PersonaRegistry, Path, str]:
    """A registry (as a worker, bot or scheduler holds one) that has read tiny.toml whole."""
    folder = tmp_path / "personas"
    folder.mkdir()
    path = folder / "tiny.toml"
    whole = PERSONA_FILE.format(base=tiny_llama_dir)
    path.write_text(whole)
    registry = PersonaRegistry([folder])
    assert registry.get("tiny").prompt.system.startswith("You are a lighthouse keeper")
    return registry, path, whole


def test_a_file_caught_empty_or_part_written_serves_its_last_good_read(served, caplog):
    registry, path, whole = served
    good = registry.get("tiny")
    cut = whole.index("[prompt]")
    caplog.set_level(logging.INFO, logger="persona.personas")
    # Empty; valid TOML without the tables that follow; not TOML; cut mid-line ("seed = 12").
    for caught in ("", whole[:cut], whole[: cut + 12], whole.replace("seed = 7", "seed = 12")[:-2]):
        path.write_text(caught)
        assert registry.get("tiny") == good, repr(caught)
        assert registry.all()["tiny"] == good, repr(caught)  # as the scheduler and bots list them
    path.write_text(whole)
    assert registry.get("tiny") == good
    said = [r.getMessage() for r in caplog.records]
    assert len(said) == 2, said  # once, not at every read; and once more when it reads whole
    assert said[0].startswith(f"persona tiny: keeping its last good read of {path} while the file reads as no "
                              "persona (empty: a persona file needs at least"), said[0]
    assert said[1] == "persona tiny: its file is taken as it now reads (a persona)"


def test_a_changed_file_is_taken_at_once(served):
    """An edit that reads whole (it ends at a line's end, and as the file ended) takes effect at
    the next read, as it did: a value changed, a setting added, one taken out of the middle."""
    registry, path, whole = served
    path.write_text(whole.replace("riddles", "rhymes"))
    assert registry.get("tiny").prompt.system.endswith("rhymes.")
    path.write_text(whole.replace("seed = 7\n", "seed = 7\ntemperature = 0.2\n"))
    assert registry.all()["tiny"].sampling.temperature == 0.2
    path.write_text(whole.replace('adapters = ["cli", "discord", "telegram", "scheduler"]\n', ""))
    assert registry.get("tiny").adapters == ["cli", "discord", "telegram"]  # the default


def test_a_change_that_drops_the_files_last_settings_is_taken_once_the_file_has_stood_still(served):
    """Losing the settings the file ended with looks like a save caught half-way; once the
    file has not changed for SAVE_SETTLE_S, it is what was meant."""
    registry, path, whole = served
    good = registry.get("tiny")
    plain = whole[: whole.index("[sampling]")]
    path.write_text(plain)
    assert registry.get("tiny") == good
    _stood_still(path, SAVE_SETTLE_S)
    assert registry.get("tiny").sampling.max_new_tokens == 96  # the default: the table is gone


def test_a_file_left_broken_is_refused_once_it_has_stood_still_and_a_removed_one_at_once(served):
    """A file left empty (or broken) is what its author meant once it has not changed for
    BROKEN_SETTLE_S: the persona is refused with why, as before. A removed file is no persona
    at once (the bots stop answering as it), and one written again is read afresh."""
    registry, path, whole = served
    path.write_text("")
    _stood_still(path, BROKEN_SETTLE_S)
    with pytest.raises(ConfigError, match="empty: a persona file needs at least"):
        registry.get("tiny")
    assert "tiny" not in registry.all()
    path.write_text(whole)
    assert registry.get("tiny").prompt.system.startswith("You are a lighthouse keeper")
    path.unlink()
    assert "tiny" not in registry.all()
    with pytest.raises(UnknownPersona):
        registry.get("tiny")
    path.write_text(whole.replace("riddles", "rhymes")[:-1])  # ends mid-line, yet the first read since
    assert registry.get("tiny").prompt.system.endswith("rhymes.")


# -- a worker answering while the file is saved ------------------------------------


def _saves(path: Path, whole: str, stop: threading.Event, counted: list[str]) -> None:
    """Save ``whole`` into ``path`` over and over as editors and copies do, slowly enough that
    a reader catches the file empty or part-written."""
    cut = whole.index("[prompt]")
    while not stop.is_set():
        with path.open("w") as file:  # in place, a slow writer: empty, then the first part
            file.flush()
            time.sleep(0.15)
            file.write(whole[:cut])
            file.flush()
            time.sleep(0.15)
            file.write(whole[cut:])
        counted.append("in place, slowly")
        time.sleep(0.05)
        for _ in range(5):  # in place, quickly (Path.write_text, `cp`)
            path.write_text(whole)
            time.sleep(0.01)
        counted.append("in place, quickly")
        beside = path.with_name(".tiny.toml.new")  # written beside, then moved over it
        beside.write_text(whole)
        beside.replace(path)
        counted.append("moved over")
        time.sleep(0.05)


def test_a_worker_answers_as_the_file_says_while_it_is_saved_over_and_over(
    tiny_llama_dir, personas_dir, running_worker, client
):
    path = personas_dir / "tiny.toml"
    whole = PERSONA_FILE.format(base=tiny_llama_dir)
    path.write_text(whole)
    (personas_dir / "plain.toml").write_text(whole.replace('name = "tiny"', 'name = "plain"').replace(
        "You are a lighthouse keeper who answers in riddles.", ""))
    worker = running_worker(preload=["tiny", "plain"])
    meant = client.ask(chat("tiny"), timeout=60)
    assert meant.ok, meant.error
    # The file's system prompt shapes the reply (the same seed without it writes another):
    assert client.ask(chat("plain"), timeout=60).text != meant.text
    stop, counted = threading.Event(), []
    saver = threading.Thread(target=_saves, args=(path, whole, stop, counted), daemon=True)
    saver.start()
    replies = []
    try:
        ends = time.monotonic() + 3.5
        while time.monotonic() < ends:
            replies.append(client.ask(chat("tiny"), timeout=30))
            time.sleep(0.02)
    finally:
        stop.set()
        saver.join(timeout=10)
    assert len(counted) >= 9, counted
    failed = [r.error.message for r in replies if not r.ok]
    assert not failed, failed[:3]
    assert {r.text for r in replies} == {meant.text}
    assert worker.pool.loaded_keys() == [(str(tiny_llama_dir), "base")]  # never the bundled model


def test_an_edit_reaches_the_worker_within_about_a_second_even_one_that_drops_settings(
    tiny_llama_dir, personas_dir, running_worker, client
):
    """Dropping a table is held back as a save caught part-way might be; the worker reads the
    file again as soon as it would be taken, so the edit still applies within about a second."""
    from persona.model_groups import PERSONA_REFRESH_S

    path = personas_dir / "tiny.toml"
    whole = PERSONA_FILE.format(base=tiny_llama_dir)
    path.write_text(whole)
    running_worker(preload=["tiny"])
    rhymes = whole.replace("riddles", "rhymes")
    for edited in (rhymes, rhymes[: rhymes.index("[prompt]")] + rhymes[rhymes.index("[sampling]"):]):
        time.sleep(0.3)  # the worker has read the file since it last changed
        seen = client.ask(chat("tiny"), timeout=60).text
        path.write_text(edited)
        written = time.monotonic()
        while (text := client.ask(chat("tiny"), timeout=60).text) == seen:
            assert time.monotonic() - written < PERSONA_REFRESH_S + 0.5, "the edit never reached the worker"
            time.sleep(0.02)
        time.sleep(PERSONA_REFRESH_S)
        assert client.ask(chat("tiny"), timeout=60).text == text  # the edit, not a step on the way
