"""The FastAPI app: routers, auth, errors in OpenAI's envelope, request ids, access log, body limit.

`build_app(client, server_config)` wires an engine client that is not started yet (EngineClient: the
core on a thread; ProcessEngineClient: the core in its own process); the app's lifespan starts it and
stops it on shutdown.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from fastapi import Depends, FastAPI

import server
from server.api import admin, chat, completions, tgi
from server.api.auth import require_admin_key, require_api_key
from server.api.errors import install_error_handlers
from server.api.middleware import BodyLimitMiddleware, RequestContextMiddleware
from server.api.state import ServerState
from server.config import ServerConfig
from server.engine.client import EngineClient
from server.engine.process import ProcessEngineClient

logger = logging.getLogger(__name__)


def build_app(client: EngineClient | ProcessEngineClient, server_config: ServerConfig) -> FastAPI:
    state = ServerState.build(client, server_config)
    client.set_step_listener(state.metrics.observe_step)
    info = client.info
    state.metrics.set_startup(info.startup_phases, info.block_size, info.num_blocks, info.dtype, info.prefix_caching)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        client.start()
        state.loaded = True
        logger.info("Serving %s (max_model_len %d)", ", ".join(state.model.names), state.model.max_model_len)
        try:
            yield
        finally:
            state.loaded = False
            await asyncio.to_thread(client.shutdown)

    app = FastAPI(
        title="pagedserve",
        version=server.__version__,
        description="OpenAI-compatible LLM inference server.",
        lifespan=lifespan,
    )
    app.state.server = state
    install_error_handlers(app)

    app.include_router(admin.ops_router, dependencies=[Depends(require_admin_key)])
    inference = [Depends(require_api_key)]
    app.include_router(admin.model_router, dependencies=inference)
    app.include_router(completions.router, dependencies=inference)
    app.include_router(chat.router, dependencies=inference)
    # TGI's /generate, /generate_stream, POST / and /info, behind the same key:
    app.include_router(tgi.router, dependencies=inference)

    # Outermost last: the request id and access log also cover 413 answers.
    app.add_middleware(BodyLimitMiddleware, max_bytes=server_config.max_request_body_bytes)
    app.add_middleware(RequestContextMiddleware, access_log=not server_config.disable_access_log)
    return app
