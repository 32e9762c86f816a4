"""`pagedserve bench offline`: generation throughput without HTTP.

Backends, on the same model and token-id prompts (greedy, EOS ignored so every request makes
exactly its output length):
- `pagedserve`: `server.LLM(...).generate(prompt_ids, SamplingParams(...))`, continuous batching;
- `hf`: transformers' static `model.generate` over left-padded batches of `--max-num-seqs`
  prompts; a batch runs until its longest request is done (only requested tokens are counted);
- `hf-cb`: transformers' continuous batching (`generate_batch`'s manager, paged cache), one
  `max_new_tokens` per request.
"""

from __future__ import annotations

import argparse
import gc
import os
import resource
import time
from typing import Any

from server.bench.datasets import WorkloadSpec, build_workload
from server.bench.stats import load_average


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _torch_dtype(name: str):
    import torch

    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def run_pagedserve(ns: argparse.Namespace, prompts: list[list[int]], outputs: list[int]) -> tuple[float, int]:
    from server import LLM, SamplingParams

    kwargs = {"dtype": ns.dtype, "max_model_len": ns.max_model_len, "kv_cache_memory": ns.kv_cache_memory,
              "max_num_seqs": ns.max_num_seqs}
    if ns.max_num_batched_tokens:
        kwargs["max_num_batched_tokens"] = ns.max_num_batched_tokens
    llm = LLM(ns.model, **kwargs)
    llm.generate([prompts[0][:8]], SamplingParams(temperature=0, max_tokens=2, ignore_eos=True), use_tqdm=False)
    params = [SamplingParams(temperature=0, max_tokens=o, ignore_eos=True) for o in outputs]
    start = time.perf_counter()
    results = llm.generate(prompts, params, use_tqdm=True)
    elapsed = time.perf_counter() - start
    made = sum(len(r.outputs[0].token_ids) for r in results)
    del llm
    return elapsed, made


def _load_hf(ns: argparse.Namespace):
    from transformers import AutoModelForCausalLM

    from server.demo import ensure_demo_model

    path = ns.model or str(ensure_demo_model())
    model = AutoModelForCausalLM.from_pretrained(path, dtype=_torch_dtype(ns.dtype))
    model.eval()
    return model


def run_hf(ns: argparse.Namespace, prompts: list[list[int]], outputs: list[int]) -> tuple[float, int]:
    import torch

    model = _load_hf(ns)
    pad = model.generation_config.pad_token_id
    pad = 0 if pad is None else (pad[0] if isinstance(pad, list) else pad)
    batch = max(1, ns.max_num_seqs)

    def generate(chunk: list[list[int]], new_tokens: int) -> torch.Tensor:
        width = max(len(p) for p in chunk)
        ids = torch.tensor([[pad] * (width - len(p)) + p for p in chunk])
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in chunk])
        with torch.inference_mode():
            return model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new_tokens,
                                  min_new_tokens=new_tokens, do_sample=False, pad_token_id=pad)

    generate([prompts[0][:8]], 2)  # warm-up
    start = time.perf_counter()
    made = 0
    for i in range(0, len(prompts), batch):
        chunk, outs = prompts[i:i + batch], outputs[i:i + batch]
        out = generate(chunk, max(outs))
        made += sum(min(o, out.shape[1] - max(len(p) for p in chunk)) for o, p in zip(outs, chunk))
    elapsed = time.perf_counter() - start
    return elapsed, made


def run_hf_cb(ns: argparse.Namespace, prompts: list[list[int]], outputs: list[int]) -> tuple[float, int]:
    from transformers import GenerationConfig
    from transformers.generation.configuration_utils import ContinuousBatchingConfig

    model = _load_hf(ns)
    config = GenerationConfig(do_sample=False, max_new_tokens=max(outputs), eos_token_id=-1, pad_token_id=0)
    page = 256
    need_pages = sum(-(-(len(p) + o) // page) for p, o in zip(prompts, outputs)) + 8
    cb = ContinuousBatchingConfig(page_size=page, num_blocks=need_pages,
                                  max_batch_tokens=ns.max_num_batched_tokens or 2048,
                                  max_requests_per_batch=ns.max_num_seqs, use_cuda_graph=False)
    made = 0
    with model.continuous_batching_context_manager(generation_config=config, continuous_batching_config=cb,
                                                   block=True, timeout=30, warmup=False) as manager:
        warm = manager.add_request(prompts[0][:8], max_new_tokens=2, eos_token_id=-1)
        while True:
            r = manager.get_result(request_id=warm, timeout=60)
            if r is not None and r.is_finished():
                break
        start = time.perf_counter()
        ids = [manager.add_request(p, max_new_tokens=o, eos_token_id=-1) for p, o in zip(prompts, outputs)]
        pending = set(ids)
        while pending:
            result = manager.get_result(timeout=1)
            if result is None:
                if not manager.is_running():
                    raise RuntimeError("transformers' continuous batching loop stopped")
                continue
            if result.is_finished() and result.request_id in pending:
                pending.discard(result.request_id)
                made += len(result.generated_tokens)
        elapsed = time.perf_counter() - start
    del model
    return elapsed, made


BACKENDS = {"pagedserve": run_pagedserve, "hf": run_hf, "hf-cb": run_hf_cb}


def run_offline(ns: argparse.Namespace, spec: WorkloadSpec) -> dict[str, Any]:
    import torch
    from transformers import AutoTokenizer

    from server.demo import ensure_demo_model

    if ns.threads:
        torch.set_num_threads(ns.threads)
    model_dir = ns.model or str(ensure_demo_model())
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    requests = build_workload(spec, tokenizer, ns.max_model_len)
    prompts = [r.prompt_ids for r in requests]
    outputs = [r.output_len for r in requests]
    rows = []
    for name in ns.backend:
        gc.collect()
        load_start, cpu_start = load_average(), _cpu_seconds()
        elapsed, made = BACKENDS[name](ns, prompts, outputs)
        cpu = _cpu_seconds() - cpu_start
        input_tokens = sum(len(p) for p in prompts)
        rows.append({
            "backend": name,
            "elapsed_s": elapsed,
            "requests": len(prompts),
            "input_tokens": input_tokens,
            "output_tokens": made,
            "expected_output_tokens": sum(outputs),
            "request_throughput": len(prompts) / elapsed,
            "output_throughput": made / elapsed,
            "total_token_throughput": (input_tokens + made) / elapsed,
            "process_cpu_seconds": cpu,  # includes loading the model
            "loadavg_start": load_start,
            "loadavg_end": load_average(),
        })
        print(f"{name}: {made} tokens in {elapsed:.2f}s = {made / elapsed:.1f} output tok/s "
              f"(load {load_average()[:1]})", flush=True)
    return {
        "model": model_dir,
        "dtype": ns.dtype,
        "threads": torch.get_num_threads(),
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
        "workload": spec.describe(),
        "num_prompts": len(prompts),
        "max_num_seqs": ns.max_num_seqs,
        "rows": rows,
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
    }


def format_offline(result: dict[str, Any]) -> str:
    head = (f"Offline throughput: {result['workload']}, {result['num_prompts']} requests, {result['dtype']}, "
            f"{result['threads']} threads, batch {result['max_num_seqs']}")
    lines = [head, "",
             "| backend | time (s) | req/s | output tok/s | total tok/s | ratio to pagedserve | load avg (start) |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    ours = next((r for r in result["rows"] if r["backend"] == "pagedserve"), None)
    for r in result["rows"]:
        ratio = r["output_throughput"] / ours["output_throughput"] if ours else None
        lines.append(f"| {r['backend']} | {r['elapsed_s']:.1f} | {r['request_throughput']:.2f} | "
                     f"{r['output_throughput']:.1f} | {r['total_token_throughput']:.1f} | "
                     f"{'-' if ratio is None else f'{ratio:.2f}'} | {r['loadavg_start'][0] if r['loadavg_start'] else '-'} |")
    return "\n".join(lines)
