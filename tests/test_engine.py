"""The engine through the offline API on the demo model: seeds, stops, n, logprobs, errors, aborts."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import AutoModelForCausalLM

from server import LLM, SamplingParams
from server.demo import ensure_demo_model
from server.engine.messages import GenerateRequest
from server.errors import ConfigError, ContextTooLong, InvalidRequest


@pytest.fixture(scope="module")
def llm():
    return LLM(str(ensure_demo_model()), dtype="float32", max_model_len=256, kv_cache_memory=0.05, max_num_batched_tokens=128)


def _prompts(llm, count):
    tok = llm.get_tokenizer()
    return [tok.encode(f"Story number {i}: once upon a time") for i in range(count)]


def test_seed_reproduces_alone_and_inside_a_busy_batch(llm):
    seeded = SamplingParams(temperature=1.0, top_p=0.95, seed=42, max_tokens=12)
    [prompt] = _prompts(llm, 1)
    alone = llm.generate([prompt], seeded, use_tqdm=False)[0].outputs[0].token_ids
    again = llm.generate([prompt], seeded, use_tqdm=False)[0].outputs[0].token_ids
    busy_params = [SamplingParams(temperature=1.0, max_tokens=12)] * 6 + [seeded]
    busy = llm.generate(_prompts(llm, 6) + [prompt], busy_params, use_tqdm=False)[-1].outputs[0].token_ids
    assert alone == again == busy
    other = llm.generate([prompt], SamplingParams(temperature=1.0, seed=7, max_tokens=12), use_tqdm=False)
    assert other[0].outputs[0].token_ids != alone


def test_n_choices_greedy_are_identical_and_seeded_differ(llm):
    [prompt] = _prompts(llm, 1)
    greedy = llm.generate([prompt], SamplingParams(n=3, temperature=0, max_tokens=8), use_tqdm=False)[0]
    assert len(greedy.outputs) == 3 and len({tuple(o.token_ids) for o in greedy.outputs}) == 1
    sampled = llm.generate([prompt], SamplingParams(n=3, temperature=1.0, seed=1, max_tokens=8), use_tqdm=False)[0]
    assert len({tuple(o.token_ids) for o in sampled.outputs}) > 1


def test_max_tokens_and_stop_strings(llm):
    [prompt] = _prompts(llm, 1)
    full = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=24), use_tqdm=False)[0].outputs[0]
    assert full.finish_reason == "length" and len(full.token_ids) == 24
    stop = full.text[5:8]
    cut = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=24, stop=[stop]), use_tqdm=False)[0].outputs[0]
    assert cut.finish_reason == "stop" and cut.stop_reason == stop
    assert cut.text == full.text[: full.text.index(stop)]
    kept = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=24, stop=[stop], include_stop_str_in_output=True), use_tqdm=False)
    assert kept[0].outputs[0].text == full.text[: full.text.index(stop) + len(stop)]
    held = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=24, min_tokens=24, stop=[stop]), use_tqdm=False)
    assert held[0].outputs[0].text == full.text and held[0].outputs[0].finish_reason == "length"


def test_stop_token_ids_and_min_tokens(llm):
    [prompt] = _prompts(llm, 1)
    full = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=10), use_tqdm=False)[0].outputs[0]
    third = full.token_ids[2]
    stopped = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=10, stop_token_ids=[third]), use_tqdm=False)[0].outputs[0]
    assert stopped.token_ids == full.token_ids[:3] and stopped.stop_reason == third
    held = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=10, min_tokens=10, stop_token_ids=[third]), use_tqdm=False)
    assert len(held[0].outputs[0].token_ids) == 10


def test_logprobs_and_prompt_logprobs_match_transformers(llm):
    [prompt] = _prompts(llm, 1)
    params = SamplingParams(temperature=0, max_tokens=4, logprobs=3, prompt_logprobs=2)
    result = llm.generate([prompt], params, use_tqdm=False)[0]
    model = AutoModelForCausalLM.from_pretrained(ensure_demo_model(), dtype=torch.float32)
    ids = torch.tensor([prompt + result.outputs[0].token_ids])
    with torch.inference_mode():
        ref = torch.log_softmax(model(ids).logits[0].float(), dim=-1)
    assert result.prompt_logprobs[0] is None and len(result.prompt_logprobs) == len(prompt)
    for pos in range(1, len(prompt)):
        entry = result.prompt_logprobs[pos]
        assert entry[prompt[pos]].logprob == pytest.approx(ref[pos - 1, prompt[pos]].item(), abs=1e-4)
        assert len(entry) >= 2
    for step, token in enumerate(result.outputs[0].token_ids):
        entry = result.outputs[0].logprobs[step]
        assert entry[token].logprob == pytest.approx(ref[len(prompt) + step - 1, token].item(), abs=1e-4)
        assert entry[token].rank == 1  # greedy picks the top token
        assert 3 <= len(entry) <= 4
    assert math.isfinite(result.outputs[0].cumulative_logprob)


@pytest.mark.parametrize(
    "make, error, words",
    [
        (lambda: SamplingParams(max_tokens=0), InvalidRequest, "max_tokens"),
        (lambda: SamplingParams(temperature=-0.5), InvalidRequest, "temperature"),
        (lambda: SamplingParams(top_p=0.0), InvalidRequest, "top_p"),
        (lambda: SamplingParams(top_p=1.5), InvalidRequest, "top_p"),
    ],
)
def test_bad_sampling_params(make, error, words):
    with pytest.raises(error, match=words):
        make()


def test_bad_prompts_are_refused_without_leaking(llm):
    engine = llm.engine
    with pytest.raises(InvalidRequest, match="empty"):
        engine.add_request(GenerateRequest("e", [], SamplingParams(), 0.0))
    with pytest.raises(ContextTooLong, match="256"):
        engine.add_request(GenerateRequest("long", [5] * 300, SamplingParams(), 0.0))
    with pytest.raises(ContextTooLong):
        engine.add_request(GenerateRequest("long2", [5] * 200, SamplingParams(max_tokens=100), 0.0))
    with pytest.raises(InvalidRequest, match="out of range"):
        engine.add_request(GenerateRequest("oov", [10**9], SamplingParams(), 0.0))
    assert not engine.has_unfinished() and engine.block_pool.usage == 0.0


def test_abort_frees_blocks_at_once(llm):
    engine = llm.engine
    for i, prompt in enumerate(_prompts(llm, 4)):
        engine.add_request(GenerateRequest(f"a{i}", prompt, SamplingParams(temperature=0, max_tokens=50), 0.0))
    engine.step()
    engine.step()
    assert engine.block_pool.usage > 0
    for i in range(4):
        engine.abort(f"a{i}")
    assert engine.block_pool.usage == 0.0 and not engine.has_unfinished()


def test_start_up_errors_are_clear(tmp_path):
    with pytest.raises(ConfigError, match="dtype"):
        LLM(str(ensure_demo_model()), dtype="float64")
    with pytest.raises(ConfigError):
        LLM(str(tmp_path / "missing"))
    with pytest.raises(ConfigError, match="Unknown engine argument"):
        LLM(str(ensure_demo_model()), not_a_flag=1)


def test_a_kv_cache_larger_than_memory_is_refused_clearly():
    with pytest.raises(ConfigError, match="kv-cache-memory"):
        LLM(str(ensure_demo_model()), dtype="float32", max_model_len=256, kv_cache_memory=4096)
