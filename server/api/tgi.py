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

import logging
import re
import secrets
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from fastapi.routing import APIRoute

import server
from server.api.errors import ClientGone, failure_reason, to_http
from server.api.generation import Generation, open_generation
from server.api.middleware import request_id
from server.api.state import ServerState, get_state
from server.api.streaming import SSEResponse, sse_event, unless_disconnected
from server.api.tgi_protocol import (
    ERROR_RESPONSES,
    GenerateParameters,
    GenerateRequest,
    GenerateResponse,
    Info,
    StreamResponse,
)
from server.engine.messages import RequestOutput
from server.errors import ContextTooLong, InvalidRequest, PagedServeError
from server.request import SamplingParams, TokenLogprob

logger = logging.getLogger(__name__)

MAX_STOP_SEQUENCES = 4  # TGI's default --max-stop-sequences
MAX_TOP_N_TOKENS = 5  # TGI's default --max-top-n-tokens
_LOGPROB_FLOOR = -9999.0  # -inf does not fit in JSON
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


# ---- request -> plan ---------------------------------------------------------------------------


@dataclass
class _Plan:
    """One TGI request, checked and translated for the engine."""

    inputs: str
    prompt_ids: list[int]
    params: SamplingParams
    details: bool
    prefill: bool  # decoder_input_details: the prompt tokens with their logprobs
    top_n: int
    return_full_text: bool
    seed: int | None  # the sampling seed details report; None when greedy
    special_ids: frozenset[int]


def _bad(message: str, param: str) -> InvalidRequest:
    return InvalidRequest(message, param=f"parameters.{param}")


def _check_parameters(p: GenerateParameters, stream: bool, state: ServerState) -> None:
    """TGI's checks with TGI's messages, and clear refusals of what this server does not do."""
    if p.best_of not in (None, 1):
        raise _bad("`best_of` != 1 is not allowed for this endpoint", "best_of")
    if p.temperature is not None and p.temperature <= 0:
        raise _bad("`temperature` must be strictly positive", "temperature")
    if p.repetition_penalty is not None and p.repetition_penalty <= 0:
        raise _bad("`repetition_penalty` must be strictly positive", "repetition_penalty")
    if p.frequency_penalty is not None and not -2 <= p.frequency_penalty <= 2:
        raise _bad("`frequency_penalty` must be >= -2.0 and <= 2.0", "frequency_penalty")
    if p.top_p is not None and not 0 < p.top_p < 1:
        raise _bad("`top_p` must be > 0.0 and < 1.0", "top_p")
    if p.top_k is not None and p.top_k <= 0:
        raise _bad("`top_k` must be strictly positive", "top_k")
    if p.max_new_tokens is not None and p.max_new_tokens <= 0:
        raise _bad("`max_new_tokens` must be strictly positive", "max_new_tokens")
    if p.stop and len(p.stop) > MAX_STOP_SEQUENCES:
        raise _bad(f"`stop` supports up to {MAX_STOP_SEQUENCES} stop sequences. Given: {len(p.stop)}", "stop")
    if p.top_n_tokens is not None and not 0 <= p.top_n_tokens <= MAX_TOP_N_TOKENS:
        raise _bad(f"`top_n_tokens` must be >= 0 and <= {MAX_TOP_N_TOKENS}. Given: {p.top_n_tokens}", "top_n_tokens")
    if stream and p.decoder_input_details:
        raise _bad("`decoder_input_details` == true is not supported when streaming tokens", "decoder_input_details")
    if p.typical_p is not None:
        raise _bad("`typical_p` is not supported by this server: leave it unset.", "typical_p")
    if p.watermark:
        raise _bad("`watermark` is not supported by this server: leave it unset or false.", "watermark")
    if p.grammar is not None:
        raise _bad("`grammar` is not supported by this server: leave it unset.", "grammar")
    if p.adapter_id is not None and p.adapter_id not in state.model.names:
        served = ", ".join(state.model.names)
        message = f"`adapter_id` {p.adapter_id!r} is not served: this server has no LoRA adapters (serves {served})."
        raise _bad(message, "adapter_id")


def _decoding(p: GenerateParameters, vocab_size: int) -> dict:
    """Greedy unless TGI would sample (`do_sample or has_warpers`); sampling always has a seed, drawn
    at random when none is given, so that details can report it."""
    sampling = bool(p.do_sample) or p.temperature not in (None, 1.0) or p.top_k is not None or p.top_p is not None
    if not sampling:
        return {"temperature": 0.0}
    return {
        "temperature": p.temperature or 1.0,
        "top_p": p.top_p or 1.0,
        "top_k": p.top_k if p.top_k is not None and p.top_k < vocab_size else 0,  # all of them: off
        "seed": p.seed if p.seed is not None else secrets.randbits(63),
    }


def _plan(body: GenerateRequest, state: ServerState, stream: bool) -> _Plan:
    p = body.parameters or GenerateParameters()
    _check_parameters(p, stream, state)
    if not body.inputs:
        raise InvalidRequest("`inputs` cannot be empty", param="inputs")
    max_total = state.model.max_model_len
    max_input = max_total - 1
    if p.truncate is not None and not 0 < p.truncate <= max_input:
        raise _bad(f"`truncate` must be strictly positive and less than {max_input}. Given: {p.truncate}", "truncate")
    prompt_ids = list(state.model.tokenizer.encode(body.inputs))
    if p.truncate is not None:
        prompt_ids = prompt_ids[-p.truncate :]  # TGI keeps the end of the prompt
    num_input = len(prompt_ids)
    max_new = p.max_new_tokens  # None: up to the context length
    if max_new is not None and num_input + max_new > max_total:
        raise ContextTooLong(
            f"`inputs` tokens + `max_new_tokens` must be <= {max_total}. "
            f"Given: {num_input} `inputs` tokens and {max_new} `max_new_tokens`",
            param="parameters.max_new_tokens",
        )
    if num_input > max_input:
        raise ContextTooLong(f"`inputs` must have less than {max_input} tokens. Given: {num_input}", param="inputs")

    decoding = _decoding(p, state.model.vocab_size)
    details = bool(p.details or p.decoder_input_details)
    top_n = p.top_n_tokens or 0
    params = SamplingParams(
        **decoding,
        repetition_penalty=1.0 if p.repetition_penalty is None else p.repetition_penalty,
        frequency_penalty=p.frequency_penalty or 0.0,
        stop=list(p.stop or []),
        include_stop_str_in_output=True,
        ignore_eos=bool(p.ignore_eos),
        max_tokens=max_new,
        logprobs=top_n if details or stream else None,  # every streamed token carries its logprob
        prompt_logprobs=0 if p.decoder_input_details else None,
    )
    return _Plan(
        inputs=body.inputs,
        prompt_ids=prompt_ids,
        params=params,
        details=details,
        prefill=bool(p.decoder_input_details),
        top_n=top_n,
        return_full_text=bool(p.return_full_text),
        seed=decoding.get("seed"),
        special_ids=frozenset(state.model.tokenizer.all_special_ids),
    )


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
    core = state.client.core
    return Info(
        model_id=state.model.root,
        model_sha=_commit_sha(core.model_config.path),
        model_dtype=f"torch.{state.client.startup_info()['cache_dtype']}",
        model_device_type=core.model_config.device.split(":")[0],
        model_pipeline_tag="text-generation",
        max_concurrent_requests=core.scheduler_config.max_num_seqs,
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
    plan = _plan(body, state, stream)
    if stream:
        generation = await unless_disconnected(request, open_generation(state, rid, [plan.prompt_ids], plan.params))
        events = tgi_sse(_stream(plan, state, generation), state.metrics.count_failure)
        return SSEResponse(events, on_close=generation.aclose)

    async def complete() -> JSONResponse:
        generation = await open_generation(state, rid, [plan.prompt_ids], plan.params)
        try:
            result = await _collect(plan, state, generation)
        finally:
            await generation.aclose()
        return JSONResponse([result] if as_list else result)

    return await unless_disconnected(request, complete())


# ---- responses ---------------------------------------------------------------------------------


def _logprob(value: float) -> float:
    return max(_LOGPROB_FLOOR, value)


def _token(plan: _Plan, token_id: int, text: str, logprob: float | None) -> dict:
    logprob = None if logprob is None else _logprob(logprob)
    return {"id": token_id, "text": text, "logprob": logprob, "special": token_id in plan.special_ids}


def _tokens(plan: _Plan, state: ServerState, out: RequestOutput) -> list[tuple[dict, list[dict]]]:
    """Each token of a delta (one in practice) with its top alternatives. The delta's text goes to its
    last token; a special token (EOS) adds its own text, which generated_text leaves out, as TGI does."""
    entries: list[TokenLogprob | None] = list(out.logprobs or [None] * len(out.token_ids))
    last = len(out.token_ids) - 1
    result = []
    for i, (token_id, lp) in enumerate(zip(out.token_ids, entries)):
        text = out.text if i == last else ""
        if token_id in plan.special_ids:
            text += state.tokens.text(token_id)
        token = _token(plan, token_id, text, lp.logprob if lp else None)
        top = [_token(plan, t, state.tokens.text(t), v) for t, v in lp.top[: plan.top_n]] if lp else []
        result.append((token, top))
    return result


def _finish_reason(out: RequestOutput) -> str:
    if out.finish_reason == "stop":  # a stop string, else EOS (or a stop token id)
        return "stop_sequence" if isinstance(out.stop_reason, str) else "eos_token"
    return "length"


def _prefill(plan: _Plan, state: ServerState, prompt_logprobs: list[TokenLogprob | None] | None) -> list[dict]:
    if not plan.prefill:
        return []
    entries = prompt_logprobs or [None] * len(plan.prompt_ids)
    return [
        {"id": token_id, "text": state.tokens.text(token_id), "logprob": None if lp is None else _logprob(lp.logprob)}
        for token_id, lp in zip(plan.prompt_ids, entries)
    ]


async def _collect(plan: _Plan, state: ServerState, generation: Generation) -> dict:
    text: list[str] = []
    tokens: list[dict] = []
    top_tokens: list[list[dict]] = []
    prompt_logprobs = None
    finish_reason, generated_tokens = "length", 0
    async for _, out in generation:
        text.append(out.text)
        if out.prompt_logprobs is not None:
            prompt_logprobs = out.prompt_logprobs
        if plan.details:
            for token, top in _tokens(plan, state, out):
                tokens.append(token)
                top_tokens.append(top)
        generated_tokens = out.num_output_tokens
        if out.finish_reason is not None:
            finish_reason = _finish_reason(out)
    result: dict = {"generated_text": (plan.inputs if plan.return_full_text else "") + "".join(text)}
    if plan.details:
        details = {
            "finish_reason": finish_reason,
            "generated_tokens": generated_tokens,
            "seed": plan.seed,
            "prefill": _prefill(plan, state, prompt_logprobs),
            "tokens": tokens,
        }
        if plan.top_n:
            details["top_tokens"] = top_tokens
        result["details"] = details
    return result


async def _stream(plan: _Plan, state: ServerState, generation: Generation) -> AsyncIterator[dict]:
    text: list[str] = []
    index = 0
    async for _, out in generation:
        text.append(out.text)
        events = []
        for token, top in _tokens(plan, state, out):
            index += 1
            event = {"index": index, "token": token}
            if plan.top_n:
                event["top_tokens"] = top
            events.append({**event, "generated_text": None, "details": None})
        if out.finish_reason is not None and events:
            events[-1]["generated_text"] = (plan.inputs if plan.return_full_text else "") + "".join(text)
            if plan.details:
                events[-1]["details"] = {
                    "finish_reason": _finish_reason(out),
                    "generated_tokens": out.num_output_tokens,
                    "seed": plan.seed,
                    "input_length": len(plan.prompt_ids),
                }
        for event in events:
            yield event


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
