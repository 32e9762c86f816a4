"""Per-step attention metadata, built by the runner and passed explicitly to every attention call."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class DecodePlan:
    """Which sequences of a step decode one token, built once per step (`plan_decode`) and shared by all
    layers: the batched backend attends over all of them in one call."""

    rows: torch.Tensor  # [B] flat token row of each decode sequence
    block_tables: torch.Tensor  # [B, blocks] int64, covering the longest decode context
    seq_lens: torch.Tensor  # [B] int64
    max_len: int  # padded context length: block_tables.shape[1] * block_size
    prefill: list[tuple[int, int, int, int]]  # (seq index, first row, query_len, seq_len) of the others


@dataclass
class AttentionMetadata:
    """Describes one flat batch of T tokens from B sequences.

    Sequence i owns query tokens ``query_start_loc[i]:query_start_loc[i+1]`` of the flat batch; those
    are its last ``query_lens[i]`` tokens out of ``seq_lens[i]`` (the context length after this step).
    ``slot_mapping[t]`` is where token t's K/V are written: ``block_id * block_size + offset``.
    ``block_tables[i]`` lists the KV blocks of sequence i, padded with 0. ``decode`` is the step's
    `DecodePlan` where the backend uses one (the runner builds it once per step; None: not built).
    ``slots_padded`` is False only where the builder knows ``slot_mapping`` holds no -1 (padding),
    so the KV store can skip looking for one.
    """

    slot_mapping: torch.Tensor  # [T] int64
    query_start_loc: torch.Tensor  # [B + 1] int32
    seq_lens: torch.Tensor  # [B] int32
    block_tables: torch.Tensor  # [B, max_blocks] int32
    query_lens_cpu: list[int]
    seq_lens_cpu: list[int]
    block_size: int
    decode: DecodePlan | None = None
    slots_padded: bool = True

    @property
    def num_seqs(self) -> int:
        return len(self.seq_lens_cpu)

    @property
    def max_seq_len(self) -> int:
        return max(self.seq_lens_cpu, default=0)

    @property
    def max_query_len(self) -> int:
        return max(self.query_lens_cpu, default=0)


def prefill_spans(query_lens: list[int], seq_lens: list[int]) -> list[tuple[int, int, int, int]]:
    """(seq index, first row, query_len, seq_len) of every sequence that computes more than one token."""
    spans, start = [], 0
    for i, (query_len, seq_len) in enumerate(zip(query_lens, seq_lens)):
        if query_len > 1:
            spans.append((i, start, query_len, seq_len))
        start += query_len
    return spans


def plan_decode(meta: AttentionMetadata) -> DecodePlan:
    """The `DecodePlan` of a step: one pass over its host-side lengths and one gather of the decode rows'
    block tables, narrowed to the longest decode context."""
    decode, rows = [], []
    start = 0
    for i, query_len in enumerate(meta.query_lens_cpu):
        if query_len == 1:
            decode.append(i)
            rows.append(start)
        start += query_len
    device = meta.block_tables.device
    longest = max((meta.seq_lens_cpu[i] for i in decode), default=0)
    num_blocks = max(1, -(-longest // meta.block_size))  # >= 1: the same strides with no decode row (one graph)
    index = torch.tensor(decode, dtype=torch.long, device=device)
    return DecodePlan(
        rows=torch.tensor(rows, dtype=torch.long, device=device),
        block_tables=meta.block_tables.narrow(1, 0, num_blocks).index_select(0, index).long(),  # contiguous
        seq_lens=meta.seq_lens.index_select(0, index).long(),
        max_len=num_blocks * meta.block_size,
        prefill=prefill_spans(meta.query_lens_cpu, meta.seq_lens_cpu),
    )
