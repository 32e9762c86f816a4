"""The small per-layer ops of the `batched` backend in as few torch calls as possible.

On CPU a decode step of a deep, narrow model is dominated by the fixed cost of each torch call, not
by arithmetic, so each op here is the same math as its `kernels.reference` twin in fewer calls, and
bit-for-bit equal to it in float32 and bfloat16 (tests/test_small_ops.py):

- `rms_norm`: one ``F.rms_norm`` call. In this torch (2.13) it is not one CPU kernel but a C++
  composite of the same float32 math as the twin (pow, mean, add, rsqrt, mul): ~10 us a call at one
  row against ~15-25 us for the twin's Python ops. In float32 it applies the weight too; in lower
  precision the weight is applied after rounding to x's dtype, as transformers does.
- `apply_rotary_tables`: ``x * cos + roll(x) * sin`` with the step's tables from
  `kernels.reference.rotary_tables` (looked up once per step, sin already signed).
- `silu_and_mul`: the product written in place into SiLU's fresh output.
- `store_kvcache_unpadded`: the KV store of a step the runner built without padding slots.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kernels import reference


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    if weight.dtype != x.dtype:  # the twin promotes the result to the weight's dtype
        return reference.rms_norm(x, weight, eps)
    if x.dtype == torch.float32:
        return F.rms_norm(x, weight.shape, weight, eps)
    return F.rms_norm(x, weight.shape, None, eps).mul_(weight)


def fused_add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    residual = torch.add(x, residual)
    return rms_norm(residual, weight, eps), residual


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return F.silu(x[..., :half]).mul_(x[..., half:])


def apply_rotary_tables(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    if torch.compiler.is_compiling():  # roll's decomposition guards on the token count; a compiled graph fuses either
        return reference.apply_rotary_tables(x, cos, sin)
    rot_dim = cos.shape[-1]
    if rot_dim == x.shape[-1]:
        return (x * cos).add_(torch.roll(x, rot_dim // 2, -1).mul_(sin))
    x_rot = x[..., :rot_dim]
    rotated = (x_rot * cos).add_(torch.roll(x_rot, rot_dim // 2, -1).mul_(sin))
    return torch.cat((rotated, x[..., rot_dim:]), dim=-1)


def store_kvcache_unpadded(
    k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor
) -> None:
    num_kv_heads, head_dim = k_cache.shape[-2], k_cache.shape[-1]
    if slot_mapping.dtype != torch.long:
        slot_mapping = slot_mapping.long()
    if k.dtype != k_cache.dtype:
        k, v = k.to(k_cache.dtype), v.to(v_cache.dtype)
    k_cache.view(-1, num_kv_heads, head_dim).index_copy_(0, slot_mapping, k)
    v_cache.view(-1, num_kv_heads, head_dim).index_copy_(0, slot_mapping, v)
