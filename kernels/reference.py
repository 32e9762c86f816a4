"""Plain-torch ops: the oracle every other kernel is tested against. Simple first, fast enough second."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kernels.metadata import AttentionMetadata


def store_kvcache(
    k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor
) -> None:
    """Write token t's K/V ([T, Hkv, D]) into flat slot ``slot_mapping[t]`` of the caches.

    Caches are [num_blocks, block_size, Hkv, D] and must be contiguous (written through a view).
    A negative slot (padding) is skipped.
    """
    num_kv_heads, head_dim = k_cache.shape[-2], k_cache.shape[-1]
    k_flat = k_cache.view(-1, num_kv_heads, head_dim)
    v_flat = v_cache.view(-1, num_kv_heads, head_dim)
    slots = slot_mapping.long()
    valid = slots >= 0
    if not bool(valid.all()):
        slots, k, v = slots[valid], k[valid], v[valid]
    k_flat.index_copy_(0, slots, k.to(k_flat.dtype))
    v_flat.index_copy_(0, slots, v.to(v_flat.dtype))


def _gather_context(cache: torch.Tensor, block_table: torch.Tensor, seq_len: int) -> torch.Tensor:
    """The first ``seq_len`` tokens of one sequence's K or V, gathered through its block table."""
    block_size = cache.shape[1]
    num_blocks = -(-seq_len // block_size)
    blocks = block_table[:num_blocks].long()
    return cache.index_select(0, blocks).flatten(0, 1)[:seq_len]


def causal_mask(query_len: int, seq_len: int, sliding_window: int | None, device) -> torch.Tensor:
    """[query_len, seq_len] bool: which keys each query (at the sequence's last positions) may see."""
    q_pos = torch.arange(seq_len - query_len, seq_len, device=device)[:, None]
    k_pos = torch.arange(seq_len, device=device)[None, :]
    mask = k_pos <= q_pos
    if sliding_window is not None:
        mask &= k_pos > q_pos - sliding_window
    return mask


def attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    mask: torch.Tensor | None,
    scale: float,
    softcap: float | None = None,
    is_causal: bool = False,
) -> torch.Tensor:
    """Softmax attention of query [..., Hq, Tq, D] over key/value [..., Hkv, Tk, D] (Hq a multiple of
    Hkv; query head h reads KV head h // (Hq / Hkv)); ``mask`` (bool, True = visible) broadcasts to
    [..., Hq, Tq, Tk]. With ``softcap`` c the scaled scores s become ``c * tanh(s / c)`` before the mask
    (Gemma 2's attention logit soft-capping)."""
    gqa = query.shape[-3] != key.shape[-3]
    if softcap is None:
        return F.scaled_dot_product_attention(query, key, value, attn_mask=mask, scale=scale, is_causal=is_causal, enable_gqa=gqa)
    if gqa:
        group = query.shape[-3] // key.shape[-3]
        key, value = key.repeat_interleave(group, dim=-3), value.repeat_interleave(group, dim=-3)
    scores = torch.matmul(query, key.transpose(-1, -2)) * scale
    scores = torch.tanh(scores / softcap) * softcap
    if is_causal:
        mask = torch.ones(scores.shape[-2:], dtype=torch.bool, device=scores.device).tril()
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    return torch.matmul(torch.softmax(scores, dim=-1), value)


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
    """Causal attention of each sequence's query tokens over its cached context.

    q: [T, Hq, D] (Hq a multiple of Hkv). Sequence i's queries sit at positions
    ``seq_len - query_len .. seq_len - 1``; key j is visible to the query at position p iff
    ``j <= p`` and, with a sliding window w, ``p - w < j``. Scores are ``q . k * scale``, soft-capped
    to ``softcap * tanh(score / softcap)`` when ``softcap`` is set. Rows past the last sequence stay
    zero. Computed in float32, returned in q's dtype.

    ``k``/``v`` ([T, Hkv, D]), when given, are this step's keys and values, already written at
    ``slot_mapping``: a backend may attend to them in place of reading them back from the cache. The
    result is the same either way; this oracle always reads the cache.
    """
    out = torch.zeros_like(q)
    start = 0
    for i, (query_len, seq_len) in enumerate(zip(meta.query_lens_cpu, meta.seq_lens_cpu)):
        end = start + query_len
        if query_len == 0:
            continue
        k = _gather_context(k_cache, meta.block_tables[i], seq_len)
        v = _gather_context(v_cache, meta.block_tables[i], seq_len)
        mask = causal_mask(query_len, seq_len, sliding_window, q.device)
        o = attention(
            q[start:end].transpose(0, 1).float(),
            k.transpose(0, 1).float(),
            v.transpose(0, 1).float(),
            mask,
            scale,
            softcap,
        )
        out[start:end] = o.transpose(0, 1).to(q.dtype)
        start = end
    return out


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm over the last dim, as transformers computes it (float32 inside, weight applied after)."""
    dtype = x.dtype
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(dtype)


def fused_add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """``residual = x + residual``; returns ``(rms_norm(residual), residual)``."""
    residual = x + residual
    return rms_norm(residual, weight, eps), residual


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """[..., 2I] -> [..., I]: ``silu(gate) * up`` with gate the first half."""
    gate, up = x.chunk(2, dim=-1)
    return F.silu(gate) * up


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary(x: torch.Tensor, positions: torch.Tensor, cos_sin_cache: torch.Tensor) -> torch.Tensor:
    """Neox/HF-style rotary embedding of x: [T, H, D] at ``positions`` [T].

    ``cos_sin_cache`` is [max_positions, R] holding cos in its first R/2 columns and sin in the rest;
    the first R dims of each head are rotated (R < D: partial rotary), the rest pass through.
    """
    cos_sin = cos_sin_cache.index_select(0, positions.long())
    cos, sin = cos_sin.chunk(2, dim=-1)
    cos = torch.cat((cos, cos), dim=-1).unsqueeze(1).to(x.dtype)
    sin = torch.cat((sin, sin), dim=-1).unsqueeze(1).to(x.dtype)
    rot_dim = cos.shape[-1]
    if rot_dim == x.shape[-1]:
        return x * cos + _rotate_half(x) * sin
    x_rot, x_pass = x[..., :rot_dim], x[..., rot_dim:]
    return torch.cat((x_rot * cos + _rotate_half(x_rot) * sin, x_pass), dim=-1)


def rotary_tables(
    positions: torch.Tensor, cos_sin_cache: torch.Tensor, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """A step's rotary tables ``(cos, sin)``, each [T, 1, R] in ``dtype``, looked up once and shared by
    every layer (`apply_rotary_tables`). cos covers both halves; sin is ``(-sin, sin)``, so that
    ``rotate_half(x) * sin_hf == cat(x2, x1) * sin`` exactly (negation is exact)."""
    cos, sin = cos_sin_cache.index_select(0, positions.long()).chunk(2, dim=-1)
    cos = torch.cat((cos, cos), dim=-1).unsqueeze(1).to(dtype)
    sin = torch.cat((-sin, sin), dim=-1).unsqueeze(1).to(dtype)
    return cos, sin


def apply_rotary_tables(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """`apply_rotary` of x ([T, H, D], any strides) with the step's `rotary_tables`; equal to it bit for bit."""
    rot_dim = cos.shape[-1]
    x_rot, x_pass = x[..., :rot_dim], x[..., rot_dim:]
    x1, x2 = x_rot.chunk(2, dim=-1)
    rotated = x_rot * cos + torch.cat((x2, x1), dim=-1) * sin
    return rotated if x_pass.shape[-1] == 0 else torch.cat((rotated, x_pass), dim=-1)
