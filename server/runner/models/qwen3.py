"""Qwen3: the Llama decoder with a per-head RMSNorm of q and k before rotary.

The head dim comes from ``head_dim`` in the config (it need not be hidden_size / num_heads) and
``attention_bias`` puts biases on all four attention projections.
"""

from __future__ import annotations

from typing import Any

from server.runner.models.llama import DecoderOptions, LlamaForCausalLM


class Qwen3ForCausalLM(LlamaForCausalLM):
    @classmethod
    def decoder_options(cls, hf_config: Any) -> DecoderOptions:
        attention_bias = bool(getattr(hf_config, "attention_bias", False))
        return DecoderOptions(qkv_bias=attention_bias, o_bias=attention_bias, qk_norm=True)
