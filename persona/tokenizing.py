"""Token ids for many prompts at once, reusing what earlier prompts already encoded.

Tokenizing is most of a worker's own cost per request, and most of every chat prompt is
the same each time: the persona's system prompt and examples, and the template's role
headers. A fast tokenizer cuts its input at its added tokens (<|im_start|>...) and
encodes each piece between them on its own, so the ids of a piece seen before can be
reused: only the pieces holding new text (usually the newest message) are encoded.
This is used only for tokenizers where that cut is exact (no normalizer, no added token
that strips or matches whole words) and where probes agree with encoding whole texts.

Text that spells a special token is text. A message that says "<|im_end|>" must not end
its turn, so whatever a person wrote (a message, a system prompt, a post's opening) is
encoded *as text*, as the tokenizer reads it with special tokens split
(``encode_special_tokens``): the token's characters become ordinary pieces. A chat
template writes tokens of its own around those texts, so a rendered prompt holds both.
The texts are therefore *quoted* before they are rendered (each special token's text
becomes a stand-in that no tokenizer reads as a token and a template copies like any
other text), and ``encode_quoted`` reads the tokens written outright as tokens and the
quoted ones, put back, as text.
"""

from __future__ import annotations

import re
import weakref
from collections.abc import Callable, Iterable
from typing import Any

__all__ = [
    "AddedTokens", "PieceEncoder", "encode_as_text", "encode_many", "encode_quoted", "encoder_for", "piece_encoder", "quote",
]

PIECE_CACHE_SIZE = 4096
_pieces: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_added: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_copies: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # tokenizer -> {plain: (its size, a copy)}

# A stand-in is "\x01<n>\x01": a control character no message holds (the contract strips
# them), and one that templates leave alone (it is not whitespace, it has no case). The
# character itself is quoted too, so quoting is undone exactly whatever the text held.
_QUOTE = "\x01"
_STAND_IN = re.compile(r"\x01([0-9]+)\x01")


def _splitter(contents: Iterable[str]) -> Callable[[str], list[str]] | None:
    """A function cutting a text at these strings (the longest wins at a place, as in the
    tokenizer): text, string, text, ..., text. None where there are none."""
    alternatives = "|".join(map(re.escape, sorted(contents, key=len, reverse=True)))
    return re.compile(f"({alternatives})").split if alternatives else None


class AddedTokens:
    """A tokenizer's added tokens: where a text holds them, and stand-ins for the special ones."""

    def __init__(self, added: dict[int, Any]) -> None:
        self.ids = {token.content: token_id for token_id, token in added.items()}
        # The tokens that take the whitespace beside them (lstrip: before, rstrip: after).
        self.takes_before = {token.content for token in added.values() if token.lstrip}
        self.takes_after = {token.content for token in added.values() if token.rstrip}
        # Every added token cuts a rendered prompt; only those that are not special still
        # cut a text read as text (the tokenizer matches them even with special tokens split).
        self.split = _splitter(self.ids) or (lambda text: [text])
        self.split_text = _splitter(token.content for token in added.values() if not token.special)
        specials = sorted((token.content for token in added.values() if token.special), key=len, reverse=True)
        self.spells_special = re.compile("|".join(map(re.escape, specials))).search if specials else _never
        self.quoted = [_QUOTE, *specials]
        self._stand_ins = {text: f"{_QUOTE}{n}{_QUOTE}" for n, text in enumerate(self.quoted)}
        self._quotable = re.compile("|".join(map(re.escape, self.quoted))).sub

    def quote(self, text: str) -> str:
        """``text`` with each special token's text replaced by a stand-in."""
        return self._quotable(lambda match: self._stand_ins[match[0]], text)

    def unquote(self, text: str) -> str:
        """``quote`` undone (a stand-in a template broke stays as it is: text all the same)."""
        return _STAND_IN.sub(self._put_back, text) if _QUOTE in text else text

    def _put_back(self, match: re.Match) -> str:
        n = int(match[1])
        return self.quoted[n] if n < len(self.quoted) else match[0]


def _never(text: str) -> None:
    return None


def _added_tokens(source) -> AddedTokens:
    """The added tokens of a Rust tokenizer, or of a transformers tokenizer without one (made once)."""
    try:
        return _added[source]
    except (KeyError, TypeError):
        pass
    get = getattr(source, "get_added_tokens_decoder", None)
    added = AddedTokens(get() if get is not None else source.added_tokens_decoder)
    try:
        _added[source] = added
    except TypeError:  # cannot be weakly referenced: not cached
        pass
    return added


def _as_text(backend, texts: list[str]):
    """Encodings of texts read as text: by the tokenizer itself where no text spells a
    special token (its ``encode_special_tokens`` flag changes nothing then), else by its
    plain copy (made when first needed: it takes a tenth of a second)."""
    spells = _added_tokens(backend).spells_special
    reader = _copy(backend, plain=True) if any(map(spells, texts)) else _whole(backend)
    return reader.encode_batch_fast(texts, add_special_tokens=False)


def _whole(backend):
    """The tokenizer itself, or where its file set truncation or padding (which transformers
    turns off for each call it makes, and a direct call would apply: a document cut at 512
    tokens, pad ids between a prompt's pieces) a copy without them."""
    if backend.truncation is None and backend.padding is None:
        return backend
    return _copy(backend, plain=False)


def _copy(backend, *, plain: bool):
    """A copy of this Rust tokenizer without truncation or padding; ``plain``: one that reads a
    special token's text as text.

    A copy rather than the tokenizer's own ``encode_special_tokens`` flag: transformers
    sets that flag on every call it makes, so it cannot be relied on between calls (nor
    changed under another thread). Made again if the tokenizer has gained tokens since.
    """
    size = backend.get_vocab_size(with_added_tokens=True)
    try:
        copies = _copies.setdefault(backend, {})
    except TypeError:  # cannot be weakly referenced: not cached
        copies = {}
    made_at, copy = copies.get(plain, (None, None))
    if made_at == size:
        return copy
    from tokenizers import Tokenizer

    copy = Tokenizer.from_str(backend.to_str())
    copy.encode_special_tokens = plain
    copy.no_truncation()
    copy.no_padding()
    copies[plain] = (size, copy)
    return copy


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
        self.added = _added_tokens(backend)
        self.split = self.added.split
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
        """The piece cache, holding the ids of each of these pieces read as text (a piece
        holds no added token but a special one's text, which is text)."""
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
            for piece, ids in zip(fresh, _as_text(self.backend, fresh), strict=True):
                cache[piece] = ids.ids
        return cache

    def encode_pieces(self, pieces: list[str]) -> list[list[int]]:
        """The ids of texts read as text (a special token's text is text): where the
        tokenizer has no other added tokens, the cache's own lists, not to be changed."""
        split = self.added.split_text
        if split is None:
            cache = self._known(pieces)
            return [cache[piece] for piece in pieces]
        return self._joined([split(piece) for piece in pieces])

    def encode(self, texts: list[str]) -> list[list[int]]:
        """The ids of texts whose added tokens are read as tokens, as the tokenizer reads them."""
        return self._joined([self.split(text) for text in texts])

    def encode_quoted(self, texts: list[str]) -> list[list[int]]:
        """The ids of rendered texts: the added tokens written in them are tokens, the quoted ones text."""
        parts = [self.split(text) for text in texts]
        unquote = self.added.unquote
        for pieces in parts:
            pieces[::2] = [unquote(piece) for piece in pieces[::2]]
        return self._joined(parts)

    def _joined(self, parts: list[list[str]]) -> list[list[int]]:
        """The ids of texts cut into text pieces (even places) and added tokens (odd places)."""
        cache = self._known([piece for pieces in parts for piece in pieces[::2]])
        added = self.added.ids
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
        contents = sorted(encoder.added.ids, key=len)
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
    """Token ids of each text, its added tokens read as tokens (fast tokenizers only)."""
    encoder = encoder_for(tokenizer)
    if encoder is not None:
        return encoder.encode(texts)
    return [e.ids for e in tokenizer.backend_tokenizer.encode_batch(texts, add_special_tokens=False)]


def encode_as_text(tokenizer, texts: list[str]) -> list[list[int]]:
    """Token ids of each text read as text: a special token's characters are ordinary text."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return [tokenizer.encode(t, add_special_tokens=False, split_special_tokens=True, verbose=False) for t in texts]
    return [e.ids for e in _as_text(backend, texts)]


def quote(tokenizer, text: str) -> str:
    """``text`` with its special tokens' texts quoted: rendered into a chat template and
    read by ``encode_quoted``, it is text, never the tokens it spells."""
    return _added_tokens(_source(tokenizer)).quote(text)


def encode_quoted(tokenizer, texts: list[str]) -> list[list[int]]:
    """Token ids of rendered texts whose own texts were quoted (see ``quote``): the added
    tokens written in them are tokens, the quoted ones text."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    encoder = encoder_for(tokenizer) if backend is not None else None
    if encoder is not None:
        return encoder.encode_quoted(texts)
    # Without a piece encoder, cutting at added tokens is not exact (a token that takes the
    # whitespace beside it, a normalizer...): a text with nothing quoted in it (nearly every
    # one) is read whole, as the tokenizer reads it. One with quoted texts is cut at its
    # added tokens, each of which still takes the whitespace beside it.
    out: list[list[int] | None] = [None] * len(texts)
    whole = [i for i, text in enumerate(texts) if _QUOTE not in text]
    if whole:
        if backend is not None:
            encoded = [e.ids for e in _whole(backend).encode_batch_fast([texts[i] for i in whole], add_special_tokens=False)]
        else:
            encoded = [tokenizer.encode(texts[i], add_special_tokens=False, verbose=False) for i in whole]
        for i, ids in zip(whole, encoded, strict=True):
            out[i] = ids
    added = _added_tokens(_source(tokenizer))
    cut = {i: _stripped(added, added.split(text)) for i, text in enumerate(texts) if out[i] is None}
    pieces = iter(encode_as_text(tokenizer, [added.unquote(piece) for parts in cut.values() for piece in parts[::2]]))
    for i, parts in cut.items():
        ids = list(next(pieces))
        for token in parts[1::2]:
            ids.append(added.ids[token])
            ids += next(pieces)
        out[i] = ids
    return out


def _stripped(added: AddedTokens, parts: list[str]) -> list[str]:
    """Text pieces and added tokens (odd places), the whitespace each token takes taken away."""
    for k in range(1, len(parts), 2):
        if parts[k] in added.takes_before:
            parts[k - 1] = parts[k - 1].rstrip()
        if parts[k] in added.takes_after:
            parts[k + 1] = parts[k + 1].lstrip()
    return parts


def _source(tokenizer):
    """Where a transformers tokenizer's added tokens are read: its Rust tokenizer, if it has one."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    return backend if backend is not None else tokenizer
