"""Our models, loaded from an HF checkpoint, give transformers' logits through the paged KV cache."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, MistralConfig, Qwen2Config, Qwen3Config

from kernels.metadata import AttentionMetadata
from kernels.ops import get_ops
from server.runner.loader import load_hf_config, load_weights, resolve_model_path
from server.runner.models.registry import get_model_class, kv_cache_shape_info

TINY = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    vocab_size=300,
    max_position_embeddings=64,
    rms_norm_eps=1e-6,
)
LLAMA3_ROPE = {
    "rope_type": "llama3",
    "rope_theta": 10000.0,
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 16,
}
YARN_ROPE = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 2.0, "original_max_position_embeddings": 32}

CONFIGS = {
    "llama-gqa-llama3-rope": lambda: LlamaConfig(**TINY, num_key_value_heads=2, rope_parameters=LLAMA3_ROPE),
    "llama-mha-tied": lambda: LlamaConfig(**TINY, num_key_value_heads=4, tie_word_embeddings=True),
    "llama-attention-bias": lambda: LlamaConfig(**TINY, num_key_value_heads=2, attention_bias=True, mlp_bias=True),
    "mistral-sliding-window": lambda: MistralConfig(**TINY, num_key_value_heads=2, sliding_window=5),
    "mistral-no-window": lambda: MistralConfig(**TINY, num_key_value_heads=1, sliding_window=None),
    "qwen2-bias-tied": lambda: Qwen2Config(**TINY, num_key_value_heads=2, tie_word_embeddings=True),
    "qwen2-sliding-layers": lambda: Qwen2Config(
        **TINY, num_key_value_heads=2, use_sliding_window=True, sliding_window=4, max_window_layers=1
    ),
    "qwen3-head-dim": lambda: Qwen3Config(**TINY, num_key_value_heads=2, head_dim=32),
    "qwen3-bias-yarn-mha": lambda: Qwen3Config(
        **TINY, num_key_value_heads=4, head_dim=24, attention_bias=True, rope_parameters=YARN_ROPE,
        tie_word_embeddings=True,
    ),
}

NUM_BLOCKS = 16
PROMPT_LEN = 13
TOTAL_LEN = 17  # prompt + 4 decode steps


def _build_hf(config, tmp_path):
    torch.manual_seed(0)
    hf = AutoModelForCausalLM.from_config(config, attn_implementation="eager", dtype=torch.float32).eval()
    with torch.no_grad():  # larger than HF's init, and no all-ones norms or all-zero biases to hide mistakes
        for name, param in hf.named_parameters():
            param.normal_(1.0 if "norm" in name else 0.0, 0.1)
    hf.save_pretrained(tmp_path, safe_serialization=True)
    return hf


def _build_ours(path):
    cfg = load_hf_config(resolve_model_path(str(path)))
    model = get_model_class(cfg)(cfg, get_ops(torch.device("cpu"), "reference"))
    load_weights(model, path, torch.float32)
    return model.eval(), cfg


def _alloc_cache(cfg, block_size):
    num_layers, num_kv_heads, head_dim = kv_cache_shape_info(cfg)
    shape = (NUM_BLOCKS, block_size, num_kv_heads, head_dim)
    return [(torch.full(shape, float("nan")), torch.full(shape, float("nan"))) for _ in range(num_layers)]


class Seq:
    """One sequence: its tokens, its (shuffled) blocks and how many tokens the cache holds."""

    def __init__(self, tokens, blocks):
        self.tokens, self.blocks, self.computed = tokens, blocks, 0


def make_step(chunks, block_size):
    """chunks: [(Seq, n)] -> (input_ids, positions, meta) scheduling the next n tokens of each Seq."""
    ids, positions, slots, qsl, seq_lens, query_lens = [], [], [], [0], [], []
    max_blocks = max(len(seq.blocks) for seq, _ in chunks)
    tables = []
    for seq, n in chunks:
        start, end = seq.computed, seq.computed + n
        ids += seq.tokens[start:end].tolist()
        positions += list(range(start, end))
        slots += [seq.blocks[p // block_size] * block_size + p % block_size for p in range(start, end)]
        qsl.append(qsl[-1] + n)
        seq_lens.append(end)
        query_lens.append(n)
        tables.append(seq.blocks + [0] * (max_blocks - len(seq.blocks)))
        seq.computed = end
    meta = AttentionMetadata(
        slot_mapping=torch.tensor(slots, dtype=torch.int64),
        query_start_loc=torch.tensor(qsl, dtype=torch.int32),
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32),
        block_tables=torch.tensor(tables, dtype=torch.int32),
        query_lens_cpu=query_lens,
        seq_lens_cpu=seq_lens,
        block_size=block_size,
    )
    return torch.tensor(ids, dtype=torch.int64), torch.tensor(positions, dtype=torch.int64), meta


@pytest.fixture(scope="module", params=list(CONFIGS))
def models(request, tmp_path_factory):
    path = tmp_path_factory.mktemp(request.param)
    hf = _build_hf(CONFIGS[request.param](), path)
    ours, cfg = _build_ours(path)
    gen = torch.Generator().manual_seed(1)
    tokens_a = torch.randint(0, cfg.vocab_size, (TOTAL_LEN,), generator=gen)
    tokens_b = torch.randint(0, cfg.vocab_size, (12,), generator=gen)
    with torch.no_grad():
        ref_a = hf(tokens_a[None]).logits[0].float()
        ref_b = hf(tokens_b[None]).logits[0].float()
    return ours, cfg, (tokens_a, ref_a), (tokens_b, ref_b)


def _seqs(block_size, *token_lists):
    perm = torch.randperm(NUM_BLOCKS, generator=torch.Generator().manual_seed(2)).tolist()
    seqs = []
    for tokens in token_lists:
        n = -(-len(tokens) // block_size)
        seqs.append(Seq(tokens, perm[:n]))
        perm = perm[n:]
    return seqs


def _run(model, kv_caches, chunks, block_size):
    ids, positions, meta = make_step(chunks, block_size)
    with torch.no_grad():
        hidden = model(ids, positions, kv_caches, meta)
        logits = model.compute_logits(hidden)
    assert hidden.shape == (len(ids), model.config.hidden_size)
    assert logits.dtype == torch.float32
    return logits


def _close(actual, expected):
    torch.testing.assert_close(actual, expected, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("block_size", [4, 16])
def test_full_prompt_one_pass(models, block_size):
    model, cfg, (tokens, ref), _ = models
    (seq,) = _seqs(block_size, tokens)
    logits = _run(model, _alloc_cache(cfg, block_size), [(seq, TOTAL_LEN)], block_size)
    _close(logits, ref)


@pytest.mark.parametrize("block_size", [4, 16])
def test_chunked_prefill_then_decode(models, block_size):
    model, cfg, (tokens, ref), _ = models
    (seq,) = _seqs(block_size, tokens)
    kv_caches = _alloc_cache(cfg, block_size)
    for n in (5, 6, 2):  # crosses block boundaries mid-chunk
        start = seq.computed
        _close(_run(model, kv_caches, [(seq, n)], block_size), ref[start : start + n])
    while seq.computed < TOTAL_LEN:
        start = seq.computed
        _close(_run(model, kv_caches, [(seq, 1)], block_size), ref[start : start + 1])


@pytest.mark.parametrize("block_size", [4, 16])
def test_mixed_batch_prefill_and_decode(models, block_size):
    model, cfg, (tokens_a, ref_a), (tokens_b, ref_b) = models
    seq_a, seq_b = _seqs(block_size, tokens_a, tokens_b)
    kv_caches = _alloc_cache(cfg, block_size)
    _close(_run(model, kv_caches, [(seq_b, 10)], block_size), ref_b[:10])
    logits = _run(model, kv_caches, [(seq_a, 7), (seq_b, 1)], block_size)  # prefill chunk + decode
    _close(logits[:7], ref_a[:7])
    _close(logits[7:], ref_b[10:11])
    logits = _run(model, kv_caches, [(seq_b, 1), (seq_a, 10)], block_size)  # decode + last chunk
    _close(logits[:1], ref_b[11:12])
    _close(logits[1:], ref_a[7:])


def test_padding_rows_are_ignored(models):
    """A negative slot (padding token) writes nothing; rows past the last sequence come back finite."""
    model, cfg, (tokens, ref), _ = models
    (seq,) = _seqs(4, tokens)
    ids, positions, meta = make_step([(seq, 6)], 4)
    ids, positions = torch.cat([ids, ids[:2]]), torch.cat([positions, positions[:2]])
    meta.slot_mapping = torch.cat([meta.slot_mapping, torch.tensor([-1, -1])])
    with torch.no_grad():
        logits = model.compute_logits(model(ids, positions, _alloc_cache(cfg, 4), meta))
    _close(logits[:6], ref[:6])
    assert torch.isfinite(logits[6:]).all()


def test_kv_cache_shape_info():
    cfg = Qwen3Config(**TINY, num_key_value_heads=2, head_dim=32)
    assert kv_cache_shape_info(cfg) == (2, 2, 32)
    cfg = LlamaConfig(**TINY)
    assert kv_cache_shape_info(cfg) == (2, 4, 16)
