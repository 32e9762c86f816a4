"""The offline API, shaped like vLLM's: `LLM(model, **engine_args).generate(prompts, SamplingParams(...))`."""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass, field

from tqdm.auto import tqdm

from server.config import EngineArgs
from server.engine.core import EngineCore
from server.engine.messages import GenerateRequest, RequestOutput
from server.errors import InvalidRequest
from server.request import SamplingParams, TokenLogprob


@dataclass
class Logprob:
    logprob: float
    rank: int
    decoded_token: str | None = None


@dataclass
class CompletionOutput:
    index: int
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[dict[int, Logprob]] | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None

    @property
    def cumulative_logprob(self) -> float | None:
        if self.logprobs is None:
            return None
        return sum(entry[token].logprob for entry, token in zip(self.logprobs, self.token_ids))


@dataclass
class GenerationResult:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    prompt_logprobs: list[dict[int, Logprob] | None] | None = None
    num_cached_tokens: int = 0

    @property
    def finished(self) -> bool:
        return all(o.finish_reason is not None for o in self.outputs)


class LLM:
    """Runs the engine in this process, synchronously, over a list of prompts."""

    def __init__(self, model: str | None = None, **engine_args):
        self.engine = EngineCore(EngineArgs.from_kwargs(model, **engine_args))
        self._ids = itertools.count()

    def get_tokenizer(self):
        return self.engine.tokenizer

    def get_default_sampling_params(self) -> SamplingParams:
        return SamplingParams(**self.engine.sampling_defaults)

    def generate(self, prompts, sampling_params=None, use_tqdm: bool = True) -> list[GenerationResult]:
        """`prompts`: a string, a list of strings, a list of token ids, or a list of token-id lists."""
        token_lists, texts = self._normalize(prompts)
        params = self._params_per_prompt(sampling_params, len(token_lists))
        return self._run(token_lists, texts, params, use_tqdm)

    def chat(self, messages, sampling_params=None, use_tqdm: bool = True, add_generation_prompt: bool = True,
             continue_final_message: bool = False, chat_template_kwargs: dict | None = None) -> list[GenerationResult]:
        """`messages`: one conversation (a list of {role, content}) or a list of conversations."""
        conversations = [messages] if messages and isinstance(messages[0], dict) else list(messages)
        token_lists = [
            list(self.engine.tokenizer.apply_chat_template(
                conversation,
                add_generation_prompt=add_generation_prompt and not continue_final_message,
                continue_final_message=continue_final_message,
                tokenize=True,
                return_dict=False,
                **(chat_template_kwargs or {}),
            ))
            for conversation in conversations
        ]
        texts = [None] * len(token_lists)
        params = self._params_per_prompt(sampling_params, len(token_lists))
        return self._run(token_lists, texts, params, use_tqdm)

    # ---- internals ------------------------------------------------------------------------

    def _normalize(self, prompts) -> tuple[list[list[int]], list[str | None]]:
        if isinstance(prompts, str) or (isinstance(prompts, list) and prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        token_lists, texts = [], []
        for prompt in prompts:
            if isinstance(prompt, dict):
                prompt = prompt.get("prompt_token_ids", prompt.get("prompt"))
            if isinstance(prompt, str):
                token_lists.append(self.engine.tokenizer.encode(prompt))
                texts.append(prompt)
            elif isinstance(prompt, (list, tuple)) and all(isinstance(t, int) for t in prompt):
                token_lists.append(list(prompt))
                texts.append(None)
            else:
                raise InvalidRequest("Each prompt must be a string or a list of token ids.", param="prompt")
        return token_lists, texts

    def _params_per_prompt(self, sampling_params, count: int) -> list[SamplingParams]:
        if sampling_params is None:
            return [self.get_default_sampling_params()] * count
        if isinstance(sampling_params, SamplingParams):
            return [sampling_params] * count
        if len(sampling_params) != count:
            raise InvalidRequest(f"Got {len(sampling_params)} SamplingParams for {count} prompts.")
        return list(sampling_params)

    def _run(self, token_lists, texts, params, use_tqdm) -> list[GenerationResult]:
        results: dict[str, GenerationResult] = {}
        order = []
        for tokens, text, p in zip(token_lists, texts, params):
            request_id = str(next(self._ids))
            self.engine.add_request(GenerateRequest(request_id, tokens, p, time.monotonic()))
            results[request_id] = GenerationResult(request_id, text, tokens, [CompletionOutput(i) for i in range(p.n)])
            order.append(request_id)
        remaining = sum(p.n for p in params)
        with tqdm(total=remaining, desc="Generating", disable=not use_tqdm, unit="seq") as bar:
            while remaining:
                outputs, _ = self.engine.step()
                for out in outputs:
                    self._merge(results[out.request_id], out)
                    if out.finished:
                        remaining -= 1
                        bar.update(1)
        return [results[r] for r in order]

    def _merge(self, result: GenerationResult, out: RequestOutput) -> None:
        choice = result.outputs[out.index]
        choice.text += out.text
        choice.token_ids.extend(out.token_ids)
        if out.logprobs is not None:
            choice.logprobs = (choice.logprobs or []) + [self._logprob_dict(lp) for lp in out.logprobs]
        if out.prompt_logprobs is not None:
            result.prompt_logprobs = [self._logprob_dict(lp) if lp else None for lp in out.prompt_logprobs]
        result.num_cached_tokens = out.num_cached_tokens
        choice.finish_reason = out.finish_reason
        choice.stop_reason = out.stop_reason

    def _logprob_dict(self, lp: TokenLogprob) -> dict[int, Logprob]:
        decode = self.engine.tokenizer.decode
        entry = {lp.token_id: Logprob(lp.logprob, lp.rank, decode([lp.token_id]))}
        for rank, (token, value) in enumerate(lp.top, start=1):
            entry.setdefault(token, Logprob(value, rank, decode([token])))
        return entry
