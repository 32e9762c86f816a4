"""CUDA graphs of decode steps: the static buffers a captured forward reads and writes, how a step is
padded into them, capture and replay. (Which sizes are captured: `server.config.cuda_graph_sizes`.)

A CUDA graph replays the kernels it recorded on the memory it recorded, so a captured forward reads
its inputs from persistent buffers and writes its output into one. A step copies its inputs into the
first rows of those buffers (non-blocking, from pinned host memory), pads the batch up to the next
captured size, replays, and reads back its own rows. Only decode-only steps (every sequence brings
one token) of at most the largest size replay; every other step runs eagerly (`ModelRunner`).

Padded rows: token 0 at position 0, slot -1 (the KV store writes nothing for it), context length 1
over block 0 (attention reads one cached token and writes only its own row). Every layer treats rows
independently, so padding changes no real row.

What the forward reads on the host is fixed at capture: the metadata's host lists hold the bounds
every replay stays within (query length 1; context at most max_model_len, from which the Triton
decode kernel sizes its split count), the device tensors hold each step's real values. Only the
Triton attention backend reads nothing else from those lists; the reference and batched backends
loop over them on the host and are never captured.

Everything but `CudaGraphCapture` makes no CUDA call, so it is tested on CPU with an eager stand-in
for capture and replay.
"""

from __future__ import annotations

import bisect
from collections.abc import Callable, Sequence

import torch

from kernels.metadata import AttentionMetadata
from server.runner.step_inputs import HostStep, block_table, host_tensor, pins

# forward(input_ids [T], positions [T], meta) -> hidden [T, H]
Forward = Callable[[torch.Tensor, torch.Tensor, AttentionMetadata], torch.Tensor]
# capture(step) records `step` (a call with no arguments) and returns what replays it
Capture = Callable[[Callable[[], None]], Callable[[], None]]


def padded_size(num_seqs: int, sizes: Sequence[int]) -> int | None:
    """The smallest of `sizes` (ascending) that holds `num_seqs` rows, or None when none does."""
    i = bisect.bisect_left(sizes, num_seqs)
    return sizes[i] if i < len(sizes) else None


class DecodeBuffers:
    """The persistent inputs and output of the captured decode forwards: `max_size` rows each, of which a
    graph of size s uses the first s. Padding values are set here once; `load` writes each step's."""

    def __init__(self, max_size: int, max_blocks_per_seq: int, hidden_size: int, dtype: torch.dtype, device: torch.device):
        self.device = torch.device(device)
        self.max_size = max_size
        self.max_blocks_per_seq = max_blocks_per_seq
        self.input_ids = torch.zeros(max_size, dtype=torch.long, device=device)
        self.positions = torch.zeros(max_size, dtype=torch.long, device=device)
        self.slot_mapping = torch.full((max_size,), -1, dtype=torch.long, device=device)
        self.seq_lens = torch.ones(max_size, dtype=torch.int32, device=device)
        self.block_tables = torch.zeros((max_size, max_blocks_per_seq), dtype=torch.int32, device=device)
        # one token per sequence: row i is sequence i's, for every step
        self.query_start_loc = torch.arange(max_size + 1, dtype=torch.int32, device=device)
        self.hidden = torch.zeros((max_size, hidden_size), dtype=dtype, device=device)

    def metadata(self, size: int, block_size: int, max_model_len: int) -> AttentionMetadata:
        """The metadata a graph of `size` rows is captured with: views of the buffers, and as host lists
        the bounds of every replay (one query token, at most max_model_len of context)."""
        return AttentionMetadata(
            slot_mapping=self.slot_mapping[:size],
            query_start_loc=self.query_start_loc[: size + 1],
            seq_lens=self.seq_lens[:size],
            block_tables=self.block_tables[:size],
            query_lens_cpu=[1] * size,
            seq_lens_cpu=[max_model_len] * size,
            block_size=block_size,
        )

    def load(self, step: HostStep, size: int) -> None:
        """Copy a decode step's inputs into the first `size` rows, its rows padded as the module says.

        Table columns past the step's widest table keep older entries: attention reads only the
        blocks a row's context covers."""
        num_seqs = len(step.input_ids)
        pad = size - num_seqs
        pin = pins(self.device)
        for buffer, values, dtype in (
            (self.input_ids, step.input_ids + [0] * pad, torch.long),
            (self.positions, step.positions + [0] * pad, torch.long),
            (self.slot_mapping, step.slot_mapping + [-1] * pad, torch.long),
            (self.seq_lens, step.seq_lens + [1] * pad, torch.int32),
        ):
            buffer[:size].copy_(host_tensor(values, dtype, pin), non_blocking=True)
        width = step.table_width
        self.block_tables[:size, :width].copy_(block_table(step.block_tables, size, width, pin), non_blocking=True)


class DecodeGraphs:
    """One captured decode forward per size, all over one `DecodeBuffers`."""

    def __init__(self, forward: Forward, sizes: Sequence[int], buffers: DecodeBuffers, block_size: int, max_model_len: int):
        if not sizes or max(sizes) > buffers.max_size:
            raise ValueError(f"capture sizes {list(sizes)} must be non-empty and fit {buffers.max_size} buffer rows")
        self.forward = forward
        self.sizes = tuple(sorted(set(sizes)))
        self.buffers = buffers
        self.block_size = block_size
        self.max_model_len = max_model_len
        self._replays: dict[int, Callable[[], None]] = {}

    def capture(self, capture: Capture) -> None:
        """Record the forward at every size, largest first (graphs sharing a memory pool then reuse the
        largest one's memory)."""
        for size in reversed(self.sizes):
            self._replays[size] = capture(self._step(size))

    def _step(self, size: int) -> Callable[[], None]:
        buffers = self.buffers
        input_ids, positions, hidden = buffers.input_ids[:size], buffers.positions[:size], buffers.hidden[:size]
        meta = buffers.metadata(size, self.block_size, self.max_model_len)

        def step() -> None:
            hidden.copy_(self.forward(input_ids, positions, meta))

        return step

    def size_for(self, step: HostStep) -> int | None:
        """The captured size `step` replays at, or None (run it eagerly): every sequence brings one token,
        there are at most the largest size of them and their block tables fit the buffer."""
        if not step.query_lens or any(n != 1 for n in step.query_lens):
            return None
        if step.table_width > self.buffers.max_blocks_per_seq:
            return None
        return padded_size(len(step.query_lens), self.sizes)

    def run(self, step: HostStep, size: int) -> torch.Tensor:
        """Replay the graph of `size` on `step` (see `size_for`); returns [num_seqs, hidden], a view of the
        output buffer that the next replay overwrites."""
        self.buffers.load(step, size)
        self._replays[size]()
        return self.buffers.hidden[: len(step.input_ids)]


class CudaGraphCapture:
    """`Capture` on CUDA: each step runs once eagerly (Triton compiles its kernels and the allocator
    settles outside the capture), then is recorded as a CUDA graph; all graphs share one memory pool."""

    def __init__(self, device: torch.device):
        self.device = device
        self.pool = torch.cuda.graph_pool_handle()
        self.graphs: list[torch.cuda.CUDAGraph] = []

    def __call__(self, step: Callable[[], None]) -> Callable[[], None]:
        step()
        torch.cuda.synchronize(self.device)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            step()
        self.graphs.append(graph)
        return graph.replay
