"""-O3: the model forward through torch.compile (Inductor's C++ backend here) equals the eager forward,
compiles once for every batch size, and decodes greedily as transformers does; -O's parsing.

One engine per attention backend (batched, reference, triton) is compiled for the whole module (a cold compile of a 2-layer model
takes tens of seconds on two cores), into a per-module compile cache directory.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from kernel_cases import random_step
from test_parity import _prompts, _reference, assert_greedy_parity
from torch._dynamo.utils import counters

from kernels.metadata import plan_decode
from server import LLM
from server.cli import build_parser, split_args
from server.config import CompilationConfig, EngineArgs, parse_compilation_config
from server.demo import make_tiny_model
from server.errors import ConfigError
from server.runner.compile import CACHE_DIR_ENV

MAX_NEW = 8
# fp32: the compiled graph fuses and reorders float ops (reductions in RMSNorm, softmax) differently.
ATOL, RTOL = 2e-5, 1e-4


@pytest.fixture(scope="module")
def tiny_qwen3(tmp_path_factory):
    """Qwen3 (qk-norm, GQA), two layers: the smallest model that has every op of the family."""
    return make_tiny_model(tmp_path_factory.mktemp("qwen3"), "qwen3-gqa", num_hidden_layers=2)


@pytest.fixture(scope="module", params=["batched", "reference", "triton"])
def compiled_llm(request, tiny_qwen3, tmp_path_factory):
    """On CPU the triton backend's kernels run under Triton's interpreter (conftest.py); its op takes
    every bound from shapes (no host sync), a different dispatch from the eager one it is checked against."""
    if request.param == "triton":
        pytest.importorskip("triton", reason="triton is a test dependency: pip install -e '.[test]'")
    cache_dir = tmp_path_factory.mktemp("compile-cache")
    with pytest.MonkeyPatch.context() as env:  # the engine sets TORCHINDUCTOR_CACHE_DIR; restore it after
        env.delenv(CACHE_DIR_ENV, raising=False)
        graphs_before = counters["stats"]["unique_graphs"]
        llm = LLM(
            str(tiny_qwen3), dtype="float32", max_model_len=256, block_size=16, num_gpu_blocks_override=16,
            max_num_batched_tokens=48, max_num_seqs=8, attention_backend=request.param,
            compilation_config={"level": 3, "cache_dir": str(cache_dir)},
        )
        assert counters["stats"]["unique_graphs"] - graphs_before == 1, "start-up (decodes, a prefill) compiled twice"
        yield request.param, llm, cache_dir


def _steps(hf_config):
    """(lens, ids, positions) of mixed steps: decodes, prefills, chunked prefills, both at once."""
    for lens in ([(1, 5)], [(9, 9)], [(1, 5), (1, 33), (1, 17)], [(4, 20), (1, 9), (16, 40), (1, 2)], [(1, 64)] * 3):
        ids = torch.randint(3, hf_config.vocab_size, (sum(q for q, _ in lens),))
        positions = torch.cat([torch.arange(s - q, s) for q, s in lens])
        yield lens, ids, positions


def test_compiled_forward_equals_eager_forward(compiled_llm):
    backend, llm, _ = compiled_llm
    runner = llm.engine.runner
    assert runner.compiled is not None and runner.attention_backend == backend
    torch.manual_seed(0)
    for lens, ids, positions in _steps(runner.hf_config):
        meta = random_step(1, 16, runner.num_blocks, lens)
        if backend == "batched":
            meta.decode = plan_decode(meta)
        eager_caches = [(k.clone().normal_(), v.clone().normal_()) for k, v in runner.kv_caches]
        compiled_caches = [(k.clone(), v.clone()) for k, v in eager_caches]
        with torch.inference_mode():
            want = runner.model(ids, positions, eager_caches, meta)
            got = runner.compiled(ids, positions, compiled_caches, meta)
        torch.testing.assert_close(got, want, atol=ATOL, rtol=RTOL, msg=lambda m, lens=lens: f"{backend} {lens}: {m}")
        for (k_want, v_want), (k_got, v_got) in zip(eager_caches, compiled_caches):  # the op wrote the same K/V
            torch.testing.assert_close(k_got, k_want, atol=ATOL, rtol=RTOL)
            torch.testing.assert_close(v_got, v_want, atol=ATOL, rtol=RTOL)


def test_batch_sizes_do_not_recompile(compiled_llm):
    """Decode batches of 1..64 sequences and prefills of a few lengths run on the graph of start-up
    (warm_up reads block 0 and writes no slot, so any batch fits the 16-block cache). Under Triton's
    interpreter a few sizes stand for all (the graph does not depend on the backend's kernels)."""
    backend, llm, _ = compiled_llm
    runner = llm.engine.runner
    graphs_before = counters["stats"]["unique_graphs"]
    for prefill in (2, 7, 31, 48):
        decode = ([1, 2, 3, 17, 64] if backend == "triton" else list(range(1, 65))) if prefill == 2 else []
        runner.compiled.warm_up(decode, prefill, runner.kv_caches, 16, with_decode_plan=backend == "batched")
    assert counters["stats"]["unique_graphs"] == graphs_before, dict(counters["stats"])


def test_compiled_greedy_output_equals_transformers(compiled_llm, tiny_qwen3):
    backend, llm, _ = compiled_llm
    if backend == "triton":
        pytest.skip("slow under Triton's interpreter; the compiled triton step is checked against the eager one above")
    everything = _prompts(llm.engine.hf_config.vocab_size)
    prompts = [everything[i] for i in (0, 5, 7, 11, 13, 15, 17)]
    graphs_before = counters["stats"]["unique_graphs"]
    assert_greedy_parity(f"qwen3-gqa/{backend}/-O3", llm, prompts, _reference(tiny_qwen3, prompts, MAX_NEW))
    assert counters["stats"]["unique_graphs"] == graphs_before, "serving compiled again after start-up"


def test_start_up_times_compile_and_warm_up_and_fills_the_cache_dir(compiled_llm):
    _, llm, cache_dir = compiled_llm
    phases = llm.engine.startup_phases()
    assert phases["compile"] > 0 and phases["warmup"] > 0
    assert any(cache_dir.rglob("*")), "no compiled artifact was written to the cache directory"


RESTART = """
import json, sys
from torch._dynamo.utils import counters
from server import LLM
path, backend, cache_dir = sys.argv[1:]
llm = LLM(path, dtype="float32", max_model_len=256, block_size=16, num_gpu_blocks_override=16, max_num_batched_tokens=48,
          max_num_seqs=8, attention_backend=backend, compilation_config={"level": 3, "cache_dir": cache_dir})
print(json.dumps({**counters["inductor"], **llm.engine.startup_phases()}))
"""


def test_a_restart_loads_the_compiled_graph_from_the_cache_dir(compiled_llm, tiny_qwen3):
    """A new process with the same model and flags finds the graph in the cache directory: Inductor's
    FX-graph cache hits and nothing is compiled again."""
    backend, _, cache_dir = compiled_llm
    if backend != "batched":
        pytest.skip("one backend shows it")
    env = {k: v for k, v in os.environ.items() if k != CACHE_DIR_ENV}
    result = subprocess.run(
        [sys.executable, "-c", RESTART, str(tiny_qwen3), backend, str(cache_dir)],
        check=False, capture_output=True, text=True, timeout=300, env={**env, "OMP_WAIT_POLICY": "PASSIVE"},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    stats = json.loads(result.stdout.strip().splitlines()[-1])
    assert stats.get("fxgraph_cache_hit", 0) >= 1 and stats.get("fxgraph_cache_miss", 0) == 0, stats


def test_eager_engine_has_no_compile_phase(tiny_qwen3):
    llm = LLM(str(tiny_qwen3), dtype="float32", max_model_len=64, num_gpu_blocks_override=8, compilation_config=0)
    assert llm.engine.runner.compiled is None
    assert "compile" not in llm.engine.startup_phases() and "warmup" not in llm.engine.startup_phases()


# ---- -O / --compilation-config -------------------------------------------------------------


@pytest.mark.parametrize(
    "argv, want",
    [
        (["-O3"], CompilationConfig(level=3)),
        (["-O0"], CompilationConfig(level=0)),
        (["-O", "3"], CompilationConfig(level=3)),
        (["--compilation-config", '{"level": 3, "cache_dir": "/tmp/c"}'], CompilationConfig(level=3, cache_dir="/tmp/c")),
        (["--compilation-config", "{}"], CompilationConfig()),
        ([], CompilationConfig()),
    ],
)
def test_compilation_flags_parse_as_vllm(argv, want):
    engine, _ = split_args(build_parser().parse_args(["serve", *argv]))
    assert parse_compilation_config(engine.compilation_config) == want
    config = engine.model_config("m", "/m", 2048, "cpu")
    assert (config.compilation_level, config.compile_cache_dir) == (want.level, want.cache_dir)


@pytest.mark.parametrize(
    "value, words",
    [
        ("{level: 3}", "JSON object"),  # not JSON
        ('{"level": 3, "mode": 2}', "unknown key(s) 'mode'"),
        ("2", "level must be 0 (eager) or 3"),
        ('{"level": 1}', "level must be 0 (eager) or 3"),
        ('{"level": "3"}', "level must be 0 (eager) or 3"),
        ("[3]", "JSON object"),
        ('{"cache_dir": 5}', "cache_dir must be a directory path"),
    ],
)
def test_bad_compilation_config_is_one_clear_error(value, words):
    with pytest.raises(ConfigError, match="compilation-config") as raised:
        split_args(build_parser().parse_args(["serve", "--compilation-config", value]))
    assert words in str(raised.value)


def test_a_bad_compilation_config_stops_the_server_in_one_line():
    result = subprocess.run(
        [sys.executable, "-m", "server", "serve", "-O", '{"level": 3, "mode": 1}'],
        check=False, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 2, result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("pagedserve: error: -O/--compilation-config") and "'mode'" in last, result.stderr
    assert "Traceback" not in result.stderr


def test_o3_with_the_transformers_backend_is_one_clear_error(tiny_qwen3):
    """transformers' modeling code stays eager: asked for -O3 it is refused, by default it runs eagerly."""
    with pytest.raises(ConfigError, match="-O3 compiles native models only"):
        LLM(str(tiny_qwen3), dtype="float32", max_model_len=64, num_gpu_blocks_override=8, model_impl="transformers",
            compilation_config=3)
    llm = LLM(str(tiny_qwen3), dtype="float32", max_model_len=64, num_gpu_blocks_override=8, model_impl="transformers")
    assert llm.engine.runner.compiled is None


def test_enforce_eager_turns_compile_off():
    args = EngineArgs(compilation_config=3, enforce_eager=True)
    args.validate()
    assert args.model_config("m", "/m", 2048, "cuda").compilation_level == 0
