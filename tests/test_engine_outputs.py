"""What the engine hands a server per step: deltas, incremental text, stop strings on new
text, min_tokens, prompt logprobs and prefix-cache hits."""

from __future__ import annotations

import math
import threading

import pytest

from elasticmoe import LLM, SamplingParams
from elasticmoe.engine.loop import EngineLoop
from elasticmoe.engine.request import OutputAccumulator
from elasticmoe.model.init_model import init_model


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return init_model("mixtral", "tiny", tmp_path_factory.mktemp("m") / "ckpt")


@pytest.fixture(scope="module")
def llm(ckpt):
    return LLM(str(ckpt))


GREEDY = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True)


def run_deltas(engine, prompts, params):
    """Step until done; per request, the list of its deltas."""
    ids = [engine.add_request(p, params) for p in prompts]
    got = {i: [] for i in ids}
    while engine.has_unfinished_requests():
        for d in engine.step_deltas():
            got[d.request_id].append(d)
    return [got[i] for i in ids]


def test_deltas_add_up_to_generate(llm):
    prompts = [{"prompt_token_ids": [i, i + 3, i + 5]} for i in range(1, 7)]
    want = llm.generate(prompts, GREEDY)
    for deltas, w in zip(run_deltas(llm.engine, prompts, GREEDY), want, strict=True):
        assert all(len(d.token_ids) == 1 for d in deltas)  # one new token per step
        assert [t for d in deltas for t in d.token_ids] == w.outputs[0].token_ids
        assert "".join(d.text for d in deltas) == w.outputs[0].text
        assert w.outputs[0].text == llm.tokenizer.decode(w.outputs[0].token_ids)
        assert [d.finished for d in deltas] == [False] * (len(deltas) - 1) + [True]
        assert deltas[-1].finish_reason == "length"


def test_stop_string_across_tokens_cuts_text_and_is_never_streamed(llm):
    prompt = {"prompt_token_ids": [11, 12, 13]}
    full = llm.generate([prompt], SamplingParams(max_tokens=40, temperature=0, ignore_eos=True))
    text = full[0].outputs[0].text
    pieces = [llm.tokenizer.decode([t]) for t in full[0].outputs[0].token_ids]
    # a stop string that begins inside one token and ends inside a later one
    start = len(pieces[0]) + len(pieces[1]) - 1
    stop = text[start : start + len(pieces[2]) + 2]
    assert len(stop) >= 3 and text.find(stop) == start
    params = SamplingParams(max_tokens=40, temperature=0, ignore_eos=True, stop=[stop, "zzzzzz"])
    (deltas,) = run_deltas(llm.engine, [prompt], params)
    streamed = "".join(d.text for d in deltas)
    assert streamed == text[:start]
    assert deltas[-1].finish_reason == "stop" and deltas[-1].stop_reason == stop
    keep = params.model_copy(update={"include_stop_str_in_output": True})
    out = llm.generate([prompt], keep)[0].outputs[0]
    assert out.text == text[: start + len(stop)]


def test_min_tokens_blocks_stop_tokens_on_the_logits(llm):
    prompt = {"prompt_token_ids": [21, 22, 23]}
    free = llm.generate([prompt], SamplingParams(max_tokens=8, temperature=0))[0].outputs[0]
    first = free.token_ids[0]
    stopped = llm.generate(
        [prompt], SamplingParams(max_tokens=8, temperature=0, stop_token_ids=[first])
    )[0].outputs[0]
    assert stopped.token_ids == [first] and stopped.finish_reason == "stop"
    held = llm.generate(
        [prompt],
        SamplingParams(max_tokens=8, temperature=0, stop_token_ids=[first], min_tokens=4),
    )[0].outputs[0]
    # the blocked token is never sampled before min_tokens; generation goes on past it
    assert first not in held.token_ids[:4] and len(held.token_ids) >= 4
    with pytest.raises(ValueError, match="min_tokens"):
        SamplingParams(max_tokens=2, min_tokens=3)


def test_prompt_logprobs_equal_the_engines_own_decode_logprobs(llm):
    prompt = [31, 32, 33, 34]
    gen = llm.generate(
        [{"prompt_token_ids": prompt}],
        SamplingParams(max_tokens=6, temperature=0, ignore_eos=True, logprobs=0),
    )[0].outputs[0]
    full = prompt + gen.token_ids
    scored = llm.generate(
        [{"prompt_token_ids": full}],
        SamplingParams(max_tokens=1, temperature=0, prompt_logprobs=2),
    )[0]
    plp = scored.prompt_logprobs
    assert len(plp) == len(full) and plp[0] is None
    for pos, tok in enumerate(full[1:], start=1):
        assert tok in plp[pos] and len(plp[pos]) <= 3
        assert max(plp[pos].values()) <= 0.0
    # the continuation's logprobs, scored as a prompt, are the ones decoding gave
    for j, tok in enumerate(gen.token_ids):
        assert math.isclose(plp[len(prompt) + j][tok], gen.logprobs[j][tok], abs_tol=1e-4)
        # greedy: the decoded token is the top-1 of its position
        assert plp[len(prompt) + j][tok] == max(plp[len(prompt) + j].values())


def test_prompt_logprobs_survive_chunked_prefill_and_a_warm_prefix_cache(ckpt):
    small = LLM(str(ckpt), max_num_batched_tokens=8, block_size=4)
    prompt = list(range(40, 70))
    params = SamplingParams(max_tokens=1, temperature=0, prompt_logprobs=0)
    small.generate([{"prompt_token_ids": prompt}], GREEDY)  # warms the prefix cache
    chunked = small.generate([{"prompt_token_ids": prompt}], params)[0].prompt_logprobs
    whole = LLM(str(ckpt)).generate([{"prompt_token_ids": prompt}], params)[0].prompt_logprobs
    assert chunked[0] is None and all(e is not None for e in chunked[1:])
    for a, b in zip(chunked[1:], whole[1:], strict=True):
        ((ta, va),) = a.items()
        ((tb, vb),) = b.items()
        assert ta == tb and math.isclose(va, vb, abs_tol=1e-4)


def test_cached_tokens_count_prefix_cache_hits(ckpt):
    llm = LLM(str(ckpt), block_size=4)
    prompt = {"prompt_token_ids": list(range(80, 91))}  # 11 tokens: 2 full blocks reusable
    first = llm.generate([prompt], GREEDY)[0]
    second = llm.generate([prompt], GREEDY)[0]
    assert first.num_cached_tokens == 0 and second.num_cached_tokens == 8
    assert second.outputs[0].token_ids == first.outputs[0].token_ids


def test_loop_batches_one_message_per_step_for_all_of_a_sinks_requests(llm):
    """A shared sink (what an engine actor's subscriber is) gets one list per step."""
    loop = EngineLoop(llm.engine).start()

    class Recorder:
        def __init__(self) -> None:
            self.batches: list[list] = []
            self.done = threading.Event()
            self.left = 8

        def put(self, deltas) -> None:
            self.batches.append(deltas)
            self.left -= sum(d.finished for d in deltas)
            if self.left == 0:
                self.done.set()

        def fail(self, request_id, error) -> None:
            raise AssertionError(f"{request_id}: {error}")

    sink = Recorder()
    prompts = [{"prompt_token_ids": [i, i + 1]} for i in range(1, 9)]
    want = llm.generate(prompts, GREEDY)
    ids = [loop.submit(p, GREEDY, f"r{i}", sink)[0] for i, p in enumerate(prompts)]
    assert sink.done.wait(120)
    loop.stop()
    accs = {i: OutputAccumulator(i, [], 1) for i in ids}
    for batch in sink.batches:
        assert len({d.request_id for d in batch}) == len(batch)  # one delta per request
        for d in batch:
            accs[d.request_id].add(d)
    assert len(sink.batches) < 8 * GREEDY.max_tokens  # batched, not one per token
    for i, w in zip(ids, want, strict=True):
        assert accs[i].output.outputs[0].token_ids == w.outputs[0].token_ids
        assert accs[i].output.outputs[0].text == w.outputs[0].text


def test_replay_trim_cuts_what_a_rerun_repeats_and_coalesce_merges_deltas():
    from elasticmoe.engine.request import CompletionDelta, Replay, ReplayDivergedError
    from elasticmoe.serve.app import _coalesce

    def d(ids, text, finish=None):
        return CompletionDelta("r", 0, list(ids), text, finish_reason=finish, finished=bool(finish))

    replay = Replay(SamplingParams(max_tokens=4, temperature=0))
    pos = [0, 0]
    assert replay.trim(d([5], "a"), pos) and replay.trim(d([6], "bc"), pos)
    assert pos == [2, 3]
    # the engine died; the rerun repeats 5, 6 (cut off, tokens and text), then goes on
    pos = [0, 0]
    assert not replay.trim(d([5], "a"), pos)
    again = d([6, 7], "bcd")
    assert replay.trim(again, pos)
    assert again.token_ids == [7] and again.text == "d"
    with pytest.raises(ReplayDivergedError, match="different tokens"):
        replay.trim(d([9], "x"), [1, 1])

    merged = _coalesce([d([1], "x"), d([2], "y"), d([3], "z", "length")])
    assert len(merged) == 1
    assert merged[0].token_ids == [1, 2, 3] and merged[0].text == "xyz"
    assert merged[0].finish_reason == "length" and merged[0].finished
    err = RuntimeError("engine died")
    assert [type(x) for x in _coalesce([d([1], "x"), err, d([2], "y")])] == [
        CompletionDelta,
        RuntimeError,
        CompletionDelta,
    ]
