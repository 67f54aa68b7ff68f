"""Loading weights: local HF folders, LoRA checkpoints merged in, and clear refusals."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch

from persona.errors import DataDirUnwritable, ModelError
from persona.models import context_tokens_of, load_model, resolve_base


def make_lora(base_dir: Path, out: Path, *, scale: float = 0.5, pickled: bool = False) -> Path:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base_dir)
    peft_model = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.mul_(scale * 100)
    peft_model.save_pretrained(out, safe_serialization=not pickled)  # pickled: adapter_model.bin, as older peft wrote
    return out


def persona_on(base_dir: Path):
    """A persona served on ``base_dir``, for the checks made before any weights load."""
    from persona.personas import Persona

    return Persona.model_validate({"name": "tiny", "model": {"base": str(base_dir)}, "prompt": {"system": "Be."}})


def test_lora_checkpoint_is_merged_and_changes_the_output(tiny_llama_dir, tmp_path):
    cache = tmp_path / "cache"
    base = load_model(str(tiny_llama_dir), cache_dir=cache)
    tuned = load_model(str(tiny_llama_dir), make_lora(tiny_llama_dir, tmp_path / "lora"), cache_dir=cache)
    assert tuned.fine_tuned and not base.fine_tuned
    assert "lora" not in " ".join(n for n, _ in tuned.model.named_parameters())  # merged, runs at base speed
    ids = torch.tensor([[1, 2, 3, 4]])
    assert not torch.allclose(base.model(ids).logits, tuned.model(ids).logits)


def test_loading_writes_no_progress_bars(tiny_llama_dir, tmp_path, capfd):
    """Each load wrote transformers' "Loading weights" bar into a worker's log (and
    `persona up`'s) among the log lines; a LoRA merged wrote another."""
    from transformers.utils import logging as hf_logging

    lora = make_lora(tiny_llama_dir, tmp_path / "lora")
    hf_logging.enable_progress_bar()  # as in a fresh worker process
    capfd.readouterr()
    load_model(str(tiny_llama_dir), lora, cache_dir=tmp_path / "cache")
    said = capfd.readouterr()
    assert "Loading weights" not in said.err + said.out and "%|" not in said.err, said.err


def test_merging_a_lora_warns_nothing_about_the_libraries_internals(tiny_llama_dir, tmp_path):
    """peft reads an attribute transformers has deprecated, and every worker serving a
    LoRA checkpoint logged a FutureWarning with a site-packages path about it."""
    import warnings

    lora = make_lora(tiny_llama_dir, tmp_path / "lora")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        load_model(str(tiny_llama_dir), lora, cache_dir=tmp_path / "cache")
    assert not [str(w.message) for w in caught if "checkpointing" in str(w.message)]


def test_lora_for_another_base_is_refused_with_the_reason(tiny_llama_dir, tiny_gpt2_dir, tmp_path):
    lora = make_lora(tiny_llama_dir, tmp_path / "lora")
    with pytest.raises(ModelError, match="does not fit this base model"):
        load_model(str(tiny_gpt2_dir), lora, cache_dir=tmp_path)


def test_corrupt_checkpoint_is_refused(tiny_llama_dir, tmp_path):
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text(json.dumps({"model_type": "llama"}))
    (broken / "model.safetensors").write_bytes(b"not really weights")
    with pytest.raises(ModelError, match=r"its model\.safetensors is unreadable .*copy the whole folder again"):
        load_model(str(tiny_llama_dir), broken, cache_dir=tmp_path)
    with pytest.raises(ModelError, match="neither adapter_config.json"):
        load_model(str(tiny_llama_dir), tmp_path, cache_dir=tmp_path)


def test_unknown_base_says_nothing_is_downloaded(tmp_path):
    with pytest.raises(ModelError, match="nothing is downloaded from a model hub"):
        resolve_base("gpt2", tmp_path)


def test_a_model_folder_without_a_tokenizer_says_so_and_what_to_save(tiny_gpt2_dir, tmp_path):
    """A folder written by the model's save_pretrained alone was refused with transformers'
    "You need to have sentencepiece or tiktoken installed", which installing does not fix."""
    import shutil

    folder = tmp_path / "no-tokenizer"
    shutil.copytree(tiny_gpt2_dir, folder, ignore=shutil.ignore_patterns("*token*", "vocab.json", "merges.txt"))
    with pytest.raises(ModelError, match=r"no-tokenizer has no tokenizer .*`tokenizer.save_pretrained\(FOLDER\)`"):
        load_model(str(folder), cache_dir=tmp_path / "cache")


def test_plain_gpt2_folder_loads_without_a_chat_template(tiny_gpt2_dir, tmp_path):
    loaded = load_model(str(tiny_gpt2_dir), cache_dir=tmp_path)
    assert not loaded.has_chat_template
    assert loaded.tokenizer.pad_token_id is not None
    assert loaded.stop_token_ids == [loaded.tokenizer.eos_token_id]


def test_a_models_context_is_read_alike_from_its_loaded_config_and_its_config_json(tiny_llama_dir, tiny_gpt2_dir, tmp_path):
    """`persona personas validate` reads config.json (no weights loaded) to warn of a system prompt
    the context has no room for: it must come to the worker's figure, GPT-2's n_positions included."""
    for folder in (tiny_llama_dir, tiny_gpt2_dir):
        loaded = load_model(str(folder), cache_dir=tmp_path)
        assert context_tokens_of(json.loads((folder / "config.json").read_text())) == loaded.context_tokens
    assert context_tokens_of({"n_positions": 1024}) == 1024
    assert context_tokens_of({"max_position_embeddings": 131072}) == 8192  # capped
    assert context_tokens_of({}) == context_tokens_of({"max_position_embeddings": 0}) == 2048  # none named


def test_the_bundled_model_is_converted_for_torch_only_once_torch_needs_it(tmp_path, capfd, caplog, monkeypatch):
    """A worker serving it on llama.cpp needs its config and tokenizer (about 5 s to
    convert from the GGUF), not its dequantised weights (15 s more, 538 MB on disk): a
    newcomer's first start waited for both. Converting the weights wrote transformers'
    "Converting and de-quantizing GGUF tensors" bar into the worker's log (and the
    terminal of `persona up`); our own line says that it converts, and no more.

    The GGUF's metadata is read once for the config and tokenizer: the tokenizer read it
    all again (about 4 s, half of a first start) only to learn the model's type."""
    import gguf
    from transformers.utils import logging as hf_logging

    from persona.models import BUNDLED_CACHE_NAME

    hf_logging.enable_progress_bar()  # as in a fresh worker process
    caplog.set_level(logging.INFO, logger="persona.models")
    reads = []

    class CountedReader(gguf.GGUFReader):  # gguf's whole-file reader (seconds a read), as transformers uses it
        def __init__(self, *args, **kwargs) -> None:
            reads.append(args[0])
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(gguf, "GGUFReader", CountedReader)

    loaded = load_model("smollm2", cache_dir=tmp_path)
    assert len(reads) == 1, reads
    folder = tmp_path / BUNDLED_CACHE_NAME
    light = {"config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json", "chat_template.jinja"}
    assert {p.name for p in folder.iterdir()} == light
    assert not loaded.weights_loaded and loaded.has_chat_template
    config = (folder / "config.json").read_text()
    assert json.loads(config)["architectures"] == ["LlamaForCausalLM"]

    capfd.readouterr()
    model = loaded.model  # torch asks: the weights are written now, beside the rest
    said = capfd.readouterr()
    assert "GGUF tensors" not in said.err + said.out and "%|" not in said.err, said.err
    assert "converting the weights of the bundled model" in caplog.text
    assert {p.name for p in folder.iterdir()} == light | {"model.safetensors"}
    assert (folder / "config.json").read_text() == config
    assert model.config.vocab_size == loaded.config.vocab_size == 49152
    assert resolve_base("smollm2", tmp_path) == folder  # complete: nothing converted again


def _conversions_started(caplog) -> list[str]:
    return [r.getMessage().split(" SmolLM2")[0] for r in caplog.records if r.getMessage().startswith("converting ")]


def _unwritable_cache(tmp_path: Path) -> Path:
    """A model cache that cannot be made: a conversion stops as soon as it starts writing,
    after saying which it is (a file in the folder's place: the tests may run as root)."""
    (tmp_path / "a-file").write_text("")
    return tmp_path / "a-file" / "cache"


def test_the_bundled_model_loaded_for_torch_now_is_converted_in_one_pass(tmp_path, caplog):
    """Loaded for torch at once (a checkpoint on it, a dtype, a torch engine), it was converted
    in two passes on a fresh data folder, config then weights, each reading the whole GGUF
    (about 10 s lost)."""
    caplog.set_level(logging.INFO, logger="persona.models")
    with pytest.raises(DataDirUnwritable):
        load_model("smollm2", cache_dir=_unwritable_cache(tmp_path), dtype="float32")
    assert _conversions_started(caplog) == ["converting the weights of the bundled model"]


def test_a_worker_decoding_with_torch_converts_the_bundled_model_in_one_pass(tmp_path, settings, caplog):
    """The int8 engine (a CPU without llama.cpp), or a GPU, loads the torch weights as it
    starts: the worker converted the config first, and the weights again moments later."""
    from persona.personas import Persona
    from persona.pool import ModelPool

    caplog.set_level(logging.INFO, logger="persona.models")
    settings.data_dir = _unwritable_cache(tmp_path)
    settings.worker.engine = "int8"
    sage = Persona.model_validate({"name": "sage", "model": {"base": "smollm2"}, "prompt": {"system": "Be calm."}})
    with pytest.raises(DataDirUnwritable):
        ModelPool(settings, "cpu").serve(sage)
    assert _conversions_started(caplog) == ["converting the weights of the bundled model"]


@pytest.mark.parametrize(("damage", "file"), [
    ("cut short", "adapter_model.safetensors"), ("missing", "adapter_model.safetensors"),
    ("cut short", "adapter_model.bin"), ("garbage", "adapter_model.bin"),
])
def test_a_damaged_lora_checkpoint_is_called_damaged_not_a_misfit(tiny_llama_dir, tmp_path, damage, file):
    """Its own base cannot fix a half-copied adapter: the error must not send the user looking for another.
    `persona swap` (and `personas validate`) let it through to be loaded, by every worker it asked."""
    from persona.checkpoint_checks import static_problem

    lora = make_lora(tiny_llama_dir, tmp_path / "lora", pickled=file.endswith(".bin"))
    weights = lora / file
    if damage == "cut short":
        weights.write_bytes(weights.read_bytes()[: weights.stat().st_size * 9 // 10])
    elif damage == "garbage":
        weights.write_bytes(b"PK\x03\x04 not really a zip archive" * 100)
    else:
        weights.unlink()
    with pytest.raises(ModelError, match=f"{file}.*(unreadable|missing)") as refused:
        load_model(str(tiny_llama_dir), lora, cache_dir=tmp_path)
    assert "does not fit" not in str(refused.value)
    assert static_problem(persona_on(tiny_llama_dir), lora) == str(refused.value)  # before any load, in the same words


def pickled_weights(base_dir: Path, out: Path, *, shards: int = 1) -> Path:
    """A copy of the base as full weights in torch's pickled files (pytorch_model.bin, or shards and
    their index), as transformers wrote them before safetensors (it writes none itself now)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base_dir)
    model.config.save_pretrained(out)
    weights = {name: t.contiguous() for name, t in model.state_dict().items()}
    if shards == 1:
        torch.save(weights, out / "pytorch_model.bin")
        return out
    weight_map = {}
    for shard in range(1, shards + 1):
        file = f"pytorch_model-{shard:05d}-of-{shards:05d}.bin"
        names = sorted(weights)[shard - 1::shards]
        torch.save({name: weights[name] for name in names}, out / file)
        weight_map |= dict.fromkeys(names, file)
    (out / "pytorch_model.bin.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return out


def full_checkpoint(base_dir: Path, out: Path, damage: str) -> Path:
    """A copy of the base as full weights (in two shards for a shard's damage; pickled for a .bin's),
    damaged as said."""
    from transformers import AutoModelForCausalLM

    if ".bin" in damage:
        pickled_weights(base_dir, out, shards=2 if "shard" in damage else 1)
    else:
        AutoModelForCausalLM.from_pretrained(base_dir).save_pretrained(out, max_shard_size="100KB" if "shard" in damage else "1GB")
    weights = max(out.glob("model*.safetensors") if ".bin" not in damage else out.glob("pytorch_model*.bin"))
    if damage.endswith("shard missing"):
        weights.unlink()
    else:  # a copy that did not finish
        weights.write_bytes(weights.read_bytes()[: weights.stat().st_size * 9 // 10])
    return out


@pytest.mark.parametrize(("damage", "said"), [
    ("cut short", r"its model\.safetensors is unreadable \(it holds [\d,]+ bytes where its header names [\d,]+\), cut short"),
    ("shard cut short", r"its model-00002-of-00002\.safetensors is unreadable \(it holds [\d,]+ bytes where its header"),
    ("shard missing", r"has its model\.safetensors\.index\.json but its model-00002-of-00002\.safetensors is missing"),
    (".bin cut short", r"its pytorch_model\.bin is unreadable \(it is not a whole zip archive at [\d,]+ bytes: "),
    (".bin shard cut short", r"its pytorch_model-00002-of-00002\.bin is unreadable \(it is not a whole zip archive"),
    (".bin shard missing", r"has its pytorch_model\.bin\.index\.json but its pytorch_model-00002-of-00002\.bin is missing"),
])
def test_a_full_weights_checkpoint_cut_short_is_called_damaged_before_and_when_loading(
        tiny_llama_dir, tmp_path, damage, said):
    """It was refused only by loading it, in safetensors' or torch's words ("incomplete metadata, file
    not fully covered", "failed finding central directory") and no advice; `persona swap` found it so
    by every worker it asked."""
    from persona.checkpoint_checks import static_problem
    from persona.personas import Persona

    checkpoint = full_checkpoint(tiny_llama_dir, tmp_path / "full", damage)
    with pytest.raises(ModelError, match=said) as refused:
        load_model(str(tiny_llama_dir), checkpoint, cache_dir=tmp_path / "cache")
    assert str(refused.value).endswith("copy the whole folder again, or train again"), refused.value
    tiny = Persona.model_validate({"name": "tiny", "model": {"base": str(tiny_llama_dir)}, "prompt": {"system": "Be."}})
    assert static_problem(tiny, checkpoint) == str(refused.value)  # refused before any load, in the same words


def test_a_lora_adapter_for_a_base_of_another_size_is_refused_in_a_sentence(tiny_llama_dir, tmp_path):
    """peft's error listed every weight of another shape, a line each (hundreds for a real model)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoConfig, AutoModelForCausalLM

    wider = AutoConfig.from_pretrained(tiny_llama_dir)
    wider.hidden_size, wider.intermediate_size, wider._name_or_path = 64, 128, "wider-llama"
    lora = tmp_path / "lora"
    get_peft_model(AutoModelForCausalLM.from_config(wider), LoraConfig(r=4, target_modules=["q_proj", "v_proj"])).save_pretrained(lora)
    with pytest.raises(ModelError) as refused:
        load_model(str(tiny_llama_dir), lora, cache_dir=tmp_path / "cache")
    said = str(refused.value)
    assert "does not fit this base model (it was trained on wider-llama): 4 of its 8 weights have other shapes" in said
    assert "(model.layers.0.self_attn.q_proj.lora_A.weight: [4, 64] in the file, [4, 32] in this model; " in said, said
    assert said.endswith("; ...); serve it on the base it was trained on, or train it again on this one"), said
    assert "size mismatch" not in said and "\n" not in said and len(said) < 600, said


@pytest.mark.parametrize("shards", [1, 2])
def test_whole_pickled_full_weights_pass_the_checks_and_load(tiny_llama_dir, tmp_path, shards):
    """The checks read a pickled file's zip directory, not its tensors: a whole one is not refused."""
    from persona.checkpoint_checks import static_problem

    checkpoint = pickled_weights(tiny_llama_dir, tmp_path / "full", shards=shards)
    assert static_problem(persona_on(tiny_llama_dir), checkpoint) is None
    assert load_model(str(tiny_llama_dir), checkpoint, cache_dir=tmp_path / "cache").fine_tuned


def lora_for_another_base(base_dir: Path, out: Path, **changes) -> Path:
    """A LoRA adapter trained on the base's family at other dimensions (``changes`` to its config)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoConfig, AutoModelForCausalLM

    other = AutoConfig.from_pretrained(base_dir)
    for name, value in changes.items():
        setattr(other, name, value)
    other._name_or_path = "another-base"
    targets = ["c_attn", "c_fc"] if other.model_type == "gpt2" else ["q_proj", "v_proj", "down_proj"]
    get_peft_model(AutoModelForCausalLM.from_config(other), LoraConfig(r=4, target_modules=targets)).save_pretrained(out)
    return out


def base_without_weights(base_dir: Path, out: Path) -> Path:
    """A copy of a base whose weights file is garbage: loading it fails, its config reads."""
    import shutil

    shutil.copytree(base_dir, out)
    (out / "model.safetensors").write_bytes(b"not weights")
    return out


@pytest.mark.parametrize(("base", "changes", "said"), [
    ("llama", {"hidden_size": 64, "intermediate_size": 128}, "8 of its 12 weights have other shapes than this model's"),
    ("llama", {"num_hidden_layers": 3}, "its weights are for a model of at least 3 layers, this one has 2"),
    ("gpt2", {"n_embd": 64}, "all 8 of its weights have other shapes than this model's"),
])
def test_a_lora_adapter_for_a_base_of_another_size_is_refused_before_the_base_loads(
        tiny_llama_dir, tiny_gpt2_dir, tmp_path, base, changes, said):
    """The base loaded first (11-16 s for the bundled model) and only then was the adapter found not
    to fit; one for a deeper base was served, its extra layers' weights left out without a word.
    The base here cannot load at all: refused for its weights, it would say "cannot load the model"."""
    from persona.checkpoint_checks import static_problem

    base_dir = tiny_llama_dir if base == "llama" else tiny_gpt2_dir
    lora = lora_for_another_base(base_dir, tmp_path / "lora", **changes)
    unloadable = base_without_weights(base_dir, tmp_path / "base")
    with pytest.raises(ModelError, match="does not fit this base model") as refused:
        load_model(str(unloadable), lora, cache_dir=tmp_path / "cache")
    sentence = str(refused.value)
    assert f"(it was trained on another-base): {said}" in sentence, sentence
    assert sentence.endswith("; serve it on the base it was trained on, or train it again on this one"), sentence
    assert static_problem(persona_on(unloadable), lora) == sentence  # `persona swap`, without torch: the same words


def test_a_lora_adapter_missing_some_of_its_weights_is_refused_naming_them(tiny_llama_dir, tmp_path):
    """Merged, the weights it lacks change nothing: peft said so only in a warning, kilobytes long."""
    from safetensors.torch import load_file, save_file

    lora = make_lora(tiny_llama_dir, tmp_path / "lora")
    weights = load_file(lora / "adapter_model.safetensors")
    save_file({k: v for k, v in weights.items() if "v_proj" not in k}, lora / "adapter_model.safetensors")
    with pytest.raises(ModelError, match=r"holds only 4 of the 8 weights its adapter_config\.json names "
                                         r"\(missing: model\.layers\.0\.self_attn\.v_proj\.lora_A\.weight, "):
        load_model(str(tiny_llama_dir), lora, cache_dir=tmp_path)


def test_a_warning_another_thread_gives_while_a_lora_merges_stays_that_threads(tiny_llama_dir, tmp_path):
    """A swap merges a LoRA in a background thread while the worker serves. The merge caught
    warnings to read peft's (warnings.catch_warnings is the whole process's): one the serving
    thread gave meanwhile was not raised there as its filter said, but kept for the merge."""
    import threading
    import warnings

    from torch.nn.modules.module import register_module_module_registration_hook

    lora = make_lora(tiny_llama_dir, tmp_path / "lora")
    merging, warned = threading.Event(), threading.Event()

    def pause_the_merge(module, name, submodule):  # peft is adding its LoRA layers to the base
        if name == "lora_A" and not merging.is_set():
            merging.set()
            warned.wait(10)

    loaded: list = []
    swap = threading.Thread(target=lambda: loaded.append(load_model(str(tiny_llama_dir), lora, cache_dir=tmp_path)))
    hook = register_module_module_registration_hook(pause_the_merge)
    try:
        with warnings.catch_warnings():  # this thread's, around the whole merge
            warnings.filterwarnings("error", message="the serving thread's")
            swap.start()
            assert merging.wait(30), "the merge never added a LoRA layer"
            with pytest.raises(UserWarning, match="the serving thread's"):
                warnings.warn("the serving thread's warning", UserWarning, stacklevel=1)
            warned.set()
            swap.join(30)
    finally:
        hook.remove()
        warned.set()
        swap.join(30)
    assert [m.fine_tuned for m in loaded] == [True]  # and the merge went on


@pytest.mark.parametrize("config", ['{"r": 4, "target_modules": [', "[4]"])
def test_a_lora_checkpoint_whose_config_is_not_a_json_object_is_called_damaged(tiny_llama_dir, tmp_path, config):
    """It ended `persona export`, `persona eval` and the worker with a JSONDecodeError traceback."""
    lora = make_lora(tiny_llama_dir, tmp_path / "lora")
    (lora / "adapter_config.json").write_text(config)
    with pytest.raises(ModelError, match=r"adapter_config\.json is unreadable .*copy the whole folder again"):
        load_model(str(tiny_llama_dir), lora, cache_dir=tmp_path)


def test_a_device_that_is_not_one_of_the_choices_is_refused_not_taken_for_the_cpu():
    """`persona worker --device gpu` used to serve on the CPU without a word."""
    from persona.errors import ConfigError
    from persona.models import pick_device

    for wrong in ("gpu", "CUDA", "cuda:0", ""):
        with pytest.raises(ConfigError, match="unknown device"):
            pick_device(wrong)
    assert pick_device("cpu") == "cpu"
