"""`persona generate`: many samples from a persona, as batch work through the queue."""

from __future__ import annotations

import json
import time
from pathlib import Path

import typer
from rich.markup import escape
from rich.progress import BarColumn, Progress, TextColumn

from persona.cli.common import err_console, friendly_errors, get_settings
from persona.cli.training_common import persona_with_weights

__all__ = ["generate", "register"]

GENERATE_WINDOW = 64  # requests in flight at once, well under the queue's length cap
SAMPLE_SEPARATOR = "=" * 20 + "\n"


def _finish(text: str, prefix: str, include_prefix: bool, truncate: str | None) -> str:
    """A sample as the user reads it: cut at ``truncate``, after its prefix where asked (a
    continuation keeps its own leading space: "Life is" + " often", "Tomor" + "row")."""
    if truncate and truncate in text:
        text = text[: text.index(truncate)]
    return prefix + text if include_prefix else text.lstrip()


@friendly_errors
def generate(
    name: str = typer.Argument(..., metavar="NAME", help="the persona that writes"),
    prefix: str = typer.Option("", help="text every sample starts from (default: nothing)"),
    n: int = typer.Option(8, "-n", "--nsamples", min=1, help="how many samples"),
    out: Path = typer.Option(None, "--out", help="write samples here (.jsonl: one JSON per line)"),
    include_prefix: bool = typer.Option(True, "--include-prefix/--no-include-prefix", help="start each sample with the prefix"),
    truncate: str = typer.Option(None, help="cut each sample at the first occurrence of this text"),
    temperature: float = typer.Option(None, min=0.0, max=5.0, help="override the persona's temperature"),
    max_new_tokens: int = typer.Option(None, min=1, help="override the sample length limit"),
    seed: int = typer.Option(None, help="sample i uses seed+i, for repeatable samples"),
    timeout: float = typer.Option(600.0, min=1.0, help="seconds to wait for all samples"),
) -> None:
    """Many samples from NAME as batch work through the queue, for curation by hand."""
    from persona.connection import connect
    from persona.contract import GenerationRequest, Priority, SamplingOverrides
    from persona.queue import QueueClient

    settings = get_settings()
    persona_with_weights(settings, name, "sample")
    client = QueueClient(connect(settings), settings.queue)
    deadline = time.time() + timeout
    texts: list[str] = []
    failures: list[str] = []
    with Progress(TextColumn("sampling"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                  console=err_console) as progress:
        task = progress.add_task("sampling", total=n)
        for begin in range(0, n, GENERATE_WINDOW):
            waiting = [
                client.submit(GenerationRequest(
                    persona=name, mode="complete", prefix=prefix, priority=Priority.batch, source="cli-generate",
                    deadline=deadline, sampling=SamplingOverrides(
                        temperature=temperature, max_new_tokens=max_new_tokens,
                        seed=None if seed is None else seed + i)))
                for i in range(begin, min(n, begin + GENERATE_WINDOW))
            ]
            for request in waiting:
                reply = client.wait(request)
                if reply.ok:
                    texts.append(_finish(reply.text, prefix, include_prefix, truncate))
                else:
                    failures.append(reply.error.message if reply.error else "failed")
                progress.advance(task)
    _write_samples(texts, out)
    if failures:
        err_console.print(f"[yellow]{len(failures)} of {n} samples failed:[/yellow] {escape(failures[0])}")
        if not texts:
            raise typer.Exit(1)


def _write_samples(texts: list[str], out: Path | None) -> None:
    if out is None:
        for text in texts:
            print(text)
            print(SAMPLE_SEPARATOR, end="")
        return
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.suffix == ".jsonl":
        out.write_text("".join(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in texts))
    else:
        out.write_text("".join(t + "\n" + SAMPLE_SEPARATOR for t in texts))
    err_console.print(f"wrote {len(texts)} samples to {escape(str(out))}")


def register(app: typer.Typer) -> None:
    """Add `persona generate` to ``app``."""
    app.command()(generate)
