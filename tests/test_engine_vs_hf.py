"""The local engine against Hugging Face transformers on the same random weights."""

from __future__ import annotations

import pytest
import torch

from elasticmoe import LLM, SamplingParams

from hf_models import FAMILIES, PROMPTS, capture_logits

GREEDY = SamplingParams(max_tokens=32, temperature=0, ignore_eos=True)


def hf_greedy(hf_model, prompt: list[int], tokens: list[int]) -> list[int]:
    """transformers' greedy choice after prompt + each prefix of ``tokens``, teacher-forced
    from one uncached full forward (its cached ``generate`` can disagree with its own
    forward). Equal to ``tokens`` exactly when transformers' greedy decoding would have
    produced them."""
    assert len(tokens) == GREEDY.max_tokens
    with torch.no_grad():
        logits = hf_model(torch.tensor([prompt + tokens]), use_cache=False).logits[0]
    return logits[len(prompt) - 1 : len(prompt) - 1 + len(tokens)].argmax(-1).tolist()


@pytest.mark.parametrize("family", FAMILIES)
def test_prefill_and_decode_logits_match(hf_family_models, family):
    path, hf = hf_family_models[family]
    llm = LLM(str(path), num_kv_blocks=64, block_size=4)
    captured = capture_logits(llm)
    outs = llm.generate([{"prompt_token_ids": p} for p in PROMPTS], GREEDY)
    for prompt, out in zip(PROMPTS, outs, strict=True):
        steps = captured[out.request_id]
        assert len(steps) == GREEDY.max_tokens
        full = prompt + out.outputs[0].token_ids
        with torch.no_grad():
            ref = hf(torch.tensor([full])).logits[0].float()
        # step s predicts the token at position len(prompt) + s
        expected = ref[len(prompt) - 1 : len(prompt) - 1 + len(steps)]
        diff = (torch.stack(steps) - expected).abs().max().item()
        assert diff <= 1e-4, f"{family}: max |logit diff| {diff}"


@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_batch_matches_transformers(hf_family_models, family):
    path, hf = hf_family_models[family]
    llm = LLM(str(path), num_kv_blocks=128, block_size=4)
    outs = llm.generate([{"prompt_token_ids": p} for p in PROMPTS], GREEDY)
    for prompt, out in zip(PROMPTS, outs, strict=True):
        tokens = out.outputs[0].token_ids
        assert tokens == hf_greedy(hf, prompt, tokens)


@pytest.mark.parametrize("family", FAMILIES)
def test_chunked_prefill_matches(hf_family_models, family):
    """A 16-token budget splits the 40-token prompt into chunks."""
    path, hf = hf_family_models[family]
    llm = LLM(str(path), num_kv_blocks=128, block_size=4, max_num_batched_tokens=16)
    outs = llm.generate([{"prompt_token_ids": p} for p in PROMPTS], GREEDY)
    for prompt, out in zip(PROMPTS, outs, strict=True):
        tokens = out.outputs[0].token_ids
        assert tokens == hf_greedy(hf, prompt, tokens)


@pytest.mark.parametrize("family", FAMILIES)
def test_prefix_cache_sharing_matches(hf_family_models, family):
    path, hf = hf_family_models[family]
    llm = LLM(str(path), num_kv_blocks=128, block_size=4)
    shared = list(range(60, 90))
    prompts = [shared + [1, 2, 3], shared + [4, 5], shared + [6, 7, 8, 9, 10]]
    first = llm.generate([{"prompt_token_ids": prompts[0]}], GREEDY)
    rest = llm.generate([{"prompt_token_ids": p} for p in prompts[1:]], GREEDY)
    stats = llm.engine.kv_manager.stats
    assert stats.hits >= 2 * 28, "the shared 30-token prefix should come from the cache"
    for prompt, out in zip(prompts, first + rest, strict=True):
        tokens = out.outputs[0].token_ids
        assert tokens == hf_greedy(hf, prompt, tokens)


@pytest.mark.parametrize("family", FAMILIES)
def test_preemption_matches(hf_family_models, family):
    """A pool too small for the batch forces recompute mid-generation."""
    path, hf = hf_family_models[family]
    llm = LLM(str(path), num_kv_blocks=24, block_size=4)
    outs = llm.generate([{"prompt_token_ids": p} for p in PROMPTS], GREEDY)
    assert llm.engine.scheduler.num_preemptions > 0
    for prompt, out in zip(PROMPTS, outs, strict=True):
        tokens = out.outputs[0].token_ids
        assert tokens == hf_greedy(hf, prompt, tokens)


def test_preemption_without_prefix_cache(hf_family_models):
    path, hf = hf_family_models["mixtral"]
    llm = LLM(str(path), num_kv_blocks=24, block_size=4, enable_prefix_caching=False)
    outs = llm.generate([{"prompt_token_ids": p} for p in PROMPTS], GREEDY)
    assert llm.engine.scheduler.num_preemptions > 0
    for prompt, out in zip(PROMPTS, outs, strict=True):
        tokens = out.outputs[0].token_ids
        assert tokens == hf_greedy(hf, prompt, tokens)


@pytest.mark.parametrize("family", FAMILIES)
def test_bfloat16_runs_close_to_fp32(hf_family_models, family):
    path, _ = hf_family_models[family]
    fp32 = LLM(str(path), dtype="float32", num_kv_blocks=64)
    bf16 = LLM(str(path), dtype="bfloat16", num_kv_blocks=64)
    assert all(t.dtype == torch.bfloat16 for t in bf16.engine.kv_cache.layers[0])
    logits32, logits16 = capture_logits(fp32), capture_logits(bf16)
    params = SamplingParams(max_tokens=1, temperature=0)
    prompt = {"prompt_token_ids": PROMPTS[2]}
    fp32.generate([prompt], params)
    bf16.generate([prompt], params)
    a = next(iter(logits32.values()))[0]
    b = next(iter(logits16.values()))[0]
    assert torch.nn.functional.cosine_similarity(a, b, dim=0) > 0.99
