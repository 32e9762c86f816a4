"""Loads the model, sizes and owns the paged KV cache, and runs one scheduled step on the device."""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from itertools import accumulate

import torch

from kernels.metadata import AttentionMetadata, plan_decode
from kernels.ops import DECODE_PLAN_BACKENDS, get_ops
from server.config import CacheConfig, ModelConfig, SchedulerConfig
from server.errors import ConfigError
from server.request import Request, TokenLogprob
from server.runner import loader
from server.runner.compile import CompiledForward, use_cache_dir
from server.runner.cuda_graphs import (
    Capture,
    CudaGraphCapture,
    DecodeBuffers,
    DecodeGraphs,
)
from server.runner.kv_memory import zeroed_cpu_tensor
from server.runner.models.registry import get_model_class, kv_cache_shape_info
from server.runner.models.transformers_backend import TransformersForCausalLM
from server.runner.sampler import build_sampling_batch, gather_logprobs, sample
from server.runner.step_inputs import HostStep, block_table, pins, to_device
from server.scheduler.output import SchedulerOutput

logger = logging.getLogger(__name__)

_GiB = 1 << 30
# vLLM's long-time CPU default (VLLM_CPU_KVCACHE_SPACE=4; 0.32 sizes it from the node's free memory instead).
# Free at start-up here: pages are resident only once written (kv_memory.py).
_DEFAULT_CPU_KV_GIB = 4.0


def _available_memory_bytes() -> int | None:
    """Memory the OS can still give this process (MemAvailable), or None where it cannot say."""
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


@dataclass
class RunnerOutput:
    sampled: dict[str, int] = field(default_factory=dict)
    logprobs: dict[str, TokenLogprob] = field(default_factory=dict)
    # request id -> logprobs of prompt tokens start+1 .. covered by this step (None for token 0)
    prompt_logprobs: dict[str, list[TokenLogprob]] = field(default_factory=dict)
    # requests whose grammar is done (or refused the token): nothing may follow this step's token
    grammar_ended: set[str] = field(default_factory=set)


@dataclass
class StartupTimes:
    load_weights_s: float = 0.0
    kv_cache_s: float = 0.0
    cuda_graphs_s: float | None = None  # None: no CUDA graphs were captured
    compile_s: float | None = None  # the first compiled call (trace + Inductor); None: eager
    warmup_s: float | None = None  # the other warm-up calls, which must not compile again


class ModelRunner:
    def __init__(self, model_config: ModelConfig, cache_config: CacheConfig, scheduler_config: SchedulerConfig, hf_config):
        self.model_config = model_config
        self.cache_config = cache_config
        self.scheduler_config = scheduler_config
        self.hf_config = hf_config
        self.device = torch.device(model_config.device)
        self.dtype = loader.resolve_dtype(model_config.dtype, hf_config, self.device)
        self.block_size = cache_config.block_size
        self.times = StartupTimes()

        started = time.perf_counter()
        model_class = get_model_class(hf_config, model_config.model_impl)
        previous_dtype = torch.get_default_dtype()
        torch.set_default_dtype(self.dtype)
        try:
            try:
                ops = get_ops(self.device, model_config.attention_backend, dtype=self.dtype)
            except ValueError as exc:  # a backend that cannot run on this device
                raise ConfigError(f"--attention-backend {model_config.attention_backend}: {exc}") from None
            if model_class is not TransformersForCausalLM:
                with self.device:
                    self.model = model_class(hf_config, ops)
        finally:
            torch.set_default_dtype(previous_dtype)
        if model_class is TransformersForCausalLM:  # transformers builds and loads it (weights included)
            self.model = TransformersForCausalLM.load(
                hf_config, ops, model_config.path, self.dtype, self.device, model_config.load_format, model_config.seed
            )
        elif model_config.load_format == "dummy":
            loader.init_dummy_weights(self.model, model_config.seed)
        else:
            loader.load_weights(
                self.model, model_config.path, self.dtype, hf_config, loader.progress_bars(model_config.use_tqdm_on_load)
            )
        self.attention_backend = ops.backend
        if ops.fallback_reason:
            logger.info("Attention backend %s: the native CPU kernel is not in use (%s)", ops.backend, ops.fallback_reason)
        compile_level = self._compilation_level(model_class is not TransformersForCausalLM)
        # Inductor cannot lower oneDNN's opaque packed weights: the compiled forward gets plain ones.
        if ops.pack_linear is not None and not model_config.enforce_eager and compile_level == 0:
            for module in self.model.modules():
                if hasattr(module, "pack"):
                    module.pack(ops.pack_linear, ops.linear)
        self.model.eval()
        self.vocab_size = hf_config.vocab_size
        self.times.load_weights_s = time.perf_counter() - started

        started = time.perf_counter()
        self.num_blocks = self._size_kv_cache()
        self.kv_caches = self._allocate_kv_cache(self.num_blocks)
        self.times.kv_cache_s = time.perf_counter() - started

        self.generator = torch.Generator(device=self.device).manual_seed(model_config.seed)
        self.request_generators: dict[str, torch.Generator] = {}

        # After the KV-cache profile, which ran eagerly (Inductor's fused graph needs no more activation memory).
        self.compiled: CompiledForward | None = None
        if compile_level == 3:
            self._compile()

        # Last: the graphs record the forward as it will run (after weights, KV cache and any warm-up).
        self.graphs: DecodeGraphs | None = None
        if model_config.cuda_graph_sizes and self.device.type == "cuda":
            if ops.backend != "triton" or model_class is TransformersForCausalLM:
                logger.info(
                    "No CUDA graphs: they need a native model on the triton attention backend (here %s, %s).",
                    model_class.__name__, ops.backend,
                )
            else:
                started = time.perf_counter()
                self.capture_decode_graphs(CudaGraphCapture(self.device), model_config.cuda_graph_sizes)
                self.times.cuda_graphs_s = time.perf_counter() - started
                logger.info(
                    "Captured CUDA graphs of decode steps for batch sizes %s in %.1f s",
                    ", ".join(map(str, model_config.cuda_graph_sizes)), self.times.cuda_graphs_s,
                )

    # ---- torch.compile --------------------------------------------------------------------

    def _compilation_level(self, native: bool) -> int:
        """-O's level, or the default: compiled on CUDA, eager on CPU (measured faster there, with its
        oneDNN-packed linears; docs/benchmarks.md). Only native models compile."""
        level = self.model_config.compilation_level
        if level is None:
            return 3 if native and self.device.type == "cuda" else 0
        if level == 3 and not native:
            raise ConfigError(
                "-O3 compiles native models only; this architecture runs through transformers' modeling code, "
                "which stays eager. Drop -O3 (or pass -O0)."
            )
        return level

    def _compile(self) -> None:
        """Compile the forward at start-up: the first warm-up call compiles (phase "compile"), the others
        (phase "warmup") cover a decode of 1 and of --max-num-seqs sequences and a prefill of the step budget."""
        cache_dir = use_cache_dir(self.model_config.compile_cache_dir)
        self.compiled = CompiledForward(self.model)
        sched = self.scheduler_config
        calls = self.compiled.warm_up(
            [1, sched.max_num_seqs], sched.max_num_batched_tokens, self.kv_caches, self.block_size,
            with_decode_plan=self.attention_backend in DECODE_PLAN_BACKENDS,
        )
        self.times.compile_s, self.times.warmup_s = calls[0], sum(calls[1:])
        logger.info(
            "Compiled the forward in %.1f s, warmed up in %.1f s (compile cache: %s)",
            self.times.compile_s, self.times.warmup_s, cache_dir,
        )

    # ---- CUDA graphs ----------------------------------------------------------------------

    def capture_decode_graphs(self, capture: Capture, sizes: Sequence[int]) -> None:
        """Capture the decode forward at each of `sizes` with `capture` (`CudaGraphCapture` on CUDA); from
        then on a decode-only step of at most max(sizes) sequences replays one (`DecodeGraphs`)."""
        max_model_len = self.scheduler_config.max_model_len
        buffers = DecodeBuffers(
            max(sizes), -(-max_model_len // self.block_size), self.hf_config.hidden_size, self.dtype, self.device
        )
        graphs = DecodeGraphs(self._forward, sizes, buffers, self.block_size, max_model_len)
        with torch.inference_mode():
            graphs.capture(capture)
        self.graphs = graphs

    # ---- KV cache -------------------------------------------------------------------------

    def _bytes_per_block(self) -> int:
        num_layers, num_kv_heads, head_dim = kv_cache_shape_info(self.hf_config)
        element = torch.empty((), dtype=self.dtype).element_size()
        return 2 * num_layers * self.block_size * num_kv_heads * head_dim * element

    def _size_kv_cache(self) -> int:
        per_block = self._bytes_per_block()
        if self.cache_config.num_blocks_override:
            num_blocks = self.cache_config.num_blocks_override
        elif self.device.type == "cuda":
            num_blocks = self._profile_gpu_blocks(per_block)
        else:
            if self.cache_config.kv_cache_memory is not None:
                budget = self.cache_config.kv_cache_memory * _GiB
            else:  # enough for every sequence at full length, within a default ceiling
                tokens = self.scheduler_config.max_num_seqs * self.scheduler_config.max_model_len
                budget = min(_DEFAULT_CPU_KV_GIB * _GiB, -(-tokens // self.block_size) * per_block)
            available = _available_memory_bytes()
            if available is not None and budget > 0.9 * available:
                raise ConfigError(
                    f"The KV cache needs {budget / _GiB:.2f} GiB but only {available / _GiB:.2f} GiB of memory is "
                    f"available after loading the model; lower --kv-cache-memory (or --max-num-seqs / --max-model-len)."
                )
            num_blocks = int(budget // per_block)
        needed = -(-self.scheduler_config.max_model_len // self.block_size)
        if num_blocks < 1:
            raise ConfigError(
                f"The KV cache budget holds no block of {per_block / 2**20:.2f} MiB; raise --kv-cache-memory "
                f"or --gpu-memory-utilization."
            )
        if num_blocks < needed:
            logger.warning(
                "The KV cache holds %d tokens, fewer than --max-model-len %d; longer requests will be refused.",
                num_blocks * self.block_size,
                self.scheduler_config.max_model_len,
            )
        logger.info("KV cache: %d blocks of %d tokens (%.2f GiB)", num_blocks, self.block_size, num_blocks * per_block / _GiB)
        return num_blocks

    def _profile_gpu_blocks(self, per_block: int) -> int:
        """Run a peak-sized forward pass, then give the KV cache what the memory budget leaves."""
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(self.device)
        num_tokens = min(self.scheduler_config.max_num_batched_tokens, self.scheduler_config.max_model_len)
        num_dummy_blocks = -(-num_tokens // self.block_size)
        dummy_caches = self._allocate_kv_cache(num_dummy_blocks)
        ids = torch.zeros(num_tokens, dtype=torch.long, device=self.device)
        meta = AttentionMetadata(
            slot_mapping=torch.arange(num_tokens, dtype=torch.long, device=self.device),
            query_start_loc=torch.tensor([0, num_tokens], dtype=torch.int32, device=self.device),
            seq_lens=torch.tensor([num_tokens], dtype=torch.int32, device=self.device),
            block_tables=torch.arange(num_dummy_blocks, dtype=torch.int32, device=self.device).unsqueeze(0),
            query_lens_cpu=[num_tokens],
            seq_lens_cpu=[num_tokens],
            block_size=self.block_size,
        )
        with torch.inference_mode():
            hidden = self.model(ids, torch.arange(num_tokens, device=self.device), dummy_caches, meta)
            self.model.compute_logits(hidden[-self.scheduler_config.max_num_seqs :])
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated(self.device)
        del dummy_caches, hidden
        torch.cuda.empty_cache()
        total = torch.cuda.get_device_properties(self.device).total_memory
        free_budget = total * self.cache_config.gpu_memory_utilization - peak
        if free_budget < per_block:
            raise ConfigError(
                f"The model needs {peak / _GiB:.2f} GiB at peak; --gpu-memory-utilization "
                f"{self.cache_config.gpu_memory_utilization} of {total / _GiB:.1f} GiB leaves no room for the KV cache."
            )
        return int(free_budget // per_block)

    def _allocate_kv_cache(self, num_blocks: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        num_layers, num_kv_heads, head_dim = kv_cache_shape_info(self.hf_config)
        shape = (num_blocks, self.block_size, num_kv_heads, head_dim)
        if self.device.type == "cpu":  # zero pages from the kernel, resident only once written (kv_memory.py)
            return [(zeroed_cpu_tensor(shape, self.dtype), zeroed_cpu_tensor(shape, self.dtype)) for _ in range(num_layers)]
        return [
            (
                torch.zeros(shape, dtype=self.dtype, device=self.device),
                torch.zeros(shape, dtype=self.dtype, device=self.device),
            )
            for _ in range(num_layers)
        ]

    # ---- one step -------------------------------------------------------------------------

    def _generator_for(self, request: Request) -> torch.Generator | None:
        if request.params.seed is None:
            return None
        generator = self.request_generators.get(request.request_id)
        if generator is None:
            generator = torch.Generator(device=self.device).manual_seed(request.params.seed)
            self.request_generators[request.request_id] = generator
        return generator

    def release(self, request_id: str) -> None:
        """Forget per-request state (the seeded generator) of a finished request."""
        self.request_generators.pop(request_id, None)

    def _prepare(self, batch: SchedulerOutput) -> HostStep:
        step = HostStep()
        ids, positions, slots = step.input_ids, step.positions, step.slot_mapping
        bs = self.block_size
        for seq in batch.seqs:
            req = seq.request
            offset = len(ids)
            ids.extend(req.all_token_ids[seq.start : seq.end])
            positions.extend(range(seq.start, seq.end))
            blocks = req.block_ids
            slots.extend(blocks[p // bs] * bs + p % bs for p in range(seq.start, seq.end))
            step.query_lens.append(seq.num_new_tokens)
            step.seq_lens.append(seq.end)
            step.block_tables.append(blocks)
            if seq.samples:
                step.sample_rows.append(offset + seq.num_new_tokens - 1)
            if req.params.prompt_logprobs is not None and seq.start < req.num_prompt_tokens - 1:
                last = min(seq.end, req.num_prompt_tokens - 1)  # position `last` predicts nothing in the prompt
                rows = list(range(offset, offset + last - seq.start))
                targets = req.all_token_ids[seq.start + 1 : last + 1]
                step.prompt_rows.append((req, rows, targets))
        return step

    def _eager_inputs(self, step: HostStep) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata]:
        """The step's tensors on the device, copied from pinned host memory without a sync (on CUDA)."""
        dev = self.device
        tables = block_table(step.block_tables, len(step.block_tables), step.table_width, pins(dev))
        meta = AttentionMetadata(
            slot_mapping=to_device(step.slot_mapping, torch.long, dev),
            query_start_loc=to_device(list(accumulate(step.query_lens, initial=0)), torch.int32, dev),
            seq_lens=to_device(step.seq_lens, torch.int32, dev),
            block_tables=tables.to(dev, non_blocking=True),
            query_lens_cpu=step.query_lens,
            seq_lens_cpu=step.seq_lens,
            block_size=self.block_size,
            slots_padded=False,  # every token of an eager step has its slot
        )
        if self.attention_backend in DECODE_PLAN_BACKENDS:  # once per step, shared by every layer
            meta.decode = plan_decode(meta)
        return to_device(step.input_ids, torch.long, dev), to_device(step.positions, torch.long, dev), meta

    def _forward(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        """The model forward of one step (what a CUDA graph captures): compiled with -O3, else eager."""
        forward = self.compiled if self.compiled is not None else self.model
        return forward(input_ids, positions, self.kv_caches, meta)

    def _hidden(self, step: HostStep) -> torch.Tensor:
        """[T, hidden] of the step: a captured graph's replay where one fits, else the eager forward."""
        size = self.graphs.size_for(step) if self.graphs is not None else None
        if size is not None:
            return self.graphs.run(step, size)
        return self._forward(*self._eager_inputs(step))

    def _select_rows(self, hidden: torch.Tensor, rows: list[int]) -> torch.Tensor:
        """hidden[rows] (rows ascending); all rows without an index, else an index copied without a sync."""
        if len(rows) == hidden.shape[0]:
            return hidden
        return hidden.index_select(0, to_device(rows, torch.long, self.device))

    @torch.inference_mode()
    def execute(self, batch: SchedulerOutput) -> RunnerOutput:
        out = RunnerOutput()
        if batch.empty:
            return out
        step = self._prepare(batch)
        hidden = self._hidden(step)
        sample_rows = step.sample_rows

        for req, rows, targets in step.prompt_rows:
            logprobs = torch.log_softmax(self.model.compute_logits(self._select_rows(hidden, rows)), dim=-1)
            target = to_device(targets, torch.long, self.device)
            count = req.params.prompt_logprobs or 0
            out.prompt_logprobs[req.request_id] = gather_logprobs(logprobs, target, [count] * len(rows))

        if not sample_rows:
            return out
        sampling_reqs = [s.request for s in batch.seqs if s.samples]
        logits = self.model.compute_logits(self._select_rows(hidden, sample_rows)).float()
        generators = [self._generator_for(r) for r in sampling_reqs]
        sbatch = build_sampling_batch(sampling_reqs, self.vocab_size, self.device, generators)
        tokens = sample(logits, sbatch, self.generator)
        token_list = tokens.tolist()
        want = [i for i, n in enumerate(sbatch.num_logprobs) if n is not None]
        if want:
            logprobs = torch.log_softmax(logits[want], dim=-1)
            picked = gather_logprobs(logprobs, tokens[want], [sbatch.num_logprobs[i] for i in want])
            for i, lp in zip(want, picked):
                out.logprobs[sampling_reqs[i].request_id] = lp
        for req, token in zip(sampling_reqs, token_list):
            out.sampled[req.request_id] = token
            if req.grammar is not None and (not req.grammar.accept(token) or req.grammar.terminated):
                out.grammar_ended.add(req.request_id)
        return out
