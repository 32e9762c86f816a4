"""Streaming OpenAI-API requests, timed as `vllm bench serve` times them.

TTFT: request sent -> first chunk with `choices` (as vLLM's client counts it: for completions a
chunk may carry a token whose text is empty; a chat stream's first chunk names the role and is
sent with the first token). ITL: the gaps between successive chunks with `choices`. E2E latency: request sent -> last token chunk. TPOT:
(E2E - TTFT) / (output tokens - 1). Token counts come from the final `usage` chunk
(`stream_options.include_usage`).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import Any

import httpx

from server.bench.datasets import BenchRequest

ENDPOINTS = {"completions": "/v1/completions", "chat": "/v1/chat/completions"}


@dataclass
class RequestResult:
    success: bool = False
    error: str = ""
    status: int | None = None
    expected_prompt_len: int = 0
    expected_output_len: int = 0
    prompt_tokens: int | None = None  # from usage
    output_tokens: int | None = None  # from usage
    ttft: float = 0.0
    latency: float = 0.0
    itl: list[float] = field(default_factory=list)
    start: float = 0.0  # seconds since the benchmark started
    chunks: int = 0
    text_chars: int = 0
    finish_reason: str | None = None

    @property
    def tpot(self) -> float | None:
        if not self.success or not self.output_tokens or self.output_tokens < 2:
            return None
        return (self.latency - self.ttft) / (self.output_tokens - 1)


def build_payload(request: BenchRequest, endpoint: str, model: str, *, prompt_format: str = "ids",
                  temperature: float = 0.0, ignore_eos: bool = True, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    payload: dict[str, Any] = {
        "model": model,
        "stream": True,
        "stream_options": {"include_usage": True},
        "temperature": temperature,
    }
    if endpoint == "chat":
        payload["messages"] = request.messages
        payload["max_completion_tokens"] = request.output_len
    else:
        payload["prompt"] = request.prompt_ids if prompt_format == "ids" else request.prompt_text
        payload["max_tokens"] = request.output_len
    if ignore_eos:
        payload["ignore_eos"] = True
    payload.update(extra or {})
    return payload


async def send_request(client: httpx.AsyncClient, base_url: str, endpoint: str, payload: dict[str, Any],
                       request: BenchRequest, t0: float, headers: dict[str, str] | None = None) -> RequestResult:
    result = RequestResult(expected_prompt_len=request.prompt_len, expected_output_len=request.output_len)
    url = base_url.rstrip("/") + ENDPOINTS[endpoint]
    start = time.perf_counter()
    result.start = start - t0
    last = start
    try:
        async with client.stream("POST", url, json=payload, headers=headers) as response:
            result.status = response.status_code
            if response.status_code != 200:
                body = (await response.aread()).decode("utf-8", "replace")
                result.error = f"HTTP {response.status_code}: {body[:300]}"
                return result
            done = False
            async for line in response.aiter_lines():
                if not line or line.startswith(":"):
                    continue
                data = line[len("data:"):].strip() if line.startswith("data:") else line.strip()
                if data == "[DONE]":
                    done = True
                    break
                now = time.perf_counter()
                message = json.loads(data)
                if "error" in message and not message.get("choices"):
                    result.error = f"stream error: {json.dumps(message['error'])[:300]}"
                    return result
                choices = message.get("choices") or []
                if choices:
                    choice = choices[0]
                    if result.chunks == 0:
                        result.ttft = now - start
                    else:
                        result.itl.append(now - last)
                    last = now
                    result.chunks += 1
                    piece = choice.get("text") if endpoint != "chat" else (choice.get("delta") or {}).get("content")
                    result.text_chars += len(piece or "")
                    if choice.get("finish_reason") is not None:
                        result.finish_reason = choice["finish_reason"]
                usage = message.get("usage")
                if usage:
                    result.prompt_tokens = usage.get("prompt_tokens")
                    result.output_tokens = usage.get("completion_tokens")
            if result.chunks == 0:
                result.error = "no token chunk in the stream"
            elif not done:
                result.error = "stream ended without [DONE]"
            else:
                result.success = True
                result.latency = last - start
                if result.output_tokens is None:  # a server without usage in streams: count chunks
                    result.output_tokens = result.chunks
    except (httpx.HTTPError, json.JSONDecodeError, OSError) as exc:
        result.error = f"{type(exc).__name__}: {exc}"[:300]
    return result
