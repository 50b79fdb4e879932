"""The controller over a real Redis and the in-memory cluster (no Ray, no torch).

What a clean stop leaves in the store, worker ids against a stored map, a store
outage in the middle of a change, the policy set through the API across a
restart, and background loops that survive a failing iteration.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest
from test_controller_fake import MODEL
from waiting import wait_for

from elasticmoe.control.cluster import FakeCluster
from elasticmoe.control.controller import ChangesPausedError, Controller
from elasticmoe.control.state import StateStoreUnavailable, make_state_store
from elasticmoe.core.experts import LogicalExpert as LE
from elasticmoe.core.protocol import Change

from redis_server import RedisServer

POLICY = """
apiVersion: elasticmoe.io/v1alpha1
kind: AutoscalingPolicy
metadata: {name: from-api}
spec:
  interval_s: 0.05
  window_s: 2
  experts: {min_replicas: 1, max_replicas: 3, max_actions_per_interval: 8,
            replicate_cooldown_s: 600, evict_cooldown_s: 600}
  rebalance: {enabled: false}
  pools:
    - {name: default, accelerator: cpu, min_workers: 2, max_workers: 3, slots_per_worker: 40,
       scale_down_cooldown_s: 600}
"""


def config(redis: RedisServer, name: str = "store", **kw: Any) -> dict[str, Any]:
    # health_check_s: the health loop runs only when a test calls it, unless a test says
    return {
        "model": MODEL,
        "name": name,
        "num_workers": 2,
        "slots_per_worker": 40,
        "health_check_s": 3600,
        "state_store": redis.url,
        **kw,
    }


@pytest.fixture
def redis() -> Iterator[RedisServer]:
    with RedisServer(persist=True) as server:
        yield server




def assert_consistent(c: Controller, cluster: FakeCluster) -> None:
    """Store, controller, engines and workers agree: nothing half-applied, nothing orphaned."""
    m = c.expert_map
    assert m is not None
    assert c.store.get_map() == m.to_dict()
    assert c.store.open_operations() == []
    assert all(e.map_dict == m.to_dict() for e in cluster.engines)
    for w in m.workers:
        assert set(cluster.workers[w].held) == set(m.experts_on(w)), w
    assert set(cluster.workers) <= set(m.workers) | set(c.registry.spares())
    assert m.missing(c.all_experts) == []


# ----------------------------------------------------------------- clean stop
def test_a_clean_stop_clears_the_state_and_the_next_start_begins_fresh(
    redis: RedisServer,
) -> None:
    other = make_state_store(redis.url, "other")  # another deployment on the same Redis
    other.put_value("policy_state", {"keep": True})
    cluster = FakeCluster(engines=2)
    first = Controller(config(redis), cluster=cluster)
    first.bootstrap()
    first.replicate("0:1")
    first.set_policy(POLICY)
    first.shutdown()
    assert cluster.workers == {}  # every worker stopped
    store = make_state_store(redis.url, "store")
    assert store.get_map() is None and store.get_workers() == {}
    assert store.open_operations() == [] and store.get_value("policy") is None
    assert other.get_value("policy_state") == {"keep": True}

    again = Controller(config(redis), cluster=cluster)
    try:
        assert again.expert_map is None and again.policy is None
        assert again.bootstrap()["epoch"] == 1
        assert sorted(again.expert_map.workers) == ["w0", "w1"] == sorted(cluster.workers)
        for e in cluster.engines:  # engines of the new start pull the map
            e.map_dict = again.get_map()
        assert_consistent(again, cluster)
        again.replicate("0:2")  # and it changes the map as usual
        assert_consistent(again, cluster)
    finally:
        again.shutdown()


# ------------------------------------------------------------------ worker ids
def test_new_worker_ids_skip_every_id_the_store_still_names(redis: RedisServer) -> None:
    cluster = FakeCluster(engines=1)
    first = Controller(config(redis), cluster=cluster)
    first.bootstrap()
    first._stop.set()  # the actor dies (no clean stop): the state stays for recovery
    # The map names w7 although the registry lost its entry (stored while Redis was down)
    store = make_state_store(redis.url, "store")
    stored = json.loads(json.dumps(store.get_map()).replace('"w1"', '"w7"'))
    stored["epoch"] = 2
    assert store.put_map(stored, expected_epoch=1)
    store.delete_worker("w1")
    cluster.workers["w7"] = cluster.workers.pop("w1")
    # ... and an open change (killed before it published) names w9
    change = Change("add_worker", epoch=2, add_workers=("w9",), pool="default")
    store.journal_append("add_worker-open", "begin", change.to_journal())

    again = Controller(config(redis), cluster=cluster)
    try:
        assert store.journal_result("add_worker-open") == "rolled_back"
        assert sorted(again.expert_map.workers) == ["w0", "w7"]
        assert again.add_worker(1)["add_workers"] == ["w10"]
        assert "w7" in cluster.workers and set(cluster.workers["w7"].held) == set(
            again.expert_map.experts_on("w7")
        )
    finally:
        again.shutdown()


# ------------------------------------------------- store outage mid-change
def _break_at(c: Controller, redis: RedisServer, point: str, op_ids: list[str]) -> None:
    """Stop Redis for real at ``point`` of the next change; its id goes to ``op_ids``."""
    store = c.store
    put_map, journal_append = store.put_map, store.journal_append

    def broken_put_map(map_dict: dict[str, Any], expected_epoch: int | None) -> bool:
        if point == "put_map_landed":
            put_map(map_dict, expected_epoch)  # the write lands, its reply is lost
        redis.stop()
        return put_map(map_dict, expected_epoch)  # raises StateStoreUnavailable

    def broken_append(op_id: str, step: str, data: dict[str, Any]) -> int:
        if step == "begin":
            op_ids.append(op_id)
        if step == point:
            redis.stop()
        return journal_append(op_id, step, data)

    if point.startswith("put_map"):
        store.put_map = broken_put_map  # type: ignore[method-assign]
    store.journal_append = broken_append  # type: ignore[method-assign]


@pytest.mark.parametrize(
    "point, outcome",
    [
        ("put_map_lost", "rolled_back"),  # the new epoch never reached the store
        ("put_map_landed", "done"),  # it did, but the controller never heard
        ("published", "done"),  # during the journal write of "published"
        ("done", "done"),  # between "published" and "done"
    ],
)
@pytest.mark.parametrize("finisher", ["next_change", "health_loop", "new_controller"])
def test_a_store_outage_mid_change_leaves_it_finished_or_resumable(
    redis: RedisServer, point: str, outcome: str, finisher: str
) -> None:
    cluster = FakeCluster(engines=2)
    # the health loop runs all along when it is the one to finish the change
    c = Controller(
        config(redis, health_check_s=0.01 if finisher == "health_loop" else 3600), cluster=cluster
    )
    c.bootstrap()
    for e in cluster.engines:
        e.map_dict = c.get_map()
    expert = LE(1, 2)
    src = c.expert_map.replicas_of(expert)[0]
    dst = next(w for w in c.expert_map.workers if w != src)
    before = c.expert_map
    op_ids: list[str] = []
    _break_at(c, redis, point, op_ids)
    if point.startswith("put_map"):
        with pytest.raises(ChangesPausedError, match="publishing epoch 2"):
            c.migrate(str(expert), src, dst)
        assert c.expert_map == before  # engines stay on epoch 1 meanwhile
        assert all(e.map_dict == before.to_dict() for e in cluster.engines)
    else:
        result = c.migrate(str(expert), src, dst)  # published: it finishes without the store
        assert result["result"] == "done" and result["journal"] == "pending"
        assert c.expert_map.replicas_of(expert) == (dst,)
        assert all(e.map_dict == c.get_map() for e in cluster.engines)
        assert expert not in cluster.workers[src].held  # freed after the drain
    with pytest.raises(ChangesPausedError):  # no other change while the store is down
        c.replicate("0:3")
    vars(c.store).pop("put_map", None)  # the class's methods again
    vars(c.store).pop("journal_append", None)
    redis.start()

    if finisher == "next_change":
        c.replicate("0:3")
        checked = c
    elif finisher == "health_loop":
        wait_for(lambda: not c._needs_recovery, "the health loop to recover")
        checked = c
    else:  # the old controller died; Ray starts a new one over the same store
        c._stop.set()
        checked = Controller(config(redis), cluster=cluster)
    try:
        [op_id] = op_ids
        assert checked.store.journal_result(op_id) == outcome
        steps = [x["step"] for x in checked.store.journal_entries(op_id)]
        want = ["begin", "loaded", "published", "done"] if outcome == "done" else None
        assert want is None or steps == want, steps
        m = checked.expert_map
        if outcome == "done":
            assert m.replicas_of(expert) == (dst,)
        else:
            assert m.replicas_of(expert) == before.replicas_of(expert)
        assert_consistent(checked, cluster)
    finally:
        c._stop.set()
        checked.shutdown()


# ------------------------------------------------------------------- policy
def test_the_policy_set_through_the_api_survives_a_controller_restart(
    redis: RedisServer, tmp_path
) -> None:
    configured = tmp_path / "policy.yaml"
    configured.write_text(POLICY.replace("from-api", "from-config"))
    cluster = FakeCluster(engines=1)
    first = Controller(config(redis, policy=str(configured)), cluster=cluster)
    first.bootstrap()
    assert first.policy.metadata.name == "from-config"
    first.set_policy(POLICY)
    first._stop.set()  # the actor dies; Ray restarts it with the same arguments
    again = Controller(config(redis, policy=str(configured)), cluster=cluster)
    try:
        assert again.policy.metadata.name == "from-api"
        assert again.status()["autoscaler"] == "from-api"
    finally:
        again._stop.set()
    # without a policy in the config too
    third = Controller(config(redis), cluster=cluster)
    try:
        assert third.status()["autoscaler"] == "from-api"
    finally:
        third.shutdown()  # a clean stop forgets it: the next start uses its config


def test_set_policy_refuses_when_the_store_is_down(redis: RedisServer) -> None:
    cluster = FakeCluster(engines=1)
    c = Controller(config(redis), cluster=cluster)
    try:
        c.bootstrap()
        redis.stop()
        with pytest.raises(ChangesPausedError, match="policy was not applied"):
            c.set_policy(POLICY)
        assert c.policy is None
        redis.start()
        c.set_policy(POLICY)
        assert c.store.get_value("policy") == {"text": POLICY}
    finally:
        c.shutdown()


# -------------------------------------------------------------------- loops
def test_the_health_loop_survives_a_failing_iteration(redis: RedisServer) -> None:
    cluster = FakeCluster(engines=1)
    c = Controller(config(redis, health_check_s=0.01), cluster=cluster)
    calls = []

    def check_workers() -> list[str]:
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("boom in the health loop")
        if len(calls) == 2:
            raise StateStoreUnavailable("redis went away")
        return []

    c.check_workers = check_workers  # type: ignore[method-assign]
    try:
        c.bootstrap()
        wait_for(lambda: len(calls) >= 4, "more health-loop iterations")
        loops = c.status()["loops"]["health"]
        assert loops["errors"] == 2 and "redis went away" in loops["last_error"]
        assert loops["iterations"] >= 4 and loops["last_error_at"] is not None
    finally:
        c.shutdown()


def test_the_autoscaler_loop_survives_a_failing_iteration(redis: RedisServer) -> None:
    cluster = FakeCluster(engines=1)
    c = Controller(config(redis), cluster=cluster)
    calls = []

    def autoscale_once(now: float | None = None) -> list[dict[str, Any]]:
        calls.append(1)
        if len(calls) == 1:
            raise KeyError("boom in the autoscaler")
        if len(calls) == 2:
            raise ChangesPausedError("state store unreachable")
        return []

    c.autoscale_once = autoscale_once  # type: ignore[method-assign]
    try:
        c.bootstrap()
        c.set_policy(POLICY)  # starts the loop (interval 0.05 s)
        wait_for(lambda: len(calls) >= 4, "more autoscaler iterations")
        loops = c.status()["loops"]["autoscaler"]
        assert loops["errors"] == 2 and "state store unreachable" in loops["last_error"]
        assert c.status()["loops"]["health"]["errors"] == 0
    finally:
        c.shutdown()


def test_resuming_an_old_change_never_frees_what_the_map_lists(redis: RedisServer) -> None:
    cluster = FakeCluster(engines=1)
    first = Controller(config(redis), cluster=cluster)
    first.bootstrap()
    e, keep = LE(1, 3), LE(2, 0)
    holder = first.expert_map.replicas_of(e)[0]
    other = next(w for w in first.expert_map.workers if w != holder)
    first.replicate(str(e), other)  # epoch 2: e on both workers
    first._stop.set()  # the actor dies
    store = make_state_store(redis.url, "store")
    # two changes a store outage left open, which later changes overtook: one to roll
    # back (its replica is in the map now), one to finish (what it drops is mapped again)
    rollback = Change("replicate", epoch=2, add=((e, other),))
    finish = Change("evict", epoch=1, remove=((keep, first.expert_map.replicas_of(keep)[0]),))
    store.journal_append("replicate-old", "begin", rollback.to_journal())
    store.journal_append("evict-old", "begin", finish.to_journal())
    store.journal_append("evict-old", "loaded", {})
    for x in cluster.engines:
        x.map_dict = first.get_map()
    again = Controller(config(redis), cluster=cluster)
    try:
        assert store.journal_result("replicate-old") == "rolled_back"
        assert store.journal_result("evict-old") == "done"
        assert again.expert_map == first.expert_map
        assert_consistent(again, cluster)  # every mapped replica is still held
    finally:
        again.shutdown()


def test_a_dead_spare_is_forgotten_and_replaced(redis: RedisServer) -> None:
    cluster = FakeCluster(engines=1)
    c = Controller(config(redis, spare_workers=1), cluster=cluster)
    try:
        c.bootstrap()
        assert c.registry.spares() == ["w2"]
        cluster.kill("w2")
        c.check_workers()
        c.check_workers()  # two missed checks
        assert "w2" not in c.registry and "w2" not in c.store.get_workers()
        wait_for(lambda: c.registry.spares() == ["w3"], "a new spare")
    finally:
        c.shutdown()


def test_a_start_after_a_crash_whose_workers_are_gone_begins_fresh(redis: RedisServer) -> None:
    old_cluster = FakeCluster(engines=1)
    first = Controller(config(redis), cluster=old_cluster)
    first.bootstrap()
    first.replicate("0:1")
    first._stop.set()  # the whole run died, Ray cluster and workers with it
    cluster = FakeCluster(engines=1)  # a new Ray cluster: nothing of the old run runs
    again = Controller(config(redis), cluster=cluster)
    try:
        m = again.bootstrap()
        assert m["epoch"] == 1 and sorted(m["workers"]) == ["w2", "w3"]  # ids never reused
        assert sorted(again.store.get_workers()) == ["w2", "w3"]
        for e in cluster.engines:
            e.map_dict = again.get_map()
        assert_consistent(again, cluster)
    finally:
        again.shutdown()
