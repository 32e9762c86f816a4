"""Pydantic schemas of Hugging Face text-generation-inference's REST API: /generate, /generate_stream,
POST / and /info, with TGI's field names and shapes (what huggingface_hub's InferenceClient parses).

Requests are strict in types and unknown fields, as everywhere in this API; TGI's range rules are
checked in `tgi_plan.py` with TGI's own messages. Response models document the wire format in
/openapi.json; the handlers build plain dicts of the same shape.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, Field

from server.api.protocol import ErrorResponse as OpenAIErrorResponse
from server.api.protocol import StrictModel

UINT64_MAX = 2**64 - 1
DEFAULT_MAX_NEW_TOKENS = 100  # TGI >= 2.0 (TGI 0.x and 1.x used 20)


class GenerateParameters(StrictModel):
    """TGI's `parameters`. None (or absent) means TGI's default; see tgi_plan.py for how they map."""

    best_of: int | None = Field(None, description="Only 1 (or null): best-of sampling is not supported.")
    decoder_input_details: bool | None = Field(None, description="Return the prompt tokens with their logprobs.")
    details: bool | None = Field(None, description="Return finish reason, token ids, logprobs and seed.")
    do_sample: bool | None = Field(None, description="Sample; also on when temperature, top_k or top_p is set.")
    frequency_penalty: float | None = Field(None, description="In [-2, 2], on the counts of generated tokens.")
    grammar: dict[str, Any] | None = Field(
        None, description='Structured output: {"type": "json", "value": schema} or {"type": "regex", "value": pattern}.'
    )
    max_new_tokens: int | None = Field(
        DEFAULT_MAX_NEW_TOKENS, description="Default 100 when absent; null: up to the context length."
    )
    repetition_penalty: float | None = Field(None, description="Strictly positive; 1.0 is no penalty.")
    return_full_text: bool | None = Field(None, description="Prepend the inputs to generated_text (default false).")
    seed: int | None = Field(None, ge=0, le=UINT64_MAX, description="Sampling seed; a random one when absent.")
    stop: list[str] | None = Field(None, description="Stop sequences (at most 4); they stay in the text.")
    temperature: float | None = Field(None, description="Strictly positive.")
    top_k: int | None = Field(None, description="Strictly positive.")
    top_n_tokens: int | None = Field(None, description="0 to 5: the most likely tokens at each step.")
    top_p: float | None = Field(None, description="In (0, 1).")
    truncate: int | None = Field(None, description="Keep only the last `truncate` prompt tokens.")
    typical_p: float | None = Field(None, description="Not supported: must be null.")
    watermark: bool | None = Field(None, description="Not supported: must be false or null.")
    adapter_id: str | None = Field(None, description="LoRA adapters are not supported: null or the served model.")
    ignore_eos: bool | None = Field(None, description="An extension of this server: keep going past EOS.")


class GenerateRequest(StrictModel):
    inputs: str
    parameters: GenerateParameters | None = None
    stream: bool | None = Field(False, description="POST / only: stream as /generate_stream does.")


# ---- responses -------------------------------------------------------------------------------

FinishReason = Literal["length", "eos_token", "stop_sequence"]


class PrefillToken(BaseModel):
    id: int
    text: str
    logprob: float | None  # null for the first prompt token


class Token(BaseModel):
    id: int
    text: str
    logprob: float | None
    special: bool


class Details(BaseModel):
    finish_reason: FinishReason
    generated_tokens: int
    seed: int | None  # the sampling seed; null when decoding greedily
    prefill: list[PrefillToken]  # empty unless decoder_input_details
    tokens: list[Token]
    top_tokens: list[list[Token]] | None = Field(None, description="Only when top_n_tokens > 0.")


class GenerateResponse(BaseModel):
    generated_text: str
    details: Details | None = Field(None, description="Only when details or decoder_input_details.")


class StreamDetails(BaseModel):
    finish_reason: FinishReason
    generated_tokens: int
    seed: int | None
    input_length: int


class StreamResponse(BaseModel):
    """One event of /generate_stream: one token; the last one also carries generated_text (and details)."""

    index: int
    token: Token
    top_tokens: list[Token] | None = Field(None, description="Only when top_n_tokens > 0.")
    generated_text: str | None
    details: StreamDetails | None


class Info(BaseModel):
    model_id: str
    model_sha: str | None
    model_dtype: str
    model_device_type: str
    model_pipeline_tag: str | None
    max_concurrent_requests: int
    max_best_of: int
    max_stop_sequences: int
    max_input_tokens: int
    max_total_tokens: int
    validation_workers: int
    max_client_batch_size: int
    router: str
    version: str
    sha: str | None
    docker_label: str | None


class TGIErrorResponse(BaseModel):
    """TGI's error body. `error_type` is one of TGI's kinds (validation, overloaded, generation,
    incomplete_generation) and is absent for errors TGI has no kind for (401, 404, 503...)."""

    error: str
    error_type: str | None = None


ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    **{
        status: {"model": TGIErrorResponse, "description": description}
        for status, description in (
            (400, "Input validation error (error_type: validation)"),
            (401, "Missing or wrong API key"),
            (429, "Queue full (error_type: overloaded): retry after Retry-After seconds"),
            (503, "Engine down or server draining"),
        )
    },
    # The body limit applies before routing, in the envelope of the rest of the API.
    413: {"model": OpenAIErrorResponse, "description": "Request body too large"},
}
