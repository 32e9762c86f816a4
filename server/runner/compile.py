"""The model forward through `torch.compile` (Inductor), one graph for every batch size.

How to call it: ``forward = CompiledForward(model)`` once, then ``forward(input_ids, positions,
kv_caches, meta)`` exactly as ``model(...)``; ``forward.warm_up(...)`` compiles ahead of serving. The
token count T and the sequence count B of a step are symbolic: every per-step dimension of the
inputs (tokens, sequences, block-table width, the decode plan's rows) is marked unbacked before each
call, so Dynamo neither specialises on a size nor on 0 and 1, and batch sizes 1..N share one graph.
Attention and the KV store are one custom op (`kernels.attention_op`), so the graph never breaks;
`fullgraph=True` makes a break an error instead of a silent slowdown.

Compiled artifacts (Inductor's FX-graph and AOTAutograd caches, and Triton's kernels) live under one
directory, `TORCHINDUCTOR_CACHE_DIR`; `use_cache_dir` sets it in the environment of the engine process
at start-up so that a restart loads the compiled graph instead of compiling it again.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import torch
from torch import nn

from kernels.metadata import AttentionMetadata, plan_decode

CACHE_DIR_ENV = "TORCHINDUCTOR_CACHE_DIR"


def default_cache_dir() -> str:
    return str(Path.home() / ".cache" / "pagedserve" / "torch_compile")


def use_cache_dir(cache_dir: str | None) -> str:
    """Point Inductor's caches at ``cache_dir`` (default: TORCHINDUCTOR_CACHE_DIR if set, else
    ~/.cache/pagedserve/torch_compile) for this process; returns the directory used."""
    directory = cache_dir or os.environ.get(CACHE_DIR_ENV) or default_cache_dir()
    directory = os.path.abspath(os.path.expanduser(directory))
    os.makedirs(directory, exist_ok=True)
    os.environ[CACHE_DIR_ENV] = directory
    return directory


def _mark_step_dims(input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata) -> None:
    """Mark every per-step dimension unbacked: no specialisation, no 0/1 special case."""
    for tensor, dims in (
        (input_ids, (0,)),
        (positions, (0,)),
        (meta.slot_mapping, (0,)),
        (meta.query_start_loc, (0,)),
        (meta.seq_lens, (0,)),
        (meta.block_tables, (0, 1)),
    ):
        torch._dynamo.decorators.mark_unbacked(tensor, dims)
    if meta.decode is not None:
        torch._dynamo.decorators.mark_unbacked(meta.decode.rows, 0)
        torch._dynamo.decorators.mark_unbacked(meta.decode.block_tables, (0, 1))
        torch._dynamo.decorators.mark_unbacked(meta.decode.seq_lens, 0)


class CompiledForward:
    """``model(input_ids, positions, kv_caches, meta)`` compiled by Inductor, with symbolic batch sizes."""

    def __init__(self, model: nn.Module):
        self.model = model
        self._compiled = torch.compile(model, fullgraph=True, dynamic=False)

    def __call__(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        kv_caches: list[tuple[torch.Tensor, torch.Tensor]],
        meta: AttentionMetadata,
    ) -> torch.Tensor:
        _mark_step_dims(input_ids, positions, meta)
        return self._compiled(input_ids, positions, kv_caches, meta)

    @torch.inference_mode()
    def warm_up(
        self,
        decode_sizes: list[int],
        prefill_tokens: int,
        kv_caches: list[tuple[torch.Tensor, torch.Tensor]],
        block_size: int,
        with_decode_plan: bool,
    ) -> list[float]:
        """Run a decode step of each of ``decode_sizes`` sequences, then a prefill of ``prefill_tokens``
        tokens, reading block 0 and writing nowhere (every slot is -1). The first call compiles; the rest
        must not. Returns the seconds of each call."""
        device = kv_caches[0][0].device
        seconds = []
        for num_seqs, query_len in [(n, 1) for n in decode_sizes] + [(1, prefill_tokens)]:
            num_tokens = num_seqs * query_len
            seq_len = max(query_len, 2)
            meta = AttentionMetadata(
                slot_mapping=torch.full((num_tokens,), -1, dtype=torch.long, device=device),
                query_start_loc=torch.arange(0, num_tokens + 1, query_len, dtype=torch.int32, device=device),
                seq_lens=torch.full((num_seqs,), seq_len, dtype=torch.int32, device=device),
                block_tables=torch.zeros((num_seqs, -(-seq_len // block_size)), dtype=torch.int32, device=device),
                query_lens_cpu=[query_len] * num_seqs,
                seq_lens_cpu=[seq_len] * num_seqs,
                block_size=block_size,
            )
            if with_decode_plan:
                meta.decode = plan_decode(meta)
            ids = torch.zeros(num_tokens, dtype=torch.long, device=device)
            positions = torch.arange(seq_len - query_len, seq_len, device=device).repeat(num_seqs)
            started = time.perf_counter()
            self(ids, positions, kv_caches, meta)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            seconds.append(time.perf_counter() - started)
        return seconds
