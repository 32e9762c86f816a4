"""Benchmark workloads with exact token counts: random, ShareGPT-like lengths, shared prefixes.

Prompts are built from a pool of "word" tokens of the model's own tokenizer: tokens that
decode to a single space-led word and encode back to themselves. A run of such words
re-tokenizes to exactly the same ids (the pre-tokenizer splits at each space), so the text form
of a prompt has as many tokens as its id form, and a chat prompt's token count can be set
exactly around the chat template's own tokens. Completions requests send the ids themselves.
"""

from __future__ import annotations

import json
import random
import re
from dataclasses import dataclass, field
from importlib import resources
from typing import Any

from server.bench.target import BenchError

DATASETS = ("random", "sharegpt", "shared-prefix")
_WORD = re.compile(r"^ [A-Za-z]+$")


@dataclass
class BenchRequest:
    """One request of a workload. `prompt_len` is what the server should count as prompt tokens."""

    prompt_ids: list[int]
    prompt_text: str
    prompt_len: int
    output_len: int
    messages: list[dict[str, str]] | None = None  # set for the chat endpoint
    prefix_id: int | None = None  # shared-prefix workload: which prefix


@dataclass
class WorkloadSpec:
    dataset: str = "random"
    num_prompts: int = 64
    input_len: int = 128
    output_len: int = 128
    range_ratio: float = 0.0  # random: lengths uniform in [L(1-r), L(1+r)]
    num_prefixes: int = 4  # shared-prefix
    prefix_len: int = 512
    suffix_len: int = 64
    seed: int = 0
    endpoint: str = "completions"
    extra: dict[str, Any] = field(default_factory=dict)

    def describe(self) -> str:
        if self.dataset == "random":
            return f"random {self.input_len} in / {self.output_len} out"
        if self.dataset == "sharegpt":
            return "ShareGPT-like lengths (mean 202 in / 179 out)"
        return (f"shared prefix: {self.num_prefixes} prefixes of {self.prefix_len} tokens + "
                f"{self.suffix_len}-token suffixes, {self.output_len} out")


def sharegpt_lengths_table() -> dict[str, Any]:
    return json.loads(resources.files("server.bench").joinpath("sharegpt_lengths.json").read_text("utf-8"))


def sharegpt_lengths(num: int, seed: int, max_total: int | None = None) -> list[tuple[int, int]]:
    """(input, output) lengths drawn from the stored log-normal table; the same for a given seed."""
    table = sharegpt_lengths_table()
    rng = random.Random(f"sharegpt:{seed}")

    def draw(p: dict[str, Any]) -> int:
        return int(min(p["max"], max(p["min"], round(rng.lognormvariate(p["mu"], p["sigma"])))))

    pairs = []
    while len(pairs) < num:
        pair = (draw(table["input"]), draw(table["output"]))
        if max_total is None or sum(pair) <= max_total:
            pairs.append(pair)
    return pairs


class PromptBuilder:
    """Builds prompts of an exact token count from the tokenizer's word tokens."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.pool = self._word_pool()
        self._chat_overhead: dict[int, int] = {}

    def _encode(self, text: str) -> list[int]:
        return list(self.tokenizer.encode(text, add_special_tokens=False))

    def _word_pool(self) -> list[int]:
        tok = self.tokenizer
        special = set(tok.all_special_ids or [])
        words, fallback = [], []
        for i in range(len(tok)):
            if i in special:
                continue
            text = tok.decode([i])
            if not text or "\ufffd" in text or self._encode(text) != [i]:
                continue
            (words if _WORD.match(text) else fallback).append(i)
        pool = words if len(words) >= 16 else words + fallback
        if not pool:
            raise BenchError("the tokenizer has no token that round-trips through decode/encode")
        return pool

    def ids(self, rng: random.Random, n: int) -> list[int]:
        """n ids whose decoded text encodes back to exactly these ids."""
        ids = [rng.choice(self.pool) for _ in range(n)]
        for _ in range(10):
            again = self._encode(self.tokenizer.decode(ids))
            if again == ids:
                return ids
            # not stable (a tokenizer whose pre-tokenizer does not split at spaces): re-encode, then cut or pad
            ids = (again + [rng.choice(self.pool) for _ in range(n)])[:n]
        return ids

    def text(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids)

    def chat_len(self, messages: list[dict[str, str]]) -> int:
        text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return len(self._encode(text))

    def chat_messages(self, rng: random.Random, total_len: int) -> tuple[list[dict[str, str]], list[int]]:
        """One user message whose templated prompt has exactly `total_len` tokens (at least the template's own)."""
        probe = self.chat_len([{"role": "user", "content": self.text([self.pool[0]])}]) - 1
        n = max(1, total_len - probe)
        ids = self.ids(rng, n)
        for _ in range(4):
            messages = [{"role": "user", "content": self.text(ids)}]
            diff = total_len - self.chat_len(messages)
            if diff == 0 or (diff < 0 and len(ids) == 1):
                break
            ids = ids[:diff] if diff < 0 else ids + self.ids(rng, diff)
        return messages, ids


def build_workload(spec: WorkloadSpec, tokenizer, max_model_len: int | None = None) -> list[BenchRequest]:
    """The requests of a workload, in send order; the same for the same spec and tokenizer."""
    if spec.dataset not in DATASETS:
        raise ValueError(f"unknown dataset {spec.dataset!r}; choose one of {', '.join(DATASETS)}")
    builder = PromptBuilder(tokenizer)
    rng = random.Random(f"{spec.dataset}:{spec.seed}")
    chat = spec.endpoint == "chat"
    requests: list[BenchRequest] = []

    if spec.dataset == "shared-prefix":
        prefixes = [builder.ids(rng, spec.prefix_len) for _ in range(spec.num_prefixes)]
        order = [i % spec.num_prefixes for i in range(spec.num_prompts)]
        rng.shuffle(order)
        for p in order:
            if chat:
                # the shared prefix is the system message; the user message has suffix_len tokens
                messages = [{"role": "system", "content": builder.text(prefixes[p])},
                            {"role": "user", "content": builder.text(builder.ids(rng, spec.suffix_len))}]
                requests.append(BenchRequest([], "", builder.chat_len(messages), spec.output_len, messages, p))
            else:
                ids = prefixes[p] + builder.ids(rng, spec.suffix_len)
                requests.append(BenchRequest(ids, builder.text(ids), len(ids), spec.output_len, None, p))
        return requests

    if spec.dataset == "sharegpt":
        lengths = sharegpt_lengths(spec.num_prompts, spec.seed, max_model_len)
    else:
        lo_i, hi_i = _span(spec.input_len, spec.range_ratio)
        lo_o, hi_o = _span(spec.output_len, spec.range_ratio)
        lengths = [(rng.randint(lo_i, hi_i), rng.randint(lo_o, hi_o)) for _ in range(spec.num_prompts)]
    for in_len, out_len in lengths:
        if chat:
            messages, _ = builder.chat_messages(rng, in_len)
            requests.append(BenchRequest([], "", builder.chat_len(messages), out_len, messages))
        else:
            ids = builder.ids(rng, in_len)
            requests.append(BenchRequest(ids, builder.text(ids), len(ids), out_len))
    return requests


def _span(length: int, ratio: float) -> tuple[int, int]:
    if not 0 <= ratio < 1:
        raise BenchError(f"--random-range-ratio must be in [0, 1), got {ratio}")
    return max(1, int(length * (1 - ratio))), max(1, int(length * (1 + ratio)))
