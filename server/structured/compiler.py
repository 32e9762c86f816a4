"""Grammar compilation off the step loop: worker processes, a cache keyed by the spec, a deadline
and a bound on the grammar's size (one slow schema must not stall the server, as in vLLM #54003).

`GrammarCompiler.submit(spec)` returns at once with a future. A few threads each feed one worker
process (started on first use); a compilation that passes its deadline gets its process killed (a
fresh one starts for the next job) and its request a 400. Results and refusals are cached by the
spec, so a schema seen before costs nothing, and a schema that timed out is refused at once.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import queue
import subprocess
import sys
import threading
from collections import OrderedDict
from concurrent.futures import Future
from multiprocessing.connection import Connection
from pathlib import Path

from server.config import StructuredOutputsConfig
from server.errors import InvalidRequest, PagedServeError
from server.structured.spec import GrammarSpec

logger = logging.getLogger(__name__)

_WORKER_START_TIMEOUT_S = 300.0  # importing xgrammar (and torch) in a fresh process
_CACHE_ENTRIES = 256
_PACKAGE_ROOT = str(Path(__file__).resolve().parents[2])  # the directory that holds the `server` package


class _Worker:
    """One compile process and the thread that feeds it; the process starts on the first job."""

    def __init__(self, owner: GrammarCompiler, name: str):
        self._owner = owner
        self._process: subprocess.Popen | None = None
        self._jobs: Connection | None = None
        self._results: Connection | None = None
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def _start_process(self) -> None:
        jobs_read, jobs_write = os.pipe()
        results_read, results_write = os.pipe()
        env = dict(os.environ, OMP_NUM_THREADS="1")
        env["PYTHONPATH"] = os.pathsep.join(filter(None, (_PACKAGE_ROOT, env.get("PYTHONPATH"))))
        try:
            process = subprocess.Popen(
                [sys.executable, "-m", "server.structured.worker", str(jobs_read), str(results_write)],
                pass_fds=(jobs_read, results_write),
                stdin=subprocess.DEVNULL,
                env=env,
            )
        finally:
            os.close(jobs_read)
            os.close(results_write)
        self._process = process
        self._jobs = Connection(jobs_write, readable=False)
        self._results = Connection(results_read, writable=False)
        self._jobs.send(self._owner.tokenizer_info_json())
        if not self._results.poll(_WORKER_START_TIMEOUT_S) or self._results.recv()[0] != "ready":
            self.stop()
            raise PagedServeError("The grammar compiler could not start.")

    def stop(self) -> None:
        if self._process is not None:
            self._process.kill()
            self._process.wait(5)
            self._jobs.close()
            self._results.close()
            self._process = self._jobs = self._results = None

    def _run(self) -> None:
        while True:
            job = self._owner.jobs.get()
            if job is None:
                self.stop()
                return
            spec, future = job
            self._owner.count_busy(+1)
            try:
                future.set_result(self._compile(spec))
            except PagedServeError as exc:
                future.set_exception(exc)
            except Exception as exc:  # a dead pipe, a worker that crashed: this job fails, the next gets a fresh one
                logger.exception("The grammar compiler failed")
                self.stop()
                future.set_exception(PagedServeError(f"The grammar could not be compiled: {exc}"))
            finally:
                self._owner.count_busy(-1)

    def _compile(self, spec: GrammarSpec):
        if self._process is None or self._process.poll() is not None:
            self.stop()
            self._start_process()
        timeout = self._owner.config.compile_timeout
        self._jobs.send((spec.kind, spec.source, spec.any_whitespace))
        if not self._results.poll(timeout):
            self.stop()  # the only way to stop a compilation midway
            raise InvalidRequest(
                f"{spec.param}: the grammar took longer than {timeout:g} s to compile and was abandoned; "
                "simplify it (fewer or smaller bounded repetitions, shorter patterns, fewer alternatives).",
                param=spec.param,
            )
        status, payload = self._results.recv()
        if status != "ok":
            raise InvalidRequest(f"{spec.param}: {_describe(spec)} cannot be used: {payload.rstrip('.')}.", param=spec.param)
        return self._owner.deserialize(payload)


def _describe(spec: GrammarSpec) -> str:
    return {
        "json_schema": "the JSON schema",
        "json_object": "the JSON grammar",
        "regex": "the regex",
        "ebnf": "the grammar",
        "choice": "the choices",
    }[spec.kind]


class GrammarCompiler:
    """Compiles GrammarSpecs for one model's tokenizer; thread-safe; `close()` stops the workers."""

    def __init__(self, tokenizer, vocab_size: int, stop_token_ids: tuple[int, ...], config: StructuredOutputsConfig):
        self.config = config
        self._tokenizer = tokenizer
        self._vocab_size = vocab_size
        self._stop_token_ids = list(stop_token_ids)
        self._info = None
        self._info_json: str | None = None
        self._lock = threading.Lock()
        self._cache: OrderedDict[tuple, Future] = OrderedDict()
        self._workers: list[_Worker] = []
        self.jobs: queue.SimpleQueue = queue.SimpleQueue()
        self.busy = 0  # workers compiling now
        self._closed = False

    @property
    def tokenizer_info(self):
        """xgrammar's view of the vocabulary, built once (its size is the model's, which may exceed the tokenizer's)."""
        with self._lock:
            if self._info is None:
                import xgrammar as xgr

                self._info = xgr.TokenizerInfo.from_huggingface(
                    self._tokenizer, vocab_size=self._vocab_size, stop_token_ids=self._stop_token_ids or None
                )
            return self._info

    def tokenizer_info_json(self) -> str:
        info = self.tokenizer_info
        with self._lock:
            if self._info_json is None:
                self._info_json = info.serialize_json()
            return self._info_json

    def count_busy(self, change: int) -> None:
        with self._lock:
            self.busy += change

    def deserialize(self, payload: str):
        import xgrammar as xgr

        return xgr.CompiledGrammar.deserialize_json(payload, self.tokenizer_info)

    def submit(self, spec: GrammarSpec) -> Future:
        """A future of the CompiledGrammar (or of the InvalidRequest that refuses it); raises at once
        for a grammar over the size bound."""
        if spec.any_whitespace is None:
            spec = dataclasses.replace(spec, any_whitespace=self.config.any_whitespace)
        size = len(spec.source.encode())
        if size > self.config.max_grammar_bytes:
            raise InvalidRequest(
                f"{spec.param}: {_describe(spec)} has {size} bytes, more than this server's limit of "
                f"{self.config.max_grammar_bytes} (--max-grammar-bytes).",
                param=spec.param,
            )
        with self._lock:
            if self._closed:
                raise PagedServeError("The grammar compiler is shut down.")
            future = self._cache.get(spec.key)
            if future is not None:
                self._cache.move_to_end(spec.key)
                return future
            future = Future()
            self._cache[spec.key] = future
            while len(self._cache) > _CACHE_ENTRIES:
                self._cache.popitem(last=False)
            if self.busy >= len(self._workers) < self.config.workers:  # a new process only when all are busy
                self._workers.append(_Worker(self, f"grammar-compiler-{len(self._workers)}"))
        future.add_done_callback(self._forget_server_errors)
        self.jobs.put((spec, future))
        return future

    def _forget_server_errors(self, future: Future) -> None:
        """A failure of the server (not of the grammar) must not stick to the spec: drop it from the cache."""
        exc = future.exception()
        if exc is not None and not isinstance(exc, InvalidRequest):
            with self._lock:
                for key, cached in list(self._cache.items()):
                    if cached is future:
                        del self._cache[key]

    def close(self) -> None:
        with self._lock:
            self._closed = True
            workers, self._workers = self._workers, []
        for _ in workers:
            self.jobs.put(None)
