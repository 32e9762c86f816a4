"""ProcessEngineClient: the engine core in its own process, behind the same interface as EngineClient.

The child (multiprocessing's "spawn" context: torch and fork do not mix) builds the EngineCore and
sends the EngineInfo first, or an EngineStartFailed. It then loops: take every message its pipe
brought (GenerateRequest, AbortRequest, ShutdownEngine), run one step, and send ONE EngineStep with
that step's outputs and stats (and a snapshot when it goes idle, so that the gauges drop to 0). A
thread of the child reads the pipe all the time, so an abort reaches the core before its next step.

In the parent one thread reads the pipe and the child's process sentinel: it routes the outputs to
their requests (RequestRouter), feeds the step listener and keeps the queue sizes. When the child
ends without being asked to (killed, crashed, a step raised), every request in flight fails at once
(500), new ones get 503 and `has_died` turns true. The child exits when the parent does (its pipe
reaches EOF), and ignores SIGINT and SIGTERM: the parent drains, then asks it to stop.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import os
import queue
import signal
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable
from multiprocessing.connection import Connection, wait

from server.config import EngineArgs
from server.engine.messages import (
    AbortRequest,
    EngineError,
    EngineInfo,
    EngineStartFailed,
    EngineStep,
    GenerateRequest,
    RequestOutput,
    ShutdownEngine,
)
from server.engine.router import RequestRouter
from server.engine.threads import ThreadPlan, plan_threads
from server.errors import ConfigError, EngineDead, PagedServeError
from server.metrics import StepStats
from server.request import SamplingParams

logger = logging.getLogger(__name__)

_HUNG_AFTER_S = 120.0  # a busy engine that sends nothing for this long counts as hung
_KILL_WAIT_S = 5.0


class EngineProcessFailed(RuntimeError):
    """The engine process could not start for another reason than a bad flag or model (its log says why)."""


class ProcessEngineClient:
    """Starts the engine process and waits for its EngineInfo (raises ConfigError for a bad flag, model or
    checkpoint, EngineProcessFailed otherwise). `core_factory(args)` builds the core in the child: a
    picklable callable (a class or a module-level function); `setup_logging()` runs first in the child."""

    def __init__(
        self,
        args: EngineArgs,
        core_factory: Callable[[EngineArgs], object] | None = None,
        setup_logging: Callable[[], None] | None = None,
    ):
        context = multiprocessing.get_context("spawn")
        self._conn, child_conn = context.Pipe(duplex=True)
        self._process = context.Process(
            target=run_engine_process, args=(child_conn, args, core_factory, setup_logging), name="pagedserve-engine"
        )
        self._process.start()
        child_conn.close()  # the child holds the only other end: its death is EOF here
        self._send_lock = threading.Lock()
        self._router = RequestRouter()
        self._on_step: Callable[[StepStats], None] | None = None
        self._reader: threading.Thread | None = None
        self._stopping = False
        self._heartbeat = self._last_submit = time.monotonic()
        self._num_waiting = self._num_running = 0
        self._info = self._await_info()

    def _await_info(self) -> EngineInfo:
        message = None
        if self._conn in wait([self._conn, self._process.sentinel]) or self._conn.poll():
            with contextlib.suppress(EOFError, OSError):
                message = self._conn.recv()
        if isinstance(message, EngineInfo):
            return message
        self._process.join(_KILL_WAIT_S)
        self._close_process()
        if isinstance(message, EngineStartFailed):
            if message.user_error:
                raise ConfigError(message.message)
            raise EngineProcessFailed(f"The engine could not start: {message.message}")
        raise EngineProcessFailed(f"The engine could not start: {self._exit_reason()}")

    # ---- lifecycle ------------------------------------------------------------------------

    def set_step_listener(self, on_step: Callable[[StepStats], None]) -> None:
        """Called on the reader thread once per engine step (metrics); set before start()."""
        self._on_step = on_step

    def start(self) -> None:
        self._reader = threading.Thread(target=self._read, name="engine-reader", daemon=True)
        self._reader.start()

    def shutdown(self, timeout: float = 10.0) -> None:
        """Ask the engine process to stop; after `timeout` seconds terminate it, then kill it."""
        if self._conn.closed:
            return
        self._stopping = True
        with contextlib.suppress(EngineDead):
            self._send(ShutdownEngine())
        self._process.join(timeout)
        self._close_process()
        if self._reader is not None:
            self._reader.join(_KILL_WAIT_S)
        self._conn.close()

    def _close_process(self) -> None:
        if self._process.is_alive():
            logger.warning("The engine process did not stop: terminating it")
            self._process.terminate()
            self._process.join(_KILL_WAIT_S)
        if self._process.is_alive():
            self._process.kill()
            self._process.join()

    @property
    def info(self) -> EngineInfo:
        """The engine-info message: what the API may know of the engine and its model."""
        return self._info

    @property
    def pid(self) -> int | None:
        return self._process.pid

    @property
    def dead_reason(self) -> str | None:
        return self._router.dead_reason

    @property
    def has_died(self) -> bool:
        """The engine process ended without being asked to: it cannot serve any more (the server should exit)."""
        return self._router.dead_reason is not None

    @property
    def is_alive(self) -> bool:
        """The engine process runs, its reader too, and a busy engine is not stuck inside one step."""
        if self.has_died or self._stopping or self._reader is None or not self._reader.is_alive():
            return False
        if not self._process.is_alive():
            return False
        busy = self._num_running + self._num_waiting > 0 or self._last_submit > self._heartbeat
        return not busy or time.monotonic() - max(self._heartbeat, self._last_submit) < _HUNG_AFTER_S

    @property
    def num_waiting(self) -> int:
        return self._num_waiting

    @property
    def num_running(self) -> int:
        return self._num_running

    # ---- requests -------------------------------------------------------------------------

    async def generate(
        self, prompt_token_ids: list[int], params: SamplingParams, request_id: str | None = None
    ) -> AsyncIterator[RequestOutput]:
        """Stream the deltas of every choice of one request. Leaving early aborts the request."""
        if not self.is_alive:
            raise EngineDead(f"The engine is not running: {self.dead_reason or 'stopped'}.")
        request = GenerateRequest(request_id or uuid.uuid4().hex, list(prompt_token_ids), params, time.monotonic())
        self._last_submit = time.monotonic()
        async with contextlib.aclosing(self._router.stream(request, self._send)) as deltas:
            async for out in deltas:
                yield out

    def abort(self, request_id: str) -> None:
        with contextlib.suppress(EngineDead):
            self._send(AbortRequest(request_id))

    def _send(self, message: GenerateRequest | AbortRequest | ShutdownEngine) -> None:
        try:
            with self._send_lock:
                self._conn.send(message)
        except (OSError, ValueError) as exc:  # the pipe is closed: the engine process is gone
            raise EngineDead(f"The engine is not running: {self.dead_reason or exc}.") from exc

    # ---- the reader thread ----------------------------------------------------------------

    def _read(self) -> None:
        reason: str | None = None
        try:
            while True:
                ready = wait([self._conn, self._process.sentinel])
                if self._conn not in ready and not self._conn.poll():
                    break  # the process ended and everything it sent has been read
                message = self._conn.recv()
                if isinstance(message, EngineStep):
                    self._on_engine_step(message)
                elif isinstance(message, EngineError):
                    reason = message.reason
        except (EOFError, OSError):
            pass
        except Exception as exc:  # a bug here would leave every request hanging: fail them instead
            logger.exception("The engine reader died")
            reason = f"{type(exc).__name__}: {exc}"
            self._process.kill()
        if self._stopping:
            return
        self._process.join(_KILL_WAIT_S)
        reason = reason or self._exit_reason()
        logger.error("The engine process died: %s", reason)
        self._router.die(reason)

    def _on_engine_step(self, step: EngineStep) -> None:
        self._heartbeat = time.monotonic()
        self._num_running, self._num_waiting = step.stats.num_running, step.stats.num_waiting
        self._router.deliver(step.outputs, self.abort)
        if self._on_step is not None:
            self._on_step(step.stats)

    def _exit_reason(self) -> str:
        code = self._process.exitcode
        if code is None:
            return "the engine process closed its pipe"
        if code < 0:
            return f"the engine process was killed by {signal.Signals(-code).name}"
        return f"the engine process exited with code {code}"


# ---- the engine process -------------------------------------------------------------------


def run_engine_process(
    conn: Connection,
    args: EngineArgs,
    core_factory: Callable[[EngineArgs], object] | None,
    setup_logging: Callable[[], None] | None,
) -> None:
    """The engine process's main: build the core, send its EngineInfo, then serve steps until told to stop."""
    for sig in (signal.SIGINT, signal.SIGTERM):  # the parent drains first, then sends ShutdownEngine
        signal.signal(sig, signal.SIG_IGN)
    if setup_logging is not None:
        setup_logging()
    inbox: queue.SimpleQueue = queue.SimpleQueue()
    threading.Thread(target=_read_parent, args=(conn, inbox), name="engine-inbox", daemon=True).start()
    plan = _use_the_cores()
    try:
        if core_factory is None:
            from server.engine.core import EngineCore

            core_factory = EngineCore
        core = core_factory(args)
    except (ConfigError, PagedServeError) as exc:
        conn.send(EngineStartFailed(str(exc), user_error=True))
        return
    except Exception as exc:
        logger.exception("The engine could not start")
        conn.send(EngineStartFailed(f"{type(exc).__name__}: {exc}", user_error=False))
        return
    logger.info("%s", plan.describe())
    try:
        conn.send(core.info())
        _serve(core, conn, inbox, plan)
    except Exception as exc:  # the loop must never die silently
        logger.exception("The engine loop died")
        with contextlib.suppress(OSError):
            conn.send(EngineError(f"{type(exc).__name__}: {exc}"))
        raise SystemExit(1) from exc
    finally:
        core.close()


def _read_parent(conn: Connection, inbox: queue.SimpleQueue) -> None:
    """Move every message from the parent into `inbox` as it comes; exit with the parent (EOF)."""
    try:
        while True:
            inbox.put(conn.recv())
    except (EOFError, OSError):
        pass
    os._exit(0)  # the parent is gone (or closed the pipe after a shutdown): nothing is left to serve


def _use_the_cores() -> ThreadPlan:
    """Torch's threads and this process's cores as `server.engine.threads` plans them (the API process
    applies the other half of the same plan, computed from the same affinity mask); returns the plan,
    logged once the engine has started (a start-up error stays one line)."""
    import torch

    plan = plan_threads()
    if set(plan.engine_cores) != os.sched_getaffinity(0):
        os.sched_setaffinity(0, plan.engine_cores)
    torch.set_num_threads(plan.engine_threads)
    return plan


def _serve(core, conn: Connection, inbox: queue.SimpleQueue, plan: ThreadPlan) -> None:
    import torch

    busy = False
    threads = plan.engine_threads
    while True:
        messages = [inbox.get()] if not core.has_unfinished() else []
        with contextlib.suppress(queue.Empty):
            while True:
                messages.append(inbox.get_nowait())
        refused: list[RequestOutput] = []
        for message in messages:
            if isinstance(message, ShutdownEngine):
                return
            if isinstance(message, AbortRequest):
                core.abort(message.request_id)
            else:
                refused.extend(core.submit(message))
        if not core.has_unfinished():
            if busy or messages:  # went idle: let the gauges see it
                conn.send(EngineStep(refused, core.snapshot_stats()))
            busy = False
            continue
        busy = True
        wanted = plan.threads_for(prefill=core.has_prefill_work(), decode_batch=core.num_running())
        if wanted != threads:  # costs well under a microsecond
            torch.set_num_threads(wanted)
            threads = wanted
        outputs, stats = core.step()
        conn.send(EngineStep(refused + outputs, stats))

