"""The Triton kernels against their plain-torch twins in `kernels.reference`.

Without a GPU they run under Triton's interpreter (`TRITON_INTERPRET=1`, set by conftest.py before
the kernels are imported), so CI proves them correct on CPU at small sizes; the GPU check runs the
same comparisons at real sizes.
"""

from __future__ import annotations

import pytest
import torch

triton = pytest.importorskip("triton", reason="triton is a test dependency: pip install -e '.[test]'")

from kernel_cases import random_step  # noqa: E402
from kernels import reference  # noqa: E402
from kernels.triton.decode_attention import decode_attention, num_splits_for  # noqa: E402
from kernels.triton.kv_store import store_kvcache  # noqa: E402
from kernels.triton.paged_attention import paged_attention  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# Error bounds by dtype: fp32 accumulates in fp32 throughout; half types round q, k, v and p.
TOLERANCE = {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}


def _caches(meta, num_blocks, block_size, num_kv, head_dim, dtype, seed=1):
    gen = torch.Generator().manual_seed(seed)
    k = torch.randn(num_blocks, block_size, num_kv, head_dim, generator=gen).to(DEVICE, dtype)
    v = torch.randn(num_blocks, block_size, num_kv, head_dim, generator=gen).to(DEVICE, dtype)
    return k, v


def _on_device(meta):
    for name in ("slot_mapping", "query_start_loc", "seq_lens", "block_tables"):
        setattr(meta, name, getattr(meta, name).to(DEVICE))
    return meta


def _check(got, want, dtype):
    tol = TOLERANCE[dtype]
    torch.testing.assert_close(got.float().cpu(), want.float().cpu(), atol=tol, rtol=tol)


# (query_len, seq_len) per sequence: ragged contexts, prefixes ending mid-block, a one-token context.
DECODE = [(1, 1), (1, 17), (1, 40), (1, 95)]
EXTEND = [(5, 5), (1, 33), (20, 51), (3, 16), (17, 17)]


@pytest.mark.parametrize("block_size", [16, 32, 64])
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("heads", [(4, 4), (8, 2), (16, 2)])  # GQA ratios 1, 4 and 8
def test_decode_attention_matches_reference(block_size, head_dim, heads):
    num_q, num_kv = heads
    meta = _on_device(random_step(0, block_size, 16, DECODE))
    k_cache, v_cache = _caches(meta, 16, block_size, num_kv, head_dim, torch.float32)
    q = torch.randn(len(DECODE), num_q, head_dim, generator=torch.Generator().manual_seed(2)).to(DEVICE)
    want = reference.paged_attention(q, k_cache, v_cache, meta, head_dim**-0.5)
    _check(paged_attention(q, k_cache, v_cache, meta, head_dim**-0.5), want, torch.float32)


@pytest.mark.parametrize("num_splits", [1, 2, 3, 8])
@pytest.mark.parametrize("window", [None, 7, 40])
def test_decode_splits_and_sliding_window(num_splits, window):
    """Every split count gives the same answer, including splits left empty by a short context or a window."""
    meta = _on_device(random_step(1, 16, 16, DECODE))
    k_cache, v_cache = _caches(meta, 16, 16, 2, 64, torch.float32)
    q = torch.randn(len(DECODE), 4, 64, generator=torch.Generator().manual_seed(3)).to(DEVICE)
    want = reference.paged_attention(q, k_cache, v_cache, meta, 0.125, window)
    out = torch.zeros_like(q)
    decode_attention(
        q, k_cache, v_cache, out, meta.block_tables, meta.seq_lens, meta.query_start_loc, meta.max_seq_len,
        0.125, window, num_splits=num_splits,
    )
    _check(out, want, torch.float32)


@pytest.mark.parametrize("block_size", [16, 32])
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("heads", [(4, 4), (8, 2)])
@pytest.mark.parametrize("window", [None, 6])
def test_extend_attention_matches_reference(block_size, head_dim, heads, window):
    """Fresh prefills, a chunk over a cached prefix that ends mid-block, and decodes in one batch."""
    num_q, num_kv = heads
    meta = _on_device(random_step(2, block_size, 24, EXTEND))
    k_cache, v_cache = _caches(meta, 24, block_size, num_kv, head_dim, torch.float32)
    q = torch.randn(sum(q for q, _ in EXTEND), num_q, head_dim, generator=torch.Generator().manual_seed(4)).to(DEVICE)
    want = reference.paged_attention(q, k_cache, v_cache, meta, head_dim**-0.5, window)
    _check(paged_attention(q, k_cache, v_cache, meta, head_dim**-0.5, window), want, torch.float32)


def test_extend_attention_long_chunk_spans_several_tiles():
    lens = [(70, 90), (1, 3), (33, 33)]
    meta = _on_device(random_step(5, 16, 16, lens))
    k_cache, v_cache = _caches(meta, 16, 16, 2, 64, torch.float32)
    q = torch.randn(sum(q for q, _ in lens), 8, 64, generator=torch.Generator().manual_seed(6)).to(DEVICE)
    want = reference.paged_attention(q, k_cache, v_cache, meta, 0.125)
    _check(paged_attention(q, k_cache, v_cache, meta, 0.125), want, torch.float32)


@pytest.mark.parametrize("softcap", [1.5, 30.0])
@pytest.mark.parametrize("window", [None, 6])
def test_soft_capped_attention_matches_reference(softcap, window):
    """Gemma 2's attention logit soft-capping in both kernels (decode-only steps and mixed ones)."""
    for lens in (DECODE, EXTEND):
        meta = _on_device(random_step(10, 16, 24, lens))
        k_cache, v_cache = _caches(meta, 24, 16, 2, 64, torch.float32)
        q = 3 * torch.randn(sum(q for q, _ in lens), 8, 64, generator=torch.Generator().manual_seed(11)).to(DEVICE)
        want = reference.paged_attention(q, k_cache, v_cache, meta, 0.125, window, softcap)
        _check(paged_attention(q, k_cache, v_cache, meta, 0.125, window, softcap), want, torch.float32)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_attention_in_half_types_within_its_error_bound(dtype):
    for lens in (DECODE, EXTEND):
        meta = _on_device(random_step(7, 16, 24, lens))
        k_cache, v_cache = _caches(meta, 24, 16, 2, 64, dtype)
        q = torch.randn(sum(q for q, _ in lens), 8, 64, generator=torch.Generator().manual_seed(8)).to(DEVICE, dtype)
        want = reference.paged_attention(q, k_cache, v_cache, meta, 0.125)
        got = paged_attention(q, k_cache, v_cache, meta, 0.125)
        assert got.dtype == dtype
        _check(got, want, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kv_store_matches_reference_and_skips_padded_slots(dtype):
    gen = torch.Generator().manual_seed(9)
    num_tokens, num_kv, head_dim = 7, 2, 64
    qkv = torch.randn(num_tokens, (4 + 2 * num_kv) * head_dim, generator=gen).to(DEVICE, dtype)
    # k and v as views of a fused QKV row, as the attention layer passes them
    k = qkv[:, 4 * head_dim : (4 + num_kv) * head_dim].view(num_tokens, num_kv, head_dim)
    v = qkv[:, (4 + num_kv) * head_dim :].view(num_tokens, num_kv, head_dim)
    slots = torch.tensor([3, 17, -1, 0, 31, -1, 8], device=DEVICE)
    caches = [torch.full((4, 8, num_kv, head_dim), 7.0, device=DEVICE, dtype=dtype) for _ in range(4)]
    reference.store_kvcache(k, v, caches[0], caches[1], slots)
    store_kvcache(k, v, caches[2], caches[3], slots)
    assert torch.equal(caches[2], caches[0]) and torch.equal(caches[3], caches[1])
    assert int((caches[2] != 7.0).any(-1).any(-1).sum()) == 5  # the two padded tokens wrote nothing


def test_split_count_grows_with_context_not_past_it():
    assert num_splits_for(max_seq_len=16, block_size=16, num_seqs=1, num_kv_heads=8) == 1
    assert num_splits_for(max_seq_len=4096, block_size=16, num_seqs=1, num_kv_heads=8) == 32
    assert num_splits_for(max_seq_len=4096, block_size=16, num_seqs=64, num_kv_heads=8) == 1
