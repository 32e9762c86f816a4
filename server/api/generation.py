"""The engine requests behind one HTTP request (one per prompt), merged into one stream of deltas.

`open_generation` is the only way the endpoints reach the engine. It refuses new work while the
server drains, gives every engine request a unique id, waits until each prompt was admitted (its
first delta came back, so a refusal still becomes a proper HTTP status before a stream starts),
and on exit, whatever the reason (done, error, client gone, cancelled), aborts what is still
running in the engine.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator

from server.api.errors import ShuttingDown
from server.api.state import ServerState
from server.engine.messages import RequestOutput
from server.errors import PagedServeError
from server.request import SamplingParams

logger = logging.getLogger(__name__)

_OUT, _END, _ERROR = "out", "end", "error"


class Generation:
    """Runs one engine request per prompt concurrently; iterate it for (prompt index, delta) pairs."""

    def __init__(self, state: ServerState, prompts: list[list[int]], params: SamplingParams, request_ids: list[str]):
        self._state = state
        self._prompts = prompts
        self._params = params
        self._request_ids = request_ids
        self._queue: asyncio.Queue = asyncio.Queue()
        self._tasks: list[asyncio.Task] = []
        self._buffer: list[tuple] = []
        self._open = len(prompts)
        self._closed = False
        self._failed = False  # an error ended it (counted where the error is answered)

    async def start(self) -> None:
        """Submit every prompt; return once each produced its first delta, or raise the first refusal."""
        for index, (tokens, request_id) in enumerate(zip(self._prompts, self._request_ids)):
            self._tasks.append(asyncio.create_task(self._pump(index, tokens, request_id)))
        admitted: set[int] = set()
        while len(admitted) < len(self._prompts):
            item = await self._queue.get()
            if item[0] == _ERROR:
                self._failed = True
                raise item[2]
            self._buffer.append(item)
            admitted.add(item[1])

    async def _pump(self, index: int, tokens: list[int], request_id: str) -> None:
        try:
            async for out in self._state.client.generate(tokens, self._params, request_id):
                self._queue.put_nowait((_OUT, index, out))
            self._queue.put_nowait((_END, index, None))
        except PagedServeError as exc:
            self._queue.put_nowait((_ERROR, index, exc))
        except Exception:
            logger.exception("Generation of request %s failed", request_id)
            self._queue.put_nowait((_ERROR, index, PagedServeError("The engine failed on this request.")))

    def fail(self, error: PagedServeError) -> None:
        """End the stream with `error` (the server shuts down)."""
        self._queue.put_nowait((_ERROR, -1, error))

    async def __aiter__(self) -> AsyncIterator[tuple[int, RequestOutput]]:
        while self._open:
            item = self._buffer.pop(0) if self._buffer else await self._queue.get()
            kind, index, payload = item
            if kind == _ERROR:
                self._failed = True
                raise payload
            if kind == _END:
                self._open -= 1
                continue
            yield index, payload

    async def aclose(self) -> None:
        """Abort what still runs in the engine and forget the request; safe to call more than once."""
        if self._closed:
            return
        self._closed = True
        self._state.untrack(self)
        if self._open and not self._failed:  # left before the end without an error: the client went away
            self._state.metrics.count_failure("disconnected")
        for task in self._tasks:
            task.cancel()
        if self._tasks:
            await asyncio.shield(asyncio.gather(*self._tasks, return_exceptions=True))
        self._state.release_ids(self._request_ids)


async def open_generation(
    state: ServerState, base_id: str, prompts: list[list[int]], params: SamplingParams
) -> Generation:
    """A started Generation (every prompt admitted), or the error that refused it. The caller must
    `await generation.aclose()` when done with it, whatever happens."""
    if state.draining:
        raise ShuttingDown("The server is shutting down and takes no new requests.")
    generation = Generation(state, prompts, params, state.claim_ids(base_id, len(prompts)))
    state.track(generation)
    try:
        await generation.start()
    except BaseException:
        await generation.aclose()
        raise
    return generation
