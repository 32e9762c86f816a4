"""Frozen configuration, validated once at the edge; each part receives only its own slice."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class CacheConfig:
    block_size: int = 16
    num_blocks: int = 0  # resolved by the runner from the memory budget
    enable_prefix_caching: bool = True
    kv_cache_memory: float | None = None  # GiB; CPU default sizing
    gpu_memory_utilization: float = 0.9
    cache_dtype: str = "auto"


@dataclass(frozen=True)
class SchedulerConfig:
    max_num_batched_tokens: int = 2048  # the token budget of one step
    max_num_seqs: int = 128  # running sequences at most
    max_model_len: int = 2048  # prompt + output tokens at most
    max_queued_requests: int | None = None  # waiting requests at most; None: unbounded
