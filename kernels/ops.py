"""The one registry of ops the model layers call. Every backend provides the same callables."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from kernels import reference

BACKENDS = ("reference",)


@dataclass(frozen=True)
class Ops:
    """The ops a model needs; signatures are those of ``kernels.reference``."""

    store_kvcache: Callable[..., None]
    paged_attention: Callable[..., torch.Tensor]
    rms_norm: Callable[..., torch.Tensor]
    fused_add_rms_norm: Callable[..., tuple[torch.Tensor, torch.Tensor]]
    silu_and_mul: Callable[..., torch.Tensor]
    apply_rotary: Callable[..., torch.Tensor]
    backend: str = "reference"


def get_ops(device: torch.device, backend: str = "reference") -> Ops:
    """The ops for ``device``. Only the plain-torch reference backend exists so far; it runs anywhere."""
    if backend == "reference":
        return Ops(
            store_kvcache=reference.store_kvcache,
            paged_attention=reference.paged_attention,
            rms_norm=reference.rms_norm,
            fused_add_rms_norm=reference.fused_add_rms_norm,
            silu_and_mul=reference.silu_and_mul,
            apply_rotary=reference.apply_rotary,
            backend="reference",
        )
    raise ValueError(f"Unknown kernel backend {backend!r} for device {device}. Available: {', '.join(BACKENDS)}")
