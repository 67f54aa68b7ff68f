"""The scripts in bench/ that a lent GPU runs keep working between GPU sessions.

A GPU machine is lent for minutes at a time; a script that broke since its last run (a
renamed attribute, a moved import) would spend them on a traceback. What can run without
a GPU runs here for real, on small inputs; what cannot at least imports and parses.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).parent.parent / "bench"


def _run(script: str, *args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(BENCH / script), *args], capture_output=True, text=True, timeout=timeout, check=False
    )


def test_the_layout_simulation_reports_layouts_reads_and_moves():
    done = _run("layouts.py", "--requests", "24", "--concurrency", "8", "--longest", "40")
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout.splitlines()[-1])
    assert report["layouts"] == len(report["shapes"]) >= 1
    assert report["reads"] >= 3 and report["moves"] >= 0  # 24 requests, 8 at a time, in groups
    assert report["shapes"][0][0] == 8  # eight lanes for eight rows


@pytest.mark.slow
def test_the_engine_profile_runs_on_a_cpu():
    # One batch size: each costs three runs of the bundled model (half the test's 30 s of CPU
    # was batch 2's), and the script does the same for each it is given.
    done = _run("gpu_profile.py", "--device", "cpu", "--batches", "1", "--tokens", "3")
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout.splitlines()[-1])
    step = report["1"]
    assert step["wall_ms"] > 0 and step["host_ops_ms"] > 0 and step["top_host_ops"]
    assert step["gpu_ms"] == 0 and step["launches"] == 0  # no GPU here
    assert report["device"] == "cpu" and report["warm_up_s"] >= 0


@pytest.mark.parametrize("script", ["gpu_steps.py", "gpu_profile.py", "layouts.py"])
def test_every_gpu_script_imports_and_explains_itself(script):
    done = _run(script, "--help", timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "usage:" in done.stdout


@pytest.mark.parametrize("script", ["gpu_run.sh", "gpu_prepare.sh"])
def test_the_gpu_shell_scripts_parse(script):
    done = subprocess.run(["bash", "-n", str(BENCH / script)], capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr
