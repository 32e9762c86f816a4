"""The engine core in its own process (the default of `pagedserve serve`): a real server subprocess, the
openai SDK and httpx against it, the real Prometheus text; the engine process killed with SIGKILL."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass

import httpx
import openai
import pytest
from api_server import API_KEY, ENGINE_FLAGS, free_port
from prometheus_client.parser import text_string_to_metric_families
from test_api_drain import LONG, StreamReader, _wait_for

from server.api.app import build_app
from server.api.serve import DrainingServer, uvicorn_config
from server.config import EngineArgs, ServerConfig
from server.demo import ensure_demo_model
from server.engine.process import ProcessEngineClient

_FLAGS = (
    "--dtype", "float32", "--max-model-len", str(ENGINE_FLAGS["max_model_len"]),
    "--kv-cache-memory", str(ENGINE_FLAGS["kv_cache_memory"]), "--max-num-seqs", str(ENGINE_FLAGS["max_num_seqs"]),
)
_PROMPTS = ["The cat", "Once upon a time", "Paris is", "1, 2, 3,"]


@dataclass
class Served:
    proc: subprocess.Popen
    base_url: str

    @property
    def headers(self) -> dict:
        return {"Authorization": f"Bearer {API_KEY}"}


def _children(pid: int) -> list[int]:
    """The live child processes of `pid` (psutil is not installed: /proc's children lists)."""
    found: list[int] = []
    with contextlib.suppress(FileNotFoundError):
        for task in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{task}/children") as children:
                found += [int(c) for c in children.read().split()]
    return found


def _engine_pid(pid: int) -> int:
    """The engine process among the server's children (the other one is multiprocessing's resource tracker)."""
    for child in _children(pid):
        with open(f"/proc/{child}/cmdline", "rb") as cmdline:
            if b"spawn_main" in cmdline.read():
                return child
    raise AssertionError(f"no engine process among {_children(pid)}")


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().split(") ")[-1][0] != "Z"
    except FileNotFoundError:
        return False


@contextlib.contextmanager
def _serve(*flags: str, api_key: str | None = API_KEY):
    port = free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE", "PAGEDSERVE_API_KEY": api_key or ""}
    command = [sys.executable, "-m", "server", "serve", str(ensure_demo_model()), "--port", str(port), *_FLAGS, *flags]
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    served = Served(proc, f"http://127.0.0.1:{port}")

    def health() -> int | None:
        try:
            return httpx.get(served.base_url + "/health", timeout=2).status_code
        except httpx.TransportError:
            return None

    try:
        _wait_for(lambda: proc.poll() is not None or health() == 200, 120, "the server to start")
        assert proc.poll() is None, proc.stderr.read().decode(errors="replace")
        yield served
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(30)


def _metric(base_url: str, name: str) -> float:
    text = httpx.get(base_url + "/metrics", timeout=10).text
    return sum(s.value for f in text_string_to_metric_families(text) for s in f.samples if s.name == name)


@pytest.fixture(scope="module")
def served():
    with _serve() as running:
        yield running


def test_completions_chat_and_streams_through_the_openai_sdk(served):
    client = openai.OpenAI(base_url=served.base_url + "/v1", api_key=API_KEY)
    model = client.models.list().data[0].id
    completion = client.completions.create(model=model, prompt="Hello", max_tokens=8, temperature=0)
    assert completion.choices[0].finish_reason == "length" and completion.usage.completion_tokens == 8
    chat = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": "Hi"}], max_tokens=6, temperature=0
    )
    assert chat.choices[0].message.role == "assistant" and chat.usage.completion_tokens == 6
    chunks = list(client.completions.create(model=model, prompt="Hello", max_tokens=8, temperature=0, stream=True))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == completion.choices[0].text
    assert chunks[-1].choices[0].finish_reason == "length"


def test_sixteen_concurrent_streams_without_cross_talk(served):
    """Each stream equals its prompt's non-streamed greedy text: no delta reaches the wrong request."""
    client = openai.AsyncOpenAI(base_url=served.base_url + "/v1", api_key=API_KEY)
    prompts = [f"{_PROMPTS[i % 4]} {i}" for i in range(16)]

    async def one(prompt: str, stream: bool) -> str:
        reply = await client.completions.create(model=_model(served), prompt=prompt, max_tokens=12, temperature=0, stream=stream)
        if not stream:
            return reply.choices[0].text
        return "".join([c.choices[0].text async for c in reply if c.choices])

    async def run() -> tuple[list[str], list[str]]:
        expected = [await one(p, False) for p in prompts]  # one at a time
        streamed = await asyncio.gather(*(one(p, True) for p in prompts))
        return expected, list(streamed)

    expected, streamed = asyncio.run(run())
    assert streamed == expected
    assert len(set(expected)) > 1


def _model(served: Served) -> str:
    return httpx.get(served.base_url + "/v1/models", headers=served.headers, timeout=10).json()["data"][0]["id"]


def test_a_disconnect_frees_the_kv_blocks_within_a_second(served):
    usage = "pagedserve:kv_cache_usage_perc"
    with httpx.stream("POST", served.base_url + "/v1/completions", json=LONG, headers=served.headers, timeout=60) as r:
        lines = r.iter_lines()
        assert next(line for line in lines if line.startswith("data: "))
        _wait_for(lambda: _metric(served.base_url, usage) > 0, 10, "KV blocks in use")
    dropped = time.monotonic()
    _wait_for(lambda: _metric(served.base_url, usage) == 0, 1.0, "the KV blocks to be freed")
    assert time.monotonic() - dropped < 1.0
    assert _metric(served.base_url, "pagedserve:num_requests_running") == 0


def test_greedy_parity_with_the_thread_mode(served, api_server):
    """The same prompts at temperature 0: the same tokens from the engine process as from the engine thread."""
    for base, headers in ((served.base_url, served.headers), (api_server.base_url, api_server.headers)):
        assert httpx.get(base + "/health", timeout=5).status_code == 200
    body = {"prompt": _PROMPTS, "max_tokens": 16, "temperature": 0, "logprobs": 1}

    def texts(base: str, headers: dict, model: str) -> list[tuple[str, list]]:
        reply = httpx.post(base + "/v1/completions", json={**body, "model": model}, headers=headers, timeout=60).json()
        return [(c["text"], c["logprobs"]["tokens"]) for c in sorted(reply["choices"], key=lambda c: c["index"])]

    in_process = texts(api_server.base_url, api_server.headers, api_server.model_name)
    assert texts(served.base_url, served.headers, _model(served)) == in_process


def test_sigterm_drains_and_exits_zero_leaving_no_child(served):
    """Runs last on the module's server: a stream in flight finishes, then the server and its engine exit."""
    children = _children(served.proc.pid)
    assert _engine_pid(served.proc.pid) in children
    reader = StreamReader(served.base_url, {**LONG, "max_tokens": 40, "min_tokens": 40}, served.headers)
    reader.start()
    assert reader.started.wait(30)
    served.proc.send_signal(signal.SIGTERM)
    reader.join(60)
    assert reader.payloads[-1] == "[DONE]"
    assert reader.payloads[-2]["choices"][0]["finish_reason"] == "length"
    assert served.proc.wait(30) == 0, served.proc.stderr.read().decode(errors="replace")
    _wait_for(lambda: not any(_alive(c) for c in children), 5, "the engine process to exit")


def test_killing_the_engine_process_fails_requests_and_the_server_exits_non_zero():
    with _serve() as running:
        stream = StreamReader(running.base_url, LONG, running.headers)
        stream.start()
        result: dict = {}

        def plain() -> None:
            body = {**LONG, "stream": False}
            result["response"] = httpx.post(running.base_url + "/v1/completions", json=body, headers=running.headers, timeout=60)

        blocking = threading.Thread(target=plain, daemon=True)
        blocking.start()
        assert stream.started.wait(30)
        _wait_for(lambda: _metric(running.base_url, "pagedserve:num_requests_running") == 2, 30, "both requests to run")
        os.kill(_engine_pid(running.proc.pid), signal.SIGKILL)
        killed = time.monotonic()
        stream.join(10)
        blocking.join(10)
        assert time.monotonic() - killed < 5, "the requests in flight should fail at once"
        assert stream.payloads[-1] == "[DONE]" and stream.payloads[-2]["error"]["code"] == 500
        assert result["response"].status_code == 500
        assert "engine failed" in result["response"].json()["error"]["message"]
        with contextlib.suppress(httpx.TransportError):  # the server may already have closed its socket
            assert httpx.get(running.base_url + "/health", timeout=2).status_code == 503
        code = running.proc.wait(10)
        stderr = running.proc.stderr.read().decode(errors="replace")
    assert code == 1, stderr
    assert "killed by SIGKILL" in stderr and "stopping the server" in stderr


def test_a_killed_engine_process_turns_health_503_and_refuses_new_requests():
    """A ProcessEngineClient in this process behind a real uvicorn server that does not exit when the engine
    dies (exit_when_engine_dies=False), so that /health and a new request can be seen afterwards."""
    client = ProcessEngineClient(EngineArgs(model=str(ensure_demo_model()), **ENGINE_FLAGS))
    config = ServerConfig(host="127.0.0.1", port=free_port())
    app = build_app(client, config)
    server = DrainingServer(uvicorn_config(app, config), app.state.server, exit_when_engine_dies=False)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    base = f"http://127.0.0.1:{config.port}"
    try:
        _wait_for(lambda: server.started or not thread.is_alive(), 60, "the server to start")
        assert httpx.get(base + "/health", timeout=5).status_code == 200
        os.kill(client.pid, signal.SIGKILL)
        _wait_for(lambda: client.has_died, 3, "the engine's death to be seen")
        health = httpx.get(base + "/health", timeout=5)
        assert health.status_code == 503 and "killed by SIGKILL" in health.json()["reason"]
        refused = httpx.post(base + "/v1/completions", json={"prompt": "hi", "max_tokens": 2}, timeout=10)
        assert refused.status_code == 503 and refused.json()["error"]["type"] == "service_unavailable"
    finally:
        server.should_exit = True
        thread.join(30)


def test_a_start_up_error_in_the_engine_process_is_one_line_and_exit_code_2(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "server", "serve", str(tmp_path), "--port", str(free_port())],
        capture_output=True, text=True, timeout=120, env={**os.environ, "OMP_WAIT_POLICY": "PASSIVE"},
    )
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip().splitlines() == [f"pagedserve: error: Model directory {tmp_path} has no config.json (nor a .gguf file)"]


def test_the_engine_process_exits_when_the_server_is_killed():
    """SIGKILL to the server (no handler, no cleanup) while its engine process waits for work: the engine
    process sees its pipe close and exits, rather than linger as an orphan."""
    with _serve() as running:
        engine = _engine_pid(running.proc.pid)
        running.proc.kill()
    _wait_for(lambda: not _alive(engine), 10, "the orphaned engine process to exit")
