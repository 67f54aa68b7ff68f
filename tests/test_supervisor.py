"""The supervisor with real `persona` processes: restarts, giving up, stopping."""

from __future__ import annotations

import json
import logging
import os
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


def test_a_data_directory_up_cannot_write_its_lock_in_is_refused_in_words(tmp_path):
    """A read-only data directory (or an up.lock another user left) ended `persona up` in
    an OSError traceback, even with PERSONA_REDIS_URL set. A folder in the lock's place
    stands in here: the tests may run as root, whom a read-only mode does not stop."""
    (tmp_path / "up.lock").mkdir()
    refused = r"cannot keep data in .* \(Is a directory: .*up\.lock\); set PERSONA_DATA_DIR"
    with pytest.raises(ConfigError, match=refused), one_up_per_data_dir(tmp_path):
        pass
