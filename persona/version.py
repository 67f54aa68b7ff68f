"""Which persona this is: the installed package's version, and the git commit it runs from
when it runs from a checkout (``persona --version``, and each worker's heartbeat, so that
`persona queue stats` shows which workers a rolling upgrade has reached).

The commit is read from the checkout's ``.git`` files (HEAD, then the branch's ref), not by
running git: the worker reports it at every start, and git may not even be installed.
"""

from __future__ import annotations

import functools
import importlib.metadata
import re
from pathlib import Path

__all__ = ["git_commit", "persona_version"]

UNKNOWN = "unknown"
_COMMIT = re.compile(r"[0-9a-f]{40}([0-9a-f]{24})?")  # SHA-1, or SHA-256
SHORT_COMMIT_CHARS = 7  # as `git log --oneline` abbreviates


@functools.cache
def persona_version() -> str:
    """This persona's version: "0.1.0" as installed, "0.1.0+7ac37ab" when it runs from a git
    checkout (that commit); read once per process, so a checkout changed under a running
    worker does not change what the worker says it runs."""
    try:
        release = importlib.metadata.version("persona")
    except importlib.metadata.PackageNotFoundError:  # run from a folder without being installed
        release = UNKNOWN
    commit = git_commit(Path(__file__).resolve().parent.parent)
    return f"{release}+{commit[:SHORT_COMMIT_CHARS]}" if commit else release


def git_commit(root: Path) -> str | None:
    """The commit the git checkout at ``root`` has checked out; None where ``root`` is no
    checkout (an installed package) or its files cannot be read."""
    try:
        git = root / ".git"
        if git.is_file():  # a worktree (or submodule): "gitdir: PATH" names its own folder
            git = root / git.read_text().strip().removeprefix("gitdir:").strip()
        head = (git / "HEAD").read_text().strip()
        if not head.startswith("ref:"):
            return head if _COMMIT.fullmatch(head) else None  # a detached HEAD names the commit
        ref = head.removeprefix("ref:").strip()
        common = git / (git / "commondir").read_text().strip() if (git / "commondir").is_file() else git
        for folder in (git, common):  # a worktree's refs are the main checkout's
            if (folder / ref).is_file():
                found = (folder / ref).read_text().strip()
                return found if _COMMIT.fullmatch(found) else None
        if (common / "packed-refs").is_file():
            for line in (common / "packed-refs").read_text().splitlines():
                found, _, name = line.partition(" ")
                if name == ref and _COMMIT.fullmatch(found):
                    return found
    except (OSError, UnicodeDecodeError):
        return None
    return None  # a branch with no commit yet
