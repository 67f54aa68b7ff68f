"""How a training run stops: between whole steps, saved, whatever asks it to.

Ctrl-C, SIGTERM and SIGHUP (a closed terminal) only ask (``stop_between_steps``), so the
state saved is always that of a whole step; a second Ctrl-C or SIGTERM stops the run at
once, keeping its last save. Output that fails (a closed terminal's EIO, a reader gone)
asks the same (``Reporting``), instead of ending the run unsaved.
"""

from __future__ import annotations

import logging
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

from training.run_state import SavedState

if TYPE_CHECKING:
    from training.trainer import Reporter

__all__ = ["Reporting", "StopRequest", "stop_between_steps"]

log = logging.getLogger(__name__)


class StopRequest:
    """Whether the run was asked to stop (a signal, or its output lost); checked between whole steps."""

    def __init__(self, saved: SavedState) -> None:
        self.requested = False
        self.saved = saved  # what a stop at once keeps
        # The first stop signal that came (None: none did), which the command's exit status says,
        # as `persona ask`'s does: 143 for SIGTERM, 129 for SIGHUP, 130 for Ctrl-C.
        self.signum: int | None = None

    def ask(self, why: str, again: str | None, signum: int | None = None) -> None:
        """Stop after the step in hand and save; ``again``: what stops the run at once instead;
        ``signum``: the signal that asks, if one does."""
        if self.signum is None:
            self.signum = signum
        if self.requested and again is None:  # a closed terminal may send SIGHUP twice (the shell's, the kernel's)
            return
        self.requested = True
        if again is None:
            log.warning("%s: stopping after this step and saving; continue the run with --resume", why)
            return
        kept = (f"keeping the state saved at step {self.saved.step}" if self.saved.step is not None
                else "before the run has saved anything")
        log.warning("%sstopping after this step and saving (%s again to stop at once, %s)", why, again, kept)


# The signals that stop a run after its step, and what a second one of each does. The first
# Ctrl-C; SIGTERM (`kill`, systemd, `docker stop`), which killed the run mid-step without a word,
# its lock file left behind; SIGHUP (a closed terminal, an ssh session dropped), which killed it
# as silently, losing everything since its last save. A second Ctrl-C or SIGTERM ends the run at
# once; SIGHUP comes without a hand on a key, so it only ever asks.
_STOP_SIGNALS = {signal.SIGINT: ("", "Ctrl-C"), signal.SIGTERM: ("SIGTERM: ", "SIGTERM"),
                 signal.SIGHUP: ("the terminal closed (SIGHUP)", None)}


@contextmanager
def stop_between_steps(saved: SavedState) -> Iterator[StopRequest]:
    """While training, the signals in ``_STOP_SIGNALS`` only ask the run to stop after its step.

    A KeyboardInterrupt raised wherever the signal lands (mid-forward, or between the
    optimiser step and the step count) would save a state no uninterrupted run ever had.
    Signal handlers can only be set from the main thread; elsewhere, or where a signal is
    ignored (Ctrl-C in a background job, SIGHUP under nohup), nothing changes for it.
    """
    stop = StopRequest(saved)
    if threading.current_thread() is not threading.main_thread():
        yield stop
        return
    previous = {signum: signal.getsignal(signum) for signum in _STOP_SIGNALS}
    previous = {signum: handler for signum, handler in previous.items() if handler is not signal.SIG_IGN}
    for signum, handler in previous.items():
        if handler is None:  # a handler not set from Python; the interpreter's own stands in
            previous[signum] = signal.default_int_handler if signum == signal.SIGINT else signal.SIG_DFL

    def ask_to_stop(signum: int, frame: Any) -> None:
        why, again = _STOP_SIGNALS[signal.Signals(signum)]
        if again is not None:
            signal.signal(signum, previous[signum])
        stop.ask(why, again, signum)

    for signum in previous:
        signal.signal(signum, ask_to_stop)
    try:
        yield stop
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


class Reporting:
    """The reporter, whose failing output stops the run after its step, saved, instead of
    ending it there: a closed terminal fails every write (EIO), a reader gone (``| tee`` killed)
    too (EPIPE); the first evaluation printed after SIGHUP raised, losing the work since the
    last save. Methods a reporter does not have (added to ``Reporter`` since) are skipped."""

    def __init__(self, reporter: Reporter, stop: StopRequest) -> None:
        self.reporter, self.stop, self.lost = reporter, stop, False

    def __call__(self, method: str, *args: Any) -> None:
        call = getattr(self.reporter, method, None)
        if self.lost or call is None:
            return
        try:
            call(*args)
        except OSError as exc:
            self.lost = True
            self.stop.ask(f"the run's output failed ({exc.strerror or exc})", None)
