"""An author's corpus: built from source files, saved as JSONL, read back with its split.

One document per line: ``{"text": ..., "split": "train" | "validation"}``. The split is
chosen once, when the corpus is built, from a hash of each text (so it does not depend
on file order), and saved in the file: training, early stopping and ``persona eval`` all
use the same held-out documents. A plain ``{"text": ...}`` JSONL written by hand gets
the same split when it is read, and a warning that it was not cleaned. A corpus of one
long document (a book in one file) has no document to spare: its last tenth, cut at a
paragraph, line, sentence or word break, becomes a held-out document of its own.

Which files of the sources named are read, and what the folders named hold that is not, is
``scanning.py``'s to say; ``BuildResult`` carries it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shlex
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

from persona.errors import CorpusError
from persona.whole_files import write_whole
from training.cleaning import (
    CleanOptions,
    CleanReport,
    Progress,
    clean_documents,
    has_mojibake,
)
from training.fortune import read_fortune
from training.html_text import looks_like_html, read_html
from training.json_records import read_jsonl
from training.markdown import read_markdown
from training.pdf import read_pdf
from training.scanning import scan_sources
from training.sources import (
    FORMATS,
    Documents,
    RawDocument,
    ReadOptions,
    SourceProblem,
    detect_format,
    json_lines,
    read_csv,
    read_text,
)
from training.tweets import read_tweets

__all__ = [
    "VALIDATION_FRACTION",
    "BuildResult",
    "Corpus",
    "assign_splits",
    "build_corpus",
    "check_corpus_path",
    "check_trainable",
    "is_built_corpus",
    "read_corpus",
    "write_corpus",
]

log = logging.getLogger(__name__)

VALIDATION_FRACTION = 0.1
MAX_VALIDATION_DOCS = 1000
TAIL_HELD_OUT_MIN_CHARS = 10_000  # one document this long holds out its end (a tenth: some 250 words)
SPLITS = ("train", "validation")

Reader = Callable[[Path, ReadOptions], list[RawDocument]]
READERS: dict[str, Reader] = {
    "text": read_text,
    "markdown": read_markdown,
    "csv": read_csv,
    "jsonl": read_jsonl,
    "pdf": read_pdf,
    "tweets": read_tweets,
    "fortune": read_fortune,
    "html": read_html,
}


@dataclass
class Corpus:
    """The documents of a corpus, by split, and a fingerprint of its content."""

    train: list[str]
    validation: list[str]
    fingerprint: str
    path: Path | None = None

    @property
    def documents(self) -> list[str]:
        return [*self.train, *self.validation]


@dataclass
class BuildResult:
    """What building a corpus kept, dropped and could not read."""

    corpus: Corpus
    files: int = 0
    found: int = 0
    cleaning: CleanReport = field(default_factory=CleanReport)
    # Files that could not be read, and what readers left out on purpose (a draft, records without the field).
    problems: list[SourceProblem] = field(default_factory=list)
    by_format: Counter[str] = field(default_factory=Counter)
    tail_held_out: bool = False  # the one document's end was held out
    left_out: list[Path] = field(default_factory=list)  # files in the folders named of no kind read here
    # Folders and files in the folders named that are no writing of the author's, by why (``scanning.PASSED_OVER``).
    passed_over: dict[str, list[Path]] = field(default_factory=dict)
    read_in: Counter[Path] = field(default_factory=Counter)  # files read from each folder, in the folders named


def _text_hash(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def assign_splits(texts: list[str], fraction: float = VALIDATION_FRACTION) -> list[str]:
    """"train" or "validation" for each text: the ones whose hash sorts first are held out."""
    if len(texts) < 2:
        return ["train"] * len(texts)
    count = min(MAX_VALIDATION_DOCS, max(1, round(len(texts) * fraction)))
    held_out = set(sorted(range(len(texts)), key=lambda i: (_text_hash(texts[i]), i))[:count])
    return ["validation" if i in held_out else "train" for i in range(len(texts))]


def _cut_tail(text: str, fraction: float = VALIDATION_FRACTION) -> tuple[str, str]:
    """A long text cut in two near its last ``fraction``: at the last paragraph break before
    that point (within as much again), else a line, sentence or word break, else there."""
    target = round(len(text) * (1 - fraction))
    earliest = round(len(text) * (1 - 2 * fraction))
    for separator in ("\n\n", "\n", ". ", " "):
        found = text.rfind(separator, earliest, target)
        if found > 0:
            cut = found + len(separator)
            break
    else:
        cut = target
    return text[:cut].rstrip(), text[cut:].strip()


def _fingerprint(rows: Iterable[tuple[str, str]]) -> str:
    """A short hash of the documents and their splits, whatever their order in the file."""
    digest = hashlib.sha256()
    for split, text in sorted((split, text) for text, split in rows):
        digest.update(split.encode() + b"\0" + text.encode("utf-8") + b"\0")
    return digest.hexdigest()[:16]


def build_corpus(
    sources: list[Path],
    *,
    fmt: str = "auto",
    read_options: ReadOptions | None = None,
    clean_options: CleanOptions | None = None,
    exclude: Iterable[Path] = (),
    progress: Progress | None = None,
) -> BuildResult:
    """Read every source, clean the documents and split them; unreadable files, and writing left out
    on purpose (drafts, records without the field), are reported in ``problems``.

    ``exclude``: files not to read from the folders named (the corpus file being written).
    ``progress``: told ("reading", files done, files) before each file, then ("indexing", ...) and
    ("cleaning", ...) as ``clean_documents`` tells it.
    """
    if fmt not in FORMATS:
        raise CorpusError(f"unknown format {fmt!r}; choose one of {', '.join(FORMATS)}")
    read_options = read_options or ReadOptions()
    scan = scan_sources(sources, exclude)
    files = scan.files
    raw: list[str] = []
    problems: list[SourceProblem] = []
    by_format: Counter[str] = Counter()
    for done, path in enumerate(files):
        if progress:
            progress("reading", done, len(files))
        chosen = detect_format(path) if fmt == "auto" else fmt
        try:
            documents = READERS[chosen](path, read_options)
        except SourceProblem as problem:
            log.info("skipping %s", problem)  # the caller reports problems: a warning would print each twice
            problems.append(problem)
            continue
        if isinstance(documents, Documents):  # a draft, records without the field: reported like a bad file
            problems.extend(documents.left_out)
        by_format[chosen] += len(documents)
        raw.extend(doc.text for doc in documents)
        _warn_of_mojibake(path, [doc.text for doc in documents])
    texts, report = clean_documents(raw, clean_options, progress)
    splits = assign_splits(texts)
    tail_held_out = len(texts) == 1 and len(texts[0]) >= TAIL_HELD_OUT_MIN_CHARS
    if tail_held_out:  # nothing to hold out but part of the one document
        texts, splits = list(_cut_tail(texts[0])), ["train", "validation"]
    corpus = Corpus(
        train=[t for t, s in zip(texts, splits) if s == "train"],
        validation=[t for t, s in zip(texts, splits) if s == "validation"],
        fingerprint=_fingerprint(zip(texts, splits)),
    )
    return BuildResult(corpus, len(files), len(raw), report, problems, by_format, tail_held_out, scan.left_out,
                       scan.passed_over, scan.read_in)


def _warn_of_mojibake(path: Path, texts: list[str]) -> None:
    """Warn, in one line, when a file's documents hold UTF-8 read as another encoding: kept as they are,
    since a guess at repairing them could as well spoil a text that means what it says."""
    garbled = sum(map(has_mojibake, texts))
    if garbled:
        log.warning("%s: %d of %d document(s) hold UTF-8 read as another encoding (\"cafÃ©\" for \"café\", "
                    "\"â€™\" for \"’\"), kept as they are. If the file was converted to UTF-8 twice, "
                    "`iconv -f UTF-8 -t WINDOWS-1252 %s > fixed.txt` undoes one; then build from fixed.txt",
                    path, garbled, len(texts), path)


def write_corpus(corpus: Corpus, path: Path) -> None:
    """Save a corpus as JSONL with each document's split: line by line to a file beside it, then renamed into
    place, so that a crash or a full disk never leaves half a corpus under its name (nor holds the whole in
    memory as one string: three times the file's size)."""
    target = path.resolve() if path.is_symlink() else path  # written where the link points, as before
    target.parent.mkdir(parents=True, exist_ok=True)

    def lines(out: TextIO) -> None:
        for split, texts in (("train", corpus.train), ("validation", corpus.validation)):
            out.writelines(json.dumps({"text": text, "split": split}, ensure_ascii=False) + "\n" for text in texts)

    write_whole(target, lines)  # a build that reads the folder passes over a kill's leftover
    corpus.path = path


def is_built_corpus(path: Path) -> bool:
    """Whether ``path`` holds a corpus ``write_corpus`` wrote (every line a text and its
    split, nothing else): one that a new build may write over. Anything else there, an
    author's JSONL or notes, would be lost."""
    try:
        with path.open(encoding="utf-8") as lines:
            for line in lines:
                if not line.strip():
                    continue
                row = json.loads(line)
                if not (isinstance(row, dict) and row.keys() == {"text", "split"} and row["split"] in SPLITS):
                    return False
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return False
    return True


def check_corpus_path(path: Path) -> None:
    """Refuse, saying what to do, a corpus path that is a folder or is not there; a command checks it
    before it loads a model (seconds), then reads it."""
    if path.is_dir():
        raise CorpusError(f"corpus {path} is a folder; name the corpus file in it, or build one with "
                          f"`persona corpus build {path} -o corpus.jsonl`")
    if not path.exists():  # not is_file(): a pipe or process substitution is no regular file, yet readable
        raise CorpusError(f"corpus {path} does not exist; build one with `persona corpus build SRC... -o {path}`")


def check_trainable(corpus: Corpus, path: Path) -> None:
    """Refuse, saying what to do, a corpus with no documents to train on (all held out); a command
    checks it before it loads a model."""
    if not corpus.train:
        raise CorpusError(f"corpus {path} has no training documents; add more writing")


def _warn_not_cleaned(path: Path, texts: list[str]) -> None:
    """Say, in one line, that a corpus written otherwise than by `corpus build` is trained on as it is."""
    marked = sum(map(looks_like_html, texts))
    html = f"; {marked} of its {len(texts)} documents hold HTML tags" if marked else ""
    named = path.is_file()  # a pipe's /dev/fd/63 cannot be built from: it is read once
    source = shlex.quote(str(path)) if named else "FILE.jsonl"
    clean = shlex.quote(str(path.with_name(f"{path.stem}-clean.jsonl"))) if named else "clean.jsonl"
    log.warning("%s was not written by `persona corpus build` (not every line is a text and its split), so it was "
                "not cleaned: HTML, links, duplicates and empty lines are trained on as they are%s. To clean it: "
                "`persona corpus build %s -o %s`, then use that one", path, html, source, clean)


def read_corpus(path: Path) -> Corpus:
    """A corpus file, with the split it was saved with (or the standard one if none); a pipe
    (``--corpus <(zcat corpus.jsonl.gz)``) is read too, once."""
    check_corpus_path(path)
    texts: list[str] = []
    saved: list[str | None] = []
    built = True  # every line a text and its split, as `corpus build` writes them
    try:
        # utf-8-sig: a corpus written by hand in an editor may start with a byte-order mark.
        content = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        raise CorpusError(f"cannot read corpus {path}: {exc}") from exc
    for number, line in enumerate(json_lines(content), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise CorpusError(f"{path}:{number}: not JSON ({exc.msg}); a corpus has one {{\"text\": ...}} per line. "
                              "If it is the author's writing (an X export's tweets.js, a CSV, notes), make a corpus "
                              f"of it: `persona corpus build {shlex.quote(str(path))} -o corpus.jsonl`, then train on "
                              "corpus.jsonl") from exc
        text = row.get("text") if isinstance(row, dict) else None
        if not isinstance(text, str):
            raise CorpusError(f"{path}:{number}: no \"text\" field; a corpus has one {{\"text\": ...}} per line. "
                              "If its records hold the author's writing in another field, make a corpus of it: "
                              f"`persona corpus build {shlex.quote(str(path))} --field FIELD -o corpus.jsonl`")
        if text.strip():
            texts.append(text)
            split = row.get("split")
            saved.append(split if split in SPLITS else None)
            built = built and row.keys() == {"text", "split"} and split in SPLITS
    if not texts:
        raise CorpusError(f"corpus {path} holds no documents; rebuild it with `persona corpus build`")
    if any(s is None for s in saved):
        saved = assign_splits(texts)
    if not built:
        _warn_not_cleaned(path, texts)
    return Corpus(
        train=[t for t, s in zip(texts, saved) if s == "train"],
        validation=[t for t, s in zip(texts, saved) if s == "validation"],
        fingerprint=_fingerprint(zip(texts, saved)),
        path=path,
    )
