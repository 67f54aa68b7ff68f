"""The project's exceptions, one tree.

    PersonaError                 anything this project raises on purpose
    ├── ConfigError              settings or a persona file are wrong
    │   ├── UnknownPersona       no persona by that name
    │   └── DataDirUnwritable    the data directory cannot be made or written
    ├── ModelError               a model or checkpoint cannot be loaded or used
    │   └── SwapRefused          a checkpoint swap was refused; the old version serves on
    ├── QueueError               talking to the queue failed
    │   ├── RedisUnavailable     no Redis answers at the configured place
    │   ├── QueueBusy            the queue is full; try again shortly
    │   └── ReplyTimeout         no worker answered before the deadline
    ├── InvalidRequest           a request breaks the queue's limits (too long, empty...)
    ├── RequestFailed            a worker answered with an error (carries the reply)
    ├── CorpusError              an author's corpus cannot be read
    ├── UsageError               the command line is wrong (an unknown option, a bad value)
    ├── PlatformUnreachable      a chat platform's API cannot be reached (the network; may mend)
    └── PostingError             a post cannot be made (no candidate passed, a sink failed)
        └── SinkError            a platform refused or could not be reached

Every message says what went wrong and what to do next.
"""

from __future__ import annotations

import difflib
import errno
import os
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from collections.abc import Sequence
    from pathlib import Path

    from persona.contract import GenerationReply, GenerationRequest

__all__ = [
    "ConfigError",
    "CorpusError",
    "DataDirUnwritable",
    "InvalidRequest",
    "ModelError",
    "PersonaError",
    "PlatformUnreachable",
    "PostingError",
    "QueueBusy",
    "QueueError",
    "RedisUnavailable",
    "ReplyTimeout",
    "RequestFailed",
    "SinkError",
    "SwapRefused",
    "UnknownPersona",
    "UsageError",
    "closest",
]


def closest(word: str, known: list[str]) -> str | None:
    """The one of ``known`` that ``word`` is most likely a misspelling of ("sgae", "Sage":
    "sage"), or None if none is close: for an error to ask "did you mean ...?"."""
    found = difflib.get_close_matches(word.lower(), known, n=1)
    return found[0] if found else None


class PersonaError(Exception):
    """Anything this project raises on purpose."""


class ConfigError(PersonaError):
    """Settings or a persona file are wrong."""


class UnknownPersona(ConfigError):
    """No persona by that name."""

    def __init__(self, name: str, known: list[str], *, searched: Sequence[str] = (),
                 unreadable: Sequence[str] = ()) -> None:
        listing = ", ".join(known) if known else "none"
        # Where it looked: with none or few known, the reader could not tell that the folder was wrong.
        where = f" (searched {', '.join(searched)})" if searched else ""
        # Among many personas, the list alone left the reader to spot the typo.
        meant = closest(name, known)
        super().__init__(
            f"unknown persona {name!r}; known personas: {listing}{where}. " + "".join(f"{said}. " for said in unreadable)
            + "See `persona personas list`." + (f" Did you mean {meant!r}?" if meant else "")
        )
        self.name = name
        self.unreadable = list(unreadable)  # what each folder that cannot be read says: it may be there


class DataDirUnwritable(ConfigError):
    """The data directory (embedded Redis, locks, run records) cannot be made or written."""

    def __init__(self, data_dir: Path, exc: OSError) -> None:
        said = exc.strerror or str(exc) or type(exc).__name__
        where = f": {exc.filename}" if exc.filename and str(exc.filename) != str(data_dir) else ""
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):  # another folder on the same disk is full too
            disk = _mount_point(data_dir)
            todo = (f"free some space on that disk{f' (mounted at {disk})' if disk else ''}, or set "
                    "PERSONA_DATA_DIR to a folder on another one")
        elif exc.errno == errno.EFBIG:  # a file larger than this process may write (`ulimit -f`)
            todo = ("raise the limit on the size of files this process may write (`ulimit -f`: it runs "
                    "under a limit), or set PERSONA_DATA_DIR to a file system that allows such files")
        else:
            todo = "set PERSONA_DATA_DIR to a folder you can write"
        super().__init__(f"cannot keep data in {data_dir} ({said}{where}); {todo}")
        self.data_dir = data_dir


def _mount_point(path: Path) -> str | None:
    """Where the file system holding ``path`` (or the nearest folder above it that exists)
    is mounted: which disk to free space on; None if that cannot be told."""
    try:
        found = os.path.realpath(path)
        while not os.path.ismount(found):
            found = os.path.dirname(found)
    except OSError:
        return None
    return found


class ModelError(PersonaError):
    """A model or checkpoint cannot be loaded or used."""


class SwapRefused(ModelError):
    """A checkpoint swap was refused (by a check or a worker); the old version serves on."""


class QueueError(PersonaError):
    """Talking to the queue failed."""


class RedisUnavailable(QueueError):
    """No Redis answers at the configured place."""


class QueueBusy(QueueError):
    """The queue is full; the caller should try again shortly.

    Raised by ``QueueClient.submit_many``, ``queued`` lists the requests it did queue
    (deadlines stamped: wait on these) and ``refused`` those it did not (submit them again).
    """

    def __init__(
        self, message: str, *, queued: list[GenerationRequest] | None = None,
        refused: list[GenerationRequest] | None = None,
    ) -> None:
        super().__init__(message)
        self.queued = list(queued or [])
        self.refused = list(refused or [])


class ReplyTimeout(QueueError):
    """No worker answered before the deadline."""


class InvalidRequest(PersonaError):
    """A request breaks the queue's limits (too long, empty, too many turns)."""


class RequestFailed(PersonaError):
    """A worker answered the request with an error."""

    def __init__(self, reply: GenerationReply) -> None:
        error = reply.error
        super().__init__(f"{error.kind}: {error.message}" if error else "request failed")
        self.reply = reply


class CorpusError(PersonaError):
    """An author's corpus cannot be read."""


class UsageError(PersonaError):
    """The command line is wrong: an unknown option, a value that is not one, an argument missing."""


class PlatformUnreachable(PersonaError):
    """A chat platform's API cannot be reached as an adapter starts: the network, or its
    address setting. Unlike a refused token, it may mend by itself, so `persona up` restarts
    the adapter after a pause."""


class PostingError(PersonaError):
    """A post cannot be made (no candidate passed the filters, a sink failed)."""


class SinkError(PostingError):
    """A platform refused the post or could not be reached."""
