"""The built-in demo model and tiny test models: real architectures, random weights.

There is no Hub access in tests or in a fresh install, so the project makes its own models:
a byte-level BPE tokenizer trained on the bundled corpus (ChatML special tokens, chat
template) plus randomly initialised weights in a real transformers architecture, saved exactly
as a Hub checkpoint would be (config.json, generation_config.json, model.safetensors,
tokenizer files). Every build is seeded, so the same call always writes the same bytes.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import os
import shutil
import tempfile
from importlib import resources
from pathlib import Path
from types import MappingProxyType
from typing import Any

DEMO_VERSION = "v1"  # bump when the demo model's bytes change, so caches are rebuilt
DEMO_VOCAB_SIZE = 2048
TINY_VOCAB_SIZE = 512
WEIGHTS_SEED = 0
SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")  # ids 0, 1, 2
PAD_TOKEN, EOS_TOKEN = "<|endoftext|>", "<|im_end|>"

_TINY_BASE = MappingProxyType(
    {
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 1024,
        "tie_word_embeddings": False,
    }
)


def _tiny_configs() -> dict[str, dict[str, Any]]:
    """A fresh copy of the tiny-variant table (builds never read the public, mutable copy)."""

    def variant(architecture: str, **kwargs: Any) -> dict[str, Any]:
        return {"architecture": architecture, **_TINY_BASE, **kwargs}

    return {
        "llama": variant("LlamaForCausalLM"),
        "llama-tied-mha": variant(
            "LlamaForCausalLM", num_key_value_heads=4, tie_word_embeddings=True
        ),
        "llama3-rope": variant(
            "LlamaForCausalLM",
            rope_parameters={
                "rope_type": "llama3",
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 256,
                "rope_theta": 500000.0,
            },
        ),
        "mistral": variant("MistralForCausalLM", sliding_window=None),
        "mistral-swa": variant("MistralForCausalLM", sliding_window=32),
        "qwen2": variant(
            "Qwen2ForCausalLM", tie_word_embeddings=True, use_sliding_window=False
        ),
        "qwen3": variant(
            "Qwen3ForCausalLM",
            head_dim=32,
            num_key_value_heads=4,
            tie_word_embeddings=True,
            use_sliding_window=False,
        ),
        "qwen3-gqa": variant(
            "Qwen3ForCausalLM", head_dim=32, num_key_value_heads=2, use_sliding_window=False
        ),
    }


# Read-only by convention: make_tiny_model builds from a fresh copy of this table.
TINY_CONFIGS: dict[str, dict[str, Any]] = _tiny_configs()

_ARCH_MODEL_TYPE = MappingProxyType(
    {
        "LlamaForCausalLM": "llama",
        "MistralForCausalLM": "mistral",
        "Qwen2ForCausalLM": "qwen2",
        "Qwen3ForCausalLM": "qwen3",
    }
)


def _demo_config() -> dict[str, Any]:
    """The demo model: Llama, GQA, ~4.2M parameters; fast on a 2-core CPU."""
    return {
        "architecture": "LlamaForCausalLM",
        "hidden_size": 256,
        "intermediate_size": 768,
        "num_hidden_layers": 4,
        "num_attention_heads": 8,
        "num_key_value_heads": 4,
        "max_position_embeddings": 4096,
        "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0},
        "rms_norm_eps": 1e-6,
        "tie_word_embeddings": False,
    }


GENERATION_DEFAULTS = MappingProxyType({"do_sample": True, "temperature": 0.7, "top_p": 0.9})


class TokenizerCache:
    """Trained tokenizers by vocab size, for one caller to share across builds.

    Holds serialized tokenizer JSON, so every build gets its own fresh object.
    """

    def __init__(self) -> None:
        self._by_vocab: dict[int, str] = {}

    def get(self, vocab_size: int):
        from tokenizers import Tokenizer

        if vocab_size not in self._by_vocab:
            self._by_vocab[vocab_size] = train_tokenizer(vocab_size).to_str()
        return Tokenizer.from_str(self._by_vocab[vocab_size])


def read_corpus() -> str:
    return resources.files("server.demo").joinpath("corpus.txt").read_text(encoding="utf-8")


def read_chat_template() -> str:
    return (
        resources.files("server.demo")
        .joinpath("chat_template.jinja")
        .read_text(encoding="utf-8")
    )


def train_tokenizer(vocab_size: int = DEMO_VOCAB_SIZE):
    """Train the byte-level BPE on the bundled corpus; deterministic for a given vocab size."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    lines = read_corpus().splitlines(keepends=True)
    tok.train_from_iterator(lines, trainer=trainer, length=len(lines))
    for i, token in enumerate(SPECIAL_TOKENS):
        if tok.token_to_id(token) != i:
            raise RuntimeError(f"special token {token!r} must have id {i}")
    return tok


def _wrap_tokenizer(tok, model_max_length: int):
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=None,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        unk_token=None,
        additional_special_tokens=[t for t in SPECIAL_TOKENS if t not in (EOS_TOKEN, PAD_TOKEN)],
        chat_template=read_chat_template(),
        model_max_length=model_max_length,
        padding_side="left",
        clean_up_tokenization_spaces=False,
    )


def _save_tokenizer(tok, out: Path, model_max_length: int) -> Any:
    """Save the tokenizer; the config names the class every transformers version knows."""
    hf_tok = _wrap_tokenizer(tok, model_max_length)
    hf_tok.save_pretrained(out)
    path = out / "tokenizer_config.json"
    cfg = json.loads(path.read_text("utf-8"))
    cfg.pop("backend", None)
    extra = cfg.pop("extra_special_tokens", None)
    if isinstance(extra, list):
        cfg["additional_special_tokens"] = extra
    cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
    path.write_text(json.dumps(cfg, indent=2, sort_keys=True, ensure_ascii=False) + "\n", "utf-8")
    return hf_tok


@contextlib.contextmanager
def _quiet_progress():
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()


def _init_weights(model, seed: int, std: float) -> None:
    """Fill every parameter from its own generator, seeded by (seed, parameter name).

    The bytes then depend only on names and shapes: not on transformers' init code (which
    changes between versions), nor on the global RNG (which threads share). Matrices get
    N(0, std); biases N(0, 0.1) and norm weights 1 + N(0, 0.1), unlike HF's zeros and ones,
    so a runner that drops a bias or ignores a norm weight cannot still match the reference.
    """
    import torch

    with torch.no_grad():
        for name, param in model.named_parameters():
            digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
            gen = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") >> 1)
            noise = torch.randn(param.shape, generator=gen, dtype=torch.float32)
            if param.ndim >= 2:
                value = std * noise
            elif name.endswith(".bias"):
                value = 0.1 * noise
            else:
                value = 1.0 + 0.1 * noise
            param.copy_(value.to(param.dtype))


def _model_card(name: str, architecture: str, config: dict[str, Any]) -> str:
    shape = ", ".join(
        f"{k}={config[k]}"
        for k in (
            "vocab_size",
            "hidden_size",
            "num_hidden_layers",
            "num_attention_heads",
            "num_key_value_heads",
            "intermediate_size",
            "max_position_embeddings",
        )
    )
    return (
        f"# pagedserve {name}\n\n"
        f"A `{architecture}` checkpoint with **random weights** (seed {WEIGHTS_SEED}), built by\n"
        "`server.demo` for demos and tests. It generates random tokens, never meaningful\n"
        "text. The tokenizer is a byte-level BPE trained on a small bundled corpus,\n"
        "with ChatML special tokens `<|endoftext|>`, `<|im_start|>`, `<|im_end|>` (ids 0, 1, 2)\n"
        "and a ChatML chat template.\n\n"
        f"Shape: {shape}.\n\n"
        "Regenerate with `pagedserve make-demo-model` or `server.demo.make_demo_model(path)`.\n"
    )


def _build(
    out_dir: str | Path,
    spec: dict[str, Any],
    vocab_size: int,
    name: str,
    cache: TokenizerCache | None,
) -> Path:
    """Write tokenizer + config + generation config + random weights into out_dir."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)

    tok = (cache or TokenizerCache()).get(vocab_size)
    hf_tok = _save_tokenizer(tok, out, spec["max_position_embeddings"])
    eos_id, pad_id = hf_tok.convert_tokens_to_ids([EOS_TOKEN, PAD_TOKEN])

    spec = copy.deepcopy(spec)
    architecture = spec.pop("architecture")
    if architecture not in _ARCH_MODEL_TYPE:
        raise ValueError(
            f"unknown architecture {architecture!r}; expected one of {sorted(_ARCH_MODEL_TYPE)}"
        )
    spec.setdefault("vocab_size", len(hf_tok))
    if spec["vocab_size"] < len(hf_tok):
        raise ValueError(
            f"vocab_size {spec['vocab_size']} is smaller than the tokenizer ({len(hf_tok)})"
        )
    spec.setdefault("bos_token_id", None)
    spec.setdefault("eos_token_id", eos_id)
    spec.setdefault("pad_token_id", pad_id)
    spec.setdefault("dtype", "float32")
    config = AutoConfig.for_model(_ARCH_MODEL_TYPE[architecture], **spec)
    config.architectures = [architecture]

    gen = GenerationConfig(
        eos_token_id=[eos_id, pad_id], pad_token_id=pad_id, **GENERATION_DEFAULTS
    )

    # Construct in the config's dtype (float32 unless overridden) under a seeded, restored
    # global RNG; _init_weights then sets every value from its own generator.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(WEIGHTS_SEED)
        model = AutoModelForCausalLM.from_config(config, dtype=getattr(torch, spec["dtype"]))
    _init_weights(model, WEIGHTS_SEED, config.initializer_range)
    model.generation_config = gen
    with _quiet_progress():
        model.save_pretrained(out, safe_serialization=True)
    (out / "README.md").write_text(_model_card(name, architecture, config.to_dict()), "utf-8")
    for path in out.iterdir():  # safetensors writes its file owner-only; a model directory is shared
        path.chmod(0o644)
    return out


def make_demo_model(out_dir: str | Path, *, cache: TokenizerCache | None = None) -> Path:
    """Build the demo model (Llama, ~4M params, vocab 2048) into out_dir; always the same bytes."""
    return _build(out_dir, _demo_config(), DEMO_VOCAB_SIZE, "demo model", cache)


def make_tiny_model(
    out_dir: str | Path,
    arch: str = "llama",
    *,
    cache: TokenizerCache | None = None,
    **config_overrides: Any,
) -> Path:
    """Build the TINY_CONFIGS variant `arch` (config kwargs overridable) into out_dir."""
    table = _tiny_configs()
    if arch not in table:
        raise ValueError(f"unknown tiny model {arch!r}; expected one of {sorted(table)}")
    spec = {**table[arch], **config_overrides}
    return _build(out_dir, spec, TINY_VOCAB_SIZE, f"tiny model '{arch}'", cache)


def default_demo_dir() -> Path:
    """$PAGEDSERVE_HOME/demo-model if set, else ~/.cache/pagedserve/demo-model-<version>."""
    home = os.environ.get("PAGEDSERVE_HOME")
    if home:
        return Path(home).expanduser() / "demo-model"
    return Path.home() / ".cache" / "pagedserve" / f"demo-model-{DEMO_VERSION}"


def ensure_demo_model(*, cache: TokenizerCache | None = None) -> Path:
    """The demo model in default_demo_dir(), built there first if missing.

    Built in a sibling temp dir and renamed into place, so a concurrent process sees either
    no directory or a complete model; if another process wins the race, its copy is kept.
    """
    target = default_demo_dir()
    if (target / "config.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        tmp.chmod(0o755)  # mkdtemp makes it owner-only; a shared cache must be readable
        make_demo_model(tmp, cache=cache)
        try:
            os.rename(tmp, target)
        except OSError as exc:  # another process got there first, or a stray directory
            if not (target / "config.json").is_file():
                raise RuntimeError(f"{target} exists but holds no model; remove it") from exc
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target
