"""GGUF checkpoints (llama.cpp's one-file format), as vLLM takes them: `pagedserve serve ./model.gguf`.

The config, tokenizer and chat template come from the file's metadata, read by transformers
(`from_pretrained(dir, gguf_file=name)`). Tensors are read with the `gguf` package (memory-mapped),
dequantized one at a time to float32 and handed on, so peak memory stays near the served model's
size. GGUF tensor names become Hugging Face names through transformers' own GGUF utilities (the
same name map and tensor processors, e.g. the undoing of llama.cpp's Q/K row permutation), so the
model's usual weight loaders take them as they take safetensors.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from server.errors import ConfigError

SUFFIX = ".gguf"


def is_gguf(path: str | os.PathLike) -> bool:
    return Path(path).suffix.lower() == SUFFIX


def from_pretrained_args(path: str | os.PathLike) -> tuple[str, dict[str, str]]:
    """transformers' `from_pretrained` (name_or_path, kwargs) for a checkpoint: a GGUF file is read from its
    directory with `gguf_file`; anything else as is."""
    file = Path(path)
    if is_gguf(file) and file.is_file():
        return str(file.parent), {"gguf_file": file.name}
    return str(path), {}


def find_in_directory(directory: Path, gguf_file: str | None) -> Path | None:
    """The GGUF file to serve from a directory: `gguf_file` when named, else the only *.gguf when the
    directory has no config.json (a safetensors checkpoint wins), else None."""
    if gguf_file:
        path = directory / gguf_file
        if not path.is_file():
            held = sorted(p.name for p in directory.glob("*.gguf"))
            raise ConfigError(f"--gguf-file {gguf_file}: no such file in {directory} (GGUF files there: {', '.join(held) or 'none'})")
        return path
    if (directory / "config.json").is_file():
        return None
    found = sorted(directory.glob("*.gguf"))
    if len(found) > 1:
        raise ConfigError(
            f"{directory} holds {len(found)} GGUF files ({', '.join(p.name for p in found)}): "
            "pass the file itself as the model, or name one with --gguf-file"
        )
    return found[0] if found else None


def _reader(path: Path):
    """The memory-mapped file; ConfigError (one line) for a truncated or corrupt one."""
    from gguf import GGUFReader

    try:
        return GGUFReader(str(path))
    except (ValueError, IndexError, KeyError, OSError, UnicodeDecodeError) as exc:
        size = path.stat().st_size if path.exists() else 0
        detail = re.sub(r"np\.\w+\(([^()]*)\)", r"\1", " ".join(str(exc).split())) or type(exc).__name__
        raise ConfigError(
            f"Cannot read GGUF file {path} ({size} bytes): it is truncated, corrupt, or uses a tensor type "
            f"this gguf package does not know ({detail})"
        ) from None


def _architecture(reader: Any, path: Path) -> str:
    field = reader.fields.get("general.architecture")
    if field is None:
        raise ConfigError(f"GGUF file {path.name} names no architecture (general.architecture)")
    return str(field.contents())


def _check(reader: Any, path: Path) -> str:
    """The file's architecture, once it is one transformers reads and every tensor type is one that
    `gguf` dequantizes; else a ConfigError naming what is not."""
    from gguf import GGML_QUANT_SIZES
    from gguf.quants import dequantize
    from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES

    arch = _architecture(reader, path)
    architectures = sorted(set(GGUF_SUPPORTED_ARCHITECTURES) - {"general", "tokenizer"})  # its keys name sections too
    if arch not in architectures:
        raise ConfigError(
            f"GGUF file {path.name}: architecture {arch!r} is not supported. "
            f"Supported GGUF architectures: {', '.join(architectures)}"
        )
    supported: dict[Any, bool] = {}
    for tensor in reader.tensors:
        qtype = tensor.tensor_type
        if qtype not in supported:
            type_size = GGML_QUANT_SIZES[qtype][1]
            try:  # one zero block: cheap, and exactly what the real read will do
                dequantize(np.zeros((1, type_size), dtype=np.uint8), qtype)
                supported[qtype] = True
            except NotImplementedError:
                supported[qtype] = False
        if not supported[qtype]:
            raise ConfigError(
                f"GGUF file {path.name}: tensor {tensor.name} has quantization type {qtype.name}, which cannot be "
                "dequantized (supported: F32, F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, the K-quants and IQ-quants)"
            )
    return arch


def load_config(path: Path) -> Any:
    """The transformers config from the file's metadata. When transformers cannot read it, the file is
    checked here for the one-line reason (truncated or corrupt, an unsupported architecture or tensor
    type); on success the tensor types are checked when the weights are read."""
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(str(path.parent), gguf_file=path.name)
    except Exception as exc:  # transformers' GGUF parsing raises many types for a bad file
        _check(_reader(path), path)
        detail = " ".join(str(exc).split()) or type(exc).__name__
        raise ConfigError(f"Cannot read the model config of GGUF file {path}: {detail}") from exc


def iter_tensors(path: Path, hf_config: Any, progress: bool) -> Iterator[tuple[str, torch.Tensor]]:
    """(Hugging Face name, float32 tensor) for each tensor of the file, dequantized one at a time.
    A tensor without a Hugging Face name is yielded under its GGUF name (the loader reports it)."""
    from gguf.quants import dequantize
    from tqdm.auto import tqdm
    from transformers import AutoModelForCausalLM
    from transformers.modeling_gguf_pytorch_utils import (
        TENSOR_PROCESSORS,
        TensorProcessor,
        get_gguf_hf_weights_map,
    )

    reader = _reader(path)
    arch = _check(reader, path)
    processor = TENSOR_PROCESSORS.get(arch, TensorProcessor)(config=hf_config.to_dict())
    with torch.device("meta"):  # only its parameter names: no memory, no initialisation
        skeleton = AutoModelForCausalLM.from_config(hf_config)
    names = get_gguf_hf_weights_map(skeleton, processor)
    del skeleton
    parsed: dict[str, Any] = {"tensors": {}}
    for tensor in tqdm(reader.tensors, desc=f"Dequantizing {path.name}", unit="tensor", disable=not progress):
        weights = dequantize(tensor.data, tensor.tensor_type)
        result = processor.process(weights=weights, name=tensor.name, tensor_key_mapping=names, parsed_parameters=parsed)
        # a copy: the memory-mapped file is read-only, and torch wants writable memory
        yield names.get(result.name, tensor.name), torch.from_numpy(np.array(result.weights, dtype=np.float32))
