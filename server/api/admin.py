"""Operations and model routes: health, readiness, version, metrics, models, tokenize, detokenize."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST

import server
from server.api.prompts import encode_chat, render_chat
from server.api.protocol import (
    ERROR_RESPONSES,
    DetokenizeRequest,
    DetokenizeResponse,
    ModelCard,
    ModelList,
    TokenizeRequest,
    TokenizeResponse,
)
from server.api.state import ServerState, get_state
from server.errors import InvalidRequest, ModelNotFound

# Open unless --auth-admin-routes: probes and scrapers carry no key.
ops_router = APIRouter(tags=["operations"])
# These serve the model: they need the key.
model_router = APIRouter(tags=["models"], responses=ERROR_RESPONSES)


@ops_router.get("/health")
async def health(request: Request) -> JSONResponse:
    """Liveness: 200 while the engine loop runs, 503 once it died or hangs."""
    client = get_state(request).client
    if client.is_alive:
        return JSONResponse({"status": "ok"})
    return JSONResponse({"status": "engine_dead", "reason": client.dead_reason or "not running"}, status_code=503)


@ops_router.get("/ready")
async def ready(request: Request) -> JSONResponse:
    """Readiness: 200 when the model is loaded, the server is not draining and the queue has room."""
    ok, reason = get_state(request).readiness()
    return JSONResponse({"status": reason}, status_code=200 if ok else 503)


@ops_router.get("/version")
async def version() -> dict:
    return {"version": server.__version__}


@ops_router.get("/metrics", response_class=Response)
async def metrics(request: Request) -> Response:
    return Response(get_state(request).metrics.render(), media_type=CONTENT_TYPE_LATEST)


def _card(state: ServerState, name: str) -> ModelCard:
    return ModelCard(id=name, created=state.created, root=state.model.root, max_model_len=state.model.max_model_len)


@model_router.get("/v1/models", response_model=ModelList)
async def list_models(request: Request) -> ModelList:
    state = get_state(request)
    return ModelList(data=[_card(state, name) for name in state.model.names])


@model_router.get("/v1/models/{model_id:path}", response_model=ModelCard)
async def get_model(model_id: str, request: Request) -> ModelCard:
    state = get_state(request)
    if model_id not in state.model.names:
        raise ModelNotFound(f"The model `{model_id}` does not exist.", param="model")
    return _card(state, model_id)


@model_router.post("/tokenize", response_model=TokenizeResponse)
async def tokenize(body: TokenizeRequest, request: Request) -> TokenizeResponse:
    """Token ids of a prompt (`add_special_tokens` default true) or of chat messages through the template."""
    state = get_state(request)
    state.model.resolve(body.model)
    if (body.prompt is None) == (body.messages is None):
        raise InvalidRequest("Give exactly one of prompt and messages.", param="prompt")
    tokenizer = state.model.tokenizer
    if body.messages is not None:
        if not body.messages:
            raise InvalidRequest("messages must not be empty.", param="messages")
        text = render_chat(state.model, body, trust_request_template=state.config.trust_request_chat_template)
        tokens = encode_chat(state.model, text) if not body.add_special_tokens else list(tokenizer.encode(text))
    else:
        tokens = list(tokenizer.encode(body.prompt, add_special_tokens=body.add_special_tokens is not False))
    return TokenizeResponse(count=len(tokens), max_model_len=state.model.max_model_len, tokens=tokens)


@model_router.post("/detokenize", response_model=DetokenizeResponse)
async def detokenize(body: DetokenizeRequest, request: Request) -> DetokenizeResponse:
    state = get_state(request)
    state.model.resolve(body.model)
    bad = next((t for t in body.tokens if t >= state.model.vocab_size), None)
    if bad is not None:
        vocab = state.model.vocab_size
        raise InvalidRequest(f"Token id {bad} is out of range for a vocabulary of {vocab} tokens.", param="tokens")
    return DetokenizeResponse(prompt=state.model.tokenizer.decode(body.tokens))
