"""`pagedserve serve`: build the engine, serve the app with uvicorn, drain gracefully on SIGTERM.

On the first SIGTERM or SIGINT the server keeps listening but drains: /ready answers 503 at once,
new inference requests get 503, and requests in flight get `--shutdown-timeout` seconds to
finish before they are ended with an error. Then uvicorn stops and the process exits 0. A second
signal stops at once.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from types import FrameType

import uvicorn

from server.api.app import build_app
from server.api.logs import configure_logging
from server.api.state import ServerState
from server.config import EngineArgs, ServerConfig
from server.engine.client import EngineClient
from server.engine.core import EngineCore

logger = logging.getLogger(__name__)


class DrainingServer(uvicorn.Server):
    """uvicorn.Server whose exit signals drain the app first (and are not re-raised afterwards)."""

    def __init__(self, config: uvicorn.Config, state: ServerState):
        super().__init__(config)
        self._state = state
        self._loop: asyncio.AbstractEventLoop | None = None
        self._drain_task: asyncio.Task | None = None
        self._signalled = False

    async def serve(self, sockets=None) -> None:
        self._loop = asyncio.get_running_loop()
        await super().serve(sockets)

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


def _exit_while_loading(sig: int, frame: FrameType | None) -> None:
    logger.info("Received %s while loading the model: exiting", signal.Signals(sig).name)
    raise SystemExit(0)


def run_server(engine_args: EngineArgs, server_config: ServerConfig) -> int:
    configure_logging(server_config.log_format)
    # Until uvicorn installs its draining handlers, a SIGTERM (a pod deleted during a download)
    # ends the process at once instead of waiting out the grace period.
    previous = signal.signal(signal.SIGTERM, _exit_while_loading)
    try:
        client = EngineClient(EngineCore(engine_args))
    finally:
        signal.signal(signal.SIGTERM, previous)
    app = build_app(client, server_config)
    server = DrainingServer(uvicorn_config(app, server_config), app.state.server)
    server.run()
    if not server.started:
        return 1
    return 0
