"""The background engine loop: concurrent callers, streaming, abort, shutdown."""

from __future__ import annotations

import threading

import pytest

from elasticmoe import LLM, SamplingParams
from elasticmoe.engine.loop import EngineLoop, EngineStoppedError
from elasticmoe.model.init_model import init_model


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return init_model("mixtral", "tiny", tmp_path_factory.mktemp("m") / "ckpt")


GREEDY = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)


def test_concurrent_callers_get_the_same_as_generate(ckpt):
    prompts = [{"prompt_token_ids": [i, i + 1, i + 2]} for i in range(1, 9)]
    expected = [o.outputs[0].token_ids for o in LLM(str(ckpt)).generate(prompts, GREEDY)]
    loop = EngineLoop(LLM(str(ckpt)).engine).start()
    results: dict[int, list[int]] = {}

    def call(i: int) -> None:
        results[i] = loop.generate(prompts[i], GREEDY).outputs[0].token_ids

    threads = [threading.Thread(target=call, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    loop.stop()
    assert [results[i] for i in range(len(prompts))] == expected


def test_stream_yields_growing_outputs_and_abort(ckpt):
    loop = EngineLoop(LLM(str(ckpt)).engine).start()
    seen = [len(o.outputs[0].token_ids) for o in loop.stream({"prompt_token_ids": [1, 2]}, GREEDY)]
    assert seen == list(range(1, 13))
    # a consumer that stops reading aborts its request
    gen = loop.stream({"prompt_token_ids": [3, 4]}, SamplingParams(max_tokens=500, ignore_eos=True))
    next(gen)
    gen.close()
    assert loop.wait_idle(10)
    loop.stop()


def test_stop_fails_in_flight_requests_explicitly(ckpt):
    loop = EngineLoop(LLM(str(ckpt)).engine).start()
    _, sink = loop.submit(
        {"prompt_token_ids": [5]}, SamplingParams(max_tokens=1000, ignore_eos=True)
    )
    q = sink.queue
    loop.stop(drain=False)
    items = []
    while not q.empty():
        items.append(q.get())
    assert isinstance(items[-1], EngineStoppedError)
    with pytest.raises(EngineStoppedError):
        loop.submit({"prompt_token_ids": [5]})
    assert not loop.engine.has_unfinished_requests()


def test_bad_request_raises_and_loop_keeps_serving(ckpt):
    loop = EngineLoop(LLM(str(ckpt)).engine).start()
    with pytest.raises(ValueError, match="outside"):
        loop.submit({"prompt_token_ids": [10**9]})
    assert loop.generate({"prompt_token_ids": [1]}, GREEDY).finished
    loop.stop()
