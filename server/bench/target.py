"""What a benchmark is pointed at: the server's model card and the tokenizer that goes with it.

Every failure here is a `BenchError`: one line for the user (`pagedserve: error: ...`, exit code 2).
"""

from __future__ import annotations

import functools
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx

from server.errors import PagedServeError

# How the server lists its built-in demo model (server.engine.core.DEMO_MODEL_NAME; not imported,
# as that would load the whole engine into the benchmark client).
DEMO_MODEL_NAME = "pagedserve-demo"


class BenchError(PagedServeError):
    """A benchmark cannot run: unreachable server, no tokenizer, a failed warm-up, a bad flag."""


def http_error_message(exc: httpx.HTTPError, base_url: str | None = None) -> str:
    """One line that says what failed and what to try."""
    if base_url is None:
        try:
            base_url = str(exc.request.url)
        except RuntimeError:  # an error raised outside a request
            base_url = "the server"
    if isinstance(exc, httpx.HTTPStatusError):
        body = exc.response.text.strip().replace("\n", " ")[:200]
        hint = " (pass --api-key)" if exc.response.status_code == 401 else ""
        return f"{exc.request.url} answered HTTP {exc.response.status_code}{hint}: {body}"
    detail = str(exc) or type(exc).__name__
    return f"cannot reach the server at {base_url} ({detail}); is it running? check --base-url"


async def fetch_model_card(client: httpx.AsyncClient, base_url: str, headers: dict[str, str] | None = None) -> dict[str, Any]:
    """The first model of GET /v1/models (`id`, and `root`: the model as the server was given it)."""
    try:
        response = await client.get(base_url.rstrip("/") + "/v1/models", headers=headers or {})
        response.raise_for_status()
        cards = response.json().get("data") or []
    except httpx.HTTPError as exc:
        raise BenchError(http_error_message(exc, base_url)) from exc
    except ValueError as exc:  # not JSON
        raise BenchError(f"{base_url}/v1/models did not answer JSON; is --base-url an OpenAI-compatible server?") from exc
    if not cards:
        raise BenchError(f"{base_url}/v1/models lists no model")
    return cards[0]


async def fetch_model_name(client: httpx.AsyncClient, base_url: str, headers: dict[str, str] | None = None) -> tuple[str, str | None]:
    card = await fetch_model_card(client, base_url, headers)
    return card["id"], card.get("root")


def _load(source: str, local_only: bool):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(source, local_files_only=local_only)


def resolve_tokenizer(tokenizer: str | None, model: str | None, root: str | None):
    """The tokenizer for the benchmark's prompts.

    `--tokenizer` when given (a directory or a Hub id, downloaded if need be); otherwise found from
    what the server names (`root` of /v1/models, then the requested model name): the built-in demo
    model, a directory on this machine, or a Hub id already in the local Hugging Face cache.
    """
    if tokenizer:
        if tokenizer.startswith(("/", ".", "~")) and not Path(tokenizer).expanduser().is_dir():
            raise BenchError(f"--tokenizer {tokenizer}: no such directory")
        try:
            return _load(tokenizer, local_only=False)
        except (OSError, ValueError) as exc:
            raise BenchError(f"cannot load the tokenizer {tokenizer!r} given by --tokenizer: {_first_line(exc)}") from exc
    tried = []
    for name in dict.fromkeys(c for c in (root, model) if c):
        tried.append(name)
        if name == DEMO_MODEL_NAME:
            return _demo_tokenizer()
        try:
            return _load(name, local_only=True)  # a local directory, or a Hub id in the local cache
        except (OSError, ValueError):
            if Path(name).is_dir():
                raise BenchError(f"{name} holds no tokenizer; pass --tokenizer DIR_OR_HUB_ID") from None
    named = " or ".join(repr(t) for t in tried) or "no model"
    raise BenchError(
        f"cannot find the tokenizer of {named}: not the demo model, not a directory on this machine, "
        "not in the local Hugging Face cache; pass --tokenizer DIR_OR_HUB_ID"
    )


def _demo_tokenizer():
    """The tokenizer of what `pagedserve serve` serves without a model (the same choice as the server's)."""
    try:
        from server.demo.default_model import default_model_path
    except ImportError:  # a build without the trained default: the random demo model
        from server.demo import ensure_demo_model as default_model_path
    path = Path(default_model_path())
    if path.suffix == ".gguf":
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name, local_files_only=True)
    return _load(str(path), local_only=True)


def guarded(command: Callable[[Any], int]) -> Callable[[Any], int]:
    """A `pagedserve bench` command whose network, file and subprocess failures end as one-line BenchErrors."""

    @functools.wraps(command)
    def run(ns) -> int:
        try:
            return command(ns)
        except httpx.HTTPError as exc:
            raise BenchError(http_error_message(exc, getattr(ns, "base_url", None))) from exc
        except subprocess.CalledProcessError as exc:
            raise BenchError(f"{exc.cmd[0]} exited with status {exc.returncode}") from exc
        except OSError as exc:
            raise BenchError(_first_line(exc)) from exc

    return run


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:200] if text else type(exc).__name__
