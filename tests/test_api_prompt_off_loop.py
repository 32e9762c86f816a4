"""Tokenizing a prompt and rendering a chat template run on a worker thread, not on the event loop.

The tokenizer is held inside `encode` on a gate (an injected fault: a tokenizer that takes as long as
the test wants) until the server has answered /health. Were tokenization on the event loop, /health
could not answer while it is held, and the test fails on its timeout instead of hanging."""

from __future__ import annotations

import threading

import httpx
import pytest

MARK = "hold-the-tokenizer-here"


@pytest.mark.parametrize("path, body", [
    ("/v1/completions", {"prompt": f"{MARK} once upon a time", "max_tokens": 1}),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": f"{MARK} hello"}], "max_tokens": 1}),
    ("/generate", {"inputs": f"{MARK} once upon a time", "parameters": {"max_new_tokens": 1}}),
])
def test_the_event_loop_serves_while_a_prompt_is_tokenized_injected_fault(api_server, monkeypatch, path, body):
    tokenizer = api_server.state.model.tokenizer
    encode = tokenizer.encode
    inside, release = threading.Event(), threading.Event()

    def held_encode(text, *args, **kwargs):
        if isinstance(text, str) and MARK in text:
            inside.set()
            release.wait(timeout=30)
        return encode(text, *args, **kwargs)

    monkeypatch.setattr(tokenizer, "encode", held_encode)
    result: dict = {}

    def send() -> None:
        result["response"] = httpx.post(api_server.base_url + path, json=body, headers=api_server.headers, timeout=60)

    sender = threading.Thread(target=send, daemon=True)
    sender.start()
    try:
        assert inside.wait(timeout=30), "the request never reached the tokenizer"
        health = httpx.get(api_server.base_url + "/health", timeout=5)  # times out if the loop is held
        assert health.status_code == 200
        assert not release.is_set() and sender.is_alive(), "the tokenizer was still held while /health answered"
    finally:
        release.set()
        sender.join(timeout=60)
    assert result["response"].status_code == 200, result["response"].text
