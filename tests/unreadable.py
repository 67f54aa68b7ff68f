"""A folder made unreadable for a test, for root too: the tests of what a command says about a
folder of persona files that cannot be read."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

__all__ = ["unreadable"]


@contextlib.contextmanager
def unreadable(folder: Path) -> Iterator[list[str]]:
    """``folder`` made unreadable (chmod 000), and the command prefix under which that stops reading
    it: none for a user other than root; for root, who reads anything (CI runs as root, in a
    container), setpriv without the capabilities that let it. Skips the test where neither works."""
    folder.chmod(0)
    try:
        prefix = ["setpriv", "--inh-caps=-all", "--bounding-set=-dac_override,-dac_read_search"] if os.geteuid() == 0 else []
        if prefix and shutil.which("setpriv") is None:
            pytest.skip("running as root without setpriv: no folder can be made unreadable")
        listing = "import os, sys\ntry: os.listdir(sys.argv[1])\nexcept PermissionError: sys.exit(13)"
        probe = subprocess.run([*prefix, sys.executable, "-c", listing, str(folder)], capture_output=True, check=False)
        if probe.returncode != 13:  # setpriv refused (no CAP_SETPCAP), or the folder is read all the same
            pytest.skip(f"cannot make a folder unreadable here: {probe.stderr.decode(errors='replace')[-200:]}")
        yield prefix
    finally:
        folder.chmod(0o755)
