"""Linear layers with oneDNN-packed weights: the CPU fast path for every matmul of the model.

At decode, a CPU step is dominated by skinny matmuls (a few dozen rows against each weight). oneDNN
reorders a weight once into its blocked layout, and then multiplies 1.3-2x faster than the plain
GEMM on the row-major weight (measured here for 1 to 2048 rows). `F.linear` is the reference twin.
"""

from __future__ import annotations

import torch

_DTYPES = (torch.float32, torch.bfloat16)


def native_bf16() -> bool:
    """Whether this CPU multiplies bfloat16 natively (AVX512-BF16 or AMX tiles). Without it oneDNN
    emulates bfloat16 with float32 instructions plus conversions, slower than float32 itself."""
    checks = [getattr(torch.cpu, name, None) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
    if all(check is None for check in checks):  # a torch without these helpers: ask the kernel
        return _cpuinfo_has_flags({"avx512_bf16", "amx_bf16"})
    return any(check is not None and check() for check in checks)


def _cpuinfo_has_flags(wanted: set[str], cpuinfo: str = "/proc/cpuinfo") -> bool:
    try:
        with open(cpuinfo) as f:
            for line in f:
                if line.startswith("flags"):
                    return bool(wanted & set(line.split(":", 1)[1].split()))
    except OSError:
        pass
    return False


def available(device: torch.device, dtype: torch.dtype) -> bool:
    return (
        device.type == "cpu"
        and dtype in _DTYPES
        and torch.backends.mkldnn.is_available()
        and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")
        and hasattr(torch.ops.mkldnn, "_linear_pointwise")
    )


def pack(weight: torch.Tensor) -> torch.Tensor:
    """The weight [out, in] in oneDNN's blocked layout (an opaque tensor only `linear` reads)."""
    return torch.ops.mkldnn._reorder_linear_weight(weight.detach().contiguous())


def linear(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """y = x W^T + b with W packed by `pack`; x is [..., in]."""
    return torch.ops.mkldnn._linear_pointwise(x.contiguous(), packed, bias, "none", [], "")
