"""Where a GPU decode step's time goes: the decoder alone, without the engine around it.

For a random-weight model of the bundled model's shape (bf16), times ``LlamaDecoder.step``
at each batch size five ways: launched kernel by kernel (no graph); replayed as a CUDA
graph of the eager step; as a graph of the torch.compile'd step; as a graph of the
Triton step (``persona/decode_kernels.py``); and as a graph of the
compiled step whose attention is one Triton kernel. Also what a server meets: compiling,
capturing a graph, a row leaving a running batch (its lane idles; the graph stays), and
``churn``: tokens/s while one row leaves and a new one joins after every step. Prints the
JSON report so far after each variant (a run cut short by its time limit keeps what it
measured); the last line is the whole report.

    python bench/gpu_steps.py [--batches 1,8,32,128] [--steps 100] [--variants graph,compiled_graph]

Compiled kernels go where the engine keeps them (the settings' model cache), so after
``persona bench engine`` on the same machine the compiled variants mostly read them back.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch

from persona.bench_engine import SMOLLM2_SHAPE
from persona.kernel_cache import keep_compiled_kernels
from persona.llama_decoder import LlamaDecoder
from persona.settings import Settings

PROMPT_TOKENS = 32
VARIANTS = {
    "no_graph": {"static": True},
    "graph": {"graphs": True},
    "compiled_graph": {"graphs": True, "compile": True},
    # The step as Triton kernels (persona/decode_kernels.py), captured as a graph: matrix-
    # vector projections up to 8 rows, tiled matrix products past that.
    "triton_graph": {"graphs": True, "kernels": "always"},
    # The compiled step with its attention as one Triton kernel over the filled slots.
    "compiled_graph_triton_attention": {"graphs": True, "compile": True, "attention": "triton"},
}


def _model():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(**SMOLLM2_SHAPE)
    return LlamaForCausalLM(config).to(device="cuda", dtype=torch.bfloat16).eval()


def _start(decoder: LlamaDecoder, batch: int, room: int) -> torch.Tensor:
    ids = torch.randint(0, SMOLLM2_SHAPE["vocab_size"], (batch, PROMPT_TOKENS), device="cuda")
    mask = torch.ones_like(ids)
    positions = torch.arange(PROMPT_TOKENS, device="cuda").expand(batch, -1)
    decoder.start(ids, mask, positions, room)
    return positions[:, -1].clone()


@torch.inference_mode()
def time_steps(decoder: LlamaDecoder, batch: int, steps: int) -> dict:
    """Milliseconds per step once warm, and the first step's (capture, compile)."""
    last = _start(decoder, batch, 2 * steps + 4)
    tokens = torch.zeros(batch, dtype=torch.long, device="cuda")
    torch.cuda.synchronize()
    began = time.perf_counter()
    decoder.step(tokens, last + 1)  # captures (and compiles) where the decoder does
    torch.cuda.synchronize()
    first_ms = (time.perf_counter() - began) * 1000
    for i in range(3):
        decoder.step(tokens, last + 2 + i)
    torch.cuda.synchronize()
    began = time.perf_counter()
    for i in range(steps):
        decoder.step(tokens, last + 5 + i)
    torch.cuda.synchronize()
    step_ms = (time.perf_counter() - began) * 1000 / steps
    return {"step_ms": round(step_ms, 4), "tokens_per_s": round(batch / step_ms * 1000, 1), "first_step_ms": round(first_ms, 1)}


@torch.inference_mode()
def time_churn(decoder: LlamaDecoder, batch: int, steps: int) -> dict:
    """A serving batch: after every step the oldest row leaves and a new one (a 32-token
    prompt, read then and there) joins, as when one reply ends each step. Rows take and
    free lanes of the same cache, so no graph is captured again; the ``layouts`` the run
    needed (1: none beyond the first) come back with the speed."""
    room = batch + 4
    last = _start(decoder, batch, room)
    positions = last + 1
    tokens = torch.zeros(batch, dtype=torch.long, device="cuda")
    ids = torch.randint(0, SMOLLM2_SHAPE["vocab_size"], (1, PROMPT_TOKENS), device="cuda")
    mask = torch.ones_like(ids)
    prompt_positions = torch.arange(PROMPT_TOKENS, device="cuda")[None]
    layouts = decoder.layouts

    def turn() -> None:
        nonlocal positions
        decoder.step(tokens, positions)
        decoder.select(list(range(1, batch)))
        decoder.join(ids, mask, prompt_positions, room)
        positions = torch.cat([positions[1:] + 1, prompt_positions[:, -1] + 1])

    for _ in range(5):
        turn()
    torch.cuda.synchronize()
    began = time.perf_counter()
    for _ in range(steps):
        turn()
    torch.cuda.synchronize()
    step_ms = (time.perf_counter() - began) * 1000 / steps
    return {
        "step_ms": round(step_ms, 4), "tokens_per_s": round(batch / step_ms * 1000, 1),
        "layouts": decoder.layouts - layouts + 1,
    }  # fmt: skip


@torch.inference_mode()
def time_leave(decoder: LlamaDecoder, batch: int) -> float:
    """Milliseconds for a row to leave a running batch and the next step to run."""
    last = _start(decoder, batch, 16)
    tokens = torch.zeros(batch, dtype=torch.long, device="cuda")
    for i in range(3):
        decoder.step(tokens, last + 1 + i)
    torch.cuda.synchronize()
    began = time.perf_counter()
    decoder.select(list(range(1, batch)))
    decoder.step(tokens[1:], last[1:] + 4)
    torch.cuda.synchronize()
    return round((time.perf_counter() - began) * 1000, 2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", default="1,8,32,128")
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--variants", default=",".join(VARIANTS), help="which of them, in this order")
    args = parser.parse_args()
    batches = [int(b) for b in args.batches.split(",")]
    chosen = args.variants.split(",")
    if unknown := set(chosen) - set(VARIANTS):
        parser.error(f"unknown variants {sorted(unknown)}; choose from {', '.join(VARIANTS)}")
    keep_compiled_kernels(Settings().model_cache_dir)
    model = _model()
    report: dict = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "prompt_tokens": PROMPT_TOKENS}
    for name in chosen:
        options = VARIANTS[name]
        decoder = LlamaDecoder(model, **options)
        row = {}
        for batch in batches:
            try:
                row[batch] = time_steps(decoder, batch, args.steps)
            except Exception as exc:  # noqa: BLE001 - one variant failing still reports the others
                row[batch] = {"error": f"{type(exc).__name__}: {exc}"[:300]}
            print(name, batch, row[batch], flush=True, file=sys.stderr)
        if options.get("compile"):
            row["compiled"] = decoder.compiled
        if options.get("kernels"):
            row["triton_kernels_ran"] = decoder.kernel_step is not None
        if options.get("attention"):
            row["triton_attention_ran"] = decoder.attention is not None
        if options.get("graphs") and max(batches) > 1:
            row["leave_ms"] = {b: time_leave(decoder, b) for b in batches if b > 1}
            row["churn"] = {b: time_churn(decoder, b, args.steps) for b in batches if b > 1}
        report[name] = row
        print(json.dumps(report), flush=True)


if __name__ == "__main__":
    main()
