"""OpenAI-compatible request bodies (validated) and the error shape."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


class StreamOptions(BaseModel):
    """``stream_options``: whether the last chunk (and, with ``continuous_usage_stats``,
    every chunk) carries ``usage``."""

    model_config = ConfigDict(extra="forbid")
    include_usage: bool = False
    continuous_usage_stats: bool = False


class _Sampling(BaseModel):
    """Parameters shared by completions and chat completions."""

    model_config = ConfigDict(extra="forbid")

    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(0, ge=0, description="elasticmoe extension; 0 = off")
    n: int = Field(1, ge=1, le=16)
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=0, le=2**63 - 1)
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    user: str | None = None
    ignore_eos: bool = Field(False, description="elasticmoe extension: generate max_tokens")
    min_tokens: int = Field(
        0, ge=0, description="vLLM extension: EOS and stop tokens are blocked until then"
    )

    @model_validator(mode="after")
    def _check(self) -> _Sampling:
        if self.presence_penalty or self.frequency_penalty:
            raise ValueError("presence_penalty and frequency_penalty are not supported; use 0")
        stops = [self.stop] if isinstance(self.stop, str) else (self.stop or [])
        if len(stops) > 4 or any(not s for s in stops):
            raise ValueError("stop: at most 4 non-empty strings")
        return self

    @property
    def stop_list(self) -> list[str]:
        """``stop`` as a list."""
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])


class CompletionRequest(_Sampling):
    """``POST /v1/completions``."""

    prompt: str | list[str] | list[int] | list[list[int]] = Field(
        ..., description="text, texts, token ids, or lists of token ids"
    )
    max_tokens: int | None = Field(16, ge=0, description="0 only with echo: score the prompt")
    logprobs: int | None = Field(None, ge=0, le=5)
    echo: bool = Field(False, description="prepend the prompt (and its logprobs) to the answer")
    best_of: int | None = Field(None, ge=1, le=16)
    suffix: None = None

    @model_validator(mode="after")
    def _check_prompt(self) -> CompletionRequest:
        if self.best_of is not None and self.best_of != self.n:
            raise ValueError("best_of other than n is not supported")
        if self.max_tokens == 0 and not self.echo:
            raise ValueError("max_tokens: 0 is only allowed with echo (scoring the prompt)")
        p = self.prompt
        if isinstance(p, list) and not p:
            raise ValueError("prompt: must not be empty")
        if isinstance(p, list) and isinstance(p[0], list) and any(not x for x in p):
            raise ValueError("prompt: token id lists must not be empty")
        return self

    def prompts(self) -> list[str | list[int]]:
        """The prompts as a list of texts or token id lists."""
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if p and isinstance(p[0], int):
            return [list(p)]  # type: ignore[arg-type]
        return list(p)  # type: ignore[arg-type]


class ChatMessage(BaseModel):
    """One message of a conversation."""

    model_config = ConfigDict(extra="forbid")
    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: str
    name: str | None = None


class ChatCompletionRequest(_Sampling):
    """``POST /v1/chat/completions``."""

    messages: list[ChatMessage] = Field(..., min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)

    @property
    def token_limit(self) -> int | None:
        """``max_completion_tokens`` (the newer name) or ``max_tokens``."""
        return self.max_completion_tokens or self.max_tokens


class ScaleRequest(BaseModel):
    """``POST /admin/scale``: set the replica count of one logical expert."""

    model_config = ConfigDict(extra="forbid")
    expert: str = Field(..., pattern=r"^\d+:\d+$", description="layer:expert")
    replicas: int = Field(..., ge=1)


class ReplicaRequest(BaseModel):
    """``POST /admin/replicate|evict|migrate``."""

    model_config = ConfigDict(extra="forbid")
    expert: str = Field(..., pattern=r"^\d+:\d+$")
    source: str | None = None
    target: str | None = None


class AddWorkersRequest(BaseModel):
    """``POST /admin/workers``."""

    model_config = ConfigDict(extra="forbid")
    count: int = Field(1, ge=1, le=64)


class DrainRequest(BaseModel):
    """``POST /admin/drain``: workers (ids) and/or nodes (Ray node id or IP) to empty and stop."""

    model_config = ConfigDict(extra="forbid")
    workers: list[str] = Field(default_factory=list, max_length=1024)
    nodes: list[str] = Field(default_factory=list, max_length=1024)

    @model_validator(mode="after")
    def _something(self) -> DrainRequest:
        if not self.workers and not self.nodes:
            raise ValueError("name at least one worker or node to drain")
        return self


class PolicyRequest(BaseModel):
    """``PUT /admin/policy``: an autoscaling policy document (YAML or JSON text)."""

    model_config = ConfigDict(extra="forbid")
    policy: str = Field(..., max_length=1_000_000)


def error_body(message: str, type_: str, code: int | str | None = None, param: str | None = None):
    """The OpenAI error JSON shape."""
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}
