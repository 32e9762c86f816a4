"""EngineClient: the API's handle on an engine core that runs on a thread of this process (tests, the
in-process mode of `pagedserve serve`); requests go in through an inbox of typed messages and deltas
come back on per-request asyncio queues (RequestRouter). server/engine/process.py is the same client
for a core in its own process."""

from __future__ import annotations

import contextlib
import logging
import queue
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable

from server.engine.core import EngineCore
from server.engine.messages import AbortRequest, EngineInfo, GenerateRequest, RequestOutput
from server.engine.router import RequestRouter
from server.errors import EngineDead
from server.metrics import StepStats
from server.request import SamplingParams

logger = logging.getLogger(__name__)

_IDLE_WAIT_S = 0.05
_HUNG_AFTER_S = 120.0  # a step that takes longer than this marks the engine as hung


class EngineClient:
    def __init__(self, core: EngineCore, on_step: Callable[[StepStats], None] | None = None):
        self.core = core
        self._on_step = on_step
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._router = RequestRouter()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._heartbeat = time.monotonic()
        self._info: EngineInfo | None = None

    # ---- lifecycle ------------------------------------------------------------------------

    def set_step_listener(self, on_step: Callable[[StepStats], None]) -> None:
        """Called on the engine thread after every step (metrics); set before start()."""
        self._on_step = on_step

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="engine-core", daemon=True)
        self._thread.start()

    def shutdown(self, timeout: float = 10.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
        self.core.close()

    @property
    def info(self) -> EngineInfo:
        """The engine-info message: what the API may know of the engine and its model."""
        if self._info is None:
            self._info = self.core.info()
        return self._info

    @property
    def dead_reason(self) -> str | None:
        """Why the engine loop ended on an error, or None."""
        return self._router.dead_reason

    @property
    def has_died(self) -> bool:
        """The loop ended on an error: the engine cannot serve any more (the process should exit)."""
        return self.dead_reason is not None

    @property
    def is_alive(self) -> bool:
        """The loop thread runs and is not stuck inside one step."""
        if self.dead_reason is not None or self._thread is None or not self._thread.is_alive():
            return False
        return time.monotonic() - self._heartbeat < _HUNG_AFTER_S

    @property
    def num_waiting(self) -> int:
        return self.core.scheduler.num_waiting

    @property
    def num_running(self) -> int:
        return self.core.scheduler.num_running

    # ---- requests -------------------------------------------------------------------------

    async def generate(
        self, prompt_token_ids: list[int], params: SamplingParams, request_id: str | None = None
    ) -> AsyncIterator[RequestOutput]:
        """Stream the deltas of every choice of one request. Leaving early aborts the request."""
        if not self.is_alive:
            raise EngineDead(f"The engine is not running: {self.dead_reason or 'stopped'}.")
        request = GenerateRequest(request_id or uuid.uuid4().hex, list(prompt_token_ids), params, time.monotonic())
        async with contextlib.aclosing(self._router.stream(request, self._inbox.put)) as deltas:
            async for out in deltas:
                yield out

    def abort(self, request_id: str) -> None:
        self._inbox.put(AbortRequest(request_id))

    # ---- the loop -------------------------------------------------------------------------

    def _run(self) -> None:
        busy = False
        try:
            while not self._stop.is_set():
                self._heartbeat = time.monotonic()
                self._drain_inbox(block=not self.core.has_unfinished())
                if not self.core.has_unfinished():
                    if busy and self._on_step is not None:  # went idle: let the gauges see it
                        self._on_step(self.core.snapshot_stats())
                    busy = False
                    continue
                busy = True
                outputs, stats = self.core.step()
                self._router.deliver(outputs, self.core.abort)
                if self._on_step is not None:
                    self._on_step(stats)
        except Exception as exc:  # the loop must never die silently
            logger.exception("The engine loop died")
            self._router.die(f"{type(exc).__name__}: {exc}")

    def _drain_inbox(self, block: bool) -> None:
        try:
            message = self._inbox.get(timeout=_IDLE_WAIT_S) if block else self._inbox.get_nowait()
        except queue.Empty:
            return
        while True:
            self._handle(message)
            try:
                message = self._inbox.get_nowait()
            except queue.Empty:
                return

    def _handle(self, message: GenerateRequest | AbortRequest) -> None:
        if isinstance(message, AbortRequest):
            self.core.abort(message.request_id)
            return
        if not self._router.is_waiting(message.request_id):  # the caller left before the engine saw the request
            return
        self._router.deliver(self.core.submit(message), lambda _: None)
