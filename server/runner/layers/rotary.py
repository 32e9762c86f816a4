"""Rotary position embedding with a precomputed cos/sin cache.

Inverse frequencies and the attention scaling of non-default rope types (llama3, linear, yarn, ...)
come from transformers' own ``ROPE_INIT_FUNCTIONS`` so they always match the reference model.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from kernels import reference
from kernels.ops import Ops
from server.errors import ConfigError

# Rope types whose frequencies change with the running sequence length: a static cache cannot match them.
_DYNAMIC_ROPE_TYPES = ("dynamic", "longrope")


def rope_parameters(hf_config: Any) -> dict[str, Any]:
    """The rope settings as a dict with ``rope_type`` and ``rope_theta`` (transformers 5 and 4 layouts)."""
    params = getattr(hf_config, "rope_parameters", None)
    if params is None:  # transformers 4: rope_theta + rope_scaling
        params = dict(getattr(hf_config, "rope_scaling", None) or {})
        params.setdefault("rope_theta", getattr(hf_config, "rope_theta", 10000.0))
    params = dict(params)
    params["rope_type"] = params.get("rope_type", params.get("type", "default"))
    return params


def compute_inv_freq(hf_config: Any, head_dim: int, device: torch.device | None = None) -> tuple[torch.Tensor, float]:
    """``(inv_freq [R/2] float32, attention_scaling)`` for this config's rope type."""
    params = rope_parameters(hf_config)
    rope_type = params["rope_type"]
    if rope_type == "default":
        rot_dim = int(head_dim * params.get("partial_rotary_factor", 1.0))
        base = float(params["rope_theta"])
        exponents = torch.arange(0, rot_dim, 2, dtype=torch.int64, device=device).float() / rot_dim
        return 1.0 / (base**exponents), 1.0
    if rope_type in _DYNAMIC_ROPE_TYPES:
        raise ConfigError(f"Rope type {rope_type!r} is not supported (its frequencies depend on the sequence length)")
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    if rope_type not in ROPE_INIT_FUNCTIONS:
        raise ConfigError(f"Unknown rope type {rope_type!r}. Known: default, {', '.join(ROPE_INIT_FUNCTIONS)}")
    inv_freq, attention_scaling = ROPE_INIT_FUNCTIONS[rope_type](hf_config, device)
    return inv_freq.float(), float(attention_scaling)


class RotaryEmbedding(nn.Module):
    """Rotary tables of a step (`tables`) and the rotation of q and k ([T, H, D]) by them (`rotate`); the cache
    covers ``max_position_embeddings``."""

    def __init__(self, hf_config: Any, head_dim: int, ops: Ops, max_positions: int | None = None):
        super().__init__()
        self.ops = ops
        self.head_dim = head_dim
        inv_freq, attention_scaling = compute_inv_freq(hf_config, head_dim)
        max_positions = max_positions or hf_config.max_position_embeddings
        t = torch.arange(max_positions, dtype=torch.float32, device=inv_freq.device)
        freqs = t[:, None] * inv_freq[None, :]
        cache = torch.cat((freqs.cos() * attention_scaling, freqs.sin() * attention_scaling), dim=-1)
        # Built in float32; `tables` casts cos/sin to the activations' dtype, as transformers does.
        self.register_buffer("cos_sin_cache", cache, persistent=False)
        self.rotary_dim = cache.shape[-1]

    def tables(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """The step's ``(cos, sin)`` for `rotate`: looked up once per forward and shared by every layer."""
        return reference.rotary_tables(positions, self.cos_sin_cache, dtype)

    def rotate(self, x: torch.Tensor, tables: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        """x [T, H, D] rotated by the step's `tables`; x may be a strided view (q and k as one view of
        the fused QKV output), the result is a new contiguous tensor."""
        return self.ops.apply_rotary_tables(x, *tables)

    def extra_repr(self) -> str:
        return f"head_dim={self.head_dim}, rotary_dim={self.rotary_dim}, max_positions={self.cos_sin_cache.shape[0]}"
