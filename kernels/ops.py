"""The one registry of ops the model layers call. Every backend provides the same callables."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from kernels import batched, cpu_attention, cpu_linear, cpu_native, cpu_small_ops, reference
from kernels.triton.dot_mode import interpreting  # no triton import: safe on CPU

BACKENDS = ("auto", "reference", "batched", "cpu", "triton")
DECODE_PLAN_BACKENDS = ("batched", "cpu")  # read the step's `DecodePlan`, built once per step by the runner


@dataclass(frozen=True)
class Ops:
    """The ops a model needs; signatures are those of ``kernels.reference``."""

    store_kvcache: Callable[..., None]
    paged_attention: Callable[..., torch.Tensor]
    rms_norm: Callable[..., torch.Tensor]
    fused_add_rms_norm: Callable[..., tuple[torch.Tensor, torch.Tensor]]
    silu_and_mul: Callable[..., torch.Tensor]
    apply_rotary_tables: Callable[..., torch.Tensor]  # with the step's `reference.rotary_tables`
    store_kvcache_unpadded: Callable[..., None]  # store_kvcache where slot_mapping holds no -1
    backend: str = "reference"
    fallback_reason: str = ""  # why `auto` did not pick the native CPU kernels (logged at start-up)
    # Linear layers: `pack_linear(weight)` once after loading (None: keep the plain weight), then
    # `linear(x, packed, bias)` every step.
    pack_linear: Callable[[torch.Tensor], torch.Tensor] | None = None
    linear: Callable[..., torch.Tensor] | None = None


def get_ops(device: torch.device, backend: str = "auto", dtype: torch.dtype = torch.float32) -> Ops:
    """The ops for ``device``. ``auto`` picks the fastest backend that runs there; ``reference`` is the
    plain-torch oracle; ``batched`` batches all decode sequences of a step into one attention call, runs
    the small per-layer ops in fewer torch calls (`kernels.cpu_small_ops`) and, on CPU, runs the linear
    layers on oneDNN-packed weights; ``cpu`` (the default on CPU where a C compiler builds
    `kernels.cpu_native`) is ``batched`` with decode attention read from the paged cache in place by the
    native kernel; ``triton`` (the default on CUDA) stores K/V and attends over the paged cache in place
    with the kernels of ``kernels.triton``."""
    native, why_not = None, ""
    if backend == "auto":
        if device.type == "cuda":
            backend = "triton"
        else:
            native, why_not = cpu_native.load()
            backend = "cpu" if native is not None else "batched"
    if backend not in BACKENDS:
        raise ValueError(f"Unknown kernel backend {backend!r} for device {device}. Available: {', '.join(BACKENDS)}")
    store_kvcache, paged_attention = reference.store_kvcache, reference.paged_attention
    small = rotary = reference
    store_unpadded = reference.store_kvcache
    if backend in DECODE_PLAN_BACKENDS:
        paged_attention = batched.paged_attention
        small = rotary = cpu_small_ops
        store_unpadded = cpu_small_ops.store_kvcache_unpadded
    if backend == "cpu":
        if device.type != "cpu":
            raise ValueError("the cpu backend runs on CPU only")
        if native is None:
            native, why_not = cpu_native.load()
        if native is None:
            raise ValueError(f"its native kernel is not available: {why_not}")
        paged_attention = cpu_attention.CpuPagedAttention(native)
        small = native  # rms_norm, fused_add_rms_norm, silu_and_mul in one pass each (rotary stays torch's)
    elif backend == "triton":
        if device.type != "cuda" and not interpreting():
            raise ValueError("the Triton kernels need a CUDA device (on CPU they run only under TRITON_INTERPRET=1, in tests).")
        from kernels.triton import kv_store, paged_attention as triton_attention  # imports triton: only here

        store_kvcache, paged_attention = kv_store.store_kvcache, triton_attention.paged_attention
        store_unpadded = store_kvcache
    return Ops(
        store_kvcache=store_kvcache,
        paged_attention=paged_attention,
        rms_norm=small.rms_norm,
        fused_add_rms_norm=small.fused_add_rms_norm,
        silu_and_mul=small.silu_and_mul,
        apply_rotary_tables=rotary.apply_rotary_tables,
        store_kvcache_unpadded=store_unpadded,
        backend=backend,
        fallback_reason=why_not,
        **(
            {"pack_linear": cpu_linear.pack, "linear": cpu_linear.linear}
            if backend in DECODE_PLAN_BACKENDS and cpu_linear.available(device, dtype)
            else {}
        ),
    )
