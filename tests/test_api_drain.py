"""Graceful drain: SIGTERM to a real `python -m server serve` process, and the shutdown deadline."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time

import httpx
from api_server import free_port, start_server
from prometheus_client.parser import text_string_to_metric_families

from server.demo import ensure_demo_model

LONG = {"prompt": "Keep talking", "max_tokens": 450, "min_tokens": 450, "temperature": 0, "stream": True}


class StreamReader(threading.Thread):
    """Reads one SSE stream in the background; `started` is set at the first event."""

    def __init__(self, base_url: str, body: dict, headers: dict | None = None):
        super().__init__(daemon=True)
        self.base_url, self.body, self.headers = base_url, body, headers or {}
        self.started = threading.Event()
        self.payloads: list = []
        self.status: int | None = None

    def run(self) -> None:
        with httpx.stream("POST", self.base_url + "/v1/completions", json=self.body, headers=self.headers, timeout=120) as r:
            self.status = r.status_code
            for line in r.iter_lines():
                if line.startswith("data: "):
                    data = line[6:]
                    self.payloads.append(data if data == "[DONE]" else json.loads(data))
                    self.started.set()


def _wait_for(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


def _status(url: str, **kwargs) -> int | None:
    try:
        return httpx.request(kwargs.pop("method", "GET"), url, timeout=5, **kwargs).status_code
    except httpx.TransportError:
        return None


def test_sigterm_drains_and_exits_zero():
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    command = [
        sys.executable, "-m", "server", "serve", str(ensure_demo_model()), "--port", str(port), "--dtype", "float32",
        "--max-model-len", "512", "--kv-cache-memory", "0.25", "--shutdown-timeout", "60",
    ]
    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE", "PAGEDSERVE_API_KEY": ""}
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env)
    try:
        _wait_for(lambda: _status(base + "/health") == 200, 120, "the server to start")
        assert _status(base + "/ready") == 200
        reader = StreamReader(base, LONG)
        reader.start()
        assert reader.started.wait(30)
        proc.send_signal(signal.SIGTERM)
        _wait_for(lambda: _status(base + "/ready") == 503, 5, "/ready to turn 503")
        assert reader.is_alive(), "the admitted request should still be running"
        refused = httpx.post(base + "/v1/completions", json={"prompt": "new", "max_tokens": 2}, timeout=10)
        assert refused.status_code == 503 and refused.json()["error"]["type"] == "service_unavailable"
        assert _status(base + "/health") == 200
        reader.join(120)
        assert reader.payloads[-1] == "[DONE]"
        finals = [p for p in reader.payloads[:-1] if p["choices"] and p["choices"][0]["finish_reason"]]
        assert finals and finals[-1]["choices"][0]["finish_reason"] == "length"
        assert proc.wait(60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
        output = proc.communicate()[0].decode(errors="replace")
    assert "Draining" in output


def test_shutdown_deadline_ends_unfinished_requests():
    running = start_server(api_key=None, shutdown_timeout=0.3)
    try:
        stream = StreamReader(running.base_url, LONG)
        stream.start()
        assert stream.started.wait(30)
        result: dict = {}

        def plain() -> None:
            body = {**LONG, "stream": False}
            result["response"] = httpx.post(running.base_url + "/v1/completions", json=body, timeout=120)

        blocking = threading.Thread(target=plain, daemon=True)
        blocking.start()
        _wait_for(lambda: running.state.num_in_flight == 2, 30, "both requests to run")
        running.server.handle_exit(signal.SIGTERM, None)
        stream.join(30)
        blocking.join(30)
        assert stream.payloads[-1] == "[DONE]"
        assert stream.payloads[-2]["error"]["code"] == 503
        assert result["response"].status_code == 503
        running.thread.join(30)
        assert not running.thread.is_alive()
        assert running.core.block_pool.usage == 0
        # each is counted once by its cause (draining), and as finished by abort, as vLLM counts it
        samples = {
            (s.name, s.labels.get("reason") or s.labels.get("finished_reason")): s.value
            for family in text_string_to_metric_families(running.state.metrics.render().decode())
            for s in family.samples
        }
        assert samples[("pagedserve:request_failures_total", "draining")] == 2
        assert samples[("pagedserve:request_success_total", "abort")] == 2
    finally:
        running.stop()


# ---- signals before uvicorn serves ------------------------------------------------------------


def _catches(pid: int, sig: signal.Signals) -> bool:
    """Whether process `pid` has a handler for `sig` (the SigCgt mask of /proc/PID/status)."""
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("SigCgt:"):
                return bool(int(line.split()[1], 16) >> (sig - 1) & 1)
    return False


class LineReader(threading.Thread):
    """Collects a process's stderr lines in the background, so that a test can wait for one with a timeout."""

    def __init__(self, stream):
        super().__init__(daemon=True)
        self.stream, self.lines = stream, []

    def run(self) -> None:
        for raw in self.stream:
            self.lines.append(raw.decode(errors="replace"))

    def wait_for(self, text: str, timeout: float) -> None:
        _wait_for(lambda: any(text in line for line in self.lines), timeout, repr(text))


def test_sigterm_right_after_exec_exits_zero_before_the_slow_imports():
    """The handler is there before torch (or fastapi's pydantic-core) is imported: a SIGTERM that comes
    as soon as the process can take one ends it at once with 0. In a container, where the server is
    PID 1, a signal without a handler is dropped, and the pod would wait out its grace period."""
    command = [sys.executable, "-m", "server", "serve", str(ensure_demo_model()), "--port", str(free_port())]
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env={**os.environ, "OMP_WAIT_POLICY": "PASSIVE"})
    try:
        started = time.monotonic()
        while not _catches(proc.pid, signal.SIGTERM):
            assert proc.poll() is None, proc.stderr.read().decode()
            assert time.monotonic() - started < 60, "no SIGTERM handler after 60 s"
            time.sleep(0.001)
        with open(f"/proc/{proc.pid}/maps") as maps:
            mapped = maps.read()
        proc.send_signal(signal.SIGTERM)
        sent = time.monotonic()
        code = proc.wait(10)
        took = time.monotonic() - sent
    finally:
        if proc.poll() is None:
            proc.kill()
        stderr = proc.communicate()[1].decode(errors="replace")
    assert "/torch/" not in mapped and "pydantic_core" not in mapped, "the handler came after the heavy imports"
    assert code == 0, stderr
    assert took < 2.0, f"exited {took:.2f} s after SIGTERM"
    assert "received SIGTERM during start-up" in stderr


def test_sigterm_while_the_model_loads_exits_zero_and_a_keyless_public_host_is_warned_about():
    """On 0.0.0.0 without a key the server warns before it loads the model; a SIGTERM then (still
    loading, nothing listens yet) ends it at once with 0."""
    command = [
        sys.executable, "-m", "server", "serve", str(ensure_demo_model()), "--host", "0.0.0.0", "--port", str(free_port()),
        "--dtype", "float32", "--max-model-len", "512", "--kv-cache-memory", "0.25",
    ]
    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE", "PAGEDSERVE_API_KEY": ""}
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    reader = LineReader(proc.stderr)
    reader.start()
    try:
        reader.wait_for("without an API key", 120)
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    reader.join(5)
    output = "".join(reader.lines)
    warning = next(line for line in reader.lines if "without an API key" in line)
    assert "WARNING" in warning and "0.0.0.0" in warning and "--api-key" in warning
    assert code == 0, output
    assert "received SIGTERM during start-up" in output
