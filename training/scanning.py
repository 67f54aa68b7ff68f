"""Which files of the sources named are read: the files named, and the files of writing in the folders named.

A folder named is read but for what is no writing of the author's (``OWNED_FOLDERS`` in a site's
root: its theme, its built pages, its packages; packages and hidden folders anywhere; a project's
README and LICENSE; an X export's deleted posts and other records; documents in formats not read here), each passed over said by kind
(``PASSED_OVER``) in the ``Scan``; named itself, such a folder or file is read.
"""

from __future__ import annotations

import os
import re
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from persona.errors import CorpusError
from training.sources import (
    DOCUMENT_SUFFIXES,
    detect_format,
    is_deleted_posts,
    is_note_tweets,
    is_tweet_archive,
)
from training.tweets import tweet_archive_members

__all__ = ["OWNED_FOLDERS", "PASSED_OVER", "Scan", "scan_sources", "source_files"]

_KNOWN_SUFFIXES = {".md", ".markdown", ".txt", ".csv", ".tsv", ".jsonl", ".ndjson", ".pdf", ".js", ".json",
                   ".fortune", ".fortunes", ".u8", ""}


def _looks_readable(path: Path) -> bool:
    """Whether a file found in a folder is writing: a known format, not any .json lying about."""
    suffix = path.suffix.lower()
    if suffix in (".js", ".json"):
        return detect_format(path) == "tweets"
    if suffix == ".zip":  # an X export as downloaded; any other zip is no writing
        return bool(tweet_archive_members(path))
    return suffix in _KNOWN_SUFFIXES


def _is_fortune_index(path: Path) -> bool:
    """Whether a file is the index ``strfile`` made for the fortune file beside it (``NAME.dat``)."""
    return path.suffix.lower() == ".dat" and path.with_suffix("").is_file()


# Folders directly in a site's or a project's root (``_SITE_ROOT_FILES``) that hold no writing of the author's: what
# a site generator makes, copies or builds from (Hugo, Jekyll, Eleventy, Gatsby, WordPress), themes and their example
# posts, and packages. Elsewhere a folder so named ("writing/public") is the author's. Named as a source, one is read.
OWNED_FOLDERS = frozenset({
    "themes", "exampleSite", "archetypes", "layouts", "static", "assets", "resources", "i18n", "public",
    "_site", "_layouts", "_includes", "_sass", "_data", "_plugins", "wp-admin", "wp-includes", "wp-content", "plugins",
    "vendor",
})
# Folders a tool owns wherever they are (as are hidden folders such as .git, and a virtualenv: one with pyvenv.cfg).
_TOOL_FOLDERS = frozenset({"node_modules", "bower_components", "jspm_packages", "site-packages", "__pycache__"})
# The files that make a folder a site's or a package's root: Hugo, Jekyll, Eleventy, npm, WordPress, Bundler.
_SITE_ROOT_FILES = frozenset({
    "config.toml", "config.yaml", "config.yml", "hugo.toml", "hugo.yaml", "hugo.yml", "hugo.json", "_config.yml",
    "_config.yaml", "package.json", "wp-config.php", ".eleventy.js", "eleventy.config.js", "eleventy.config.mjs",
    "eleventy.config.cjs", "Gemfile",
})
# A project's files, not posts: "README.md", "README.fr.md", "README-pt_BR.md", "LICENSE-MIT", "LICENSE.txt",
# "CHANGELOG"; the upper-case ones only so written ("AUTHORS", not an author's "authors.md"). A post's slug
# ("copying-is-ok.md", "Changelog.md") is not one: the names are as projects write them, upper case.
_PROJECT_FILE = re.compile(r"(?:README|LICEN[CS]E|COPYING|CHANGELOG|CONTRIBUTING|CODE_OF_CONDUCT|AUTHORS|CONTRIBUTORS"
                           r"|NOTICE|SECURITY|CHANGES|HISTORY|NEWS|(?i:readme|license))"
                           r"(?:[-_.](?:[a-z]{2}(?:[-_][A-Z]{2})?|[A-Z][A-Z0-9.-]*[A-Z0-9]))?"  # .fr, -pt_BR, -MIT
                           r"(?:\.(?:md|markdown|txt|rst|adoc|org|html))?")
_SITE_FILES = frozenset({"robots.txt", "humans.txt", "ads.txt", "app-ads.txt", "security.txt", "llms.txt",
                         "cname", "_redirects", "_headers", "gemfile", "rakefile", "makefile", "dockerfile",
                         "procfile", "brewfile", "pipfile", "vagrantfile", "justfile", "requirements.txt"})
# Why a folder scan passed over what it did, each said by `corpus build` with what to do.
PASSED_OVER = ("folders", "project files", "deleted posts", "export records", "documents")


@dataclass
class Scan:
    """The files to read, and what the folders named held that is not read (``BuildResult`` says what)."""

    files: list[Path] = field(default_factory=list)
    left_out: list[Path] = field(default_factory=list)
    passed_over: dict[str, list[Path]] = field(default_factory=dict)
    read_in: Counter[Path] = field(default_factory=Counter)

    def pass_over(self, why: str, path: Path) -> None:
        self.passed_over.setdefault(why, []).append(path)


def _is_project_file(name: str) -> bool:
    """Whether a file is one of a project's or a site's own (README.md, LICENSE, robots.txt), not a post."""
    return _PROJECT_FILE.fullmatch(name) is not None or name.lower() in _SITE_FILES


def _tool_owned(folder: Path, name: str, names: set[str]) -> bool:
    """Whether a folder in ``folder`` (whose files are ``names``) holds no writing: one a tool owns wherever it is,
    or one a site generator or package manager owns in a site's root."""
    return (name in _TOOL_FOLDERS or (folder / name / "pyvenv.cfg").is_file()
            or (name in OWNED_FOLDERS and not names.isdisjoint(_SITE_ROOT_FILES)))


def _walk(source: Path, skipped: set[Path], scan: Scan) -> list[Path]:
    """The files below a folder named, passing over hidden and tool-owned folders (said in ``scan``)."""
    found: list[Path] = []
    for folder, folders, names in os.walk(source):
        here = Path(folder)
        owned = {name for name in folders if not name.startswith(".") and _tool_owned(here, name, set(names))}
        for name in sorted(owned):
            scan.pass_over("folders", here / name)
        folders[:] = [name for name in folders if not name.startswith(".") and name not in owned]
        for name in names:
            path = here / name
            if name.startswith(".") or not path.is_file() or path.resolve() in skipped:
                continue
            if _is_project_file(name):
                scan.pass_over("project files", path)
            elif is_deleted_posts(path):
                scan.pass_over("deleted posts", path)
            else:
                found.append(path)
    return found


def scan_sources(sources: list[Path], exclude: Iterable[Path]) -> Scan:
    """The files to read, and what the folders named held that is not read, and why."""
    skipped = {p.resolve() for p in exclude}
    scan = Scan()
    files: list[Path] = []
    in_folders: set[Path] = set()
    for source in sources:
        if source.is_dir():
            found = sorted(_walk(source, skipped, scan))
            archives = {p.parent for p in found if is_tweet_archive(p)}
            for path in found:
                if _looks_readable(path):
                    files.append(path)
                    in_folders.add(path)
                elif path.suffix.lower() in DOCUMENT_SUFFIXES:
                    scan.pass_over("documents", path)
                elif path.parent in archives and path.suffix.lower() == ".js":  # likes, messages, the account
                    scan.pass_over("export records", path)
                elif not _is_fortune_index(path):
                    scan.left_out.append(path)
        elif source.is_file():
            files.append(source)
        elif source.exists():  # a pipe (<(cat notes.txt)) was said not to exist
            raise CorpusError(f"{source} is a pipe or device, not a file; corpus build reads a file more than "
                              "once (to tell its format, then to read it): save it to a file and name that")
        else:
            raise CorpusError(f"{source} does not exist; name files or folders of the author's writing")
    # A file named twice, or reached again through a link (Debian's "kids.u8" is "kids"), is read once.
    first: dict[Path, Path] = {}
    for path in files:
        first.setdefault(path.resolve(), path)
    unique = list(first.values())
    archives = {p.parent.resolve() for p in unique if is_tweet_archive(p)}
    scan.files = [p for p in unique if not (is_note_tweets(p) and p.parent.resolve() in archives)]
    scan.read_in.update(path.parent for path in scan.files if path in in_folders)
    return scan


def source_files(sources: list[Path], exclude: Iterable[Path] = ()) -> list[Path]:
    """The files named, and the readable-looking files inside folders named, sorted, each once.

    Files in ``exclude`` (the corpus being written) are skipped inside folders: a corpus
    saved next to the writing would otherwise be read back into the next build. An X
    export's ``note-tweet.js`` is left out when a tweet archive in the same folder is read:
    the tweets reader takes the full text of long posts from it (read alone, its notes are
    documents of their own).
    """
    return scan_sources(sources, exclude).files

