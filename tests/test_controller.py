"""Control plane on a local Ray instance: zero-downtime scaling under load,
controller crash recovery with Redis, and a Redis outage while serving."""

from __future__ import annotations

import threading
import time

import grpc
import pytest
import ray

from elasticmoe import LLM, SamplingParams
from elasticmoe._proto.elasticmoe.v1 import expert_pb2, expert_pb2_grpc
from elasticmoe.control.controller import ChangesPausedError, ControllerError
from elasticmoe.core.expert_map import ExpertMap
from elasticmoe.core.experts import LogicalExpert
from elasticmoe.model.init_model import init_model

from redis_server import RedisServer

PARAMS = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
PROMPTS = [{"prompt_token_ids": [i, i + 3, i + 8, i + 1]} for i in range(1, 9)]


pytestmark = pytest.mark.usefixtures("ray_instance")


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return init_model("qwen2_moe", "tiny", tmp_path_factory.mktemp("m") / "ckpt")


@pytest.fixture(scope="module")
def expected(ckpt):
    return [o.outputs[0].token_ids for o in LLM(str(ckpt)).generate(PROMPTS, PARAMS)]


def held_experts(address: str) -> set[LogicalExpert]:
    with grpc.insecure_channel(address) as channel:
        stats = expert_pb2_grpc.ExpertServiceStub(channel).Stats(
            expert_pb2.StatsRequest(), timeout=10
        )
    return {LogicalExpert(i.layer, i.expert) for i in stats.experts}


def assert_consistent(m: ExpertMap, experts: list[LogicalExpert]) -> None:
    """Every expert has a replica and every worker holds exactly what the map says."""
    assert not m.missing(experts), f"experts without replica: {m.missing(experts)}"
    for worker, address in m.workers.items():
        assert held_experts(address) == set(m.experts_on(worker)), (
            f"orphan/missing slots on {worker}"
        )


class Load:
    """Closed-loop generation in a background thread, checking every output."""

    def __init__(self, llm: LLM, expected: list[list[int]]) -> None:
        self.llm, self.expected = llm, expected
        self.batches = self.mismatches = self.failures = 0
        self.errors: list[str] = []
        self._stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                outs = self.llm.generate(PROMPTS, PARAMS)
            except Exception as e:
                self.failures += 1
                self.errors.append(repr(e))
                continue
            self.batches += 1
            for o, want in zip(outs, self.expected, strict=True):
                if o.outputs[0].finish_reason != "length":
                    self.failures += 1
                    self.errors.append(str(o.outputs[0].stop_reason))
                elif o.outputs[0].token_ids != want:
                    self.mismatches += 1

    def __enter__(self) -> Load:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self.thread.join(120)


def test_scaling_operations_under_load_lose_nothing(ckpt, expected):
    with LLM(
        str(ckpt),
        mode="distributed",
        num_workers=2,
        slots_per_worker=16,
        max_workers=4,
        name="scale",
        progress=False,
    ) as llm:
        controller = llm.deployment.controller
        experts = sorted(llm.deployment.expert_map.replicas)
        with Load(llm, expected) as load:
            for _ in range(2):
                m = llm.deployment.expert_map
                ray.get(controller.replicate.remote("0:1"))
                holders = llm.deployment.expert_map.replicas_of(LogicalExpert(0, 1))
                assert len(holders) == 2
                src = m.replicas_of(LogicalExpert(1, 3))[0]
                ray.get(controller.migrate.remote("1:3", src))
                assert src not in llm.deployment.expert_map.replicas_of(LogicalExpert(1, 3))
                ray.get(controller.evict.remote("0:1", holders[0]))
                added = ray.get(controller.add_worker.remote())
                new_worker = added["add_workers"][0]
                ray.get(controller.replicate.remote("0:4", new_worker))
                ray.get(controller.scale.remote("0:6", 3))
                ray.get(controller.scale.remote("0:6", 1))
                ray.get(controller.remove_worker.remote(new_worker))
                while load.batches < 1:
                    time.sleep(0.1)
            time.sleep(0.5)
        final = llm.deployment.expert_map
        assert_consistent(final, experts)
        status = ray.get(controller.status.remote())
        assert status["epoch"] == final.epoch and final.epoch > 10
        assert all(h["result"] == "done" for h in status["history"])
    assert load.failures == 0, load.errors[:3]
    assert load.mismatches == 0
    assert load.batches >= 2


def test_bad_scaling_requests_are_rejected_clearly(ckpt):
    with LLM(str(ckpt), mode="distributed", num_workers=2, name="bad", progress=False) as llm:
        c = llm.deployment.controller
        for call, match in [
            (c.replicate.remote("9:9"), "does not exist"),
            (c.replicate.remote("zero"), "expected 'layer:expert'"),
            (
                c.evict.remote(
                    "0:1",
                    "w0"
                    if "w0" not in llm.deployment.expert_map.replicas_of(LogicalExpert(0, 1))
                    else "w1",
                ),
                "holds no replica",
            ),
            (c.remove_worker.remote("w9"), "no worker 'w9'"),
            (c.scale.remote("0:1", 0), "at least 1"),
        ]:
            with pytest.raises(ControllerError, match=match):
                ray.get(call)
        only = llm.deployment.expert_map.replicas_of(LogicalExpert(0, 2))[0]
        with pytest.raises(ControllerError, match="evicting it would lose"):
            ray.get(c.evict.remote("0:2", only))
        assert llm.generate(PROMPTS[:1], PARAMS)[0].outputs[0].finish_reason == "length"


@pytest.mark.parametrize("crash_after, outcome", [("loaded", "rolled_back"), ("published", "done")])
def test_controller_killed_mid_migration_recovers(ckpt, expected, tmp_path, crash_after, outcome):
    with RedisServer() as redis:
        with LLM(
            str(ckpt),
            mode="distributed",
            num_workers=2,
            name=f"crash-{crash_after}",
            state_store=redis.url,
            progress=False,
            fault={"crash_after": crash_after, "once_file": str(tmp_path / "fired")},
        ) as llm:
            controller = llm.deployment.controller
            before = llm.deployment.expert_map
            expert = LogicalExpert(1, 2)
            src = before.replicas_of(expert)[0]
            with Load(llm, expected) as load:
                with pytest.raises(ray.exceptions.RayActorError):
                    ray.get(controller.migrate.remote(str(expert), src))
                # Ray restarts the controller; it recovers from the Redis journal
                deadline = time.monotonic() + 60
                status = None
                while time.monotonic() < deadline:
                    try:
                        status = ray.get(controller.status.remote(), timeout=10)
                        break
                    except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError):
                        time.sleep(0.5)
                assert status is not None, "controller did not come back"
                while load.batches < 1:
                    time.sleep(0.1)
            after = llm.deployment.expert_map
            recovered = [h for h in status["history"] if h.get("recovered")]
            assert [h["result"] for h in recovered] == [outcome]
            if outcome == "done":
                assert src not in after.replicas_of(expert) and after.epoch == before.epoch + 1
            else:
                assert after == before
            assert_consistent(after, sorted(before.replicas))
            # the recovered controller keeps working
            ray.get(controller.replicate.remote("0:0"))
        assert load.failures == 0, load.errors[:3]
        assert load.mismatches == 0


def test_redis_outage_pauses_changes_but_not_serving(ckpt, expected):
    with RedisServer(persist=True) as redis:
        with LLM(
            str(ckpt),
            mode="distributed",
            num_workers=2,
            name="outage",
            state_store=redis.url,
            progress=False,
        ) as llm:
            controller = llm.deployment.controller
            with Load(llm, expected) as load:
                redis.stop()
                with pytest.raises(ChangesPausedError, match="state store unreachable"):
                    ray.get(controller.replicate.remote("0:3"))
                start = load.batches
                while load.batches < start + 1:
                    time.sleep(0.1)
                redis.start()
                ray.get(controller.replicate.remote("0:3"))
            assert len(llm.deployment.expert_map.replicas_of(LogicalExpert(0, 3))) == 2
            assert_consistent(llm.deployment.expert_map, sorted(llm.deployment.expert_map.replicas))
        assert load.failures == 0, load.errors[:3]
        assert load.mismatches == 0


def test_a_clean_stop_with_redis_lets_the_next_start_begin_fresh(ckpt, expected):
    from elasticmoe.control.state import make_state_store

    with RedisServer(persist=True) as redis:
        kw = dict(mode="distributed", num_workers=2, name="again", state_store=redis.url)
        for start in range(2):
            with LLM(str(ckpt), progress=False, **kw) as llm:
                m = llm.deployment.expert_map
                # a fresh map of fresh workers each time, never the last run's
                assert m.epoch == 1 and sorted(m.workers) == ["w0", "w1"], (start, m.to_dict())
                outs = llm.generate(PROMPTS, PARAMS)
                assert [o.outputs[0].token_ids for o in outs] == expected
                ray.get(llm.deployment.controller.replicate.remote("0:1"))
            store = make_state_store(redis.url, "again")
            assert store.get_map() is None and store.get_workers() == {}
            assert store.open_operations() == []


def test_status_and_scale_cli_against_running_deployment(ckpt):
    import json
    import os
    import subprocess
    import sys

    with LLM(str(ckpt), mode="distributed", num_workers=2, name="cli", progress=False) as llm:
        env = {**os.environ, "RAY_ADDRESS": ray.get_runtime_context().gcs_address}
        cli = [sys.executable, "-m", "elasticmoe"]
        run = lambda *a: subprocess.run([*cli, *a], env=env, capture_output=True, text=True)  # noqa: E731
        res = run("scale", "--deployment", "cli", "--expert", "1:4", "--replicas", "2", "--json")
        assert res.returncode == 0, res.stderr
        assert [r["kind"] for r in json.loads(res.stdout)] == ["replicate"]
        res = run("status", "--deployment", "cli", "--json")
        assert res.returncode == 0, res.stderr
        status = json.loads(res.stdout)
        assert len(status["replicas"]["1:4"]) == 2
        assert status["epoch"] == llm.deployment.expert_map.epoch == 2
        assert {w["worker_id"] for w in status["workers"]} == {"w0", "w1"}
        human = run("status", "--deployment", "cli")
        assert "expert map epoch 2" in human.stdout
        bad = run("scale", "--deployment", "cli", "--expert", "7:7", "--replicas", "2")
        assert bad.returncode == 2 and "does not exist" in bad.stderr
        missing = run("status", "--deployment", "nope")
        assert missing.returncode == 2 and "no elasticmoe deployment named 'nope'" in missing.stderr


POLICY = """
apiVersion: elasticmoe.io/v1alpha1
kind: AutoscalingPolicy
metadata: {name: test}
spec:
  interval_s: 1
  window_s: 2
  experts: {min_replicas: 2, max_replicas: 3, max_actions_per_interval: 8,
            replicate_cooldown_s: 0, evict_cooldown_s: 600}
  rebalance: {enabled: false}
  pools:
    - {name: default, accelerator: cpu, min_workers: 2, max_workers: 3, slots_per_worker: 16,
       scale_down_cooldown_s: 600}
"""


def test_autoscaler_brings_experts_to_policy_minimum_under_load(ckpt, expected, tmp_path):
    policy = tmp_path / "policy.yaml"
    policy.write_text(POLICY)
    with LLM(
        str(ckpt),
        mode="distributed",
        num_workers=2,
        slots_per_worker=16,
        name="auto",
        policy=str(policy),
        progress=False,
    ) as llm:
        experts = sorted(llm.deployment.expert_map.replicas)
        with Load(llm, expected) as load:
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline:
                m = llm.deployment.expert_map
                if all(len(m.replicas_of(e)) >= 2 for e in experts):
                    break
                time.sleep(0.5)
            while load.batches < 1:
                time.sleep(0.1)
        m = llm.deployment.expert_map
        assert all(len(m.replicas_of(e)) >= 2 for e in experts), m.to_dict()
        assert_consistent(m, experts)
        status = ray.get(llm.deployment.controller.status.remote())
        assert status["autoscaler"] == "test"
    assert load.failures == 0, load.errors[:3]
    assert load.mismatches == 0


def test_policy_pool_mismatch_is_rejected_before_start(ckpt, tmp_path):
    policy = tmp_path / "policy.yaml"
    policy.write_text(POLICY)
    with pytest.raises(ValueError, match="pool='gpu' is not a pool of policy"):
        LLM(str(ckpt), mode="distributed", policy=str(policy), pool="gpu", progress=False)


def test_dead_worker_is_replaced_and_serving_continues(ckpt, expected):
    with LLM(
        str(ckpt),
        mode="distributed",
        num_workers=3,
        replicas_per_expert=2,
        name="dead",
        progress=False,
    ) as llm:
        experts = sorted(llm.deployment.expert_map.replicas)
        controller = llm.deployment.controller
        with Load(llm, expected) as load:
            ray.kill(llm.deployment.workers["w1"])
            # the controller's health loop notices on its own (2 failed checks)
            deadline = time.monotonic() + 60
            while "w1" in llm.deployment.expert_map.workers and time.monotonic() < deadline:
                time.sleep(0.5)
            assert "w1" not in llm.deployment.expert_map.workers
            assert ray.get(controller.check_workers.remote()) == []
            start = load.batches
            while load.batches < start + 1:
                time.sleep(0.1)
        m = llm.deployment.expert_map
        assert "w1" not in m.workers
        assert_consistent(m, experts)
    assert load.failures == 0, load.errors[:3]
    assert load.mismatches == 0


def test_spare_worker_makes_add_worker_instant_and_is_replenished(ckpt, expected):
    with LLM(
        str(ckpt),
        mode="distributed",
        num_workers=2,
        spare_workers=1,
        name="spare",
        progress=False,
    ) as llm:
        controller = llm.deployment.controller
        spare = ray.get(controller.status.remote())["spare_workers"]
        assert len(spare) == 1 and spare[0] not in llm.deployment.expert_map.workers
        added = ray.get(controller.add_worker.remote())
        assert added["add_workers"] == spare  # the warm spare joined the map
        assert spare[0] in llm.deployment.expert_map.workers
        ray.get(controller.replicate.remote("0:5", spare[0]))
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            new = ray.get(controller.status.remote())["spare_workers"]
            if new:
                break
            time.sleep(0.5)
        assert new and new != spare
        out = llm.generate(PROMPTS, PARAMS)
        assert [o.outputs[0].token_ids for o in out] == expected
        assert_consistent(llm.deployment.expert_map, sorted(llm.deployment.expert_map.replicas))


def test_lost_sole_replicas_are_restored_from_the_checkpoint(ckpt, expected):
    """No policy needed: the health loop replaces a dead worker holding sole replicas."""
    with LLM(
        str(ckpt),
        mode="distributed",
        num_workers=3,
        slots_per_worker=16,
        name="restore",
        progress=False,
        router={"expert_wait_timeout_s": 60},
    ) as llm:
        experts = sorted(llm.deployment.expert_map.replicas)
        lost = llm.deployment.expert_map.experts_on("w1")
        assert lost
        ray.kill(llm.deployment.workers["w1"])
        # requests sent now wait for the lost experts, then complete
        out = llm.generate(PROMPTS, PARAMS)
        m = llm.deployment.expert_map
        assert "w1" not in m.workers
        assert all(m.replicas_of(e) for e in lost)
        assert_consistent(m, experts)
    assert [o.outputs[0].token_ids for o in out] == expected
