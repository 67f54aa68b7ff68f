"""The supervisor with real `persona` processes: restarts, giving up, stopping, log files."""

from __future__ import annotations

import json
import logging
import os
import re
import threading
import time

import pytest

from persona.errors import ConfigError
from persona.supervisor import (
    CONFIG_ERROR_EXIT_STATUS,
    Service,
    Supervisor,
    one_up_per_data_dir,
)
from tests.conftest import free_port


@pytest.fixture
def env(tmp_path) -> dict[str, str]:
    """The environment of services that crash as they start: no Redis at the address given
    (one may answer there later, so they are restarted)."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("PERSONA_")}
    return clean | {"PERSONA_DATA_DIR": str(tmp_path / "data"), "PERSONA_REDIS_URL": f"redis://127.0.0.1:{free_port()}/0"}


def exited(service: Service, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while service.process.poll() is None:
        assert time.monotonic() < deadline, f"{service.name} did not exit"
        time.sleep(0.05)


def test_a_crash_is_restarted_after_a_pause_without_blocking_the_check(env):
    service = Service("worker-1", ["worker"])
    supervisor = Supervisor([service], env=env)
    supervisor.start()
    try:
        first = service.process.pid
        exited(service)
        started = time.monotonic()
        supervisor.check()  # notes the exit and when to start it again
        assert time.monotonic() - started < 0.3  # the supervisor's loop is never put to sleep
        assert service.process.pid == first
        deadline = time.monotonic() + 10
        while service.process.pid == first:
            assert time.monotonic() < deadline, "the crashed service was not restarted"
            supervisor.check()
            time.sleep(0.05)
    finally:
        supervisor.stop()


def test_a_service_that_can_never_start_is_given_up_on(env, caplog):
    service = Service("worker-1", ["worker"])
    supervisor = Supervisor([service], env=env, first_pause_s=0.05, max_quick_exits=3)
    pids = []
    with caplog.at_level(logging.WARNING, logger="persona.supervisor"):
        supervisor.start()
        try:
            deadline = time.monotonic() + 30
            while not service.gave_up:
                assert time.monotonic() < deadline, f"still restarting after {len(set(pids))} starts"
                pids.append(service.process.pid)
                supervisor.check()
                time.sleep(0.05)
            for _ in range(10):  # and it stays given up on
                supervisor.check()
                time.sleep(0.05)
            assert service.process.poll() == 1 and len(set(pids)) == 3
        finally:
            supervisor.stop()
    assert "worker-1 exited with status 1, 3 times in a row" in caplog.text and "giving up on it" in caplog.text


def run_until_it_stops_on_a_configuration_error(env, caplog, timeout: float = 30) -> None:
    """Start one worker under a supervisor and see it exit 78 once, never restarted."""
    service = Service("worker-1", ["worker"])
    supervisor = Supervisor([service], env=env, first_pause_s=0.05)
    with caplog.at_level(logging.WARNING, logger="persona.supervisor"):
        supervisor.start()
        try:
            first = service.process.pid
            exited(service, timeout=timeout)
            for _ in range(10):
                supervisor.check()
                time.sleep(0.05)
            assert service.gave_up and service.process.pid == first
            assert service.process.returncode == CONFIG_ERROR_EXIT_STATUS
        finally:
            supervisor.stop()


def test_a_service_that_ends_on_a_configuration_error_is_not_restarted(env, caplog, capfd):
    """It was restarted four times, each time saying the same error, then given up on."""
    env["PERSONA_WORKER__MAX_BATCH"] = "abc"  # a setting it cannot read: starting again cannot help
    run_until_it_stops_on_a_configuration_error(env, caplog)
    said = capfd.readouterr().err
    assert said.count("PERSONA_WORKER__MAX_BATCH: input should be a valid integer") == 1, said
    assert "restarting in" not in caplog.text and len(caplog.records) == 1
    assert ("worker-1 stopped on a configuration error (exit status 78), which restarting cannot fix, so it is "
            "not restarted (the other services keep running): fix what its error above says") in caplog.text


def test_a_worker_whose_preloaded_checkpoint_is_damaged_is_not_restarted(
    env, redis_url, write_persona, tiny_gpt2_dir, settings, tmp_path, caplog, capfd
):
    """A damaged checkpoint fails the same way at every start: the worker exited 1, and
    `persona up` restarted it four times, each loading for seconds, then gave up on it."""
    damaged = tmp_path / "damaged-lora"
    damaged.mkdir()
    (damaged / "adapter_config.json").write_text('{"peft_type": "LORA", "r": 4, "target_modules": ["c_attn"]}')
    (damaged / "adapter_model.safetensors").write_bytes(b"x")  # a copy cut short
    write_persona("broken", base=str(tiny_gpt2_dir), model={"checkpoint": str(damaged)})
    env |= {
        "PERSONA_REDIS_URL": redis_url,
        "PERSONA_PERSONAS_DIRS": json.dumps([str(p) for p in settings.personas_dirs]),
        "PERSONA_WORKER__PERSONAS": '["broken"]',
        "PERSONA_WORKER__DEVICE": "cpu",
    }
    run_until_it_stops_on_a_configuration_error(env, caplog, timeout=60)
    said = capfd.readouterr().err
    assert "the worker cannot start: persona 'broken', which it was told to preload" in said, said
    assert "adapter_model.safetensors is unreadable" in said and "copy the whole folder again" in said, said
    assert "leave 'broken' out of the preloaded personas" in said, said
    assert "restarting in" not in caplog.text and "stopped on a configuration error" in caplog.text


def test_only_a_service_up_runs_ends_a_configuration_error_with_its_own_status(env):
    """Run alone, `persona worker` keeps exit status 1 for it, as every command does."""
    import subprocess
    import sys

    env["PERSONA_WORKER__MAX_BATCH"] = "abc"
    alone = subprocess.run([sys.executable, "-m", "persona", "worker"], env=env, capture_output=True, text=True,
                           timeout=60, check=False)
    assert alone.returncode == 1 and "PERSONA_WORKER__MAX_BATCH" in alone.stderr, alone.stderr


def test_nothing_is_restarted_once_stopping(env):
    service = Service("worker-1", ["worker"])
    supervisor = Supervisor([service], env=env)
    supervisor.start()
    exited(service)
    # `persona up --chat` checks in its own thread, which may be mid-check when Ctrl-C comes.
    checking = threading.Thread(target=supervisor.check)
    checking.start()
    time.sleep(0.1)
    supervisor.stop()
    checking.join()
    try:
        assert service.process is None
    finally:
        if service.process is not None:  # the old supervisor's orphan
            service.process.kill()
            service.process.wait()


# A line of `persona queue watch` into a file: "2026-11-28 09:47:00 waiting 0 (chat 0, ...".
WATCH_LINE = re.compile(r"(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d) (waiting|active versions) .*\n")


def test_a_service_log_is_rotated_at_its_size_while_the_service_runs(env, redis_url, tmp_path):
    """`persona up --chat` appended each service's output to its log for ever (the soak audit:
    40 MB a day under load). Now a log is rotated once it reaches a size, here a few lines:
    none grows much past it, older ones are kept up to a number, and the service writes on
    into the same file. `persona queue watch`, into a file, writes a line every 0.2 s."""
    env["PERSONA_REDIS_URL"] = redis_url
    service = Service("watch", ["queue", "watch", "--interval", "0.2"])
    cap = 600  # three lines or so
    supervisor = Supervisor([service], env=env, log_dir=tmp_path / "logs", log_max_bytes=cap, log_backups=2)
    current, older, oldest = (tmp_path / "logs" / name for name in ("watch.log", "watch.log.1", "watch.log.2"))
    supervisor.start()
    try:
        pid, first_oldest = service.process.pid, None
        deadline = time.monotonic() + 30
        # Until the oldest kept has been dropped for a newer one, and the current file has a
        # line again: the check rotates nothing more once the service is stopped.
        while first_oldest is None or oldest.stat().st_ino == first_oldest or current.stat().st_size == 0:
            assert time.monotonic() < deadline, f"not rotated: {sorted(os.listdir(tmp_path / 'logs'))}"
            assert service.process.poll() is None, current.read_text()
            supervisor.check()
            if first_oldest is None and oldest.exists():
                first_oldest = oldest.stat().st_ino
            time.sleep(0.05)
        assert service.process.pid == pid  # one run throughout
    finally:
        supervisor.stop()
    assert sorted(os.listdir(tmp_path / "logs")) == ["watch.log", "watch.log.1", "watch.log.2"]
    files = [oldest.read_text(), older.read_text(), current.read_text()]
    lines = [line for text in files for line in text.splitlines(keepends=True)]
    assert all(WATCH_LINE.fullmatch(line) for line in lines), files  # none cut in two
    longest = max(map(len, lines))
    # Each holds what was written until a check found it at the size, and what came before the
    # next: a line, as a rule (this loop checks every 0.05 s, `persona up` every second).
    assert all(len(text) < cap + 4 * longest for text in files), [len(text) for text in files]
    # In order, the oldest in .2: the last line is in watch.log, not in a file renamed away
    # that the service went on writing into.
    stamps = [WATCH_LINE.fullmatch(line).group(1) for line in lines]
    assert stamps == sorted(stamps)


def test_a_log_left_by_an_earlier_run_is_rotated_as_the_service_starts(env, tmp_path):
    """Kept across runs, a log grew by each run's output on top of the last's."""
    logs = tmp_path / "logs"
    logs.mkdir()
    earlier = "an earlier run's line\n" * 100
    (logs / "worker-1.log").write_text(earlier)
    service = Service("worker-1", ["worker"])  # it cannot reach Redis, says so and exits
    supervisor = Supervisor([service], env=env, log_dir=logs, log_max_bytes=1000, log_backups=1)
    supervisor.start()
    try:
        exited(service)
    finally:
        supervisor.stop()
    assert (logs / "worker-1.log.1").read_text() == earlier
    this_run = (logs / "worker-1.log").read_text()
    assert this_run.startswith("error: cannot reach Redis at redis://127.0.0.1:"), this_run
    assert "earlier run" not in this_run


def test_a_data_directory_up_cannot_write_its_lock_in_is_refused_in_words(tmp_path):
    """A read-only data directory (or an up.lock another user left) ended `persona up` in
    an OSError traceback, even with PERSONA_REDIS_URL set. A folder in the lock's place
    stands in here: the tests may run as root, whom a read-only mode does not stop."""
    (tmp_path / "up.lock").mkdir()
    refused = r"cannot keep data in .* \(Is a directory: .*up\.lock\); set PERSONA_DATA_DIR"
    with pytest.raises(ConfigError, match=refused), one_up_per_data_dir(tmp_path):
        pass
