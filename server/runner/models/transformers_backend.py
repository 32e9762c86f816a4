"""Any decoder-only architecture transformers knows, run by transformers' own modeling code over our
paged KV cache (vLLM calls this its Transformers backend).

transformers looks up a model's attention function by name in its ``AttentionInterface``; we register
``paged_attention_forward`` under ``ATTENTION_NAME`` and build the model with that name. The wrapper
runs the flat batch of a step as one row ([1, T] ids and positions, no HF cache) and passes the
step's metadata, KV caches and ops in a ``paged_step`` keyword, which transformers forwards through
every layer to the attention function; ``module.layer_idx`` picks the layer's cache. No mask is
built: the scheduler's metadata says which keys each query sees.

What it gives up against the native models: no fused QKV/gate-up projections, no oneDNN-packed CPU
linears, and whatever per-layer work transformers does (rotary tables, reshapes) on every step.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from kernels.metadata import AttentionMetadata
from kernels.ops import Ops
from server.errors import ConfigError
from server.runner.models.llama import head_dim_of, num_kv_heads_of

logger = logging.getLogger(__name__)

ATTENTION_NAME = "pagedserve_paged"
KVCache = tuple[torch.Tensor, torch.Tensor]

# Keywords transformers passes to attention functions that change nothing here: dropout is off in
# eval, positions and masks are the metadata's business, the rest are output or cache switches.
_IGNORED_KWARGS = frozenset(
    {
        "dropout",
        "position_ids",
        "cache_position",
        "output_attentions",
        "output_hidden_states",
        "output_router_logits",
        "use_cache",
        "return_dict",
        "is_causal",
        "cu_seq_lens_q",
        "cu_seq_lens_k",
        "max_length_q",
        "max_length_k",
    }
)
# Logit post-processing some CausalLM heads do after lm_head, by config attribute (see compute_logits).
_LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "logits_scaling")


@dataclass(frozen=True)
class PagedStep:
    """What one step's attention calls need: passed as the ``paged_step`` keyword of the HF forward."""

    meta: AttentionMetadata
    kv_caches: Sequence[KVCache]
    ops: Ops


def paged_attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    sliding_window: int | None = None,
    softcap: float | None = None,
    paged_step: PagedStep | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """transformers' attention-function contract: query [1, Hq, T, D], key/value [1, Hkv, T, D] (after
    rotary) -> ([1, T, Hq, D], no weights). Stores this step's K/V in the layer's paged cache and attends
    over it."""
    if paged_step is None:
        raise RuntimeError(f"{ATTENTION_NAME} attention runs only inside the server's step (no paged_step given)")
    if kwargs.get("is_causal") is False:
        raise ConfigError("The transformers backend serves causal (decoder) attention only; this layer is bidirectional.")
    unknown = sorted(name for name, value in kwargs.items() if value is not None and name not in _IGNORED_KWARGS)
    if unknown:
        raise ConfigError(
            f"{type(module).__name__} passes attention options the paged kernels do not implement: {', '.join(unknown)}."
        )
    if query.shape[0] != 1:
        raise RuntimeError(f"the transformers backend runs the step as one row, got a batch of {query.shape[0]}")
    k_cache, v_cache = paged_step.kv_caches[module.layer_idx]
    q = query[0].transpose(0, 1)  # [T, Hq, D]
    k = key[0].transpose(0, 1)
    v = value[0].transpose(0, 1)
    if k.shape[1:] != k_cache.shape[2:]:
        raise ConfigError(
            f"{type(module).__name__} (layer {module.layer_idx}) has {k.shape[1]} KV heads of size {k.shape[2]}, "
            f"but its config implies {k_cache.shape[2]} of size {k_cache.shape[3]}: this layout is not supported."
        )
    scale = scaling if scaling is not None else q.shape[-1] ** -0.5
    paged_step.ops.store_kvcache(k, v, k_cache, v_cache, paged_step.meta.slot_mapping)
    out = paged_step.ops.paged_attention(q, k_cache, v_cache, paged_step.meta, scale, sliding_window or None, softcap)
    return out.unsqueeze(0), None


def register_attention() -> None:
    """Make ``ATTENTION_NAME`` known to transformers (idempotent: the same function each time)."""
    from transformers import AttentionInterface

    AttentionInterface.register(ATTENTION_NAME, paged_attention_forward)


def _causal_lm_class_name(hf_config: Any) -> str:
    """The transformers causal-LM class this config names; ConfigError if transformers has none."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    model_type = getattr(hf_config, "model_type", None)
    archs = list(getattr(hf_config, "architectures", None) or [])
    if getattr(hf_config, "is_encoder_decoder", False):
        raise ConfigError(
            f"{', '.join(archs) or model_type} is an encoder-decoder model; only decoder-only models can be served."
        )
    causal = set(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values())
    if not archs:
        name = MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(model_type)
        if name is None:
            raise ConfigError(f"config.json names no architecture and transformers has no causal LM for model_type {model_type!r}.")
        return name
    for arch in archs:
        if arch in causal:
            return arch
    raise ConfigError(
        f"transformers has no decoder-only (causal LM) model named {', '.join(archs)} "
        f"(model_type {model_type!r}); encoder-only and sequence-to-sequence models cannot be served."
    )


def check_supported(hf_config: Any) -> str:
    """The transformers class name to build for this config; ConfigError with the reason if it cannot run here."""
    import transformers

    name = _causal_lm_class_name(hf_config)
    cls = getattr(transformers, name, None)
    if cls is None:
        raise ConfigError(f"This transformers version ({transformers.__version__}) has no class {name}.")
    if not cls.is_backend_compatible():
        raise ConfigError(
            f"{name}'s transformers code does not take a pluggable attention function, so it cannot run on the paged KV cache."
        )
    layer_types = set(getattr(hf_config, "layer_types", None) or ())
    other = layer_types - {"full_attention", "sliding_attention"}
    if other:
        raise ConfigError(f"{name} has layers of type {', '.join(sorted(other))}; only attention layers run on the paged KV cache.")
    if getattr(hf_config, "attention_chunk_size", None):
        raise ConfigError(f"{name} uses chunked attention (attention_chunk_size), which the paged kernels do not implement.")
    return name


class TransformersForCausalLM(nn.Module):
    """Same interface as the native models: ``model(input_ids [T], positions [T], kv_caches, meta) -> [T, hidden]``
    and ``compute_logits(rows) -> [N, vocab]``; weights come with the model (see ``load``)."""

    def __init__(self, hf_model: nn.Module, ops: Ops):
        super().__init__()
        self.hf_model = hf_model
        self.ops = ops
        config = hf_model.config
        self.logit_transforms = {
            name: float(value) for name in _LOGIT_TRANSFORMS if (value := getattr(config, name, None)) is not None
        }

    @classmethod
    def load(
        cls,
        hf_config: Any,
        ops: Ops,
        path: str,
        dtype: torch.dtype,
        device: torch.device,
        load_format: str = "auto",
        seed: int = 0,
    ) -> TransformersForCausalLM:
        """Build the transformers model with our attention, fill its weights (the checkpoint's safetensors
        through ``from_pretrained``, or seeded random ones for --load-format dummy) and run a short probe
        step, so an architecture that cannot run on the paged cache fails here with a ConfigError."""
        import transformers

        from server.runner import gguf_loader, loader

        name = check_supported(hf_config)
        register_attention()
        model_class = getattr(transformers, name)
        if load_format == "dummy":
            hf_model = model_class._from_config(hf_config, attn_implementation=ATTENTION_NAME, dtype=dtype)
        else:  # loads on the CPU (a device_map needs accelerate), then moves
            name_or_path, gguf_kwargs = gguf_loader.from_pretrained_args(path)  # a .gguf: its directory + gguf_file
            try:
                hf_model = model_class.from_pretrained(
                    name_or_path, config=hf_config, attn_implementation=ATTENTION_NAME, dtype=dtype, **gguf_kwargs
                )
            except (OSError, ValueError) as exc:
                reason = " ".join(str(exc).split())  # one line
                raise ConfigError(f"transformers could not load {name} from {path}: {reason}") from exc
        model = cls(hf_model.to(device).eval(), ops)
        if load_format == "dummy":
            loader.init_dummy_weights(model, seed)
        model.probe()
        logger.info("Running %s through transformers' modeling code on the paged KV cache", name)
        return model

    @torch.inference_mode()
    def probe(self, num_tokens: int = 3) -> None:
        """One short prefill on a scratch cache: every layer must store K/V of the configured shape through
        our attention, and our hidden-state -> logits path must give the HF head's logits."""
        config = self.hf_model.config
        num_layers = config.num_hidden_layers
        shape = (1, num_tokens, num_kv_heads_of(config), head_dim_of(config))
        device = next(self.hf_model.parameters()).device
        dtype = next(self.hf_model.parameters()).dtype
        caches = [
            (torch.full(shape, float("nan"), dtype=dtype, device=device), torch.full(shape, float("nan"), dtype=dtype, device=device))
            for _ in range(num_layers)
        ]
        meta = AttentionMetadata(
            slot_mapping=torch.arange(num_tokens, device=device),
            query_start_loc=torch.tensor([0, num_tokens], dtype=torch.int32, device=device),
            seq_lens=torch.tensor([num_tokens], dtype=torch.int32, device=device),
            block_tables=torch.zeros((1, 1), dtype=torch.int32, device=device),
            query_lens_cpu=[num_tokens],
            seq_lens_cpu=[num_tokens],
            block_size=num_tokens,
        )
        ids = torch.arange(num_tokens, device=device) % config.vocab_size
        positions = torch.arange(num_tokens, device=device)
        name = type(self.hf_model).__name__
        try:
            hidden = self(ids, positions, caches, meta)
            want = self.hf_model(
                input_ids=ids[None], position_ids=positions[None], use_cache=False, paged_step=PagedStep(meta, caches, self.ops)
            ).logits[0]
        except ConfigError:
            raise
        except Exception as exc:  # transformers' code refused our inputs: name the model and the reason
            raise ConfigError(f"{name} cannot run on the paged KV cache: {type(exc).__name__}: {exc}") from exc
        unwritten = [i for i, (k, _) in enumerate(caches) if bool(k.isnan().any())]
        if unwritten:
            raise ConfigError(
                f"{name}: layers {unwritten[:8]} do not go through the attention function, so they cannot use the "
                "paged KV cache (recurrent or other non-attention layers are not supported)."
            )
        want = want.float()
        tolerance = (1e-4 if dtype == torch.float32 else 2e-2) * float(want.abs().max().clamp(min=1e-30))
        if float((self.compute_logits(hidden) - want).abs().max()) > tolerance:
            raise ConfigError(f"{name} post-processes its logits in a way the transformers backend does not reproduce.")

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        kv_caches: list[KVCache],
        meta: AttentionMetadata,
    ) -> torch.Tensor:
        out = self.hf_model.base_model(
            input_ids=input_ids.unsqueeze(0),
            position_ids=positions.unsqueeze(0),
            use_cache=False,
            paged_step=PagedStep(meta, kv_caches, self.ops),
        )
        return out.last_hidden_state[0]

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = self.hf_model.get_output_embeddings()(hidden).float()
        if "final_logit_softcapping" in self.logit_transforms:
            cap = self.logit_transforms["final_logit_softcapping"]
            logits = torch.tanh(logits / cap) * cap
        if "logit_scale" in self.logit_transforms:
            logits = logits * self.logit_transforms["logit_scale"]
        if "logits_scaling" in self.logit_transforms:
            logits = logits / self.logit_transforms["logits_scaling"]
        return logits
