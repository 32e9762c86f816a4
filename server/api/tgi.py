"""Hugging Face text-generation-inference's REST API: POST /generate, /generate_stream and / , GET /info.

huggingface_hub's `InferenceClient(base_url=...).text_generation` posts to `/` with `stream` choosing
JSON or server-sent events. The semantics are TGI's (router/src/validation.rs, server/.../tokens.py):

- Greedy unless `do_sample` or a warper is set (temperature other than 1, top_k, top_p): TGI's
  `do_sample or has_warpers`. temperature must be > 0 even when greedy, top_p in (0, 1), top_k > 0.
  A sampled request without a seed gets a random one, reported in details.seed (null when greedy).
- max_new_tokens: 100 when absent (TGI >= 2.0); null: up to the context length.
- Stop sequences stay in generated_text, and a special token (EOS) shows its text in its token, as in TGI.
- /generate_stream: one event per token, the last also carrying generated_text (and details); no [DONE].
- Errors keep this server's statuses (400 where TGI says 422) in TGI's body `{"error", "error_type"}`,
  which huggingface_hub turns into ValidationError / OverloadedError / GenerationError with the message.

On purpose unlike TGI: return_full_text defaults to false on `/` too (TGI defaults it to true there for
text-generation models; huggingface_hub used to send false, and text_generation callers expect only the
new text); a request without `parameters` decodes greedily (TGI then samples); frequency_penalty counts
the generated tokens as OpenAI's does (TGI's is normalized over prompt and output).
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import AsyncIterator, Callable
from pathlib import Path

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from fastapi.routing import APIRoute

import server
from server.api.errors import ClientGone, failure_reason, to_http
from server.api.generation import open_generation
from server.api.middleware import request_id
from server.api.state import get_state
from server.api.streaming import SSEResponse, sse_event, unless_disconnected
from server.api.tgi_plan import MAX_STOP_SEQUENCES, plan_request
from server.api.tgi_protocol import ERROR_RESPONSES, GenerateRequest, GenerateResponse, Info, StreamResponse
from server.api.tgi_responses import collect, stream_events
from server.errors import PagedServeError

logger = logging.getLogger(__name__)

# TGI's error kinds, by this server's status; other statuses carry no error_type (TGI has none for them).
_ERROR_TYPES = {400: "validation", 429: "overloaded", 500: "generation"}
_COMMIT_SHA = re.compile(r"[0-9a-f]{40}")


class _TGIRoute(APIRoute):
    """Answers every error of the route (auth, body validation, refusals) in TGI's body."""

    def get_route_handler(self) -> Callable:
        handler = super().get_route_handler()

        async def handle(request: Request) -> Response:
            try:
                return await handler(request)
            except ClientGone:
                raise  # nobody reads the answer; the app's handler records it
            except Exception as exc:  # noqa: BLE001 (every error answers in TGI's body)
                return _error_response(request, exc)

        return handle


router = APIRouter(tags=["text-generation-inference"], route_class=_TGIRoute)


def tgi_error(exc: BaseException, in_stream: bool = False) -> tuple[int, dict, dict[str, str]]:
    """(status, TGI body, headers) for any exception: the status and message of `to_http`, TGI's body.

    In a stream (no status to tell), an error without a TGI kind is an `incomplete_generation`."""
    status, envelope, headers = to_http(exc)
    message = envelope["error"]["message"]
    kind = _ERROR_TYPES.get(status)
    if kind is None and in_stream:
        kind = "incomplete_generation"
    if kind == "validation":
        message = f"Input validation error: {message}"
    body = {"error": message} if kind is None else {"error": message, "error_type": kind}
    return status, body, headers


def _error_response(request: Request, exc: Exception) -> JSONResponse:
    status, body, headers = tgi_error(exc)
    get_state(request).metrics.count_failure(failure_reason(exc))
    if status >= 500 and not isinstance(exc, PagedServeError):
        logger.error("Unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
    return JSONResponse(body, status_code=status, headers=headers)


# ---- routes ------------------------------------------------------------------------------------


@router.post("/generate", response_model=None, responses={200: {"model": GenerateResponse}, **ERROR_RESPONSES})
async def generate(body: GenerateRequest, request: Request) -> Response:
    """Generate text; `details` adds tokens, logprobs, finish reason and seed. `stream` is ignored, as in TGI."""
    return await _generate(body, request, stream=False, as_list=False)


@router.post(
    "/generate_stream",
    response_model=None,
    responses={
        200: {"model": StreamResponse, "description": "Server-sent events: one StreamResponse per token, no [DONE]"},
        **ERROR_RESPONSES,
    },
)
async def generate_stream(body: GenerateRequest, request: Request) -> Response:
    """Stream one event per token; the last one carries generated_text (and details when asked)."""
    return await _generate(body, request, stream=True, as_list=False)


@router.post(
    "/",
    response_model=None,
    responses={
        200: {"model": list[GenerateResponse], "description": "A list of one GenerateResponse, or events if stream"},
        **ERROR_RESPONSES,
    },
)
async def compat_generate(body: GenerateRequest, request: Request) -> Response:
    """TGI's compatibility route (huggingface_hub posts here): /generate_stream when `stream`, else
    /generate with the response wrapped in a list."""
    return await _generate(body, request, stream=bool(body.stream), as_list=True)


@router.get("/info", response_model=Info)
async def info(request: Request) -> Info:
    """The served model and this server's limits, in TGI's shape."""
    state = get_state(request)
    engine = state.client.info
    return Info(
        model_id=state.model.root,
        model_sha=_commit_sha(engine.model_path),
        model_dtype=f"torch.{engine.dtype}",
        model_device_type=engine.device.split(":")[0],
        model_pipeline_tag="text-generation",
        max_concurrent_requests=engine.max_num_seqs,
        max_best_of=1,
        max_stop_sequences=MAX_STOP_SEQUENCES,
        max_input_tokens=state.model.max_model_len - 1,
        max_total_tokens=state.model.max_model_len,
        validation_workers=1,
        max_client_batch_size=1,
        router="pagedserve",
        version=server.__version__,
        sha=None,
        docker_label=None,
    )


def _commit_sha(path: str) -> str | None:
    """The Hub commit of a model read from the Hub cache (…/snapshots/<sha>), else None."""
    snapshot = Path(path)
    if snapshot.parent.name == "snapshots" and _COMMIT_SHA.fullmatch(snapshot.name):
        return snapshot.name
    return None


async def _generate(body: GenerateRequest, request: Request, *, stream: bool, as_list: bool) -> Response:
    state = get_state(request)
    rid = request_id(request)
    plan = await asyncio.to_thread(plan_request, body, state, stream)  # tokenizing: off the event loop
    if stream:
        generation = await unless_disconnected(request, open_generation(state, rid, [plan.prompt_ids], plan.params))
        events = tgi_sse(stream_events(plan, state, generation), state.metrics.count_failure)
        return SSEResponse(events, on_close=generation.aclose)

    async def complete() -> JSONResponse:
        generation = await open_generation(state, rid, [plan.prompt_ids], plan.params)
        try:
            result = await collect(plan, state, generation)
        finally:
            await generation.aclose()
        return JSONResponse([result] if as_list else result)

    return await unless_disconnected(request, complete())


# ---- TGI's server-sent events -------------------------------------------------------------------


async def tgi_sse(events: AsyncIterator[dict], on_error: Callable[[str], None]) -> AsyncIterator[bytes]:
    """TGI's framing: `data:` events and no [DONE]; an error after the start is a last TGI error event."""
    try:
        async for payload in events:
            yield sse_event(payload)
    except Exception as exc:  # the status line is sent: the error can only travel in the stream
        status, body, _ = tgi_error(exc, in_stream=True)
        on_error(failure_reason(exc))
        if status >= 500 and status != 503:
            logger.error("Stream failed", exc_info=exc)
        yield sse_event(body)
