"""Architecture name (``architectures`` in config.json) -> model class."""

from __future__ import annotations

from types import MappingProxyType
from typing import Any

from torch import nn

from server.errors import ConfigError
from server.runner.models.llama import LlamaForCausalLM, MistralForCausalLM, head_dim_of, num_kv_heads_of
from server.runner.models.qwen2 import Qwen2ForCausalLM
from server.runner.models.qwen3 import Qwen3ForCausalLM

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


def get_model_class(hf_config: Any) -> type[nn.Module]:
    """The class to build for this config; ConfigError naming the supported ones if there is none."""
    archs = list(getattr(hf_config, "architectures", None) or [])
    if not archs and getattr(hf_config, "model_type", None) in _BY_MODEL_TYPE:
        archs = [_BY_MODEL_TYPE[hf_config.model_type]]
    for arch in archs:
        if arch in MODELS:
            return MODELS[arch]
    named = ", ".join(archs) or f"(none listed; model_type {getattr(hf_config, 'model_type', None)!r})"
    raise ConfigError(f"Unsupported architecture {named}. Supported: {', '.join(MODELS)}")


def kv_cache_shape_info(hf_config: Any) -> tuple[int, int, int]:
    """``(num_layers, num_kv_heads, head_dim)``.

    Each layer's K and V caches are [num_blocks, block_size, num_kv_heads, head_dim].
    """
    return hf_config.num_hidden_layers, num_kv_heads_of(hf_config), head_dim_of(hf_config)
