"""Steady streaming load on a deployment's engines, recorded per request and per token.

Each client thread sends greedy requests one after another (prompts from a
fixed, seeded pool) and streams them from the engines over Ray, round-robin.
When an engine dies mid-request, the client runs the request again on the
next engine and skips the tokens it already has (:class:`Replay`, the same
failover the HTTP front does); a request fails only when every attempt
failed or a rerun disagreed, and then it carries the error.
"""

from __future__ import annotations

import itertools
import random
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from elasticmoe.engine.request import Replay, ReplayDivergedError, SamplingParams

__all__ = ["LoadGenerator", "RequestRecord", "make_prompts"]


@dataclass
class RequestRecord:
    """One request of the load: when it ran, its tokens and their arrival times."""

    prompt_index: int
    start: float
    end: float | None = None
    token_ids: list[int] = field(default_factory=list)
    token_times: list[float] = field(default_factory=list)
    error: str | None = None
    attempts: int = 1

    @property
    def ok(self) -> bool:
        return self.end is not None and self.error is None


def make_prompts(n: int, vocab_size: int, seed: int = 0) -> list[list[int]]:
    """``n`` prompts of 6..20 random token ids (special ids 0..2 left out)."""
    rng = random.Random(seed)
    return [[rng.randrange(3, vocab_size) for _ in range(rng.randint(6, 20))] for _ in range(n)]


class LoadGenerator:
    """``concurrency`` client threads streaming requests until :meth:`stop`.

    ``engines`` returns the current engine handles (looked up again after a
    failure, so a restarted engine is found).
    """

    def __init__(
        self,
        engines: Any,
        prompts: list[list[int]],
        params: SamplingParams,
        concurrency: int = 4,
        failover_timeout_s: float = 120.0,
    ) -> None:
        self.engines = engines
        self.prompts = prompts
        self.params = params
        self.concurrency = concurrency
        self.failover_timeout_s = failover_timeout_s
        self.records: list[RequestRecord] = []
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._lock = threading.Lock()
        self._rr = itertools.count()
        self._next_prompt = itertools.count()

    def run_once(self, prompt_index: int) -> RequestRecord:
        """Send one request and wait for it (with engine failover)."""
        import ray

        rec = RequestRecord(prompt_index, time.monotonic())
        replay = Replay(self.params)
        rid = f"chaos-{prompt_index}-{time.monotonic_ns()}"
        deadline = rec.start + self.failover_timeout_s
        failed: set[int] = set()  # engines that failed this request
        for attempt in itertools.count(1):
            if attempt > 1 and time.monotonic() > deadline:
                break
            rec.attempts = attempt
            try:
                engines = self.engines()
                first = next(self._rr)
                order = [(first + i) % len(engines) for i in range(len(engines))]
                # another engine first; the failed one again once Ray restarted it
                index = next((i for i in order if i not in failed), order[0])
                engine = engines[index]
                gen = engine.generate_stream.options(num_returns="streaming").remote(
                    {"prompt_token_ids": self.prompts[prompt_index]},
                    self.params,
                    f"{rid}-{attempt}",
                )
                for ref in gen:
                    out = ray.get(ref)
                    if not replay.accept(out):
                        continue
                    now = time.monotonic()
                    ids = out.outputs[0].token_ids
                    rec.token_times += [now] * (len(ids) - len(rec.token_ids))
                    rec.token_ids = list(ids)
                    if out.finished:
                        rec.end, rec.error = now, None
                        if out.outputs[0].finish_reason == "error":
                            rec.error = f"engine error: {out.outputs[0].stop_reason}"
                        return rec
                rec.error = "the engine's stream ended before the request finished"
            except ReplayDivergedError as e:
                rec.error = str(e)
                break
            except (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError) as e:
                rec.error = f"engine died ({type(e).__name__})"
                if not replay.can_resume():
                    break
                failed.add(index)
                time.sleep(min(1.0, 0.1 * attempt))
            except Exception as e:
                rec.error = f"{type(e).__name__}: {e}"
                break
        rec.end = time.monotonic()
        return rec

    def _client(self) -> None:
        while not self._stop.is_set():
            rec = self.run_once(next(self._next_prompt) % len(self.prompts))
            with self._lock:
                self.records.append(rec)

    def start(self) -> LoadGenerator:
        for i in range(self.concurrency):
            t = threading.Thread(target=self._client, name=f"chaos-client-{i}", daemon=True)
            t.start()
            self._threads.append(t)
        return self

    def stop(self, timeout: float = 300.0) -> int:
        """Stop sending; wait for requests in flight. Returns clients still stuck (lost)."""
        self._stop.set()
        deadline = time.monotonic() + timeout
        for t in self._threads:
            t.join(max(0.0, deadline - time.monotonic()))
        return sum(t.is_alive() for t in self._threads)
