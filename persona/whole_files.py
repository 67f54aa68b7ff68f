"""Files written whole or not at all.

A file written in place is emptied first: a full disk, a kill or a power cut then leaves it
empty or cut short, and whatever reads it next (a worker reading a persona file, a listing
reading checkpoint.json, a training run reading its corpus) trips over it. ``write_whole``
writes a hidden file of this process beside it, syncs it to disk, gives it the mode of the
file it replaces (or ``mode``), and moves it over the old one in one rename; on any failure
the old file is left as it was and the hidden one removed.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import TextIO

__all__ = ["write_whole"]


def write_whole(path: Path, content: str | Callable[[TextIO], None], *, mode: int | None = None) -> None:
    """Replace ``path`` with ``content`` (text, or a function that writes it to the file it is
    given) whole or not at all, in UTF-8. ``mode``: the new file's permissions; by default
    those of the file it replaces (who may read it, as when it was written over)."""
    # Hidden: a reader of the folder passes over it, should a kill leave it there. Of this process:
    # no other writes it, and one a killed process left under the same number is written over.
    partial = path.with_name(f".{path.name}.{os.getpid()}.partial")
    try:
        with partial.open("w", encoding="utf-8") as file:
            if callable(content):
                content(file)
            else:
                file.write(content)
            file.flush()
            os.fsync(file.fileno())  # on disk before the name moves: else a power cut may leave it empty
        if mode is not None:
            partial.chmod(mode)
        elif path.exists():
            shutil.copymode(path, partial)
        os.replace(partial, path)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
