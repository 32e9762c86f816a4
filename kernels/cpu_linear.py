"""Linear layers with oneDNN-packed weights: the CPU fast path for every matmul of the model.

At decode, a CPU step is dominated by skinny matmuls (a few dozen rows against each weight). oneDNN
reorders a weight once into its blocked layout, and then multiplies 1.3-2x faster than the plain
GEMM on the row-major weight (measured here for 2 to 2048 rows). `F.linear` is the reference twin.

One row in float32 is the exception: MKL's GEMV on a plain copy of the weight, its longer dim
contiguous, reads the weight 1.2-1.6x faster than oneDNN (whose call also costs ~15-20 us fixed, in
building its primitive descriptor), so a float32 weight keeps that copy too (twice its memory). In
bfloat16 the packed call wins at every row count: the plain GEMM reorders the weight on every call.
Measurements: docs/benchmarks.md, "Linear layers at small batch".
"""

from __future__ import annotations

from dataclasses import dataclass

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


@dataclass(frozen=True)
class PackedWeight:
    """A weight [out, in] ready for `linear`."""

    blocked: torch.Tensor  # oneDNN's blocked layout (an opaque tensor only oneDNN reads)
    # float32 only: the weight as [in, out] for single rows, its longer dim contiguous (a transposed
    # view of the row-major weight where in > out, else a contiguous copy); None: always `blocked`.
    columns: torch.Tensor | None


def pack(weight: torch.Tensor) -> PackedWeight:
    weight = weight.detach().contiguous()
    columns = None
    if weight.dtype == torch.float32:
        out_features, in_features = weight.shape
        columns = weight.t() if in_features > out_features else weight.t().contiguous()
    return PackedWeight(torch.ops.mkldnn._reorder_linear_weight(weight), columns)


def linear(x: torch.Tensor, packed: PackedWeight, bias: torch.Tensor | None) -> torch.Tensor:
    """y = x W^T + b with W packed by `pack`; x is [..., in]."""
    if packed.columns is not None and x.numel() == x.shape[-1]:  # one row
        row = x.reshape(1, -1)
        y = torch.mm(row, packed.columns) if bias is None else torch.addmm(bias, row, packed.columns)
        return y.reshape(*x.shape[:-1], -1)
    return torch.ops.mkldnn._linear_pointwise(x.contiguous(), packed.blocked, bias, "none", [], "")
