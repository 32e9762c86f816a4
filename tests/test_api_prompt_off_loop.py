"""Tokenizing a prompt runs on a worker thread, not on the event loop: while a ~900 KB prompt is
tokenized (about a second and a half of work), the server keeps answering /health at once."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import httpx
import pytest

import server.demo

_CORPUS = (Path(server.demo.__file__).parent / "corpus.txt").read_text()
_BIG = (_CORPUS * (900_000 // len(_CORPUS) + 1))[:900_000]


@pytest.mark.parametrize("path, body", [
    ("/v1/completions", {"prompt": _BIG, "max_tokens": 1}),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": _BIG}], "max_tokens": 1}),
    ("/generate", {"inputs": _BIG, "parameters": {"max_new_tokens": 1}}),
])
def test_the_event_loop_serves_while_a_long_prompt_is_tokenized(api_server, path, body):
    result: dict = {}

    def send() -> None:
        result["response"] = httpx.post(api_server.base_url + path, json=body, headers=api_server.headers, timeout=60)

    sender = threading.Thread(target=send, daemon=True)
    started = time.monotonic()
    sender.start()
    slowest = 0.0
    while sender.is_alive():
        asked = time.monotonic()
        assert httpx.get(api_server.base_url + "/health", timeout=30).status_code == 200
        slowest = max(slowest, time.monotonic() - asked)
        time.sleep(0.02)
    took = time.monotonic() - started
    response = result["response"]
    assert response.status_code == 400 and "tokens" in response.text  # too long for the context, once tokenized
    assert took > 1.0, f"the prompt took {took:.2f} s: too short to tell"
    assert slowest < 0.5 * took, f"/health waited {slowest:.2f} s of {took:.2f} s: the loop was blocked"
