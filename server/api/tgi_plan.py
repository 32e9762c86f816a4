"""A TGI request, checked and translated for the engine: TGI's parameter rules with TGI's messages,
and its decoding choice (greedy unless TGI would sample). See tgi.py for the semantics."""

from __future__ import annotations

import secrets
from dataclasses import dataclass

from server.api.state import ServerState
from server.api.structured_outputs import tgi_grammar_spec
from server.api.tgi_protocol import GenerateParameters, GenerateRequest
from server.errors import ContextTooLong, InvalidRequest
from server.request import SamplingParams

MAX_STOP_SEQUENCES = 4  # TGI's default --max-stop-sequences
MAX_TOP_N_TOKENS = 5  # TGI's default --max-top-n-tokens


@dataclass
class Plan:
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


def plan_request(body: GenerateRequest, state: ServerState, stream: bool) -> Plan:
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
        structured=tgi_grammar_spec(p.grammar),
    )
    return Plan(
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
