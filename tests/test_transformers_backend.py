"""Architectures without a native implementation run through transformers' own modeling code on our
paged KV cache: greedy output equals transformers' generate token for token (ragged prompts, a shared
prefix hitting the prefix cache, a KV cache small enough to force preemption, a token budget small
enough to force chunked prefill), and --model-impl picks or refuses the path with one clear line."""

from __future__ import annotations

import shutil
import subprocess
import sys

import openai
import pytest
import torch
from api_server import serve_in_subprocess
from test_parity import _prompts, _reference, assert_greedy_parity
from transformers import (
    AutoModelForCausalLM,
    BertConfig,
    BloomConfig,
    Gemma2Config,
    GenerationConfig,
    GPT2Config,
    GptOssConfig,
    Phi3Config,
    T5Config,
)

from server import LLM, SamplingParams
from server.demo import make_tiny_model
from server.errors import ConfigError
from server.runner.models.llama import LlamaForCausalLM
from server.runner.models.registry import get_model_class
from server.runner.models.transformers_backend import TransformersForCausalLM

VOCAB = 512  # the tiny tokenizer's
SMALL = dict(vocab_size=VOCAB, bos_token_id=None, eos_token_id=2, pad_token_id=0, tie_word_embeddings=False)

CONFIGS = {
    # learned absolute positions, Conv1D projections, LayerNorm, GELU, tied embeddings, MHA
    "gpt2": lambda: GPT2Config(
        **{**SMALL, "tie_word_embeddings": True}, n_embd=64, n_layer=2, n_head=4, n_positions=256
    ),
    # fused qkv and gate_up projections, partial rotary, GQA, a sliding window on every layer
    "phi3": lambda: Phi3Config(
        **SMALL, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, partial_rotary_factor=0.5, sliding_window=24,
    ),
    # attention and final logit soft-capping, a scale from query_pre_attn_scalar, sliding and full layers
    "gemma2": lambda: Gemma2Config(
        **SMALL, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, max_position_embeddings=256, sliding_window=20,
        query_pre_attn_scalar=24, attn_logit_softcapping=3.0, final_logit_softcapping=8.0,
    ),
}


def _randomize(model: torch.nn.Module, seed: int) -> None:
    """Larger than transformers' init, norms away from 1 and biases away from 0, so that a dropped
    scale, bias or norm cannot still match the reference."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=gen)
            if param.ndim >= 2:
                param.copy_(0.08 * noise)
            elif name.endswith("bias"):
                param.copy_(0.1 * noise)
            else:
                param.copy_(1.0 + 0.1 * noise)


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("tokenizer"), "llama")


def _save_model(config, tokenizer_dir, out) -> str:
    """A Hub-style checkpoint of ``config`` with random weights and the tiny model's tokenizer."""
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    _randomize(model, seed=1)
    model.generation_config = GenerationConfig.from_pretrained(tokenizer_dir)
    model.save_pretrained(out)
    for path in tokenizer_dir.iterdir():
        if path.name.startswith(("tokenizer", "special_tokens", "vocab", "merges")):
            shutil.copy(path, out)
    return str(out)


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def arch_case(request, tokenizer_dir, tmp_path_factory):
    path = _save_model(CONFIGS[request.param](), tokenizer_dir, tmp_path_factory.mktemp(request.param))
    llm = LLM(
        path,
        dtype="float32",
        max_model_len=256,
        block_size=4,
        num_gpu_blocks_override=56,  # 224 tokens of KV for ~1400 tokens of work: forces preemption
        max_num_batched_tokens=48,  # forces chunked prefill of the longer prompts
        max_num_seqs=16,
    )
    prompts = _prompts(VOCAB)
    return request.param, llm, prompts, _reference(path, prompts)


def test_architectures_without_a_native_model_run_through_transformers(arch_case):
    name, llm, _, _ = arch_case
    assert isinstance(llm.engine.runner.model, TransformersForCausalLM), name


def test_greedy_parity_with_transformers_generate(arch_case):
    name, llm, prompts, expected = arch_case
    assert_greedy_parity(name, llm, prompts, expected)


def test_served_over_http_stream_and_not_match_transformers(tokenizer_dir, tmp_path):
    """`pagedserve serve` picks the transformers backend by itself for GPT-2; the openai SDK's greedy
    completions, streamed and not, carry transformers' tokens."""
    path = _save_model(CONFIGS["gpt2"](), tokenizer_dir, tmp_path / "gpt2")
    prompts = _prompts(VOCAB, seed=2)[:4]
    expected = _reference(path, prompts, max_new=10)
    flags = ("--max-model-len", "256", "--kv-cache-memory", "0.01", "--disable-access-log")
    with serve_in_subprocess(path, *flags) as (url, _pid), openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0) as client:
        for prompt, want in zip(prompts, expected):
            kwargs = dict(model=path, prompt=prompt, max_tokens=10, temperature=0, extra_body={"return_token_ids": True})
            choice = client.completions.create(**kwargs).choices[0]
            assert choice.model_extra["token_ids"] == want
            streamed = "".join(c.choices[0].text for c in client.completions.create(stream=True, **kwargs) if c.choices)
            assert streamed == choice.text


def test_model_impl_transformers_on_llama_matches_the_native_model(tmp_path):
    path = str(make_tiny_model(tmp_path, "llama"))
    prompts = _prompts(VOCAB, seed=1)[:8]
    params = SamplingParams(temperature=0, max_tokens=12)
    outputs = {}
    for impl in ("native", "transformers"):
        llm = LLM(path, dtype="float32", max_model_len=256, block_size=4, max_num_batched_tokens=32, model_impl=impl)
        expected_class = LlamaForCausalLM if impl == "native" else TransformersForCausalLM
        assert type(llm.engine.runner.model) is expected_class
        outputs[impl] = [r.outputs[0].token_ids for r in llm.generate(prompts, params, use_tqdm=False)]
    assert outputs["transformers"] == outputs["native"]


def test_model_impl_native_without_a_native_model_is_one_clear_error(tokenizer_dir, tmp_path):
    path = _save_model(CONFIGS["gpt2"](), tokenizer_dir, tmp_path / "gpt2")
    result = subprocess.run(
        [sys.executable, "-m", "server", "serve", path, "--model-impl", "native"],
        capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 2, result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("pagedserve: error: Unsupported architecture GPT2LMHeadModel"), result.stderr
    assert "--model-impl native" in last and "LlamaForCausalLM" in last and "transformers" in last, last
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize(
    "config, words",
    [
        (BertConfig(architectures=["BertForMaskedLM"]), "encoder-only"),
        (T5Config(architectures=["T5ForConditionalGeneration"]), "encoder-decoder"),
        (GPT2Config(architectures=["NoSuchModelForCausalLM"]), "NoSuchModelForCausalLM"),
        (BloomConfig(architectures=["BloomForCausalLM"]), "pluggable attention"),  # ALiBi inside its own attention
    ],
)
def test_models_transformers_cannot_serve_either_are_one_clear_error(config, words):
    for impl in ("auto", "transformers"):
        with pytest.raises(ConfigError, match="Unsupported architecture") as error:
            get_model_class(config, impl)
        assert words in str(error.value) and "\n" not in str(error.value)


def test_attention_the_kernels_lack_is_refused_at_start_up(tokenizer_dir, tmp_path):
    """gpt-oss adds learned attention sinks (``s_aux``): the start-up probe step refuses it in one line
    instead of serving wrong tokens."""
    config = GptOssConfig(
        **SMALL, hidden_size=64, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, num_local_experts=2, num_experts_per_tok=1, max_position_embeddings=256,
    )
    config.architectures = ["GptOssForCausalLM"]
    config.save_pretrained(tmp_path)
    for path in tokenizer_dir.iterdir():
        if path.name.startswith("tokenizer"):
            shutil.copy(path, tmp_path)
    with pytest.raises(ConfigError, match="GptOssAttention passes attention options the paged kernels do not implement: s_aux"):
        LLM(str(tmp_path), dtype="float32", max_model_len=64, kv_cache_memory=0.01, load_format="dummy")


def test_a_checkpoint_without_weights_is_one_clear_error(tokenizer_dir, tmp_path):
    config = CONFIGS["gpt2"]()
    config.architectures = ["GPT2LMHeadModel"]
    config.save_pretrained(tmp_path)
    for path in tokenizer_dir.iterdir():
        if path.name.startswith("tokenizer"):
            shutil.copy(path, tmp_path)
    with pytest.raises(ConfigError, match="transformers could not load GPT2LMHeadModel from") as error:
        LLM(str(tmp_path), dtype="float32", max_model_len=64, kv_cache_memory=0.01)
    assert "\n" not in str(error.value)


def test_model_impl_vllm_is_an_alias_of_native_and_unknown_values_are_refused():
    from server.config import EngineArgs

    assert EngineArgs(model_impl="vllm").model_impl == "native"
    with pytest.raises(ConfigError, match="--model-impl must be auto, native"):
        EngineArgs.from_kwargs(None, model_impl="hf")
