"""Expert-load skew of the trained default model vs a random-weight model of the same shape.

Both models run the same prompts (the same tokenizer: the random model gets a copy of the
trained model's) through the serving engine, with the routing-trace recorder
(:func:`elasticmoe.train.trace.record_trace`). Skew is max/mean tokens per expert within a
layer, over the whole trace: averaged over layers and for the worst layer. A router that
spreads tokens evenly gives 1.0; the trained router's ratio to the random one says how much
hotter the hot experts are than a random-weight model suggests, which is what expert
replication exists for. The random model is written by
:func:`elasticmoe.model.init_model.init_model` (the random built-ins' weights). The JSON
also carries the trained model's eval loss (from its ``training.json``) and a greedy sample.

    python bench/routing_skew.py [--model default] [--prompts 128] > skew.json
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import console, emit_json

from elasticmoe import LLM, SamplingParams
from elasticmoe.model.init_model import init_model
from elasticmoe.model.registry import resolve_model
from elasticmoe.train.config import DataConfig
from elasticmoe.train.data import TOKENIZER_FILES
from elasticmoe.train.trace import record_trace

# config.json keys that define the architecture (everything init_model needs to match it)
_SHAPE_KEYS = (
    "vocab_size",
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "num_experts_per_tok",
    "intermediate_size",
    "moe_intermediate_size",
    "shared_expert_intermediate_size",
    "max_position_embeddings",
    "num_local_experts",
    "num_experts",
)


def random_twin(trained: Path, out: Path, seed: int) -> Path:
    """A random-weight checkpoint with the trained model's shape and tokenizer."""
    cfg = json.loads((trained / "config.json").read_text())
    overrides = {k: cfg[k] for k in _SHAPE_KEYS if k in cfg}
    init_model(cfg["model_type"], "small", out, seed=seed, overwrite=True, **overrides)
    for name in TOKENIZER_FILES:
        if (trained / name).is_file():
            shutil.copy2(trained / name, out / name)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="default", help="trained checkpoint or built-in name")
    p.add_argument("--prompts", type=int, default=128, help="prompts cut from the corpus")
    p.add_argument("--prompt-tokens", type=int, default=128)
    p.add_argument("--max-tokens", type=int, default=8, help="tokens generated per prompt")
    p.add_argument("--max-chars", type=int, default=2_000_000, help="corpus characters read")
    p.add_argument("--seed", type=int, default=0, help="corpus order and random weights")
    p.add_argument("--sample-prompt", default="def fibonacci(n):")
    args = p.parse_args()

    trained = resolve_model(args.model)
    # A different file order than training's (seed 0) still draws from the same stdlib.
    data = DataConfig(max_chars=args.max_chars)
    result: dict = {"model": str(trained), "prompts": args.prompts}
    info_file = trained / "training.json"
    if info_file.is_file():
        result["eval_loss"] = json.loads(info_file.read_text()).get("eval_loss")
    llm = LLM(model=str(trained), dtype="float32")
    sample = llm.generate([args.sample_prompt], SamplingParams(max_tokens=48, temperature=0.0))[
        0
    ].outputs[0]
    result["sample"] = {"prompt": args.sample_prompt, "completion": sample.text}
    del llm

    with tempfile.TemporaryDirectory() as tmp:
        tmp_path = Path(tmp)
        models = {"trained": trained, "random": random_twin(trained, tmp_path / "random", 0)}
        for name, path in models.items():
            console.print(f"recording {name} ({path}) over {args.prompts} prompts")
            summary = record_trace(
                str(path),
                tmp_path / f"{name}.csv",
                data=data,
                prompt_tokens=args.prompt_tokens,
                max_tokens=args.max_tokens,
                max_prompts=args.prompts,
            )
            result[name] = {"skew": summary.skew(), "steps": summary.steps}
    for key in ("mean_over_layers", "max_layer"):
        result[f"ratio_{key}"] = round(
            result["trained"]["skew"][key] / result["random"]["skew"][key], 3
        )
    emit_json(result)


if __name__ == "__main__":
    main()
