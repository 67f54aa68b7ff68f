"""A static KV cache's lanes: rows come and go in the same buffers.

A static cache is laid out for a number of rows ("lanes", ``lane_count``) that can
exceed the batch. A row that leaves frees its lane; a row that joins takes a free
lane. The buffers, and the CUDA graphs captured over them, stay until the batch
outgrows its lanes or its cache, or half its lanes or more idle for
SHRINK_AFTER_STEPS steps (rows that left and others that soon join would otherwise
make it shrink and grow again, capturing each time). Idle lanes
decode stale inputs nobody reads. Each row's ``_spans`` entry (the slot its prompt
starts at, the slot its last token ends at) says what a layout must keep.

Prompts that join are read in a few fixed shapes (``prompt_shape``), so a GPU captures
each shape's read once per layout and replays it.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F

from persona.host_copies import to_device

__all__ = ["StaticLanes", "lane_count", "prompt_shape"]

log = logging.getLogger(__name__)

# A static cache's length is rounded up to this, so batches of similar prompts share
# one shape (and so one captured graph and one compiled step).
STATIC_CAPACITY_STEP = 64
# A static cache has lanes for 1, 2, 4 or 8 rows, then for a multiple of this many.
LANE_STEP = 8
# A static cache with half its lanes idle or more for this many steps in a row is laid
# out for fewer (a new layout costs a graph capture; rows that soon join again would
# make it lay out more lanes again).
SHRINK_AFTER_STEPS = 64
# Prompts are read (prefilled) in a few fixed shapes, so a GPU captures each shape's read
# once per layout (``prompt_shape``); larger reads are read as they are.
PROMPT_MIN_WIDTH = 16
PROMPT_CAPTURED_TOKENS = 8192


def lane_count(rows: int) -> int:
    """How many rows a static cache for ``rows`` rows is laid out for (its lanes)."""
    if rows <= LANE_STEP:
        return 1 << max(rows - 1, 0).bit_length()
    return -(-rows // LANE_STEP) * LANE_STEP


def prompt_shape(rows: int, width: int) -> tuple[int, int] | None:
    """The fixed shape a static cache reads ``rows`` prompts of ``width`` tokens in (a GPU
    captures each shape's read once): rows as lanes are counted, width to a power of two,
    at least PROMPT_MIN_WIDTH. None for reads of more than PROMPT_CAPTURED_TOKENS tokens so
    shaped: those are read as they are (their launches are a small part of their time)."""
    shape = lane_count(rows), max(PROMPT_MIN_WIDTH, 1 << (width - 1).bit_length())
    return shape if shape[0] * shape[1] <= PROMPT_CAPTURED_TOKENS else None


def _rounded(slots: int) -> int:
    return -(-slots // STATIC_CAPACITY_STEP) * STATIC_CAPACITY_STEP


class StaticLanes:
    """``LlamaDecoder``'s static cache: its layout (``_allocate``, ``_relayout``, ``_move``),
    its rows' lanes and slots (``lanes``, ``_spans``), and prompts read into free lanes.

    A mixin: the decoder's ``__init__`` sets the state these methods keep (``k``, ``v``,
    ``valid``, ``at``, ``length``, ``lanes``, ``_spans``, ``_feed``, ``_captured``, ``_reads``,
    ``_read_pool``, ``_half_idle`` and the counters), and ``_read_prompts`` runs the model.
    """

    def _allocate(self, lanes: int, capacity: int) -> None:
        shape = (lanes, self.kv_heads, capacity, self.head_dim)
        self.k = [torch.zeros(shape, dtype=self.dtype, device=self.device) for _ in self.layers]
        self.v = [torch.zeros(shape, dtype=self.dtype, device=self.device) for _ in self.layers]
        self.valid = torch.zeros((lanes, capacity), dtype=torch.bool, device=self.device)
        self._feed = (
            torch.zeros(lanes, dtype=torch.long, device=self.device),
            torch.zeros(lanes, dtype=torch.long, device=self.device),
        )
        self._captured.clear()  # captured graphs point at the old tensors
        if self._reads is not None:
            self._reads.clear()
            # A pool whose graphs are all gone cannot take a new capture (PyTorch's
            # allocator asserts, and the failed capture leaves the RNG mid-capture, which
            # then breaks torch.compile): this layout's reads get a pool of their own.
            self._read_pool = torch.cuda.graph_pool_handle()
        self.layouts += 1

    def _set_length(self, length: int) -> None:
        self.length = length
        self.at.fill_(length)

    def _read_into_lanes(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor, room: int
    ) -> torch.Tensor:
        """Read prompts into free lanes, whole, their slots ending at ``self.length``;
        return their next-token logits.

        The read has a fixed shape (``prompt_shape``: the prompts left-padded to a width
        bucket, the last row repeated to a row bucket), so on a GPU it is captured once per
        shape and layout and replayed: one launch instead of ~25 a layer."""
        rows, width = input_ids.shape
        shape = prompt_shape(rows, width)
        count, wide = shape or (rows, width)
        taken = set(self.lanes)
        lanes = [lane for lane in range(self.valid.shape[0]) if lane not in taken][:rows]
        extra = count - rows
        inputs = [
            F.pad(torch.cat([t, t[-1:].expand(extra, -1)]) if extra else t, (wide - width, 0))
            for t in (input_ids, attention_mask.bool(), position_ids)
        ]
        logits = self._read(*inputs, self._on_device(lanes + [lanes[-1]] * extra), capture=shape is not None)[:rows]
        self.reads += 1
        self.lanes += lanes
        at = self.length
        self._spans.update({lane: (at - width, at + room) for lane in lanes})
        self._lanes_changed()
        return logits

    def _read(
        self, ids: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor, lane_ids: torch.Tensor, capture: bool
    ) -> torch.Tensor:
        """``_read_lanes``, on a GPU (``capture``) as a graph of this shape and layout,
        captured after its first, uncaptured run."""
        key = tuple(ids.shape)
        if not capture or self._reads is None:
            return self._read_lanes(ids, mask, positions, lane_ids)
        captured = self._reads.get(key)
        if captured is None:
            inputs = (ids, mask, positions, lane_ids)
            logits = self._read_lanes(*inputs)
            try:
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=self._read_pool):
                    out = self._read_lanes(*inputs)
                self._reads[key] = (graph, inputs, out)
            except Exception as exc:  # noqa: BLE001 - the uncaptured read serves; stop trying
                log.warning("cannot capture reading prompts (%s: %s); reading them uncaptured", type(exc).__name__, exc)
                self._reads = None
            return logits
        graph, inputs, out = captured
        for buffer, value in zip(inputs, (ids, mask, positions, lane_ids), strict=True):
            buffer.copy_(value)
        graph.replay()
        return out.clone()  # the next read of any shape may reuse the graph's memory

    def _read_lanes(self, ids: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor, lane_ids: torch.Tensor) -> torch.Tensor:
        """Device work only, so it can be captured: prefill the prompts (``mask``: their
        tokens, bool) and write each into its lane (``lane_ids``) of the batch's cache with
        its last token at slot ``self.at`` - 1; the rest of the lane is zeroed."""
        rows, wide = ids.shape
        logits, k, v = self._read_prompts(ids, mask, positions, wide)
        # Slot of each prompt position; padding that would fall before slot 0 goes to the
        # last slot instead, unused until this lane's own decode writes it (masked till then).
        capacity = self.valid.shape[1]
        slots = self.at - wide + torch.arange(wide, device=self.device)
        slots = torch.where(slots < 0, capacity - 1, slots)
        for cache, new in zip((*self.k, *self.v), (*k, *v), strict=True):
            lane = torch.zeros((rows, *cache.shape[1:]), dtype=self.dtype, device=self.device)
            cache.index_copy_(0, lane_ids, lane.index_copy_(2, slots, new))
        valid = torch.zeros((rows, capacity), dtype=torch.bool, device=self.device)
        self.valid.index_copy_(0, lane_ids, valid.index_copy_(1, slots, mask))
        return logits

    def _make_room(self, rows: int, width: int, room: int) -> None:
        """Before ``rows`` rows of ``width`` slots join needing ``room`` more: a free lane for
        each, the running rows' slots moved right if the new prompts are longer than their
        history, and cache slots to the longest reply's end. In place where the lanes and
        slots suffice (dropping the slots before every row's start if need be), else in a
        new layout with more lanes, or twice the slots (fewer layouts, so fewer captures,
        as rows keep joining)."""
        shift = max(0, width - self.length)
        lead = min([self._spans[lane][0] + shift for lane in self.lanes] + [self.length + shift - width])
        needed = max([self._spans[lane][1] + shift for lane in self.lanes] + [self.length + shift + room])
        lanes, capacity = self.valid.shape
        wanted = len(self.lanes) + rows
        if wanted <= lanes and needed <= capacity:
            if shift:
                self._move(shift)
        elif wanted <= lanes and needed - lead <= capacity:
            self._move(shift - lead)
        else:
            if needed - lead > capacity:
                capacity = _rounded(max(needed - lead, capacity * 2))
            self._relayout(max(lanes, lane_count(wanted)), capacity, shift - lead)

    def _move(self, move: int) -> None:
        """Shift every row's slots by ``move`` within the same buffers."""
        self.moves += 1
        first = min(start for start, _ in self._spans.values())
        at = self.length
        for cache in (*self.k, *self.v):
            cache[:, :, first + move : at + move] = cache[:, :, first:at].clone()
        kept = self.valid[:, first:at].clone()
        self.valid.zero_()
        self.valid[:, first + move : at + move] = kept
        self._spans = {lane: (start + move, end + move) for lane, (start, end) in self._spans.items()}
        self._set_length(at + move)

    def _relayout(self, lanes: int, capacity: int, move: int) -> None:
        """New buffers of ``lanes`` lanes and ``capacity`` slots; the rows move into the
        first lanes, in order, their slots shifted by ``move``."""
        first = min(start for start, _ in self._spans.values()) if self._spans else self.length
        at = self.length
        index = self._on_device(self.lanes)
        k, v, valid = self.k, self.v, self.valid
        self._allocate(lanes, capacity)
        rows = len(self.lanes)
        for new, old in zip((*self.k, *self.v), (*k, *v), strict=True):
            new[:rows, :, first + move : at + move] = old[index, :, first:at]
        self.valid[:rows, first + move : at + move] = valid[index, first:at]
        self._spans = {
            lane: (self._spans[old][0] + move, self._spans[old][1] + move) for lane, old in enumerate(self.lanes)
        }
        self.lanes = list(range(rows))
        self._set_length(at + move)
        self._lanes_changed()

    def _shrink_if_idle(self) -> None:
        """Lay the cache out for fewer lanes once half or more have idled long enough."""
        fewer = lane_count(len(self.lanes)) if self.lanes else 1
        if fewer > self.valid.shape[0] // 2:
            self._half_idle = 0
            return
        self._half_idle += 1
        if self._half_idle >= SHRINK_AFTER_STEPS:
            lead = min((start for start, _ in self._spans.values()), default=0)
            self._relayout(fewer, self.valid.shape[1], -lead)
            self._half_idle = 0

    def _lanes_changed(self) -> None:
        """Rows in lanes 0..n-1 of n need no scatter or gather around the step."""
        self._lane_ids = None if self.lanes == list(range(self.valid.shape[0])) else self._on_device(self.lanes)

    def _on_device(self, values: list[int]) -> torch.Tensor:
        """Indices on the decoder's device, without waiting for the work queued before."""
        return to_device(torch.tensor(values, dtype=torch.long), self.device)
