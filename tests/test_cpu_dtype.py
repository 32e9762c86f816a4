"""bfloat16 on CPU: the grouped decode attention against its float32 reference, bfloat16 logits and greedy
tokens against float32 ones on the same weights, and which dtype `--dtype auto` picks on CPU and why."""

from __future__ import annotations

import logging

import pytest
import torch
from kernel_cases import random_step

from kernels import batched, cpu_linear, reference
from kernels.metadata import AttentionMetadata
from server.config import CacheConfig, ModelConfig, SchedulerConfig
from server.demo import make_tiny_model
from server.runner.loader import load_hf_config, resolve_dtype
from server.runner.model_runner import ModelRunner

DECODE_CASES = [
    [(1, 5), (1, 33), (1, 1), (1, 64)],  # decode only, ragged contexts
    [(7, 7), (1, 20), (3, 40), (1, 9)],  # decodes beside prefill chunks
]


@pytest.mark.parametrize("lens", DECODE_CASES)
@pytest.mark.parametrize("heads", [(4, 4), (8, 2)])
@pytest.mark.parametrize("window", [None, 6])
@pytest.mark.parametrize("softcap", [None, 1.5])
def test_grouped_decode_attention_in_float32_matches_the_reference(lens, heads, window, softcap):
    """The bfloat16 decode path's math, run in float32 so that it must agree to rounding."""
    num_q, num_kv = heads
    meta = random_step(0, 4, 64, lens)
    plan = batched.plan_decode(meta)
    gen = torch.Generator().manual_seed(2)
    k_cache = torch.randn(64, 4, num_kv, 16, generator=gen)
    v_cache = torch.randn(64, 4, num_kv, 16, generator=gen)
    q = torch.randn(sum(q for q, _ in lens), num_q, 16, generator=gen)
    k = k_cache.index_select(0, plan.block_tables.reshape(-1)).view(len(plan.rows), plan.max_len, num_kv, 16).transpose(1, 2)
    v = v_cache.index_select(0, plan.block_tables.reshape(-1)).view(len(plan.rows), plan.max_len, num_kv, 16).transpose(1, 2)
    positions = torch.arange(plan.max_len)
    last = (plan.seq_lens - 1).unsqueeze(1)
    mask = positions <= last
    if window is not None:
        mask &= positions > last - window
    got = batched._grouped_decode_attention(q.index_select(0, plan.rows), k, v, mask, 0.25, softcap)
    want = reference.paged_attention(q, k_cache, v_cache, meta, 0.25, window, softcap).index_select(0, plan.rows)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("lens", DECODE_CASES)
@pytest.mark.parametrize("softcap", [None, 1.5])
def test_batched_attention_in_bfloat16_is_within_bfloat16_rounding_of_float32(lens, softcap):
    """Same bfloat16 inputs; the float32 reference on them is the truth. Tolerance: 2e-2 absolute on
    outputs of size ~1 (bfloat16 keeps 8 bits of mantissa: ~4e-3 relative per rounding)."""
    meta = random_step(1, 4, 64, lens)
    gen = torch.Generator().manual_seed(3)
    k_cache = torch.randn(64, 4, 2, 16, generator=gen).bfloat16()
    v_cache = torch.randn(64, 4, 2, 16, generator=gen).bfloat16()
    q = torch.randn(sum(q for q, _ in lens), 8, 16, generator=gen).bfloat16()
    got = batched.paged_attention(q, k_cache, v_cache, meta, 0.25, None, softcap)
    assert got.dtype == torch.bfloat16
    want = reference.paged_attention(q.float(), k_cache.float(), v_cache.float(), meta, 0.25, None, softcap)
    torch.testing.assert_close(got.float(), want, atol=2e-2, rtol=2e-2)


def _runner(path: str, dtype: str) -> ModelRunner:
    config = ModelConfig(model=path, path=path, dtype=dtype, max_model_len=128, served_model_names=("t",),
                         attention_backend="batched", use_tqdm_on_load=False)
    return ModelRunner(config, CacheConfig(block_size=4, num_blocks_override=64), SchedulerConfig(max_model_len=128),
                       load_hf_config(path))


@torch.inference_mode()
def _teacher_forced_logits(runner: ModelRunner, prompts: list[list[int]], forced: list[list[int]]) -> torch.Tensor:
    """Prefill every prompt in one step, then decode the `forced` tokens of all sequences together, one
    step per token (the batched decode path); the logits of every step, [steps, seqs, vocab] in float32."""
    blocks_per_seq = 16
    tables = torch.arange(len(prompts) * blocks_per_seq, dtype=torch.int32).view(len(prompts), blocks_per_seq)
    contexts = [list(p) for p in prompts]
    logits = []
    for step in range(len(forced[0]) + 1):
        ids, positions, slots, query_lens = [], [], [], []
        for i, context in enumerate(contexts):
            new = range(len(context)) if step == 0 else [len(context) - 1]
            ids += [context[p] for p in new]
            positions += list(new)
            slots += [int(tables[i, p // 4]) * 4 + p % 4 for p in new]
            query_lens.append(len(new))
        starts = torch.tensor([0, *query_lens], dtype=torch.int32).cumsum(0, dtype=torch.int32)
        meta = AttentionMetadata(
            slot_mapping=torch.tensor(slots), query_start_loc=starts,
            seq_lens=torch.tensor([len(c) for c in contexts], dtype=torch.int32), block_tables=tables,
            query_lens_cpu=query_lens, seq_lens_cpu=[len(c) for c in contexts], block_size=4,
        )
        hidden = runner.model(torch.tensor(ids), torch.tensor(positions), runner.kv_caches, meta)
        logits.append(runner.model.compute_logits(hidden[starts[1:].long() - 1]).float())
        if step < len(forced[0]):
            for context, tokens in zip(contexts, forced):
                context.append(tokens[step])
    return torch.stack(logits)


def test_bfloat16_logits_and_greedy_tokens_follow_float32_on_the_same_weights(tmp_path):
    """A float32 tiny model served in float32 and in bfloat16 (weights, activations, KV cache), fed the same
    tokens (float32's greedy choices) for a prefill and 12 batched decode steps. Weights drawn at std 0.1 (not
    0.02) so that attention matters: a wrong head grouping then moves logits by ~100%. Stated tolerance:
    every logit within 5% of the largest float32 logit (measured: 1.9%); greedy tokens must agree wherever
    float32's top-1 leads its runner-up by more than twice the largest logit error seen (measured: 65% of
    the steps; near-ties of a random model may flip, 96% of all tokens agreed)."""
    path = str(make_tiny_model(tmp_path / "m", "llama", initializer_range=0.1))
    fp32, bf16 = _runner(path, "float32"), _runner(path, "bfloat16")
    assert bf16.kv_caches[0][0].dtype == torch.bfloat16 and bf16.model.lm_head.weight.dtype == torch.bfloat16
    gen = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, 200, (n,), generator=gen).tolist() for n in (5, 9, 14, 20)]
    forced = torch.randint(3, 200, (len(prompts), 12), generator=gen).tolist()
    want = _teacher_forced_logits(fp32, prompts, forced)
    got = _teacher_forced_logits(bf16, prompts, forced)
    error = (got - want).abs().max()
    assert error <= 0.05 * want.abs().max(), (error, want.abs().max())
    top2 = want.topk(2, dim=-1).values
    clear = (top2[..., 0] - top2[..., 1]) > 2 * error
    assert clear.float().mean() > 0.5, "the test needs clear decisions to check"
    assert torch.equal(got.argmax(-1)[clear], want.argmax(-1)[clear])


class _Config:
    def __init__(self, dtype):
        self.dtype = dtype


@pytest.mark.parametrize("checkpoint", [torch.bfloat16, "float16", None, torch.float32])
def test_auto_on_cpu_is_bfloat16_where_the_cpu_has_native_bfloat16(checkpoint, caplog):
    with caplog.at_level(logging.INFO, logger="server.runner.loader"):
        assert resolve_dtype("auto", _Config(checkpoint), "cpu", native_bf16=lambda: True) == torch.bfloat16
    assert "--dtype auto: bfloat16 on CPU" in caplog.text and "native bfloat16" in caplog.text


def test_auto_on_cpu_is_float32_without_native_bfloat16_injected_fault(caplog):
    with caplog.at_level(logging.INFO, logger="server.runner.loader"):
        assert resolve_dtype("auto", _Config(torch.bfloat16), "cpu", native_bf16=lambda: False) == torch.float32
    assert "--dtype auto: float32 on CPU (the CPU has no native bfloat16" in caplog.text


def test_auto_on_cpu_says_how_to_keep_a_float32_checkpoint_in_float32(caplog):
    with caplog.at_level(logging.INFO, logger="server.runner.loader"):
        assert resolve_dtype("auto", _Config(torch.float32), "cpu", native_bf16=lambda: True) == torch.bfloat16
    assert "the checkpoint is float32 and the CPU has native bfloat16; --dtype float32 keeps it" in caplog.text
    assert resolve_dtype("auto", _Config(torch.float32), "cpu", native_bf16=lambda: False) == torch.float32


def test_a_named_dtype_and_accelerators_ignore_the_cpu_check():
    def never_asked() -> bool:
        raise AssertionError("only auto on CPU asks")

    assert resolve_dtype("float32", _Config(torch.bfloat16), "cpu", native_bf16=never_asked) == torch.float32
    assert resolve_dtype("auto", _Config(torch.float32), "cuda", native_bf16=never_asked) == torch.float32


def test_native_bf16_is_what_torch_reports_for_this_cpu():
    assert cpu_linear.native_bf16() == (torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())


def test_cpuinfo_flags_are_read_from_a_fake_cpuinfo_file(tmp_path):
    fake = tmp_path / "cpuinfo"
    fake.write_text("processor\t: 0\nflags\t\t: fpu avx2 avx512f avx512_bf16\n")
    assert cpu_linear._cpuinfo_has_flags({"avx512_bf16", "amx_bf16"}, str(fake))
    fake.write_text("processor\t: 0\nflags\t\t: fpu avx2 avx512f\n")
    assert not cpu_linear._cpuinfo_has_flags({"avx512_bf16", "amx_bf16"}, str(fake))
    assert not cpu_linear._cpuinfo_has_flags({"avx512_bf16"}, str(tmp_path / "missing"))
