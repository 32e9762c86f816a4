"""A real uvicorn server on 127.0.0.1 (free port) in a thread, serving the demo model; shared by the API tests."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field

import httpx
import pytest

from server.api.app import build_app
from server.api.serve import DrainingServer, uvicorn_config
from server.config import EngineArgs, ServerConfig
from server.demo import ensure_demo_model
from server.engine.client import EngineClient
from server.engine.core import EngineCore

API_KEY = "test-key"
ENGINE_FLAGS = dict(dtype="float32", max_model_len=512, kv_cache_memory=0.25, max_num_seqs=48)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class RunningServer:
    base_url: str
    port: int
    core: EngineCore
    client: EngineClient
    app: object
    server: DrainingServer
    thread: threading.Thread
    api_key: str | None
    headers: dict = field(default_factory=dict)

    @property
    def state(self):
        return self.app.state.server

    @property
    def model_name(self) -> str:
        return self.core.model_config.served_model_names[0]

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)

    def wait_idle(self, timeout: float = 5.0) -> float:
        """Seconds until the engine holds no request and no KV block (raises after `timeout`)."""
        started = time.monotonic()
        while time.monotonic() - started < timeout:
            if self.core.block_pool.usage == 0 and not self.core.has_unfinished() and self.state.num_in_flight == 0:
                return time.monotonic() - started
            time.sleep(0.005)
        raise AssertionError(
            f"engine not idle after {timeout}s: usage={self.core.block_pool.usage}, "
            f"unfinished={self.core.has_unfinished()}, in_flight={self.state.num_in_flight}"
        )


def start_server(api_key: str | None = API_KEY, engine_overrides: dict | None = None, **server_kwargs) -> RunningServer:
    model = str(ensure_demo_model())
    core = EngineCore(EngineArgs(model=model, **{**ENGINE_FLAGS, **(engine_overrides or {})}))
    client = EngineClient(core)
    port = free_port()
    config = ServerConfig(host="127.0.0.1", port=port, api_key=api_key, **server_kwargs)
    app = build_app(client, config)
    server = DrainingServer(uvicorn_config(app, config), app.state.server)
    thread = threading.Thread(target=server.run, name=f"uvicorn-{port}", daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("the test server did not start")
        time.sleep(0.02)
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    return RunningServer(f"http://127.0.0.1:{port}", port, core, client, app, server, thread, api_key, headers)


@pytest.fixture(scope="session")
def api_server():
    running = start_server(max_request_body_bytes=1 << 20)
    yield running
    running.stop()


@pytest.fixture(scope="session")
def offline_llm():
    from server.llm import LLM

    return LLM(str(ensure_demo_model()), **ENGINE_FLAGS)


@contextlib.contextmanager
def serve_in_subprocess(model: str | None, *flags: str, timeout: float = 120.0):
    """`python -m server serve [MODEL]` (None: the built-in demo model) in its own process group on a free port; yields (base_url, pid)
    once /health answers, and stops the whole group afterwards."""
    port = free_port()
    env = dict(os.environ, OMP_NUM_THREADS="1", OMP_WAIT_POLICY="PASSIVE")
    cmd = [sys.executable, "-m", "server", "serve", *([model] if model else []), "--port", str(port), "--dtype", "float32", *flags]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + timeout
    try:
        while True:
            if proc.poll() is not None:
                pytest.fail(f"server exited: {proc.stderr.read().decode()[-2000:]}")
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"server did not start in {timeout:.0f} s")
            time.sleep(0.25)
        yield url, proc.pid
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def disconnect_mid_request(server: RunningServer, path: str, body: dict, streaming: bool) -> None:
    """Send `body` to `path` on a raw socket, wait until the engine holds KV blocks for it (and the
    stream started), then drop the connection: the abort must free every block at the next step."""
    payload = json.dumps(body).encode()
    sock = socket.create_connection(("127.0.0.1", server.port))
    head = (
        f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        f"Authorization: Bearer {server.api_key}\r\nContent-Length: {len(payload)}\r\n\r\n"
    )
    sock.sendall(head.encode() + payload)
    if streaming:
        received = b""
        while b"data: " not in received:  # the stream started
            chunk = sock.recv(4096)
            assert chunk, received
            received += chunk
    deadline = time.monotonic() + 10
    while server.core.block_pool.usage == 0:
        assert time.monotonic() < deadline
        time.sleep(0.005)
    time.sleep(0.1)
    sock.close()
    # hundreds of decode steps would take seconds; the abort frees everything at the next step
    assert server.wait_idle(timeout=2.0) < 1.0
