"""The offline Python API, shaped like vLLM's: ``LLM(...).generate(prompts, params)``."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from elasticmoe.control.deployment import Deployment, DeploymentConfig
from elasticmoe.engine.config import EngineConfig
from elasticmoe.engine.engine import LLMEngine, Prompt
from elasticmoe.engine.request import OutputAccumulator, RequestOutput, SamplingParams
from elasticmoe.model.registry import resolve_model
from elasticmoe.model.tokenizer import Tokenizer


class LLM:
    """A Mixture-of-Experts model ready to generate.

    ``model`` is a checkpoint directory in Hugging Face layout or the name of
    a built-in model (``"default"``). ``mode="local"`` runs every expert in
    this process. ``mode="distributed"`` starts expert workers and engine
    actors on Ray (``RAY_ADDRESS`` or a local instance); its keyword
    arguments are :class:`DeploymentConfig` fields (``num_workers``,
    ``num_engines``, ``replicas_per_expert``, ``expert_replicas``, ...).
    Other keyword arguments are :class:`EngineConfig` fields (``dtype``,
    ``device``, ``num_kv_blocks``, ``max_num_seqs``, ...). Call
    :meth:`shutdown` (or use ``with LLM(...) as llm``) to stop the actors.
    ``fault`` configures fault injection in the controller (tests, chaos).
    """

    def __init__(
        self,
        model: str,
        mode: Literal["local", "distributed"] = "local",
        progress: bool = True,
        fault: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        if mode not in ("local", "distributed"):
            raise ValueError(f"mode={mode!r}: use 'local' or 'distributed'")
        self.mode = mode
        model_dir = str(resolve_model(model))
        self.deployment: Deployment | None = None
        if mode == "local":
            self.engine = LLMEngine(EngineConfig(model=model_dir, **kwargs))
            self._tokenizer = self.engine.tokenizer
            return
        deploy_fields = set(DeploymentConfig.model_fields)
        engine_args = {k: v for k, v in kwargs.items() if k not in deploy_fields}
        deploy_args = {k: v for k, v in kwargs.items() if k in deploy_fields}
        # validate engine options here, before any actor starts
        EngineConfig(model=model_dir, **engine_args)
        config = DeploymentConfig(
            model=model_dir, engine={**deploy_args.pop("engine", {}), **engine_args}, **deploy_args
        )
        self.deployment = Deployment(config, progress=progress, fault=fault).start()
        self._tokenizer = (
            Tokenizer.from_dir(model_dir)
            if (Path(model_dir) / "tokenizer.json").is_file()
            else None
        )

    def shutdown(self) -> None:
        """Stop a distributed deployment's actors (no-op in local mode)."""
        if self.deployment is not None:
            self.deployment.shutdown()
            self.deployment = None

    def __enter__(self) -> LLM:
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()

    @property
    def tokenizer(self) -> Tokenizer | None:
        """The checkpoint's tokenizer (None when it ships none)."""
        return self._tokenizer

    def generate(
        self,
        prompts: Prompt | Sequence[Prompt],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_tqdm: bool = False,
    ) -> list[RequestOutput]:
        """Generate completions for all prompts; outputs come back in prompt order."""
        if isinstance(prompts, str | dict) or (
            isinstance(prompts, list) and prompts and isinstance(prompts[0], int)
        ):
            prompts = [prompts]
        prompts = list(prompts)
        if sampling_params is None or isinstance(sampling_params, SamplingParams):
            params_list = [sampling_params or SamplingParams()] * len(prompts)
        else:
            params_list = list(sampling_params)
            if len(params_list) != len(prompts):
                raise ValueError(
                    f"got {len(params_list)} sampling_params for {len(prompts)} prompts"
                )
        if self.deployment is not None:
            return self.deployment.generate(prompts, params_list)
        ids: list[str] = []
        accs: dict[str, OutputAccumulator] = {}
        try:
            for prompt, params in zip(prompts, params_list, strict=True):
                request_id, children = self.engine.prepare_request(prompt, params)
                self.engine.add_prepared(request_id, children)
                ids.append(request_id)
                acc = OutputAccumulator(request_id, children[0].prompt_token_ids, params.n)
                acc.output.prompt = children[0].prompt
                accs[request_id] = acc
        except Exception:
            for request_id in ids:  # all or nothing: a bad prompt queues none
                self.engine.abort_request(request_id)
                self.engine.forget_request(request_id)
            raise
        results: dict[str, RequestOutput] = {}
        with Progress(
            TextColumn("generating"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            disable=not use_tqdm,
            transient=True,
        ) as progress:
            task = progress.add_task("generate", total=len(ids))
            # per step only what changed (deltas), gathered here: no whole lists copied
            while self.engine.has_unfinished_requests():
                for delta in self.engine.step_deltas():
                    out = accs[delta.request_id].add(delta)
                    if out.finished:
                        results[out.request_id] = out
                        progress.advance(task)
        return [results[i] for i in ids]
