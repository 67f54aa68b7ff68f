"""The supervisor with real `persona` processes: restarts, giving up, stopping."""

from __future__ import annotations

import logging
import os
import threading
import time

import pytest

from persona.errors import ConfigError
from persona.supervisor import Service, Supervisor, one_up_per_data_dir


@pytest.fixture
def env(tmp_path) -> dict[str, str]:
    """The environment of services that can never start: a setting they cannot read."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("PERSONA_")}
    return clean | {"PERSONA_DATA_DIR": str(tmp_path / "data"), "PERSONA_WORKER__MAX_BATCH": "abc"}


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
