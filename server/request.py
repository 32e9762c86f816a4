"""Per-request state and sampling parameters: plain data read by the engine, scheduler and runner."""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from server.errors import InvalidRequest
from server.structured.spec import GrammarSpec

if TYPE_CHECKING:
    from server.structured.matcher import GrammarState


@dataclass
class SamplingParams:
    """How to pick tokens and when to stop; field names and defaults follow vLLM's."""

    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 or -1: off
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    include_stop_str_in_output: bool = False
    ignore_eos: bool = False
    max_tokens: int | None = 16  # None: up to max_model_len
    min_tokens: int = 0
    logprobs: int | None = None  # top-N logprobs per generated token (0: the sampled token's only)
    prompt_logprobs: int | None = None
    logit_bias: dict[int, float] = field(default_factory=dict)
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True  # False: no space between two added tokens in the text
    allowed_token_ids: list[int] | None = None  # sample only among these
    bad_words_token_ids: list[list[int]] = field(default_factory=list)  # the API tokenizes `bad_words`
    structured: GrammarSpec | None = None  # structured outputs: the grammar the output must follow
    # Not sampling, but per request and read below the API: the scheduler and the prefix cache.
    priority: int = 0  # lower runs first (only with --scheduling-policy priority)
    cache_salt: str | None = None  # isolates this request's prefix-cache entries

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop or [])
        self.stop_token_ids = list(self.stop_token_ids or [])
        self.logit_bias = {int(k): float(v) for k, v in (self.logit_bias or {}).items()}
        if self.allowed_token_ids is not None:
            self.allowed_token_ids = list(self.allowed_token_ids)
        self.bad_words_token_ids = [list(word) for word in self.bad_words_token_ids or []]
        if self.top_k == -1:
            self.top_k = 0
        self.validate()

    def validate(self) -> None:
        def bad(param: str, message: str) -> InvalidRequest:
            return InvalidRequest(message, param=param)

        if self.n < 1:
            raise bad("n", f"n must be at least 1, got {self.n}.")
        if self.temperature < 0:
            raise bad("temperature", f"temperature must be >= 0, got {self.temperature}.")
        if not 0 < self.top_p <= 1:
            raise bad("top_p", f"top_p must be in (0, 1], got {self.top_p}.")
        if self.top_k < 0:
            raise bad("top_k", f"top_k must be -1 (off), 0 (off) or positive, got {self.top_k}.")
        if not 0 <= self.min_p <= 1:
            raise bad("min_p", f"min_p must be in [0, 1], got {self.min_p}.")
        if self.repetition_penalty <= 0:
            raise bad("repetition_penalty", f"repetition_penalty must be > 0, got {self.repetition_penalty}.")
        for name in ("frequency_penalty", "presence_penalty"):
            value = getattr(self, name)
            if not -2 <= value <= 2:
                raise bad(name, f"{name} must be in [-2, 2], got {value}.")
        if self.max_tokens is not None and self.max_tokens < 1:
            raise bad("max_tokens", f"max_tokens must be at least 1, got {self.max_tokens}.")
        if self.min_tokens < 0:
            raise bad("min_tokens", f"min_tokens must be >= 0, got {self.min_tokens}.")
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise bad("min_tokens", f"min_tokens ({self.min_tokens}) must not exceed max_tokens ({self.max_tokens}).")
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            if value is not None and value < 0:
                raise bad(name, f"{name} must be >= 0, got {value}.")
        if any(not s for s in self.stop):
            raise bad("stop", "stop strings must not be empty.")
        for token, bias in self.logit_bias.items():
            if not -100 <= bias <= 100:
                raise bad("logit_bias", f"logit_bias values must be in [-100, 100], got {bias} for token {token}.")
        if self.allowed_token_ids is not None and not self.allowed_token_ids:
            raise bad("allowed_token_ids", "allowed_token_ids must not be empty: leave it out to allow every token.")
        if any(not word for word in self.bad_words_token_ids):
            raise bad("bad_words", "bad_words must not be empty strings.")
        if self.cache_salt is not None and not self.cache_salt:
            raise bad("cache_salt", "cache_salt must be a non-empty string if provided.")


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    PREEMPTED = "preempted"
    FINISHED_STOPPED = "stop"
    FINISHED_LENGTH = "length"
    FINISHED_ABORTED = "abort"

    @property
    def finished(self) -> bool:
        return self in (RequestStatus.FINISHED_STOPPED, RequestStatus.FINISHED_LENGTH, RequestStatus.FINISHED_ABORTED)


class Request:
    """One sequence being served. The scheduler owns its blocks and counters; the runner reads them."""

    def __init__(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        params: SamplingParams,
        eos_token_ids: tuple[int, ...] = (),
        arrival_time: float | None = None,
    ):
        self.request_id = request_id
        self.prompt_token_ids = list(prompt_token_ids)
        self.params = params
        self.eos_token_ids = frozenset(eos_token_ids)
        self.arrival_time = time.monotonic() if arrival_time is None else arrival_time
        self.all_token_ids: list[int] = list(prompt_token_ids)
        self.num_prompt_tokens = len(prompt_token_ids)
        self.num_computed_tokens = 0
        self.num_cached_tokens = 0  # prompt tokens served from the prefix cache at first schedule
        self.block_ids: list[int] = []
        self.block_hashes: list[int] = []  # chained hashes of this request's full blocks
        self.status = RequestStatus.WAITING
        self.num_preemptions = 0
        self.max_tokens: int = params.max_tokens or 0  # resolved against max_model_len at admission
        self.stop_reason: int | str | None = None
        self.grammar: GrammarState | None = None  # the matcher of `params.structured`, set once compiled

    @property
    def output_token_ids(self) -> list[int]:
        return self.all_token_ids[self.num_prompt_tokens :]

    @property
    def num_output_tokens(self) -> int:
        return len(self.all_token_ids) - self.num_prompt_tokens

    @property
    def num_tokens(self) -> int:
        return len(self.all_token_ids)

    @property
    def finish_reason(self) -> str | None:
        return self.status.value if self.status.finished else None

    def __repr__(self) -> str:
        return (
            f"Request({self.request_id!r}, status={self.status.name}, tokens={self.num_tokens}, "
            f"computed={self.num_computed_tokens}, blocks={len(self.block_ids)})"
        )


@dataclass
class TokenLogprob:
    """The log-probability of one chosen token, its rank in the distribution, and the top alternatives."""

    token_id: int
    logprob: float
    rank: int
    top: list[tuple[int, float]] = field(default_factory=list)
