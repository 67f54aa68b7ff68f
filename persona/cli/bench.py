"""`persona bench ...`: measure ours against a baseline in the same run."""

from __future__ import annotations

import json
from pathlib import Path

import typer
from rich.progress import Progress
from rich.table import Table

from persona.cli.common import console, friendly_errors, get_settings
from persona.cli.soak import register_bench
from persona.cli.training_common import THREADS_HELP
from persona.errors import ConfigError

__all__ = ["bench_app", "engine", "queue", "register", "serve"]

bench_app = typer.Typer(
    help="Benchmarks: each but soak measures ours and a baseline in the same run and prints the ratio.",
    no_args_is_help=True,
)


@bench_app.command("queue")
@friendly_errors
def queue(
    jobs: int = typer.Option(20_000, min=100, help="requests queued up front, then drained by one worker"),
    seconds: float = typer.Option(3.0, min=0.1, help="how long to send one request at a time for latency"),
    batch: int = typer.Option(128, min=1, help="the worker's max_batch (requests claimed per round)"),
    tcp: bool = typer.Option(
        False, "--tcp", help="reach Redis over TCP loopback, as a Redis elsewhere is reached (default: the "
        "embedded Redis's unix socket, as `persona up` uses it)",
    ),
    json_output: bool = typer.Option(False, "--json", help="print one JSON object"),
) -> None:
    """Drain rate and round-trip latency of one worker with an instant engine, vs a plain loop."""
    from persona.bench_queue import BASELINE_LOOP, run_queue_bench

    with console.status("starting Redis and a tiny model...") as status:
        result = run_queue_bench(
            jobs=jobs, seconds=seconds, batch=batch, tcp=tcp, progress=lambda phase: status.update(f"{phase}...")
        )
    if json_output:
        print(json.dumps(result.as_dict()))
        return
    console.print(
        f"ours:     {result.jobs_per_s:>9,.0f} jobs/s drained by one worker; "
        f"round trip p50 {result.p50_ms:.2f} ms, p99 {result.p99_ms:.2f} ms\n"
        f"baseline: {result.baseline_jobs_per_s:>9,.0f} jobs/s ({BASELINE_LOOP}); "
        f"round trip p50 {result.baseline_p50_ms:.2f} ms, p99 {result.baseline_p99_ms:.2f} ms\n"
        f"ratio:    {result.ratio:.1f}x the baseline's drain rate ({result.jobs:,} jobs each, both through "
        f"Redis's {result.transport})",
        highlight=False,
    )


def _batches(text: str) -> list[int]:
    try:
        sizes = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise typer.BadParameter("give batch sizes as numbers separated by commas, e.g. 1,8", param_hint="'--batch'") from None
    if not sizes or min(sizes) < 1:
        raise typer.BadParameter("batch sizes must be 1 or more, e.g. 1,8", param_hint="'--batch'")
    # Each size is measured once and shown on one row: 1,1 measured batch 1 twice, for one
    # row shown twice with the second run's figures (and 1,1 is often a typo for 1,16).
    again = sorted({size for size in sizes if sizes.count(size) > 1})
    if again:
        named = f"batch sizes {', '.join(map(str, again))} are" if len(again) > 1 else f"batch size {again[0]} is"
        once = ",".join(map(str, dict.fromkeys(sizes)))
        raise typer.BadParameter(f"{named} given more than once; give each once: --batch {once}", param_hint="'--batch'")
    return sizes


def _gguf_type(value: str) -> str:
    """``--gguf`` (or the worker setting), refused as `persona export --gguf` refuses one."""
    from persona.gguf_files import GGUF_TYPES

    if value not in GGUF_TYPES or value == "f32":
        raise ConfigError(f"unknown GGUF type {value!r}; choose one of q8_0, q4_1, f16")
    return value


def _bench_device(settings, device: str, json_output: bool) -> str:
    """The device (``auto`` resolved: this imports torch, so options are checked first) for a
    model bench. With ``--json`` no progress is drawn for machines to read: it goes to the
    log (stderr) instead."""
    from persona.models import pick_device

    if json_output:
        from persona.logs import setup_logging

        setup_logging(settings)
    return pick_device(device)


def _bench_model(settings, device: str, threads: int | None, tokenizer: Path | None, model: str = ""):
    """The bundled model (on a GPU: a random one of its shape) or ``model``, torch's threads
    set first."""
    import torch

    from persona.bench_engine import load_bench_model
    from persona.models import load_model

    if threads or settings.worker.threads:
        torch.set_num_threads(threads or settings.worker.threads)
    if model:
        return load_model(model, cache_dir=settings.model_cache_dir, device=device)
    return load_bench_model(device, settings.model_cache_dir, tokenizer)


def _choice(value: str, choices: tuple[str, ...], option: str) -> str:
    """``value``, if one of ``choices``; refused in one sentence, as `persona worker --device` refuses
    one ("unknown device 'gpu'; choose one of auto, cpu, cuda"), where it was a usage box."""
    if value not in choices:
        raise ConfigError(f"unknown {option} {value!r}; choose one of {', '.join(choices)}")
    return value


def _worker_choice(value: str, setting: str, option: str) -> str:
    """``option`` (or the worker setting it defaults to), one of the values that setting
    takes. Read from the settings, not the engine: a refusal comes in a second, before
    torch is imported (seconds) and long before a model loads."""
    from typing import get_args

    from persona.settings import WorkerSettings

    return _choice(value, get_args(WorkerSettings.model_fields[setting].annotation), option)


def _engine_mode(value: str) -> str:
    """``--mode`` (or the worker setting), checked before the model loads."""
    return _worker_choice(value, "engine", "--mode")


def _bench_base(settings, model: str) -> None:
    """Refuse a ``--model`` that names neither the bundled model nor a model folder, before
    anything loads (the same words as loading it would say)."""
    from persona.models import BUNDLED_ALIASES, resolve_base

    if model and model not in BUNDLED_ALIASES:
        resolve_base(model, settings.model_cache_dir)


@bench_app.command("engine")
@friendly_errors
def engine(
    device: str = typer.Option(
        "cpu", help="cpu (the bundled model), cuda (a random model of its shape, bf16) or auto (cuda if torch sees a GPU)"
    ),
    batch: str = typer.Option("", help="batch sizes, comma-separated (default: 1,8 on CPU; 1,8,32,128 on cuda)"),
    tokens: int = typer.Option(64, min=1, help="new tokens per row"),
    mode: str = typer.Option("", help="our engine's path: auto, eager, fused, int8 or llamacpp (default: the worker setting)"),
    repeats: int = typer.Option(2, min=1, help="runs per batch size; the best is kept (the machine is shared)"),
    threads: int = typer.Option(None, min=1, help=THREADS_HELP),
    gguf: str = typer.Option("", help="llama.cpp path: the GGUF type, q8_0, q4_1 or f16 (default: the worker setting)"),
    compile: bool | None = typer.Option(
        None, "--compile/--no-compile", help="GPU: torch.compile the decode step (default: the worker setting)"
    ),
    kernels: str = typer.Option(
        "", help="GPU: the small-batch Triton step, auto, always or never (default: the worker setting)"
    ),
    attention: str = typer.Option(
        "", help="GPU: the compiled step's attention, auto, torch or triton (default: the worker setting)"
    ),
    tokenizer: Path | None = typer.Option(
        None, exists=True, file_okay=False,
        help="GPU: a saved tokenizer folder for the random-weight model, where the bundled GGUF is not installed",
    ),
    model: str = typer.Option(
        "", help="a base model to bench instead: 'smollm2' or a local Hugging Face model folder (GPT-2 too)",
    ),
    sample: bool = typer.Option(
        False, "--sample", help="both sides sample as a persona does (temperature 0.8, top-p 0.95, top-k 50, "
        "repetition penalty 1.1) instead of greedy",
    ),
    json_output: bool = typer.Option(False, "--json", help="print one JSON object"),
) -> None:
    """Tokens/s of our engine vs plain transformers generate(), same model, prompts and lengths;
    and the time to the first token of a chat-sized prompt."""
    settings = get_settings()
    given_sizes = _batches(batch) if batch else []
    chosen_mode = _engine_mode(mode or settings.worker.engine)
    gguf_type = _gguf_type(gguf or settings.worker.gguf_type)
    kernels = _worker_choice(kernels or settings.worker.kernels, "kernels", "--kernels")
    attention = _worker_choice(attention or settings.worker.attention, "attention", "--attention")
    _bench_base(settings, model)
    device = _bench_device(settings, device, json_output)
    sizes = given_sizes or _batches("1,8" if device == "cpu" else "1,8,32,128")
    from persona.bench_engine import run_engine_bench

    with Progress(console=console, transient=True) as progress:
        task = progress.add_task("loading the model...", total=len(sizes) * repeats)

        def advance() -> None:
            progress.update(task, advance=1, description="benchmarking...")

        loaded = _bench_model(settings, device, threads, tokenizer, model)
        result = run_engine_bench(
            loaded, sizes, new_tokens=tokens, mode=chosen_mode, repeats=repeats, progress=advance,
            cache_dir=settings.model_cache_dir, gguf_type=gguf_type,
            compile=settings.worker.compile if compile is None else compile, sampled=sample,
            kernels=kernels, attention=attention,
        )
    if json_output:
        print(json.dumps(result.as_dict()))
        return
    table = Table(
        title=f"{result.model} on {result.device}, {result.new_tokens} new tokens per row, {result.sampling}, "
        f"{result.threads} thread(s)",
        caption=f"our engine: {result.mode}{' (compiled step)' if result.compiled else ''}"
        f"{', Triton attention' if result.attention == 'triton' else ''}"
        f"{', Triton attention where faster' if result.attention == 'auto' else ''}, built in "
        f"{result.engine_build_s:.1f} s, warmed up in {result.warm_up_s:.1f} s; "
        f"peak memory {result.rss_mb:,.0f} MB (both models)",
    )
    for column in ("batch", "ours tok/s", "generate() tok/s", "ratio"):
        table.add_column(column, justify="right")
    for size in sizes:
        table.add_row(str(size), f"{result.ours[size]:,.1f}", f"{result.baseline[size]:,.1f}", f"{result.ratio(size):.2f}x")
    console.print(table)
    for size, candidates in sorted(result.step_ms.items()):
        timed = ", ".join(f"{name} {ms:.3f} ms" for name, ms in candidates.items())
        console.print(f"decode step at batch {size}: {timed} (the faster serves)")
    if result.first_token_ms:
        times = result.first_token_ms
        ours, warm, base = times["ours"], times["ours_same_persona"], times["baseline"]
        console.print(
            f"first token of a {result.prompt_tokens}-token chat prompt: ours {ours:,.0f} ms "
            f"({warm:,.0f} ms for a new message to the persona it just answered), "
            f"generate() {base:,.0f} ms ({base / ours if ours else 0:.2f}x; {base / warm if warm else 0:.2f}x)"
        )
    if result.llamacpp:
        reference = result.llamacpp[1]
        console.print(
            f"llama.cpp alone (llama-cpp-python's Llama.generate, one sequence, same GGUF): {reference:,.1f} tok/s "
            f"at batch 1; ours at batch 1 is {result.ours.get(1, 0.0) / reference:.2f}x that"
        )


@bench_app.command("serve")
@friendly_errors
def serve(
    device: str = typer.Option(
        "cpu", help="cpu (the bundled model), cuda (a random model of its shape, bf16) or auto (cuda if torch sees a GPU)"
    ),
    requests: int = typer.Option(0, min=0, help="requests waiting at the start (default: 24 on CPU, 512 on cuda)", show_default=False),
    concurrency: int = typer.Option(0, min=0, help="requests decoding at once (default: 8 on CPU, 128 on cuda)", show_default=False),
    longest: int = typer.Option(
        0, min=0, help="the longest reply, in tokens; others are 1/2, 1/4 or 1/8 of it (default: 64 on CPU, 256 on cuda)",
        show_default=False,
    ),
    mode: str = typer.Option("", help="our engine's path: auto, eager, fused, int8 or llamacpp (default: the worker setting)"),
    threads: int = typer.Option(None, min=1, help=THREADS_HELP),
    tokenizer: Path | None = typer.Option(
        None, exists=True, file_okay=False,
        help="GPU: a saved tokenizer folder for the random-weight model, where the bundled GGUF is not installed",
    ),
    repeats: int = typer.Option(
        2, min=1, help="runs each way, ours and generate() taking turns; the fastest counts (ours' first pays one-off "
        "captures)",
    ),
    json_output: bool = typer.Option(False, "--json", help="print one JSON object"),
) -> None:
    """A backlog of chat requests of mixed lengths: our engine with continuous batching, the
    same engine one batch at a time, and plain generate() one batch at a time."""
    settings = get_settings()
    chosen_mode = _engine_mode(mode or settings.worker.engine)
    device = _bench_device(settings, device, json_output)
    on_gpu = device != "cpu"
    requests = requests or (512 if on_gpu else 24)
    concurrency = concurrency or (128 if on_gpu else 8)
    longest = longest or (256 if on_gpu else 64)
    from persona.bench_serve import run_serve_bench

    with console.status("loading the model...") as status:
        loaded = _bench_model(settings, device, threads, tokenizer)
        status.update("building and warming up our engine...")
        result = run_serve_bench(
            loaded, requests=requests, concurrency=concurrency, longest=longest, mode=chosen_mode,
            cache_dir=settings.model_cache_dir, gguf_type=settings.worker.gguf_type, compile=settings.worker.compile,
            kernels=settings.worker.kernels, attention=settings.worker.attention, repeats=repeats,
            progress=lambda name: status.update(f"serving {requests} requests: {_SERVED[name]}..."),
        )
    if json_output:
        print(json.dumps(result.as_dict()))
        return
    table = Table(
        title=f"{requests} requests waiting, {concurrency} at a time, replies of {min(result.reply_tokens)}-"
        f"{max(result.reply_tokens)} tokens ({sum(result.reply_tokens):,} in all), {result.model} on {result.device}",
        caption=f"our engine: {result.mode}; useful tokens/s: each request's own tokens over the time to answer all; "
        "answered: seconds from the start",
    )
    for column in ("served by", "useful tok/s", "answered p50", "answered p99", "vs generate()"):
        table.add_column(column, justify="right")
    base = result.baseline.tokens_per_s
    for name in ("ours", "ours_batches", "baseline"):
        served = getattr(result, name)
        table.add_row(
            _SERVED[name], f"{served.tokens_per_s:,.1f}", f"{served.percentile(0.5):.2f} s",
            f"{served.percentile(0.99):.2f} s", f"{served.tokens_per_s / base if base else 0:.2f}x",
        )  # fmt: skip
    console.print(table)
    console.print(f"continuous batching alone: {result.continuous_gain:.2f}x the same engine one batch at a time")


_SERVED = {
    "ours": "ours, continuous batching",
    "ours_batches": "ours, one batch at a time",
    "baseline": "generate(), one batch at a time",
}


def register(app: typer.Typer) -> None:
    register_bench(bench_app)
    app.add_typer(bench_app, name="bench")
