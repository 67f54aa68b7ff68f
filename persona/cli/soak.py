"""`persona bench soak`: steady load while workers are killed and restarted at random."""

from __future__ import annotations

import json

import typer

from persona.cli.common import console, friendly_errors


@friendly_errors
def soak(
    minutes: float = typer.Option(10.0, min=0.1, help="how long the load runs"),
    workers: int = typer.Option(2, min=1, help="worker processes kept running"),
    rate: float = typer.Option(10.0, min=0.1, help="requests per second sent"),
    chaos_every: float = typer.Option(5.0, min=0.5, help="mean seconds between worker kills/stops"),
    model: str = typer.Option("tiny", help="tiny (random weights, real tokenizer) or bundled"),
    seed: int = typer.Option(0, help="seed of the chaos schedule"),
    json_output: bool = typer.Option(False, "--json", help="print one JSON object"),
) -> None:
    """Send steady load for MINUTES while killing workers; report lost and duplicated replies."""
    from persona.soak import run_soak

    with console.status(f"soaking for {minutes:g} min with {workers} workers at {rate:g} req/s..."):
        report = run_soak(minutes * 60, workers=workers, rate=rate, chaos_every_s=chaos_every, model=model, seed=seed)
    if json_output:
        print(json.dumps(report.as_dict()))
        return
    errors = f" {dict(report.answered_error)}" if report.answered_error else ""
    console.print(
        f"sent {report.sent}, answered {report.answered_ok} ok and {sum(report.answered_error.values())} "
        f"with an error{errors}, lost {report.lost}, duplicated {report.duplicated}; "
        f"{report.kills} SIGKILLs and {report.terms} SIGTERMs; round trip p50 {report.p50_ms:.0f} ms, "
        f"p99 {report.p99_ms:.0f} ms; refused busy {report.refused_busy}"
    )
    if report.lost or report.duplicated:
        raise typer.Exit(1)


def register_bench(bench_app: typer.Typer) -> None:
    bench_app.command()(soak)
