"""The engine: scheduler + paged KV + model + sampler, stepped one batch at a time."""

from __future__ import annotations

import itertools
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from elasticmoe.engine.config import EngineConfig
from elasticmoe.engine.latency import LatencyRecorder
from elasticmoe.engine.logits import apply_min_tokens, needs_min_tokens, prompt_logprobs
from elasticmoe.engine.model_runner import ModelRunner
from elasticmoe.engine.request import (
    CompletionDelta,
    CompletionOutput,
    Request,
    RequestOutput,
    RequestStatus,
    SamplingParams,
)
from elasticmoe.engine.sampler import Sampler
from elasticmoe.engine.scheduler import Scheduler
from elasticmoe.experts.load import ExpertLoadRecorder
from elasticmoe.experts.local import LocalExperts
from elasticmoe.kv.manager import KVCacheManager
from elasticmoe.model.attention import PagedKVCache
from elasticmoe.model.checkpoint import CheckpointReader
from elasticmoe.model.config import load_config
from elasticmoe.model.model import MoEForCausalLM
from elasticmoe.model.moe import ExpertBackend
from elasticmoe.model.tokenizer import Tokenizer

logger = logging.getLogger(__name__)

Prompt = str | list[int] | dict

# Builds the expert backend once the model's config, dtype and device are known.
ExpertBackendFactory = Callable[
    [CheckpointReader, MoEForCausalLM, torch.dtype, torch.device], ExpertBackend
]


def local_experts(
    reader: CheckpointReader, model: MoEForCausalLM, dtype: torch.dtype, device: torch.device
) -> ExpertBackend:
    """All experts in-process (``mode="local"``)."""
    return LocalExperts.from_checkpoint(reader, model.config, dtype, device)


class EngineGenerateError(ValueError):
    """A request could not be accepted (the engine itself is fine): bad input, or a
    request that cannot fit. A ``ValueError``, so callers that validate input catch it."""


@dataclass
class EngineStats:
    """Point-in-time engine figures for metrics and status."""

    num_running: int
    num_waiting: int
    kv_usage: float
    prefix_cache_hit_rate: float
    num_preemptions: int


class LLMEngine:
    """Runs requests to completion with continuous batching.

    ``add_request`` queues work; each ``step`` runs one batch and returns the
    outputs of the requests that advanced.
    """

    def __init__(
        self, config: EngineConfig, expert_backend: ExpertBackendFactory = local_experts
    ) -> None:
        self.config = config
        model_dir = Path(config.model)
        self.device = config.torch_device()
        reader = CheckpointReader(model_dir)
        mcfg = load_config(model_dir)
        self.dtype = config.torch_dtype(mcfg.raw.get("dtype") or mcfg.raw.get("torch_dtype"))
        self.model = MoEForCausalLM.from_checkpoint(model_dir, self.dtype, self.device, reader)
        self.model.experts = expert_backend(reader, self.model, self.dtype, self.device)
        self.model_config = self.model.config
        self.tokenizer = (
            Tokenizer.from_dir(model_dir) if (model_dir / "tokenizer.json").is_file() else None
        )
        eos = set(self.model_config.eos_token_ids)
        if self.tokenizer is not None:
            eos |= set(self.tokenizer.eos_token_ids)
        self.eos_token_ids = frozenset(eos)
        self.max_model_len = config.max_model_len or self.model_config.max_position_embeddings

        mc = self.model_config
        num_blocks = config.num_kv_blocks or max(
            1,
            int(config.kv_cache_memory_gb * 2**30)
            // PagedKVCache.bytes_per_block(
                mc.num_layers, config.block_size, mc.kv_cache_layout, self.dtype
            ),
        )
        self.kv_manager = KVCacheManager(
            num_blocks, config.block_size, config.enable_prefix_caching
        )
        self.kv_cache = PagedKVCache(
            mc.num_layers,
            num_blocks,
            config.block_size,
            mc.kv_cache_layout,
            self.dtype,
            self.device,
        )
        self.scheduler = Scheduler(
            self.kv_manager, config.max_num_seqs, config.max_num_batched_tokens
        )
        self.runner = ModelRunner(
            self.model,
            self.kv_cache,
            self.kv_manager,
            self.device,
            config.decode_buckets,
            config.micro_batches,
            config.micro_batch_min_seqs,
        )
        self.sampler = Sampler(self.device, config.seed)
        self.load_recorder = ExpertLoadRecorder(mc.moe_layers, mc.num_experts, self.device)
        self.latency = LatencyRecorder()
        self._ids = itertools.count()
        # parent request id -> its n sequences
        self._groups: dict[str, list[Request]] = {}
        self._num_prompt_logprobs = 0  # live requests that want prompt logprobs

    # ----------------------------------------------------------------- requests
    def tokenize(self, prompt: Prompt) -> tuple[str | None, list[int]]:
        """(text, token ids) of a prompt given as text, ids or ``{"prompt_token_ids": ...}``."""
        if isinstance(prompt, dict):
            extra = set(prompt) - {"prompt_token_ids", "prompt"}
            if extra or "prompt_token_ids" not in prompt:
                raise EngineGenerateError(
                    f"prompt dict must have the key 'prompt_token_ids'; got keys {sorted(prompt)}"
                )
            prompt = list(prompt["prompt_token_ids"])
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise EngineGenerateError(
                    f"{self.config.model} has no tokenizer.json: pass prompt_token_ids instead"
                )
            return prompt, self.tokenizer.encode(prompt)
        ids = list(prompt)
        vocab = self.model_config.vocab_size
        # bool is an int to Python, never a token id
        bad = [t for t in ids if type(t) is not int or not 0 <= t < vocab]
        if bad:
            raise EngineGenerateError(
                f"prompt_token_ids contains ids outside 0..{vocab - 1}: {bad[:5]}"
            )
        return None, ids

    def add_request(
        self, prompt: Prompt, params: SamplingParams | None = None, request_id: str | None = None
    ) -> str:
        """Queue a prompt; returns its request id. Raises ``ValueError`` for bad input."""
        request_id, children = self.prepare_request(prompt, params, request_id)
        self.add_prepared(request_id, children)
        return request_id

    def prepare_request(
        self, prompt: Prompt, params: SamplingParams | None = None, request_id: str | None = None
    ) -> tuple[str, list[Request]]:
        """Validate and tokenize a prompt into its ``n`` sequences without queueing them
        (safe on any thread: it reads no engine state that a step changes).
        Raises ``ValueError`` for bad input."""
        params = params or SamplingParams()
        request_id = request_id or f"req-{next(self._ids)}"
        text, ids = self.tokenize(prompt)
        if not ids:
            raise EngineGenerateError("prompt is empty: give at least one token")
        total = len(ids) + params.max_tokens
        if total > self.max_model_len:
            raise EngineGenerateError(
                f"prompt ({len(ids)} tokens) + max_tokens ({params.max_tokens}) = {total} "
                f"exceeds max_model_len={self.max_model_len}"
            )
        capacity = self.kv_manager.pool.num_blocks * self.config.block_size
        if total > capacity:
            raise EngineGenerateError(
                f"prompt + max_tokens = {total} tokens does not fit in the KV cache "
                f"({capacity} tokens); raise kv_cache_memory_gb or lower max_tokens"
            )
        now = time.time()
        children = []
        for i in range(params.n):
            child_params = params
            if params.n > 1 and params.seed is not None:
                child_params = params.model_copy(update={"seed": params.seed + i})
            children.append(
                Request(
                    request_id=request_id if params.n == 1 else f"{request_id}#{i}",
                    prompt_token_ids=list(ids),
                    params=child_params,
                    arrival_time=now,
                    prompt=text,
                    eos_token_ids=self.eos_token_ids,
                    index=i,
                    parent_id=request_id,
                    detokenizer=self.tokenizer.detokenizer()
                    if self.tokenizer is not None
                    else None,
                )
            )
        return request_id, children

    def add_prepared(self, request_id: str, children: list[Request]) -> None:
        """Queue what :meth:`prepare_request` made (on the stepping thread)."""
        if request_id in self._groups:
            raise EngineGenerateError(f"request id {request_id!r} is already in use")
        for child in children:
            self.scheduler.add_request(child)
        self._groups[request_id] = children
        if children[0].params.prompt_logprobs is not None:
            self._num_prompt_logprobs += len(children)

    def abort_request(self, request_id: str) -> list[RequestOutput]:
        """Stop a request; returns its final output (finish_reason 'abort'), if it was live."""
        children = self._abort(request_id)
        return self._outputs({c.request_id for c in children}) if children else []

    def abort_request_deltas(self, request_id: str) -> list[CompletionDelta]:
        """Like :meth:`abort_request`, as deltas (what the caller has not seen yet)."""
        return self._deltas(self._abort(request_id))

    def _abort(self, request_id: str) -> list[Request]:
        children = self._groups.get(request_id, [])
        for child in children:
            if not child.status.finished:
                self._finish(child, RequestStatus.FINISHED_ABORTED)
        return list(children)

    def forget_request(self, request_id: str) -> None:
        """Drop a finished request's bookkeeping without reporting it."""
        self._groups.pop(request_id, None)

    def has_unfinished_requests(self) -> bool:
        """Whether any request is waiting or running."""
        return self.scheduler.num_unfinished > 0

    # --------------------------------------------------------------------- step
    def step(self) -> list[RequestOutput]:
        """Run one batch; return outputs of requests that advanced or finished."""
        return self._outputs({r.request_id for r in self._step()})

    def step_deltas(self) -> list[CompletionDelta]:
        """Run one batch; return what it added to each request it advanced or finished
        (new tokens and text only, never whole lists: what a server streams)."""
        return self._deltas(self._step())

    def _schedule(self):
        # a request that wants prompt logprobs needs logits for every prompt position,
        # so it must not skip its prefix via cache hits: look-ups are off for such steps
        kv = self.kv_manager
        no_hits = (
            self._num_prompt_logprobs > 0
            and kv.enable_prefix_caching
            and any(r.params.prompt_logprobs is not None for r in self.scheduler.waiting)
        )
        if no_hits:
            kv.enable_prefix_caching = False
        try:
            sched = self.scheduler.schedule()
        finally:
            if no_hits:
                kv.enable_prefix_caching = True
        for s in sched.scheduled:
            if s.request.num_cached_tokens is None:  # first scheduled: what the cache gave
                s.request.num_cached_tokens = s.request.num_computed_tokens
        return sched

    def _step(self) -> list[Request]:
        sched = self._schedule()
        if not sched.scheduled:
            return []
        experts = self.model.experts
        try:
            experts.begin_step()
            logits = self.runner.execute(sched, self.load_recorder.record)
            lost = _requests_of_rows(sched, getattr(experts, "lost_rows", ()))
            completing = [s.request for s in sched.scheduled if s.completes_sequence]
            prompt_rows = getattr(self.runner, "prompt_logit_rows", None)
            if prompt_rows:
                self._record_prompt_logprobs(logits[len(completing) :], prompt_rows)
                logits = logits[: len(completing)]
            if needs_min_tokens(completing):
                apply_min_tokens(logits, completing)
            tokens, logprobs = self.sampler.sample(logits, completing)
        except Exception as e:  # a failed step fails its requests, not the engine
            logger.exception("engine step failed")
            for s in sched.scheduled:
                s.request.error = f"{type(e).__name__}: {e}"
                self._finish(s.request, RequestStatus.FINISHED_ERROR)
            return [s.request for s in sched.scheduled]
        finally:
            experts.end_step()
            self.load_recorder.end_step()

        now = time.time()
        for s in sched.scheduled:
            s.request.num_computed_tokens += s.num_new_tokens
        touched = []
        for s in sched.scheduled:  # rows whose experts had no live replica: only those fail
            if s.request.request_id in lost:
                s.request.error = lost[s.request.request_id]
                self._finish(s.request, RequestStatus.FINISHED_ERROR)
                touched.append(s.request)
        for request, token, lp in zip(completing, tokens, logprobs, strict=True):
            if request.request_id in lost:
                continue
            request.output_token_ids.append(token)
            if lp is not None:
                request.output_logprobs.append(lp)
            if request.first_token_time is None:
                request.first_token_time = now
                self.latency.ttft.append((now, now - request.arrival_time))
            else:
                self.latency.itl.append((now, now - request.last_token_time))
            request.last_token_time = now
            touched.append(request)
            status = self._check_stop(request, token)
            if status is not None:
                self._finish(request, status)
        return touched

    def _record_prompt_logprobs(
        self, logits: torch.Tensor, rows: list[tuple[Request, int, int]]
    ) -> None:
        """logits: [sum of rows' counts, V]; row j of a request's slice predicts the
        prompt token at position start + j + 1."""
        next_ids: list[int] = []
        num_top: list[int] = []
        for request, start, num in rows:
            next_ids.extend(request.prompt_token_ids[start + 1 : start + 1 + num])
            num_top.extend([request.params.prompt_logprobs or 0] * num)
        entries = prompt_logprobs(
            logits, torch.tensor(next_ids, device=logits.device, dtype=torch.long), num_top
        )
        at = 0
        for request, start, num in rows:
            if request.prompt_logprobs is None:
                request.prompt_logprobs = [None] * len(request.prompt_token_ids)
            request.prompt_logprobs[start + 1 : start + 1 + num] = entries[at : at + num]
            at += num

    def _check_stop(self, request: Request, token: int) -> RequestStatus | None:
        params = request.params
        old_len = len(request.output_text)
        if request.detokenizer is not None:
            request.output_text += request.detokenizer.update(request.output_token_ids)
        num_out = len(request.output_token_ids)
        if num_out >= params.min_tokens:
            if not params.ignore_eos and token in request.eos_token_ids:
                return RequestStatus.FINISHED_STOPPED
            if token in params.stop_token_ids:
                request.stop_reason = token
                return RequestStatus.FINISHED_STOPPED
            grew = len(request.output_text) > old_len
            if params.stop and grew and self._match_stop(request, old_len):
                return RequestStatus.FINISHED_STOPPED
        if num_out >= params.max_tokens:
            return RequestStatus.FINISHED_LENGTH
        if request.num_tokens >= self.max_model_len:
            return RequestStatus.FINISHED_LENGTH
        return None

    @staticmethod
    def _match_stop(request: Request, old_len: int) -> bool:
        """Look for stop strings in the new text (plus the tail one could have begun in);
        on a match cut the text there and record the stop string."""
        params = request.params
        text = request.output_text
        begin = max(0, old_len - (max(len(s) for s in params.stop) - 1))
        best: tuple[int, str] | None = None
        for stop in params.stop:
            at = text.find(stop, begin)
            if at >= 0 and (best is None or at < best[0]):
                best = (at, stop)
        if best is None:
            return False
        at, stop = best
        request.stop_reason = stop
        keep = at + len(stop) if params.include_stop_str_in_output else at
        request.output_text = text[:keep]
        return True

    def _finish(self, request: Request, status: RequestStatus) -> None:
        # a stop string already cut the text; otherwise emit what the detokenizer held back
        if request.detokenizer is not None and not isinstance(request.stop_reason, str):
            request.output_text += request.detokenizer.flush()
        request.detokenizer = None
        if request.params.prompt_logprobs is not None:
            self._num_prompt_logprobs -= 1
        self.scheduler.finish(request, status)
        self.sampler.forget(request.request_id)

    def _parent_id(self, child_id: str) -> str:
        return child_id.split("#", 1)[0] if child_id not in self._groups else child_id

    def _outputs(self, touched: set[str]) -> list[RequestOutput]:
        outputs = []
        for parent in {self._parent_id(c) for c in touched}:
            children = self._groups[parent]
            finished = all(c.status.finished for c in children)
            outputs.append(
                RequestOutput(
                    request_id=parent,
                    prompt=children[0].prompt,
                    prompt_token_ids=children[0].prompt_token_ids,
                    outputs=[
                        CompletionOutput(
                            index=i,
                            text=c.output_text,
                            token_ids=list(c.output_token_ids),
                            finish_reason=c.status.value if c.status.finished else None,
                            stop_reason=c.stop_reason if c.error is None else c.error,
                            logprobs=list(c.output_logprobs)
                            if c.params.logprobs is not None
                            else None,
                        )
                        for i, c in enumerate(children)
                    ],
                    finished=finished,
                    num_cached_tokens=children[0].num_cached_tokens or 0,
                    prompt_logprobs=children[0].prompt_logprobs,
                )
            )
            if finished:
                del self._groups[parent]
        return outputs

    def _deltas(self, touched: list[Request]) -> list[CompletionDelta]:
        deltas = []
        done_parents = []
        for c in touched:
            finished = c.status.finished
            num_tokens = len(c.output_token_ids)
            new_ids = c.output_token_ids[c.num_tokens_sent :]
            logprobs = None
            if c.params.logprobs is not None:
                logprobs = c.output_logprobs[c.num_tokens_sent :]
            c.num_tokens_sent = num_tokens
            # while running, hold back the text a stop string could still cut
            ready = len(c.output_text)
            if not finished and c.params.stop:
                ready -= max(len(s) for s in c.params.stop) - 1
            text = ""
            if ready > c.num_text_sent:
                text = c.output_text[c.num_text_sent : ready]
                c.num_text_sent = ready
            group_done = finished and all(x.status.finished for x in self._groups[c.parent_id])
            deltas.append(
                CompletionDelta(
                    request_id=c.parent_id,
                    index=c.index,
                    token_ids=new_ids,
                    text=text,
                    logprobs=logprobs,
                    finish_reason=c.status.value if finished else None,
                    stop_reason=(c.stop_reason if c.error is None else c.error)
                    if finished
                    else None,
                    num_prompt_tokens=len(c.prompt_token_ids),
                    num_cached_tokens=c.num_cached_tokens or 0,
                    prompt_logprobs=c.prompt_logprobs if finished and c.index == 0 else None,
                    finished=group_done,
                )
            )
            if group_done:
                done_parents.append(c.parent_id)
        for parent in done_parents:
            self._groups.pop(parent, None)
        return deltas

    def stats(self) -> EngineStats:
        """Current queue lengths, KV usage and cache hit rate."""
        return EngineStats(
            num_running=len(self.scheduler.running),
            num_waiting=len(self.scheduler.waiting),
            kv_usage=self.kv_manager.usage,
            prefix_cache_hit_rate=self.kv_manager.stats.hit_rate,
            num_preemptions=self.scheduler.num_preemptions,
        )


def _requests_of_rows(sched, lost_rows) -> dict[str, str]:
    """request id -> error, for the requests owning any of ``lost_rows`` ((rows, error)
    pairs an expert backend reports for the step; rows index the step's flat tokens, which
    the runner lays out request by request in ``sched.scheduled`` order)."""
    if not lost_rows:
        return {}
    ends = np.cumsum([s.num_new_tokens for s in sched.scheduled])
    failed: dict[str, str] = {}
    for rows, error in lost_rows:
        for i in np.searchsorted(ends, rows.tolist(), side="right").tolist():
            failed.setdefault(sched.scheduled[i].request.request_id, error)
    return failed
