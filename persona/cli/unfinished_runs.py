"""A persona's unfinished training run in words: the line and JSON the listings show, and the
command that continues it."""

from __future__ import annotations

import shlex
from pathlib import Path
from typing import TYPE_CHECKING

from persona.cli.common import local_time

if TYPE_CHECKING:
    from training.run_folder import UnfinishedRun

__all__ = ["continue_command", "resume_command", "unfinished_json", "unfinished_line", "unfinished_refusal"]


def resume_command(name: str, corpus: Path) -> str:
    """The command that continues NAME's interrupted run, quoted for a shell; it works from any
    directory (a relative corpus that is here is named from here; one that is not, recorded by
    an older version relative to where it ran, as recorded: made absolute from here, it named a
    file that was never there)."""
    shown = corpus.absolute() if corpus.is_absolute() or corpus.exists() else corpus
    return shlex.join(["persona", "train", name, "--corpus", str(shown), "--resume"])


def unfinished_line(run: UnfinishedRun) -> str:
    """A persona's unfinished run in one line: training now, or stopped and how far, and the
    command that goes on with it (a Ctrl-C'd run was listed nowhere)."""
    how_far = f"step {run.step} of {run.total_steps}" if run.step is not None else ""
    if run.running:
        who = f"process {run.trainer_pid}" if run.trainer_pid else "another process"
        saved = f", last saved at {how_far}" if how_far else ""
        return f"{run.persona}: training now ({who}{saved}); it registers a checkpoint when it ends"
    if not run.resumable:
        again = shlex.join(["persona", "train", run.persona, "--corpus", str(run.corpus) if run.corpus else "FILE"])
        return (f"{run.persona}: unfinished training run that saved nothing to continue; start it again with "
                f"`{again}`, or delete it with `{shlex.join(['rm', '-r', str(run.folder)])}`")
    stopped = f"stopped at {how_far}, saved {local_time(run.saved_at or 0)}" if how_far else \
        f"saved {local_time(run.saved_at or 0)}"
    return f"{run.persona}: unfinished training run ({stopped}); continue it with `{continue_command(run)}`{_corpus_gone(run)}"


def unfinished_refusal(run: UnfinishedRun) -> str:
    """Why a new run of a persona with a stopped, resumable run waits for a choice: it would throw
    that one away (forgetting --resume did, with only a warning)."""
    how_far = f"stopped at step {run.step} of {run.total_steps}, " if run.step is not None else ""
    return (f"persona {run.persona!r} has an unfinished training run ({how_far}saved "
            f"{local_time(run.saved_at or 0)}), which a new run would discard; continue it with "
            f"`{continue_command(run)}`{_corpus_gone(run)}, or discard it and start over by running this command again "
            "with --restart")


def unfinished_json(run: UnfinishedRun) -> dict:
    """A persona's unfinished run as ``--json`` prints it."""
    return {"persona": run.persona, "folder": str(run.folder), "corpus": str(run.corpus) if run.corpus else None,
            "running": run.running, "trainer_pid": run.trainer_pid, "resumable": run.resumable,
            "step": run.step, "total_steps": run.total_steps, "saved_at": run.saved_at,
            "resume_command": continue_command(run) if run.resumable and not run.running else None}


def continue_command(run: UnfinishedRun) -> str:
    """The command that goes on with an unfinished run, for a shell: on the corpus it started on,
    as its run.json names it, or on FILE where that is not there now (``_corpus_gone``)."""
    if run.corpus is None or not run.corpus.is_file():  # a run saved before run.json named its corpus, or moved
        return f"persona train {run.persona} --corpus FILE --resume"
    if not run.corpus.is_absolute():  # recorded by an older version, relative to where it ran: as recorded
        return shlex.join(["persona", "train", run.persona, "--corpus", str(run.corpus), "--resume"])
    return resume_command(run.persona, run.corpus)


def _corpus_gone(run: UnfinishedRun) -> str:
    """What to do about the corpus an unfinished run started on that is not there now (moved, or
    named relative to where an older version ran it: made absolute from here, it named a file
    that was never there); "" where it is."""
    if run.corpus is None or run.corpus.is_file():
        return ""
    return f" (it started on the corpus {run.corpus}, which is not there now; name where it is)"
