"""The typed messages that cross the API <-> engine boundary, in either direction."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from server.errors import PagedServeError
from server.metrics import StepStats
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

    @classmethod
    def failure(cls, request_id: str, error: PagedServeError) -> RequestOutput:
        """The one delta that ends a request with `error` (refused at admission, or the engine failed)."""
        return cls(
            request_id=request_id, index=0, token_ids=[], text="", logprobs=None, finish_reason=None,
            stop_reason=None, num_prompt_tokens=0, num_cached_tokens=0, num_output_tokens=0, error=error,
        )


@dataclass(frozen=True)
class EngineInfo:
    """What the API may know of the engine and its model, sent once when the engine is up.

    The API reads the engine through this message only, never its internals, so the engine can run
    in this process or in another one (the tokenizer pickles)."""

    model: str  # as given: a Hub id, a directory, or the built-in demo model's name
    model_path: str  # the resolved local directory
    served_model_names: tuple[str, ...]
    tokenizer: Any  # the transformers tokenizer, with its chat template
    max_model_len: int
    vocab_size: int
    eos_token_ids: tuple[int, ...]
    sampling_defaults: dict[str, Any]
    max_num_seqs: int
    max_queued_requests: int | None
    device: str  # cpu, cuda
    dtype: str  # of the weights and the KV cache: float32, bfloat16, float16
    block_size: int
    num_blocks: int
    prefix_caching: bool
    startup_phases: dict[str, float] = field(default_factory=dict)  # seconds per start-up phase that ran


# ---- between the API process and the engine core's own process (server/engine/process.py) ----------


@dataclass(frozen=True)
class ShutdownEngine:
    """Parent -> engine process: stop after this step and exit."""


@dataclass(frozen=True)
class EngineStep:
    """Engine process -> parent, once per step: every delta of the step, and its stats (when it went idle:
    a snapshot with no outputs, so that the gauges drop to 0)."""

    outputs: list[RequestOutput]
    stats: StepStats


@dataclass(frozen=True)
class EngineStartFailed:
    """Engine process -> parent, instead of EngineInfo: the engine could not start. `user_error`: a bad flag,
    model or checkpoint (a one-line error, exit code 2), else a failure whose traceback the engine logged."""

    message: str
    user_error: bool


@dataclass(frozen=True)
class EngineError:
    """Engine process -> parent: the loop died on this error; the process exits right after."""

    reason: str
