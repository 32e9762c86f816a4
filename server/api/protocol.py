"""Pydantic schemas of the OpenAI API (plus vLLM's request fields): requests and responses.

Requests are strict: wrong JSON types and unknown fields are refused (400), never coerced, and
non-finite numbers are refused. vLLM's own fields are known: most are implemented, the rest are
declared so that `server/api/unsupported.py` can refuse them with a reason instead of "unknown". Response models document the wire format in /openapi.json; the
handlers build them and `dump` them, so that null fields OpenAI sends as null stay null.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from server.api.unicode_text import refuse_lone_surrogates

INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
TokenId = Annotated[int, Field(ge=0, le=INT64_MAX)]


class StrictModel(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)

    @model_validator(mode="before")
    @classmethod
    def _valid_unicode(cls, data: Any) -> Any:
        """No lone UTF-16 surrogate anywhere inside (nested messages, keys, kwargs...): 400 naming where."""
        return refuse_lone_surrogates(data)


class StreamOptions(StrictModel):
    include_usage: bool | None = False
    continuous_usage_stats: bool | None = Field(False, description="vLLM's: usage so far on every chunk (with include_usage).")
    include_obfuscation: bool | None = None  # accepted, nothing to obfuscate


_NO_MEANING = "Refused: see the README's vLLM request fields."


class StructuredOutputsParams(StrictModel):
    """vLLM's `structured_outputs`: exactly one of json, regex, choice, grammar, json_object."""

    json_: dict[str, Any] | str | None = Field(None, alias="json", description="A JSON schema (object or JSON text).")
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = Field(None, description="An EBNF grammar (xgrammar's dialect, as GBNF: root ::= ...).")
    json_object: bool | None = None
    disable_any_whitespace: bool | None = Field(
        None, description="true: fixed JSON separators; false: any whitespace; unset: the server's default (fixed)."
    )
    whitespace_pattern: str | None = Field(None, description="Refused: the grammar engine takes no whitespace pattern.")
    structural_tag: Any = Field(None, description="Refused: structural tags are not supported.")


class JsonSchemaFormat(StrictModel):
    name: str = Field(max_length=64)
    description: str | None = None
    schema_: dict[str, Any] | None = Field(None, alias="schema")
    strict: bool | None = None


class ResponseFormat(StrictModel):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


class SamplingRequest(StrictModel):
    """Fields shared by /v1/completions and /v1/chat/completions. None means "not given"."""

    model: str | None = Field(None, description="A served model name; the first one when left out.")
    n: int = Field(1, ge=1, le=128)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=INT64_MIN, le=INT64_MAX)
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    logit_bias: dict[str, Annotated[float, Field(ge=-100, le=100)]] | None = None
    user: str | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    # vLLM's extras
    top_k: int | None = Field(None, ge=-1, le=INT64_MAX)
    min_p: float | None = Field(None, ge=0, le=1)
    repetition_penalty: float | None = Field(None, gt=0, le=1e6)
    min_tokens: int | None = Field(None, ge=0, le=INT64_MAX)
    ignore_eos: bool | None = None
    stop_token_ids: list[TokenId] | None = None
    include_stop_str_in_output: bool | None = None
    skip_special_tokens: bool | None = None
    spaces_between_special_tokens: bool | None = None
    truncate_prompt_tokens: int | None = Field(
        None, ge=-1, le=INT64_MAX, description="Keep only the last k prompt tokens; -1: the model's context length."
    )
    prompt_logprobs: int | None = Field(None, ge=0, le=20, description="Top-N logprobs of every prompt token.")
    allowed_token_ids: list[TokenId] | None = Field(None, description="Sample only among these token ids.")
    bad_words: list[str] | None = Field(None, description="Words that must not be generated.")
    priority: int = Field(0, ge=INT64_MIN, le=INT64_MAX, description="Lower runs first (--scheduling-policy priority).")
    request_id: str | None = Field(None, min_length=1, max_length=256, description="The response id and engine request id.")
    cache_salt: str | None = Field(None, description="Prefix-cache isolation: only requests with the same salt share.")
    return_tokens_as_token_ids: bool | None = Field(None, description="Logprob tokens as 'token_id:N'.")
    return_token_ids: bool | None = Field(None, description="Add prompt_token_ids and token_ids to the response.")
    use_beam_search: bool | None = Field(False, description="Refused when true: no beam search.")
    length_penalty: float | None = Field(1.0, description="Beam search only; ignored without it, as vLLM does.")
    response_format: ResponseFormat | None = None
    structured_outputs: StructuredOutputsParams | None = Field(None, description="vLLM's structured outputs.")
    guided_json: dict[str, Any] | str | None = Field(None, description="Older name of structured_outputs.json.")
    guided_regex: str | None = Field(None, description="Older name of structured_outputs.regex.")
    guided_choice: list[str] | None = Field(None, description="Older name of structured_outputs.choice.")
    guided_grammar: str | None = Field(None, description="Older name of structured_outputs.grammar.")
    guided_decoding_backend: str | None = Field(None, description="Only xgrammar (or auto): the one grammar engine here.")
    guided_whitespace_pattern: str | None = Field(None, description="Refused: the grammar engine takes no whitespace pattern.")
    # vLLM's fields this server refuses when set (server/api/unsupported.py says why)
    structural_tag: Any = Field(None, description="Refused: structural tags are not supported.")
    kv_transfer_params: Any = Field(None, description=_NO_MEANING)
    mm_processor_kwargs: Any = Field(None, description=_NO_MEANING)
    logits_processors: Any = Field(None, description=_NO_MEANING)
    vllm_xargs: Any = Field(None, description=_NO_MEANING)
    max_repetition_pattern_size: int | None = Field(0, description="Refused when not 0: no repetition detection yet.")
    min_repetition_pattern_size: int | None = Field(0, description="Refused when not 0: no repetition detection yet.")
    repetition_min_count: int | None = Field(0, description="Refused when not 0: no repetition detection yet.")


PromptInput = str | list[str] | list[TokenId] | list[list[TokenId]]


class CompletionRequest(SamplingRequest):
    prompt: PromptInput | None = Field(
        None, description="Text, texts, token ids or lists of token ids; null starts a new document."
    )
    max_tokens: int | None = Field(16, ge=0, le=INT64_MAX, description="0 only with echo: score the prompt.")
    logprobs: int | None = Field(None, ge=0, le=20)
    echo: bool | None = False
    best_of: int | None = Field(None, ge=1, le=128, description="Only equal to n is supported.")
    suffix: str | None = Field(None, description="Not supported: must be empty.")
    # vLLM's extras
    add_special_tokens: bool | None = Field(True, description="Add the tokenizer's special tokens (BOS) to text prompts.")
    prompt_embeds: Any = Field(None, description=_NO_MEANING)


class ContentPart(BaseModel):
    """One part of a message's content; only type "text" is supported (others are refused with 400)."""

    model_config = ConfigDict(extra="allow", strict=True)
    type: str
    text: str | None = None


class FunctionCall(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)
    name: str
    arguments: str | dict[str, Any] | None = None


class ToolCall(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)
    id: str | None = None
    type: str | None = "function"
    function: FunctionCall


class ChatMessage(BaseModel):
    # A message sent back from an earlier response carries fields we ignore (audio, annotations...).
    model_config = ConfigDict(extra="ignore", strict=True)
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = None
    tool_call_id: str | None = None


class FunctionDefinition(StrictModel):
    name: str
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class Tool(StrictModel):
    type: Literal["function"]
    function: FunctionDefinition


class NamedToolChoice(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)
    type: str
    function: dict[str, Any] | None = None


class ChatCompletionRequest(SamplingRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1, le=INT64_MAX, description="Deprecated by OpenAI: max_completion_tokens.")
    max_completion_tokens: int | None = Field(None, ge=1, le=INT64_MAX)
    logprobs: bool | None = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    tools: list[Tool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None
    store: bool | None = None  # accepted and ignored: nothing is stored
    metadata: dict[str, str] | None = None  # accepted and ignored
    service_tier: str | None = None  # accepted and ignored
    reasoning_effort: Literal["none", "minimal", "low", "medium", "high"] | None = Field(
        None, description="Passed to the chat template (templates that know it use it)."
    )
    # vLLM's extras
    include_reasoning: bool | None = Field(True, description="Accepted: no reasoning parser splits the reply.")
    echo: bool | None = False
    add_generation_prompt: bool | None = True
    continue_final_message: bool | None = False
    add_special_tokens: bool | None = Field(False, description="Add the tokenizer's special tokens on top of the template's.")
    documents: list[dict[str, str]] | None = Field(None, description="Passed to the chat template (RAG templates).")
    chat_template: str | None = Field(None, description="A Jinja chat template for this request only.")
    chat_template_kwargs: dict[str, Any] | None = None


class TokenizeRequest(StrictModel):
    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool | None = None  # default: True for a prompt, False for messages
    add_generation_prompt: bool | None = True
    continue_final_message: bool | None = False
    chat_template: str | None = Field(None, description="A Jinja chat template for this request only.")
    chat_template_kwargs: dict[str, Any] | None = None
    tools: list[Tool] | None = None


class DetokenizeRequest(StrictModel):
    model: str | None = None
    tokens: list[TokenId]


# ---- responses -------------------------------------------------------------------------------


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class CompletionLogprobs(BaseModel):
    tokens: list[str]
    token_logprobs: list[float | None]
    top_logprobs: list[dict[str, float] | None]
    text_offset: list[int]


class PromptLogprob(BaseModel):
    """vLLM's shape of one entry of `prompt_logprobs` (keyed by token id)."""

    logprob: float
    rank: int | None
    decoded_token: str


PromptLogprobs = list[dict[str, PromptLogprob] | None]
# vLLM's response fields that are only present when the request asked for them
OPTIONAL_EXTRAS = ("prompt_logprobs", "prompt_token_ids", "token_ids")


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None
    finish_reason: Literal["stop", "length", "abort"] | None
    prompt_logprobs: PromptLogprobs | None = Field(None, description="With prompt_logprobs (or echo and logprobs).")
    prompt_token_ids: list[int] | None = Field(None, description="With return_token_ids.")
    token_ids: list[int] | None = Field(None, description="With return_token_ids.")


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None


class ChatTokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChatLogprobs(BaseModel):
    content: list[ChatTokenLogprob] | None


class FunctionCallOut(BaseModel):
    name: str
    arguments: str = Field(description="The arguments as JSON text, as the model wrote them.")


class ToolCallOut(BaseModel):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCallOut


class ChatResponseMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None
    refusal: str | None = None
    tool_calls: list[ToolCallOut] = Field(default_factory=list, description="Calls read out of the reply (tools).")


ChatFinishReason = Literal["stop", "length", "abort", "tool_calls"]


class ChatChoice(BaseModel):
    index: int
    message: ChatResponseMessage
    logprobs: ChatLogprobs | None
    finish_reason: ChatFinishReason | None
    token_ids: list[int] | None = Field(None, description="With return_token_ids.")


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage
    prompt_logprobs: PromptLogprobs | None = Field(None, description="With prompt_logprobs.")
    prompt_token_ids: list[int] | None = Field(None, description="With return_token_ids.")


class ChatChunkChoice(BaseModel):
    index: int
    delta: dict[str, Any] = Field(description="role, content, and tool_calls (index, id, type, function name/arguments).")
    logprobs: ChatLogprobs | None = None
    finish_reason: ChatFinishReason | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "pagedserve"
    root: str
    parent: str | None = None
    max_model_len: int


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class TokenizeResponse(BaseModel):
    count: int
    max_model_len: int
    tokens: list[int]


class DetokenizeResponse(BaseModel):
    prompt: str


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None
    code: int | str | None


class ErrorResponse(BaseModel):
    error: ErrorDetail


ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorResponse, "description": description}
    for status, description in (
        (400, "Invalid request"),
        (401, "Missing or wrong API key"),
        (404, "Unknown model"),
        (413, "Request body too large"),
        (429, "Queue full: retry after Retry-After seconds"),
        (503, "Engine down or server draining"),
    )
}


def dump(model: BaseModel, *, exclude: set[str] | None = None) -> dict:
    return model.model_dump(mode="json", exclude=exclude)


def dump_response(model: BaseModel) -> dict:
    """`dump` without the OPTIONAL_EXTRAS the request did not ask for (None), at the top and per choice."""
    out = dump(model)
    for entry in (out, *out.get("choices", ())):
        for key in OPTIONAL_EXTRAS:
            if key in entry and entry[key] is None:
                del entry[key]
    return out
