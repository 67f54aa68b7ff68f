"""The models a worker holds, shared between personas that speak with the same weights.

Two prompt-only personas on the bundled base model share one loaded model; a persona
with a checkpoint gets its own. ``version`` names the weights in replies, heartbeats
and metrics: ``base`` for a bare base model, else the checkpoint version (``v3``) or
the folder name of a checkpoint given by path. The log names every persona that a set
of weights serves, as each one first uses them: "loaded smollm2 for bofh" alone
told someone chatting with sage nothing about sage.
"""

from __future__ import annotations

import functools
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from persona.checkpoints import BASE_VERSION, checkpoint_candidates, resolve_checkpoint
from persona.engine import Generator, TransformersEngine
from persona.engine_modes import llamacpp_available
from persona.errors import ModelError
from persona.models import LOADING, LoadedModel, load_model, resolve_base
from persona.personas import Persona
from persona.settings import Settings

__all__ = ["ModelPool", "Served"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Served:
    """What answers for a persona right now."""

    key: tuple[str, str]
    version: str
    loaded: LoadedModel
    engine: Generator


EngineFactory = Callable[[LoadedModel], Generator]


def _key(persona: Persona, checkpoint: Path | None) -> tuple[str, str]:
    """The pool's name for a set of weights: the base, and the checkpoint folder or ``base``."""
    return (persona.model.base, str(checkpoint) if checkpoint else BASE_VERSION)


class ModelPool:
    """Loads each distinct set of weights once and hands out engines for personas."""

    def __init__(self, settings: Settings, device: str, engine_factory: EngineFactory | None = None) -> None:
        self.settings = settings
        self.device = device
        # Whether our engines decode with torch (not llama.cpp): the bundled model's
        # weights are then converted with its config, in one pass (see ``_load``).
        self._torch_engines = engine_factory is None and (
            device != "cpu" or settings.worker.engine not in ("auto", "llamacpp") or not llamacpp_available()
        )
        self.engine_factory = engine_factory or functools.partial(
            TransformersEngine,
            mode=settings.worker.engine,
            cache_dir=settings.model_cache_dir,
            threads=settings.worker.threads,
            gguf_type=settings.worker.gguf_type,
            kv_tokens=settings.worker.kv_tokens,
            compile=settings.worker.compile,
            kernels=settings.worker.kernels,
            attention=settings.worker.attention,
        )
        self._served: dict[tuple[str, str], Served] = {}
        # Weights that failed to load: when, and why. A request for them within
        # ``load_retry_s`` is refused at once rather than holding up the worker again.
        self._failed: dict[tuple[str, str], tuple[float, str]] = {}
        # The personas each set of weights has served, in the order they first asked.
        self._personas_of: dict[tuple[str, str], list[str]] = {}
        self._lock = threading.Lock()
        # Weights being loaded now, outside the lock (seconds): a swap's preparation loads
        # a candidate in a thread of its own while the worker's main thread looks up the
        # weights it serves. Each end of a load is signalled, so a second thread that wants
        # the same weights waits for them instead of loading them twice.
        self._loading: set[tuple[str, str]] = set()
        self._load_ended = threading.Condition(self._lock)

    def key_for(self, persona: Persona, version: str | None = None) -> tuple[str, str]:
        """Which set of weights a persona at a version speaks with (loaded or not)."""
        _, checkpoint = resolve_checkpoint(persona, self.settings, version)
        return _key(persona, checkpoint)

    def serve(self, persona: Persona, version: str | None = None) -> Served:
        """The loaded model and engine for a persona, loading them if needed.

        Safe from two threads (the worker's and a swap's preparation): the lock is not held
        while loading, and weights another thread is loading are waited for, not loaded again.
        """
        with self._lock:
            held = self._held(persona, version)
            if held is not None:
                self._note_sharing(held, persona.name)
                return held
        version_name, checkpoint = resolve_checkpoint(persona, self.settings, version)
        key = _key(persona, checkpoint)
        with self._load_ended:
            while key in self._loading:
                self._load_ended.wait()
            found = self._served.get(key)
            if found is not None:  # the other thread's load, just ended
                self._note_sharing(found, persona.name)
                return Served(key, version_name, found.loaded, found.engine)
            self._refuse_recent_failure(key)
            self._loading.add(key)
        started = time.perf_counter()
        served = failure = None
        try:
            loaded, engine = self._load(persona, checkpoint)
            served = Served(key, version_name, loaded, engine)
        except ModelError as exc:
            failure = str(exc)
            raise
        finally:
            with self._load_ended:
                self._loading.discard(key)
                if failure is not None:
                    self._failed[key] = (time.monotonic(), failure)
                elif served is not None:
                    self._failed.pop(key, None)
                    self._served[key] = served
                    self._personas_of[key] = [persona.name]
                self._load_ended.notify_all()
        log.info("loaded %s for %s in %.1f s (warmed up)", loaded.name, persona.name, time.perf_counter() - started)
        return served

    def _note_sharing(self, served: Served, name: str) -> None:
        """Log, once per persona, that loaded weights now serve it too, naming all they serve."""
        names = self._personas_of.setdefault(served.key, [])
        if name in names:
            return
        names.append(name)
        log.info("%s (%s) serves %s with one copy of its weights", served.loaded.name, served.version, ", ".join(names))

    def _load(self, persona: Persona, checkpoint: Path | None) -> tuple[LoadedModel, Generator]:
        """Load the weights and warm an engine up on them."""
        with LOADING:
            if self._torch_engines and checkpoint is None:
                # In one pass: converting its config first and its weights when the engine
                # asked read the bundled GGUF twice (about 10 s more at a first start).
                resolve_base(persona.model.base, self.settings.model_cache_dir)
            loaded = load_model(persona.model.base, checkpoint, cache_dir=self.settings.model_cache_dir, device=self.device)
        engine = self.engine_factory(loaded)
        warm_up = getattr(engine, "warm_up", None)
        if warm_up is not None:
            try:
                warm_up()
            except Exception as exc:  # a model that loads but cannot generate is broken
                raise ModelError(f"{loaded.name} loaded but cannot generate: {exc}") from exc
        return loaded, engine

    def _refuse_recent_failure(self, key: tuple[str, str]) -> None:
        """ModelError again, at once, for weights that failed to load moments ago.

        Its words are the same every time: the swapper logs a problem once, for as long as
        it reads the same (a count of seconds left made it log one every second).
        """
        failed = self._failed.get(key)
        if failed is None:
            return
        at, reason = failed
        retry_s = self.settings.worker.load_retry_s
        if time.monotonic() - at < retry_s:
            raise ModelError(f"{reason} (the worker tries loading it again {retry_s:.0f} s after it failed)")

    def _held(self, persona: Persona, version: str | None) -> Served | None:
        """The weights for ``version`` if already loaded, found without reading the disk.

        Loaded weights keep serving after their folder is removed (a disk clean-up), and a
        swap away from them must still find them; so this asks the pool before the disk.
        """
        for name, checkpoint in checkpoint_candidates(persona, self.settings, version):
            found = self._served.get(_key(persona, checkpoint))
            if found is not None:
                return Served(found.key, name, found.loaded, found.engine)
        return None

    def release(self, key: tuple[str, str]) -> None:
        """Forget one set of weights (the memory is freed once no batch uses it)."""
        with self._lock:
            self._served.pop(key, None)
            self._personas_of.pop(key, None)

    def loaded_keys(self) -> list[tuple[str, str]]:
        with self._lock:
            return list(self._served)
