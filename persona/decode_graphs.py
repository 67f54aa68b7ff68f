"""A static decode step captured as CUDA graphs, and the fastest of the candidate steps.

On a GPU every static decode step has the same shapes, so each layout (a number of
lanes) captures its step once as a CUDA graph and replays it: one launch instead of
about a thousand. The first capture for a number of lanes may capture several candidate
steps (the (compiled) torch step, the Triton kernels, the torch step with Triton
attention), time them, and keep the fastest; a candidate that fails is dropped for good,
and a torch step that cannot compile runs uncompiled.
"""

from __future__ import annotations

import logging

import torch

from persona.decode_lanes import lane_count

__all__ = ["StepGraphs"]

log = logging.getLogger(__name__)

# The steps a captured layout can take (the "auto" choices time them and keep the fastest).
TORCH, KERNELS, TRITON_ATTENTION = "torch", "kernels", "triton_attention"
# "auto" offers the torch step with Triton attention to layouts of this many lanes or more
# (smaller ones have the whole step as Triton kernels), so it is compiled for one class of shapes.
ATTENTION_MIN_LANES = 16


class StepGraphs:
    """``LlamaDecoder``'s captured steps: which step each number of lanes takes, its graph,
    and the fall-backs when Triton, torch.compile or a capture fails.

    A mixin: the decoder's ``__init__`` sets what these read (``_feed``, ``_captured``,
    ``_choice``, ``step_ms``, ``kernels``, ``kernel_step``, ``_attention_fn``, ``compiled``,
    ``_step_fn``), and ``_static_step`` and ``_triton_attention_step`` are the steps.
    """

    @property
    def timed_sizes(self) -> list[int]:
        """Lane counts an engine's warm-up runs a batch of: those whose first capture
        times several steps (for one lane, compiles and tunes the Triton step alone)."""
        if not self.graphs:
            return []
        sizes = set()
        step = self.kernel_step
        if step is not None and self.kernels == "auto":
            # The small layouts, and one of each class of row counts the tiled kernels
            # are tuned for (tuning takes seconds: here, not on a user's time).
            sizes |= {lane_count(rows) for rows in range(1, step.vector_rows + 1)}
            sizes |= {lane_count(rows) for rows in step.rows_classes}
        if self._attention_fn is not None:
            sizes.add(ATTENTION_MIN_LANES)  # compiles the torch step with Triton attention
        return sorted(sizes)

    def _replay(self) -> torch.Tensor:
        """The static step as a CUDA graph over the lanes' inputs (``_feed``), captured on
        first use of this layout; returns the graph's own logits, rewritten by each replay."""
        lanes = self.valid.shape[0]
        if lanes not in self._captured:
            self._captured[lanes] = self._graph_for(*self._feed)
        graph, logits = self._captured[lanes]
        graph.replay()
        return logits

    def _graph_for(self, tokens: torch.Tensor, positions: torch.Tensor) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
        """A graph of the step this many lanes take. The first time, each candidate step is
        captured and timed and the fastest kept; a candidate that fails is dropped for good."""
        batch = tokens.shape[0]
        chosen = self._choice.get(batch)
        if chosen is None and self.kernels == "always" and KERNELS in self._candidates(batch):
            chosen = KERNELS
        if chosen is not None:
            graph = self._graph_of(chosen, tokens, positions)
            if graph is not None:
                self._choice[batch] = chosen
                return graph
        graphs = {}
        for name in self._candidates(batch):
            graph = self._graph_of(name, tokens, positions)
            if graph is not None:
                graphs[name] = graph
        if not graphs:  # the only candidate failed: the torch step serves
            graphs[TORCH] = self._graph_of(TORCH, tokens, positions)
        if len(graphs) == 1:
            name, graph = next(iter(graphs.items()))
            self._choice[batch] = name
            return graph
        timed = {name: _replay_ms(graph[0]) for name, graph in graphs.items()}
        best = min(timed, key=timed.get)
        self._choice[batch] = best
        self.step_ms[batch] = {self._label(name): round(ms, 4) for name, ms in timed.items()}
        log.info(
            "decode step for %d lane(s): %s; using the %s",
            batch, ", ".join(f"{self._label(n)} {ms:.3f} ms" for n, ms in timed.items()), self._label(best),
        )  # fmt: skip
        return graphs[best]

    def _candidates(self, batch: int) -> list[str]:
        step = self.kernel_step
        kernels = step is not None and (step.max_rows is None or batch <= step.max_rows)
        # One lane takes the Triton step alone where it can: it beat the compiled step on
        # every H100 run (0.85-0.93 ms a step against 1.0-1.08), and timing the torch step
        # there would compile it once more (torch specialises a size of 1).
        names = [] if kernels and batch == 1 else [TORCH]
        if kernels:
            names.append(KERNELS)
        if self._attention_fn is not None and batch >= ATTENTION_MIN_LANES:
            names.append(TRITON_ATTENTION)
        return names

    def _label(self, name: str) -> str:
        if name == KERNELS:
            return "kernels"
        step = "compiled" if self.compiled else "eager"
        return f"{step}_triton_attention" if name == TRITON_ATTENTION else step

    def _graph_of(self, name: str, tokens: torch.Tensor, positions: torch.Tensor):
        """The candidate step ``name`` captured; None if it failed (the torch step must not)."""
        if name == TORCH:
            return self._torch_graph(tokens, positions)
        step = self.kernel_step if name == KERNELS else self._attention_fn
        if step is None:
            return None
        try:
            if name == TRITON_ATTENTION:
                self._mark_dynamic(tokens, positions)
            self._off_graph(step, tokens, positions)  # Triton (and inductor) compile here
            return self._capture(step, tokens, positions)
        except Exception as exc:  # noqa: BLE001 - any failure of Triton, compiling or capturing: others serve
            log.warning("the %s step failed (%s: %s); decoding without it", self._label(name), type(exc).__name__, exc)
            if name != KERNELS:
                self._attention_fn = None
            elif tokens.shape[0] > self.kernel_step.vector_rows:
                self.kernel_step.max_rows = self.kernel_step.vector_rows  # the tiled kernels only
            else:
                self.kernel_step = None
            return None

    def _torch_graph(self, tokens: torch.Tensor, positions: torch.Tensor) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
        self._off_graph(self._warm_step, tokens, positions)
        try:
            return self._capture(self._step_fn, tokens, positions)
        except Exception as exc:
            if not self.compiled:
                raise
            self._stop_compiling("cannot capture the compiled step", exc)
            return self._capture(self._step_fn, tokens, positions)

    @staticmethod
    def _off_graph(fn, tokens: torch.Tensor, positions: torch.Tensor) -> None:
        """Run a step once on a side stream before capturing it (compiles, picks kernels)."""
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            fn(tokens, positions)
        torch.cuda.current_stream().wait_stream(side)

    @staticmethod
    def _capture(fn, tokens: torch.Tensor, positions: torch.Tensor) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            logits = fn(tokens, positions)
        return graph, logits

    def _mark_dynamic(self, tokens: torch.Tensor, positions: torch.Tensor) -> None:
        """Before compiling: the batch size and the cache's length vary; the weights' shapes never do."""
        for tensor in (*self.k, *self.v):
            torch._dynamo.maybe_mark_dynamic(tensor, 0)
            torch._dynamo.maybe_mark_dynamic(tensor, 2)
        for tensor in (self.valid, tokens, positions):
            torch._dynamo.maybe_mark_dynamic(tensor, 0)
        torch._dynamo.maybe_mark_dynamic(self.valid, 1)

    def _warm_step(self, tokens: torch.Tensor, positions: torch.Tensor) -> None:
        """The torch step once before capturing it; a step that cannot compile runs uncompiled."""
        if self.compiled:
            self._mark_dynamic(tokens, positions)
        try:
            self._step_fn(tokens, positions)
        except Exception as exc:
            if not self.compiled:
                raise
            self._stop_compiling("torch.compile failed", exc)
            self._static_step(tokens, positions)

    def _stop_compiling(self, what: str, exc: Exception) -> None:
        """From now on every step runs (and is captured) uncompiled."""
        log.warning("%s (%s: %s); decoding with the uncompiled step", what, type(exc).__name__, exc)
        self.compiled = False
        self._step_fn = self._static_step
        if self._attention_fn is not None:
            self._attention_fn = self._triton_attention_step


def _replay_ms(graph: torch.cuda.CUDAGraph, replays: int = 20) -> float:
    """Milliseconds per replay of a captured step (it rewrites the same slot each time)."""
    graph.replay()
    began, ended = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    began.record()
    for _ in range(replays):
        graph.replay()
    ended.record()
    ended.synchronize()
    return began.elapsed_time(ended) / replays
