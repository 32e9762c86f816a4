"""Linear layers. Every parameter carries a ``weight_loader`` that copies a checkpoint tensor into it.

``ColumnLinear`` (output dim may later be sharded across ranks) and ``RowLinear`` (input dim) are the
tensor-parallel hooks; without parallelism they are plain linears. ``MergedLinear`` stacks several HF
projections (q/k/v, gate/up) along the output dim so one matmul computes them all.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from server.errors import ConfigError


def default_weight_loader(param: nn.Parameter, loaded: torch.Tensor) -> None:
    """Copy a whole checkpoint tensor into ``param`` (casting to its dtype and device)."""
    if tuple(param.shape) != tuple(loaded.shape):
        raise ConfigError(
            f"Checkpoint tensor has shape {tuple(loaded.shape)}, the model expects {tuple(param.shape)}: "
            "the config does not match the weights"
        )
    with torch.no_grad():
        param.copy_(loaded)


class _Linear(nn.Module):
    def __init__(self, input_size: int, output_size: int, bias: bool = False):
        super().__init__()
        self.input_size = input_size
        self.output_size = output_size
        self.weight = nn.Parameter(torch.empty(output_size, input_size), requires_grad=False)
        self.weight.weight_loader = default_weight_loader
        if bias:
            self.bias = nn.Parameter(torch.empty(output_size), requires_grad=False)
            self.bias.weight_loader = default_weight_loader
        else:
            self.register_parameter("bias", None)
        self.packed: object | None = None  # the backend's packed weight, set by pack() after loading

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.packed is not None:
            return self.packed_linear(x, self.packed, self.bias)
        return F.linear(x, self.weight, self.bias)

    def pack(self, pack_fn, linear_fn) -> None:
        """Use a packed copy of the loaded weight from now on (and free the plain one)."""
        self.packed = pack_fn(self.weight)
        self.packed_linear = linear_fn
        self.weight.data = torch.empty(0, dtype=self.weight.dtype, device=self.weight.device)

    def extra_repr(self) -> str:
        return f"in={self.input_size}, out={self.output_size}, bias={self.bias is not None}"


class ColumnLinear(_Linear):
    """y = x W^T + b; the output dim is the one tensor parallelism would split."""


class RowLinear(_Linear):
    """y = x W^T + b; the input dim is the one tensor parallelism would split."""


class MergedLinear(_Linear):
    """Several projections of the same input stacked along the output dim.

    ``shards`` lists ``(shard_id, output_size)`` in output order, e.g. ``[("q", 512), ("k", 128),
    ("v", 128)]`` or ``[(0, I), (1, I)]``. Each parameter's ``weight_loader(param, loaded, shard_id)``
    copies one HF projection into its rows; ``param.shard_ids`` lists the shards a full load must fill.
    """

    def __init__(self, input_size: int, shards: Sequence[tuple[Hashable, int]], bias: bool = False):
        super().__init__(input_size, sum(size for _, size in shards), bias)
        offsets: dict[Hashable, tuple[int, int]] = {}
        offset = 0
        for shard_id, size in shards:
            offsets[shard_id] = (offset, size)
            offset += size
        self.shard_offsets = offsets
        for param in (self.weight, self.bias):
            if param is not None:
                param.weight_loader = self.weight_loader
                param.shard_ids = tuple(offsets)

    def output_sizes(self) -> list[int]:
        return [size for _, size in self.shard_offsets.values()]

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id: Hashable) -> None:
        if shard_id not in self.shard_offsets:
            raise ConfigError(f"Unknown shard {shard_id!r}; this layer holds {list(self.shard_offsets)}")
        offset, size = self.shard_offsets[shard_id]
        default_weight_loader(param.narrow(0, offset, size), loaded)
