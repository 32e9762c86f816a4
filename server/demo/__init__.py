"""Built-in demo model and tiny test models (random weights, real architectures)."""

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

__all__ = [
    "DEMO_VERSION",
    "TINY_CONFIGS",
    "TokenizerCache",
    "default_demo_dir",
    "ensure_demo_model",
    "make_demo_model",
    "make_tiny_model",
    "train_tokenizer",
]
