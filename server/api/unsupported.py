"""vLLM's request fields this server knows but refuses, each with the reason a person can act on.

Unknown fields are refused by the schemas ("Unrecognized request argument"); the fields below are
vLLM's own, so a client written for vLLM is told why instead. A field left out, null or empty is
not "set" and passes.
"""

from __future__ import annotations

from server.api.protocol import SamplingRequest
from server.errors import InvalidRequest

_WHY_NOT = {
    "structural_tag": "structural tags are not supported; use response_format, structured_outputs or tools",
    "kv_transfer_params": "disaggregated serving (KV transfer between servers) is not part of this server",
    "mm_processor_kwargs": "this server serves text-only models: there is no multimodal processor to configure",
    "prompt_embeds": "prompts are text or token ids here; embedding inputs are not accepted",
    "logits_processors": (
        "custom logits processors would load and run server-side code by name; "
        "use logit_bias, allowed_token_ids or bad_words instead"
    ),
    "vllm_xargs": "no custom extension is installed to read them",
}
_REPETITION_FIELDS = ("max_repetition_pattern_size", "min_repetition_pattern_size", "repetition_min_count")


def _is_set(value) -> bool:
    return value is not None and not (isinstance(value, (str, list, dict)) and not value)


def refuse_unsupported(body: SamplingRequest) -> None:
    """Raise InvalidRequest naming the first vLLM field in `body` that this server does not serve."""
    for name, why in _WHY_NOT.items():
        if _is_set(getattr(body, name, None)):
            raise InvalidRequest(f"{name} is not supported: {why}.", param=name)
    if body.use_beam_search:
        raise InvalidRequest(
            "use_beam_search is not supported: there is no beam search; this server samples (use n for several samples).",
            param="use_beam_search",
        )
    for name in _REPETITION_FIELDS:
        if getattr(body, name):
            raise InvalidRequest(f"{name} is not supported yet: there is no repetition detection; leave it at 0.", param=name)
