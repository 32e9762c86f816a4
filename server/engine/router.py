"""RequestRouter: the per-request asyncio queues between the engine's outputs and the API's streams.

Both engine clients (the core on a thread of this process, or in a child process) route through one:
`stream` registers a request and yields its deltas, `deliver` hands a step's outputs to their
requests from whatever thread reads the engine, and `die` fails every request in flight at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import AsyncIterator, Callable

from server.engine.messages import AbortRequest, GenerateRequest, RequestOutput
from server.errors import EngineDead, EngineFailed


class RequestRouter:
    def __init__(self) -> None:
        self._queues: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._lock = threading.Lock()
        self.dead_reason: str | None = None

    async def stream(
        self, request: GenerateRequest, send: Callable[[GenerateRequest | AbortRequest], None]
    ) -> AsyncIterator[RequestOutput]:
        """Register `request`, `send` it to the engine and yield the deltas of all its choices; leaving
        before every choice finished sends an AbortRequest."""
        deltas: asyncio.Queue = asyncio.Queue()
        request_id = request.request_id
        with self._lock:  # the engine's death and this registration are ordered: one of them sees the other
            if self.dead_reason is not None:
                raise EngineDead(f"The engine is not running: {self.dead_reason}.")
            self._queues[request_id] = (asyncio.get_running_loop(), deltas)
        open_choices = set(range(request.params.n))
        try:
            send(request)
            while open_choices:
                out: RequestOutput = await deltas.get()
                if out.error is not None:
                    raise out.error
                if out.finished:
                    open_choices.discard(out.index)
                yield out
        finally:
            with self._lock:
                self._queues.pop(request_id, None)
            if open_choices and self.dead_reason is None:
                with contextlib.suppress(EngineDead):
                    send(AbortRequest(request_id))

    def is_waiting(self, request_id: str) -> bool:
        """Whether a caller still waits for this request's deltas."""
        with self._lock:
            return request_id in self._queues

    @property
    def num_streams(self) -> int:
        with self._lock:
            return len(self._queues)

    def deliver(self, outputs: list[RequestOutput], abort: Callable[[str], None]) -> None:
        """Hand each output to its request's queue; `abort` the requests nobody listens to any more."""
        orphans: list[str] = []
        with self._lock:
            for out in outputs:
                target = self._queues.get(out.request_id)
                if target is None:
                    if not out.finished:  # nobody listens any more: stop the work
                        orphans.append(out.request_id)
                    continue
                loop, deltas = target
                loop.call_soon_threadsafe(deltas.put_nowait, out)
        for request_id in dict.fromkeys(orphans):
            abort(request_id)

    def die(self, reason: str) -> None:
        """Mark the engine dead and fail every request in flight at once (500); new ones get EngineDead (503)."""
        with self._lock:
            if self.dead_reason is not None:
                return
            self.dead_reason = reason
            targets = list(self._queues.items())
        for request_id, (loop, deltas) in targets:
            error = EngineFailed("The engine failed while running this request and the server is restarting; retry it.")
            loop.call_soon_threadsafe(deltas.put_nowait, RequestOutput.failure(request_id, error))

