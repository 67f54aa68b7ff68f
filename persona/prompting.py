"""Turning a request into the token ids a model continues.

Chat-template models (SmolLM2-Instruct) get the persona's system prompt, its few-shot
examples and the conversation as chat turns. Plain models (GPT-2, or a model fine-tuned
on raw text) get a transcript ("User: ...\\nSage: ...") and stop at the next speaker's
name, so the persona never writes the user's side of the conversation.

The conversation is trimmed to the model's context window, oldest turns first; the
newest message is always kept (cut from its start only if it alone is too long).
"""

from __future__ import annotations

import re
import weakref
from dataclasses import dataclass

from persona.contract import GenerationRequest, Message
from persona.models import LoadedModel
from persona.personas import Persona, Sampling

__all__ = ["Prompt", "build_prompt", "build_prompts"]

USER_SPEAKER = "User"


@dataclass
class Prompt:
    """Token ids to continue, and text that ends the persona's turn."""

    token_ids: list[int]
    stop: list[str]


def build_prompt(persona: Persona, request: GenerationRequest, loaded: LoadedModel, sampling: Sampling) -> Prompt:
    """The prompt for one request, trimmed to fit beside ``max_new_tokens``."""
    budget = max(16, loaded.context_tokens - sampling.max_new_tokens)
    use_chat = loaded.has_chat_template
    # A fine-tuned persona writes posts as raw continuations of its corpus; a
    # prompt-only persona on an instruct model is asked for one instead.
    if request.mode == "complete" and not (use_chat and not loaded.fine_tuned):
        return _plain_completion(request.prefix, loaded, budget, sampling)
    turns = _conversation(persona, request)
    if use_chat:
        return _fit(lambda kept: _chat_ids(persona, kept, request, loaded), turns, loaded, budget, sampling.stop)
    stop = [f"\n{USER_SPEAKER}:", f"\n{persona.speaker}:", *sampling.stop]
    return _fit(lambda kept: _transcript_ids(persona, kept, loaded), turns, loaded, budget, stop)


def build_prompts(
    items: list[tuple[Persona, GenerationRequest, Sampling]], loaded: LoadedModel
) -> list[Prompt]:
    """``build_prompt`` for many requests at once: chat prompts are tokenized in one call.

    A worker builds a prompt for every request it takes, and one tokenizer call for the
    whole batch costs far less than one per request; a prompt too long for the model
    (rare) is rebuilt one at a time, trimmed.
    """
    prompts: list[Prompt | None] = [None] * len(items)
    texts: dict[int, str] = {}
    backend = getattr(loaded.tokenizer, "backend_tokenizer", None)
    for i, (persona, request, sampling) in enumerate(items):
        if backend is not None and loaded.has_chat_template and request.mode == "chat":
            texts[i] = _chat_text(loaded.tokenizer, persona, _conversation(persona, request))
        else:
            prompts[i] = build_prompt(persona, request, loaded, sampling)
    if texts:
        encoded = _encode_many(loaded.tokenizer, list(texts.values()))
        context = loaded.context_tokens
        for i, ids in zip(texts, encoded, strict=True):
            persona, request, sampling = items[i]
            budget = max(16, context - sampling.max_new_tokens)
            fits = len(ids) <= budget
            prompts[i] = Prompt(ids, sampling.stop) if fits else build_prompt(persona, request, loaded, sampling)
    return [p for p in prompts if p is not None]


def _conversation(persona: Persona, request: GenerationRequest) -> list[Message]:
    if request.mode == "complete":
        return [Message(role="user", content=persona.prompt.post_instruction)]
    turns = [m for m in request.messages if m.role != "system"]
    keep = persona.prompt.max_history_turns
    return turns[-keep:] if keep else turns[-1:]


def _fit(render, turns: list[Message], loaded: LoadedModel, budget: int, stop: list[str]) -> Prompt:
    """Drop the oldest turns until the prompt fits; shorten the newest only as a last resort."""
    kept = list(turns)
    ids = render(kept)
    while len(ids) > budget and len(kept) > 1:
        kept.pop(0)
        ids = render(kept)
    if len(ids) > budget and kept:
        last = kept[-1]
        overflow_tokens = len(ids) - budget
        content_ids = loaded.tokenizer.encode(last.content, add_special_tokens=False)
        tail = loaded.tokenizer.decode(content_ids[overflow_tokens + 8 :])
        kept[-1] = Message(role=last.role, content=tail)
        ids = render(kept)[-budget:]
    return Prompt(token_ids=ids, stop=stop)


def _chat_messages(persona: Persona, turns: list[Message]) -> list[dict[str, str]]:
    messages: list[dict[str, str]] = []
    if persona.prompt.system:
        messages.append({"role": "system", "content": persona.prompt.system})
    for example in persona.prompt.examples:
        messages.append({"role": "user", "content": example.user})
        messages.append({"role": "assistant", "content": example.assistant})
    messages.extend({"role": m.role, "content": m.content} for m in turns)
    return messages


def _chat_ids(persona: Persona, turns: list[Message], request: GenerationRequest, loaded: LoadedModel) -> list[int]:
    text = _render_chat(loaded.tokenizer, _chat_messages(persona, turns))
    if request.mode == "complete" and request.prefix:
        text += request.prefix
    return _encode(loaded.tokenizer, text)


def _transcript_ids(persona: Persona, turns: list[Message], loaded: LoadedModel) -> list[int]:
    lines: list[str] = []
    if persona.prompt.system:
        lines.append(persona.prompt.system.strip() + "\n")
    for example in persona.prompt.examples:
        lines.append(f"{USER_SPEAKER}: {example.user}")
        lines.append(f"{persona.speaker}: {example.assistant}")
    for message in turns:
        speaker = persona.speaker if message.role == "assistant" else USER_SPEAKER
        lines.append(f"{speaker}: {message.content}")
    lines.append(f"{persona.speaker}:")
    return _encode(loaded.tokenizer, "\n".join(lines))


def _plain_completion(prefix: str, loaded: LoadedModel, budget: int, sampling: Sampling) -> Prompt:
    """Continue ``prefix`` as the author would write, starting a fresh document."""
    tokenizer = loaded.tokenizer
    start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    ids = ([start] if start is not None else []) + tokenizer.encode(prefix, add_special_tokens=False)
    return Prompt(token_ids=ids[-budget:], stop=list(sampling.stop))


# A worker builds a prompt for every request, so the per-call overhead of the tokenizer's
# Python wrappers (about 0.2 ms) matters: the chat template's compiled form and the Rust
# tokenizer are called directly once they are shown to agree with the wrappers.
_direct_render: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_PROBE = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Hello there!"},
    {"role": "assistant", "content": "Hi."},
    {"role": "user", "content": "How are you?"},
]


def _render_chat(tokenizer, messages: list[dict[str, str]]) -> str:
    """The chat template applied to ``messages``, ending with the assistant's turn."""
    try:
        render = _direct_render[tokenizer]
    except (KeyError, TypeError):
        render = _direct_renderer(tokenizer)
        try:
            _direct_render[tokenizer] = render
        except TypeError:  # a tokenizer that cannot be weakly referenced is not cached
            pass
    if render is None:
        return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return render(messages)


# Rendering the template is the other big cost. Where the template provably copies each
# message's content into its output untouched (the content is only ever printed, alone
# or joined with +/~, never tested or filtered), a conversation's text is the template
# rendered once per shape (persona, roles of the turns) with markers in place of the
# turns' contents, and the contents put back between the pieces. The markers hold a NUL,
# which no message can (the contract strips control characters).
_splicers: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
SHAPES_KEPT = 1024


def _marker(n: int) -> str:
    return f"\x00turn {n}\x00"


class _Splicer:
    """Chat texts from pieces rendered once per conversation shape."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        self.shapes: dict[tuple, list[str] | None] = {}

    def text(self, head: list[dict[str, str]], turns: list[Message]) -> str:
        key = (tuple((m["role"], m["content"]) for m in head), tuple(m.role for m in turns))
        try:
            pieces = self.shapes[key]
        except KeyError:
            if len(self.shapes) >= SHAPES_KEPT:
                self.shapes.clear()
            pieces = self.shapes[key] = self._pieces(head, key[1])
        if pieces is None:
            return _render_chat(self.tokenizer, head + [{"role": m.role, "content": m.content} for m in turns])
        out = [pieces[0]]
        for message, piece in zip(turns, pieces[1:], strict=True):
            out += (message.content, piece)
        return "".join(out)

    def _pieces(self, head: list[dict[str, str]], roles: tuple[str, ...]) -> list[str] | None:
        """The template's text around each turn's content, or None if splicing is not exact here."""
        try:
            marked = _render_chat(self.tokenizer, head + [{"role": r, "content": _marker(n)} for n, r in enumerate(roles)])
            rest, pieces = marked, []
            for n in range(len(roles)):
                before, found, rest = rest.partition(_marker(n))
                if not found or "\x00" in before:
                    return None
                pieces.append(before)
            if "\x00" in rest:
                return None
            pieces.append(rest)
            # Belt and braces: a probe conversation of this shape must come out the same both ways.
            probe = [{"role": r, "content": f"  probe {n} <think>x</think>\n\tend  "} for n, r in enumerate(roles)]
            spliced = pieces[0] + "".join(m["content"] + piece for m, piece in zip(probe, pieces[1:], strict=True))
            return pieces if spliced == _render_chat(self.tokenizer, head + probe) else None
        except Exception:  # whatever the template does, the whole render stays the answer
            return None


def _content_is_verbatim(tokenizer) -> bool:
    """Whether the chat template only ever prints message contents as they are."""
    try:
        from jinja2 import Environment, nodes

        def content(node) -> bool:
            return (isinstance(node, nodes.Getitem) and isinstance(node.arg, nodes.Const) and node.arg.value == "content") or (
                isinstance(node, nodes.Getattr) and node.attr == "content"
            )

        def verbatim(node, printed: bool) -> bool:
            if content(node):
                return printed
            keeps = isinstance(node, nodes.Output) or (printed and isinstance(node, (nodes.Add, nodes.Concat)))
            return all(verbatim(child, keeps) for child in node.iter_child_nodes())

        template = tokenizer.chat_template
        if not isinstance(template, str):
            return False
        try:  # parsed as transformers compiles it (its extensions included)
            from transformers.utils.chat_template_utils import _compile_jinja_template

            environment = _compile_jinja_template(template).environment
        except Exception:
            environment = Environment()
        return verbatim(environment.parse(template), False)
    except Exception:  # a template jinja cannot parse here: no splicing
        return False


def _chat_text(tokenizer, persona: Persona, turns: list[Message]) -> str:
    """The chat template applied to the persona's head and these turns (spliced where exact)."""
    head = _chat_messages(persona, [])
    try:
        splicer = _splicers[tokenizer]
    except KeyError:
        splicer = _splicers[tokenizer] = _Splicer(tokenizer) if _content_is_verbatim(tokenizer) else None
    except TypeError:  # cannot be weakly referenced: no splicing
        splicer = None
    if splicer is None:
        return _render_chat(tokenizer, _chat_messages(persona, turns))
    return splicer.text(head, turns)


def _direct_renderer(tokenizer):
    """A fast render function equal to apply_chat_template, or None if none is."""
    try:
        from transformers.utils.chat_template_utils import _compile_jinja_template

        compiled = _compile_jinja_template(tokenizer.chat_template)
        extra = dict(tokenizer.special_tokens_map)

        def render(messages: list[dict[str, str]]) -> str:
            return compiled.render(messages=messages, add_generation_prompt=True, **extra)

        slow = tokenizer.apply_chat_template(_PROBE, add_generation_prompt=True, tokenize=False)
        return render if render(_PROBE) == slow else None
    except Exception:  # any mismatch of transformers internals: use the public path
        return None


def _encode(tokenizer, text: str) -> list[int]:
    """Token ids of ``text`` without special tokens added."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        return backend.encode(text, add_special_tokens=False).ids
    return tokenizer.encode(text, add_special_tokens=False)


# Tokenizing is most of a worker's own cost per request, and most of every chat prompt is
# the same each time: the persona's system prompt and examples, and the template's role
# headers. A fast tokenizer cuts its input at its added tokens (<|im_start|>...) and
# encodes each piece between them on its own, so the ids of a piece seen before can be
# reused: only the pieces holding new text (usually the newest message) are encoded.
# Used only for tokenizers where that cut is exact (no normalizer, no added token that
# strips or matches whole words) and where probes agree with encoding the whole text.
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


class _PieceEncoder:
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
        alternatives = sorted(self.ids, key=len, reverse=True)
        self.split = re.compile("(" + "|".join(map(re.escape, alternatives)) + ")").split
        self.cache: dict[str, list[int]] = {}

    def _by_words(self, piece: str) -> list[int] | None:
        """The ids of an ASCII piece, word by word; None for any other piece."""
        if not (piece.isascii() and _ONLY_ASCII_TEXT(piece)):
            return None
        ids: list[int] = []
        words = self.words
        for word in _ASCII_WORDS(piece):
            found = words.get(word)
            if found is None:
                if len(words) >= WORD_CACHE_SIZE:
                    words.clear()
                found = words[word] = [t.id for t in self.backend.model.tokenize(word.translate(_BYTE_CHARS))]
            ids += found
        return ids

    def encode(self, texts: list[str]) -> list[list[int]]:
        # split() alternates text pieces (even places) and added tokens (odd places).
        parts = [self.split(text) for text in texts]
        cache = self.cache
        if len(cache) > PIECE_CACHE_SIZE:
            cache.clear()  # crude but bounded; the persona's own pieces come back at once
        cache[""] = []
        missing = []
        for pieces in parts:
            for piece in pieces[::2]:
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


def _piece_encoder(backend) -> _PieceEncoder | None:
    """A piece encoder for this tokenizer, or None where cutting at added tokens is not exact."""
    try:
        added = backend.get_added_tokens_decoder().values()
        if backend.normalizer is not None or not added or backend.truncation or backend.padding:
            return None
        if any(t.lstrip or t.rstrip or t.single_word or t.normalized for t in added):
            return None
        encoder = _PieceEncoder(backend)
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


def _encode_many(tokenizer, texts: list[str]) -> list[list[int]]:
    """Token ids of each text, without special tokens added (fast tokenizers only)."""
    backend = tokenizer.backend_tokenizer
    try:
        encoder = _pieces[backend]
    except KeyError:
        encoder = _pieces[backend] = _piece_encoder(backend)
    except TypeError:  # cannot be weakly referenced: not cached
        encoder = None
    if encoder is not None:
        return encoder.encode(texts)
    return [e.ids for e in backend.encode_batch(texts, add_special_tokens=False)]
