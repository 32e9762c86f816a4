"""When the engine loop dies: requests in flight fail at once with a 500 in OpenAI's envelope (an
error event, then [DONE], on streams), new ones get 503, /health turns 503, the failures are counted
as engine_error, and `pagedserve serve` exits 1 so that Kubernetes restarts it.

The fault is injected: the real engine core, whose step raises once armed."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time

import httpx
import pytest
from api_server import ENGINE_FLAGS, free_port
from prometheus_client.parser import text_string_to_metric_families
from test_api_drain import LONG, StreamReader, _wait_for

from server.api.app import build_app
from server.api.serve import DrainingServer, uvicorn_config
from server.config import EngineArgs, ServerConfig
from server.demo import ensure_demo_model
from server.engine.client import EngineClient
from server.engine.core import EngineCore


class FailingEngineCore(EngineCore):
    """The real engine core; once `armed` is set, its next step raises (the injected fault)."""

    def __init__(self, args: EngineArgs):
        super().__init__(args)
        self.armed = threading.Event()

    def step(self):
        if self.armed.is_set():
            raise RuntimeError("injected fault in the engine step")
        return super().step()


def _engine_errors(base_url: str) -> float:
    text = httpx.get(base_url + "/metrics", timeout=10).text
    return sum(
        s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name == "pagedserve:request_failures_total" and s.labels["reason"] == "engine_error"
    )


@pytest.fixture
def failing_server():
    """A real uvicorn server on 127.0.0.1 over a FailingEngineCore. It does not stop by itself when the
    engine dies (exit_when_engine_dies=False), so that the test can see /health and new requests."""
    core = FailingEngineCore(EngineArgs(model=str(ensure_demo_model()), **ENGINE_FLAGS))
    config = ServerConfig(host="127.0.0.1", port=free_port())
    app = build_app(EngineClient(core), config)
    server = DrainingServer(uvicorn_config(app, config), app.state.server, exit_when_engine_dies=False)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    _wait_for(lambda: server.started or not thread.is_alive(), 60, "the server to start")
    assert server.started
    yield f"http://127.0.0.1:{config.port}", core, app.state.server
    server.should_exit = True
    thread.join(30)


def test_requests_in_flight_fail_fast_with_500_when_the_engine_dies_injected_fault(failing_server):
    base, core, state = failing_server
    errors_before = _engine_errors(base)
    stream = StreamReader(base, LONG)
    stream.start()
    result: dict = {}

    def plain() -> None:
        result["response"] = httpx.post(base + "/v1/completions", json={**LONG, "stream": False}, timeout=120)

    blocking = threading.Thread(target=plain, daemon=True)
    blocking.start()
    assert stream.started.wait(30)
    _wait_for(lambda: state.num_in_flight == 2, 30, "both requests to run")
    core.armed.set()
    started = time.monotonic()
    stream.join(10)
    blocking.join(10)
    assert time.monotonic() - started < 5, "the requests in flight should fail at once"

    assert stream.status == 200 and stream.payloads[-1] == "[DONE]"
    error = stream.payloads[-2]["error"]
    assert error["code"] == 500 and error["type"] == "internal_error" and "engine failed" in error["message"]
    response = result["response"]
    assert response.status_code == 500
    assert set(response.json()["error"]) == {"message", "type", "param", "code"}
    assert response.json()["error"]["code"] == 500 and "engine failed" in response.json()["error"]["message"]

    health = httpx.get(base + "/health", timeout=5)
    assert health.status_code == 503 and health.json()["status"] == "engine_dead"
    assert "injected fault" in health.json()["reason"]
    assert httpx.get(base + "/ready", timeout=5).status_code == 503
    refused = httpx.post(base + "/v1/completions", json={"prompt": "hi", "max_tokens": 2}, timeout=10)
    assert refused.status_code == 503 and refused.json()["error"]["type"] == "service_unavailable"
    # the two in flight (500) and the refused one (503) all count as engine errors
    assert _engine_errors(base) - errors_before == 3


# `python -m server serve` with the engine core swapped for one whose every step raises.
_FAILING_SERVE = """
import sys

from server.api import serve
from server.engine.core import EngineCore


class FailingEngineCore(EngineCore):
    def step(self):
        raise RuntimeError("injected fault in the engine step")


serve.EngineCore = FailingEngineCore
from server.cli import main

sys.exit(main(sys.argv[1:]))
"""


def test_the_server_exits_non_zero_when_the_engine_dies_injected_fault():
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    command = [
        sys.executable, "-c", _FAILING_SERVE, "serve", str(ensure_demo_model()), "--port", str(port),
        "--dtype", "float32", "--max-model-len", "512", "--kv-cache-memory", "0.25", "--disable-frontend-multiprocessing",
    ]
    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE", "PAGEDSERVE_API_KEY": ""}
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env)
    try:
        def health() -> int | None:
            try:
                return httpx.get(base + "/health", timeout=2).status_code
            except httpx.TransportError:
                return None

        _wait_for(lambda: health() == 200 or proc.poll() is not None, 120, "the server to start")
        response = httpx.post(base + "/v1/completions", json={"prompt": "hi", "max_tokens": 4}, timeout=30)
        assert response.status_code == 500 and response.json()["error"]["code"] == 500
        code = proc.wait(15)
    finally:
        if proc.poll() is None:
            proc.kill()
        output = proc.communicate()[0].decode(errors="replace")
    assert code == 1, output
    assert "The engine loop died" in output and "stopping the server" in output
