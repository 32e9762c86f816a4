"""Triton KV store: write each token's new K and V into its cache slot; padded slots (-1) are skipped
on the device, so no host sync is needed. Twin of `kernels.reference.store_kvcache`."""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _store_kv_kernel(
    k_ptr, v_ptr, k_cache_ptr, v_cache_ptr, slot_ptr,
    k_row_stride, v_row_stride,
    WIDTH: tl.constexpr,  # num_kv_heads * head_dim
    BLOCK: tl.constexpr,
):
    token = tl.program_id(0)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    slot = tl.load(slot_ptr + token).to(tl.int64)
    mask = offs < tl.where(slot >= 0, WIDTH, 0)  # a padded slot writes nothing
    k = tl.load(k_ptr + token * k_row_stride + offs, mask=mask)
    v = tl.load(v_ptr + token * v_row_stride + offs, mask=mask)
    dst = slot * WIDTH + offs
    tl.store(k_cache_ptr + dst, k.to(k_cache_ptr.dtype.element_ty), mask=mask)
    tl.store(v_cache_ptr + dst, v.to(v_cache_ptr.dtype.element_ty), mask=mask)


def _rows(x: torch.Tensor) -> torch.Tensor:
    """x as [T, Hkv, D] whose rows are contiguous (a view of a fused QKV output keeps its row stride)."""
    if x.stride(-1) != 1 or x.stride(-2) != x.shape[-1]:
        x = x.contiguous()
    return x


def store_kvcache(
    k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor
) -> None:
    """Same contract as `kernels.reference.store_kvcache`: k, v [T, Hkv, D]; caches [N, block, Hkv, D]."""
    num_tokens = k.shape[0]
    if num_tokens == 0:
        return
    k, v = _rows(k), _rows(v)
    width = k_cache.shape[-2] * k_cache.shape[-1]
    block = min(1024, triton.next_power_of_2(width))
    grid = (num_tokens, triton.cdiv(width, block))
    _store_kv_kernel[grid](k, v, k_cache, v_cache, slot_mapping, k.stride(0), v.stride(0), WIDTH=width, BLOCK=block)
