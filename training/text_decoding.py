"""A source file's bytes as text: which encoding they are in, and how their lines end.

Text is UTF-8, or UTF-16/32 when it starts with a byte-order mark (Notepad's "Unicode"), or UTF-16
without one (told by where its NUL bytes fall: ``_utf16_without_mark``). Text
that is not UTF-8 is read as Windows-1252 (Latin-1: old fortune files, Windows exports), with a
warning naming the file and the first such byte. Its lines end in a line feed however they were
saved (Windows' CR LF, old Macs' CR alone).

Bytes that are no text in any of these raise ``NotText``, which ``sources.read_text_file`` gives as the
file's ``SourceProblem``.
"""

from __future__ import annotations

import codecs
import logging
import re
import unicodedata
from pathlib import Path

__all__ = ["SNIFF_BYTES", "NotText", "decode_text", "one_line_end"]

log = logging.getLogger(__name__)

SNIFF_BYTES = 4096  # where NUL bytes are looked for: text has none, UTF-16 and binary files many


class NotText(ValueError):
    """A file's bytes are no text read here: why (``reason``, with what to do) and on which line, if one."""

    def __init__(self, line: int | None, reason: str) -> None:
        super().__init__(reason)
        self.line = line
        self.reason = reason


def one_line_end(text: str) -> str:
    """Text with a line feed for every line end: a file saved on an old Mac (or by some exports) ends its lines
    in a CR alone, whose blank lines, front matter and "%" lines would not be found: one document of it all."""
    return text.replace("\r\n", "\n").replace("\r", "\n")


# UTF-32's little-endian mark begins with UTF-16's: it is looked for first.
_BYTE_ORDER_MARKS = ((codecs.BOM_UTF32_LE, "utf-32"), (codecs.BOM_UTF32_BE, "utf-32"),
                     (codecs.BOM_UTF16_LE, "utf-16"), (codecs.BOM_UTF16_BE, "utf-16"))


def decode_text(path: Path, raw: bytes, *, warn: bool = True) -> str:
    """A file's bytes as text: UTF-8, UTF-16/32 with a byte-order mark, UTF-16 without one, or Windows-1252
    guessed (``warn``: log how text that is not UTF-8 was read, naming ``path``); else ``NotText``."""
    for mark, codec in _BYTE_ORDER_MARKS:
        if raw.startswith(mark):
            try:
                return raw.decode(codec)
            except UnicodeDecodeError as exc:
                raise NotText(None, f"not {codec.upper()} text, though it starts as such ({exc.reason})") from exc
    if b"\0" in raw[:SNIFF_BYTES] and (text := _utf16_without_mark(raw)) is not None:
        return text
    try:
        text = raw.decode("utf-8")  # not "utf-8-sig": its errors count their offsets from after the mark
    except UnicodeDecodeError as exc:
        if b"\0" in raw[:SNIFF_BYTES]:
            raise NotText(None, "a binary file, not text (neither UTF-8 nor UTF-16): no kind of writing "
                                "read here; name the author's text, Markdown, CSV, JSON or PDF files") from exc
        text = _guess_single_byte(path, raw, exc, warn=warn)
    return text.removeprefix("\ufeff")  # the byte-order mark some editors write at the start of UTF-8


_NOT_TEXT = frozenset({"Cc", "Cs", "Co", "Cn"})  # control, lone surrogate, private use, unassigned
_TEXT_CONTROLS = frozenset("\t\n\r\f\v")


def _utf16_without_mark(raw: bytes) -> str | None:
    """UTF-16 text saved without a byte-order mark (as Python's "utf-16-le" and some Windows tools write
    it), or None if ``raw`` is not that.

    Its tell is the NUL byte of each character below U+0100 (spaces, line ends, Latin letters): at odd
    offsets little-endian, at even ones big-endian. Chinese or Japanese text has few such characters,
    and some whose other byte is NUL ("一" is U+4E00), so the order with more NULs is tried first,
    then the other. Binary data read as UTF-16 gives NUL characters, or control characters, lone
    surrogates, private-use or unassigned code points: more than one in a hundred is no text.
    """
    if len(raw) % 2:
        return None
    sample = raw[:SNIFF_BYTES]
    orders = ["utf-16-le", "utf-16-be"]
    if sample[0::2].count(0) > sample[1::2].count(0):
        orders.reverse()
    for codec in orders:
        try:
            text = raw.decode(codec)
        except UnicodeDecodeError:  # a lone surrogate
            continue
        head = text[:SNIFF_BYTES]
        if "\0" in head:  # a NUL character: in no text, and in most binary files
            continue
        odd = sum(1 for char in head if unicodedata.category(char) in _NOT_TEXT and char not in _TEXT_CONTROLS)
        if 100 * odd < len(head):
            return text
    return None


_ICONV = "`iconv -f ENCODING -t UTF-8 FILE > NEW.txt` (`iconv -l` lists them; DOS's is CP437, old Macs' MACINTOSH)"
# A character UTF-8 writes in two to four bytes. Windows-1252 text holds some of the two-byte ones
# by chance ("ß" then a closing quote), but hardly ever "Ã" or "Â" then a symbol, or three such bytes:
# those show that the file is UTF-8 (é is "Ã©" read as Windows-1252) but for a part.
_UTF8_CHARACTER = re.compile(rb"[\xc2-\xdf][\x80-\xbf]|[\xe0-\xef][\x80-\xbf]{2}|[\xf0-\xf4][\x80-\xbf]{3}")
_UTF8_FOR_SURE = re.compile(rb"[\xc2\xc3][\x80-\xbf]|[\xe0-\xef][\x80-\xbf]{2}|[\xf0-\xf4][\x80-\xbf]{3}")
_ASCII = bytes(range(0x80))


def _byte_as_cp1252(error: UnicodeError) -> tuple[str, int]:
    """A decoding error handler: the first byte that is not UTF-8 read as Windows-1252, then UTF-8 again."""
    if not isinstance(error, UnicodeDecodeError):
        raise error
    byte = error.object[error.start : error.start + 1]
    try:
        return bytes(byte).decode("cp1252"), error.start + 1
    except UnicodeDecodeError:  # one of the five bytes it leaves undefined: say where in the whole text
        raise UnicodeDecodeError("cp1252", error.object, error.start, error.start + 1, "undefined") from None


codecs.register_error("persona-cp1252", _byte_as_cp1252)


def _guess_single_byte(path: Path, raw: bytes, error: UnicodeDecodeError, *, warn: bool = True) -> str:
    """Text that is not UTF-8, with a warning (if ``warn``) saying how it was read: each byte that is not UTF-8 as
    Windows-1252 (Latin-1 as Windows extends it: old fortune files, Windows exports), and the whole
    file so when nothing in it shows UTF-8. A byte Windows-1252 leaves undefined is ``NotText``."""
    found = _UTF8_CHARACTER.findall(raw)
    others = len(raw.translate(None, _ASCII)) - sum(map(len, found))
    partly = len(found) > others or _UTF8_FOR_SURE.search(raw) is not None
    try:
        text = raw.decode("utf-8", "persona-cp1252") if partly else raw.decode("cp1252")
    except UnicodeDecodeError as exc:
        raise NotText(raw[: exc.start].count(b"\n") + 1,
                      f"neither UTF-8 nor Windows-1252 text (byte 0x{raw[exc.start]:02X} at offset {exc.start}); "
                      f"convert it to UTF-8 from the encoding it was saved in: {_ICONV}") from error
    if not warn:
        return text
    how = (f"UTF-8 but for {others} byte(s) (a part saved in another encoding?), read as Windows-1252 (Latin-1)"
           if partly else "not UTF-8, so read as Windows-1252 (Latin-1)")
    at = error.start
    log.warning("%s: %s: the first, byte 0x%02X at offset %d (line %d), is %r. If letters come out wrong, convert "
                "it to UTF-8 from the encoding it was saved in: %s", path, how, raw[at], at,
                raw[:at].count(b"\n") + 1, raw[at : at + 1].decode("cp1252"), _ICONV)
    return text
