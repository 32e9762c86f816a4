"""The CPU KV cache's memory: zero-filled by the kernel page by page as it is first touched, not up front.

`torch.zeros` of a 4 GiB cache writes every byte before the server is ready (2-3 s on an idle 2-core
machine, over 20 s under memory pressure) and makes all of it resident at once. An anonymous private
mapping reads as zeros by the kernel's guarantee (mmap(2): "the mapping is not backed by any file; its
contents are initialized to zero"), so its blocks hold exactly what `torch.zeros` would write (no NaN/Inf
bit patterns can reach masked attention), and a page costs memory only once a block on it is written.
`torch.empty` would be free too, but reuses whatever the allocator hands back, with no such guarantee.
"""

from __future__ import annotations

import math
import mmap

import torch


def zeroed_cpu_tensor(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """A CPU tensor of zeros over an anonymous mapping (page aligned; the tensor keeps the mapping alive)."""
    nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
    if nbytes == 0:
        return torch.zeros(shape, dtype=dtype)
    pages = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    return torch.frombuffer(pages, dtype=dtype).view(shape)
