"""The optional parts of persona and the extras (pyproject.toml's optional-dependencies) that
install them: which extra brings each third-party module they import, and the command that
adds one. The CLI's error for a missing module, `persona up`'s choice of services and
`personas validate`'s word on schedules all go by these.
"""

from __future__ import annotations

import importlib.util

__all__ = ["EXTRA_OF_MODULE", "install_command", "installed"]

# The extra that installs each third-party module the optional parts import;
# tests/test_packaging.py checks each against pyproject.toml.
EXTRA_OF_MODULE = {
    "fastapi": "dashboard", "starlette": "dashboard", "uvicorn": "dashboard", "prometheus_client": "dashboard",
    "discord": "discord", "aiohttp": "discord",  # discord.py's own HTTP client
    "telegram": "telegram",
    "croniter": "posting", "tweepy": "posting", "mastodon": "posting", "atproto": "posting",
    "atproto_client": "posting",
    "pypdf": "train", "yaml": "train", "tqdm": "train",
    "llama_cpp": "fast",
}


def install_command(extra: str) -> str:
    """The command that installs ``extra``."""
    return f"pip install 'persona[{extra}]'"


def installed(module: str) -> bool:
    """Whether ``module`` can be imported (found, not imported: that may take seconds)."""
    try:
        return importlib.util.find_spec(module) is not None
    except ImportError:
        return False
