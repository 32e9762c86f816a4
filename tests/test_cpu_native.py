"""The native CPU decode attention (`kernels.cpu_native`, `--attention-backend cpu`) against the reference:
every head size path of the kernel (64 and 128 with AVX-512 constants, other multiples of 16, the portable
loop), float32 and bfloat16, GQA groups, sliding windows, soft-capping, decode rows mixed with prefill
chunks, and a query that is a strided view; then how the backend is chosen and cached."""

from __future__ import annotations

import pytest
import torch
from kernel_cases import random_step

from kernels import cpu_native, reference
from kernels.cpu_attention import CpuPagedAttention
from kernels.metadata import plan_decode
from kernels.ops import get_ops

DECODES = [(1, 1000), (1, 5), (1, 1024), (1, 333), (1, 1), (1, 17)]
MIXED = [(1, 900), (40, 40), (1, 1), (5, 50), (1, 640), (16, 16), (24, 1000)]


@pytest.fixture(scope="module")
def native():
    kernels, why = cpu_native.load()
    if kernels is None:
        pytest.skip(f"no native CPU kernels here: {why}")
    return kernels


def _step(lens, block_size, heads, head_dim, dtype, seed=0):
    num_q, num_kv = heads
    num_blocks = sum(-(-s // block_size) for _, s in lens) + 4
    meta = random_step(seed, block_size, num_blocks, lens)
    meta.decode = plan_decode(meta)
    gen = torch.Generator().manual_seed(seed + 1)
    k_cache = torch.randn(num_blocks, block_size, num_kv, head_dim, generator=gen).to(
        dtype
    )
    v_cache = torch.randn(num_blocks, block_size, num_kv, head_dim, generator=gen).to(
        dtype
    )
    tokens = sum(q for q, _ in lens)
    q = torch.randn(tokens, num_q, head_dim, generator=gen).to(dtype)
    k = torch.randn(tokens, num_kv, head_dim, generator=gen).to(dtype)
    v = torch.randn(tokens, num_kv, head_dim, generator=gen).to(dtype)
    reference.store_kvcache(k, v, k_cache, v_cache, meta.slot_mapping)
    return meta, q, k, v, k_cache, v_cache


@pytest.mark.parametrize("lens", [DECODES, MIXED])
@pytest.mark.parametrize("heads", [(8, 4), (9, 3), (4, 4)])
@pytest.mark.parametrize(
    "head_dim", [64, 128, 32, 24]
)  # AVX-512 constants, AVX-512 generic, portable loop
@pytest.mark.parametrize("window, softcap", [(None, None), (100, None), (None, 2.0)])
def test_native_matches_the_reference_in_float32(
    native, lens, heads, head_dim, window, softcap
):
    meta, q, k, v, k_cache, v_cache = _step(lens, 16, heads, head_dim, torch.float32)
    want = reference.paged_attention(q, k_cache, v_cache, meta, 0.125, window, softcap)
    got = CpuPagedAttention(native)(
        q, k_cache, v_cache, meta, 0.125, window, softcap, k=k, v=v
    )
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("heads", [(8, 4), (9, 3), (4, 4)])
@pytest.mark.parametrize("head_dim", [64, 128, 24])
@pytest.mark.parametrize("softcap", [None, 2.0])
def test_native_in_bfloat16_is_within_bfloat16_rounding_of_the_float32_reference(
    native, heads, head_dim, softcap
):
    """2e-2 absolute on outputs of size ~1 (bfloat16 keeps 8 bits of mantissa; the kernel rounds once, at
    its output, and multiplies bfloat16 pairs exactly into float32 sums)."""
    meta, q, k, v, k_cache, v_cache = _step(MIXED, 16, heads, head_dim, torch.bfloat16)
    want = reference.paged_attention(
        q.float(), k_cache.float(), v_cache.float(), meta, 0.125, None, softcap
    )
    got = CpuPagedAttention(native)(
        q, k_cache, v_cache, meta, 0.125, None, softcap, k=k, v=v
    )
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), want, atol=2e-2, rtol=2e-2)


def test_a_query_that_is_a_strided_view_of_the_fused_projection(native):
    """The layer's q is a view into the fused q/k/v output: rows are further apart than their heads."""
    meta, q, _, _, k_cache, v_cache = _step(MIXED, 32, (8, 4), 64, torch.float32)
    wide = torch.randn(q.shape[0], q.shape[1] + 5, 64)
    wide[:, 2 : 2 + q.shape[1]] = q
    view = wide[:, 2 : 2 + q.shape[1]]
    assert not view.is_contiguous() and cpu_native.supports(view, k_cache)
    want = reference.paged_attention(q, k_cache, v_cache, meta, 0.125)
    torch.testing.assert_close(
        CpuPagedAttention(native)(view, k_cache, v_cache, meta, 0.125),
        want,
        atol=1e-5,
        rtol=1e-5,
    )


def test_float16_takes_the_batched_torch_path(native):
    meta, q, _, _, k_cache, v_cache = _step(MIXED, 16, (8, 4), 64, torch.float16)
    assert not cpu_native.supports(q, k_cache)
    want = reference.paged_attention(
        q.float(), k_cache.float(), v_cache.float(), meta, 0.125
    )
    got = CpuPagedAttention(native)(q, k_cache, v_cache, meta, 0.125)
    torch.testing.assert_close(got.float(), want, atol=2e-2, rtol=2e-2)


def test_auto_picks_the_native_backend_on_cpu_and_the_library_is_built_once(native):
    ops = get_ops(torch.device("cpu"), "auto")
    assert ops.backend == "cpu" and ops.fallback_reason == ""
    before = native.path.stat().st_mtime_ns
    again, why = cpu_native.load()
    assert (
        why == ""
        and again.path == native.path
        and native.path.stat().st_mtime_ns == before
    )


def test_without_a_c_compiler_auto_falls_back_to_batched_and_cpu_is_refused_injected(
    monkeypatch, tmp_path
):
    """A fault injected on purpose: no compiler on PATH and none in $CC, and an empty kernel cache."""
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.delenv("CC", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    kernels, why = cpu_native.load()
    assert kernels is None and "no C compiler" in why
    ops = get_ops(torch.device("cpu"), "auto")
    assert ops.backend == "batched" and "no C compiler" in ops.fallback_reason
    with pytest.raises(ValueError, match="native kernel is not available"):
        get_ops(torch.device("cpu"), "cpu")


def test_a_failing_build_is_reported_not_raised_injected(monkeypatch, tmp_path):
    """A fault injected on purpose: $CC is a program that fails."""
    cc = tmp_path / "cc"
    cc.write_text("#!/bin/sh\necho 'cc: error: injected failure' >&2\nexit 1\n")
    cc.chmod(0o755)
    monkeypatch.setenv("CC", str(cc))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    kernels, why = cpu_native.load()
    assert kernels is None and "injected failure" in why
    assert not list(
        (tmp_path / "pagedserve" / "kernels").glob("*.so")
    )  # no half-written library left


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("rows, hidden", [(1, 576), (32, 768), (7, 100)])
def test_native_small_ops_match_their_twins(native, dtype, tol, rows, hidden):
    """One pass each against `kernels.reference`; in bfloat16 within a rounding of the twin (both round the
    same intermediate values; the row sums and exp differ in their last float32 bits)."""
    gen = torch.Generator().manual_seed(rows)
    x = (torch.randn(rows, hidden, generator=gen) * 3).to(dtype)
    residual = torch.randn(rows, hidden, generator=gen).to(dtype)
    weight = (1 + torch.randn(hidden, generator=gen) / 4).to(dtype)
    torch.testing.assert_close(
        native.rms_norm(x, weight, 1e-6),
        reference.rms_norm(x, weight, 1e-6),
        atol=tol,
        rtol=tol,
    )
    normed, summed = native.fused_add_rms_norm(x, residual, weight, 1e-6)
    want_normed, want_summed = reference.fused_add_rms_norm(x, residual, weight, 1e-6)
    assert torch.equal(summed, want_summed)  # one rounded add
    torch.testing.assert_close(normed, want_normed, atol=tol, rtol=tol)
    gate_up = (torch.randn(rows, 2 * hidden, generator=gen) * 4).to(dtype)
    torch.testing.assert_close(
        native.silu_and_mul(gate_up),
        reference.silu_and_mul(gate_up),
        atol=tol,
        rtol=tol,
    )


def test_native_small_ops_take_strided_rows_and_leave_other_layouts_to_torch(native):
    gen = torch.Generator().manual_seed(3)
    wide = torch.randn(5, 3 * 64, generator=gen)
    gate_up = wide[:, :128]  # rows further apart than their length
    torch.testing.assert_close(
        native.silu_and_mul(gate_up),
        reference.silu_and_mul(gate_up),
        atol=1e-6,
        rtol=1e-6,
    )
    heads = torch.randn(
        5, 4, 64, generator=gen
    )  # a per-head norm (Qwen3's q_norm) over contiguous heads
    weight = torch.rand(64, generator=gen)
    torch.testing.assert_close(
        native.rms_norm(heads, weight, 1e-6), reference.rms_norm(heads, weight, 1e-6)
    )
    strided = heads.transpose(0, 1)  # neither 2-D nor contiguous: the torch twin
    torch.testing.assert_close(
        native.rms_norm(strided, weight, 1e-6),
        reference.rms_norm(strided, weight, 1e-6),
    )
    half = torch.randn(5, 64, dtype=torch.float16)
    torch.testing.assert_close(
        native.rms_norm(half, weight.half(), 1e-6),
        reference.rms_norm(half, weight.half(), 1e-6),
    )
