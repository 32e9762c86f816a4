"""Per-step attention metadata, built by the runner and passed explicitly to every attention call."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class AttentionMetadata:
    """Describes one flat batch of T tokens from B sequences.

    Sequence i owns query tokens ``query_start_loc[i]:query_start_loc[i+1]`` of the flat batch; those
    are its last ``query_lens[i]`` tokens out of ``seq_lens[i]`` (the context length after this step).
    ``slot_mapping[t]`` is where token t's K/V are written: ``block_id * block_size + offset``.
    ``block_tables[i]`` lists the KV blocks of sequence i, padded with 0.
    """

    slot_mapping: torch.Tensor  # [T] int64
    query_start_loc: torch.Tensor  # [B + 1] int32
    seq_lens: torch.Tensor  # [B] int32
    block_tables: torch.Tensor  # [B, max_blocks] int32
    query_lens_cpu: list[int]
    seq_lens_cpu: list[int]
    block_size: int

    @property
    def num_seqs(self) -> int:
        return len(self.seq_lens_cpu)

    @property
    def max_seq_len(self) -> int:
        return max(self.seq_lens_cpu, default=0)

    @property
    def max_query_len(self) -> int:
        return max(self.query_lens_cpu, default=0)
