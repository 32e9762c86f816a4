"""One engine step on CPU, eager (the default: batched attention, oneDNN-packed linears) against -O3
(the same model through torch.compile), interleaved in one process; prints one JSON line per model.

    OMP_WAIT_POLICY=PASSIVE python scripts/compile_cpu_bench.py smollm2 float32 [--cache-dir DIR]

Models (random weights, built in a temp dir): `smollm2` (SmolLM2-135M's shape: 30 layers, hidden 576,
9/3 heads, intermediate 1536, vocab 49152, tied) and `llama-125m` (`pagedserve bench make-model`).
Steps: decode of 1, 8 and 32 sequences at 256 tokens of context, and a 512-token prefill; the time of
a step is the forward plus the logits of its last rows (median of the repeats after the first).
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

from kernels.metadata import AttentionMetadata, plan_decode
from server.bench.models import BENCH_MODELS
from server.config import CacheConfig, ModelConfig, SchedulerConfig
from server.demo import make_tiny_model
from server.runner.loader import load_hf_config
from server.runner.model_runner import ModelRunner

SMOLLM2 = {
    "hidden_size": 576, "intermediate_size": 1536, "num_hidden_layers": 30, "num_attention_heads": 9,
    "num_key_value_heads": 3, "vocab_size": 49152, "max_position_embeddings": 2048, "rms_norm_eps": 1e-5,
    "tie_word_embeddings": True, "rope_parameters": {"rope_type": "default", "rope_theta": 100000.0},
}
STEPS = (("decode1", 1, 1, 256), ("decode8", 8, 1, 256), ("decode32", 32, 1, 256), ("prefill512", 1, 512, 512))


def runner(path: str, dtype: str, level: int, cache_dir: str | None) -> ModelRunner:
    config = ModelConfig(
        model=path, path=path, dtype=dtype, max_model_len=2048, served_model_names=("bench",), load_format="dummy",
        attention_backend="batched", use_tqdm_on_load=False, compilation_level=level, compile_cache_dir=cache_dir,
    )
    scheduler = SchedulerConfig(max_model_len=2048, max_num_seqs=32, max_num_batched_tokens=512)
    return ModelRunner(config, CacheConfig(num_blocks_override=32 * 16 + 40), scheduler, load_hf_config(path))


def step(batch: int, query: int, context: int, block_size: int = 16):
    per_seq = -(-context // block_size)
    tables = torch.arange(batch * per_seq, dtype=torch.int32).view(batch, per_seq)
    positions = torch.cat([torch.arange(context - query, context)] * batch)
    offsets = positions[:query]
    slots = torch.cat([tables[i].long()[offsets // block_size] * block_size + offsets % block_size for i in range(batch)])
    meta = AttentionMetadata(
        slots, torch.arange(0, (batch + 1) * query, query, dtype=torch.int32), torch.full((batch,), context, dtype=torch.int32),
        tables, [query] * batch, [context] * batch, block_size,
    )
    meta.decode = plan_decode(meta)
    return torch.randint(0, 1000, (batch * query,)), positions, meta, torch.arange(query - 1, batch * query, query)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("model", choices=("smollm2", "llama-125m"))
    parser.add_argument("dtype", choices=("float32", "bfloat16"))
    parser.add_argument("--cache-dir", default=None, help="-O3's compile cache (default: the engine's)")
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    path = tempfile.mkdtemp(prefix="compile-bench-")
    make_tiny_model(path, "llama", **(SMOLLM2 if args.model == "smollm2" else BENCH_MODELS["llama-125m"]))
    runners = {"eager": runner(path, args.dtype, 0, None)}
    started = time.perf_counter()
    runners["compiled"] = runner(path, args.dtype, 3, args.cache_dir)
    result = {"model": args.model, "dtype": args.dtype, "compiled_start_up_s": round(time.perf_counter() - started, 1)}
    with torch.inference_mode():
        for name, batch, query, context in STEPS:
            ids, positions, meta, last = step(batch, query, context)
            times = {variant: [] for variant in runners}
            for _ in range(args.repeats if query == 1 else max(3, args.repeats // 2)):
                for variant, r in runners.items():  # A/B interleaved
                    begin = time.perf_counter()
                    r.model.compute_logits(r._forward(ids, positions, meta)[last])
                    times[variant].append(time.perf_counter() - begin)
            result[name] = {variant: round(statistics.median(t[1:]) * 1000, 1) for variant, t in times.items()}
            result[name]["loadavg"] = Path("/proc/loadavg").read_text().split()[0]
            print(name, result[name], flush=True)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
