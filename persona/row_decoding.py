"""Rows through their model's engine, and the rows that finish answered.

A continuous engine takes rows into its running batch (``_admit``); every turn steps each
engine with rows once (``_decode_step``), and the rows that finished are answered. Rows
whose callers withdrew them, or whose deadline passed, leave their batch at once
(``_drop_withdrawn``); a row whose deadline passes while its long prompt is read is not
read on (each work carries its deadline: ``_deadline``) and comes back finished for it.
An engine that can only run whole batches is given one at a time (``_generate``). A
prompt that cannot be built fails its own row alone (``_prompted``); a row whose prompt
is built carries what the reply tells of it (``_Row.message_chars``).
"""

from __future__ import annotations

import dataclasses
import logging
import time

from persona.contract import ErrorKind, GenerationReply
from persona.engine import Work
from persona.jobs import Job
from persona.model_groups import _Row
from persona.prompting import build_prompts
from persona.reply_delivery import _answered_line

__all__ = ["RowDecoding"]

# Under the name these lines had before they moved here: the log format shows it.
log = logging.getLogger("persona.worker")

# What a row still decoding at its deadline is answered: its caller stops waiting then.
LATE = "the reply was not finished by its deadline; please ask again"


class RowDecoding:
    """The worker's rows in its engines: admitted, stepped, dropped, or generated whole.

    A mixin: the worker's ``__init__`` sets what these keep (``_in_flight``, the rows in
    engines by request id; ``_decoding``, the engines with rows; ``_unrecorded``,
    ``_answered``) and read (``queue``, ``info``, ``_redis_offset``); ``_reply``,
    ``_failed`` and ``_failure`` (``Answering``) word the answers, and ``_send``
    (``ReplyDelivery``) settles them.
    """

    def _works(self, members: list[_Row]) -> tuple[list[_Row], list[Work]]:
        items = [(r.persona, r.job.request, r.persona.sampling.merged(r.job.request.sampling)) for r in members]
        served = members[0].served
        prompts = build_prompts(items, served.loaded, getattr(served.engine, "context_tokens", None))
        rows = [dataclasses.replace(r, message_chars=p.message_chars) for r, p in zip(members, prompts, strict=True)]
        return rows, [
            Work(p.token_ids, sampling, p.stop, deadline=self._deadline(r.job))
            for p, r, (_, _, sampling) in zip(prompts, rows, items, strict=True)
        ]

    def _deadline(self, job: Job) -> float:
        """When a job's caller stops waiting, by this machine's clock (0.0: never), as
        ``Job.expired`` judges it: by Redis's clock where the entry says, less the offset."""
        if job.due is not None:
            return job.due - self._redis_offset
        return job.request.deadline

    def _prompted(self, members: list[_Row]) -> tuple[list[_Row], list[Work]]:
        """The rows whose prompts could be built, and their work; the others are answered
        with why, alone: a chat template that refuses one conversation ("roles must
        alternate", on Llama-2 or Mistral) used to fail every request beside it."""
        try:
            return self._works(members)
        except Exception as exc:
            if len(members) == 1:
                self._send(self._failed(members, exc))
                return [], []
        kept, works = [], []
        for row in members:
            try:
                [prompted], [work] = self._works([row])
            except Exception as exc:
                self._send(self._failed([row], exc))
            else:
                kept.append(prompted)
                works.append(work)
        return kept, works

    def _admit(self, members: list[_Row]) -> None:
        """Hand rows to their model's engine; they join its batch at the next step."""
        engine = members[0].served.engine
        members, works = self._prompted(members)
        if not members:
            return
        for row, work in zip(members, works, strict=True):
            engine.add(work, row)
            self._in_flight[row.job.request.id] = row
        self._decoding[id(engine)] = engine
        self.info.batches += 1

    def _decode_step(self) -> None:
        """One step of every engine with rows; deliver the rows that finished."""
        for key, engine in list(self._decoding.items()):
            batch = engine.active
            try:
                done = engine.step()
            except Exception as exc:  # the one place a decode's failure is caught
                done, settled = [], self._failed(engine.abandon(), exc)
            else:
                settled = [(row.job, self._reply(row, completion, batch)) for row, completion in done]
                if late := sum(1 for _, completion in done if completion.finish_reason == "deadline"):
                    log.warning("stopped reading the prompts of %d request(s) at their deadline", late)
                    done = [(row, completion) for row, completion in done if completion.finish_reason != "deadline"]
                if not done:  # a step is one batch generated together, whether or not a row ended in it
                    self._unrecorded.append(([], batch))
            for job, _ in settled:
                self._in_flight.pop(job.request.id, None)
            if done:
                rows, completions = zip(*done, strict=True)
                self._answered.append(_answered_line(rows, completions, max(c.seconds for c in completions), batch))
            if not engine.active:
                del self._decoding[key]
            self.info.requests += sum(1 for _, reply in settled if reply.ok)
            self._send(settled, batch_size=batch)

    def _drop_withdrawn(self) -> None:
        """Rows whose callers withdrew them, or whose deadline passed (their callers stop
        waiting then), leave their batch now and are answered so."""
        withdrawn = self.queue.is_cancelled(list(self._in_flight))
        now = time.time() + self._redis_offset
        late = {i for i, row in self._in_flight.items() if i not in withdrawn and row.job.expired(now)}
        if not withdrawn and not late:
            return
        rows = [self._in_flight.pop(request_id) for request_id in [*withdrawn, *late]]
        dropped = {id(row) for row in rows}
        for key, engine in list(self._decoding.items()):
            engine.remove(lambda tag: id(tag) in dropped)
            if not engine.active:
                del self._decoding[key]
        if withdrawn:
            log.info("stopped %d withdrawn request(s) mid-generation", len(withdrawn))
        if late:
            log.warning("stopped %d request(s) mid-generation at their deadline", len(late))
        self._send(
            [(r.job, self._failure(r.job, ErrorKind.cancelled, "the request was withdrawn")) for r in rows[: len(withdrawn)]]
            + [(r.job, self._failure(r.job, ErrorKind.timeout, LATE)) for r in rows[len(withdrawn) :]]
        )

    def _generate(self, members: list[_Row]) -> list[tuple[Job, GenerationReply]]:
        """One whole batch through an engine that cannot take rows while decoding."""
        started = time.perf_counter()
        members, works = self._prompted(members)
        if not members:
            return []
        try:
            completions = members[0].served.engine.generate(works)
        except Exception as exc:
            return self._failed(members, exc)
        elapsed = time.perf_counter() - started
        self.info.batches += 1
        self.info.requests += len(members)
        self._answered.append(_answered_line(members, completions, elapsed, len(members)))
        return [
            (row.job, self._reply(row, c, len(members), c.seconds or elapsed))
            for row, c in zip(members, completions, strict=True)
        ]
