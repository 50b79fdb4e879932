"""Sampling parameters, requests and their outputs (the vLLM-shaped public types)."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from pydantic import BaseModel, ConfigDict, Field, field_validator


class SamplingParams(BaseModel):
    """How to sample a completion. ``temperature=0`` means greedy.

    Validated on construction; a bad value raises ``pydantic.ValidationError``
    (a ``ValueError``) naming the field.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    n: int = Field(1, ge=1, le=64)
    max_tokens: int = Field(16, ge=1)
    temperature: float = Field(1.0, ge=0.0, le=100.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(0, ge=0, description="0 disables top-k")
    seed: int | None = None
    stop: list[str] = Field(default_factory=list)
    stop_token_ids: list[int] = Field(default_factory=list)
    ignore_eos: bool = False
    include_stop_str_in_output: bool = False
    logprobs: int | None = Field(None, ge=0, le=20)

    def __init__(self, **data):  # accept stop="x" like vLLM
        if isinstance(data.get("stop"), str):
            data["stop"] = [data["stop"]]
        super().__init__(**data)

    @field_validator("stop")
    @classmethod
    def _no_empty_stop(cls, v: list[str]) -> list[str]:
        if any(s == "" for s in v):
            raise ValueError("stop strings must be non-empty")
        return v

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

    @property
    def all_token_ids(self) -> list[int]:
        """Prompt followed by the tokens generated so far."""
        return self.prompt_token_ids + self.output_token_ids

    @property
    def num_tokens(self) -> int:
        """Prompt plus output length."""
        return len(self.prompt_token_ids) + len(self.output_token_ids)


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
            if len(c.token_ids) < len(seen) or (len(c.token_ids) == len(seen) and not out.finished):
                return False
        for c in out.outputs:
            self.delivered[c.index] = list(c.token_ids)
        return True
