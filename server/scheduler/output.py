"""What one scheduling step decided: the runner turns this into tensors, nothing else does."""

from __future__ import annotations

from dataclasses import dataclass, field

from server.request import Request


@dataclass
class ScheduledSeq:
    """Run tokens ``all_token_ids[start : start + num_new_tokens]`` of ``request`` this step.

    ``start`` is the request's ``num_computed_tokens`` when it was scheduled. The request's
    ``block_ids`` already cover ``start + num_new_tokens`` tokens.
    """

    request: Request
    start: int
    num_new_tokens: int
    samples: bool = field(init=False)  # the chunk reaches the end of the known tokens: sample one

    def __post_init__(self) -> None:
        # Fixed when scheduled: update() appends the sampled token and moves the end afterwards.
        self.samples = self.start + self.num_new_tokens == self.request.num_tokens

    @property
    def end(self) -> int:
        return self.start + self.num_new_tokens


@dataclass
class SchedulerOutput:
    seqs: list[ScheduledSeq] = field(default_factory=list)  # running (decode) first, then new prefills
    preempted: list[Request] = field(default_factory=list)

    @property
    def num_batched_tokens(self) -> int:
        return sum(s.num_new_tokens for s in self.seqs)

    @property
    def empty(self) -> bool:
        return not self.seqs
