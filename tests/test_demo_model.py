"""The built-in demo model and tiny test models: deterministic, loadable, chat-ready."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig

from server.demo import (
    TINY_CONFIGS,
    TokenizerCache,
    default_demo_dir,
    ensure_demo_model,
    make_demo_model,
    make_tiny_model,
)

NON_ASCII = [
    "crème brûlée, façade, Zoë, señor Muñoz, smørrebrød, Größe",
    "κλεψύδρα — «Ο χρόνος είναι νερό»",
    "一期一会 学而时习之 「ありがとう」 한국어",
    "emoji 🐈 ☀️🚌🏔️ 👩‍🚀 🇫🇷 and math π ≈ 3.14159, Σ, ∞, −5 °C, €",
    "never seen: Ωμέγα ж 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 \u200b\t\r\n  trailing  ",
]


def _digests(path: Path) -> dict[str, str]:
    return {
        f.name: hashlib.sha256(f.read_bytes()).hexdigest()
        for f in sorted(path.iterdir())
        if f.is_file()
    }


@pytest.fixture(scope="module")
def cache() -> TokenizerCache:
    return TokenizerCache()


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory, cache) -> Path:
    return make_demo_model(tmp_path_factory.mktemp("demo") / "model", cache=cache)


@pytest.fixture(scope="module")
def tiny_tok(tmp_path_factory, cache):
    path = make_tiny_model(tmp_path_factory.mktemp("tiny") / "llama", "llama", cache=cache)
    return AutoTokenizer.from_pretrained(path)


# --- determinism ---------------------------------------------------------------------------


def test_demo_build_is_byte_identical(tmp_path, demo_dir):
    again = make_demo_model(tmp_path / "again")  # fresh tokenizer training, no shared cache
    first, second = _digests(demo_dir), _digests(again)
    for name in ("tokenizer.json", "config.json", "model.safetensors", "generation_config.json"):
        assert name in first
    assert first == second


def test_tokenizer_training_is_identical_in_other_processes(cache):
    # The BPE trainer is Rust with per-process hash seeds; weights come from per-tensor
    # torch generators, so training is the part that could vary between processes.
    code = (
        "import hashlib; from server.demo.builder import train_tokenizer; "
        "print(hashlib.sha256(train_tokenizer(512).to_str().encode()).hexdigest())"
    )
    runs = {
        subprocess.run(
            [sys.executable, "-c", code], check=True, capture_output=True, text=True
        ).stdout.strip()
        for _ in range(2)
    }
    assert runs == {hashlib.sha256(cache.get(512).to_str().encode()).hexdigest()}


def test_build_leaves_the_table_and_global_rng_alone(tmp_path, cache):
    before = json.dumps(TINY_CONFIGS, sort_keys=True)
    torch.manual_seed(1234)
    expected = torch.rand(3)
    torch.manual_seed(1234)
    make_tiny_model(tmp_path / "m", "llama3-rope", cache=cache, num_hidden_layers=1)
    assert torch.equal(torch.rand(3), expected)
    assert json.dumps(TINY_CONFIGS, sort_keys=True) == before


# --- the demo model ------------------------------------------------------------------------


def test_demo_model_config_and_generation_defaults(demo_dir):
    tok = AutoTokenizer.from_pretrained(demo_dir)
    cfg = AutoConfig.from_pretrained(demo_dir)
    assert cfg.architectures == ["LlamaForCausalLM"]
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.intermediate_size) == (256, 4, 768)
    assert (cfg.num_attention_heads, cfg.num_key_value_heads) == (8, 4)
    assert cfg.vocab_size == len(tok) == 2048
    assert cfg.max_position_embeddings == 4096
    assert cfg.rope_parameters["rope_theta"] == 10000.0
    assert cfg.tie_word_embeddings is False
    assert json.loads((demo_dir / "config.json").read_text())["dtype"] == "float32"

    assert tok.convert_tokens_to_ids(["<|endoftext|>", "<|im_start|>", "<|im_end|>"]) == [0, 1, 2]
    assert (tok.eos_token, tok.pad_token) == ("<|im_end|>", "<|endoftext|>")
    assert cfg.eos_token_id == tok.eos_token_id == 2
    assert cfg.pad_token_id == tok.pad_token_id == 0
    assert tok.model_max_length == 4096

    gen = GenerationConfig.from_pretrained(demo_dir)
    assert gen.eos_token_id == [2, 0]
    assert gen.do_sample is True
    assert (gen.temperature, gen.top_p) == (0.7, 0.9)
    assert "random weights" in (demo_dir / "README.md").read_text()


def test_demo_model_generates(demo_dir):
    tok = AutoTokenizer.from_pretrained(demo_dir)
    model = AutoModelForCausalLM.from_pretrained(demo_dir)
    assert model.dtype == torch.float32
    ids = tok.apply_chat_template(
        [{"role": "user", "content": "hi"}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )["input_ids"]
    out = model.generate(ids, max_new_tokens=8, do_sample=False)
    assert out.shape[1] <= ids.shape[1] + 8
    assert torch.equal(out[0, : ids.shape[1]], ids[0])


# --- tiny variants -------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(TINY_CONFIGS))
def test_tiny_variant_builds_loads_and_runs(tmp_path, cache, name):
    spec = TINY_CONFIGS[name]
    path = make_tiny_model(tmp_path / name, name, cache=cache)
    cfg = AutoConfig.from_pretrained(path)
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path).eval()

    assert type(model).__name__ == spec["architecture"] == cfg.architectures[0]
    assert cfg.vocab_size == len(tok)
    assert (cfg.hidden_size, cfg.num_hidden_layers) == (64, 2)
    assert cfg.max_position_embeddings == 1024
    assert cfg.tie_word_embeddings == spec["tie_word_embeddings"]
    assert cfg.num_key_value_heads == spec["num_key_value_heads"]
    assert (path / "generation_config.json").is_file()
    assert (path / "chat_template.jinja").is_file() or tok.chat_template

    weights = load_file(str(path / "model.safetensors"))
    assert ("lm_head.weight" in weights) != spec["tie_word_embeddings"]
    for key, tensor in weights.items():
        assert tensor.dtype == torch.float32
        if key.endswith(".bias") or key.endswith("norm.weight"):
            assert tensor.std() > 0.01, f"{key} is constant: runner bugs would go unseen"

    ids = torch.tensor([tok.encode("The lighthouse keeper wrote: κλεψύδρα 🐈")])
    with torch.no_grad():
        logits = model(ids).logits
    assert logits.shape == (1, ids.shape[1], cfg.vocab_size)
    assert torch.isfinite(logits).all()


def test_tiny_variant_specifics(tmp_path, cache):
    def cfg(name):
        return AutoConfig.from_pretrained(make_tiny_model(tmp_path / name, name, cache=cache))

    qwen3 = cfg("qwen3")
    assert qwen3.head_dim == 32 != qwen3.hidden_size // qwen3.num_attention_heads
    weights = load_file(str(tmp_path / "qwen3" / "model.safetensors"))
    assert weights["model.layers.0.self_attn.q_norm.weight"].shape == (32,)
    assert cfg("qwen3-gqa").num_key_value_heads < cfg("qwen3-gqa").num_attention_heads

    qwen2_dir = make_tiny_model(tmp_path / "q2", "qwen2", cache=cache)
    qwen2 = load_file(str(qwen2_dir / "model.safetensors"))
    assert {"q_proj", "k_proj", "v_proj"} <= {
        k.split(".")[-2] for k in qwen2 if k.endswith(".bias")
    }

    assert cfg("mistral").sliding_window is None
    assert cfg("mistral-swa").sliding_window == 32
    llama3 = cfg("llama3-rope").rope_parameters
    assert llama3["rope_type"] == "llama3"
    assert llama3["original_max_position_embeddings"] < 1024
    mha = cfg("llama-tied-mha")
    assert mha.num_key_value_heads == mha.num_attention_heads and mha.tie_word_embeddings


def test_tiny_overrides_and_errors(tmp_path, cache):
    path = make_tiny_model(
        tmp_path / "m", "llama", cache=cache, num_hidden_layers=1, vocab_size=640, dtype="bfloat16"
    )
    cfg = AutoConfig.from_pretrained(path)
    assert (cfg.num_hidden_layers, cfg.vocab_size) == (1, 640)  # padded past the tokenizer
    weights = load_file(str(path / "model.safetensors"))
    assert weights["model.embed_tokens.weight"].shape == (640, 64)
    assert weights["model.embed_tokens.weight"].dtype == torch.bfloat16
    with pytest.raises(ValueError, match="unknown tiny model"):
        make_tiny_model(tmp_path / "x", "gpt-17", cache=cache)
    with pytest.raises(ValueError, match="smaller than the tokenizer"):
        make_tiny_model(tmp_path / "y", "llama", cache=cache, vocab_size=100)


# --- tokenizer and chat template -----------------------------------------------------------


@pytest.mark.parametrize("text", NON_ASCII)
def test_non_ascii_round_trip(tiny_tok, demo_dir, text):
    for tok in (tiny_tok, AutoTokenizer.from_pretrained(demo_dir)):
        ids = tok.encode(text, add_special_tokens=False)
        assert tok.decode(ids) == text
        assert tok.decode(tok.encode(text)) == text  # no BOS or other specials added


def test_corpus_round_trip_and_special_tokens_are_atomic(tiny_tok):
    from server.demo.builder import read_corpus

    corpus = read_corpus()
    assert 30_000 <= len(corpus.encode("utf-8")) <= 60_000
    assert tiny_tok.decode(tiny_tok.encode(corpus)) == corpus
    ids = tiny_tok.encode("<|im_start|>user\nhi<|im_end|>\n")
    assert ids[0] == 1 and 2 in ids
    assert tiny_tok.decode(ids, skip_special_tokens=True) == "user\nhi\n"


def test_chat_template_renders_all_roles(tiny_tok):
    messages = [
        {"role": "system", "content": "Be brief."},
        {
            "role": "user",
            "content": [{"type": "text", "text": "Hello "}, {"type": "text", "text": "there"}],
        },
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {"type": "function", "function": {"name": "now", "arguments": {"tz": "UTC"}}}
            ],
        },
        {"role": "tool", "content": "12:00"},
        {"role": "assistant", "content": [{"type": "text", "text": "It is noon."}]},
    ]
    text = tiny_tok.apply_chat_template(messages, tokenize=False)
    assert text == (
        "<|im_start|>system\nBe brief.<|im_end|>\n"
        "<|im_start|>user\nHello there<|im_end|>\n"
        '<|im_start|>assistant\n<tool_call>\n{"name": "now", "arguments": {"tz": "UTC"}}\n'
        "</tool_call><|im_end|>\n"
        "<|im_start|>tool\n12:00<|im_end|>\n"
        "<|im_start|>assistant\nIt is noon.<|im_end|>\n"
    )
    prompt = tiny_tok.apply_chat_template(
        [{"role": "user", "content": "hi"}], add_generation_prompt=True, tokenize=False
    )
    assert prompt == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    ids = tiny_tok.apply_chat_template(
        [{"role": "user", "content": "hi"}], add_generation_prompt=True, return_dict=False
    )
    assert ids == tiny_tok.encode(prompt) and ids.count(1) == 2 and ids.count(2) == 1


@pytest.mark.parametrize(
    "content",
    [
        "The answer is",
        [{"type": "text", "text": "The "}, {"type": "text", "text": "answer is"}],
    ],
)
def test_chat_template_continue_final_message(tiny_tok, content):
    messages = [{"role": "user", "content": "Q?"}, {"role": "assistant", "content": content}]
    text = tiny_tok.apply_chat_template(messages, tokenize=False, continue_final_message=True)
    assert text == "<|im_start|>user\nQ?<|im_end|>\n<|im_start|>assistant\nThe answer is"


def test_chat_template_rejects_unknown_role(tiny_tok):
    with pytest.raises(Exception, match="Unsupported role"):
        tiny_tok.apply_chat_template([{"role": "narrator", "content": "x"}], tokenize=False)


# --- the default location ------------------------------------------------------------------


def test_default_demo_dir(monkeypatch, tmp_path):
    monkeypatch.delenv("PAGEDSERVE_HOME", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    default = default_demo_dir()
    assert default.parent == tmp_path / ".cache" / "pagedserve"
    assert default.name.startswith("demo-model-")
    monkeypatch.setenv("PAGEDSERVE_HOME", str(tmp_path / "home"))
    assert default_demo_dir() == tmp_path / "home" / "demo-model"


def test_ensure_demo_model_is_idempotent(monkeypatch, tmp_path, cache, demo_dir):
    monkeypatch.setenv("PAGEDSERVE_HOME", str(tmp_path))
    path = ensure_demo_model(cache=cache)
    assert path == tmp_path / "demo-model"
    assert path.stat().st_mode & 0o755 == 0o755
    assert _digests(path) == _digests(demo_dir)
    stamps = {f.name: f.stat().st_mtime_ns for f in path.iterdir()}
    assert ensure_demo_model() == path
    assert {f.name: f.stat().st_mtime_ns for f in path.iterdir()} == stamps
    assert [p.name for p in tmp_path.iterdir()] == ["demo-model"]  # no temp dirs left behind
