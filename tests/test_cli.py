"""The `pagedserve` command: start-up errors are one clear line and exit code 2; flags parse as vLLM's."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from server.cli import build_parser, split_args
from server.errors import ConfigError


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "server", *args], capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize(
    "args, words",
    [
        (["serve", "--dtype", "float64"], "dtype"),
        (["serve", "/nonexistent/model/dir"], "/nonexistent/model/dir"),
        (["serve", "--max-num-seqs", "0"], "max-num-seqs"),
        (["serve", "--port", "70000"], "port"),
        (["serve", "--attention-backend", "flash"], "attention-backend"),
    ],
)
def test_bad_start_up_input_is_one_clear_error(args, words):
    result = run(*args)
    assert result.returncode == 2, result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("pagedserve: error:") and words in last, result.stderr
    assert "Traceback" not in result.stderr


def test_the_triton_backend_without_cuda_is_one_clear_error():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run(
        [sys.executable, "-m", "server", "serve", "--device", "cpu", "--attention-backend", "triton"],
        capture_output=True, text=True, timeout=300, env=env,
    )
    assert result.returncode == 2, result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("pagedserve: error: --attention-backend triton") and "CUDA" in last, result.stderr


def test_make_demo_model_writes_a_hub_style_directory(tmp_path):
    result = run("make-demo-model", str(tmp_path / "demo"))
    assert result.returncode == 0, result.stderr
    names = {p.name for p in (tmp_path / "demo").iterdir()}
    assert {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= names


def test_serve_flags_are_named_like_vllm():
    ns = build_parser().parse_args(
        ["serve", "some/model", "--served-model-name", "a", "b", "--max-model-len", "1024", "--no-enable-prefix-caching",
         "--kv-cache-memory", "1.5", "--max-num-batched-tokens", "512", "--api-key", "k", "--shutdown-timeout", "5"]
    )
    engine, server = split_args(ns)
    assert engine.model == "some/model" and engine.served_names("some/model") == ("a", "b")
    assert engine.max_model_len == 1024 and engine.enable_prefix_caching is False and engine.kv_cache_memory == 1.5
    assert engine.max_num_batched_tokens == 512 and server.api_key == "k" and server.shutdown_timeout == 5
    with pytest.raises(ConfigError):
        split_args(build_parser().parse_args(["serve", "--gpu-memory-utilization", "1.5"]))


@pytest.mark.parametrize(
    "given, canonical",
    [("half", "float16"), ("fp16", "float16"), ("float16", "float16"), ("bf16", "bfloat16"), ("bfloat16", "bfloat16"),
     ("float", "float32"), ("fp32", "float32"), ("float32", "float32"), ("auto", "auto")],
)
def test_dtype_aliases_become_canonical_names_at_the_edge(given, canonical):
    engine, _ = split_args(build_parser().parse_args(["serve", "--dtype", given]))
    assert engine.dtype == canonical
    assert engine.model_config("m", "/m", 2048, "cpu").dtype == canonical


def test_a_dtype_alias_loads_the_model():
    """vLLM's `float` (and the like) used to pass validation and fail in the loader, after the download."""
    import torch

    from server.config import EngineArgs
    from server.demo import ensure_demo_model
    from server.engine.core import EngineCore

    core = EngineCore(EngineArgs(model=str(ensure_demo_model()), dtype="fp32", max_model_len=256, kv_cache_memory=0.05))
    assert core.runner.dtype == torch.float32


def test_unknown_dtype_names_every_accepted_spelling():
    with pytest.raises(ConfigError) as e:
        split_args(build_parser().parse_args(["serve", "--dtype", "int8"]))
    for name in ("auto", "bfloat16", "bf16", "float16", "half", "fp16", "float32", "float", "fp32"):
        assert name in str(e.value)


@pytest.mark.parametrize(
    "flags, engine_bound, scheduler_bound",
    [
        ([], 256, 256),  # 2 x the default --max-num-seqs 128
        (["--max-num-seqs", "4"], 8, 8),
        (["--max-num-seqs", "4", "--max-queued-requests", "50"], 50, 50),
        (["--max-queued-requests", "-1"], -1, None),  # unbounded, on request
    ],
)
def test_the_server_queue_is_bounded_by_default(flags, engine_bound, scheduler_bound):
    engine, _ = split_args(build_parser().parse_args(["serve", *flags]))
    assert engine.max_queued_requests == engine_bound
    assert engine.scheduler_config(2048).max_queued_requests == scheduler_bound


def test_the_offline_engine_args_keep_an_unbounded_queue():
    from server.config import EngineArgs

    assert EngineArgs().scheduler_config(2048).max_queued_requests is None


@pytest.mark.parametrize("bound", ["0", "-2"])
def test_a_queue_bound_below_one_other_than_minus_one_is_refused(bound):
    with pytest.raises(ConfigError, match="max-queued-requests"):
        split_args(build_parser().parse_args(["serve", "--max-queued-requests", bound]))


@pytest.mark.parametrize(
    "host, key, warned",
    [
        ("0.0.0.0", None, True), ("::", None, True), ("10.1.2.3", None, True), ("my-host.internal", None, True),
        ("0.0.0.0", "k", False), ("127.0.0.1", None, False), ("127.8.9.10", None, False), ("::1", None, False),
        ("[::1]", None, False), ("localhost", None, False),
    ],
)
def test_a_public_address_without_an_api_key_is_warned_about(host, key, warned):
    from server.api.serve import open_access_warning

    warning = open_access_warning(host, key)
    assert (warning is not None) == warned
    if warned:
        assert host in warning and "--api-key" in warning and "PAGEDSERVE_API_KEY" in warning


def test_the_cli_default_host_is_loopback():
    _, server = split_args(build_parser().parse_args(["serve"]))
    assert server.host == "127.0.0.1"
