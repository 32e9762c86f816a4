"""Continuous batching with one token budget per step (no prefill/decode phases).

Each step the running requests go first, oldest first: one token for a decode, a chunk for a
request still in its prefill. Then, if nobody was preempted, waiting requests join in queue order
with their prefill chunked to the budget left. When KV blocks run out a running request is
preempted by recompute: its blocks are freed and it goes back to the queue, to run its prompt and
the tokens it already generated again (its outputs are kept).

Shared prefixes: a waiting request whose next uncached block is one a running request has yet to
compute is held back until that block is cached (the end of this step), then hits it, instead of
computing the same prefix again. Held requests are skipped, not waited
for: the requests behind them still start (vLLM's scheduler stops at the first request it cannot
schedule; here that is kept only for a request that does not fit in memory).

The policy (`--scheduling-policy`) sets the queue order and the victim: `fcfs` queues by arrival,
puts a preempted request back at the front and preempts the newest running request; `priority`
queues by (priority, arrival), lowest first, and preempts the running request that ranks last,
even one already scheduled in this step (its chunk is taken back out of the batch).

Plain Python on ints (no torch); the runner turns a ``SchedulerOutput`` into tensors.
"""

from __future__ import annotations

from server.config import SchedulerConfig
from server.errors import ContextTooLong, InvalidRequest, Overloaded
from server.request import Request, RequestStatus
from server.scheduler.kv_blocks import BlockPool, cdiv
from server.scheduler.output import ScheduledSeq, SchedulerOutput
from server.scheduler.request_queue import PriorityQueue, make_queue


class Scheduler:
    def __init__(self, config: SchedulerConfig, block_pool: BlockPool):
        self.config = config
        self.block_pool = block_pool
        self.waiting = make_queue(config.policy)
        self.running: list[Request] = []  # the order they started running in; last is newest
        self.requests: dict[str, Request] = {}  # every unfinished request, waiting or running
        self.num_preemptions_total = 0
        self.held: list[Request] = []  # waiting requests the last schedule() held back for a block in flight

    # ---- state -------------------------------------------------------------------------------

    @property
    def num_running(self) -> int:
        return len(self.running)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    @property
    def kv_usage(self) -> float:
        return self.block_pool.usage

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def has_prefill_work(self) -> bool:
        """A waiting request, or a running one whose computed tokens do not yet reach its last token."""
        return bool(self.waiting) or any(r.num_computed_tokens < r.num_tokens - 1 for r in self.running)

    def get_request(self, request_id: str) -> Request | None:
        return self.requests.get(request_id)

    # ---- admission ---------------------------------------------------------------------------

    def add_request(self, request: Request) -> None:
        """Queue a request, or raise InvalidRequest / ContextTooLong / Overloaded."""
        max_len = self.config.max_model_len
        num_prompt = request.num_prompt_tokens
        if num_prompt == 0:
            raise InvalidRequest("The prompt is empty: at least one token is needed.", param="prompt")
        if request.request_id in self.requests:
            raise InvalidRequest(f"Request id {request.request_id!r} is already in use.")
        if request.params.priority != 0 and self.config.policy != "priority":
            raise InvalidRequest(
                f"priority {request.params.priority} needs a server started with --scheduling-policy priority; "
                "this one serves requests first come, first served (leave priority out or at 0).",
                param="priority",
            )
        max_tokens = request.params.max_tokens
        if num_prompt >= max_len:
            raise ContextTooLong(
                f"This model's maximum context length is {max_len} tokens, but the prompt has "
                f"{num_prompt} tokens, which leaves no room for output. Please shorten the prompt.",
                param="prompt",
            )
        if max_tokens is None:
            max_tokens = max_len - num_prompt
        elif num_prompt + max_tokens > max_len:
            raise ContextTooLong(
                f"This model's maximum context length is {max_len} tokens. However, you requested "
                f"{num_prompt + max_tokens} tokens ({num_prompt} in the prompt, {max_tokens} in the "
                f"completion). Please reduce the length of the prompt or max_tokens.",
                param="max_tokens",
            )
        pool = self.block_pool
        needed = cdiv(num_prompt + max_tokens, pool.block_size)
        if needed > pool.num_blocks:
            raise ContextTooLong(
                f"The request needs up to {num_prompt + max_tokens} tokens ({num_prompt} in the prompt, "
                f"{max_tokens} in the completion) but the KV cache holds only "
                f"{pool.num_blocks * pool.block_size} tokens ({pool.num_blocks} blocks of {pool.block_size}). "
                f"Please reduce the length of the prompt or max_tokens.",
                param="max_tokens",
            )
        limit = self.config.max_queued_requests
        if limit is not None and len(self.waiting) >= limit:
            raise Overloaded(f"The server is overloaded: {len(self.waiting)} requests are waiting (the limit is {limit}).")
        request.max_tokens = max_tokens
        request.status = RequestStatus.WAITING
        self.waiting.add(request)
        self.requests[request.request_id] = request

    # ---- one step ----------------------------------------------------------------------------

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = self.config.max_num_batched_tokens
        pool = self.block_pool

        # Running requests first, oldest first.
        i = 0
        while i < len(self.running) and budget > 0:
            request = self.running[i]
            num_new = min(request.num_tokens - request.num_computed_tokens, budget)
            preempted_itself = False
            while not pool.allocate(request, request.num_computed_tokens + num_new):
                j = self._victim_index()
                victim = self.running.pop(j)
                if j < i:  # scheduled earlier in this step: take its chunk back
                    budget += out.seqs.pop(j).num_new_tokens
                    i -= 1
                self._preempt(victim)
                out.preempted.append(victim)
                if victim is request:
                    preempted_itself = True
                    break
            if preempted_itself:
                continue  # running[i] is the next one now (under fcfs there is none: it was the newest)
            out.seqs.append(ScheduledSeq(request, request.num_computed_tokens, num_new))
            budget -= num_new
            i += 1

        # Then waiting requests in queue order, unless memory is already short this step.
        self.held = []
        if not out.preempted:
            self._admit_waiting(out, budget)
        return out

    def _admit_waiting(self, out: SchedulerOutput, budget: int) -> None:
        """Start waiting requests in queue order while the budget, max_num_seqs and memory allow.

        A request whose next uncached block is among the blocks a running request has yet to
        compute (same chained hash) is held back and skipped, so it hits that block once it is
        cached instead of computing it again; requests behind it still go. It is held only while
        such a running request exists: once the block is cached it finds it, and if the computing
        request is preempted or finished first it goes on without. In practice that is one step:
        waiting requests are looked at only when budget is left after every running request got
        all its remaining tokens, so the blocks in flight are all computed (and cached) in this
        step, unless their request is aborted before ``update``. A request that does not fit in
        memory stops the admission (no skipping past it).
        """
        pool = self.block_pool
        in_flight: set[int] | None = None  # built on the first request looked at
        admitted: list[Request] = []
        for request in self.waiting:  # not changed in this loop: admitted ones are removed after it
            if budget <= 0 or len(self.running) >= self.config.max_num_seqs:
                break
            if in_flight is None:
                in_flight = {h for r in self.running for h in pool.pending_block_hashes(r)}
            computed_blocks, num_cached = pool.get_computed_blocks(request, record_stats=False)
            if in_flight and pool.next_uncached_hash(request, num_cached) in in_flight:
                self.held.append(request)
                continue
            num_new = min(request.num_tokens - num_cached, budget)
            if not pool.allocate(request, num_cached + num_new, computed_blocks):
                break
            pool.record_prefix_query(request, num_cached)  # counted once it starts, not per attempt
            admitted.append(request)
            if request.num_preemptions == 0:
                request.num_cached_tokens = num_cached
            request.num_computed_tokens = num_cached
            request.status = RequestStatus.RUNNING
            self.running.append(request)
            out.seqs.append(ScheduledSeq(request, num_cached, num_new))
            budget -= num_new
            in_flight.update(pool.pending_block_hashes(request))
        for request in admitted:
            if self.waiting.peek() is request:
                self.waiting.pop()
            else:
                self.waiting.remove(request)

    def _victim_index(self) -> int:
        """Index in `running` of the request to preempt: the newest, or the one that ranks last."""
        if self.config.policy != "priority":
            return len(self.running) - 1
        ranks = [PriorityQueue.rank(r) for r in self.running]
        return max(range(len(ranks)), key=lambda k: (ranks[k], k))

    def _preempt(self, request: Request) -> None:
        self.block_pool.free(request)
        request.num_computed_tokens = 0
        request.status = RequestStatus.PREEMPTED
        request.num_preemptions += 1
        self.num_preemptions_total += 1
        self.waiting.add_preempted(request)

    def update(self, output: SchedulerOutput, sampled: dict[str, int]) -> list[Request]:
        """Record a step the runner ran: advance, cache, append sampled tokens, finish requests.

        ``sampled`` maps the request id of every seq with ``samples`` to its new token. Returns the
        requests that finished in this update (their blocks are already freed).
        """
        finished: list[Request] = []
        for seq in output.seqs:
            request = seq.request
            if request.status is not RequestStatus.RUNNING:
                continue  # finished from outside between schedule() and update()
            samples = seq.samples  # before the new token changes num_tokens
            request.num_computed_tokens += seq.num_new_tokens
            self.block_pool.cache_full_blocks(request)
            if not samples:
                continue  # mid-prefill chunk
            token = sampled[request.request_id]
            request.all_token_ids.append(token)
            status = self._check_stop(request, token)
            if status is not None:
                request.status = status
                self.block_pool.free(request)
                del self.requests[request.request_id]
                finished.append(request)
        if finished:
            self.running = [r for r in self.running if r.status is RequestStatus.RUNNING]
        return finished

    def _check_stop(self, request: Request, token: int) -> RequestStatus | None:
        params = request.params
        if request.num_output_tokens >= params.min_tokens:
            if token in request.eos_token_ids and not params.ignore_eos:
                request.stop_reason = None
                return RequestStatus.FINISHED_STOPPED
            if token in params.stop_token_ids:
                request.stop_reason = token
                return RequestStatus.FINISHED_STOPPED
        if request.num_output_tokens >= request.max_tokens or request.num_tokens >= self.config.max_model_len:
            return RequestStatus.FINISHED_LENGTH
        return None

    def finish(self, request_id: str, status: RequestStatus = RequestStatus.FINISHED_ABORTED) -> Request | None:
        """Finish a request from outside (abort, stop string): frees its blocks now.

        Works for waiting (preempted included) and running requests; an unknown or already
        finished id is a no-op. Returns the request when there was one.
        """
        if not status.finished:
            raise ValueError(f"finish() needs a finished status, got {status}")
        request = self.requests.pop(request_id, None)
        if request is None:
            return None
        if request.status is RequestStatus.RUNNING:
            self.running.remove(request)
        else:
            self.waiting.remove(request)
        request.status = status
        self.block_pool.free(request)
        return request
