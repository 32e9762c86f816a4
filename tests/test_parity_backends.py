"""Greedy parity with transformers for every attention backend (`--attention-backend`), with
preemption, prefix-cache hits, chunked prefill, GQA and a sliding window in play.

The default backend of this machine (cpu where a C compiler is found) runs the full matrix in test_parity.py; here the others run a
smaller one. On CPU the Triton kernels run under Triton's interpreter (see conftest.py), which is
slow, hence the few prompts and tokens.
"""

from __future__ import annotations

import pytest
from test_parity import _prompts, _reference, assert_greedy_parity

from server import LLM
from server.demo import make_tiny_model

MAX_NEW = 8
# 1 token, mid-block lengths, two prompts sharing a 45-token prefix, two sharing 33 tokens
PICK = (0, 5, 7, 11, 13, 15, 17)


@pytest.fixture(scope="module", params=["mistral-swa", "qwen3-gqa"])
def arch(request, tmp_path_factory):
    path = make_tiny_model(tmp_path_factory.mktemp(request.param), request.param)
    return request.param, path


@pytest.mark.parametrize("backend", ["reference", "batched", "triton"])
def test_greedy_parity_with_every_attention_backend(arch, backend):
    if backend == "triton":
        pytest.importorskip("triton", reason="triton is a test dependency: pip install -e '.[test]'")
    name, path = arch
    llm = LLM(
        str(path),
        dtype="float32",
        max_model_len=256,
        block_size=16,
        num_gpu_blocks_override=16,  # 256 tokens of KV for ~400 tokens of work: forces preemption
        max_num_batched_tokens=48,  # chunked prefill of the longer prompts
        max_num_seqs=8,
        attention_backend=backend,
    )
    assert llm.engine.runner.model.model.layers[0].self_attn.attn.ops.backend == backend
    everything = _prompts(llm.engine.hf_config.vocab_size)
    prompts = [everything[i] for i in PICK]
    expected = _reference(path, prompts, MAX_NEW)
    assert_greedy_parity(f"{name}/{backend}", llm, prompts, expected)
