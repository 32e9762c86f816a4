"""The attention layer: write this step's K/V into the layer's paged cache, attend over the cache.

Under `torch.compile` both go through one custom op (`kernels.attention_op`) with the same kernels.
"""

from __future__ import annotations

import torch
from torch import nn

from kernels import attention_op
from kernels.metadata import AttentionMetadata
from kernels.ops import Ops


class Attention(nn.Module):
    def __init__(
        self,
        num_heads: int,
        num_kv_heads: int,
        head_dim: int,
        scale: float,
        ops: Ops,
        sliding_window: int | None = None,
    ):
        super().__init__()
        if num_heads % num_kv_heads:
            raise ValueError(f"num_heads {num_heads} is not a multiple of num_kv_heads {num_kv_heads}")
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.scale = scale
        self.sliding_window = sliding_window
        self.ops = ops

    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        kv_cache: tuple[torch.Tensor, torch.Tensor],
        meta: AttentionMetadata,
    ) -> torch.Tensor:
        """q: [T, Hq, D], k/v: [T, Hkv, D]; kv_cache: (k_cache, v_cache) of this layer. Returns [T, Hq * D]."""
        k_cache, v_cache = kv_cache
        if torch.compiler.is_compiling():  # one custom op keeps the compiled forward one graph
            out = attention_op.attend(q, k, v, k_cache, v_cache, meta, self.ops.backend, self.scale, self.sliding_window)
        else:
            store = self.ops.store_kvcache if meta.slots_padded else self.ops.store_kvcache_unpadded
            store(k, v, k_cache, v_cache, meta.slot_mapping)
            out = self.ops.paged_attention(q, k_cache, v_cache, meta, self.scale, self.sliding_window, k=k, v=v)
        return out.reshape(out.shape[0], self.num_heads * self.head_dim)

    def extra_repr(self) -> str:
        return (
            f"heads={self.num_heads}, kv_heads={self.num_kv_heads}, head_dim={self.head_dim}, "
            f"sliding_window={self.sliding_window}"
        )
