"""Sampler: top-k / top-p / temperature over a mixed batch, seeds independent of batch-mates."""

from __future__ import annotations

import torch

from elasticmoe import SamplingParams
from elasticmoe.engine.request import Request
from elasticmoe.engine.sampler import Sampler


def _req(i: int, **params) -> Request:
    return Request(f"r{i}", [1, 2], SamplingParams(max_tokens=4, **params), 0.0)


def test_mixed_batch_respects_each_rows_top_k_top_p_and_greedy():
    vocab = 50
    logits = torch.randn(4, vocab)
    reqs = [
        _req(0, temperature=0),
        _req(1, temperature=1.0, top_k=3),
        _req(2, temperature=1.0, top_p=0.2),
        _req(3, temperature=2.0, top_k=1),
    ]
    sampler = Sampler(torch.device("cpu"), seed=0)
    top3 = set(torch.topk(logits[1], 3).indices.tolist())
    probs = torch.softmax(logits[2], -1)
    sorted_p, sorted_i = probs.sort(descending=True)
    nucleus = set(sorted_i[(sorted_p.cumsum(0) - sorted_p) < 0.2].tolist())
    for _ in range(50):
        tokens, _ = sampler.sample(logits.clone(), reqs)
        assert tokens[0] == int(logits[0].argmax())
        assert tokens[1] in top3
        assert tokens[2] in nucleus
        assert tokens[3] == int(logits[3].argmax())


def test_seeded_row_does_not_depend_on_batch_mates():
    logits = torch.randn(3, 40)
    alone = Sampler(torch.device("cpu")).sample(logits[:1].clone(), [_req(0, seed=5)])[0]
    mixed = Sampler(torch.device("cpu")).sample(
        logits.clone(), [_req(0, seed=5), _req(1, temperature=1.0), _req(2, seed=9)]
    )[0]
    assert mixed[0] == alone[0]


def test_draws_follow_the_distribution_and_never_pick_a_dropped_token():
    """Inverse-CDF sampling: frequencies match softmax(logits / T); top-k's dropped tokens
    (zero probability, an empty CDF interval) are never drawn."""
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05, 1e-9]]))
    sampler = Sampler(torch.device("cpu"), seed=0)
    counts = torch.zeros(5)
    n = 4000
    batch = [_req(i, temperature=1.0, top_k=4) for i in range(50)]
    for _ in range(n // len(batch)):
        tokens, _ = sampler.sample(logits.expand(len(batch), -1).clone(), batch)
        for t in tokens:
            counts[t] += 1
    assert counts[4] == 0  # outside the top 4
    freq = counts[:4] / n
    expected = torch.tensor([0.5, 0.3, 0.15, 0.05])
    # 4000 draws: a binomial's standard deviation is at most 0.008
    assert (freq - expected).abs().max() < 0.04, freq
