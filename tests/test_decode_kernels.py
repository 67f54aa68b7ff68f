"""The small-batch Triton kernels give Hugging Face's logits, rows joining and leaving included.

On a GPU the kernels are compiled and run there; without one they run under Triton's
interpreter on the CPU (in float32: the interpreter has no bfloat16), which checks the
same kernel code, masks and indexing included, just slowly.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
if DEVICE == "cpu":
    os.environ["TRITON_INTERPRET"] = "1"  # read when the kernels are defined, so before the import

triton = pytest.importorskip("triton")
if DEVICE == "cpu" and tuple(int(part) for part in triton.__version__.split(".")[:2]) < (3, 8):
    pytest.skip("Triton's interpreter needs 3.8 or later with numpy 2.4", allow_module_level=True)

from persona.decode_kernels import Attention, TritonStep, splits_for
from persona.llama_decoder import LlamaDecoder
from tests.checked_batch import CheckedBatch, left_padded, prompt


def _model(**overrides):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.backends.cuda.matmul.allow_tf32 = False
    torch.manual_seed(0)
    shape = {
        # 6 query heads over 2 KV heads: groups of 3, which the kernel pads to 4.
        "vocab_size": 256, "hidden_size": 96, "intermediate_size": 160, "num_hidden_layers": 2,
        "num_attention_heads": 6, "num_key_value_heads": 2, "max_position_embeddings": 256,
        "tie_word_embeddings": True, "rope_theta": 100000.0,
    } | overrides  # fmt: skip
    return LlamaForCausalLM(LlamaConfig(**shape)).to(DEVICE).eval()


@pytest.fixture(scope="module")
def model():
    return _model()


def _left_padded(prompts: list[list[int]]):
    return left_padded(prompts, DEVICE)


def _theirs(model, row: list[int]) -> torch.Tensor:
    """Hugging Face's logits after the last token of ``row``, alone."""
    with torch.inference_mode():
        return model(input_ids=torch.tensor([row], device=DEVICE)).logits[0, -1]


PROMPTS = [[5, 17, 42, 99, 7, 3, 250], [11, 12]]
FOLLOW = [[8, 9, 10, 11], [40, 41, 42, 43]]


@pytest.mark.parametrize(
    "options", [{"kernels": "always"}, {"attention": "triton"}], ids=["whole-step", "attention-in-the-torch-step"]
)
def test_the_kernels_give_hugging_faces_logits(model, options):
    decoder = LlamaDecoder(model, static=True, **options)
    if "kernels" in options:
        assert isinstance(decoder.kernel_step, TritonStep)
    else:
        assert isinstance(decoder.attention, Attention) and decoder.kernel_step is None
    ids, mask, positions = _left_padded(PROMPTS)
    last = positions[:, -1]
    with torch.inference_mode():
        decoder.start(ids, mask, positions, len(FOLLOW[0]) + 1)
        for i in range(len(FOLLOW[0])):
            last = last + 1
            ours = decoder.step(torch.tensor([f[i] for f in FOLLOW], device=DEVICE), last)
            for row, (prompt, follow) in enumerate(zip(PROMPTS, FOLLOW, strict=True)):
                theirs = _theirs(model, prompt + follow[: i + 1])
                assert torch.allclose(ours[row], theirs, atol=1e-4), (i, row, (ours[row] - theirs).abs().max())


def test_rows_leave_and_join_a_batch_on_the_kernel_step(model):
    decoder = LlamaDecoder(model, static=True, kernels="always")
    ids, mask, positions = _left_padded(PROMPTS)
    with torch.inference_mode():
        decoder.start(ids, mask, positions, 6)
        decoder.step(torch.tensor([8, 40], device=DEVICE), positions[:, -1] + 1)
        decoder.select([1])  # the first row leaves
        decoder.step(torch.tensor([41], device=DEVICE), torch.tensor([3], device=DEVICE))
        new_ids, new_mask, new_positions = _left_padded([[60, 61, 62, 63, 64]])
        decoder.join(new_ids, new_mask, new_positions, 6)
        both = decoder.step(torch.tensor([42, 65], device=DEVICE), torch.tensor([4, 5], device=DEVICE))
    assert torch.allclose(both[0], _theirs(model, PROMPTS[1] + [40, 41, 42]), atol=1e-4)
    assert torch.allclose(both[1], _theirs(model, [60, 61, 62, 63, 64, 65]), atol=1e-4)


@pytest.mark.parametrize("options", [{"kernels": "always"}, {"attention": "triton"}], ids=["whole-step", "attention"])
def test_idle_lanes_and_moved_slots_on_the_kernels(model, options):
    """The kernels read ``valid`` and ``at`` of a cache whose rows left, joined and moved."""
    batch = CheckedBatch(model, **options)
    with torch.inference_mode():
        batch.start([prompt(i, 2 + i) for i in range(4)], room=5)
        batch.step()
        batch.leave(0)
        batch.step()  # lane 0 idles
        batch.join([prompt(7, 9)], room=3)  # longer than the history: the rows move right
        batch.step(2)
    assert batch.decoder.lanes == [1, 2, 3, 0] and batch.decoder.layouts == 1


@pytest.mark.parametrize("norm", [False, True], ids=["plain", "norm"])
@pytest.mark.parametrize("gated", [False, True], ids=["linear", "gated"])
@pytest.mark.parametrize("residual", [False, True], ids=["fresh", "residual"])
@pytest.mark.parametrize("rows", [3, 19], ids=["vector", "tiled"])
def test_a_projection_is_norm_then_matrix_product(model, rows, norm, gated, residual):
    """Each projection the step launches against torch: (RMS norm,) x·Wᵀ, (SiLU(gate)·up,)
    (+ the residual). 19 rows take the tiled kernel, whose tiles (16 rows, 64 outputs,
    64 columns) then end part-way in every dimension."""
    step = TritonStep(LlamaDecoder(model, static=True))
    torch.manual_seed(1)
    width, outputs = 96, 80
    x = torch.randn((rows, width), device=DEVICE)
    weight = torch.randn((2 * outputs if gated else outputs, width), device=DEVICE) / width**0.5
    scale = torch.rand(width, device=DEVICE) + 0.5
    out = torch.randn((rows, outputs), device=DEVICE)
    residual_stream = out.clone()
    step._project(x, weight, out, norm=scale if norm else None, gated=gated, residual=residual)
    h = torch.nn.functional.rms_norm(x, (width,), scale, step.decoder.eps) if norm else x
    expected = h @ weight.T
    if gated:
        gate, up = expected.chunk(2, dim=-1)
        expected = torch.nn.functional.silu(gate) * up
    if residual:
        expected = expected + residual_stream
    assert torch.allclose(out, expected, atol=1e-4), (out - expected).abs().max()


def test_past_eight_rows_the_tiled_kernels_decode_and_rows_come_and_go(model):
    """20 rows in 24 lanes take the tiled kernels; rows leave and join as on the small step."""
    batch = CheckedBatch(model, kernels="always")
    with torch.inference_mode():
        batch.start([prompt(i, 2 + i % 7) for i in range(20)], room=6)
        batch.step()
        batch.leave(0, 5, 11)
        batch.step()
        batch.join([prompt(30 + i, 3 + i) for i in range(4)], room=3)  # 21 rows
        batch.step(2)
    assert batch.decoder.valid.shape[0] == 24 and batch.decoder.layouts == 1


def test_a_long_cache_is_shared_among_programs_and_merged():
    """Over a cache of 640 slots one row's attention is split among two programs per KV
    head and merged by a second kernel: the same logits as Hugging Face's."""
    model = _model(max_position_embeddings=1024, num_hidden_layers=1)
    prompts = [[(7 * i) % 250 + 3 for i in range(520)], [11, 12, 13]]
    decoder = LlamaDecoder(model, static=True, kernels="always")
    ids, mask, positions = _left_padded(prompts)
    with torch.inference_mode():
        decoder.start(ids, mask, positions, 100)
        assert splits_for(2, decoder.kv_heads, decoder.k[0].shape[2]) == 2
        ours = decoder.step(torch.tensor([40, 41], device=DEVICE), positions[:, -1] + 1)
    for row, tokens in enumerate(prompts):
        theirs = _theirs(model, tokens + [40 + row])
        assert torch.allclose(ours[row], theirs, atol=1e-4), (row, (ours[row] - theirs).abs().max())


def test_splitting_the_slots_changes_no_attention(model):
    """Any number of splits, empty ones included, merges to what one program computes."""
    decoder = LlamaDecoder(model, static=True)
    attention = Attention(decoder)
    ids, mask, positions = _left_padded([[(5 * i) % 250 + 3 for i in range(150)], [11, 12]])
    torch.manual_seed(2)
    with torch.inference_mode():
        decoder.start(ids, mask, positions, 4)
        qkv = torch.randn((2, (decoder.heads + 2 * decoder.kv_heads) * decoder.head_dim), device=DEVICE)
        answers = [
            attention(qkv, positions[:, -1] + 1, decoder.k[0].clone(), decoder.v[0].clone(), splits)
            for splits in (1, 2, 4, 8)
        ]
    for splits, answer in zip((2, 4, 8), answers[1:], strict=True):
        assert torch.allclose(answer, answers[0], atol=1e-5), (splits, (answer - answers[0]).abs().max())


def test_a_model_the_kernels_cannot_run_decodes_with_the_torch_step():
    biased = _model(attention_bias=True, num_hidden_layers=1)
    with pytest.raises(ValueError, match="biases"):
        TritonStep(LlamaDecoder(biased, static=True))
    decoder = LlamaDecoder(biased, static=True, kernels="always")
    assert decoder.kernel_step is None
    ids, mask, positions = _left_padded([[5, 6, 7]])
    with torch.inference_mode():
        decoder.start(ids, mask, positions, 2)
        ours = decoder.step(torch.tensor([8], device=DEVICE), torch.tensor([3], device=DEVICE))
    assert torch.allclose(ours[0], _theirs(biased, [5, 6, 7, 8]), atol=1e-4)


def test_an_unknown_kernel_choice_is_refused(model):
    with pytest.raises(ValueError, match="kernels must be one of never, auto, always"):
        LlamaDecoder(model, static=True, kernels="sometimes")
    with pytest.raises(ValueError, match="attention must be one of torch, triton, auto"):
        LlamaDecoder(model, static=True, attention="flash")


def test_the_kernels_compile_for_an_h100_in_bfloat16():
    """What the interpreter cannot check: Triton's compiler and ptxas accept every kernel the
    step launches for the bundled model's shape, in every tile the GPU may pick, and no
    tile's registers spill. In a
    process of its own: Triton here was imported to interpret, which it then does throughout."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    script = Path(__file__).with_name("kernels_compile.py")
    done = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=240, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "compiled 47 kernels for sm_90a" in done.stdout, done.stdout


@pytest.mark.skipif(DEVICE == "cpu", reason="bfloat16 needs a GPU (Triton's interpreter has none)")
@pytest.mark.parametrize(
    ("options", "copies"),
    [({"kernels": "always"}, 1), ({"kernels": "always"}, 6), ({"attention": "triton"}, 1)],
    ids=["whole-step", "whole-step-tiled", "attention"],
)
def test_in_bfloat16_the_kernels_stay_within_rounding_of_the_torch_step(model, options, copies):
    """The precision a GPU serves in: the same teacher-forced logits, to bf16 rounding
    (12 rows: the tiled projections, in tensor cores)."""
    import copy

    half = copy.deepcopy(model).to(torch.bfloat16)
    ids, mask, positions = _left_padded(PROMPTS * copies)
    follow = FOLLOW * copies
    results = []
    for opts in ({}, options):
        decoder = LlamaDecoder(half, static=True, **opts)
        last = positions[:, -1]
        with torch.inference_mode():
            steps = [decoder.start(ids, mask, positions, len(FOLLOW[0]) + 1).float()]
            for i in range(len(FOLLOW[0])):
                last = last + 1
                steps.append(decoder.step(torch.tensor([f[i] for f in follow], device=DEVICE), last).float())
        results.append(torch.stack(steps, 1))
    torch_step, kernels = results
    assert (torch_step - kernels).abs().max() < 0.05 * torch_step.abs().max(), (torch_step - kernels).abs().max()
