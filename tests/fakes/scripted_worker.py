"""A stand-in worker on the real queue that answers with scripted text (for exact assertions).

It claims and delivers through the real ``WorkQueue``; only the text is chosen by the
test instead of a model, so a test can check what a long or particular reply becomes.
Like a real worker it keeps a heartbeat while it runs, so callers see a live worker.
"""

from __future__ import annotations

import contextlib
import threading
import time
import uuid
from collections.abc import Callable, Iterator

import redis

from persona import heartbeat
from persona.contract import ErrorKind, GenerationReply, GenerationRequest
from persona.queue import WorkQueue
from persona.settings import Settings


@contextlib.contextmanager
def scripted_worker(
    settings: Settings, script: Callable[[GenerationRequest], str | tuple[str, str]]
) -> Iterator[list[GenerationRequest]]:
    """Answer every request with ``script(request)`` until the block ends; yields the requests
    seen. The script gives a text, or a text and its finish reason (``"length"``: cut off)."""
    client = redis.Redis.from_url(settings.redis_url.get_secret_value())
    queue = WorkQueue(client, settings.queue)
    seen: list[GenerationRequest] = []
    stop = threading.Event()
    info = heartbeat.WorkerInfo(id=f"scripted-{uuid.uuid4().hex[:8]}", state="serving")
    beat_s = settings.worker.heartbeat_s

    def loop() -> None:
        beaten = time.monotonic()
        while not stop.is_set():
            if time.monotonic() - beaten >= beat_s:
                heartbeat.publish(client, info, settings.worker.heartbeat_ttl_s)
                beaten = time.monotonic()
            for job in queue.claim("scripted", 10, block_ms=100):
                seen.append(job.request)
                if queue.is_cancelled([job.request.id]):
                    reply = GenerationReply.failure(job.request.id, ErrorKind.cancelled, "withdrawn")
                else:
                    said = script(job.request)
                    text, finish = said if isinstance(said, tuple) else (said, "stop")
                    reply = GenerationReply(id=job.request.id, ok=True, text=text, finish_reason=finish,
                                            persona=job.request.persona)
                queue.deliver([(job, reply)], "scripted")

    heartbeat.publish(client, info, settings.worker.heartbeat_ttl_s)
    thread = threading.Thread(target=loop, daemon=True)
    thread.start()
    try:
        yield seen
    finally:
        stop.set()
        thread.join(timeout=10)
        heartbeat.withdraw(client, info.id)
        client.close()
