"""Record an expert-routing trace: run a model over a corpus and save, per engine step, the
tokens the gate sent to each (layer, expert).

The model runs on elasticmoe's own engine (local mode, the serving code path), so the counts
are exactly what the serving load recorder sees. The corpus is cut into prompts of
``prompt_tokens`` tokens, sent in waves of ``batch`` requests; each request also generates
``max_tokens`` tokens. Rows are ``timestamp,layer,expert,tokens`` (seconds since the first
step; zero counts left out), the format ``elasticmoe policy simulate`` reads
(:func:`elasticmoe.autoscale.simulate.load_trace`). Because the corpus comes file by file,
the trace shows how load shifts as the topic changes.
"""

from __future__ import annotations

import csv
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from elasticmoe.train.config import DataConfig

__all__ = ["TraceSummary", "expert_skew", "record_trace"]


@dataclass
class TraceSummary:
    """Totals of a recorded trace."""

    path: Path
    rows: int
    steps: int
    tokens: int
    duration_s: float
    moe_layers: tuple[int, ...]
    num_experts: int
    total: np.ndarray  # [num_moe_layers, num_experts] tokens per expert over the whole trace

    def skew(self) -> dict[str, float]:
        """max/mean tokens per expert: mean over layers and the worst layer."""
        return expert_skew(self.total)


def expert_skew(counts: np.ndarray) -> dict[str, float]:
    """``counts`` [layers, experts] -> max/mean per layer, averaged and the maximum."""
    counts = np.asarray(counts, dtype=np.float64)
    per_layer = counts.max(axis=1) / np.maximum(counts.mean(axis=1), 1e-12)
    return {
        "mean_over_layers": float(per_layer.mean()),
        "max_layer": float(per_layer.max()),
        "per_layer": [round(float(x), 4) for x in per_layer],
    }


def _prompts(tokenizer, data: DataConfig, prompt_tokens: int, max_prompts: int) -> list[list[int]]:
    from elasticmoe.train.data import corpus_documents

    prompts: list[list[int]] = []
    for doc in corpus_documents(data):
        ids = tokenizer.encode(doc, add_special_tokens=False)
        for i in range(0, len(ids) - prompt_tokens + 1, prompt_tokens):
            prompts.append(ids[i : i + prompt_tokens])
            if len(prompts) >= max_prompts:
                return prompts
    return prompts


def record_trace(
    model: str,
    out: Path | str,
    *,
    data: DataConfig | None = None,
    prompt_tokens: int = 128,
    max_tokens: int = 8,
    batch: int = 16,
    max_prompts: int = 256,
    dtype: str = "float32",
    on_wave: Callable[[int, int], None] | None = None,
) -> TraceSummary:
    """Run ``model`` over the corpus and write the routing trace CSV to ``out``."""
    from elasticmoe import LLM, SamplingParams

    data = data or DataConfig(max_chars=2_000_000)
    llm = LLM(model=model, dtype=dtype)
    engine = llm.engine
    if llm.tokenizer is None:
        raise ValueError(f"model {model!r} has no tokenizer.json: cannot tokenize a corpus")
    prompts = _prompts(llm.tokenizer, data, prompt_tokens, max_prompts)
    if not prompts:
        raise ValueError(f"corpus gives no prompt of {prompt_tokens} tokens")
    recorder = engine.load_recorder
    recorder.samples.clear()
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    samples = []
    for start in range(0, len(prompts), batch):
        wave = [{"prompt_token_ids": p} for p in prompts[start : start + batch]]
        llm.generate(wave, params)
        samples.extend(recorder.samples)  # drained each wave: the recorder's history is bounded
        recorder.samples.clear()
        if on_wave is not None:
            on_wave(min(start + batch, len(prompts)), len(prompts))

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    layers = recorder.moe_layers
    t0 = samples[0].timestamp
    total = np.zeros((len(layers), recorder.num_experts), dtype=np.int64)
    rows = 0
    with open(out, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["timestamp", "layer", "expert", "tokens"])
        for sample in samples:
            total += sample.counts
            ts = f"{sample.timestamp - t0:.4f}"
            for row, layer in enumerate(layers):
                for expert in np.nonzero(sample.counts[row])[0]:
                    writer.writerow([ts, layer, int(expert), int(sample.counts[row, expert])])
                    rows += 1
    return TraceSummary(
        path=out,
        rows=rows,
        steps=len(samples),
        tokens=int(total.sum() // max(1, engine.model.config.top_k) // max(1, len(layers))),
        duration_s=samples[-1].timestamp - t0,
        moe_layers=tuple(layers),
        num_experts=recorder.num_experts,
        total=total,
    )
