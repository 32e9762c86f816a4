"""Per-request grammar state and the token mask of each step, over xgrammar's matcher and bitmask.

xgrammar is imported on first use: a server that never sees a structured request never loads it."""

from __future__ import annotations

import torch


class GrammarState:
    """Where one sequence stands in its grammar: which tokens may come next, advanced by each sampled token."""

    def __init__(self, compiled_grammar):
        import xgrammar as xgr

        self._matcher = xgr.GrammarMatcher(compiled_grammar)

    def fill_mask(self, bitmask: torch.Tensor, row: int) -> None:
        """Write the tokens allowed next into row `row` of a bitmask from `allocate_bitmask`."""
        self._matcher.fill_next_token_bitmask(bitmask, row)

    def accept(self, token_id: int) -> bool:
        """Advance by the sampled token; False when the grammar does not allow it (nothing changes then)."""
        return bool(self._matcher.accept_token(token_id))

    @property
    def terminated(self) -> bool:
        """The grammar is complete and its stop token was accepted: nothing may follow."""
        return bool(self._matcher.is_terminated())


def allocate_bitmask(num_rows: int, vocab_size: int) -> torch.Tensor:
    """A CPU bitmask [rows, ceil(vocab / 32)] int32 with every token allowed."""
    import xgrammar as xgr

    return xgr.allocate_token_bitmask(num_rows, vocab_size)


def apply_bitmask(logits: torch.Tensor, bitmask: torch.Tensor, rows: list[int]) -> None:
    """Set the logits of the tokens the bitmask forbids to -inf, in place, in `rows` only."""
    import xgrammar as xgr

    xgr.apply_token_bitmask_inplace(logits, bitmask.to(logits.device, non_blocking=True), indices=rows)
