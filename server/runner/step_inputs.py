"""A step's input tensors, built on the host and copied to the device without a sync.

On CUDA the host tensors are pinned, so a ``non_blocking`` copy neither waits for the device nor
stages through pageable memory (which can synchronise with the stream). torch's caching host
allocator keeps a pinned block until the copy that reads it has run, so a later step never
overwrites inputs still in flight, even when a step ends without reading anything back.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from itertools import chain

import numpy as np
import torch

from server.request import Request


def pins(device: torch.device) -> bool:
    """Whether host inputs for `device` are pinned (only CUDA has a pinned-memory allocator here)."""
    return device.type == "cuda"


def host_tensor(values: Sequence, dtype: torch.dtype, pin: bool) -> torch.Tensor:
    return torch.tensor(values, dtype=dtype, pin_memory=pin)


def to_device(values: Sequence, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """`values` as a tensor on `device`, copied from (pinned) host memory without waiting."""
    return host_tensor(values, dtype, pins(device)).to(device, non_blocking=True)


def block_table(tables: Sequence[Sequence[int]], num_rows: int, width: int, pin: bool) -> torch.Tensor:
    """[num_rows, width] int32 host tensor: row i holds tables[i] then 0s; rows past len(tables) are all 0.

    One flat array written through a row-length mask: no python loop per row. Every table must
    fit in `width`.
    """
    out = torch.zeros((num_rows, width), dtype=torch.int32, pin_memory=pin)
    lengths = np.fromiter(map(len, tables), dtype=np.int64, count=len(tables))
    mask = np.arange(width) < lengths[:, None]
    out.numpy()[: len(tables)][mask] = np.fromiter(chain.from_iterable(tables), dtype=np.int32, count=int(lengths.sum()))
    return out


@dataclass
class HostStep:
    """One step's inputs as host lists: per token (flat, sequence after sequence) or per sequence."""

    input_ids: list[int] = field(default_factory=list)
    positions: list[int] = field(default_factory=list)
    slot_mapping: list[int] = field(default_factory=list)
    query_lens: list[int] = field(default_factory=list)
    seq_lens: list[int] = field(default_factory=list)
    block_tables: list[list[int]] = field(default_factory=list)
    sample_rows: list[int] = field(default_factory=list)  # flat row of the last token of each sampling sequence
    # (request, flat rows, target token ids) of the prompt tokens whose logprobs a request asked for
    prompt_rows: list[tuple[Request, list[int], list[int]]] = field(default_factory=list)

    @property
    def table_width(self) -> int:
        """The longest block table (at least 1, so that a table tensor always has a column)."""
        return max(1, max(map(len, self.block_tables), default=0))
