"""Step 4 of the GPU check: benchmarks, recorded and not asserted, on random (`load_format="dummy"`)
weights of real shapes, through the offline engine (`server.LLM`'s EngineCore, driven step by step:
no HTTP, no tokenizer work on the prompts, which are token ids).

- `llama8b`: Llama-3.1-8B's shape in bfloat16. Decode TPOT at batch 1 beside the weight-read floor
  (bytes of weights streamed per step / the env step's measured bandwidth), then 500 ShareGPT-like
  requests (server.bench.datasets' length mix) added at once: output tokens per second, with the
  generation time capped.
- `qwen3`: Qwen3-0.6B's shape (qk-norm, tied embeddings): decode TPOT at concurrency 1 and its floor.
"""

from __future__ import annotations

import gc
import random
import shutil
import statistics
import time
from pathlib import Path
from typing import Any

from gpu_check_env import COPY_BYTES
from gpu_check_step import StepContext, bandwidth_from_context, copy_bandwidth

LLAMA_8B = {"architecture": "LlamaForCausalLM", "model_type": "llama", "hidden_size": 4096, "intermediate_size": 14336,
            "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8, "vocab_size": 128256,
            "max_position_embeddings": 131072, "rms_norm_eps": 1e-5, "tie_word_embeddings": False,
            "rope_parameters": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                "original_max_position_embeddings": 8192, "rope_theta": 500000.0}}
QWEN3_06B = {"architecture": "Qwen3ForCausalLM", "model_type": "qwen3", "hidden_size": 1024, "intermediate_size": 3072,
             "num_hidden_layers": 28, "num_attention_heads": 16, "num_key_value_heads": 8, "head_dim": 128,
             "vocab_size": 151936, "max_position_embeddings": 40960, "rms_norm_eps": 1e-6, "tie_word_embeddings": True,
             "use_sliding_window": False, "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0}}
TOY = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
       "num_key_value_heads": 2, "vocab_size": 1024}

SIZES: dict[str, dict[str, Any]] = {
    "gpu": {
        # max_model_len = the step budget, so the start-up memory profile covers the largest step
        "llama8b": {"config": LLAMA_8B, "engine": {"max_model_len": 8192, "max_num_seqs": 256, "max_num_batched_tokens": 8192},
                    "tpot": {"prompt_len": 128, "decode_steps": 128}, "throughput": {"prompts": 500, "cap_s": 90.0}},
        "qwen3": {"config": QWEN3_06B, "engine": {"max_model_len": 4096, "max_num_seqs": 16},
                  "tpot": {"prompt_len": 128, "decode_steps": 256}, "eager_tpot": True},
    },
    "smoke": {
        # a fixed KV cache: on a GPU, 90 % of its memory in blocks of a toy model would be millions of blocks
        "llama8b": {"config": {**LLAMA_8B, **TOY}, "engine": {"max_model_len": 256, "max_num_seqs": 16, "num_gpu_blocks_override": 256},
                    "tpot": {"prompt_len": 16, "decode_steps": 8}, "throughput": {"prompts": 16, "cap_s": 5.0}},
        "qwen3": {"config": {**QWEN3_06B, **TOY, "head_dim": 32},
                  "engine": {"max_model_len": 256, "max_num_seqs": 4, "num_gpu_blocks_override": 64},
                  "tpot": {"prompt_len": 16, "decode_steps": 8}, "eager_tpot": True},
    },
}


def write_dummy_model(out: Path, spec: dict[str, Any]) -> Path:
    """config.json of `spec` plus the byte-level tokenizer of server.demo's tiny models (ids past it
    decode to nothing); no weights: the engine draws them (load_format="dummy")."""
    from transformers import AutoConfig

    from server.demo import make_tiny_model

    spec = dict(spec)
    architecture, model_type = spec.pop("architecture"), spec.pop("model_type")
    tiny = make_tiny_model(out.parent / "tokenizer-source", "llama")
    out.mkdir(parents=True, exist_ok=True)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
                 "generation_config.json"):
        if (tiny / name).is_file():
            shutil.copy(tiny / name, out / name)
    config = AutoConfig.for_model(model_type, bos_token_id=None, eos_token_id=2, pad_token_id=0, **spec)
    config.architectures = [architecture]
    config.save_pretrained(out)
    return out


def streamed_weight_bytes(hf_config, element_size: int) -> dict[str, Any]:
    """Bytes of weights one decode step reads, from the config's shapes: every weight once, the output
    projection included, except the input embedding table (a gather of one row per sequence) unless it
    is tied to the output projection (then it is read once, as that)."""
    hidden, inter, layers = hf_config.hidden_size, hf_config.intermediate_size, hf_config.num_hidden_layers
    num_q, num_kv = hf_config.num_attention_heads, hf_config.num_key_value_heads
    head_dim = getattr(hf_config, "head_dim", None) or hidden // num_q
    qk_norm = 2 * head_dim if hf_config.model_type == "qwen3" else 0
    per_layer = hidden * (num_q + 2 * num_kv) * head_dim + num_q * head_dim * hidden + 3 * hidden * inter + 2 * hidden + qk_norm
    table = hf_config.vocab_size * hidden
    streamed = layers * per_layer + hidden + table  # layers, final norm, output projection
    tied = bool(getattr(hf_config, "tie_word_embeddings", False))
    parameters = streamed if tied else streamed + table
    return {"parameters": parameters, "streamed_parameters": streamed, "tied_embeddings": tied,
            "streamed_bytes": streamed * element_size}


def _prompt(rng: random.Random, n: int, vocab: int) -> list[int]:
    return [rng.randrange(3, vocab) for _ in range(n)]


def decode_tpot(llm, prompt_len: int, decode_steps: int, seed: int = 0) -> dict[str, Any]:
    """One request alone: the wall time of each engine step after the first (prefill) one."""
    from server import SamplingParams
    from server.engine.messages import GenerateRequest

    engine, vocab = llm.engine, llm.engine.hf_config.vocab_size
    rng = random.Random(seed)
    llm.generate([_prompt(rng, 16, vocab)], SamplingParams(temperature=0, max_tokens=4, ignore_eos=True), use_tqdm=False)
    params = SamplingParams(temperature=0, max_tokens=decode_steps + 1, ignore_eos=True)
    engine.add_request(GenerateRequest("tpot", _prompt(rng, prompt_len, vocab), params, time.monotonic()))
    times: list[float] = []
    while len(times) <= decode_steps + 8:
        started = time.perf_counter()
        outputs, _ = engine.step()
        times.append(time.perf_counter() - started)
        if any(o.finished for o in outputs):
            break
    decode = times[1:]
    return {"prompt_len": prompt_len, "decode_steps": len(decode), "first_step_ms": round(times[0] * 1e3, 3),
            "tpot_median_ms": round(statistics.median(decode) * 1e3, 4), "tpot_mean_ms": round(statistics.mean(decode) * 1e3, 4),
            "tpot_min_ms": round(min(decode) * 1e3, 4)}


def sharegpt_throughput(llm, prompts: int, max_model_len: int, cap_s: float, seed: int = 0) -> dict[str, Any]:
    """`prompts` ShareGPT-like requests added at once; steps until all finish or `cap_s` passes."""
    from server import SamplingParams
    from server.bench.datasets import sharegpt_lengths
    from server.engine.messages import GenerateRequest

    engine, vocab = llm.engine, llm.engine.hf_config.vocab_size
    rng = random.Random(seed)
    lengths = sharegpt_lengths(prompts, seed, max_total=max_model_len)
    now = time.monotonic()
    for i, (input_len, output_len) in enumerate(lengths):
        params = SamplingParams(temperature=0, max_tokens=output_len, ignore_eos=True)
        engine.add_request(GenerateRequest(f"sharegpt-{i}", _prompt(rng, input_len, vocab), params, now))
    made = finished = steps = peak_running = 0
    capped = False
    started = time.perf_counter()
    while finished < len(lengths):
        if time.perf_counter() - started > cap_s:
            capped = True
            break
        outputs, stats = engine.step()
        steps += 1
        peak_running = max(peak_running, stats.num_running)
        made += sum(len(o.token_ids) for o in outputs)
        finished += sum(o.finished for o in outputs)
    elapsed = time.perf_counter() - started
    return {"requests": len(lengths), "finished": finished, "capped": capped, "cap_s": round(cap_s, 1),
            "input_tokens": sum(i for i, _ in lengths), "expected_output_tokens": sum(o for _, o in lengths),
            "output_tokens": made, "elapsed_s": round(elapsed, 2), "steps": steps, "peak_running": peak_running,
            "output_tok_s": round(made / elapsed, 1), "request_s": round(finished / elapsed, 2)}


def _startup(ctx: StepContext, model_dir: Path, engine_args: dict[str, Any], holder: dict[str, Any]) -> dict[str, Any]:
    from server import LLM

    started = time.perf_counter()
    dtype = "float32" if ctx.device == "cpu" else "bfloat16"  # CPU smoke: the CPU's own fast path
    holder["llm"] = llm = LLM(str(model_dir), dtype=dtype, load_format="dummy", seed=0, **engine_args)
    phases = getattr(llm.engine, "startup_phases", None)
    element_size = 4 if dtype == "float32" else 2
    return {"seconds_to_ready": round(time.perf_counter() - started, 2), "dtype": dtype, "engine_args": engine_args,
            "kv_cache_blocks": llm.engine.runner.num_blocks, "block_size": llm.engine.cache_config.block_size,
            "startup_phases": phases() if callable(phases) else phases,
            **streamed_weight_bytes(llm.engine.hf_config, element_size)}


def _release(ctx: StepContext, holder: dict[str, Any]) -> None:
    """Drop the engine (its KV cache, CUDA graphs and compiled code) before another one starts."""
    import torch

    holder.pop("llm", None)
    gc.collect()
    torch._dynamo.reset()
    if ctx.device == "cuda":
        torch.cuda.empty_cache()


def _tpot_case(ctx: StepContext, key: str, holder: dict[str, Any], sizes, startup, gbs: float) -> dict[str, Any]:
    def tpot():
        result = decode_tpot(holder["llm"], **sizes["tpot"])
        floor_ms = startup["streamed_bytes"] / (gbs * 1e9) * 1e3
        return {**result, "floor_ms": round(floor_ms, 4), "ratio_to_floor": round(result["tpot_median_ms"] / floor_ms, 2)}

    return ctx.case(key, tpot, need_s=5)


def run(ctx: StepContext, which: str) -> None:
    sizes = SIZES["smoke" if ctx.smoke else "gpu"][which]
    model_dir = ctx.work / which
    built = ctx.case("model", lambda: {"path": str(write_dummy_model(model_dir, sizes["config"])),
                                       "config": {k: v for k, v in sizes["config"].items() if k != "rope_parameters"}})
    if built["status"] != "ok":
        ctx.finish("error", "could not write the model's config")
        return
    gbs, source = bandwidth_from_context(ctx)
    if gbs is None:
        measured = copy_bandwidth(ctx.device, COPY_BYTES[ctx.device])
        gbs, source = measured["median_gbs"], "measured in this step"
    ctx.results["bandwidth"] = {"gbs": gbs, "source": source}

    holder: dict[str, Any] = {}
    startup = ctx.case("startup", lambda: _startup(ctx, model_dir, sizes["engine"], holder), need_s=20)
    if startup["status"] != "ok":
        ctx.finish("error", "the engine did not start")
        return
    tpot = _tpot_case(ctx, "tpot_batch1", holder, sizes, startup, gbs)
    if tpot["status"] == "ok":
        ctx.summary.append(
            f"{which}: ready in {startup['seconds_to_ready']} s; TPOT at batch 1 {tpot['tpot_median_ms']:.3f} ms "
            f"(median of {tpot['decode_steps']}), weight-read floor {tpot['floor_ms']:.3f} ms "
            f"({startup['streamed_bytes'] / 1e9:.3g} GB at {gbs:.0f} GB/s): {tpot['ratio_to_floor']:.2f}x the floor")
    if "throughput" in sizes:
        spec = sizes["throughput"]

        def throughput():
            cap = min(spec["cap_s"], ctx.left() - 5)
            return sharegpt_throughput(holder["llm"], spec["prompts"], sizes["engine"]["max_model_len"], cap)

        result = ctx.case(f"sharegpt_{spec['prompts']}", throughput, need_s=15)
        if result["status"] == "ok":
            ctx.summary.append(
                f"{which}: {result['requests']} ShareGPT-like requests at once: {result['output_tok_s']:.0f} output tok/s "
                f"({result['finished']}/{result['requests']} done in {result['elapsed_s']} s"
                + (f", capped at {result['cap_s']} s" if result["capped"] else "") + ")")
    if sizes.get("eager_tpot"):  # the same TPOT without compile and CUDA graphs: what they buy at batch 1
        _release(ctx, holder)
        eager_args = {**sizes["engine"], "enforce_eager": True}
        eager = ctx.case("startup_eager", lambda: _startup(ctx, model_dir, eager_args, holder), need_s=25)
        if eager["status"] == "ok":
            result = _tpot_case(ctx, "tpot_batch1_eager", holder, sizes, eager, gbs)
            if result["status"] == "ok":
                ctx.summary.append(f"{which} with enforce_eager: TPOT at batch 1 {result['tpot_median_ms']:.3f} ms "
                                   f"({result['ratio_to_floor']:.2f}x the floor)")
    ctx.finish()  # the process ends here, and the engine's memory with it
