"""The Llama decoder family: Llama and Mistral here; Qwen2 and Qwen3 reuse it with a few options.

Q/K/V and gate/up are fused into one matmul each; ``packed_modules`` maps the HF projection names onto
those fused parameters for the loader. Parameter names otherwise match the HF checkpoints.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

import torch
from torch import nn

from kernels.metadata import AttentionMetadata
from kernels.ops import Ops
from server.errors import ConfigError
from server.runner.layers.attention import Attention
from server.runner.layers.embedding import LMHead, VocabEmbedding
from server.runner.layers.linear import MergedLinear, RowLinear
from server.runner.layers.norm import RMSNorm
from server.runner.layers.rotary import RotaryEmbedding

KVCache = tuple[torch.Tensor, torch.Tensor]
RopeTables = tuple[torch.Tensor, torch.Tensor]  # the step's (cos, sin) from RotaryEmbedding.tables


def head_dim_of(hf_config: Any) -> int:
    return getattr(hf_config, "head_dim", None) or hf_config.hidden_size // hf_config.num_attention_heads


def num_kv_heads_of(hf_config: Any) -> int:
    return getattr(hf_config, "num_key_value_heads", None) or hf_config.num_attention_heads


def sliding_window_of(hf_config: Any, layer_idx: int) -> int | None:
    """The attention window of one layer: None (full attention) unless the config sets a window.

    With ``layer_types`` (Qwen2/Qwen3) only layers marked ``sliding_attention`` use it; without
    (Mistral) every layer does.
    """
    window = getattr(hf_config, "sliding_window", None)
    layer_types = getattr(hf_config, "layer_types", None)
    if window is None or layer_types is None:
        return window
    return window if layer_types[layer_idx] == "sliding_attention" else None


@dataclass(frozen=True)
class DecoderOptions:
    """Where the members of the family differ."""

    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False  # per-head RMSNorm of q and k before rotary (Qwen3)


class LlamaAttention(nn.Module):
    def __init__(
        self, hf_config: Any, layer_idx: int, opts: DecoderOptions, rotary_emb: RotaryEmbedding, ops: Ops
    ):
        super().__init__()
        hidden = hf_config.hidden_size
        self.num_heads = hf_config.num_attention_heads
        self.num_kv_heads = num_kv_heads_of(hf_config)
        self.head_dim = head_dim_of(hf_config)
        q_size, kv_size = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        self.qkv_proj = MergedLinear(hidden, [("q", q_size), ("k", kv_size), ("v", kv_size)], bias=opts.qkv_bias)
        self.o_proj = RowLinear(q_size, hidden, bias=opts.o_bias)
        if opts.qk_norm:
            self.q_norm = RMSNorm(self.head_dim, hf_config.rms_norm_eps, ops)
            self.k_norm = RMSNorm(self.head_dim, hf_config.rms_norm_eps, ops)
        else:
            self.q_norm = self.k_norm = None
        self.rotary_emb = rotary_emb  # shared by all layers
        self.attn = Attention(
            self.num_heads,
            self.num_kv_heads,
            self.head_dim,
            self.head_dim**-0.5,
            ops,
            sliding_window=sliding_window_of(hf_config, layer_idx),
        )

    def forward(self, rope: RopeTables, hidden: torch.Tensor, kv_cache: KVCache, meta: AttentionMetadata) -> torch.Tensor:
        heads = self.qkv_proj(hidden).view(-1, self.num_heads + 2 * self.num_kv_heads, self.head_dim)
        qk_heads = self.num_heads + self.num_kv_heads
        v = heads[:, qk_heads:]
        if self.q_norm is not None:
            q = self.rotary_emb.rotate(self.q_norm(heads[:, : self.num_heads]), rope)
            k = self.rotary_emb.rotate(self.k_norm(heads[:, self.num_heads : qk_heads]), rope)
        else:  # q and k rotated together, as one view of the fused output
            qk = self.rotary_emb.rotate(heads[:, :qk_heads], rope)
            q, k = qk[:, : self.num_heads], qk[:, self.num_heads :]
        return self.o_proj(self.attn(q, k, v, kv_cache, meta))


class LlamaMLP(nn.Module):
    def __init__(self, hf_config: Any, opts: DecoderOptions, ops: Ops):
        super().__init__()
        act = getattr(hf_config, "hidden_act", "silu")
        if act != "silu":
            raise ConfigError(f"Unsupported activation {act!r}: only silu is implemented")
        hidden, inter = hf_config.hidden_size, hf_config.intermediate_size
        self.gate_up_proj = MergedLinear(hidden, [(0, inter), (1, inter)], bias=opts.mlp_bias)
        self.down_proj = RowLinear(inter, hidden, bias=opts.mlp_bias)
        self.ops = ops

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.ops.silu_and_mul(self.gate_up_proj(x)))


class LlamaDecoderLayer(nn.Module):
    def __init__(
        self, hf_config: Any, layer_idx: int, opts: DecoderOptions, rotary_emb: RotaryEmbedding, ops: Ops
    ):
        super().__init__()
        eps = hf_config.rms_norm_eps
        self.input_layernorm = RMSNorm(hf_config.hidden_size, eps, ops)
        self.self_attn = LlamaAttention(hf_config, layer_idx, opts, rotary_emb, ops)
        self.post_attention_layernorm = RMSNorm(hf_config.hidden_size, eps, ops)
        self.mlp = LlamaMLP(hf_config, opts, ops)

    def forward(
        self,
        rope: RopeTables,
        hidden: torch.Tensor,
        residual: torch.Tensor | None,
        kv_cache: KVCache,
        meta: AttentionMetadata,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns ``(mlp output, residual)``; their sum is the layer's output (the add is fused into the next norm)."""
        if residual is None:
            residual, hidden = hidden, self.input_layernorm(hidden)
        else:
            hidden, residual = self.input_layernorm(hidden, residual)
        hidden = self.self_attn(rope, hidden, kv_cache, meta)
        hidden, residual = self.post_attention_layernorm(hidden, residual)
        return self.mlp(hidden), residual


class LlamaModel(nn.Module):
    def __init__(self, hf_config: Any, opts: DecoderOptions, ops: Ops):
        super().__init__()
        self.embed_tokens = VocabEmbedding(hf_config.vocab_size, hf_config.hidden_size)
        self.rotary_emb = RotaryEmbedding(hf_config, head_dim_of(hf_config), ops)  # shared by all layers
        self.layers = nn.ModuleList(
            LlamaDecoderLayer(hf_config, i, opts, self.rotary_emb, ops) for i in range(hf_config.num_hidden_layers)
        )
        self.norm = RMSNorm(hf_config.hidden_size, hf_config.rms_norm_eps, ops)

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        kv_caches: list[KVCache],
        meta: AttentionMetadata,
    ) -> torch.Tensor:
        hidden = self.embed_tokens(input_ids)
        rope = self.rotary_emb.tables(positions, hidden.dtype)  # once per step, not per layer
        residual = None
        for layer, kv_cache in zip(self.layers, kv_caches, strict=True):
            hidden, residual = layer(rope, hidden, residual, kv_cache, meta)
        hidden, _ = self.norm(hidden, residual)
        return hidden


class LlamaForCausalLM(nn.Module):
    """``model(input_ids [T], positions [T], kv_caches, meta) -> [T, hidden]``;
    ``compute_logits(rows) -> [N, vocab]`` in float32."""

    # HF projection name -> (our fused module, shard id)
    packed_modules = MappingProxyType(
        {
            "q_proj": ("qkv_proj", "q"),
            "k_proj": ("qkv_proj", "k"),
            "v_proj": ("qkv_proj", "v"),
            "gate_proj": ("gate_up_proj", 0),
            "up_proj": ("gate_up_proj", 1),
        }
    )

    @classmethod
    def decoder_options(cls, hf_config: Any) -> DecoderOptions:
        attention_bias = bool(getattr(hf_config, "attention_bias", False))
        return DecoderOptions(
            qkv_bias=attention_bias, o_bias=attention_bias, mlp_bias=bool(getattr(hf_config, "mlp_bias", False))
        )

    def __init__(self, hf_config: Any, ops: Ops):
        super().__init__()
        self.config = hf_config
        self.tie_word_embeddings = bool(getattr(hf_config, "tie_word_embeddings", False))
        self.model = LlamaModel(hf_config, self.decoder_options(hf_config), ops)
        tied_to = self.model.embed_tokens if self.tie_word_embeddings else None
        self.lm_head = LMHead(hf_config.vocab_size, hf_config.hidden_size, tied_to=tied_to)

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        kv_caches: list[KVCache],
        meta: AttentionMetadata,
    ) -> torch.Tensor:
        return self.model(input_ids, positions, kv_caches, meta)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden)


class MistralForCausalLM(LlamaForCausalLM):
    """Llama with a sliding attention window (``sliding_window`` in the config, None for full attention)."""
