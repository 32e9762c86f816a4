"""Locust load test of an OpenAI-compatible server: streaming chat and completions users.

    locust -f loadtests/locustfile.py --headless -u 8 -r 4 -t 60s -H http://127.0.0.1:8000

Besides Locust's own entries for each POST (whose time is to the response headers, as the body
streams), every finished stream fires two custom entries: "TTFT chat" / "TTFT completions" (time
to the first chunk with choices) and "E2E chat" / "E2E completions" (time to the last chunk). A
stream that ends without a finish_reason and `data: [DONE]` is a failure.

Environment: MODEL (default: the first of GET /v1/models), MAX_TOKENS (default 32),
OPENAI_API_KEY or PAGEDSERVE_API_KEY (sent as a Bearer key), TEMPERATURE (default 0).
"""

from __future__ import annotations

import json
import os
import random
import time

from locust import HttpUser, between, task

MAX_TOKENS = int(os.environ.get("MAX_TOKENS", "32"))
TEMPERATURE = float(os.environ.get("TEMPERATURE", "0"))
API_KEY = os.environ.get("OPENAI_API_KEY") or os.environ.get("PAGEDSERVE_API_KEY")

PROMPTS = [
    "Write a short story about a lighthouse keeper who finds a message in a bottle.",
    "Explain how a paged KV cache lets a server batch many requests at once.",
    "List three things to check before deploying a web service to production.",
    "What is the capital of France, and what is it famous for?",
    "Summarize the plot of a heist movie in two sentences.",
    "Give me a recipe for a quick weekday pasta dinner.",
]

_model_name: str | None = os.environ.get("MODEL") or None


class OpenAIStreamingUser(HttpUser):
    """Half chat, half completions; every request streams with usage."""

    wait_time = between(0.05, 0.5)

    def on_start(self) -> None:
        global _model_name
        self.headers = {"Authorization": f"Bearer {API_KEY}"} if API_KEY else {}
        if _model_name is None:
            with self.client.get("/v1/models", headers=self.headers, name="/v1/models", catch_response=True) as resp:
                if resp.status_code == 200 and resp.json().get("data"):
                    _model_name = resp.json()["data"][0]["id"]
                else:
                    resp.failure(f"cannot list models: HTTP {resp.status_code}")
        self.model = _model_name

    @task
    def chat(self) -> None:
        payload = {
            "model": self.model,
            "messages": [{"role": "user", "content": random.choice(PROMPTS)}],
            "max_completion_tokens": MAX_TOKENS,
        }
        self._stream("/v1/chat/completions", "chat", payload)

    @task
    def completions(self) -> None:
        payload = {"model": self.model, "prompt": random.choice(PROMPTS), "max_tokens": MAX_TOKENS}
        self._stream("/v1/completions", "completions", payload)

    def _stream(self, path: str, kind: str, payload: dict) -> None:
        payload.update({"stream": True, "stream_options": {"include_usage": True}, "temperature": TEMPERATURE,
                        "ignore_eos": True})
        start = time.perf_counter()
        first = last = None
        finish_reason, done, tokens = None, False, 0
        with self.client.post(path, json=payload, headers=self.headers, stream=True, catch_response=True,
                              name=f"{path} (stream)") as resp:
            if resp.status_code != 200:
                resp.failure(f"HTTP {resp.status_code}: {resp.text[:200]}")
                return
            try:
                for raw in resp.iter_lines():
                    line = raw.decode("utf-8") if isinstance(raw, bytes) else raw
                    if not line.startswith("data:"):
                        continue
                    data = line[len("data:"):].strip()
                    if data == "[DONE]":
                        done = True
                        break
                    message = json.loads(data)
                    if message.get("choices"):
                        last = time.perf_counter()
                        first = first or last
                        finish_reason = message["choices"][0].get("finish_reason") or finish_reason
                    if message.get("usage"):
                        tokens = message["usage"].get("completion_tokens") or 0
            except Exception as exc:  # noqa: BLE001  (a broken stream is a failed request, not a crashed user)
                resp.failure(f"stream broke: {type(exc).__name__}: {exc}")
                return
            if not done or finish_reason is None or first is None:
                resp.failure("stream ended before a finish_reason and data: [DONE]")
                return
            resp.success()
        fire = self.environment.events.request.fire
        fire(request_type="STREAM", name=f"TTFT {kind}", response_time=(first - start) * 1000.0,
             response_length=0, exception=None, context={})
        fire(request_type="STREAM", name=f"E2E {kind}", response_time=(last - start) * 1000.0,
             response_length=tokens, exception=None, context={})
