"""A decode step in five Triton kernels per layer.

At batch 1 a GPU decode step is a chain of tiny kernels, each costing a few
microseconds however little it does, while the bundled model's weights (0.27 GB)
would stream in about 0.1 ms. Even compiled by inductor and replayed as a CUDA graph
the step is ~13 kernels a layer. Here each layer is five launches:

1. RMS norm and the fused q/k/v projection;
2. the rotary embedding, the new key and value written to the cache, and attention
   over the filled part of the cache, each grouped KV head read once for the query
   heads that share it (one program per row and KV head, an online softmax; over a
   long cache a few rows' slots are split among programs and merged by a sixth kernel);
3. the o projection added to the residual stream;
4. RMS norm, the fused gate/up projection and SiLU(gate)·up;
5. the down projection added to the residual stream.

``Attention`` (kernel 2 alone) also serves inside the compiled torch step.

The projections read the weights as the model holds them, so a checkpoint needs no
conversion. Up to ``MAX_ROWS`` rows they are matrix-vector products (one program per
block of output rows and per batch row); past that, matrix products over tiles of rows
(tensor cores on a GPU). Everything accumulates in float32. The step reads the write
position from a device tensor, so it can be captured as a CUDA graph and replayed like
the compiled one; on a GPU the decoder times it against the compiled step for each
layout and keeps the faster.

On a CPU the kernels run under Triton's interpreter (``TRITON_INTERPRET=1``, set before
Triton is imported), which is how the tests check them without a GPU; the interpreter
has no bfloat16, so those checks run in float32.
"""

from __future__ import annotations

import inspect
import os

import torch
import triton
import triton.language as tl

__all__ = ["MAX_ROWS", "ROWS_CLASSES", "Attention", "TritonStep", "rows_class", "splits_for", "unsupported"]

# The matrix-vector kernels re-read each weight tile once per row (from L2 after the
# first); past a few rows the projections are tiled matrix products instead.
MAX_ROWS = 8

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"

# Cache slots per attention loop; each row and KV head's slots are split among several
# programs (merged by a second kernel) when the cache is longer than SLOTS_PER_SPLIT and
# the batch alone would run fewer than ATTENTION_PROGRAMS programs.
BLOCK_SLOTS = 64
SLOTS_PER_SPLIT = 256
ATTENTION_PROGRAMS = 128

# (rows of the output per program, columns of the weight per loop, warps); on a GPU the
# fastest for each projection's shape is picked the first time it runs (off the graph).
_TILES = [(16, 128, 4), (8, 256, 4), (4, 256, 4), (32, 64, 4)]


@triton.jit
def _project(
    x_ptr, w_ptr, out_ptr, norm_ptr, res_ptr,
    N, K, eps,
    x_stride, w_stride, out_stride,
    NORM: tl.constexpr, GATED: tl.constexpr, RESIDUAL: tl.constexpr, K_ROW: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    """out[row, n] = (res[row, n] +) sum_k norm(x)[row, k] W[n, k]; GATED: silu(gate)·up,
    the up rows following the N gate rows in W."""
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row = tl.program_id(1)
    col_ok = cols < N
    x_row = x_ptr + row * x_stride
    if NORM:
        whole = tl.arange(0, K_ROW)
        row_x = tl.load(x_row + whole, mask=whole < K, other=0.0).to(tl.float32)
        rstd = tl.rsqrt(tl.sum(row_x * row_x, 0) / K + eps)
    acc = tl.zeros([BLOCK_N], dtype=tl.float32)
    up = tl.zeros([BLOCK_N], dtype=tl.float32)
    for start in range(0, K, BLOCK_K):
        ks = start + tl.arange(0, BLOCK_K)
        k_ok = ks < K
        xs = tl.load(x_row + ks, mask=k_ok, other=0.0).to(tl.float32)
        if NORM:
            xs = xs * rstd * tl.load(norm_ptr + ks, mask=k_ok, other=0.0).to(tl.float32)
        tile = col_ok[:, None] & k_ok[None, :]
        w = tl.load(w_ptr + cols[:, None] * w_stride + ks[None, :], mask=tile, other=0.0)
        acc += tl.sum(w.to(tl.float32) * xs[None, :], 1)
        if GATED:
            wu = tl.load(w_ptr + (cols + N)[:, None] * w_stride + ks[None, :], mask=tile, other=0.0)
            up += tl.sum(wu.to(tl.float32) * xs[None, :], 1)
    if GATED:
        acc = acc * tl.sigmoid(acc) * up
    if RESIDUAL:
        acc += tl.load(res_ptr + row * out_stride + cols, mask=col_ok, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * out_stride + cols, acc.to(out_ptr.dtype.element_ty), mask=col_ok)


@triton.jit
def _project_rows(
    x_ptr, w_ptr, out_ptr, norm_ptr, res_ptr,
    M, N, K, eps,
    x_stride, w_stride, out_stride, ROWS_CLASS,
    NORM: tl.constexpr, GATED: tl.constexpr, RESIDUAL: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    """``_project`` for many rows: a tile of ``BLOCK_M`` rows by ``BLOCK_N`` outputs per
    program, as matrix products (tensor cores on a GPU), each weight tile read once for
    all its rows. The normalised input is rounded to the weights' type before the product,
    as the torch step rounds it. ``ROWS_CLASS`` (unused here) is what the tile is tuned
    for: rows to a power of two, at most ROWS_CLASSES' last."""
    rows = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < M
    col_ok = cols < N
    x_rows = x_ptr + rows[:, None] * x_stride
    if NORM:  # one pass for each row's RMS, in chunks (a whole row per program would spill)
        squares = tl.zeros([BLOCK_M], dtype=tl.float32)
        for start in range(0, K, BLOCK_K):
            ks = start + tl.arange(0, BLOCK_K)
            xs = tl.load(x_rows + ks[None, :], mask=row_ok[:, None] & (ks < K)[None, :], other=0.0).to(tl.float32)
            squares += tl.sum(xs * xs, 1)
        rstd = tl.rsqrt(squares / K + eps)
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    up = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    kind = w_ptr.dtype.element_ty
    for start in range(0, K, BLOCK_K):
        ks = start + tl.arange(0, BLOCK_K)
        k_ok = ks < K
        xs = tl.load(x_rows + ks[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        if NORM:
            weight = tl.load(norm_ptr + ks, mask=k_ok, other=0.0).to(tl.float32)
            xs = xs.to(tl.float32) * rstd[:, None] * weight[None, :]
        xs = xs.to(kind)
        tile = col_ok[:, None] & k_ok[None, :]
        w = tl.load(w_ptr + cols[:, None] * w_stride + ks[None, :], mask=tile, other=0.0)  # [BLOCK_N, BLOCK_K]
        acc = tl.dot(xs, tl.trans(w), acc, input_precision=PRECISION)
        if GATED:
            wu = tl.load(w_ptr + (cols + N)[:, None] * w_stride + ks[None, :], mask=tile, other=0.0)
            up = tl.dot(xs, tl.trans(wu), up, input_precision=PRECISION)
    if GATED:
        acc = acc * tl.sigmoid(acc) * up
    out_at = rows[:, None] * out_stride + cols[None, :]
    both = row_ok[:, None] & col_ok[None, :]
    if RESIDUAL:
        acc += tl.load(res_ptr + out_at, mask=both, other=0.0).to(tl.float32)
    tl.store(out_ptr + out_at, acc.to(out_ptr.dtype.element_ty), mask=both)


@triton.jit
def _attend(
    qkv_ptr, cos_ptr, sin_ptr, positions_ptr, at_ptr, k_ptr, v_ptr, valid_ptr, out_ptr, part_ptr, stats_ptr,
    scale,
    qkv_stride, table_stride, cache_row_stride, cache_head_stride, cache_slot_stride, valid_stride, out_stride,
    HEADS: tl.constexpr, KV_HEADS: tl.constexpr, GROUP: tl.constexpr, GROUP_P2: tl.constexpr,
    HALF: tl.constexpr, BLOCK_S: tl.constexpr, SPLITS: tl.constexpr,
):  # fmt: skip
    """One row's query heads that share KV head ``program_id(1)``: rotate q and the new
    k, write k and v at slot ``at``, attend over the valid slots before it and itself.

    With ``SPLITS`` > 1 the slots before ``at`` are shared among that many programs
    (``program_id(2)``), each writing its partial softmax to ``part``/``stats`` for
    ``_merge``; the first also writes the cache and counts the new token."""
    row = tl.program_id(0)
    head = tl.program_id(1)
    split = tl.program_id(2)
    first = split == 0
    # torch.compile passes a Python float as fp64 (Triton's own launcher as fp32): the
    # softmax's loop must carry one type either way.
    scale = tl.cast(scale, tl.float32)
    dim = 2 * HALF
    at = tl.load(at_ptr)
    d = tl.arange(0, HALF)
    table = tl.load(positions_ptr + row) * table_stride
    cos_lo = tl.load(cos_ptr + table + d).to(tl.float32)
    cos_hi = tl.load(cos_ptr + table + HALF + d).to(tl.float32)
    sin_lo = tl.load(sin_ptr + table + d).to(tl.float32)
    sin_hi = tl.load(sin_ptr + table + HALF + d).to(tl.float32)
    base = qkv_ptr + row * qkv_stride
    kind = k_ptr.dtype.element_ty

    # The new key (rotated) and value go into the cache at ``at``; rounded as the cache
    # holds them, so this step scores them as later steps will.
    k_lo = tl.load(base + (HEADS + head) * dim + d).to(tl.float32)
    k_hi = tl.load(base + (HEADS + head) * dim + HALF + d).to(tl.float32)
    key_lo = (k_lo * cos_lo - k_hi * sin_lo).to(kind)
    key_hi = (k_hi * cos_hi + k_lo * sin_hi).to(kind)
    v_lo = tl.load(base + (HEADS + KV_HEADS + head) * dim + d).to(kind)
    v_hi = tl.load(base + (HEADS + KV_HEADS + head) * dim + HALF + d).to(kind)
    cache = row * cache_row_stride + head * cache_head_stride
    new = cache + at * cache_slot_stride
    writes = d < tl.where(first, HALF, 0)  # only the first program writes the cache
    tl.store(k_ptr + new + d, key_lo, mask=writes)
    tl.store(k_ptr + new + HALF + d, key_hi, mask=writes)
    tl.store(v_ptr + new + d, v_lo, mask=writes)
    tl.store(v_ptr + new + HALF + d, v_hi, mask=writes)

    g = tl.arange(0, GROUP_P2)
    g_ok = g < GROUP
    q_at = base + (head * GROUP + g)[:, None] * dim + d[None, :]
    q_lo = tl.load(q_at, mask=g_ok[:, None], other=0.0).to(tl.float32)
    q_hi = tl.load(q_at + HALF, mask=g_ok[:, None], other=0.0).to(tl.float32)
    query_lo = (q_lo * cos_lo[None, :] - q_hi * sin_lo[None, :]).to(kind).to(tl.float32)
    query_hi = (q_hi * cos_hi[None, :] + q_lo * sin_hi[None, :]).to(kind).to(tl.float32)

    # Online softmax. The first program starts from the new token (always attended, so
    # its softmax is never empty); the others from nothing (a finite floor, not -inf,
    # so a split with no valid slot stays 0 instead of NaN).
    own = scale * (
        tl.sum(query_lo * key_lo.to(tl.float32)[None, :], 1) + tl.sum(query_hi * key_hi.to(tl.float32)[None, :], 1)
    )
    best = tl.where(first, own, -1.0e30)
    total = tl.where(first, 1.0, 0.0) + tl.zeros([GROUP_P2], dtype=tl.float32)
    acc_lo = tl.where(first, v_lo.to(tl.float32)[None, :], 0.0) + tl.zeros([GROUP_P2, HALF], dtype=tl.float32)
    acc_hi = tl.where(first, v_hi.to(tl.float32)[None, :], 0.0) + tl.zeros([GROUP_P2, HALF], dtype=tl.float32)
    chunk = tl.cdiv(tl.cdiv(at, SPLITS), BLOCK_S) * BLOCK_S
    lo = split * chunk
    hi = tl.minimum(lo + chunk, at)
    for start in range(lo, hi, BLOCK_S):
        s = start + tl.arange(0, BLOCK_S)
        before = s < hi
        use = before & (tl.load(valid_ptr + row * valid_stride + s, mask=before, other=0) != 0)
        slot = cache + s[:, None] * cache_slot_stride + d[None, :]
        keys_lo = tl.load(k_ptr + slot, mask=before[:, None], other=0.0).to(tl.float32)
        keys_hi = tl.load(k_ptr + slot + HALF, mask=before[:, None], other=0.0).to(tl.float32)
        scores = tl.sum(query_lo[:, None, :] * keys_lo[None, :, :], 2)
        scores += tl.sum(query_hi[:, None, :] * keys_hi[None, :, :], 2)
        scores = tl.where(use[None, :], scores * scale, float("-inf"))
        new_best = tl.maximum(best, tl.max(scores, 1))
        kept = tl.exp(best - new_best)
        p = tl.exp(scores - new_best[:, None])
        total = total * kept + tl.sum(p, 1)
        values_lo = tl.load(v_ptr + slot, mask=before[:, None], other=0.0).to(tl.float32)
        values_hi = tl.load(v_ptr + slot + HALF, mask=before[:, None], other=0.0).to(tl.float32)
        acc_lo = acc_lo * kept[:, None] + tl.sum(p[:, :, None] * values_lo[None, :, :], 1)
        acc_hi = acc_hi * kept[:, None] + tl.sum(p[:, :, None] * values_hi[None, :, :], 1)
        best = new_best
    if SPLITS == 1:
        out_at = out_ptr + row * out_stride + (head * GROUP + g)[:, None] * dim + d[None, :]
        kind_out = out_ptr.dtype.element_ty
        tl.store(out_at, (acc_lo / total[:, None]).to(kind_out), mask=g_ok[:, None])
        tl.store(out_at + HALF, (acc_hi / total[:, None]).to(kind_out), mask=g_ok[:, None])
    else:
        # part: (rows, KV heads, SPLITS, GROUP_P2, dim); stats: (rows, KV heads, SPLITS, 2, GROUP_P2)
        piece = (row * KV_HEADS + head) * SPLITS + split
        part_at = part_ptr + piece * GROUP_P2 * dim + g[:, None] * dim + d[None, :]
        tl.store(part_at, acc_lo)
        tl.store(part_at + HALF, acc_hi)
        tl.store(stats_ptr + piece * 2 * GROUP_P2 + g, best)
        tl.store(stats_ptr + piece * 2 * GROUP_P2 + GROUP_P2 + g, total)


@triton.jit
def _merge(
    part_ptr, stats_ptr, out_ptr, out_stride,
    KV_HEADS: tl.constexpr, GROUP: tl.constexpr, GROUP_P2: tl.constexpr, HALF: tl.constexpr, SPLITS: tl.constexpr,
):  # fmt: skip
    """The softmax of ``_attend``'s splits for one row and KV head, merged and normalised."""
    row = tl.program_id(0)
    head = tl.program_id(1)
    dim = 2 * HALF
    pieces = (row * KV_HEADS + head) * SPLITS + tl.arange(0, SPLITS)  # [SPLITS]
    g = tl.arange(0, GROUP_P2)
    d = tl.arange(0, HALF)
    stats = stats_ptr + pieces[:, None] * 2 * GROUP_P2 + g[None, :]
    best = tl.load(stats)  # [SPLITS, GROUP_P2]
    total = tl.load(stats + GROUP_P2)
    top = tl.max(best, 0)
    weight = tl.exp(best - top[None, :])  # [SPLITS, GROUP_P2]
    norm = tl.sum(total * weight, 0)  # [GROUP_P2]
    part = part_ptr + pieces[:, None, None] * GROUP_P2 * dim + g[None, :, None] * dim + d[None, None, :]
    merged_lo = tl.sum(tl.load(part) * weight[:, :, None], 0) / norm[:, None]  # [GROUP_P2, HALF]
    merged_hi = tl.sum(tl.load(part + HALF) * weight[:, :, None], 0) / norm[:, None]
    g_ok = g < GROUP
    out_at = out_ptr + row * out_stride + (head * GROUP + g)[:, None] * dim + d[None, :]
    kind_out = out_ptr.dtype.element_ty
    tl.store(out_at, merged_lo.to(kind_out), mask=g_ok[:, None])
    tl.store(out_at + HALF, merged_hi.to(kind_out), mask=g_ok[:, None])


def _tuned(kernel, tiles: list[dict], warps: list[int], key: list[str]):
    """On a GPU, the kernel with its tile (``tiles[i]`` with ``warps[i]``) picked per value
    of ``key``; interpreted, the kernel itself (its caller gives one tile)."""
    if INTERPRETED:
        return kernel
    configs = [triton.Config(tile, num_warps=w) for tile, w in zip(tiles, warps, strict=True)]
    # Tuning runs the kernel several times: the residual projections add into their
    # output, so it is put back after each run. Where this Triton can, the tile each
    # shape got is kept in Triton's cache (see kernel_cache), so a restart skips tuning.
    options = {"cache_results": True} if "cache_results" in inspect.signature(triton.autotune).parameters else {}
    return triton.autotune(configs, key=key, restore_value=["out_ptr"], **options)(kernel)


_FLAGS = ["NORM", "GATED", "RESIDUAL"]
_project_tuned = _tuned(
    _project, [{"BLOCK_N": n, "BLOCK_K": k} for n, k, _ in _TILES], [w for *_, w in _TILES], ["N", "K", *_FLAGS]
)

# (rows, outputs and weight columns per program, warps) for ``_project_rows``; the fastest
# for each projection's shape and row count is picked the first time it runs. None of
# these spills registers for an H100 in any of the step's uses (tests/kernels_compile.py;
# larger tiles, and 64 columns with 4 warps, do).
_ROW_TILES = [(16, 32, 64, 4), (16, 64, 32, 8), (32, 32, 32, 8), (32, 64, 32, 8), (64, 32, 32, 8), (64, 64, 32, 8),
              (128, 64, 32, 8)]  # fmt: skip
_ROW_TILE_INTERPRETED = {"BLOCK_M": 16, "BLOCK_N": 64, "BLOCK_K": 64}  # partial tiles in the tests


# Row counts the tiled projections are tuned for (a count between two takes the larger's
# tile): tuning takes seconds, so it happens once per class (an engine's warm-up runs a
# batch of each), not for every number of lanes a server meets.
ROWS_CLASSES = (16, 32, 64, 128)


def rows_class(rows: int) -> int:
    """The class of row counts ``rows`` takes its tiles from."""
    return min(ROWS_CLASSES[-1], triton.next_power_of_2(rows))


_project_rows_tuned = _tuned(
    _project_rows,
    [{"BLOCK_M": m, "BLOCK_N": n, "BLOCK_K": k} for m, n, k, _ in _ROW_TILES],
    [w for *_, w in _ROW_TILES],
    ["ROWS_CLASS", "N", "K", *_FLAGS],
)


def unsupported(decoder) -> str | None:
    """Why these kernels cannot run ``decoder``'s model (None when they can)."""
    if decoder.int8:
        return "int8 weights"
    if decoder.head_dim % 2 or decoder.head_dim & (decoder.head_dim - 1):
        return f"head size {decoder.head_dim} is not a power of two"
    linears = [decoder.head] + [lin for layer in decoder.layers for lin in (layer.qkv, layer.o, layer.gate_up, layer.down)]
    if any(lin.bias is not None for lin in linears):
        return "projections with biases"
    if decoder.device.type != "cuda" and not INTERPRETED:
        return "no GPU (and Triton's interpreter is off)"
    return None


class Attention:
    """The rotary embedding, the cache write and decode attention for one layer as one
    kernel: (rows, q/k/v) in, (rows, heads × head size) out; ``decoder.at`` is the slot."""

    def __init__(self, decoder) -> None:
        reason = unsupported(decoder)
        if reason:
            raise ValueError(f"the Triton kernels cannot run this model: {reason}")
        self.decoder = decoder
        self.group = decoder.heads // decoder.kv_heads

    def __call__(
        self, qkv: torch.Tensor, positions: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, splits: int = 1
    ) -> torch.Tensor:
        """``splits`` > 1 shares each row's slots among that many programs (a power of two),
        merged by a second kernel: for few rows over a long cache."""
        dec = self.decoder
        rows, dim = qkv.shape[0], dec.head_dim
        group_p2 = triton.next_power_of_2(self.group)
        attended = torch.empty((rows, dec.heads * dim), dtype=dec.dtype, device=dec.device)
        # The bool mask as is: a dtype view here breaks torch.compile (inductor cannot
        # lower a bool-to-uint8 view of a user kernel's argument on a GPU).
        valid = dec.valid
        positions = positions.contiguous()  # the kernel reads one per row, side by side
        # One split writes no partials: one-element stand-ins (no aliasing for torch.compile).
        part_shape, stats_shape = ((rows, dec.kv_heads, splits, group_p2, dim), (rows, dec.kv_heads, splits, 2, group_p2))
        if splits == 1:
            part_shape = stats_shape = (1,)
        part = torch.empty(part_shape, dtype=torch.float32, device=dec.device)
        stats = torch.empty(stats_shape, dtype=torch.float32, device=dec.device)
        shape = {"KV_HEADS": dec.kv_heads, "GROUP": self.group, "GROUP_P2": group_p2, "HALF": dim // 2, "SPLITS": splits}
        _attend[(rows, dec.kv_heads, splits)](
            qkv, dec.cos, dec.sin, positions, dec.at, k_cache, v_cache, valid, attended, part, stats,
            dec.scale,
            qkv.stride(0), dec.cos.stride(0), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), valid.stride(0),
            attended.stride(0),
            HEADS=dec.heads, BLOCK_S=BLOCK_SLOTS, **shape,
        )  # fmt: skip
        if splits > 1:
            _merge[(rows, dec.kv_heads)](part, stats, attended, attended.stride(0), **shape)
        return attended


def splits_for(rows: int, kv_heads: int, slots: int) -> int:
    """How many programs share each row and KV head's slots: one while the cache is short
    or the batch alone fills the GPU; else enough for ~``ATTENTION_PROGRAMS`` programs,
    each with at least ``SLOTS_PER_SPLIT`` slots (a power of two, at most 16)."""
    if slots <= SLOTS_PER_SPLIT:
        return 1
    wanted = min(16, slots // SLOTS_PER_SPLIT, max(1, ATTENTION_PROGRAMS // (rows * kv_heads)))
    return 1 << (wanted.bit_length() - 1)


class TritonStep:
    """``LlamaDecoder``'s static decode step as Triton kernels, five a layer, for any rows.

    Up to ``MAX_ROWS`` rows the projections are matrix-vector products (``_project``);
    past that, tiles of rows as matrix products (``_project_rows``), so each weight tile
    is read once per tile of rows. Same contract as the decoder's ``_static_step``: one
    token per row at ``decoder.at``, the new keys and values written there,
    ``decoder.valid`` marked; returns the logits.
    """

    vector_rows = MAX_ROWS  # rows the matrix-vector kernels take; more take the tiled ones
    rows_classes = ROWS_CLASSES  # the row counts the tiled ones are tuned for

    def __init__(self, decoder) -> None:
        self.attention = Attention(decoder)
        self.decoder = decoder
        # fp32 weights (the GPU tests' model) multiply in full precision, not as TF32.
        self.precision = "ieee" if decoder.dtype == torch.float32 else "tf32"
        self.max_rows: int | None = None  # any; vector_rows once the tiled kernels failed

    def __call__(self, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        dec = self.decoder
        rows = tokens.shape[0]
        if self.max_rows is not None and rows > self.max_rows:
            raise ValueError(f"{rows} rows; these kernels now take at most {self.max_rows}")
        dec.valid.index_fill_(1, dec.at.view(1), True)
        x = torch.index_select(dec.embed, 0, tokens)
        qkv = torch.empty((rows, (dec.heads + 2 * dec.kv_heads) * dec.head_dim), dtype=dec.dtype, device=dec.device)
        act = torch.empty((rows, dec.layers[0].down.weight.shape[1]), dtype=dec.dtype, device=dec.device)
        splits = splits_for(rows, dec.kv_heads, dec.k[0].shape[2])  # a captured graph keeps its cache length
        for index, layer in enumerate(dec.layers):
            self._project(x, layer.qkv.weight, qkv, norm=layer.norm1)
            attended = self.attention(qkv, positions, dec.k[index], dec.v[index], splits)
            self._project(attended, layer.o.weight, x, residual=True)
            self._project(x, layer.gate_up.weight, act, norm=layer.norm2, gated=True)
            self._project(act, layer.down.weight, x, residual=True)
        logits = torch.empty((rows, dec.head.weight.shape[0]), dtype=dec.dtype, device=dec.device)
        self._project(x, dec.head.weight, logits, norm=dec.norm)
        return logits

    def _project(
        self, x: torch.Tensor, weight: torch.Tensor, out: torch.Tensor, *,
        norm: torch.Tensor | None = None, gated: bool = False, residual: bool = False,
    ) -> None:  # fmt: skip
        rows, width = x.shape
        n = out.shape[1]
        norm_weight = norm if norm is not None else weight
        flags = {"NORM": norm is not None, "GATED": gated, "RESIDUAL": residual}
        strides = (x.stride(0), weight.stride(0), out.stride(0))
        if rows > MAX_ROWS:
            args = (x, weight, out, norm_weight, out, rows, n, width, self.decoder.eps, *strides, rows_class(rows))
            flags["PRECISION"] = self.precision
            if INTERPRETED:
                tile = _ROW_TILE_INTERPRETED
                _project_rows[(triton.cdiv(n, tile["BLOCK_N"]), triton.cdiv(rows, tile["BLOCK_M"]))](*args, **flags, **tile)
            else:
                grid = lambda meta: (triton.cdiv(n, meta["BLOCK_N"]), triton.cdiv(rows, meta["BLOCK_M"]))
                _project_rows_tuned[grid](*args, **flags)
            return
        args = (x, weight, out, norm_weight, out, n, width, self.decoder.eps, *strides)
        flags["K_ROW"] = triton.next_power_of_2(width) if norm is not None else 1
        if INTERPRETED:
            _project[(triton.cdiv(n, 64), rows)](*args, **flags, BLOCK_N=64, BLOCK_K=128)
        else:
            _project_tuned[lambda meta: (triton.cdiv(n, meta["BLOCK_N"]), rows)](*args, **flags)
