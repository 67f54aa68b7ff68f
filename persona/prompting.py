"""Turning a request into the token ids a model continues.

Chat-template models (SmolLM2-Instruct) get the persona's system prompt, its few-shot
examples and the conversation as chat turns. Plain models (GPT-2, or a model fine-tuned
on raw text) get a transcript ("User: ...\\nSage: ...") and stop at the next speaker's
name, so the persona never writes the user's side of the conversation.

The conversation is trimmed to the model's context window, oldest turns first; the
newest message is always kept (cut from its start only if it alone is too long).
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass

from persona.contract import GenerationRequest, Message
from persona.models import LoadedModel
from persona.personas import Persona, Sampling
from persona.tokenizing import encode_many

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
        encoded = encode_many(loaded.tokenizer, list(texts.values()))
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
