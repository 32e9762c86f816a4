"""Structured outputs and tool calling end to end: a real server on the random-weight demo model, the
openai SDK, LangChain and httpx. The weights are random, so only the grammar makes the output valid;
replies a grammar did not finish (finish_reason "length") are not counted as valid."""

from __future__ import annotations

import json
import re
import threading
import time
from typing import Literal

import httpx
import jsonschema
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families
from pydantic import BaseModel, Field

from api_server import start_server

TIMEOUT_S = 1.0
SLOW_SCHEMA = {"type": "string", "pattern": "[a-z]{1,40000}"}  # about a minute to compile on this machine
USER = [{"role": "user", "content": "Plan a trip."}]
WEATHER = {
    "type": "object",
    "properties": {"city": {"enum": ["Paris", "Oslo", "Lima"]}, "days": {"type": "integer", "minimum": 1, "maximum": 7}},
    "required": ["city", "days"],
}
CLOCK = {"type": "object", "properties": {"tz": {"enum": ["UTC", "CET"]}}, "required": ["tz"]}
TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "description": "Weather", "parameters": WEATHER}},
    {"type": "function", "function": {"name": "now", "parameters": CLOCK}},
]


@pytest.fixture(scope="module")
def server():
    running = start_server(engine_overrides={"grammar_compile_timeout": TIMEOUT_S}, tool_call_parser="hermes")
    yield running
    running.stop()


@pytest.fixture(scope="module")
def client(server):
    with openai.OpenAI(base_url=f"{server.base_url}/v1", api_key=server.api_key, max_retries=0, timeout=120) as c:
        yield c


def _post(server, path, body):
    return httpx.post(f"{server.base_url}{path}", json=body, headers=server.headers, timeout=120)


class Stop(BaseModel):
    city: Literal["Paris", "Oslo", "Lima"]
    nights: int = Field(ge=1, le=9)


class Trip(BaseModel):
    title: str = Field(max_length=4)
    kind: Literal["rail", "road"]
    stops: list[Stop] = Field(min_length=1, max_length=2)
    booked: bool


def test_openai_parse_pydantic_model(server, client):
    completion = client.chat.completions.parse(
        model=server.model_name, messages=USER, response_format=Trip, max_tokens=120, seed=1, temperature=1.0
    )
    choice = completion.choices[0]
    assert choice.finish_reason == "stop", choice.message.content
    assert isinstance(choice.message.parsed, Trip)
    assert Trip.model_validate_json(choice.message.content) == choice.message.parsed


def test_openai_parse_streaming(server, client):
    with client.chat.completions.stream(
        model=server.model_name, messages=USER, response_format=Trip, max_tokens=120, seed=2, temperature=1.0
    ) as stream:
        deltas = [event.delta for event in stream if event.type == "content.delta"]
        final = stream.get_final_completion()
    assert len(deltas) > 3  # it streamed
    assert final.choices[0].finish_reason == "stop"
    assert final.choices[0].message.parsed == Trip.model_validate_json("".join(deltas))


def test_strict_schema_with_nested_objects_arrays_enums_and_required(server, client):
    schema = {
        "type": "object",
        "properties": {
            "id": {"type": "integer", "minimum": 0, "maximum": 99},
            "meta": {
                "type": "object",
                "properties": {"ok": {"type": "boolean"}, "tags": {"type": "array", "items": {"enum": ["a", "b"]}, "maxItems": 3}},
                "required": ["ok", "tags"],
                "additionalProperties": False,
            },
            "level": {"enum": ["low", "high", None]},
        },
        "required": ["id", "meta", "level"],
        "additionalProperties": False,
    }
    fmt = {"type": "json_schema", "json_schema": {"name": "record", "schema": schema, "strict": True}}
    out = client.chat.completions.create(
        model=server.model_name, messages=USER, response_format=fmt, max_tokens=80, n=3, seed=3, temperature=1.0
    )
    for choice in out.choices:
        assert choice.finish_reason == "stop", choice.message.content
        jsonschema.validate(json.loads(choice.message.content), schema)
        assert "\n" not in choice.message.content  # fixed separators: no free whitespace by default


def test_json_object_parses_when_it_finishes(server, client):
    out = client.chat.completions.create(
        model=server.model_name, messages=USER, response_format={"type": "json_object"}, max_tokens=200,
        n=6, seed=4, temperature=1.0,
    )
    finished = [c for c in out.choices if c.finish_reason == "stop"]
    assert finished, "no json_object reply finished within 200 tokens"
    for choice in finished:
        assert isinstance(json.loads(choice.message.content), dict)
    for choice in out.choices:
        assert choice.message.content.startswith("{")


def test_regex_and_choice_on_completions_and_chat(server, client):
    pattern = r"[a-z]{2,4}-[0-9]{2}"
    out = client.completions.create(
        model=server.model_name, prompt="Code:", max_tokens=20, n=3, seed=5, temperature=1.0,
        extra_body={"structured_outputs": {"regex": pattern}},
    )
    assert [c.finish_reason for c in out.choices] == ["stop"] * 3
    assert all(re.fullmatch(pattern, c.text) for c in out.choices), [c.text for c in out.choices]
    choices = ["yes", "no", "not sure"]
    for extra in ({"guided_choice": choices}, {"structured_outputs": {"choice": choices}}):
        chat = client.chat.completions.create(model=server.model_name, messages=USER, max_tokens=10, extra_body=extra)
        assert chat.choices[0].message.content in choices and chat.choices[0].finish_reason == "stop"


def test_grammar_with_n_stop_strings_logprobs_and_streaming(server, client):
    stream = client.completions.create(
        model=server.model_name, prompt="Count:", max_tokens=30, n=2, seed=6, temperature=1.0, logprobs=2,
        stop=["9"], stream=True, extra_body={"guided_grammar": 'root ::= "x" [0-8] [0-8] "9" [0-9]*'},
    )
    texts, reasons, logprobs = ["", ""], [None, None], [0, 0]
    for chunk in stream:
        for c in chunk.choices:
            texts[c.index] += c.text
            reasons[c.index] = c.finish_reason or reasons[c.index]
            logprobs[c.index] += len(c.logprobs.tokens) if c.logprobs else 0
    for text, reason, count in zip(texts, reasons, logprobs):
        assert reason == "stop" and re.fullmatch("x[0-8]{2}", text), text  # cut at the stop string "9"
        assert count >= 2


def test_tgi_grammar(server):
    out = _post(server, "/generate", {"inputs": "hi", "parameters": {"grammar": {"type": "regex", "value": "[0-9]{4}"}}})
    assert out.status_code == 200 and re.fullmatch("[0-9]{4}", out.json()["generated_text"])
    body = {"inputs": "hi", "parameters": {"max_new_tokens": 60, "grammar": {"type": "json", "value": WEATHER}}}
    out = _post(server, "/generate", body)
    jsonschema.validate(json.loads(out.json()["generated_text"]), WEATHER)


BAD = [
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nope"}}}},
     "response_format.json_schema.schema", "not a valid JSON schema"),
    ({"structured_outputs": {"regex": "(a"}}, "structured_outputs.regex", "parenthesis is not closed"),
    ({"guided_grammar": "root ::= undefined_rule"}, "guided_grammar", "not defined"),
    ({"guided_json": "{not json"}, "guided_json", "not valid JSON"),
    ({"structured_outputs": {"regex": "a", "choice": ["b"]}}, "structured_outputs.choice", "Only one"),
    ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "fly"}}}, "tool_choice", "not in tools"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": 3}}}]},
     "tools[0].function.parameters", "not a valid JSON schema"),
    ({"tools": TOOLS, "tool_choice": "required", "response_format": {"type": "json_object"}}, "tool_choice", "cannot be combined"),
    ({"guided_json": {"type": "string", "maxLength": 10}, "max_tokens": 2}, None, None),  # fine: the control
]


@pytest.mark.parametrize("extra,param,message", BAD)
def test_bad_grammars_are_400_naming_the_field(server, extra, param, message):
    response = _post(server, "/v1/chat/completions", {"messages": USER, "max_tokens": 5, **extra})
    if param is None:
        assert response.status_code == 200, response.text
        return
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == param and message in error["message"], error
    server.wait_idle()


def test_tool_choice_required_and_named_validate_against_the_schemas(server, client):
    schemas = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
    for parallel in (True, False):
        out = client.chat.completions.create(
            model=server.model_name, messages=USER, tools=TOOLS, tool_choice="required", max_tokens=400, n=2, seed=7,
            temperature=1.0, parallel_tool_calls=parallel,
        )
        # the random weights pick "," over "]" more often: a parallel reply may run to max_tokens (then
        # its last call is cut); one call at most always finishes
        assert any(c.finish_reason == "tool_calls" for c in out.choices)
        for choice in out.choices:
            assert choice.finish_reason in ("tool_calls", "length") and choice.message.content is None
            calls = choice.message.tool_calls
            assert calls and (parallel or (len(calls) == 1 and choice.finish_reason == "tool_calls"))
            complete = calls if choice.finish_reason == "tool_calls" else calls[:-1]
            for call in complete:
                jsonschema.validate(json.loads(call.function.arguments), schemas[call.function.name])
                assert call.id.startswith("call_") and call.type == "function"
    named = {"type": "function", "function": {"name": "now"}}
    out = client.chat.completions.create(model=server.model_name, messages=USER, tools=TOOLS, tool_choice=named, max_tokens=30)
    choice = out.choices[0]
    assert choice.finish_reason == "stop"  # as OpenAI for a named function
    [call] = choice.message.tool_calls
    assert call.function.name == "now"
    jsonschema.validate(json.loads(call.function.arguments), CLOCK)


def _stream_tool_calls(client, server, **kwargs):
    calls, reason, order = {}, None, []
    for chunk in client.chat.completions.create(model=server.model_name, messages=USER, stream=True, **kwargs):
        for c in chunk.choices:
            reason = c.finish_reason or reason
            for delta in c.delta.tool_calls or ():
                if delta.function.name:
                    calls[delta.index] = [delta.id, delta.function.name, delta.function.arguments or ""]
                    order.append("name")
                else:
                    calls[delta.index][2] += delta.function.arguments
                    order.append("args")
    return calls, reason, order


HERMES_REGEX = r'<tool_call>\{"name": "get_weather", "arguments": \{"city": "(Paris|Oslo)", "days": [1-7]\}\}</tool_call>'


def test_auto_parses_hermes_output_forced_by_a_regex_streamed_and_not(server, client):
    kwargs = dict(tools=TOOLS, tool_choice="auto", max_tokens=150, seed=8, temperature=1.0,
                  extra_body={"structured_outputs": {"regex": HERMES_REGEX}})
    out = client.chat.completions.create(model=server.model_name, messages=USER, **kwargs)
    choice = out.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    [call] = choice.message.tool_calls
    assert call.function.name == "get_weather"
    jsonschema.validate(json.loads(call.function.arguments), WEATHER)
    calls, reason, order = _stream_tool_calls(client, server, **kwargs)
    assert reason == "tool_calls" and order[0] == "name" and order.count("args") >= 2
    assert [(name, args) for _, name, args in calls.values()] == [(call.function.name, call.function.arguments)]


def test_named_tool_streamed(server, client):
    named = {"type": "function", "function": {"name": "get_weather"}}
    calls, reason, order = _stream_tool_calls(client, server, tools=TOOLS, tool_choice=named, max_tokens=40)
    assert reason == "stop" and order[0] == "name"
    [(call_id, name, args)] = calls.values()
    assert name == "get_weather" and call_id.startswith("call_")
    jsonschema.validate(json.loads(args), WEATHER)


def test_tool_results_go_back_through_the_template(server):
    messages = [
        *USER,
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "now", "arguments": '{"tz": "UTC"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "12:00"},
    ]
    tokens = _post(server, "/tokenize", {"messages": messages})
    assert tokens.status_code == 200, tokens.text
    text = _post(server, "/detokenize", {"tokens": tokens.json()["tokens"]}).json()["prompt"]
    assert '{"name": "now", "arguments": {"tz": "UTC"}}' in text and "12:00" in text  # not quoted twice
    reply = _post(server, "/v1/chat/completions", {"messages": messages, "tools": TOOLS, "max_tokens": 3})
    assert reply.status_code == 200, reply.text


def test_langchain_structured_output_and_forced_tools(server):
    from langchain_openai import ChatOpenAI

    llm = ChatOpenAI(
        base_url=f"{server.base_url}/v1", api_key=server.api_key, model=server.model_name, max_tokens=120,
        temperature=1.0, seed=9, max_retries=0,
    )
    trip = llm.with_structured_output(Trip).invoke("Plan a trip.")
    assert isinstance(trip, Trip)

    def get_weather(city: Literal["Paris", "Oslo", "Lima"], days: int) -> str:
        """The weather in a city for some days."""
        return "sunny"

    message = llm.bind_tools([get_weather], tool_choice="get_weather").invoke("Weather?")
    [call] = message.tool_calls
    assert call["name"] == "get_weather" and call["args"]["city"] in ("Paris", "Oslo", "Lima")
    assert isinstance(call["args"]["days"], int)
    message = llm.bind_tools([get_weather], tool_choice="any").invoke("Weather?")  # LangChain's "required"
    assert message.tool_calls and message.tool_calls[0]["name"] == "get_weather"


def _free_greedy(server, prompts):
    return [_post(server, "/v1/completions", {"prompt": p, "max_tokens": 12, "temperature": 0}).json()["choices"][0]["text"] for p in prompts]


def test_constrained_rows_leave_free_greedy_outputs_token_exact(server):
    prompts = ["The sea", "A red fox", "Numbers: 1, 2,", "Hello"]
    alone = _free_greedy(server, prompts)
    constrained = {"prompt": "x", "max_tokens": 12, "temperature": 1.0, "seed": 1, "guided_json": WEATHER}
    assert _post(server, "/v1/completions", constrained).status_code == 200  # compiled: the mixed batch starts together
    results: dict = {}

    def run(key, body):
        results[key] = _post(server, "/v1/completions", body).json()

    threads = [threading.Thread(target=run, args=(f"c{i}", {**constrained, "seed": i})) for i in range(4)]
    threads += [threading.Thread(target=run, args=(i, {"prompt": p, "max_tokens": 12, "temperature": 0})) for i, p in enumerate(prompts)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert [results[i]["choices"][0]["text"] for i in range(len(prompts))] == alone
    for i in range(4):
        choice = results[f"c{i}"]["choices"][0]
        if choice["finish_reason"] == "stop":
            jsonschema.validate(json.loads(choice["text"]), WEATHER)


def _failures(server) -> float:
    text = httpx.get(f"{server.base_url}/metrics", headers=server.headers).text
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "pagedserve:request_failures_total" and sample.labels.get("reason") == "validation":
                return sample.value
    return 0.0


def test_slow_schema_is_400_within_the_timeout_while_others_stream(server, client):
    assert _post(server, "/v1/completions", {"prompt": "w", "max_tokens": 2, "guided_regex": "[ab]"}).status_code == 200
    before = _failures(server)
    seen: list[float] = []

    def stream():
        with httpx.stream("POST", f"{server.base_url}/v1/completions", headers=server.headers, timeout=120, json={
            "prompt": "Once", "max_tokens": 300, "temperature": 0, "ignore_eos": True, "stream": True,
        }) as response:
            for line in response.iter_lines():
                if line.startswith("data: {"):
                    seen.append(time.monotonic())

    streamer = threading.Thread(target=stream)
    streamer.start()
    while not seen:
        time.sleep(0.01)
    started = time.monotonic()
    response = _post(server, "/v1/chat/completions", {"messages": USER, "max_tokens": 5, "guided_json": SLOW_SCHEMA})
    ended = time.monotonic()
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == "guided_json" and f"longer than {TIMEOUT_S:g} s" in error["message"]
    assert ended - started < TIMEOUT_S + 3
    during = [t for t in seen if started <= t <= ended]
    assert len(during) >= 5, f"only {len(during)} tokens streamed while the schema compiled"
    streamer.join()
    assert len(seen) == 300
    assert _failures(server) == before + 1
    # refused at once the second time (cached), and the next grammar compiles in a fresh worker
    started = time.monotonic()
    assert _post(server, "/v1/completions", {"prompt": "x", "max_tokens": 5, "guided_json": SLOW_SCHEMA}).status_code == 400
    assert time.monotonic() - started < 0.5
    assert _post(server, "/v1/completions", {"prompt": "x", "max_tokens": 5, "guided_regex": "[cd]+"}).status_code == 200
    server.wait_idle()
