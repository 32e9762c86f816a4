"""`pagedserve bench serve --extra-body JSON`: merged into every request (how the structured-output
benchmark sends response_format), and refused at parse time unless it is a JSON object."""

from __future__ import annotations

import pytest

from server.bench.cli import run_config_from
from server.bench.client import build_payload
from server.bench.datasets import BenchRequest
from server.cli import build_parser

FORMAT = '{"response_format": {"type": "json_object"}}'


def test_extra_body_reaches_every_payload():
    ns = build_parser().parse_args(["bench", "serve", "--base-url", "http://x", "--extra-body", FORMAT])
    config = run_config_from(ns, ns.base_url)
    assert config.extra_body == {"response_format": {"type": "json_object"}}
    request = BenchRequest(prompt_ids=[1, 2], prompt_text="hi", messages=[{"role": "user", "content": "hi"}],
                           prompt_len=2, output_len=4)
    payload = build_payload(request, "chat", "m", extra=config.extra_body)
    assert payload["response_format"] == {"type": "json_object"} and payload["max_completion_tokens"] == 4


@pytest.mark.parametrize("bad", ["[1]", "{nope"])
def test_extra_body_must_be_a_json_object(bad, capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["bench", "serve", "--base-url", "http://x", "--extra-body", bad])
    assert "--extra-body" in capsys.readouterr().err
