"""Step 3 of the GPU check: greedy output of the offline `server.LLM` against transformers' `generate` on
the same random-weight Llama, in the same dtype, for each way the engine can run the model:

- `eager`: `enforce_eager=True`;
- `compiled`: torch.compile'd forward without CUDA graphs (`compilation_config` level 3, `cuda_graph_sizes [0]`);
- `graphs`: the defaults (on CUDA: compiled, with CUDA graphs for decode batches).

float32 must match token for token; bfloat16 agreement is recorded, not asserted. The prompts mix
lengths, share prefixes (prefix-cache hits), include one longer than the step's token budget (chunked
prefill over a prefix that ends mid-block) and ask for different output lengths, so decode batches
shrink step by step through the CUDA-graph sizes and their padding. A mode whose engine flags do not
exist yet in `EngineArgs` is recorded as not available.
"""

from __future__ import annotations

import dataclasses
import gc
import json
import random
from pathlib import Path
from typing import Any

from gpu_check_step import StepContext

SIZES: dict[str, dict[str, Any]] = {
    # head_dim 128 (8 query / 2 KV heads of hidden 1024), as in real checkpoints
    "gpu": {"model": {"hidden_size": 1024, "intermediate_size": 2816, "num_hidden_layers": 4, "num_attention_heads": 8,
                      "num_key_value_heads": 2, "vocab_size": 4096, "max_position_embeddings": 2048},
            "prompt_lens": (1, 5, 16, 17, 31, 64, 90, 130, 600), "shared_prefix": 45, "suffixes": (1, 7, 20, 33),
            "max_new": (48, 40, 32, 24, 16, 8), "max_num_batched_tokens": 256, "max_num_seqs": 16, "num_blocks": 512},
    "smoke": {"model": {},  # the tiny Llama of server.demo (hidden 64, head_dim 16, 2 layers)
              "prompt_lens": (1, 5, 17, 40), "shared_prefix": 20, "suffixes": (1, 7),
              "max_new": (8, 6, 4), "max_num_batched_tokens": 16, "max_num_seqs": 8, "num_blocks": 64},
}
ORDER = (("float32", "eager"), ("float32", "graphs"), ("float32", "compiled"),
         ("bfloat16", "graphs"), ("bfloat16", "eager"), ("bfloat16", "compiled"))


def _prompts(sizes: dict[str, Any], vocab: int) -> tuple[list[list[int]], list[int]]:
    rng = random.Random(0)

    def tokens(n: int) -> list[int]:
        return [rng.randrange(3, vocab) for _ in range(n)]  # 0..2 are the special tokens

    prefix = tokens(sizes["shared_prefix"])
    prompts = [tokens(n) for n in sizes["prompt_lens"]] + [prefix + tokens(n) for n in sizes["suffixes"]] + [prefix]
    max_new = [sizes["max_new"][i % len(sizes["max_new"])] for i in range(len(prompts))]
    return prompts, max_new


def _field_type(name: str) -> str:
    from server.config import EngineArgs

    return next(str(f.type) for f in dataclasses.fields(EngineArgs) if f.name == name)


def _compile_args(level: int) -> dict[str, Any] | None:
    """The engine arguments for a compilation level, by whichever field EngineArgs has (None: none)."""
    from server.config import EngineArgs

    fields = EngineArgs.field_names()
    if "compilation_config" in fields:
        kind = _field_type("compilation_config")
        value = {"level": level} if "dict" in kind or "Any" in kind else json.dumps({"level": level})
        return {"compilation_config": value}
    if "compilation_level" in fields:
        return {"compilation_level": level}
    return None


def mode_args(mode: str) -> tuple[dict[str, Any] | None, str]:
    """(engine arguments, what they mean) for a mode; None arguments: not available in this build."""
    from server.config import EngineArgs

    graphs = "cuda_graph_sizes" in EngineArgs.field_names()
    if mode == "eager":
        return {"enforce_eager": True}, "enforce_eager=True"
    if mode == "compiled":
        compiled = _compile_args(3)
        if compiled is None:
            return None, "not available: EngineArgs has no compilation_config (nor compilation_level)"
        return {**compiled, **({"cuda_graph_sizes": [0]} if graphs else {})}, "compiled, no CUDA graphs"
    if not graphs:
        return None, "not available: EngineArgs has no cuda_graph_sizes"
    return {}, "the defaults (compiled + CUDA graphs on CUDA)"


def _reference(model_dir: Path, prompts, max_new, dtype_name: str, device: str) -> list[list[int]]:
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=getattr(torch, dtype_name)).to(device).eval()
    outputs = []
    with torch.inference_mode():
        for prompt, n in zip(prompts, max_new):
            ids = torch.tensor([prompt], device=device)
            out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=n,
                                 temperature=None, top_p=None, top_k=None)
            outputs.append(out[0, len(prompt):].tolist())
    del model
    _free(device)
    return outputs


def _free(device: str) -> None:
    """Release an engine's memory, and Dynamo's compiled code with it: each engine compiles afresh (a
    process-wide cache limit could otherwise send a later engine silently back to eager)."""
    import torch

    gc.collect()
    torch._dynamo.reset()
    if device == "cuda":
        torch.cuda.empty_cache()


def _ours(model_dir: Path, prompts, max_new, dtype_name: str, args: dict[str, Any], sizes, device: str):
    """Our greedy outputs, and the engine's start-up phases (compile and cuda_graphs show what ran)."""
    from server import LLM, SamplingParams

    llm = LLM(str(model_dir), dtype=dtype_name, max_model_len=1024, block_size=16,
              max_num_batched_tokens=sizes["max_num_batched_tokens"], max_num_seqs=sizes["max_num_seqs"],
              num_gpu_blocks_override=sizes["num_blocks"], **args)
    try:
        phases = getattr(llm.engine, "startup_phases", None)
        phases = phases() if callable(phases) else phases
        results = llm.generate(prompts, [SamplingParams(temperature=0, max_tokens=n) for n in max_new], use_tqdm=False)
        return [r.outputs[0].token_ids for r in results], phases
    finally:
        del llm
        _free(device)


def compare(ours: list[list[int]], want: list[list[int]]) -> dict[str, Any]:
    """Exact sequences, the first divergence, and token agreement (tokens up to each sequence's first
    divergence, over all reference tokens)."""
    agreed, first = 0, None
    for i, (a, b) in enumerate(zip(ours, want)):
        same = next((j for j, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
        agreed += same
        if (a != b) and first is None:
            first = {"prompt": i, "position": same, "ours": a[same : same + 4], "reference": b[same : same + 4]}
    total = sum(len(b) for b in want)
    exact = sum(a == b for a, b in zip(ours, want))
    return {"sequences": len(want), "exact_sequences": exact, "mismatches": len(want) - exact,
            "token_agreement": round(agreed / max(total, 1), 4), "first_mismatch": first}


def run(ctx: StepContext) -> None:
    from server.demo import make_tiny_model

    sizes = SIZES["smoke" if ctx.smoke else "gpu"]
    model_dir = ctx.work / "llama"
    built = ctx.case("model", lambda: {"path": str(make_tiny_model(model_dir, "llama", **sizes["model"])),
                                       "config": sizes["model"] or "server.demo tiny llama"})
    if built["status"] != "ok":
        ctx.finish("error", "could not build the model")
        return
    from transformers import AutoConfig

    prompts, max_new = _prompts(sizes, AutoConfig.from_pretrained(model_dir).vocab_size)
    ctx.results["prompts"] = {"count": len(prompts), "lengths": [len(p) for p in prompts], "max_new_tokens": max_new}
    references: dict[str, list[list[int]]] = {}
    for dtype_name, mode in ORDER:
        key = f"{dtype_name}/{mode}"
        args, meaning = mode_args(mode)
        if args is None:
            ctx.skip(key, meaning)
            continue
        if ctx.device != "cuda" and mode != "eager":
            def validate(d=dtype_name, a=args, m=meaning):
                from server.config import EngineArgs

                EngineArgs.from_kwargs(str(model_dir), dtype=d, **a)  # the arguments are still checked
                return {"status": "skip", "reason": f"needs CUDA ({m}); its engine arguments {a} were validated"}

            ctx.case(key, validate)
            continue
        if dtype_name not in references:
            ref = ctx.case(f"{dtype_name}/transformers",
                           lambda d=dtype_name: {"outputs": _reference(model_dir, prompts, max_new, d, ctx.device)},
                           need_s=10)
            if ref["status"] != "ok":
                continue
            references[dtype_name] = ref.pop("outputs")

        def one(d=dtype_name, a=args, m=meaning):
            ours, phases = _ours(model_dir, prompts, max_new, d, a, sizes, ctx.device)
            result = {"args": a, "meaning": m, "startup_phases": phases, **compare(ours, references[d])}
            if d == "float32" and result["mismatches"]:
                result["status"] = "fail"  # bfloat16 agreement is recorded, not asserted
            return result

        ctx.case(key, one, need_s=15)
    import torch

    # an engine that lowered float32 matmuls to TF32 process-wide would show here (and in the mismatches)
    ctx.results["float32_matmul_precision_after"] = torch.get_float32_matmul_precision()
    for key, r in ctx.results.items():
        if isinstance(r, dict) and "token_agreement" in r:
            ran = [p for p in ("compile", "cuda_graphs") if p in (r.get("startup_phases") or {})]
            ctx.summary.append(f"{key}: {r['exact_sequences']}/{r['sequences']} sequences equal to transformers, "
                               f"token agreement {r['token_agreement']:.1%} ({' + '.join(ran) or 'eager'})")
        elif isinstance(r, dict) and r.get("status") == "skip":
            ctx.summary.append(f"{key}: skipped ({r['reason']})")
    ctx.finish()
