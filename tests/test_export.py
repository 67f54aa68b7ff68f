"""Exporting a persona: into a folder on another filesystem (a mount point: a Docker volume, a USB
disk), a failed write leaving the folder as it was, and two exports into one folder at once (one
writes it, the other stops and says so)."""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
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
    """The files in ``folder`` (not the staging folder an export still writing has in it)."""
    return {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()}


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
    assert sorted(p.name for p in out.iterdir()) == sorted(v2_wrote)  # its staging is cleaned up
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".model-")]


def _renames_refused(monkeypatch: pytest.MonkeyPatch, refused: Callable[[Path, Path], int | None]) -> None:
    """os.rename (what Path.rename calls) failing as the kernel's does where ``refused`` gives an errno."""
    rename = os.rename

    def kernel_rename(src, dst, *args, **kwargs):
        if (code := refused(Path(src).resolve(), Path(dst).resolve())) is not None:
            raise OSError(code, os.strerror(code), os.fspath(src), None, os.fspath(dst))
        return rename(src, dst, *args, **kwargs)

    monkeypatch.setattr(os, "rename", kernel_rename)


def _mounted_at(mount: Path) -> Callable[[Path, Path], int | None]:
    """A filesystem mounted at ``mount``: a rename from outside it to inside (or back) is EXDEV."""
    return lambda src, dst: errno.EXDEV if src.is_relative_to(mount) != dst.is_relative_to(mount) else None


def _exported_files(out: Path) -> list[str]:
    return sorted(p.name for p in out.iterdir())


def test_an_export_into_a_mount_point_is_written_there(
    settings: Settings, two_versions: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    """`persona export -o /export` into an empty Docker volume or USB disk failed with "Invalid
    cross-device link; make room" (40 GB free), left a README.md there, and the retry was refused
    as "not empty": the model was staged on the parent's filesystem and renamed across."""
    out = tmp_path / "usb"
    out.mkdir()
    _renames_refused(monkeypatch, _mounted_at(out))
    export_persona(settings, PersonaRegistry.from_settings(settings).get(two_versions), out, version="v1")
    assert (out / "README.md").read_text().startswith("# Twice (twice v1)")
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= set(_exported_files(out))
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no staging left in it
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".usb-")]  # nor beside it


@pytest.mark.parametrize("made_empty_first", [False, True], ids=["new folder", "empty folder made for it"])
def test_an_export_where_no_rename_works_is_copied_into_place(
    settings: Settings, two_versions: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, made_empty_first: bool
):
    """Where the kernel refuses every rename across (overlayfs renaming a folder of an image's
    layer), the files are copied instead; no copy is left behind."""
    persona = PersonaRegistry.from_settings(settings).get(two_versions)
    straight = tmp_path / "straight"
    export_persona(settings, persona, straight, version="v1")
    out = tmp_path / "model"
    if made_empty_first:
        out.mkdir()
    _renames_refused(monkeypatch, lambda src, dst: errno.EXDEV)
    export_persona(settings, persona, out, version="v1")
    assert _files(out) == _files(straight)
    assert _exported_files(out) == _exported_files(straight)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


@pytest.mark.parametrize(("code", "words"), [
    (errno.ENOSPC, "MB free there): No space left on device; make room or choose another -o"),
    (errno.EIO, "model.safetensors); nothing was left there; choose another -o"),
], ids=["disk full", "other failure"])
def test_an_export_that_fails_part_way_leaves_the_folder_as_it_was(
    settings: Settings, two_versions: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, code: int, words: str
):
    """An export into an empty folder that failed after claiming it left its README there, so the
    retry was refused as "not empty"; and every failure was worded as a full disk."""
    persona = PersonaRegistry.from_settings(settings).get(two_versions)
    out = tmp_path / "usb"
    out.mkdir()
    weights = out / "model.safetensors"
    with monkeypatch.context() as failing, pytest.raises(ConfigError) as refusal:
        _renames_refused(failing, lambda src, dst: code if dst == weights else None)
        export_persona(settings, persona, out, version="v1")
    said = str(refusal.value)
    assert said.startswith(f"could not write the model to {out}") and said.endswith(words)
    assert ("make room" in said) == (code == errno.ENOSPC)
    assert _exported_files(out) == []
    export_persona(settings, persona, out, version="v1")  # the retry
    assert (out / "README.md").read_text().startswith("# Twice (twice v1)")


_EXPORT_INTO_MOUNT = """
import json, os, sys
from pathlib import Path
from persona.personas import PersonaRegistry
from persona.settings import Settings
from training.export import export_persona
data_dir, redis_url, name, out = sys.argv[1:]
settings = Settings(_env_file=None, data_dir=data_dir, redis_url=redis_url)
out = Path(out)
mounted = os.stat(out).st_dev != os.stat(out.parent).st_dev
export_persona(settings, PersonaRegistry.from_settings(settings).get(name), out, version="v1")
print(json.dumps({"mounted": mounted, "files": sorted(os.listdir(out)),
                  "readme": (out / "README.md").read_text().splitlines()[0]}))
"""


def _can_mount_tmpfs(at: Path) -> bool:
    """Whether a user namespace of its own (``unshare -rm``) may mount a tmpfs here."""
    if shutil.which("unshare") is None:
        return False
    probe = subprocess.run(["unshare", "-rm", "mount", "-t", "tmpfs", "none", str(at)], check=False,
                           capture_output=True)
    return probe.returncode == 0


@pytest.mark.slow  # a second Python loads torch: about 15 s
def test_an_export_into_a_real_mount_point(settings: Settings, two_versions: str, tmp_path: Path):
    """The same as into a Docker volume: a tmpfs mounted on the empty folder, in a mount namespace
    of the test's own (gone with it, so nothing is left mounted)."""
    out = tmp_path / "usb"
    out.mkdir()
    if not _can_mount_tmpfs(out):
        pytest.skip("no unshare -rm here to mount a tmpfs without root")
    in_namespace = 'mount -t tmpfs none "$1" && shift && exec "$@"'
    done = subprocess.run(
        ["unshare", "-rm", "sh", "-c", in_namespace, "sh", str(out), sys.executable, "-c", _EXPORT_INTO_MOUNT,
         str(settings.data_dir), settings.redis_url.get_secret_value(), two_versions, str(out)],
        check=False, capture_output=True, text=True, cwd=Path(__file__).parents[1], timeout=120,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    wrote = json.loads(done.stdout.splitlines()[-1])
    assert wrote["mounted"] and wrote["readme"] == "# Twice (twice v1)"
    assert {"README.md", "config.json", "model.safetensors"} <= set(wrote["files"])
    assert not [name for name in wrote["files"] if name.startswith(".")]
