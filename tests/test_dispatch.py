"""Pure dispatch planning and the expert map."""

from __future__ import annotations

import random

import pytest

from elasticmoe.core.expert_map import ExpertMap
from elasticmoe.core.experts import LogicalExpert as LE
from elasticmoe.router.dispatch import NoLiveReplicaError, RowSlice, plan_dispatch

WORKERS = {f"w{i}": f"127.0.0.1:{5000 + i}" for i in range(4)}


def test_every_row_goes_once_to_a_holder_under_random_maps():
    """Thousands of random placements: no row lost, duplicated or misrouted."""
    rng = random.Random(0)
    for _ in range(2000):
        num_experts = rng.randint(1, 8)
        replicas = {
            LE(0, e): tuple(rng.sample(sorted(WORKERS), rng.randint(1, 4)))
            for e in range(num_experts)
        }
        m = ExpertMap(rng.randint(0, 9), replicas, WORKERS)
        down = set(rng.sample(sorted(WORKERS), rng.randint(0, 2)))
        ranges, start = [], 0
        for e in range(num_experts):
            n = rng.choice([0, 1, 3, 17, 40, 100])
            if n:
                ranges.append((e, start, start + n))
            start += n
        try:
            plan = plan_dispatch(0, ranges, m, down, min_split_rows=8)
        except NoLiveReplicaError as err:
            assert all(set(replicas[e]) <= down for e in err.experts)
            assert err.experts and all(e.layer == 0 for e in err.experts)
            continue
        covered = []
        for worker, slices in plan.items():
            assert worker not in down
            for s in slices:
                assert worker in replicas[LE(0, s.expert)], (
                    "row sent to a worker without the expert"
                )
                covered.extend((s.expert, r) for r in range(s.start, s.end))
        expected = [(e, r) for e, a, b in ranges for r in range(a, b)]
        assert sorted(covered) == sorted(expected)


def test_hot_expert_is_split_across_its_replicas():
    m = ExpertMap(1, {LE(0, 0): ("w0", "w1"), LE(0, 1): ("w2",)}, WORKERS)
    plan = plan_dispatch(0, [(0, 0, 64), (1, 64, 70)], m, min_split_rows=16)
    assert sum(s.num_rows for s in plan["w0"]) == 32
    assert sum(s.num_rows for s in plan["w1"]) == 32
    small = plan_dispatch(0, [(0, 0, 10)], m, min_split_rows=16)
    assert len(small) == 1


def test_load_aware_choice_prefers_the_emptier_replica():
    m = ExpertMap(1, {LE(0, 0): ("w0",), LE(0, 1): ("w0", "w1")}, WORKERS)
    plan = plan_dispatch(0, [(0, 0, 10), (1, 10, 14)], m, min_split_rows=16)
    assert [s.expert for s in plan["w1"]] == [1]


def test_slow_worker_gets_nothing_while_another_replica_is_normal():
    m = ExpertMap(1, {LE(0, 0): ("w0", "w1"), LE(0, 1): ("w0",)}, WORKERS)
    plan = plan_dispatch(
        0, [(0, 0, 100), (1, 100, 104)], m, worker_cost={"w0": 4.0}, min_split_rows=16
    )
    # expert 0 avoids the slow w0 entirely; expert 1 has no other replica, so w0 serves it
    assert [s.expert for s in plan["w1"]] == [0] and plan["w1"][0].num_rows == 100
    assert [s.expert for s in plan["w0"]] == [1]


def test_expert_map_round_trip_and_changes():
    m = ExpertMap(3, {LE(0, 1): ("w0",), LE(1, 2): ("w1", "w2")}, WORKERS)
    assert ExpertMap.from_dict(m.to_dict()) == m
    m2 = m.with_changes(add=[(LE(0, 1), "w3")], remove=[(LE(1, 2), "w1")])
    assert m2.epoch == 4 and m2.replicas_of(LE(0, 1)) == ("w0", "w3")
    assert m2.experts_on("w1") == () and m2.num_replicas == 3
    with pytest.raises(ValueError, match="invalid expert map"):
        ExpertMap.from_dict({"epoch": 1, "workers": {}, "replicas": {"0:1": ["nowhere"]}})
    with pytest.raises(ValueError, match="invalid expert map"):
        ExpertMap.from_dict({"epoch": 1, "workers": {}, "replicas": {"zero": []}})


def test_dispatch_table_is_fixed_for_the_step_and_drops_a_failed_worker():
    from elasticmoe.router.dispatch import DispatchTable

    m = ExpertMap(1, {LE(0, 0): ("w0", "w1"), LE(0, 1): ("w1",)}, WORKERS)
    cost = {"w0": 4.0}
    table = DispatchTable(m, down={"w2"}, worker_cost=cost, min_split_rows=16)
    cost["w0"] = 1.0  # the step keeps the costs it began with
    assert table.candidates(0, 0) == ["w1"]
    table = DispatchTable(m, min_split_rows=16)
    assert sorted(table.plan(0, [(0, 0, 64)])) == ["w0", "w1"]
    table.mark_down("w1")
    assert table.plan(0, [(0, 0, 64)]) == {"w0": [RowSlice(0, 0, 64)]}
    with pytest.raises(NoLiveReplicaError, match=r"0:1|\(0, 1\)|1"):
        table.plan(0, [(1, 0, 3)])
