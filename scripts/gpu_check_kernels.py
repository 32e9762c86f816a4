"""Step 2 of the GPU check: every Triton kernel against its plain-torch twin at real sizes, and the time
of decode attention.

Cases are random paged steps (shuffled block tables, ragged contexts, prefixes ending mid-block,
sliding windows) in bfloat16 and float16; each records the maximum absolute error of the Triton
output against `kernels.reference` and fails above a bound per dtype (the bounds of
tests/test_triton_kernels.py). The KV store must match exactly. The dispatcher
`kernels.triton.paged_attention` picks the decode or the extend kernel, so its cases cover all three.
"""

from __future__ import annotations

import random
from typing import Any

from gpu_check_step import StepContext, synchronize, time_fn

# Error bound per dtype, as in tests/test_triton_kernels.py: |got - want| <= bound + bound * |want| everywhere
# (an output near 4 in bfloat16 is 1/64 apart from its neighbours, so the bound is relative as well).
BOUNDS = {"float32": 2e-5, "float16": 2e-3, "bfloat16": 2e-2}


def _ragged(n: int, max_len: int, seed: int) -> list[tuple[int, int]]:
    """n decode rows with contexts in [1, max_len]: the longest, a full block, one token, then random."""
    rng = random.Random(seed)
    fixed = [max_len, 16 * max(1, max_len // 32), 1, 17]
    return [(1, s) for s in (fixed + [rng.randint(1, max_len) for _ in range(n)])[:n]]


# (query_len, seq_len) per sequence: fresh prefills, chunks over prefixes that end mid-block, decodes.
MIXED_GPU = [(512, 512), (300, 8000), (1, 4097), (77, 1000), (16, 16), (1, 1)]
MIXED_SMOKE = [(5, 5), (1, 33), (20, 51), (3, 16), (17, 17)]

SIZES: dict[str, dict[str, Any]] = {
    "gpu": {
        "head_dim": 128, "heads": (32, 8), "block_size": 16, "kv_store_tokens": 8192,
        "parity": [
            ("decode_b1_ctx8192", "bfloat16", [(1, 8192)], None),
            ("decode_b64_ragged8k", "bfloat16", _ragged(64, 8192, 1), None),
            ("decode_b256_ragged8k", "bfloat16", _ragged(256, 8192, 2), None),
            ("decode_b64_ragged8k_window4096", "bfloat16", _ragged(64, 8192, 3), 4096),
            ("decode_b64_ragged8k_fp16", "float16", _ragged(64, 8192, 4), None),
            ("extend_mixed", "bfloat16", MIXED_GPU, None),
            ("extend_mixed_window1024", "bfloat16", MIXED_GPU, 1024),
            ("extend_mixed_fp16", "float16", MIXED_GPU, None),
            ("extend_prefill2048_over8192", "bfloat16", [(2048, 8192)], None),
        ],
        "splits": ("decode_b4_splits", "bfloat16", [(1, 8192), (1, 8000), (1, 4097), (1, 17)], (1, 8, 64)),
        "bounded": ("decode_b8_ragged300_bound8192", "bfloat16", _ragged(8, 300, 5), 8192),
        "timing_batches": (1, 64, 256), "timing_context": 4096, "timing_warmup": 3, "timing_reps": 20,
    },
    "smoke": {
        "head_dim": 32, "heads": (4, 2), "block_size": 16, "kv_store_tokens": 24,
        "parity": [
            ("decode_b1_ctx40", "bfloat16", [(1, 40)], None),
            ("decode_b4_ragged40", "bfloat16", _ragged(4, 40, 1), None),
            ("decode_b4_ragged40_window7", "bfloat16", _ragged(4, 40, 3), 7),
            ("decode_b4_ragged40_fp16", "float16", _ragged(4, 40, 4), None),
            ("extend_mixed", "bfloat16", MIXED_SMOKE, None),
            ("extend_mixed_window6", "bfloat16", MIXED_SMOKE, 6),
            ("extend_mixed_fp16", "float16", MIXED_SMOKE, None),
        ],
        "splits": ("decode_b2_splits", "bfloat16", [(1, 40), (1, 17)], (1, 3)),
        "bounded": ("decode_b4_ragged20_bound64", "bfloat16", _ragged(4, 20, 5), 64),
        "timing_batches": (1, 2), "timing_context": 32, "timing_warmup": 0, "timing_reps": 1,
    },
}


def _step_metadata(lens: list[tuple[int, int]], block_size: int, device: str, seed: int):
    """A paged step over shuffled blocks: (metadata, number of blocks the caches need)."""
    import torch

    from kernels.metadata import AttentionMetadata

    gen = torch.Generator().manual_seed(seed)
    counts = [-(-s // block_size) for _, s in lens]
    pool = sum(counts) + 1  # one block no sequence owns: the padding entries of the block table point there
    order = torch.randperm(pool, generator=gen)
    table = torch.full((len(lens), max(counts)), int(order[-1]), dtype=torch.int32)
    slots, used = [], 0
    for i, ((query_len, seq_len), count) in enumerate(zip(lens, counts)):
        blocks = order[used : used + count]
        used += count
        table[i, :count] = blocks.to(torch.int32)
        pos = torch.arange(seq_len - query_len, seq_len)
        slots.append(blocks[pos // block_size] * block_size + pos % block_size)
    starts = torch.tensor([0] + [q for q, _ in lens], dtype=torch.int32).cumsum(0, dtype=torch.int32)
    meta = AttentionMetadata(
        slot_mapping=torch.cat(slots).to(device),
        query_start_loc=starts.to(device),
        seq_lens=torch.tensor([s for _, s in lens], dtype=torch.int32, device=device),
        block_tables=table.to(device),
        query_lens_cpu=[q for q, _ in lens],
        seq_lens_cpu=[s for _, s in lens],
        block_size=block_size,
    )
    return meta, pool


def _random(shape, dtype, device: str, seed: int):
    import torch

    gen = torch.Generator(device=device).manual_seed(seed)
    return torch.randn(shape, generator=gen, device=device, dtype=torch.float32).to(dtype)


def _inputs(sizes: dict[str, Any], lens, dtype_name: str, device: str, seed: int):
    import torch

    dtype = getattr(torch, dtype_name)
    num_q, num_kv = sizes["heads"]
    head_dim, block_size = sizes["head_dim"], sizes["block_size"]
    meta, pool = _step_metadata(lens, block_size, device, seed)
    k_cache = _random((pool, block_size, num_kv, head_dim), dtype, device, seed + 1)
    v_cache = _random((pool, block_size, num_kv, head_dim), dtype, device, seed + 2)
    q = _random((sum(q for q, _ in lens), num_q, head_dim), dtype, device, seed + 3)
    return q, k_cache, v_cache, meta


def _errors(got, want, dtype_name: str) -> dict[str, Any]:
    import torch

    bound = BOUNDS[dtype_name]
    err = (got.float() - want.float()).abs()
    excess = float((err - bound - bound * want.float().abs()).max())  # <= 0: within the bound everywhere
    finite = bool(torch.isfinite(got).all())
    return {"status": "ok" if finite and excess <= 0 else "fail", "max_abs_err": float(err.max()),
            "mean_abs_err": float(err.mean()), "bound": bound, "max_excess": excess, "finite": finite}


def _parity(sizes, lens, dtype_name: str, window: int | None, device: str, seed: int) -> dict[str, Any]:
    from kernels import reference
    from kernels.triton.paged_attention import paged_attention

    q, k_cache, v_cache, meta = _inputs(sizes, lens, dtype_name, device, seed)
    scale = sizes["head_dim"] ** -0.5
    got = paged_attention(q, k_cache, v_cache, meta, scale, window)
    want = reference.paged_attention(q, k_cache, v_cache, meta, scale, window)
    synchronize(device)
    kernel = "decode" if all(q_len == 1 for q_len, _ in lens) else "extend"
    return {**_errors(got, want, dtype_name), "kernel": kernel, "dtype": dtype_name, "batch": len(lens),
            "query_tokens": int(q.shape[0]), "max_context": max(s for _, s in lens), "window": window}


def _splits(sizes, spec, device: str) -> dict[str, Any]:
    """The decode kernel with explicit split counts (the dispatcher picks one from the batch size)."""
    import torch

    from kernels import reference
    from kernels.triton.decode_attention import decode_attention

    _, dtype_name, lens, counts = spec
    q, k_cache, v_cache, meta = _inputs(sizes, lens, dtype_name, device, 50)
    scale = sizes["head_dim"] ** -0.5
    want = reference.paged_attention(q, k_cache, v_cache, meta, scale)
    result: dict[str, Any] = {"status": "ok", "dtype": dtype_name, "batch": len(lens), "per_split_count": {}}
    for count in counts:
        out = torch.zeros_like(q)
        decode_attention(q, k_cache, v_cache, out, meta.block_tables, meta.seq_lens, meta.query_start_loc,
                         meta.max_seq_len, scale, None, num_splits=count)
        synchronize(device)
        errors = _errors(out, want, dtype_name)
        result["per_split_count"][str(count)] = errors
        if errors["status"] != "ok":
            result["status"] = "fail"
    return result


def _bounded(sizes, spec, device: str) -> dict[str, Any]:
    """The decode kernel given a bound on the contexts far above the step's own (as a CUDA graph passes
    max_model_len for every replay): the split count comes from the bound, the answer must not change."""
    import torch

    from kernels import reference
    from kernels.triton.decode_attention import decode_attention, num_splits_for

    _, dtype_name, lens, context_bound = spec
    q, k_cache, v_cache, meta = _inputs(sizes, lens, dtype_name, device, 80)
    scale = sizes["head_dim"] ** -0.5
    want = reference.paged_attention(q, k_cache, v_cache, meta, scale)
    out = torch.zeros_like(q)
    decode_attention(q, k_cache, v_cache, out, meta.block_tables, meta.seq_lens, meta.query_start_loc,
                     context_bound, scale)
    synchronize(device)
    splits = num_splits_for(context_bound, sizes["block_size"], len(lens), sizes["heads"][1])
    return {**_errors(out, want, dtype_name), "dtype": dtype_name, "batch": len(lens), "context_bound": context_bound,
            "max_context": max(s for _, s in lens), "num_splits": splits}


def _kv_store(sizes, dtype_name: str, device: str) -> dict[str, Any]:
    """K and V as strided views of a fused QKV row (as the attention layer passes them); padded slots
    (-1) must write nothing; the Triton store must equal the reference store bit for bit."""
    import torch

    from kernels import reference
    from kernels.triton.kv_store import store_kvcache

    dtype = getattr(torch, dtype_name)
    num_q, num_kv = sizes["heads"]
    head_dim, block_size, tokens = sizes["head_dim"], sizes["block_size"], sizes["kv_store_tokens"]
    qkv = _random((tokens, (num_q + 2 * num_kv) * head_dim), dtype, device, 60)
    k = qkv[:, num_q * head_dim : (num_q + num_kv) * head_dim].view(tokens, num_kv, head_dim)
    v = qkv[:, (num_q + num_kv) * head_dim :].view(tokens, num_kv, head_dim)
    num_blocks = -(-2 * tokens // block_size)
    gen = torch.Generator().manual_seed(61)
    slots = torch.randperm(num_blocks * block_size, generator=gen)[:tokens]
    slots[torch.rand(tokens, generator=gen) < 0.05] = -1
    slots = slots.to(device)
    caches = [torch.full((num_blocks, block_size, num_kv, head_dim), 7.0, device=device, dtype=dtype) for _ in range(4)]
    reference.store_kvcache(k, v, caches[0], caches[1], slots)
    store_kvcache(k, v, caches[2], caches[3], slots)
    synchronize(device)
    equal = torch.equal(caches[2], caches[0]) and torch.equal(caches[3], caches[1])
    return {"status": "ok" if equal else "fail", "equal": equal, "dtype": dtype_name, "tokens": tokens,
            "padded_slots": int((slots < 0).sum())}


def _decode_time(sizes, batch: int, device: str) -> dict[str, Any]:
    import torch

    from kernels.triton.decode_attention import decode_attention

    context = sizes["timing_context"]
    q, k_cache, v_cache, meta = _inputs(sizes, [(1, context)] * batch, "bfloat16", device, 70)
    out = torch.zeros_like(q)
    scale = sizes["head_dim"] ** -0.5

    def call():
        decode_attention(q, k_cache, v_cache, out, meta.block_tables, meta.seq_lens, meta.query_start_loc,
                         meta.max_seq_len, scale)

    times = sorted(time_fn(call, device, warmup=sizes["timing_warmup"], reps=sizes["timing_reps"]))
    median = times[len(times) // 2]
    _, num_kv = sizes["heads"]
    kv_bytes = 2 * batch * context * num_kv * sizes["head_dim"] * k_cache.element_size()
    return {"batch": batch, "context": context, "dtype": "bfloat16", "median_ms": round(median * 1e3, 4),
            "min_ms": round(times[0] * 1e3, 4), "kv_bytes": kv_bytes, "kv_gbs": round(kv_bytes / median / 1e9, 1)}


def run(ctx: StepContext) -> None:
    from kernels.triton.dot_mode import interpreting

    if ctx.device != "cuda" and not interpreting():
        ctx.finish("skip", "no CUDA device, and TRITON_INTERPRET is not set (on CPU the Triton kernels run only "
                           "under Triton's interpreter: TRITON_INTERPRET=1)")
        return
    try:
        import triton  # noqa: F401
    except ImportError as exc:
        ctx.finish("skip", f"triton is not importable: {exc}")
        return
    sizes = SIZES["smoke" if ctx.smoke else "gpu"]
    ctx.results["interpreted"] = interpreting()
    for dtype_name in ("bfloat16", "float16"):
        ctx.case(f"kv_store_{dtype_name}", lambda d=dtype_name: _kv_store(sizes, d, ctx.device), need_s=2)
    for seed, (name, dtype_name, lens, window) in enumerate(sizes["parity"]):
        ctx.case(name, lambda lens=lens, d=dtype_name, w=window, s=seed: _parity(sizes, lens, d, w, ctx.device, 10 * s),
                 need_s=3)
    for batch in sizes["timing_batches"]:
        ctx.case(f"decode_time_b{batch}", lambda b=batch: _decode_time(sizes, b, ctx.device), need_s=3)
    ctx.case(sizes["splits"][0], lambda: _splits(sizes, sizes["splits"], ctx.device), need_s=3)
    ctx.case(sizes["bounded"][0], lambda: _bounded(sizes, sizes["bounded"], ctx.device), need_s=3)

    checked = [r for k, r in ctx.results.items() if isinstance(r, dict) and not k.startswith("decode_time")]
    passed = sum(r.get("status") == "ok" for r in checked)
    worst = {}
    for r in checked:
        if "max_abs_err" in r:
            worst[r["dtype"]] = max(worst.get(r["dtype"], 0.0), r["max_abs_err"])
    ctx.summary.append(f"{passed}/{len(checked)} kernel cases within bounds" + "".join(
        f"; largest abs error {d} {e:.2e} (bound {BOUNDS[d]:.0e} + {BOUNDS[d]:.0e}·|ref|)" for d, e in worst.items()))
    timings = [r for k, r in ctx.results.items() if k.startswith("decode_time") and r.get("status") == "ok"]
    if timings:
        ctx.summary.append(f"decode attention (bf16, context {sizes['timing_context']}): " + ", ".join(
            f"b{r['batch']} {r['median_ms']:.3f} ms ({r['kv_gbs']} GB/s of KV)" for r in timings))
    ctx.finish()
