"""OpenAI-compatible request bodies (validated) and the error shape."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictInt, field_validator, model_validator

# Bounds on what one request may ask for (every field bounded; errors name the field).
MAX_PROMPTS = 128  # prompts in one completions request
MAX_STOP = 4  # stop strings (OpenAI's limit)
MAX_STOP_CHARS = 256  # characters of one stop string
MAX_MESSAGES = 1024  # messages in one chat
MAX_CONTENT_CHARS = 1 << 20  # characters of one message (the body limit usually bites first)
MAX_TOKENS_LIMIT = 2**31 - 1  # max_tokens beyond this is a typo; the context check says more


class StreamOptions(BaseModel):
    """``stream_options``: whether the last chunk (and, with ``continuous_usage_stats``,
    every chunk) carries ``usage``."""

    model_config = ConfigDict(extra="forbid")
    include_usage: bool = False
    continuous_usage_stats: bool = False


class _Sampling(BaseModel):
    """Parameters shared by completions and chat completions."""

    # NaN and infinities are refused for every float ("temperature: NaN" in raw JSON)
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    model: str = Field(..., max_length=1024)
    max_tokens: int | None = Field(None, ge=1, le=MAX_TOKENS_LIMIT)
    temperature: float = Field(1.0, ge=0.0, le=2.0, description="below 1e-5 is greedy, as 0 is")
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(0, ge=-1, description="elasticmoe extension; 0 or -1 = off")
    n: int = Field(1, ge=1, le=16)
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=0, le=2**63 - 1)
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    user: str | None = Field(None, max_length=256)
    ignore_eos: bool = Field(False, description="elasticmoe extension: generate max_tokens")
    min_tokens: int = Field(
        0,
        ge=0,
        le=MAX_TOKENS_LIMIT,
        description="vLLM extension: EOS and stop tokens are blocked until then",
    )

    @model_validator(mode="before")
    @classmethod
    def _no_bools_as_numbers(cls, data: Any) -> Any:
        # pydantic's lax mode reads true as 1 (and 1.0): a bool is never a number here
        if isinstance(data, dict):
            for name, value in data.items():
                field = cls.model_fields.get(name)
                if isinstance(value, bool) and field is not None and field.annotation is not bool:
                    raise ValueError(f"{name}: expected a number, got {str(value).lower()}")
        return data

    @field_validator("presence_penalty", "frequency_penalty")
    @classmethod
    def _no_penalties(cls, v: float) -> float:
        if v:
            raise ValueError("presence_penalty and frequency_penalty are not supported; use 0")
        return v

    @field_validator("stop")
    @classmethod
    def _bounded_stops(cls, v: str | list[str] | None) -> str | list[str] | None:
        stops = [v] if isinstance(v, str) else (v or [])
        if len(stops) > MAX_STOP:
            raise ValueError(f"at most {MAX_STOP} stop strings, got {len(stops)}")
        for s in stops:
            if not s:
                raise ValueError("stop strings must be non-empty")
            if len(s) > MAX_STOP_CHARS:
                raise ValueError(f"a stop string has {len(s)} characters; at most {MAX_STOP_CHARS}")
        return v

    @property
    def stop_list(self) -> list[str]:
        """``stop`` as a list."""
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])


class CompletionRequest(_Sampling):
    """``POST /v1/completions``."""

    # StrictInt: [true, false] is not a list of token ids
    prompt: str | list[str] | list[StrictInt] | list[list[StrictInt]] = Field(
        ..., description=f"text, texts, token ids, or lists of token ids (at most {MAX_PROMPTS})"
    )
    max_tokens: int | None = Field(
        16, ge=0, le=MAX_TOKENS_LIMIT, description="0 only with echo: score the prompt"
    )
    logprobs: int | None = Field(None, ge=0, le=5)
    echo: bool = Field(False, description="prepend the prompt (and its logprobs) to the answer")
    best_of: int | None = Field(None, ge=1, le=16)
    suffix: None = None

    @model_validator(mode="after")
    def _check_prompt(self) -> CompletionRequest:
        if self.best_of is not None and self.best_of != self.n:
            raise ValueError("best_of: other than n is not supported")
        if self.max_tokens == 0 and not self.echo:
            raise ValueError("max_tokens: 0 is only allowed with echo (scoring the prompt)")
        p = self.prompt
        if isinstance(p, list) and not p:
            raise ValueError("prompt: must not be empty")
        if isinstance(p, list) and isinstance(p[0], list) and any(not x for x in p):
            raise ValueError("prompt: token id lists must not be empty")
        if isinstance(p, list) and not isinstance(p[0], int) and len(p) > MAX_PROMPTS:
            raise ValueError(f"prompt: at most {MAX_PROMPTS} prompts per request, got {len(p)}")
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
    content: str = Field(..., max_length=MAX_CONTENT_CHARS)
    name: str | None = Field(None, max_length=256)


class ChatCompletionRequest(_Sampling):
    """``POST /v1/chat/completions``."""

    messages: list[ChatMessage] = Field(..., min_length=1, max_length=MAX_MESSAGES)
    max_completion_tokens: int | None = Field(None, ge=1, le=MAX_TOKENS_LIMIT)
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
    replicas: StrictInt = Field(..., ge=1, le=1024)


class ReplicaRequest(BaseModel):
    """``POST /admin/replicate|evict|migrate``."""

    model_config = ConfigDict(extra="forbid")
    expert: str = Field(..., pattern=r"^\d+:\d+$")
    source: str | None = None
    target: str | None = None


class AddWorkersRequest(BaseModel):
    """``POST /admin/workers``."""

    model_config = ConfigDict(extra="forbid")
    count: StrictInt = Field(1, ge=1, le=64)


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
