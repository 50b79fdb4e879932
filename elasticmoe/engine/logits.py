"""Logits work the engine does around the sampler: ``min_tokens`` and prompt logprobs.

Kept apart from :mod:`elasticmoe.engine.sampler` so the sampler stays a pure
"logits -> tokens" step; both functions are vectorised and cost nothing when
no request in the batch asks for them.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from elasticmoe.engine.request import Request


def apply_min_tokens(logits: torch.Tensor, requests: Sequence[Request]) -> None:
    """Block EOS and stop tokens (in place, ``-inf``) for rows below their ``min_tokens``.

    logits: [B, V], one row per request in ``requests``.
    """
    rows: list[int] = []
    cols: list[int] = []
    for i, r in enumerate(requests):
        if len(r.output_token_ids) >= r.params.min_tokens:
            continue
        blocked = set(r.params.stop_token_ids)
        if not r.params.ignore_eos:
            blocked |= r.eos_token_ids
        vocab = logits.shape[-1]
        for t in blocked:
            if 0 <= t < vocab:
                rows.append(i)
                cols.append(t)
    if rows:
        dev = logits.device
        with torch.inference_mode():  # the model's logits are inference tensors
            logits[torch.tensor(rows, device=dev), torch.tensor(cols, device=dev)] = float("-inf")


def needs_min_tokens(requests: Sequence[Request]) -> bool:
    """Whether any row still needs :func:`apply_min_tokens`."""
    return any(len(r.output_token_ids) < r.params.min_tokens for r in requests)


def prompt_logprobs(
    logits: torch.Tensor, next_token_ids: torch.Tensor, num_top: Sequence[int]
) -> list[dict[int, float]]:
    """Logprob of each prompt token given the tokens before it, plus each row's top N.

    logits: [R, V] fp32, row r predicting ``next_token_ids[r]``; ``num_top[r]`` is N.
    Returns one ``{token id: logprob}`` per row, the actual token first.
    """
    lp = torch.log_softmax(logits.float(), dim=-1)
    actual = lp.gather(-1, next_token_ids[:, None])[:, 0].tolist()
    ids = next_token_ids.tolist()
    k = max(num_top, default=0)
    top_v: list[list[float]] = []
    top_i: list[list[int]] = []
    if k:
        top = torch.topk(lp, k, dim=-1)
        top_v, top_i = top.values.tolist(), top.indices.tolist()
    out = []
    for r, (tid, a) in enumerate(zip(ids, actual, strict=True)):
        entry = {tid: a}
        n = num_top[r]
        if n:
            for v, t in zip(top_v[r][:n], top_i[r][:n], strict=True):
                entry.setdefault(t, v)
        out.append(entry)
    return out
