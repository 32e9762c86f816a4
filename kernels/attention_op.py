"""The KV store and paged attention of one layer as ONE custom op, `torch.ops.pagedserve.attention`, so
that `torch.compile` traces the whole model forward as a single graph (no break at attention).

Its arguments are tensors and plain per-layer scalars only: the per-step python lists of
`AttentionMetadata` would specialise the graph on every batch. Inside the op everything is eager,
so the backend kernels run unchanged:

- `reference` / `batched` (host-driven loops): the lengths come back to the host with `.tolist()`
  of `query_start_loc` and `seq_lens` (free on CPU; a device sync on CUDA, where these are not the
  default), and the step's `DecodePlan` arrives as its three tensors.
- `triton`: no host sync. Bounds come from shapes: a step decodes only iff it has as many tokens
  as sequences; the decode split count uses the block-table width as its context bound and the
  extend grid the longest possible query, ``T - B + 1``.

The fake (meta) implementation only allocates the output, so tracing never looks at the lengths.
`kernels.ops` (store_kvcache + paged_attention, called eagerly) is this op's twin.
"""

from __future__ import annotations

import torch

from kernels import batched, reference
from kernels.metadata import AttentionMetadata, DecodePlan, prefill_spans


@torch.library.custom_op("pagedserve::attention", mutates_args=("k_cache", "v_cache"))
def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    query_start_loc: torch.Tensor,
    seq_lens: torch.Tensor,
    block_tables: torch.Tensor,
    decode_rows: torch.Tensor | None,
    decode_block_tables: torch.Tensor | None,
    decode_seq_lens: torch.Tensor | None,
    backend: str,
    scale: float,
    sliding_window: int | None,
    softcap: float | None,
) -> torch.Tensor:
    """Store k/v ([T, Hkv, D]) at `slot_mapping`, then return the attention of q ([T, Hq, D])."""
    if backend == "triton":
        return _triton(q, k, v, k_cache, v_cache, slot_mapping, query_start_loc, seq_lens, block_tables,
                       scale, sliding_window, softcap)
    reference.store_kvcache(k, v, k_cache, v_cache, slot_mapping)
    query_lens = query_start_loc.diff().tolist()
    lens = seq_lens.tolist()
    block_size = k_cache.shape[1]
    decode = None
    if decode_rows is not None:
        decode = DecodePlan(
            rows=decode_rows,
            block_tables=decode_block_tables,
            seq_lens=decode_seq_lens,
            max_len=decode_block_tables.shape[1] * block_size,
            prefill=prefill_spans(query_lens, lens),
        )
    meta = AttentionMetadata(slot_mapping, query_start_loc, seq_lens, block_tables, query_lens, lens, block_size, decode)
    # "cpu" too takes the batched torch path here: the native kernels are not an argument an op can take
    # (the compiled forward is opt-in on CPU, and measured slower than the eager one with them).
    paged_attention = batched.paged_attention if backend in ("batched", "cpu") else reference.paged_attention
    return paged_attention(q, k_cache, v_cache, meta, scale, sliding_window, softcap, k=k, v=v).contiguous()


@attention.register_fake
def _(q, k, v, k_cache, v_cache, slot_mapping, query_start_loc, seq_lens, block_tables,
      decode_rows, decode_block_tables, decode_seq_lens, backend, scale, sliding_window, softcap):
    return q.new_empty(q.shape)  # contiguous, as every implementation returns it


def _triton(q, k, v, k_cache, v_cache, slot_mapping, query_start_loc, seq_lens, block_tables,
            scale, sliding_window, softcap) -> torch.Tensor:
    # imports triton: only here
    from kernels.triton.decode_attention import decode_attention
    from kernels.triton.extend_attention import extend_attention
    from kernels.triton.kv_store import store_kvcache

    store_kvcache(k, v, k_cache, v_cache, slot_mapping)
    q = q if q.stride(-1) == 1 else q.contiguous()
    out = torch.zeros_like(q)
    num_tokens, num_seqs = q.shape[0], seq_lens.shape[0]
    if num_seqs == 0:
        return out
    if num_tokens == num_seqs:  # every sequence brings one token (each brings at least one)
        max_context = block_tables.shape[1] * k_cache.shape[1]
        decode_attention(q, k_cache, v_cache, out, block_tables, seq_lens, query_start_loc, max_context,
                         scale, sliding_window, softcap=softcap)
    else:
        extend_attention(q, k_cache, v_cache, out, block_tables, seq_lens, query_start_loc,
                         num_tokens - num_seqs + 1, scale, sliding_window, softcap)
    return out


def attend(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    meta: AttentionMetadata,
    backend: str,
    scale: float,
    sliding_window: int | None = None,
    softcap: float | None = None,
) -> torch.Tensor:
    """`attention` with the tensors of `meta` unpacked: what a layer calls under `torch.compile`."""
    plan = meta.decode
    return torch.ops.pagedserve.attention(
        q, k, v, k_cache, v_cache, meta.slot_mapping, meta.query_start_loc, meta.seq_lens, meta.block_tables,
        None if plan is None else plan.rows,
        None if plan is None else plan.block_tables,
        None if plan is None else plan.seq_lens,
        backend, scale, sliding_window, softcap,
    )
