"""A worker that serves through llama.cpp never imports torch: 2.8 s of its 3.3 s import, and
about 250 MB of its memory, were torch's (and transformers' models'), for nothing.

Each check runs in a fresh interpreter (this one has torch loaded by other tests) and
reports which of the heavy modules it imported."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from persona.engine import TransformersEngine, Work
from persona.engine_modes import llamacpp_available
from persona.host_sampling import _HostRows, _sample_host
from persona.personas import Sampling
from persona.sampling import _Rows, _sample

needs_llamacpp = pytest.mark.skipif(not llamacpp_available(), reason="llama-cpp-python (the `fast` extra) is not installed")

HEAVY = ("torch", "transformers.models", "transformers.modeling_utils")

# Rows as the worker's rows come: greedy, sampled, seeded, penalised; two join a running batch.
ROWS = """[
    Work([5, 17, 42, 99], Sampling(temperature=0.0, max_new_tokens=10)),
    Work([11, 12, 13], Sampling(temperature=0.9, top_k=20, top_p=0.9, repetition_penalty=1.3, max_new_tokens=6, seed=7)),
    Work([8, 9], Sampling(temperature=1.0, top_k=0, max_new_tokens=5, seed=3)),
]"""

TINY_ENGINE = f"""
import json, sys
from pathlib import Path
import persona.worker  # everything the worker imports
from transformers import PreTrainedTokenizerFast
from persona.engine import TransformersEngine, Work
from persona.models import LoadedModel
from persona.personas import Sampling

folder, gguf = Path(sys.argv[1]), Path(sys.argv[2])

def refuse():
    raise AssertionError("the torch weights were asked for")

loaded = LoadedModel(weights=refuse, config_dir=folder, tokenizer=PreTrainedTokenizerFast.from_pretrained(folder),
                     device="cpu", name="tiny", has_chat_template=True, gguf_file=gguf)
engine = TransformersEngine(loaded, mode="auto", cache_dir=folder, threads=1, gguf_type="q4_1")
rows = {ROWS}
engine.add(rows[0], 0)
engine.step()
engine.add(rows[1], 1)
engine.add(rows[2], 2)
texts = {{}}
while engine.active:
    texts.update((tag, done.text) for tag, done in engine.step())
print(json.dumps({{"mode": engine.mode, "texts": [texts[i] for i in range(3)], "heavy": [m for m in {HEAVY!r} if m in sys.modules]}}))
"""


@pytest.fixture(scope="module")
def tiny_gguf(tiny_llama, tiny_llama_dir, tmp_path_factory) -> tuple[Path, Path]:
    """The tiny Llama's folder and a Q4_1 GGUF of it (llama.cpp serves a Q4_1 file as it is)."""
    cache = tmp_path_factory.mktemp("tiny-gguf")
    engine = TransformersEngine(tiny_llama, mode="llamacpp", cache_dir=cache, threads=1, gguf_type="q4_1")
    assert engine.mode == "llamacpp"
    return tiny_llama_dir, engine.decoder.path


def run_fresh(script: str, *args: str) -> dict:
    """Run ``script`` in a new interpreter; what it printed last, as JSON."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PERSONA_")}
    done = subprocess.run([sys.executable, "-c", script, *args], env=env, capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.splitlines()[-1])


@needs_llamacpp
def test_the_llamacpp_engine_decodes_without_importing_torch(tiny_gguf):
    """Rows join, leave, sample with seeds and penalties: numpy on the host, no torch."""
    folder, gguf = tiny_gguf
    served = run_fresh(TINY_ENGINE, str(folder), str(gguf))
    assert served["heavy"] == []
    assert served["mode"] == "llamacpp" and all(served["texts"])


@pytest.mark.slow
@needs_llamacpp
@pytest.mark.skipif(torch.cuda.is_available(), reason="with a GPU the worker serves with torch")
def test_a_worker_pool_serving_the_bundled_model_on_the_cpu_never_imports_torch(settings):
    """What `persona worker` does on a CPU: pick the device, load sage's model through the
    pool (loaded, warmed up), answer; the bundled model comes from its GGUF alone."""
    from persona.models import resolve_base

    resolve_base("smollm2", settings.model_cache_dir, weights=False)  # its one conversion (torch) done here
    script = f"""
import json, sys
from pathlib import Path
from persona.engine import Work
from persona.models import pick_device
from persona.personas import PersonaRegistry, Sampling
from persona.pool import ModelPool
from persona.settings import Settings
from persona.worker import Worker

settings = Settings(_env_file=None, data_dir=Path(sys.argv[1]), redis_url="redis://127.0.0.1:1")
settings.worker.threads = 1
served = ModelPool(settings, pick_device("auto")).serve(PersonaRegistry.from_settings(settings).get("sage"))
ids = served.loaded.tokenizer("Hello, my name is").input_ids
[reply] = served.engine.generate([Work(ids, Sampling(temperature=0.7, max_new_tokens=4, seed=1))])
print(json.dumps({{"mode": served.engine.mode, "text": reply.text, "heavy": [m for m in {HEAVY!r} if m in sys.modules]}}))
"""
    served = run_fresh(script, str(settings.data_dir))
    assert served["heavy"] == []
    assert served["mode"] == "llamacpp" and served["text"]


def test_numpy_sampling_draws_the_tokens_torch_sampling_draws():
    """llama.cpp's rows are sampled in numpy; every row, seeded or not, greedy or sampled,
    penalised or cut by top-k and top-p, draws the token the torch sampler draws from the
    same logits and the same seed (a seeded reply does not change with the sampler)."""
    rng = np.random.default_rng(0)
    rows = []
    for i in range(24):
        rows.append(Work(
            rng.integers(0, 1000, size=int(rng.integers(0, 9))).tolist(),
            Sampling(temperature=[0.0, 0.4, 1.0, 1.6][i % 4], top_k=[0, 1, 40, 10**6][i // 4 % 4], top_p=[1.0, 0.8][i % 2],
                     repetition_penalty=[1.0, 1.3][i // 2 % 2], max_new_tokens=4, seed=int(rng.integers(0, 2**40))),
        ))  # fmt: skip
    stop_ids = {3, 7}
    in_torch, on_host = _Rows(rows, list(range(24)), torch.device("cpu"), 0, stop_ids), _HostRows(rows, list(range(24)), 0, stop_ids)
    drawn = []
    for _ in range(4):
        logits = (rng.standard_normal((24, 1000)) * 4).astype(np.float32)
        expected = _sample(torch.from_numpy(logits), in_torch)
        tokens = _sample_host(logits, on_host)
        assert tokens.tolist() == expected.tolist()
        in_torch.append(expected)
        on_host.append(tokens)
        drawn += tokens.tolist()
    assert len(set(drawn)) > 24  # sampled, not all greedy
