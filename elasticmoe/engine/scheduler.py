"""Continuous batching: which requests run this step and how many tokens each.

Every step has a token budget. Running requests go first (one token for a
decode, the next chunk for a prefill in progress), then waiting requests are
admitted, their prompts chunked to fit the budget (chunked prefill). When the
KV pool is out of blocks the most recently admitted running request is
preempted: its blocks are freed and it goes back to the front of the queue to
be recomputed later (the prefix cache often gives most of it back).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from elasticmoe.engine.request import Request, RequestStatus
from elasticmoe.kv.manager import KVCacheManager


@dataclass
class ScheduledRequest:
    """A request and the number of its tokens computed in this step."""

    request: Request
    num_new_tokens: int

    @property
    def completes_sequence(self) -> bool:
        """Whether this step reaches the end of the known tokens, so one is sampled."""
        return self.request.num_computed_tokens + self.num_new_tokens == self.request.num_tokens


@dataclass
class SchedulerOutput:
    """What one step runs."""

    scheduled: list[ScheduledRequest] = field(default_factory=list)
    preempted: list[Request] = field(default_factory=list)

    @property
    def num_batched_tokens(self) -> int:
        """Tokens computed in the step."""
        return sum(s.num_new_tokens for s in self.scheduled)


class Scheduler:
    """FCFS continuous-batching scheduler with chunked prefill and preemption."""

    def __init__(
        self,
        kv: KVCacheManager,
        max_num_seqs: int,
        max_num_batched_tokens: int,
    ) -> None:
        if max_num_seqs <= 0 or max_num_batched_tokens <= 0:
            raise ValueError("max_num_seqs and max_num_batched_tokens must be positive")
        self.kv = kv
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.num_preemptions = 0

    @property
    def num_unfinished(self) -> int:
        """Requests waiting or running."""
        return len(self.waiting) + len(self.running)

    def add_request(self, request: Request) -> None:
        """Queue a new request."""
        request.status = RequestStatus.WAITING
        self.waiting.append(request)

    def finish(self, request: Request, status: RequestStatus) -> None:
        """Remove a request from the queues and free its blocks."""
        assert status.finished, f"{status} is not a finished status"
        request.status = status
        if request in self.running:
            self.running.remove(request)
        elif request in self.waiting:
            self.waiting.remove(request)
        self.kv.free(request.request_id)

    def _preempt(self, victim: Request) -> None:
        self.kv.free(victim.request_id)
        victim.status = RequestStatus.PREEMPTED
        victim.num_computed_tokens = 0
        victim.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(victim)

    def schedule(self) -> SchedulerOutput:
        """Choose the requests and token counts of the next step."""
        out = SchedulerOutput()
        budget = self.max_num_batched_tokens
        i = 0
        while i < len(self.running) and budget > 0:
            request = self.running[i]
            num_new = min(request.num_tokens - request.num_computed_tokens, budget)
            while self.kv.allocate_slots(request, num_new) is None:
                victim = self.running.pop()
                self._preempt(victim)
                out.preempted.append(victim)
                if victim is request:
                    break
            if request.status is RequestStatus.PREEMPTED:
                break
            out.scheduled.append(ScheduledRequest(request, num_new))
            budget -= num_new
            i += 1

        # Admitting new work in a step that had to preempt would only thrash.
        while (
            not out.preempted
            and self.waiting
            and budget > 0
            and len(self.running) < self.max_num_seqs
        ):
            request = self.waiting[0]
            hits, num_hit_tokens = self.kv.get_computed_blocks(request)
            num_new = min(request.num_tokens - num_hit_tokens, budget)
            if self.kv.allocate_slots(request, num_new, hits) is None:
                break
            self.waiting.popleft()
            request.num_computed_tokens = num_hit_tokens
            request.status = RequestStatus.RUNNING
            self.running.append(request)
            out.scheduled.append(ScheduledRequest(request, num_new))
            budget -= num_new
        return out
