"""Compile every Triton kernel the small-batch decode step launches for an H100 (sm_90a),
without a GPU: Triton's compiler and its bundled ptxas run on any machine.

Run by tests/test_decode_kernels.py in a process of its own (Triton must not be in its
interpreter mode here). A kernel whose registers spill to local memory fails the check:
such a tile would be slow. Prints one line per kernel and a summary.
"""

from __future__ import annotations

import re
import subprocess
import sys
import tempfile
from pathlib import Path

from triton import compile as compile_kernel
from triton.backends.compiler import GPUTarget
from triton.backends.nvidia.compiler import get_ptxas
from triton.compiler import ASTSource

from persona import decode_kernels

H100 = GPUTarget("cuda", 90, 32)

PROJECT = {name: "*bf16" for name in ("x_ptr", "w_ptr", "out_ptr", "norm_ptr", "res_ptr")} | {
    "N": "i32", "K": "i32", "eps": "fp32", "x_stride": "i32", "w_stride": "i32", "out_stride": "i32",
}  # fmt: skip
PROJECT_ROWS = PROJECT | {"M": "i32", "ROWS_CLASS": "i32"}
ATTEND = (
    {name: "*bf16" for name in ("qkv_ptr", "cos_ptr", "sin_ptr", "k_ptr", "v_ptr", "out_ptr")}
    | {"positions_ptr": "*i64", "at_ptr": "*i64", "valid_ptr": "*i1", "part_ptr": "*fp32", "stats_ptr": "*fp32"}
    | {"scale": "fp32"}  # fp64 as well, as torch.compile passes it (main)
    | {f"{name}_stride": "i32" for name in ("qkv", "table", "cache_row", "cache_head", "cache_slot", "valid", "out")}
)
# The bundled model's shape (SmolLM2-135M): 9 query heads over 3 KV heads of 64.
ATTEND_SHAPE = {"HEADS": 9, "KV_HEADS": 3, "GROUP": 3, "GROUP_P2": 4, "HALF": 32, "BLOCK_S": 64}
MERGE = {"part_ptr": "*fp32", "stats_ptr": "*fp32", "out_ptr": "*bf16", "out_stride": "i32"}
SPLITS = (1, 2, 4, 8, 16)  # what decode_kernels.splits_for may pick
# How the step calls the projection: q/k/v and the head; o and down; gate/up.
PROJECT_USES = [(True, False, False, 1024), (False, False, True, 1), (True, True, False, 1024)]


def _compile(kernel, types: dict[str, str], constants: dict, warps: int = 4) -> None:
    """Compile one kernel; refuse one whose registers spill to memory (a slow tile)."""
    names = list(kernel.arg_names)
    if sorted(names) != sorted([*types, *constants]):
        raise SystemExit(f"{kernel.fn.__name__}'s arguments changed ({names}): update {__file__}")
    signature = {name: types.get(name, "constexpr") for name in names}
    asm = compile_kernel(ASTSource(kernel, signature, constants), target=H100, options={"num_warps": warps}).asm
    if not asm.get("cubin"):
        raise SystemExit(f"no machine code for {kernel.fn.__name__} {constants}")
    with tempfile.TemporaryDirectory() as folder:
        ptx = Path(folder, "kernel.ptx")
        ptx.write_text(asm["ptx"])
        # The ptxas Triton itself uses for this GPU (releases bundle more than one).
        done = subprocess.run(
            [get_ptxas(H100.arch).path, "-arch=sm_90a", "-v", str(ptx), "-o", str(ptx.with_suffix(".cubin"))],
            capture_output=True, text=True, check=False,
        )  # fmt: skip
    report = done.stderr
    if done.returncode:
        raise SystemExit(f"ptxas refused {kernel.fn.__name__} {constants}:\n{report}")
    registers = re.search(r"Used (\d+) registers", report)
    if "0 bytes spill stores" not in report:
        raise SystemExit(f"{kernel.fn.__name__} {constants} warps {warps} spills registers:\n{report}")
    print(kernel.fn.__name__, constants, "warps", warps, "registers", registers and registers[1], "ok")


def main() -> int:
    count = 0
    for norm, gated, residual, k_row in PROJECT_USES:
        flags = {"NORM": norm, "GATED": gated, "RESIDUAL": residual, "K_ROW": k_row}
        for block_n, block_k, warps in decode_kernels._TILES:  # every tile the GPU may pick
            _compile(decode_kernels._project, PROJECT, flags | {"BLOCK_N": block_n, "BLOCK_K": block_k}, warps)
            count += 1
        # More rows than the matrix-vector kernels take: the tiled ones, every tile.
        for block_m, block_n, block_k, warps in decode_kernels._ROW_TILES:
            rows_flags = {key: flags[key] for key in ("NORM", "GATED", "RESIDUAL")} | {"PRECISION": "tf32"}
            tile = {"BLOCK_M": block_m, "BLOCK_N": block_n, "BLOCK_K": block_k}
            _compile(decode_kernels._project_rows, PROJECT_ROWS, rows_flags | tile, warps)
            count += 1
    for splits in SPLITS:
        # Triton's launcher types the float scale fp32; torch.compile's (inductor) fp64.
        for scale in ("fp32", "fp64"):
            _compile(decode_kernels._attend, ATTEND | {"scale": scale}, ATTEND_SHAPE | {"SPLITS": splits})
            count += 1
        if splits > 1:
            merge = {key: ATTEND_SHAPE[key] for key in ("KV_HEADS", "GROUP", "GROUP_P2", "HALF")}
            _compile(decode_kernels._merge, MERGE, merge | {"SPLITS": splits})
            count += 1
    print(f"compiled {count} kernels for sm_90a")
    return 0


if __name__ == "__main__":
    sys.exit(main())
