"""`persona bench ...`: measure ours against a baseline in the same run."""

from __future__ import annotations

import json

import typer

from persona.cli.common import console, friendly_errors
from persona.cli.soak import register_bench

__all__ = ["bench_app", "register"]

bench_app = typer.Typer(
    help="Benchmarks: each measures ours and a baseline in the same run and prints the ratio.",
    no_args_is_help=True,
)


@bench_app.command("queue")
@friendly_errors
def queue(
    jobs: int = typer.Option(20_000, min=100, help="requests queued up front, then drained by one worker"),
    seconds: float = typer.Option(3.0, min=0.1, help="how long to send one request at a time for latency"),
    batch: int = typer.Option(128, min=1, help="the worker's max_batch (requests claimed per round)"),
    json_output: bool = typer.Option(False, "--json", help="print one JSON object"),
) -> None:
    """Drain rate and round-trip latency of one worker with an instant engine, vs a plain loop."""
    from persona.bench_queue import run_queue_bench

    with console.status(f"draining {jobs} requests, then {seconds:g} s of single round trips..."):
        result = run_queue_bench(jobs=jobs, seconds=seconds, batch=batch)
    if json_output:
        print(json.dumps(result.as_dict()))
        return
    console.print(
        f"ours:     {result.jobs_per_s:>9,.0f} jobs/s drained by one worker; "
        f"round trip p50 {result.p50_ms:.2f} ms, p99 {result.p99_ms:.2f} ms\n"
        f"baseline: {result.baseline_jobs_per_s:>9,.0f} jobs/s (one XREADGROUP, LPUSH, XACK per job); "
        f"round trip p50 {result.baseline_p50_ms:.2f} ms, p99 {result.baseline_p99_ms:.2f} ms\n"
        f"ratio:    {result.ratio:.1f}x the baseline's drain rate",
        highlight=False,
    )


def register(app: typer.Typer) -> None:
    register_bench(bench_app)
    app.add_typer(bench_app, name="bench")
