"""`persona bench engine` times ours and generate() on the same prompts and lengths."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from persona.bench_engine import run_engine_bench
from persona.models import load_model


@pytest.fixture(scope="module")
def tiny_llama(tiny_llama_dir, tmp_path_factory):
    return load_model(str(tiny_llama_dir), cache_dir=tmp_path_factory.mktemp("cache"))


def test_both_sides_are_measured_for_every_batch_size(tiny_llama):
    ticks = []
    result = run_engine_bench(tiny_llama, [1, 3], new_tokens=4, mode="fused", repeats=1, progress=lambda: ticks.append(1))
    assert result.mode == "fused" and result.device == "cpu"
    assert set(result.ours) == set(result.baseline) == {1, 3}
    assert all(v > 0 for v in [*result.ours.values(), *result.baseline.values()])
    assert len(ticks) == 2
    data = result.as_dict()
    assert data["ratio"][1] == round(result.ours[1] / result.baseline[1], 2)
    # the time to the first token of a chat-sized prompt, both sides
    assert result.prompt_tokens > 100
    assert set(data["first_token_ms"]) == {"ours", "ours_same_persona", "baseline"}
    assert all(ms > 0 for ms in data["first_token_ms"].values())


def test_sampled_runs_make_every_token_on_both_sides(tiny_llama, model_cache_dir):
    """With --sample both sides sample as a persona does, and still make exactly the tokens asked."""
    # The run's shared model cache: a GGUF of the tiny Llama (7 s of CPU to write) is written once.
    result = run_engine_bench(tiny_llama, [2], new_tokens=5, mode="auto", repeats=1, sampled=True,
                              cache_dir=model_cache_dir)
    assert result.sampling == "persona" and result.as_dict()["sampling"] == "persona"
    assert result.ours[2] > 0 and result.baseline[2] > 0


def test_eager_mode_runs_any_model(tiny_gpt2_dir, tmp_path):
    gpt2 = load_model(str(tiny_gpt2_dir), cache_dir=tmp_path)
    result = run_engine_bench(gpt2, [2], new_tokens=3, mode="eager", repeats=1)
    assert result.mode == "eager" and result.ours[2] > 0


# `persona ARGS` as the console script runs it; then, last on stderr, whether torch was imported.
_TORCH_PROBE = """
import atexit, sys
atexit.register(lambda: print("torch imported" if "torch" in sys.modules else "torch not imported", file=sys.stderr))
from persona.cli import main
sys.argv[0] = "persona"
main()
"""


def bench_cli(tmp_path, command: str, *args: str) -> subprocess.CompletedProcess:
    """`persona bench COMMAND ARGS` in a fresh data folder, as a user runs it."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PERSONA_")}
    env["PERSONA_DATA_DIR"] = str(tmp_path / "data")
    return subprocess.run(
        [sys.executable, "-c", _TORCH_PROBE, "bench", command, *args],
        env=env, capture_output=True, text=True, timeout=120, check=False,
    )


def bench_engine_cli(tmp_path, *args: str) -> subprocess.CompletedProcess:
    """`persona bench engine ARGS` in a fresh data folder, as a user runs it."""
    return bench_cli(tmp_path, "engine", *args)


def refused_at_once(result: subprocess.CompletedProcess) -> bool:
    """Whether the command ended before importing torch: a mistyped option was refused only
    after it (3 s of CPU; 12 s and more on a busy machine)."""
    return result.stderr.rstrip().endswith("torch not imported")


def test_bench_engine_refuses_a_bad_batch_list(tmp_path):
    result = bench_engine_cli(tmp_path, "--batch", "one,eight")
    assert result.returncode == 2
    assert "comma" in result.stderr and refused_at_once(result)


def test_bench_engine_refuses_a_batch_size_given_twice(tmp_path):
    """--batch 1,1 measured batch 1 twice and showed two rows of the same figures."""
    result = bench_engine_cli(tmp_path, "--batch", "1,8,1")
    assert result.returncode == 2
    said = " ".join(result.stderr.replace("│", " ").split())  # the error box wraps at the terminal's width
    assert "Invalid value for '--batch': batch size 1 is given more than once; give each once: --batch 1,8" in said
    assert refused_at_once(result)


def test_bench_engine_refuses_an_unknown_gguf_type(tmp_path):
    """Said as `persona export --gguf` says it (it was a usage box, exit 2)."""
    result = bench_engine_cli(tmp_path, "--gguf", "q2_k")
    assert result.returncode == 1
    assert "error: unknown GGUF type 'q2_k'; choose one of q8_0, q4_1, f16" in result.stderr and refused_at_once(result)


def test_bench_engine_refuses_an_unknown_gpu_step_choice(tmp_path):
    """One sentence naming the choices, as `--device gpu` is refused (these were usage boxes, exit 2)."""
    kernels = bench_engine_cli(tmp_path, "--kernels", "sometimes")
    assert kernels.returncode == 1
    assert "error: unknown --kernels 'sometimes'; choose one of auto, always, never" in kernels.stderr
    assert refused_at_once(kernels)
    attention = bench_engine_cli(tmp_path, "--attention", "flash")
    assert attention.returncode == 1
    assert "error: unknown --attention 'flash'; choose one of auto, torch, triton" in attention.stderr
    assert refused_at_once(attention)


def test_bench_threads_of_0_is_refused_as_every_commands_threads_is(tmp_path):
    """`--threads 0` was taken (x>=0), its meaning said nowhere; every other --threads starts at 1."""
    for command in ("engine", "serve"):
        result = bench_cli(tmp_path, command, "--threads", "0", "--device", "gpu")  # refused first, without it
        assert result.returncode == 2 and "'--threads'" in result.stderr, result.stderr
        assert refused_at_once(result)


def test_bench_engine_measures_a_model_of_the_users_choosing(tmp_path, tiny_gpt2_dir):
    """--model benches any base: here a GPT-2 folder, which llama.cpp serves where installed."""
    import json

    from persona.engine_modes import llamacpp_available

    result = bench_engine_cli(
        tmp_path, "--model", str(tiny_gpt2_dir), "--batch", "1", "--tokens", "3", "--repeats", "1", "--json"
    )
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert data["mode"] == ("llamacpp" if llamacpp_available() else "eager")
    assert data["ours"]["1"] > 0 and data["baseline"]["1"] > 0
    missing = bench_engine_cli(tmp_path, "--model", str(tmp_path / "nowhere"))
    assert missing.returncode == 1 and "nowhere" in missing.stderr
    assert refused_at_once(missing)  # it was said only after torch had been imported


def test_bench_engine_refuses_an_unknown_mode_before_loading_a_model(tmp_path):
    """--mode turbo is one sentence naming the choices, as `--device gpu` is (it was a traceback, after
    the model loaded; then a usage box)."""
    result = bench_engine_cli(tmp_path, "--mode", "turbo")
    assert result.returncode == 1, result.stderr[-2000:]
    assert "error: unknown --mode 'turbo'; choose one of auto, eager, fused, int8, llamacpp\n" in result.stderr
    assert "Traceback" not in result.stderr and refused_at_once(result)
    serve = bench_cli(tmp_path, "serve", "--mode", "turbo")  # `bench serve` takes the same choices
    assert serve.returncode == 1 and refused_at_once(serve), serve.stderr[-2000:]
    assert "error: unknown --mode 'turbo'; choose one of auto, eager, fused" in serve.stderr


def test_new_tokens_past_the_models_context_are_refused_before_timing(tiny_gpt2_dir, tmp_path):
    """A GPT-2 of 256 positions cannot make 1,000 new tokens: said at once, with the most it can
    (generate() used to fail with an IndexError after the engine's runs)."""
    from persona.errors import UsageError

    gpt2 = load_model(str(tiny_gpt2_dir), cache_dir=tmp_path)
    with pytest.raises(UsageError, match=r"--tokens 1000 does not fit: .* reads at most 256 tokens .* give --tokens \d+ or fewer"):
        run_engine_bench(gpt2, [1, 2], new_tokens=1000, mode="eager", repeats=1)
