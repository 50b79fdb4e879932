"""``TrainConfig``: one YAML file says what to train, on what, for how long, and where.

Validated with pydantic (unknown keys rejected); :func:`load_train_config` turns validation
errors into :class:`TrainConfigError` messages that name the file and the field path
(``train.lr: Input should be greater than 0``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

__all__ = [
    "DataConfig",
    "FaultConfig",
    "ModelSpec",
    "ScalingSpec",
    "TrainConfig",
    "TrainConfigError",
    "TrainLoopConfig",
    "load_train_config",
    "parse_train_config",
]


class TrainConfigError(ValueError):
    """A training config file is missing, not YAML, or fails validation."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ModelSpec(_Strict):
    """The model: a family and size to train from scratch, or a checkpoint to fine-tune.

    From scratch, ``arch``/``preset`` pick :func:`elasticmoe.model.init_model.build_config`'s
    starting point and ``overrides`` replace config.json keys (``hidden_size``,
    ``num_experts``, ...); ``vocab_size`` comes from the tokenizer trained on the corpus.
    With ``init_from`` (a checkpoint directory or a built-in name) the checkpoint's config,
    weights and tokenizer are used and ``arch``/``preset``/``overrides`` must be left unset.
    """

    arch: Literal["mixtral", "qwen2_moe", "qwen3_moe", "olmoe"] = "mixtral"
    preset: Literal["tiny", "small"] = "tiny"
    overrides: dict[str, Any] = Field(default_factory=dict)
    init_from: str | None = None
    router_aux_loss_coef: float | None = Field(
        default=None,
        ge=0,
        description="load-balancing loss weight; unset: the family's default in config.json",
    )
    init_std: float = Field(0.02, gt=0)

    @model_validator(mode="after")
    def _scratch_or_finetune(self) -> ModelSpec:
        if self.init_from is not None and (self.overrides or "preset" in self.model_fields_set):
            raise ValueError("init_from fine-tunes a checkpoint as it is: drop preset/overrides")
        if "vocab_size" in self.overrides:
            raise ValueError("overrides.vocab_size: set tokenizer.vocab_size instead")
        return self


class TokenizerSpec(_Strict):
    """BPE tokenizer trained on the training corpus (ignored when fine-tuning)."""

    vocab_size: int = Field(4096, ge=260, le=262_144)


class DataConfig(_Strict):
    """Corpus and blocks.

    ``corpus`` is ``stdlib`` (the Python standard library's ``.py`` sources and ``pydoc``
    topics on this machine: every machine has them offline) or a list of files, directories
    and globs (``.py``/``.txt``/``.md``/``.rst`` files under directories).
    """

    corpus: Literal["stdlib"] | list[str] = "stdlib"
    exclude: list[str] = Field(
        default_factory=lambda: ["test/*", "idlelib/*", "lib2to3/*", "site-packages/*"],
        description="glob patterns (relative to a corpus directory) to skip",
    )
    max_chars: int = Field(4_000_000, gt=0, description="cap on corpus characters")
    seq_len: int = Field(256, ge=8)
    eval_fraction: float = Field(0.02, gt=0, lt=0.5)


class TrainLoopConfig(_Strict):
    """Optimisation: AdamW, linear warmup then cosine decay to ``min_lr``, grad clipping."""

    steps: int = Field(..., gt=0)
    batch_size: int = Field(16, gt=0, description="sequences per step over all workers")
    lr: float = Field(1e-3, gt=0)
    min_lr: float = Field(1e-4, ge=0)
    warmup_steps: int = Field(50, ge=0)
    weight_decay: float = Field(0.1, ge=0)
    betas: tuple[float, float] = (0.9, 0.95)
    grad_clip: float = Field(1.0, gt=0)
    eval_every: int = Field(100, gt=0)
    eval_batches: int = Field(8, gt=0, description="eval batches (of batch_size) per evaluation")
    log_every: int = Field(10, gt=0)
    checkpoint_every: int = Field(100, gt=0)
    seed: int = 0

    @model_validator(mode="after")
    def _check(self) -> TrainLoopConfig:
        if self.min_lr > self.lr:
            raise ValueError(f"min_lr={self.min_lr} must be <= lr={self.lr}")
        if self.warmup_steps >= self.steps:
            raise ValueError(f"warmup_steps={self.warmup_steps} must be < steps={self.steps}")
        return self


class ScalingSpec(_Strict):
    """Ray Train data parallelism: ``num_workers`` workers, each on a GPU when asked/found."""

    num_workers: int = Field(2, ge=1)
    use_gpu: bool | Literal["auto"] = "auto"
    cpus_per_worker: float = Field(1, gt=0)
    torch_threads: int | None = Field(
        None, ge=1, description="torch intra-op threads per worker (default: cpus_per_worker)"
    )


class FaultConfig(_Strict):
    """Test hook: worker ``exit_rank`` exits its process at ``exit_at_step``, once.

    The marker file makes it happen once: the restarted worker finds it and carries on.
    ``delay_s`` stalls the worker first: Ray Train's controller learns of a reported
    checkpoint at its next poll of the workers (every 2 s), and only checkpoints it learned
    of are resumed from.
    """

    exit_rank: int = Field(1, ge=0)
    exit_at_step: int = Field(..., gt=0)
    marker_file: str
    delay_s: float = Field(0.0, ge=0)


class TrainConfig(_Strict):
    """A training run: model, tokenizer, data, optimisation, scaling, outputs."""

    model: ModelSpec = ModelSpec()
    tokenizer: TokenizerSpec = TokenizerSpec()
    data: DataConfig = DataConfig()
    train: TrainLoopConfig
    scaling: ScalingSpec = ScalingSpec()
    output_dir: str = Field(..., description="where the Hugging Face checkpoint is exported")
    export_dtype: Literal["float32", "bfloat16"] = "float32"
    run_name: str = "elasticmoe-train"
    storage_path: str | None = Field(
        None,
        description="Ray Train run storage (checkpoints, progress); must be shared by all "
        "nodes. Default: <output_dir>.runs",
    )
    max_failures: int = Field(3, ge=-1, description="worker-group restarts from a checkpoint")
    keep_checkpoints: int = Field(2, ge=1)
    fault: FaultConfig | None = None

    @model_validator(mode="after")
    def _check(self) -> TrainConfig:
        if self.fault is not None and self.fault.exit_rank >= self.scaling.num_workers:
            raise ValueError(
                f"fault.exit_rank={self.fault.exit_rank} but scaling.num_workers="
                f"{self.scaling.num_workers}"
            )
        if self.train.batch_size % self.scaling.num_workers:
            raise ValueError(
                f"train.batch_size={self.train.batch_size} must be a multiple of "
                f"scaling.num_workers={self.scaling.num_workers}"
            )
        return self

    def resolved_storage_path(self) -> Path:
        """Absolute run storage directory."""
        path = self.storage_path or f"{self.output_dir.rstrip('/')}.runs"
        return Path(path).expanduser().resolve()


def _field_path(loc: tuple[Any, ...]) -> str:
    return ".".join(str(p) for p in loc) or "<root>"


def parse_train_config(data: Any, source: str = "<config>") -> TrainConfig:
    """Validate a config dict; errors name ``source`` and each bad field's path."""
    if not isinstance(data, dict):
        raise TrainConfigError(
            f"{source}: expected a mapping of settings, got {type(data).__name__}"
        )
    try:
        return TrainConfig.model_validate(data)
    except ValidationError as e:
        lines = [
            f"  {_field_path(err['loc'])}: {err['msg']}"
            + (f" (got {err['input']!r})" if err["type"] != "missing" else "")
            for err in e.errors(include_url=False)
        ]
        raise TrainConfigError(f"{source}: invalid training config\n" + "\n".join(lines)) from None


def load_train_config(path: str | Path, overrides: dict[str, Any] | None = None) -> TrainConfig:
    """Read a YAML training config; ``overrides`` (dotted keys) replace values first.

    Relative ``output_dir``/``storage_path``/``init_from``/corpus paths stay relative to the
    current directory (the CLI's), like every other elasticmoe path option.
    """
    path = Path(path)
    if not path.is_file():
        raise TrainConfigError(f"{path}: no such file")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise TrainConfigError(f"{path}: not valid YAML ({e})") from None
    for dotted, value in (overrides or {}).items():
        node = data if isinstance(data, dict) else {}
        *parents, leaf = dotted.split(".")
        for key in parents:
            node = node.setdefault(key, {})
        node[leaf] = value
    return parse_train_config(data, str(path))
