"""Qwen2: the Llama decoder with biases on the q/k/v projections (not on o_proj)."""

from __future__ import annotations

from typing import Any

from server.runner.models.llama import DecoderOptions, LlamaForCausalLM


class Qwen2ForCausalLM(LlamaForCausalLM):
    @classmethod
    def decoder_options(cls, hf_config: Any) -> DecoderOptions:
        return DecoderOptions(qkv_bias=True)
