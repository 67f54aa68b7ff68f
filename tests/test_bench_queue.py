"""`persona bench queue` drains real requests through a real worker and a plain loop."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from persona.bench_queue import InstantEngine
from persona.engine import Work
from persona.personas import Sampling


def test_instant_engine_answers_every_row_at_once():
    rows = [Work([1, 2], Sampling()), Work([3], Sampling())]
    completions = InstantEngine(loaded=None).generate(rows)
    assert [c.text for c in completions] == ["ok", "ok"]


def test_bench_queue_prints_ours_and_the_baseline_as_json(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("PERSONA_")}
    env["PERSONA_DATA_DIR"] = str(tmp_path / "data")
    result = subprocess.run(
        [sys.executable, "-m", "persona", "bench", "queue", "--jobs", "300", "--seconds", "0.2", "--batch", "32", "--json"],
        env=env, capture_output=True, text=True, timeout=240,
    )
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout.strip().splitlines()[-1])
    for key in ("jobs_per_s", "p50_ms", "p99_ms", "baseline_jobs_per_s", "baseline_p50_ms", "ratio"):
        assert data[key] > 0, key
    assert data["p99_ms"] >= data["p50_ms"]
    assert data["transport"] == "unix socket"  # as `persona up` reaches its embedded Redis
