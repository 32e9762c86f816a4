"""Tool-call parsers on model text: whole replies, and the same replies fed in pieces (a stream) give
the same calls, name first then argument fragments."""

from __future__ import annotations

import json

import pytest

from server.api.tools.parsers import HermesParser, Llama3JsonParser, NamedParser, RequiredParser


def _whole(parser, text):
    parser.feed(text)
    parser.finish()
    content, calls = parser.result()
    return content, [(c.name, c.arguments) for c in calls]


def _streamed(parser, text, size):
    """Feed `text` in pieces of `size` characters; rebuild content and calls from the deltas."""
    content, calls, order = "", {}, []
    steps = [parser.feed(text[i : i + size]) for i in range(0, len(text), size)] + [parser.finish()]
    for step in steps:
        content += step.content
        for delta in step.calls:
            if delta.name is not None:
                assert delta.index not in calls and delta.id.startswith("call_") and delta.arguments == ""
                calls[delta.index] = [delta.name, ""]
                order.append(("name", delta.index))
            else:
                assert delta.index in calls, "arguments before the name"
                calls[delta.index][1] += delta.arguments
                order.append(("args", delta.index))
    return content, [tuple(calls[i]) for i in sorted(calls)], order


HERMES = (
    'Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "days": [1, 2], "q": "a}\\"b"}}\n'
    '</tool_call>\n<tool_call>\n{"name": "now", "arguments": {}}\n</tool_call>'
)


@pytest.mark.parametrize("size", [1, 2, 3, 7, 1000])
def test_hermes_stream_matches_whole(size):
    whole = _whole(HermesParser(), HERMES)
    assert whole == (
        "Let me check.\n",
        [("get_weather", '{"city": "Paris", "days": [1, 2], "q": "a}\\"b"}'), ("now", "{}")],
    )
    content, calls, order = _streamed(HermesParser(), HERMES, size)
    assert (content, calls) == whole
    assert order[0] == ("name", 0)
    if size == 1:
        assert sum(1 for kind, i in order if kind == "args" and i == 0) > 5  # arguments arrive in fragments


def test_hermes_plain_text_and_a_held_back_tag_prefix():
    parser = HermesParser()
    assert parser.feed("Hello <tool").content == "Hello "  # "<tool" might open a call: held back
    assert parser.feed("s are fun").content == "<tools are fun"
    assert parser.finish().content == ""
    assert parser.result() == ("Hello <tools are fun", [])


def test_hermes_broken_call_is_returned_as_text():
    text = 'x <tool_call>{"name": "f", "arguments": {"a": 1</tool_call>'
    assert _whole(HermesParser(), text) == (text, [])


def test_hermes_arguments_as_a_json_string():
    text = '<tool_call>{"name": "f", "arguments": "{\\"a\\": 1}"}</tool_call>'
    assert _whole(HermesParser(), text) == (None, [("f", '{"a": 1}')])
    assert _streamed(HermesParser(), text, 4)[1] == [("f", '{"a": 1}')]


def test_hermes_parallel_tool_calls_false_keeps_the_first():
    assert [name for name, _ in _whole(HermesParser(max_calls=1), HERMES)[1]] == ["get_weather"]


@pytest.mark.parametrize("size", [1, 5, 1000])
def test_llama3_json(size):
    text = '<|python_tag|>{"name": "search", "parameters": {"q": "x"}}; {"name": "now", "parameters": {}}'
    expected = [("search", '{"q": "x"}'), ("now", "{}")]
    assert _whole(Llama3JsonParser(), text) == (None, expected)
    assert _streamed(Llama3JsonParser(), text, size)[:2] == ("", expected)
    assert _whole(Llama3JsonParser(), "  Just text.") == ("  Just text.", [])
    assert _streamed(Llama3JsonParser(), "  Just text.", size)[:2] == ("  Just text.", [])


def test_llama3_json_that_is_not_a_call_stays_text():
    text = '{"answer": 42}'
    assert _whole(Llama3JsonParser(), text) == (text, [])
    assert _streamed(Llama3JsonParser(), text, 3)[:2] == (text, [])


@pytest.mark.parametrize("size", [1, 4, 1000])
def test_required_array(size):
    text = '[{"name": "a", "parameters": {"x": 1}}, {"name": "b", "parameters": {"y": [true]}}]'
    expected = [("a", '{"x": 1}'), ("b", '{"y": [true]}')]
    assert _whole(RequiredParser(), text) == (None, expected)
    assert _streamed(RequiredParser(), text, size)[:2] == ("", expected)


@pytest.mark.parametrize("size", [1, 3, 1000])
def test_named_function(size):
    text = '{"city": "Oslo", "unit": "c"}'
    assert _whole(NamedParser("get_weather"), text) == (None, [("get_weather", text)])
    content, calls, order = _streamed(NamedParser("get_weather"), text, size)
    assert (content, calls) == ("", [("get_weather", text)]) and order[0] == ("name", 0)
    assert json.loads(calls[0][1]) == {"city": "Oslo", "unit": "c"}
