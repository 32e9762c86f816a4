"""Greedy output equals transformers' own generate, token for token, for every architecture, with
prefix caching, chunked prefill and preemption in play, all at once and with staggered arrivals."""

from __future__ import annotations

import random

import pytest
import torch
from transformers import AutoModelForCausalLM

from server import LLM, SamplingParams
from server.demo import TINY_CONFIGS, make_tiny_model
from server.engine.messages import GenerateRequest

MAX_NEW = 20


def _prompts(vocab_size: int, seed: int = 0) -> list[list[int]]:
    """18 prompts of mixed lengths; several share a long prefix (full blocks hit the prefix cache)."""
    rng = random.Random(seed)
    low = 3  # skip the special tokens at ids 0..2

    def tokens(n: int) -> list[int]:
        return [rng.randrange(low, vocab_size) for _ in range(n)]

    shared_a, shared_b = tokens(45), tokens(33)
    prompts = [tokens(n) for n in (1, 2, 5, 9, 16, 17, 31, 64, 90, 120)]
    prompts += [shared_a + tokens(n) for n in (1, 7, 20)] + [shared_a]
    prompts += [shared_b + tokens(n) for n in (4, 15)] + [shared_b, shared_b + tokens(60)]
    return prompts


def _reference(path, prompts: list[list[int]], max_new: int = MAX_NEW) -> list[list[int]]:
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    model.eval()
    outputs = []
    with torch.inference_mode():
        for prompt in prompts:
            ids = torch.tensor([prompt])
            out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=max_new,
                                 temperature=None, top_p=None, top_k=None)
            outputs.append(out[0, len(prompt):].tolist())
    return outputs


@pytest.fixture(scope="module", params=sorted(TINY_CONFIGS))
def arch_case(request, tmp_path_factory):
    path = make_tiny_model(tmp_path_factory.mktemp(request.param), request.param)
    llm = LLM(
        str(path),
        dtype="float32",
        max_model_len=256,
        block_size=4,
        num_gpu_blocks_override=56,  # 224 tokens of KV for ~1400 tokens of work: forces preemption
        max_num_batched_tokens=48,  # forces chunked prefill of the longer prompts
        max_num_seqs=16,
    )
    prompts = _prompts(llm.engine.hf_config.vocab_size)
    return request.param, llm, prompts, _reference(path, prompts)


def assert_greedy_parity(name: str, llm: LLM, prompts: list[list[int]], expected: list[list[int]]) -> None:
    """All prompts at once: every greedy output equals `expected`, a preemption and a prefix-cache hit
    happened on the way, and every KV block is free at the end."""
    engine = llm.engine
    preemptions_before, hits_before = engine.scheduler.num_preemptions_total, engine.block_pool.prefix_hits
    max_new = max(len(want) for want in expected)
    results = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=max_new), use_tqdm=False)
    for i, (result, want) in enumerate(zip(results, expected)):
        assert result.outputs[0].token_ids == want, f"{name}: prompt {i} (len {len(prompts[i])}) differs"
    assert engine.scheduler.num_preemptions_total > preemptions_before, "the KV cache was meant to force preemption"
    assert engine.block_pool.prefix_hits > hits_before, "shared prefixes were meant to hit the prefix cache"
    assert engine.block_pool.usage == 0.0


def test_greedy_parity_all_at_once(arch_case):
    name, llm, prompts, expected = arch_case
    assert_greedy_parity(name, llm, prompts, expected)


def test_greedy_parity_staggered_arrivals(arch_case):
    """Requests arrive one by one while the others decode."""
    name, llm, prompts, expected = arch_case
    engine = llm.engine
    params = SamplingParams(temperature=0, max_tokens=MAX_NEW)
    got: dict[str, list[int]] = {}
    pending = list(enumerate(prompts))
    finished = 0
    while finished < len(prompts):
        if pending:
            i, prompt = pending.pop(0)
            engine.add_request(GenerateRequest(f"s{i}", prompt, params, 0.0))
        for _ in range(2):
            outputs, _ = engine.step()
            for out in outputs:
                got.setdefault(out.request_id, []).extend(out.token_ids)
                finished += out.finished
    for i, want in enumerate(expected):
        assert got[f"s{i}"] == want, f"{name}: staggered prompt {i} differs"
    assert engine.block_pool.usage == 0.0
