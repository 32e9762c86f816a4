"""POST /v1/chat/completions: messages through the chat template, streamed or not."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from server.api.choices import Choice, make_usage, now
from server.api.generation import Generation, open_generation
from server.api.logprobs import chat_logprobs
from server.api.middleware import request_id
from server.api.prompts import encode_chat, render_chat
from server.api.protocol import (
    ERROR_RESPONSES,
    ChatChoice,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatLogprobs,
    ChatResponseMessage,
    dump,
)
from server.api.sampling import build_sampling_params, stream_usage
from server.api.state import ServerState, get_state
from server.api.streaming import SSEResponse, sse_stream, unless_disconnected
from server.errors import InvalidRequest
from server.request import SamplingParams

router = APIRouter(tags=["openai"])


@dataclass
class _Plan:
    id: str
    model: str
    prompt_ids: list[int]
    params: SamplingParams
    top_logprobs: int | None  # None: no logprobs
    echo_text: str  # vLLM's echo: the final assistant message the reply continues
    include_usage: bool


def _check_unsupported(body: ChatCompletionRequest) -> None:
    if body.response_format is not None and body.response_format.type != "text":
        raise InvalidRequest(
            f"response_format {body.response_format.type!r} is not supported yet: only 'text'.", param="response_format"
        )
    choice = body.tool_choice
    if choice is not None and not (isinstance(choice, str) and choice in ("none", "auto")):
        shown = repr(choice) if isinstance(choice, str) else "naming a function"
        raise InvalidRequest(f"tool_choice {shown} is not supported yet: only 'none' and 'auto'.", param="tool_choice")
    if body.top_logprobs and not body.logprobs:
        raise InvalidRequest("top_logprobs needs logprobs set to true.", param="top_logprobs")
    explicit = body.model_fields_set
    if body.continue_final_message and body.add_generation_prompt and "add_generation_prompt" in explicit:
        raise InvalidRequest(
            "continue_final_message and add_generation_prompt cannot both be true.", param="continue_final_message"
        )


def _plan(body: ChatCompletionRequest, state: ServerState, rid: str) -> _Plan:
    model_name = state.model.resolve(body.model)
    _check_unsupported(body)
    include_usage = stream_usage(body)
    text = render_chat(state.model, body)
    max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
    top_logprobs = (body.top_logprobs or 0) if body.logprobs else None
    params = build_sampling_params(body, state.model, max_tokens=max_tokens, logprobs=top_logprobs)
    echo_text = ""
    last = body.messages[-1]
    if body.echo and last.role == "assistant" and isinstance(last.content, str):
        echo_text = last.content
    return _Plan(f"chatcmpl-{rid}", model_name, encode_chat(state.model, text), params, top_logprobs, echo_text, include_usage)


@router.post(
    "/v1/chat/completions", response_model=None, responses={200: {"model": ChatCompletionResponse}, **ERROR_RESPONSES}
)
async def create_chat_completion(body: ChatCompletionRequest, request: Request) -> Response:
    state = get_state(request)
    rid = request_id(request)
    plan = _plan(body, state, rid)
    if body.stream:
        generation = await unless_disconnected(request, open_generation(state, rid, [plan.prompt_ids], plan.params))
        return SSEResponse(sse_stream(_stream(plan, state, generation), state.metrics.count_failure), on_close=generation.aclose)

    async def complete() -> JSONResponse:
        generation = await open_generation(state, rid, [plan.prompt_ids], plan.params)
        try:
            return JSONResponse(await _collect(plan, state, generation))
        finally:
            await generation.aclose()

    return await unless_disconnected(request, complete())


async def _collect(plan: _Plan, state: ServerState, generation: Generation) -> dict:
    choices = [Choice() for _ in range(plan.params.n)]
    async for _, out in generation:
        choices[out.index].add(out)
    out_choices = []
    for index, choice in enumerate(choices):
        logprobs = None
        if plan.top_logprobs is not None:
            logprobs = ChatLogprobs(content=chat_logprobs(choice.logprobs, state.tokens, plan.top_logprobs))
        message = ChatResponseMessage(content=plan.echo_text + choice.full_text, refusal=None)
        out_choices.append(ChatChoice(index=index, message=message, logprobs=logprobs, finish_reason=choice.finish_reason))
    usage = make_usage([len(plan.prompt_ids)], choices)
    return dump(ChatCompletionResponse(id=plan.id, created=now(), model=plan.model, choices=out_choices, usage=usage))


async def _stream(plan: _Plan, state: ServerState, generation: Generation) -> AsyncIterator[dict]:
    created = now()
    choices = [Choice() for _ in range(plan.params.n)]

    def chunk(index: int, delta: dict, logprobs: list | None = None, finish_reason: str | None = None) -> dict:
        entry = {"index": index, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
        if logprobs is not None:
            entry["logprobs"] = {"content": [dump(lp) for lp in logprobs]}
        payload = {"id": plan.id, "object": "chat.completion.chunk", "created": created, "model": plan.model, "choices": [entry]}
        if plan.include_usage:
            payload["usage"] = None
        return payload

    async for _, out in generation:
        choice = choices[out.index]
        if not choice.started:
            choice.started = True
            yield chunk(out.index, {"role": "assistant", "content": ""})
            if plan.echo_text:
                yield chunk(out.index, {"content": plan.echo_text})
        choice.add(out)
        logprobs = None
        if plan.top_logprobs is not None and out.logprobs:
            logprobs = chat_logprobs(list(zip(out.token_ids, out.logprobs)), state.tokens, plan.top_logprobs)
        if out.text or logprobs:
            yield chunk(out.index, {"content": out.text}, logprobs)
        if out.finish_reason is not None:
            yield chunk(out.index, {}, finish_reason=out.finish_reason)
    if plan.include_usage:
        usage = make_usage([len(plan.prompt_ids)], choices)
        head = {"id": plan.id, "object": "chat.completion.chunk", "created": created, "model": plan.model}
        yield {**head, "choices": [], "usage": dump(usage)}
