"""`persona bench soak`: steady load while workers are killed and restarted at random."""

from __future__ import annotations

import json

import typer

from persona.cli.common import console, friendly_errors


def _model(value: str) -> str:
    from persona.soak import SOAK_MODELS

    if value not in SOAK_MODELS:
        raise typer.BadParameter(f"choose one of {', '.join(SOAK_MODELS)}, not {value!r}")
    return value


@friendly_errors
def soak(
    minutes: float = typer.Option(10.0, min=0.1, help="how long the load runs"),
    workers: int = typer.Option(2, min=1, help="worker processes kept running"),
    rate: float = typer.Option(10.0, min=0.1, help="requests per second sent"),
    chaos_every: float = typer.Option(5.0, min=0.5, help="mean seconds between worker kills/stops"),
    model: str = typer.Option(
        "tiny", callback=_model, help="tiny (random weights, the bundled tokenizer) or bundled (the bundled model)"
    ),
    seed: int = typer.Option(0, help="seed of the chaos schedule"),
    json_output: bool = typer.Option(False, "--json", help="print one JSON object"),
) -> None:
    """Send steady load for MINUTES while killing workers; report lost and duplicated replies.

    Exits 1 if a reply was lost or duplicated, and keeps its temporary folder (the workers'
    logs) for a look; Ctrl-C stops it and prints what was sent so far."""
    from persona.soak import run_soak

    total_s = minutes * 60
    with console.status(f"soaking for {minutes:g} min with {workers} workers at {rate:g} req/s...") as status:

        def progress(report, elapsed_s: float, alive: int) -> None:
            phase = (
                f"soaking: {_clock(elapsed_s)} of {_clock(total_s)}" if elapsed_s < total_s
                else f"load sent; waiting for {report.sent - report.answered - report.lost} replies"
            )
            status.update(
                f"{phase}, {alive} worker(s) up; sent {report.sent}, answered {report.answered}, "
                f"lost {report.lost}; {report.kills} SIGKILLs, {report.terms} SIGTERMs"
            )

        report = run_soak(
            total_s, workers=workers, rate=rate, chaos_every_s=chaos_every, model=model, seed=seed, progress=progress
        )
    if json_output:
        print(json.dumps(report.as_dict()))
    else:
        _print(report)
    if report.interrupted:
        raise typer.Exit(130)
    if report.lost or report.duplicated:
        raise typer.Exit(1)


def _print(report) -> None:
    errors = f" {dict(report.answered_error)}" if report.answered_error else ""
    if report.interrupted:
        console.print(f"interrupted after {report.seconds:g} s; so far:", highlight=False)
    console.print(
        f"sent {report.sent}, answered {report.answered_ok} ok and {sum(report.answered_error.values())} "
        f"with an error{errors}, lost {report.lost}, duplicated {report.duplicated}; "
        f"{report.kills} SIGKILLs and {report.terms} SIGTERMs; round trip p50 {report.p50_ms:.0f} ms, "
        f"p99 {report.p99_ms:.0f} ms; refused busy {report.refused_busy}",
        highlight=False,
    )
    if report.interrupted and report.sent > report.answered + report.lost:
        console.print(f"{report.sent - report.answered - report.lost} request(s) were still waiting when stopped")
    if report.kept:
        console.print(f"kept for a look (the workers' logs, Redis's data): {report.kept}", highlight=False)


def _clock(seconds: float) -> str:
    return f"{int(seconds) // 60}:{int(seconds) % 60:02d}"


def register_bench(bench_app: typer.Typer) -> None:
    bench_app.command()(soak)
