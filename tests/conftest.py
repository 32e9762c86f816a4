"""Shared fixtures. The API tests share one real server (tests/api_server.py) for the whole session.

Without a GPU the Triton kernels run under Triton's CPU interpreter; it is chosen when a kernel is
defined, so the variable is set here, before any test imports them."""

import os

import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

from api_server import api_server, offline_llm  # noqa: E402, F401  (fixtures)
