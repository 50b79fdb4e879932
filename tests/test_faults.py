"""Fault injection on worker gRPC servers: slow workers are avoided, failing ones
are retried elsewhere, outputs stay identical."""

from __future__ import annotations

import pytest
import ray

from elasticmoe import LLM, SamplingParams
from elasticmoe.model.init_model import init_model
from elasticmoe.router.router import WorkerLatency

PARAMS = SamplingParams(max_tokens=10, temperature=0, ignore_eos=True)
PROMPTS = [{"prompt_token_ids": [i, i + 4, i + 9]} for i in range(1, 7)]


pytestmark = pytest.mark.usefixtures("ray_instance")


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return init_model("olmoe", "tiny", tmp_path_factory.mktemp("m") / "ckpt")


def test_worker_latency_costs():
    lat = WorkerLatency(slow_factor=3.0)
    for _ in range(5):
        lat.observe("a", 0.002)
        lat.observe("b", 0.002)
        lat.observe("c", 0.200)
    costs = lat.costs()
    assert set(costs) == {"c"} and costs["c"] > 10
    assert lat.slow_workers() == ["c"]
    two = WorkerLatency(slow_factor=3.0)  # with two workers, compare against the faster
    two.observe("fast", 0.002)
    two.observe("slow", 0.150)
    assert two.slow_workers() == ["slow"]


def test_slow_worker_is_detected_and_avoided(ckpt):
    expected = LLM(str(ckpt)).generate(PROMPTS, PARAMS)
    with LLM(
        str(ckpt),
        mode="distributed",
        num_workers=2,
        replicas_per_expert=2,
        fault_injection=True,
        name="slow",
        progress=False,
    ) as llm:
        workers = llm.deployment.workers
        ray.get(workers["w0"].set_fault.remote(delay_ms=150))
        before = {w: ray.get(h.info.remote())["rows_served"] for w, h in workers.items()}
        out = llm.generate(PROMPTS, PARAMS)
        out += llm.generate(PROMPTS, PARAMS)
        after = {w: ray.get(h.info.remote())["rows_served"] for w, h in workers.items()}
        stats = llm.deployment.engine_stats()[0]
    assert [o.outputs[0].token_ids for o in out] == [o.outputs[0].token_ids for o in expected] * 2
    assert stats["slow_workers"] == ["w0"]
    assert after["w1"] - before["w1"] > 5 * (after["w0"] - before["w0"])


def test_failing_worker_calls_are_retried_on_the_other_replica(ckpt):
    expected = LLM(str(ckpt)).generate(PROMPTS, PARAMS)
    with LLM(
        str(ckpt),
        mode="distributed",
        num_workers=2,
        replicas_per_expert=2,
        fault_injection=True,
        name="failing",
        progress=False,
        router={"probe_down_after_s": 0.2},
    ) as llm:
        # Every Forward to w1 fails, so its first call fails for certain (with a rate
        # below 1 a loaded machine can make w1 "slow" before any call fails: no retry).
        ray.get(llm.deployment.workers["w1"].set_fault.remote(fail_rate=1.0))
        out = llm.generate(PROMPTS, PARAMS)
        stats = llm.deployment.engine_stats()[0]
    assert [o.outputs[0].finish_reason for o in out] == ["length"] * len(PROMPTS)
    assert [o.outputs[0].token_ids for o in out] == [o.outputs[0].token_ids for o in expected]
    assert stats["failed_calls"] >= 1


def test_set_fault_requires_fault_injection(ckpt):
    llm = LLM(str(ckpt), mode="distributed", num_workers=2, name="nofault", progress=False)
    try:
        with pytest.raises(RuntimeError, match="without fault_injection"):
            ray.get(llm.deployment.workers["w0"].set_fault.remote(delay_ms=10))
    finally:
        llm.shutdown()


def test_engine_killed_mid_batch_requests_rerun_elsewhere(ckpt):
    import threading
    import time

    prompts = [{"prompt_token_ids": [i, i + 2, i + 7]} for i in range(1, 9)]
    params = SamplingParams(max_tokens=40, temperature=0, ignore_eos=True)
    expected = LLM(str(ckpt)).generate(prompts, params)
    with LLM(
        str(ckpt),
        mode="distributed",
        num_workers=2,
        num_engines=2,
        name="enginekill",
        progress=False,
    ) as llm:
        result: dict = {}
        thread = threading.Thread(
            target=lambda: result.setdefault("out", llm.generate(prompts, params))
        )
        thread.start()
        engine = llm.deployment.engines[0]
        deadline = time.monotonic() + 60
        while ray.get(engine.stats.remote())["num_running"] == 0 and time.monotonic() < deadline:
            time.sleep(0.05)
        ray.kill(engine, no_restart=False)  # Ray restarts it; its requests rerun elsewhere
        thread.join(180)
        assert not thread.is_alive()
        # the restarted engine serves again, on the current expert map
        again = llm.generate(prompts[:2], params)
    out = result["out"]
    assert [o.outputs[0].token_ids for o in out] == [o.outputs[0].token_ids for o in expected]
    assert [o.outputs[0].token_ids for o in again] == [o.outputs[0].token_ids for o in expected[:2]]


def test_replay_skips_delivered_tokens_and_rejects_a_different_rerun():
    from elasticmoe.engine.request import (
        CompletionOutput,
        Replay,
        ReplayDivergedError,
        RequestOutput,
    )

    def out(ids, finished=False):
        return RequestOutput("r", None, [1], [CompletionOutput(0, "", list(ids))], finished)

    replay = Replay(SamplingParams(max_tokens=4, temperature=0))
    assert replay.can_resume()
    assert replay.accept(out([5])) and replay.accept(out([5, 6]))
    # the engine died; the rerun repeats 5, 6 (skipped), then goes on
    assert not replay.accept(out([5])) and not replay.accept(out([5, 6]))
    assert replay.accept(out([5, 6, 7]))
    with pytest.raises(ReplayDivergedError, match="different tokens after 3"):
        replay.accept(out([5, 9]))
    sampled = Replay(SamplingParams(max_tokens=4, temperature=1.0))
    assert sampled.can_resume()  # nothing delivered yet
    sampled.accept(out([3]))
    assert not sampled.can_resume()  # an unseeded rerun would not repeat [3]
    seeded = Replay(SamplingParams(max_tokens=4, temperature=1.0, seed=7))
    seeded.accept(out([3]))
    assert seeded.can_resume()


def test_demand_drain_and_adoption_after_a_controller_restart(ckpt):
    """The operator's hooks, and a controller restart with the in-memory store."""
    import time

    from elasticmoe.control.controller import ControllerError

    expected = LLM(str(ckpt)).generate(PROMPTS, PARAMS)
    with LLM(
        str(ckpt),
        mode="distributed",
        num_workers=3,
        replicas_per_expert=2,
        name="drain",
        progress=False,
    ) as llm:
        controller = llm.deployment.controller
        demand = ray.get(controller.demand.remote())
        assert demand["pools"] == {"default": {"workers": 3, "desired": 3}}
        assert {w["worker_id"] for w in demand["workers"]} == {"w0", "w1", "w2"}
        assert all(w["node"] and w["node_id"] for w in demand["workers"])
        assert ray.get(controller.redundancy.remote(True))["full"]

        drained = ray.get(controller.drain.remote(["w0"], []))
        assert drained["drained"] == ["w0"]
        m = llm.deployment.expert_map
        assert "w0" not in m.workers and all(m.replicas_of(e) for e in m.replicas)
        with pytest.raises(ControllerError, match="would leave no worker"):
            ray.get(controller.drain.remote([], [demand["workers"][0]["node_id"]]))
        with pytest.raises(ControllerError, match="no worker"):
            ray.get(controller.drain.remote(["w9"], []))

        epoch = m.epoch
        old = ray.get(controller.instance_id.remote())
        ray.kill(controller, no_restart=False)  # the in-memory store dies with it
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                if ray.get(controller.instance_id.remote(), timeout=10) != old:
                    break
            except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError):
                time.sleep(0.2)
        status = ray.get(controller.status.remote())
        kinds = [h["kind"] for h in status["history"]]
        # adopted from the engine's map (epoch `epoch`), not a new bootstrap at epoch 1; on a
        # loaded machine the health loop may have made changes of its own since
        assert "adopt" in kinds and status["epoch"] >= epoch, (status["epoch"], kinds)
        ids = sorted(w["worker_id"] for w in status["workers"])
        assert "w0" not in ids and (ids == ["w1", "w2"] or kinds[-1] != "adopt"), (ids, kinds)
        ray.get(controller.add_worker.remote(1))  # changes work again
        assert len(llm.deployment.expert_map.workers) == 3
        out = llm.generate(PROMPTS, PARAMS)
    assert [o.outputs[0].token_ids for o in out] == [o.outputs[0].token_ids for o in expected]
