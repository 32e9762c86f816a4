"""Engine deltas -> TGI's answers: the /generate body (generated_text and details) and the
/generate_stream events (one per token, the last with generated_text), with TGI's token shape."""

from __future__ import annotations

from collections.abc import AsyncIterator

from server.api.generation import Generation
from server.api.state import ServerState
from server.api.tgi_plan import Plan
from server.engine.messages import RequestOutput
from server.request import TokenLogprob

_LOGPROB_FLOOR = -9999.0  # -inf does not fit in JSON


def _logprob(value: float) -> float:
    return max(_LOGPROB_FLOOR, value)


def _token(plan: Plan, token_id: int, text: str, logprob: float | None) -> dict:
    logprob = None if logprob is None else _logprob(logprob)
    return {"id": token_id, "text": text, "logprob": logprob, "special": token_id in plan.special_ids}


def _tokens(plan: Plan, state: ServerState, out: RequestOutput) -> list[tuple[dict, list[dict]]]:
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


def _prefill(plan: Plan, state: ServerState, prompt_logprobs: list[TokenLogprob | None] | None) -> list[dict]:
    if not plan.prefill:
        return []
    entries = prompt_logprobs or [None] * len(plan.prompt_ids)
    return [
        {"id": token_id, "text": state.tokens.text(token_id), "logprob": None if lp is None else _logprob(lp.logprob)}
        for token_id, lp in zip(plan.prompt_ids, entries)
    ]


async def collect(plan: Plan, state: ServerState, generation: Generation) -> dict:
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


async def stream_events(plan: Plan, state: ServerState, generation: Generation) -> AsyncIterator[dict]:
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
