"""Sending a reply so that one failed request does not lose it.

discord.py tries a request again by itself only after a 500, 502, 504 or 524 (and a reset
connection only by the errno macOS and Windows give it); python-telegram-bot only after flood
control. A 503 from a proxy, or a connection dropped before any answer, lost the whole answer,
and the asker heard nothing. Here each part of a reply is sent, and sent again up to
``DELIVERY_TRIES`` times in all, a short growing pause apart, while its failure says nothing
arrived, or the platform drops a second copy itself (Discord, by the message's nonce):
``Failure.TRY_AGAIN``. A failure after which the part may have arrived (``MAY_HAVE_ARRIVED``:
sent, then no answer in time) is not tried again, as a second copy of an answer confuses more
than a missing one, which /retry brings back; the part counts as sent (the platform had all of
it, so most likely showed it, and the conversation must then read with it), and the log says that
its fate is unknown. The caller learns
whether the whole reply went out, and so whether the conversation may count it as seen.
"""

from __future__ import annotations

import asyncio
import enum
import logging
from collections.abc import Awaitable, Callable, Sequence
from typing import TypeVar

__all__ = ["DELIVERY_TRIES", "Failure", "send_parts"]

log = logging.getLogger(__name__)

DELIVERY_TRIES = 4
FIRST_RETRY_WAIT_S = 0.5  # then 1 and 2 s: 3.5 s of waits in all, for someone who waited for the answer anyway

P = TypeVar("P")


class Failure(enum.Enum):
    """What a failed send means for trying it again."""

    TRY_AGAIN = "nothing arrived"  # or the platform drops a second copy itself
    MAY_HAVE_ARRIVED = "it may have arrived"  # sent, then no answer: a second try could show it twice
    REFUSED = "refused"  # the platform said no (no permission, chat gone): another try gets the same


Classify = Callable[[Exception], Failure | None]  # None: not the platform's failure (a bug): raised


async def send_parts(parts: Sequence[P], send: Callable[[P], Awaitable[None]], classify: Classify, *, to: str) -> bool:
    """Send each part in order, each tried again while ``classify`` says ``TRY_AGAIN``; whether
    every part went out. A part that still fails is logged in one line (which part, to whom
    (``to``), why) and the parts after it are not sent: they would read as the whole answer."""
    for number, part in enumerate(parts, 1):
        failure, error = await _send_one(part, send, classify)
        if failure is None:
            continue
        where = f"part {number} of {len(parts)}" if len(parts) > 1 else "the reply"
        reason = " ".join(str(error).split()) or type(error).__name__
        if failure is Failure.MAY_HAVE_ARRIVED:
            log.warning("no confirmation that %s to %s arrived (%s): it may or may not be shown; not sending it "
                        "again, which could show it twice, and counting it as sent (/retry answers again)", where, to, reason)
            continue
        tries = f" after {DELIVERY_TRIES} tries" if failure is Failure.TRY_AGAIN else ""
        log.warning("could not send %s to %s%s (%s)%s", where, to, tries, reason,
                    "; the parts after it were not sent either" if number < len(parts) else "")
        return False
    return True


async def _send_one(part: P, send: Callable[[P], Awaitable[None]], classify: Classify) -> tuple[Failure | None, Exception | None]:
    """Send one part, trying again while nothing arrived: (None, None) once it went out, else the
    last failure and its error."""
    wait_s, attempt = FIRST_RETRY_WAIT_S, 1
    while True:
        try:
            await send(part)
            return None, None
        except Exception as exc:
            failure = classify(exc)
            if failure is None:
                raise
            if failure is not Failure.TRY_AGAIN or attempt == DELIVERY_TRIES:
                return failure, exc
            log.info("sending failed (%s: %s); trying again in %.1f s", type(exc).__name__, exc, wait_s)
        await asyncio.sleep(wait_s)
        wait_s, attempt = wait_s * 2, attempt + 1
