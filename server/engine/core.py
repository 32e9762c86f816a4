"""The engine core: admits requests, runs schedule -> execute -> update, and emits typed deltas."""

from __future__ import annotations

import concurrent.futures
import dataclasses
import logging
import time
from dataclasses import dataclass, field

import torch

from server.config import EngineArgs
from server.engine.detokenizer import IncrementalDetokenizer
from server.engine.messages import EngineInfo, GenerateRequest, RequestOutput
from server.engine.tokenizer import eos_token_ids, load_generation_config, load_tokenizer, sampling_defaults
from server.errors import InvalidRequest, PagedServeError
from server.metrics import FinishedStats, StepStats
from server.request import Request, RequestStatus, SamplingParams, TokenLogprob
from server.runner import loader
from server.runner.model_runner import ModelRunner
from server.scheduler.kv_blocks import BlockPool
from server.scheduler.scheduler import Scheduler
from server.structured.compiler import GrammarCompiler
from server.structured.matcher import GrammarState

logger = logging.getLogger(__name__)

DEMO_MODEL_NAME = "pagedserve-demo"  # what the built-in demo model is served as


@dataclass
class _Choice:
    """Engine-side state of one choice (one scheduled sequence) of a request."""

    request: Request
    parent_id: str
    index: int
    detok: IncrementalDetokenizer
    prompt_logprobs: list[TokenLogprob | None] = field(default_factory=list)
    prompt_logprobs_sent: bool = False
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    last_token_time: float | None = None


class EngineCore:
    def __init__(self, args: EngineArgs):
        args.validate()
        started = time.perf_counter()
        if args.model is None:
            from server.demo import default_model_path

            model, path = DEMO_MODEL_NAME, str(default_model_path())
        else:
            model = args.model
            path = str(loader.resolve_model_path(
                model, revision=args.revision, download_dir=args.download_dir, weights=args.load_format != "dummy",
                gguf_file=args.gguf_file, progress=loader.progress_bars(args.use_tqdm_on_load),
            ))
        self.download_seconds = time.perf_counter() - started
        hf_config = loader.load_hf_config(path)
        device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
        max_pos = getattr(hf_config, "max_position_embeddings", None) or 2048
        self.model_config = args.model_config(model, path, max_pos, device)
        self.cache_config = args.cache_config()
        self.scheduler_config = args.scheduler_config(self.model_config.max_model_len)
        # The tokenizer loads on a thread while the weights load: reading a GGUF's vocabulary is seconds of
        # Python, dequantizing its weights mostly numpy and torch, which release the GIL.
        with concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="tokenizer") as pool:
            tokenizer = pool.submit(load_tokenizer, args.tokenizer or path, args.chat_template)
            self.runner = ModelRunner(self.model_config, self.cache_config, self.scheduler_config, hf_config)
            self.tokenizer = tokenizer.result()
        generation_config = load_generation_config(path)
        self.eos_token_ids = eos_token_ids(generation_config, hf_config, self.tokenizer)
        self.sampling_defaults = sampling_defaults(generation_config)
        self.hf_config = hf_config

        self.block_pool = BlockPool(self.runner.num_blocks, self.cache_config.block_size, self.cache_config.enable_prefix_caching)
        self.scheduler = Scheduler(self.scheduler_config, self.block_pool)
        self._choices: dict[str, _Choice] = {}  # scheduler request id -> choice
        self._children: dict[str, list[str]] = {}  # parent id -> scheduler request ids
        self._aborted: list[FinishedStats] = []  # choices aborted since the last stats, reported with the next
        self._backend_tokenizer = getattr(self.tokenizer, "backend_tokenizer", None) or self.tokenizer._tokenizer
        self.structured_config = args.structured_outputs_config()
        self._grammar_compiler: GrammarCompiler | None = None  # started by the first structured request
        self._awaiting_grammar: dict[str, tuple[GenerateRequest, concurrent.futures.Future]] = {}
        self.startup_seconds = time.perf_counter() - started
        logger.info("Engine ready: %s on %s in %.1f s", model, device, self.startup_seconds)

    # ---- admission ------------------------------------------------------------------------

    def add_request(self, req: GenerateRequest) -> None:
        """Admit a request (all n choices) or raise the error that refuses it; nothing is half-added."""
        if req.request_id in self._children:
            raise InvalidRequest(f"Request id {req.request_id!r} is already in use.")
        if not req.prompt_token_ids:
            raise InvalidRequest("The prompt is empty: give at least one token.", param="prompt")
        vocab = self.hf_config.vocab_size
        bad = next((t for t in req.prompt_token_ids if not 0 <= t < vocab), None)
        if bad is not None:
            raise InvalidRequest(f"Token id {bad} is out of range for a vocabulary of {vocab} tokens.", param="prompt")
        if req.params.structured is not None:  # admitted once its grammar is compiled (see _admit_compiled)
            if req.request_id in self._awaiting_grammar:
                raise InvalidRequest(f"Request id {req.request_id!r} is already in use.")
            self._awaiting_grammar[req.request_id] = (req, self.grammar_compiler.submit(req.params.structured))
            return
        self._admit(req, None)

    def submit(self, req: GenerateRequest) -> list[RequestOutput]:
        """`add_request` for the engine loops: a refusal comes back as the output that ends the request."""
        try:
            self.add_request(req)
        except PagedServeError as exc:
            return [RequestOutput.failure(req.request_id, exc)]
        except Exception as exc:
            logger.exception("Could not admit request %s", req.request_id)
            return [RequestOutput.failure(req.request_id, PagedServeError(f"Could not admit the request: {exc}"))]
        return []

    @property
    def grammar_compiler(self) -> GrammarCompiler:
        if self._grammar_compiler is None:
            vocab = self.hf_config.vocab_size
            self._grammar_compiler = GrammarCompiler(self.tokenizer, vocab, self.eos_token_ids, self.structured_config)
        return self._grammar_compiler

    def _admit_compiled(self, wait: bool) -> list[RequestOutput]:
        """Admit the requests whose grammar is compiled; the refused ones become error outputs. With
        `wait` (nothing else to run), wait a little for one to finish instead of spinning."""
        if wait and self._awaiting_grammar:
            futures = [future for _, future in self._awaiting_grammar.values()]
            concurrent.futures.wait(futures, timeout=0.01, return_when=concurrent.futures.FIRST_COMPLETED)
        errors: list[RequestOutput] = []
        for request_id, (req, future) in list(self._awaiting_grammar.items()):
            if not future.done():
                continue
            del self._awaiting_grammar[request_id]
            try:
                self._admit(req, future.result())
            except PagedServeError as exc:
                errors.append(RequestOutput.failure(request_id, exc))
        return errors

    def _admit(self, req: GenerateRequest, compiled_grammar) -> None:
        params = req.params
        added: list[str] = []
        try:
            for index in range(params.n):
                child_params = params
                if params.n > 1 and params.seed is not None:
                    child_params = _with_seed(params, params.seed + index)
                child_id = req.request_id if params.n == 1 else f"{req.request_id}#{index}"
                request = Request(child_id, req.prompt_token_ids, child_params, self.eos_token_ids, req.arrival_time)
                if compiled_grammar is not None:
                    request.grammar = GrammarState(compiled_grammar)
                self.scheduler.add_request(request)
                added.append(child_id)
                detok = IncrementalDetokenizer(
                    self._backend_tokenizer,
                    req.prompt_token_ids,
                    params.stop,
                    params.include_stop_str_in_output,
                    params.skip_special_tokens,
                    params.spaces_between_special_tokens,
                )
                self._choices[child_id] = _Choice(request, req.request_id, index, detok)
        except Exception:
            for child_id in added:
                self.scheduler.finish(child_id, RequestStatus.FINISHED_ABORTED)
                self._choices.pop(child_id, None)
            raise
        self._children[req.request_id] = added

    def abort(self, request_id: str) -> None:
        """Stop a request (all its choices) and free its KV blocks now. Each unfinished choice counts as
        finished with reason "abort" in the next stats, with its timings, as vLLM counts aborted requests."""
        now = time.monotonic()
        self._awaiting_grammar.pop(request_id, None)
        for child_id in self._children.pop(request_id, []):
            self.scheduler.finish(child_id, RequestStatus.FINISHED_ABORTED)
            choice = self._choices.pop(child_id, None)
            self.runner.release(child_id)
            if choice is not None:
                self._aborted.append(self._finished_stats(choice, now))

    def _take_aborted(self) -> list[FinishedStats]:
        aborted, self._aborted = self._aborted, []
        return aborted

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished() or bool(self._awaiting_grammar)

    def has_prefill_work(self) -> bool:
        """Whether the next step may compute prompt tokens (a waiting request, or a running one not yet
        through its prompt): such steps are compute-bound, unlike a step of decodes only."""
        return self.scheduler.has_prefill_work()

    def num_running(self) -> int:
        """Requests running: on a step without prefill work, the number of sequences it decodes."""
        return self.scheduler.num_running

    def close(self) -> None:
        """Stop what runs beside the loop (the grammar compiler's workers)."""
        if self._grammar_compiler is not None:
            self._grammar_compiler.close()

    def startup_phases(self) -> dict[str, float]:
        """Seconds per start-up phase; phases this engine does not run (compile, warm-up, CUDA graphs) are absent."""
        times = self.runner.times
        phases = {"download": self.download_seconds, "load_weights": times.load_weights_s, "kv_cache": times.kv_cache_s}
        if times.compile_s is not None:
            phases["compile"], phases["warmup"] = times.compile_s, times.warmup_s
        if times.cuda_graphs_s is not None:
            phases["cuda_graphs"] = times.cuda_graphs_s
        return phases

    def info(self) -> EngineInfo:
        """The engine-info message: everything the API needs to know of this engine and its model."""
        return EngineInfo(
            model=self.model_config.model,
            model_path=self.model_config.path,
            served_model_names=tuple(self.model_config.served_model_names),
            tokenizer=self.tokenizer,
            max_model_len=self.model_config.max_model_len,
            vocab_size=int(getattr(self.hf_config, "vocab_size", None) or len(self.tokenizer)),
            eos_token_ids=tuple(self.eos_token_ids),
            sampling_defaults=dict(self.sampling_defaults),
            max_num_seqs=self.scheduler_config.max_num_seqs,
            max_queued_requests=self.scheduler_config.max_queued_requests,
            device=self.model_config.device,
            dtype=str(self.runner.dtype).removeprefix("torch."),
            block_size=self.cache_config.block_size,
            num_blocks=self.runner.num_blocks,
            prefix_caching=self.cache_config.enable_prefix_caching,
            startup_phases=self.startup_phases(),
        )

    def snapshot_stats(self) -> StepStats:
        """The engine's state between steps (for the gauges once it goes idle)."""
        return StepStats(
            num_running=self.scheduler.num_running,
            num_waiting=self.scheduler.num_waiting,
            kv_usage=self.block_pool.usage,
            prefix_queries=self.block_pool.prefix_queries,
            prefix_hits=self.block_pool.prefix_hits,
            finished=self._take_aborted(),
        )

    # ---- one step -------------------------------------------------------------------------

    def step(self) -> tuple[list[RequestOutput], StepStats]:
        started = time.perf_counter()
        grammar_errors = self._admit_compiled(wait=not self.scheduler.has_unfinished())
        batch = self.scheduler.schedule()
        for preempted in batch.preempted:
            choice = self._choices.get(preempted.request_id)
            if choice is not None and not choice.prompt_logprobs_sent:
                choice.prompt_logprobs.clear()
        stats = StepStats(num_preempted=len(batch.preempted), finished=self._take_aborted())
        outputs: list[RequestOutput] = grammar_errors
        if not batch.empty:
            now = time.monotonic()
            for seq in batch.seqs:
                choice = self._choices.get(seq.request.request_id)
                if choice is not None and choice.first_scheduled_time is None:
                    choice.first_scheduled_time = now
            result = self.runner.execute(batch)
            self.scheduler.update(batch, result.sampled)
            for request_id in result.grammar_ended:  # the grammar allows nothing more (EOS ignored, or refused)
                self.scheduler.finish(request_id, RequestStatus.FINISHED_STOPPED)
            for seq in batch.seqs:
                choice = self._choices.get(seq.request.request_id)
                if choice is None:
                    continue
                if seq.request.request_id in result.prompt_logprobs:
                    choice.prompt_logprobs.extend(result.prompt_logprobs[seq.request.request_id])
                if seq.samples:
                    stats.num_generated_tokens += 1
                    outputs.append(self._emit(choice, result.sampled[seq.request.request_id], result.logprobs.get(seq.request.request_id), stats))
        stats.num_batched_tokens = batch.num_batched_tokens
        stats.num_running = self.scheduler.num_running
        stats.num_waiting = self.scheduler.num_waiting + len(self._awaiting_grammar)
        stats.kv_usage = self.block_pool.usage
        stats.prefix_queries = self.block_pool.prefix_queries
        stats.prefix_hits = self.block_pool.prefix_hits
        stats.step_seconds = time.perf_counter() - started
        return outputs, stats

    def _emit(self, choice: _Choice, token: int, logprob: TokenLogprob | None, stats: StepStats) -> RequestOutput:
        request = choice.request
        now = time.monotonic()
        if choice.first_token_time is None:
            choice.first_token_time = now
            stats.ttfts.append(now - request.arrival_time)
            stats.num_prompt_tokens += request.num_prompt_tokens
        else:
            stats.inter_token_latencies.append(now - choice.last_token_time)
        choice.last_token_time = now
        ended_by_token = request.status is RequestStatus.FINISHED_STOPPED
        if ended_by_token and not request.params.include_stop_str_in_output:
            text = choice.detok.flush()  # EOS or a stop token id: not part of the text
        else:
            text = choice.detok.step(token, check_stop=request.num_output_tokens >= request.params.min_tokens)
        if choice.detok.stopped_by is not None and not request.status.finished:
            self.scheduler.finish(request.request_id, RequestStatus.FINISHED_STOPPED)
            request.stop_reason = choice.detok.stopped_by
        elif request.status.finished and choice.detok.stopped_by is None:
            text += choice.detok.flush()
        out = RequestOutput(
            request_id=choice.parent_id,
            index=choice.index,
            token_ids=[token],
            text=text,
            logprobs=[logprob] if logprob is not None else None,
            finish_reason=request.finish_reason,
            stop_reason=request.stop_reason,
            num_prompt_tokens=request.num_prompt_tokens,
            num_cached_tokens=request.num_cached_tokens,
            num_output_tokens=request.num_output_tokens,
        )
        if request.params.prompt_logprobs is not None and not choice.prompt_logprobs_sent:
            out.prompt_logprobs = [None, *choice.prompt_logprobs]
            choice.prompt_logprobs_sent = True
        if request.status.finished:
            stats.finished.append(self._finished_stats(choice, now))
            self._forget(choice)
        return out

    def _finished_stats(self, choice: _Choice, now: float) -> FinishedStats:
        request = choice.request
        scheduled = choice.first_scheduled_time or now
        first_token = choice.first_token_time or now
        return FinishedStats(
            finish_reason=request.finish_reason or "abort",
            num_prompt_tokens=request.num_prompt_tokens,
            num_generation_tokens=request.num_output_tokens,
            e2e_seconds=now - request.arrival_time,
            queue_seconds=scheduled - request.arrival_time,
            prefill_seconds=first_token - scheduled,
            decode_seconds=now - first_token,
        )

    def _forget(self, choice: _Choice) -> None:
        request_id = choice.request.request_id
        self._choices.pop(request_id, None)
        self.runner.release(request_id)
        siblings = self._children.get(choice.parent_id)
        if siblings is not None and all(c not in self._choices for c in siblings):
            del self._children[choice.parent_id]


def _with_seed(params: SamplingParams, seed: int) -> SamplingParams:
    return dataclasses.replace(params, seed=seed)
