"""The command line, run as a user runs it: a real process, real output, real exit codes."""

from __future__ import annotations

import contextlib
import os
import re
import subprocess
import sys
from pathlib import Path
from urllib.parse import urlsplit

import pytest


def persona(*args: str, env: dict[str, str], timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "persona", *args], env=env, capture_output=True, text=True, timeout=timeout
    )


@pytest.fixture
def env(tmp_path: Path) -> dict[str, str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("PERSONA_")}
    clean |= {"PERSONA_DATA_DIR": str(tmp_path / "data"), "COLUMNS": "200"}
    return clean


def test_help_explains_every_command(env):
    result = persona("--help", env=env)
    assert result.returncode == 0
    for command in ("up", "worker", "ask", "chat", "personas", "queue"):
        assert command in result.stdout


def test_help_paragraphs_wrap_at_the_terminals_width(env):
    """Not at the docstring's line breaks as well: on 80 columns that left words alone
    on a line ("...runs when / its / token is set")."""
    result = persona("up", "--help", env={**env, "COLUMNS": "80"})
    assert result.returncode == 0
    lines = result.stdout.splitlines()
    assert any("its token is set." in line for line in lines), result.stdout
    assert all(len(line) <= 80 for line in lines)


# Every command's --help, printed by one process as `persona PATH --help` prints it.
EVERY_HELP = """
import sys
import typer.main
from persona.cli import app, main

def paths(command, path):
    yield path
    for name, sub in getattr(command, "commands", {}).items():
        yield from paths(sub, [*path, name])

for path in paths(typer.main.get_command(app), []):
    print("=== persona " + " ".join(path), flush=True)
    sys.argv = ["persona", *path, "--help"]
    try:
        main()
    except SystemExit:
        pass
"""


def test_every_commands_usage_and_help_read_plainly(env):
    """This typer wrote usage lines as `persona swap [OPTIONS] {PERSONA} {VERSION|PATH}` (and
    `persona ask [OPTIONS] {persona} {text}`), and `<bool>` beside every flag, `--help` too."""
    result = subprocess.run([sys.executable, "-c", EVERY_HELP], env=env, capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 0, result.stderr
    helps = result.stdout.split("=== ")[1:]
    assert len(helps) > 40  # every command and group
    usages = [line.strip() for line in result.stdout.splitlines() if line.strip().startswith("Usage:")]
    assert len(usages) == len(helps)
    assert not [line for line in usages if set("{}<>").intersection(line)], usages
    assert "Usage: persona swap [OPTIONS] PERSONA VERSION|PATH" in usages
    assert "Usage: persona ask [OPTIONS] PERSONA TEXT" in usages
    assert "Usage: persona queue drop [OPTIONS] [ID]..." in usages
    odd = re.findall(r"<(?:bool|str|int|float|list|path|dir|file)[^>]*>", result.stdout)
    assert not odd, odd
    assert re.search(r"--limit +INTEGER \[x>=1\]", result.stdout)  # a value's type, as click writes it
    missing = persona("queue", "show", env=env)  # a usage error names the argument the same way
    assert missing.returncode == 2
    assert "Usage: persona queue show [OPTIONS] ID\n" in missing.stderr and "Missing argument 'ID'" in missing.stderr


def test_personas_list_prints_one_per_line_name_first(env):
    result = persona("personas", "list", env=env)
    assert result.returncode == 0, result.stderr
    names = [line.split("\t")[0] for line in result.stdout.splitlines()]
    assert {"sage", "bofh"} <= set(names)


def test_personas_validate_points_at_the_field(env, tmp_path: Path):
    bad = tmp_path / "wrong.toml"
    bad.write_text("[sampling]\nmax_new_tokens = 0\n")
    result = persona("personas", "validate", str(bad), env=env)
    assert result.returncode == 1
    assert "sampling.max_new_tokens" in result.stderr
    assert persona("personas", "validate", env=env).returncode == 0


def test_personas_show_unknown_is_a_clear_error(env):
    result = persona("personas", "show", "nobody", env=env)
    assert result.returncode == 1
    assert "unknown persona 'nobody'" in result.stderr and "Traceback" not in result.stderr


def test_personas_list_show_and_validate_json_print_one_object_and_a_problem_as_the_json_failure(env, tmp_path: Path):
    """Of the personas commands none had --json: a script split `list` on tabs and read
    `validate`'s ✓ and ✗ marks."""
    import json

    listed = persona("personas", "list", "--json", env=env)
    assert listed.returncode == 0, listed.stderr
    shown = json.loads(listed.stdout)
    sage = next(p for p in shown["personas"] if p["name"] == "sage")
    assert (sage["base"], sage["checkpoint"]) == ("smollm2", None) and sage["source"].endswith("sage.toml")
    assert (shown["invalid"], shown["unfinished_runs"]) == ([], [])

    one = json.loads(persona("personas", "show", "sage", "--json", env=env).stdout)
    assert one["name"] == "sage" and one["model"]["base"] == "smollm2" and one["source"] == sage["source"]
    unknown = persona("personas", "show", "sgae", "--json", env=env)
    assert (unknown.returncode, unknown.stderr) == (1, "")
    failed = json.loads(unknown.stdout)
    assert (failed["ok"], failed["error"]["kind"]) == (False, "UnknownPersona") and "'sage'" in failed["error"]["message"]

    checked = persona("personas", "validate", "sage", "--json", env=env)
    assert checked.returncode == 0, checked.stderr
    assert json.loads(checked.stdout) == {"ok": True, "checked": [{"path": sage["source"], "problem": None,
                                                                   "overridden_by": None, "warnings": []}]}
    bad = tmp_path / "wrong.toml"
    bad.write_text("[sampling]\nmax_new_tokens = 0\n")
    refused = persona("personas", "validate", str(bad), "sage", "--json", env=env)
    assert (refused.returncode, refused.stderr) == (1, "")
    outcome = json.loads(refused.stdout)
    [wrong, fine] = outcome["checked"]
    assert wrong["path"] == str(bad) and "sampling.max_new_tokens" in wrong["problem"] and fine["problem"] is None
    assert (outcome["ok"], outcome["error"]) == (False, {"kind": "ConfigError", "message": wrong["problem"]})


def test_ask_without_a_running_service_says_how_to_start_one(env):
    result = persona("ask", "sage", "hello", env=env)
    assert result.returncode == 1
    assert "persona up" in result.stderr and "Traceback" not in result.stderr


def test_messages_written_into_a_pipe_stay_on_one_line(env):
    """A log or a pipe has no width: the 80 columns rich assumes there cut lines mid-sentence."""
    del env["COLUMNS"]
    result = persona("ask", "sage", "hello", env=env)
    [line] = result.stderr.splitlines()
    assert line.startswith("error: ") and "PERSONA_REDIS_URL" in line and len(line) > 80


def test_ask_with_redis_down_is_a_clear_error(env):
    env["PERSONA_REDIS_URL"] = "redis://127.0.0.1:1/0"
    result = persona("queue", "stats", env=env)
    assert result.returncode == 1
    assert "cannot reach Redis at redis://127.0.0.1:1/0" in result.stderr


def test_up_with_redis_down_is_a_clear_error(env):
    env["PERSONA_REDIS_URL"] = "redis://127.0.0.1:1/0"
    result = persona("up", "--no-dashboard", env=env)
    assert result.returncode == 1
    assert "cannot reach Redis at redis://127.0.0.1:1/0" in result.stderr and "Traceback" not in result.stderr


def test_a_setting_that_cannot_be_read_is_named_with_the_form_it_needs(env):
    env["PERSONA_WORKER__MAX_BATCH"] = "abc"
    result = persona("queue", "stats", env=env)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert "PERSONA_WORKER__MAX_BATCH: input should be a valid integer" in result.stderr

    del env["PERSONA_WORKER__MAX_BATCH"]
    env["PERSONA_PERSONAS_DIRS"] = "/srv/personas"  # a list setting wants JSON
    result = persona("personas", "list", env=env)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert "PERSONA_PERSONAS_DIRS cannot be read: expected a JSON list" in result.stderr


def test_a_command_given_json_fails_with_one_json_object_on_stdout(env):
    """A script that asked for JSON got a red line on stderr and nothing on stdout when the
    settings could not be read, or Redis could not be reached: it could not read why."""
    import json

    env["PERSONA_QUEUE__MAX_LENGTH"] = "abc"
    for args in (("queue", "stats", "--json"), ("checkpoints", "sage", "--json")):
        result = persona(*args, env=env)
        assert result.returncode == 1 and result.stderr == "", result.stderr
        assert json.loads(result.stdout) == {"ok": False, "error": {
            "kind": "ConfigError",
            "message": "PERSONA_QUEUE__MAX_LENGTH: input should be a valid integer, unable to parse string as an integer",
        }}
    del env["PERSONA_QUEUE__MAX_LENGTH"]
    env["PERSONA_REDIS_URL"] = "redis://127.0.0.1:1/0"
    result = persona("queue", "stats", "--json", env=env)
    assert result.returncode == 1 and result.stderr == "", result.stderr
    [line] = result.stdout.splitlines()
    failed = json.loads(line)["error"]
    assert failed["kind"] == "RedisUnavailable" and "cannot reach Redis at redis://127.0.0.1:1/0" in failed["message"]
    plain = persona("queue", "stats", env=env)  # without --json: the red line, as before
    assert plain.returncode == 1 and plain.stdout == "" and plain.stderr.startswith("error: cannot reach Redis")


def test_a_command_line_refused_under_json_is_one_json_object_too(env):
    """`persona ask --json --max-new-tokens abc ...` printed click's usage box on stderr and
    nothing on stdout (status 2): a script reading the JSON could not tell why."""
    import json

    for args, option in (
        (("ask", "--json", "--max-new-tokens", "abc", "sage", "hi"), "'--max-new-tokens'"),
        (("ask", "sage", "hi", "--json", "--max-tokens", "3"), "--max-tokens"),
        (("queue", "stats", "--json", "--bogus"), "--bogus"),
    ):
        result = persona(*args, env=env)
        assert result.returncode == 2 and result.stderr == "", result.stderr  # click's status, as without --json
        failed = json.loads(result.stdout)
        assert failed["ok"] is False and failed["error"]["kind"] == "UsageError", failed
        assert option in failed["error"]["message"] and "--help`" in failed["error"]["message"], failed
    plain = persona("ask", "--max-new-tokens", "abc", "sage", "hi", env=env)  # without --json: click's usage text
    assert plain.returncode == 2 and plain.stdout == "" and "--max-new-tokens" in plain.stderr
    literal = persona("ask", "--max-new-tokens", "abc", "sage", "--", "--json", env=env)  # a message, not the option
    assert literal.returncode == 2 and literal.stdout == ""


def test_queue_stats_shows_streams_and_workers(env, redis_url, redis_client):
    env["PERSONA_REDIS_URL"] = redis_url
    result = persona("queue", "stats", env=env)
    assert result.returncode == 0, result.stderr
    assert "│ chat " in result.stdout and "persona:q:" not in result.stdout and "workers (0 live)" in result.stdout
    as_json = persona("queue", "stats", "--json", env=env)
    assert '"completed"' not in as_json.stdout or as_json.returncode == 0
    import json

    assert [s["name"] for s in json.loads(as_json.stdout)["streams"]] == ["persona:q:chat", "persona:q:batch"]


def test_queue_stats_counts_the_requests_refused_by_why(env, redis_url, redis_client, settings):
    """Refused requests were counted nowhere: `queue stats` showed completed, withdrawn and
    expired, and no sign that callers were being turned away (the queue full, or a user
    with their share of requests waiting). Counts from before they were kept read as 0."""
    import json

    from persona import constants as keys
    from persona.contract import GenerationRequest, Message
    from persona.errors import QueueBusy
    from persona.queue import QueueClient

    env["PERSONA_REDIS_URL"] = redis_url
    redis_client.hset(keys.STATS_KEY, mapping={"completed": 7, "expired": 2})  # as an older version left them
    before = json.loads(persona("queue", "stats", "--json", env=env).stdout)
    assert (before["refused"], before["refused_full"], before["refused_user_share"]) == (0, 0, 0)

    settings.queue.max_length, settings.queue.max_pending_per_user = 3, 1
    client = QueueClient(redis_client, settings.queue)
    for user in ("ann", "ann", "ann", "bob", "cy", "dee"):  # ann twice over her share; dee finds it full
        with contextlib.suppress(QueueBusy):
            client.submit(GenerationRequest(persona="sage", messages=[Message(role="user", content="hi")], user=user))
    after = json.loads(persona("queue", "stats", "--json", env=env).stdout)
    assert (after["refused"], after["refused_full"], after["refused_user_share"]) == (3, 1, 2)
    assert after["completed"] == 7
    table = persona("queue", "stats", env=env).stdout
    assert re.search(r"│ refused +│ +3 │", table), table
    assert re.search(r"│   queue full +│ +1 │", table) and re.search(r"│   user's share +│ +2 │", table), table


def test_wrong_redis_password_is_named_without_showing_it(env, redis_url):
    password = urlsplit(redis_url).password
    env["PERSONA_REDIS_URL"] = redis_url.replace(f":{password}@", ":not-the-password@")
    result = persona("queue", "stats", env=env)
    assert result.returncode == 1
    assert "refused the password" in result.stderr and "not-the-password" not in result.stderr


def test_a_server_quoting_the_password_back_is_said_without_it(env):
    """A Redis older than HELLO (5.x) answers the client's greeting by quoting it, password
    and all, and the error line showed it (on a terminal, in a CI log, in a bug report)."""
    from tests.fakes.old_redis import OldRedis

    redis_5 = OldRedis("5.0.14")
    env["PERSONA_REDIS_URL"] = f"redis://:hunter2-secret@127.0.0.1:{redis_5.port}/0"
    try:
        for args in (("queue", "stats"), ("queue", "dead", "--json")):
            result = persona(*args, env=env)
            said = result.stderr + result.stdout
            assert result.returncode == 1 and "HELLO" in said, said
            assert "hunter2-secret" not in said and "***" in said
    finally:
        redis_5.close()


def test_the_command_line_starts_without_the_model_stack(env):
    """`persona ask`, `chat`, `queue` and `--help` are clients: they must not pay the
    seconds torch and transformers take to import (they did, through one stray import)."""
    probe = "import sys, persona.cli; print(sorted(m for m in ('torch', 'transformers', 'llama_cpp') if m in sys.modules))"
    result = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def test_a_redis_url_that_is_not_one_is_named_without_showing_it(env):
    env["PERSONA_REDIS_URL"] = "localhost:6379"  # the scheme forgotten
    result = persona("ask", "sage", "hello", env=env)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert "PERSONA_REDIS_URL" in result.stderr and "redis://" in result.stderr
    env["PERSONA_REDIS_URL"] = "http://:s3cret@127.0.0.1:6379"
    result = persona("up", "--no-dashboard", env=env)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert "PERSONA_REDIS_URL" in result.stderr and "s3cret" not in result.stderr


def test_a_server_that_is_not_redis_is_a_clear_error(env):
    """A URL pointing at the wrong port (the dashboard's, say) answers, but not as Redis."""
    import http.server
    import threading

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), http.server.BaseHTTPRequestHandler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        env["PERSONA_REDIS_URL"] = f"redis://127.0.0.1:{server.server_address[1]}/0"
        result = persona("queue", "stats", env=env)
    finally:
        server.shutdown()
        server.server_close()
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert "PERSONA_REDIS_URL" in result.stderr


def _wait_for_a_request(client, timeout_s: float = 30.0) -> None:
    import time

    from persona import constants as keys

    deadline = time.monotonic() + timeout_s
    while not client.xlen(keys.STREAM_INTERACTIVE):
        assert time.monotonic() < deadline, "the request never reached the queue"
        time.sleep(0.05)


@pytest.mark.slow
def test_ask_when_redis_stops_while_it_waits_is_a_clear_error(env, own_redis):
    """A wait rides out Redis restarting until its deadline (said once: it was said every
    second), then says the connection was lost and where to look."""
    server, url, client = own_redis
    env["PERSONA_REDIS_URL"] = url
    env["PERSONA_QUEUE__DEFAULT_DEADLINE_S"] = "6"
    asking = subprocess.Popen(
        [sys.executable, "-m", "persona", "ask", "sage", "hello"], env=env, text=True,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )
    _wait_for_a_request(client)  # no worker: it waits for the reply
    server.stop()
    _, stderr = asking.communicate(timeout=60)
    assert asking.returncode == 1 and "Traceback" not in stderr
    assert "lost the connection to Redis" in stderr
    error = stderr[stderr.index("lost the connection"):]
    assert "PERSONA_REDIS_URL names" in error and "persona up" not in error  # up starts no Redis of that URL
    assert stderr.count("Redis cannot be reached") == 1 and "trying again until its deadline" in stderr


@pytest.mark.slow
def test_chat_carries_on_when_redis_stops_under_a_message(env, own_redis):
    server, url, client = own_redis
    env["PERSONA_REDIS_URL"] = url
    env["PERSONA_QUEUE__DEFAULT_DEADLINE_S"] = "6"  # the message's wait rides out an outage until then
    chatting = subprocess.Popen(
        [sys.executable, "-m", "persona", "chat", "sage"], env=env, text=True,
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )
    chatting.stdin.write("hello\n")
    chatting.stdin.flush()
    _wait_for_a_request(client)
    server.stop()
    stdout, stderr = chatting.communicate("/quit\n", timeout=60)
    assert chatting.returncode == 0 and "Traceback" not in stderr
    assert "lost the connection to Redis" in stderr
    assert stdout.count("you>") == 2  # asked again after the error, then left with /quit


def test_personas_validate_marks_each_file_without_markup_showing(env, tmp_path: Path):
    bad = tmp_path / "wrong.toml"
    bad.write_text("[sampling]\nmax_new_tokens = 0\n")
    result = persona("personas", "validate", str(bad), env=env)
    assert result.returncode == 1
    assert "✗" in result.stderr and "[red]" not in result.stderr and "[/red]" not in result.stderr


def test_up_with_a_data_dir_it_cannot_use_says_which_setting_to_change(env, tmp_path: Path):
    not_a_folder = tmp_path / "a-file"
    not_a_folder.write_text("")
    env["PERSONA_DATA_DIR"] = str(not_a_folder)
    result = persona("up", "--no-dashboard", env=env)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert str(not_a_folder) in result.stderr and "PERSONA_DATA_DIR" in result.stderr


def _queued_request_id(client) -> str:
    import json

    from persona import constants as keys

    _wait_for_a_request(client)
    [(_, fields)] = client.xrange(keys.STREAM_INTERACTIVE)
    return json.loads(fields[b"r"])["id"]


def _with_ctrl_c() -> None:
    """Run in the child before it starts: Ctrl-C acts on it, as in a terminal, even where
    this test runs with SIGINT ignored (a background job: Python then ignores it too)."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_DFL)


def test_ctrl_c_while_asking_withdraws_the_question(env, own_redis):
    import signal

    from persona import constants as keys

    _, url, client = own_redis
    env["PERSONA_REDIS_URL"] = url
    asking = subprocess.Popen(
        [sys.executable, "-m", "persona", "ask", "sage", "hello"], env=env, text=True,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, preexec_fn=_with_ctrl_c,
    )
    request_id = _queued_request_id(client)  # no worker: it waits for the reply
    asking.send_signal(signal.SIGINT)
    _, stderr = asking.communicate(timeout=30)
    assert "Traceback" not in stderr
    assert client.exists(keys.cancel_key(request_id)), "a worker would still answer it"


def test_ctrl_c_in_a_chat_withdraws_that_message_and_the_chat_goes_on(env, own_redis):
    import signal

    from persona import constants as keys

    _, url, client = own_redis
    env["PERSONA_REDIS_URL"] = url
    chatting = subprocess.Popen(
        [sys.executable, "-m", "persona", "chat", "sage"], env=env, text=True,
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, preexec_fn=_with_ctrl_c,
    )
    chatting.stdin.write("hello\n")
    chatting.stdin.flush()
    request_id = _queued_request_id(client)
    chatting.send_signal(signal.SIGINT)
    stdout, stderr = chatting.communicate("/quit\n", timeout=30)
    assert chatting.returncode == 0 and "Traceback" not in stderr
    assert client.exists(keys.cancel_key(request_id))
    assert "(withdrawn)" in stdout and stdout.count("you>") == 2  # asked again, then left with /quit


def test_ask_with_a_sampling_option_past_the_contracts_bounds_names_the_option(env):
    """`--max-new-tokens 5000` or `--seed -1` ended in a pydantic traceback (status 1)."""
    for option, value in (("--max-new-tokens", "5000"), ("--seed", "-1")):
        result = persona("ask", "sage", "hello", option, value, env=env)
        assert result.returncode == 2, result.stderr
        assert "Traceback" not in result.stderr and option in result.stderr


def wait_until_it_says(process: subprocess.Popen, output: Path, text: str, timeout: float) -> None:
    """Wait for ``text`` in the log a process writes to ``output``; fail, showing the log, if
    it ends first or ``timeout`` seconds pass."""
    import time

    deadline = time.monotonic() + timeout
    while text not in output.read_text():
        assert process.poll() is None and time.monotonic() < deadline, output.read_text()
        time.sleep(0.05)


@pytest.mark.slow
def test_a_worker_told_to_stop_while_it_loads_its_model_stops_at_once(env, redis_url, tmp_path: Path):
    """SIGTERM (`persona up` stopping) or Ctrl-C during a worker's first start went on to
    load and warm every model (minutes on a GPU), serve, then leave: nothing was taken
    yet, so it stops at once."""
    import signal

    env |= {"PERSONA_REDIS_URL": redis_url, "PERSONA_WORKER__THREADS": "1"}
    output = tmp_path / "worker.log"
    with output.open("w") as log:  # a data dir of its own: the bundled model is converted first (seconds)
        worker = subprocess.Popen([sys.executable, "-m", "persona", "worker", "--preload", "sage"],
                                  env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_until_it_says(worker, output, "converting the bundled model", timeout=60)
        worker.send_signal(signal.SIGTERM)
        assert worker.wait(timeout=30) == 0
    finally:
        worker.kill()
    said = output.read_text()
    assert "stopped while loading models" in said and "serving on" not in said and "Traceback" not in said, said


# `python -m persona worker --preload sage` (as `persona up` runs its workers), sent SIGTERM
# inside the first code that exec() runs from a string (a dataclass's generated methods,
# say) while the file named first on its command line is running.
WORKER_STOPPED_INSIDE_EXEC = """
import os, runpy, signal, sys

WHILE = os.path.join(*sys.argv[1].split("/"))

def at_the_start_of_that_code(frame, event, arg):
    if frame.f_code.co_filename == "<string>" and frame.f_code.co_name == "<module>":
        sys.settrace(None)
        signal.raise_signal(signal.SIGTERM)  # to this thread: handled here, at once

def on_audit(event, args):
    if event == "exec" and args[0].co_filename == "<string>" and not sent:
        frame = sys._getframe()
        while frame is not None and not frame.f_code.co_filename.endswith(WHILE):
            frame = frame.f_back
        if frame is not None:
            sent.append(True)
            sys.settrace(at_the_start_of_that_code)

sent = []
sys.addaudithook(on_audit)
sys.argv = ["persona", "worker", "--preload", "sage"]
runpy.run_module("persona", run_name="__main__")
"""


@pytest.mark.parametrize("phase", ["torch/__init__.py", "persona/pool.py"], ids=["torch-imports", "model-loads"])
def test_a_worker_stopped_inside_code_that_exec_runs_exits_cleanly(env, redis_url, tmp_path: Path, phase):
    """Torch's and transformers' imports, as the model loads, run thousands of pieces of code
    from strings. A SIGTERM landing in one left it as a KeyboardInterrupt, which CPython
    noted as unhandled there: the worker said "stopped while loading models", then Python
    ended it with SIGINT (status -2, a crash to `persona up`)."""
    env |= {"PERSONA_REDIS_URL": redis_url, "PERSONA_WORKER__THREADS": "1"}
    (tmp_path / "stopped_inside_exec.py").write_text(WORKER_STOPPED_INSIDE_EXEC)
    result = subprocess.run([sys.executable, "-m", "stopped_inside_exec", phase], env=env, cwd=tmp_path,
                            capture_output=True, text=True, timeout=60, check=False)
    said = result.stdout + result.stderr
    assert result.returncode == 0, said
    assert "stopped while loading models" in said and "Traceback" not in said, said


def test_personas_validate_checks_what_a_file_points_at_and_takes_a_folder(env, tmp_path: Path):
    """A base model or checkpoint that is not there, and a schedule that can never post,
    passed `validate` (the first request, or the scheduler, found them); a folder was
    refused as "Is a directory"."""
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "fine.toml").write_text('description = "fine"\n')
    (folder / "lost.toml").write_text('[model]\nbase = "/no/such/model"\n')
    (folder / "unfit.toml").write_text('[model]\ncheckpoint = "v9"\n')
    (folder / "mute.toml").write_text('[schedule]\nenabled = true\nsinks = ["file:mute.jsonl"]\n')
    (folder / "original.toml").write_text('[filters]\ncorpus = "corpus.jsonl"\n')
    result = persona("personas", "validate", str(folder), env=env)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert f"✓ {folder / 'fine.toml'}" in result.stdout
    assert f"{folder / 'lost.toml'}: model.base: base model '/no/such/model' is neither" in result.stderr
    assert f"{folder / 'unfit.toml'}: model.checkpoint: persona 'unfit': no checkpoint version 'v9'" in result.stderr
    assert f"{folder / 'mute.toml'}: schedule.enabled is true, but adapters does not list" in result.stderr
    assert f"{folder / 'original.toml'}: filters.corpus: {folder / 'corpus.jsonl'} is not a file" in result.stderr
    (folder / "corpus.jsonl").write_text('{"text": "Patience."}\n')
    assert f"✓ {folder / 'original.toml'}" in persona("personas", "validate", str(folder), env=env).stdout
    (tmp_path / "empty").mkdir()
    nothing = persona("personas", "validate", str(tmp_path / "empty"), env=env)
    assert nothing.returncode == 1 and "no persona files (*.toml) in this folder" in nothing.stderr


def test_personas_validate_finds_what_the_worker_would_refuse_in_a_model_folder(env, tmp_path: Path):
    """A base folder without a tokenizer, and a LoRA checkpoint whose adapter_config.json is
    not JSON, passed `validate`; the worker refused the first and crashed on the second."""
    untokenized = tmp_path / "untokenized"
    untokenized.mkdir()
    (untokenized / "config.json").write_text("{}")
    damaged = tmp_path / "damaged-lora"
    damaged.mkdir()
    (damaged / "adapter_config.json").write_text('{"r": 4, "target_modules": [')
    (damaged / "adapter_model.safetensors").write_bytes(b"weights")
    tokenized = tmp_path / "tokenized-lora"  # a checkpoint that saved its own tokenizer is enough
    tokenized.mkdir()
    (tokenized / "adapter_config.json").write_text("{}")
    (tokenized / "adapter_model.safetensors").write_bytes((2).to_bytes(8, "little") + b"{}")  # whole, if empty
    (tokenized / "tokenizer_config.json").write_text("{}")
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "bare.toml").write_text(f'[model]\nbase = "{untokenized}"\n')
    (folder / "torn.toml").write_text(f'[model]\ncheckpoint = "{damaged}"\n')
    (folder / "tuned.toml").write_text(f'[model]\nbase = "{untokenized}"\ncheckpoint = "{tokenized}"\n')
    result = persona("personas", "validate", str(folder), env=env)
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
    assert (f"{folder / 'bare.toml'}: model.base: the model folder {untokenized} has no tokenizer (none of "
            "tokenizer.json, tokenizer_config.json, tokenizer.model, vocab.json)") in result.stderr
    assert f"{folder / 'torn.toml'}: model.checkpoint: checkpoint {damaged}: adapter_config.json" in result.stderr
    assert f"✓ {folder / 'tuned.toml'}" in result.stdout


def test_personas_validate_works_without_the_posting_extra(env, tmp_path: Path):
    """It imported the scheduler to judge a schedule, and so croniter: without the posting
    extra, checking any persona file ended in a ModuleNotFoundError traceback."""
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "mute.toml").write_text('[schedule]\nenabled = true\nsinks = ["file:mute.jsonl"]\n')
    without_croniter = "import sys; sys.modules['croniter'] = None; from persona.cli import main; main()"
    result = subprocess.run([sys.executable, "-c", without_croniter, "personas", "validate", str(tmp_path / "mine")],
                            env=env, capture_output=True, text=True, timeout=60, check=False)
    assert "Traceback" not in result.stderr, result.stderr
    assert result.returncode == 1
    assert "schedule.enabled is true, but adapters does not list" in result.stderr


def test_a_personas_folder_that_is_not_there_is_named(env, tmp_path: Path):
    """A misspelt PERSONA_PERSONAS_DIRS was searched, found empty, and never mentioned."""
    env["PERSONA_PERSONAS_DIRS"] = f'["{tmp_path / "persnoas"}"]'
    checked = persona("personas", "validate", env=env)
    assert checked.returncode == 1
    assert f"{tmp_path / 'persnoas'}: not a folder, yet PERSONA_PERSONAS_DIRS names it" in checked.stderr
    listed = persona("personas", "list", env=env)
    assert listed.returncode == 0 and "PERSONA_PERSONAS_DIRS names it" in listed.stderr


def test_ask_says_at_once_that_no_worker_is_running(env, own_redis):
    """It waited out the whole deadline (two minutes by default) before saying anything."""
    _, url, _ = own_redis
    env["PERSONA_REDIS_URL"] = url
    result = persona("ask", "sage", "hello", "--timeout", "1", env=env)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert "no worker is running yet; this waits in the queue for one, up to 1 s" in result.stderr
    env["PERSONA_REDIS_URL"] = "redis://127.0.0.1:1/0"  # an empty message needs no Redis to be refused
    result = persona("ask", "sage", " ", env=env)
    assert result.returncode == 1 and "the message is empty" in result.stderr


def test_ask_and_queue_stats_say_a_worker_is_starting_rather_than_that_none_runs(env, own_redis):
    """Right after `persona up`, `persona ask` said "no worker is running yet ... (`persona up`
    or `persona worker` starts one)" while its worker loaded its model, and `persona queue
    stats` listed no worker at all."""
    from persona import heartbeat

    _, url, client = own_redis
    env["PERSONA_REDIS_URL"] = url
    info = heartbeat.StartingWorker(id="w-warming", device="cuda", since=heartbeat.redis_now(client) - 12)
    heartbeat.announce_starting(client, info, ttl_s=60)
    heartbeat.StartingBeat(client, info, ttl_s=60, every_s=60).loading("sage", "smollm2")
    result = persona("ask", "sage", "hello", "--timeout", "1", env=env)
    assert result.returncode == 1 and "no worker is running" not in result.stderr
    # 12 s when announced; more by the time `persona ask` has started on a busy machine (each
    # command's start took over 8 s on a machine at load 8).
    assert re.search(r"a worker is starting \(loading smollm2 for sage, [1-5]\d s so far\); this waits in the queue until "
                     r"it serves, up to 1 s", result.stderr), result.stderr
    stats = persona("queue", "stats", env=env)
    assert stats.returncode == 0, stats.stderr
    assert "workers (0 live, 1 starting)" in stats.stdout and re.search(r"starting \([1-5]\ds\)", stats.stdout), stats.stdout
    assert "loading smollm2 for sage" in stats.stdout
    assert "no worker serves yet: requests wait until a starting one has loaded its models" in stats.stdout


def test_chat_commands_are_never_sent_to_the_persona(env, own_redis):
    """/help, or a misspelt /quitt, went through the queue as a message. A line that only
    looks like one ("/usr is where?") goes as a message when it starts with "//"."""
    from persona import constants as keys
    from persona.contract import GenerationRequest

    _, url, client = own_redis
    env |= {"PERSONA_REDIS_URL": url, "PERSONA_QUEUE__DEFAULT_DEADLINE_S": "1"}
    result = subprocess.run([sys.executable, "-m", "persona", "chat", "sage"], env=env,
                            input="/help\n/Quitt now\n/usr is where?\n//usr is where?\n/quit\n",
                            capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 0 and "Traceback" not in result.stderr
    assert "unknown command /quitt; /reset forgets the conversation" in result.stderr
    assert "unknown command /usr; /reset forgets the conversation, /help shows this, /quit or Ctrl-D leaves; " \
           "to send a line that starts with a / as a message, start it with // instead" in result.stderr
    assert result.stdout.count("/help shows this") == 2  # the greeting, then /help
    assert result.stdout.count("start it with // instead") == 1  # /help says how to send "/usr..."
    [(_, fields)] = client.xrange(keys.STREAM_INTERACTIVE)
    [sent] = GenerationRequest.from_json(fields[b"r"]).messages
    assert sent.content == "/usr is where?"


def test_a_line_that_starts_with_a_path_is_a_message_and_commands_ignore_case():
    from persona.cli.talk import _command

    assert _command("/etc/hosts is where?") is None and _command("/RESET") == "/reset"


def test_a_reply_longer_than_a_message_may_be_stays_in_the_chat_cut(env, redis_url, write_persona, tiny_llama_dir,
                                                                     running_worker, personas_dir: Path):
    """A long reply, sent back whole as context, got every later message refused
    ("a message is N characters long; at most M are accepted") until /reset."""
    write_persona("tiny", base=str(tiny_llama_dir), sampling={"max_new_tokens": 16, "seed": 7})
    running_worker()
    env |= {"PERSONA_REDIS_URL": redis_url, "PERSONA_PERSONAS_DIRS": f'["{personas_dir}"]',
            "PERSONA_QUEUE__MAX_MESSAGE_CHARS": "12"}
    result = subprocess.run([sys.executable, "-m", "persona", "chat", "tiny"], env=env, input="hi\nhi again\n",
                            capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 0 and "Traceback" not in result.stderr
    assert "characters long" not in result.stderr, result.stderr
    assert result.stdout.count("tiny> ") == 2
    assert "(only the first 12 characters of that reply stay in the conversation)" in result.stdout


def test_ask_json_of_a_failed_reply_exits_with_status_1(env, redis_url, write_persona, running_worker,
                                                          personas_dir: Path):
    """The worker's error was printed as JSON with exit status 0: a script saw success."""
    import json

    write_persona("lost", base="/no/such/model")
    running_worker()
    env |= {"PERSONA_REDIS_URL": redis_url, "PERSONA_PERSONAS_DIRS": f'["{personas_dir}"]'}
    result = persona("ask", "lost", "hello", "--json", env=env)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    reply = json.loads(result.stdout)
    assert reply["ok"] is False and "/no/such/model" in reply["error"]["message"]


def invoke(monkeypatch: pytest.MonkeyPatch, env: dict[str, str], *args: str):
    """`persona ARGS` run in this process (click's test runner), under ``env``: for checks
    that do not need a process of their own."""
    from typer.testing import CliRunner

    from persona.cli import app
    from persona.cli.common import get_settings

    for name in [k for k in os.environ if k.startswith("PERSONA_")]:
        monkeypatch.delenv(name)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    get_settings.cache_clear()
    try:
        return CliRunner().invoke(app, list(args))
    finally:
        get_settings.cache_clear()


def test_generate_refuses_an_out_it_cannot_write_before_sampling(env, monkeypatch, tmp_path: Path):
    """`--out` naming a folder, or a file under a file, was found out only once every sample
    had been generated (minutes), as a traceback that threw them all away."""
    result = invoke(monkeypatch, env, "generate", "sage", "--out", str(tmp_path))
    assert result.exit_code == 2 and "is a directory" in result.stderr, result.stderr
    a_file = tmp_path / "a-file"
    a_file.write_text("")
    result = invoke(monkeypatch, env, "generate", "sage", "--out", str(a_file / "samples.txt"))
    assert result.exit_code == 2, result.stderr  # a wrong command line, as the folder's: click's status
    assert "--out" in result.stderr and "cannot make its folder" in result.stderr, result.stderr


def test_generate_with_a_sampling_option_past_the_contracts_bounds_names_the_option(env, monkeypatch):
    """`--seed -1` or `--max-new-tokens 5000` ended in a pydantic traceback, as `ask`'s once did."""
    for option, value in (("--max-new-tokens", "5000"), ("--seed", "-1")):
        result = invoke(monkeypatch, env, "generate", "sage", option, value)
        assert result.exit_code == 2 and option in result.stderr, result.stderr


def test_ctrl_c_while_generating_withdraws_the_samples_still_waiting(env, own_redis, tmp_path: Path):
    """Ctrl-C left every sample asked for in the queue, for a worker to write for nobody, and
    printed nothing of what had come back."""
    import json
    import signal
    import time

    from persona import constants as keys

    _, url, client = own_redis
    env["PERSONA_REDIS_URL"] = url
    earlier = tmp_path / "samples.txt"
    earlier.write_text("kept\n")
    generating = subprocess.Popen(
        [sys.executable, "-m", "persona", "generate", "sage", "-n", "3", "--out", str(earlier)], env=env, text=True,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, preexec_fn=_with_ctrl_c,  # noqa: PLW1509 (no threads here)
    )
    deadline = time.monotonic() + 30
    while client.xlen(keys.STREAM_BATCH) < 3:  # no worker: they wait for one
        assert time.monotonic() < deadline, "the samples never reached the queue"
        time.sleep(0.05)
    ids = [json.loads(fields[b"r"])["id"] for _, fields in client.xrange(keys.STREAM_BATCH)]
    generating.send_signal(signal.SIGINT)
    _, stderr = generating.communicate(timeout=30)
    assert generating.returncode == 130 and "Traceback" not in stderr, stderr
    assert "stopped: no sample was written yet; the rest were withdrawn" in stderr, stderr
    assert all(client.exists(keys.cancel_key(i)) for i in ids), "a worker would still write them"
    assert earlier.read_text() == "kept\n"  # not replaced by nothing


def test_a_timeout_past_a_day_is_refused_as_a_usage_error(env, monkeypatch):
    """`--timeout inf` crashed with OverflowError, and 1e300 said it would wait a 300-digit
    number of seconds before Redis refused it."""
    for command in (["ask", "sage", "hello"], ["generate", "sage"]):
        for value in ("inf", "1e300", "86401"):
            result = invoke(monkeypatch, env, *command, "--timeout", value)
            assert result.exit_code == 2, result.output
            assert "--timeout" in result.stderr and "86400" in result.stderr, result.stderr


def test_a_timeout_that_is_not_a_number_is_said_to_be_none(env, monkeypatch):
    """`--timeout nan` was refused as "Input should be less than or equal to 86400": nan is
    under no limit, so that read as if it were too large."""
    for command in (["ask", "sage", "hello"], ["chat", "sage"], ["generate", "sage"], ["swap", "sage", "v1"], ["rollback", "sage"]):
        result = invoke(monkeypatch, env, *command, "--timeout", "nan")
        said = " ".join(result.stderr.replace("│", " ").split())
        assert result.exit_code == 2 and "'--timeout': nan is not a number; give seconds from 1 to 86400" in said, said
        assert "less than or equal" not in said


def test_generate_counts_every_missing_sample_and_fails_when_any_is(env, own_redis):
    """With -n 100 and a --timeout that ran out during the first window of 64, generate said
    "63 of 100 samples failed: <the first failure>" and exited 0: the 36 never asked for
    were one entry among the failures."""
    import time

    from persona import constants as keys
    from persona.contract import GenerationReply
    from persona.settings import QueueSettings
    from persona.work_queue import WorkQueue

    _, url, client = own_redis
    env["PERSONA_REDIS_URL"] = url
    generating = subprocess.Popen(
        [sys.executable, "-m", "persona", "generate", "sage", "-n", "100", "--timeout", "4"], env=env, text=True,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )
    deadline = time.monotonic() + 30
    while not client.exists(keys.STREAM_BATCH) or client.xlen(keys.STREAM_BATCH) < 64:  # no worker yet
        assert time.monotonic() < deadline, "the first window never reached the queue"
        time.sleep(0.05)
    work = WorkQueue(client, QueueSettings())
    jobs = work.claim("slow-worker", 64, block_ms=0)
    # Two come in time; the other 62 are still being written at --timeout, so the next window is never asked for.
    work.deliver([(job, GenerationReply(id=job.request.id, ok=True, text=f"sample {i}")) for i, job in enumerate(jobs[:2])],
                 "slow-worker")
    stdout, stderr = generating.communicate(timeout=60)
    assert stdout.count("sample ") == 2  # those that came are kept
    assert generating.returncode == 1, stderr
    said = " ".join(stderr.split())
    assert "98 of 100 samples not written: 36 never asked for (--timeout ran out first" in said, stderr
    assert "62 not answered in time" in said, stderr
    assert all(client.exists(keys.cancel_key(job.request.id)) for job in jobs[2:]), "a worker would still write them"


def test_generate_withdraws_the_samples_unanswered_at_its_deadline_at_once(env, own_redis):
    """Past --timeout, generate gave each sample still unanswered a last wait of 0.1 s, one
    after another: a window of 64 with no worker ended 6 s and more after the queue's slack,
    and left all 64 queued for a worker to write for nobody."""
    import time

    from persona import constants as keys
    from persona.waiting import WAIT_SLACK_S

    _, url, client = own_redis
    env["PERSONA_REDIS_URL"] = url
    result = subprocess.run([sys.executable, "-m", "persona", "generate", "sage", "-n", "100", "--timeout", "1"],
                            check=False, env=env, text=True, capture_output=True, timeout=120)
    ended = time.time()
    said = " ".join(result.stderr.split())
    assert result.returncode == 1 and "100 of 100 samples not written: 36 never asked for" in said, result.stderr
    assert "64 not answered in time (no worker answered request" in said, result.stderr
    # Past the deadline, the first sample waits out the queue's slack; the other 63 add next to nothing.
    deadline = max(float(fields[b"d"]) for _, fields in client.xrange(keys.STREAM_BATCH))
    assert ended - deadline < WAIT_SLACK_S + 3, f"ended {ended - deadline:.1f} s after the deadline"
    assert len(client.keys(keys.cancel_key("*"))) == 64  # withdrawn: no worker writes them later


def test_sigterm_stops_the_dashboard_and_the_embedded_redis_it_started(env, tmp_path: Path):
    """`docker stop` or systemd's SIGTERM killed `persona dashboard` (status 143) before it
    stopped the embedded Redis it had started, which then ran on for good."""
    import signal

    from persona.embedded_redis import find_embedded_url, stop_embedded

    data_dir = Path(env["PERSONA_DATA_DIR"])
    output = tmp_path / "dashboard.log"
    with output.open("w") as log:
        dashboard = subprocess.Popen([sys.executable, "-m", "persona", "dashboard", "--port", "0"],
                                     env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_until_it_says(dashboard, output, "dashboard on http", timeout=30)
        assert find_embedded_url(data_dir) is not None
        dashboard.send_signal(signal.SIGTERM)
        assert dashboard.wait(timeout=30) == 0, output.read_text()
        assert find_embedded_url(data_dir) is None, output.read_text()
        assert "embedded Redis stopped" in output.read_text()
    finally:
        dashboard.kill()
        stop_embedded(data_dir)  # whatever the outcome, no server outlives the test


def test_dashboard_port_out_of_range_is_refused_not_wrapped(env, monkeypatch):
    """`--port 99999` listened on 34463 (99999 - 65536) without a word; `--port -1` blamed the host."""
    for port in ("99999", "-1"):
        result = invoke(monkeypatch, env, "dashboard", "--port", port)
        assert result.exit_code == 2 and "'--port'" in result.stderr, result.stderr


def test_personas_validate_takes_a_persona_name_and_says_what_a_typo_meant(env, monkeypatch):
    """`persona personas validate sage` said "sage: cannot read: No such file or directory",
    and a misspelt name the same, with nothing to go on."""
    result = invoke(monkeypatch, env, "personas", "validate", "sage", "sgae", "nothere.toml")
    assert result.exit_code == 1, result.output
    assert "✓" in result.stdout and "sage.toml" in result.stdout, result.stdout
    assert "sgae: no such file, folder or persona; did you mean 'sage'?" in result.stderr, result.stderr
    assert "nothere.toml: no such file or folder" in result.stderr, result.stderr
    assert invoke(monkeypatch, env, "personas", "validate", "bofh").exit_code == 0


def test_a_closed_standard_input_is_read_as_an_empty_one(env, redis_url):
    """`persona ask sage - <&-` was an AttributeError traceback, and `persona chat sage <&-`
    "RuntimeError: input(): lost sys.stdin": a script that closed stdin got a crash."""
    env["PERSONA_REDIS_URL"] = redis_url

    def closed(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(["sh", "-c", 'exec "$0" -m persona "$@" <&-', sys.executable, *args], env=env,
                              capture_output=True, text=True, timeout=60, check=False)

    asked = closed("ask", "sage", "-")
    assert (asked.returncode, asked.stderr) == (1, "error: the message is empty; say something\n")
    chatted = closed("chat", "sage")
    assert chatted.returncode == 0 and chatted.stderr == "", chatted.stderr
    assert chatted.stdout.startswith("chatting with sage;")


def test_personas_validate_and_the_service_agree_on_which_files_are_personas(env, monkeypatch, tmp_path: Path):
    """`validate caps.TOML` said ✓ of a file the service never reads (it reads *.toml, in lower
    case), and `validate` counted an editor's lock file (.#mine.toml) as a broken persona."""
    import json

    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "mine.toml").write_text('description = "mine"\n')
    (folder / ".#mine.toml").symlink_to("root@host.1234:1700000000")
    (folder / "caps.TOML").write_text('description = "shouting"\n')
    env = {**env, "PERSONA_PERSONAS_DIRS": json.dumps([str(folder)])}
    never = "never read: only names ending in '.toml' (lower case) are read as personas; rename it to caps.toml"
    named = invoke(monkeypatch, env, "personas", "validate", str(folder / "caps.TOML"))
    assert named.exit_code == 1 and f"✗ {folder / 'caps.TOML'}: {never}" in named.stderr, named.output
    for args in ([], [str(folder)]):  # every persona file, or the folder's
        result = invoke(monkeypatch, env, "personas", "validate", *args)
        assert result.exit_code == 1, result.output
        assert f"✓ {folder / 'mine.toml'}" in result.stdout and ".#mine" not in result.output
        assert result.stderr.splitlines() == [f"✗ {folder / 'caps.TOML'}: {never}"]
    (folder / "caps.TOML").rename(folder / "caps.toml")
    assert invoke(monkeypatch, env, "personas", "validate").exit_code == 0


def test_eval_and_train_refuse_a_seed_torch_cannot_take_before_loading_anything(env, monkeypatch, tmp_path: Path):
    """`--seed 18446744073709551616` was a traceback from torch.manual_seed after the model had
    loaded (eval: after a minute measuring the base), as `ask`'s and `generate`'s are not."""
    corpus = tmp_path / "c.jsonl"  # never read: the seed is refused first
    too_big = str(2**64)
    result = invoke(monkeypatch, env, "eval", "sage", "--corpus", str(corpus), "--seed", too_big)
    assert result.exit_code == 2 and "'--seed'" in result.stderr, result.output
    for seed in (too_big, "-1"):
        result = invoke(monkeypatch, env, "train", "newcomer", "--corpus", str(corpus), "--seed", seed)
        assert result.exit_code == 1 and "--seed:" in result.stderr, result.output
        assert "Traceback" not in result.output


def test_a_message_with_nothing_visible_is_refused_as_empty(env, monkeypatch):
    """Zero-width spaces, or a lone right-to-left override, were queued and answered as if
    something had been said."""
    for message in ("\u200b\u200b", "\u202e", "\u200d \u00a0\u2028", "\x9b"):
        result = invoke(monkeypatch, env, "ask", "sage", message)
        assert result.exit_code == 1, result.output
        assert "the message is empty; say something" in result.stderr, result.output


def test_generate_json_prints_one_summary_object_with_the_samples_or_where_they_went(env, settings, redis_client,
                                                                                     tmp_path: Path):
    """`persona generate` had no --json: a script split its samples on lines of "=" and read
    "wrote 2 samples to ..." and "1 of 2 samples not written" from stderr."""
    import json

    from tests.fakes.scripted_worker import scripted_worker

    env["PERSONA_REDIS_URL"] = settings.redis_url.get_secret_value()
    with scripted_worker(settings, lambda request: f" and {request.sampling.seed}"):
        printed = persona("generate", "sage", "-n", "2", "--seed", "3", "--prefix", "Life is", "--json", env=env)
        out = tmp_path / "samples.jsonl"
        written = persona("generate", "sage", "-n", "2", "--seed", "3", "--out", str(out), "--json", env=env)
    assert printed.returncode == 0, printed.stderr
    assert json.loads(printed.stdout) == {"ok": True, "persona": "sage", "asked": 2, "written": 2, "out": None,
                                          "samples": ["Life is and 3", "Life is and 4"]}
    assert written.returncode == 0, written.stderr
    assert json.loads(written.stdout) == {"ok": True, "persona": "sage", "asked": 2, "written": 2, "out": str(out)}
    assert [json.loads(line)["text"] for line in out.read_text().splitlines()] == [" and 3", " and 4"]


def test_generate_json_with_samples_missing_is_a_failed_summary(env, own_redis):
    import json

    _, url, _client = own_redis
    env["PERSONA_REDIS_URL"] = url
    result = persona("generate", "sage", "-n", "2", "--timeout", "1", "--json", env=env)
    assert result.returncode == 1
    shown = json.loads(result.stdout)
    assert (shown["ok"], shown["written"], shown["samples"], shown["error"]["kind"]) == (False, 0, [], "ReplyTimeout")
    assert shown["error"]["message"].startswith("2 of 2 samples not written: 2 not answered in time"), shown


def test_generate_into_a_full_queue_with_no_worker_is_refused_without_saying_it_waits(env, own_redis):
    """`persona generate` said "no worker is running yet; this waits in the queue for one" before
    it sent anything, and then was refused as busy: no sample ever waited."""
    from persona import constants as keys
    from persona.contract import GenerationRequest, Priority
    from persona.queue import QueueClient
    from persona.settings import QueueSettings

    _, url, client = own_redis
    QueueClient(client, QueueSettings(max_length=1)).submit(
        GenerationRequest(persona="sage", mode="complete", priority=Priority.batch))
    env |= {"PERSONA_REDIS_URL": url, "PERSONA_QUEUE__MAX_LENGTH": "1"}
    refused = persona("generate", "sage", "-n", "2", "--timeout", "5", env=env)
    assert refused.returncode == 1 and "Traceback" not in refused.stderr, refused.stderr
    assert "the queue is full: persona:q:batch holds 1 request" in " ".join(refused.stderr.split()), refused.stderr
    assert "waits in the queue" not in refused.stderr and "no worker is running yet" not in refused.stderr
    assert client.xlen(keys.STREAM_BATCH) == 1
    said = persona("generate", "sage", "-n", "1", "--timeout", "1", env=env | {"PERSONA_QUEUE__MAX_LENGTH": "2"})
    assert "no worker is running yet; this waits in the queue for one, up to 1 s" in " ".join(said.stderr.split())


def test_generate_waits_no_longer_than_its_timeout(env, own_redis):
    """With no worker, `generate --timeout 2` took 8.8 s (`ask --timeout 2`: 3.1 s): each sample's
    wait ran to its deadline and the queue's 5 s of slack after it."""
    import time

    from persona import constants as keys

    _, url, client = own_redis
    env["PERSONA_REDIS_URL"] = url
    result = persona("generate", "sage", "-n", "2", "--timeout", "1", env=env)
    ended = time.time()
    assert result.returncode == 1 and "2 not answered in time" in " ".join(result.stderr.split()), result.stderr
    deadline = max(float(fields[b"d"]) for _, fields in client.xrange(keys.STREAM_BATCH))
    assert ended - deadline < 2.5, f"ended {ended - deadline:.1f} s after the deadline"


def test_generate_waits_no_longer_than_its_timeout_when_the_wall_clock_is_stepped_back(env, own_redis, monkeypatch):
    """--timeout was timed by the wall clock: stepped back an hour (NTP, an operator) as the
    samples were asked for, `generate --timeout 1` waited an hour and a second."""
    import time

    from persona.cli import generate_cmd
    from tests.fakes.clocks import SteppedBack

    _, url, _ = own_redis
    monkeypatch.setattr(generate_cmd, "time", SteppedBack(60.0))
    started = time.monotonic()
    result = invoke(monkeypatch, env | {"PERSONA_REDIS_URL": url}, "generate", "sage", "-n", "2", "--timeout", "1")
    assert result.exit_code == 1 and "2 not answered in time" in " ".join(result.output.split()), result.output
    assert time.monotonic() - started < 5


def test_usage_errors_read_as_sentences(env, monkeypatch, redis_url):
    """A suggestion ran into the pointer to --help ("Did you mean 'ask'?; see ..."); a pasted
    100,000-character id was said back whole; an empty id or --out said "no dead letter ;"
    and "file '' is a directory"."""
    import json

    said = json.loads(persona("asc", "--json", env=env).stdout)["error"]["message"]
    assert said == "No such command 'asc'. Did you mean 'ask'? See `persona --help`", said
    env["PERSONA_REDIS_URL"] = redis_url
    result = invoke(monkeypatch, env, "queue", "show", "1" * 100_000)
    assert result.exit_code == 1 and len(result.stderr) < 300, result.stderr[:300]
    assert "no dead letter 1111" in result.stderr and "100,000 characters" in result.stderr, result.stderr
    result = invoke(monkeypatch, env, "queue", "show", "")
    assert result.exit_code == 1 and "a dead-letter ID is needed" in result.stderr, result.stderr
    result = invoke(monkeypatch, env, "queue", "drop", "")
    assert result.exit_code == 1 and "a dead-letter ID cannot be empty" in result.stderr, result.stderr
    result = invoke(monkeypatch, env, "generate", "sage", "--out", "")
    assert result.exit_code == 2 and "an output path is needed" in result.stderr, result.stderr


@pytest.mark.parametrize("message", ["-5 degrees outside", "-5", "-0.5"])
def test_a_message_taken_for_an_option_says_how_to_send_it(env, message):
    """`persona ask sage "-5 degrees outside"` said only "No such option: -5"."""
    import json

    result = persona("ask", "sage", message, env=env)
    said = " ".join(re.sub(r"[│╭╮╰╯─]", " ", result.stderr).split())
    assert result.returncode == 2, result.stderr
    assert ("If that is your message, put -- before it (`persona ask sage -- \"-5 degrees\"`), "
            "or send - and give it on standard input") in said, said
    error = json.loads(persona("ask", "sage", message, "--json", env=env).stdout)["error"]
    assert error["kind"] == "UsageError" and "If that is your message, put -- before it" in error["message"]


def test_an_unknown_option_gets_no_message_hint(env):
    result = persona("ask", "sage", "hello", "-x", env=env)
    assert result.returncode == 2 and "No such option: -x" in result.stderr
    assert "If that is your message" not in result.stderr
