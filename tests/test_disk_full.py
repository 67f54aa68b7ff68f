"""A disk that fills up while persona writes: nothing it had is lost, and it says the disk is why.

A full disk refuses a write with ENOSPC. These tests refuse it in ways that need no disk of
their own: a limit on the size of a file (RLIMIT_FSIZE: EFBIG, SIGXFSZ being ignored, as
Python does), or a file where a folder should be.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
from pathlib import Path

import pytest

from persona.checkpoints import list_checkpoints
from persona.errors import ModelError
from persona.personas import PersonaRegistry
from persona.settings import Settings
from tests.fakes.full_disk import disk_refusing_files_over
from tests.fakes.scripted_worker import scripted_worker
from tests.reporters import Recorder
from tests.sayings import SAYINGS
from training.runs import run_dir, train_persona
from training.trainer import TrainConfig


def persona(*args: str, env: dict[str, str], file_size_limit_bytes: int | None = None) -> subprocess.CompletedProcess:
    """`persona ARGS` in a process of its own, whose files may not grow past ``file_size_limit_bytes``
    (set by the process itself: a ``preexec_fn`` is unsafe beside the test's threads)."""
    limit = resource.RLIM_INFINITY if file_size_limit_bytes is None else file_size_limit_bytes
    start = (f"import resource, runpy; resource.setrlimit(resource.RLIMIT_FSIZE, ({limit}, resource.RLIM_INFINITY)); "
             "runpy.run_module('persona', run_name='__main__')")
    return subprocess.run([sys.executable, "-c", start, *args], env=env, capture_output=True, text=True, timeout=60,
                          check=False)


@pytest.fixture
def env(settings: Settings) -> dict[str, str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("PERSONA_")}
    return clean | {"PERSONA_DATA_DIR": str(settings.data_dir), "PERSONA_REDIS_URL": settings.redis_url.get_secret_value(),
                    "COLUMNS": "200"}


def test_samples_that_cannot_be_written_leave_the_earlier_file_whole(settings: Settings, redis_client, env,
                                                                     tmp_path: Path):
    """`generate --out` emptied the earlier file before writing: on a full disk the earlier samples
    were gone and the file held the first 4 kB of the new ones, cut mid-sample."""
    (tmp_path / "out").mkdir()
    earlier = tmp_path / "out" / "samples.txt"
    earlier.write_text("an earlier sample\n" + "=" * 20 + "\n")
    with scripted_worker(settings, lambda request: " long" * 1000):  # 5 kB a sample: over the limit
        told = persona("generate", "sage", "-n", "2", "--out", str(earlier), env=env, file_size_limit_bytes=4096)
    assert told.returncode == 1 and "Traceback" not in told.stderr, told.stderr
    assert f"cannot write {earlier} (File too large); the samples follow here instead" in " ".join(told.stderr.split())
    assert told.stdout.count(" long" * 1000) == 2  # printed rather than lost
    assert earlier.read_text() == "an earlier sample\n" + "=" * 20 + "\n"
    assert [p.name for p in earlier.parent.iterdir()] == ["samples.txt"]  # no part-written file beside it


def test_samples_written_replace_the_earlier_file_and_keep_who_may_read_it(settings: Settings, redis_client, env,
                                                                           tmp_path: Path):
    (tmp_path / "out").mkdir()
    earlier = tmp_path / "out" / "samples.jsonl"
    earlier.write_text('{"text": "old"}\n')
    earlier.chmod(0o640)
    with scripted_worker(settings, lambda request: " new"):
        told = persona("generate", "sage", "-n", "2", "--out", str(earlier), env=env)
    assert told.returncode == 0, told.stderr
    assert [json.loads(line)["text"] for line in earlier.read_text().splitlines()] == [" new", " new"]
    assert earlier.stat().st_mode & 0o777 == 0o640
    assert [p.name for p in earlier.parent.iterdir()] == ["samples.jsonl"]


@pytest.mark.slow
def test_a_full_disk_while_the_bundled_model_converts_says_so_and_leaves_no_part_of_it(tmp_path: Path):
    """safetensors refuses a full disk with its own error, not an OSError: the worker died with a
    traceback, and was started again (and converted again) for ever, while `ask` said it was starting."""
    from persona.errors import DataDirUnwritable
    from persona.models import BUNDLED_CACHE_NAME, load_model

    cache = tmp_path / "data" / "model-cache"
    # Room for its config and tokenizer (2 MB), not for its weights (538 MB).
    with disk_refusing_files_over(50 * 2**20), pytest.raises(DataDirUnwritable) as refused:
        load_model("smollm2", cache_dir=cache, dtype="float32")
    assert str(refused.value).startswith(f"cannot keep data in {tmp_path / 'data'} (File too large"), refused.value
    assert not (cache / BUNDLED_CACHE_NAME).exists()
    assert list(cache.iterdir()) == []  # nothing half-written left taking the room


class _DiskFillsAsTheRunEnds(Recorder):
    """A run's reporter whose disk fills once the run has saved all it trains: from the samples
    of its last step on, no file may hold more than ``room_bytes``."""

    def __init__(self, room_bytes: int) -> None:
        super().__init__()
        self.room_bytes = room_bytes
        self.before = resource.getrlimit(resource.RLIMIT_FSIZE)

    def on_samples(self, step: int, texts: list[str]) -> None:
        super().on_samples(step, texts)
        if step == self.total:
            resource.setrlimit(resource.RLIMIT_FSIZE, (self.room_bytes, self.before[1]))

    def make_room(self) -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, self.before)


def _training(base: Path) -> TrainConfig:
    return TrainConfig(base=str(base), steps=4, batch_size=4, eval_every=2, samples=1, sample_tokens=4)


@pytest.fixture
def corpus_file(tmp_path: Path) -> Path:
    path = tmp_path / "sayings.jsonl"
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in SAYINGS))
    return path


@pytest.mark.usefixtures("one_torch_thread")
@pytest.mark.parametrize("stopped_at", ["the checkpoint", "the persona file of calm"])
def test_a_registration_cut_short_says_why_and_resume_registers_the_run_once(
        settings: Settings, env, tiny_gpt2_dir: Path, corpus_file: Path, stopped_at: str):
    """A full disk as `persona train` registered its result: a traceback, an empty checkpoint.json
    or README.md left, `persona checkpoints` said "no checkpoints yet" with v1 on disk, and --resume
    registered the same weights again as v2. (A disk with no room at all stops it at the checkpoint;
    a file where the personas folder should be, once the version is in place.)"""
    disk = _DiskFillsAsTheRunEnds(0 if stopped_at == "the checkpoint" else 2**30)
    settings.user_personas_dir.parent.mkdir(parents=True, exist_ok=True)
    settings.user_personas_dir.write_text("in the way")
    try:
        with pytest.raises(ModelError) as refused:
            train_persona(settings, "calm", corpus_file, _training(tiny_gpt2_dir), reporter=disk)
    finally:
        disk.make_room()
    said = str(refused.value)
    assert said.startswith(f"could not save {stopped_at} in "), said
    why = ("File too large; make room, then" if stopped_at == "the checkpoint" else
           f"File exists: '{settings.user_personas_dir}'; once that is put right,")
    assert said.endswith(f"{why} continue the run with --resume to register it"), said
    assert not [f for f in settings.data_dir.rglob("*") if f.is_file() and f.stat().st_size == 0]  # nothing cut short
    versions = [c.version for c in list_checkpoints(settings.checkpoints_dir, "calm")]
    assert versions == ([] if stopped_at == "the checkpoint" else ["v1"])

    settings.user_personas_dir.unlink()
    listed = persona("checkpoints", "calm", env=env)
    assert listed.returncode == 0, listed.stderr
    assert ("v1" in listed.stdout) == bool(versions) and "--resume" in listed.stdout, listed.stdout
    if versions:
        assert "no checkpoints yet" not in listed.stdout

    resumed = train_persona(settings, "calm", corpus_file, _training(tiny_gpt2_dir), resume=True)
    assert resumed.checkpoint.version == "v1" and resumed.persona_file_created
    assert [c.version for c in list_checkpoints(settings.checkpoints_dir, "calm")] == ["v1"]
    assert "calm v1" in (resumed.checkpoint.path / "README.md").read_text()
    assert PersonaRegistry.from_settings(settings).get("calm").model.checkpoint == "v1"
    assert not run_dir(settings, "calm").exists()


def test_a_redis_that_cannot_save_as_it_stops_is_not_said_to_have_kept_its_data(tmp_path: Path, monkeypatch,
                                                                                 caplog: pytest.LogCaptureFixture):
    """On a full disk Redis refuses to exit ("Error trying to save the DB, can't exit") and is
    killed: `persona up` then logged "embedded Redis stopped (data kept in ...)". (Here its
    snapshot cannot be moved into place: a folder has its name.)"""
    import redis

    from persona import embedded_redis
    from persona.served_redis import ServedRedis

    monkeypatch.setattr(embedded_redis, "SAVE_ON_STOP_TIMEOUT_S", 1.0)
    server = embedded_redis.EmbeddedRedis(tmp_path / "data")
    url = server.start()
    with redis.Redis.from_url(url) as client:
        client.set("said", "hello")
    (tmp_path / "data" / "redis" / "dump.rdb").mkdir()
    files = sorted(p.name for p in (tmp_path / "data" / "redis").iterdir())
    with caplog.at_level("INFO"):
        ServedRedis(url, tmp_path / "data", embedded=server).stop()
    said = " ".join(caplog.text.split())
    assert "data kept" not in said
    assert "the embedded Redis could not save its data as it stopped (Error moving temp DB file" in said, said
    assert "so it was killed after 1 s: the writes it had not yet saved may be lost" in said
    assert f"see its log, {tmp_path / 'data' / 'redis' / 'redis.log'}, before starting it again" in said
    assert sorted(p.name for p in (tmp_path / "data" / "redis").iterdir()) == files  # left as they are


def test_llama_cpp_short_of_room_for_its_gguf_says_the_room_was_short_not_llama_cpp(tiny_llama, tmp_path: Path):
    """The worker said "llama.cpp could not quantize ...; using the int8 engine" on a full disk,
    blaming llama.cpp: what failed was the room to write the file."""
    from persona.gguf_files import requantize_gguf, write_gguf

    small = write_gguf(tiny_llama.model, tiny_llama.tokenizer, tmp_path / "small.q4_1.gguf", "q4_1")  # 1 MB
    target = tmp_path / "cache" / "big.f32.gguf"  # 6 MB
    with disk_refusing_files_over(3 * 2**20), pytest.raises(ModelError) as refused:
        requantize_gguf(small, target, "f32")
    said = str(refused.value)
    assert said.startswith("llama.cpp could not write big.f32.gguf (f32, about 6 MB): "), said
    assert said.endswith("may write files of 3 MB at most (ulimit -f); raise that limit"), said
    assert list(target.parent.iterdir()) == []  # its part-written file is gone


def test_a_file_larger_than_the_process_may_write_is_said_as_that_limit_not_a_folder_to_change(tmp_path: Path):
    """EFBIG is the process's own limit on a file's size (`ulimit -f`), not the folder: the advice
    was to set PERSONA_DATA_DIR to a folder one can write, which the folder already was."""
    import errno

    from persona.errors import DataDirUnwritable

    said = str(DataDirUnwritable(tmp_path, OSError(errno.EFBIG, "File too large")))
    assert said.startswith(f"cannot keep data in {tmp_path} (File too large); raise the limit on the size of files")
    assert "`ulimit -f`" in said and "a folder you can write" not in said


def test_samples_sent_to_a_pipe_are_written_into_it_not_over_it(tmp_path: Path):
    """Written beside and moved in, `--out` made a FIFO (or, as root, /dev/null) a plain file
    holding the samples, and the pipe's reader got nothing."""
    import stat

    from persona.cli.generate_cmd import _write_samples

    fifo = tmp_path / "samples.fifo"
    os.mkfifo(fifo)
    reader = subprocess.Popen(["cat", str(fifo)], stdout=subprocess.PIPE)
    try:
        _write_samples(["a sample"], fifo)
        got, _ = reader.communicate(timeout=10)
    finally:
        reader.kill()
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode)
    assert b"a sample" in got
