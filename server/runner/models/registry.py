"""Architecture name (``architectures`` in config.json) -> model class: our native one where there is
one, else (``--model-impl auto`` or ``transformers``) transformers' own modeling code on our paged KV
cache (`transformers_backend.TransformersForCausalLM`)."""

from __future__ import annotations

from types import MappingProxyType
from typing import Any

from torch import nn

from server.errors import ConfigError
from server.runner.models.llama import LlamaForCausalLM, MistralForCausalLM, head_dim_of, num_kv_heads_of
from server.runner.models.qwen2 import Qwen2ForCausalLM
from server.runner.models.qwen3 import Qwen3ForCausalLM
from server.runner.models.transformers_backend import TransformersForCausalLM, check_supported

MODELS: MappingProxyType[str, type[nn.Module]] = MappingProxyType(
    {
        "LlamaForCausalLM": LlamaForCausalLM,
        "MistralForCausalLM": MistralForCausalLM,
        "Qwen2ForCausalLM": Qwen2ForCausalLM,
        "Qwen3ForCausalLM": Qwen3ForCausalLM,
    }
)

# Used only when config.json names no architecture.
_BY_MODEL_TYPE = MappingProxyType(
    {
        "llama": "LlamaForCausalLM",
        "mistral": "MistralForCausalLM",
        "qwen2": "Qwen2ForCausalLM",
        "qwen3": "Qwen3ForCausalLM",
    }
)


def supported_architectures() -> tuple[str, ...]:
    return tuple(MODELS)


def _native_class(hf_config: Any) -> tuple[list[str], type[nn.Module] | None]:
    archs = list(getattr(hf_config, "architectures", None) or [])
    if not archs and getattr(hf_config, "model_type", None) in _BY_MODEL_TYPE:
        archs = [_BY_MODEL_TYPE[hf_config.model_type]]
    return archs, next((MODELS[arch] for arch in archs if arch in MODELS), None)


def get_model_class(hf_config: Any, model_impl: str = "auto") -> type[nn.Module]:
    """The class to build for this config under ``--model-impl`` (auto: native if we have one, else
    transformers; native: ours or a ConfigError; transformers: always transformers' modeling code).
    A ConfigError says why when neither can run it."""
    archs, native = _native_class(hf_config)
    named = ", ".join(archs) or f"(none listed; model_type {getattr(hf_config, 'model_type', None)!r})"
    if model_impl == "native":
        if native is None:
            raise ConfigError(
                f"Unsupported architecture {named} with --model-impl native: no native implementation (native: "
                f"{', '.join(MODELS)}); --model-impl auto or transformers runs it through transformers' modeling code."
            )
        return native
    if native is not None and model_impl == "auto":
        return native
    try:
        check_supported(hf_config)
    except ConfigError as exc:
        raise ConfigError(f"Unsupported architecture {named}. Native: {', '.join(MODELS)}. Transformers backend: {exc}") from None
    return TransformersForCausalLM


def kv_cache_shape_info(hf_config: Any) -> tuple[int, int, int]:
    """``(num_layers, num_kv_heads, head_dim)``.

    Each layer's K and V caches are [num_blocks, block_size, num_kv_heads, head_dim]. Read through the
    config's standard names, which its ``attribute_map`` translates (GPT-2's n_layer, n_head, n_embd).
    """
    return hf_config.num_hidden_layers, num_kv_heads_of(hf_config), head_dim_of(hf_config)
