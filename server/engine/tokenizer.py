"""The tokenizer, chat template and generation defaults of a checkpoint, read with transformers."""

from __future__ import annotations

from pathlib import Path

from transformers import AutoTokenizer, GenerationConfig

from server.errors import ConfigError
from server.runner.gguf_loader import from_pretrained_args

# generation_config.json fields that become request defaults, mapped to SamplingParams names
_SAMPLING_DEFAULTS = {
    "temperature": "temperature",
    "top_p": "top_p",
    "top_k": "top_k",
    "min_p": "min_p",
    "repetition_penalty": "repetition_penalty",
    "max_new_tokens": "max_tokens",
}


def load_tokenizer(path: str, chat_template_file: str | None = None):
    source, kwargs = from_pretrained_args(path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, **kwargs)
    except Exception as exc:  # transformers raises many types for a bad tokenizer directory
        raise ConfigError(f"Could not load the tokenizer from {path}: {exc}") from exc
    if chat_template_file:
        template = Path(chat_template_file)
        if not template.is_file():
            raise ConfigError(f"--chat-template {chat_template_file}: no such file.")
        tokenizer.chat_template = template.read_text()
    return tokenizer


def load_generation_config(path: str) -> GenerationConfig | None:
    """generation_config.json of a checkpoint directory; None when there is none (a GGUF file has none)."""
    if from_pretrained_args(path)[1]:
        return None
    try:
        return GenerationConfig.from_pretrained(path)
    except OSError:
        return None


def eos_token_ids(generation_config: GenerationConfig | None, hf_config, tokenizer) -> tuple[int, ...]:
    """EOS ids in the order transformers' generate uses: generation_config, then config, then tokenizer."""
    for source in (generation_config, hf_config, tokenizer):
        value = getattr(source, "eos_token_id", None) if source is not None else None
        if value is not None:
            return tuple(value) if isinstance(value, (list, tuple)) else (int(value),)
    return ()


def sampling_defaults(generation_config: GenerationConfig | None) -> dict:
    """The checkpoint's recommended sampling settings, applied where a request leaves them unset."""
    if generation_config is None:
        return {}
    explicit = generation_config.to_diff_dict()  # only what the file sets, not transformers' defaults
    return {target: explicit[source] for source, target in _SAMPLING_DEFAULTS.items() if source in explicit and source != "max_new_tokens"}
