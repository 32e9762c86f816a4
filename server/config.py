"""Frozen configuration, validated once at the edge; each part receives only its own slice.

`EngineArgs` holds every engine flag of `pagedserve serve` (snake_case, named like vLLM's) and is
what `LLM(model, **engine_args)` accepts. `EngineArgs.validate()` is the one place that checks them.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from types import MappingProxyType
from typing import ClassVar

from server.errors import ConfigError

SCHEDULING_POLICIES = ("fcfs", "priority")
ATTENTION_BACKENDS = ("auto", "reference", "batched", "cpu", "triton")  # kernels.ops.BACKENDS
LOAD_FORMATS = ("auto", "safetensors", "dummy")
TOOL_CALL_PARSERS = (None, "hermes", "llama3_json")  # server/api/tools/parsers.py
# --model-impl values -> the canonical name; "vllm" is vLLM's name for its own (native) models.
MODEL_IMPLS = MappingProxyType({"auto": "auto", "native": "native", "vllm": "native", "transformers": "transformers"})
# --dtype values (vLLM's names and the usual short ones) -> the canonical name every other part reads.
DTYPE_ALIASES = {
    "auto": "auto",
    "bfloat16": "bfloat16",
    "bf16": "bfloat16",
    "float16": "float16",
    "half": "float16",
    "fp16": "float16",
    "float32": "float32",
    "float": "float32",
    "fp32": "float32",
}
# The server's default bound on waiting requests, per running sequence (--max-num-seqs).
QUEUED_PER_SEQ = 2
UNBOUNDED_QUEUE = -1  # --max-queued-requests -1
# -O / --compilation-config: vLLM's levels that exist here (0: eager, 3: the forward through torch.compile)
# and the keys of its JSON form.
COMPILATION_LEVELS = (0, 3)
COMPILATION_CONFIG_KEYS = ("level", "cache_dir")
MAX_DEFAULT_CUDA_GRAPH_SIZE = 512  # the default capture sizes stop here (vLLM's bound)


def cuda_graph_sizes(requested: list[int] | None, max_num_seqs: int) -> tuple[int, ...]:
    """The decode batch sizes to capture as CUDA graphs, ascending and distinct.

    None: vLLM's default, 1, 2, 4 and every multiple of 8 up to min(max_num_seqs, 512), plus that bound
    itself so that a full batch replays too. Given sizes are capped at max_num_seqs; [0] captures none.
    """
    if requested is None:
        limit = min(max_num_seqs, MAX_DEFAULT_CUDA_GRAPH_SIZE)
        sizes = [s for s in (1, 2, 4, *range(8, limit + 1, 8)) if s <= limit] + [limit]
    else:
        sizes = [min(s, max_num_seqs) for s in requested if s > 0]
    return tuple(sorted(set(sizes)))


@dataclass(frozen=True)
class CompilationConfig:
    level: int | None = None  # None: the default of the device and model (see ModelRunner)
    cache_dir: str | None = None  # compiled artifacts; None: TORCHINDUCTOR_CACHE_DIR or ~/.cache/pagedserve/torch_compile


def parse_compilation_config(value: object) -> CompilationConfig:
    """vLLM's -O / --compilation-config: a level (``3``, ``"3"``) or a JSON object (text or dict) with the
    keys of COMPILATION_CONFIG_KEYS; raises ConfigError naming what is wrong."""
    if value is None:
        return CompilationConfig()
    if isinstance(value, CompilationConfig):
        fields = {"level": value.level, "cache_dir": value.cache_dir}
    elif isinstance(value, int) and not isinstance(value, bool):
        fields = {"level": value}
    elif isinstance(value, str) and value.strip().lstrip("-").isdigit():
        fields = {"level": int(value)}
    elif isinstance(value, (str, dict)):
        try:
            fields = json.loads(value) if isinstance(value, str) else value
        except json.JSONDecodeError as exc:
            raise ConfigError(f"-O/--compilation-config takes a level (0 or 3) or a JSON object, got {value!r}: {exc}.") from None
        if not isinstance(fields, dict):
            raise ConfigError(f"-O/--compilation-config takes a level (0 or 3) or a JSON object, got {value!r}.")
    else:
        raise ConfigError(f"-O/--compilation-config takes a level (0 or 3) or a JSON object, got {value!r}.")
    unknown = sorted(set(fields) - set(COMPILATION_CONFIG_KEYS))
    if unknown:
        raise ConfigError(
            f"-O/--compilation-config: unknown key(s) {', '.join(map(repr, unknown))}; known: {', '.join(COMPILATION_CONFIG_KEYS)}."
        )
    level, cache_dir = fields.get("level"), fields.get("cache_dir")
    if level is not None and (not isinstance(level, int) or isinstance(level, bool) or level not in COMPILATION_LEVELS):
        raise ConfigError(f"-O/--compilation-config level must be 0 (eager) or 3 (torch.compile), got {level!r}.")
    if cache_dir is not None and (not isinstance(cache_dir, str) or not cache_dir):
        raise ConfigError(f"-O/--compilation-config cache_dir must be a directory path, got {cache_dir!r}.")
    return CompilationConfig(level=level, cache_dir=cache_dir)


@dataclass(frozen=True)
class ModelConfig:
    model: str  # Hub id or local directory, as given
    path: str  # the resolved local directory, or .gguf file
    dtype: str
    max_model_len: int
    served_model_names: tuple[str, ...]
    revision: str | None = None
    tokenizer: str | None = None
    chat_template: str | None = None  # a file path overriding the tokenizer's template
    seed: int = 0
    enforce_eager: bool = False
    device: str = "cpu"
    attention_backend: str = "auto"
    load_format: str = "auto"  # dummy: random weights, no checkpoint read
    use_tqdm_on_load: bool = True  # progress bars while weights load (on a terminal)
    model_impl: str = "auto"  # auto | native | transformers
    # decode batch sizes captured as CUDA graphs on a CUDA device (cuda_graph_sizes()); () for none
    cuda_graph_sizes: tuple[int, ...] = ()
    compilation_level: int | None = None  # 0 eager, 3 torch.compile; None: the device's default (0 with enforce_eager)
    compile_cache_dir: str | None = None  # None: TORCHINDUCTOR_CACHE_DIR or ~/.cache/pagedserve/torch_compile


@dataclass(frozen=True)
class CacheConfig:
    block_size: int = 16
    enable_prefix_caching: bool = True
    kv_cache_memory: float | None = None  # GiB; CPU sizing
    gpu_memory_utilization: float = 0.9
    num_blocks_override: int | None = None


@dataclass(frozen=True)
class SchedulerConfig:
    max_num_batched_tokens: int = 2048  # the token budget of one step
    max_num_seqs: int = 128  # running sequences at most
    max_model_len: int = 2048  # prompt + output tokens at most
    max_queued_requests: int | None = None  # waiting requests at most; None: unbounded
    policy: str = "fcfs"  # "fcfs" or "priority": the order of the waiting queue


@dataclass(frozen=True)
class StructuredOutputsConfig:
    compile_timeout: float = 10.0  # seconds one grammar may take to compile
    max_grammar_bytes: int = 64 * 1024  # larger schemas, regexes, grammars and choice lists are refused
    any_whitespace: bool = False  # JSON grammars allow free whitespace unless a request says otherwise
    workers: int = 2  # compile processes at most


@dataclass
class EngineArgs:
    model: str | None = None  # None: the built-in demo model
    revision: str | None = None
    download_dir: str | None = None
    gguf_file: str | None = None  # the .gguf file of a Hub repo (or of a local directory) to serve
    tokenizer: str | None = None
    chat_template: str | None = None
    served_model_name: list[str] | str | None = None
    dtype: str = "auto"
    max_model_len: int | None = None
    seed: int = 0
    device: str = "auto"
    enforce_eager: bool = False
    compilation_config: int | str | dict | CompilationConfig | None = None  # -O: a level or {"level", "cache_dir"}
    attention_backend: str = "auto"
    load_format: str = "auto"
    model_impl: str = "auto"
    use_tqdm_on_load: bool = True
    cuda_graph_sizes: list[int] | None = None  # None: the default sizes; [0]: no CUDA graphs
    block_size: int = 16
    enable_prefix_caching: bool = True
    kv_cache_memory: float | None = None
    gpu_memory_utilization: float = 0.9
    num_gpu_blocks_override: int | None = None
    max_num_batched_tokens: int | None = None
    max_num_seqs: int = 128
    max_queued_requests: int | None = None  # None: unbounded here, the server's default with for_server()
    scheduling_policy: str = "fcfs"
    grammar_compile_timeout: float = 10.0
    max_grammar_bytes: int = 64 * 1024
    structured_outputs_any_whitespace: bool = False

    def __post_init__(self) -> None:
        # An alias becomes its canonical name here, so every other part reads only those; validate() rejects the rest.
        self.dtype = DTYPE_ALIASES.get(self.dtype, self.dtype)
        self.model_impl = MODEL_IMPLS.get(self.model_impl, self.model_impl)
        if isinstance(self.cuda_graph_sizes, int) and not isinstance(self.cuda_graph_sizes, bool):
            self.cuda_graph_sizes = [self.cuda_graph_sizes]

    @classmethod
    def field_names(cls) -> set[str]:
        return {f.name for f in dataclasses.fields(cls)}

    @classmethod
    def from_kwargs(cls, model: str | None = None, **kwargs) -> EngineArgs:
        unknown = set(kwargs) - cls.field_names()
        if unknown:
            raise ConfigError(
                f"Unknown engine argument(s): {', '.join(sorted(unknown))}. "
                f"Known: {', '.join(sorted(cls.field_names()))}."
            )
        args = cls(model=model, **kwargs)
        args.validate()
        return args

    def validate(self) -> None:
        def need(ok: bool, message: str) -> None:
            if not ok:
                raise ConfigError(message)

        need(
            self.dtype in DTYPE_ALIASES,
            f"Unknown --dtype {self.dtype!r}. Choose one of: auto, bfloat16 (bf16), float16 (half, fp16), float32 (float, fp32).",
        )
        need(self.block_size in (1, 2, 4, 8, 16, 32, 64, 128), f"--block-size must be a power of two up to 128, got {self.block_size}.")
        need(self.max_num_seqs >= 1, f"--max-num-seqs must be at least 1, got {self.max_num_seqs}.")
        need(self.max_model_len is None or self.max_model_len >= 1, f"--max-model-len must be positive, got {self.max_model_len}.")
        need(
            self.max_num_batched_tokens is None or self.max_num_batched_tokens >= 1,
            f"--max-num-batched-tokens must be positive, got {self.max_num_batched_tokens}.",
        )
        need(self.kv_cache_memory is None or self.kv_cache_memory > 0, f"--kv-cache-memory must be > 0 GiB, got {self.kv_cache_memory}.")
        need(0 < self.gpu_memory_utilization <= 1, f"--gpu-memory-utilization must be in (0, 1], got {self.gpu_memory_utilization}.")
        need(
            self.max_queued_requests in (None, UNBOUNDED_QUEUE) or self.max_queued_requests >= 1,
            f"--max-queued-requests must be at least 1 (every request waits before it runs), or -1 for no limit, "
            f"got {self.max_queued_requests}.",
        )
        need(
            self.scheduling_policy in SCHEDULING_POLICIES,
            f"--scheduling-policy must be fcfs or priority, got {self.scheduling_policy!r}.",
        )
        need(self.grammar_compile_timeout > 0, f"--grammar-compile-timeout must be > 0 s, got {self.grammar_compile_timeout}.")
        need(self.max_grammar_bytes >= 1, f"--max-grammar-bytes must be at least 1, got {self.max_grammar_bytes}.")
        sizes = self.cuda_graph_sizes
        need(
            sizes is None
            or (
                isinstance(sizes, (list, tuple))
                and len(sizes) >= 1
                and all(isinstance(s, int) and not isinstance(s, bool) for s in sizes)
                and (list(sizes) == [0] or min(sizes) >= 1)
            ),
            f"--cuda-graph-sizes takes positive batch sizes, or 0 alone for no CUDA graphs, got {sizes!r}.",
        )
        parse_compilation_config(self.compilation_config)  # raises ConfigError
        need(self.device in ("auto", "cpu", "cuda"), f"--device must be auto, cpu or cuda, got {self.device!r}.")
        need(
            self.attention_backend in ATTENTION_BACKENDS,
            f"--attention-backend must be one of {', '.join(ATTENTION_BACKENDS)}, got {self.attention_backend!r}.",
        )
        need(
            self.load_format in LOAD_FORMATS,
            f"--load-format must be one of {', '.join(LOAD_FORMATS)}, got {self.load_format!r}.",
        )
        need(
            self.model_impl in MODEL_IMPLS,
            f"--model-impl must be auto, native (alias vllm) or transformers, got {self.model_impl!r}.",
        )

    def structured_outputs_config(self) -> StructuredOutputsConfig:
        return StructuredOutputsConfig(
            compile_timeout=self.grammar_compile_timeout,
            max_grammar_bytes=self.max_grammar_bytes,
            any_whitespace=self.structured_outputs_any_whitespace,
        )

    def for_server(self) -> EngineArgs:
        """These arguments with the HTTP server's default queue bound, QUEUED_PER_SEQ x max_num_seqs, when
        none was given: an overloaded replica answers 429 (and /ready 503) instead of taking work it would
        time out on. The offline LLM takes every prompt it is given, so it keeps None (unbounded)."""
        if self.max_queued_requests is not None:
            return self
        return dataclasses.replace(self, max_queued_requests=QUEUED_PER_SEQ * self.max_num_seqs)

    def served_names(self, model: str) -> tuple[str, ...]:
        names = self.served_model_name
        if not names:
            return (model,)
        return (names,) if isinstance(names, str) else tuple(names)

    def model_config(self, model: str, path: str, max_position_embeddings: int, device: str) -> ModelConfig:
        max_len = self.max_model_len or max_position_embeddings
        if max_len > max_position_embeddings:
            raise ConfigError(
                f"--max-model-len {max_len} exceeds the model's max_position_embeddings ({max_position_embeddings})."
            )
        compilation = parse_compilation_config(self.compilation_config)
        return ModelConfig(
            model=model,
            path=path,
            dtype=self.dtype,
            max_model_len=max_len,
            served_model_names=self.served_names(model),
            revision=self.revision,
            tokenizer=self.tokenizer,
            chat_template=self.chat_template,
            seed=self.seed,
            enforce_eager=self.enforce_eager,
            device=device,
            attention_backend=self.attention_backend,
            load_format=self.load_format,
            model_impl=self.model_impl,
            use_tqdm_on_load=self.use_tqdm_on_load,
            cuda_graph_sizes=()
            if self.enforce_eager or device != "cuda"
            else cuda_graph_sizes(self.cuda_graph_sizes, self.max_num_seqs),
            compilation_level=0 if self.enforce_eager else compilation.level,
            compile_cache_dir=compilation.cache_dir,
        )

    def cache_config(self) -> CacheConfig:
        return CacheConfig(
            block_size=self.block_size,
            enable_prefix_caching=self.enable_prefix_caching,
            kv_cache_memory=self.kv_cache_memory,
            gpu_memory_utilization=self.gpu_memory_utilization,
            num_blocks_override=self.num_gpu_blocks_override,
        )

    def scheduler_config(self, max_model_len: int) -> SchedulerConfig:
        budget = self.max_num_batched_tokens or max(2048, min(max_model_len, 8192))
        return SchedulerConfig(
            max_num_batched_tokens=budget,
            max_num_seqs=self.max_num_seqs,
            max_model_len=max_model_len,
            max_queued_requests=None if self.max_queued_requests == UNBOUNDED_QUEUE else self.max_queued_requests,
            policy=self.scheduling_policy,
        )


@dataclass(frozen=True)
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str | None = None  # also PAGEDSERVE_API_KEY
    shutdown_timeout: float = 30.0
    max_request_body_bytes: int = 16 * 1024 * 1024
    log_format: str = "text"
    disable_access_log: bool = False
    auth_admin_routes: bool = False  # also require the key on /health, /ready, /metrics
    trust_request_chat_template: bool = False  # accept `chat_template` in chat requests
    tool_call_parser: str | None = None  # how tool_choice "auto" reads tool calls out of the text
    disable_frontend_multiprocessing: bool = False  # the engine core on a thread of the API process

    HELP: ClassVar[dict[str, str]] = {
        "host": "Address to listen on.",
        "port": "Port to listen on.",
        "api_key": "Require this Bearer key on every route that serves the model (env PAGEDSERVE_API_KEY).",
        "shutdown_timeout": "Seconds in-flight requests get to finish after SIGTERM before they are aborted.",
        "max_request_body_bytes": "Larger request bodies get 413.",
        "log_format": "Access and server log format: text or json.",
        "disable_access_log": "Do not log one line per request.",
        "auth_admin_routes": "Require the API key on /health, /ready and /metrics too.",
        "trust_request_chat_template": "Accept a 'chat_template' in chat requests (rendered in transformers' sandboxed "
        "Jinja environment); without it such requests get 400.",
        "tool_call_parser": "Read tool calls out of the model's text when tool_choice is auto (or left out): hermes "
        "(<tool_call>{json}</tool_call>, Qwen2.5/Qwen3, Hermes) or llama3_json ({\"name\", \"parameters\"} objects). "
        "Without it such replies stay text.",
        "disable_frontend_multiprocessing": "Run the engine core on a thread of the API server's process instead of in "
        "its own process (vLLM's flag). The default, its own process, keeps tokenization and HTTP off the step loop.",
    }

    def validate(self) -> None:
        if not 0 <= self.port <= 65535:
            raise ConfigError(f"--port must be in 0..65535, got {self.port}.")
        if self.shutdown_timeout < 0:
            raise ConfigError(f"--shutdown-timeout must be >= 0, got {self.shutdown_timeout}.")
        if self.log_format not in ("text", "json"):
            raise ConfigError(f"--log-format must be text or json, got {self.log_format!r}.")
        if self.max_request_body_bytes < 1024:
            raise ConfigError("--max-request-body-bytes must be at least 1024.")
        if self.tool_call_parser not in TOOL_CALL_PARSERS:
            names = ", ".join(p for p in TOOL_CALL_PARSERS if p)
            raise ConfigError(f"--tool-call-parser must be one of {names}, got {self.tool_call_parser!r}.")
