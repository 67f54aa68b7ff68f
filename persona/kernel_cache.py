"""Compiled GPU kernels kept beside the models, so a restarted worker skips compiling them.

torch.compile (inductor) and Triton keep what they compile in folders under /tmp and the
home folder, which a container loses when it is created again. A GPU worker's first
start compiles for minutes (one H100, 2026-11-26: 165 s of warm-up, most of it compiling
and tuning); with both caches under the model cache (a volume in docker-compose) a
restart reads them back instead.
"""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["CACHE_VARIABLES", "keep_compiled_kernels"]

# Each cache's setting (read when something is first compiled) and its folder.
CACHE_VARIABLES = {"TORCHINDUCTOR_CACHE_DIR": "torchinductor", "TRITON_CACHE_DIR": "triton"}


def keep_compiled_kernels(model_cache: Path) -> dict[str, str]:
    """Point torch.compile's and Triton's caches under ``model_cache``/compiled, unless
    already set (the operator's choice stands); return where each cache is."""
    for variable, folder in CACHE_VARIABLES.items():
        os.environ.setdefault(variable, str(model_cache / "compiled" / folder))
    return {variable: os.environ[variable] for variable in CACHE_VARIABLES}
