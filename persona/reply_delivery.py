"""Settled replies, delivered: with the next claim, or by ``flush``.

A reply settled while the worker decodes (``_send``) waits in an outbox and rides with
the next claim, one round trip for both; the claim after confirms it (``_confirm``), and
a reply Redis did not take is kept and sent again (``_unsent``). Their telemetry goes in
the same round trip while work is waiting, or within ``RECORD_EVERY_S`` when idle
(``_to_record``), and each batch's log line (``_answered_line``) is written once its
replies are on their way (``_log_answered``): a caller's answer never waits for counting
or logging.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING

import redis

from persona.contract import GenerationReply
from persona.engine import Completion
from persona.jobs import Job
from persona.telemetry import Tally

if TYPE_CHECKING:
    from persona.model_groups import _Row

__all__ = ["ReplyDelivery"]

# Under the name these lines had before they moved here: the log format shows it.
log = logging.getLogger("persona.worker")

# With work waiting, replies carry their telemetry in the round trip that delivers them;
# an idle worker's (and any a dropped connection lost) goes with a claim this long after
# the last recording: a quarter second late at most, and never in the way of a reply.
RECORD_EVERY_S = 0.25


def _answered_line(rows: Sequence[_Row], completions: Sequence[Completion], seconds: float, batch: int) -> tuple:
    """The log line (format and arguments) of rows answered together, the same from either
    kind of engine: who, which version, how many tokens, how long, in how big a batch.
    One line per batch, not per request: at thousands of replies a second, logging is the cost."""
    return (
        "answered %d request(s) for %s version=%s tokens=%d in %.0f ms (batch of %d)",
        len(rows), ",".join(sorted({row.persona.name for row in rows})),
        ",".join(sorted({row.served.version for row in rows})),
        sum(c.new_tokens for c in completions), seconds * 1000, batch,
    )


class ReplyDelivery:
    """The worker's outbox: settled replies, their telemetry and their log lines, sent.

    A mixin: the worker's ``__init__`` sets what these keep (``_outbox``, ``_sending``,
    ``_unrecorded``, ``_last_record``, ``_answered``), and ``queue`` and ``id``.
    """

    def _send(self, settled: list[tuple[Job, GenerationReply]], batch_size: int = 0) -> None:
        """Settle replies: they are delivered with the next claim, or by ``flush``.

        Their timings follow in the same round trip, right behind them, while work is
        waiting (before an idle wait, within ``RECORD_EVERY_S``), so counting never holds a
        caller's reply back.
        """
        if settled:
            batch_size = batch_size if any(reply.ok for _, reply in settled) else 0
            self._outbox.append((settled, batch_size))
            self._unrecorded.append(([reply for _, reply in settled], batch_size))

    def _confirm(self) -> None:
        """Learn what became of the replies sent with the last claim; keep them if they failed."""
        sending, self._sending = self._sending, []
        try:
            self.queue.confirm()
        except redis.exceptions.RedisError:
            self._outbox[:0] = sending  # their telemetry was sent with them: not counted twice
            raise

    def flush(self) -> None:
        """Deliver the settled replies now, with their telemetry; what Redis cannot take is
        kept and sent again."""
        self._confirm()
        outbox, self._outbox = self._outbox, []
        record = self._to_record(time.monotonic(), due=bool(outbox))
        if outbox or record is not None:
            try:
                self.queue.deliver([pair for group, _ in outbox for pair in group], self.id, record=record)
            except redis.exceptions.RedisError as exc:
                self._unsent(outbox, record, exc)
                raise
        self._log_answered()

    def _log_answered(self) -> None:
        """Write the log lines of the replies just sent (one per batch, not one per request)."""
        lines, self._answered = self._answered, []
        for line in lines:
            log.info(*line)

    def _unsent(self, outbox: list[tuple[list[tuple[Job, GenerationReply]], int]],
                record: list[tuple[list[GenerationReply], int]] | None, exc: Exception) -> None:
        """Keep what a failed exchange was to deliver and record, to send again."""
        self._outbox[:0] = outbox  # sent again: a reply is delivered at most once anyway
        if record and isinstance(exc, (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError)):
            self._unrecorded[:0] = record  # not sent, most likely: counted once Redis is back

    def _to_record(self, now: float, due: bool = False) -> list[tuple[list[GenerationReply], int]] | None:
        """The batches settled and not yet counted, if it is time to record them (``due``:
        with replies on their way, at once)."""
        if not self._unrecorded or not (due or now - self._last_record >= RECORD_EVERY_S):
            return None
        self._last_record = now
        batches, self._unrecorded = self._unrecorded, []
        return batches

    def record_telemetry(self) -> None:
        """Record what was settled and not yet counted, now."""
        batches = self._to_record(time.monotonic(), due=True)
        if batches:
            self.queue.record(Tally.of_batches(batches))
