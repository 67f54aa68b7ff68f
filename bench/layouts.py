"""How a GPU server's cache is laid out, simulated on a CPU in seconds.

A static cache (the GPU's) is laid out anew when rows outgrow its lanes or slots, or
shrink to half of them; on a GPU each new layout captures its graphs again (the step,
each prompt-read shape), which costs tens of milliseconds. This runs ``persona bench
serve``'s backlog (its prompts, through the bundled tokenizer, and its mix of reply
lengths) through the engine over a static decoder of a tiny random model on the CPU, with
rows joining every ``--join-every`` steps as on a GPU, and prints how many layouts, prompt
reads and in-place moves it took, and each layout's lanes and slots.

    python bench/layouts.py [--requests 512] [--concurrency 128] [--longest 256]

Same policy as on a GPU (the decoder's code is the same; only graphs are off), so a
change to how layouts grow or shrink can be judged here before a GPU measures it.
"""

from __future__ import annotations

import argparse
import json

import torch

from persona.bench_engine import prompt_ids, sampling_for
from persona.bench_serve import reply_lengths, serve_backlog
from persona.engine import TransformersEngine, Work
from persona.llama_decoder import JOIN_EVERY, LlamaDecoder
from persona.models import LoadedModel, bundled_tokenizer


class _Recorded(LlamaDecoder):
    """The decoder, noting each layout's shape."""

    shapes: list[tuple[int, int]]

    def _allocate(self, lanes: int, capacity: int) -> None:
        self.shapes.append((lanes, capacity))
        super()._allocate(lanes, capacity)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=512)
    parser.add_argument("--concurrency", type=int, default=128)
    parser.add_argument("--longest", type=int, default=256)
    parser.add_argument("--join-every", type=int, default=JOIN_EVERY)
    args = parser.parse_args()
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = bundled_tokenizer()
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=1, max_position_embeddings=8192, tie_word_embeddings=True,
    )  # fmt: skip
    model = LlamaForCausalLM(config).eval()
    loaded = LoadedModel(
        model=model, tokenizer=tokenizer, device="cpu", name="tiny", has_chat_template=True,
        stop_token_ids=[tokenizer.eos_token_id],
    )  # fmt: skip
    engine = TransformersEngine(loaded, mode="fused", threads=torch.get_num_threads())
    decoder = _Recorded(model, static=True, join_every=args.join_every)
    decoder.shapes = []
    engine.decoder = decoder  # the GPU's static cache, without graphs
    engine.stop_ids = set()
    lengths = reply_lengths(args.requests, args.longest)
    prompts = prompt_ids(loaded, args.requests, numbered=True)
    work = [Work(ids, sampling_for(tokens, sampled=False)) for ids, tokens in zip(prompts, lengths, strict=True)]
    serve_backlog(engine, work, args.concurrency, continuous=True)
    report = {"layouts": decoder.layouts, "reads": decoder.reads, "moves": decoder.moves, "shapes": decoder.shapes}
    print(json.dumps(report))


if __name__ == "__main__":
    main()
