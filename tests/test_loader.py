"""Checkpoint resolution (local and Hub cache, offline), config, dtype and weight loading errors."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import httpx2
import huggingface_hub
import pytest
import torch
from huggingface_hub import errors as hub_errors
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, LlamaConfig

from kernels.ops import get_ops
from server.errors import ConfigError
from server.runner.loader import load_hf_config, load_weights, resolve_dtype, resolve_model_path
from server.runner.models.registry import get_model_class

TINY = dict(
    hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
    vocab_size=128, max_position_embeddings=64,
)
SHA_MAIN = "a" * 40
SHA_DEV = "b" * 40


def _save_tiny(path: Path, **save_kwargs) -> torch.nn.Module:
    torch.manual_seed(0)
    hf = AutoModelForCausalLM.from_config(LlamaConfig(**TINY), dtype=torch.float32)
    hf.save_pretrained(path, **save_kwargs)
    return hf


def _build(path: Path):
    cfg = load_hf_config(path)
    return get_model_class(cfg)(cfg, get_ops(torch.device("cpu"), "reference"))


def _add_snapshot(cache: Path, repo: str, sha: str, src: Path, refs: tuple[str, ...]) -> Path:
    """Lay out a snapshot the way huggingface_hub's cache does: content in blobs/, symlinks in snapshots/."""
    root = cache / ("models--" + repo.replace("/", "--"))
    snapshot = root / "snapshots" / sha
    (root / "blobs").mkdir(parents=True, exist_ok=True)
    snapshot.mkdir(parents=True)
    for i, file in enumerate(sorted(src.iterdir())):
        blob = root / "blobs" / f"{sha[:8]}{i:032d}"
        shutil.copyfile(file, blob)
        (snapshot / file.name).symlink_to(Path("../../blobs") / blob.name)
    for ref in refs:
        (root / "refs").mkdir(exist_ok=True)
        (root / "refs" / ref).write_text(sha)
    return snapshot


@pytest.fixture
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("tiny")
    _save_tiny(path)
    return path


@pytest.fixture
def hub_cache(tmp_path, tiny_dir) -> Path:
    cache = tmp_path / "hub"
    _add_snapshot(cache, "org/name", SHA_MAIN, tiny_dir, refs=("main",))
    _add_snapshot(cache, "org/name", SHA_DEV, tiny_dir, refs=("dev",))
    return cache


def test_hub_id_resolves_to_cached_snapshot_offline(offline, hub_cache):
    root = hub_cache / "models--org--name" / "snapshots"
    assert resolve_model_path("org/name", download_dir=str(hub_cache)) == root / SHA_MAIN
    assert resolve_model_path("org/name", revision="main", download_dir=str(hub_cache)) == root / SHA_MAIN
    assert resolve_model_path("org/name", revision="dev", download_dir=str(hub_cache)) == root / SHA_DEV
    assert resolve_model_path("org/name", revision=SHA_DEV, download_dir=str(hub_cache)) == root / SHA_DEV
    path = resolve_model_path("org/name", revision="dev", download_dir=str(hub_cache))
    load_weights(_build(path), path, torch.float32)  # a cached snapshot (symlinks to blobs) loads


def test_uncached_hub_id_offline(offline, hub_cache):
    with pytest.raises(ConfigError, match="not in the local cache") as e:
        resolve_model_path("org/other", download_dir=str(hub_cache))
    assert "HF_HUB_OFFLINE" in str(e.value) and "org/other" in str(e.value)
    with pytest.raises(ConfigError, match="not in the local cache") as e:
        resolve_model_path("org/name", revision="v9", download_dir=str(hub_cache))
    assert "'v9'" in str(e.value)


def _http_error(cls, status):
    response = httpx2.Response(status, request=httpx2.Request("GET", "https://huggingface.co/api/models/org/x"))
    return cls("hub said no", response=response)


@pytest.mark.parametrize(
    "error, words",
    [
        (lambda: _http_error(hub_errors.GatedRepoError, 403), ["gated", "HF_TOKEN", "org/x"]),
        (lambda: _http_error(hub_errors.RepositoryNotFoundError, 404), ["not found", "org/x"]),
        (lambda: _http_error(hub_errors.RevisionNotFoundError, 404), ["Revision", "'nope'", "org/x"]),
        (lambda: _http_error(hub_errors.HfHubHTTPError, 500), ["Could not download", "org/x"]),
    ],
)
def test_hub_errors_become_config_errors(monkeypatch, error, words):
    def fail(*args, **kwargs):
        raise error()

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fail)
    with pytest.raises(ConfigError) as e:
        resolve_model_path("org/x", revision="nope")
    for word in words:
        assert word in str(e.value)


def test_snapshot_download_called_with_filters(monkeypatch, tmp_path, tiny_dir):
    seen = {}

    def fake(repo_id, **kwargs):
        seen.update(kwargs, repo_id=repo_id)
        return str(tiny_dir)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake)
    monkeypatch.setenv("HF_TOKEN", "hf_test")
    assert resolve_model_path("org/x", revision="r1", download_dir=str(tmp_path)) == tiny_dir
    assert seen["repo_id"] == "org/x" and seen["revision"] == "r1" and seen["cache_dir"] == str(tmp_path)
    assert seen["token"] == "hf_test"
    assert "*.safetensors" in seen["allow_patterns"] and "config.json" in seen["allow_patterns"]
    assert "tokenizer.json" in seen["allow_patterns"]


def test_local_directories(tmp_path, tiny_dir):
    assert resolve_model_path(str(tiny_dir)) == tiny_dir.resolve()
    with pytest.raises(ConfigError, match="does not exist"):
        resolve_model_path(str(tmp_path / "no" / "such" / "dir"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="no config.json"):
        resolve_model_path(str(tmp_path / "empty"))


def test_unknown_architecture(tmp_path, tiny_dir):
    config = json.loads((tiny_dir / "config.json").read_text())
    config["architectures"] = ["FooForCausalLM"]
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConfigError, match="Unsupported architecture FooForCausalLM") as e:
        get_model_class(load_hf_config(tmp_path))
    assert "LlamaForCausalLM" in str(e.value) and "Qwen3ForCausalLM" in str(e.value)


def test_unreadable_config(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "no-such-model-type"}))
    with pytest.raises(ConfigError, match="Cannot read the model config"):
        load_hf_config(tmp_path)


def test_missing_safetensors(tmp_path, tiny_dir):
    shutil.copy(tiny_dir / "config.json", tmp_path)
    (tmp_path / "pytorch_model.bin").write_bytes(b"\0")
    with pytest.raises(ConfigError, match="only safetensors checkpoints are supported") as e:
        load_weights(_build(tmp_path), tmp_path, torch.float32)
    assert "pytorch_model.bin" in str(e.value) and "config.json" in str(e.value)


@pytest.mark.parametrize(
    "dropped", ["model.layers.1.self_attn.k_proj.weight", "model.layers.0.mlp.up_proj.weight", "model.norm.weight"]
)
def test_missing_weight(tmp_path, tiny_dir, dropped):
    shutil.copy(tiny_dir / "config.json", tmp_path)
    tensors = load_file(tiny_dir / "model.safetensors")
    del tensors[dropped]
    save_file(tensors, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ConfigError, match="missing weights") as e:
        load_weights(_build(tmp_path), tmp_path, torch.float32)
    assert dropped in str(e.value)


def test_sharded_checkpoint(tmp_path):
    hf = _save_tiny(tmp_path, max_shard_size="40KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    assert len(list(tmp_path.glob("*.safetensors"))) > 1
    model = _build(tmp_path)
    load_weights(model, tmp_path, torch.float32)
    ours = dict(model.named_parameters())
    theirs = dict(hf.named_parameters())
    down = "model.layers.1.mlp.down_proj.weight"
    torch.testing.assert_close(ours[down], theirs[down])
    q, k, v = (theirs[f"model.layers.0.self_attn.{p}_proj.weight"] for p in "qkv")
    torch.testing.assert_close(ours["model.layers.0.self_attn.qkv_proj.weight"], torch.cat([q, k, v]))


def test_load_casts_to_dtype(tiny_dir):
    torch.set_default_dtype(torch.bfloat16)
    try:
        model = _build(tiny_dir)
    finally:
        torch.set_default_dtype(torch.float32)
    load_weights(model, tiny_dir, torch.bfloat16)
    assert model.model.embed_tokens.weight.dtype == torch.bfloat16


def test_resolve_dtype(tiny_dir):
    cfg = load_hf_config(tiny_dir)
    cfg.dtype = torch.bfloat16
    assert resolve_dtype("auto", cfg, torch.device("cpu"), native_bf16=lambda: False) == torch.float32  # test_cpu_dtype.py: the rest
    assert resolve_dtype("auto", cfg, torch.device("cuda")) == torch.bfloat16
    cfg.dtype = "float16"
    assert resolve_dtype("auto", cfg, "cuda") == torch.float16
    assert resolve_dtype("bfloat16", cfg, "cpu") == torch.bfloat16
    assert resolve_dtype("float32", cfg, "cuda") == torch.float32
    with pytest.raises(ConfigError, match="Unknown dtype 'fp8'") as e:
        resolve_dtype("fp8", cfg, "cpu")
    for choice in ("auto", "bfloat16", "float16", "float32"):
        assert choice in str(e.value)


def test_dummy_load_format_fetches_no_weights(monkeypatch, tiny_dir):
    seen = {}

    def fake(repo_id, **kwargs):
        seen.update(kwargs)
        return str(tiny_dir)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake)
    resolve_model_path("org/x", weights=False)
    assert "config.json" in seen["allow_patterns"] and "tokenizer.json" in seen["allow_patterns"]
    assert not any("safetensors" in p for p in seen["allow_patterns"])


def test_dummy_load_format_serves_a_config_without_weights(tmp_path):
    """--load-format dummy: a directory with config and tokenizer only serves, with small seeded random weights."""
    from server import LLM, SamplingParams
    from server.demo import ensure_demo_model

    demo = Path(ensure_demo_model())
    for name in demo.iterdir():
        if name.suffix != ".safetensors":
            shutil.copy(name, tmp_path)
    with pytest.raises(ConfigError, match="No \\*.safetensors weights"):
        LLM(str(tmp_path), dtype="float32", max_model_len=64, kv_cache_memory=0.01)
    llms = [
        LLM(str(tmp_path), dtype="float32", max_model_len=64, kv_cache_memory=0.01, load_format="dummy")
        for _ in range(2)
    ]
    params = [dict(llm.engine.runner.model.named_parameters()) for llm in llms]
    for name, param in params[0].items():
        if param.numel() == 0:  # a linear weight handed to the packed CPU kernel
            continue
        assert param.abs().max() <= 1e-3 and param.abs().max() > 0, name
        assert torch.equal(param, params[1][name]), f"{name}: dummy weights are seeded"
    out = llms[0].generate(["Hello"], SamplingParams(temperature=0, max_tokens=5, ignore_eos=True), use_tqdm=False)
    assert len(out[0].outputs[0].token_ids) == 5
