"""The public LLM / SamplingParams API: sampling options, stops and bad input."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pydantic
import pytest

from elasticmoe import LLM, SamplingParams
from elasticmoe.engine.engine import EngineGenerateError
from elasticmoe.model.init_model import init_model


@pytest.fixture(scope="module")
def llm(tmp_path_factory):
    path = init_model("qwen3_moe", "tiny", tmp_path_factory.mktemp("m") / "ckpt")
    return LLM(str(path), num_kv_blocks=256)


PROMPT = {"prompt_token_ids": [10, 20, 30, 40]}


def test_text_prompt_and_output_text(llm):
    out = llm.generate("def main():", SamplingParams(max_tokens=6, temperature=0, ignore_eos=True))
    assert out[0].prompt == "def main():"
    assert out[0].prompt_token_ids == llm.tokenizer.encode("def main():")
    assert out[0].outputs[0].text == llm.tokenizer.decode(out[0].outputs[0].token_ids)
    assert out[0].outputs[0].finish_reason == "length"


def test_seeded_sampling_is_reproducible_and_batch_independent(llm):
    params = SamplingParams(max_tokens=12, temperature=1.0, seed=1234, ignore_eos=True)
    alone = llm.generate(PROMPT, params)[0].outputs[0].token_ids
    other = SamplingParams(max_tokens=12, temperature=0.7, seed=99, ignore_eos=True)
    batched = llm.generate([{"prompt_token_ids": [5, 6]}, PROMPT], [other, params])
    assert batched[1].outputs[0].token_ids == alone
    different = llm.generate(PROMPT, params.model_copy(update={"seed": 4321}))
    assert different[0].outputs[0].token_ids != alone


def test_top_k_one_is_greedy(llm):
    greedy = llm.generate(PROMPT, SamplingParams(max_tokens=10, temperature=0, ignore_eos=True))
    topk1 = llm.generate(
        PROMPT, SamplingParams(max_tokens=10, temperature=1.5, top_k=1, ignore_eos=True)
    )
    tiny_p = llm.generate(
        PROMPT, SamplingParams(max_tokens=10, temperature=1.5, top_p=1e-6, ignore_eos=True)
    )
    assert greedy[0].outputs[0].token_ids == topk1[0].outputs[0].token_ids
    assert greedy[0].outputs[0].token_ids == tiny_p[0].outputs[0].token_ids


def test_stop_token_ids_and_stop_strings(llm):
    greedy = llm.generate(PROMPT, SamplingParams(max_tokens=16, temperature=0, ignore_eos=True))
    ids = greedy[0].outputs[0].token_ids
    stop_id = ids[5]
    out = llm.generate(
        PROMPT,
        SamplingParams(max_tokens=16, temperature=0, stop_token_ids=[stop_id], ignore_eos=True),
    )
    assert out[0].outputs[0].token_ids == ids[: ids.index(stop_id) + 1]
    assert out[0].outputs[0].finish_reason == "stop"
    assert out[0].outputs[0].stop_reason == stop_id

    text = greedy[0].outputs[0].text
    stop = text[len(text) // 2 : len(text) // 2 + 3]
    assert stop.strip(), text
    out = llm.generate(
        PROMPT, SamplingParams(max_tokens=16, temperature=0, stop=stop, ignore_eos=True)
    )
    assert out[0].outputs[0].text == text[: text.index(stop)]
    assert out[0].outputs[0].stop_reason == stop
    keep = llm.generate(
        PROMPT,
        SamplingParams(
            max_tokens=16,
            temperature=0,
            stop=[stop],
            include_stop_str_in_output=True,
            ignore_eos=True,
        ),
    )
    assert keep[0].outputs[0].text == text[: text.index(stop) + len(stop)]


def test_n_and_logprobs(llm):
    out = llm.generate(
        PROMPT,
        SamplingParams(n=3, max_tokens=5, temperature=1.0, seed=7, logprobs=2, ignore_eos=True),
    )
    assert [c.index for c in out[0].outputs] == [0, 1, 2]
    for c in out[0].outputs:
        assert len(c.token_ids) == 5 and len(c.logprobs) == 5
        for token, entry in zip(c.token_ids, c.logprobs, strict=True):
            assert token in entry and all(lp <= 0 for lp in entry.values())
            assert 2 <= len(entry) <= 3
    total = sum(math.exp(lp) for lp in out[0].outputs[0].logprobs[0].values())
    assert total <= 1.0 + 1e-5


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"temperature": -1}, "temperature"),
        ({"top_p": 0}, "top_p"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"top_k": -2}, "top_k"),
        ({"stop": [""]}, "stop"),
        ({"bogus": 1}, "bogus"),
    ],
)
def test_bad_sampling_params_name_the_field(kwargs, field):
    with pytest.raises(pydantic.ValidationError, match=field):
        SamplingParams(**kwargs)


def test_bad_prompts_are_rejected_and_nothing_is_queued(llm):
    with pytest.raises(ValueError, match=r"outside 0\.\.511"):
        llm.generate([PROMPT, {"prompt_token_ids": [1, 99999]}])
    with pytest.raises(EngineGenerateError, match=r"outside 0\.\.511: \[True, False\]"):
        llm.generate({"prompt_token_ids": [True, False]})  # bools are not token ids
    assert not llm.engine.has_unfinished_requests()
    with pytest.raises(ValueError, match="prompt_token_ids"):
        llm.generate({"tokens": [1]})
    with pytest.raises(ValueError, match="empty"):
        llm.generate({"prompt_token_ids": []})
    with pytest.raises(ValueError, match="exceeds max_model_len"):
        llm.generate(PROMPT, SamplingParams(max_tokens=100_000))
    # the engine still serves afterwards
    assert llm.generate(PROMPT, SamplingParams(max_tokens=2))[0].finished


def test_too_big_for_kv_cache_is_rejected(tmp_path):
    path = init_model("mixtral", "tiny", tmp_path / "m")
    llm = LLM(str(path), num_kv_blocks=2, block_size=4)
    with pytest.raises(ValueError, match="does not fit in the KV cache"):
        llm.generate(PROMPT, SamplingParams(max_tokens=10))


def test_bad_engine_option_names_the_field(tmp_path):
    path = init_model("mixtral", "tiny", tmp_path / "m")
    with pytest.raises(pydantic.ValidationError, match="block_size"):
        LLM(str(path), block_size=0)
    with pytest.raises(pydantic.ValidationError, match="not_an_option"):
        LLM(str(path), not_an_option=1)
    with pytest.raises(ValueError, match=r"mode='sideways'"):
        LLM(str(path), mode="sideways")


def test_cli_init_model_and_generate_json(tmp_path):
    out = tmp_path / "olmoe"
    cli = [sys.executable, "-m", "elasticmoe"]
    subprocess.run(
        [*cli, "init-model", str(out), "--arch", "olmoe", "--preset", "tiny"], check=True
    )
    res = subprocess.run(
        [
            *cli,
            "generate",
            "--model",
            str(out),
            "--token-ids",
            "1,2,3",
            "--max-tokens",
            "4",
            "--json",
        ],
        check=True,
        capture_output=True,
        text=True,
    )
    data = json.loads(res.stdout)
    assert data[0]["prompt_token_ids"] == [1, 2, 3]
    llm = LLM(str(out))
    ref = llm.generate({"prompt_token_ids": [1, 2, 3]}, SamplingParams(max_tokens=4, temperature=0))
    assert data[0]["token_ids"] == ref[0].outputs[0].token_ids
    bad = subprocess.run(
        [*cli, "generate", "--model", str(tmp_path / "nope"), "--prompt", "x"],
        capture_output=True,
        text=True,
    )
    assert bad.returncode == 2 and "nope" in bad.stderr
