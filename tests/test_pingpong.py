"""Two micro-batches in ping-pong (dual-batch overlap), in-process.

The runner splits a step only for an asynchronous expert backend. Here that is the
in-process experts behind a real asynchronous form (each layer's experts run on a worker
thread between ``submit`` and ``wait``), so the model's ping-pong order runs without Ray;
tests/test_distributed.py runs it against the real router and expert workers.
"""

from __future__ import annotations

from collections import Counter
from concurrent.futures import Future, ThreadPoolExecutor

import pytest
import torch
from test_engine_vs_hf import hf_greedy

from elasticmoe import LLM, SamplingParams
from elasticmoe.engine.config import EngineConfig
from elasticmoe.model.gate import GateOutput

from hf_models import FAMILIES, PROMPTS, capture_logits

GREEDY = SamplingParams(max_tokens=32, temperature=0, ignore_eos=True)
# 12 sequences: short prompts of different lengths and PROMPTS (one 40 tokens long)
MIXED = [[i, i + 5, i + 9][: 1 + i % 3] + [i % 7 + 1] * (i % 5) for i in range(1, 9)] + PROMPTS


class ThreadedExperts:
    """An expert backend in the asynchronous form: ``submit`` starts the layer's experts on
    a worker thread and returns, ``wait`` takes their result; counts submits per layer."""

    def __init__(self, inner) -> None:
        self.inner = inner
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="experts")
        self.submits: Counter[int] = Counter()

    def forward(self, layer: int, hidden: torch.Tensor, gate: GateOutput) -> torch.Tensor:
        return self.wait(self.submit(layer, hidden, gate))

    def _run(self, layer: int, hidden: torch.Tensor, gate: GateOutput) -> torch.Tensor:
        with torch.inference_mode():  # thread-local: the model's mode does not reach here
            return self.inner.forward(layer, hidden, gate)

    def submit(self, layer: int, hidden: torch.Tensor, gate: GateOutput) -> Future:
        self.submits[layer] += 1
        return self.pool.submit(self._run, layer, hidden, gate)

    def wait(self, handle: Future) -> torch.Tensor:
        return handle.result()

    def begin_step(self) -> None:
        self.inner.begin_step()

    def end_step(self) -> None:
        self.inner.end_step()


def pingpong_llm(path, **kwargs) -> LLM:
    llm = LLM(str(path), num_kv_blocks=256, block_size=4, micro_batches=2, **kwargs)
    llm.engine.model.experts = ThreadedExperts(llm.engine.model.experts)
    return llm


@pytest.mark.parametrize("family", FAMILIES)
def test_pingpong_equals_one_batch_and_transformers(hf_family_models, family):
    """Same greedy tokens as the one-batch engine and as transformers' uncached forward,
    logits equal up to the kernels' batch-shape rounding, same expert load per layer."""
    path, hf = hf_family_models[family]
    prompts = [{"prompt_token_ids": p} for p in MIXED]
    one = LLM(str(path), num_kv_blocks=256, block_size=4)
    two = pingpong_llm(path, micro_batch_min_seqs=2)
    want_logits, got_logits = capture_logits(one), capture_logits(two)
    want, got = one.generate(prompts, GREEDY), two.generate(prompts, GREEDY)
    moe_layers = two.engine.model_config.moe_layers
    steps = len(want_logits[want[0].request_id])
    # every step had >= 4 sequences: each MoE layer was submitted twice per step
    assert two.engine.model.experts.submits == {layer: 2 * steps for layer in moe_layers}
    for prompt, a, b in zip(MIXED, want, got, strict=True):
        assert b.outputs[0].token_ids == a.outputs[0].token_ids
        assert b.outputs[0].token_ids == hf_greedy(hf, prompt, b.outputs[0].token_ids)
        torch.testing.assert_close(
            torch.stack(got_logits[b.request_id]),
            torch.stack(want_logits[a.request_id]),
            rtol=1e-5,
            atol=1e-5,
        )
    assert (two.engine.load_recorder.total == one.engine.load_recorder.total).all()


def test_pingpong_with_padded_decode_buckets(hf_family_models):
    """Bucket padding rows sit at the end of the second micro-batch and count as no load."""
    path, _ = hf_family_models["qwen2_moe"]
    prompts = [{"prompt_token_ids": p} for p in MIXED[:10]]  # decode 10 -> bucket 16
    params = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
    one = LLM(str(path), num_kv_blocks=256, block_size=4)
    two = pingpong_llm(path, micro_batch_min_seqs=2, decode_buckets=[4, 16])
    want, got = one.generate(prompts, params), two.generate(prompts, params)
    assert [o.outputs[0].token_ids for o in got] == [o.outputs[0].token_ids for o in want]
    assert (two.engine.load_recorder.total == one.engine.load_recorder.total).all()


@pytest.mark.parametrize(
    ("max_num_batched_tokens", "prompt_logprobs"),
    [(1024, None), (24, 1)],
    ids=["shared-prefix-one-step", "chunked-prompt-logprobs"],
)
def test_pingpong_shared_prefix_chunked_prefill_and_prompt_logprobs(
    hf_family_models, max_num_batched_tokens, prompt_logprobs
):
    """Eight prompts with a common 12-token prefix arrive together. In one step, the later
    ones take the first one's prefix blocks from the cache in the step that writes them,
    across the micro-batches (the second reads what the first wrote). Chunked, prefill
    chunks and decodes mix in both halves, and prompt logprobs (which turn prefix hits off)
    add rows after the sampling rows. Tokens equal the one-batch engine's and
    transformers'; prompt logprobs match."""
    path, hf = hf_family_models["qwen3_moe"]
    shared = list(range(100, 112))
    prompts = [shared + [i + 1, 2 * i + 3][: 1 + i % 2] for i in range(8)]
    params = SamplingParams(
        max_tokens=32, temperature=0, ignore_eos=True, prompt_logprobs=prompt_logprobs
    )
    kwargs = {"max_num_batched_tokens": max_num_batched_tokens}
    one = LLM(str(path), num_kv_blocks=256, block_size=4, **kwargs)
    two = pingpong_llm(path, micro_batch_min_seqs=2, **kwargs)
    ids = [{"prompt_token_ids": p} for p in prompts]
    want, got = one.generate(ids, params), two.generate(ids, params)
    if prompt_logprobs is None:
        assert two.engine.kv_manager.stats.hits >= 7 * 12  # the 12-token prefix
    assert max(two.engine.model.experts.submits.values()) > params.max_tokens
    for prompt, a, b in zip(prompts, want, got, strict=True):
        assert b.outputs[0].token_ids == a.outputs[0].token_ids
        assert b.outputs[0].token_ids == hf_greedy(hf, prompt, b.outputs[0].token_ids)
        if prompt_logprobs is not None:
            assert len(b.prompt_logprobs) == len(prompt)
            for x, y in zip(a.prompt_logprobs[1:], b.prompt_logprobs[1:], strict=True):
                assert x.keys() == y.keys()
                assert all(abs(x[t] - y[t]) <= 1e-5 for t in x)


def test_small_steps_and_local_experts_run_one_batch(hf_family_models):
    """Below 2 x micro_batch_min_seqs sequences, with micro_batches=1 (the default), and with
    in-process (synchronous) experts, a step is one batch: one submit per layer and step."""
    path, _ = hf_family_models["mixtral"]
    params = SamplingParams(max_tokens=3, temperature=0, ignore_eos=True)
    prompts = [{"prompt_token_ids": p} for p in MIXED]
    for kwargs in ({"micro_batches": 2, "micro_batch_min_seqs": 7}, {}):
        llm = LLM(str(path), num_kv_blocks=256, block_size=4, **kwargs)
        llm.engine.model.experts = backend = ThreadedExperts(llm.engine.model.experts)
        llm.generate(prompts, params)
        assert set(backend.submits.values()) == {3}, kwargs
    local = LLM(str(path), num_kv_blocks=256, block_size=4, micro_batches=2, micro_batch_min_seqs=1)
    calls: list = []
    forward = local.engine.model.forward
    local.engine.model.forward = lambda *a, **k: calls.append(a[2]) or forward(*a, **k)
    local.generate(prompts, params)
    assert calls and not any(isinstance(meta, list) for meta in calls)


@pytest.mark.parametrize(
    ("field", "value"), [("micro_batches", 3), ("micro_batches", 0), ("micro_batch_min_seqs", 0)]
)
def test_micro_batch_knobs_are_bounded(field, value):
    with pytest.raises(ValueError, match=field):
        EngineConfig(model="unused", **{field: value})
