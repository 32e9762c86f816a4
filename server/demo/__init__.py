"""The default model (trained SmolLM2 when installed), the built-in random demo model and tiny test models."""

from server.demo.builder import (
    DEMO_VERSION,
    TINY_CONFIGS,
    TokenizerCache,
    default_demo_dir,
    ensure_demo_model,
    make_demo_model,
    make_tiny_model,
    train_tokenizer,
)
from server.demo.default_model import default_model_path, installed_trained_model

__all__ = [
    "DEMO_VERSION",
    "TINY_CONFIGS",
    "TokenizerCache",
    "default_demo_dir",
    "default_model_path",
    "ensure_demo_model",
    "installed_trained_model",
    "make_demo_model",
    "make_tiny_model",
    "train_tokenizer",
]
