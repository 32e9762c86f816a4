"""`pagedserve serve`: build the engine, serve the app with uvicorn, drain gracefully on SIGTERM.

While the model loads, the handlers `server.cli.main` installed first thing end the process at once
with exit code 0. Once uvicorn serves, the first SIGTERM or SIGINT drains: the server keeps listening,
/ready answers 503 at once, new inference requests get 503, and requests in flight get
`--shutdown-timeout` seconds to finish before they are ended with an error. Then uvicorn stops and
the process exits 0. A second signal stops at once.

The engine core runs in its own process (server/engine/process.py) unless
--disable-frontend-multiprocessing keeps it on a thread of this one. If the engine dies (its process
killed, or its loop raised), the requests in flight have already failed with a 500 and /health answers
503; the server then stops and the process exits 1, so that Kubernetes (or any supervisor) restarts
it rather than keep a live API in front of a dead engine.
"""

from __future__ import annotations

import asyncio
import functools
import ipaddress
import logging
import os
import signal
from types import FrameType

import uvicorn

from server.api.app import build_app
from server.api.logs import configure_logging
from server.api.state import ServerState
from server.config import EngineArgs, ServerConfig
from server.engine.client import EngineClient
from server.engine.core import EngineCore
from server.engine.process import EngineProcessFailed, ProcessEngineClient
from server.engine.threads import plan_threads

logger = logging.getLogger(__name__)


_ENGINE_WATCH_S = 0.2  # how often the server checks that the engine loop still runs


class DrainingServer(uvicorn.Server):
    """uvicorn.Server whose exit signals drain the app first (and are not re-raised afterwards), and that
    stops by itself when the engine dies (`engine_died` then tells the caller), unless told not to."""

    def __init__(self, config: uvicorn.Config, state: ServerState, exit_when_engine_dies: bool = True):
        super().__init__(config)
        self._state = state
        self._exit_when_engine_dies = exit_when_engine_dies
        self._loop: asyncio.AbstractEventLoop | None = None
        self._drain_task: asyncio.Task | None = None
        self._signalled = False
        self.engine_died = False

    async def serve(self, sockets=None) -> None:
        self._loop = asyncio.get_running_loop()
        watcher = asyncio.ensure_future(self._watch_engine()) if self._exit_when_engine_dies else None
        try:
            await super().serve(sockets)
        finally:
            if watcher is not None:
                watcher.cancel()

    async def _watch_engine(self) -> None:
        client = self._state.client
        while not self.should_exit:
            if client.has_died:
                logger.error("The engine loop died (%s): stopping the server", client.dead_reason)
                self.engine_died = True
                self.should_exit = True
                return
            await asyncio.sleep(_ENGINE_WATCH_S)

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if self._signalled or self._loop is None:
            logger.warning("Second signal %s: stopping now", signal.Signals(sig).name)
            self.should_exit = True
            self.force_exit = True
            return
        self._signalled = True
        logger.info("Received %s: draining", signal.Signals(sig).name)
        self._loop.call_soon_threadsafe(self._start_drain)

    def _start_drain(self) -> None:
        if self._drain_task is None:
            self._drain_task = asyncio.ensure_future(self.drain())

    async def drain(self) -> None:
        await self._state.drain(self._state.config.shutdown_timeout)
        self.should_exit = True


def uvicorn_config(app, server_config: ServerConfig) -> uvicorn.Config:
    return uvicorn.Config(
        app,
        host=server_config.host,
        port=server_config.port,
        log_config=None,  # our logging (configure_logging) stays in charge
        access_log=False,  # RequestContextMiddleware writes the access log
        timeout_graceful_shutdown=5,
        timeout_keep_alive=5,
        lifespan="on",
    )


def is_loopback(host: str) -> bool:
    """Whether `host` (an address or a name) only listens on this machine."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # another name: it may resolve to any interface


def open_access_warning(host: str, api_key: str | None) -> str | None:
    """The start-up warning for a server that listens beyond loopback without an API key, else None."""
    if api_key or is_loopback(host):
        return None
    return (
        f"Listening on {host} without an API key: anyone who can reach this address can use the model. "
        "Set --api-key (or PAGEDSERVE_API_KEY), or listen on 127.0.0.1 behind a proxy that authenticates."
    )


def run_server(engine_args: EngineArgs, server_config: ServerConfig) -> int:
    """Load the model and serve until stopped: 0 after a drain, 1 when the server could not start or the
    engine died. SIGTERM while the model loads is handled by `server.cli.main`'s handlers."""
    configure_logging(server_config.log_format)
    warning = open_access_warning(server_config.host, server_config.api_key or os.environ.get("PAGEDSERVE_API_KEY"))
    if warning is not None:
        logger.warning(warning)
    try:
        client = start_engine(engine_args, server_config)
    except EngineProcessFailed as exc:
        logger.error("%s", exc)
        return 1
    try:
        app = build_app(client, server_config)
        server = DrainingServer(uvicorn_config(app, server_config), app.state.server)
        server.run()
    finally:
        client.shutdown()  # a no-op after the app's lifespan stopped it; else (uvicorn failed) stops the engine
    if not server.started or server.engine_died:
        return 1
    return 0


def start_engine(engine_args: EngineArgs, server_config: ServerConfig) -> EngineClient | ProcessEngineClient:
    """The engine core in its own process (the default), or on a thread of this one with
    --disable-frontend-multiprocessing. Returns once the model is loaded."""
    import torch

    plan = plan_threads()  # before the engine process starts: it plans from the same affinity mask
    if server_config.disable_frontend_multiprocessing:
        torch.set_num_threads(plan.one_process_threads)
        logger.info("Compute threads: %d (the engine on a thread of the API process)", plan.one_process_threads)
        return EngineClient(EngineCore(engine_args))
    torch.set_num_threads(1)  # this process tokenizes and serves HTTP; the engine process computes
    client = ProcessEngineClient(engine_args, setup_logging=functools.partial(configure_logging, server_config.log_format))
    if set(plan.api_cores) != os.sched_getaffinity(0):
        os.sched_setaffinity(0, plan.api_cores)  # after the start: the engine process inherited the whole mask
    return client
