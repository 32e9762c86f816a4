"""The official `openai` SDK against a real server: sync and async, streaming and not, n, logprobs, usage."""

from __future__ import annotations

import asyncio

import openai
import pytest

MAX_TOKENS = 8


@pytest.fixture(scope="module")
def sync_client(api_server):
    with openai.OpenAI(base_url=f"{api_server.base_url}/v1", api_key=api_server.api_key, max_retries=0) as client:
        yield client


@pytest.fixture()
def model(api_server) -> str:
    return api_server.model_name


def test_models(sync_client, model):
    models = sync_client.models.list()
    assert [m.id for m in models.data] == [model]
    assert sync_client.models.retrieve(model).owned_by == "pagedserve"


def test_completion(sync_client, model):
    out = sync_client.completions.create(model=model, prompt="Once upon a time", max_tokens=MAX_TOKENS, temperature=0)
    assert out.object == "text_completion" and out.model == model
    assert len(out.choices) == 1 and out.choices[0].finish_reason in ("stop", "length")
    assert out.usage.completion_tokens <= MAX_TOKENS
    assert out.usage.total_tokens == out.usage.prompt_tokens + out.usage.completion_tokens


def test_completion_stream_equals_non_stream(sync_client, model):
    kwargs = dict(model=model, prompt="The sky is", max_tokens=MAX_TOKENS, temperature=0)
    whole = sync_client.completions.create(**kwargs).choices[0].text
    chunks = list(sync_client.completions.create(stream=True, stream_options={"include_usage": True}, **kwargs))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == whole
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens > 0
    assert all(c.usage is None for c in chunks[:-1])
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] in ("stop", "length")


def test_completion_n_and_logprobs(sync_client, model):
    out = sync_client.completions.create(
        model=model, prompt=["a b c", "x y"], n=2, max_tokens=4, temperature=0, logprobs=3
    )
    assert [c.index for c in out.choices] == [0, 1, 2, 3]
    assert out.choices[0].text == out.choices[1].text  # n greedy choices are identical
    for choice in out.choices:
        lp = choice.logprobs
        assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset)
        assert all(3 <= len(top) <= 4 for top in lp.top_logprobs)
        assert lp.text_offset == sorted(lp.text_offset)


def test_completion_echo_logprobs(sync_client, model):
    """How lm-eval scores: token-id prompt, echo, max_tokens 1, logprobs 1."""
    prompt = [42, 590, 81, 899, 370]
    out = sync_client.completions.create(model=model, prompt=prompt, max_tokens=1, temperature=0, echo=True, logprobs=1)
    lp = out.choices[0].logprobs
    assert len(lp.token_logprobs) == len(prompt) + 1
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    assert all(isinstance(v, float) and v <= 0 for v in lp.token_logprobs[1:])
    # the generated (greedy) token is the most likely one
    assert lp.token_logprobs[-1] == pytest.approx(max(lp.top_logprobs[-1].values()))
    assert out.usage.prompt_tokens == len(prompt) and out.usage.completion_tokens == 1


def test_chat(sync_client, model):
    out = sync_client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": "Hi"}], max_tokens=MAX_TOKENS, temperature=0
    )
    message = out.choices[0].message
    assert out.object == "chat.completion" and message.role == "assistant" and message.refusal is None
    assert isinstance(message.content, str)
    assert out.choices[0].logprobs is None


def test_chat_stream_n_logprobs(sync_client, model):
    kwargs = dict(model=model, messages=[{"role": "user", "content": "Tell me"}], max_tokens=MAX_TOKENS, temperature=0)
    whole = sync_client.chat.completions.create(n=2, logprobs=True, top_logprobs=2, **kwargs)
    assert len(whole.choices) == 2 and whole.choices[0].message.content == whole.choices[1].message.content
    content = whole.choices[0].logprobs.content
    assert len(content) == whole.usage.completion_tokens // 2
    assert all(len(t.top_logprobs) == 2 and t.bytes is not None for t in content)

    texts = {0: "", 1: ""}
    roles = set()
    finishes = {}
    stream = sync_client.chat.completions.create(n=2, stream=True, stream_options={"include_usage": True}, **kwargs)
    for chunk in stream:
        if not chunk.choices:
            assert chunk.usage.completion_tokens == whole.usage.completion_tokens
            continue
        choice = chunk.choices[0]
        if choice.delta.role:
            roles.add(choice.index)
        texts[choice.index] += choice.delta.content or ""
        if choice.finish_reason:
            finishes[choice.index] = choice.finish_reason
    assert roles == {0, 1} and set(finishes) == {0, 1}
    assert texts[0] == texts[1] == whole.choices[0].message.content


def test_errors_raise_typed_exceptions(sync_client, model):
    with pytest.raises(openai.NotFoundError):
        sync_client.completions.create(model="no-such-model", prompt="x", max_tokens=1)
    with pytest.raises(openai.BadRequestError) as info:
        sync_client.completions.create(model=model, prompt="x", max_tokens=1, temperature=-1)
    assert info.value.body["param"] == "temperature"
    with pytest.raises(openai.BadRequestError):
        sync_client.completions.create(model=model, prompt="x", max_tokens=600)


def test_bad_key(api_server, model):
    client = openai.OpenAI(base_url=f"{api_server.base_url}/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        client.models.list()


async def test_async_client(api_server, model):
    client = openai.AsyncOpenAI(base_url=f"{api_server.base_url}/v1", api_key=api_server.api_key, max_retries=0)
    async with client:
        prompts = [f"Number {i}:" for i in range(4)]
        outs = await asyncio.gather(
            *(client.completions.create(model=model, prompt=p, max_tokens=MAX_TOKENS, temperature=0) for p in prompts)
        )
        assert all(o.choices[0].finish_reason for o in outs)

        stream = await client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": "Hello"}], max_tokens=MAX_TOKENS, temperature=0, stream=True
        )
        text = "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])
        whole = await client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": "Hello"}], max_tokens=MAX_TOKENS, temperature=0
        )
        assert text == whole.choices[0].message.content
