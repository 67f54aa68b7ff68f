"""Token ids for many prompts at once, reusing what earlier prompts already encoded.

Tokenizing is most of a worker's own cost per request, and most of every chat prompt is
the same each time: the persona's system prompt and examples, and the template's role
headers. A fast tokenizer cuts its input at its added tokens (<|im_start|>...) and
encodes each piece between them on its own, so the ids of a piece seen before can be
reused: only the pieces holding new text (usually the newest message) are encoded.
This is used only for tokenizers where that cut is exact (no normalizer, no added token
that strips or matches whole words) and where probes agree with encoding whole texts.
"""

from __future__ import annotations

import re
import weakref

__all__ = ["PieceEncoder", "encode_many", "encoder_for", "piece_encoder"]

PIECE_CACHE_SIZE = 4096
_pieces: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


# The GPT-2 byte-level split, written out for ASCII text (where \\p{L} is [A-Za-z], \\p{N}
# is [0-9] and \\s is these six characters): Python runs it faster than the tokenizer's
# own pre-tokenizer, and each word's ids are then looked up, not merged again.
_SPACE = " \t\n\r\x0b\x0c"
_ASCII_WORDS = re.compile(
    rf"'s|'t|'re|'ve|'m|'ll|'d| ?[A-Za-z]+| ?[0-9]+| ?[^{_SPACE}A-Za-z0-9]+|[{_SPACE}]+(?![^{_SPACE}])|[{_SPACE}]+"
).findall
WORD_CACHE_SIZE = 65536


def _byte_level_alphabet() -> dict[int, str]:
    """GPT-2's reversible map from bytes to printable characters."""
    shown = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    extra = [b for b in range(256) if b not in shown]
    return {b: chr(b) for b in shown} | {b: chr(256 + n) for n, b in enumerate(extra)}


_BYTE_CHARS = str.maketrans({chr(b): c for b, c in _byte_level_alphabet().items() if b < 128})


class PieceEncoder:
    """Encodes texts piece by piece between added tokens, remembering recent pieces."""

    def __init__(self, backend) -> None:
        self.backend = backend
        pre, model = backend.pre_tokenizer, backend.model
        # Plain ASCII pieces are split and looked up word by word where the tokenizer is a
        # GPT-2 style byte-level BPE (the bundled one); anything else goes to the tokenizer.
        self.by_words = (
            type(pre).__name__ == "ByteLevel" and not pre.add_prefix_space and pre.use_regex
            and type(model).__name__ == "BPE" and model.dropout is None
        )
        self.words: dict[str, list[int]] = {}
        added = backend.get_added_tokens_decoder()
        self.ids = {token.content: token_id for token_id, token in added.items()}
        # Longest first: at one position the longest added token wins, as in the tokenizer.
        alternatives = "|".join(map(re.escape, sorted(self.ids, key=len, reverse=True)))
        self.split = re.compile(f"({alternatives})").split
        self.holds_added = re.compile(alternatives).search
        self.cache: dict[str, list[int]] = {}

    def _by_words(self, piece: str) -> list[int] | None:
        """The ids of an ASCII piece, word by word; None for any other piece."""
        if not (piece.isascii() and _ONLY_ASCII_TEXT(piece)):
            return None
        known = self.words
        if len(known) >= WORD_CACHE_SIZE:
            known.clear()
        ids: list[int] = []
        for word in _ASCII_WORDS(piece):
            found = known.get(word)
            if found is None:  # a word not seen yet (every word has at least one id)
                found = known[word] = [t.id for t in self.backend.model.tokenize(word.translate(_BYTE_CHARS))]
            ids += found
        return ids

    def _known(self, pieces) -> dict[str, list[int]]:
        """The piece cache, holding the ids of each of these pieces (texts without added tokens)."""
        cache = self.cache
        if len(cache) > PIECE_CACHE_SIZE:
            cache.clear()  # crude but bounded; the persona's own pieces come back at once
        cache[""] = []
        missing = []
        for piece in pieces:
            if piece not in cache:
                ids = self._by_words(piece) if self.by_words else None
                if ids is None:
                    missing.append(piece)
                else:
                    cache[piece] = ids
        if missing:
            fresh = list(dict.fromkeys(missing))
            for piece, ids in zip(fresh, self.backend.encode_batch_fast(fresh, add_special_tokens=False), strict=True):
                cache[piece] = ids.ids
        return cache

    def encode_pieces(self, pieces: list[str]) -> list[list[int]]:
        """The ids of texts that hold no added token (see ``holds_added``): the cache's own lists, not to be changed."""
        cache = self._known(pieces)
        return [cache[piece] for piece in pieces]

    def encode(self, texts: list[str]) -> list[list[int]]:
        # split() alternates text pieces (even places) and added tokens (odd places).
        parts = [self.split(text) for text in texts]
        cache = self._known([piece for pieces in parts for piece in pieces[::2]])
        added = self.ids
        out = []
        for pieces in parts:
            ids = list(cache[pieces[0]])
            for k in range(1, len(pieces), 2):
                ids.append(added[pieces[k]])
                ids += cache[pieces[k + 1]]
            out.append(ids)
        return out


# Printable ASCII and the whitespace the split above knows; other control characters
# (never in a message: the contract strips them) go to the tokenizer.
_ONLY_ASCII_TEXT = re.compile(rf"[\x20-\x7e{_SPACE}]*").fullmatch


def piece_encoder(backend) -> PieceEncoder | None:
    """A piece encoder for this tokenizer, or None where cutting at added tokens is not exact."""
    try:
        added = backend.get_added_tokens_decoder().values()
        if backend.normalizer is not None or not added or backend.truncation or backend.padding:
            return None
        if any(t.lstrip or t.rstrip or t.single_word or t.normalized for t in added):
            return None
        encoder = PieceEncoder(backend)
        contents = sorted(encoder.ids, key=len)
        probes = [
            f"{contents[-1]}system\nBe brief.{contents[0]}\n{contents[-1]}user\n Hi there! {contents[-1]}x\n",
            f"plain text, no added tokens {contents[0]}{contents[0]} \n\n  trailing  ",
            "It's 12:30 -- they'll say \"don't\" ;-)\t\tMAX_LEN=4096\r\n  x  y\x0b\x0cz 1234567 ~`|{}",
            "naïve café – ünïcödé 東京 🙂 text\u2003spaced",
        ]
        for probe in probes:
            whole = backend.encode(probe, add_special_tokens=False).ids
            if encoder.encode([probe]) != [whole] or encoder.encode([probe]) != [whole]:
                return None
        encoder.cache.clear()
        encoder.words.clear()
        return encoder
    except Exception:  # an unfamiliar tokenizer: encode whole texts
        return None


def encoder_for(tokenizer) -> PieceEncoder | None:
    """This fast tokenizer's piece encoder (made once), or None where it has none."""
    backend = tokenizer.backend_tokenizer
    try:
        return _pieces[backend]
    except KeyError:
        encoder = _pieces[backend] = piece_encoder(backend)
        return encoder
    except TypeError:  # cannot be weakly referenced: not cached
        return None


def encode_many(tokenizer, texts: list[str]) -> list[list[int]]:
    """Token ids of each text, without special tokens added (fast tokenizers only)."""
    encoder = encoder_for(tokenizer)
    if encoder is not None:
        return encoder.encode(texts)
    return [e.ids for e in tokenizer.backend_tokenizer.encode_batch(texts, add_special_tokens=False)]
