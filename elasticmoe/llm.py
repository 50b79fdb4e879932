"""The offline Python API, shaped like vLLM's: ``LLM(...).generate(prompts, params)``."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from elasticmoe.engine.config import EngineConfig
from elasticmoe.engine.engine import LLMEngine, Prompt
from elasticmoe.engine.request import RequestOutput, SamplingParams
from elasticmoe.model.registry import resolve_model


class LLM:
    """A Mixture-of-Experts model ready to generate.

    ``model`` is a checkpoint directory in Hugging Face layout or the name of
    a built-in model (``"default"``). ``mode="local"`` runs every expert in
    this process; other keyword arguments are :class:`EngineConfig` fields
    (``dtype``, ``device``, ``num_kv_blocks``, ``max_num_seqs``, ...).
    """

    def __init__(
        self,
        model: str,
        mode: Literal["local", "distributed"] = "local",
        **engine_args: Any,
    ) -> None:
        if mode != "local":
            raise ValueError(f"mode={mode!r} is not supported yet; use mode='local'")
        self.mode = mode
        self.engine = LLMEngine(EngineConfig(model=str(resolve_model(model)), **engine_args))

    @property
    def tokenizer(self):
        """The checkpoint's tokenizer (None when it ships none)."""
        return self.engine.tokenizer

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
        ids: list[str] = []
        try:
            for prompt, params in zip(prompts, params_list, strict=True):
                ids.append(self.engine.add_request(prompt, params))
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
            while self.engine.has_unfinished_requests():
                for out in self.engine.step():
                    if out.finished:
                        results[out.request_id] = out
                        progress.advance(task)
        return [results[i] for i in ids]
