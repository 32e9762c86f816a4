"""Paged attention in a few batched torch calls: the fast path where no Triton kernel runs (CPU).

The single-token (decode) sequences of a step are attended in chunks of consecutive rows: each chunk
gathers its contexts from the cache, padded to its own longest, into a buffer of at most
`DECODE_CHUNK_BYTES` (it stays in the CPU's caches and needs no fresh pages; one gather of every
context at once costs 2-10x more at batch 32 and 1024 tokens), then runs one attention call.
Prefill chunks run one call per sequence; a chunk that is its whole sequence attends to the K/V of
the step in hand (nothing gathered), a later chunk over its context gathered from the cache.
`kernels.reference.paged_attention` is the oracle it is tested against.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator

import torch
import torch.nn.functional as F

from kernels.metadata import AttentionMetadata, DecodePlan, plan_decode
from kernels.reference import _gather_context, attention, causal_mask

DECODE_CHUNK_BYTES = 2 << 20  # gathered K and V of one decode chunk (1-4 MiB measured alike, 8 MiB and more slower)


def _decode_chunks(plan, k_cache: torch.Tensor) -> Iterator:
    """The plan cut into runs of consecutive decode rows whose padded K and V fit `DECODE_CHUNK_BYTES`
    (at least one row each), each narrowed to the blocks of its own longest context."""
    batch = plan.rows.shape[0]
    block_size = k_cache.shape[1]
    bytes_per_row = 2 * k_cache[0].numel() * k_cache.element_size() * (plan.max_len // block_size)
    rows_per_chunk = max(1, DECODE_CHUNK_BYTES // max(bytes_per_row, 1))
    if rows_per_chunk >= batch:
        yield plan
        return
    for start in range(0, batch, rows_per_chunk):
        seq_lens = plan.seq_lens[start : start + rows_per_chunk]
        num_blocks = -(-int(seq_lens.max()) // block_size)  # a host read: free on CPU
        yield dataclasses.replace(
            plan,
            rows=plan.rows[start : start + rows_per_chunk],
            block_tables=plan.block_tables[start : start + rows_per_chunk, :num_blocks],
            seq_lens=seq_lens,
            max_len=num_blocks * block_size,
            prefill=[],
        )


def _decode_attention(
    q, k_cache, v_cache, plan: DecodePlan, scale: float, sliding_window: int | None, softcap: float | None
) -> torch.Tensor:
    batch = plan.rows.shape[0]
    num_kv_heads, head_dim = k_cache.shape[2], k_cache.shape[3]
    blocks = plan.block_tables.reshape(-1)  # index_select gathers ~2.5x faster than advanced indexing
    k = k_cache.index_select(0, blocks).view(batch, plan.max_len, num_kv_heads, head_dim).transpose(1, 2)
    v = v_cache.index_select(0, blocks).view(batch, plan.max_len, num_kv_heads, head_dim).transpose(1, 2)
    positions = torch.arange(plan.max_len, device=q.device)
    last = (plan.seq_lens - 1).unsqueeze(1)
    mask = positions.unsqueeze(0) <= last
    if sliding_window is not None:
        mask &= positions.unsqueeze(0) > last - sliding_window
    query = q.index_select(0, plan.rows)  # [B, Hq, D]
    if softcap is not None:  # SDPA has no soft-capping
        return _grouped_decode_attention(query, k, v, mask, scale, softcap)
    return _folded_decode_attention(query, k, v, mask, scale)


def _folded_decode_attention(query, k, v, mask, scale: float) -> torch.Tensor:
    """One query token per sequence through torch's SDPA, the query heads of each KV head folded into
    query rows of that head: K and V are read once per KV head (no GQA expansion; 5-15% faster than
    ``enable_gqa`` in float32). torch's CPU flash kernel takes a slow path for a single bfloat16 or
    float16 query row (3-4x slower than for two), so a lone row is doubled there; per 2 MiB chunk
    this is 1.6-1.9x faster than the grouped matmuls in bfloat16, and 4-8x faster than SDPA with GQA.
    query [B, Hq, D]; k, v [B, Hkv, T, D]; mask [B, T] (True = visible) -> [B, Hq, D]."""
    batch, num_heads, head_dim = query.shape
    num_kv_heads = k.shape[1]
    group = num_heads // num_kv_heads
    rows = query.view(batch, num_kv_heads, group, head_dim)
    if group == 1 and query.dtype != torch.float32:
        rows = rows.expand(batch, num_kv_heads, 2, head_dim)
    out = F.scaled_dot_product_attention(rows, k, v, attn_mask=mask[:, None, None, :], scale=scale)
    return out[:, :, :group].reshape(batch, num_heads, head_dim)


def _grouped_decode_attention(query, k, v, mask, scale: float, softcap: float | None) -> torch.Tensor:
    """One query token per sequence, as two batched matmuls with the query heads of each KV head
    grouped into rows (no K/V repeat) and the softmax in float32: the path with soft-capping, which
    SDPA lacks (in bfloat16 it is 4-7x faster than SDPA with ``enable_gqa``).
    query [B, Hq, D]; k, v [B, Hkv, T, D]; mask [B, T] (True = visible) -> [B, Hq, D]."""
    batch, num_heads, head_dim = query.shape
    num_kv_heads = k.shape[1]
    grouped = query.view(batch, num_kv_heads, num_heads // num_kv_heads, head_dim)
    scores = torch.matmul(grouped, k.transpose(-1, -2)).float() * scale  # [B, Hkv, G, T]
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    scores = scores.masked_fill(~mask[:, None, None, :], float("-inf"))
    probs = torch.softmax(scores, dim=-1).to(v.dtype)
    return torch.matmul(probs, v).view(batch, num_heads, head_dim)


def paged_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    meta: AttentionMetadata,
    scale: float,
    sliding_window: int | None = None,
    softcap: float | None = None,
    k: torch.Tensor | None = None,
    v: torch.Tensor | None = None,
) -> torch.Tensor:
    """Same contract as `kernels.reference.paged_attention`, computed in q's dtype."""
    plan = meta.decode if meta.decode is not None else plan_decode(meta)  # the runner builds it once per step
    out = torch.zeros_like(q)
    if plan.rows.numel():
        for chunk in _decode_chunks(plan, k_cache):
            out.index_copy_(0, chunk.rows, _decode_attention(q, k_cache, v_cache, chunk, scale, sliding_window, softcap))
    prefill_attention(out, q, k_cache, v_cache, meta, plan, scale, sliding_window, softcap, k, v)
    return out


def prefill_attention(
    out: torch.Tensor,
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    meta: AttentionMetadata,
    plan: DecodePlan,
    scale: float,
    sliding_window: int | None,
    softcap: float | None,
    k: torch.Tensor | None,
    v: torch.Tensor | None,
) -> None:
    """The rows of `plan.prefill` into `out`: one attention call per sequence chunk."""
    for i, first, query_len, seq_len in plan.prefill:
        if k is not None and v is not None and query_len == seq_len:  # its K/V are the step's, in hand
            key = k[first : first + query_len].to(k_cache.dtype).transpose(0, 1)
            value = v[first : first + query_len].to(v_cache.dtype).transpose(0, 1)
        else:
            key = _gather_context(k_cache, meta.block_tables[i], seq_len).transpose(0, 1)
            value = _gather_context(v_cache, meta.block_tables[i], seq_len).transpose(0, 1)
        # A leading batch dim of 1: torch's CPU flash kernel takes only 4-D inputs (3-D ones, or GQA in 3-D,
        # fall to the unfused math path: 1.4x slower at 128 tokens, 2.3-3x at 512, in bfloat16)
        query = q[first : first + query_len].transpose(0, 1)[None]
        key, value = key[None], value[None]
        if query_len == seq_len and sliding_window is None:
            o = attention(query, key, value, None, scale, softcap, is_causal=True)
        else:
            o = attention(query, key, value, causal_mask(query_len, seq_len, sliding_window, q.device), scale, softcap)
        out[first : first + query_len] = o[0].transpose(0, 1)
