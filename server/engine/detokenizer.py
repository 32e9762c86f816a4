"""Incremental, UTF-8-safe detokenization with stop strings held back until they resolve."""

from __future__ import annotations

from tokenizers.decoders import DecodeStream

_PRIME_TOKENS = 6  # prompt tokens fed first, so the first output token decodes with its real spacing


class IncrementalDetokenizer:
    """Turns one choice's token stream into text deltas and finds its stop strings.

    `step(token_id)` returns the text that is now safe to send. A suffix that could still grow into a
    stop string is held back; when a stop string completes, `stopped_by` is set and the text ends
    before it (or after it with `include_stop_str_in_output`).

    With `spaces_between_special_tokens=False` (and special tokens kept), an added token that follows
    another one is written as its bare content, without the space a decoder (WordPiece, Metaspace)
    puts before it: vLLM's rule for fast tokenizers. Byte-level decoders never add one.
    """

    def __init__(
        self,
        backend_tokenizer,
        prompt_token_ids: list[int],
        stop: list[str],
        include_stop: bool,
        skip_special_tokens: bool,
        spaces_between_special_tokens: bool = True,
    ):
        self._tokenizer = backend_tokenizer
        prime = prompt_token_ids[-_PRIME_TOKENS:]
        self._stream = DecodeStream(ids=prime or None, skip_special_tokens=skip_special_tokens)
        self._skip_special_tokens = skip_special_tokens
        self._added: dict[int, str] = {}  # added token id -> content, when spaces between them are dropped
        if not (skip_special_tokens or spaces_between_special_tokens):
            self._added = {i: t.content for i, t in backend_tokenizer.get_added_tokens_decoder().items()}
        self._last_added = False
        self._ids: list[int] = []
        self._stop = stop
        self._include_stop = include_stop
        self._max_stop_len = max((len(s) for s in stop), default=0)
        self.text = ""  # all decoded text, including any held-back tail
        self.sent = 0  # characters of `text` already released
        self.stopped_by: str | None = None

    def step(self, token_id: int, check_stop: bool = True) -> str:
        """The text now safe to send. `check_stop=False` (before min_tokens) ignores stop strings."""
        self._ids.append(token_id)
        piece = self._stream.step(self._tokenizer, token_id) or ""
        if self._added:
            content = self._added.get(token_id)
            if content is not None and self._last_added:
                piece = content
            self._last_added = content is not None
        if self.stopped_by is not None:
            return ""
        before = len(self.text)
        self.text += piece
        if not check_stop:
            return self._release(len(self.text))
        if self._stop and piece:
            cut = self._find_stop(before)
            if cut is not None:
                return self._release(cut)
        return self._release(len(self.text) - self._held_back())

    def flush(self) -> str:
        """Release whatever is held back (the choice ended for another reason)."""
        if self.stopped_by is not None:
            return ""
        # Bytes of an unfinished UTF-8 sequence still wait in the stream: decode them as a whole
        # decode would (with replacement characters), so the text ends where the tokens end.
        full = self._tokenizer.decode(self._ids, skip_special_tokens=self._skip_special_tokens)
        if len(full) > len(self.text) and full.startswith(self.text):
            self.text = full
        return self._release(len(self.text))

    def _find_stop(self, before: int) -> int | None:
        start = max(self.sent, before - self._max_stop_len + 1)  # released text holds no stop string
        best: tuple[int, str] | None = None
        for s in self._stop:
            at = self.text.find(s, start)
            if at != -1 and (best is None or at < best[0]):
                best = (at, s)
        if best is None:
            return None
        at, s = best
        self.stopped_by = s
        end = at + len(s) if self._include_stop else at
        self.text = self.text[:end]
        return end

    def _held_back(self) -> int:
        """Length of the longest suffix of the unsent text that begins some stop string."""
        longest = 0
        tail = self.text[self.sent :]
        for s in self._stop:
            for n in range(min(len(s) - 1, len(tail)), longest, -1):
                if tail.endswith(s[:n]):
                    longest = n
                    break
        return longest

    def _release(self, upto: int) -> str:
        upto = max(upto, self.sent)
        delta = self.text[self.sent : upto]
        self.sent = upto
        return delta
