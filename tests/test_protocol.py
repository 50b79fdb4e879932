"""The change protocol, recovery and plan checks: pure, no Ray, no torch, no cluster."""

from __future__ import annotations

import pytest

from elasticmoe.core.actions import Action
from elasticmoe.core.experts import LogicalExpert as LE
from elasticmoe.core.experts import parse_expert
from elasticmoe.core.protocol import (
    Change,
    ClusterView,
    PlanRefused,
    ProtocolError,
    Step,
    WorkerSlots,
    check_change,
    next_step,
    plan_action,
    recover,
)


def view(placement, slots=4, unhealthy=(), max_workers=None, workers=None, epoch=7):
    names = workers or sorted({w for ws in placement.values() for w in ws})
    return ClusterView(
        epoch=epoch,
        placement={e: tuple(ws) for e, ws in placement.items()},
        workers={w: WorkerSlots(slots, w not in unhealthy) for w in names},
        experts=frozenset(placement),
        max_workers=max_workers,
    )


A, B, C = LE(0, 0), LE(0, 1), LE(1, 0)


def test_parse_expert_one_form() -> None:
    assert parse_expert("3:5") == LE(3, 5) == parse_expert((3, 5)) == parse_expert(LE(3, 5))
    assert str(LE(3, 5)) == "3:5"
    for bad in ("3", "a:b", "3:5:1", ""):
        with pytest.raises(ValueError, match="expected 'layer:expert'"):
            parse_expert(bad)


def test_steps_follow_the_protocol() -> None:
    last = None
    for step in (Step.BEGIN, Step.LOADED, Step.PUBLISHED, Step.DONE):
        last = next_step(last, step)
    assert next_step(Step.LOADED, Step.ROLLED_BACK) is Step.ROLLED_BACK
    for last, step in [
        (None, Step.LOADED),
        (Step.BEGIN, Step.PUBLISHED),
        (Step.PUBLISHED, Step.ROLLED_BACK),  # published: finish, never roll back
        (Step.DONE, Step.DONE),
    ]:
        with pytest.raises(ProtocolError):
            next_step(last, step)


def test_evicting_the_last_replica_is_refused() -> None:
    v = view({A: ["w0"], B: ["w0", "w1"]})
    with pytest.raises(PlanRefused, match="one replica"):
        plan_action(v, Action("evict", expert=A, source="w0"))
    change = plan_action(v, Action("evict", expert=B, source="w1"))
    assert change == Change("evict", 7, remove=((B, "w1"),))
    assert check_change(v, change) == {A: ("w0",), B: ("w0",)}


def test_replicate_picks_the_freest_healthy_worker() -> None:
    v = view({A: ["w0"], B: ["w1"], C: ["w1"]}, workers=["w0", "w1", "w2"], unhealthy={"w2"})
    assert plan_action(v, Action("replicate", expert=A)).add == ((A, "w1"),)
    with pytest.raises(PlanRefused, match="already holds"):
        plan_action(v, Action("replicate", expert=A, target="w0"))
    with pytest.raises(PlanRefused, match="not healthy"):
        plan_action(v, Action("replicate", expert=A, target="w2"))
    full = view({A: ["w0"], B: ["w0"]}, slots=2, workers=["w0"])
    with pytest.raises(PlanRefused, match="no worker has a free slot"):
        plan_action(full, Action("replicate", expert=A))


def test_restore_only_when_no_healthy_replica() -> None:
    v = view({A: ["w0"], B: ["w1"]}, workers=["w0", "w1"], unhealthy={"w0"})
    assert plan_action(v, Action("restore", expert=A)).add == ((A, "w1"),)
    with pytest.raises(PlanRefused, match="use replicate"):
        plan_action(v, Action("restore", expert=B))


def test_remove_worker_moves_sole_replicas_instead_of_dropping_them() -> None:
    v = view({A: ["w0"], B: ["w0", "w1"], C: ["w1"]}, workers=["w0", "w1", "w2"])
    change = plan_action(v, Action("remove_worker", source="w0"))
    assert change.remove_workers == ("w0",)
    assert set(change.remove) == {(A, "w0"), (B, "w0")}
    assert change.add == ((A, "w2"),)  # only A lost its last copy; w2 is the freest
    after = check_change(v, change)
    assert all("w0" not in ws for ws in after.values()) and set(after) == {A, B, C}
    with pytest.raises(PlanRefused, match="last worker"):
        plan_action(view({A: ["w0"]}), Action("remove_worker", source="w0"))
    no_room = view({A: ["w0"], B: ["w1"]}, slots=1)
    with pytest.raises(PlanRefused, match="free slot"):
        plan_action(no_room, Action("remove_worker", source="w0"))


def test_add_worker_respects_max_workers_and_ids() -> None:
    v = view({A: ["w0"]}, max_workers=2)
    change = plan_action(v, Action("add_worker", pool="cpu", count=1), ["w1"])
    assert change.add_workers == ("w1",) and change.pool == "cpu"
    assert Change.from_journal(change.to_journal()) == change
    with pytest.raises(PlanRefused, match="max_workers=2"):
        plan_action(v, Action("add_worker", count=2), ["w1", "w2"])
    with pytest.raises(PlanRefused, match="in use"):
        plan_action(v, Action("add_worker", count=1), ["w0"])


def test_check_change_refuses_stale_and_stranding_plans() -> None:
    v = view({A: ["w0"], B: ["w1"]})
    with pytest.raises(PlanRefused, match="epoch"):
        check_change(v, Change("evict", 3, remove=((B, "w1"),)))
    with pytest.raises(PlanRefused, match="without a replica"):
        check_change(v, Change("evict", 7, remove=((B, "w1"),)))
    with pytest.raises(PlanRefused, match="still holds"):
        check_change(v, Change("remove_worker", 7, remove_workers=("w1",)))
    with pytest.raises(PlanRefused, match="in 4 slots"):
        check_change(
            view({LE(2, i): ["w0"] for i in range(4)} | {A: ["w1"]}, workers=["w0", "w1"]),
            Change("migrate", 7, add=((A, "w0"),), remove=((A, "w1"),)),
        )


def _journal(*steps: str, change: Change) -> list[dict]:
    return [
        {"step": s, "data": change.to_journal() if s == "begin" else {}} for s in steps
    ]


def test_recovery_rolls_back_what_was_not_published() -> None:
    change = Change("add_worker", 4, add=((A, "w9"),), add_workers=("w9",))
    for steps in (["begin"], ["begin", "loaded"]):
        plan = recover(_journal(*steps, change=change), map_epoch=4)
        assert plan.outcome == "roll_back"
        assert plan.unload == ((A, "w9"),) and plan.stop_workers == ("w9",)
        assert plan.drain_epoch is None and plan.journal == (Step.ROLLED_BACK,)


def test_recovery_finishes_what_was_published() -> None:
    change = Change("remove_worker", 4, remove=((A, "w1"),), remove_workers=("w1",))
    plan = recover(_journal("begin", "loaded", "published", change=change), map_epoch=5)
    assert plan.outcome == "finish" and plan.drain_epoch == 4
    assert plan.unload == ((A, "w1"),) and plan.stop_workers == ("w1",)
    assert plan.journal == (Step.DONE,)
    # the publish landed (the map is past epoch 4) but "published" was never journaled
    plan = recover(_journal("begin", "loaded", change=change), map_epoch=5)
    assert plan.outcome == "finish" and plan.journal == (Step.PUBLISHED, Step.DONE)


def test_recovery_refuses_a_journal_out_of_order() -> None:
    change = Change("evict", 1, remove=((A, "w0"),))
    with pytest.raises(ProtocolError):
        recover(_journal("begin", "published", change=change), map_epoch=1)
    with pytest.raises(ProtocolError):
        recover([{"step": "loaded", "data": {}}], map_epoch=1)


def test_percentile_is_nearest_rank() -> None:
    from elasticmoe.core.stats import percentile

    assert percentile([], 99) is None
    assert percentile([3.0, 1.0, 2.0], 50) == 2.0
    assert percentile(range(1, 101), 99) == 100
    assert percentile(range(1, 201), 99) == 199
    with pytest.raises(ValueError):
        percentile([1.0], 101)
