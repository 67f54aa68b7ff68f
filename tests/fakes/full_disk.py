"""A disk with no room for large files, made with the process's limit on a file's size."""

from __future__ import annotations

import resource
from collections.abc import Iterator
from contextlib import contextmanager


@contextmanager
def disk_refusing_files_over(size_bytes: int) -> Iterator[None]:
    """A disk with no room for a file over ``size_bytes``: the system refuses the write
    (EFBIG, as a full disk refuses with ENOSPC)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (size_bytes, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
