"""The grammar layer without HTTP: compiling specs (xgrammar, the worker's code), the compiler's cache
and size bound, and the sampler's grammar mask next to free rows."""

from __future__ import annotations

import json

import pytest
import torch
import xgrammar as xgr
from transformers import AutoTokenizer

from server.config import StructuredOutputsConfig
from server.demo import ensure_demo_model
from server.errors import InvalidRequest
from server.request import Request, SamplingParams
from server.runner.sampler import build_sampling_batch, sample
from server.structured.compiler import GrammarCompiler
from server.structured.matcher import GrammarState
from server.structured.spec import GrammarSpec
from server.structured.worker import compile_spec

VOCAB = 2048
EOS = 2


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(str(ensure_demo_model()))


@pytest.fixture(scope="module")
def xgr_compiler(tokenizer):
    return xgr.GrammarCompiler(xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=VOCAB, stop_token_ids=[EOS]))


def _accepts(compiled, text: str) -> bool:
    """The grammar accepts `text` as a whole sentence (not only as a prefix)."""
    matcher = xgr.GrammarMatcher(compiled)
    return matcher.accept_string(text) and matcher.is_completed()


def test_bounded_json_strings_refuse_control_characters(xgr_compiler):
    schema = json.dumps({"type": "object", "properties": {"t": {"type": "string", "maxLength": 4}}, "required": ["t"]})
    compiled = compile_spec(xgr_compiler, "json_schema", schema, False)
    assert _accepts(compiled, '{"t": "ab"}') and _accepts(compiled, '{"t": "a\u00e9"}')
    assert not _accepts(compiled, '{"t": "a\x01"}')  # xgrammar alone lets it through
    assert not _accepts(compiled, '{"t":"ab"}')  # fixed separators by default
    assert _accepts(compile_spec(xgr_compiler, "json_schema", schema, True), '{"t":  \n"ab"}')


def test_choice_and_json_object(xgr_compiler):
    compiled = compile_spec(xgr_compiler, "choice", json.dumps(['say "hi"', "no\\way"]), False)
    assert _accepts(compiled, 'say "hi"') and _accepts(compiled, "no\\way") and not _accepts(compiled, "say")
    obj = compile_spec(xgr_compiler, "json_object", "", False)
    assert _accepts(obj, '{"a": [1, {"b": null}], "c": "x"}') and not _accepts(obj, "[1]")


def test_size_bound_and_cache(tokenizer):
    compiler = GrammarCompiler(tokenizer, VOCAB, (EOS,), StructuredOutputsConfig(max_grammar_bytes=10))
    try:
        with pytest.raises(InvalidRequest, match="more than this server's limit of 10"):
            compiler.submit(GrammarSpec("regex", "a" * 11, param="guided_regex"))
        first = compiler.submit(GrammarSpec("regex", "[ab]+", param="guided_regex"))
        again = compiler.submit(GrammarSpec("regex", "[ab]+", param="structured_outputs.regex"))
        assert again is first  # one compilation per grammar, whichever field it came from
        assert _accepts(first.result(timeout=120), "abba")
    finally:
        compiler.close()


def _request(rid: str, grammar=None, temperature: float = 0.0) -> Request:
    request = Request(rid, [5, 6, 7], SamplingParams(temperature=temperature, max_tokens=8), (EOS,))
    request.grammar = grammar
    return request


def test_grammar_rows_leave_free_rows_token_exact(xgr_compiler):
    compiled = xgr_compiler.compile_regex("[0-9]+")
    torch.manual_seed(0)
    logits = torch.randn(4, VOCAB)
    free = [_request("a"), _request("b", temperature=0.8)]
    alone = sample(logits[:2].clone(), build_sampling_batch(free, VOCAB, torch.device("cpu"), [None, None]),
                   torch.Generator().manual_seed(1))
    mixed_requests = [free[0], _request("g", GrammarState(compiled)), free[1], _request("h", GrammarState(compiled), 1.0)]
    mixed_logits = torch.stack([logits[0], logits[2], logits[1], logits[3]])
    batch = build_sampling_batch(mixed_requests, VOCAB, torch.device("cpu"), [None] * 4)
    tokens = sample(mixed_logits, batch, torch.Generator().manual_seed(1)).tolist()
    assert tokens[0] == alone[0].item()  # greedy free row: unchanged
    for row in (1, 3):
        assert mixed_requests[row].grammar.accept(tokens[row])  # the grammar allowed what was sampled
