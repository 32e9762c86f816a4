"""The API layer against a fake engine client: liveness, readiness, auth options, dead engine, logs."""

from __future__ import annotations

import json
import logging

import pytest
from fastapi.testclient import TestClient
from transformers import AutoTokenizer

from server.api.app import build_app
from server.api.logs import JsonFormatter, log_access
from server.api.state import ServerState
from server.config import ServerConfig
from server.demo import ensure_demo_model
from server.engine.messages import EngineInfo
from server.errors import EngineDead


class FakeClient:
    """Just enough of EngineClient for the API: no model, no engine loop."""

    def __init__(self, max_queued_requests: int | None = None):
        tokenizer = AutoTokenizer.from_pretrained(str(ensure_demo_model()))
        self.info = EngineInfo(
            model="fake-root", model_path="/nonexistent", served_model_names=("fake",), tokenizer=tokenizer,
            max_model_len=64, vocab_size=len(tokenizer), eos_token_ids=(2,), sampling_defaults={}, max_num_seqs=4,
            max_queued_requests=max_queued_requests, device="cpu", dtype="float32", block_size=16, num_blocks=1,
            prefix_caching=True,
        )
        self.is_alive = False
        self.num_waiting = 0
        self.dead_reason = None

    def start(self) -> None:
        self.is_alive = True

    def set_step_listener(self, on_step) -> None:
        pass

    def shutdown(self, timeout: float = 10.0) -> None:
        self.is_alive = False

    async def generate(self, prompt_token_ids, params, request_id=None):
        raise EngineDead("The engine is not running: boom.")
        yield  # an async generator, like the real one


@pytest.fixture(scope="module")
def fake() -> FakeClient:
    return FakeClient(max_queued_requests=1)


def test_health_ready_and_dead_engine(fake):
    app = build_app(fake, ServerConfig())
    with TestClient(app) as http:
        assert http.get("/health").status_code == 200
        assert http.get("/ready").json() == {"status": "ready"}
        fake.num_waiting = 1
        assert http.get("/ready").json() == {"status": "queue_full"}
        fake.num_waiting = 0
        fake.is_alive, fake.dead_reason = False, "RuntimeError: boom"
        assert http.get("/health").status_code == 503
        assert http.get("/ready").json() == {"status": "engine_dead"}
        response = http.post("/v1/completions", json={"prompt": "hi"})
        assert response.status_code == 503 and response.json()["error"]["type"] == "service_unavailable"
        app.state.server.draining = True
        assert http.get("/ready").json() == {"status": "draining"}


def test_api_key_from_env_and_admin_routes(fake, monkeypatch):
    monkeypatch.setenv("PAGEDSERVE_API_KEY", "env-key")
    app = build_app(fake, ServerConfig(auth_admin_routes=True))
    with TestClient(app) as http:
        assert http.get("/health").status_code == 401
        assert http.get("/health", headers={"Authorization": "Bearer env-key"}).status_code == 200
        response = http.get("/v1/models", headers={"Authorization": "Basic env-key"})
        assert response.status_code == 401 and response.headers["WWW-Authenticate"] == "Bearer"
        assert http.get("/v1/models", headers={"Authorization": "Bearer env-key"}).json()["data"][0]["id"] == "fake"


def test_placeholder_model_names(fake):
    state = ServerState.build(fake, ServerConfig())
    assert state.model.resolve(None) == state.model.resolve("tgi") == state.model.resolve("dummy") == "fake"
    with pytest.raises(Exception) as info:
        state.model.resolve("other")
    assert getattr(info.value, "status_code", None) == 404


def test_engine_ids_stay_unique(fake):
    state = ServerState.build(fake, ServerConfig())
    first = state.claim_ids("abc", 1)
    second = state.claim_ids("abc", 1)
    multi = state.claim_ids("abc", 2)
    assert len({*first, *second, *multi}) == 4
    state.release_ids(first)
    assert state.claim_ids("abc", 1) == first


def test_json_access_log(caplog):
    caplog.set_level(logging.INFO, logger="pagedserve.access")
    log_access("POST", "/v1/completions", 200, 0.0123, "rid-1", "127.0.0.1:5")
    record = next(r for r in caplog.records if r.name == "pagedserve.access")
    line = json.loads(JsonFormatter().format(record))
    assert line["request_id"] == "rid-1" and line["status"] == 200 and line["duration_ms"] == 12.3
    assert line["logger"] == "pagedserve.access" and line["level"] == "INFO"
