"""`persona personas ...`: listing, showing and validating persona files."""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path

import typer
from rich.markup import escape

from persona.cli.common import (
    console,
    err_console,
    friendly_errors,
    get_settings,
    json_error,
)
from persona.errors import ConfigError, closest
from persona.personas import (
    BUILTIN_PERSONAS_DIR,
    Persona,
    PersonaRegistry,
    unread_reason,
    unscheduled_reason,
)
from persona.settings import Settings

personas_app = typer.Typer(help="List, show and validate persona files.", no_args_is_help=True)


@personas_app.command("list")
@friendly_errors
def list_personas(json_output: bool = typer.Option(False, "--json", help="print one JSON object")) -> None:
    """One persona per line: name, base model and checkpoint, description; then, on stderr,
    any unfinished training run (stopped or running) and the command that continues it.

    With --json: personas (name, base, checkpoint, description, source), invalid (the problem of
    each folder that cannot be read, then of each invalid file) and unfinished_runs (persona,
    running, what to do); the notes on stderr stay there."""
    settings = get_settings()
    registry = PersonaRegistry.from_settings(settings)
    found, problems = registry.scan()
    # A folder that cannot be read, said in full: its personas were missing from the list without a word.
    unreadable = [str(problem) for problem in registry.unreadable_folders().values()]
    for said in [*_missing_folders(settings, registry), *unreadable]:
        err_console.print(f"[yellow]{escape(said)}[/yellow]", highlight=False)
    problems = [problem for problem in problems if str(problem) not in unreadable]  # the files' own, counted below
    _say_none_found(registry, settings, found)
    if json_output:
        _print_listing(found, problems, settings, unreadable)
        return
    for name, persona in sorted(found.items()):
        weights = persona.model.base + (f"+{persona.model.checkpoint}" if persona.model.checkpoint else "")
        # One line each, whatever the file holds: a multi-line description (a TOML """
        # string) or a tab in it used to split a persona across lines and columns.
        print("\t".join(" ".join(field.split()) for field in (name, weights, persona.description)))
    if problems:
        err_console.print(f"[yellow]{len(problems)} invalid persona file(s); see `persona personas validate`[/yellow]")
    _print_unfinished_runs(settings)


def _print_listing(found: dict[str, Persona], problems: list[ConfigError], settings: Settings,
                   unreadable: list[str]) -> None:
    """`personas list --json`'s one object (its notes on stderr, as without --json)."""
    from persona.cli.train_cmd import unfinished_line
    from training.run_folder import unfinished_runs

    personas = [{"name": name, "base": persona.model.base, "checkpoint": persona.model.checkpoint,
                 "description": persona.description, "source": str(persona.source)}
                for name, persona in sorted(found.items())]
    runs = [{"persona": run.persona, "running": run.running, "said": unfinished_line(run)}
            for run in unfinished_runs(settings)]
    invalid = [*unreadable, *(str(problem) for problem in problems)]
    print(json.dumps({"personas": personas, "invalid": invalid, "unfinished_runs": runs}, ensure_ascii=False))
    if problems:
        err_console.print(f"[yellow]{len(problems)} invalid persona file(s); see `persona personas validate`[/yellow]")


def _say_none_found(registry: PersonaRegistry, settings: Settings, found: dict[str, Persona]) -> None:
    """Where `list` looked, on stderr, when it found no valid persona: an install that lost its
    bundled files listed nothing and said nothing, with status 0."""
    if not found and not registry.files():
        err_console.print(f"[yellow]{escape(_none_found(registry, settings))}[/yellow]", highlight=False)


def _none_found(registry: PersonaRegistry, settings: Settings) -> str:
    """That no persona file is in any folder searched, naming each, and where to put one."""
    searched = ", ".join(registry.searched())
    said = (f"no persona files (*.toml) found; searched {searched}. Put one in {settings.user_personas_dir}, "
            "or name the folder that holds yours in PERSONA_PERSONAS_DIRS")
    if not BUILTIN_PERSONAS_DIR.is_dir():
        said += f"; the bundled personas (sage, bofh) belong in {BUILTIN_PERSONAS_DIR}: reinstall persona"
    return said


def _print_unfinished_runs(settings: Settings) -> None:
    """Each training run that has not registered a checkpoint, with the command that goes on
    with it (a run stopped with Ctrl-C was listed nowhere). On stderr: stdout lists personas
    alone, and a first run that was stopped has no persona file yet."""
    from persona.cli.train_cmd import unfinished_line
    from training.run_folder import unfinished_runs

    runs = unfinished_runs(settings)
    if runs:
        err_console.print("[yellow]unfinished training runs:[/yellow]")
    for run in runs:
        err_console.print(f"  {escape(unfinished_line(run))}", highlight=False)


@personas_app.command()
@friendly_errors
def show(
    name: str = typer.Argument(..., help="the persona's name"),
    json_output: bool = typer.Option(False, "--json", help="print one JSON object"),
) -> None:
    """Everything a persona file says, defaults filled in (with --json, also its source: the file)."""
    persona = PersonaRegistry.from_settings(get_settings()).get(name)
    import tomli_w

    data = persona.model_dump(mode="json", exclude_none=True)
    if json_output:
        print(json.dumps({**data, "source": str(persona.source)}, ensure_ascii=False))
        return
    # Where it came from as a TOML comment: the output is itself a valid persona file
    # (a plain header line made `show sage > sage.toml` unreadable).
    source = " ".join(str(persona.source).split())
    print(f"# {persona.name}, from {source}, defaults filled in\n{tomli_w.dumps(data)}", end="")


@personas_app.command()
@friendly_errors
def validate(
    paths: list[str] = typer.Argument(
        None, help="files, folders or persona names to check (default: every persona file)"
    ),
    json_output: bool = typer.Option(False, "--json", help="print one JSON object"),
) -> None:
    """Check persona files; each problem names the file and the exact field.

    Besides the file itself: its base model, checkpoint and filters.corpus must be found
    on this machine, an enabled schedule must be able to post, each sink must be spelt as
    posting reads it, and no two of its sinks may post to one place.

    A warning (on stderr) says what works, but not as meant: a system prompt so long that the
    model's context leaves no room beside it (its end would be cut from every request).

    With --json: ok, and checked (each file: path, problem or null, overridden_by: the namesake
    used instead, or null, and warnings); with any problem, ok false and an error holding them all
    (exit status 1).
    """
    from persona.personas import load_persona_file

    settings = get_settings()
    registry = PersonaRegistry.from_settings(settings)
    # Of namesakes in several folders only the last is used: say so, or a fix made to
    # the other file seems to change nothing.
    searched = registry.files()
    winner = {path.stem: path.resolve() for path in searched}
    if paths:  # a persona's name stands for the file it is read from ("sage: cannot read" sent people looking)
        paths = [str(winner[p]) if p in winner and not _there(Path(p)) else p for p in paths]
    named = [Path(p) for p in paths if _there(Path(p))] if paths else []
    files = _files_named(named) if paths else searched + registry.misnamed()
    searched_here = {path.resolve() for path in searched}
    if paths:  # a folder named with no persona file in it passed as if all were well
        # (A path behind a folder that cannot be read may be a file: it is read as one, and says "cannot read".)
        unreadable = PersonaRegistry([path for path in named if os.path.isdir(path)]).unreadable_folders()
        missing = [str(problem) for problem in unreadable.values()]
        missing += [f"{folder}: no persona files (*.toml) in this folder" for folder in named
                    if folder not in unreadable and os.path.isdir(folder) and not _files_named([folder])]
        missing += [_not_found(p, sorted(winner)) for p in paths if not _there(Path(p))]
        if any(not _there(Path(p)) for p in paths):  # the persona named may be in a folder that cannot be read
            missing += [str(problem) for folder, problem in registry.unreadable_folders().items()
                        if folder not in unreadable]
    else:
        # A folder that cannot be read is a problem: its personas were passed over, and validate passed.
        missing = _missing_folders(settings, registry) + [str(p) for p in registry.unreadable_folders().values()]
        if not files:  # "ok" with nothing checked: an install that lost its persona files passed
            missing.append(_none_found(registry, settings))
    checked = []
    for path in files:
        here = path.resolve()
        warnings: list[str] = []
        try:
            # A file the service never reads (caps.TOML, an editor's lock) is no persona, however valid.
            if unread := unread_reason(path):
                raise ConfigError(f"{path}: never read: {unread}")
            persona = load_persona_file(path)
            _check_usable(persona, settings)
        except ConfigError as exc:
            problem = str(exc)
        else:
            problem = None
            warnings = [f"{path}: {warning}" for warning in _warnings(persona, settings)]
        unused = here in searched_here and winner[path.stem] != here
        checked.append({"path": str(path), "problem": problem, "overridden_by": str(winner[path.stem]) if unused else None,
                        "warnings": warnings})
    problems = missing + [c["problem"] for c in checked if c["problem"]]
    if json_output:
        shown = {"ok": not problems, "checked": checked}
        if problems:
            said = problems[0] if len(problems) == 1 else "\n".join([f"{len(problems)} problems:", *problems])
            shown["error"] = json_error(said, ConfigError.__name__)
        print(json.dumps(shown, ensure_ascii=False))
    else:
        _print_checked(missing, checked)
    if problems:
        raise typer.Exit(1)


def _print_checked(missing: list[str], checked: list[dict]) -> None:
    """What `personas validate` found, a line each: ✗ and the problem on stderr, ✓ and the file on stdout."""
    for problem in missing:
        err_console.print(f"[red]✗[/red] {escape(problem)}", highlight=False)
    for c in checked:
        if c["problem"]:
            err_console.print(f"[red]✗[/red] {escape(c['problem'])}", highlight=False)
        else:
            note = f" [yellow](not used: {escape(c['overridden_by'])} overrides it)[/yellow]" if c["overridden_by"] else ""
            console.print(f"[green]✓[/green] {escape(c['path'])}{note}", highlight=False)
            for warning in c["warnings"]:
                err_console.print(f"[yellow]warning:[/yellow] {escape(warning)}", highlight=False)


def _not_found(named: str, known: list[str]) -> str:
    """What is wrong with a file, folder or persona name to validate that is none of them."""
    if "/" in named or named.endswith(".toml"):
        return f"{named}: no such file or folder"
    meant = closest(named, known)
    hint = f"did you mean {meant!r}?" if meant else "`persona personas list` names the personas"
    return f"{named}: no such file, folder or persona; {hint}"


def _files_named(paths: list[Path]) -> list[Path]:
    """The files named, a folder standing for its persona files (as the service reads them) and
    those meant as such that it never reads (``caps.TOML``)."""
    def within(folder: Path) -> list[Path]:
        registry = PersonaRegistry([folder])
        return sorted([*registry.files(), *registry.misnamed()])

    # A path not even looked at (a folder above it cannot be read) is read as a file: it says "cannot read".
    return [found for path in paths for found in (within(path) if os.path.isdir(path) else [path])]


def _there(path: Path) -> bool:
    """Whether ``path`` is there, or may be: one behind a folder that cannot be read is said to be
    unreadable, not missing (``Path.exists`` raised PermissionError)."""
    try:
        path.stat()
    except (FileNotFoundError, NotADirectoryError):
        return False
    except OSError:  # PermissionError, above all: it may be there
        pass
    return True


def _missing_folders(settings: Settings, registry: PersonaRegistry) -> list[str]:
    """A sentence for each folder PERSONA_PERSONAS_DIRS names that is not one (searched, it
    yielded nothing, without a word); one that cannot be read has a sentence of its own."""
    unreadable = registry.unreadable_folders()
    return [
        f"{folder}: not a folder, yet PERSONA_PERSONAS_DIRS names it; create it or fix the setting"
        for folder in settings.personas_dirs
        if folder not in unreadable and not os.path.isdir(folder)
    ]


def _check_usable(persona: Persona, settings: Settings) -> None:
    """ConfigError if a valid persona file still cannot do what it says on this machine:
    its base model, checkpoint or corpus is not found or not fit to load (nothing is
    loaded), its schedule is enabled but can never post (the scheduler passes it by), a sink's
    spec is misspelt, or two of its sinks post to one place (posting refuses both, by the same
    reading of the specs; a missing credential is not checked: it may be set where it runs)."""
    from adapters.posting.sinks import one_place_twice, parse_sink

    problems = _model_problems(persona, settings)
    corpus = persona.source.parent / Path(persona.filters.corpus).expanduser() if persona.filters.corpus else None
    if corpus is not None and not corpus.is_file():  # relative to the file, as posting reads it
        problems.append(f"filters.corpus: {corpus} is not a file; name the persona's corpus (JSONL), or remove the line")
    if reason := unscheduled_reason(persona):
        problems.append(f"schedule.enabled is true, but {reason}")
    readable = []
    for spec in dict.fromkeys(persona.schedule.sinks):
        try:
            parse_sink(spec)  # posting's own reading: whatever it refuses, validate does (credentials aside)
        except ConfigError as exc:
            problems.append(f"schedule.sinks: {exc}")
        else:
            readable.append(spec)
    if twice := one_place_twice(readable, settings):
        problems.append(f"schedule.sinks: {twice[0]!r} and {twice[1]!r} post to the same place, "
                        "which would get each post twice; list it once")
    if len(problems) == 1:
        raise ConfigError(f"{persona.source}: {problems[0]}")
    if problems:
        raise ConfigError("\n  ".join([f"{persona.source}: {len(problems)} problem(s)", *problems]))


def _model_problems(persona: Persona, settings: Settings) -> list[str]:
    """What the worker would refuse in a persona's base model and checkpoint, found by the
    same checks, reading their folders only (the bundled model is not converted)."""
    from persona.checkpoint_checks import static_problem
    from persona.checkpoints import resolve_checkpoint
    from persona.errors import ModelError
    from persona.models import (
        BUNDLED_ALIASES,
        bundled_gguf_path,
        resolve_base,
        tokenizer_folder,
    )

    problems = []
    base_dir = None
    try:
        if persona.model.base in BUNDLED_ALIASES:
            bundled_gguf_path()  # resolve_base would convert it (seconds): installed is enough
        else:
            base_dir = resolve_base(persona.model.base, settings.model_cache_dir, weights=False)
    except ModelError as exc:
        problems.append(f"model.base: {exc}")
    checkpoint = None
    try:
        _, checkpoint = resolve_checkpoint(persona, settings)
    except ModelError as exc:
        problems.append(f"model.checkpoint: {exc}")
    if checkpoint is not None and (problem := static_problem(persona, checkpoint)):
        problems.append(f"model.checkpoint: {problem}")
    if base_dir is not None:
        try:
            tokenizer_folder(base_dir, checkpoint)
        except ModelError as exc:
            problems.append(f"model.base: {exc}")
    return problems


def _warnings(persona: Persona, settings: Settings) -> list[str]:
    """What works, but not as meant: each said in a sentence with what to change."""
    room = _system_prompt_room(persona, settings)
    return [room] if room else []


def _system_prompt_room(persona: Persona, settings: Settings) -> str:
    """A warning when the system prompt alone leaves the newest message no room in the model's
    context beside the reply ('' when it fits). Counted with the model's tokenizer when its
    folder has a tokenizer.json (no weights are read), else estimated. The worker cut such a
    prompt's end from every request, and spent long on each (a 20,000-word prompt held the only
    worker minutes past its requests' deadlines)."""
    from persona.prompting import MIN_MESSAGE_TOKENS, prompt_budget

    system = persona.prompt.system
    if not system:
        return ""
    folders = _model_folders(persona, settings)
    context = _context_tokens(folders)
    budget = prompt_budget(context, persona.sampling.max_new_tokens)
    tokens = _count_tokens(system, folders)
    if tokens is not None:
        counted = f"{tokens:,} tokens"
    else:  # no tokenizer to read: estimated
        tokens = len(system) // ESTIMATED_CHARS_PER_TOKEN
        counted = f"about {tokens:,} tokens (estimated at {ESTIMATED_CHARS_PER_TOKEN} characters a token)"
    if tokens + MIN_MESSAGE_TOKENS <= budget:
        return ""
    return (
        f"prompt.system is {counted}, and the model reads {context:,} tokens, of which {budget:,} may be prompt "
        f"beside a reply of up to sampling.max_new_tokens ({persona.sampling.max_new_tokens}): the system prompt "
        "alone leaves no room for the conversation, so its end is cut from every request. Shorten prompt.system, "
        "or serve the persona on a model that reads more"
    )


# English averages about 4 characters a token in the BPE vocabularies of small models; an
# estimate at 4 says "too long" only of prompts longer than that.
ESTIMATED_CHARS_PER_TOKEN = 4


def _model_folders(persona: Persona, settings: Settings) -> list[Path]:
    """The folders that say what the persona's model reads, the checkpoint's first; those not
    on this machine (the bundled model before its first use: converting it takes seconds) left out."""
    from persona.checkpoints import resolve_checkpoint
    from persona.errors import ModelError
    from persona.models import BUNDLED_ALIASES, BUNDLED_CACHE_NAME, resolve_base

    folders = []
    with contextlib.suppress(ModelError):
        _, checkpoint = resolve_checkpoint(persona, settings)
        folders += [checkpoint] if checkpoint is not None else []
    if persona.model.base in BUNDLED_ALIASES:
        folders.append(settings.model_cache_dir / BUNDLED_CACHE_NAME)
    else:
        with contextlib.suppress(ModelError):
            folders.append(resolve_base(persona.model.base, settings.model_cache_dir, weights=False))
    return folders


def _context_tokens(folders: list[Path]) -> int:
    """The positions the worker gives the model: its config's (the first folder's that has one), capped;
    the cap when none can be read (the bundled model's own is the cap)."""
    from persona.models import MAX_CONTEXT_TOKENS, context_tokens_of

    for folder in folders:
        try:
            config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        return context_tokens_of(config if isinstance(config, dict) else {})
    return MAX_CONTEXT_TOKENS


def _count_tokens(text: str, folders: list[Path]) -> int | None:
    """``text``'s tokens by the first tokenizer.json among ``folders`` (None if none can be read)."""
    try:
        from tokenizers import Tokenizer
    except ImportError:
        return None
    for folder in folders:
        path = folder / "tokenizer.json"
        if path.is_file():
            try:
                return len(Tokenizer.from_file(str(path)).encode(text, add_special_tokens=False).ids)
            except Exception:  # noqa: BLE001 - the library raises plain Exception for a file it cannot read: estimated instead
                return None
    return None


def register(app: typer.Typer) -> None:
    app.add_typer(personas_app, name="personas")
