"""How the attention kernels run their `tl.dot`s for a dtype, and whether Triton interprets them on the CPU."""

from __future__ import annotations

import os

import torch


def interpreting() -> bool:
    """Whether Triton runs its CPU interpreter (TRITON_INTERPRET=1) instead of compiling for a GPU."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def dot_mode(dtype: torch.dtype) -> tuple[str, bool]:
    """(input precision, upcast operands to float32 first).

    float32 keeps full IEEE precision (no TF32), so it matches the reference to float32 rounding.
    Half types multiply natively on the GPU with float32 accumulation. Triton's CPU interpreter
    multiplies bfloat16 operands wrongly (it sees their raw bits), so there they are upcast first:
    the interpreter then checks everything but the bfloat16 MMA itself, which the GPU check covers.
    """
    if dtype == torch.float32:
        return "ieee", False
    return "tf32", interpreting() and dtype == torch.bfloat16
