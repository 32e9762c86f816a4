"""Every fast kernel against its plain-torch reference twin."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from kernel_cases import random_step
from kernels import batched, cpu_linear, reference
from kernels.ops import get_ops

CASES = [
    [(1, 5), (1, 33), (1, 1), (1, 64)],  # decode only, ragged contexts
    [(7, 7), (1, 20), (3, 40), (1, 9), (16, 16)],  # mixed prefill chunks and decodes
    [(40, 40)],  # one fresh prefill
    [(5, 50), (1, 17)],  # a later chunk over cached context
]


@pytest.mark.parametrize("lens", CASES)
@pytest.mark.parametrize("heads", [(4, 4), (8, 2)])
@pytest.mark.parametrize("window", [None, 6])
@pytest.mark.parametrize("block_size", [4, 16])
@pytest.mark.parametrize("softcap", [None, 1.5])
def test_batched_paged_attention_matches_reference(lens, heads, window, block_size, softcap):
    num_q, num_kv = heads
    head_dim = 16
    meta = random_step(0, block_size, 64, lens)
    gen = torch.Generator().manual_seed(1)
    k_cache = torch.randn(64, block_size, num_kv, head_dim, generator=gen)
    v_cache = torch.randn(64, block_size, num_kv, head_dim, generator=gen)
    q = torch.randn(sum(q for q, _ in lens), num_q, head_dim, generator=gen)
    want = reference.paged_attention(q, k_cache, v_cache, meta, 0.25, window, softcap)
    got = batched.paged_attention(q, k_cache, v_cache, meta, 0.25, window, softcap)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("window", [None, 5])
@pytest.mark.parametrize("softcap", [None, 2.0])
def test_reference_paged_attention_matches_transformers_eager_attention(window, softcap):
    """Scale, soft-capping, sliding window and GQA as transformers' Gemma 2 eager attention computes them,
    each sequence over its whole context (its queries at the end of it)."""
    from transformers.models.gemma2.modeling_gemma2 import eager_attention_forward

    lens = [(1, 9), (6, 6), (4, 30)]
    num_q, num_kv, head_dim, scale = 8, 2, 16, 0.2
    meta = random_step(4, 4, 32, lens)
    gen = torch.Generator().manual_seed(5)
    k_cache = torch.randn(32, 4, num_kv, head_dim, generator=gen)
    v_cache = torch.randn(32, 4, num_kv, head_dim, generator=gen)
    q = torch.randn(sum(q for q, _ in lens), num_q, head_dim, generator=gen)
    got = reference.paged_attention(q, k_cache, v_cache, meta, scale, window, softcap)
    module = SimpleNamespace(num_key_value_groups=num_q // num_kv, training=False)  # what eager attention reads
    start = 0
    for i, (query_len, seq_len) in enumerate(lens):
        k = reference._gather_context(k_cache, meta.block_tables[i], seq_len).transpose(0, 1)[None]
        v = reference._gather_context(v_cache, meta.block_tables[i], seq_len).transpose(0, 1)[None]
        visible = reference.causal_mask(query_len, seq_len, window, "cpu")
        mask = torch.zeros(visible.shape).masked_fill(~visible, float("-inf"))[None, None]
        query = q[start : start + query_len].transpose(0, 1)[None]
        want, _ = eager_attention_forward(module, query, k, v, mask, scaling=scale, softcap=softcap)
        torch.testing.assert_close(got[start : start + query_len], want[0], atol=1e-5, rtol=1e-5)
        start += query_len


def test_store_then_attend_reads_only_written_slots():
    """Slots outside every context hold huge stale values (as reused blocks do); they must not leak in."""
    lens = [(1, 9), (6, 6), (1, 30)]
    meta = random_step(3, 4, 32, lens)
    k_cache = torch.full((32, 4, 2, 8), 1e4)
    v_cache = torch.full((32, 4, 2, 8), 1e4)
    # write every context position of every sequence
    for i, (_, seq_len) in enumerate(lens):
        blocks = meta.block_tables[i].tolist()
        slots = torch.tensor([blocks[p // 4] * 4 + p % 4 for p in range(seq_len)])
        kv = torch.randn(seq_len, 2, 8)
        reference.store_kvcache(kv, kv * 0.5, k_cache, v_cache, slots)
    q = torch.randn(sum(q for q, _ in lens), 4, 8)
    out = batched.paged_attention(q, k_cache, v_cache, meta, 0.3)
    assert out.abs().max() < 100
    torch.testing.assert_close(out, reference.paged_attention(q, k_cache, v_cache, meta, 0.3), atol=1e-5, rtol=1e-5)


@pytest.mark.skipif(not cpu_linear.available(torch.device("cpu"), torch.float32), reason="this torch build has no oneDNN")
@pytest.mark.parametrize("rows", [1, 5, 32, 300])
@pytest.mark.parametrize("bias", [False, True])
def test_packed_cpu_linear_matches_f_linear(rows, bias):
    gen = torch.Generator().manual_seed(rows)
    weight = torch.randn(96, 64, generator=gen)
    b = torch.randn(96, generator=gen) if bias else None
    x = torch.randn(rows, 64, generator=gen)
    got = cpu_linear.linear(x, cpu_linear.pack(weight), b)
    torch.testing.assert_close(got, torch.nn.functional.linear(x, weight, b), atol=1e-4, rtol=1e-5)


def test_the_cpu_backend_packs_linears_and_the_reference_does_not():
    assert get_ops(torch.device("cpu"), "reference").pack_linear is None
    assert get_ops(torch.device("cpu"), "batched", torch.float16).pack_linear is None
