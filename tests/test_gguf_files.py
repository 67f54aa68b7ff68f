"""Checkpoints written as GGUF are the same model for llama.cpp; export can write one."""

from __future__ import annotations

import pytest
import torch

from persona.engine_modes import llamacpp_available
from persona.models import load_model

pytestmark = pytest.mark.skipif(not llamacpp_available(), reason="llama-cpp-python (the `fast` extra) is not installed")


def _torch_logits(model, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0, -1]


def test_a_checkpoint_written_as_gguf_gives_the_torch_models_logits(tiny_llama, tmp_path):
    """Written at full precision, the GGUF is the same function: names, shapes and the
    rotary permutation of q and k are right."""
    from persona.gguf_files import write_gguf
    from persona.llamacpp_decoder import LlamaCppDecoder

    path = write_gguf(tiny_llama.model, tiny_llama.tokenizer, tmp_path / "tiny.gguf", "f32")
    decoder = LlamaCppDecoder(path, threads=1, context_tokens=1024)
    prompts = [[5, 17, 42, 99, 3, 8], [11, 12]]
    ids = torch.tensor([prompts[0], [0] * 4 + prompts[1]])
    mask = torch.tensor([[1] * 6, [0] * 4 + [1] * 2])
    ours = decoder.start(ids, mask, None, 4)
    for row, prompt in enumerate(prompts):
        assert torch.allclose(ours[row], _torch_logits(tiny_llama.model, prompt), atol=1e-3)
    # One more token per row, at each row's own position.
    ours = decoder.step(torch.tensor([7, 9]), torch.tensor([6, 2]))
    assert torch.allclose(ours[1], _torch_logits(tiny_llama.model, prompts[1] + [9]), atol=1e-3)


def _tokenizer_metadata(path) -> dict[str, str]:
    """The tokenizer fields of the GGUF at ``path`` as llama.cpp reads them (arrays aside)."""
    import ctypes

    import llama_cpp

    params = llama_cpp.llama_model_default_params()
    params.vocab_only = True
    model = llama_cpp.llama_model_load_from_file(str(path).encode(), params)
    assert model, f"llama.cpp could not load {path}"
    try:
        buffer, fields = ctypes.create_string_buffer(1 << 16), {}
        for i in range(llama_cpp.llama_model_meta_count(model)):
            llama_cpp.llama_model_meta_key_by_index(model, i, buffer, len(buffer))
            key = buffer.value.decode()
            llama_cpp.llama_model_meta_val_str_by_index(model, i, buffer, len(buffer))
            if key.startswith("tokenizer."):
                fields[key] = buffer.value.decode()
        return fields
    finally:
        llama_cpp.llama_model_free(model)


def test_a_checkpoint_of_the_bundled_vocabulary_gets_its_tokenizer_reading_it_once(tiny_llama, tmp_path, monkeypatch):
    """The written file carries the bundled GGUF's tokenizer (chat template, pre-tokenizer,
    special ids), for llama.cpp elsewhere. gguf's reader takes seconds over its 49,152
    tokens, and each conversion read the bundled file twice: to compare the vocabularies,
    then to copy them. Now a process reads it once, whatever it converts."""
    import gguf

    from persona.gguf_files import write_gguf
    from persona.models import bundled_gguf_path

    reads = []

    class CountedReader(gguf.GGUFReader):
        def __init__(self, *args, **kwargs) -> None:
            reads.append(args[0])
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(gguf, "GGUFReader", CountedReader)
    written = [write_gguf(tiny_llama.model, tiny_llama.tokenizer, tmp_path / f"{kind}.gguf", kind) for kind in ("f32", "f16")]
    assert len(reads) <= 1, reads  # none where an earlier conversion in this process read it
    bundled = _tokenizer_metadata(bundled_gguf_path())
    assert bundled["tokenizer.ggml.pre"] == "smollm" and "tokenizer.chat_template" in bundled
    assert [_tokenizer_metadata(path) for path in written] == [bundled, bundled]


def test_a_llama_of_another_vocabulary_is_written_with_its_own(tiny_gpt2_dir, tmp_path):
    """Only the bundled vocabulary gets the bundled file's tokenizer: any other is written from its tokenizer."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from persona.gguf_files import write_gguf

    tokenizer = AutoTokenizer.from_pretrained(tiny_gpt2_dir)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
    )  # fmt: skip
    fields = _tokenizer_metadata(write_gguf(LlamaForCausalLM(config), tokenizer, tmp_path / "own.gguf", "f32"))
    assert fields["tokenizer.ggml.pre"] == "default" and "tokenizer.chat_template" not in fields


def test_a_gpt2_written_as_gguf_gives_the_torch_models_logits(tiny_gpt2_dir, tmp_path):
    """GPT-2 has its own graph in llama.cpp (learned positions, LayerNorm with biases,
    Conv1D weights stored transposed) and its own vocabulary, written from its tokenizer."""
    from persona.gguf_files import write_gguf
    from persona.llamacpp_decoder import LlamaCppDecoder

    gpt2 = load_model(str(tiny_gpt2_dir), cache_dir=tmp_path)
    assert gpt2.gguf_ready
    path = write_gguf(gpt2.model, gpt2.tokenizer, tmp_path / "gpt2.gguf", "f32")
    decoder = LlamaCppDecoder(path, threads=1, context_tokens=512)
    assert decoder.vocab == gpt2.config.vocab_size
    prompts = [gpt2.tokenizer.encode("the persona writes"), gpt2.tokenizer.encode("a")]
    width = max(map(len, prompts))
    ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    ours = decoder.start(ids, mask, None, 4)
    for row, prompt in enumerate(prompts):
        assert torch.allclose(ours[row], _torch_logits(gpt2.model, prompt), atol=1e-3)
    ours = decoder.step(torch.tensor([7, 9]), torch.tensor([len(prompts[0]), len(prompts[1])]))
    assert torch.allclose(ours[1], _torch_logits(gpt2.model, prompts[1] + [9]), atol=1e-3)


def test_models_llama_cpp_cannot_run_are_named_with_the_reason(tiny_gpt2_dir, tmp_path):
    from transformers import AutoTokenizer, GPT2Config

    from persona.gguf_files import unwritable

    tokenizer = AutoTokenizer.from_pretrained(tiny_gpt2_dir)
    assert unwritable(GPT2Config(vocab_size=len(tokenizer)), tokenizer) is None
    assert "not 'gpt_neox'" in unwritable(type("Config", (), {"model_type": "gpt_neox"})(), tokenizer)
    assert "more than the model's" in unwritable(GPT2Config(vocab_size=10), tokenizer)
    assert "tanh GELU" in unwritable(GPT2Config(vocab_size=len(tokenizer), activation_function="relu"), tokenizer)


def test_export_writes_a_gguf_that_llama_cpp_serves(tiny_llama_dir, write_persona, settings, tmp_path):
    from persona.llamacpp_decoder import LlamaCppDecoder
    from persona.personas import PersonaRegistry
    from tests.fakes.checkpoints import make_checkpoint
    from training.export import export_persona

    write_persona("tiny", base=str(tiny_llama_dir))
    make_checkpoint(settings, tiny_llama_dir, "tiny", seed=3)
    persona = PersonaRegistry.from_settings(settings).get("tiny")
    folder = export_persona(settings, persona, tmp_path / "out", version="v1", gguf="f16")
    [gguf] = folder.glob("*.gguf")
    assert gguf.name == "tiny-v1.f16.gguf"
    served = load_model(str(tiny_llama_dir), settings.checkpoints_dir / "tiny" / "v1", cache_dir=tmp_path)
    decoder = LlamaCppDecoder(gguf, threads=1, context_tokens=1024)
    ids = [5, 17, 42]
    logits = decoder.start(torch.tensor([ids]), torch.ones((1, 3), dtype=torch.long), None, 1)[0]
    assert torch.allclose(logits, _torch_logits(served.model, ids), atol=2e-2)
