"""Engine start-up: the tokenizer loads on a thread beside the weights; its errors still stop start-up
as they did, and the CPU KV cache is lazily zeroed memory that reads as zeros."""

from __future__ import annotations

import pytest

from server.config import EngineArgs
from server.demo import ensure_demo_model
from server.engine.core import EngineCore
from server.errors import ConfigError

FLAGS = {"dtype": "float32", "max_model_len": 256, "kv_cache_memory": 0.05}


def test_a_missing_chat_template_still_stops_start_up_with_its_config_error(tmp_path):
    missing = tmp_path / "absent.jinja"
    with pytest.raises(ConfigError, match=f"--chat-template {missing}: no such file"):
        EngineCore(EngineArgs(model=str(ensure_demo_model()), chat_template=str(missing), **FLAGS))


def test_the_engine_has_its_tokenizer_and_a_zeroed_cpu_kv_cache():
    core = EngineCore(EngineArgs(model=str(ensure_demo_model()), **FLAGS))
    try:
        assert core.tokenizer.encode("hello world")
        assert core.eos_token_ids
        key, value = core.runner.kv_caches[0]
        assert key.device.type == "cpu" and not key.any() and not value.any()
    finally:
        core.close()
