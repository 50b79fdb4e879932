"""mode="distributed": engines and expert workers on a local Ray instance.

One Ray instance is shared by the module; each test starts and shuts down
its own deployment (actors killed by handle).
"""

from __future__ import annotations

import threading
import time

import pytest
import ray
import torch

from elasticmoe import LLM, SamplingParams
from elasticmoe.engine.config import EngineConfig
from elasticmoe.engine.engine import LLMEngine
from elasticmoe.model.config import load_config
from elasticmoe.router.router import ExpertRouter

from hf_models import FAMILIES, PROMPTS, capture_logits, write_mxfp4_checkpoint

GREEDY = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True)


pytestmark = pytest.mark.usefixtures("ray_instance")


def no_elasticmoe_actors_left(timeout: float = 10.0) -> bool:
    """True once every ExpertWorker/EngineActor of this job is dead (kills are async)."""
    from ray._private.state import actors

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        live = [
            a
            for a in actors().values()
            if a["ActorClassName"] in ("ExpertWorker", "EngineActor") and a["State"] != "DEAD"
        ]
        if not live:
            return True
        time.sleep(0.1)
    return False


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("num_workers", [2, 3])
def test_distributed_greedy_equals_local(hf_family_models, family, num_workers):
    path, _ = hf_family_models[family]
    prompts = [{"prompt_token_ids": p} for p in PROMPTS]
    local = LLM(str(path), num_kv_blocks=128, block_size=4).generate(prompts, GREEDY)
    moe_layer = load_config(path).moe_layers[0]  # deepseek_v3's and glm4_moe's layer 0 is dense
    with LLM(
        str(path),
        mode="distributed",
        num_workers=num_workers,
        progress=False,
        expert_replicas={f"{moe_layer}:0": 2, f"{moe_layer}:5": 2},
        num_kv_blocks=128,
        block_size=4,
    ) as llm:
        m = llm.deployment.expert_map
        assert len(m.replicas_of((moe_layer, 0))) == 2
        assert len({w for ws in m.replicas.values() for w in ws}) == num_workers
        out = llm.generate(prompts, GREEDY)
    for a, b in zip(local, out, strict=True):
        assert b.outputs[0].finish_reason == "length", b.outputs[0].stop_reason
        assert a.outputs[0].token_ids == b.outputs[0].token_ids
    assert no_elasticmoe_actors_left()


def router_llm(path, expert_map, router_config=None, **engine_kw) -> LLM:
    """A local-mode ``LLM`` whose engine reaches its experts through an ExpertRouter on
    ``expert_map`` (the deployment's workers, or workers a test started itself)."""
    engine = LLMEngine(
        EngineConfig(model=str(path), **engine_kw),
        expert_backend=lambda reader, model, dtype, device: ExpertRouter(
            expert_map, dtype, model.config.hidden_size, router_config
        ),
    )
    llm = LLM.__new__(LLM)
    llm.engine, llm.deployment, llm.mode = engine, None, "local"
    llm._tokenizer = engine.tokenizer
    return llm


def start_held_workers(path, num_experts: int, placement: dict, victim: str) -> tuple[dict, dict]:
    """Three fault-injectable ExpertWorker actors serving ``placement``; ``victim`` holds
    back every result (until it is killed). Returns (handles, addresses)."""
    from elasticmoe.experts.worker import ExpertWorker

    handles, addresses = {}, {}
    actor = ExpertWorker.remote_class(num_cpus=0)
    for wid in sorted({w for ws in placement.values() for w in ws}):
        handles[wid] = actor.remote(wid, str(path), num_experts, fault_injection=True)
    for wid, h in handles.items():
        mine = [tuple(x) for x, ws in placement.items() if wid in ws]
        addresses[wid] = ray.get(h.start.remote(mine), timeout=120)["address"]
    ray.get(handles[victim].set_fault.remote(delay_ms=600_000))
    return handles, addresses


def generate_killing(llm: LLM, prompts, params, victim, holds) -> list:
    """``llm.generate`` on a thread; once ``holds()`` (the victim holds frames of the step),
    kill the victim and return the outputs."""
    result: dict = {}
    thread = threading.Thread(
        target=lambda: result.setdefault("out", llm.generate(prompts, params))
    )
    thread.start()
    deadline = time.monotonic() + 120
    while not holds():
        assert time.monotonic() < deadline and thread.is_alive()
        time.sleep(0.02)
    ray.kill(victim)
    thread.join(120)
    assert not thread.is_alive()
    return result["out"]


@pytest.mark.parametrize("family", FAMILIES)
def test_logits_through_workers_allclose_to_local(hf_family_models, family):
    """The same engine, experts over gRPC on worker actors vs in-process."""
    path, _ = hf_family_models[family]
    with LLM(
        str(path), mode="distributed", num_workers=2, replicas_per_expert=2, progress=False
    ) as dist:
        remote = router_llm(path, dist.deployment.expert_map, num_kv_blocks=64, block_size=4)
        engine = remote.engine
        local = LLM(str(path), num_kv_blocks=64, block_size=4)
        got, want = capture_logits(remote), capture_logits(local)
        prompts = [{"prompt_token_ids": p} for p in PROMPTS]
        remote.generate(prompts, GREEDY)
        local.generate(prompts, GREEDY)
        assert engine.model.experts.stats.forward_calls > 0
        for request_id, steps in want.items():
            torch.testing.assert_close(
                torch.stack(got[request_id]), torch.stack(steps), rtol=1e-5, atol=1e-5
            )
        # the asynchronous form: two layers in flight at once, waited for out of order
        router, experts = engine.model.experts, local.engine.model.experts
        layer = engine.model.config.moe_layers[0]
        gate_of = engine.model.model.layers[layer].mlp.route
        xs = [torch.randn(n, engine.model.config.hidden_size) for n in (5, 9)]
        with torch.inference_mode():
            handles = [router.submit(layer, x, gate_of(x)) for x in xs]
            for x, handle in reversed(list(zip(xs, handles, strict=True))):
                want_x = experts.forward(layer, x, gate_of(x))
                torch.testing.assert_close(router.wait(handle), want_x, rtol=1e-5, atol=1e-5)
        router.close()


def test_mxfp4_checkpoint_on_workers_equals_local(hf_family_models, tmp_path):
    """gpt_oss MXFP4 experts, dequantised by each worker for the experts it hosts (and copied
    between workers for the second replicas), give the in-process engine's tokens."""
    dense, _ = hf_family_models["gpt_oss"]
    path = write_mxfp4_checkpoint(dense, tmp_path / "gpt_oss-mxfp4")
    prompts = [{"prompt_token_ids": p} for p in PROMPTS]
    local = LLM(str(path), num_kv_blocks=128, block_size=4).generate(prompts, GREEDY)
    with LLM(
        str(path),
        mode="distributed",
        num_workers=2,
        progress=False,
        expert_replicas={"0:0": 2, "1:3": 2},
        num_kv_blocks=128,
        block_size=4,
    ) as llm:
        out = llm.generate(prompts, GREEDY)
    for a, b in zip(local, out, strict=True):
        assert a.outputs[0].token_ids == b.outputs[0].token_ids
    assert no_elasticmoe_actors_left()


def test_worker_killed_mid_batch_loses_nothing(hf_family_models):
    path, _ = hf_family_models["mixtral"]
    prompts = [{"prompt_token_ids": [i, i + 5, i + 9, i + 11]} for i in range(1, 17)]
    params = SamplingParams(max_tokens=48, temperature=0, ignore_eos=True)
    expected = LLM(str(path), num_kv_blocks=256).generate(prompts, params)
    with LLM(
        str(path),
        mode="distributed",
        num_workers=3,
        replicas_per_expert=2,
        num_kv_blocks=256,
        progress=False,
        router={"probe_down_after_s": 60},
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
        victim = llm.deployment.workers["w1"]
        ray.kill(victim)
        thread.join(120)
        assert not thread.is_alive()
        stats = ray.get(engine.stats.remote())
    out = result["out"]
    assert [o.outputs[0].finish_reason for o in out] == ["length"] * len(prompts)
    assert [o.outputs[0].token_ids for o in out] == [o.outputs[0].token_ids for o in expected]
    # (w1 may already have left the map: the controller replaces dead workers)
    assert stats["failed_calls"] >= 1


def test_expert_without_live_replica_fails_clearly(hf_family_models):
    path, _ = hf_family_models["olmoe"]
    with LLM(
        str(path),
        mode="distributed",
        num_workers=2,
        progress=False,
        router={"expert_wait_timeout_s": 1.0, "probe_down_after_s": 60},
    ) as llm:
        ray.kill(llm.deployment.workers["w0"])
        out = llm.generate([{"prompt_token_ids": [1, 2, 3]}], GREEDY)
        assert out[0].outputs[0].finish_reason == "error"
        assert "no live replica of expert" in out[0].outputs[0].stop_reason
        # the engine keeps serving requests that do not need the lost experts? it
        # cannot here (w0 held half of every layer), but it still answers
        again = llm.generate([{"prompt_token_ids": [4]}], GREEDY)
        assert again[0].finished


def test_bad_deployment_options_name_the_field(hf_family_models):
    path, _ = hf_family_models["mixtral"]
    with pytest.raises(ValueError, match="num_workers"):
        LLM(str(path), mode="distributed", num_workers=0)
    with pytest.raises(ValueError, match="expert_replicas key '9:9'"):
        LLM(str(path), mode="distributed", expert_replicas={"9:9": 2}, progress=False)
    with pytest.raises(ValueError, match=r"must be 1\.\.2"):
        LLM(str(path), mode="distributed", num_workers=2, replicas_per_expert=3, progress=False)
    assert no_elasticmoe_actors_left()


def _usage(path, prompts, params) -> list[set[tuple[int, int]]]:
    """Per prompt, the (layer, expert) pairs its tokens are routed to (run alone, locally)."""
    llm = LLM(str(path), num_kv_blocks=256)
    experts = llm.engine.model.experts
    inner, used = experts.forward, set()

    def recording(layer, hidden, gate):
        used.update((layer, e) for e in gate.indices.flatten().tolist())
        return inner(layer, hidden, gate)

    experts.forward = recording
    out = []
    for prompt in prompts:
        used.clear()
        llm.generate([prompt], params)
        out.append(set(used))
    return out


@pytest.mark.parametrize("transport", ["node", "grpc"])
@pytest.mark.parametrize("rare_replicas", [2, 1], ids=["all-two-replicas", "one-lone-expert"])
def test_worker_killed_mid_step_fails_only_requests_without_a_replica(
    hf_family_models, rare_replicas, transport
):
    """Three real worker actors behind one router; the victim holds a frame of the first
    step (its fault hook keeps the result back) and is killed while the step waits for it.
    Its rows are retried on the other replicas within the step; with ``rare_replicas=1``
    the least-used expert lives only on the victim, and exactly the requests routed to it
    fail, the others finish with the local tokens. Over both transports: the workers' node
    streams (the default on one node) and gRPC ForwardStreams (``node_streams=False``)."""
    from elasticmoe.core.expert_map import ExpertMap
    from elasticmoe.core.experts import LogicalExpert
    from elasticmoe.model.config import load_config
    from elasticmoe.router.router import RouterConfig
    from elasticmoe.router.stream import NodeStream, WorkerStream

    path, _ = hf_family_models["mixtral"]
    mc = load_config(path)
    prompts = [{"prompt_token_ids": [i, i + 5, i + 9, i + 11]} for i in range(1, 17)]
    params = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
    expected = LLM(str(path), num_kv_blocks=256).generate(prompts, params)
    usage = _usage(path, prompts, params)
    experts = [(layer, e) for layer in mc.moe_layers for e in range(mc.num_experts)]
    rare = min(experts, key=lambda x: (sum(x in u for u in usage), x))
    users = {i for i, u in enumerate(usage) if rare in u}
    assert 0 < len(users) < len(prompts)
    ids = ["w0", "w1", "w2"]
    placement = {LogicalExpert(*x): (ids[j % 3], ids[(j + 1) % 3]) for j, x in enumerate(experts)}
    if rare_replicas == 1:
        placement[LogicalExpert(*rare)] = ("w1",)
    else:
        assert "w1" in placement[LogicalExpert(*rare)]
    handles, addresses = start_held_workers(path, len(experts), placement, "w1")
    try:
        victim = handles["w1"]
        config = RouterConfig(
            expert_wait_timeout_s=0, probe_down_after_s=600, node_streams=transport == "node"
        )
        remote = router_llm(path, ExpertMap(1, placement, addresses), config, num_kv_blocks=256)
        # the condition: the victim has computed a frame (its result is being held)
        out = generate_killing(
            remote,
            prompts,
            params,
            victim,
            lambda: ray.get(victim.info.remote())["forward_calls"] > 0,
        )
        router = remote.engine.model.experts
        assert router.stats.failed_calls >= 1 and router.stats.retried_rows >= 1
        kind = NodeStream if transport == "node" else WorkerStream
        assert {type(s) for s in router._streams.values()} == {kind}
        router.close()
    finally:
        for h in handles.values():
            ray.kill(h)
    failed = {i for i, o in enumerate(out) if o.outputs[0].finish_reason == "error"}
    assert failed == (users if rare_replicas == 1 else set())
    for i, (got, want) in enumerate(zip(out, expected, strict=True)):
        if i in failed:
            assert "no live replica of expert" in got.outputs[0].stop_reason
            assert str(LogicalExpert(*rare)) in got.outputs[0].stop_reason
        else:
            assert got.outputs[0].finish_reason == "length"
            assert got.outputs[0].token_ids == want.outputs[0].token_ids, i


# --- two micro-batches in ping-pong (the runner splits steps for the router) ---------------

PINGPONG_PROMPTS = [[i, i + 5, i + 9, i + 11][: 1 + i % 4] for i in range(1, 13)] + PROMPTS


def test_pingpong_through_workers_equals_local_and_transformers(hf_family_models):
    """qwen2_moe (a shared expert computed while the routed ones are away, a dense layer),
    16 sequences in 2 micro-batches of 8 (micro_batch_min_seqs' default): the engine
    actor's tokens are the local engine's and transformers' (uncached forward); an engine on
    the same workers submits each MoE layer twice per step, its logits close to the local
    ones."""
    from test_engine_vs_hf import GREEDY as GREEDY_32
    from test_engine_vs_hf import hf_greedy

    path, hf = hf_family_models["qwen2_moe"]
    prompts = [{"prompt_token_ids": p} for p in PINGPONG_PROMPTS]
    local = LLM(str(path), num_kv_blocks=256, block_size=4)
    want_logits = capture_logits(local)
    want = local.generate(prompts, GREEDY_32)
    with LLM(str(path), mode="distributed", num_workers=2, micro_batches=2, progress=False) as dist:
        deployment = dist.deployment
        actor = deployment.engines[0]
        before = ray.get(actor.stats.remote())["dispatch_calls"]
        got = dist.generate(prompts, GREEDY_32)
        after = ray.get(actor.stats.remote())["dispatch_calls"]
        # the engine actor ran every step in two micro-batches
        assert {k: after[k] - before.get(k, 0) for k in after} == {
            layer: 2 * GREEDY_32.max_tokens for layer in load_config(path).moe_layers
        }
        remote = router_llm(
            path, deployment.expert_map, num_kv_blocks=256, block_size=4, micro_batches=2
        )
        engine = remote.engine
        got_logits = capture_logits(remote)
        again = remote.generate(prompts, GREEDY_32)
        router = engine.model.experts
        router.close()
    steps = GREEDY_32.max_tokens  # every step has all 16 sequences
    moe_layers = engine.model_config.moe_layers
    assert router.stats.layer_calls == {layer: 2 * steps for layer in moe_layers}
    for prompt, a, b, c in zip(PINGPONG_PROMPTS, want, got, again, strict=True):
        assert b.outputs[0].token_ids == a.outputs[0].token_ids == c.outputs[0].token_ids
        assert b.outputs[0].token_ids == hf_greedy(hf, prompt, b.outputs[0].token_ids)
        torch.testing.assert_close(
            torch.stack(got_logits[c.request_id]),
            torch.stack(want_logits[a.request_id]),
            rtol=1e-5,
            atol=1e-5,
        )
    assert no_elasticmoe_actors_left()


def test_pingpong_worker_killed_mid_step_fails_the_right_requests(hf_family_models):
    """Both micro-batches' frames are held by the victim when it is killed: both are retried
    on other replicas within the step, and the rows of the one expert that lived only on the
    victim, in either micro-batch, fail exactly the requests routed to it (the second
    micro-batch's rows are mapped back by its first token, not taken as the first's)."""
    from elasticmoe.core.expert_map import ExpertMap
    from elasticmoe.core.experts import LogicalExpert
    from elasticmoe.router.router import RouterConfig

    path, _ = hf_family_models["mixtral"]
    mc = load_config(path)
    prompts = [{"prompt_token_ids": [i, i + 5, i + 9, i + 11]} for i in range(1, 17)]
    params = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
    expected = LLM(str(path), num_kv_blocks=256).generate(prompts, params)
    usage = _usage(path, prompts, params)
    # the first step's (the prefill's) experts: that step runs all 16 in two micro-batches
    first_step = _usage(path, prompts, SamplingParams(max_tokens=1, temperature=0))
    experts = [(layer, e) for layer in mc.moe_layers for e in range(mc.num_experts)]

    def users_of(x, of=usage):
        return {i for i, u in enumerate(of) if x in u}

    # the least-used expert that a request of the second micro-batch (8..15) needs in the
    # first step: its rows there are lost as rows of that micro-batch
    rare = min(
        (
            x
            for x in experts
            if len(users_of(x)) < len(prompts) and max(users_of(x, first_step), default=0) >= 8
        ),
        key=lambda x: (len(users_of(x)), x),
    )
    users = users_of(rare)
    ids = ["w0", "w1", "w2"]
    placement = {LogicalExpert(*x): (ids[j % 3], ids[(j + 1) % 3]) for j, x in enumerate(experts)}
    placement[LogicalExpert(*rare)] = ("w1",)
    handles, addresses = start_held_workers(path, len(experts), placement, "w1")
    try:
        config = RouterConfig(expert_wait_timeout_s=0, probe_down_after_s=600)
        remote = router_llm(
            path, ExpertMap(1, placement, addresses), config, num_kv_blocks=256, micro_batches=2
        )
        router = remote.engine.model.experts
        # the condition: the victim holds both micro-batches' frames of the first layer
        # (A's held at the worker, B's queued behind it on the same stream)
        out = generate_killing(
            remote, prompts, params, handles["w1"], lambda: router.frames_in_flight("w1") >= 2
        )
        assert router.stats.failed_calls >= 2 and router.stats.retried_rows >= 1
        # the first step (16 sequences) ran in two micro-batches
        assert router.stats.layer_calls[mc.moe_layers[0]] > params.max_tokens
        router.close()
    finally:
        for h in handles.values():
            ray.kill(h)
    failed = {i for i, o in enumerate(out) if o.outputs[0].finish_reason == "error"}
    assert failed == users
    for i, (got, want) in enumerate(zip(out, expected, strict=True)):
        if i in failed:
            assert str(LogicalExpert(*rare)) in got.outputs[0].stop_reason
            if i in users_of(rare, first_step):  # failed in the first step, not later
                assert got.outputs[0].token_ids == [], i
        else:
            assert got.outputs[0].finish_reason == "length"
            assert got.outputs[0].token_ids == want.outputs[0].token_ids, i
