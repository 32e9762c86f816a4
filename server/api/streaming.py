"""Server-sent events in OpenAI's framing, and cancelling work when the client goes away."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TypeVar

from fastapi import Request
from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from server.api.errors import ClientGone, failure_reason, to_http

logger = logging.getLogger(__name__)

T = TypeVar("T")

DONE = b"data: [DONE]\n\n"


def sse_event(payload: dict) -> bytes:
    return b"data: " + json.dumps(payload, ensure_ascii=False, separators=(",", ":")).encode() + b"\n\n"


async def sse_stream(events: AsyncIterator[dict], on_error: Callable[[str], None] | None = None) -> AsyncIterator[bytes]:
    """Frame `events` as SSE; an error after the stream started becomes a final error event. Ends with [DONE]."""
    try:
        async for payload in events:
            yield sse_event(payload)
    except Exception as exc:  # the status line is sent: the error can only travel in the stream
        status, body, _ = to_http(exc)
        if on_error is not None:
            on_error(failure_reason(exc))
        if status >= 500 and status != 503:
            logger.error("Stream failed", exc_info=exc)
        yield sse_event(body)
    yield DONE


class SSEResponse(StreamingResponse):
    """A text/event-stream response whose body iterator is always closed when the response ends,
    so the engine requests behind it are aborted the moment a client disconnects."""

    media_type = "text/event-stream"

    def __init__(self, content: AsyncIterator[bytes], on_close: Callable[[], Awaitable[None]] | None = None):
        super().__init__(content, headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self._on_close = on_close

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            aclose = getattr(self.body_iterator, "aclose", None)
            if aclose is not None:
                await asyncio.shield(aclose())
            if self._on_close is not None:
                await asyncio.shield(self._on_close())


async def _wait_for_disconnect(request: Request) -> None:
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


async def unless_disconnected(request: Request, work: Awaitable[T]) -> T:
    """Run `work` until it finishes or the client disconnects; then it is cancelled and ClientGone raised."""
    task = asyncio.ensure_future(work)
    listener = asyncio.ensure_future(_wait_for_disconnect(request))
    try:
        await asyncio.wait({task, listener}, return_when=asyncio.FIRST_COMPLETED)
    except BaseException:
        listener.cancel()
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        raise
    listener.cancel()
    if not task.done():
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        raise ClientGone()
    return task.result()
