"""`pagedserve bench {serve,soak,offline,compare,report,profile,make-model}`: argument parsing and dispatch."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import math
import sys

from server.bench.datasets import DATASETS, WorkloadSpec
from server.bench.target import guarded


def _int_list(value: str) -> list[int]:
    return [int(v) for v in value.split(",") if v.strip()]


def _threads(value: str) -> int | str:
    if value == "auto":
        return value
    threads = int(value)
    if threads < 1:
        raise argparse.ArgumentTypeError("--threads: a positive count or auto")
    return threads


def _rate_list(value: str) -> list[float]:
    from server.bench.serve import parse_rate

    return [parse_rate(v) for v in value.split(",") if v.strip()]


def add_workload_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("workload")
    g.add_argument("--dataset", choices=DATASETS, default="random",
                   help="random: fixed lengths; sharegpt: ShareGPT-like length mix (seeded); shared-prefix: few long prefixes, many requests.")
    g.add_argument("--num-prompts", type=_int_list, default=[64],
                   help="Requests per run; a comma list gives one value per sweep point.")
    g.add_argument("--input-len", type=int, default=128, help="Prompt tokens (random dataset; chat: after the template).")
    g.add_argument("--output-len", type=int, default=128, help="Generated tokens per request (random and shared-prefix).")
    g.add_argument("--random-range-ratio", type=float, default=0.0, help="Lengths uniform in [L(1-r), L(1+r)].")
    g.add_argument("--num-prefixes", type=int, default=4, help="shared-prefix: distinct prefixes.")
    g.add_argument("--prefix-len", type=int, default=512, help="shared-prefix: tokens per prefix.")
    g.add_argument("--suffix-len", type=int, default=64, help="shared-prefix: unique tokens per request after its prefix.")
    g.add_argument("--seed", type=int, default=0)


def add_client_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("load")
    g.add_argument("--endpoint", choices=("completions", "chat"), default="completions")
    g.add_argument("--request-rate", type=_rate_list, default=[math.inf],
                   help="Requests per second (Poisson arrivals) or inf (all at once); a comma list sweeps it.")
    g.add_argument("--burstiness", type=float, default=1.0, help="Gamma shape of arrival gaps (1: Poisson).")
    g.add_argument("--max-concurrency", type=int, default=None, help="Requests in flight at most.")
    g.add_argument("--concurrency", type=_int_list, default=None,
                   help="Sweep: comma list of max concurrencies (request rate inf), e.g. 1,8,32.")
    g.add_argument("--goodput", nargs="+", default=None, metavar="SLO:MS",
                   help="SLOs in ms for goodput, e.g. ttft:500 tpot:100 (also itl, e2el).")
    g.add_argument("--prompt-format", choices=("ids", "text"), default="ids",
                   help="completions: send token ids (exact counts) or text.")
    g.add_argument("--temperature", type=float, default=0.0)
    g.add_argument("--extra-body", type=_json_object, default={}, metavar="JSON",
                   help='A JSON object merged into every request, e.g. \'{"response_format": {"type": "json_object"}}\'.')
    g.add_argument("--num-warmups", type=int, default=1, help="Short requests sent before each run (not counted).")
    g.add_argument("--api-key", default=None)
    g.add_argument("--tokenizer", default=None, help="Tokenizer directory (default: the model's, from --model or /v1/models root).")
    g.add_argument("--disable-tqdm", action="store_true")


def register(commands) -> None:
    """Add `bench` and its subcommands to the top-level subparsers."""
    logging.getLogger("httpx").setLevel(logging.WARNING)
    bench = commands.add_parser("bench", help="Benchmarks: serve (any OpenAI server), offline, compare with vLLM.")
    sub = bench.add_subparsers(dest="bench_command", required=True)

    serve = sub.add_parser("serve", help="Load a running OpenAI-compatible server and report latency and throughput.")
    serve.add_argument("--base-url", required=True, help="e.g. http://127.0.0.1:8000")
    serve.add_argument("--model", default=None, help="Model name to request (default: the first of /v1/models).")
    serve.add_argument("--pid", type=int, default=None, help="Server PID: CPU seconds and peak RSS of it and its children.")
    serve.add_argument("--result-json", default=None, help="Write every figure (and per-request rows) here.")
    serve.add_argument("--max-model-len", type=int, default=None, help="ShareGPT mix: drop pairs longer than this.")
    add_workload_flags(serve)
    add_client_flags(serve)
    serve.set_defaults(func=guarded(cmd_serve))

    offline = sub.add_parser("offline", help="Throughput of the offline API beside transformers' generate and generate_batch.")
    offline.add_argument("--model", default=None, help="Model directory (default: the demo model).")
    offline.add_argument("--backend", nargs="+", choices=("pagedserve", "hf", "hf-cb"), default=["pagedserve"])
    offline.add_argument("--dtype", default="float32")
    offline.add_argument("--max-model-len", type=int, default=2048)
    offline.add_argument("--max-num-seqs", type=int, default=64, help="Sequences at once (ours, generate_batch; generate's batch size).")
    offline.add_argument("--max-num-batched-tokens", type=int, default=None)
    offline.add_argument("--kv-cache-memory", type=float, default=2.0, help="GiB (ours).")
    offline.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's).")
    offline.add_argument("--result-json", default=None)
    add_workload_flags(offline)
    offline.set_defaults(func=guarded(cmd_offline))

    compare = sub.add_parser("compare", help="Start our server and vLLM's CPU build in turn; same client, same workload; ratios.")
    compare.add_argument("--model", required=True, help="Model directory served by both.")
    compare.add_argument("--dtype", default="auto",
                         help="Our --dtype (default auto: what `pagedserve serve` picks on this machine).")
    compare.add_argument("--peer-dtype", default="float32",
                         help="vLLM's --dtype (default float32: its fastest on CPUs without AMX; its own auto casts a "
                              "float32 checkpoint to bfloat16).")
    compare.add_argument("--max-model-len", type=int, default=2048)
    compare.add_argument("--max-num-seqs", type=int, default=64)
    compare.add_argument("--max-num-batched-tokens", type=int, default=2048)
    compare.add_argument("--kv-cache-gib", type=float, default=2.0)
    compare.add_argument("--threads", type=_threads, default="auto",
                         help="Compute threads of each server (ours: OMP_NUM_THREADS; vLLM: its OpenMP binding). "
                              "auto (default): each server's own choice, as a user runs it.")
    compare.add_argument("--port", type=int, default=8001, help="Our server's port.")
    compare.add_argument("--peer-port", type=int, default=8100)
    compare.add_argument("--peer-script", default=None, help="run_vllm_peer.sh (default: shared/peers/ beside or above the repo).")
    compare.add_argument("--peer-threads-bind", default=None,
                         help="vLLM's VLLM_CPU_OMP_THREADS_BIND (default: auto when --threads 1, else 0-(threads-1)).")
    compare.add_argument("--servers", default="pagedserve,vllm", help="Which to run, in order (comma list).")
    compare.add_argument("--rounds", type=int, default=1, help="Repeat the server order (A/B/A/B) this many times.")
    compare.add_argument("--startup-timeout", type=float, default=900.0)
    compare.add_argument("--out-dir", default="bench-results", help="JSON, Markdown and PNG go here.")
    compare.add_argument("--name", default=None, help="File stem of the outputs (default: from the workload).")
    add_workload_flags(compare)
    add_client_flags(compare)
    compare.set_defaults(func=guarded(cmd_compare))

    report = sub.add_parser("report", help="Render the Markdown table and chart again from `bench compare` JSON files.")
    report.add_argument("json", nargs="+")
    report.add_argument("--no-chart", action="store_true")
    report.set_defaults(func=guarded(lambda ns: __import__("server.bench.compare", fromlist=["rerender"]).rerender(ns.json, not ns.no_chart)))

    soak = sub.add_parser("soak", help="A steady mixed load for N minutes: RSS and KV usage drift, errors by status, p99 over time.")
    soak.add_argument("--base-url", required=True, help="e.g. http://127.0.0.1:8000")
    soak.add_argument("--model", default=None, help="Model name to request (default: the first of /v1/models).")
    soak.add_argument("--api-key", default=None)
    soak.add_argument("--duration", type=float, default=10.0, help="Minutes of load.")
    soak.add_argument("--interval", type=float, default=30.0, help="Seconds per row of the table (a /metrics sample each).")
    soak.add_argument("--warmup", type=float, default=60.0, help="Seconds before the RSS the drift is measured from.")
    soak.add_argument("--concurrency", type=int, default=8, help="Requests in flight.")
    soak.add_argument("--max-tokens", type=int, default=32, help="Tokens per request at most (cut streams ask for more).")
    soak.add_argument("--idle-timeout", type=float, default=60.0, help="Seconds to wait after the load for the server to go idle.")
    soak.add_argument("--max-rss-drift-pct", type=float, default=None, help="Exit 1 when RSS at the end differs more from after warm-up.")
    soak.add_argument("--seed", type=int, default=0)
    soak.add_argument("--result-json", default=None, help="Write the summary and every interval here.")
    soak.set_defaults(func=guarded(cmd_soak))

    from server.bench.profile import register as register_profile

    register_profile(sub)

    make = sub.add_parser("make-model", help="Write a benchmark model (random weights) to DIR.")
    make.add_argument("dir")
    make.add_argument("--name", default="llama-125m")
    make.set_defaults(func=guarded(cmd_make_model))


def workload_from(ns: argparse.Namespace) -> WorkloadSpec:
    return WorkloadSpec(
        dataset=ns.dataset, num_prompts=ns.num_prompts[0], input_len=ns.input_len, output_len=ns.output_len,
        range_ratio=ns.random_range_ratio, num_prefixes=ns.num_prefixes, prefix_len=ns.prefix_len,
        suffix_len=ns.suffix_len, seed=ns.seed, endpoint=getattr(ns, "endpoint", "completions"),
    )


def _json_object(text: str) -> dict:
    try:
        value = json.loads(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"not JSON: {exc}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError("must be a JSON object")
    return value


def run_config_from(ns: argparse.Namespace, base_url: str, pid: int | None = None):
    from server.bench.serve import RunConfig
    from server.bench.stats import parse_goodput

    return RunConfig(
        base_url=base_url, model=getattr(ns, "served_model", None), endpoint=ns.endpoint,
        burstiness=ns.burstiness, prompt_format=ns.prompt_format, temperature=ns.temperature,
        goodput=parse_goodput(ns.goodput), pid=pid, api_key=ns.api_key, num_warmups=ns.num_warmups,
        seed=ns.seed, disable_tqdm=ns.disable_tqdm, extra_body=getattr(ns, "extra_body", {}),
    )


def cmd_serve(ns: argparse.Namespace) -> int:
    from server.bench.serve import format_table, run_sweep, sweep_points, write_json

    ns.served_model = ns.model
    config = run_config_from(ns, ns.base_url, ns.pid)
    points = sweep_points(ns.concurrency, ns.request_rate)
    if ns.max_concurrency and not ns.concurrency:
        points = [(rate, ns.max_concurrency) for rate, _ in points]
    quiet = ns.disable_tqdm
    result = asyncio.run(run_sweep(config, workload_from(ns), points, ns.tokenizer, ns.num_prompts, ns.max_model_len))
    if quiet:
        for run in result["runs"]:
            print(format_table(run))
    if ns.result_json:
        write_json(ns.result_json, result)
    return 0 if all(run["failed"] == 0 for run in result["runs"]) else 1


def cmd_soak(ns: argparse.Namespace) -> int:
    from server.bench.serve import write_json
    from server.bench.soak import SoakConfig, format_header, format_row, format_summary, run_soak, soak_ok
    from server.bench.target import BenchError

    if ns.duration <= 0 or ns.interval <= 0 or ns.concurrency < 1 or ns.max_tokens < 4:
        raise BenchError("--duration and --interval must be > 0, --concurrency >= 1, --max-tokens >= 4")
    config = SoakConfig(base_url=ns.base_url, duration_s=ns.duration * 60.0, interval_s=ns.interval, warmup_s=ns.warmup,
                        concurrency=ns.concurrency, max_tokens=ns.max_tokens, idle_timeout_s=ns.idle_timeout,
                        seed=ns.seed, api_key=ns.api_key, model=ns.model)
    print(format_header(), flush=True)
    summary = asyncio.run(run_soak(config, on_row=lambda row: print(format_row(row), flush=True)))
    print(format_summary(summary))
    if ns.result_json:
        write_json(ns.result_json, summary)
    return 0 if soak_ok(summary, ns.max_rss_drift_pct) else 1


def cmd_offline(ns: argparse.Namespace) -> int:
    from server.bench.offline import format_offline, run_offline
    from server.bench.serve import write_json

    result = run_offline(ns, workload_from(ns))
    print(format_offline(result))
    if ns.result_json:
        write_json(ns.result_json, result)
    return 0


def cmd_compare(ns: argparse.Namespace) -> int:
    from server.bench.compare import run_compare

    return run_compare(ns)


def cmd_make_model(ns: argparse.Namespace) -> int:
    from server.bench.models import count_parameters, make_bench_model

    path = make_bench_model(ns.dir, ns.name)
    print(json.dumps({"path": str(path), "parameters": count_parameters(path)}))
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(1)
