"""Write a trained model as a Hugging Face checkpoint that elasticmoe serves and transformers
loads: ``config.json``, ``generation_config.json``, tokenizer files, ``model.safetensors``
(per-expert tensor names, as published checkpoints use) and ``training.json`` (how it was
made)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from elasticmoe.model.init_model import _IM_END_ID
from elasticmoe.train.data import TOKENIZER_FILES

__all__ = ["export_checkpoint"]

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def _write_json(path: Path, obj: dict[str, Any]) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def export_checkpoint(
    state_dict: dict[str, torch.Tensor],
    model_config: dict[str, Any],
    tokenizer_dir: Path,
    out_dir: Path | str,
    *,
    dtype: str = "float32",
    training_info: dict[str, Any] | None = None,
) -> Path:
    """Save ``state_dict`` (HF names) with its config and tokenizer under ``out_dir``.

    Weight files of an earlier export in ``out_dir`` are replaced; other files are kept.
    A tied ``lm_head.weight`` is left out, as ``save_pretrained`` does.
    """
    if dtype not in _DTYPES:
        raise ValueError(f"dtype {dtype!r}: use one of {', '.join(_DTYPES)}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for stale in (*out.glob("model*.safetensors"), out / "model.safetensors.index.json"):
        stale.unlink(missing_ok=True)

    config = dict(model_config)
    config["dtype"] = dtype
    config["use_cache"] = True
    tensors = {
        name: t.detach().to("cpu", _DTYPES[dtype]).contiguous()
        for name, t in state_dict.items()
        if not (name == "lm_head.weight" and config.get("tie_word_embeddings"))
    }
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    _write_json(out / "config.json", config)
    eos = config.get("eos_token_id")
    _write_json(
        out / "generation_config.json",
        {
            "bos_token_id": config.get("bos_token_id"),
            "eos_token_id": sorted({eos, _IM_END_ID}) if isinstance(eos, int) else eos,
            "pad_token_id": config.get("pad_token_id"),
        },
    )
    for name in TOKENIZER_FILES:
        src = Path(tokenizer_dir) / name
        if src.is_file():
            shutil.copy2(src, out / name)
    if training_info is not None:
        _write_json(out / "training.json", training_info)
    return out
