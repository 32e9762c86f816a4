"""Property-based fuzzing on a real server: valid and invalid inputs alike never get a 5xx, and every
error comes in the route's envelope (OpenAI's, or TGI's on TGI's routes).

- every operation in /openapi.json, from its schema (schemathesis; ~3,000 cases);
- arbitrary Unicode in every text field of every route (hypothesis; 30 fields x 40 cases): lone
  surrogates, NULs, RTL and zero-width marks, noncharacters, astral code points, special-token and
  template syntax, text past the context length; a lone surrogate is always a 400 naming the field;
- any JSON in what reaches the chat template, odd bytes in X-Request-Id, Authorization and the model
  path (200 cases).

Fixed seeds for CI (the same cases every run); PAGEDSERVE_FUZZ_EXAMPLES (examples per operation and
per field, default 40) raises the budget locally.
"""

from __future__ import annotations

import json
import os
import zlib
from collections.abc import Callable
from dataclasses import dataclass

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, seed, settings
from hypothesis import strategies as st

MAX_EXAMPLES = int(os.environ.get("PAGEDSERVE_FUZZ_EXAMPLES", "40"))  # per operation, per text field
FUZZ = settings(
    max_examples=MAX_EXAMPLES,
    deadline=None,
    suppress_health_check=list(HealthCheck),
    derandomize=True,
    database=None,
)


@pytest.fixture(scope="session")
def api_schema(api_server):
    return schemathesis.openapi.from_url(api_server.base_url + "/openapi.json")


schema = schemathesis.pytest.from_fixture("api_schema")


TGI_PATHS = ("/", "/generate", "/generate_stream")


def _keep_it_cheap(case) -> None:
    """Bound the work a generated request may ask for, and get past two cross-field rules (tested
    elsewhere) that would otherwise refuse nearly every generated chat request."""
    body = case.body
    if not isinstance(body, dict):
        return
    for name in ("max_tokens", "max_completion_tokens"):
        if isinstance(body.get(name), int) and not isinstance(body.get(name), bool) and body[name] > 4:
            body[name] = 4
    if case.path.endswith("/chat/completions") and "max_tokens" not in body and "max_completion_tokens" not in body:
        body["max_tokens"] = 4
    if isinstance(body.get("min_tokens"), int) and not isinstance(body.get("min_tokens"), bool):
        body["min_tokens"] = min(body["min_tokens"], 4)
    if isinstance(body.get("n"), int) and not isinstance(body.get("n"), bool):
        body["n"] = min(body["n"], 2)
    if body.get("top_logprobs") is not None:
        body["logprobs"] = True
    messages = body.get("messages")
    if isinstance(messages, list):
        for message in messages:
            if isinstance(message, dict) and message.get("content") is None:
                message["content"] = "hi"
    params = body.get("parameters")
    if isinstance(params, dict):
        tokens = params.get("max_new_tokens")
        if isinstance(tokens, int) and not isinstance(tokens, bool):
            params["max_new_tokens"] = min(tokens, 4)
        elif "max_new_tokens" not in params:
            params["max_new_tokens"] = 4
    elif case.path in TGI_PATHS and "inputs" in body and params is None:
        body["parameters"] = {"max_new_tokens": 4}
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) > 4 and isinstance(prompt[0], (str, list)):
        body["prompt"] = prompt[:4]


def _assert_envelope(path: str, response: httpx.Response) -> str:
    """An error in the route's shape; returns its message."""
    if path in (*TGI_PATHS, "/info") and response.status_code not in (405, 413):
        body = response.json()  # TGI's own error shape, which huggingface_hub parses
        assert isinstance(body["error"], str) and set(body) <= {"error", "error_type"}, response.text
        return body["error"]
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}, response.text
    assert error["code"] == response.status_code and isinstance(error["message"], str), response.text
    return error["message"]


@schema.parametrize()
@FUZZ
def test_no_server_errors(case, api_server):
    _keep_it_cheap(case)
    response = case.call(base_url=api_server.base_url, headers=api_server.headers, timeout=60)
    assert response.status_code < 500, (case.method, case.path, case.body, response.text)
    if response.status_code >= 400:
        _assert_envelope(case.path, response)
    if case.path in ("/v1/completions", "/v1/chat/completions", *TGI_PATHS):
        api_server.wait_idle(timeout=30)


# ---- arbitrary Unicode in every text field ------------------------------------------------------

PIECES = [
    "\x00", "\x01", "\x7f", "\t", "\r\n", "\u0085", "\u2028", "\u202e", "\u200f", "\u200b", "\u200d", "\ufeff",
    "\ufffe", "\uffff", "\ufffd", "\U0010ffff", "\U000e0001", "\U0001f600", "\U0001f469\u200d\U0001f4bb", "e\u0301",
    "\ud800", "\udbff", "\udc00", "\udfff", "\udcff", "\ud83d", "\\", '"', "'", "<|endoftext|>", "<|im_start|>",
    "<|im_end|>", "</s>", "<s>", "{{", "}}", "{%", "%}", "{{ raise_exception('x') }}", "\u00ff", "\u4e2d\u6587", " ",
]
_char = st.one_of(
    st.characters(exclude_categories=()),  # any code point, NUL included
    st.characters(categories=["Cs"]),  # lone surrogates: rare among all code points, so asked for
)
TEXT = st.one_of(
    st.sampled_from(PIECES),
    st.text(_char, max_size=40),
    st.lists(_char | st.sampled_from(PIECES), max_size=12).map("".join),
    st.tuples(st.sampled_from(["a", "\U0001f600", "\u202e", " ", "<|endoftext|>", "\x00"]), st.integers(300, 6000)).map(
        lambda pair: pair[0] * pair[1]  # past the context length
    ),
)


@dataclass(frozen=True)
class Slot:
    """Where a route takes text: `build(text)` is a request body; a lone surrogate in the text must be
    refused as `param` (or as "a key of `param`")."""

    path: str
    param: str
    build: Callable[[str], dict]
    in_key: bool = False


def _user(t: str) -> list[dict]:
    return [{"role": "user", "content": t}]


C, CHAT, TGI_STOP = "/v1/completions", "/v1/chat/completions", {"max_new_tokens": 1}
SLOTS = [
    Slot(C, "prompt", lambda t: {"prompt": t, "max_tokens": 1}),
    Slot(C, "prompt[1]", lambda t: {"prompt": ["hi", t], "max_tokens": 1}),
    Slot(C, "prompt", lambda t: {"prompt": t, "max_tokens": 1, "echo": True, "logprobs": 2}),
    Slot(C, "stop[0]", lambda t: {"prompt": "hi", "max_tokens": 2, "stop": [t]}),
    Slot(C, "logit_bias", lambda t: {"prompt": "hi", "max_tokens": 1, "logit_bias": {t: 1}}, in_key=True),
    Slot(C, "model", lambda t: {"prompt": "hi", "max_tokens": 1, "model": t}),
    Slot(C, "user", lambda t: {"prompt": "hi", "max_tokens": 1, "user": t}),
    Slot(C, "suffix", lambda t: {"prompt": "hi", "max_tokens": 1, "suffix": t}),
    Slot(CHAT, "messages[0].content", lambda t: {"messages": _user(t), "max_tokens": 1}),
    Slot(CHAT, "messages[0].content", lambda t: {"messages": _user(t), "max_tokens": 1, "stream": True}),
    Slot(CHAT, "messages[0].content", lambda t: {"messages": _user(t), "max_tokens": 1, "echo": True, "logprobs": True}),
    Slot(CHAT, "messages[0].content[0].text", lambda t: {"messages": [{"role": "user", "content": [{"type": "text", "text": t}]}], "max_tokens": 1}),
    Slot(CHAT, "messages[0].name", lambda t: {"messages": [{"role": "user", "content": "hi", "name": t}], "max_tokens": 1}),
    Slot(CHAT, "messages[1].content", lambda t: {
        "messages": [*_user("hi"), {"role": "assistant", "content": t}],
        "max_tokens": 1, "continue_final_message": True, "add_generation_prompt": False,
    }),
    Slot(CHAT, "messages[1].tool_calls[0].function.arguments", lambda t: {
        "messages": [*_user("hi"), {"role": "assistant", "tool_calls": [{"id": "c", "function": {"name": "f", "arguments": t}}]},
                     {"role": "tool", "content": "ok", "tool_call_id": "c"}],
        "max_tokens": 1,
    }),
    Slot(CHAT, "chat_template_kwargs.x", lambda t: {"messages": _user("hi"), "max_tokens": 1, "chat_template_kwargs": {"x": t}}),
    Slot(CHAT, "chat_template_kwargs", lambda t: {"messages": _user("hi"), "max_tokens": 1, "chat_template_kwargs": {t: 1}}, in_key=True),
    Slot(CHAT, "tools[0].function.description", lambda t: {
        "messages": _user("hi"), "max_tokens": 1, "tools": [{"type": "function", "function": {"name": "f", "description": t}}],
    }),
    Slot(CHAT, "stop[0]", lambda t: {"messages": _user("hi"), "max_tokens": 2, "stop": [t]}),
    Slot(CHAT, "logit_bias", lambda t: {"messages": _user("hi"), "max_tokens": 1, "logit_bias": {t: 1}}, in_key=True),
    Slot("/tokenize", "prompt", lambda t: {"prompt": t}),
    Slot("/tokenize", "messages[0].content", lambda t: {"messages": _user(t)}),
    Slot("/tokenize", "chat_template_kwargs.x", lambda t: {"messages": _user("hi"), "chat_template_kwargs": {"x": t}}),
    Slot("/detokenize", "model", lambda t: {"tokens": [1, 2], "model": t}),
    Slot("/generate", "inputs", lambda t: {"inputs": t, "parameters": {**TGI_STOP, "details": True, "decoder_input_details": True}}),
    Slot("/generate", "parameters.stop[0]", lambda t: {"inputs": "hi", "parameters": {"max_new_tokens": 2, "stop": [t]}}),
    Slot("/generate", "parameters.adapter_id", lambda t: {"inputs": "hi", "parameters": {**TGI_STOP, "adapter_id": t}}),
    Slot("/generate_stream", "inputs", lambda t: {"inputs": t, "parameters": {**TGI_STOP, "details": True, "top_n_tokens": 2}}),
    Slot("/", "inputs", lambda t: {"inputs": t, "parameters": {**TGI_STOP, "return_full_text": True}}),
    Slot("/", "inputs", lambda t: {"inputs": t, "stream": True, "parameters": TGI_STOP}),
]


@pytest.fixture(scope="module")
def http(api_server):
    headers = {**api_server.headers, "Content-Type": "application/json"}
    with httpx.Client(base_url=api_server.base_url, headers=headers, timeout=60) as client:
        yield client


def _has_surrogate(value) -> bool:
    """Whether the server decodes a lone surrogate out of `value` sent as JSON (an adjacent high and
    low half arrive as one astral character)."""
    received = json.loads(json.dumps(value))
    return any(0xD800 <= ord(c) <= 0xDFFF for c in json.dumps(received, ensure_ascii=False))


def _check(path: str, response: httpx.Response, body: dict) -> str | None:
    """No 5xx; an error in the route's envelope (its message returned); an answer that parses, and a
    stream without an error event."""
    shown = ascii(body)[:2000]  # a report must not choke on the text it reports
    assert response.status_code < 500, (path, shown, response.text)
    if response.status_code >= 400:
        return _assert_envelope(path, response)
    if response.headers["content-type"].startswith("text/event-stream"):
        for line in response.text.splitlines():
            if line.startswith("data: ") and line != "data: [DONE]":
                assert "error" not in json.loads(line[6:]), (path, shown, line)
    else:
        response.json()
    return None


def _seed(name: str):
    """A fixed seed of its own for each parametrized case (the inner tests share their source)."""
    return seed(zlib.crc32(name.encode()))


@pytest.mark.parametrize("slot", SLOTS, ids=[f"{s.path} {s.param}{' key' if s.in_key else ''}" for s in SLOTS])
def test_any_text_in_any_field(slot, api_server, http):
    @_seed(slot.path + repr(slot.build("x")))
    @FUZZ
    @given(text=TEXT)
    def run(text):
        body = slot.build(text)
        response = http.post(slot.path, content=json.dumps(body).encode("ascii"))  # \u escapes: any str
        message = _check(slot.path, response, body)
        if _has_surrogate(text):
            where = f"a key of {slot.param}" if slot.in_key else slot.param
            assert response.status_code == 400 and f"Invalid value for {where}: " in message, (ascii(body), message)
            if slot.path not in TGI_PATHS:
                assert response.json()["error"]["param"] == slot.param

    run()
    api_server.wait_idle(timeout=30)


JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | TEXT,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(TEXT, inner, max_size=4),
    max_leaves=12,
)


@pytest.mark.parametrize("path", [CHAT, "/tokenize"])
def test_any_json_reaching_the_chat_template(path, api_server, http):
    """chat_template_kwargs and tool parameters are handed to the template as they come."""

    @_seed(path)
    @FUZZ
    @given(kwargs=st.dictionaries(TEXT, JSON, max_size=4), parameters=st.dictionaries(TEXT, JSON, max_size=3))
    def run(kwargs, parameters):
        tools = [{"type": "function", "function": {"name": "f", "parameters": parameters}}]
        body = {"messages": _user("hi"), "chat_template_kwargs": kwargs, "tools": tools}
        if path == CHAT:
            body["max_tokens"] = 1
        response = http.post(path, content=json.dumps(body).encode("ascii"))
        _check(path, response, body)
        if _has_surrogate(body):
            assert response.status_code == 400, response.text

    run()
    api_server.wait_idle(timeout=30)


# header bytes h11 lets through: no NUL, no whitespace at the ends
_HEADER_BYTE = st.sampled_from([b for b in range(1, 256) if b not in b" \t\n\r\x0b\x0c"])
HEADER = st.lists(_HEADER_BYTE | st.just(0x20), max_size=60).map(lambda bs: bytes(bs).strip(b" "))


@pytest.mark.parametrize("path", [C, "/generate"])
def test_any_header_bytes(path, api_server, http):
    body = {"prompt": "hi", "max_tokens": 1} if path == C else {"inputs": "hi", "parameters": TGI_STOP}

    @_seed(path)
    @FUZZ
    @given(request_id=HEADER, auth=st.one_of(HEADER, HEADER.map(lambda b: (b"Bearer " + b).strip())))
    def run(request_id, auth):
        response = http.post(path, json=body, headers={"X-Request-Id": request_id, "Authorization": auth})
        _check(path, response, body)
        assert response.status_code in (200, 401), response.text
        assert response.headers["x-request-id"]

    run()
    api_server.wait_idle(timeout=30)


def test_any_bytes_in_the_model_path(api_server, http):
    """GET /v1/models/{model_id} with any bytes percent-encoded (invalid UTF-8, NUL, slashes)."""

    @_seed("model path")
    @FUZZ
    @given(raw=st.binary(max_size=40))
    def run(raw):
        response = http.get("/v1/models/" + "".join(f"%{b:02X}" for b in raw))
        _check("/v1/models", response, {"path": raw.hex()})
        assert response.status_code in (200, 404), response.text

    run()
