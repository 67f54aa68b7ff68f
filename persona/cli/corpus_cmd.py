"""`persona corpus build`: an author's writing made into a clean training corpus."""

from __future__ import annotations

import difflib
import re
import shlex
import time
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING

import typer
from rich.markup import escape

from persona.cli.common import console, err_console, friendly_errors, get_settings
from persona.cli.training_common import warn_nothing_held_out
from persona.errors import CorpusError

if TYPE_CHECKING:  # imported where used: `persona --help` does not wait for the readers
    from training.fortune import AttributionsRemoved
    from training.sources import Draft, SourceProblem

__all__ = ["corpus_build", "register"]

corpus_app = typer.Typer(help="Turn an author's writing into a clean training corpus.", no_args_is_help=True)

DRAFTS_NAMED = 5  # more drafts than this are summed up in one line
PROGRESS_EVERY_S = 5.0  # a build this long says how far it has got, as often as this


@corpus_app.command("build")
@friendly_errors
def corpus_build(
    sources: list[Path] = typer.Argument(..., metavar="SOURCE", help="files or folders of the author's writing (an X export's zip as downloaded too)"),
    output: Path = typer.Option(..., "-o", "--output", help="the corpus file to write (JSONL)"),
    fmt: str = typer.Option("auto", "--format", help="how to read the sources: auto (each file by its name and "
                            "first lines), text, markdown, csv, jsonl, pdf, tweets, fortune or html"),
    author: str = typer.Option(None, help="fortune files: keep only the entries signed '-- NAME' (signatures are removed either way)"),
    column: str = typer.Option("text", help="CSV: the column holding the text"),
    field: str = typer.Option("text", help="JSONL: the field holding the text (a.b for nested)"),
    strip_urls: bool = typer.Option(False, "--strip-urls", help="remove web links from the text"),
    strip_handles: bool = typer.Option(False, "--strip-handles", help="remove @handles from the text"),
    keep_replies: bool = typer.Option(False, "--keep-replies", help="tweets and Mastodon outboxes: keep replies to other people too"),
    keep_retweets: bool = typer.Option(False, "--keep-retweets", help="tweets: keep retweets too"),
    min_chars: int = typer.Option(1, min=1, help="drop documents shorter than this"),
    base: str = typer.Option("smollm2", help="count tokens with this model's tokenizer ('' for words only)"),
) -> None:
    """Read, clean and de-duplicate an author's writing into one document per line, with a held-out split."""
    from training.cleaning import CleanOptions
    from training.corpus import build_corpus, is_built_corpus, write_corpus
    from training.scanning import source_files
    from training.sources import ReadOptions

    if output.is_dir():  # found out only after reading everything, as a traceback
        raise CorpusError(f"{output} is a folder; name the corpus file to write, e.g. -o {output / 'corpus.jsonl'}")
    if any(source.is_file() and source.resolve() == output.resolve() for source in sources):
        raise CorpusError(f"{output} is one of the files to read: the corpus would be written over the "
                          "author's writing; choose another -o")
    if output.is_file() and output.stat().st_size and not is_built_corpus(output):
        # A file in a folder being read (the author's notes.txt) is left out of the build: it
        # must not then be written over either.
        raise CorpusError(f"{output} exists and is not a corpus this command wrote; it would be written over. "
                          "Choose another -o, or remove it first if it can go")
    result = build_corpus(
        sources, fmt=fmt,
        read_options=ReadOptions(column=column, field=field, author=author,
                                 keep_replies=keep_replies, keep_retweets=keep_retweets),
        clean_options=CleanOptions(strip_urls=strip_urls, strip_handles=strip_handles, min_chars=min_chars),
        exclude=[output],
        progress=_ProgressLine(),
    )
    _say_problems(result.problems)
    for why, paths in result.passed_over.items():
        err_console.print(f"[yellow]left out[/yellow] {escape(_passed_over(why, paths))}", highlight=False)
    if result.left_out:
        err_console.print(f"[yellow]left out[/yellow] {escape(_left_out(result.left_out))}", highlight=False)
    corpus = result.corpus
    if not corpus.documents:
        hint = f" signed by {author!r}" if author else ""
        nearest = _nearest_signatures(author, source_files(sources, [output]), fmt) if author else ""
        raise CorpusError(f"no documents{hint} found in {result.files} file(s); nothing written{nearest}")
    size = _size_line(corpus.train, corpus.validation, base)  # before writing: it may fail (no model cache)
    try:
        write_corpus(corpus, output)
    except OSError as exc:
        raise CorpusError(f"cannot write the corpus to {output}: {exc.strerror or exc}; choose another -o") from exc
    formats = ", ".join(f"{n} {f}" for f, n in sorted(result.by_format.items()))
    dropped = ", ".join(f"{n} {why}" for why, n in sorted(result.cleaning.dropped.items())) or "none"
    console.print(f"read {result.files} file(s): {result.found} documents ({formats})")
    if result.read_in:
        console.print(escape(_read_in(result.read_in)), highlight=False)
    console.print(f"kept {result.cleaning.kept}, dropped {dropped}")
    if result.tail_held_out:
        console.print(f"split: one document, so its last {len(corpus.validation[0].split())} words are held out "
                      "for validation (saved in the file)")
    else:
        console.print(f"split: {len(corpus.train)} train, {len(corpus.validation)} validation (saved in the file)")
    if not corpus.validation:
        warn_nothing_held_out("too few documents to hold any out")
    console.print(escape(size))
    console.print(f"wrote {escape(str(output))}  (fingerprint {corpus.fingerprint})")


class _ProgressLine:
    """A line on stderr every ``PROGRESS_EVERY_S`` seconds of a long build: what it is doing, how far it
    has got (twenty thousand posts take minutes to read and clean); a short build says nothing."""

    def __init__(self) -> None:
        self.last = time.monotonic()

    def __call__(self, stage: str, done: int, total: int) -> None:
        if time.monotonic() - self.last >= PROGRESS_EVERY_S:
            self.last = time.monotonic()
            what = "files" if stage == "reading" else "documents"
            err_console.print(f"{stage}: {done} of {total} {what} ({100 * done // max(total, 1)}%)", highlight=False)


def _say_problems(problems: list[SourceProblem]) -> None:
    """The files that could not be read, and what was left out of those read, each on a line of its own; but
    many drafts in one line, and the attributions removed from several fortune files in one line."""
    from training.fortune import AttributionsRemoved
    from training.sources import Draft

    drafts = [problem for problem in problems if isinstance(problem, Draft)]
    removed = [problem for problem in problems if isinstance(problem, AttributionsRemoved)]
    # A line each: hundreds of drafts, or Debian's forty fortune files, hid everything else said.
    summed: tuple[type[SourceProblem], ...] = ()
    if len(drafts) > DRAFTS_NAMED:
        summed += (Draft,)
    if len(removed) > 1:
        summed += (AttributionsRemoved,)
    for problem in problems:  # escaped: a path may hold brackets ("my [draft] notes")
        if isinstance(problem, summed):
            continue
        # Only a file left out whole was skipped; what was left out of a file read is said under its name.
        said = f"[yellow]skipped[/yellow] {escape(str(problem))}" if problem.whole_file else escape(str(problem))
        err_console.print(said, highlight=False)
    if Draft in summed:
        err_console.print(f"[yellow]left out[/yellow] {escape(_drafts_line(drafts))}", highlight=False)
    if AttributionsRemoved in summed:
        err_console.print(escape(_attributions_line(removed)), highlight=False)


def _drafts_line(drafts: list[Draft]) -> str:
    """Many drafts in one line: how many, what makes them drafts (their front matter, or a drafts folder), the
    first few, and how to read one."""
    marked = [draft for draft in drafts if draft.setting is not None]
    placed = sorted({draft.folder for draft in drafts if draft.setting is None})
    why, how = [], []
    if marked:
        settings = " or ".join(sorted({draft.setting for draft in marked}))
        why.append(f"whose front matter sets {settings}")
        how.append(f"set {' or '.join(sorted({draft.undo for draft in marked}))} in its front matter")
    if placed:
        folders = " or ".join(f"{folder}/" for folder in placed)
        why.append(f"in a {folders} folder, whose posts Jekyll does not publish")
        how.append(f"move it from {folders} to _posts/")
    if marked and placed:  # how many of each
        why = [f"{len(marked)} {why[0]}", f"{len(drafts) - len(marked)} {why[1]}"]
    named = ", ".join(str(draft.path) for draft in drafts[:3])
    return f"{len(drafts)} drafts, {' and '.join(why)}: {named} and {len(drafts) - 3} more; to read one, {', or '.join(how)}"


def _attributions_line(removed: list[AttributionsRemoved]) -> str:
    """The attributions removed from several fortune files, in one line: how many, from how many files, the first."""
    return (f"{sum(problem.count for problem in removed)} attribution(s) removed from {len(removed)} fortune files "
            f"(\"-- {removed[0].first}\" ...), so that the persona does not sign its posts with other people's names")


def _left_out(paths: list[Path]) -> str:
    """The files in the folders named that were not read, counted by kind."""
    kinds = Counter(path.suffix.lower() for path in paths)
    listing = ", ".join(f"{count} {kind}" for kind, count in kinds.most_common(5)) + (", ..." if len(kinds) > 5 else "")
    return (f"{len(paths)} file(s) in the folders that are no kind of writing it reads ({listing}); "
            "name a file to read it, with --format if its name does not say what it is")


# What each kind of thing a folder scan passed over is, and what to do to read it.
_PASSED_OVER = {
    "folders": (("folder(s) that a site generator or package manager owns (a theme and its example posts, the "
                 "built site, its templates, static files, packages), not the author's writing"),
                "name one to read it"),
    "project files": ("project file(s), not posts (README, LICENSE, robots.txt...)", "name one to read it"),
    "deleted posts": ("file(s) of posts the author deleted, on purpose", "a persona should not post them again"),
    "export records": (("other file(s) of the X export (likes, messages, the account's settings), no posts of "
                        "the author's"),
                       "its tweets.js and note-tweet.js are read"),
    "documents": ("document(s) in a format not read here (Word, EPUB, OpenDocument, RTF, Pages)",
                  ("convert each to plain text, e.g. `pandoc FILE -t plain --wrap=none -o FILE.txt` (pandoc reads "
                   "Word, EPUB, OpenDocument and RTF), and name the .txt")),
}
NAMES_SHOWN = 5  # files or folders named in a line that counts them


def _passed_over(why: str, paths: list[Path]) -> str:
    """One line: what a folder scan passed over for one reason, how many, the first few, and what to do."""
    what, todo = _PASSED_OVER[why]
    shown = ", ".join(str(path) for path in sorted(paths)[:NAMES_SHOWN])
    more = f" and {len(paths) - NAMES_SHOWN} more" if len(paths) > NAMES_SHOWN else ""
    return f"{len(paths)} {what}: {shown}{more}; {todo}"


def _read_in(read_in: Counter[Path]) -> str:
    """The folders the files read from the folders named were in, with how many from each, most first."""
    folders = read_in.most_common()
    shown = ", ".join(f"{folder} ({count})" for folder, count in folders[:NAMES_SHOWN])
    more = f" and {len(folders) - NAMES_SHOWN} more folders" if len(folders) > NAMES_SHOWN else ""
    return f"files read from: {shown}{more}"


_SIGNATURE = re.compile(r"^[ \t]*(?:--|—|―|~)[ \t]*(?P<who>[^,(\n\"“]+)", re.MULTILINE)  # "-- Oscar Wilde, ..."


def _nearest_signatures(author: str, files: list[Path], fmt: str) -> str:
    """". Nearest signatures: 'Oscar Wilde' (61 entries); ..." for an --author that signs none of the fortune files'
    entries (a name mistyped, or signed otherwise); else nothing."""
    from training.sources import SourceProblem, detect_format, read_text_file

    signed: Counter[str] = Counter()
    for path in files:
        if (fmt if fmt != "auto" else detect_format(path)) != "fortune":
            continue
        try:
            signed.update(match["who"].strip(" \t.;:") for match in _SIGNATURE.finditer(read_text_file(path)))
        except SourceProblem:
            continue
    by_folded = {name.casefold(): name for name, _ in signed.most_common()}
    wanted = author.strip().casefold()
    close = difflib.get_close_matches(wanted, list(by_folded), n=3, cutoff=0.6)
    if not close:  # a surname alone: "Wild" for "Oscar Wilde"
        last = {name.split()[-1]: name for name in reversed(by_folded) if name.split()}
        close = [last[word] for word in difflib.get_close_matches(wanted, list(last), n=3, cutoff=0.75)]
    if not close:
        return ""
    names = [by_folded[name] for name in close]
    listed = "; ".join(f"{name!r} ({signed[name]} {'entry' if signed[name] == 1 else 'entries'})" for name in names)
    return f". Nearest signatures: {listed}; try --author {shlex.quote(names[0])}"


def _tokenizer(base: str):
    """The base model's tokenizer (the bundled model's weights are not converted for it)."""
    from transformers import AutoTokenizer

    from persona.models import resolve_base

    return AutoTokenizer.from_pretrained(resolve_base(base, get_settings().model_cache_dir, weights=False))


def _size_line(train: list[str], validation: list[str], base: str | None) -> str:
    words = sum(len(t.split()) for t in train + validation)
    if not base:
        return f"size: {words} words"
    tokenizer = _tokenizer(base)
    # +2: the start and end-of-text tokens every document is trained with.
    count = lambda texts: sum(len(tokenizer.encode(t, add_special_tokens=False)) + 2 for t in texts)  # noqa: E731
    return f"size: {words} words; {count(train)} train tokens, {count(validation)} validation tokens ({base})"


def register(app: typer.Typer) -> None:
    """Add `persona corpus` to ``app``."""
    app.add_typer(corpus_app, name="corpus")
