"""Log-probabilities in OpenAI's two shapes (the legacy completions one and the chat one) and in
vLLM's `prompt_logprobs` shape. With vLLM's return_tokens_as_token_ids a token shows as "token_id:N"."""

from __future__ import annotations

from server.api.protocol import ChatTokenLogprob, CompletionLogprobs, PromptLogprob, PromptLogprobs, TopLogprob
from server.request import TokenLogprob

_FLOOR = -9999.0  # -inf does not fit in JSON


def _finite(value: float) -> float:
    return value if value > _FLOOR else _FLOOR


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte <-> printable character table that byte-level BPE vocabularies are written in."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    chars = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(printable, map(chr, chars)))


class TokenText:
    """Display text and raw bytes of single tokens, cached per token id (one per served model)."""

    def __init__(self, tokenizer):
        self._tokenizer = tokenizer
        self._text: dict[int, str] = {}
        self._bytes: dict[int, list[int]] = {}
        backend = getattr(tokenizer, "backend_tokenizer", None)
        decoder = getattr(backend, "decoder", None)
        self._byte_level = type(decoder).__name__ == "ByteLevel"
        self._byte_of = {c: b for b, c in _bytes_to_unicode().items()} if self._byte_level else {}

    def text(self, token_id: int) -> str:
        text = self._text.get(token_id)
        if text is None:
            text = self._tokenizer.decode([token_id])
            self._text[token_id] = text
        return text

    def bytes(self, token_id: int) -> list[int]:
        raw = self._bytes.get(token_id)
        if raw is None:
            raw = None
            if self._byte_level:
                piece = self._tokenizer.convert_ids_to_tokens(token_id)
                if piece is not None and all(c in self._byte_of for c in piece):
                    raw = [self._byte_of[c] for c in piece]
            if raw is None:
                raw = list(self.text(token_id).encode("utf-8"))
            self._bytes[token_id] = raw
        return raw

    def shown(self, token_id: int, as_id: bool) -> str:
        """How a logprob entry names the token: its text, or vLLM's "token_id:N"."""
        return f"token_id:{token_id}" if as_id else self.text(token_id)

    def shown_bytes(self, token_id: int, as_id: bool) -> list[int]:
        return list(self.shown(token_id, True).encode("utf-8")) if as_id else self.bytes(token_id)


def legacy_logprobs(
    entries: list[tuple[int, TokenLogprob | None]], tokens: TokenText, offset: int, as_ids: bool = False
) -> tuple[CompletionLogprobs, int]:
    """The completions format for (token id, logprob) pairs; None marks the prompt's first token.

    `top_logprobs` maps token text to log-probability for the top N and the chosen token; `text_offset`
    counts characters from `offset` (of the tokens as shown, as vLLM counts them). Returns the offset
    after the last token too (for streams).
    """
    out = CompletionLogprobs(tokens=[], token_logprobs=[], top_logprobs=[], text_offset=[])
    for token_id, lp in entries:
        text = tokens.shown(token_id, as_ids)
        out.tokens.append(text)
        out.text_offset.append(offset)
        offset += len(text)
        if lp is None:
            out.token_logprobs.append(None)
            out.top_logprobs.append(None)
            continue
        out.token_logprobs.append(_finite(lp.logprob))
        top: dict[str, float] = {}
        for top_id, value in lp.top:
            top.setdefault(tokens.shown(top_id, as_ids), _finite(value))
        top.setdefault(text, _finite(lp.logprob))
        out.top_logprobs.append(top)
    return out, offset


def chat_logprobs(
    entries: list[tuple[int, TokenLogprob]], tokens: TokenText, top_n: int, as_ids: bool = False
) -> list[ChatTokenLogprob]:
    """The chat format: per token its text, log-probability, UTF-8 bytes and the top `top_n` alternatives."""
    out = []
    for token_id, lp in entries:
        out.append(
            ChatTokenLogprob(
                token=tokens.shown(token_id, as_ids),
                logprob=_finite(lp.logprob),
                bytes=tokens.shown_bytes(token_id, as_ids),
                top_logprobs=[
                    TopLogprob(token=tokens.shown(t, as_ids), logprob=_finite(v), bytes=tokens.shown_bytes(t, as_ids))
                    for t, v in lp.top[:top_n]
                ],
            )
        )
    return out


def prompt_logprobs(prompt_ids: list[int], entries: list[TokenLogprob | None], tokens: TokenText) -> PromptLogprobs:
    """vLLM's `prompt_logprobs`: per prompt token (the first is null, nothing predicts it) a map from
    token id to logprob, rank and text, holding the prompt's own token and the top N."""
    out: PromptLogprobs = []
    for token_id, lp in zip(prompt_ids, entries):
        if lp is None:
            out.append(None)
            continue
        row = {str(token_id): PromptLogprob(logprob=_finite(lp.logprob), rank=lp.rank, decoded_token=tokens.text(token_id))}
        for rank, (top_id, value) in enumerate(lp.top, start=1):
            row.setdefault(str(top_id), PromptLogprob(logprob=_finite(value), rank=rank, decoded_token=tokens.text(top_id)))
        out.append(row)
    return out
