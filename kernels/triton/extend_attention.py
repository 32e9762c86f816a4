"""Paged extend attention: variable-length query chunks attending causally to their whole context
in the paged cache (a cached prefix, earlier chunks and the chunk itself, all stored before the
call). One kernel serves first prefills, chunked prefill, prefix-cache hits and decodes alike.

One program takes (sequence, query head, tile of BLOCK_M query rows) and walks the block table in
place with an online softmax in float32, stopping at the causal edge of its tile and starting at
the sliding window's. Twin: `kernels.reference.paged_attention`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.triton.dot_mode import dot_mode
from kernels.triton.online_softmax import attend_block


@triton.jit
def _extend_kernel(
    q_ptr, k_cache_ptr, v_cache_ptr, out_ptr, block_tables_ptr, seq_lens_ptr, query_start_ptr,
    scale, sliding_window, softcap,
    q_stride_t, q_stride_h, out_stride_t, out_stride_h, bt_stride, num_kv_heads,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, PAGE: tl.constexpr,
    BLOCK_M: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
):
    seq = tl.program_id(0)
    head = tl.program_id(1)
    tile = tl.program_id(2)
    q_start = tl.load(query_start_ptr + seq)
    query_len = tl.load(query_start_ptr + seq + 1) - q_start
    seq_len = tl.load(seq_lens_ptr + seq)
    kv_head = head // GROUP

    m_idx = tile * BLOCK_M + tl.arange(0, BLOCK_M)
    m_mask = m_idx < query_len
    q_pos = seq_len - query_len + m_idx  # the position of each query row in its sequence
    rows = (q_start + m_idx).to(tl.int64)
    d = tl.arange(0, BLOCK_D)
    d_mask = d < HEAD_DIM
    q = tl.load(
        q_ptr + rows[:, None] * q_stride_t + head * q_stride_h + d[None, :],
        mask=m_mask[:, None] & d_mask[None, :], other=0.0,
    )
    if UPCAST:
        q = q.to(tl.float32)

    # Keys this tile can see: up to its last row's position; from the window's start of its first row.
    hi = tl.minimum(seq_len, seq_len - query_len + (tile + 1) * BLOCK_M)
    lo = 0
    if sliding_window > 0:
        lo = tl.maximum(seq_len - query_len + tile * BLOCK_M - sliding_window + 1, 0)
    if tile * BLOCK_M >= query_len:
        hi = lo  # a tile past this sequence's rows: nothing to do

    m = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    p_off = tl.arange(0, PAGE)
    for b in range(lo // PAGE, tl.cdiv(hi, PAGE)):
        block_id = tl.load(block_tables_ptr + seq * bt_stride + b).to(tl.int64)
        pos = b * PAGE + p_off
        kv = ((block_id * PAGE + p_off) * num_kv_heads + kv_head)[:, None] * HEAD_DIM + d[None, :]
        kv_mask = (pos < seq_len)[:, None] & d_mask[None, :]
        visible = (pos[None, :] <= q_pos[:, None]) & (pos < seq_len)[None, :]
        if sliding_window > 0:
            visible = visible & (pos[None, :] > q_pos[:, None] - sliding_window)
        m, l, acc = attend_block(
            q, k_cache_ptr, v_cache_ptr, kv, kv_mask, visible, m, l, acc, scale, softcap, PRECISION, UPCAST
        )

    out = acc / tl.where(l == 0.0, 1.0, l)[:, None]
    tl.store(
        out_ptr + rows[:, None] * out_stride_t + head * out_stride_h + d[None, :],
        out.to(out_ptr.dtype.element_ty),
        mask=m_mask[:, None] & d_mask[None, :],
    )


def extend_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    out: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    query_start_loc: torch.Tensor,
    max_query_len: int,
    scale: float,
    sliding_window: int | None = None,
    softcap: float | None = None,
) -> torch.Tensor:
    """Write into `out` the attention of every query row of every sequence."""
    num_seqs = seq_lens.shape[0]
    if num_seqs == 0 or max_query_len == 0:
        return out
    _, page, num_kv_heads, head_dim = k_cache.shape
    num_q_heads = q.shape[1]
    block_m = 16 if max_query_len <= 16 else 64
    precision, upcast = dot_mode(q.dtype)
    grid = (num_seqs, num_q_heads, triton.cdiv(max_query_len, block_m))
    _extend_kernel[grid](
        q, k_cache, v_cache, out, block_tables, seq_lens, query_start_loc,
        scale, sliding_window or 0, softcap or 0.0,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1), block_tables.stride(0), num_kv_heads,
        GROUP=num_q_heads // num_kv_heads, HEAD_DIM=head_dim, BLOCK_D=triton.next_power_of_2(head_dim), PAGE=page,
        BLOCK_M=block_m, PRECISION=precision, UPCAST=upcast,
    )
    return out
