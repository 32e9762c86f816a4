"""The waiting queue in the order of the scheduling policy: FCFS, or priority then arrival.

Both keep the same small interface so the scheduler does not care which one it holds: `add` a new
request, `add_preempted` one that gives its memory back, `peek`/`pop` the next to start, `remove`
one that is aborted, and iterate in scheduling order. Plain Python, no torch.
"""

from __future__ import annotations

import bisect
import itertools
from collections import deque
from collections.abc import Iterator

from server.request import Request


class FCFSQueue:
    """Arrival order; a preempted request goes back to the front (it started first)."""

    def __init__(self) -> None:
        self._items: deque[Request] = deque()

    def add(self, request: Request) -> None:
        self._items.append(request)

    def add_preempted(self, request: Request) -> None:
        self._items.appendleft(request)

    def peek(self) -> Request:
        return self._items[0]

    def pop(self) -> Request:
        return self._items.popleft()

    def remove(self, request: Request) -> None:
        self._items.remove(request)

    def __len__(self) -> int:
        return len(self._items)

    def __iter__(self) -> Iterator[Request]:
        return iter(self._items)


class PriorityQueue:
    """Lowest `priority` first, then earliest arrival (vLLM's order); a preempted request keeps its
    place by the same key, so it may wait behind requests that outrank it."""

    def __init__(self) -> None:
        self._items: list[tuple[tuple[int, float, int], Request]] = []
        self._counter = itertools.count()  # ties: the order they were queued in

    @staticmethod
    def rank(request: Request) -> tuple[int, float]:
        return request.params.priority, request.arrival_time

    def _insert(self, request: Request) -> None:
        key = (*self.rank(request), next(self._counter))
        bisect.insort(self._items, (key, request), key=lambda item: item[0])

    add = _insert
    add_preempted = _insert

    def peek(self) -> Request:
        return self._items[0][1]

    def pop(self) -> Request:
        return self._items.pop(0)[1]

    def remove(self, request: Request) -> None:
        for i, (_, queued) in enumerate(self._items):
            if queued is request:
                del self._items[i]
                return
        raise ValueError(f"{request.request_id} is not waiting")

    def __len__(self) -> int:
        return len(self._items)

    def __iter__(self) -> Iterator[Request]:
        return (request for _, request in self._items)


def make_queue(policy: str) -> FCFSQueue | PriorityQueue:
    return PriorityQueue() if policy == "priority" else FCFSQueue()
