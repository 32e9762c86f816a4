"""Text that is not valid Unicode, and odd bytes in headers, on a real server: a lone UTF-16 surrogate
in any text field of any route is a 400 naming the field (OpenAI's envelope, or TGI's body on TGI's
routes), counted as a validation failure, and leaves no request or KV block behind."""

from __future__ import annotations

import json

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from server.api.unicode_text import find_lone_surrogate, param_name

LONE = "\udcff"  # json.loads('"\\udcff"'): a str that UTF-8 cannot encode
TGI_PATHS = ("/", "/generate", "/generate_stream")

CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"


def _msgs(**message) -> list[dict]:
    return [{"role": "user", "content": "hi", **message}]


def _tool(parameters: dict) -> list[dict]:
    return [{"type": "function", "function": {"name": "f", "parameters": parameters}}]


# (route, body, the parameter the error names); every body is sent as ASCII JSON with \u escapes
CASES = [
    (COMPLETIONS, {"prompt": LONE}, "prompt"),
    (COMPLETIONS, {"prompt": ["fine", "x" + LONE]}, "prompt[1]"),
    (COMPLETIONS, {"prompt": "hi", "stop": LONE}, "stop"),
    (COMPLETIONS, {"prompt": "hi", "stop": ["ok", LONE]}, "stop[1]"),
    (COMPLETIONS, {"prompt": "hi", "logit_bias": {LONE: 1}}, "logit_bias"),
    (COMPLETIONS, {"prompt": "hi", "model": LONE}, "model"),
    (COMPLETIONS, {"prompt": "hi", "user": LONE}, "user"),
    (COMPLETIONS, {"prompt": "hi", "suffix": LONE}, "suffix"),
    (CHAT, {"messages": _msgs(content=LONE)}, "messages[0].content"),
    (CHAT, {"messages": _msgs(content=[{"type": "text", "text": LONE}])}, "messages[0].content[0].text"),
    (CHAT, {"messages": _msgs(content=[{"type": LONE}])}, "messages[0].content[0].type"),
    (CHAT, {"messages": _msgs(name=LONE)}, "messages[0].name"),
    (CHAT, {"messages": _msgs(role=LONE)}, "messages[0].role"),
    (CHAT, {"messages": _msgs(tool_call_id=LONE)}, "messages[0].tool_call_id"),
    (CHAT, {"messages": [{"role": "assistant", "tool_calls": [{"function": {"name": "f", "arguments": LONE}}]}]},
     "messages[0].tool_calls[0].function.arguments"),
    (CHAT, {"messages": _msgs(), "chat_template_kwargs": {"flag": LONE}}, "chat_template_kwargs.flag"),
    (CHAT, {"messages": _msgs(), "chat_template_kwargs": {LONE: True}}, "chat_template_kwargs"),
    (CHAT, {"messages": _msgs(), "tools": _tool({"properties": {"a": {"enum": [LONE]}}})},
     "tools[0].function.parameters.properties.a.enum[0]"),
    (CHAT, {"messages": _msgs(), "tool_choice": {"type": "function", "function": {"name": LONE}}},
     "tool_choice.function.name"),
    (CHAT, {"messages": _msgs(), "metadata": {"k": LONE}}, "metadata.k"),
    (CHAT, {"messages": _msgs(), "stop": [LONE]}, "stop[0]"),
    (CHAT, {"messages": _msgs(), "logit_bias": {"1" + LONE: 1}}, "logit_bias"),
    ("/tokenize", {"prompt": LONE}, "prompt"),
    ("/tokenize", {"messages": _msgs(content=LONE)}, "messages[0].content"),
    ("/tokenize", {"messages": _msgs(), "chat_template_kwargs": {"x": [LONE]}}, "chat_template_kwargs.x[0]"),
    ("/detokenize", {"tokens": [1], "model": LONE}, "model"),
    ("/generate", {"inputs": LONE}, "inputs"),
    ("/generate", {"inputs": "hi", "parameters": {"stop": [LONE]}}, "parameters.stop[0]"),
    ("/generate", {"inputs": "hi", "parameters": {"adapter_id": LONE}}, "parameters.adapter_id"),
    ("/generate_stream", {"inputs": "a" + LONE + "b"}, "inputs"),
    ("/", {"inputs": LONE, "stream": True}, "inputs"),
    ("/", {"inputs": "hi", "parameters": {"grammar": {"type": "json", "value": LONE}}}, "parameters.grammar.value"),
]


def _send(server, path: str, body, headers: dict | None = None) -> httpx.Response:
    content = body if isinstance(body, bytes) else json.dumps(body).encode("ascii")  # \udcff escaped
    headers = {**server.headers, "Content-Type": "application/json", **(headers or {})}
    return httpx.post(server.base_url + path, content=content, headers=headers, timeout=60)


def _failures(server, reason: str) -> float:
    text = httpx.get(server.base_url + "/metrics", timeout=10).text
    return sum(
        sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == "pagedserve:request_failures_total" and sample.labels.get("reason") == reason
    )


def _assert_refused(response: httpx.Response, path: str, param: str | None) -> str:
    """The 400 in the route's error shape; returns its message."""
    assert response.status_code == 400, response.text
    body = response.json()
    if path in TGI_PATHS:
        assert body["error_type"] == "validation", body
        assert set(body) == {"error", "error_type"}, body
        return body["error"]
    error = body["error"]
    assert set(error) == {"message", "type", "param", "code"}, body
    assert (error["type"], error["code"], error["param"]) == ("invalid_request_error", 400, param), body
    return error["message"]


@pytest.mark.parametrize(("path", "body", "param"), CASES, ids=[f"{c[0]} {c[2]}" for c in CASES])
def test_lone_surrogate_is_a_400_naming_the_field(api_server, path, body, param):
    before = _failures(api_server, "validation")
    message = _assert_refused(_send(api_server, path, body), path, param)
    assert f"Invalid value for {'a key of ' if param in ('logit_bias', 'chat_template_kwargs') else ''}{param}:" in message
    assert "lone UTF-16 surrogate (U+DCFF)" in message, message
    assert _failures(api_server, "validation") == before + 1
    api_server.wait_idle(timeout=10)


def test_surrogate_pairs_and_odd_but_valid_text_are_served(api_server):
    """An escaped pair is one character (U+1F600); NUL, RTL marks and noncharacters are valid text."""
    odd = "\U0001f600 \x00 \u202e\u200f \ufffe \U0010ffff"
    response = _send(api_server, COMPLETIONS, {"prompt": odd, "max_tokens": 2, "stop": [odd]})
    assert response.status_code == 200, response.text
    response = _send(api_server, "/tokenize", {"messages": _msgs(content=odd)})
    assert response.status_code == 200 and response.json()["count"] > 0, response.text
    response = _send(api_server, "/generate", {"inputs": odd, "parameters": {"max_new_tokens": 2}})
    assert response.status_code == 200, response.text
    api_server.wait_idle(timeout=10)


@pytest.mark.parametrize("path", [COMPLETIONS, "/generate"])
@pytest.mark.parametrize(
    "raw",
    [b'{"prompt": "\xff", "inputs": "\xff"}', b'{"prompt": "\xed\xb3\xbf", "inputs": "\xed\xb3\xbf"}'],
    ids=["invalid-utf8", "utf8-encoded-surrogate"],
)
def test_body_bytes_that_are_not_utf8_are_a_400(api_server, path, raw):
    response = _send(api_server, path, raw)
    assert response.status_code == 400, response.text
    if path in TGI_PATHS:
        assert response.json()["error_type"] == "validation"
    else:
        assert response.json()["error"]["type"] == "invalid_request_error"


@pytest.mark.parametrize("path", [COMPLETIONS, "/generate"])
def test_odd_header_bytes_never_break_a_request(api_server, path):
    body = {"prompt": "hi", "max_tokens": 1} if path == COMPLETIONS else {"inputs": "hi", "parameters": {"max_new_tokens": 1}}
    odd_id = {"X-Request-Id": b"\xff\xfe\x80 id\x01"}
    response = _send(api_server, path, body, odd_id)
    assert response.status_code == 200, response.text
    assert len(response.headers["x-request-id"]) == 32  # not an id we can echo: a fresh one
    for auth in (b"Bearer \xff\xfe", b"Bearer t\xe9st-key", b"\xc3\x28", b"Basic \xff"):
        response = _send(api_server, path, body, {"Authorization": auth})
        assert response.status_code == 401, (auth, response.text)
        error = response.json()["error"]
        assert isinstance(error, str) if path in TGI_PATHS else error["type"] == "authentication_error"
    api_server.wait_idle(timeout=10)


def test_find_lone_surrogate_reports_the_first_in_document_order():
    data = {"a": ["ok", {"b": "x" + LONE}], "c": LONE, "\ud800": 1}
    path, in_key, text, index = find_lone_surrogate(data)
    assert (param_name(path), in_key, index) == ("a[1].b", False, 1)
    assert find_lone_surrogate({"a": ["\U0001f600", 1, None, 2.5, True]}) is None
    assert param_name(find_lone_surrogate({"x": {"\udfff": 1}})[0]) == "x"
    assert find_lone_surrogate({"x": {"\udfff": 1}})[1] is True
    assert find_lone_surrogate({"\ud800": "ok", "b": LONE})[:2] == ((), True)
    deep: list = [LONE]
    for _ in range(5000):  # deeper than the recursion limit: the walk has its own stack
        deep = [deep]
    assert find_lone_surrogate(deep)[3] == 0
