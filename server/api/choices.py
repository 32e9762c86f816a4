"""What both endpoints keep per choice while deltas arrive, the usage they report, and the id and
time a response carries."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from server.api.protocol import Usage
from server.engine.messages import RequestOutput
from server.request import TokenLogprob


@dataclass
class Choice:
    """One choice (one prompt x one of its n samples), accumulated from its deltas."""

    text: list[str] = field(default_factory=list)
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[tuple[int, TokenLogprob]] = field(default_factory=list)
    prompt_logprobs: list[TokenLogprob | None] | None = None
    finish_reason: str | None = None
    num_output_tokens: int = 0
    started: bool = False  # its first delta arrived (streams send the role / echo chunk then)

    def add(self, out: RequestOutput) -> None:
        self.text.append(out.text)
        self.token_ids.extend(out.token_ids)
        if out.logprobs:
            self.logprobs.extend(zip(out.token_ids, out.logprobs))
        if out.prompt_logprobs is not None:
            self.prompt_logprobs = out.prompt_logprobs
        self.num_output_tokens = out.num_output_tokens
        if out.finish_reason is not None:
            self.finish_reason = out.finish_reason

    @property
    def full_text(self) -> str:
        return "".join(self.text)


def choice_index(prompt_index: int, n: int, out: RequestOutput) -> int:
    """Choices of prompt i are numbered i*n .. i*n + n-1, as OpenAI numbers them."""
    return prompt_index * n + out.index


def make_usage(num_prompt_tokens: list[int], choices: list[Choice]) -> Usage:
    prompt = sum(num_prompt_tokens)
    completion = sum(c.num_output_tokens for c in choices)
    return Usage(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion)


def continuous_usage(num_prompt_tokens: int, choice: Choice) -> dict:
    """vLLM's continuous_usage_stats on a chunk of one choice: its prompt and its tokens so far."""
    return Usage(
        prompt_tokens=num_prompt_tokens,
        completion_tokens=choice.num_output_tokens,
        total_tokens=num_prompt_tokens + choice.num_output_tokens,
    ).model_dump()


def response_id(body_request_id: str | None, headers, header_id: str) -> str:
    """The id a response and its engine requests are named after, with vLLM's precedence: the
    X-Request-Id header, else the body's request_id, else the id the server made up."""
    if body_request_id is not None and "x-request-id" not in headers:
        return body_request_id
    return header_id


def now() -> int:
    """`created` of a response: Unix seconds."""
    return int(time.time())
