"""Request input -> prompt token ids: completion prompts as given, chat messages through the template."""

from __future__ import annotations

import json
from dataclasses import dataclass

from server.api.protocol import ChatMessage, Tool
from server.api.state import ModelInfo
from server.errors import InvalidRequest

_RESERVED_TEMPLATE_KWARGS = {
    "conversation", "messages", "tools", "documents", "chat_template", "add_generation_prompt",
    "continue_final_message", "tokenize", "padding", "truncation", "max_length", "return_tensors",
    "return_dict", "return_assistant_tokens_mask", "tokenizer_kwargs",
}


@dataclass
class Prompt:
    token_ids: list[int]
    text: str | None  # the prompt as given, when it was text (echo shows it as is)


def truncate_prompt(ids: list[int], keep: int | None, max_model_len: int) -> list[int]:
    """vLLM's truncate_prompt_tokens: the last `keep` tokens (-1: the model's context length)."""
    if keep is None:
        return ids
    if keep == -1:
        keep = max_model_len
    if keep == 0:
        raise InvalidRequest(
            "truncate_prompt_tokens must be -1 (the model's context length) or at least 1.", param="truncate_prompt_tokens"
        )
    if keep > max_model_len:
        raise InvalidRequest(
            f"truncate_prompt_tokens ({keep}) is greater than the model's context length ({max_model_len}): "
            "please ask for a smaller truncation size.",
            param="truncate_prompt_tokens",
        )
    return ids[-keep:]


def completion_prompts(prompt, model: ModelInfo, add_special_tokens: bool = True, truncate: int | None = None) -> list[Prompt]:
    """Text, texts, token ids or token-id lists (used exactly, no BOS added); null: a new document.

    Text is tokenized with the tokenizer's special tokens unless `add_special_tokens` is False; every
    prompt keeps only its last `truncate` tokens when given (then echo shows the tokens kept)."""
    out = [_completion_prompt(item, model, add_special_tokens) for item in _prompt_items(prompt, model)]
    if truncate is not None:
        for p in out:
            kept = truncate_prompt(p.token_ids, truncate, model.max_model_len)
            if len(kept) < len(p.token_ids):
                p.token_ids, p.text = kept, None
    return out


def _prompt_items(prompt, model: ModelInfo) -> list:
    if prompt is None:
        return [[model.start_token_id]]
    if isinstance(prompt, str):
        prompt = [prompt]
    elif prompt and isinstance(prompt[0], int):
        prompt = [prompt]
    if not prompt:
        raise InvalidRequest("prompt must not be an empty list.", param="prompt")
    return prompt


def _completion_prompt(item, model: ModelInfo, add_special_tokens: bool) -> Prompt:
    if isinstance(item, str):
        ids = model.tokenizer.encode(item, add_special_tokens=add_special_tokens) if item else []
        return Prompt(list(ids) or [model.start_token_id], item)
    if not item:
        raise InvalidRequest("A token-id prompt must not be empty.", param="prompt")
    bad = next((t for t in item if t >= model.vocab_size), None)
    if bad is not None:
        raise InvalidRequest(f"Token id {bad} is out of range for a vocabulary of {model.vocab_size} tokens.", param="prompt")
    return Prompt(list(item), None)


def message_dicts(messages: list[ChatMessage]) -> list[dict]:
    """Messages as the chat template expects them; text parts are joined into one string."""
    out = []
    for i, message in enumerate(messages):
        entry: dict = {"role": "system" if message.role == "developer" else message.role}
        content = message.content
        if isinstance(content, list):
            texts = []
            for j, part in enumerate(content):
                if part.type != "text":
                    raise InvalidRequest(
                        f"Content part type {part.type!r} is not supported: this model takes text only "
                        f"(parts of type 'text').",
                        param=f"messages[{i}].content[{j}].type",
                    )
                if part.text is None:
                    raise InvalidRequest("A text content part needs a 'text' string.", param=f"messages[{i}].content[{j}].text")
                texts.append(part.text)
            content = "\n".join(texts)
        if content is None and not (message.role == "assistant" and message.tool_calls):
            raise InvalidRequest(f"Message {i} ({message.role}) has no content.", param=f"messages[{i}].content")
        entry["content"] = content if content is not None else ""
        if message.name is not None:
            entry["name"] = message.name
        if message.tool_call_id is not None:
            entry["tool_call_id"] = message.tool_call_id
        if message.tool_calls:
            entry["tool_calls"] = [_template_call(call.model_dump(exclude_none=True)) for call in message.tool_calls]
        out.append(entry)
    return out


def _template_call(call: dict) -> dict:
    """Arguments sent back as JSON text (as OpenAI returns them) become an object, as vLLM hands them to
    templates: templates write them with `| tojson`, which would quote the text a second time."""
    arguments = call["function"].get("arguments")
    if isinstance(arguments, str):
        try:
            parsed = json.loads(arguments)
        except ValueError:
            parsed = None
        if isinstance(parsed, dict):
            call["function"]["arguments"] = parsed
    return call


def chat_prompt(
    model: ModelInfo,
    messages: list[ChatMessage],
    *,
    add_generation_prompt: bool,
    continue_final_message: bool,
    tools: list[Tool] | None = None,
    template_kwargs: dict | None = None,
    template: str | None = None,
    documents: list[dict[str, str]] | None = None,
) -> str:
    """The conversation rendered by `template`, else the model's chat template (--chat-template overrides it).

    `documents` (RAG) and `template_kwargs` are visible to the template; templates that ignore them
    render as without them."""
    tokenizer = model.tokenizer
    if not template and not getattr(tokenizer, "chat_template", None):
        raise InvalidRequest(
            "This model has no chat template: start the server with --chat-template FILE, or send chat_template.",
            param="messages",
        )
    kwargs = dict(template_kwargs or {})
    reserved = sorted(set(kwargs) & _RESERVED_TEMPLATE_KWARGS)
    if reserved:
        raise InvalidRequest(f"chat_template_kwargs must not set {', '.join(reserved)}.", param="chat_template_kwargs")
    if template:
        kwargs["chat_template"] = template
    if documents:
        kwargs["documents"] = documents
    if continue_final_message and messages[-1].role != "assistant":
        raise InvalidRequest(
            "continue_final_message needs the last message to be the assistant's.", param="continue_final_message"
        )
    conversation = message_dicts(messages)
    try:
        return tokenizer.apply_chat_template(
            conversation,
            tools=[tool.model_dump(exclude_none=True) for tool in tools] if tools else None,
            add_generation_prompt=add_generation_prompt and not continue_final_message,
            continue_final_message=continue_final_message,
            tokenize=False,
            **kwargs,
        )
    except Exception as exc:  # jinja2 TemplateError, raise_exception() in the template, ValueError
        raise InvalidRequest(f"The chat template could not render these messages: {exc}", param="messages") from exc


def render_chat(model: ModelInfo, body, *, trust_request_template: bool) -> str:
    """`chat_prompt` with the template options of a request body (chat completions or /tokenize).

    A template sent in the request is refused unless the server trusts them
    (--trust-request-chat-template), as vLLM does: it is code that runs on the API process."""
    template = getattr(body, "chat_template", None)
    if template is not None and not trust_request_template:
        raise InvalidRequest(
            "chat_template in a request is refused: the server must be started with --trust-request-chat-template.",
            param="chat_template",
        )
    kwargs = dict(body.chat_template_kwargs or {})
    reasoning_effort = getattr(body, "reasoning_effort", None)
    if reasoning_effort is not None:
        kwargs["reasoning_effort"] = reasoning_effort  # as vLLM passes it: templates that know it use it
    return chat_prompt(
        model,
        body.messages,
        add_generation_prompt=body.add_generation_prompt is not False,
        continue_final_message=bool(body.continue_final_message),
        tools=body.tools,
        template_kwargs=kwargs,
        template=template,
        documents=getattr(body, "documents", None),
    )


def encode_chat(model: ModelInfo, text: str, add_special_tokens: bool = False) -> list[int]:
    """A rendered conversation -> token ids. The template wrote the special tokens already, so none are
    added unless asked (vLLM's add_special_tokens, for templates that leave out BOS)."""
    return list(model.tokenizer.encode(text, add_special_tokens=add_special_tokens))
