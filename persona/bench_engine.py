"""`persona bench engine`: our decode loop against plain ``generate()`` on the same model.

Both sides get the same left-padded chat prompts and produce exactly the same number
of new tokens per row (greedy; end-of-text is ignored on both sides so lengths match),
timed from the prompt to the last token. On CPU the model is the bundled SmolLM2; on a
GPU, where the weights may not have travelled, a model of its shape with random
weights in bf16. When our engine runs on llama.cpp, llama-cpp-python's own one-sequence
``Llama.generate`` on the same GGUF is measured too (``llamacpp``), batch 1 only: what
llama.cpp alone gives, against which our sampling and batching are measured.
"""

from __future__ import annotations

import gc
import logging
import resource
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from persona.engine import TransformersEngine, Work
from persona.errors import UsageError
from persona.models import LoadedModel, load_model
from persona.personas import Sampling

__all__ = [
    "EngineBenchResult", "check_room", "forget_prefixes", "load_bench_model", "prompt_ids", "run_engine_bench",
    "sampling_for", "sync_device", "time_baseline",
]  # fmt: skip

log = logging.getLogger(__name__)

PROMPTS = [
    "Tell me a short story about a brave little fox.",
    "What is the capital of France, and why is it famous?",
    "Give me three tips for sleeping better.",
    "Explain what a rainbow is to a five-year-old.",
    "Write a haiku about the sea at night.",
    "How do I make a good cup of tea?",
    "What should I pack for a weekend hike?",
    "Describe your favourite season and why.",
]

# A chat-sized prompt (a persona's system prompt and a message: about 130 tokens with the
# bundled chat template, as `sage` builds them) for the time to the first token.
CHAT_SYSTEM = (
    "You are Sage, a calm and thoughtful companion. You answer in two or three short sentences, "
    "plainly and kindly, without lists or headings. You never pretend to know what you do not know; "
    "when a question has no good answer, you say so and offer a way to think about it instead. "
    "You like concrete examples, everyday images and a little dry humour."
)
CHAT_MESSAGES = [
    "I keep starting projects and never finishing them. What should I do about that?",
    "My sister and I argue every time we talk about money. How do I stop that?",
    "Is it too late to learn the piano at forty, and how would I begin?",
    "What is a good way to spend a rainy Sunday alone without feeling lonely?",
]

# The bundled SmolLM2-135M's shape, for a random-weight model where the weights are absent.
SMOLLM2_SHAPE = dict(
    hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
    num_key_value_heads=3, vocab_size=49152, tie_word_embeddings=True, rope_theta=100000.0,
    max_position_embeddings=8192, rms_norm_eps=1e-5,
)


@dataclass
class EngineBenchResult:
    """Tokens per second by batch size, ours and the baseline's."""

    device: str
    model: str
    mode: str
    new_tokens: int
    threads: int
    engine_build_s: float = 0.0
    rss_mb: float = 0.0
    ours: dict[int, float] = field(default_factory=dict)
    baseline: dict[int, float] = field(default_factory=dict)
    llamacpp: dict[int, float] = field(default_factory=dict)
    # Milliseconds from a chat-sized prompt to its first token (reading the prompt):
    # "ours" (a prompt new to the engine), "ours_same_persona" and "baseline".
    first_token_ms: dict[str, float] = field(default_factory=dict)
    prompt_tokens: int = 0
    # "greedy", or "persona": temperature 0.8, top-p 0.95, top-k 50, repetition penalty 1.1
    sampling: str = "greedy"
    warm_up_s: float = 0.0  # the engine's warm-up, as a worker runs it at start (compiling included)
    compiled: bool = False  # whether the decode step ran compiled (torch.compile, GPU)
    # GPU: lanes (the rows a cache is laid out for) -> milliseconds per decode step of each
    # candidate the engine timed at warm-up (the small-batch Triton kernels, the compiled
    # step); it keeps the faster.
    step_ms: dict[int, dict[str, float]] = field(default_factory=dict)
    kernels: str = "never"  # GPU: the small-batch Triton step (auto, always, never)
    attention: str = "torch"  # GPU: the compiled step's attention (auto, torch or triton), as it ran
    reads_captured: bool = False  # GPU: whether prompt reads replayed captured graphs to the end

    def ratio(self, batch: int) -> float:
        base = self.baseline.get(batch, 0.0)
        return self.ours.get(batch, 0.0) / base if base else 0.0

    def as_dict(self) -> dict:
        return {
            "device": self.device, "model": self.model, "mode": self.mode, "new_tokens": self.new_tokens,
            "threads": self.threads, "engine_build_s": self.engine_build_s, "rss_mb": self.rss_mb, "ours": self.ours, "baseline": self.baseline,
            "ratio": {b: round(self.ratio(b), 2) for b in self.ours}, "llamacpp": self.llamacpp,
            "first_token_ms": self.first_token_ms, "prompt_tokens": self.prompt_tokens,
            "warm_up_s": self.warm_up_s, "compiled": self.compiled, "sampling": self.sampling,
            "step_ms": self.step_ms, "kernels": self.kernels, "attention": self.attention,
            "reads_captured": self.reads_captured,
        }


def load_bench_model(device: str, cache_dir: Path, tokenizer_dir: Path | None = None) -> LoadedModel:
    """The bundled model on CPU; a random model of its shape (bf16) on a GPU, with the
    bundled model's tokenizer (or the one saved in ``tokenizer_dir``, where the GGUF is
    not installed: a GPU machine the 98 MB file did not travel to)."""
    if device == "cpu":
        return load_model("smollm2", cache_dir=cache_dir, device="cpu")
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from persona.models import bundled_tokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir) if tokenizer_dir is not None else bundled_tokenizer()
    torch.manual_seed(0)
    config = LlamaConfig(**SMOLLM2_SHAPE, eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.bos_token_id)
    model = LlamaForCausalLM(config).to(device=device, dtype=torch.bfloat16).eval()
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return LoadedModel(
        model=model, tokenizer=tokenizer, device=device, name="smollm2-shape (random weights)",
        has_chat_template=True, stop_token_ids=[tokenizer.eos_token_id],
    )


def prompt_ids(loaded: LoadedModel, batch: int, numbered: bool = False) -> list[list[int]]:
    """``batch`` chat prompts, PROMPTS cycled; ``numbered``: each message begins with its own
    number, so no two prompts are alike past the chat template's opening."""
    tokenizer = loaded.tokenizer
    out = []
    for i in range(batch):
        text = PROMPTS[i % len(PROMPTS)]
        if numbered:
            text = f"Question {i + 1}: {text}"
        if loaded.has_chat_template:
            messages = [{"role": "user", "content": text}]
            text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        out.append(tokenizer.encode(text, add_special_tokens=False))
    return out


def _chat_prompt_ids(loaded: LoadedModel, message: str = CHAT_MESSAGES[0]) -> list[int]:
    tokenizer = loaded.tokenizer
    if loaded.has_chat_template:
        messages = [{"role": "system", "content": CHAT_SYSTEM}, {"role": "user", "content": message}]
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    else:
        text = f"{CHAT_SYSTEM}\n\n{message}\n"
    ids = tokenizer.encode(text, add_special_tokens=False)
    return ids[-(loaded.context_tokens - 1):]  # a small model's context may be shorter


def check_room(loaded: LoadedModel, prompts: list[list[int]], new_tokens: int, option: str = "--tokens") -> None:
    """Refuse, before anything is timed, new tokens that would run past the model's context."""
    longest = max(len(p) for p in prompts)
    room = loaded.context_tokens - longest
    if new_tokens > room:
        raise UsageError(
            f"{option} {new_tokens} does not fit: {loaded.name} reads at most {loaded.context_tokens} tokens and "
            f"the benchmark's longest prompt takes {longest} of them; give {option} {max(room, 1)} or fewer"
        )


def sync_device(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def sampling_for(new_tokens: int, sampled: bool) -> Sampling:
    """Greedy (no repetition penalty, as ``generate()`` by default), or a persona's defaults."""
    if sampled:
        return Sampling(max_new_tokens=new_tokens)
    return Sampling(temperature=0.0, repetition_penalty=1.0, max_new_tokens=new_tokens)


def _time_ours(engine: TransformersEngine, prompts: list[list[int]], new_tokens: int, sampled: bool = False) -> float:
    work = [Work(ids, sampling_for(new_tokens, sampled)) for ids in prompts]
    sync_device(engine.loaded.device)
    started = time.perf_counter()
    completions = engine.generate(work)
    sync_device(engine.loaded.device)
    elapsed = time.perf_counter() - started
    made = sum(c.new_tokens for c in completions)
    if made != new_tokens * len(prompts):
        raise RuntimeError(f"our engine made {made} tokens, expected {new_tokens * len(prompts)}")
    return made / elapsed


@torch.inference_mode()
def time_baseline(loaded: LoadedModel, prompts: list[list[int]], new_tokens: int, sampled: bool = False) -> float:
    width = max(len(p) for p in prompts)
    pad = loaded.tokenizer.pad_token_id
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts], device=loaded.device)
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=loaded.device)
    if sampled:
        s = sampling_for(new_tokens, True)
        how = {"do_sample": True, "temperature": s.temperature, "top_p": s.top_p, "top_k": s.top_k,
               "repetition_penalty": s.repetition_penalty}
    else:
        how = {"do_sample": False}
    sync_device(loaded.device)
    started = time.perf_counter()
    out = loaded.model.generate(
        input_ids=ids, attention_mask=mask, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
        pad_token_id=pad, **how,
    )
    sync_device(loaded.device)
    elapsed = time.perf_counter() - started
    made = (out.shape[1] - width) * len(prompts)
    return made / elapsed


def _first_tokens(engine: TransformersEngine, loaded: LoadedModel, repeats: int) -> dict[str, float]:
    """Best-of-``repeats`` milliseconds from a chat prompt to its first token: ours with
    the prompt new to the engine (``ours``), ours for a new message to a persona it has
    just answered (``ours_same_persona``: its system prompt is kept where the decoder keeps
    prefixes), and ``generate()``."""
    cold, warm, base = float("inf"), float("inf"), float("inf")
    for i in range(repeats):
        first, second = (_chat_prompt_ids(loaded, CHAT_MESSAGES[(2 * i + k) % len(CHAT_MESSAGES)]) for k in (0, 1))
        forget_prefixes(engine)
        cold = min(cold, _timed_ms(lambda p=first: _time_ours(engine, [p], 1), loaded.device))
        warm = min(warm, _timed_ms(lambda p=second: _time_ours(engine, [p], 1), loaded.device))
        base = min(base, _timed_ms(lambda p=first: time_baseline(loaded, [p], 1), loaded.device))
    return {"ours": round(cold, 1), "ours_same_persona": round(warm, 1), "baseline": round(base, 1)}


def forget_prefixes(engine: TransformersEngine) -> None:
    """Make the next prompts new to the engine (a decoder that keeps prefixes drops them)."""
    forget = getattr(engine.decoder, "forget_prefixes", None)
    if forget is not None:
        forget()


def _timed_ms(call: Callable[[], object], device: str) -> float:
    sync_device(device)
    started = time.perf_counter()
    call()
    sync_device(device)
    return (time.perf_counter() - started) * 1000


def _time_llamacpp(path: Path, prompt: list[int], new_tokens: int, threads: int) -> float:
    """llama-cpp-python's own greedy loop (one sequence, C sampler) on the same GGUF."""
    import llama_cpp

    from persona.llamacpp_decoder import route_llama_cpp_logs

    route_llama_cpp_logs()
    context = max(1024, len(prompt) + new_tokens)  # room for every token asked
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=context, n_threads=threads, n_threads_batch=threads, verbose=False)
    best = 0.0
    for _ in range(2):
        llm.reset()
        started = time.perf_counter()
        made = 0
        for _token in llm.generate(prompt, top_k=1, temp=0.0, reset=True):
            made += 1
            if made == new_tokens:
                break
        best = max(best, made / (time.perf_counter() - started))
    del llm
    return best


def run_engine_bench(
    loaded: LoadedModel,
    batches: list[int],
    new_tokens: int = 64,
    mode: str = "auto",
    repeats: int = 2,
    progress: Callable[[], None] | None = None,
    cache_dir: Path | None = None,
    gguf_type: str = "q8_0",
    compile: bool = True,
    sampled: bool = False,
    kernels: str = "auto",
    attention: str = "auto",
) -> EngineBenchResult:
    """Best of ``repeats`` runs per batch size, ours and the baseline, interleaved; then
    the time to the first token of a chat-sized prompt, both sides. Greedy, or with
    ``sampled`` both sides sample as a persona does by default."""
    device = loaded.device
    check_room(loaded, prompt_ids(loaded, min(max(batches), len(PROMPTS))), new_tokens)
    built = time.perf_counter()
    engine = TransformersEngine(
        loaded, mode=mode, cache_dir=cache_dir, threads=torch.get_num_threads(), gguf_type=gguf_type, compile=compile,
        kernels=kernels, attention=attention,
    )  # fmt: skip
    result = EngineBenchResult(
        device=device, model=loaded.name, mode=engine.mode, new_tokens=new_tokens, threads=torch.get_num_threads(),
        engine_build_s=round(time.perf_counter() - built, 2), sampling="persona" if sampled else "greedy",
    )
    result.warm_up_s = round(engine.warm_up(), 2)
    log.info("%s engine built in %.1f s, warmed up in %.1f s", engine.mode, result.engine_build_s, result.warm_up_s)
    engine.stop_ids = set()  # exactly new_tokens per row, like min_new_tokens on the baseline side
    warm = prompt_ids(loaded, 1)
    _time_ours(engine, warm, 4)
    time_baseline(loaded, warm, 4)
    for batch in batches:
        prompts = prompt_ids(loaded, batch)
        ours, base = 0.0, 0.0
        for _ in range(repeats):
            # Interleaved, so a neighbour's burst of load hits both sides alike.
            base = max(base, time_baseline(loaded, prompts, new_tokens, sampled))
            forget_prefixes(engine)  # each run reads its prompts in full, as the baseline does
            ours = max(ours, _time_ours(engine, prompts, new_tokens, sampled))
            gc.collect()
            if progress:
                progress()
        result.ours[batch] = round(ours, 1)
        result.baseline[batch] = round(base, 1)
        log.info("batch %d: ours %.1f tok/s, baseline %.1f tok/s", batch, ours, base)
    result.prompt_tokens = len(_chat_prompt_ids(loaded))
    result.first_token_ms = _first_tokens(engine, loaded, repeats)
    result.compiled = bool(getattr(engine.decoder, "compiled", False))
    result.step_ms = dict(getattr(engine.decoder, "step_ms", {}))
    if getattr(engine.decoder, "graphs", False):
        result.kernels = engine.decoder.kernels if engine.decoder.kernel_step is not None else "never"
        result.attention = engine.decoder.attention_mode
        result.reads_captured = engine.decoder.reads_captured
    if engine.mode == "llamacpp" and 1 in batches:
        path = engine.decoder.path
        del engine
        gc.collect()
        result.llamacpp[1] = round(_time_llamacpp(path, prompt_ids(loaded, 1)[0], new_tokens, result.threads), 1)
    result.rss_mb = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    return result
