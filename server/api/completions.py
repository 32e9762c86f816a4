"""POST /v1/completions: OpenAI's legacy completions, streamed or not, with echo and prompt logprobs,
and vLLM's request fields (server/api/unsupported.py refuses the ones not served)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from server.api.choices import Choice, choice_index, continuous_usage, make_usage, now, response_id
from server.api.generation import Generation, open_generation
from server.api.logprobs import legacy_logprobs, prompt_logprobs
from server.api.middleware import request_id
from server.api.prompts import Prompt, completion_prompts
from server.api.protocol import (
    ERROR_RESPONSES,
    CompletionChoice,
    CompletionRequest,
    CompletionResponse,
    dump,
    dump_response,
)
from server.api.sampling import StreamUsage, build_sampling_params, stream_usage
from server.api.structured_outputs import grammar_spec
from server.api.unsupported import refuse_unsupported
from server.api.state import ServerState, get_state
from server.api.streaming import SSEResponse, sse_stream, unless_disconnected
from server.errors import InvalidRequest
from server.request import SamplingParams

router = APIRouter(tags=["openai"])


@dataclass
class _Plan:
    """One completions request, checked and translated for the engine."""

    id: str
    model: str
    prompts: list[Prompt]
    params: SamplingParams
    echo: bool
    logprobs: int | None
    prompt_only: bool  # max_tokens 0 with echo: score the prompt, generate nothing
    usage: StreamUsage
    prompt_logprobs: bool  # vLLM's prompt_logprobs field: return them per choice
    as_ids: bool  # return_tokens_as_token_ids
    token_ids: bool  # return_token_ids

    @property
    def n(self) -> int:
        return self.params.n


def _plan(body: CompletionRequest, state: ServerState, rid: str) -> _Plan:
    model_name = state.model.resolve(body.model)
    refuse_unsupported(body)
    if body.suffix:
        raise InvalidRequest("suffix is not supported.", param="suffix")
    if body.best_of is not None and body.best_of != body.n:
        raise InvalidRequest("best_of is not supported unless it equals n.", param="best_of")
    usage = stream_usage(body)
    if body.stream and body.prompt_logprobs:
        raise InvalidRequest("prompt_logprobs are not available when stream is true.", param="prompt_logprobs")
    echo = bool(body.echo)
    max_tokens = body.max_tokens if "max_tokens" in body.model_fields_set else 16
    prompt_only = echo and max_tokens == 0
    if max_tokens == 0 and not echo:
        raise InvalidRequest("max_tokens must be at least 1 (0 only with echo, to score the prompt).", param="max_tokens")
    prompts = completion_prompts(
        body.prompt, state.model, add_special_tokens=body.add_special_tokens is not False, truncate=body.truncate_prompt_tokens
    )
    wanted_prompt_logprobs = body.prompt_logprobs
    if wanted_prompt_logprobs is None and echo and body.logprobs is not None:
        wanted_prompt_logprobs = body.logprobs
    params = build_sampling_params(
        body,
        state.model,
        max_tokens=1 if prompt_only else max_tokens,
        logprobs=body.logprobs,
        prompt_logprobs=wanted_prompt_logprobs,
        structured=None if prompt_only else grammar_spec(body),
    )
    return _Plan(
        id=f"cmpl-{rid}",
        model=model_name,
        prompts=prompts,
        params=params,
        echo=echo,
        logprobs=body.logprobs,
        prompt_only=prompt_only,
        usage=usage,
        prompt_logprobs=body.prompt_logprobs is not None,
        as_ids=bool(body.return_tokens_as_token_ids),
        token_ids=bool(body.return_token_ids),
    )


@router.post("/v1/completions", response_model=None, responses={200: {"model": CompletionResponse}, **ERROR_RESPONSES})
async def create_completion(body: CompletionRequest, request: Request) -> Response:
    state = get_state(request)
    rid = response_id(body.request_id, request.headers, request_id(request))
    plan = await asyncio.to_thread(_plan, body, state, rid)  # tokenizing: off the event loop
    prompt_ids = [p.token_ids for p in plan.prompts]
    if body.stream:
        generation = await unless_disconnected(request, open_generation(state, rid, prompt_ids, plan.params))
        events = _stream(plan, state, generation)
        return SSEResponse(sse_stream(events, state.metrics.count_failure), on_close=generation.aclose)

    async def complete() -> JSONResponse:
        generation = await open_generation(state, rid, prompt_ids, plan.params)
        try:
            return JSONResponse(await _collect(plan, state, generation))
        finally:
            await generation.aclose()

    return await unless_disconnected(request, complete())


def _echo_text(plan: _Plan, state: ServerState, prompt: Prompt) -> str:
    if prompt.text is not None:
        return prompt.text
    return state.model.tokenizer.decode(prompt.token_ids, skip_special_tokens=plan.params.skip_special_tokens)


def _extras(plan: _Plan, state: ServerState, prompt: Prompt, choice: Choice) -> dict:
    """vLLM's per-choice fields the request asked for: prompt_logprobs and return_token_ids."""
    extras: dict = {}
    if plan.prompt_logprobs:
        entries = choice.prompt_logprobs or [None] * len(prompt.token_ids)
        extras["prompt_logprobs"] = prompt_logprobs(prompt.token_ids, entries, state.tokens)
    if plan.token_ids:
        extras["prompt_token_ids"] = list(prompt.token_ids)
        extras["token_ids"] = [] if plan.prompt_only else list(choice.token_ids)
    return extras


def _prompt_entries(prompt: Prompt, choice: Choice) -> list:
    return list(zip(prompt.token_ids, choice.prompt_logprobs or [None] * len(prompt.token_ids)))


async def _collect(plan: _Plan, state: ServerState, generation: Generation) -> dict:
    choices = [Choice() for _ in range(len(plan.prompts) * plan.n)]
    async for prompt_index, out in generation:
        choices[choice_index(prompt_index, plan.n, out)].add(out)
    out_choices = []
    for k, choice in enumerate(choices):
        prompt = plan.prompts[k // plan.n]
        text = _echo_text(plan, state, prompt) if plan.echo else ""
        entries = _prompt_entries(prompt, choice) if plan.echo else []
        if plan.prompt_only:
            choice.num_output_tokens = 0
        else:
            text += choice.full_text
            entries += choice.logprobs
        logprobs = legacy_logprobs(entries, state.tokens, 0, plan.as_ids)[0] if plan.logprobs is not None else None
        out_choices.append(
            CompletionChoice(
                index=k,
                text=text,
                logprobs=logprobs,
                finish_reason=choice.finish_reason,
                **_extras(plan, state, prompt, choice),
            )
        )
    usage = make_usage([len(p.token_ids) for p in plan.prompts], choices)
    response = CompletionResponse(id=plan.id, created=now(), model=plan.model, choices=out_choices, usage=usage)
    return dump_response(response)


async def _stream(plan: _Plan, state: ServerState, generation: Generation) -> AsyncIterator[dict]:
    created = now()
    choices = [Choice() for _ in range(len(plan.prompts) * plan.n)]
    offsets = [0] * len(choices)
    sent = [False] * len(choices)  # a chunk of the choice went out (return_token_ids: prompt ids on the first)

    def chunk(index: int, text: str, entries: list, finish_reason: str | None, token_ids: list[int]) -> dict:
        logprobs = None
        if plan.logprobs is not None:
            logprobs, offsets[index] = legacy_logprobs(entries, state.tokens, offsets[index], plan.as_ids)
        entry = {"index": index, "text": text, "logprobs": dump(logprobs) if logprobs else None, "finish_reason": finish_reason}
        prompt = plan.prompts[index // plan.n]
        if plan.token_ids:
            if not sent[index]:
                entry["prompt_token_ids"] = list(prompt.token_ids)
            entry["token_ids"] = token_ids
        sent[index] = True
        payload = {"id": plan.id, "object": "text_completion", "created": created, "model": plan.model, "choices": [entry]}
        if plan.usage.final:
            payload["usage"] = continuous_usage(len(prompt.token_ids), choices[index]) if plan.usage.continuous else None
        return payload

    async for prompt_index, out in generation:
        k = choice_index(prompt_index, plan.n, out)
        choice = choices[k]
        first = not choice.started
        choice.started = True
        choice.add(out)
        if plan.prompt_only:
            choice.num_output_tokens = 0
        if first and plan.echo:
            prompt = plan.prompts[prompt_index]
            yield chunk(k, _echo_text(plan, state, prompt), _prompt_entries(prompt, choice), None, [])
        if plan.prompt_only:
            if out.finished:
                yield chunk(k, "", [], out.finish_reason, [])
            continue
        entries = list(zip(out.token_ids, out.logprobs or []))
        if out.text or out.finished or (plan.logprobs is not None and entries) or plan.token_ids:
            yield chunk(k, out.text, entries, out.finish_reason, list(out.token_ids))
    if plan.usage.final:
        usage = make_usage([len(p.token_ids) for p in plan.prompts], choices)
        head = {"id": plan.id, "object": "text_completion", "created": created, "model": plan.model}
        yield {**head, "choices": [], "usage": dump(usage)}
