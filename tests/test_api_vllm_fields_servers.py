"""vLLM's request fields that need a server set up otherwise: `priority` under --scheduling-policy
priority, a per-request `chat_template` under --trust-request-chat-template, and `add_special_tokens`
with a tokenizer that adds a BOS token. Real servers, real HTTP."""

from __future__ import annotations

import asyncio
import json
import shutil
import time
from pathlib import Path

import httpx
import pytest
from api_server import start_server

from server.demo import ensure_demo_model


@pytest.fixture(scope="module")
def priority_server():
    running = start_server(
        engine_overrides={"scheduling_policy": "priority", "max_num_seqs": 1}, trust_request_chat_template=True
    )
    yield running
    running.stop()


def _wait(condition, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.005)


def test_lower_priority_value_runs_first(priority_server):
    server, scheduler = priority_server, priority_server.core.scheduler
    finished: list[str] = []

    async def one(client: httpx.AsyncClient, name: str, max_tokens: int, priority: int) -> None:
        body = {"prompt": f"{name} says", "max_tokens": max_tokens, "ignore_eos": True, "priority": priority}
        response = await client.post("/v1/completions", json=body, headers=server.headers)
        assert response.status_code == 200, response.text
        finished.append(name)

    async def run() -> None:
        async with httpx.AsyncClient(base_url=server.base_url, timeout=60) as client:
            tasks = [asyncio.create_task(one(client, "busy", 120, 0))]
            await asyncio.to_thread(_wait, lambda: scheduler.num_running == 1)
            for waiting, (name, priority) in enumerate([("later", 5), ("urgent", -5)], start=1):
                tasks.append(asyncio.create_task(one(client, name, 4, priority)))
                await asyncio.to_thread(_wait, lambda n=waiting: scheduler.num_waiting == n)
            await asyncio.gather(*tasks)

    asyncio.run(run())
    assert finished == ["busy", "urgent", "later"]  # fcfs would run "later" first
    server.wait_idle()


def test_trusted_per_request_chat_template_documents_and_reasoning_effort(priority_server):
    template = (
        "{% for d in documents %}[{{ d.title }}] {{ d.text }}\n{% endfor %}"
        "{{ reasoning_effort }}|{% for m in messages %}{{ m.role }}: {{ m.content }}\n{% endfor %}"
    )
    body = {
        "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, "return_token_ids": True,
        "chat_template": template, "documents": [{"title": "Doc", "text": "body"}], "reasoning_effort": "high",
    }
    with httpx.Client(base_url=priority_server.base_url, headers=priority_server.headers, timeout=60) as client:
        out = client.post("/v1/chat/completions", json=body)
        assert out.status_code == 200, out.text
        want = client.post("/tokenize", json={"prompt": "[Doc] body\nhigh|user: hi\n", "add_special_tokens": False})
    assert out.json()["prompt_token_ids"] == want.json()["tokens"]


@pytest.fixture(scope="module")
def bos_server(tmp_path_factory):
    """The demo model with a tokenizer whose post-processor puts <|endoftext|> (id 0) first, as BOS."""
    model = Path(ensure_demo_model())
    directory = tmp_path_factory.mktemp("bos-tokenizer")
    for name in ("tokenizer_config.json", "chat_template.jinja"):
        shutil.copy(model / name, directory / name)
    spec = json.loads((model / "tokenizer.json").read_text())
    spec["post_processor"]["single"].insert(0, {"SpecialToken": {"id": "<|endoftext|>", "type_id": 0}})
    spec["post_processor"]["special_tokens"] = {"<|endoftext|>": {"id": "<|endoftext|>", "ids": [0], "tokens": ["<|endoftext|>"]}}
    (directory / "tokenizer.json").write_text(json.dumps(spec))
    running = start_server(engine_overrides={"tokenizer": str(directory)})
    yield running
    running.stop()


def _prompt_ids(server, path: str, body: dict) -> list[int]:
    body = {**body, "max_tokens": 1, "return_token_ids": True}
    response = httpx.post(server.base_url + path, json=body, headers=server.headers, timeout=60)
    assert response.status_code == 200, response.text
    out = response.json()
    return out["choices"][0]["prompt_token_ids"] if path == "/v1/completions" else out["prompt_token_ids"]


def test_add_special_tokens(bos_server):
    completion = {"prompt": "hello world"}
    assert _prompt_ids(bos_server, "/v1/completions", completion)[0] == 0  # vLLM's default for completions: True
    without = _prompt_ids(bos_server, "/v1/completions", {**completion, "add_special_tokens": False})
    assert 0 not in without and len(without) == len(_prompt_ids(bos_server, "/v1/completions", completion)) - 1
    chat = {"messages": [{"role": "user", "content": "hi"}]}
    assert _prompt_ids(bos_server, "/v1/chat/completions", chat)[0] != 0  # for chat: False, the template has them
    assert _prompt_ids(bos_server, "/v1/chat/completions", {**chat, "add_special_tokens": True})[0] == 0
