"""POST /v1/chat/completions: messages through the chat template, streamed or not, with vLLM's
request fields (server/api/unsupported.py refuses the ones not served)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from server.api.choices import Choice, continuous_usage, make_usage, now, response_id
from server.api.generation import Generation, open_generation
from server.api.logprobs import chat_logprobs, prompt_logprobs
from server.api.middleware import request_id
from server.api.prompts import encode_chat, render_chat, truncate_prompt
from server.api.protocol import (
    ERROR_RESPONSES,
    ChatChoice,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatLogprobs,
    ChatResponseMessage,
    dump,
    dump_response,
)
from server.api.sampling import StreamUsage, build_sampling_params, stream_usage
from server.api.structured_outputs import grammar_spec
from server.api.tools.choice import ToolPlan, plan_tools
from server.api.tools.parsers import ParsedDelta, ToolParser
from server.api.unsupported import refuse_unsupported
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
    usage: StreamUsage
    prompt_logprobs: bool  # vLLM's prompt_logprobs field: return them
    as_ids: bool  # return_tokens_as_token_ids
    token_ids: bool  # return_token_ids
    tools: ToolPlan  # how tool calls are forced and read out of the reply


def _check_unsupported(body: ChatCompletionRequest) -> None:
    refuse_unsupported(body)
    if body.top_logprobs and not body.logprobs:
        raise InvalidRequest("top_logprobs needs logprobs set to true.", param="top_logprobs")
    if body.stream and body.prompt_logprobs:
        raise InvalidRequest("prompt_logprobs are not available when stream is true.", param="prompt_logprobs")
    explicit = body.model_fields_set
    if body.continue_final_message and body.add_generation_prompt and "add_generation_prompt" in explicit:
        raise InvalidRequest(
            "continue_final_message and add_generation_prompt cannot both be true.", param="continue_final_message"
        )


def _plan(body: ChatCompletionRequest, state: ServerState, rid: str) -> _Plan:
    model_name = state.model.resolve(body.model)
    _check_unsupported(body)
    usage = stream_usage(body)
    text = render_chat(state.model, body, trust_request_template=state.config.trust_request_chat_template)
    prompt_ids = encode_chat(state.model, text, add_special_tokens=bool(body.add_special_tokens))
    prompt_ids = truncate_prompt(prompt_ids, body.truncate_prompt_tokens, state.model.max_model_len)
    max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
    top_logprobs = (body.top_logprobs or 0) if body.logprobs else None
    tools = plan_tools(body, state.config.tool_call_parser)
    structured = grammar_spec(body)
    if tools.grammar is not None:
        if structured is not None:
            raise InvalidRequest(
                f"tool_choice 'required' or naming a function makes the reply tool calls; it cannot be combined "
                f"with {structured.param}.",
                param="tool_choice",
            )
        structured = tools.grammar
    params = build_sampling_params(
        body,
        state.model,
        max_tokens=max_tokens,
        logprobs=top_logprobs,
        prompt_logprobs=body.prompt_logprobs,
        structured=structured,
    )
    echo_text = ""
    last = body.messages[-1]
    if body.echo and last.role == "assistant" and isinstance(last.content, str):
        echo_text = last.content
    return _Plan(
        id=f"chatcmpl-{rid}",
        model=model_name,
        prompt_ids=prompt_ids,
        params=params,
        top_logprobs=top_logprobs,
        echo_text=echo_text,
        usage=usage,
        prompt_logprobs=body.prompt_logprobs is not None,
        as_ids=bool(body.return_tokens_as_token_ids),
        token_ids=bool(body.return_token_ids),
        tools=tools,
    )


@router.post(
    "/v1/chat/completions", response_model=None, responses={200: {"model": ChatCompletionResponse}, **ERROR_RESPONSES}
)
async def create_chat_completion(body: ChatCompletionRequest, request: Request) -> Response:
    state = get_state(request)
    rid = response_id(body.request_id, request.headers, request_id(request))
    plan = await asyncio.to_thread(_plan, body, state, rid)  # the template and tokenizing: off the event loop
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
            logprobs = ChatLogprobs(content=chat_logprobs(choice.logprobs, state.tokens, plan.top_logprobs, plan.as_ids))
        content, calls, finish_reason = choice.full_text, [], choice.finish_reason
        if plan.tools.new_parser is not None:
            parser = plan.tools.new_parser()
            parser.feed(content)
            parser.finish()
            content, calls = parser.result()
            finish_reason = _finish_reason(plan, parser, finish_reason)
        if plan.echo_text:
            content = plan.echo_text + (content or "")
        message = ChatResponseMessage(content=content, refusal=None, tool_calls=[call.as_dict() for call in calls])
        token_ids = list(choice.token_ids) if plan.token_ids else None
        out_choices.append(
            ChatChoice(index=index, message=message, logprobs=logprobs, finish_reason=finish_reason, token_ids=token_ids)
        )
    usage = make_usage([len(plan.prompt_ids)], choices)
    response = ChatCompletionResponse(id=plan.id, created=now(), model=plan.model, choices=out_choices, usage=usage)
    if plan.prompt_logprobs:
        entries = choices[0].prompt_logprobs or [None] * len(plan.prompt_ids)
        response.prompt_logprobs = prompt_logprobs(plan.prompt_ids, entries, state.tokens)
    if plan.token_ids:
        response.prompt_token_ids = list(plan.prompt_ids)
    return dump_response(response)


def _finish_reason(plan: _Plan, parser: ToolParser, reason: str | None) -> str | None:
    """"tool_calls" when the reply called tools and ended by itself; OpenAI keeps "stop" for a named function."""
    if reason == "stop" and parser.called and not plan.tools.named:
        return "tool_calls"
    return reason


async def _stream(plan: _Plan, state: ServerState, generation: Generation) -> AsyncIterator[dict]:
    created = now()
    choices = [Choice() for _ in range(plan.params.n)]
    parsers = [plan.tools.new_parser() if plan.tools.new_parser else None for _ in choices]
    first_chunk = True  # return_token_ids: the prompt's ids go on the first chunk of the stream

    def chunk(
        index: int, delta: dict, logprobs: list | None = None, finish_reason: str | None = None, token_ids: list | None = None
    ) -> dict:
        nonlocal first_chunk
        entry = {"index": index, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
        if logprobs is not None:
            entry["logprobs"] = {"content": [dump(lp) for lp in logprobs]}
        if plan.token_ids and token_ids is not None:
            entry["token_ids"] = token_ids
        payload = {"id": plan.id, "object": "chat.completion.chunk", "created": created, "model": plan.model, "choices": [entry]}
        if plan.token_ids and first_chunk:
            payload["prompt_token_ids"] = list(plan.prompt_ids)
        first_chunk = False
        if plan.usage.final:
            payload["usage"] = continuous_usage(len(plan.prompt_ids), choices[index]) if plan.usage.continuous else None
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
            entries = list(zip(out.token_ids, out.logprobs))
            logprobs = chat_logprobs(entries, state.tokens, plan.top_logprobs, plan.as_ids)
        parser = parsers[out.index]
        if parser is None:
            parsed = ParsedDelta(content=out.text)
        else:
            parsed = parser.feed(out.text)
            if out.finish_reason is not None:
                rest = parser.finish()
                parsed = ParsedDelta(parsed.content + rest.content, parsed.calls + rest.calls)
        if parsed.content or logprobs or (plan.token_ids and out.token_ids):
            yield chunk(out.index, {"content": parsed.content}, logprobs, token_ids=list(out.token_ids))
        for call in parsed.calls:
            yield chunk(out.index, {"tool_calls": [call.as_dict()]})
        if out.finish_reason is not None:
            reason = out.finish_reason if parser is None else _finish_reason(plan, parser, out.finish_reason)
            yield chunk(out.index, {}, finish_reason=reason, token_ids=[])
    if plan.usage.final:
        usage = make_usage([len(plan.prompt_ids)], choices)
        head = {"id": plan.id, "object": "chat.completion.chunk", "created": created, "model": plan.model}
        yield {**head, "choices": [], "usage": dump(usage)}
