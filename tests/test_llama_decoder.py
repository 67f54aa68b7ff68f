"""The lean Llama decode loop gives Hugging Face's logits (fused) or close to them (int8)."""

from __future__ import annotations

import pytest
import torch

from persona.llama_decoder import LlamaDecoder, supports
from persona.models import load_model


@pytest.fixture(scope="module")
def tiny_llama(tiny_llama_dir, tmp_path_factory):
    return load_model(str(tiny_llama_dir), cache_dir=tmp_path_factory.mktemp("cache"))


def _teacher_forced(loaded, decoder: LlamaDecoder, steps: int = 6):
    """Our logits and HF's for the same left-padded batch, step by step."""
    torch.manual_seed(1)
    prompts = [[5, 17, 42, 99, 7, 3], [11, 12]]
    width = max(len(p) for p in prompts)
    pad = loaded.tokenizer.pad_token_id
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    follow = torch.randint(0, 200, (2, steps))
    full = torch.cat([ids, follow], dim=1)
    full_mask = torch.cat([mask, torch.ones_like(follow)], dim=1)
    positions = (full_mask.cumsum(-1) - 1).clamp(min=0)
    with torch.inference_mode():
        theirs = loaded.model(input_ids=full, attention_mask=full_mask, position_ids=positions).logits
        ours = [decoder.start(ids, mask, positions[:, :width], steps)]
        for i in range(steps - 1):
            ours.append(decoder.step(follow[:, i], positions[:, width + i]))
    return torch.stack(ours, 1), theirs[:, width - 1 : width - 1 + steps]


def test_fused_decoder_matches_hugging_face_logits(tiny_llama):
    ours, theirs = _teacher_forced(tiny_llama, LlamaDecoder(tiny_llama.model))
    assert torch.allclose(ours, theirs, atol=1e-4), (ours - theirs).abs().max()


def test_static_step_matches_hugging_face_logits(tiny_llama):
    """The fixed-shape step (the one a GPU captures as a CUDA graph) gives the same logits."""
    ours, theirs = _teacher_forced(tiny_llama, LlamaDecoder(tiny_llama.model, static=True))
    assert torch.allclose(ours, theirs, atol=1e-4), (ours - theirs).abs().max()


def test_int8_decoder_stays_close_to_full_precision(tiny_llama):
    ours, theirs = _teacher_forced(tiny_llama, LlamaDecoder(tiny_llama.model, int8=True))
    similarity = torch.nn.functional.cosine_similarity(ours.flatten(0, 1), theirs.flatten(0, 1), dim=-1)
    assert similarity.min() > 0.99
    assert not torch.allclose(ours, theirs, atol=1e-6)  # it really is a different (quantized) path


@pytest.mark.parametrize("static", [False, True])
def test_rows_can_leave_the_batch(tiny_llama, static):
    decoder = LlamaDecoder(tiny_llama.model, static=static)
    ids = torch.tensor([[1, 2, 3], [4, 5, 6]])
    mask = torch.ones_like(ids)
    positions = torch.tensor([[0, 1, 2], [0, 1, 2]])
    with torch.inference_mode():
        decoder.start(ids, mask, positions, 4)
        both = decoder.step(torch.tensor([7, 8]), torch.tensor([3, 3]))
        decoder.select([1])
        alone = decoder.step(torch.tensor([9]), torch.tensor([4]))
        again = LlamaDecoder(tiny_llama.model, static=static)
        again.start(ids[1:], mask[1:], positions[1:], 4)
        again.step(torch.tensor([8]), torch.tensor([3]))
        expected = again.step(torch.tensor([9]), torch.tensor([4]))
    assert both.shape[0] == 2 and alone.shape[0] == 1
    assert torch.allclose(alone, expected, atol=1e-5)


def test_only_llama_family_models_are_supported(tiny_llama, tiny_gpt2_dir, tmp_path):
    assert supports(tiny_llama.model)
    gpt2 = load_model(str(tiny_gpt2_dir), cache_dir=tmp_path)
    assert not supports(gpt2.model)
