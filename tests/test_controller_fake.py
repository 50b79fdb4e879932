"""The controller over the in-memory cluster: no Ray, no torch, no processes.

The same Controller class the Ray actor runs, given a FakeCluster. These tests
check the controller's own logic (planning, journaling, rollback, recovery,
health); tests/test_controller.py checks the same paths on a real Ray cluster.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from waiting import wait_for

from elasticmoe.control.cluster import FakeCluster, fake_checksum
from elasticmoe.control.controller import Controller, ControllerError
from elasticmoe.core.experts import LogicalExpert as LE

ROOT = Path(__file__).resolve().parent.parent
MODEL = str(ROOT / "elasticmoe/models/default")  # only its config.json is read


def config(**kw) -> dict:
    # health_check_s: the health loop runs only when a test calls check_workers()
    return {"model": MODEL, "name": "fake", "num_workers": 2, "health_check_s": 3600, **kw}


@pytest.fixture
def cluster() -> FakeCluster:
    return FakeCluster(engines=2)


@pytest.fixture
def controller(cluster: FakeCluster) -> Iterator[Controller]:
    c = Controller(config(slots_per_worker=40), cluster=cluster)
    c.bootstrap()
    yield c
    c.shutdown()


def held(cluster: FakeCluster) -> dict[str, set[LE]]:
    return {w: set(spec.held) for w, spec in cluster.workers.items()}


def assert_map_matches_workers(c: Controller, cluster: FakeCluster) -> None:
    m = c.expert_map
    assert m is not None
    for w in m.workers:
        assert set(m.experts_on(w)) == set(cluster.workers[w].held), w
    # engines start on the map they pull; every change after that is pushed
    assert all(e.map_dict in (None, m.to_dict()) for e in cluster.engines)


def test_controller_module_loads_neither_ray_nor_torch() -> None:
    code = (
        "import sys, elasticmoe.control.controller, elasticmoe.control.cluster\n"
        "print(sorted(m for m in ('torch', 'ray') if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_bootstrap_places_every_expert(controller: Controller, cluster: FakeCluster) -> None:
    m = controller.expert_map
    assert m is not None and m.epoch == 1 and set(m.workers) == {"w0", "w1"}
    assert m.missing(controller.all_experts) == []
    assert_map_matches_workers(controller, cluster)
    assert controller.bootstrap()["epoch"] == 1  # idempotent
    assert controller.get_map() == m.to_dict()  # what a starting engine pulls


def test_replicate_migrate_evict_follow_the_protocol(
    controller: Controller, cluster: FakeCluster
) -> None:
    e = LE(0, 0)
    holder = controller.expert_map.replicas_of(e)[0]
    other = "w1" if holder == "w0" else "w0"
    cluster.calls.clear()
    result = controller.replicate("0:0")
    assert result["result"] == "done" and result["epoch"] == 2
    assert set(controller.expert_map.replicas_of(e)) == {holder, other}
    # loaded peer-to-peer from the live replica, then published, nothing freed
    assert cluster.calls == [
        ("load", other, "0:0", cluster.workers[holder].address),
        ("push", "2"),
    ]
    assert controller.evict("0:0", holder)["epoch"] == 3
    with pytest.raises(ControllerError, match="one replica"):
        controller.evict("0:0", other)
    cluster.calls.clear()
    controller.migrate("0:0", other, holder)
    assert controller.expert_map.replicas_of(e) == (holder,)
    # load first, publish, free the old replica last
    assert [c[0] for c in cluster.calls] == ["load", "push", "unload"]
    assert_map_matches_workers(controller, cluster)
    kinds = [h["kind"] for h in controller.history]
    assert kinds == ["replicate", "evict", "migrate"]


def test_a_bad_checksum_rolls_the_change_back(controller: Controller, cluster: FakeCluster) -> None:
    cluster.corrupt[LE(1, 3)] = "tampered"
    before = controller.expert_map
    with pytest.raises(ControllerError, match="checksum"):
        controller.replicate("1:3")
    assert controller.expert_map == before  # nothing published
    assert controller.history[-1]["result"] == "rolled_back"
    assert_map_matches_workers(controller, cluster)  # the bad copy was freed


def test_a_failed_load_falls_back_to_the_checkpoint(
    controller: Controller, cluster: FakeCluster
) -> None:
    e = LE(2, 5)
    holder = controller.expert_map.replicas_of(e)[0]
    other = "w1" if holder == "w0" else "w0"
    cluster.failing_loads.add((other, cluster.workers[holder].address))
    controller.replicate("2:5")
    loads = [c for c in cluster.calls if c[0] == "load"]
    assert loads[-1] == ("load", other, "2:5", "checkpoint")
    assert cluster.workers[other].held[e] == fake_checksum(e)


def test_add_and_remove_worker(controller: Controller, cluster: FakeCluster) -> None:
    added = controller.add_worker(1)
    assert added["add_workers"] == ["w2"] and "w2" in controller.expert_map.workers
    with pytest.raises(ControllerError, match="pool 'gpu'"):
        controller.add_worker(1, pool="gpu")
    result = controller.remove_worker("w0")
    assert "w0" not in controller.expert_map.workers and "w0" not in cluster.workers
    # w0's replicas were its experts' only ones: all moved, none lost
    assert controller.expert_map.missing(controller.all_experts) == []
    assert {e for e, _ in result["add"]} == {e for e, _ in result["remove"]}
    assert_map_matches_workers(controller, cluster)


def test_status_never_calls_a_worker(controller: Controller, cluster: FakeCluster) -> None:
    cluster.kill("w1")
    checks = cluster.health_checks
    status = controller.status()
    assert [w["healthy"] for w in status["workers"]] == [True, True]  # cache not refreshed yet
    assert cluster.health_checks == checks
    controller.probe_health()
    assert [w["healthy"] for w in controller.status()["workers"]] == [True, False]


def test_a_dead_worker_is_replaced_after_two_missed_checks(cluster: FakeCluster) -> None:
    # room for w1's experts on w0: the dead worker leaves the map before its replacement starts
    controller = Controller(config(slots_per_worker=64), cluster=cluster)
    controller.bootstrap()
    cluster.kill("w1")
    assert controller.check_workers() == []  # one miss: not yet
    assert controller.check_workers() == ["w1"]
    m = controller.expert_map
    assert "w1" not in m.workers and len(m.workers) == 2  # a replacement joined
    assert m.missing(controller.all_experts) == []
    # the lost replicas came back from the checkpoint (no live peer had them)
    assert any(c[0] == "load" and c[3] == "checkpoint" for c in cluster.calls)
    controller.shutdown()


def test_a_restarted_controller_adopts_what_runs(
    controller: Controller, cluster: FakeCluster
) -> None:
    controller.replicate("0:1")
    epoch = controller.expert_map.epoch
    # an orphan replica: loaded by a change that never published
    orphan_on = "w0" if "w0" not in controller.expert_map.replicas_of(LE(3, 2)) else "w1"
    cluster.workers[orphan_on].held[LE(3, 2)] = fake_checksum(LE(3, 2))
    controller._stop.set()  # the old actor is gone; its loops with it
    again = Controller(config(slots_per_worker=40), cluster=cluster)  # memory store: empty
    try:
        assert again.expert_map is not None and again.expert_map.epoch == epoch
        assert again.history[-1]["kind"] == "adopt"
        assert LE(3, 2) not in cluster.workers[orphan_on].held  # freed by reconciling
        assert_map_matches_workers(again, cluster)
    finally:
        again.shutdown()




def test_add_worker_takes_the_ready_spare_then_replaces_it(cluster: FakeCluster) -> None:
    c = Controller(config(slots_per_worker=40, spare_workers=1), cluster=cluster)
    try:
        c.bootstrap()
        assert c.status()["spare_workers"] == ["w2"]
        lifecycles = {w["worker_id"]: w["lifecycle"] for w in c.status()["workers"]}
        assert lifecycles == {"w0": "active", "w1": "active", "w2": "spare"}
        demand = c.demand()
        assert demand["pools"]["default"] == {"workers": 3, "desired": 3}
        starts = [x for x in cluster.calls if x[0] == "start"]
        result = c.add_worker(1)
        assert result["add_workers"] == ["w2"]  # the spare, no process start for it
        assert [x for x in cluster.calls if x[0] == "start"][: len(starts)] == starts
        assert c.store.get_workers()["w2"]["lifecycle"] == "active"
        wait_for(lambda: c.status()["spare_workers"] == ["w3"], what="a new spare")
        assert "w3" in cluster.workers and "w3" not in c.expert_map.workers
    finally:
        c.shutdown()


def test_workers_and_spares_start_with_the_configured_background_priority(
    cluster: FakeCluster,
) -> None:
    c = Controller(
        config(slots_per_worker=40, spare_workers=1, background_priority="low"), cluster=cluster
    )
    try:
        c.bootstrap()
        assert {w: spec.launch.background_priority for w, spec in cluster.workers.items()} == {
            "w0": "low",
            "w1": "low",
            "w2": "low",  # the spare: its start-up and loads run below serving
        }
    finally:
        c.shutdown()


def test_registry_lifecycle_and_old_entries() -> None:
    from elasticmoe.control.workers import Lifecycle, WorkerRecord, WorkerRegistry

    reg = WorkerRegistry("cpu")
    ids = reg.new_ids(2, Lifecycle.SPARE)
    assert ids == ["w0", "w1"] and reg.num_starting(Lifecycle.SPARE) == 2
    reg.register(WorkerRecord("w0", "a:1", 4, "cpu", lifecycle=Lifecycle.SPARE))
    reg.release(ids)  # w1 failed to start
    assert reg.num_starting() == 0 and reg.spares() == ["w0"]
    assert reg.take_spares(3) == ["w0"] and reg.get("w0").lifecycle is Lifecycle.ACTIVE
    assert reg.new_ids(1, Lifecycle.ACTIVE) == ["w2"]  # ids are never reused
    reg.record_health({"w0": False})
    reg.record_health({"w0": False})
    assert reg.misses("w0") == 2 and not reg.healthy("w0")
    reg.record_health({"w0": True})
    assert reg.misses("w0") == 0 and reg.healthy("w0")
    # an entry written before lifecycles existed
    old = WorkerRecord.from_entry("w7", {"address": "b:2", "num_slots": 8, "spare": True}, "cpu")
    assert old.lifecycle is Lifecycle.SPARE and old.pool == "cpu"
    reg.load({"w7": old.to_entry(), "w0": reg.get("w0").to_entry()}, in_map=["w0"])
    assert reg.spares() == ["w7"] and reg.new_ids(1, Lifecycle.ACTIVE) == ["w8"]


# ------------------------------------------------------------------ pools
def two_pools(**kw) -> dict:
    """A deployment with an 'npu' pool (4 slots a worker) and a 'gpu' pool (8 slots)."""
    pools = [
        {
            "name": "npu",
            "device": "cpu",
            "num_workers": 2,
            "max_workers": 3,
            "slots_per_worker": 40,
            "worker_resources": {"NPU": 1},
        },
        {
            "name": "gpu",
            "num_workers": 1,
            "max_workers": 2,
            "slots_per_worker": 80,
            "worker_num_gpus": 1,
        },
    ]
    return config(pools=pools, **kw)


def pool_of(c: Controller, w: str) -> str:
    return c.registry.get(w).pool


def test_pools_start_with_their_own_resources_and_slots(cluster: FakeCluster) -> None:
    c = Controller(two_pools(), cluster=cluster)
    try:
        c.bootstrap()
        m = c.expert_map
        pools = {w: pool_of(c, w) for w in m.workers}
        assert sorted(pools.values()) == ["gpu", "npu", "npu"]
        for w, pool in pools.items():
            launch = cluster.workers[w].launch
            if pool == "npu":
                assert (launch.resources, launch.num_gpus, launch.num_slots) == ({"NPU": 1}, 0, 40)
            else:
                assert (launch.resources, launch.num_gpus, launch.num_slots) == ({}, 1, 80)
            assert m.experts_on(w), f"{pool} worker {w} holds no expert"
            assert len(m.experts_on(w)) <= launch.num_slots
        # placement fills by share of slots: the 80-slot worker holds about twice as many
        per_pool = {
            p: [len(m.experts_on(w)) for w in m.workers if pools[w] == p] for p in pools.values()
        }
        assert per_pool["gpu"][0] > max(per_pool["npu"])
        assert {w["pool"] for w in c.status()["workers"]} == {"npu", "gpu"}
        assert_map_matches_workers(c, cluster)
    finally:
        c.shutdown()


def test_add_worker_in_a_named_pool_and_per_pool_limits(cluster: FakeCluster) -> None:
    c = Controller(two_pools(), cluster=cluster)
    try:
        c.bootstrap()
        r = c.add_worker(pool="gpu")
        (new,) = r["add_workers"]
        assert pool_of(c, new) == "gpu"
        assert cluster.workers[new].launch.num_gpus == 1
        with pytest.raises(ControllerError, match="max_workers of pool"):
            c.add_worker(pool="gpu")  # gpu is at its max of 2
        with pytest.raises(ControllerError, match=r"no pool 'tpu'.*npu, gpu"):
            c.add_worker(pool="tpu")
        r = c.add_worker()  # no pool named: the first pool with room
        assert pool_of(c, r["add_workers"][0]) == "npu"
        demand = c.demand()["pools"]
        assert demand == {"npu": {"workers": 3, "desired": 3}, "gpu": {"workers": 2, "desired": 2}}
    finally:
        c.shutdown()


def test_removing_one_pools_workers_moves_experts_to_the_other(cluster: FakeCluster) -> None:
    c = Controller(two_pools(), cluster=cluster)
    try:
        c.bootstrap()
        c.add_worker(pool="gpu")
        npu = [w for w in c.expert_map.workers if pool_of(c, w) == "npu"]
        c.drain(workers=npu)
        m = c.expert_map
        assert {pool_of(c, w) for w in m.workers} == {"gpu"}
        assert all(m.replicas_of(e) for e in c.all_experts)
        assert c.demand()["pools"]["npu"]["workers"] == 0
        assert_map_matches_workers(c, cluster)
    finally:
        c.shutdown()


def test_autoscaler_grows_the_pool_the_policy_names(cluster: FakeCluster, tmp_path) -> None:
    policy = tmp_path / "policy.yaml"
    policy.write_text(
        "apiVersion: elasticmoe.io/v1alpha1\nkind: AutoscalingPolicy\nmetadata: {name: pools}\n"
        "spec:\n  interval_s: 3600\n  window_s: 3600\n  pools:\n"
        "    - {name: npu, min_workers: 2, max_workers: 3}\n"
        "    - {name: gpu, min_workers: 2, max_workers: 2, slots_per_worker: 80}\n"
    )
    c = Controller(two_pools(policy=str(policy)), cluster=cluster)
    try:
        c.bootstrap()
        assert c.demand()["pools"]["gpu"] == {"workers": 1, "desired": 2}
        results = c.autoscale_once()
        grown = [r for r in results if r.get("kind") == "add_worker"]
        assert grown and grown[0]["result"] == "done", results
        assert pool_of(c, grown[0]["add_workers"][0]) == "gpu"
        assert c.demand()["pools"]["gpu"] == {"workers": 2, "desired": 2}
    finally:
        c.shutdown()


def test_pool_config_is_validated(tmp_path) -> None:
    from elasticmoe.control.deployment_config import DeploymentConfig

    with pytest.raises(ValueError, match="repeated: a"):
        DeploymentConfig(model=MODEL, pools=[{"name": "a"}, {"name": "a"}])
    with pytest.raises(ValueError, match="pool 'a': num_workers=3 > max_workers=2"):
        DeploymentConfig(model=MODEL, pools=[{"name": "a", "num_workers": 3, "max_workers": 2}])
    policy = tmp_path / "p.yaml"
    policy.write_text(
        "apiVersion: elasticmoe.io/v1alpha1\nkind: AutoscalingPolicy\nmetadata: {name: p}\n"
        "spec:\n  pools:\n    - {name: a}\n"
    )
    with pytest.raises(ValueError, match="pools: 'b' not among the pools of policy"):
        DeploymentConfig(model=MODEL, policy=str(policy), pools=[{"name": "a"}, {"name": "b"}])
    c = DeploymentConfig(model=MODEL, pools=[{"name": "a", "num_workers": 2}, {"name": "b"}])
    assert (c.pool, c.num_workers, c.max_workers) == ("a", 3, 128)
    # the single-pool fields still describe one pool named `pool`
    (only,) = DeploymentConfig(model=MODEL, pool="gpu", num_workers=3).worker_pools()
    assert (only.name, only.num_workers) == ("gpu", 3)


def test_a_dead_worker_is_replaced_in_its_own_pool(cluster: FakeCluster) -> None:
    c = Controller(two_pools(), cluster=cluster)
    try:
        c.bootstrap()
        c.add_worker(pool="gpu")
        dead = next(w for w in c.expert_map.workers if pool_of(c, w) == "gpu")
        cluster.kill(dead)
        c.check_workers()
        assert c.check_workers() == [dead]  # two missed checks
        m = c.expert_map
        assert dead not in m.workers
        assert sorted(pool_of(c, w) for w in m.workers) == ["gpu", "gpu", "npu", "npu"]
        assert all(m.replicas_of(e) for e in c.all_experts)
        assert_map_matches_workers(c, cluster)
    finally:
        c.shutdown()


def test_local_ray_gets_the_pools_label_resources() -> None:
    from elasticmoe.control.deployment import local_pool_resources
    from elasticmoe.control.deployment_config import DeploymentConfig

    cfg = DeploymentConfig(
        model=MODEL,
        pools=[
            {"name": "a", "max_workers": 3, "worker_resources": {"cpu_a": 1}},
            {"name": "n", "device": "npu", "worker_resources": {"NPU": 1}},
        ],
    )
    assert local_pool_resources(cfg) == {"cpu_a": 3.0}  # never a made-up NPU


def test_pool_slots_follow_the_expert_memory_of_its_accelerator(cluster: FakeCluster) -> None:
    """Slots from memory: a pool with twice the expert memory holds twice the experts."""
    from elasticmoe.model.config import load_config

    cfg = load_config(MODEL)
    dtype = cfg.raw.get("dtype") or cfg.raw.get("torch_dtype") or "float32"
    itemsize = {"float32": 4, "bfloat16": 2, "float16": 2}[dtype]
    expert_bytes = 3 * cfg.hidden_size * cfg.expert_intermediate_size * itemsize
    gb = 40 * expert_bytes / 2**30  # room for exactly 40 experts
    spec = two_pools()
    for pool, memory in zip(spec["pools"], (gb, 2 * gb), strict=True):
        pool.pop("slots_per_worker")
        pool["expert_memory_gb"] = memory
    c = Controller(spec, cluster=cluster)
    try:
        c.bootstrap()
        slots = {pool_of(c, w): cluster.workers[w].launch.num_slots for w in c.expert_map.workers}
        assert slots == {"npu": 40, "gpu": 80}
        assert_map_matches_workers(c, cluster)
    finally:
        c.shutdown()
    spec["pools"][0]["expert_memory_gb"] = expert_bytes / 2 / 2**30
    with pytest.raises(ValueError, match=r"pools\[npu\]\.expert_memory_gb=.* holds no expert"):
        Controller(spec, cluster=FakeCluster()).bootstrap()
