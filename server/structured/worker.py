"""The grammar compiler's worker process: compiles one GrammarSpec at a time with xgrammar and sends
the compiled grammar back serialised. It runs as its own process (started with the server's Python,
whatever program embeds the server) so that a slow compilation can be killed at its deadline without
touching the server."""

from __future__ import annotations

import json
import re
from multiprocessing.connection import Connection

_CPP_PREFIX = re.compile(r"^\[[\d:]+\] [^:\s]+:\d+: ")


def clean_error(exc: BaseException) -> str:
    """xgrammar's message without its C++ time stamp and source location."""
    return _CPP_PREFIX.sub("", str(exc).strip()) or type(exc).__name__


def choice_ebnf(choices: list[str]) -> str:
    """An EBNF grammar whose sentences are exactly `choices` (JSON string escapes are EBNF's too)."""
    return "root ::= " + " | ".join(json.dumps(choice) for choice in choices)


# xgrammar writes strings with a length bound as [^"\\\r\n]{m,n}, which lets raw control characters
# through (invalid JSON: json.loads and the openai SDK refuse them); its unbounded strings exclude them.
_BOUNDED_STRING_CHAR = r'[^\"\\\r\n]'
_JSON_STRING_CHAR = r'[^\0-\x1f\"\\\r\n]'


def json_ebnf(schema: str, any_whitespace: bool, strict: bool) -> str:
    """The EBNF of a JSON schema, with string characters as JSON allows them."""
    import xgrammar as xgr

    grammar = xgr.Grammar.from_json_schema(schema, any_whitespace=any_whitespace, strict_mode=strict)
    return str(grammar).replace(_BOUNDED_STRING_CHAR, _JSON_STRING_CHAR)


def compile_spec(compiler, kind: str, source: str, any_whitespace: bool):
    """GrammarSpec fields -> xgrammar CompiledGrammar; raises on an invalid or unsupported grammar."""
    if kind == "json_schema":
        return compiler.compile_grammar(json_ebnf(source, any_whitespace, strict=True))
    if kind == "json_object":
        return compiler.compile_grammar(json_ebnf('{"type": "object"}', any_whitespace, strict=False))
    if kind == "regex":
        return compiler.compile_regex(source)
    if kind == "ebnf":
        return compiler.compile_grammar(source)
    if kind == "choice":
        return compiler.compile_grammar(choice_ebnf(json.loads(source)))
    raise ValueError(f"unknown grammar kind {kind!r}")


def worker_main(jobs: Connection, results: Connection) -> None:
    """Read the tokenizer info, answer ("ready", None), then one reply per (kind, source, ws) job."""
    import xgrammar as xgr

    info = xgr.TokenizerInfo.deserialize_json(jobs.recv())
    compiler = xgr.GrammarCompiler(info, max_threads=1, cache_enabled=False)
    results.send(("ready", None))
    while True:
        try:
            job = jobs.recv()
        except EOFError:
            return
        if job is None:
            return
        kind, source, any_whitespace = job
        try:
            compiled = compile_spec(compiler, kind, source, any_whitespace)
        except Exception as exc:  # xgrammar raises RuntimeError / ValueError / its own types
            results.send(("error", clean_error(exc)))
        else:
            results.send(("ok", compiled.serialize_json()))


if __name__ == "__main__":  # python -m server.structured.worker JOBS_FD RESULTS_FD (see compiler.py)
    import sys

    worker_main(Connection(int(sys.argv[1]), writable=False), Connection(int(sys.argv[2]), readable=False))
