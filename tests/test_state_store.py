"""State store: the same behaviour from the embedded store and from a real redis-server."""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from elasticmoe.control.state import (
    MemoryStateStore,
    RedisStateStore,
    StateStore,
    StateStoreUnavailable,
    make_state_store,
)
from elasticmoe.core.expert_map import ExpertMap
from elasticmoe.core.experts import LogicalExpert

from redis_server import RedisServer

pytestmark = pytest.mark.timeout(60)

OpenStore = Callable[[], StateStore]


def expert_map(epoch: int, writer: str = "w0") -> dict[str, Any]:
    """A small real map whose only worker is named after its writer."""
    return ExpertMap(
        epoch,
        {LogicalExpert(0, 0): (writer,), LogicalExpert(1, 3): (writer,)},
        {writer: "10.0.0.1:50051"},
    ).to_dict()




@pytest.fixture(scope="module")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """One server without persistence for the module; tests use distinct key prefixes."""
    with RedisServer(tmp_path_factory.mktemp("redis")) as server:
        yield server


@pytest.fixture(params=["memory", "redis"])
def open_store(request: pytest.FixtureRequest) -> Iterator[OpenStore]:
    """Opens a store on this test's state: a new client each call for Redis (another
    controller, or the same one restarted), the one embedded store for memory."""
    opened: list[StateStore] = []
    if request.param == "memory":
        store = MemoryStateStore()
        opened.append(store)

        def open_() -> StateStore:
            return store
    else:
        server: RedisServer = request.getfixturevalue("redis_server")
        deployment = f"test-{uuid.uuid4().hex[:8]}"

        def open_() -> StateStore:
            s = make_state_store(server.url, deployment=deployment)
            opened.append(s)
            return s

    yield open_
    for s in opened:
        s.close()


@pytest.fixture
def store(open_store: OpenStore) -> StateStore:
    return open_store()


# -- factory ---------------------------------------------------------------


def test_make_state_store_picks_implementation_by_url() -> None:
    assert isinstance(make_state_store(None), MemoryStateStore)
    assert isinstance(make_state_store("memory://"), MemoryStateStore)
    # No connection is made until the first call, so no server is needed here.
    redis_store = make_state_store("redis://127.0.0.1:6399/2", deployment="prod")
    assert isinstance(redis_store, RedisStateStore)
    assert redis_store.prefix == "elasticmoe:prod"
    redis_store.close()
    with pytest.raises(ValueError, match=r"memory://.*redis://"):
        make_state_store("etcd://127.0.0.1:2379")
    with pytest.raises(ValueError, match="deployment"):
        make_state_store(None, deployment="")


def test_url_password_is_not_shown() -> None:
    store = make_state_store("redis://user:s3cret@127.0.0.1:1/0")
    assert "s3cret" not in store.url and "s3cret" not in repr(store)
    with pytest.raises(StateStoreUnavailable) as err:
        store.get_map()
    assert "s3cret" not in str(err.value) and "127.0.0.1:1" in str(err.value)
    store.close()


# -- expert map ------------------------------------------------------------


def test_map_compare_and_set(store: StateStore) -> None:
    assert store.get_map() is None
    assert not store.put_map(expert_map(1), expected_epoch=0)  # nothing stored yet
    assert store.put_map(expert_map(1), expected_epoch=None)
    assert store.get_map() == expert_map(1)
    assert ExpertMap.from_dict(store.get_map()).epoch == 1

    # A second "first map" and a stale epoch both lose and change nothing.
    assert not store.put_map(expert_map(2, writer="other"), expected_epoch=None)
    assert store.put_map(expert_map(2), expected_epoch=1)
    assert not store.put_map(expert_map(3), expected_epoch=1)
    assert store.get_map() == expert_map(2)
    assert store.put_map(expert_map(3), expected_epoch=2)
    assert store.get_map()["epoch"] == 3


def test_map_put_is_idempotent_but_one_epoch_is_one_map(store: StateStore) -> None:
    assert store.put_map(expert_map(1), expected_epoch=None)
    assert store.put_map(expert_map(2), expected_epoch=1)
    # The same call again (a retry whose first attempt went through) still succeeds ...
    assert store.put_map(expert_map(2), expected_epoch=1)
    # ... but a different map for the same epoch loses.
    assert not store.put_map(expert_map(2, writer="other"), expected_epoch=1)
    assert store.get_map() == expert_map(2)


def test_map_rejects_bad_epochs(store: StateStore) -> None:
    with pytest.raises(ValueError, match="greater than the expected epoch"):
        store.put_map(expert_map(4), expected_epoch=4)
    with pytest.raises(ValueError, match="epoch"):
        store.put_map({"workers": {}, "replicas": {}}, expected_epoch=None)
    with pytest.raises(ValueError, match="JSON"):
        store.put_map({"epoch": 1, "workers": {"w": object()}}, expected_epoch=None)
    assert store.get_map() is None


def test_concurrent_writers_exactly_one_wins_per_epoch(open_store: OpenStore) -> None:
    num_writers, num_epochs = 6, 15
    stores = [open_store() for _ in range(num_writers)]
    assert stores[0].put_map(expert_map(0, writer="seed"), expected_epoch=None)
    barrier = threading.Barrier(num_writers)

    def writer(i: int) -> list[int]:
        won = []
        for epoch in range(num_epochs):
            barrier.wait()  # all writers race on the same expected epoch
            if stores[i].put_map(expert_map(epoch + 1, writer=f"w{i}"), expected_epoch=epoch):
                won.append(epoch + 1)
            barrier.wait()  # nobody starts the next round before all finished this one
        return won

    with ThreadPoolExecutor(num_writers) as pool:
        wins = list(pool.map(writer, range(num_writers)))
    winners_by_epoch = {e: [i for i, w in enumerate(wins) if e in w] for e in range(1, 16)}
    assert all(len(w) == 1 for w in winners_by_epoch.values()), winners_by_epoch
    final = stores[0].get_map()
    assert final["epoch"] == num_epochs
    assert list(final["workers"]) == [f"w{winners_by_epoch[num_epochs][0]}"]


# -- worker registry -------------------------------------------------------


def test_worker_registry_crud(store: StateStore) -> None:
    assert store.get_workers() == {}
    store.put_worker("w0", {"address": "10.0.0.1:50051", "pool": "gpu", "slots": 8})
    store.put_worker("w1", {"address": "10.0.0.2:50051", "pool": "npu", "slots": (4, 4)})
    workers = store.get_workers()
    assert workers == {
        "w0": {"address": "10.0.0.1:50051", "pool": "gpu", "slots": 8},
        "w1": {"address": "10.0.0.2:50051", "pool": "npu", "slots": [4, 4]},  # JSON form
    }
    workers["w0"]["slots"] = 99  # callers get copies
    store.put_worker("w1", {"address": "10.0.0.9:50051", "pool": "npu", "slots": 2})
    assert store.get_workers()["w0"]["slots"] == 8
    assert store.get_workers()["w1"]["address"] == "10.0.0.9:50051"
    assert store.delete_worker("w0")
    assert not store.delete_worker("w0")
    assert set(store.get_workers()) == {"w1"}
    with pytest.raises(ValueError, match="JSON"):
        store.put_worker("w2", {"started": object()})
    with pytest.raises(ValueError, match="worker_id"):
        store.put_worker("", {})


# -- operation journal -----------------------------------------------------


def test_journal_order_open_operations_and_finish(store: StateStore) -> None:
    before = time.time()
    seqs = [
        store.journal_append("op-b", "load", {"expert": "3:7", "target": "w1"}),
        store.journal_append("op-a", "load", {"expert": "0:1", "target": "w0"}),
        store.journal_append("op-b", "verify", {"checksum": "abc"}),
        store.journal_append("op-b", "publish", {"epoch": 5}),
        store.journal_append("op-a", "verify", {}),
    ]
    assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs)

    entries = store.journal_entries("op-b")
    assert [e["step"] for e in entries] == ["load", "verify", "publish"]
    assert [e["seq"] for e in entries] == [seqs[0], seqs[2], seqs[3]]
    assert entries[2]["data"] == {"epoch": 5}
    assert all(e["op_id"] == "op-b" and before <= e["ts"] <= time.time() for e in entries)
    assert set(entries[0]) == {"seq", "ts", "op_id", "step", "data"}
    assert store.journal_entries("nope") == []

    assert store.open_operations() == ["op-b", "op-a"]  # oldest first
    store.journal_finish("op-b", "done")
    assert store.open_operations() == ["op-a"]
    assert store.journal_result("op-b") == "done"
    assert store.journal_result("op-a") is None
    assert len(store.journal_entries("op-b")) == 3  # the record of a finished op stays

    store.journal_finish("op-b", "done")  # a retry is a no-op
    with pytest.raises(ValueError, match="already finished"):
        store.journal_finish("op-b", "failed")
    with pytest.raises(ValueError, match="already finished"):
        store.journal_append("op-b", "drain", {})
    with pytest.raises(ValueError, match="unknown operation"):
        store.journal_finish("never-started", "done")
    with pytest.raises(ValueError, match="rolled_back"):
        store.journal_finish("op-a", "aborted")  # type: ignore[arg-type]

    store.journal_finish("op-a", "rolled_back")
    assert store.open_operations() == []


def test_journal_appends_from_threads_keep_a_total_order(open_store: OpenStore) -> None:
    stores = [open_store() for _ in range(4)]

    def append(i: int) -> list[int]:
        return [stores[i].journal_append(f"op{i}", f"step{n}", {"n": n}) for n in range(25)]

    with ThreadPoolExecutor(4) as pool:
        per_thread = list(pool.map(append, range(4)))
    all_seqs = [s for seqs in per_thread for s in seqs]
    assert len(set(all_seqs)) == 100
    for i, seqs in enumerate(per_thread):
        entries = stores[0].journal_entries(f"op{i}")
        assert [e["seq"] for e in entries] == seqs == sorted(seqs)
        assert [e["data"]["n"] for e in entries] == list(range(25))


# -- Redis only: restart, isolation, retries, outage -----------------------


def test_restarted_controller_sees_everything(redis_server: RedisServer) -> None:
    deployment = f"restart-{uuid.uuid4().hex[:8]}"
    with make_state_store(redis_server.url, deployment=deployment) as first:
        assert first.put_map(expert_map(1), expected_epoch=None)
        first.put_worker("w0", {"address": "10.0.0.1:50051"})
        first.journal_append("op-1", "load", {"expert": "1:3"})
        first.journal_append("op-1", "publish", {"epoch": 2})
        first.journal_append("op-0", "load", {})
        first.journal_finish("op-0", "done")

    # The controller "restarts": a new store object on the same URL.
    with make_state_store(redis_server.url, deployment=deployment) as second:
        assert second.get_map() == expert_map(1)
        assert second.get_workers() == {"w0": {"address": "10.0.0.1:50051"}}
        assert second.open_operations() == ["op-1"]
        assert [e["step"] for e in second.journal_entries("op-1")] == ["load", "publish"]
        assert second.journal_result("op-0") == "done"
        last_seq = second.journal_entries("op-1")[-1]["seq"]
        assert second.journal_append("op-1", "drain", {}) > last_seq
        assert second.put_map(expert_map(2), expected_epoch=1)


def test_deployments_on_one_redis_are_isolated(redis_server: RedisServer) -> None:
    with (
        make_state_store(redis_server.url, deployment=f"a-{uuid.uuid4().hex[:8]}") as a,
        make_state_store(redis_server.url, deployment=f"b-{uuid.uuid4().hex[:8]}") as b,
    ):
        assert a.put_map(expert_map(1), expected_epoch=None)
        a.put_worker("w0", {})
        a.journal_append("op", "load", {})
        assert b.put_map(expert_map(7), expected_epoch=None)  # b's own first map
        assert b.get_map()["epoch"] == 7
        assert b.get_workers() == {} and b.open_operations() == []
        assert a.get_map()["epoch"] == 1


def test_redis_append_retry_does_not_write_twice(redis_server: RedisServer) -> None:
    with make_state_store(redis_server.url, deployment=f"retry-{uuid.uuid4().hex[:8]}") as s:
        assert isinstance(s, RedisStateStore)
        # What the client's retry does when a connection drops after sending.
        first = s._append("op", "load", {"x": 1}, token="t1")
        assert s._append("op", "load", {"x": 1}, token="t1") == first
        assert s._append("op", "verify", {}, token="t2") == first + 1
        assert [e["step"] for e in s.journal_entries("op")] == ["load", "verify"]


def test_redis_outage_raises_then_recovers(tmp_path: Path) -> None:
    server = RedisServer(tmp_path / "aof", persist=True)  # data must survive the restart
    with server:
        store = make_state_store(server.url, deployment="outage")
        assert store.put_map(expert_map(1), expected_epoch=None)
        store.put_worker("w0", {"address": "10.0.0.1:50051"})
        store.journal_append("op-1", "load", {"expert": "0:0"})

        server.stop()
        assert not store.ping()
        calls: dict[str, Callable[[], object]] = {
            "get_map": store.get_map,
            "put_map": lambda: store.put_map(expert_map(2), expected_epoch=1),
            "put_worker": lambda: store.put_worker("w1", {}),
            "get_workers": store.get_workers,
            "delete_worker": lambda: store.delete_worker("w0"),
            "journal_append": lambda: store.journal_append("op-1", "verify", {}),
            "journal_entries": lambda: store.journal_entries("op-1"),
            "open_operations": store.open_operations,
            "journal_finish": lambda: store.journal_finish("op-1", "done"),
            "journal_result": lambda: store.journal_result("op-1"),
        }
        for name, call in calls.items():
            with pytest.raises(StateStoreUnavailable, match=str(server.port)) as err:
                call()
            assert name in str(err.value)

        server.start()  # same port, same append-only file
        assert store.ping()
        assert store.get_map() == expert_map(1)
        assert store.get_workers() == {"w0": {"address": "10.0.0.1:50051"}}
        assert store.open_operations() == ["op-1"]
        store.journal_append("op-1", "verify", {})
        assert [e["step"] for e in store.journal_entries("op-1")] == ["load", "verify"]
        assert store.put_map(expert_map(2), expected_epoch=1)

        store.close()



def test_redis_that_stops_answering_raises_then_recovers(redis_server: RedisServer) -> None:
    with make_state_store(redis_server.url, deployment=f"hang-{uuid.uuid4().hex[:8]}") as s:
        assert s.put_map(expert_map(1), expected_epoch=None)
        redis_server.freeze()  # accepts connections, never answers: socket timeouts
        try:
            with pytest.raises(StateStoreUnavailable, match="put_map"):
                s.put_map(expert_map(2), expected_epoch=1)
        finally:
            redis_server.thaw()
        # The frozen server may still run the command it buffered; either way
        # the retry below is answered consistently (CAS writes are idempotent).
        assert s.put_map(expert_map(2), expected_epoch=1)
        assert s.get_map() == expert_map(2)


def test_values_survive_a_new_client(open_store: OpenStore) -> None:
    first = open_store()
    assert first.get_value("policy_state") is None
    first.put_value("policy_state", {"expert_last": {"0:1": 12.5}, "version": 1})
    assert open_store().get_value("policy_state") == {"expert_last": {"0:1": 12.5}, "version": 1}
    with pytest.raises(ValueError):
        first.put_value("bad", {"x": object()})


def test_clear_forgets_everything_of_this_deployment_only(
    store: StateStore, request: pytest.FixtureRequest
) -> None:
    store.put_map({"epoch": 3, "workers": {}, "replicas": {}}, expected_epoch=None)
    store.put_worker("w0", {"address": "a"})
    store.put_value("policy", {"text": "x"})
    store.journal_append("op-1", "begin", {})
    store.journal_append("op-2", "begin", {})
    store.journal_finish("op-2", "done")
    neighbour = None
    if not store.is_memory:  # "test-x" must not lose the keys of "test-x" + anything
        server: RedisServer = request.getfixturevalue("redis_server")
        neighbour = make_state_store(server.url, deployment=store.prefix.split(":", 1)[1] + "b")
        neighbour.put_worker("w9", {"address": "b"})
    store.clear()
    assert store.get_map() is None and store.get_workers() == {}
    assert store.get_value("policy") is None and store.open_operations() == []
    assert store.journal_entries("op-1") == [] and store.journal_result("op-2") is None
    # the store is as good as new: a first map, new operations
    assert store.put_map({"epoch": 1, "workers": {}, "replicas": {}}, expected_epoch=None)
    store.journal_append("op-2", "begin", {})
    assert store.open_operations() == ["op-2"]
    if neighbour is not None:
        assert neighbour.get_workers() == {"w9": {"address": "b"}}
        neighbour.close()
