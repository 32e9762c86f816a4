"""Paged attention on CPU with the native decode kernel (`kernels.cpu_native`): every single-token
(decode) row of a step in one call that reads the paged cache in place, the prefill chunks as in
`kernels.batched` (one SDPA call each, on the step's own K/V where the chunk is the whole sequence).

Against `kernels.batched`'s decode (contexts gathered into 2 MiB chunks, then SDPA), a batch of 32
contexts of 256 tokens in bfloat16 attends 3-4x faster (docs/benchmarks.md). `kernels.reference.paged_attention`
is the oracle both are tested against.
"""

from __future__ import annotations

import torch

from kernels import batched, cpu_native
from kernels.metadata import AttentionMetadata, plan_decode


class CpuPagedAttention:
    """`kernels.reference.paged_attention`'s contract, bound to the loaded native kernels."""

    def __init__(self, kernels: cpu_native.NativeKernels):
        self.kernels = kernels

    def __call__(
        self,
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
        if not cpu_native.supports(q, k_cache):
            return batched.paged_attention(
                q, k_cache, v_cache, meta, scale, sliding_window, softcap, k, v
            )
        plan = (
            meta.decode if meta.decode is not None else plan_decode(meta)
        )  # the runner builds it once per step
        out = torch.empty_like(q)  # every row is a decode row or in a prefill chunk
        if plan.rows.numel():
            self.kernels.decode_attention(
                out,
                q,
                k_cache,
                v_cache,
                plan.rows,
                plan.block_tables,
                plan.seq_lens,
                scale,
                sliding_window,
                softcap,
            )
        batched.prefill_attention(
            out, q, k_cache, v_cache, meta, plan, scale, sliding_window, softcap, k, v
        )
        return out
