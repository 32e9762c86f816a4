"""The HTTP surface end to end on a real server: parity with the offline API, isolation of concurrent
streams, disconnects, overload, bad input, auth, request ids, draining, and TGI-style clients."""

from __future__ import annotations

import asyncio
import json
import logging
import time

import httpx
import pytest
from api_server import disconnect_mid_request, start_server

from server.request import SamplingParams

PROMPTS = ["The capital of France", "Once upon a time there", "def fibonacci(n):", "1, 2, 3, 4,"]


def post(server, path: str, body: dict | None = None, **kwargs) -> httpx.Response:
    headers = {**server.headers, **kwargs.pop("headers", {})}
    return httpx.post(server.base_url + path, json=body, headers=headers, timeout=60, **kwargs)


def sse_payloads(lines) -> list:
    """The JSON payloads of an SSE stream, then the literal "[DONE]"."""
    out = []
    for line in lines:
        if line.startswith("data: "):
            data = line[len("data: ") :]
            out.append(data if data == "[DONE]" else json.loads(data))
    return out


# ---- parity with the offline API ------------------------------------------------------------


def test_completions_equal_offline(api_server, offline_llm):
    offline = offline_llm.generate(PROMPTS, SamplingParams(temperature=0, max_tokens=12, logprobs=0), use_tqdm=False)
    body = {"prompt": PROMPTS, "max_tokens": 12, "temperature": 0, "logprobs": 0}
    response = post(api_server, "/v1/completions", body).json()
    for choice, result in zip(response["choices"], offline):
        expected = result.outputs[0]
        assert choice["text"] == expected.text
        got = choice["logprobs"]["token_logprobs"]
        want = [entry[token].logprob for entry, token in zip(expected.logprobs, expected.token_ids)]
        assert got == pytest.approx(want, abs=1e-4)
    assert response["usage"]["prompt_tokens"] == sum(len(r.prompt_token_ids) for r in offline)


def test_prompt_logprobs_equal_offline(api_server, offline_llm):
    """echo + max_tokens 1 + logprobs: the exact per-token prompt scores lm-eval relies on."""
    tokenizer = offline_llm.get_tokenizer()
    ids = tokenizer.encode("The quick brown fox jumps over the lazy dog")
    params = SamplingParams(temperature=0, max_tokens=1, logprobs=1, prompt_logprobs=1)
    result = offline_llm.generate([ids], params, use_tqdm=False)[0]
    body = {"prompt": ids, "max_tokens": 1, "temperature": 0, "echo": True, "logprobs": 1}
    lp = post(api_server, "/v1/completions", body).json()["choices"][0]["logprobs"]
    want = [None] + [entry[token].logprob for entry, token in zip(result.prompt_logprobs[1:], ids[1:])]
    assert lp["token_logprobs"][0] is None
    assert lp["token_logprobs"][1:-1] == pytest.approx(want[1:], abs=1e-4)
    assert lp["tokens"][: len(ids)] == [tokenizer.decode([t]) for t in ids]
    # max_tokens 0 with echo scores the prompt and generates nothing
    zero = post(api_server, "/v1/completions", {**body, "max_tokens": 0}).json()
    assert zero["choices"][0]["logprobs"]["token_logprobs"] == lp["token_logprobs"][:-1]
    assert zero["usage"]["completion_tokens"] == 0


def test_chat_equals_offline(api_server, offline_llm):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a color."}]
    result = offline_llm.chat(messages, SamplingParams(temperature=0, max_tokens=10), use_tqdm=False)[0]
    body = {"messages": messages, "max_tokens": 10, "temperature": 0}
    response = post(api_server, "/v1/chat/completions", body).json()
    assert response["choices"][0]["message"]["content"] == result.outputs[0].text
    assert response["usage"]["prompt_tokens"] == len(result.prompt_token_ids)
    # text parts are the same conversation as a string content
    parts = [{"role": "system", "content": [{"type": "text", "text": "Be brief."}]}, messages[1]]
    again = post(api_server, "/v1/chat/completions", {**body, "messages": parts}).json()
    assert again["choices"][0]["message"]["content"] == result.outputs[0].text


def test_null_prompt_starts_a_document(api_server):
    out = post(api_server, "/v1/completions", {"prompt": None, "max_tokens": 4, "temperature": 0, "echo": True}).json()
    assert out["usage"]["prompt_tokens"] == 1 and out["usage"]["completion_tokens"] >= 1


# ---- concurrency --------------------------------------------------------------------------------


async def _stream_text(client: httpx.AsyncClient, prompt: str) -> str:
    body = {"prompt": prompt, "max_tokens": 10, "temperature": 0, "stream": True}
    async with client.stream("POST", "/v1/completions", json=body) as response:
        assert response.status_code == 200
        payloads = sse_payloads([line async for line in response.aiter_lines()])
    assert payloads[-1] == "[DONE]"
    return "".join(p["choices"][0]["text"] for p in payloads[:-1])


def test_no_cross_talk(api_server):
    prompts = [f"Client {i} says {word}" for i, word in enumerate(["hello", "goodbye", "maybe", "never"] * 8)]

    async def run():
        async with httpx.AsyncClient(base_url=api_server.base_url, headers=api_server.headers, timeout=60) as client:
            sequential = [await _stream_text(client, p) for p in prompts]
            concurrent = await asyncio.gather(*(_stream_text(client, p) for p in prompts))
        return sequential, concurrent

    sequential, concurrent = asyncio.run(run())
    assert len(set(sequential)) > 1
    assert concurrent == sequential
    api_server.wait_idle()


# ---- disconnects ----------------------------------------------------------------------------------


@pytest.mark.parametrize("stream", [True, False])
def test_disconnect_aborts(api_server, stream):
    api_server.wait_idle()
    body = {"prompt": "Go on and on", "max_tokens": 480, "min_tokens": 480, "temperature": 0, "stream": stream}
    disconnect_mid_request(api_server, "/v1/completions", body, streaming=stream)
    assert post(api_server, "/v1/completions", {"prompt": "still there?", "max_tokens": 2}).status_code == 200


# ---- overload -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def small_server():
    running = start_server(api_key=None, engine_overrides={"max_num_seqs": 2, "max_queued_requests": 2})
    yield running
    running.stop()


def test_overload_429(small_server):
    async def one(client: httpx.AsyncClient, i: int) -> httpx.Response:
        return await client.post("/v1/completions", json={"prompt": f"burst {i}", "max_tokens": 16, "min_tokens": 16})

    async def run():
        async with httpx.AsyncClient(base_url=small_server.base_url, timeout=60) as client:
            return await asyncio.gather(*(one(client, i) for i in range(16)))

    responses = asyncio.run(run())
    statuses = [r.status_code for r in responses]
    assert set(statuses) <= {200, 429} and 429 in statuses and 200 in statuses
    for r in responses:
        if r.status_code == 429:
            assert int(r.headers["Retry-After"]) >= 1
            assert r.json()["error"]["type"] == "overloaded_error"
        else:
            assert r.json()["usage"]["completion_tokens"] == 16
    small_server.wait_idle()
    assert httpx.get(small_server.base_url + "/ready").status_code == 200


# ---- bad input ------------------------------------------------------------------------------------

GOOD_COMPLETION = {"prompt": "hello", "max_tokens": 2}
GOOD_CHAT = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
C, CH = "/v1/completions", "/v1/chat/completions"

BAD_INPUT = [
    # (name, path, body (dict, or raw bytes), extra headers, status, param)
    ("malformed json", C, b'{"prompt": "x",', {}, 400, None),
    ("not an object", C, b"[1, 2]", {}, 400, None),
    ("nan", C, b'{"prompt": "x", "temperature": NaN}', {}, 400, "temperature"),
    ("string for int", C, {**GOOD_COMPLETION, "max_tokens": "16"}, {}, 400, "max_tokens"),
    ("float for int", C, {**GOOD_COMPLETION, "n": 1.5}, {}, 400, "n"),
    ("unknown field", C, {**GOOD_COMPLETION, "max_token": 3}, {}, 400, "max_token"),
    ("temperature > 2", C, {**GOOD_COMPLETION, "temperature": 2.5}, {}, 400, "temperature"),
    ("top_p 0", C, {**GOOD_COMPLETION, "top_p": 0}, {}, 400, "top_p"),
    ("n 0", C, {**GOOD_COMPLETION, "n": 0}, {}, 400, "n"),
    ("logprobs 21", C, {**GOOD_COMPLETION, "logprobs": 21}, {}, 400, "logprobs"),
    ("presence_penalty", C, {**GOOD_COMPLETION, "presence_penalty": 3}, {}, 400, "presence_penalty"),
    ("min_tokens > max_tokens", C, {**GOOD_COMPLETION, "min_tokens": 5}, {}, 400, "min_tokens"),
    ("empty stop", C, {**GOOD_COMPLETION, "stop": [""]}, {}, 400, "stop"),
    ("logit_bias key", C, {**GOOD_COMPLETION, "logit_bias": {"abc": 1}}, {}, 400, "logit_bias"),
    ("logit_bias range", C, {**GOOD_COMPLETION, "logit_bias": {"99999": 1}}, {}, 400, "logit_bias"),
    ("stream_options alone", C, {**GOOD_COMPLETION, "stream_options": {"include_usage": True}}, {}, 400, "stream_options"),
    ("empty prompt list", C, {**GOOD_COMPLETION, "prompt": []}, {}, 400, "prompt"),
    ("token out of vocab", C, {**GOOD_COMPLETION, "prompt": [1, 999999]}, {}, 400, "prompt"),
    ("max_tokens 0", C, {**GOOD_COMPLETION, "max_tokens": 0}, {}, 400, "max_tokens"),
    ("best_of", C, {**GOOD_COMPLETION, "best_of": 3}, {}, 400, "best_of"),
    ("unknown model", C, {**GOOD_COMPLETION, "model": "gpt-17"}, {}, 404, "model"),
    ("prompt too long", C, {**GOOD_COMPLETION, "prompt": [5] * 600}, {}, 400, "prompt"),
    ("prompt + max_tokens too long", C, {**GOOD_COMPLETION, "max_tokens": 600}, {}, 400, "max_tokens"),
    ("missing key", C, GOOD_COMPLETION, {"Authorization": ""}, 401, None),
    ("bad key", C, GOOD_COMPLETION, {"Authorization": "Bearer nope"}, 401, None),
    ("oversize body", C, {"prompt": "x" * (1 << 20)}, {}, 413, None),
    ("unknown route", "/v1/nothing", GOOD_COMPLETION, {}, 404, None),
    ("empty messages", CH, {**GOOD_CHAT, "messages": []}, {}, 400, "messages"),
    ("bad role", CH, {**GOOD_CHAT, "messages": [{"role": "wizard", "content": "x"}]}, {}, 400, "messages[0].role"),
    (
        "image part",
        CH,
        {**GOOD_CHAT, "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
        {},
        400,
        "messages[0].content[0].type",
    ),
    ("json_schema without schema", CH, {**GOOD_CHAT, "response_format": {"type": "json_schema"}}, {}, 400,
     "response_format.json_schema"),
    ("tool_choice without tools", CH, {**GOOD_CHAT, "tool_choice": "required"}, {}, 400, "tool_choice"),
    ("top_logprobs alone", CH, {**GOOD_CHAT, "top_logprobs": 2}, {}, 400, "top_logprobs"),
    ("top_logprobs 21", CH, {**GOOD_CHAT, "logprobs": True, "top_logprobs": 21}, {}, 400, "top_logprobs"),
    ("template kwargs clash", CH, {**GOOD_CHAT, "chat_template_kwargs": {"tokenize": True}}, {}, 400, "chat_template_kwargs"),
]


@pytest.mark.parametrize("name,path,body,headers,status,param", BAD_INPUT, ids=[case[0] for case in BAD_INPUT])
def test_bad_input(api_server, name, path, body, headers, status, param):
    all_headers = {**api_server.headers, **headers}
    if isinstance(body, bytes):
        all_headers["Content-Type"] = "application/json"
        response = httpx.post(api_server.base_url + path, content=body, headers=all_headers)
    else:
        response = httpx.post(api_server.base_url + path, json=body, headers=all_headers, timeout=60)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    if param is not None:
        assert error["param"] == param, error
    assert response.headers["x-request-id"]
    good = GOOD_CHAT if path == CH else GOOD_COMPLETION
    assert post(api_server, path if path in (C, CH) else C, good).status_code == 200


def test_wrong_method_and_open_routes(api_server):
    response = httpx.get(api_server.base_url + "/v1/completions", headers=api_server.headers)
    assert response.status_code == 405 and "error" in response.json()
    for path in ("/health", "/ready", "/version", "/metrics"):
        assert httpx.get(api_server.base_url + path).status_code == 200, path
    assert httpx.get(api_server.base_url + "/v1/models").status_code == 401
    assert httpx.post(api_server.base_url + "/tokenize", json={"prompt": "x"}).status_code == 401
    assert httpx.get(api_server.base_url + "/version").json()["version"]


def test_streaming_error_before_start_is_a_status(api_server):
    body = {**GOOD_COMPLETION, "max_tokens": 600, "stream": True}
    with httpx.stream("POST", api_server.base_url + C, json=body, headers=api_server.headers) as response:
        assert response.status_code == 400
        assert json.loads(response.read())["error"]["param"] == "max_tokens"


# ---- admin routes, request ids, chat extras ----------------------------------------------------


def test_models_tokenize_detokenize(api_server):
    get = lambda path: httpx.get(api_server.base_url + path, headers=api_server.headers)  # noqa: E731
    card = get("/v1/models").json()["data"][0]
    assert card["id"] == api_server.model_name and card["max_model_len"] == 512
    assert get(f"/v1/models/{api_server.model_name}").status_code == 200
    assert get("/v1/models/unknown").status_code == 404
    tokens = post(api_server, "/tokenize", {"prompt": "Hello world"}).json()
    assert tokens["count"] == len(tokens["tokens"]) and tokens["max_model_len"] == 512
    assert post(api_server, "/detokenize", {"tokens": tokens["tokens"]}).json() == {"prompt": "Hello world"}
    chat = post(api_server, "/tokenize", {"messages": GOOD_CHAT["messages"]}).json()
    usage = post(api_server, CH, GOOD_CHAT).json()["usage"]
    assert chat["count"] == usage["prompt_tokens"]


def test_request_id_echo_and_reuse(api_server):
    async def run():
        async with httpx.AsyncClient(base_url=api_server.base_url, headers=api_server.headers, timeout=60) as client:
            headers = {"X-Request-Id": "my-id-1"}
            body = {"prompt": "same id", "max_tokens": 8}
            return await asyncio.gather(*(client.post(C, json=body, headers=headers) for _ in range(3)))

    for response in asyncio.run(run()):
        assert response.status_code == 200 and response.headers["x-request-id"] == "my-id-1"
        assert response.json()["id"].startswith("cmpl-my-id-1")


def test_chat_tools_and_continue(api_server):
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object", "properties": {}}}}]
    assert post(api_server, CH, {**GOOD_CHAT, "tools": tools, "tool_choice": "auto"}).status_code == 200
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "Well,"}]
    body = {"messages": messages, "max_tokens": 3, "continue_final_message": True, "add_generation_prompt": False, "echo": True}
    out = post(api_server, CH, body).json()
    assert out["choices"][0]["message"]["content"].startswith("Well,")


def test_stop_strings_and_stream_equal(api_server):
    base = post(api_server, C, {"prompt": "abc", "max_tokens": 12, "temperature": 0}).json()["choices"][0]["text"]
    stop = base[3:6] if len(base) > 6 and base[3:6].strip() else None
    if stop is None:
        pytest.skip("no usable stop string in this continuation")
    body = {"prompt": "abc", "max_tokens": 12, "temperature": 0, "stop": stop}
    whole = post(api_server, C, body).json()["choices"][0]
    assert whole["finish_reason"] == "stop" and stop not in whole["text"]
    with httpx.stream("POST", api_server.base_url + C, json={**body, "stream": True}, headers=api_server.headers) as r:
        payloads = sse_payloads(r.iter_lines())
    assert "".join(p["choices"][0]["text"] for p in payloads[:-1]) == whole["text"]


def test_completion_stream_equals_whole_with_echo_logprobs_n(api_server):
    body = {"prompt": ["one two", "three four five"], "n": 2, "max_tokens": 6, "temperature": 0, "echo": True, "logprobs": 2}
    whole = post(api_server, C, body).json()
    stream_body = {**body, "stream": True, "stream_options": {"include_usage": True}}
    with httpx.stream("POST", api_server.base_url + C, json=stream_body, headers=api_server.headers) as r:
        payloads = sse_payloads(r.iter_lines())
    assert payloads[-1] == "[DONE]" and payloads[-2]["usage"] == whole["usage"]
    texts, tokens, offsets, finish = {}, {}, {}, {}
    for payload in payloads[:-2]:
        (choice,) = payload["choices"]
        i = choice["index"]
        texts[i] = texts.get(i, "") + choice["text"]
        tokens.setdefault(i, []).extend(choice["logprobs"]["tokens"])
        offsets.setdefault(i, []).extend(choice["logprobs"]["text_offset"])
        finish[i] = choice["finish_reason"] or finish.get(i)
    for choice in whole["choices"]:
        i = choice["index"]
        assert texts[i] == choice["text"]
        assert tokens[i] == choice["logprobs"]["tokens"] and offsets[i] == choice["logprobs"]["text_offset"]
        assert finish[i] == choice["finish_reason"]
    assert sorted(texts) == [0, 1, 2, 3]


def test_huggingface_inference_client(api_server):
    from huggingface_hub import InferenceClient

    client = InferenceClient(base_url=api_server.base_url + "/v1", api_key=api_server.api_key)
    messages = [{"role": "user", "content": "Hi"}]
    whole = client.chat_completion(messages, max_tokens=8, temperature=0)
    assert whole.choices[0].message.role == "assistant"
    chunks = client.chat_completion(messages, max_tokens=8, temperature=0, stream=True)
    streamed = "".join(chunk.choices[0].delta.content or "" for chunk in chunks)
    assert streamed == whole.choices[0].message.content


def test_access_log_one_line_per_request(api_server, caplog):
    caplog.set_level(logging.INFO, logger="pagedserve.access")
    post(api_server, C, GOOD_COMPLETION, headers={"X-Request-Id": "log-me"})
    httpx.get(api_server.base_url + "/health", headers={"X-Request-Id": "log-me-too"})

    def lines():  # written when the response is done, which may be just after the client has it
        return [r for r in caplog.records if r.name == "pagedserve.access" and r.access["request_id"].startswith("log-me")]

    deadline = time.monotonic() + 5
    while len(lines()) < 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert [(r.access["path"], r.access["status"]) for r in lines()] == [("/v1/completions", 200), ("/health", 200)]
