"""Random paged-attention steps shared by the kernel parity tests."""

from __future__ import annotations

import random

import torch

from kernels.metadata import AttentionMetadata


def random_step(seed: int, block_size: int, num_blocks: int, lens: list[tuple[int, int]], device="cpu"):
    """A flat batch of sequences given as (query_len, seq_len), with shuffled block tables."""
    rng = random.Random(seed)
    free = list(range(num_blocks))
    rng.shuffle(free)
    tables, slots = [], []
    for query_len, seq_len in lens:
        blocks = [free.pop() for _ in range(-(-seq_len // block_size))]
        tables.append(blocks)
        for p in range(seq_len - query_len, seq_len):
            slots.append(blocks[p // block_size] * block_size + p % block_size)
    width = max(len(t) for t in tables)
    table = torch.zeros(len(tables), width, dtype=torch.int32)
    for i, t in enumerate(tables):
        table[i, : len(t)] = torch.tensor(t)
    starts = [0]
    for q, _ in lens:
        starts.append(starts[-1] + q)
    return AttentionMetadata(
        slot_mapping=torch.tensor(slots),
        query_start_loc=torch.tensor(starts, dtype=torch.int32),
        seq_lens=torch.tensor([s for _, s in lens], dtype=torch.int32),
        block_tables=table,
        query_lens_cpu=[q for q, _ in lens],
        seq_lens_cpu=[s for _, s in lens],
        block_size=block_size,
    )
