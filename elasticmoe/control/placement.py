"""Where replicas go: pure functions of load, limits and the current placement."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from elasticmoe.experts.weights import LogicalExpert

Placement = dict[LogicalExpert, tuple[str, ...]]


def initial_placement(
    experts: Sequence[LogicalExpert],
    workers: Sequence[str],
    num_slots: int,
    replicas: int | Mapping[LogicalExpert, int] = 1,
) -> Placement:
    """Spread replicas over workers evenly, never two of one expert on a worker.

    Replicas are dealt round-robin, starting each expert's copies on the
    emptiest workers, so slot use differs by at most one across workers.
    Raises ``ValueError`` naming the limit when the replicas cannot fit.
    """
    if not workers:
        raise ValueError("no workers to place experts on")

    def count(e: LogicalExpert) -> int:
        return replicas.get(e, 1) if isinstance(replicas, Mapping) else replicas

    total = sum(count(e) for e in experts)
    if total > len(workers) * num_slots:
        raise ValueError(
            f"{total} replicas do not fit in {len(workers)} workers x {num_slots} slots; "
            "add workers or slots_per_worker"
        )
    used = {w: 0 for w in workers}
    placement: Placement = {}
    for expert in experts:
        n = count(expert)
        if not 1 <= n <= len(workers):
            raise ValueError(
                f"expert {expert}: {n} replicas requested, "
                f"must be 1..{len(workers)} (one per worker)"
            )
        chosen = sorted((w for w in workers if used[w] < num_slots), key=lambda w: used[w])[:n]
        if len(chosen) < n:
            raise ValueError(
                f"expert {expert}: not enough workers with a free slot for {n} replicas"
            )
        for w in chosen:
            used[w] += 1
        placement[expert] = tuple(chosen)
    return placement
