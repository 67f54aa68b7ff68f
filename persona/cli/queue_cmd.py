"""`persona queue ...`: looking at the queue."""

from __future__ import annotations

import time

import typer
from rich.table import Table

from persona.cli.common import console, friendly_errors, get_settings
from persona.connection import connect
from persona.monitoring import QueueStats, collect_stats

queue_app = typer.Typer(help="Watch the queue and handle dead letters.", no_args_is_help=True)


def render_stats(stats: QueueStats) -> Table:
    """The figures as one table per section, ready to print."""
    table = Table(title="queue", show_header=True, header_style="bold")
    table.add_column("stream")
    table.add_column("waiting", justify="right")
    table.add_column("in flight", justify="right")
    for stream in stats.streams:
        table.add_row(stream.name, str(stream.waiting), str(stream.in_flight))
    table.add_row("dead letters", str(stats.dead_letters), "")
    table.add_row("completed", str(stats.completed), "")
    table.add_row("failed", str(stats.failed), "")
    for name, value in sorted(stats.counters.items()):
        if name.startswith("failed:"):
            table.add_row(f"  {name}", str(value), "")
    return table


def render_workers(stats: QueueStats) -> Table:
    table = Table(title=f"workers ({len(stats.workers)} live)", header_style="bold")
    for column in ("worker", "host", "device", "state", "personas", "requests", "memory MB", "seen"):
        table.add_column(column)
    now = time.time()
    for w in stats.workers:
        personas = ", ".join(f"{k}@{v}" for k, v in sorted(w.personas.items())) or "-"
        table.add_row(
            w.id, w.host, w.device, w.state, personas, str(w.requests), f"{w.memory_mb:.0f}", f"{now - w.last_seen:.1f}s ago"
        )
    return table


@queue_app.command()
@friendly_errors
def stats(json_output: bool = typer.Option(False, "--json", help="print one JSON object")) -> None:
    """Depth per stream, in-flight work, completed and failed counts, live workers."""
    figures = collect_stats(connect(get_settings()))
    if json_output:
        print(figures.model_dump_json())
        return
    console.print(render_stats(figures))
    console.print(render_workers(figures))


def register(app: typer.Typer) -> None:
    app.add_typer(queue_app, name="queue")
