"""Pools end to end on a local Ray instance: two custom Ray resources (``cpu_a``,
``cpu_b``) stand for two accelerator types. Experts go on both pools, the
autoscaler grows the pool its policy names, and draining one pool moves its
experts to the other while requests keep being served."""

from __future__ import annotations

import time

import pytest
import ray
from test_controller import PARAMS, PROMPTS, Load, assert_consistent
from waiting import wait_for

from elasticmoe import LLM
from elasticmoe.control.cluster import start_local_ray
from elasticmoe.model.init_model import init_model


@pytest.fixture(scope="module")
def pools_ray():
    """A Ray instance of its own, with the two pools' custom resources."""
    ray.shutdown()
    start_local_ray(
        num_cpus=12,
        resources={"cpu_a": 4, "cpu_b": 4},
        include_dashboard=False,
        namespace="elasticmoe",
        log_to_driver=False,
    )
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return init_model("mixtral", "tiny", tmp_path_factory.mktemp("m") / "ckpt")


@pytest.fixture(scope="module")
def expected(ckpt):
    return [o.outputs[0].token_ids for o in LLM(str(ckpt)).generate(PROMPTS, PARAMS)]




def pools_of(status: dict) -> dict[str, str]:
    return {w["worker_id"]: w["pool"] for w in status["workers"]}


POLICY = """\
apiVersion: elasticmoe.io/v1alpha1
kind: AutoscalingPolicy
metadata: {name: two-pools}
spec:
  interval_s: 3600  # the test drives each tick itself
  window_s: 3600
  experts: {min_replicas: 1, max_replicas: 1}
  rebalance: {enabled: false}
  pools:
    - {name: cpu-a, min_workers: 0, max_workers: 2, scale_down_utilization: 0}
    - {name: cpu-b, min_workers: 2, max_workers: 3, scale_down_utilization: 0}
"""


def test_two_pools_serve_grow_and_hand_over(pools_ray, ckpt, expected, tmp_path):
    policy = tmp_path / "policy.yaml"
    policy.write_text(POLICY)
    from elasticmoe.model.config import load_config

    model = load_config(str(ckpt))
    num_experts = len(model.moe_layers) * model.num_experts
    pools = [
        # two pools of different capacity: a cpu-b worker holds twice the experts
        {
            "name": "cpu-a",
            "num_workers": 2,
            "max_workers": 2,
            "slots_per_worker": num_experts // 2,
            "worker_resources": {"cpu_a": 1},
        },
        {
            "name": "cpu-b",
            "num_workers": 1,
            "max_workers": 3,
            "slots_per_worker": num_experts,
            "worker_resources": {"cpu_b": 1},
        },
    ]
    with LLM(
        str(ckpt),
        mode="distributed",
        name="pools",
        pools=pools,
        policy=str(policy),
        progress=False,
    ) as llm:
        controller = llm.deployment.controller
        experts = sorted(llm.deployment.expert_map.replicas)
        m = llm.deployment.expert_map
        pool_of = pools_of(ray.get(controller.status.remote()))
        assert sorted(pool_of.values()) == ["cpu-a", "cpu-a", "cpu-b"]
        on = {
            p: [e for w in m.workers if pool_of[w] == p for e in m.experts_on(w)]
            for p in pool_of.values()
        }
        assert on["cpu-a"] and on["cpu-b"], on
        # each worker holds the share its pool's slots give it
        assert len(on["cpu-b"]) == num_experts // 2
        # every worker asked for its pool's resource
        wait_for(lambda: ray.available_resources().get("cpu_a") == 2, "2 cpu_a in use")
        wait_for(lambda: ray.available_resources().get("cpu_b") == 3, "1 cpu_b in use")
        outs = llm.generate(PROMPTS, PARAMS)
        assert [o.outputs[0].token_ids for o in outs] == expected

        # the policy's floor for cpu-b is 2: the autoscaler grows cpu-b, not cpu-a
        demand = ray.get(controller.demand.remote())["pools"]
        assert demand["cpu-b"] == {"workers": 1, "desired": 2}
        results = ray.get(controller.autoscale_once.remote())
        grown = [r for r in results if r["kind"] == "add_worker"]
        assert len(grown) == 1 and grown[0]["result"] == "done", results
        pool_of = pools_of(ray.get(controller.status.remote()))
        assert pool_of[grown[0]["add_workers"][0]] == "cpu-b"
        wait_for(lambda: ray.available_resources().get("cpu_b") == 2, "2 cpu_b in use")

        # cpu-a goes away (its worker group shrinks): its experts move to cpu-b, under load
        cpu_a = sorted(w for w, p in pool_of.items() if p == "cpu-a")
        with Load(llm, expected) as load:
            while load.batches < 1:
                time.sleep(0.1)
            drained = ray.get(controller.drain.remote(workers=cpu_a))
            assert sorted(drained["drained"]) == cpu_a
            batches = load.batches
            while load.batches < batches + 1:
                time.sleep(0.1)
        final = llm.deployment.expert_map
        pool_of = pools_of(ray.get(controller.status.remote()))
        assert {pool_of[w] for w in final.workers} == {"cpu-b"}
        assert_consistent(final, experts)
        demand = ray.get(controller.demand.remote())["pools"]
        assert demand["cpu-a"]["workers"] == 0 and demand["cpu-b"]["workers"] == 2
        wait_for(lambda: ray.available_resources().get("cpu_a") == 4, "cpu_a freed")
    assert load.failures == 0, load.errors[:3]
    assert load.mismatches == 0
