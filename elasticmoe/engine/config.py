"""Engine settings (validated; unknown keys and bad values name the field)."""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class EngineConfig(BaseModel):
    """How one engine runs a model."""

    model_config = ConfigDict(extra="forbid")

    model: str = Field(description="checkpoint directory (Hugging Face layout)")
    dtype: Literal["float32", "bfloat16", "float16", "auto"] = "auto"
    device: str = Field("auto", description="'auto', 'cpu', 'cuda' or 'cuda:N'")
    block_size: int = Field(16, ge=1, le=1024)
    num_kv_blocks: int | None = Field(None, ge=1, description="overrides kv_cache_memory_gb")
    kv_cache_memory_gb: float = Field(0.5, gt=0)
    max_num_seqs: int = Field(128, ge=1)
    max_num_batched_tokens: int = Field(1024, ge=1)
    max_model_len: int | None = Field(None, ge=1)
    enable_prefix_caching: bool = True
    seed: int = 0
    decode_buckets: list[int] | None = Field(
        None,
        description="pad decode-only steps to the smallest of these batch sizes that fits "
        "(and block tables to a power of two), so CUDA graphs can capture a few static "
        "shapes; None: no padding (the CPU default: padding is only extra work there)",
    )

    micro_batches: int = Field(
        1,
        ge=1,
        le=2,
        description="2: split a step into two micro-batches that ping-pong when the expert "
        "backend is asynchronous (distributed mode): one's routed experts run on the workers "
        "while the engine computes the other's attention and shared experts; in-process "
        "experts never split (nothing would overlap). Default 1: with decode-sized batches "
        "an expert's compute is its weight reads, which the second micro-batch repeats; "
        "bench/dispatch.py measured 2 slower than 1 (x0.6-0.75, batch 8-128) where the engine "
        "and the workers share the cores. Try 2 when they have their own cores or devices "
        "and batches are large",
    )
    micro_batch_min_seqs: int = Field(
        8,
        ge=1,
        le=4096,
        description="split only steps with at least this many sequences per micro-batch "
        "(below it the second round trip per layer costs more than the overlap saves)",
    )

    @model_validator(mode="after")
    def _check_buckets(self) -> EngineConfig:
        b = self.decode_buckets
        if b is not None and (not b or any(x < 1 for x in b) or sorted(set(b)) != b):
            raise ValueError(
                f"decode_buckets={b!r}: give distinct positive batch sizes in ascending order, "
                "e.g. [1, 2, 4, 8, 16, 32, 64]"
            )
        return self

    @model_validator(mode="after")
    def _check_device(self) -> EngineConfig:
        if self.device not in ("auto", "cpu") and not self.device.startswith("cuda"):
            raise ValueError(f"device={self.device!r}: use 'auto', 'cpu', 'cuda' or 'cuda:N'")
        if self.device.startswith("cuda") and not torch.cuda.is_available():
            raise ValueError(f"device={self.device!r} but no CUDA device is available")
        return self

    def torch_device(self) -> torch.device:
        """The resolved torch device."""
        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return torch.device(self.device)

    def torch_dtype(self, checkpoint_dtype: str | None) -> torch.dtype:
        """The resolved torch dtype (``auto``: the checkpoint's, else float32)."""
        if self.dtype != "auto":
            return DTYPES[self.dtype]
        return DTYPES.get(checkpoint_dtype or "float32", torch.float32)
