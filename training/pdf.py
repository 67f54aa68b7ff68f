"""Text out of PDF books: page headers and footers dropped, hyphenation repaired.

pypdf gives each page's text line by line. A line that repeats at the top or bottom of
many pages (a running title, "Page 12", the author's name) is a header or footer, not
writing; a word broken by a hyphen at a line end is joined again; the lines of a
paragraph are joined with spaces. Long runs of prose are cut into passages of a few
hundred words at sentence ends, so one book gives many documents.
"""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path

from training.sources import RawDocument, ReadOptions, SourceProblem

__all__ = ["PASSAGE_WORDS", "clean_pages", "read_pdf", "split_passages"]

PASSAGE_WORDS = 300
_EDGE_LINES = 2  # lines at each end of a page that may be a header or footer
_PAGE_NUMBER = re.compile(r"^\s*(page\s*)?[\divxlc]+(\s*(of|/)\s*\d+)?\s*$", re.IGNORECASE)


def _shape(line: str) -> str:
    """A line with its digits masked, so "Chapter 3 · 41" and "Chapter 3 · 42" match."""
    return re.sub(r"\d+", "#", line.strip().lower())


def _repeated_edges(pages: list[list[str]]) -> set[str]:
    """Shapes of lines that sit at a page edge on at least half of the pages."""
    if len(pages) < 3:
        return set()
    seen: Counter[str] = Counter()
    for lines in pages:
        edges = {_shape(line) for line in lines[:_EDGE_LINES] + lines[-_EDGE_LINES:] if line.strip()}
        seen.update(edges)
    return {shape for shape, count in seen.items() if count >= max(3, len(pages) // 2)}


def _join_lines(lines: list[str]) -> str:
    """Lines of prose into paragraphs: hyphenated breaks joined, blank lines kept."""
    text = "\n".join(line.rstrip() for line in lines)
    text = re.sub(r"(\w)[-\u00ad]\n(?=[a-z])", r"\1", text)  # "philo-\nsophy" -> "philosophy"
    paragraphs = re.split(r"\n\s*\n", text)
    return "\n\n".join(re.sub(r"\s*\n\s*", " ", p).strip() for p in paragraphs if p.strip())


def clean_pages(pages: list[str]) -> str:
    """The book's prose: headers, footers and page numbers gone, paragraphs rejoined."""
    split = [page.replace("\r\n", "\n").split("\n") for page in pages]
    repeated = _repeated_edges(split)
    kept: list[str] = []
    for lines in split:
        for i, line in enumerate(lines):
            at_edge = i < _EDGE_LINES or i >= len(lines) - _EDGE_LINES
            if at_edge and (_shape(line) in repeated or _PAGE_NUMBER.match(line)):
                continue
            kept.append(line)
        kept.append("")  # a page break ends a paragraph only if the next page starts one
        if kept[-2:-1] and re.search(r"[\w,;-]$", kept[-2]):
            kept.pop()
    return _join_lines(kept)


def split_passages(text: str, words: int = PASSAGE_WORDS) -> list[str]:
    """Paragraphs, with any longer than ``words`` cut at sentence ends."""
    passages: list[str] = []
    for paragraph in text.split("\n\n"):
        current: list[str] = []
        count = 0
        for sentence in re.split(r"(?<=[.!?])\s+", paragraph):
            current.append(sentence)
            count += len(sentence.split())
            if count >= words:
                passages.append(" ".join(current))
                current, count = [], 0
        if current:
            passages.append(" ".join(current))
    return [p for p in passages if p.strip()]


def read_pdf(path: Path, options: ReadOptions) -> list[RawDocument]:
    """Passages of a PDF book's prose."""
    from pypdf import PdfReader
    from pypdf.errors import FileNotDecryptedError

    try:
        reader = PdfReader(path)
        pages = [page.extract_text() or "" for page in reader.pages]
    except FileNotDecryptedError as exc:
        raise SourceProblem(path, None, "locked with a password; save an unlocked copy and name that "
                                        "(e.g. `qpdf --password=PASSWORD --decrypt book.pdf unlocked.pdf`)") from exc
    except Exception as exc:  # a damaged file raises all kinds (NotImplementedError for an unknown filter...)
        raise SourceProblem(path, None, f"not a readable PDF: {exc}") from exc
    if not any(page.strip() for page in pages):
        raise SourceProblem(path, None, f"no text on its {len(pages)} page(s): a scanned book is pictures of pages; "
                                        "give it a text layer first (OCR, e.g. `ocrmypdf book.pdf book-text.pdf`)")
    return [RawDocument(passage, str(path), 1) for passage in split_passages(clean_pages(pages))]
