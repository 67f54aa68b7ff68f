"""A lean decode path for Llama-family models: fewer kernels, fewer bytes, less Python.

Hugging Face's modules spend most of a small model's decode step in Python: masks,
cache bookkeeping and seven separate projections per layer. ``LlamaDecoder`` reads the
same weights (so a merged LoRA checkpoint gets the same path) into a few fused
matrices per layer (q/k/v as one, gate/up as one), keeps the KV cache in tensors
allocated once per batch, and on CPU can hold every projection, the output head
included, as int8 (fbgemm's dynamic int8 linear: a quarter of the bytes per weight).

On a GPU every decode step has the same shapes (``static``): it attends over the whole
cache with unwritten slots masked, and is captured as a CUDA graph and replayed, so a
step costs one launch instead of about a thousand. The static cache has a fixed number
of rows ("lanes": 1, 2, 4, 8, then multiples of 8): a row that finishes frees its lane
and a row that joins takes a free one, so rows come and go without new buffers or a new
graph; only outgrowing the lanes or the cache, or half the lanes idling for
``SHRINK_AFTER_STEPS`` steps, lays the cache out again (and captures again). Joining rows'
prompts are read in a few fixed shapes (``prompt_shape``), each read captured as a graph
of its own once per layout, and rows wait up to ``JOIN_EVERY`` steps to join so that
they are read together: a read costs a few steps' time however short its prompts. Its attention
reads each grouped KV head once for all the query heads that share it (no copy that
repeats the keys per query head), and with ``compile`` the step is first compiled by
``torch.compile`` (inductor fuses the small elementwise kernels between the matmuls).
Where Triton runs, ``decode_kernels`` offers the step for a few rows as five Triton
kernels a layer (``kernels``: timed against the torch step, or always), and the static
step's attention as one Triton kernel over the filled slots (``attention="triton"``).

On a CPU (where the engine keeps a cache per batch, not lanes) a prompt longer than
``PROMPT_CHUNK_TOKENS`` is read in chunks of it, and ``start`` and ``join`` take ``stop``,
looked at between two: once it says so (a row's deadline has passed), the read stops and
nothing of its rows is kept. Read whole, an 8,000-token prompt held a CPU worker for
seconds past its caller's deadline; a GPU reads one in tens of ms, so its reads (and
their captured graphs) stay whole.

The decoder's parts: ``fused_weights`` (the fused and int8 projections),
``decode_lanes`` (the static cache's lanes and prompt reads) and ``decode_graphs``
(the captured steps and the choice among them).
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch
import torch.nn.functional as F

from persona.decode_graphs import StepGraphs
from persona.decode_lanes import StaticLanes, _rounded, lane_count
from persona.eager_decoder import PROMPT_CHUNK_TOKENS
from persona.fused_weights import _cat_bias, _fuse, _Layer, _Linear

__all__ = ["LlamaDecoder", "supports", "supports_config"]

log = logging.getLogger(__name__)

FUSABLE_MODEL_TYPES = frozenset({"llama"})
KERNEL_CHOICES = ("never", "auto", "always")
ATTENTION_CHOICES = ("torch", "triton", "auto")
# On a GPU a prompt read costs about as much as a few decode steps however short the
# prompts (it is mostly launches), so rows wait up to this many steps to join a running
# batch and are read together (the engine's ``join_every``).
JOIN_EVERY = 8


def supports(model) -> bool:
    """Whether ``model`` is a Llama-family causal LM this decoder can run."""
    inner = getattr(model, "model", None)
    if not supports_config(getattr(model, "config", None)) or inner is None or not hasattr(model, "lm_head"):
        return False
    return all(hasattr(inner, name) for name in ("embed_tokens", "layers", "norm", "rotary_emb"))


def supports_config(config) -> bool:
    """Whether a model with this config is one this decoder can run (before loading it)."""
    if getattr(config, "model_type", None) not in FUSABLE_MODEL_TYPES:
        return False
    if getattr(config, "hidden_act", "silu") != "silu":
        return False
    # The rotary table is computed once for every position; only RoPE variants whose
    # angles do not depend on the sequence's length can be tabled like that.
    params = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    return params.get("rope_type", "default") not in ("dynamic", "longrope")


class LlamaDecoder(StaticLanes, StepGraphs):
    """Prefill and decode steps over a left-padded batch with a preallocated KV cache."""

    can_join = True  # rows can be added while the batch decodes (``join``)

    def __init__(
        self,
        model,
        *,
        int8: bool = False,
        static: bool = False,
        graphs: bool = False,
        compile: bool = False,
        kernels: str = "never",
        attention: str = "torch",
        join_every: int | None = None,
    ) -> None:
        if kernels not in KERNEL_CHOICES:
            raise ValueError(f"kernels must be one of {', '.join(KERNEL_CHOICES)}, not {kernels!r}")
        if attention not in ATTENTION_CHOICES:
            raise ValueError(f"attention must be one of {', '.join(ATTENTION_CHOICES)}, not {attention!r}")
        config = model.config
        inner = model.model
        self.device = next(model.parameters()).device
        if int8 and self.device.type != "cpu":
            raise ValueError("int8 weights are a CPU path; use full precision on a GPU")
        self.int8 = int8
        self.heads = config.num_attention_heads
        self.kv_heads = getattr(config, "num_key_value_heads", None) or self.heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // self.heads
        self.eps = inner.norm.variance_epsilon
        self.embed = inner.embed_tokens.weight
        self.dtype = self.embed.dtype
        self.layers = []
        for layer in inner.layers:
            attn, mlp = layer.self_attn, layer.mlp
            qkv = (attn.q_proj, attn.k_proj, attn.v_proj)
            self.layers.append(
                _Layer(
                    qkv=_Linear(_fuse(qkv, share=not int8), _cat_bias(*qkv), int8),
                    o=_Linear(attn.o_proj.weight, attn.o_proj.bias, int8),
                    gate_up=_Linear(
                        _fuse((mlp.gate_proj, mlp.up_proj), share=not int8), _cat_bias(mlp.gate_proj, mlp.up_proj), int8
                    ),
                    down=_Linear(mlp.down_proj.weight, mlp.down_proj.bias, int8),
                    norm1=layer.input_layernorm.weight,
                    norm2=layer.post_attention_layernorm.weight,
                )
            )
        self.norm = inner.norm.weight
        self.head = _Linear(model.lm_head.weight, model.lm_head.bias, int8)
        limit = getattr(config, "max_position_embeddings", 8192) or 8192
        positions = torch.arange(limit, device=self.device)[None]
        with torch.inference_mode():
            cos, sin = inner.rotary_emb(self.embed[:1][None], positions)
        self.cos, self.sin = cos[0].to(self.dtype), sin[0].to(self.dtype)
        self.k: list[torch.Tensor] = []
        self.v: list[torch.Tensor] = []
        self.valid = torch.empty(0)
        self.length = 0
        # static: every decode step has the same shapes (the whole cache, masked), so
        # on a GPU it can be captured once per layout as a CUDA graph and replayed.
        self.static = static or graphs
        self.graphs = graphs and self.device.type == "cuda"
        # CPU only (the cache per batch the engine uses there): long prompts are read in
        # chunks, and ``start`` and ``join`` take ``stop`` (see the module's docstring). A
        # GPU's reads are left whole: fast there, and captured as graphs in lanes.
        self.reads_in_chunks = self.device.type == "cpu" and not self.static
        self.at = torch.zeros((), dtype=torch.long, device=self.device)
        # static: rows live in lanes of a cache laid out for more rows than the batch may
        # have (see decode_lanes); the layout's graphs by its number of lanes.
        self.lanes: list[int] = []  # each row's lane, in the batch's order
        self._lane_ids: torch.Tensor | None = None  # the same on the device; None: rows are lanes 0..n-1
        self._spans: dict[int, tuple[int, int]] = {}
        self._feed = (torch.empty(0), torch.empty(0))  # the step's inputs, one per lane
        self._captured: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        # GPU: prompt reads captured for this layout by shape (rows, width), all in the
        # layout's memory pool (set by ``_allocate``; each read's output is copied before the
        # next); None: not capturing.
        self._reads: dict | None = {} if self.graphs else None
        self._read_pool = None
        self.layouts = 0  # how many times a static cache was allocated (each drops its graphs)
        self.reads = 0  # how many times prompts were read into lanes
        self.moves = 0  # how many times rows' slots moved within a layout (``_move``)
        # How many steps rows may wait to join a running batch (the engine groups them).
        self.join_every = join_every or (JOIN_EVERY if self.graphs else 1)
        self._half_idle = 0  # steps in a row with half the lanes idle or more
        self.scale = self.head_dim**-0.5
        # torch.compile of the static step (GPU graphs only), for any batch size and cache
        # length: compiled once for several rows and once for one (torch specialises a
        # size of 1), always off the graph; a step that fails to compile runs uncompiled.
        self.compiled = compile and self.graphs
        self._step_fn = torch.compile(self._static_step) if self.compiled else self._static_step
        # kernels: the static step as Triton kernels (five launches a layer; matrix-vector
        # products up to decode_kernels.MAX_ROWS rows, tiled matrix products past that):
        # "always", or "auto": the first capture of each number of lanes times it against
        # the (compiled) torch step and keeps the faster. Without a GPU only Triton's
        # interpreter runs them (the tests).
        self.kernels = kernels
        self.kernel_step = self._triton("TritonStep") if self.static and kernels != "never" else None
        # attention "triton": the static step's rotary embedding, cache write and attention
        # as one Triton kernel that reads only the filled slots (decode_kernels.Attention);
        # "auto": on a GPU, a second (compiled) torch step with that kernel is timed
        # against the first for each layout of ATTENTION_MIN_LANES lanes or more.
        kernel = self._triton("Attention") if self.static and attention != "torch" else None
        self.attention = kernel if attention == "triton" else None  # what the torch step uses
        self._attention_kernel = kernel
        self._attention_fn = None
        if kernel is not None and attention == "auto" and self.graphs:
            step = self._triton_attention_step
            self._attention_fn = torch.compile(step) if self.compiled else step
        self._choice: dict[int, str] = {}  # lanes -> the step their graphs take
        # lanes -> milliseconds per step of each candidate, as timed by "auto"
        self.step_ms: dict[int, dict[str, float]] = {}

    # -- the batch's cache --------------------------------------------------------

    def start(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor, room: int,
        stop: Callable[[], bool] | None = None,
    ) -> torch.Tensor | None:
        """Run the prompts (left-padded) and return each row's next-token logits, or None
        where ``stop`` stopped the read (``reads_in_chunks``; nothing of the rows is kept)."""
        width = input_ids.shape[1]
        if self.static:
            rows, needed = input_ids.shape[0], _rounded(width + room)
            lanes, capacity = self.valid.shape if self.k else (0, 0)
            # The last batch's buffers (and the graphs captured over them) serve again if
            # the rows would not make them shrink (``_shrink_if_idle``) and the slots suffice
            # without being twice what is needed: each row's lane is written whole, and lanes
            # left idle compute nothing anyone reads.
            if not (lanes // 2 < lane_count(rows) <= lanes and needed <= capacity <= 2 * needed):
                self._allocate(lane_count(rows), needed)
            self.lanes, self._spans, self._half_idle = [], {}, 0
            self._set_length(width)
            return self._read_into_lanes(input_ids, attention_mask, position_ids, room)
        read = self._prefill(input_ids, attention_mask, position_ids, width + room, stop)
        if read is None:
            return None
        logits, self.k, self.v, self.valid = read
        self.length = width
        return logits

    def step(self, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Feed one token per row; return the next-token logits."""
        if self.static:
            self._shrink_if_idle()  # first: a new layout may move every row's slots
        at = self.length
        if at >= self.valid.shape[1]:
            raise RuntimeError("the decode ran past the room reserved at start")
        if self.static:
            self.length = at + 1
            ids = self._lane_ids
            if ids is not None or self.graphs:  # into the lanes; idle ones keep stale inputs
                feed_tokens, feed_positions = self._feed
                if ids is None:
                    tokens, positions = feed_tokens.copy_(tokens), feed_positions.copy_(positions)
                else:
                    tokens = feed_tokens.index_copy_(0, ids, tokens)
                    positions = feed_positions.index_copy_(0, ids, positions)
            logits = self._replay() if self.graphs else self._uncaptured_step(tokens, positions)
            self.at += 1  # outside the graph, so capturing (which runs the step once) changes nothing
            if ids is not None:
                return logits.index_select(0, ids)
            return logits.clone() if self.graphs else logits
        self.valid[:, at] = True
        self.length = at + 1
        mask = self.valid[:, None, None, : at + 1]
        hidden = self._forward(tokens[:, None], positions[:, None], mask, at)
        return self.head(F.rms_norm(hidden[:, -1], (hidden.shape[-1],), self.norm, self.eps))

    def join(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor, room: int,
        stop: Callable[[], bool] | None = None,
    ) -> torch.Tensor | None:
        """Prefill new rows and add them after the running ones; return the new rows' logits,
        or None where ``stop`` stopped the read (none of them is kept; the running rows are
        untouched).

        Every row's cache ends at the same slot (each row's positions are its own, so
        where its keys sit in the cache does not matter): the new rows' keys are placed to
        end where the running rows' do, after moving those right if a new prompt is longer.
        """
        rows, width = input_ids.shape
        if self.static:
            self._make_room(rows, width, room)
            return self._read_into_lanes(input_ids, attention_mask, position_ids, room)
        k, v, valid, length = self.k, self.v, self.valid, self.length
        read = self._prefill(input_ids, attention_mask, position_ids, width + room, stop)
        if read is None:
            return None
        logits, new_k, new_v, new_valid = read
        joined = max(length, width)
        capacity = joined + max(valid.shape[1] - length, room)

        def place(cache: torch.Tensor, filled: int) -> torch.Tensor:
            return F.pad(cache, (0, 0, joined - filled, capacity - joined - (cache.shape[2] - filled)))

        def place_valid(mask: torch.Tensor, filled: int) -> torch.Tensor:
            return F.pad(mask, (joined - filled, capacity - joined - (mask.shape[1] - filled)), value=False)

        self.k = [torch.cat([place(old, length), place(new, width)]) for old, new in zip(k, new_k, strict=True)]
        self.v = [torch.cat([place(old, length), place(new, width)]) for old, new in zip(v, new_v, strict=True)]
        self.valid = torch.cat([place_valid(valid, length), place_valid(new_valid, width)])
        self.length = joined
        return logits

    def select(self, keep: list[int]) -> None:
        """Keep only these rows of the batch (by position; finished rows leave)."""
        if not self.static:
            index = torch.tensor(keep, device=self.device)
            self.k = [k.index_select(0, index) for k in self.k]
            self.v = [v.index_select(0, index) for v in self.v]
            self.valid = self.valid.index_select(0, index)
            return
        lanes = [self.lanes[i] for i in keep]
        for lane in set(self.lanes).difference(lanes):
            del self._spans[lane]
        self.lanes = lanes  # the others' lanes idle until rows join (or the layout shrinks)
        self._lanes_changed()

    def _prefill(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor, capacity: int,
        stop: Callable[[], bool] | None,
    ) -> tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor], torch.Tensor] | None:
        """Read the prompts into a cache of their own with room for ``capacity`` slots;
        return their next-token logits, the cache's keys and values, and its valid slots
        (None where ``stop`` stopped a read in chunks)."""
        mask = attention_mask.bool()
        if self.reads_in_chunks and input_ids.shape[1] > PROMPT_CHUNK_TOKENS:
            read = self._read_in_chunks(input_ids, mask, position_ids, capacity, stop)
            if read is None:
                return None
            logits, k, v = read
        else:
            logits, k, v = self._read_prompts(input_ids, mask, position_ids, capacity)
        return logits, k, v, F.pad(mask, (0, capacity - mask.shape[1]), value=False)

    def _read_in_chunks(
        self, ids: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor, capacity: int,
        stop: Callable[[], bool] | None,
    ) -> tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor]] | None:
        """``_read_prompts`` PROMPT_CHUNK_TOKENS positions at a time (a CPU's reads), each
        chunk attending to the keys written before it; None where ``stop``, asked between
        two chunks, said so (the new keys and values are dropped)."""
        batch, width = ids.shape
        shape = (batch, self.kv_heads, capacity, self.head_dim)
        k = [torch.empty(shape, dtype=self.dtype, device=self.device) for _ in self.layers]
        v = [torch.empty(shape, dtype=self.dtype, device=self.device) for _ in self.layers]
        for begin in range(0, width, PROMPT_CHUNK_TOKENS):
            if begin and stop is not None and stop():
                return None
            end = min(begin + PROMPT_CHUNK_TOKENS, width)
            # The whole read's mask, its rows begin..end: causal over the prompts' tokens,
            # a padding position attending to itself (no empty softmax row).
            query = torch.arange(begin, end, device=self.device)[:, None]
            key = torch.arange(end, device=self.device)[None]
            attend = ((key <= query)[None] & mask[:, None, :end]) | (key == query)[None]
            hidden = self._forward(ids[:, begin:end], positions[:, begin:end], attend[:, None], begin, caches=(k, v))
        return self.head(F.rms_norm(hidden[:, -1], (hidden.shape[-1],), self.norm, self.eps)), k, v

    def _read_prompts(
        self, ids: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor, capacity: int
    ) -> tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor]]:
        """The prompts' pass (``mask``: their tokens, bool) into new keys and values of
        ``capacity`` slots, the first ones written; returns the next-token logits too."""
        batch, width = ids.shape
        shape = (batch, self.kv_heads, capacity, self.head_dim)
        k = [torch.empty(shape, dtype=self.dtype, device=self.device) for _ in self.layers]
        v = [torch.empty(shape, dtype=self.dtype, device=self.device) for _ in self.layers]
        # A padding position attends to itself, so no row of the softmax is empty (NaN).
        causal = torch.ones((width, width), dtype=torch.bool, device=self.device).tril()
        attend = (causal[None] & mask[:, None, :]) | torch.eye(width, dtype=torch.bool, device=self.device)[None]
        hidden = self._forward(ids, positions, attend[:, None], 0, caches=(k, v))
        return self.head(F.rms_norm(hidden[:, -1], (hidden.shape[-1],), self.norm, self.eps)), k, v

    # -- the static step ----------------------------------------------------------

    def _triton(self, name: str):
        """decode_kernels' ``name`` over this decoder, or None where Triton cannot run it."""
        try:
            from persona import decode_kernels
        except ImportError as exc:
            log.info("no Triton (%s); decode steps run as torch ops", exc)
            return None
        try:
            return getattr(decode_kernels, name)(self)
        except ValueError as exc:
            log.info("%s; decode steps run as torch ops", exc)
            return None

    def _uncaptured_step(self, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        step, rows = self.kernel_step, tokens.shape[0]
        if step is not None and (rows <= step.vector_rows or (self.kernels == "always" and step.max_rows is None)):
            return step(tokens, positions)
        return self._static_step(tokens, positions)

    def _static_step(self, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """One decode step whose shapes never change: write at ``self.at``, attend to all."""
        return self._fixed_step(tokens, positions, self.attention)

    def _triton_attention_step(self, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """The static step with its attention as the Triton kernel ("auto" times it)."""
        return self._fixed_step(tokens, positions, self._attention_kernel)

    def _fixed_step(self, tokens: torch.Tensor, positions: torch.Tensor, kernel) -> torch.Tensor:
        self.valid.index_fill_(1, self.at.view(1), True)
        hidden = self._forward(tokens[:, None], positions[:, None], None, None, kernel)
        return self.head(F.rms_norm(hidden[:, -1], (hidden.shape[-1],), self.norm, self.eps))

    @property
    def attention_mode(self) -> str:
        """How static steps attend now: "triton", "auto" (both timed) or "torch"."""
        if self.attention is not None:
            return "triton"
        return "auto" if self._attention_fn is not None else "torch"

    @property
    def reads_captured(self) -> bool:
        """Whether prompt reads replay captured graphs (a GPU's static cache, unless a
        capture failed: then they run uncaptured, and the log says why)."""
        return self._reads is not None

    # -- the model ----------------------------------------------------------------

    def _forward(
        self, ids: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor | None, at: int | None, kernel=None,
        caches: tuple[list[torch.Tensor], list[torch.Tensor]] | None = None,
    ) -> torch.Tensor:  # fmt: skip
        """The layers over ``caches`` (keys, values; the batch's own by default); ``at`` None
        means a static step (one token per row, at ``self.at``), whose attention ``kernel``
        (decode_kernels.Attention) runs if given."""
        keys, values = caches if caches is not None else (self.k, self.v)
        batch, width = ids.shape
        heads, kv_heads, dim = self.heads, self.kv_heads, self.head_dim
        x = F.embedding(ids, self.embed)
        if kernel is None:
            rotary = (self.cos[positions][:, :, None], self.sin[positions][:, :, None])  # (batch, width, 1, dim)
        size = (x.shape[-1],)
        for index, layer in enumerate(self.layers):
            h = F.rms_norm(x, size, layer.norm1, self.eps)
            qkv = layer.qkv(h).view(batch, width, heads + 2 * kv_heads, dim)
            if kernel is not None:
                attended = kernel(qkv.view(batch, -1), positions.view(batch), keys[index], values[index])
            else:
                attended = self._attend(qkv, rotary, mask, at, keys[index], values[index])
            x = x + layer.o(attended.reshape(batch, width, heads * dim))
            h = F.rms_norm(x, size, layer.norm2, self.eps)
            gate, up = layer.gate_up(h).chunk(2, dim=-1)
            x = x + layer.down(F.silu(gate) * up)
        return x

    def _attend(
        self, qkv: torch.Tensor, rotary, mask: torch.Tensor | None, at: int | None, k_cache: torch.Tensor, v_cache: torch.Tensor
    ) -> torch.Tensor:
        """Rotate q and k, write k and v into a layer's cache, attend:
        (batch, width, q/k/v heads, dim) -> (batch, width, heads, dim)."""
        heads, kv_heads, dim = self.heads, self.kv_heads, self.head_dim
        cos, sin = rotary
        qk = qkv[:, :, : heads + kv_heads]
        half = dim // 2
        rotated = torch.cat([-qk[..., half:], qk[..., :half]], dim=-1)
        qk = qk * cos + rotated * sin
        q = qk[:, :, :heads].transpose(1, 2)
        if at is None:
            k_cache.index_copy_(2, self.at.view(1), qk[:, :, heads:].transpose(1, 2))
            v_cache.index_copy_(2, self.at.view(1), qkv[:, :, heads + kv_heads :].transpose(1, 2))
            return self._decode_attention(q, k_cache, v_cache)
        end = at + qkv.shape[1]
        k_cache[:, :, at:end] = qk[:, :, heads:].transpose(1, 2)
        v_cache[:, :, at:end] = qkv[:, :, heads + kv_heads :].transpose(1, 2)
        return F.scaled_dot_product_attention(
            q, k_cache[:, :, :end], v_cache[:, :, :end], attn_mask=mask, enable_gqa=kv_heads != heads
        ).transpose(1, 2)

    def _decode_attention(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor) -> torch.Tensor:
        """One query per row over the whole (masked) cache, each KV head read once for
        the query heads that share it: (batch, heads, 1, dim) -> (batch, 1, heads, dim)."""
        batch = q.shape[0]
        group = self.heads // self.kv_heads
        q = q.reshape(batch, self.kv_heads, group, self.head_dim)
        scores = torch.matmul(q, k_cache.transpose(-1, -2)).float() * self.scale  # (batch, kv, group, slots)
        scores = scores.masked_fill(~self.valid[:, None, None, :], float("-inf"))
        attended = torch.matmul(scores.softmax(dim=-1).to(v_cache.dtype), v_cache)  # (batch, kv, group, dim)
        return attended.reshape(batch, 1, self.heads, self.head_dim)

