"""The typed messages that cross the API <-> engine boundary, in either direction."""

from __future__ import annotations

from dataclasses import dataclass

from server.errors import PagedServeError
from server.request import SamplingParams, TokenLogprob


@dataclass(frozen=True)
class GenerateRequest:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    arrival_time: float


@dataclass(frozen=True)
class AbortRequest:
    request_id: str


@dataclass
class RequestOutput:
    """One delta of one choice: what is new since the previous delta of the same choice."""

    request_id: str
    index: int  # the choice, 0 .. n-1
    token_ids: list[int]
    text: str
    logprobs: list[TokenLogprob] | None
    finish_reason: str | None  # "stop" | "length" | "abort"
    stop_reason: int | str | None  # the stop string or stop token id that ended the choice
    num_prompt_tokens: int
    num_cached_tokens: int
    num_output_tokens: int  # cumulative over the choice
    prompt_logprobs: list[TokenLogprob | None] | None = None  # first delta only; entry 0 is None
    error: PagedServeError | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None or self.error is not None
