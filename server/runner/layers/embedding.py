"""Token embedding and the LM head (which may share the embedding's weight)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from server.runner.layers.linear import default_weight_loader


class VocabEmbedding(nn.Module):
    def __init__(self, vocab_size: int, hidden_size: int):
        super().__init__()
        self.vocab_size = vocab_size
        self.weight = nn.Parameter(torch.empty(vocab_size, hidden_size), requires_grad=False)
        self.weight.weight_loader = default_weight_loader

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(input_ids, self.weight)


class LMHead(nn.Module):
    """Hidden states -> float32 logits. ``tied_to`` shares the embedding's weight (tied embeddings)."""

    def __init__(self, vocab_size: int, hidden_size: int, tied_to: VocabEmbedding | None = None):
        super().__init__()
        self.vocab_size = vocab_size
        self.tied = tied_to is not None
        if tied_to is not None:
            self.weight = tied_to.weight
        else:
            self.weight = nn.Parameter(torch.empty(vocab_size, hidden_size), requires_grad=False)
            self.weight.weight_loader = default_weight_loader
        self.packed: torch.Tensor | None = None

    def pack(self, pack_fn, linear_fn) -> None:
        """Use a packed copy of the weight; a tied weight stays (the embedding still reads it)."""
        self.packed = pack_fn(self.weight)
        self.packed_linear = linear_fn
        if not self.tied:
            self.weight.data = torch.empty(0, dtype=self.weight.dtype, device=self.weight.device)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        if self.packed is not None:
            return self.packed_linear(hidden, self.packed, None).float()
        return F.linear(hidden, self.weight).float()
