"""What the real `persona` command writes into a pipe: a reader that stops early, tables
kept whole past 80 columns, and checkpoint folders that cannot serve."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from persona import heartbeat
from persona.checkpoints import CheckpointInfo
from persona.contract import GenerationRequest, Message
from persona.queue import QueueClient, WorkQueue

LONG_BASE = "/srv/models/" + "a-long-folder-name/" * 4 + "base"


@pytest.fixture
def env(settings, redis_url, personas_dir, write_persona) -> dict[str, str]:
    """The environment an operator's shell gives `persona`: no COLUMNS, so a pipe is 80 wide."""
    write_persona("sage", base=LONG_BASE)
    env = {k: v for k, v in os.environ.items() if not k.startswith("PERSONA_") and k != "COLUMNS"}
    return env | {"PERSONA_DATA_DIR": str(settings.data_dir), "PERSONA_REDIS_URL": redis_url,
                  "PERSONA_PERSONAS_DIRS": json.dumps([str(personas_dir)]),
                  "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}


def persona(env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    """`persona ARGS...` with stdout and stderr into pipes."""
    return subprocess.run([sys.executable, "-m", "persona", *args], env=env, capture_output=True, check=False,
                          text=True, timeout=120)


def versions(settings, count: int, persona_name: str = "sage") -> None:
    """``count`` listed checkpoint versions (metadata only: listing reads no weights)."""
    for n in range(1, count + 1):
        folder = settings.checkpoints_dir / persona_name / f"v{n}"
        folder.mkdir(parents=True)
        info = CheckpointInfo(persona=persona_name, version=f"v{n}", base=LONG_BASE, kind="lora",
                              metrics={"eval_loss": 1.25, "perplexity": 3.49})
        (folder / "checkpoint.json").write_text(info.model_dump_json())


def read_then_close(env: dict[str, str], *args: str, first: str = "line") -> tuple[int, str]:
    """Run `persona ARGS...` into a pipe whose reader takes the first line (``first="line"``),
    the first 100 bytes (``"bytes"``: of one long JSON line) or nothing (``"nothing"``) and
    closes it, as `| head -1`, `| head -c 100` and `| head -0` do; its exit status and stderr."""
    with subprocess.Popen([sys.executable, "-m", "persona", *args], env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True) as running:
        if first == "line":
            running.stdout.readline()
        elif first == "bytes":
            os.read(running.stdout.fileno(), 100)
        running.stdout.close()
        stderr = running.stderr.read()
        return running.wait(timeout=120), stderr


@pytest.mark.parametrize(("args", "first"), [(("checkpoints", "sage"), "line"), (("checkpoints", "sage", "--json"), "bytes")])
def test_a_reader_that_stops_after_the_first_line_ends_the_command_quietly_with_status_0(settings, env, args, first):
    """`persona checkpoints sage | head -1` exited 1 (3 runs in 4), which fails any script
    under `set -o pipefail`. The listing here is larger than a pipe holds, so the command is
    still writing when the reader goes, every time."""
    versions(settings, 700)
    status, stderr = read_then_close(env, *args, first=first)
    assert (status, stderr) == (0, "")


@pytest.mark.parametrize("args", [("--help",), ("checkpoints", "--help"), ("checkpoints", "sage", "--json")])
def test_a_reader_gone_before_the_command_writes_ends_it_quietly_with_status_0(settings, env, args):
    """`persona --help | head -1` exited 1; output left in the buffer at exit (print's, not
    the console's) gave "Exception ignored ... BrokenPipeError" and status 120."""
    versions(settings, 2)
    status, stderr = read_then_close(env, *args, first="nothing")
    assert (status, stderr) == (0, "")


def test_a_failure_still_exits_1_when_its_reader_is_gone(env):
    """A closed pipe hides no failure: the command's own status stands."""
    status, _ = read_then_close(env, "checkpoints", "nobody", "--json", first="nothing")
    assert status == 1


def test_queue_stats_into_a_pipe_shows_each_worker_and_what_it_serves_whole(env, redis_client):
    """Piped, the workers table showed "vm-56a5…" serving "sage@ba…": during a swap no one
    could tell which version a worker served."""
    worker = "vm-56a5c0ffee-0123456789abcdef-gpu0"
    serves = "sage@/srv/checkpoints/sage/v12-a-long-folder-name"
    heartbeat.publish(redis_client, heartbeat.WorkerInfo(id=worker, personas={"sage": serves[5:]}, state="serving"),
                      ttl_s=30)
    shown = persona(env, "queue", "stats")
    assert shown.returncode == 0, shown.stderr
    [row] = [line for line in shown.stdout.splitlines() if worker in line]
    assert serves in row and "…" not in shown.stdout


def test_queue_dead_into_a_pipe_keeps_each_letter_on_one_line(settings, env, redis_client):
    """Piped, the request and reason columns wrapped to a word a line."""
    request = GenerationRequest(persona="sage", messages=[Message(role="user", content="hi")])
    QueueClient(redis_client, settings.queue).submit(request)
    queue = WorkQueue(redis_client, settings.queue)
    [job] = queue.claim("w-crashing", 1, block_ms=0)
    reason = "the worker crashed while decoding this request: CUDA error: an illegal memory access was encountered"
    queue.dead_letter(job, reason, 3, "w-crashing")
    shown = persona(env, "queue", "dead")
    assert shown.returncode == 0, shown.stderr
    [row] = [line for line in shown.stdout.splitlines() if request.id in line]
    assert reason in row and "sage" in row


def test_checkpoints_into_a_pipe_keeps_the_base_and_the_metrics_whole(settings, env):
    versions(settings, 1)
    shown = persona(env, "checkpoints", "sage")
    assert shown.returncode == 0, shown.stderr
    [row] = [line for line in shown.stdout.splitlines() if " v1 " in line]
    assert LONG_BASE in row and "eval_loss=1.25, perplexity=3.49" in row and "…" not in shown.stdout


def test_checkpoints_names_the_field_of_a_checkpoint_json_that_cannot_be_read(settings, env):
    """A checkpoint.json with a wrong value showed pydantic's whole report, its links too."""
    versions(settings, 2)
    damaged = settings.checkpoints_dir / "sage" / "v2" / "checkpoint.json"
    damaged.write_text(damaged.read_text().replace('"lora"', '"qlora"'))
    shown = persona(env, "checkpoints", "sage")
    assert shown.returncode == 0, shown.stderr
    [said] = [line for line in shown.stdout.splitlines() if "v2" in line and "checkpoint.json" in line]
    assert "kind" in said and "'lora' or 'full'" in said and "remove the folder" in said, shown.stdout
    assert "pydantic" not in shown.stdout and "For further information" not in shown.stdout


def test_a_version_folder_without_checkpoint_json_is_listed_as_unusable_and_swap_refuses_it(settings, env):
    """`checkpoints` passed over v5 (no checkpoint.json) in silence, though `swap` took it as a version."""
    versions(settings, 1)
    (settings.checkpoints_dir / "sage" / "v5").mkdir()
    shown = persona(env, "checkpoints", "sage")
    assert shown.returncode == 0, shown.stderr
    [said] = [line for line in shown.stdout.splitlines() if "v5" in line]
    assert "no checkpoint.json" in said, shown.stdout
    listed = json.loads(persona(env, "checkpoints", "sage", "--json").stdout)
    assert [v["version"] for v in listed["versions"]] == ["v1"] and any("v5" in p for p in listed["unreadable"])
    refused = persona(env, "swap", "sage", "v5")
    assert refused.returncode == 1 and "no checkpoint.json" in refused.stderr and "Traceback" not in refused.stderr


@pytest.mark.parametrize("command", [("swap", "sage", "v1"), ("rollback", "sage")])
@pytest.mark.parametrize("timeout", ["inf", "1e300", "nan"])
def test_a_timeout_past_any_sensible_wait_is_refused_with_the_range(env, command, timeout):
    """`--timeout inf` was taken, and failed later with an OverflowError."""
    refused = persona(env, *command, "--timeout", timeout)
    assert refused.returncode == 2 and "--timeout" in refused.stderr and "Traceback" not in refused.stderr
    assert "86400" in " ".join(refused.stderr.replace("│", " ").split()), refused.stderr


def test_a_terminal_that_cannot_show_a_character_gets_a_question_mark_not_a_traceback(env, write_persona):
    """In a latin-1 (or cp1252) terminal, a description holding "—" ended `personas list` and
    `show` in a UnicodeEncodeError traceback, and `validate` ended in rich's own at its "✓"."""
    write_persona("dash", base="smollm2", description="calm — and “quoted”")
    latin = {**env, "PYTHONIOENCODING": "latin-1"}
    for args in (["personas", "list"], ["personas", "show", "dash"], ["personas", "validate", "dash"]):
        shown = subprocess.run([sys.executable, "-m", "persona", *args], env=latin, capture_output=True,
                               check=False, timeout=120)
        assert (shown.returncode, shown.stderr) == (0, b""), (args, shown.stderr.decode("latin-1"))
        said = shown.stdout.decode("latin-1")
        assert "calm ? and ?quoted?" in said or said.startswith("? "), (args, said)


def test_queue_stats_on_a_40_column_terminal_cuts_no_figure_or_id(redis_client):
    """On a 40-column terminal the workers table showed the memory "791" as "7…" and the
    worker's id as "v…"."""
    import io

    from rich.console import Console

    from persona.cli.queue_cmd import render_all
    from persona.monitoring import collect_stats

    worker = "vm-56a5c0ffee-0123-gpu0"
    heartbeat.publish(redis_client, heartbeat.WorkerInfo(id=worker, personas={"sage": "v12", "bofh": "base"},
                                                         state="serving", requests=12345, memory_mb=791.0), ttl_s=30)
    narrow = Console(width=40, file=io.StringIO(), force_terminal=True, color_system=None)
    narrow.print(render_all(collect_stats(redis_client)))
    shown = narrow.file.getvalue()
    assert "…" not in shown and max(map(len, shown.splitlines())) <= 40, shown
    cells = [[cell.strip() for cell in line.split("│")[1:-1]] for line in shown.splitlines() if line.startswith("│")]
    workers = [row for row in cells if len(row) == 9]  # worker, host, device, version, state, personas, ...
    assert ["12345", "791"] in [row[6:8] for row in workers], shown
    assert "".join(row[0] for row in workers) == worker  # folded across lines, every character there
