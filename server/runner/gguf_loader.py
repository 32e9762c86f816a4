"""GGUF checkpoints (llama.cpp's one-file format), as vLLM takes them: `pagedserve serve ./model.gguf`.

The config, tokenizer and chat template come from the file's metadata, read by transformers
(`from_pretrained(dir, gguf_file=name)`). Tensors are found through the file's header, parsed here
(`GgufFile`: a walk over the metadata that keeps only its scalars, then the tensor table; the `gguf`
package's reader builds a numpy view of every metadata string, seconds for a 49k-token vocabulary),
memory-mapped, dequantized one at a time with the `gguf` package and handed on, so peak memory stays
near the served model's size. GGUF tensor names become Hugging Face names through transformers' own
GGUF utilities (the same name map and tensor processors, e.g. the undoing of llama.cpp's Q/K row
permutation), so the model's usual weight loaders take them as they take safetensors.
"""

from __future__ import annotations

import os
import re
import struct
from collections.abc import Iterator
from dataclasses import dataclass
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


# Metadata value types of a fixed width (struct formats); 8 is a string, 9 an array.
_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_DEFAULT_ALIGNMENT = 32  # llama.cpp's, when general.alignment is absent


@dataclass(frozen=True)
class GgufTensor:
    name: str
    dims: tuple[int, ...]  # as the file lists them: fastest-moving first
    qtype: Any  # gguf.GGMLQuantizationType
    offset: int  # from the start of the data section
    nbytes: int


@dataclass(frozen=True)
class GgufFile:
    """The header of a GGUF file: its architecture and tensor table; the file is memory-mapped when read."""

    path: Path
    architecture: str | None
    tensors: tuple[GgufTensor, ...]
    data_start: int

    @classmethod
    def read(cls, path: Path) -> GgufFile:
        """The parsed header; ConfigError (one line) for a truncated or corrupt file or an unknown tensor type."""
        try:
            return cls._parse(path, np.memmap(path, mode="r", dtype=np.uint8))
        except (ValueError, IndexError, KeyError, OSError, UnicodeDecodeError, struct.error) as exc:
            size = path.stat().st_size if path.exists() else 0
            detail = re.sub(r"np\.\w+\(([^()]*)\)", r"\1", " ".join(str(exc).split())) or type(exc).__name__
            raise ConfigError(
                f"Cannot read GGUF file {path} ({size} bytes): it is truncated, corrupt, or uses a tensor type "
                f"this gguf package does not know ({detail})"
            ) from None

    @classmethod
    def _parse(cls, path: Path, blob: np.ndarray) -> GgufFile:
        from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

        if bytes(blob[:4]) != b"GGUF":
            raise ValueError("no GGUF magic bytes")
        version, tensor_count, kv_count = struct.unpack_from("<IQQ", blob, 4)
        if version not in (2, 3):
            raise ValueError(f"GGUF version {version}")
        scalars: dict[str, Any] = {}
        pos = 24
        for _ in range(kv_count):
            key, pos = _string(blob, pos)
            (value_type,) = struct.unpack_from("<I", blob, pos)
            scalars[key], pos = _value(blob, pos + 4, value_type)
        tensors = []
        for _ in range(tensor_count):
            name, pos = _string(blob, pos)
            (n_dims,) = struct.unpack_from("<I", blob, pos)
            dims = struct.unpack_from(f"<{n_dims}Q", blob, pos + 4)
            raw_type, offset = struct.unpack_from("<IQ", blob, pos + 4 + 8 * n_dims)
            pos += 4 + 8 * n_dims + 12
            qtype = GGMLQuantizationType(raw_type)
            block, type_size = GGML_QUANT_SIZES[qtype]
            nbytes = int(np.prod(dims, dtype=np.int64)) // block * type_size
            tensors.append(GgufTensor(name, tuple(dims), qtype, offset, nbytes))
        alignment = int(scalars.get("general.alignment") or _DEFAULT_ALIGNMENT)
        data_start = -(-pos // alignment) * alignment
        for t in tensors:
            if data_start + t.offset + t.nbytes > len(blob):
                raise ValueError(f"tensor {t.name} ends past the end of the file")
        arch = scalars.get("general.architecture")
        return cls(path, arch if isinstance(arch, str) else None, tuple(tensors), data_start)

    def raw(self, blob: np.ndarray, tensor: GgufTensor) -> np.ndarray:
        """The tensor's bytes as `gguf.quants.dequantize` takes them: uint8 rows of the row's byte length."""
        from gguf import GGML_QUANT_SIZES

        block, type_size = GGML_QUANT_SIZES[tensor.qtype]
        start = self.data_start + tensor.offset
        shape = (*reversed(tensor.dims[1:]), tensor.dims[0] // block * type_size)
        return blob[start : start + tensor.nbytes].reshape(shape)


def _string(blob: np.ndarray, pos: int) -> tuple[str, int]:
    (length,) = struct.unpack_from("<Q", blob, pos)
    end = pos + 8 + length
    if end > len(blob):
        raise ValueError("a string runs past the end of the file")
    return bytes(blob[pos + 8 : end]).decode("utf-8"), end


def _value(blob: np.ndarray, pos: int, value_type: int) -> tuple[Any, int]:
    """A metadata value and the offset past it; an array is skipped (None): only scalars and strings are kept."""
    if value_type in _SCALARS:
        fmt = _SCALARS[value_type]
        return struct.unpack_from(fmt, blob, pos)[0], pos + struct.calcsize(fmt)
    if value_type == 8:
        return _string(blob, pos)
    if value_type == 9:
        element_type, count = struct.unpack_from("<IQ", blob, pos)
        pos += 12
        if element_type in _SCALARS:
            return None, pos + count * struct.calcsize(_SCALARS[element_type])
        for _ in range(count):
            _, pos = _value(blob, pos, element_type)
        return None, pos
    raise ValueError(f"unknown metadata value type {value_type}")


def _check(header: GgufFile) -> str:
    """The file's architecture, once it is one transformers reads and every tensor type is one that
    `gguf` dequantizes; else a ConfigError naming what is not."""
    from gguf import GGML_QUANT_SIZES
    from gguf.quants import dequantize
    from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES

    name = header.path.name
    arch = header.architecture
    if arch is None:
        raise ConfigError(f"GGUF file {name} names no architecture (general.architecture)")
    architectures = sorted(set(GGUF_SUPPORTED_ARCHITECTURES) - {"general", "tokenizer"})  # its keys name sections too
    if arch not in architectures:
        raise ConfigError(
            f"GGUF file {name}: architecture {arch!r} is not supported. "
            f"Supported GGUF architectures: {', '.join(architectures)}"
        )
    supported: dict[Any, bool] = {}
    for tensor in header.tensors:
        qtype = tensor.qtype
        if qtype not in supported:
            type_size = GGML_QUANT_SIZES[qtype][1]
            try:  # one zero block: cheap, and exactly what the real read will do
                dequantize(np.zeros((1, type_size), dtype=np.uint8), qtype)
                supported[qtype] = True
            except NotImplementedError:
                supported[qtype] = False
        if not supported[qtype]:
            raise ConfigError(
                f"GGUF file {name}: tensor {tensor.name} has quantization type {qtype.name}, which cannot be "
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
        _check(GgufFile.read(path))
        detail = " ".join(str(exc).split()) or type(exc).__name__
        raise ConfigError(f"Cannot read the model config of GGUF file {path}: {detail}") from exc


def _hf_names(hf_config: Any, processor: Any, gguf_names: set[str]) -> dict[str, str]:
    """GGUF tensor name -> Hugging Face name, by transformers' `get_gguf_hf_weights_map`. That walks every
    submodule and builds gguf's name table again for each (seconds for a 30-layer model), only to map names
    the whole model's table left unmapped (a base model saved as the causal LM, as Bloom's files are); so the
    whole model is mapped first, and the walk runs only when a tensor of the file is left without a name."""
    from transformers import AutoModelForCausalLM
    from transformers.modeling_gguf_pytorch_utils import get_gguf_hf_weights_map

    with torch.device("meta"):  # only its parameter names: no memory, no initialisation
        skeleton = AutoModelForCausalLM.from_config(hf_config)
    names = get_gguf_hf_weights_map(_WithoutChildren(skeleton), processor)
    if not gguf_names <= names.keys():
        names = get_gguf_hf_weights_map(skeleton, processor)
    return names


class _WithoutChildren:
    """A model as `get_gguf_hf_weights_map` reads it (config, state_dict), with no submodules to walk."""

    def __init__(self, model: torch.nn.Module):
        self.config = model.config
        self._model = model

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self._model.state_dict()

    def named_children(self) -> list:
        return []


def iter_tensors(path: Path, hf_config: Any, progress: bool) -> Iterator[tuple[str, torch.Tensor]]:
    """(Hugging Face name, float32 tensor) for each tensor of the file, dequantized one at a time.
    A tensor without a Hugging Face name is yielded under its GGUF name (the loader reports it)."""
    from gguf.quants import dequantize
    from tqdm.auto import tqdm
    from transformers.modeling_gguf_pytorch_utils import (
        TENSOR_PROCESSORS,
        TensorProcessor,
    )

    header = GgufFile.read(path)
    arch = _check(header)
    processor = TENSOR_PROCESSORS.get(arch, TensorProcessor)(config=hf_config.to_dict())
    names = _hf_names(hf_config, processor, {t.name for t in header.tensors})
    blob = np.memmap(path, mode="r", dtype=np.uint8)
    parsed: dict[str, Any] = {"tensors": {}}
    for tensor in tqdm(header.tensors, desc=f"Dequantizing {path.name}", unit="tensor", disable=not progress):
        weights = dequantize(header.raw(blob, tensor), tensor.qtype)
        result = processor.process(weights=weights, name=tensor.name, tensor_key_mapping=names, parsed_parameters=parsed)
        # A dequantized tensor is a new float32 array, taken as is (the loader casts it to the served dtype
        # in one copy); an F32 one is a view of the read-only mapped file, which torch wants copied.
        array = np.asarray(result.weights, dtype=np.float32)
        if not array.flags.writeable:
            array = array.copy()
        yield names.get(result.name, tensor.name), torch.from_numpy(array)
