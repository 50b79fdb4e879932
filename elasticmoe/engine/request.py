"""Sampling parameters, requests and their outputs (the vLLM-shaped public types)."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

# Below this a temperature is greedy: dividing logits by 1e-45 overflows to inf/NaN
# (an empty or garbage completion), and the distribution is argmax long before that.
TEMPERATURE_FLOOR = 1e-5


class SamplingParams(BaseModel):
    """How to sample a completion. ``temperature=0`` (or below ``TEMPERATURE_FLOOR``,
    which becomes 0) means greedy; ``top_k=-1`` is vLLM's "off", the same as 0.

    Validated on construction; a bad value raises ``pydantic.ValidationError``
    (a ``ValueError``) naming the field. NaN and infinities are refused.
    """

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    n: int = Field(1, ge=1, le=64)
    max_tokens: int = Field(16, ge=1)
    temperature: float = Field(1.0, ge=0.0, le=100.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(0, ge=-1, description="0 (or -1) disables top-k")
    seed: int | None = None
    stop: list[str] = Field(default_factory=list)
    stop_token_ids: list[int] = Field(default_factory=list)
    ignore_eos: bool = False
    include_stop_str_in_output: bool = False
    logprobs: int | None = Field(None, ge=0, le=20)
    prompt_logprobs: int | None = Field(
        None, ge=0, le=20, description="logprobs of each prompt token (and the top N)"
    )
    min_tokens: int = Field(0, ge=0, description="EOS and stop tokens are blocked until then")

    def __init__(self, **data):  # accept stop="x" like vLLM
        if isinstance(data.get("stop"), str):
            data["stop"] = [data["stop"]]
        super().__init__(**data)

    @field_validator("temperature")
    @classmethod
    def _floor_is_greedy(cls, v: float) -> float:
        return 0.0 if v < TEMPERATURE_FLOOR else v

    @field_validator("top_k")
    @classmethod
    def _minus_one_is_off(cls, v: int) -> int:
        return 0 if v == -1 else v

    @field_validator("stop")
    @classmethod
    def _no_empty_stop(cls, v: list[str]) -> list[str]:
        if any(s == "" for s in v):
            raise ValueError("stop strings must be non-empty")
        return v

    @model_validator(mode="after")
    def _min_le_max(self) -> SamplingParams:
        if self.min_tokens > self.max_tokens:
            raise ValueError(
                f"min_tokens ({self.min_tokens}) must not exceed max_tokens ({self.max_tokens})"
            )
        return self

    @property
    def greedy(self) -> bool:
        """Whether sampling is plain argmax."""
        return self.temperature == 0.0


class RequestStatus(enum.Enum):
    """Lifecycle of a request inside the engine."""

    WAITING = "waiting"
    RUNNING = "running"
    PREEMPTED = "preempted"
    FINISHED_STOPPED = "stop"
    FINISHED_LENGTH = "length"
    FINISHED_ABORTED = "abort"
    FINISHED_ERROR = "error"

    @property
    def finished(self) -> bool:
        """Whether the request left the engine."""
        return self.value in ("stop", "length", "abort", "error")


@dataclass
class Request:
    """One sequence being generated (a prompt with ``n`` > 1 becomes n requests)."""

    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    arrival_time: float
    prompt: str | None = None
    output_token_ids: list[int] = field(default_factory=list)
    output_logprobs: list[dict[int, float]] = field(default_factory=list)
    num_computed_tokens: int = 0
    status: RequestStatus = RequestStatus.WAITING
    output_text: str = ""
    stop_reason: str | int | None = None
    error: str | None = None
    num_preemptions: int = 0
    first_token_time: float | None = None
    last_token_time: float = 0.0
    eos_token_ids: frozenset[int] = frozenset()
    index: int = 0  # which of its parent's n completions
    parent_id: str = ""
    num_cached_tokens: int | None = None  # prefix-cache hits when first scheduled
    detokenizer: Any = None  # a DetokenizeState while text is produced incrementally
    num_text_sent: int = 0  # chars of output_text already reported in a delta
    num_tokens_sent: int = 0  # output tokens already reported in a delta
    prompt_logprobs: list[dict[int, float] | None] | None = None

    @property
    def num_tokens(self) -> int:
        """Prompt plus output length."""
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    def token_ids(self, start: int, end: int) -> list[int]:
        """Tokens ``start:end`` of the prompt followed by the output so far, without
        building that whole list (O(context) per call)."""
        prompt, output = self.prompt_token_ids, self.output_token_ids
        n = len(prompt)
        if start >= n:
            return output[start - n : end - n]
        if end <= n:
            return prompt[start:end]
        return prompt[start:] + output[: end - n]


@dataclass
class CompletionOutput:
    """One generated sequence of a request (``outputs[i]``)."""

    index: int
    text: str
    token_ids: list[int]
    finish_reason: str | None = None
    stop_reason: str | int | None = None
    logprobs: list[dict[int, float]] | None = None


@dataclass
class RequestOutput:
    """The result of one prompt: ``outputs[0].token_ids``, ``outputs[0].text``."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    num_cached_tokens: int = 0
    prompt_logprobs: list[dict[int, float] | None] | None = None


@dataclass(slots=True)
class CompletionDelta:
    """What one step added to one completion: only the new tokens and text."""

    request_id: str  # the parent request id (what the caller submitted)
    index: int
    token_ids: list[int]
    text: str
    logprobs: list[dict[int, float]] | None = None
    finish_reason: str | None = None
    stop_reason: str | int | None = None
    # set on a request's first delta
    num_prompt_tokens: int | None = None
    num_cached_tokens: int | None = None
    # set on the last delta of a request that asked for prompt logprobs
    prompt_logprobs: list[dict[int, float] | None] | None = None
    finished: bool = False  # every completion of the request is done


@dataclass(slots=True)
class StreamError:
    """A request on a shared stream ended without a final delta (engine shut down or
    crashed); the caller may run it again elsewhere."""

    request_id: str
    message: str


class OutputAccumulator:
    """Builds the cumulative :class:`RequestOutput` of a request from its deltas."""

    def __init__(self, request_id: str, prompt_token_ids: list[int], n: int = 1) -> None:
        self.output = RequestOutput(
            request_id,
            None,
            prompt_token_ids,
            [CompletionOutput(i, "", []) for i in range(n)],
            False,
        )

    def add(self, delta: CompletionDelta) -> RequestOutput:
        """Apply one delta; returns the (shared, updated) output."""
        out = self.output
        while delta.index >= len(out.outputs):
            out.outputs.append(CompletionOutput(len(out.outputs), "", []))
        c = out.outputs[delta.index]
        c.token_ids.extend(delta.token_ids)
        c.text += delta.text
        if delta.logprobs is not None:
            c.logprobs = (c.logprobs or []) + delta.logprobs
        if delta.finish_reason is not None:
            c.finish_reason, c.stop_reason = delta.finish_reason, delta.stop_reason
        if delta.num_cached_tokens is not None:
            out.num_cached_tokens = delta.num_cached_tokens
        if delta.prompt_logprobs is not None:
            out.prompt_logprobs = delta.prompt_logprobs
        out.finished = delta.finished
        return out


class ReplayDivergedError(RuntimeError):
    """A request rerun after its engine died produced different tokens than were delivered."""


class Replay:
    """Resume a streamed request on another engine after its engine died.

    The rerun starts from the prompt again; greedy and seeded sampling give the
    same tokens, so the outputs that only repeat what the client already has
    are skipped (:meth:`accept` says which to pass on), and a rerun that
    disagrees raises :class:`ReplayDivergedError`. Unseeded sampling cannot be
    replayed (:meth:`can_resume`).
    """

    def __init__(self, params: SamplingParams) -> None:
        self.params = params
        self.delivered: dict[int, list[int]] = {}  # completion index -> tokens passed on
        self.delivered_text: dict[int, list[int]] = {}  # completion index -> [chars passed on]

    @property
    def started(self) -> bool:
        """Whether any token was passed on."""
        return any(self.delivered.values())

    def can_resume(self) -> bool:
        """Whether a rerun repeats the delivered tokens exactly."""
        return not self.started or self.params.temperature == 0 or self.params.seed is not None

    def accept(self, out: RequestOutput) -> bool:
        """Whether to pass ``out`` on (False while a rerun is still catching up)."""
        for c in out.outputs:
            seen = self.delivered.get(c.index, [])
            if c.token_ids[: len(seen)] != seen[: len(c.token_ids)]:
                raise ReplayDivergedError(
                    f"completion {c.index}: the rerun produced different tokens after "
                    f"{len(seen)} delivered ones"
                )
            if c.finish_reason is not None and len(c.token_ids) < len(seen):
                raise ReplayDivergedError(
                    f"completion {c.index}: the rerun finished after {len(c.token_ids)} "
                    f"tokens, short of the {len(seen)} already delivered"
                )
            if len(c.token_ids) < len(seen) or (len(c.token_ids) == len(seen) and not out.finished):
                return False
        for c in out.outputs:
            self.delivered[c.index] = list(c.token_ids)
        return True

    def trim(self, delta: CompletionDelta, pos: list[int]) -> bool:
        """Cut what a rerun repeats off ``delta`` (in place); False if nothing new is left.

        ``pos`` is ``[tokens, chars]`` this attempt produced for the completion so far
        (updated here). Works on deltas as :meth:`accept` does on whole outputs; the text
        delivered is tracked alongside the tokens so a rerun's repeated text is cut too.
        """
        done = self.delivered.setdefault(delta.index, [])
        done_text = self.delivered_text.setdefault(delta.index, [0])
        start, text_start = pos
        pos[0] += len(delta.token_ids)
        pos[1] += len(delta.text)
        if start == len(done) and text_start == done_text[0]:  # caught up: all of it is new
            done.extend(delta.token_ids)
            done_text[0] += len(delta.text)
            return bool(delta.token_ids or delta.text or delta.finish_reason)
        overlap = min(pos[0], len(done))
        if delta.token_ids[: max(0, overlap - start)] != done[start:overlap]:
            raise ReplayDivergedError(
                f"completion {delta.index}: the rerun produced different tokens after "
                f"{len(done)} delivered ones"
            )
        if delta.finish_reason is not None and pos[0] < len(done):
            # the rerun ended short of what the client already has: it cannot catch up
            raise ReplayDivergedError(
                f"completion {delta.index}: the rerun finished after {pos[0]} tokens, "
                f"short of the {len(done)} already delivered"
            )
        skip = max(0, len(done) - start)
        if skip:
            delta.token_ids = delta.token_ids[skip:]
            if delta.logprobs is not None:
                delta.logprobs = delta.logprobs[skip:]
        text_skip = max(0, done_text[0] - text_start)
        if text_skip:
            delta.text = delta.text[text_skip:]
        done.extend(delta.token_ids)
        done_text[0] += len(delta.text)
        return bool(delta.token_ids or delta.text or delta.finish_reason)
