"""A short, bounded Locust run (loadtests/locustfile.py) against our server on the demo model.

Asserts that no request failed and that every accepted request streamed to its end: each POST
has its "TTFT ..." and "E2E ..." entries, which the locustfile fires only for complete streams.
"""

from __future__ import annotations

import csv
import importlib.util
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from server.demo import ensure_demo_model

# Never import locust here: it monkey-patches the process with gevent. It runs as its own process.
pytestmark = pytest.mark.skipif(importlib.util.find_spec("locust") is None, reason="locust is not installed")

LOCUSTFILE = Path(__file__).resolve().parents[1] / "loadtests" / "locustfile.py"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def server_url():
    port = _free_port()
    env = dict(os.environ, OMP_NUM_THREADS="1", OMP_WAIT_POLICY="PASSIVE")
    cmd = [sys.executable, "-m", "server", "serve", str(ensure_demo_model()), "--port", str(port),
           "--dtype", "float32", "--max-model-len", "512", "--kv-cache-memory", "0.125", "--max-num-seqs", "8",
           "--disable-access-log"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
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
                pytest.fail("server did not start in 120 s")
            time.sleep(0.25)
        yield url
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def test_locust_streaming_users(server_url, tmp_path):
    prefix = tmp_path / "locust"
    env = dict(os.environ, MAX_TOKENS="8", OMP_WAIT_POLICY="PASSIVE")
    env.pop("MODEL", None)
    cmd = [sys.executable, "-m", "locust", "-f", str(LOCUSTFILE), "--headless", "-u", "4", "-r", "4", "-t", "15s",
           "-H", server_url, "--only-summary", "--exit-code-on-error", "1", "--stop-timeout", "30",
           "--csv", str(prefix), "--loglevel", "WARNING"]
    done = subprocess.run(cmd, check=False, capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]

    with open(f"{prefix}_stats.csv", newline="") as f:
        rows = {(r["Type"], r["Name"]): r for r in csv.DictReader(f)}
    count = {key: int(r["Request Count"]) for key, r in rows.items()}
    assert all(int(r["Failure Count"]) == 0 for r in rows.values()), rows
    for kind, path in (("chat", "/v1/chat/completions"), ("completions", "/v1/completions")):
        posts = count[("POST", f"{path} (stream)")]
        assert posts > 0
        assert count[("STREAM", f"TTFT {kind}")] == posts
        assert count[("STREAM", f"E2E {kind}")] == posts
