"""`persona queue watch` into a pipe: a line every interval or so, whatever Redis does."""

from __future__ import annotations

import datetime as dt
import os
import re
import signal
import subprocess
import sys
import threading
import time

import pytest

from persona.embedded_redis import EmbeddedRedis

INTERVAL_S = 1
# Long enough for a reading to meet the connection's read timeout (5 s), and for the line
# after it; the old watch wrote nothing for the first minute of a hang.
HANG_S = 12
FIGURES = "; in flight "


def _stamp(line: str) -> dt.datetime:
    return dt.datetime.strptime(line[:19], "%Y-%m-%d %H:%M:%S")


@pytest.mark.slow
def test_a_hung_embedded_redis_is_said_as_hung_within_seconds_and_the_figures_come_back(tmp_path):
    """A Redis stopped with SIGSTOP (hung, not stopped) held `queue watch --interval 2 > f`
    without a line for 72 s; then the line said Redis "has stopped ... Start `persona up`
    again", with `persona up` running, and gave the time it gave up (71 s late) as the
    time it could not read the queue since."""
    data_dir = tmp_path / "data"
    server = EmbeddedRedis(data_dir)
    server.start()
    env = {k: v for k, v in os.environ.items() if not k.startswith("PERSONA_")} | {"PERSONA_DATA_DIR": str(data_dir)}
    watching = subprocess.Popen([sys.executable, "-m", "persona", "queue", "watch", "--interval", str(INTERVAL_S)],
                                env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(watching.stdout), daemon=True)  # one line as it comes
    reader.start()

    def wait_for_figures(after: int) -> None:
        deadline = time.monotonic() + 60
        while not any(FIGURES in line for line in lines[after:]):
            assert watching.poll() is None and time.monotonic() < deadline, "".join(lines)
            time.sleep(0.1)

    try:
        wait_for_figures(0)
        before = len(lines)
        hung_at = dt.datetime.now()
        os.kill(server.process.pid, signal.SIGSTOP)
        try:
            time.sleep(HANG_S)
            during = lines[before:]
        finally:
            os.kill(server.process.pid, signal.SIGCONT)
        wait_for_figures(len(lines))
    finally:
        watching.terminate()
        watching.wait(timeout=30)
        server.stop()

    said = [line for line in during if "cannot read the queue since" in line]
    assert said, f"no line in {HANG_S} s of a hung Redis:\n{''.join(lines)}"
    for line in said:
        assert "runs but has not answered" in line and "(starting, or stuck)" in line, line
        assert "has stopped" not in line and "persona up" not in line, line
    # Since the first reading that failed began (within an interval of the hang), not since it gave up.
    since = re.search(r"cannot read the queue since (\d\d:\d\d:\d\d)", said[0]).group(1)
    since_at = dt.datetime.combine(_stamp(said[0]).date(), dt.time.fromisoformat(since))
    assert hung_at - dt.timedelta(seconds=1) <= since_at <= hung_at + dt.timedelta(seconds=INTERVAL_S + 1), (since, hung_at)
