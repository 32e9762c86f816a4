"""Find a checkpoint (local directory or Hub id), read its config, stream its safetensors into a model."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from types import MappingProxyType
from typing import Any

import torch
from torch import nn

from kernels import cpu_linear
from server.errors import ConfigError
from server.runner import gguf_loader
from server.runner.layers.linear import default_weight_loader

logger = logging.getLogger(__name__)

# What a served model needs from a Hub repo: config, tokenizer, chat template, safetensors weights.
ALLOW_PATTERNS = (
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "tokenizer.model",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "chat_template.json",
    "chat_template.jinja",
    "*.safetensors",
    "model.safetensors.index.json",
)
# Mistral repos also ship their own-format consolidated.safetensors: a second full copy we cannot use.
IGNORE_PATTERNS = ("consolidated*.safetensors", "original/*")

DTYPES = MappingProxyType({"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32})
INDEX_FILE = "model.safetensors.index.json"
# Buffers some checkpoints carry that the model recomputes.
_SKIPPED_SUFFIXES = ("rotary_emb.inv_freq", "rotary_emb.cos_cached", "rotary_emb.sin_cached")


def _looks_like_path(model: str) -> bool:
    return model.startswith(("/", "./", "../", "~")) or model.count("/") > 1 or os.sep != "/" and os.sep in model


def resolve_model_path(
    model: str,
    revision: str | None = None,
    download_dir: str | None = None,
    weights: bool = True,
    gguf_file: str | None = None,
    progress: bool = True,
) -> Path:
    """A local directory or .gguf file as is (a directory holding one .gguf and no config.json is that
    file), else a Hub repo id fetched (or found in the HF cache) with huggingface_hub: its safetensors
    checkpoint, or its file `gguf_file`; without `weights` (--load-format dummy) only the config and
    tokenizer files of a safetensors checkpoint are fetched."""
    local = Path(model).expanduser()
    if local.exists() or _looks_like_path(model) or gguf_loader.is_gguf(model):
        if not local.exists():
            raise ConfigError(f"Model {'file' if gguf_loader.is_gguf(model) else 'directory'} {model} does not exist")
        if local.is_file():
            if not gguf_loader.is_gguf(local):
                raise ConfigError(f"Model path {model} is a file but not a .gguf file: give a checkpoint directory or a GGUF file")
            return local.resolve()
        found = gguf_loader.find_in_directory(local, gguf_file)
        if found is not None:
            return found.resolve()
        if not (local / "config.json").is_file():
            raise ConfigError(f"Model directory {model} has no config.json (nor a .gguf file)")
        return local.resolve()
    with _hub_progress(progress):
        if gguf_file:
            return _download_file(model, gguf_file, revision, download_dir)
        return _download(model, revision, download_dir, weights)


@contextlib.contextmanager
def _hub_progress(enabled: bool) -> Iterator[None]:
    """huggingface_hub's download bars on or off (its own switch) for the duration of a download."""
    from huggingface_hub.utils import (
        are_progress_bars_disabled,
        disable_progress_bars,
        enable_progress_bars,
    )

    was_disabled = are_progress_bars_disabled()
    if not enabled:
        disable_progress_bars()
    try:
        yield
    finally:
        if not was_disabled and not enabled:
            enable_progress_bars()


@contextlib.contextmanager
def _hub_errors(repo_id: str, revision: str | None, download_dir: str | None) -> Iterator[None]:
    """huggingface_hub's download errors as one-line ConfigErrors that say what to do."""
    import huggingface_hub
    from huggingface_hub import errors

    where = f"{repo_id!r}" + (f" at revision {revision!r}" if revision else "")
    try:
        yield
    except errors.GatedRepoError as e:
        raise ConfigError(
            f"Model {repo_id!r} is gated: accept its license on https://huggingface.co/{repo_id} "
            "and set HF_TOKEN to a token of an account that has access"
        ) from e
    except errors.RepositoryNotFoundError as e:
        raise ConfigError(
            f"Model {repo_id!r} was not found on the Hugging Face Hub (a private repo needs HF_TOKEN), "
            "and it is not a local directory"
        ) from e
    except errors.RevisionNotFoundError as e:
        raise ConfigError(f"Revision {revision!r} not found in model repo {repo_id!r}") from e
    except errors.LocalEntryNotFoundError as e:
        cache = download_dir or huggingface_hub.constants.HF_HUB_CACHE
        offline = huggingface_hub.constants.HF_HUB_OFFLINE
        reason = "offline mode is on (HF_HUB_OFFLINE=1)" if offline else "the Hugging Face Hub cannot be reached"
        raise ConfigError(
            f"Model {where} is not in the local cache {cache} (or is incomplete there) and {reason}. "
            "Download it once with network access, or pass an existing local model directory"
        ) from e
    except errors.EntryNotFoundError as e:  # after its subclass LocalEntryNotFoundError
        raise ConfigError(f"Model repo {where} has no such file: {e}") from e
    except errors.HFValidationError as e:
        raise ConfigError(f"{repo_id!r} is neither a local directory nor a valid Hub model id: {e}") from e
    except errors.HfHubHTTPError as e:
        raise ConfigError(f"Could not download model {where} from the Hugging Face Hub: {e}") from e


def _download(repo_id: str, revision: str | None, download_dir: str | None, weights: bool) -> Path:
    import huggingface_hub

    with _hub_errors(repo_id, revision, download_dir):
        snapshot = huggingface_hub.snapshot_download(
            repo_id,
            revision=revision,
            cache_dir=download_dir,
            allow_patterns=[p for p in ALLOW_PATTERNS if weights or "safetensors" not in p],
            ignore_patterns=list(IGNORE_PATTERNS),
            token=os.environ.get("HF_TOKEN"),
        )
    path = Path(snapshot)
    if not (path / "config.json").is_file():
        where = f"{repo_id!r}" + (f" at revision {revision!r}" if revision else "")
        raise ConfigError(
            f"Model {where} has no config.json (fetched to {path}); for a repo of GGUF files, name one with --gguf-file"
        )
    return path


def _download_file(repo_id: str, gguf_file: str, revision: str | None, download_dir: str | None) -> Path:
    """One GGUF file of a Hub repo (--gguf-file), fetched or found in the HF cache."""
    import huggingface_hub

    if not gguf_loader.is_gguf(gguf_file):
        raise ConfigError(f"--gguf-file {gguf_file}: not a .gguf file name")
    with _hub_errors(repo_id, revision, download_dir):
        return Path(huggingface_hub.hf_hub_download(
            repo_id, gguf_file, revision=revision, cache_dir=download_dir, token=os.environ.get("HF_TOKEN")
        ))


def load_hf_config(path: str | os.PathLike) -> Any:
    """The transformers config of a model directory, or of a GGUF file's metadata."""
    from transformers import AutoConfig

    if gguf_loader.is_gguf(path):
        return gguf_loader.load_config(Path(path))
    try:
        return AutoConfig.from_pretrained(str(path))
    except (OSError, ValueError, KeyError) as e:
        raise ConfigError(f"Cannot read the model config in {path}: {e}") from e


def _checkpoint_dtype(hf_config: Any) -> torch.dtype | None:
    dtype = getattr(hf_config, "dtype", None) or getattr(hf_config, "torch_dtype", None)
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype, None)
    return dtype if isinstance(dtype, torch.dtype) and dtype.is_floating_point else None


def resolve_dtype(
    dtype: str, hf_config: Any, device: torch.device | str, native_bf16: Callable[[], bool] = cpu_linear.native_bf16
) -> torch.dtype:
    """``auto``: the checkpoint's dtype on accelerators (bfloat16 if it names none). On CPU, bfloat16 where
    the CPU multiplies it natively (``native_bf16``), whatever the checkpoint's dtype, as vLLM's CPU build
    does (a float32 checkpoint is cast): measured on AVX512-BF16, bfloat16 steps take 0.4-0.9x the time of
    float32 ones. Without native support oneDNN emulates bfloat16 and nothing measured it faster, so float32.
    ``--dtype float32`` keeps a float32 checkpoint's own precision. Else the named dtype."""
    if dtype == "auto":
        checkpoint = _checkpoint_dtype(hf_config)
        if torch.device(device).type != "cpu":
            return checkpoint or torch.bfloat16
        if native_bf16():
            stated = f"is {_dtype_name(checkpoint)}" if checkpoint else "names no dtype"
            cast = "; --dtype float32 keeps it" if checkpoint == torch.float32 else ""
            chosen, why = torch.bfloat16, f"the checkpoint {stated} and the CPU has native bfloat16{cast}"
        else:
            chosen, why = torch.float32, "the CPU has no native bfloat16 (AVX512-BF16 or AMX); emulated it is slower"
        logger.info("--dtype auto: %s on CPU (%s)", _dtype_name(chosen), why)
        return chosen
    if dtype not in DTYPES:
        raise ConfigError(f"Unknown dtype {dtype!r}. Choices: auto, {', '.join(DTYPES)}")
    return DTYPES[dtype]


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _safetensors_files(path: Path) -> list[Path]:
    index = path / INDEX_FILE
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        return [path / name for name in sorted(set(weight_map.values()))]
    files = sorted(path.glob("*.safetensors"))
    hf_named = [f for f in files if f.name.startswith("model")]
    files = hf_named or [f for f in files if not f.name.startswith("consolidated")]
    if not files:
        held = sorted(p.name for p in path.iterdir()) if path.is_dir() else []
        raise ConfigError(
            f"No *.safetensors weights in {path}: only safetensors checkpoints are supported. "
            f"The directory holds: {', '.join(held) or 'nothing'}"
        )
    return files


def _iter_tensors(files: list[Path], progress: bool) -> Iterator[tuple[str, torch.Tensor]]:
    from safetensors import safe_open
    from tqdm.auto import tqdm

    disable = not progress
    for file in tqdm(files, desc="Loading safetensors", unit="file", disable=disable or len(files) == 1):
        with safe_open(str(file), framework="pt") as f:
            names = list(f.keys())
            for name in tqdm(names, desc=file.name, unit="tensor", leave=False, disable=disable):
                yield name, f.get_tensor(name)


def _target(name: str, packed_modules: Any) -> tuple[str, Any]:
    """Our parameter name for an HF tensor name, and the shard id when it lands in a fused parameter."""
    for hf_part, (ours, shard_id) in packed_modules.items():
        needle = f".{hf_part}."
        if needle in name:
            return name.replace(needle, f".{ours}.", 1), shard_id
    return name, None


def progress_bars(use_tqdm_on_load: bool) -> bool:
    """Whether loading shows tqdm bars: asked for (--use-tqdm-on-load; off with JSON logs) and stderr is a terminal."""
    return use_tqdm_on_load and sys.stderr.isatty()


def load_weights(
    model: nn.Module, path: str | os.PathLike, dtype: torch.dtype, hf_config: Any = None, progress: bool = False
) -> None:
    """Stream every tensor of ``path`` (a safetensors directory, or a GGUF file dequantized tensor by tensor,
    which needs its ``hf_config``) into ``model``; ConfigError if any parameter stays unset."""
    path = Path(path)
    if gguf_loader.is_gguf(path):
        tensors = gguf_loader.iter_tensors(path, hf_config, progress)
    else:
        tensors = _iter_tensors(_safetensors_files(path), progress)
    params = dict(model.named_parameters())
    packed_modules = getattr(model, "packed_modules", {})
    tied = getattr(model, "tie_word_embeddings", False)
    loaded: set[tuple[str, Any]] = set()
    unexpected: list[str] = []
    for name, tensor in tensors:
        if name.endswith(_SKIPPED_SUFFIXES) or (tied and name == "lm_head.weight"):
            continue
        target, shard_id = _target(name, packed_modules)
        param = params.get(target)
        if param is None:
            unexpected.append(name)
            continue
        if tensor.is_floating_point():
            tensor = tensor.to(dtype)
        if shard_id is None:
            getattr(param, "weight_loader", default_weight_loader)(param, tensor)
        else:
            param.weight_loader(param, tensor, shard_id)
        loaded.add((target, shard_id))
    if unexpected:
        logger.warning("Ignored %d checkpoint tensors the model does not use: %s", len(unexpected), unexpected[:5])
    hf_names = {shard: f".{hf_part}." for hf_part, shard in packed_modules.items()}
    missing = []
    for name, param in params.items():
        for shard_id in getattr(param, "shard_ids", (None,)):
            if (name, shard_id) in loaded:
                continue
            ours = next((o for o, s in hf_names if s == shard_id and f".{o}." in name), None)
            missing.append(name.replace(f".{ours}.", hf_names[(ours, shard_id)], 1) if ours else name)
    if missing:
        shown = ", ".join(missing[:10]) + (f" and {len(missing) - 10} more" if len(missing) > 10 else "")
        raise ConfigError(f"Checkpoint {path} is missing weights: {shown}")


def init_dummy_weights(model: nn.Module, seed: int = 0, scale: float = 1e-3) -> None:
    """--load-format dummy: every parameter uniform in [-scale, scale] (as vLLM's dummy format), drawn on
    its own device from a fixed seed, so a model of any shape is served and benchmarked from its
    config.json alone."""
    generators: dict[torch.device, torch.Generator] = {}
    with torch.no_grad():
        for param in model.parameters():
            generator = generators.get(param.device)
            if generator is None:
                generator = generators[param.device] = torch.Generator(device=param.device).manual_seed(seed)
            param.uniform_(-scale, scale, generator=generator)
