"""The GPU decode path: CUDA graphs of the (compiled) static step give Hugging Face's logits.

These run only where a CUDA GPU is present (CI has none; the lent H100/H200 runs them
through ``bench/gpu_run.sh``). Everything is float32 with TF32 off, so our logits and
Hugging Face's agree to rounding and greedy choices are comparable.
"""

from __future__ import annotations

import pytest
import torch

from persona.decode_lanes import lane_count
from persona.engine import TransformersEngine, Work
from persona.llama_decoder import LlamaDecoder
from persona.models import LoadedModel
from persona.personas import Sampling
from tests.arrivals import word_tokenizer
from tests.checked_batch import CheckedBatch, left_padded, prompt

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

VOCAB = 512


@pytest.fixture(scope="module")
def model():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=VOCAB, hidden_size=192, intermediate_size=384, num_hidden_layers=4, num_attention_heads=6,
        num_key_value_heads=2, max_position_embeddings=1024, tie_word_embeddings=True, rope_theta=100000.0,
    )
    model = LlamaForCausalLM(config).to("cuda").eval()
    # Peaked logits: greedy choices then have margins far above float rounding.
    with torch.no_grad():
        model.model.embed_tokens.weight.mul_(25)
    return model


@pytest.fixture(scope="module")
def tokenizer():
    return word_tokenizer(VOCAB)


def _theirs(model, rows: list[list[int]]) -> list[torch.Tensor]:
    """Hugging Face's next-token logits after every position of each row, alone."""
    with torch.inference_mode():
        return [model(input_ids=torch.tensor([row], device="cuda")).logits[0] for row in rows]


def _left_padded(prompts: list[list[int]]):
    return left_padded(prompts, "cuda")


def _decode(decoder: LlamaDecoder, prompts: list[list[int]], follow: list[list[int]]) -> list[torch.Tensor]:
    """Our logits for each row: after its prompt, then after each teacher-forced token."""
    ids, mask, positions = _left_padded(prompts)
    steps = len(follow[0])
    with torch.inference_mode():
        out = [decoder.start(ids, mask, positions, steps + 1)]
        last = positions[:, -1]
        for i in range(steps):
            last = last + 1
            out.append(decoder.step(torch.tensor([f[i] for f in follow], device="cuda"), last))
    return list(torch.stack(out, 1))


def _expected(model, prompts, follow) -> list[torch.Tensor]:
    full = [p + f for p, f in zip(prompts, follow, strict=True)]
    return [t[len(p) - 1 :] for t, p in zip(_theirs(model, full), prompts, strict=True)]


PROMPTS = [[5, 17, 42, 99, 7, 3, 250, 31], [11, 12], [300, 301, 302, 303, 304]]
FOLLOW = [[8, 9, 10, 11, 12, 13], [40, 41, 42, 43, 44, 45], [60, 61, 62, 63, 64, 65]]


@pytest.mark.parametrize(
    "options",
    [{}, {"compile": True}, {"kernels": "always"}, {"compile": True, "attention": "triton"}],
    ids=["graph", "compiled-graph", "triton-step-graph", "compiled-graph-triton-attention"],
)
def test_graph_steps_give_hugging_faces_logits(model, options):
    decoder = LlamaDecoder(model, graphs=True, **options)
    ours = _decode(decoder, PROMPTS, FOLLOW)
    assert decoder._captured, "the decode steps did not replay a CUDA graph"
    assert decoder.compiled == options.get("compile", False), "the step fell back from torch.compile"
    assert (decoder.kernel_step is not None) == ("kernels" in options), "the small-batch kernels failed"
    assert (decoder.attention is not None) == ("attention" in options)
    for mine, theirs in zip(ours, _expected(model, PROMPTS, FOLLOW), strict=True):
        assert torch.allclose(mine.float(), theirs.float(), atol=2e-3), (mine - theirs).abs().max()


def test_a_large_batch_times_both_attentions_and_gives_hugging_faces_logits(model):
    decoder = LlamaDecoder(model, graphs=True, compile=True, attention="auto")
    prompts = [[p + i for p in PROMPTS[i % 3]] for i in range(10)]
    follow = [FOLLOW[i % 3] for i in range(10)]
    ours = _decode(decoder, prompts, follow)
    assert set(decoder.step_ms[16]) == {"compiled", "compiled_triton_attention"}, decoder.step_ms  # 10 rows, 16 lanes
    for mine, theirs in zip(ours, _expected(model, prompts, follow), strict=True):
        assert torch.allclose(mine, theirs, atol=2e-3), (mine - theirs).abs().max()


def test_a_batch_of_the_same_shape_replays_the_graph_over_a_clean_cache(model):
    decoder = LlamaDecoder(model, graphs=True)
    _decode(decoder, PROMPTS, FOLLOW)
    lanes = lane_count(len(PROMPTS))
    graph = decoder._captured[lanes][0]
    other = [[p + 1 for p in row] for row in PROMPTS]
    ours = _decode(decoder, other, FOLLOW)
    assert decoder._captured[lanes][0] is graph  # not captured again
    for mine, theirs in zip(ours, _expected(model, other, FOLLOW), strict=True):
        assert torch.allclose(mine, theirs, atol=2e-3), (mine - theirs).abs().max()


def test_rows_leave_and_join_a_batch_that_replays_graphs(model):
    decoder = LlamaDecoder(model, graphs=True)
    ids, mask, positions = _left_padded(PROMPTS[:2])
    with torch.inference_mode():
        decoder.start(ids, mask, positions, 8)
        decoder.step(torch.tensor([8, 40], device="cuda"), positions[:, -1] + 1)
        decoder.select([1])  # the first row leaves
        decoder.step(torch.tensor([41], device="cuda"), torch.tensor([3], device="cuda"))
        new_ids, new_mask, new_positions = _left_padded([PROMPTS[2]])
        decoder.join(new_ids, new_mask, new_positions, 8)
        both = decoder.step(torch.tensor([42, 60], device="cuda"), torch.tensor([4, 5], device="cuda"))
    stayed, joined = _theirs(model, [PROMPTS[1] + [40, 41, 42], PROMPTS[2] + [60]])
    assert torch.allclose(both[0], stayed[-1], atol=2e-3)
    assert torch.allclose(both[1], joined[-1], atol=2e-3)


@pytest.mark.parametrize("options", [{}, {"kernels": "always"}], ids=["graph", "triton-step-graph"])
def test_rows_leave_and_join_without_capturing_a_new_graph(model, options):
    batch = CheckedBatch(model, atol=2e-3, graphs=True, **options)
    with torch.inference_mode():
        batch.start([prompt(i, 3 + i) for i in range(4)], room=8)
        batch.step(2)
        graph = batch.decoder._captured[4][0]
        batch.leave(1)
        batch.step()  # lane 1 idles
        batch.join([prompt(9, 14)], room=6)  # longer than the history: the rows move right
        batch.step(2)
        batch.leave(0)
        batch.join([prompt(10, 2)], room=4)  # read by replaying the last join's graph
        batch.step(2)
    assert batch.decoder._captured[4][0] is graph and batch.decoder.layouts == 1
    assert set(batch.decoder._reads) == {(4, 16), (1, 16)}  # captured reads, by shape


def test_past_eight_rows_the_tiled_kernels_replay_as_a_graph(model):
    """20 rows in 24 lanes on the Triton step: its projections as tiled matrix products,
    captured once, rows leaving and joining, every row against Hugging Face's logits."""
    batch = CheckedBatch(model, atol=2e-3, graphs=True, kernels="always")
    with torch.inference_mode():
        batch.start([prompt(i, 2 + i % 7) for i in range(20)], room=8)
        batch.step(2)
        graph = batch.decoder._captured[24][0]
        batch.leave(0, 5, 11)
        batch.step()
        batch.join([prompt(30 + i, 3 + i) for i in range(4)], room=4)
        batch.step(2)
    assert batch.decoder._choice[24] == "kernels" and batch.decoder.kernel_step.max_rows is None
    assert batch.decoder._captured[24][0] is graph and batch.decoder.layouts == 1


def test_a_new_layout_captures_its_prompt_reads_again(model):
    """A layout's captured reads go with it and the next layout captures its own (the
    2026-11-26 H100 run: reusing the old layout's memory pool tripped PyTorch's allocator,
    and the failed capture then broke torch.compile)."""
    batch = CheckedBatch(model, atol=2e-3, graphs=True)
    with torch.inference_mode():
        for rows, room in ((2, 8), (16, 200), (2, 8)):  # each batch lays the cache out anew
            batch.start([prompt(i, 3 + i) for i in range(rows)], room=room)
            batch.step()
            batch.leave(0)
            batch.join([prompt(20, 5)], room=4)  # read by a graph captured at start
            batch.step()
            assert batch.decoder._reads is not None, "a prompt read could not be captured"
    assert batch.decoder.layouts == 3
    assert set(batch.decoder._reads) == {(2, 16), (1, 16)}


def test_the_engine_on_a_gpu_writes_what_it_writes_on_the_cpu(model, tokenizer):
    """Greedy replies, rows joining and leaving, compiled graphs on the GPU vs the plain loop."""
    from torch._dynamo.utils import counters

    def work(prompt: list[int], tokens: int) -> Work:
        return Work(prompt, Sampling(temperature=0.0, max_new_tokens=tokens))

    gpu = _engine(model, tokenizer, "cuda", compile=True)
    gpu.warm_up()
    assert gpu.decoder.compiled
    # Warm-up timed the candidate steps for every small layout (2, 4, 8 lanes) and one of
    # each class of large ones the tiled kernels are tuned for; one lane took the Triton
    # step without compiling the torch step for it.
    assert gpu.decoder.attention_mode == "auto" and gpu.decoder.kernel_step is not None
    assert gpu.decoder.timed_sizes == [1, 2, 4, 8, 16, 32, 64, 128]
    assert sorted(gpu.decoder.step_ms) == [2, 4, 8, 16, 32, 64, 128], gpu.decoder.step_ms
    assert gpu.decoder._choice[1] == "kernels"
    compiled_graphs = counters["stats"]["unique_graphs"]
    cpu = _engine(model, tokenizer, "cpu", compile=False)
    batches = (
        [work(PROMPTS[0], 9), work(PROMPTS[1], 3)],
        [work(p, 5 + i) for i, p in enumerate(PROMPTS * 2)],
        [work(PROMPTS[2], 150), work(PROMPTS[0], 20)],  # 192 slots: a longer cache than warm-up's
        [work(p, 100) for p in PROMPTS * 3],  # 9 rows, 16 lanes, 128 slots
    )
    for batch in batches:
        assert [c.text for c in gpu.generate(batch)] == [c.text for c in cpu.generate(batch)]
    # A row that joins a running batch gets the same reply as alone.
    gpu.add(work(PROMPTS[0], 12), "long")
    gpu.step()
    gpu.add(work(PROMPTS[2], 4), "late")
    replies = {}
    while gpu.active:
        replies.update({tag: c.text for tag, c in gpu.step()})
    assert replies["late"] == cpu.generate([work(PROMPTS[2], 4)])[0].text
    assert replies["long"] == cpu.generate([work(PROMPTS[0], 12)])[0].text
    # New batch sizes and cache lengths after warm-up compile nothing on a user's time.
    assert counters["stats"]["unique_graphs"] == compiled_graphs


def _engine(model, tokenizer, device: str, compile: bool) -> TransformersEngine:
    """The fused engine over the test model, on the GPU or over a copy on the CPU."""
    loaded = LoadedModel(
        model=model if device == "cuda" else _cpu_copy(model), tokenizer=tokenizer, device=device,
        name="tiny", has_chat_template=False, stop_token_ids=[],
    )
    return TransformersEngine(loaded, mode="fused", compile=compile)


def _cpu_copy(model):
    import copy

    return copy.deepcopy(model).to("cpu")


def test_rows_come_and_go_without_the_host_waiting_for_the_gpu(model, tokenizer):
    """Looking ahead, the engine queues the next step before its bookkeeping; anything
    there that waits for the GPU (a copy from pageable memory, ``.item()``) would leave it
    idle. Once a layout's step and prompt reads are captured, rows joining and leaving
    make no such wait (torch's sync debug mode raises on one)."""
    engine = _engine(model, tokenizer, "cuda", compile=False)

    def serve(first_seed: int) -> dict[int, str]:
        backlog = [
            (i, Work(prompt(first_seed + i, 5), Sampling(temperature=0.0, max_new_tokens=3 + i % 8))) for i in range(12)
        ]
        replies = {}
        while backlog or engine.active:
            while backlog and engine.active < 4:
                engine.add(backlog[0][1], backlog.pop(0)[0])
            replies.update({tag: c.text for tag, c in engine.step()})
        return replies

    serve(0)  # lays out four lanes, captures their step and the prompt reads of 1, 2 and 4 rows
    layouts = engine.decoder.layouts
    torch.cuda.set_sync_debug_mode("error")
    try:
        replies = serve(100)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert len(replies) == 12 and engine.decoder.layouts == layouts
