"""Where step time goes: `pagedserve bench profile offline|server`.

`offline` runs the offline API with timers wrapped around the engine's parts (scheduler,
input preparation, model forward with its attention and KV-store kernels, lm head, sampling,
detokenize/emit) and prints each part's share of the engine step.

`server` samples a running server with py-spy (`py-spy record --format raw`) while you load it
(e.g. with `bench serve`) and sorts every sampled stack into the same parts plus HTTP/API,
tokenization and the event loop.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import functools
import shutil
import subprocess
import sys
import time
from typing import Any

from server.bench.stats import load_average
from server.bench.target import BenchError, guarded


class Timers:
    def __init__(self) -> None:
        self.seconds: dict[str, float] = collections.defaultdict(float)
        self.calls: dict[str, int] = collections.defaultdict(int)

    def wrap(self, name: str, fn):
        @functools.wraps(fn)
        def timed(*args, **kwargs):
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.seconds[name] += time.perf_counter() - start
                self.calls[name] += 1

        return timed


def instrument(llm, timers: Timers) -> None:
    """Wrap the parts of one engine that exist (names change as the engine evolves)."""
    import server.runner.model_runner as model_runner_module

    core = llm.engine
    runner = getattr(core, "runner", None)
    scheduler = getattr(core, "scheduler", None)
    core.step = timers.wrap("engine step (total)", core.step)
    if scheduler is not None:
        for name in ("schedule", "update"):
            if hasattr(scheduler, name):
                setattr(scheduler, name, timers.wrap(f"scheduler.{name}", getattr(scheduler, name)))
    if hasattr(core, "_emit"):
        core._emit = timers.wrap("detokenize + emit", core._emit)
    if runner is not None:
        if hasattr(runner, "_prepare"):
            runner._prepare = timers.wrap("runner: build inputs", runner._prepare)
        model = runner.model
        model.forward = timers.wrap("model forward", model.forward)
        if hasattr(model, "compute_logits"):
            model.compute_logits = timers.wrap("lm head (logits)", model.compute_logits)
        for fn in ("sample", "build_sampling_batch"):
            if hasattr(model_runner_module, fn):
                setattr(model_runner_module, fn, timers.wrap("sampling", getattr(model_runner_module, fn)))
        for module in model.modules():
            ops = getattr(module, "ops", None)
            if ops is not None and dataclasses.is_dataclass(ops):
                changes = {}
                for op, label in (("paged_attention", "  of which attention kernel"), ("store_kvcache", "  of which KV store")):
                    if hasattr(ops, op):
                        changes[op] = timers.wrap(label, getattr(ops, op))
                module.ops = dataclasses.replace(ops, **changes)


def profile_offline(ns: argparse.Namespace) -> dict[str, Any]:
    import torch

    from server import LLM, SamplingParams
    from server.bench.datasets import WorkloadSpec, build_workload

    if ns.threads:
        torch.set_num_threads(ns.threads)
    llm = LLM(ns.model, dtype=ns.dtype, max_model_len=ns.max_model_len, kv_cache_memory=ns.kv_cache_memory,
              max_num_seqs=ns.max_num_seqs, attention_backend=ns.attention_backend)
    spec = WorkloadSpec(dataset="random", num_prompts=ns.num_prompts, input_len=ns.input_len, output_len=ns.output_len,
                        seed=ns.seed)
    requests = build_workload(spec, llm.get_tokenizer())
    params = SamplingParams(temperature=0, max_tokens=ns.output_len, ignore_eos=True)
    llm.generate([requests[0].prompt_ids[:8]], SamplingParams(temperature=0, max_tokens=2, ignore_eos=True), use_tqdm=False)
    timers = Timers()
    instrument(llm, timers)
    load = load_average()
    start = time.perf_counter()
    llm.generate([r.prompt_ids for r in requests], params, use_tqdm=False)
    wall = time.perf_counter() - start
    step = timers.seconds.get("engine step (total)", wall)
    accounted = sum(v for k, v in timers.seconds.items() if k != "engine step (total)" and not k.startswith("  "))
    rows = [(k, v, timers.calls[k]) for k, v in timers.seconds.items() if k != "engine step (total)"]
    rows.append(("other (engine bookkeeping)", max(0.0, step - accounted), 0))
    return {
        "model": ns.model, "workload": spec.describe(), "num_prompts": ns.num_prompts, "threads": torch.get_num_threads(),
        "wall_s": wall, "step_s": step, "steps": timers.calls.get("engine step (total)", 0),
        "output_tok_s": ns.num_prompts * ns.output_len / wall, "loadavg": load,
        "parts": [{"part": k, "seconds": v, "share_of_step": v / step if step else None, "calls": c} for k, v, c in rows],
    }


def format_offline_profile(p: dict[str, Any]) -> str:
    lines = [(f"Offline step profile: {p['workload']}, {p['num_prompts']} requests, {p['threads']} threads, "
              f"{p['steps']} steps, {p['wall_s']:.1f} s wall ({p['output_tok_s']:.1f} output tok/s), load {p['loadavg'][:1]}"),
             "", "| part | seconds | share of step time | calls |", "| --- | ---: | ---: | ---: |"]
    for row in sorted(p["parts"], key=lambda r: (r["part"].startswith("  "), -r["seconds"])):
        lines.append(f"| {row['part']} | {row['seconds']:.2f} | {100 * (row['share_of_step'] or 0):.1f} % | {row['calls']} |")
    return "\n".join(lines)


# ---- py-spy on a live server --------------------------------------------------------------

CATEGORIES = (  # in priority order: a stack belongs to the first part any of its frames names
    ("attention kernel", ("paged_attention", "kernels/batched.py", "kernels/cpu_attention.py", "kernels/cpu_native.py")),
    ("model forward", ("server/runner/models/", "server/runner/layers/", "kernels/", "torch/nn/")),
    ("sampling", ("server/runner/sampler.py",)),
    ("runner: build inputs", ("_prepare",)),
    ("scheduler", ("server/scheduler/",)),
    ("detokenize + emit", ("detokenizer.py", "_emit")),
    ("tokenize / chat template", ("tokenization", "tokenizers", "jinja2", "api/prompts.py")),
    ("engine -> API hand-off", ("_deliver", "call_soon_threadsafe")),
    ("event loop waiting", ("selectors.py",)),
    ("HTTP / API / SSE", ("server/api/", "uvicorn", "starlette", "fastapi", "h11", "httptools", "pydantic",
                          "json/", "_SelectorSocketTransport")),
    ("asyncio other", ("asyncio/",)),
    ("engine loop", ("server/engine/",)),
)


def categorize(stack: str) -> str:
    frames = stack.split(";")
    for name, needles in CATEGORIES:
        if any(n in frame for frame in frames for n in needles):
            return name
    return "other"


def summarize_raw(path: str) -> dict[str, float]:
    """Share of samples per category from a py-spy `--format raw` file (collapsed stacks + counts)."""
    counts: dict[str, int] = collections.Counter()
    with open(path) as f:
        for line in f:
            stack, _, n = line.rstrip().rpartition(" ")
            if stack and n.isdigit():
                counts[categorize(stack)] += int(n)
    total = sum(counts.values()) or 1
    return {k: v / total for k, v in sorted(counts.items(), key=lambda kv: -kv[1])} | {"_samples": float(total)}


def profile_server(ns: argparse.Namespace) -> dict[str, Any]:
    if not shutil.which("py-spy"):
        raise BenchError("py-spy is not installed: pip install py-spy")
    raw = ns.output or f"pyspy-{ns.pid}.txt"
    cmd = ["py-spy", "record", "--pid", str(ns.pid), "--duration", str(ns.duration), "--rate", str(ns.rate),
           "--format", "raw", "--output", raw, "--nonblocking"]
    if ns.native:
        cmd.append("--native")
    load = load_average()
    subprocess.run(cmd, check=True)
    return {"pid": ns.pid, "duration_s": ns.duration, "loadavg": load, "raw": raw, "shares": summarize_raw(raw)}


def format_server_profile(p: dict[str, Any]) -> str:
    shares = dict(p["shares"])
    samples = int(shares.pop("_samples"))
    lines = [f"py-spy on pid {p['pid']} for {p['duration_s']} s ({samples} samples, busy threads only), load {p['loadavg'][:1]}",
             "", "| part | share of samples |", "| --- | ---: |"]
    lines += [f"| {k} | {100 * v:.1f} % |" for k, v in shares.items()]
    return "\n".join(lines)


def register(sub) -> None:
    prof = sub.add_parser("profile", help="Where the step time goes (offline timers, or py-spy on a live server).")
    kinds = prof.add_subparsers(dest="profile_kind", required=True)
    off = kinds.add_parser("offline", help="Timers around the engine's parts on the offline path.")
    off.add_argument("--model", default=None)
    off.add_argument("--dtype", default="float32")
    off.add_argument("--max-model-len", type=int, default=2048)
    off.add_argument("--max-num-seqs", type=int, default=64)
    off.add_argument("--kv-cache-memory", type=float, default=2.0)
    off.add_argument("--num-prompts", type=int, default=16)
    off.add_argument("--input-len", type=int, default=128)
    off.add_argument("--output-len", type=int, default=64)
    off.add_argument("--threads", type=int, default=None)
    off.add_argument("--attention-backend", default="auto", help="As `pagedserve serve --attention-backend`.")
    off.add_argument("--seed", type=int, default=0)
    off.set_defaults(func=guarded(lambda ns: _print(format_offline_profile(profile_offline(ns)))))
    srv = kinds.add_parser("server", help="py-spy record on a running server; stacks sorted into parts.")
    srv.add_argument("--pid", type=int, required=True)
    srv.add_argument("--duration", type=int, default=30)
    srv.add_argument("--rate", type=int, default=100)
    srv.add_argument("--native", action="store_true", help="Also sample native frames (slower).")
    srv.add_argument("--output", default=None, help="Raw collapsed-stack file (default pyspy-PID.txt).")
    srv.set_defaults(func=guarded(lambda ns: _print(format_server_profile(profile_server(ns)))))


def _print(text: str) -> int:
    print(text)
    sys.stdout.flush()
    return 0
