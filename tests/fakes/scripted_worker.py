"""A stand-in worker on the real queue that answers with scripted text (for exact assertions).

It claims and delivers through the real ``WorkQueue``; only the text is chosen by the
test instead of a model, so a test can check what a long or particular reply becomes.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator

import redis

from persona.contract import ErrorKind, GenerationReply, GenerationRequest
from persona.queue import WorkQueue
from persona.settings import Settings


@contextlib.contextmanager
def scripted_worker(settings: Settings, script: Callable[[GenerationRequest], str]) -> Iterator[list[GenerationRequest]]:
    """Answer every request with ``script(request)`` until the block ends; yields the requests seen."""
    client = redis.Redis.from_url(settings.redis_url.get_secret_value())
    queue = WorkQueue(client, settings.queue)
    seen: list[GenerationRequest] = []
    stop = threading.Event()

    def loop() -> None:
        while not stop.is_set():
            for job in queue.claim("scripted", 10, block_ms=100):
                seen.append(job.request)
                if queue.is_cancelled([job.request.id]):
                    reply = GenerationReply.failure(job.request.id, ErrorKind.cancelled, "withdrawn")
                else:
                    reply = GenerationReply(id=job.request.id, ok=True, text=script(job.request), persona=job.request.persona)
                queue.deliver([(job, reply)], "scripted")

    thread = threading.Thread(target=loop, daemon=True)
    thread.start()
    try:
        yield seen
    finally:
        stop.set()
        thread.join(timeout=10)
        client.close()
