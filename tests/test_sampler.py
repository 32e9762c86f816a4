"""The sampler on hand-made logits: cuts, penalties, bias, min_tokens, seeds and logprobs."""

from __future__ import annotations

import math

import pytest
import torch

from server.errors import InvalidRequest
from server.request import Request, SamplingParams
from server.runner.sampler import apply_penalties, build_sampling_batch, gather_logprobs, sample

VOCAB = 6
CPU = torch.device("cpu")


def _request(prompt=(1, 2), output=(), eos=(5,), **params) -> Request:
    req = Request("r", list(prompt), SamplingParams(**params), eos_token_ids=eos)
    req.all_token_ids.extend(output)
    return req


def _batch(requests, generators=None):
    return build_sampling_batch(requests, VOCAB, CPU, generators or [None] * len(requests))


def _draws(logits_row: list[float], n: int = 400, **params) -> set[int]:
    reqs = [_request(**params) for _ in range(n)]
    logits = torch.tensor([logits_row] * n)
    gen = torch.Generator().manual_seed(0)
    return set(sample(logits, _batch(reqs), gen).tolist())


def _log(probs: list[float]) -> list[float]:
    return [math.log(p) if p > 0 else -1e9 for p in probs]


def test_greedy_and_top_k_1_pick_the_argmax():
    logits = torch.tensor([[0.1, 3.0, 0.2, 2.9, -1.0, 0.0]])
    gen = torch.Generator().manual_seed(0)
    assert sample(logits, _batch([_request(temperature=0)]), gen).tolist() == [1]
    assert _draws(logits[0].tolist(), temperature=1.0, top_k=1) == {1}


def test_top_p_keeps_the_smallest_set_reaching_p():
    probs = [0.5, 0.3, 0.15, 0.05, 0.0, 0.0]
    assert _draws(_log(probs), temperature=1.0, top_p=0.7) == {0, 1}
    assert _draws(_log(probs), temperature=1.0, top_p=0.5) == {0}
    assert _draws(_log(probs), temperature=1.0, top_p=0.9) == {0, 1, 2}


def test_min_p_cuts_relative_to_the_top_probability():
    probs = [0.5, 0.3, 0.2, 0.0, 0.0, 0.0]
    assert _draws(_log(probs), temperature=1.0, min_p=0.5) == {0, 1}
    assert _draws(_log(probs), temperature=1.0, min_p=0.7) == {0}


def test_top_k_keeps_k_tokens():
    probs = [0.3, 0.25, 0.2, 0.15, 0.1, 0.0]
    assert _draws(_log(probs), temperature=1.0, top_k=3) == {0, 1, 2}


def test_penalties_match_a_reference_computation():
    logits = torch.tensor([[1.0, -1.0, 2.0, 0.5, -0.5, 3.0]])
    req = _request(prompt=(0, 1), output=(2, 2, 3), repetition_penalty=1.5, frequency_penalty=0.5, presence_penalty=0.25)
    got = apply_penalties(logits.clone(), _batch([req]))[0].tolist()
    expected = [1.0, -1.0, 2.0, 0.5, -0.5, 3.0]
    for token in {0, 1, 2, 3}:  # repetition penalty: prompt and output tokens, transformers' rule
        expected[token] = expected[token] / 1.5 if expected[token] > 0 else expected[token] * 1.5
    counts = {2: 2, 3: 1}  # frequency and presence: output tokens only, OpenAI's rule
    for token, count in counts.items():
        expected[token] -= 0.5 * count + 0.25
    assert got == pytest.approx(expected)


def test_logit_bias_and_min_tokens():
    logits = torch.tensor([[0.0, 0.0, 0.0, 0.0, 0.0, 9.0]])
    gen = torch.Generator().manual_seed(0)
    assert sample(logits, _batch([_request(temperature=0)]), gen).tolist() == [5]
    # EOS (5) is banned until min_tokens outputs exist; stop_token_ids too
    held = _request(temperature=0, min_tokens=2, stop_token_ids=[4])
    assert sample(logits, _batch([held]), gen).tolist() != [5]
    biased = _request(temperature=0, logit_bias={3: 100})
    assert sample(logits, _batch([biased]), gen).tolist() == [3]
    done = _request(output=(1, 1), temperature=0, min_tokens=2)
    assert sample(logits, _batch([done]), gen).tolist() == [5]


def test_a_seeded_row_does_not_depend_on_the_batch():
    logits = torch.randn(1, VOCAB, generator=torch.Generator().manual_seed(3))

    def seeded_pick(batch_size: int, position: int) -> int:
        reqs = [_request(temperature=1.0) for _ in range(batch_size)]
        gens = [None] * batch_size
        gens[position] = torch.Generator().manual_seed(1234)
        rows = logits.repeat(batch_size, 1)
        return sample(rows, _batch(reqs, gens), torch.Generator().manual_seed(batch_size))[position].item()

    alone = [seeded_pick(1, 0) for _ in range(3)]
    assert alone == [alone[0]] * 3
    assert seeded_pick(7, 4) == alone[0]
    assert seeded_pick(3, 0) == alone[0]


def test_gather_logprobs_rank_and_top():
    logprobs = torch.log_softmax(torch.tensor([[1.0, 3.0, 2.0, 0.0]]), dim=-1)
    [lp] = gather_logprobs(logprobs, torch.tensor([2]), [2])
    assert lp.rank == 2
    assert lp.logprob == pytest.approx(logprobs[0, 2].item())
    assert [t for t, _ in lp.top] == [1, 2]


def test_allowed_token_ids_limit_every_row_that_sets_them():
    logits = torch.tensor([[0.0, 0.0, 0.0, 0.0, 0.0, 9.0]] * 2)
    gen = torch.Generator().manual_seed(0)
    rows = [_request(temperature=0, allowed_token_ids=[1, 3]), _request(temperature=0)]
    assert sample(logits, _batch(rows), gen).tolist() == [1, 5]
    assert _draws([0.0, 1.0, 0.0, 0.5, 2.0, 3.0], temperature=1.0, allowed_token_ids=[0, 3]) == {0, 3}


def test_bad_words_ban_the_last_token_after_the_rest_of_the_word():
    logits = torch.tensor([[0.0, 0.0, 0.0, 4.0, 5.0, 9.0]])
    gen = torch.Generator().manual_seed(0)

    def pick(output, words):
        return sample(logits, _batch([_request(output=output, temperature=0, bad_words_token_ids=words)]), gen).item()

    assert pick((), [[5]]) == 4  # a one-token word is always banned
    assert pick((2,), [[1, 5]]) == 5  # the output does not end with the word's start
    assert pick((2, 1), [[1, 5]]) == 4  # it does: its last token is banned
    assert pick((0, 1), [[0, 1, 5], [4]]) == 3  # several words at once
    with pytest.raises(InvalidRequest):
        SamplingParams(bad_words_token_ids=[[]])
    with pytest.raises(InvalidRequest):
        SamplingParams(allowed_token_ids=[])
