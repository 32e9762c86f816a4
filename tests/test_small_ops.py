"""The batched backend's small per-layer ops (`kernels.cpu_small_ops`) against their plain-torch twins:
equal bit for bit in float32 and bfloat16 (the same arithmetic in fewer torch calls)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from kernels import cpu_small_ops, reference
from kernels.ops import get_ops
from server.runner.layers.rotary import RotaryEmbedding

DTYPES = [torch.float32, torch.bfloat16]


def _rotary_cache(rot_dim: int, max_positions: int = 64) -> torch.Tensor:
    cfg = SimpleNamespace(
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0}, max_position_embeddings=max_positions
    )
    return RotaryEmbedding(cfg, rot_dim, get_ops(torch.device("cpu"), "reference")).cos_sin_cache


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows", [1, 7, 300])
def test_rms_norm_equals_reference(dtype, rows):
    gen = torch.Generator().manual_seed(rows)
    x = (torch.randn(rows, 96, generator=gen) * 3).to(dtype)
    residual = torch.randn(rows, 96, generator=gen).to(dtype)
    weight = (torch.randn(96, generator=gen) * 0.2 + 1).to(dtype)
    assert torch.equal(cpu_small_ops.rms_norm(x, weight, 1e-6), reference.rms_norm(x, weight, 1e-6))
    fast, fast_res = cpu_small_ops.fused_add_rms_norm(x, residual, weight, 1e-6)
    ref, ref_res = reference.fused_add_rms_norm(x, residual, weight, 1e-6)
    assert torch.equal(fast_res, ref_res) and torch.equal(fast, ref)
    # per-head qk-norm over a strided view of a fused projection
    heads = x.view(rows, 6, 16)[:, 1:4]
    w16 = weight[:16]
    assert torch.equal(cpu_small_ops.rms_norm(heads, w16, 1e-6), reference.rms_norm(heads, w16, 1e-6))


@pytest.mark.parametrize("dtype", DTYPES)
def test_silu_and_mul_equals_reference(dtype):
    x = torch.randn(5, 2 * 48, generator=torch.Generator().manual_seed(0)).to(dtype)
    assert torch.equal(cpu_small_ops.silu_and_mul(x), reference.silu_and_mul(x))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("head_dim,rot_dim", [(32, 32), (32, 16)])  # full and partial rotary
def test_rotary_tables_equal_per_layer_rotary(dtype, head_dim, rot_dim):
    """Both twins of `apply_rotary_tables`, on q and k as one strided view of a fused QKV output, equal
    the per-layer `apply_rotary` of q and of k."""
    cache = _rotary_cache(rot_dim)
    gen = torch.Generator().manual_seed(head_dim + rot_dim)
    positions = torch.tensor([0, 5, 17, 63, 2])
    qkv = torch.randn(5, (4 + 2 * 2) * head_dim, generator=gen).to(dtype).view(5, 8, head_dim)
    q, k = qkv[:, :4], qkv[:, 4:6]
    cos, sin = reference.rotary_tables(positions, cache, dtype)
    for apply in (reference.apply_rotary_tables, cpu_small_ops.apply_rotary_tables):
        qk = apply(qkv[:, :6], cos, sin)
        assert torch.equal(qk[:, :4], reference.apply_rotary(q, positions, cache))
        assert torch.equal(qk[:, 4:], reference.apply_rotary(k, positions, cache))


@pytest.mark.parametrize("dtype", DTYPES)
def test_unpadded_kv_store_equals_reference(dtype):
    k, v = torch.randn(2, 6, 3, 8).to(dtype).unbind(0)
    slots = torch.tensor([9, 0, 31, 4, 17, 22])
    caches = [torch.zeros(4, 8, 3, 8, dtype=dtype) for _ in range(4)]
    reference.store_kvcache(k, v, caches[0], caches[1], slots)
    cpu_small_ops.store_kvcache_unpadded(k, v, caches[2], caches[3], slots.int())
    assert torch.equal(caches[0], caches[2]) and torch.equal(caches[1], caches[3])
    assert caches[2].flatten(0, 1)[31].equal(k[2])


def test_the_batched_backend_uses_the_small_ops_and_the_reference_backend_its_twins():
    fast, ref = get_ops(torch.device("cpu"), "batched"), get_ops(torch.device("cpu"), "reference")
    assert fast.rms_norm is cpu_small_ops.rms_norm and fast.apply_rotary_tables is cpu_small_ops.apply_rotary_tables
    assert ref.rms_norm is reference.rms_norm and ref.store_kvcache_unpadded is reference.store_kvcache


def test_rms_norm_with_a_weight_of_another_dtype_equals_reference():
    x, weight = torch.randn(3, 32).bfloat16(), torch.randn(32) * 0.1 + 1
    fast, ref = cpu_small_ops.rms_norm(x, weight, 1e-6), reference.rms_norm(x, weight, 1e-6)
    assert fast.dtype == ref.dtype == torch.float32 and torch.equal(fast, ref)


def test_attention_skips_padding_slots_unless_the_step_says_it_has_none():
    """A padded slot (-1) is skipped by default; a step marked unpadded writes through the fast store."""
    from kernel_cases import random_step

    from server.runner.layers.attention import Attention

    ops = get_ops(torch.device("cpu"), "batched")
    attn = Attention(4, 2, 8, 8**-0.5, ops)
    meta = random_step(0, 4, 8, [(1, 5), (1, 3)])
    q, k, v = torch.randn(2, 4, 8), torch.randn(2, 2, 8), torch.randn(2, 2, 8)
    caches = torch.zeros(2, 8, 4, 2, 8).unbind(0)
    meta.slot_mapping[1] = -1  # a padding row: its K/V go nowhere
    attn(q, k, v, caches, meta)
    assert caches[0].flatten(0, 1).abs().sum(-1).sum(-1).nonzero().numel() == 1
    meta = random_step(0, 4, 8, [(1, 5), (1, 3)])
    meta.slots_padded = False
    attn(q, k, v, caches, meta)
    slots = meta.slot_mapping
    assert torch.equal(caches[0].flatten(0, 1)[slots], k) and torch.equal(caches[1].flatten(0, 1)[slots], v)
