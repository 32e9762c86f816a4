"""Whole model steps on CPU in each serving dtype: `python -m server.bench.cpu_dtype [--model DIR]`.

Builds one ModelRunner per dtype (random weights from config.json, the `batched` backend, packed
linears) in one process and times forward + LM head of a decode step at batch 1/8/32 (context
`--context` tokens each) and of one `--prefill`-token prefill, interleaving the dtypes round by round
so that other load on the machine falls on all of them alike. Prints the median milliseconds per
step and the load average beside it. `--model smollm2` and `--model llama-125m` write the shapes'
config.json into a temporary directory; any other value is a model directory.
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

SHAPES = {
    # SmolLM2-135M's shapes (HuggingFaceTB/SmolLM2-135M-Instruct's config.json)
    "smollm2": {"hidden_size": 576, "intermediate_size": 1536, "num_hidden_layers": 30, "num_attention_heads": 9,
                "num_key_value_heads": 3, "vocab_size": 49152, "tie_word_embeddings": True},
}


def _config_dir(name: str, tmp: Path) -> str:
    from server.bench.models import BENCH_MODELS

    if name in SHAPES or name in BENCH_MODELS:
        spec = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "max_position_embeddings": 2048,
                "rms_norm_eps": 1e-5, "rope_theta": 10000.0, **SHAPES.get(name, {}), **BENCH_MODELS.get(name, {})}
        out = tmp / name
        out.mkdir()
        (out / "config.json").write_text(json.dumps(spec))
        return str(out)
    return name


def build_runner(path: str, dtype: str, max_model_len: int):
    from server.config import CacheConfig, ModelConfig, SchedulerConfig
    from server.runner.loader import load_hf_config
    from server.runner.model_runner import ModelRunner

    model_config = ModelConfig(model=path, path=path, dtype=dtype, max_model_len=max_model_len,
                               served_model_names=("bench",), load_format="dummy", attention_backend="batched",
                               use_tqdm_on_load=False)
    cache = CacheConfig(num_blocks_override=-(-max_model_len // 16) * 32 + 8)
    return ModelRunner(model_config, cache, SchedulerConfig(max_model_len=max_model_len), load_hf_config(path))


def _step_inputs(batch: int, query: int, context: int, block_size: int = 16):
    """`batch` sequences, each with `query` new tokens ending at position `context` (own blocks each)."""
    blocks_per_seq = -(-context // block_size)
    tables = torch.arange(batch * blocks_per_seq, dtype=torch.int32).view(batch, blocks_per_seq)
    positions = torch.cat([torch.arange(context - query, context)] * batch)
    slots = torch.cat([tables[i].long()[positions[:query] // block_size] * block_size + positions[:query] % block_size
                       for i in range(batch)])
    meta = AttentionMetadata(
        slot_mapping=slots,
        query_start_loc=torch.arange(0, (batch + 1) * query, query, dtype=torch.int32),
        seq_lens=torch.full((batch,), context, dtype=torch.int32),
        block_tables=tables,
        query_lens_cpu=[query] * batch,
        seq_lens_cpu=[context] * batch,
        block_size=block_size,
    )
    meta.decode = plan_decode(meta)  # once per step, as the runner builds it (the batched backend reads it)
    ids = torch.randint(0, 1000, (batch * query,))
    last_rows = torch.arange(query - 1, batch * query, query)
    return ids, positions, meta, last_rows


@torch.inference_mode()
def time_step(runner, inputs, repeats: int) -> float:
    ids, positions, meta, last_rows = inputs
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        hidden = runner.model(ids, positions, runner.kv_caches, meta)
        runner.model.compute_logits(hidden[last_rows])
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2", help="smollm2, llama-125m or a model directory")
    p.add_argument("--dtypes", default="float32,bfloat16", help="comma list of serving dtypes")
    p.add_argument("--batches", default="1,8,32")
    p.add_argument("--context", type=int, default=256)
    p.add_argument("--prefill", type=int, default=512)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=None)
    ns = p.parse_args(argv)
    if ns.threads:
        torch.set_num_threads(ns.threads)
    with tempfile.TemporaryDirectory() as tmp:
        path = _config_dir(ns.model, Path(tmp))
        max_len = max(ns.context, ns.prefill)
        runners = {}
        for name in ns.dtypes.split(","):
            runners[name] = build_runner(path, name, max_len)
        cases = {f"decode b={b}": _step_inputs(b, 1, ns.context) for b in map(int, ns.batches.split(","))}
        cases[f"prefill {ns.prefill}"] = _step_inputs(1, ns.prefill, ns.prefill)
        results: dict[tuple[str, str], list[float]] = {}
        for _ in range(ns.rounds):
            for case, inputs in cases.items():
                for name, runner in runners.items():
                    time_step(runner, inputs, 1)  # warm-up (oneDNN picks its kernel per shape)
                    results.setdefault((case, name), []).append(time_step(runner, inputs, ns.repeats))
        load = Path("/proc/loadavg").read_text().split()[:3]
        print(f"model {ns.model}, threads {torch.get_num_threads()}, context {ns.context}, load {' '.join(load)}")
        names = list(runners)
        print("| step | " + " | ".join(f"{n} ms" for n in names) + " | " +
              " | ".join(f"{n}/{names[0]}" for n in names[1:]) + " |")
        for case in cases:
            ms = [statistics.median(results[(case, n)]) * 1e3 for n in names]
            print(f"| {case} | " + " | ".join(f"{m:.1f}" for m in ms) + " | " +
                  " | ".join(f"{m / ms[0]:.2f}" for m in ms[1:]) + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
