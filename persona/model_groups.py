"""Runnable jobs grouped by the weights that answer them.

Each job becomes a row (``_Row``: the job, its persona, and what serves it); the rows of
one set of weights go to its engine together, ``max_batch`` at a time (``_groups``). A
persona file is read at most once a second (``_persona``; one caught part-way through a
save serves its last good read meanwhile), and a persona whose model
cannot be served here answers its jobs with why (``_serve``, ``_cannot_serve``: for a
version an operator swapped to, what to do about it).
"""

from __future__ import annotations

import logging
import time
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass

from persona.contract import ErrorKind, GenerationReply
from persona.errors import ConfigError, ModelError, PersonaError
from persona.jobs import Job
from persona.personas import Persona
from persona.pool import Served

__all__ = ["ModelGroups"]

# Under the name these lines had before they moved here: the log format shows it.
log = logging.getLogger("persona.worker")

# A persona file is re-read at most this often: edits apply within a second, and a
# round of one request does not pay for reading and validating TOML.
PERSONA_REFRESH_S = 1.0


@dataclass(frozen=True)
class _Row:
    """What the worker keeps about a row an engine is decoding, to answer it."""

    job: Job
    persona: Persona
    served: Served
    # Once its prompt is built: how many characters of its newest message the prompt kept
    # where it had to cut it (None: all of them); its reply says so, and the bot's note is true.
    message_chars: int | None = None


class ModelGroups:
    """Jobs turned into rows and grouped per model, or answered with why they cannot be.

    A mixin: the worker's ``__init__`` sets what these read (``settings``, ``registry``,
    ``pool``, ``swaps``, ``info``, ``id``, and ``_personas``, the personas last read), and
    ``_failure`` (``Answering``) words a refusal.
    """

    def _groups(self, runnable: list[Job]) -> Iterator[list[_Row] | list[tuple[Job, GenerationReply]]]:
        """Runnable jobs grouped per set of weights (as rows), or settled with why not."""
        by_model: dict[tuple, list[_Row]] = defaultdict(list)
        # Each persona is read (and its model found) once per round, not once per job;
        # an edited persona file still takes effect on the next round.
        found: dict[str, tuple[Persona, Served] | tuple[ErrorKind, str]] = {}
        for job in runnable:
            name = job.request.persona
            if name not in found:
                found[name] = self._serve(name)
            persona, served = found[name]
            if isinstance(persona, ErrorKind):
                yield [(job, self._failure(job, persona, served))]
                continue
            self.info.personas[persona.name] = served.version
            by_model[served.key].append(_Row(job, persona, served))
        size = self.settings.worker.max_batch
        for members in by_model.values():
            for start in range(0, len(members), size):
                yield members[start : start + size]

    def _serve(self, name: str) -> tuple[Persona, Served] | tuple[ErrorKind, str]:
        """A persona and what answers for it, or why it cannot answer."""
        try:
            persona = self._persona(name)
            return persona, self.pool.serve(persona, self.swaps.version_for(persona.name))
        except ConfigError as exc:
            return ErrorKind.invalid, str(exc)
        except ModelError as exc:
            return ErrorKind.model, self._cannot_serve(name, exc)
        except Exception as exc:  # out of memory, a bug in an engine: this persona fails, others go on
            log.exception("cannot serve persona %s", name)
            return ErrorKind.model, f"cannot load the model: {type(exc).__name__}: {exc}"

    def _cannot_serve(self, name: str, exc: PersonaError) -> str:
        """Why a persona's model cannot load here, and, for a version an operator swapped
        to, what to do: the fleet agreed on it, but this worker (started since, or on a
        machine whose copy differs) cannot load it, and it answered every request for the
        persona with the load error alone, naming neither the swap nor the worker."""
        version = self.swaps.version_for(name)
        if version is None or not isinstance(exc, ModelError):  # a persona file's error is the file's
            return str(exc)
        return (
            f"{exc}; {name!r} was swapped to {version}, which worker {self.id} cannot load: fix that checkpoint "
            f"on its machine, or move every worker off it with `persona rollback {name}` or `persona swap {name} VERSION`"
        )

    def _persona(self, name: str) -> Persona:
        """The persona as its file last read, read again at most once a second (``_personas``
        keeps each with when to read it again). A file caught part-way through a save serves
        its last good read (``PersonaRegistry._steady``); it is then read again when the newer
        read would be taken, not a second later, so an edit still applies within a second."""
        now = time.monotonic()
        cached = self._personas.get(name)
        if cached is not None and now < cached[0]:
            return cached[1]
        persona = self.registry.get(name)
        held_s = self.registry.held_back_s(name)
        self._personas[name] = (now + min(PERSONA_REFRESH_S, PERSONA_REFRESH_S if held_s is None else held_s), persona)
        return persona
