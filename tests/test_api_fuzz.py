"""Property-based fuzzing of every operation in /openapi.json (schemathesis): valid and invalid
inputs alike must never get a 5xx, and every error must come in OpenAI's envelope."""

from __future__ import annotations

import pytest
import schemathesis
from hypothesis import HealthCheck, settings

MAX_EXAMPLES = 40  # per operation; ~10 operations


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


@schema.parametrize()
@settings(
    max_examples=MAX_EXAMPLES,
    deadline=None,
    suppress_health_check=list(HealthCheck),
    derandomize=True,
    database=None,
)
def test_no_server_errors(case, api_server):
    _keep_it_cheap(case)
    response = case.call(base_url=api_server.base_url, headers=api_server.headers, timeout=60)
    assert response.status_code < 500, (case.method, case.path, case.body, response.text)
    if response.status_code >= 400:
        if case.path in (*TGI_PATHS, "/info") and response.status_code not in (405, 413):
            body = response.json()  # TGI's own error shape, which huggingface_hub parses
            assert isinstance(body["error"], str) and set(body) <= {"error", "error_type"}, response.text
        else:
            error = response.json()["error"]
            assert set(error) == {"message", "type", "param", "code"}, response.text
    if case.path in ("/v1/completions", "/v1/chat/completions", *TGI_PATHS):
        api_server.wait_idle(timeout=30)
