"""Request -> SamplingParams, shared by both endpoints.

A field the request leaves unset takes the checkpoint's generation_config.json default
(`sampling_defaults`), then SamplingParams' own. SamplingParams.validate() has the last word on
ranges and raises InvalidRequest naming the parameter.
"""

from __future__ import annotations

from dataclasses import dataclass

from server.api.protocol import SamplingRequest
from server.api.state import ModelInfo
from server.errors import InvalidRequest
from server.request import SamplingParams
from server.structured.spec import GrammarSpec

# Fields that fall back to generation_config.json when the request leaves them unset.
_MODEL_DEFAULTED = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty")
# Fields passed through as given, when given.
_PLAIN = (
    "n",
    "seed",
    "presence_penalty",
    "frequency_penalty",
    "min_tokens",
    "ignore_eos",
    "include_stop_str_in_output",
    "skip_special_tokens",
    "spaces_between_special_tokens",
    "priority",
    "cache_salt",
)


def build_sampling_params(
    request: SamplingRequest,
    model: ModelInfo,
    *,
    max_tokens: int | None,
    logprobs: int | None,
    prompt_logprobs: int | None = None,
    structured: GrammarSpec | None = None,
) -> SamplingParams:
    values: dict = {"max_tokens": max_tokens, "logprobs": logprobs, "prompt_logprobs": prompt_logprobs, "structured": structured}
    for name in _MODEL_DEFAULTED:
        value = getattr(request, name)
        if value is None:
            value = model.sampling_defaults.get(name)
        if value is not None:
            values[name] = value
    for name in _PLAIN:
        value = getattr(request, name)
        if value is not None:
            values[name] = value
    if request.stop is not None:
        values["stop"] = [request.stop] if isinstance(request.stop, str) else list(request.stop)
    if request.stop_token_ids:
        values["stop_token_ids"] = list(request.stop_token_ids)
    if request.logit_bias:
        values["logit_bias"] = _logit_bias(request.logit_bias, model.vocab_size)
    if request.allowed_token_ids is not None:
        bad = next((t for t in request.allowed_token_ids if t >= model.vocab_size), None)
        if bad is not None:
            raise InvalidRequest(
                f"allowed_token_ids has token id {bad}, out of range for a vocabulary of {model.vocab_size} tokens.",
                param="allowed_token_ids",
            )
        values["allowed_token_ids"] = list(request.allowed_token_ids)
    if request.bad_words:
        values["bad_words_token_ids"] = bad_words_token_ids(request.bad_words, model)
    top_k = values.get("top_k")
    if top_k is not None and top_k >= model.vocab_size:
        values["top_k"] = 0  # keeps every token anyway
    return SamplingParams(**values)


def _logit_bias(bias: dict[str, float], vocab_size: int) -> dict[int, float]:
    out: dict[int, float] = {}
    for key, value in bias.items():
        try:
            token = int(key)
        except ValueError:
            raise InvalidRequest(f"logit_bias keys must be token ids, got {key!r}.", param="logit_bias") from None
        if not 0 <= token < vocab_size:
            raise InvalidRequest(
                f"logit_bias token id {token} is out of range for a vocabulary of {vocab_size} tokens.", param="logit_bias"
            )
        out[token] = value
    return out


def bad_words_token_ids(words: list[str], model: ModelInfo) -> list[list[int]]:
    """Each word as token ids, as vLLM reads `bad_words`: the word without its leading spaces, and
    also with one leading space when that gives other tokens of the same count (how the word is
    spelled mid-sentence)."""
    out: list[list[int]] = []
    for word in words:
        word = word.lstrip()
        if not word:
            raise InvalidRequest("bad_words must not be empty or only spaces.", param="bad_words")
        plain = list(model.tokenizer.encode(word, add_special_tokens=False))
        spaced = list(model.tokenizer.encode(" " + word, add_special_tokens=False))
        forms = [plain]
        if spaced and plain and spaced[0] != plain[0] and len(spaced) == len(plain):
            forms.append(spaced)
        for ids in forms:
            if not ids or any(t >= model.vocab_size for t in ids):
                raise InvalidRequest(f"bad_words: {word!r} has no tokens in the model's vocabulary.", param="bad_words")
            out.append(ids)
    return out


@dataclass(frozen=True)
class StreamUsage:
    """What a stream says about usage: a final usage chunk, and usage on every chunk (vLLM's)."""

    final: bool = False
    continuous: bool = False


def stream_usage(request: SamplingRequest) -> StreamUsage:
    """stream_options read as vLLM reads them: continuous_usage_stats only counts with include_usage.
    stream_options without stream is refused, as OpenAI does."""
    options = request.stream_options
    if options is not None and not request.stream:
        raise InvalidRequest("The 'stream_options' parameter is only allowed when 'stream' is enabled.", param="stream_options")
    final = bool(options and options.include_usage)
    return StreamUsage(final=final, continuous=final and bool(options.continuous_usage_stats))
