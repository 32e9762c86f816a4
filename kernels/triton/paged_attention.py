"""The Triton backend's `paged_attention`: the decode kernel when every sequence of the step decodes
one token, the extend kernel otherwise. Same contract as `kernels.reference.paged_attention`; keys
and values of the step are already in the cache (`store_kvcache` runs first)."""

from __future__ import annotations

import torch

from kernels.metadata import AttentionMetadata
from kernels.triton.decode_attention import decode_attention
from kernels.triton.extend_attention import extend_attention


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
    """k/v (this step's, already in the cache) are accepted and not used: the kernels read the cache."""
    if q.stride(-1) != 1:
        q = q.contiguous()
    out = torch.zeros_like(q)
    if meta.num_seqs == 0:
        return out
    if meta.max_query_len == 1 and min(meta.query_lens_cpu) == 1:
        decode_attention(
            q, k_cache, v_cache, out, meta.block_tables, meta.seq_lens, meta.query_start_loc,
            meta.max_seq_len, scale, sliding_window, softcap=softcap,
        )
    else:
        extend_attention(
            q, k_cache, v_cache, out, meta.block_tables, meta.seq_lens, meta.query_start_loc,
            meta.max_query_len, scale, sliding_window, softcap,
        )
    return out
