"""Compiled kernels are kept under the model cache, so a GPU worker's restart reuses them."""

from __future__ import annotations

import os
import subprocess
import sys

from persona.kernel_cache import CACHE_VARIABLES, keep_compiled_kernels


def test_torch_compile_writes_its_cache_beside_the_models(tmp_path):
    """Even after torch.compile has run once and written its own default folder into the
    environment (as on the 2026-11-26 H100: the cache stayed in /tmp/torchinductor_root)."""
    # A process of its own: the setting is read as torch compiles, after import.
    script = (
        "import os, sys, torch; from pathlib import Path; from persona.kernel_cache import keep_compiled_kernels;"
        "torch.compile(lambda x: (x * 3).cos())(torch.ones(4));"
        "assert os.environ['TORCHINDUCTOR_CACHE_DIR'];"  # torch's own default, set by torch
        "keep_compiled_kernels(Path(sys.argv[1])); torch.compile(lambda x: (x * 2).sin())(torch.ones(4))"
    )
    env = {k: v for k, v in os.environ.items() if k not in CACHE_VARIABLES}
    subprocess.run([sys.executable, "-c", script, str(tmp_path)], check=True, env=env, timeout=300)
    assert any((tmp_path / "compiled" / "torchinductor").iterdir())


def test_an_operators_own_cache_folders_stand(tmp_path, monkeypatch):
    monkeypatch.setenv("TRITON_CACHE_DIR", "/srv/triton")
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    assert keep_compiled_kernels(tmp_path) == {
        "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "compiled" / "torchinductor"),
        "TRITON_CACHE_DIR": "/srv/triton",
    }
