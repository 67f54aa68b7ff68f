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
    """Point torch.compile's and Triton's caches under ``model_cache``/compiled, unless an
    operator set them (their choice stands); return where each cache is.

    torch.compile writes its own default into the environment the first time it looks
    (a folder under /tmp): that is not an operator's choice, so it is replaced."""
    for variable, folder in CACHE_VARIABLES.items():
        if os.environ.get(variable) in (None, _inductor_default(variable)):
            os.environ[variable] = str(model_cache / "compiled" / folder)
    return {variable: os.environ[variable] for variable in CACHE_VARIABLES}


def _inductor_default(variable: str) -> str | None:
    """The folder torch.compile puts in ``variable`` by itself (None for other variables)."""
    if variable != "TORCHINDUCTOR_CACHE_DIR":
        return None
    try:
        from torch._inductor.runtime.cache_dir_utils import default_cache_dir
    except ImportError:  # another torch: nothing to recognise
        return None
    return os.path.abspath(default_cache_dir())
