"""Token sampling on the device: grammar masks (structured outputs), allowed tokens, bad words, bias,
min_tokens, penalties, temperature, top-k/p, min-p, seeds, logprobs."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from server.request import Request, TokenLogprob
from server.runner.step_inputs import pins, to_device
from server.structured.matcher import allocate_bitmask, apply_bitmask

_NEG_INF = float("-inf")


@dataclass
class SamplingBatch:
    """Per-row sampling inputs for the rows of one step that pick a token."""

    temperature: torch.Tensor  # [N] float32 (0 rows are greedy)
    top_k: torch.Tensor  # [N] int64, vocab size where off
    top_p: torch.Tensor  # [N] float32
    min_p: torch.Tensor  # [N] float32
    repetition_penalty: torch.Tensor  # [N] float32
    frequency_penalty: torch.Tensor  # [N] float32
    presence_penalty: torch.Tensor  # [N] float32
    prompt_tokens: torch.Tensor | None  # [N, Lp] int64 padded with vocab_size, only with repetition penalty
    output_tokens: torch.Tensor | None  # [N, Lo] int64 padded with vocab_size, only with any penalty
    bias_rows: torch.Tensor | None  # [M] row indices of logit_bias / banned entries
    bias_cols: torch.Tensor | None
    bias_vals: torch.Tensor | None
    disallowed: torch.Tensor | None  # [N, vocab] bool: outside the row's allowed_token_ids; None when no row limits
    grammar_bitmask: torch.Tensor | None  # [N, ceil(vocab / 32)] int32 (CPU): tokens each grammar allows next
    grammar_rows: list[int]  # the rows that follow a grammar
    generators: list[torch.Generator | None]  # per row; None rows share the batch generator
    num_logprobs: list[int | None]
    all_greedy: bool
    any_penalty: bool
    any_top_k: bool
    any_top_p: bool
    any_min_p: bool


def build_sampling_batch(
    requests: list[Request], vocab_size: int, device: torch.device, generators: list[torch.Generator | None]
) -> SamplingBatch:
    """Turn the sampling parameters of `requests` (one row each) into tensors, copied to `device` from
    pinned host memory without a sync (on CUDA)."""
    params = [r.params for r in requests]
    pin = pins(device)

    def column(values: list, dtype: torch.dtype) -> torch.Tensor:
        return to_device(values, dtype, device)

    greedy = [p.temperature < 1e-5 for p in params]
    rep = [p.repetition_penalty for p in params]
    freq = [p.frequency_penalty for p in params]
    pres = [p.presence_penalty for p in params]
    any_rep = any(v != 1.0 for v in rep)
    any_penalty = any_rep or any(freq) or any(pres)

    def padded(rows: list[list[int]]) -> torch.Tensor:
        width = max((len(r) for r in rows), default=0) or 1
        out = torch.full((len(rows), width), vocab_size, dtype=torch.int64, pin_memory=pin)
        for i, row in enumerate(rows):
            out[i, : len(row)] = torch.tensor(row, dtype=torch.int64)
        return out.to(device, non_blocking=True)

    rows, cols, vals = [], [], []
    disallowed = None
    for i, r in enumerate(requests):
        allowed = r.params.allowed_token_ids
        if allowed is not None:
            if disallowed is None:
                disallowed = torch.zeros(len(requests), vocab_size, dtype=torch.bool, pin_memory=pin)
            disallowed[i] = True
            disallowed[i, [t for t in allowed if 0 <= t < vocab_size]] = False
        for token in _bad_word_bans(r):
            if 0 <= token < vocab_size:
                rows.append(i)
                cols.append(token)
                vals.append(_NEG_INF)
        for token, bias in r.params.logit_bias.items():
            if 0 <= token < vocab_size:
                rows.append(i)
                cols.append(token)
                vals.append(bias)
        if r.num_output_tokens < r.params.min_tokens:
            banned = set(r.params.stop_token_ids)
            if not r.params.ignore_eos:
                banned |= r.eos_token_ids
            for token in banned:
                if 0 <= token < vocab_size:
                    rows.append(i)
                    cols.append(token)
                    vals.append(_NEG_INF)
    grammar_rows = [i for i, r in enumerate(requests) if r.grammar is not None]
    bitmask = allocate_bitmask(len(requests), vocab_size) if grammar_rows else None
    for i in grammar_rows:
        requests[i].grammar.fill_mask(bitmask, i)
    top_k = [p.top_k if p.top_k > 0 else vocab_size for p in params]
    return SamplingBatch(
        temperature=column([0.0 if g else p.temperature for g, p in zip(greedy, params)], torch.float32),
        top_k=column(top_k, torch.int64),
        top_p=column([p.top_p for p in params], torch.float32),
        min_p=column([p.min_p for p in params], torch.float32),
        repetition_penalty=column(rep, torch.float32),
        frequency_penalty=column(freq, torch.float32),
        presence_penalty=column(pres, torch.float32),
        prompt_tokens=padded([r.prompt_token_ids for r in requests]) if any_rep else None,
        output_tokens=padded([r.output_token_ids for r in requests]) if any_penalty else None,
        bias_rows=column(rows, torch.int64) if rows else None,
        bias_cols=column(cols, torch.int64) if rows else None,
        bias_vals=column(vals, torch.float32) if rows else None,
        disallowed=disallowed.to(device, non_blocking=True) if disallowed is not None else None,
        grammar_bitmask=bitmask,
        grammar_rows=grammar_rows,
        generators=generators,
        num_logprobs=[p.logprobs for p in params],
        all_greedy=all(greedy),
        any_penalty=any_penalty,
        any_top_k=any(k < vocab_size for k in top_k),
        any_top_p=any(p.top_p < 1.0 for p in params),
        any_min_p=any(p.min_p > 0.0 for p in params),
    )


def _bad_word_bans(request: Request) -> set[int]:
    """The tokens that would complete one of the request's bad words now: a one-token word always,
    a longer one when the output so far ends with all of its tokens but the last (vLLM's rule)."""
    bans: set[int] = set()
    words = request.params.bad_words_token_ids
    if not words:
        return bans
    output = request.output_token_ids
    for word in words:
        prefix = word[:-1]
        if not prefix or (len(prefix) <= len(output) and output[len(output) - len(prefix) :] == prefix):
            bans.add(word[-1])
    return bans


def _token_counts(tokens: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """[N, L] padded with vocab_size -> [N, vocab_size] occurrence counts."""
    counts = torch.zeros(tokens.shape[0], vocab_size + 1, dtype=torch.float32, device=tokens.device)
    counts.scatter_add_(1, tokens, torch.ones_like(tokens, dtype=torch.float32))
    return counts[:, :vocab_size]


def apply_penalties(logits: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
    """Repetition penalty over prompt and output tokens (as in transformers); frequency and presence
    penalties over output tokens (as in OpenAI's definition)."""
    vocab_size = logits.shape[1]
    output_counts = _token_counts(batch.output_tokens, vocab_size)
    if batch.prompt_tokens is not None:
        seen = (_token_counts(batch.prompt_tokens, vocab_size) + output_counts) > 0
        penalty = batch.repetition_penalty.unsqueeze(1).expand_as(logits)
        penalized = torch.where(logits > 0, logits / penalty, logits * penalty)
        logits = torch.where(seen, penalized, logits)
    logits = logits - batch.frequency_penalty.unsqueeze(1) * output_counts
    logits = logits - batch.presence_penalty.unsqueeze(1) * (output_counts > 0).to(logits.dtype)
    return logits


def _filter(logits: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
    """Top-k, top-p and min-p on temperature-scaled logits; cut entries become -inf."""
    if batch.any_min_p:
        probs = logits.softmax(dim=-1)
        threshold = probs.max(dim=-1, keepdim=True).values * batch.min_p.unsqueeze(1)
        logits = logits.masked_fill(probs < threshold, _NEG_INF)
    if not (batch.any_top_k or batch.any_top_p):
        return logits
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    ranks = torch.arange(logits.shape[1], device=logits.device).unsqueeze(0)
    cut = ranks >= batch.top_k.unsqueeze(1)
    if batch.any_top_p:
        probs = sorted_logits.softmax(dim=-1)
        mass_before = probs.cumsum(dim=-1) - probs
        cut |= mass_before >= batch.top_p.unsqueeze(1)
    cut[:, 0] = False  # the most likely token always survives
    sorted_logits = sorted_logits.masked_fill(cut, _NEG_INF)
    return torch.empty_like(logits).scatter_(1, order, sorted_logits)


def _random_pick(probs: torch.Tensor, batch: SamplingBatch, generator: torch.Generator | None) -> torch.Tensor:
    """Sample one token per row via the exponential race: argmax(p / E), E ~ Exp(1).

    Rows with their own generator (a seed) draw their noise alone, so the result of a seeded request
    does not depend on what else is in the batch.
    """
    noise = torch.empty_like(probs)
    noise.exponential_(generator=generator)
    for i, row_generator in enumerate(batch.generators):
        if row_generator is not None:
            noise[i].exponential_(generator=row_generator)
    return (probs / noise).argmax(dim=-1)


def sample(logits: torch.Tensor, batch: SamplingBatch, generator: torch.Generator | None) -> torch.Tensor:
    """Pick one token per row of `logits` [N, vocab] (float32). Returns [N] int64.

    A grammar's mask comes first; where the request's other limits (allowed_token_ids, bad words,
    min_tokens) leave no token the grammar allows, the grammar wins."""
    grammar_logits = None
    if batch.grammar_bitmask is not None:
        logits = logits.clone()
        apply_bitmask(logits, batch.grammar_bitmask, batch.grammar_rows)
        grammar_logits = logits
    if batch.disallowed is not None:
        logits = logits.masked_fill(batch.disallowed, _NEG_INF)
    if batch.bias_rows is not None:
        logits = logits.index_put((batch.bias_rows, batch.bias_cols), batch.bias_vals, accumulate=True)
    if batch.any_penalty:
        logits = apply_penalties(logits, batch)
    if grammar_logits is not None:
        dead = torch.zeros(logits.shape[0], 1, dtype=torch.bool, device=logits.device)
        rows = to_device(batch.grammar_rows, torch.long, logits.device)
        dead[rows] = torch.isneginf(logits[rows]).all(dim=-1, keepdim=True)
        logits = torch.where(dead, grammar_logits, logits)
    greedy = logits.argmax(dim=-1)
    if batch.all_greedy:
        return greedy
    temperature = torch.where(batch.temperature > 0, batch.temperature, torch.ones_like(batch.temperature))
    scaled = _filter(logits / temperature.unsqueeze(1), batch)
    picked = _random_pick(scaled.softmax(dim=-1), batch, generator)
    return torch.where(batch.temperature > 0, picked, greedy)


def gather_logprobs(
    logprobs: torch.Tensor, token_ids: torch.Tensor, num_top: list[int]
) -> list[TokenLogprob]:
    """For each row: the chosen token's log-probability and rank (1 = most likely) and the top-N."""
    chosen = logprobs.gather(1, token_ids.unsqueeze(1)).squeeze(1)
    ranks = (logprobs > chosen.unsqueeze(1)).sum(dim=1) + 1
    k = max(num_top, default=0)
    top_vals, top_ids = (logprobs.topk(k, dim=-1) if k else (None, None))
    chosen_l, ranks_l, ids_l = chosen.tolist(), ranks.tolist(), token_ids.tolist()
    top_vals_l = top_vals.tolist() if k else None
    top_ids_l = top_ids.tolist() if k else None
    out = []
    for i, n in enumerate(num_top):
        top = list(zip(top_ids_l[i][:n], top_vals_l[i][:n])) if n else []
        out.append(TokenLogprob(token_id=ids_l[i], logprob=chosen_l[i], rank=ranks_l[i], top=top))
    return out
