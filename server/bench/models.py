"""Benchmark models: random-weight Hub-style checkpoints of realistic shapes, built offline.

`llama-125m` is a ~125M-parameter Llama (hidden 768, 12 layers, 12 query / 4 KV heads,
intermediate 2048, vocab 32000). Its tokenizer is the small byte-level BPE of the demo models;
the embedding table is larger than the tokenizer, which both servers accept (ids past the
tokenizer decode to nothing). Build with `pagedserve bench make-model DIR`.

With random weights, greedy decoding of a 32000-wide head over a small tokenizer would mostly emit
ids the tokenizer cannot print (and servers differ in whether they stream empty deltas). So the
lm_head rows of every id that does not decode to printable text on its own (ids past the
tokenizer, special tokens, partial UTF-8 bytes) are zeroed: their logit is 0 while printable ids
get random logits, so greedy decoding emits one printable token per step. Shapes, parameter count
and FLOPs are unchanged.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from server.bench.target import BenchError

BENCH_MODELS: dict[str, dict[str, Any]] = {
    "llama-125m": {
        "hidden_size": 768,
        "intermediate_size": 2048,
        "num_hidden_layers": 12,
        "num_attention_heads": 12,
        "num_key_value_heads": 4,
        "vocab_size": 32000,
        "max_position_embeddings": 2048,
        "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0},
        "rms_norm_eps": 1e-6,
        "tie_word_embeddings": False,
    },
}


def make_bench_model(out_dir: str | Path, name: str = "llama-125m") -> Path:
    """Write the benchmark model `name` into out_dir (same bytes on every call); returns the dir."""
    from server.demo import make_tiny_model

    if name not in BENCH_MODELS:
        raise BenchError(f"unknown benchmark model {name!r}; expected one of {sorted(BENCH_MODELS)}")
    out = Path(out_dir)
    if (out / "config.json").is_file() and (out / "model.safetensors").is_file():
        return out
    make_tiny_model(out, "llama", **BENCH_MODELS[name])
    _zero_unprintable_rows(out)
    return out


def printable_token_ids(tokenizer) -> list[int]:
    """Ids that decode, alone, to non-empty text without replacement characters (no special tokens)."""
    special = set(tokenizer.all_special_ids)
    ids = []
    for i in range(len(tokenizer)):
        if i in special:
            continue
        text = tokenizer.decode([i])
        if text and "\ufffd" not in text and text.strip("\x00"):
            ids.append(i)
    return ids


def _zero_unprintable_rows(model_dir: Path) -> None:
    import torch
    from safetensors.torch import load_file, save_file
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    keep = torch.tensor(printable_token_ids(tokenizer), dtype=torch.long)
    path = model_dir / "model.safetensors"
    tensors = load_file(str(path))
    head = tensors["lm_head.weight"]
    mask = torch.zeros(head.shape[0], dtype=torch.bool)
    mask[keep] = True
    head[~mask] = 0
    tensors["lm_head.weight"] = head.contiguous()
    save_file(tensors, str(path), metadata={"format": "pt"})


def count_parameters(model_dir: str | Path) -> int:
    from safetensors import safe_open

    total = 0
    with safe_open(str(Path(model_dir) / "model.safetensors"), framework="pt") as f:
        for key in f.keys():  # noqa: SIM118  (safe_open is not a dict)
            shape = f.get_slice(key).get_shape()
            n = 1
            for d in shape:
                n *= d
            total += n
    return total
