"""Paged decode attention (one query token per sequence), flash-decoding style.

Pass 1 splits each sequence's own context (from its device-side length) into `num_splits` ranges of
whole KV blocks, so a split count sized for a long bound (a CUDA graph captures it for max_model_len)
still spreads a short context over the splits; one program takes (sequence, KV head, split) and
serves every query head that shares that KV head (GQA), so each K/V block is read once per group.
It walks the block table in place (no gather of the context) with an online softmax in float32 and
writes a partial output and its log-sum-exp.
Pass 2 merges the splits. Twin: `kernels.reference.paged_attention` restricted to query_len 1.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.triton.dot_mode import dot_mode
from kernels.triton.online_softmax import attend_block


@triton.jit
def _decode_split_kernel(
    q_ptr, k_cache_ptr, v_cache_ptr, block_tables_ptr, seq_lens_ptr, query_start_ptr,
    part_out_ptr, part_lse_ptr,
    scale, sliding_window, softcap,
    q_stride_t, q_stride_h, bt_stride, num_kv_heads,
    GROUP: tl.constexpr, BLOCK_H: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    PAGE: tl.constexpr, NUM_SPLITS: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
):
    seq = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    seq_len = tl.load(seq_lens_ptr + seq)
    row = tl.load(query_start_ptr + seq).to(tl.int64)

    h = tl.arange(0, BLOCK_H)
    h_mask = h < GROUP
    heads = kv_head * GROUP + h
    d = tl.arange(0, BLOCK_D)
    d_mask = d < HEAD_DIM
    q = tl.load(
        q_ptr + row * q_stride_t + heads[:, None] * q_stride_h + d[None, :],
        mask=h_mask[:, None] & d_mask[None, :], other=0.0,
    )
    if UPCAST:
        q = q.to(tl.float32)

    start_pos = 0
    if sliding_window > 0:
        start_pos = tl.maximum(seq_len - sliding_window, 0)
    # This sequence's blocks in view, [first_block, end_block), cut into NUM_SPLITS ranges.
    first_block = start_pos // PAGE
    end_block = tl.cdiv(seq_len, PAGE)
    blocks_per_split = tl.cdiv(end_block - first_block, NUM_SPLITS)
    first = first_block + split * blocks_per_split
    last = tl.minimum(first + blocks_per_split, end_block)

    m = tl.full([BLOCK_H], float("-inf"), tl.float32)
    l = tl.zeros([BLOCK_H], tl.float32)
    acc = tl.zeros([BLOCK_H, BLOCK_D], tl.float32)
    p_off = tl.arange(0, PAGE)
    for b in range(first, last):
        block_id = tl.load(block_tables_ptr + seq * bt_stride + b).to(tl.int64)
        pos = b * PAGE + p_off
        valid = (pos < seq_len) & (pos >= start_pos)
        kv = ((block_id * PAGE + p_off) * num_kv_heads + kv_head)[:, None] * HEAD_DIM + d[None, :]
        kv_mask = valid[:, None] & d_mask[None, :]
        m, l, acc = attend_block(
            q, k_cache_ptr, v_cache_ptr, kv, kv_mask, valid[None, :], m, l, acc, scale, softcap, PRECISION, UPCAST
        )

    empty = l == 0.0
    out = acc / tl.where(empty, 1.0, l)[:, None]
    lse = tl.where(empty, float("-inf"), m + tl.log(tl.where(empty, 1.0, l)))
    part = (seq * num_kv_heads * GROUP + heads) * NUM_SPLITS + split
    tl.store(part_out_ptr + part[:, None] * BLOCK_D + d[None, :], out, mask=h_mask[:, None])
    tl.store(part_lse_ptr + part, lse, mask=h_mask)


@triton.jit
def _decode_reduce_kernel(
    part_out_ptr, part_lse_ptr, out_ptr, query_start_ptr,
    out_stride_t, out_stride_h, num_q_heads,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, NUM_SPLITS: tl.constexpr, BLOCK_S: tl.constexpr,
):
    seq = tl.program_id(0)
    head = tl.program_id(1)
    row = tl.load(query_start_ptr + seq).to(tl.int64)
    s = tl.arange(0, BLOCK_S)
    s_mask = s < NUM_SPLITS
    base = (seq * num_q_heads + head) * NUM_SPLITS
    lse = tl.load(part_lse_ptr + base + s, mask=s_mask, other=float("-inf"))
    m = tl.max(lse, 0)
    w = tl.where(s_mask & (lse > float("-inf")), tl.exp(lse - m), 0.0)
    d = tl.arange(0, BLOCK_D)
    parts = tl.load(part_out_ptr + (base + s)[:, None] * BLOCK_D + d[None, :], mask=s_mask[:, None], other=0.0)
    out = tl.sum(parts * w[:, None], 0) / tl.sum(w, 0)
    tl.store(out_ptr + row * out_stride_t + head * out_stride_h + d, out.to(out_ptr.dtype.element_ty), mask=d < HEAD_DIM)


def num_splits_for(max_seq_len: int, block_size: int, num_seqs: int, num_kv_heads: int, target_programs: int = 256) -> int:
    """Enough splits to give the GPU about `target_programs` programs, but no more splits than a context of
    `max_seq_len` has blocks (a shorter context leaves the splits past its own blocks empty)."""
    max_blocks = max(1, -(-max_seq_len // block_size))
    wanted = max(1, -(-target_programs // max(1, num_seqs * num_kv_heads)))
    return min(max_blocks, triton.next_power_of_2(wanted), 64)


def decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    out: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    query_start_loc: torch.Tensor,
    max_seq_len: int,
    scale: float,
    sliding_window: int | None = None,
    num_splits: int | None = None,
    softcap: float | None = None,
) -> torch.Tensor:
    """Write into `out` the attention of each sequence's one query row (`query_start_loc[i]`).

    `max_seq_len` bounds the context lengths and only sizes the split count: the eager step passes its
    longest context, a captured CUDA graph max_model_len (fixed for every replay)."""
    num_seqs = seq_lens.shape[0]
    _, page, num_kv_heads, head_dim = k_cache.shape
    num_q_heads = q.shape[1]
    group = num_q_heads // num_kv_heads
    if num_seqs == 0:
        return out
    if num_splits is None:
        num_splits = num_splits_for(max_seq_len, page, num_seqs, num_kv_heads)
    block_d = triton.next_power_of_2(head_dim)
    part_out = torch.empty(num_seqs, num_q_heads, num_splits, block_d, dtype=torch.float32, device=q.device)
    part_lse = torch.empty(num_seqs, num_q_heads, num_splits, dtype=torch.float32, device=q.device)
    precision, upcast = dot_mode(q.dtype)
    _decode_split_kernel[(num_seqs, num_kv_heads, num_splits)](
        q, k_cache, v_cache, block_tables, seq_lens, query_start_loc, part_out, part_lse,
        scale, sliding_window or 0, softcap or 0.0,
        q.stride(0), q.stride(1), block_tables.stride(0), num_kv_heads,
        GROUP=group, BLOCK_H=max(16, triton.next_power_of_2(group)), HEAD_DIM=head_dim, BLOCK_D=block_d,
        PAGE=page, NUM_SPLITS=num_splits, PRECISION=precision, UPCAST=upcast,
    )
    _decode_reduce_kernel[(num_seqs, num_q_heads)](
        part_out, part_lse, out, query_start_loc, out.stride(0), out.stride(1), num_q_heads,
        HEAD_DIM=head_dim, BLOCK_D=block_d, NUM_SPLITS=num_splits, BLOCK_S=triton.next_power_of_2(num_splits),
    )
    return out
