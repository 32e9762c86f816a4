"""vLLM's request fields on /v1/completions and /v1/chat/completions, sent as vLLM's clients send
them (raw JSON bodies and the openai SDK's extra_body) to a real server, answers parsed back."""

from __future__ import annotations

import json
import uuid

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

C, CH = "/v1/completions", "/v1/chat/completions"
USER = [{"role": "user", "content": "Tell me a story about a cat."}]


def post(server, path: str, body: dict, headers: dict | None = None) -> httpx.Response:
    return httpx.post(server.base_url + path, json=body, headers={**server.headers, **(headers or {})}, timeout=60)


def ok(server, path: str, body: dict, headers: dict | None = None) -> dict:
    response = post(server, path, body, headers)
    assert response.status_code == 200, response.text
    return response.json()


def stream(server, path: str, body: dict) -> list[dict]:
    """The JSON chunks of a stream (the final [DONE] checked and dropped)."""
    chunks = []
    with httpx.stream("POST", server.base_url + path, json=body, headers=server.headers, timeout=60) as response:
        assert response.status_code == 200, response.read()
        for line in response.iter_lines():
            if line.startswith("data: "):
                chunks.append(line[len("data: ") :])
    assert chunks.pop() == "[DONE]"
    return [json.loads(c) for c in chunks]


def metric(server, name: str, **labels) -> float:
    text = httpx.get(server.base_url + "/metrics", timeout=10).text
    return sum(
        s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())
    )


def tokenize(server, text: str) -> list[int]:
    return ok(server, "/tokenize", {"prompt": text, "add_special_tokens": False})["tokens"]


def fresh_text(words: int = 60) -> str:
    """A prompt no other test sent (so the prefix cache holds none of it)."""
    tag = uuid.uuid4().hex
    return " ".join(f"{tag[i % 32]}{i}" for i in range(words))


# ---- stream_options.continuous_usage_stats ---------------------------------------------------------


@pytest.mark.parametrize("path", [C, CH])
def test_continuous_usage_on_every_chunk_as_benchmark_clients_send_it(api_server, path):
    body = {"model": api_server.model_name, "max_tokens": 12, "ignore_eos": True, "temperature": 0}
    body.update({"prompt": "Once upon a time"} if path == C else {"messages": USER})
    whole = ok(api_server, path, body)["usage"]
    chunks = stream(api_server, path, {**body, "stream": True, "stream_options": {"include_usage": True, "continuous_usage_stats": True}})
    assert all(c["usage"] is not None for c in chunks)
    counts = [c["usage"]["completion_tokens"] for c in chunks[:-1]]
    assert counts == sorted(counts) and counts[-1] == whole["completion_tokens"] == 12
    for c in chunks:
        usage = c["usage"]
        assert usage["prompt_tokens"] == whole["prompt_tokens"]
        assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"] == whole


def test_continuous_usage_with_the_openai_sdk_and_n(api_server):
    with openai.OpenAI(base_url=f"{api_server.base_url}/v1", api_key=api_server.api_key, max_retries=0) as client:
        chunks = list(
            client.chat.completions.create(
                model=api_server.model_name, messages=USER, max_tokens=5, n=2, stream=True, temperature=0,
                extra_body={"ignore_eos": True}, stream_options={"include_usage": True, "continuous_usage_stats": True},
            )
        )
    per_choice: dict[int, list[int]] = {0: [], 1: []}
    for c in chunks[:-1]:
        per_choice[c.choices[0].index].append(c.usage.completion_tokens)  # each chunk counts its own choice
    assert all(v == sorted(v) and v[-1] == 5 for v in per_choice.values())
    assert chunks[-1].usage.completion_tokens == 10


def test_continuous_usage_needs_include_usage_as_in_vllm(api_server):
    body = {"prompt": "Hi", "max_tokens": 3, "stream": True, "stream_options": {"continuous_usage_stats": True}}
    assert all("usage" not in c for c in stream(api_server, C, body))


# ---- prompt shaping: truncate_prompt_tokens, add_special_tokens, chat templates --------------------


def test_truncate_prompt_tokens_keeps_the_last_k(api_server):
    text = fresh_text(40)
    ids = tokenize(api_server, text)
    body = {"prompt": text, "max_tokens": 6, "temperature": 0, "truncate_prompt_tokens": 10, "return_token_ids": True}
    out = ok(api_server, C, body)
    assert out["usage"]["prompt_tokens"] == 10 and out["choices"][0]["prompt_token_ids"] == ids[-10:]
    same = ok(api_server, C, {"prompt": ids[-10:], "max_tokens": 6, "temperature": 0})  # greedy parity
    assert out["choices"][0]["text"] == same["choices"][0]["text"]
    whole = ok(api_server, C, {**body, "truncate_prompt_tokens": -1})  # -1: max_model_len, nothing cut here
    assert whole["usage"]["prompt_tokens"] == len(ids)
    chat = ok(api_server, CH, {"messages": USER, "max_tokens": 2, "truncate_prompt_tokens": 5})
    assert chat["usage"]["prompt_tokens"] == 5
    too_big = post(api_server, C, {**body, "truncate_prompt_tokens": 100_000})
    assert too_big.status_code == 400 and too_big.json()["error"]["param"] == "truncate_prompt_tokens"


def test_per_request_chat_template_is_refused_unless_the_server_trusts_them(api_server):
    body = {"messages": USER, "chat_template": "{{ messages[0].content }}"}
    for route, extra in ((CH, {"max_tokens": 2}), ("/tokenize", {})):
        refused = post(api_server, route, {**body, **extra})
        assert refused.status_code == 400, refused.text
        error = refused.json()["error"]
        assert error["param"] == "chat_template" and "--trust-request-chat-template" in error["message"]


# ---- sampling: allowed_token_ids, bad_words -------------------------------------------------------


@pytest.mark.parametrize("temperature", [0, 1.0])
def test_allowed_token_ids_only_emits_allowed_ids(api_server, temperature):
    allowed = [261, 295, 81, 899]
    body = {"prompt": "Once upon a time", "max_tokens": 10, "temperature": temperature, "seed": 7,
            "allowed_token_ids": allowed, "return_token_ids": True, "ignore_eos": True}
    out = ok(api_server, C, body)
    assert out["choices"][0]["token_ids"] and set(out["choices"][0]["token_ids"]) <= set(allowed)
    chat = ok(api_server, CH, {"messages": USER, **{k: v for k, v in body.items() if k != "prompt"}})
    assert set(chat["choices"][0]["token_ids"]) <= set(allowed)
    bad = post(api_server, C, {**body, "allowed_token_ids": [10**6]})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "allowed_token_ids"


def test_bad_words_never_appear(api_server):
    body = {"prompt": "Once upon a time", "max_tokens": 24, "temperature": 0, "ignore_eos": True, "return_token_ids": True}
    plain = ok(api_server, C, body)["choices"][0]
    words = [w for w in plain["text"].split() if w.isalpha()][:2]
    assert words, plain["text"]
    banned = [tokenize(api_server, w) for w in words] + [tokenize(api_server, " " + w) for w in words]
    out = ok(api_server, C, {**body, "bad_words": words})["choices"][0]
    assert out["text"] != plain["text"]

    def contains(seq, sub):
        return any(seq[i : i + len(sub)] == sub for i in range(len(seq) - len(sub) + 1))

    assert not any(contains(out["token_ids"], ids) for ids in banned)
    chat = ok(api_server, CH, {"messages": USER, **{k: v for k, v in body.items() if k != "prompt"}, "bad_words": words})
    assert not any(contains(chat["choices"][0]["token_ids"], ids) for ids in banned)


# ---- logprobs shapes: return_tokens_as_token_ids, prompt_logprobs, return_token_ids ----------------


def test_return_tokens_as_token_ids(api_server):
    common = {"max_tokens": 4, "temperature": 0, "return_tokens_as_token_ids": True, "return_token_ids": True}
    out = ok(api_server, C, {"prompt": "Hello there", "logprobs": 2, **common})["choices"][0]
    assert out["logprobs"]["tokens"] == [f"token_id:{t}" for t in out["token_ids"]]
    assert all(k.startswith("token_id:") for top in out["logprobs"]["top_logprobs"] for k in top)
    chat = ok(api_server, CH, {"messages": USER, "logprobs": True, "top_logprobs": 2, **common})["choices"][0]
    content = chat["logprobs"]["content"]
    assert [c["token"] for c in content] == [f"token_id:{t}" for t in chat["token_ids"]]
    assert content[0]["bytes"] == list(content[0]["token"].encode()) and len(content[0]["top_logprobs"]) == 2
    chunks = stream(api_server, C, {"prompt": "Hello there", "logprobs": 1, "stream": True, **common})
    assert [t for c in chunks for t in c["choices"][0]["logprobs"]["tokens"]] == [
        f"token_id:{t}" for c in chunks for t in c["choices"][0]["token_ids"]
    ]


def test_prompt_logprobs_field(api_server):
    out = ok(api_server, C, {"prompt": "The cat sat on the mat", "max_tokens": 1, "prompt_logprobs": 2, "return_token_ids": True})
    choice = out["choices"][0]
    rows, ids = choice["prompt_logprobs"], choice["prompt_token_ids"]
    assert len(rows) == len(ids) == out["usage"]["prompt_tokens"] and rows[0] is None
    for token_id, row in zip(ids[1:], rows[1:]):
        assert str(token_id) in row and 2 <= len(row) <= 3
        assert {"logprob", "rank", "decoded_token"} == set(row[str(token_id)])
        assert sorted(v["rank"] for k, v in row.items() if k != str(token_id) or v["rank"] <= 2)[0] == 1
    chat = ok(api_server, CH, {"messages": USER, "max_tokens": 1, "prompt_logprobs": 0})
    assert len(chat["prompt_logprobs"]) == chat["usage"]["prompt_tokens"] and chat["prompt_logprobs"][0] is None
    refused = post(api_server, CH, {"messages": USER, "stream": True, "prompt_logprobs": 1})
    assert refused.status_code == 400 and refused.json()["error"]["param"] == "prompt_logprobs"
    assert "prompt_logprobs" not in ok(api_server, C, {"prompt": "x", "max_tokens": 1})["choices"][0]


def test_return_token_ids_in_streams(api_server):
    body = {"max_tokens": 5, "temperature": 0, "ignore_eos": True, "return_token_ids": True}
    whole = ok(api_server, C, {"prompt": "Hello", **body})["choices"][0]
    chunks = stream(api_server, C, {"prompt": "Hello", "stream": True, **body})
    assert chunks[0]["choices"][0]["prompt_token_ids"] == whole["prompt_token_ids"]
    assert [t for c in chunks for t in c["choices"][0]["token_ids"]] == whole["token_ids"]
    chat_whole = ok(api_server, CH, {"messages": USER, **body})
    chat = stream(api_server, CH, {"messages": USER, "stream": True, **body})
    assert chat[0]["prompt_token_ids"] == chat_whole["prompt_token_ids"]
    assert [t for c in chat for t in c["choices"][0].get("token_ids", [])] == chat_whole["choices"][0]["token_ids"]


# ---- request_id, cache_salt, priority ----------------------------------------------------------


def test_request_id_names_the_response(api_server):
    assert ok(api_server, C, {"prompt": "x", "max_tokens": 1, "request_id": "job-42"})["id"] == "cmpl-job-42"
    assert ok(api_server, CH, {"messages": USER, "max_tokens": 1, "request_id": "job-42"})["id"] == "chatcmpl-job-42"
    chunks = stream(api_server, C, {"prompt": "x", "max_tokens": 2, "stream": True, "request_id": "job-43"})
    assert {c["id"] for c in chunks} == {"cmpl-job-43"}
    header_wins = ok(api_server, C, {"prompt": "x", "max_tokens": 1, "request_id": "job-44"}, {"X-Request-Id": "hdr-1"})
    assert header_wins["id"] == "cmpl-hdr-1"  # vLLM's precedence


def test_cache_salt_isolates_the_prefix_cache(api_server):
    text = fresh_text(80)  # several full blocks
    body = {"prompt": text, "max_tokens": 2, "min_tokens": 2, "temperature": 0}
    hits = "pagedserve:prefix_cache_hits_total"

    def hit_tokens(**extra) -> float:
        before = metric(api_server, hits)
        ok(api_server, C, {**body, **extra})
        return metric(api_server, hits) - before

    assert hit_tokens(cache_salt="tenant-a") == 0
    assert hit_tokens(cache_salt="tenant-b") == 0  # same prompt, other salt: nothing shared
    assert hit_tokens() == 0  # no salt: not shared with salted requests either
    assert hit_tokens(cache_salt="tenant-a") > 0  # same salt: shared
    assert hit_tokens() > 0
    empty = post(api_server, C, {**body, "cache_salt": ""})
    assert empty.status_code == 400 and empty.json()["error"]["param"] == "cache_salt"


def test_priority_needs_the_priority_policy(api_server):
    before = metric(api_server, "pagedserve:request_failures_total", reason="validation")
    refused = post(api_server, CH, {"messages": USER, "max_tokens": 1, "priority": 3})
    assert refused.status_code == 400 and refused.json()["error"]["param"] == "priority"
    assert "--scheduling-policy priority" in refused.json()["error"]["message"]
    assert metric(api_server, "pagedserve:request_failures_total", reason="validation") == before + 1
    assert ok(api_server, CH, {"messages": USER, "max_tokens": 1, "priority": 0})["usage"]["completion_tokens"] == 1
    api_server.wait_idle()


# ---- accepted and refused fields ----------------------------------------------------------------


def test_fields_accepted_as_vllm_accepts_them(api_server):
    extras = {"spaces_between_special_tokens": False, "length_penalty": 1.0, "use_beam_search": False,
              "kv_transfer_params": None, "structured_outputs": None}
    with openai.OpenAI(base_url=f"{api_server.base_url}/v1", api_key=api_server.api_key, max_retries=0) as client:
        out = client.completions.create(model=api_server.model_name, prompt="Hi", max_tokens=2, extra_body=extras)
        assert out.usage.completion_tokens >= 1
        chat_extras = {**extras, "include_reasoning": True}
        chat = client.chat.completions.create(model=api_server.model_name, messages=USER, max_tokens=2, extra_body=chat_extras)
        assert chat.choices[0].finish_reason in ("stop", "length")


REFUSED = [
    ("guided_whitespace_pattern", "[ ]?", "disable_any_whitespace"),
    ("guided_decoding_backend", "outlines", "xgrammar"),
    ("structural_tag", {"type": "structural_tag"}, "structural tags"),
    ("kv_transfer_params", {"do_remote_decode": True}, "disaggregated"),
    ("mm_processor_kwargs", {"num_crops": 4}, "text-only"),
    ("logits_processors", ["my_module.Processor"], "logit_bias"),
    ("vllm_xargs", {"k": 1}, "extension"),
    ("use_beam_search", True, "beam search"),
    ("repetition_min_count", 3, "repetition detection"),
    ("prompt_embeds", "AAAA", "embedding"),
]


@pytest.mark.parametrize("field,value,reason", REFUSED, ids=[r[0] for r in REFUSED])
@pytest.mark.parametrize("path", [C, CH])
def test_refused_fields_say_why(api_server, path, field, value, reason):
    body = {"prompt": "Hi"} if path == C else {"messages": USER}
    response = post(api_server, path, {**body, "max_tokens": 2, field: value})
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    if field == "prompt_embeds" and path == CH:  # a completions field only: unknown on chat
        assert error["message"].startswith("Unrecognized request argument")
        return
    assert error["param"] == field and reason in error["message"] and error["type"] == "invalid_request_error"


def test_unknown_fields_stay_refused(api_server):
    response = post(api_server, C, {"prompt": "Hi", "max_tokens": 2, "guided_yaml": "x"})
    assert response.status_code == 400 and response.json()["error"]["param"] == "guided_yaml"
