"""Tables for the terminal whose cells are never cut short (``WholeNumbersTable``)."""

from __future__ import annotations

from collections.abc import Collection
from typing import Any

from rich.cells import cell_len
from rich.console import Console, ConsoleOptions, RenderableType, RenderResult
from rich.measure import Measurement
from rich.table import Table
from rich.text import Text

from persona.cli.common import UNBOUNDED_WIDTH_CHARS

__all__ = ["WholeNumbersTable"]

# A text column is narrowed to this before a figure's header is folded to make room.
FEWEST_TEXT_CHARS = 6


class WholeNumbersTable(Table):
    """A table whose cells are never cut short: on a terminal too narrow for it, its text
    columns fold (an id goes on across lines), and the columns named in ``numbers`` stay as
    wide as their longest figure, their headers wrapping instead. Left to rich, a 40-column
    terminal showed a worker's memory "791" as "7…" and its id as "v…". Into a pipe
    (``print_whole`` sets its width) it is as wide as its cells need, as before."""

    def __init__(self, *headers: str, numbers: Collection[str] = (), right: Collection[str] = (), **kwargs: Any) -> None:
        """``headers``: the columns (``right``: those of them set flush right); more may be added."""
        super().__init__(**kwargs)
        self.numbers = frozenset(numbers)
        for header in headers:
            self.add_column(header, justify="right" if header in right else "left")

    def add_column(self, header: RenderableType = "", *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("overflow", "fold")
        super().add_column(header, *args, **kwargs)

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        kept = [column.max_width for column in self.columns], self.padding
        caps = self._caps(console, options) if self.width is None else []
        if caps is None:  # not even with a character a line of text: the cells' padding goes, the lines stay
            self.padding = (0, 0)
            caps = self._caps(console, options) or []
        for column, cap in zip(self.columns, caps, strict=False):
            column.max_width = cap
        try:
            yield from super().__rich_console__(console, options)
        finally:
            for column, was in zip(self.columns, kept[0], strict=True):
                column.max_width = was
            self.padding = kept[1]

    def _caps(self, console: Console, options: ConsoleOptions) -> list[int | None] | None:
        """Each column's widest, so that the table fits ``options.max_width`` with every figure
        whole; None when it cannot."""
        texts = [[_plain(console, cell) for cell in (column.header, *column.cells)] for column in self.columns]
        natural = [max((cell_len(line) for text in column for line in text.splitlines()), default=1)
                   for column in texts]
        chrome = Measurement.get(console, options.update_width(UNBOUNDED_WIDTH_CHARS), self).maximum - sum(natural)
        room = options.max_width - chrome
        if sum(natural) <= room:
            return [None] * len(natural)
        caps: list[int | None] = list(natural)
        figures = [i for i, column in enumerate(self.columns) if column.header in self.numbers]
        others = [i for i in range(len(caps)) if i not in figures]

        def longest_word(texts: list[str]) -> int:
            return max((cell_len(word) for text in texts for word in text.split()), default=1)

        # Each figure whole; its header wraps at its spaces, or, when the text would be left
        # fewer than a few characters a line, folds too ("reque|sts" over "sa|ge|@v|1").
        headed = {i: longest_word(texts[i]) for i in figures}
        if sum(headed.values()) + sum(min(natural[i], FEWEST_TEXT_CHARS) for i in others) > room:
            headed = {i: longest_word(texts[i][1:]) for i in figures}
        if sum(headed.values()) + len(others) > room:
            return None
        for i, cap in headed.items():
            caps[i] = cap
        excess = sum(caps) - room
        while excess > 0 and others:  # the widest text column gives a character, until it fits
            widest = max(others, key=lambda i: caps[i])
            if caps[widest] <= 1:
                break
            caps[widest] -= 1
            excess -= 1
        return caps


def _plain(console: Console, cell: RenderableType) -> str:
    """A cell's text as shown (markup read), for its width."""
    if isinstance(cell, Text):
        return cell.plain
    return console.render_str(cell).plain if isinstance(cell, str) else str(cell)
