"""Every engine path answers batches with per-row settings; the fast ones agree with eager."""

from __future__ import annotations

from dataclasses import replace

import pytest

from persona.engine import TransformersEngine, Work, pick_engine_mode
from persona.models import load_model
from persona.personas import Sampling


@pytest.fixture(scope="module")
def tiny_llama(tiny_llama_dir, tmp_path_factory):
    return load_model(str(tiny_llama_dir), cache_dir=tmp_path_factory.mktemp("cache"))


def _batch() -> list[Work]:
    return [
        Work([5, 17, 42, 99], Sampling(temperature=0.0, max_new_tokens=3)),
        Work([11, 12], Sampling(temperature=0.0, max_new_tokens=7, repetition_penalty=1.3)),
        Work([8, 9, 10, 11, 12, 13], Sampling(temperature=0.9, top_k=5, max_new_tokens=5, seed=3)),
        Work([21], Sampling(temperature=1.0, top_k=0, top_p=0.5, max_new_tokens=4, seed=4)),
    ]


def test_fused_engine_gives_the_same_text_as_eager(tiny_llama):
    eager = TransformersEngine(tiny_llama, mode="eager").generate(_batch())
    fused = TransformersEngine(tiny_llama, mode="fused").generate(_batch())
    assert [c.text for c in fused] == [c.text for c in eager]
    assert [c.new_tokens for c in fused] == [c.new_tokens for c in eager]


def test_int8_engine_answers_every_row_within_its_budget(tiny_llama):
    engine = TransformersEngine(tiny_llama, mode="int8")
    assert engine.mode == "int8"
    completions = engine.generate(_batch())
    assert len(completions) == 4
    assert all(1 <= c.new_tokens <= w.sampling.max_new_tokens for c, w in zip(completions, _batch()))


def test_auto_picks_int8_for_wide_llamas_on_cpu_fused_for_narrow_eager_for_others(tiny_llama, tiny_gpt2_dir, tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    assert pick_engine_mode("auto", tiny_llama) == "fused"
    wide = LlamaForCausalLM(
        LlamaConfig(hidden_size=512, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4, vocab_size=64)
    )
    assert pick_engine_mode("auto", replace(tiny_llama, model=wide)) == "int8"
    gpt2 = load_model(str(tiny_gpt2_dir), cache_dir=tmp_path)
    assert pick_engine_mode("auto", gpt2) == "eager"
    assert pick_engine_mode("fused", gpt2) == "eager"
    with pytest.raises(ValueError, match="unknown engine mode"):
        pick_engine_mode("turbo", gpt2)
