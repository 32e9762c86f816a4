"""A short, bounded Locust run (loadtests/locustfile.py) against our server on the demo model.

Asserts that no request failed and that every accepted request streamed to its end: each POST
has its "TTFT ..." and "E2E ..." entries, which the locustfile fires only for complete streams.
"""

from __future__ import annotations

import csv
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

from api_server import serve_in_subprocess
from server.demo import ensure_demo_model

# Never import locust here: it monkey-patches the process with gevent. It runs as its own process.
pytestmark = pytest.mark.skipif(importlib.util.find_spec("locust") is None, reason="locust is not installed")

LOCUSTFILE = Path(__file__).resolve().parents[1] / "loadtests" / "locustfile.py"


@pytest.fixture
def server_url():
    flags = ("--max-model-len", "512", "--kv-cache-memory", "0.125", "--max-num-seqs", "8", "--disable-access-log")
    with serve_in_subprocess(str(ensure_demo_model()), *flags) as (url, _pid):
        yield url


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
