"""Per-app state: the engine handle, what the API knows of the model, in-flight work and draining.

One `ServerState` lives on `app.state.server`; nothing is kept at module level, so two apps (two
engines) can live in one process.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from dataclasses import dataclass, field
from typing import Any, Protocol

from fastapi import Request

from server.api.errors import ShuttingDown
from server.api.logprobs import TokenText
from server.config import ServerConfig
from server.engine.client import EngineClient
from server.engine.messages import EngineInfo
from server.errors import ModelNotFound, PagedServeError
from server.metrics import Metrics

logger = logging.getLogger(__name__)

_PLACEHOLDER_NAMES = frozenset({"dummy", "tgi"})


@dataclass(frozen=True)
class ModelInfo:
    """What the API needs to know of the served model, read once from the engine."""

    tokenizer: Any  # a transformers tokenizer, with its chat template
    names: tuple[str, ...]
    root: str
    max_model_len: int
    vocab_size: int
    sampling_defaults: dict[str, Any]
    max_queued_requests: int | None
    start_token_id: int  # what a null prompt starts from: BOS, else <|endoftext|>, else EOS

    @classmethod
    def from_info(cls, info: EngineInfo) -> ModelInfo:
        return cls(
            tokenizer=info.tokenizer,
            names=info.served_model_names,
            root=info.model,
            max_model_len=info.max_model_len,
            vocab_size=info.vocab_size,
            sampling_defaults=dict(info.sampling_defaults),
            max_queued_requests=info.max_queued_requests,
            start_token_id=_start_token_id(info.tokenizer, info.eos_token_ids),
        )

    def resolve(self, name: str | None) -> str:
        """The served name a request addresses (the first one when it names none), or 404.

        huggingface_hub's InferenceClient given a base_url and no model sends the placeholder
        "dummy" (older ones "tgi"), as TGI ignores the name: these address the first model too."""
        if name in self.names:
            return name
        if name is None or name == "" or name in _PLACEHOLDER_NAMES:
            return self.names[0]
        raise ModelNotFound(f"The model `{name}` does not exist. Served: {', '.join(self.names)}.", param="model")


class InFlight(Protocol):
    """Work in flight, as draining sees it (a Generation): it can be ended with an error."""

    def fail(self, error: PagedServeError) -> None: ...


def _start_token_id(tokenizer, eos_token_ids: tuple[int, ...]) -> int:
    if tokenizer.bos_token_id is not None:
        return int(tokenizer.bos_token_id)
    endoftext = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    if isinstance(endoftext, int) and endoftext != tokenizer.unk_token_id:
        return endoftext
    if tokenizer.eos_token_id is not None:
        return int(tokenizer.eos_token_id)
    return eos_token_ids[0] if eos_token_ids else 0


@dataclass
class ServerState:
    client: EngineClient
    config: ServerConfig
    model: ModelInfo
    metrics: Metrics  # every Prometheus metric of this server; /metrics renders it
    tokens: TokenText  # token id -> display text and bytes, cached
    api_key: str | None = None
    created: int = field(default_factory=lambda: int(time.time()))
    loaded: bool = False
    draining: bool = False
    _active: set[InFlight] = field(default_factory=set)
    _engine_ids: set[str] = field(default_factory=set)

    @classmethod
    def build(cls, client: EngineClient, config: ServerConfig) -> ServerState:
        key = config.api_key or os.environ.get("PAGEDSERVE_API_KEY") or None
        model = ModelInfo.from_info(client.info)
        tokens = TokenText(model.tokenizer)
        metrics = Metrics(model.names[0], model.max_model_len)
        return cls(client=client, config=config, model=model, metrics=metrics, tokens=tokens, api_key=key)

    # ---- request ids ----------------------------------------------------------------------

    def claim_ids(self, base: str, count: int) -> list[str]:
        """`count` engine request ids derived from `base`, none of them in use by another request."""
        suffix = 0
        while True:
            stem = base if suffix == 0 else f"{base}~{suffix}"
            ids = [stem] if count == 1 else [f"{stem}/{i}" for i in range(count)]
            if not any(i in self._engine_ids for i in ids):
                self._engine_ids.update(ids)
                return ids
            suffix += 1

    def release_ids(self, ids: list[str]) -> None:
        self._engine_ids.difference_update(ids)

    # ---- in-flight work and draining ------------------------------------------------------

    def track(self, work: InFlight) -> None:
        self._active.add(work)

    def untrack(self, work: InFlight) -> None:
        self._active.discard(work)

    @property
    def num_in_flight(self) -> int:
        return len(self._active)

    def readiness(self) -> tuple[bool, str]:
        if not self.loaded:
            return False, "loading"
        if self.draining:
            return False, "draining"
        if not self.client.is_alive:
            return False, "engine_dead"
        limit = self.model.max_queued_requests
        if limit is not None and self.client.num_waiting >= limit:
            return False, "queue_full"
        return True, "ready"

    async def drain(self, timeout: float) -> None:
        """Refuse new work now; give in-flight requests `timeout` seconds, then end them with an error."""
        self.draining = True
        logger.info("Draining: %d request(s) in flight, up to %.1f s", len(self._active), timeout)
        deadline = time.monotonic() + timeout
        while self._active and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        if self._active:
            logger.warning("Shutdown timeout: aborting %d unfinished request(s)", len(self._active))
            for work in list(self._active):
                work.fail(ShuttingDown("The server shut down before the request finished."))
            flush_deadline = time.monotonic() + 5.0
            while self._active and time.monotonic() < flush_deadline:
                await asyncio.sleep(0.05)
        logger.info("Drained")


def get_state(request: Request) -> ServerState:
    return request.app.state.server
