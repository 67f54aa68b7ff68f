"""Where the engine's time goes between decode steps: host-bound or GPU-bound?

The H100 runs left a gap: at batch 1 the engine took about 1.1 ms a token where the
captured step it replays takes 0.85 ms, and the gap grew with the batch (1.2 ms at 128).
This runs ``TransformersEngine.generate`` for each batch size once plainly (the wall time
to compare) and once under torch's profiler, and reports per decode step:

- ``wall_ms``: the plain run's time per token step (prompt read included, as the bench);
- ``gpu_ms``: the GPU's kernel time per step under the profiler (kernels of a replayed
  graph count one by one);
- ``host_wait_ms``: what the host spent blocked on the GPU (event, stream and device
  synchronisation, blocking copies). Much of it: the GPU is the bottleneck. Little of it
  while ``wall_ms`` exceeds ``gpu_ms``: the host is, and ``top_host_ops`` says on what;
- ``host_ops_ms``: the host's time inside torch's ops (the rest of a host-bound step is
  Python's own: the engine's bookkeeping);
- ``launches``: kernel launches and graph replays per step.

    python bench/gpu_profile.py [--batches 1,128] [--tokens 128] [--tokenizer DIR]

Prints one JSON object. Compiled kernels are read from (and kept in) the model cache,
as the engine keeps them, so after ``persona bench engine`` on the same machine the
warm-up mostly reads them back. Runs on a CPU too (``--device cpu``: the bundled
model; GPU columns are then 0).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from persona.bench_engine import load_bench_model, prompt_ids, sampling_for, sync_device
from persona.engine import TransformersEngine, Work
from persona.settings import Settings

WAITS = ("cudaEventSynchronize", "cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaMemcpy")
LAUNCHES = ("cudaLaunchKernel", "cuLaunchKernel", "cuLaunchKernelEx", "cudaLaunchKernelExC", "cudaGraphLaunch")


def _ms(microseconds: float) -> float:
    return round(microseconds / 1000, 4)


def _device_us(event) -> float:
    return getattr(event, "self_device_time_total", None) or getattr(event, "self_cuda_time_total", 0.0)


def profile_batch(engine: TransformersEngine, prompts: list[list[int]], tokens: int) -> dict:
    work = [Work(ids, sampling_for(tokens, False)) for ids in prompts]
    engine.generate(work)  # lays the cache out, captures what this shape needs
    device = engine.loaded.device
    sync_device(device)
    began = time.perf_counter()
    engine.generate(work)
    sync_device(device)
    wall = time.perf_counter() - began
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    with profile(activities=activities) as prof:
        engine.generate(work)
        sync_device(device)
    events = prof.key_averages()
    # Kernels (and copies) as the GPU ran them; host-side ops carry their kernels' time too.
    gpu_us = sum(_device_us(e) for e in events if str(getattr(e, "device_type", "")).endswith("CUDA"))
    wait_us = sum(e.self_cpu_time_total for e in events if e.key.startswith(WAITS))
    launches = sum(e.count for e in events if e.key in LAUNCHES)
    ops_us = sum(e.self_cpu_time_total for e in events) - wait_us
    top = sorted(events, key=lambda e: e.self_cpu_time_total, reverse=True)[:12]
    return {
        "wall_ms": round(wall * 1000 / tokens, 4),
        "gpu_ms": _ms(gpu_us / tokens),
        "host_wait_ms": _ms(wait_us / tokens),
        "host_ops_ms": _ms(ops_us / tokens),
        "launches": round(launches / tokens, 1),
        "top_host_ops": [[e.key, e.count, _ms(e.self_cpu_time_total / tokens)] for e in top],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--batches", default="1,128")
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--tokenizer", type=Path, default=None, help="a saved tokenizer (the GPU machine's copy)")
    args = parser.parse_args()
    settings = Settings()
    loaded = load_bench_model(args.device, settings.model_cache_dir, args.tokenizer)
    threads = None if args.device == "cuda" else torch.get_num_threads()
    engine = TransformersEngine(loaded, mode="fused", cache_dir=settings.model_cache_dir, threads=threads)
    report: dict = {"device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu"}
    report["warm_up_s"] = round(engine.warm_up(), 1)
    engine.stop_ids = set()  # every row makes exactly --tokens tokens
    for batch in (int(b) for b in args.batches.split(",")):
        report[batch] = profile_batch(engine, prompt_ids(loaded, batch), args.tokens)
        print(json.dumps({batch: report[batch]}), flush=True)
    report["step_ms"] = getattr(engine.decoder, "step_ms", {})
    print(json.dumps(report), flush=True)


if __name__ == "__main__":
    main()
