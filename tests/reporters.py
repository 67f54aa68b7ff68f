"""A training reporter for the tests: it remembers what it was told, and presses Ctrl-C
where asked, as a person at the terminal would."""

from __future__ import annotations

import os
import signal


def press_ctrl_c() -> None:
    """What the terminal does on Ctrl-C: SIGINT to the process, wherever it is."""
    os.kill(os.getpid(), signal.SIGINT)


class Recorder:
    """A reporter that remembers what it was told, and can press Ctrl-C after a step."""

    def __init__(self, stop_at: int | None = None) -> None:
        self.losses: list[float] = []
        self.evals: list[tuple[int, float, bool]] = []
        self.samples: list[str] = []
        self.stop_at = stop_at

    def on_start(self, total_steps: int, resumed_from: int) -> None:
        self.total = total_steps
        self.resumed_from = resumed_from

    def on_step(self, step: int, loss: float, average: float, elapsed_s: float) -> None:
        self.losses.append(loss)
        if step == self.stop_at:
            press_ctrl_c()

    def on_eval(self, step: int, val_loss: float, improved: bool) -> None:
        self.evals.append((step, val_loss, improved))

    def on_samples(self, step: int, texts: list[str]) -> None:
        self.samples.extend(texts)

    def on_full_eval(self, best_step: int, documents: int) -> None:
        self.full_eval = (best_step, documents)
