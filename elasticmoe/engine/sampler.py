"""Turn a step's logits into next tokens (greedy, temperature, top-k, top-p, seeds)."""

from __future__ import annotations

import torch

from elasticmoe.engine.request import Request


class Sampler:
    """Samples one token per row; seeded requests get their own generator."""

    def __init__(self, device: torch.device, seed: int = 0) -> None:
        self.device = device
        self.generator = torch.Generator(device=device)
        self.generator.manual_seed(seed)
        self._request_generators: dict[str, torch.Generator] = {}

    def forget(self, request_id: str) -> None:
        """Drop a finished request's generator."""
        self._request_generators.pop(request_id, None)

    def _generator(self, request: Request) -> torch.Generator:
        if request.params.seed is None:
            return self.generator
        gen = self._request_generators.get(request.request_id)
        if gen is None:
            gen = torch.Generator(device=self.device)
            gen.manual_seed(request.params.seed)
            self._request_generators[request.request_id] = gen
        return gen

    def sample(
        self, logits: torch.Tensor, requests: list[Request]
    ) -> tuple[list[int], list[dict[int, float] | None]]:
        """logits: [B, V] fp32. Returns the tokens and, where asked, their logprobs."""
        if all(r.params.greedy for r in requests):
            tokens = _greedy(logits)
        else:
            tokens = self._sample_random(logits, requests)
        token_list = tokens.tolist()
        logprobs: list[dict[int, float] | None] = [None] * len(requests)
        wanted = [i for i, r in enumerate(requests) if r.params.logprobs is not None]
        if wanted:
            all_logprobs = torch.log_softmax(logits[wanted], dim=-1)
            for row, i in enumerate(wanted):
                n = requests[i].params.logprobs or 0
                entry = {token_list[i]: float(all_logprobs[row, token_list[i]])}
                if n:
                    top = torch.topk(all_logprobs[row], n)
                    for lp, tid in zip(top.values.tolist(), top.indices.tolist(), strict=True):
                        entry.setdefault(tid, lp)
                logprobs[i] = entry
        return token_list, logprobs

    def _sample_random(self, logits: torch.Tensor, requests: list[Request]) -> torch.Tensor:
        dev = logits.device
        temps = torch.tensor([r.params.temperature or 1.0 for r in requests], device=dev)
        scaled = logits / temps[:, None]
        vocab = logits.shape[-1]
        top_ks = [r.params.top_k if 0 < r.params.top_k < vocab else 0 for r in requests]
        max_k = max(top_ks)
        if max_k:
            # one topk over the batch: row i keeps its top_ks[i] largest (ties included)
            ks = torch.tensor(top_ks, device=dev)
            values = torch.topk(scaled, max_k, dim=-1).values  # [B, max_k] descending
            kth = values.gather(1, (ks.clamp(min=1) - 1)[:, None])
            drop = (scaled < kth) & (ks > 0)[:, None]
            scaled = scaled.masked_fill(drop, float("-inf"))
        probs = torch.softmax(scaled, dim=-1)
        if any(r.params.top_p < 1.0 for r in requests):
            top_p = torch.tensor([r.params.top_p for r in requests], device=dev)
            sorted_probs, sorted_idx = probs.sort(dim=-1, descending=True)
            # drop a token when the mass before it already reaches top_p
            drop = (sorted_probs.cumsum(dim=-1) - sorted_probs) >= top_p[:, None]
            sorted_probs = sorted_probs.masked_fill(drop, 0.0)
            probs = torch.zeros_like(probs).scatter_(-1, sorted_idx, sorted_probs)
        # Inverse-CDF sampling: one uniform draw per row, located in the row's cumulative
        # distribution (what FlashInfer's samplers do). A draw per element (the Gumbel or
        # exponential race) costs B x V serial generator calls: 3 ms of a 5 ms decode step
        # at batch 32 on CPU. The draw is scaled by the row's total mass, so rounding in the
        # fp32 cumsum can never land past the last token, and ``right=True`` never picks a
        # token of zero probability (its interval is empty). Seeded rows draw from their own
        # generator, so they never depend on their batch-mates; the other rows share one.
        cdf = probs.cumsum(dim=-1)
        draws = torch.empty(len(requests), dtype=cdf.dtype, device=dev)
        draws.uniform_(generator=self.generator)
        for i, r in enumerate(requests):
            if r.params.seed is not None:
                draws[i : i + 1].uniform_(generator=self._generator(r))
        targets = (draws * cdf[:, -1])[:, None]
        sampled = torch.searchsorted(cdf, targets, right=True)[:, 0].clamp_(max=vocab - 1)
        if not any(r.params.greedy for r in requests):
            return sampled
        greedy_rows = torch.tensor([r.params.greedy for r in requests], device=dev)
        return torch.where(greedy_rows, _greedy(logits), sampled)


def _greedy(logits: torch.Tensor) -> torch.Tensor:
    """The first index of each row's maximum: ``argmax``'s answer, but ``max``'s kernel is
    vectorised on CPU (57 instead of 167 us for [64, 4096] fp32)."""
    return logits.max(dim=-1).indices
