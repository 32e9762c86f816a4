"""The `pagedserve` command: start-up errors are one clear line and exit code 2; flags parse as vLLM's."""

from __future__ import annotations

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
    ],
)
def test_bad_start_up_input_is_one_clear_error(args, words):
    result = run(*args)
    assert result.returncode == 2, result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("pagedserve: error:") and words in last, result.stderr
    assert "Traceback" not in result.stderr


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
