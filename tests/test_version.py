"""Which persona runs where: `persona --version`, read from the package and the git checkout,
and each worker's version in its heartbeat, for `queue stats`, its JSON and /metrics to show
which workers a rolling upgrade has reached."""

from __future__ import annotations

import importlib.metadata
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from persona import constants as keys
from persona import heartbeat
from persona.version import git_commit, persona_version

ROOT = Path(__file__).resolve().parent.parent


def git(folder: Path, *args: str) -> str:
    return subprocess.run(["git", "-C", str(folder), *args], capture_output=True, text=True, check=True,
                          env={**os.environ, "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@example.com",
                               "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@example.com"}).stdout.strip()


def test_persona_version_names_the_release_and_the_commit_it_runs_from():
    """`persona --version` said "No such option"."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PERSONA_")}
    told = subprocess.run([sys.executable, "-m", "persona", "--version"], capture_output=True, text=True, env=env,
                          cwd="/", timeout=60, check=False)
    release = importlib.metadata.version("persona")
    assert told.returncode == 0, told.stderr
    if (ROOT / ".git").exists():  # this checkout: its commit, read without running git
        assert told.stdout == f"persona {release}+{git(ROOT, 'rev-parse', '--short=7', 'HEAD')}\n"
    else:
        assert told.stdout == f"persona {release}\n"


@pytest.mark.skipif(subprocess.run(["git", "--version"], capture_output=True, check=False).returncode != 0,
                    reason="needs git")
def test_the_commit_is_read_from_a_branch_packed_refs_a_worktree_and_a_detached_head(tmp_path: Path):
    checkout = tmp_path / "checkout"
    checkout.mkdir()
    git(checkout, "init", "-q", "-b", "main")
    assert git_commit(checkout) is None  # no commit yet
    git(checkout, "commit", "-q", "--allow-empty", "-m", "first")
    first = git(checkout, "rev-parse", "HEAD")
    assert git_commit(checkout) == first
    git(checkout, "commit", "-q", "--allow-empty", "-m", "second")
    git(checkout, "pack-refs", "--all")  # the branch's ref now in packed-refs alone
    second = git(checkout, "rev-parse", "HEAD")
    assert not (checkout / ".git/refs/heads/main").exists() and git_commit(checkout) == second
    git(checkout, "worktree", "add", "-q", "-b", "old", str(tmp_path / "old"), first)  # .git is a file there
    assert git_commit(tmp_path / "old") == first
    git(checkout, "checkout", "-q", "--detach", first)
    assert git_commit(checkout) == first
    assert git_commit(tmp_path) is None  # no checkout: an installed package


def test_each_worker_says_which_persona_it_runs_and_one_too_old_to_say_reads_as_unknown(redis_client, settings,
                                                                                        redis_url):
    """The heartbeat carried no version, so nothing showed which workers an upgrade had reached."""
    from tests.test_monitoring import _queue_stats_command

    redis_client.flushall()
    heartbeat.publish(redis_client, heartbeat.WorkerInfo(id="w-new"), ttl_s=30)
    heartbeat.publish(redis_client, heartbeat.WorkerInfo(id="w-old"), ttl_s=30)
    old_beat = json.loads(redis_client.get(keys.worker_key("w-old")))
    del old_beat["version"]  # as versions before this one wrote it
    redis_client.set(keys.worker_key("w-old"), json.dumps(old_beat))
    starting = heartbeat.StartingWorker(id="w-starting", persona="sage", model="smollm2")
    heartbeat.announce_starting(redis_client, starting, ttl_s=30)
    try:
        shown = _queue_stats_command(settings, redis_url)
        as_json = json.loads(_queue_stats_command(settings, redis_url, "--json").stdout)
    finally:
        heartbeat.withdraw(redis_client, "w-starting")
    assert shown.returncode == 0, shown.stderr
    workers = shown.stdout.split("workers (2 live, 1 starting)")[1]
    header = next([c.strip() for c in line.split("┃")[1:-1]] for line in workers.splitlines() if "┃ worker" in line)
    rows = [[c.strip() for c in line.split("│")[1:-1]] for line in workers.splitlines() if line.startswith("│ w-")]
    version = header.index("version")
    assert {row[0]: row[version] for row in rows} == {"w-new": persona_version(), "w-old": "-",
                                                     "w-starting": persona_version()}
    assert {w["id"]: w["version"] for w in as_json["workers"]} == {"w-new": persona_version(), "w-old": ""}
    assert [w["version"] for w in as_json["starting_workers"]] == [persona_version()]
