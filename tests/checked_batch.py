"""A static decoder driven like the engine drives it, every row checked against Hugging Face."""

from __future__ import annotations

import torch

from persona.llama_decoder import LlamaDecoder


class CheckedBatch:
    """Drives a static decoder like the engine does (rows by position, each with its own
    history and positions) and checks every row's logits against Hugging Face's for that
    row's history alone."""

    def __init__(self, model, atol: float = 1e-4, **options) -> None:
        self.model = model
        self.atol = atol
        self.device = next(model.parameters()).device
        self.decoder = LlamaDecoder(model, static=True, **options)
        self.rows: list[list[int]] = []
        self.room: list[int] = []  # the steps each row may still take (as the engine stops it)
        self.fed = 0

    def start(self, prompts: list[list[int]], room: int) -> None:
        self.rows, self.room = [], []
        self.join(prompts, room, start=True)

    def join(self, prompts: list[list[int]], room: int, start: bool = False) -> None:
        """``room``: the slots the longest reply may need, as the engine reserves them."""
        logits = (self.decoder.start if start else self.decoder.join)(*self._left_padded(prompts), room)
        self.room += [room - 1] * len(prompts)
        self._check(logits, prompts)

    def leave(self, *positions: int) -> None:
        keep = [i for i in range(len(self.rows)) if i not in positions]
        self.decoder.select(keep)
        self.rows = [self.rows[i] for i in keep]
        self.room = [self.room[i] for i in keep]

    def step(self, times: int = 1) -> None:
        for _ in range(times):
            assert min(self.room) > 0, "a row would decode past the room reserved for it"
            self.room = [left - 1 for left in self.room]
            tokens = [(len(row) * 7 + i * 13 + self.fed) % 200 + 3 for i, row in enumerate(self.rows)]
            self.fed += 1
            positions = [len(row) for row in self.rows]
            logits = self.decoder.step(self._tensor(tokens), self._tensor(positions))
            for row, token in zip(self.rows, tokens, strict=True):
                row.append(token)
            self._check(logits, [])

    def buffers(self) -> tuple[int, int]:
        """Which tensors the cache is (a captured graph reads these very ones)."""
        return self.decoder.k[0].data_ptr(), self.decoder.valid.data_ptr()

    def _tensor(self, values) -> torch.Tensor:
        return torch.tensor(values, device=self.device)

    def _left_padded(self, prompts: list[list[int]]):
        return left_padded(prompts, self.device)

    def _check(self, logits: torch.Tensor, new: list[list[int]]) -> None:
        self.rows += [list(p) for p in new]
        checked = self.rows[-len(new) :] if new else self.rows
        assert logits.shape[0] == len(checked)
        with torch.inference_mode():
            for i, row in enumerate(checked):
                theirs = self.model(input_ids=self._tensor([row]), logits_to_keep=1).logits[0, -1]
                assert torch.allclose(logits[i], theirs, atol=self.atol), (i, row, (logits[i] - theirs).abs().max())


def left_padded(prompts: list[list[int]], device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Prompts as a decoder takes them: ids left-padded with 0, the mask, the positions."""
    width = max(len(p) for p in prompts)
    ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts], device=device)
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=device)
    return ids, mask, (mask.cumsum(-1) - 1).clamp(min=0)


def prompt(seed: int, length: int) -> list[int]:
    """A made-up prompt of ``length`` tokens (ids 3-252)."""
    return [(seed * 31 + i * 17) % 250 + 3 for i in range(length)]
