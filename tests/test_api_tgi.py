"""TGI's REST API on a real server: huggingface_hub's InferenceClient.text_generation (which posts to
POST /), /generate, /generate_stream and /info on the wire, TGI's error body, and aborts on disconnect."""

from __future__ import annotations

import asyncio
import json

import httpx
import pytest
from api_server import disconnect_mid_request, start_server
from huggingface_hub import InferenceClient
from huggingface_hub.errors import HfHubHTTPError, ValidationError

import server
from server.api.errors import ShuttingDown
from server.api.tgi import tgi_error, tgi_sse
from server.errors import InvalidRequest, Overloaded

PROMPT = "Once upon a time there"
MAX_NEW = 8


def post(server_, path: str, body, **kwargs) -> httpx.Response:
    headers = {**server_.headers, **kwargs.pop("headers", {})}
    return httpx.post(server_.base_url + path, json=body, headers=headers, timeout=60, **kwargs)


def completion(server_, prompt: str, max_tokens: int, **extra) -> dict:
    """The greedy /v1/completions choice for the same prompt, with the sampled tokens' logprobs."""
    body = {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "logprobs": 0, **extra}
    response = post(server_, "/v1/completions", body)
    assert response.status_code == 200, response.text
    return response.json()["choices"][0]


def events(lines) -> list[dict]:
    out = []
    for line in lines:
        if line:
            assert line.startswith("data: ") and line != "data: [DONE]", line  # TGI's stream has no [DONE]
            out.append(json.loads(line[len("data: ") :]))
    return out


@pytest.fixture(scope="module")
def client(api_server) -> InferenceClient:
    return InferenceClient(base_url=api_server.base_url, api_key=api_server.api_key)


# ---- generation -----------------------------------------------------------------------------------


def test_text_generation_equals_completions(api_server, client):
    want = completion(api_server, PROMPT, MAX_NEW)
    assert client.text_generation(PROMPT, max_new_tokens=MAX_NEW) == want["text"]

    out = client.text_generation(PROMPT, max_new_tokens=MAX_NEW, details=True)
    details = out.details
    assert out.generated_text == want["text"]
    assert details.finish_reason == {"length": "length", "stop": "eos_token"}[want["finish_reason"]]
    assert details.generated_tokens == len(details.tokens) == len(want["logprobs"]["tokens"])
    assert details.seed is None and details.prefill == [] and details.top_tokens is None  # greedy, not asked
    assert "".join(t.text for t in details.tokens if not t.special) == want["text"]
    assert [t.logprob for t in details.tokens] == pytest.approx(want["logprobs"]["token_logprobs"], abs=1e-4)


def test_stream_with_details(api_server, client):
    whole = client.text_generation(PROMPT, max_new_tokens=MAX_NEW, details=True)
    stream = list(client.text_generation(PROMPT, max_new_tokens=MAX_NEW, details=True, stream=True))
    assert [e.index for e in stream] == list(range(1, len(stream) + 1))
    assert all(e.generated_text is None and e.details is None for e in stream[:-1])
    last = stream[-1]
    assert last.generated_text == whole.generated_text
    assert [e.token.id for e in stream] == [t.id for t in whole.details.tokens]
    assert [e.token.logprob for e in stream] == pytest.approx([t.logprob for t in whole.details.tokens], abs=1e-4)
    assert last.details.finish_reason == whole.details.finish_reason
    assert last.details.generated_tokens == len(stream) and last.details.seed is None
    num_prompt = post(api_server, "/tokenize", {"prompt": PROMPT}).json()["count"]
    assert last.details.input_length == num_prompt
    # without details the client yields the token texts
    texts = list(client.text_generation(PROMPT, max_new_tokens=MAX_NEW, stream=True))
    assert texts == [e.token.text for e in stream]


def test_wire_format(api_server):
    body = {"inputs": PROMPT, "parameters": {"max_new_tokens": 3, "top_n_tokens": 2}}
    with httpx.stream(
        "POST", api_server.base_url + "/generate_stream", json=body, headers=api_server.headers, timeout=60
    ) as response:
        assert response.status_code == 200 and response.headers["content-type"].startswith("text/event-stream")
        stream = events(response.iter_lines())
    assert [list(e) for e in stream] == [["index", "token", "top_tokens", "generated_text", "details"]] * 3
    assert stream[-1]["details"] is None and stream[-1]["generated_text"] is not None  # details not asked
    assert all(len(e["top_tokens"]) == 2 and e["top_tokens"][0]["id"] == e["token"]["id"] for e in stream)  # greedy

    plain = post(api_server, "/generate", {"inputs": PROMPT, "parameters": {"max_new_tokens": 3}}).json()
    assert plain == {"generated_text": stream[-1]["generated_text"]}
    # POST / (huggingface_hub's route) wraps the answer in a list, and streams when asked
    assert post(api_server, "/", {"inputs": PROMPT, "parameters": {"max_new_tokens": 3}}).json() == [plain]
    streamed = post(api_server, "/", {"inputs": PROMPT, "parameters": {"max_new_tokens": 3}, "stream": True})
    assert events(streamed.text.split("\n"))[-1]["generated_text"] == plain["generated_text"]


def test_prefill_logprobs_equal_echo(api_server, client):
    out = client.text_generation(PROMPT, max_new_tokens=1, details=True, decoder_input_details=True)
    echo = completion(api_server, PROMPT, 1, echo=True)["logprobs"]
    prefill = out.details.prefill
    ids = post(api_server, "/tokenize", {"prompt": PROMPT}).json()["tokens"]
    assert [p.id for p in prefill] == ids
    assert [p.text for p in prefill] == echo["tokens"][: len(ids)]
    assert prefill[0].logprob is None and echo["token_logprobs"][0] is None
    assert [p.logprob for p in prefill[1:]] == pytest.approx(echo["token_logprobs"][1 : len(ids)], abs=1e-4)


def test_stop_sequence_and_full_text(api_server, client):
    tokens = client.text_generation(PROMPT, max_new_tokens=MAX_NEW, details=True).details.tokens
    text = "".join(t.text for t in tokens)
    stop = tokens[2].text
    out = client.text_generation(PROMPT, max_new_tokens=MAX_NEW, stop=[stop], details=True)
    assert out.generated_text == text[: text.index(stop) + len(stop)]  # TGI keeps the stop sequence
    assert out.details.finish_reason == "stop_sequence"
    full = client.text_generation(PROMPT, max_new_tokens=3, return_full_text=True)
    assert full == PROMPT + client.text_generation(PROMPT, max_new_tokens=3)


def test_sampling_reports_a_reproducible_seed(client):
    first = client.text_generation(PROMPT, max_new_tokens=MAX_NEW, do_sample=True, details=True)
    assert isinstance(first.details.seed, int)  # a random one, as TGI draws
    seed = first.details.seed
    again = client.text_generation(PROMPT, max_new_tokens=MAX_NEW, do_sample=True, seed=seed, details=True)
    assert again.generated_text == first.generated_text and again.details.seed == first.details.seed
    # temperature alone turns sampling on, as in TGI
    assert isinstance(client.text_generation(PROMPT, max_new_tokens=2, temperature=0.7, details=True).details.seed, int)


def test_info(api_server):
    info = httpx.get(api_server.base_url + "/info", headers=api_server.headers).json()
    assert info == {
        "model_id": api_server.core.model_config.model,
        "model_sha": None,
        "model_dtype": "torch.float32",
        "model_device_type": info["model_device_type"],
        "model_pipeline_tag": "text-generation",
        "max_concurrent_requests": 48,
        "max_best_of": 1,
        "max_stop_sequences": 4,
        "max_input_tokens": 511,
        "max_total_tokens": 512,
        "validation_workers": 1,
        "max_client_batch_size": 1,
        "router": "pagedserve",
        "version": server.__version__,
        "sha": None,
        "docker_label": None,
    }
    assert info["model_device_type"] in ("cpu", "cuda")
    assert httpx.get(api_server.base_url + "/info").status_code == 401


# ---- errors ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "body, message",
    [
        ({}, "Missing required parameter: inputs"),
        ({"inputs": ""}, "`inputs` cannot be empty"),
        ({"inputs": "hi", "parameters": {"max_new_tokens": 0}}, "`max_new_tokens` must be strictly positive"),
        ({"inputs": "hi", "parameters": {"temperature": 0}}, "`temperature` must be strictly positive"),
        ({"inputs": "hi", "parameters": {"top_p": 1.0}}, "`top_p` must be > 0.0 and < 1.0"),
        ({"inputs": "hi", "parameters": {"stop": ["a", "b", "c", "d", "e"]}}, "up to 4 stop sequences"),
        ({"inputs": "hi", "parameters": {"typical_p": 0.5}}, "`typical_p` is not supported"),
        ({"inputs": "hi", "parameters": {"best_of": 2}}, "`best_of` != 1"),
        ({"inputs": "hi", "parameters": {"grammar": {"type": "yaml", "value": "a"}}}, "grammar.type must be 'json' or 'regex'"),
        ({"inputs": "hi", "parameters": {"bogus": 1}}, "Unrecognized request argument supplied: parameters.bogus"),
        ({"inputs": "hi", "parameters": {"max_new_tokens": 600}}, "`max_new_tokens` must be <= 512"),
        ({"inputs": "hi " * 600, "parameters": {"max_new_tokens": None}}, "`inputs` must have less than 511 tokens"),
    ],
)
def test_bad_input_is_a_validation_error(api_server, body, message):
    response = post(api_server, "/generate", body)
    assert response.status_code == 400, response.text
    error = response.json()
    assert set(error) == {"error", "error_type"} and error["error_type"] == "validation"
    assert error["error"].startswith("Input validation error: ") and message in error["error"]


def test_client_errors_are_clear_and_the_server_keeps_serving(api_server, client):
    with pytest.raises(ValidationError, match="`max_new_tokens` must be strictly positive"):
        client.text_generation("hi", max_new_tokens=0)
    with pytest.raises(ValidationError, match="not supported when streaming"):
        list(client.text_generation("hi", max_new_tokens=2, stream=True, details=True, decoder_input_details=True))
    with pytest.raises(HfHubHTTPError, match="Incorrect API key") as caught:
        InferenceClient(base_url=api_server.base_url, api_key="wrong").text_generation("hi", max_new_tokens=2)
    assert caught.value.response.status_code == 401
    unauthorized = httpx.post(api_server.base_url + "/generate", json={"inputs": "hi"})
    assert unauthorized.status_code == 401 and unauthorized.headers["WWW-Authenticate"] == "Bearer"
    assert set(unauthorized.json()) == {"error"}  # TGI has no error_type for auth: clients see the status
    assert client.text_generation(PROMPT, max_new_tokens=2)
    api_server.wait_idle()


def test_error_bodies():
    """Same statuses as the rest of the API; error_type only for TGI's kinds (huggingface_hub maps them
    to ValidationError, OverloadedError...), so a 503 reaches clients as an HTTP error with its status."""
    invalid = {"error": "Input validation error: bad", "error_type": "validation"}
    assert tgi_error(InvalidRequest("bad"))[:2] == (400, invalid)
    status, body, headers = tgi_error(Overloaded("Too many requests.", retry_after=2))
    assert (status, body) == (429, {"error": "Too many requests.", "error_type": "overloaded"})
    assert headers["Retry-After"] == "2"
    assert tgi_error(ShuttingDown("draining"))[:2] == (503, {"error": "draining"})
    cut = {"error": "draining", "error_type": "incomplete_generation"}  # a stream has no status to tell
    assert tgi_error(ShuttingDown("draining"), in_stream=True)[1] == cut
    internal = {"error": "Internal server error.", "error_type": "generation"}  # never the internals
    assert tgi_error(RuntimeError("secret"))[:2] == (500, internal)


def test_error_mid_stream_is_the_last_event():
    async def tokens():
        yield {"index": 1}
        raise ShuttingDown("The server shut down before the request finished.")

    async def run() -> tuple[list[bytes], list[str]]:
        failures: list[str] = []
        return [chunk async for chunk in tgi_sse(tokens(), failures.append)], failures

    chunks, failures = asyncio.run(run())
    assert chunks[0] == b'data: {"index":1}\n\n'
    assert json.loads(chunks[-1][len(b"data: ") :]) == {
        "error": "The server shut down before the request finished.",
        "error_type": "incomplete_generation",
    }
    assert len(chunks) == 2 and failures == ["draining"]  # and no [DONE]


@pytest.fixture(scope="module")
def small_server():
    running = start_server(api_key=None, engine_overrides={"max_num_seqs": 2, "max_queued_requests": 2})
    yield running
    running.stop()


def test_overload_is_429_overloaded(small_server):
    body = {"inputs": "burst", "parameters": {"max_new_tokens": 16, "ignore_eos": True}}

    async def run():
        async with httpx.AsyncClient(base_url=small_server.base_url, timeout=60) as http:
            return await asyncio.gather(*(http.post("/generate", json=body) for _ in range(16)))

    responses = asyncio.run(run())
    assert {r.status_code for r in responses} == {200, 429}
    for r in responses:
        if r.status_code == 429:
            assert r.json()["error_type"] == "overloaded" and int(r.headers["Retry-After"]) >= 1
    small_server.wait_idle()


# ---- disconnects ----------------------------------------------------------------------------------


@pytest.mark.parametrize("path", ["/generate_stream", "/generate"])
def test_disconnect_frees_kv_blocks(api_server, path):
    api_server.wait_idle()
    body = {"inputs": "Go on and on", "parameters": {"max_new_tokens": 480, "ignore_eos": True}}
    disconnect_mid_request(api_server, path, body, streaming=path == "/generate_stream")
    again = post(api_server, "/generate", {"inputs": "still there?", "parameters": {"max_new_tokens": 2}})
    assert again.status_code == 200
