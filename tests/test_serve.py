"""`persona up` as a real process: it restarts crashed services and stops everything it
started; and `persona worker` told a wrong Redis."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest


def children(pid: int) -> dict[int, str]:
    """The running child processes of ``pid``: pid -> command line."""
    found = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and running(int(entry.name)) and _parent(entry) == pid:
            found[int(entry.name)] = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
    return found


def _parent(entry: Path) -> int | None:
    try:
        return int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return None


def running(pid: int) -> bool:
    """Alive and not a zombie waiting to be reaped."""
    try:
        return (Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def wait_for(predicate, what: str, timeout: float = 60.0):
    deadline = time.monotonic() + timeout
    while not (found := predicate()):
        assert time.monotonic() < deadline, what
        time.sleep(0.1)
    return found


@pytest.fixture
def up_env(tmp_path: Path, write_persona, tiny_gpt2_dir, settings) -> dict[str, str]:
    """The environment of `persona up` on a fresh data directory, serving a tiny persona."""
    write_persona("tiny", base=str(tiny_gpt2_dir))
    return {k: v for k, v in os.environ.items() if not k.startswith("PERSONA_")} | {
        "PERSONA_DATA_DIR": str(tmp_path / "up-data"),
        "PERSONA_PERSONAS_DIRS": json.dumps([str(p) for p in settings.personas_dirs]),
        "PERSONA_WORKER__PERSONAS": '["tiny"]',
        "PERSONA_WORKER__DEVICE": "cpu",
        "TEST_SERVE_RUN": str(tmp_path),  # inherited by every process `persona up` starts
    }


def _interruptible() -> None:
    """Ctrl-C as in a terminal, even where the tests run with SIGINT ignored (in the background)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _ignoring_sigint() -> None:
    """SIGINT ignored, as a shell without job control starts a background command (`persona up &`)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


@pytest.fixture
def start_up(tmp_path: Path, up_env: dict[str, str]):
    """Start `persona up ARGS...` on the embedded Redis of a fresh data directory."""
    started: list[subprocess.Popen] = []

    def start(*args: str, sigint_ignored: bool = False) -> tuple[subprocess.Popen, int]:
        """The `persona up` process and its embedded Redis's pid; ``sigint_ignored``: started
        as a script's `persona up &` is, with SIGINT ignored."""
        output = (tmp_path / "up.log").open("w")
        up = subprocess.Popen([sys.executable, "-m", "persona", "up", "--no-dashboard", *args], env=up_env,
                              stdin=subprocess.PIPE, stdout=output, stderr=subprocess.STDOUT,
                              preexec_fn=_ignoring_sigint if sigint_ignored else _interruptible)  # noqa: PLW1509
        started.append(up)
        record = tmp_path / "up-data" / "redis.json"
        # Started, not just recorded: the record is written before the server is ready, and
        # a server killed before `up` saw it ready is a failed start, not one to start again.
        wait_for(lambda: "persona is up on Redis" in (tmp_path / "up.log").read_text() or up.poll() is not None,
                 "the embedded Redis did not start")
        assert up.poll() is None, (tmp_path / "up.log").read_text()
        return up, json.loads(record.read_text())["pid"]

    yield start
    for up in started:
        if up.poll() is None:
            up.send_signal(signal.SIGTERM)
            up.wait(timeout=60)
    for pid in started_under(tmp_path):  # whatever a failed test left behind
        os.kill(pid, signal.SIGKILL)


def started_under(folder: Path) -> list[int]:
    """Running processes that `persona up` started in ``folder``: by their environment, or
    by their working directory for redis-server, which writes over its environment."""
    found = []
    for entry in Path("/proc").iterdir():
        try:
            if not entry.name.isdigit():
                continue
            marked = f"TEST_SERVE_RUN={folder}".encode() in (entry / "environ").read_bytes().split(b"\0")
            if marked or Path(os.readlink(entry / "cwd")).is_relative_to(folder):
                found.append(int(entry.name))
        except OSError:
            pass
    return [pid for pid in found if running(pid)]


def workers_of(up: subprocess.Popen) -> dict[int, str]:
    return {pid: cmd for pid, cmd in children(up.pid).items() if cmd.endswith(" worker ")}


def test_closing_the_terminal_stops_every_service_and_redis(start_up):
    up, redis_pid = start_up()
    services = wait_for(lambda: workers_of(up), "no worker started")
    up.send_signal(signal.SIGHUP)  # the terminal or SSH session closed
    assert up.wait(timeout=60) == 0
    left = [pid for pid in [*services, redis_pid] if running(pid)]
    assert left == [], "left running after SIGHUP"


def test_an_up_started_with_sigint_ignored_still_stops_on_sigint(start_up):
    """Started from a script (`persona up &`), SIGINT came ignored, and `kill -INT` left
    everything running."""
    up, redis_pid = start_up(sigint_ignored=True)
    services = wait_for(lambda: workers_of(up), "no worker started")
    up.send_signal(signal.SIGINT)
    assert up.wait(timeout=60) == 0
    assert [pid for pid in [*services, redis_pid] if running(pid)] == []


def test_chatting_still_restarts_a_crashed_worker_and_a_hangup_stops_all(start_up):
    up, redis_pid = start_up("--chat", "tiny")
    [first] = wait_for(lambda: workers_of(up), "no worker started")
    os.kill(first, signal.SIGKILL)  # a worker crashes while the chat waits for a line
    [second] = wait_for(lambda: [p for p in workers_of(up) if p != first], "the crashed worker was not restarted", 20)

    up.send_signal(signal.SIGHUP)
    assert up.wait(timeout=60) == 0
    assert [pid for pid in (second, redis_pid) if running(pid)] == []


def test_a_sigterm_while_the_chat_waits_for_a_reply_stops_up(start_up, tmp_path):
    """The chat took the stop signal for a Ctrl-C that withdraws one message, and waited for
    the next line: `persona up --chat` ignored SIGTERM while a reply was on its way. Its
    chat also told the user to start a worker with `persona up`, which was starting one."""
    up, redis_pid = start_up("--chat", "tiny")
    [worker] = wait_for(lambda: workers_of(up), "no worker started")
    os.kill(worker, signal.SIGSTOP)  # still loading its model: no worker is live yet
    log = tmp_path / "up.log"
    try:
        up.stdin.write(b"hello\n")
        up.stdin.flush()
        said = wait_for(lambda: "no worker is running yet" in (text := log.read_text()) and text, "no word on the worker")
        assert "(`persona up` is starting one; its log: " in said and "persona worker` starts one" not in said, said
        up.send_signal(signal.SIGTERM)
        wait_for(lambda: "stopping..." in log.read_text(), f"the chat did not end: {log.read_text()}", 10)
    finally:
        os.kill(worker, signal.SIGCONT)
        up.stdin.close()  # the old chat waited for its next line
    assert up.wait(timeout=60) == 0
    assert [pid for pid in (worker, redis_pid) if running(pid)] == []


def test_a_second_up_for_the_same_data_directory_is_refused_in_words(start_up, up_env):
    up, redis_pid = start_up()
    wait_for(lambda: workers_of(up), "no worker started")
    second = subprocess.run([sys.executable, "-m", "persona", "up", "--no-dashboard"], env=up_env,
                            capture_output=True, text=True, timeout=30, check=False)
    assert second.returncode == 1
    assert f"`persona up` is already running for data directory {up_env['PERSONA_DATA_DIR']} (pid {up.pid})" in second.stderr
    assert up.poll() is None and running(redis_pid)  # the first serves on, its Redis untouched


def test_up_suggests_chatting_with_a_persona_it_serves(start_up, tmp_path):
    """It said `persona chat sage` whatever it served: here its workers preload only `tiny`."""
    start_up()
    said = wait_for(lambda: "talk to it" in (text := (tmp_path / "up.log").read_text()) and text,
                    "`persona up` said nothing about how to talk to it", 30)
    assert "persona chat tiny" in said and "persona chat sage" not in said, said
    # the embedded Redis's own password: "unix://***@/…" read as one the user had set, or a garbled address
    [banner] = [line for line in said.splitlines() if "persona is up on Redis" in line]
    assert "***" not in banner and f"(embedded; its password is kept in {tmp_path / 'up-data' / 'redis'})" in banner, banner


@pytest.mark.parametrize(("args", "changes", "said"), [
    (["--chat", "nosuch"], {}, "unknown persona 'nosuch'; known personas: bofh, sage, tiny"),
    ([], {"PERSONA_WORKER__PERSONAS": '["tiny", "nosuch"]'}, (
        "PERSONA_WORKER__PERSONAS names 'nosuch', which the workers cannot preload: unknown persona 'nosuch'")),
    ([], {"PERSONA_TELEGRAM__TOKEN": "123:abc", "PERSONA_TELEGRAM__PERSONA": "tinyy"}, (
        "PERSONA_TELEGRAM__PERSONA names 'tinyy', which cannot be served: unknown persona 'tinyy'")),
])
def test_up_refuses_a_persona_that_is_not_there_before_starting_anything(tmp_path, up_env, args, changes, said):
    """`up --chat TYPO` started every service, then stopped them all to say so; a preload
    naming a persona not there made each worker exit, five times, and then be given up on
    while `up` served on without one; a chat adapter's misspelt persona got every user the
    worker's refusal."""
    env = up_env | {"PERSONA_WORKER__PERSONAS": "[]"} | changes
    try:
        told = subprocess.run([sys.executable, "-m", "persona", "up", "--no-dashboard", *args], env=env,
                              stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=30, check=False)
    finally:
        for pid in started_under(tmp_path):  # the old behaviour's services, if any
            os.kill(pid, signal.SIGKILL)
    assert told.returncode == 1 and "Traceback" not in told.stderr
    assert said in " ".join(told.stderr.split()), told.stderr
    assert "started" not in told.stdout + told.stderr and not (tmp_path / "up-data" / "redis").exists()


def test_up_whose_dashboard_port_is_taken_says_what_to_do_before_starting_anything(tmp_path, up_env):
    """The dashboard exited at once, was started again four times, each time saying "pass
    --port" (an option `persona up` has not), then was given up on while `up` ran on."""
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        env = up_env | {"PERSONA_DASHBOARD__PORT": str(taken.getsockname()[1])}
        try:
            told = subprocess.run([sys.executable, "-m", "persona", "up"], env=env, stdin=subprocess.DEVNULL,
                                  capture_output=True, text=True, timeout=30, check=False)
        finally:
            for pid in started_under(tmp_path):  # the old behaviour's services, if any
                os.kill(pid, signal.SIGKILL)
    said = " ".join(told.stderr.split())
    assert told.returncode == 1 and "Address already in use" in said, told.stderr
    assert "set PERSONA_DASHBOARD__PORT to a free port, or start without it: `persona up --no-dashboard`" in said
    assert "--port," not in said and not (tmp_path / "up-data" / "redis").exists()


def test_up_leaves_out_what_is_not_installed_and_names_the_extra_to_install(tmp_path, up_env):
    """Without the dashboard extra, `persona up` (--no-dashboard too) ended in a traceback on
    `No module named 'fastapi'`; with a Telegram token set but not its extra, the bot was
    started, died five times on `No module named 'telegram'`, and was given up on."""
    not_installed = ("import sys; sys.modules.update(dict.fromkeys(['fastapi', 'telegram'])); "
                     "sys.argv[0] = 'persona'; from persona.cli import main; main()")
    env = up_env | {"PERSONA_WORKER__PERSONAS": "[]", "PERSONA_TELEGRAM__TOKEN": "123:abc"}
    output = tmp_path / "up.log"
    with output.open("w") as log:
        up = subprocess.Popen([sys.executable, "-c", not_installed, "up"], env=env, stdin=subprocess.DEVNULL,
                              stdout=log, stderr=subprocess.STDOUT, preexec_fn=_interruptible)  # noqa: PLW1509
    try:
        wait_for(lambda: "persona is up on Redis" in output.read_text() or up.poll() is not None, "`up` did not start")
        assert up.poll() is None, output.read_text()
        up.send_signal(signal.SIGTERM)
        assert up.wait(timeout=60) == 0
    finally:
        if up.poll() is None:
            up.kill()
        for pid in started_under(tmp_path):  # whatever a failed run left behind
            os.kill(pid, signal.SIGKILL)
    said = output.read_text()
    assert "Traceback" not in said, said
    [up_line] = [line for line in said.splitlines() if "persona is up on Redis" in line]
    assert up_line.rsplit(": ", 1)[1] == "worker-1, scheduler"
    said = " ".join(said.split())
    assert ("the dashboard is not served (`persona up --no-dashboard` goes without it): it needs the dashboard "
            "extra, which is not installed: pip install 'persona[dashboard]'") in said
    assert ("the Telegram bot is not started, though PERSONA_TELEGRAM__TOKEN is set: it needs the telegram extra, "
            "which is not installed: pip install 'persona[telegram]'") in said


def test_killing_up_stops_its_services_and_the_next_up_takes_over_its_redis(start_up):
    up, redis_pid = start_up()
    services = wait_for(lambda: workers_of(up), "no worker started") | children(up.pid)
    services.pop(redis_pid)
    up.kill()  # kill -9, the OOM killer: it cannot stop anything itself
    up.wait()
    wait_for(lambda: not [pid for pid in services if running(pid)], "a service outlived `persona up`", 30)

    again, found = start_up()  # its Redis, left running, still holds the data: served on, then stopped
    assert found == redis_pid and running(redis_pid)
    wait_for(lambda: workers_of(again), "no worker started")
    again.send_signal(signal.SIGTERM)
    assert again.wait(timeout=60) == 0
    assert not running(redis_pid)


def test_a_killed_embedded_redis_is_started_again_and_served_on(start_up, tmp_path, settings):
    import redis

    from persona.contract import GenerationRequest, Message
    from persona.queue import QueueClient

    up, redis_pid = start_up()
    record = tmp_path / "up-data" / "redis.json"
    url = json.loads(record.read_text())["url"]
    os.kill(redis_pid, signal.SIGKILL)

    def restarted() -> int | None:  # the record is gone while no server runs, and comes back with the new one
        try:
            pid = json.loads(record.read_text())["pid"]
        except (OSError, ValueError):
            return None
        return pid if pid != redis_pid and running(pid) else None

    revived = wait_for(restarted, "the embedded Redis was not started again", 20)
    assert json.loads(record.read_text())["url"] == url  # same address and password: clients reconnect

    client = QueueClient(redis.Redis.from_url(url), settings.queue)
    request = GenerationRequest(persona="tiny", messages=[Message(role="user", content="hello")])
    assert client.ask(request, timeout=60).ok  # the worker serves on the new one
    up.send_signal(signal.SIGTERM)
    assert up.wait(timeout=60) == 0
    assert not running(revived)


def catches_sigterm(pid: int) -> bool:
    """Whether the process handles SIGTERM yet (until it does, SIGTERM kills it, stopped or not)."""
    status = (Path("/proc") / str(pid) / "status").read_text()
    caught = next(line.split()[1] for line in status.splitlines() if line.startswith("SigCgt:"))
    return bool(int(caught, 16) & 1 << (signal.SIGTERM - 1))


def test_ctrl_c_again_kills_a_service_that_is_still_stopping(start_up):
    up, redis_pid = start_up("--workers", "2")
    stuck, other = wait_for(lambda: len(w := workers_of(up)) == 2 and sorted(w), "no workers started")
    wait_for(lambda: catches_sigterm(stuck) and catches_sigterm(other), "the workers did not start")
    os.kill(stuck, signal.SIGSTOP)  # a worker that does not stop (a long batch, say)
    up.send_signal(signal.SIGINT)
    wait_for(lambda: not running(other), "Ctrl-C did not stop the other worker")  # `up` waits for the stuck one now
    up.send_signal(signal.SIGINT)  # the operator will not wait
    assert up.wait(timeout=20) == 0
    assert [pid for pid in (stuck, redis_pid) if running(pid)] == []


@pytest.fixture
def telegram_api() -> Iterator:
    """A fake Telegram Bot API on its own loop and thread, for the adapter `persona up` starts."""
    from tests.fakes.telegram_api import in_a_thread

    with in_a_thread("123456789:AAE-up-test-token") as fake:
        yield fake


def test_a_restarted_telegram_adapter_still_tells_its_asker_when_up_stops(start_up, up_env, telegram_api):
    """A service restarted after a crash is started by the thread that restarts services, and
    the kernel sends it SIGTERM when that thread ends (PR_SET_PDEATHSIG). The thread ended as
    `up` stopped, so the supervisor's own SIGTERM came a moment later, a second one: the
    Telegram adapter, cut short by it, never told the asker of a question in flight."""
    import redis

    from adapters.responder import RESTARTING_TEXT
    from persona import constants as keys

    up_env |= {"PERSONA_TELEGRAM__TOKEN": telegram_api.token, "PERSONA_TELEGRAM__API_URL": telegram_api.base_url,
               "PERSONA_TELEGRAM__PERSONA": "tiny"}
    up, _ = start_up()
    def adapters() -> list[int]:
        return [pid for pid, cmd in children(up.pid).items() if cmd.endswith(" telegram ")]
    [first] = wait_for(adapters, "no telegram adapter started")
    os.kill(first, signal.SIGKILL)  # it crashes; the supervisor's thread starts it again
    [second] = wait_for(lambda: [pid for pid in adapters() if pid != first], "the adapter was not restarted", 20)
    [worker] = wait_for(lambda: workers_of(up), "no worker started")
    os.kill(worker, signal.SIGSTOP)  # busy elsewhere: the question stays in flight
    try:
        asker = redis.Redis.from_url(json.loads((Path(up_env["PERSONA_DATA_DIR"]) / "redis.json").read_text())["url"])
        telegram_api.push_message("a question in flight as `up` stops")
        wait_for(lambda: asker.get(keys.inflight_key("telegram", "1001:1001")), "the question was not sent", 60)
        up.send_signal(signal.SIGTERM)
        wait_for(lambda: not running(second), "the adapter did not stop", 30)
    finally:
        os.kill(worker, signal.SIGCONT)
    assert up.wait(timeout=60) == 0
    assert telegram_api.texts() == [RESTARTING_TEXT]


def test_an_embedded_redis_that_cannot_start_again_is_reported(tmp_path):
    import socket

    from persona.errors import RedisUnavailable
    from persona.served_redis import served_redis
    from persona.settings import Settings

    with served_redis(Settings(_env_file=None, data_dir=tmp_path / "data")) as served:
        served.embedded.process.kill()
        served.embedded.process.wait()
        with socket.socket() as squatter:  # its port, taken while it was down
            squatter.bind(("127.0.0.1", served.embedded.port))
            squatter.listen()
            with pytest.raises(RedisUnavailable, match=r"exited at start \(Failed listening on port"):
                served.keep_alive()


@pytest.fixture(scope="module")
def guarded_redis(tmp_path_factory):
    """A Redis with a password, as a managed one has: its TCP address and the password."""
    from persona.embedded_redis import EmbeddedRedis

    server = EmbeddedRedis(tmp_path_factory.mktemp("guarded"))
    server.start()
    yield f"127.0.0.1:{server.port}", server.tcp_url.split("@")[0].rsplit(":", 1)[1]
    server.stop()


@pytest.mark.parametrize(("url", "said"), [
    ("redis://{address}/0", "wants a password, and PERSONA_REDIS_URL gives none: redis://:PASSWORD@HOST:PORT/0"),
    ("redis://:{password}@{address}/99", "refused the session PERSONA_REDIS_URL asks for: DB index is out of range"),
    ("rediss://:{password}@{address}/0", "(rediss:// is TLS: does that port speak it?)"),
])
def test_a_worker_told_a_wrong_redis_url_says_what_to_fix(guarded_redis, up_env, url, said):
    address, password = guarded_redis
    env = up_env | {"PERSONA_REDIS_URL": url.format(address=address, password=password)}
    told = subprocess.run([sys.executable, "-m", "persona", "worker"], env=env, capture_output=True, text=True,
                          timeout=60, check=False)
    assert told.returncode == 1 and "Traceback" not in told.stderr
    assert said in told.stderr and password not in told.stderr


def test_a_worker_whose_data_directory_cannot_be_made_says_what_to_set(tmp_path, up_env):
    (tmp_path / "a-file").write_text("not a folder")
    env = up_env | {"PERSONA_DATA_DIR": str(tmp_path / "a-file" / "data")}
    told = subprocess.run([sys.executable, "-m", "persona", "worker"], env=env, capture_output=True, text=True,
                          timeout=60, check=False)
    assert told.returncode == 1 and "Traceback" not in told.stderr
    assert f"cannot keep data in {tmp_path}/a-file/data (Not a directory" in told.stderr
    assert "set PERSONA_DATA_DIR to a folder you can write" in told.stderr


def test_a_worker_told_a_device_that_is_not_one_starts_no_redis(tmp_path, up_env):
    """`persona worker --device gpu` started an embedded Redis, logged it, stopped it, and
    only then said the device was wrong."""
    result = subprocess.run([sys.executable, "-m", "persona", "worker", "--device", "gpu"], env=up_env,
                            capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 1
    assert "unknown device 'gpu'; choose one of auto, cpu, cuda" in result.stderr
    assert "Redis" not in result.stderr and not (tmp_path / "up-data" / "redis").exists(), result.stderr


@pytest.fixture
def start_worker(tmp_path: Path, up_env: dict[str, str], redis_url: str):
    """Start `persona worker` on the test Redis; each one is killed at the end if still running."""
    started: list[subprocess.Popen] = []

    def start(*options: str, **settings: str) -> subprocess.Popen:
        env = up_env | {"PERSONA_REDIS_URL": redis_url} | settings
        output = (tmp_path / f"worker-{len(started)}.log").open("w")
        worker = subprocess.Popen([sys.executable, "-m", "persona", "worker", *options], env=env, stdout=output,
                                  stderr=subprocess.STDOUT, preexec_fn=_interruptible)  # noqa: PLW1509
        started.append(worker)
        return worker

    yield start
    for worker in started:
        if worker.poll() is None:
            worker.kill()
            worker.wait(timeout=30)


def _starting(client) -> list:
    """The workers starting, read after the live ones: one listed was not live when they were read."""
    from persona import heartbeat

    live = heartbeat.live_worker_ids(client)
    return [(w, live) for w in heartbeat.starting_workers(client)]


def test_a_worker_is_seen_starting_while_it_loads_then_serving(start_worker, redis_client):
    """A worker was seen only once its models had loaded, so `persona ask` right after
    `persona up` said that no worker was running, and `persona queue stats` listed none."""
    from persona import heartbeat

    worker = start_worker(PERSONA_WORKER__HEARTBEAT_S="0.2")
    [(starting, live)] = wait_for(lambda: _starting(redis_client), "the worker was never seen starting", 30)
    assert starting.pid == worker.pid and live == set()  # not live while it loads: no swap waits on it
    served = wait_for(lambda: heartbeat.live_worker_ids(redis_client), "the worker never served", 60)
    assert served == {starting.id} and heartbeat.starting_workers(redis_client) == []
    worker.send_signal(signal.SIGTERM)
    assert worker.wait(timeout=30) == 0
    assert heartbeat.live_worker_ids(redis_client) == set() and heartbeat.starting_workers(redis_client) == []


def test_a_worker_decodes_on_the_threads_it_is_told_and_says_so(start_worker, redis_client, tmp_path):
    """`persona worker` had no --threads: on a machine shared with other work the only way
    to keep it to one core was PERSONA_WORKER__THREADS, and nothing said how many it used."""
    from persona import heartbeat

    worker = start_worker("--threads", "1", PERSONA_WORKER__THREADS="2")
    wait_for(lambda: heartbeat.live_worker_ids(redis_client), "the worker never served", 60)
    worker.send_signal(signal.SIGTERM)
    assert worker.wait(timeout=30) == 0
    said = (tmp_path / "worker-0.log").read_text()
    assert "serving on cpu (1 thread)" in said, said


def test_a_worker_stopped_while_loading_is_not_left_starting(start_worker, redis_client):
    """Its starting key goes as it leaves, not when the key would lapse (a minute here)."""
    from persona import heartbeat

    worker = start_worker(PERSONA_WORKER__HEARTBEAT_TTL_S="60")
    wait_for(lambda: _starting(redis_client), "the worker was never seen starting", 30)
    worker.send_signal(signal.SIGINT)
    assert worker.wait(timeout=30) == 0
    assert heartbeat.starting_workers(redis_client) == [] and heartbeat.live_worker_ids(redis_client) == set()


def test_a_worker_sent_sigterm_while_it_imports_torch_is_not_left_starting(start_worker, redis_client):
    """SIGTERM (what `persona up` sends as it stops) in the second or two the worker spends
    importing torch, once it is seen starting, ended it at once, and its starting key stayed
    listed until it lapsed (up to 10 s; a minute here)."""
    from persona import heartbeat

    worker = start_worker(PERSONA_WORKER__HEARTBEAT_TTL_S="60")
    wait_for(lambda: heartbeat.starting_workers(redis_client), "the worker was never seen starting", 30)
    worker.send_signal(signal.SIGTERM)
    assert worker.wait(timeout=30) == 0
    assert heartbeat.starting_workers(redis_client) == [] and heartbeat.live_worker_ids(redis_client) == set()


def _ipv6_loopback() -> bool:
    import socket

    try:
        with socket.socket(socket.AF_INET6) as probe:
            probe.bind(("::1", 0))
    except OSError:
        return False
    return True


@pytest.mark.skipif(not _ipv6_loopback(), reason="no IPv6 loopback here")
def test_a_dashboard_on_an_ipv6_address_gives_it_as_a_browser_takes_it(tmp_path):
    """`--host ::1` printed http://::1:PORT/, which no browser opens."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PERSONA_")} | {"PERSONA_DATA_DIR": str(tmp_path / "data")}
    dashboard = subprocess.Popen([sys.executable, "-m", "persona", "dashboard", "--host", "::1", "--port", "0"], env=env,
                                 stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        said = dashboard.stdout.readline()
    finally:
        dashboard.send_signal(signal.SIGTERM)
        assert dashboard.wait(timeout=30) == 0
    assert re.match(r"dashboard on http://\[::1\]:\d+/ ", said), said


def test_up_on_a_redis_url_hides_a_query_password_and_warns_of_an_evicting_redis(tmp_path, up_env, own_redis):
    """`persona up` printed "persona is up on Redis redis://127.0.0.1:16391/3?password=adminpw"
    on the console, and said nothing of a maxmemory-policy that deletes the queue's keys."""
    from tests.test_redis_limits import evicting

    _, url, client = own_redis
    password = url.split("@")[0].rsplit(":", 1)[1]
    address = url.rpartition("@")[2].split("/")[0]
    env = up_env | {"PERSONA_REDIS_URL": f"redis://{address}/3?password={password}"}
    output = tmp_path / "up.log"
    with evicting(client), output.open("w") as log:
        up = subprocess.Popen([sys.executable, "-m", "persona", "up", "--no-dashboard"], env=env, stdout=log,
                              stderr=subprocess.STDOUT, preexec_fn=_interruptible)  # noqa: PLW1509
        try:
            wait_for(lambda: "persona is up" in output.read_text() or up.poll() is not None,
                     "`persona up` did not start")
        finally:
            up.send_signal(signal.SIGTERM)
            up.wait(timeout=60)
    said = output.read_text()
    assert f"persona is up on Redis redis://{address}/3?password=***: worker-1, scheduler" in said, said
    assert password not in said
    assert "Redis deletes keys when full (maxmemory-policy allkeys-lru" in said
