"""Where a post's candidates come from: the workers, through the queue, at batch priority.

``QueueCandidates`` submits all N requests (seeds ``seed .. seed+N-1``) before waiting
on any, so a worker generates them as one batch; a stop (SIGTERM) ends the wait. Each
text comes back as a ``Draft`` that keeps the reply's finish reason, so curation can
trim one the model was cut off in back to its last finished sentence, or turn it away
(``cut_off``).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Sequence
from typing import Protocol

from persona.contract import (
    GenerationReply,
    GenerationRequest,
    Priority,
    SamplingOverrides,
)
from persona.curation import Draft
from persona.errors import PostingError, ReplyTimeout
from persona.personas import Persona
from persona.queue import QueueClient

__all__ = ["CandidateSource", "QueueCandidates"]

log = logging.getLogger(__name__)

POLL_S = 2.0
WAIT_SLACK_S = 5.0


class CandidateSource(Protocol):
    """Whatever writes the raw candidates for a post (a plain string is a text the model finished)."""

    def __call__(self, persona: Persona, n: int, seed: int) -> Sequence[str | Draft]: ...


class QueueCandidates:
    """Candidates from the workers: N requests at batch priority, seeds ``seed .. seed+N-1``."""

    def __init__(
        self, queue: QueueClient, wait_s: float, source: str = "scheduler", stopping: threading.Event | None = None
    ) -> None:
        self.queue = queue
        self.wait_s = wait_s
        self.source = source
        self.stopping = stopping or threading.Event()
        self.failures = 0
        self.withdrawn = 0  # of the last call's requests, those withdrawn when it was stopped (Ctrl-C)

    def __call__(self, persona: Persona, n: int, seed: int) -> list[Draft]:
        deadline = time.time() + self.wait_s  # the requests' own, which the queue turns into an allowance
        # The wait is timed by the monotonic clock: by the wall clock, one stepped back an hour
        # (NTP, an operator) held the scheduler, and every persona after this one, an hour longer.
        give_up = time.monotonic() + self.wait_s + WAIT_SLACK_S
        requests: list[GenerationRequest] = []
        texts: list[Draft] = []
        self.withdrawn = 0
        try:
            # Submit them all before waiting on any, so a worker generates them as one batch.
            # A full queue may refuse the fifth after taking four: those four are cancelled below.
            for i in range(n):
                # Listed before it is sent: a stop (Ctrl-C) that comes while Redis adds it, before
                # its answer is read, must withdraw it too (it was left queued, and not counted).
                requests.append(GenerationRequest(
                    persona=persona.name, mode="complete", priority=Priority.batch, source=self.source,
                    sampling=SamplingOverrides(seed=seed + i), deadline=deadline,
                ))
                requests[-1] = self.queue.submit(requests[-1])
            for request in requests:
                reply = self._wait(request, give_up)
                if reply.ok:
                    texts.append(Draft(reply.text, reply.finish_reason))
                else:
                    self.failures += 1
                    said = reply.error.message if reply.error else "no reason given"  # its repr is for programmers
                    log.warning("candidate %s for %s failed: %s", request.id, persona.name, said)
        except BaseException:
            for request in requests:  # nobody will read them: spare the workers
                self.queue.cancel(request.id)
            self.withdrawn = len(requests)
            raise
        return texts

    def _wait(self, request: GenerationRequest, give_up: float) -> GenerationReply:
        """The request's reply, waited for until ``give_up`` (``time.monotonic``'s), the queue's
        slack after its deadline included (for the worker's own timeout reply)."""
        # Short waits in a loop, so a stop (SIGTERM) takes effect while a cold worker
        # spends minutes loading its model.
        while True:
            if self.stopping.is_set():
                raise PostingError("stopped while waiting for candidates; the slot stays due")
            remaining = give_up - time.monotonic()
            try:
                return self.queue.wait(request, timeout=max(0.1, min(POLL_S, remaining)))
            except ReplyTimeout:
                if remaining <= POLL_S:
                    raise
