"""Machines whose wall clock is wrong: a ``time`` module to put in a module's place."""

from __future__ import annotations

import time

__all__ = ["SteppedBack"]


class SteppedBack:
    """The ``time`` module on a machine whose wall clock is stepped back ``step_s`` (NTP, an
    operator) once the first reading was taken; its monotonic clock runs on."""

    monotonic, sleep = staticmethod(time.monotonic), staticmethod(time.sleep)

    def __init__(self, step_s: float = 60.0) -> None:
        self.step_s = step_s
        self.readings = 0

    def time(self) -> float:
        self.readings += 1
        return time.time() - (self.step_s if self.readings > 1 else 0.0)
