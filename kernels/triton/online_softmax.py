"""The inner step both paged attention kernels share: attend to one KV block with an online softmax."""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def attend_block(
    q, k_cache_ptr, v_cache_ptr, kv, kv_mask, visible, m, l, acc, scale, softcap,
    PRECISION: tl.constexpr, UPCAST: tl.constexpr,
):
    """Fold one block of keys/values (at offsets `kv`) into the running max `m`, sum `l` and output
    `acc` of the query rows `q`; `visible` [rows or 1, block] masks keys a row may not see. A row that
    has seen no key yet keeps m = -inf without producing NaNs. `softcap` > 0 soft-caps the scaled
    scores to softcap * tanh(s / softcap) (tanh(x) = 2 sigmoid(2x) - 1); 0 leaves them as they are."""
    k = tl.load(k_cache_ptr + kv, mask=kv_mask, other=0.0)
    v = tl.load(v_cache_ptr + kv, mask=kv_mask, other=0.0)
    if UPCAST:
        k = k.to(tl.float32)
        v = v.to(tl.float32)
    s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale
    if softcap > 0:
        s = softcap * (2.0 * tl.sigmoid(2.0 * s / softcap) - 1.0)
    s = tl.where(visible, s, float("-inf"))
    m_new = tl.maximum(m, tl.max(s, 1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    p = tl.exp(s - m_safe[:, None])
    alpha = tl.exp(m - m_safe)
    l = l * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
    return m_new, l, acc
