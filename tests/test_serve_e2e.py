"""`elasticmoe serve` end to end: a real server subprocess, the official openai client,
schemathesis fuzzing from its own OpenAPI document, and a /metrics scrape."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import openai
import pytest
import schemathesis
from waiting import wait_for

from elasticmoe import LLM, SamplingParams
from elasticmoe.model.init_model import init_model

API_KEY = "sk-test-123"
ADMIN_KEY = "sk-admin-456"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def listener_of(port: int) -> str:
    """The name of the process listening on 127.0.0.1:``port`` (from /proc)."""
    inodes = set()
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        local, state, inode = line.split()[1], line.split()[3], line.split()[9]
        if state == "0A" and int(local.split(":")[1], 16) == port:  # 0A: LISTEN
            inodes.add(f"socket:[{inode}]")
    for fd_dir in Path("/proc").glob("[0-9]*/fd"):
        try:
            if any(os.readlink(fd) in inodes for fd in fd_dir.iterdir()):
                return (fd_dir.parent / "comm").read_text().strip()
        except OSError:  # gone, or not ours to read
            continue
    raise AssertionError(f"nothing listens on port {port}")


class Server:
    """`elasticmoe serve` as a child process; stopped by its pid."""

    def __init__(
        self, model: Path, tmp: Path, *args: str, env: dict[str, str] | None = None
    ) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = tmp / f"serve-{self.port}.log"
        # secrets by environment, as in production (never on the command line)
        env = {**os.environ, "RAY_ADDRESS": "", "PYTHONUNBUFFERED": "1", **(env or {})}
        env.pop("RAY_ADDRESS")
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "elasticmoe",
                "serve",
                "--model",
                str(model),
                "--port",
                str(self.port),
                *args,
            ],
            stdout=self.log.open("w"),
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
        )
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited:\n{self.log.read_text()[-3000:]}")
            try:
                if httpx.get(f"{self.url}/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        self.stop()
        raise RuntimeError(f"server did not become healthy:\n{self.log.read_text()[-3000:]}")

    def __enter__(self) -> Server:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self, timeout: float = 90) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        return self.proc.returncode


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    return init_model("mixtral", "tiny", tmp_path_factory.mktemp("m") / "tiny")


@pytest.fixture(scope="module")
def server(model, tmp_path_factory):
    keys = {"ELASTICMOE_API_KEYS": API_KEY, "ELASTICMOE_ADMIN_API_KEYS": ADMIN_KEY}
    args = ("--workers", "2", "--engines", "2", "--name", "e2e")
    with Server(model, tmp_path_factory.mktemp("srv"), *args, env=keys) as srv:
        yield srv


@pytest.fixture(scope="module")
def client(server, model):
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=API_KEY, max_retries=0)


def greedy_stream(model: Path, prompt: list[int], max_tokens: int) -> dict:
    """A streamed greedy /v1/completions request of exactly ``max_tokens`` tokens, each with
    its logprob entry (so a client can count the tokens of every chunk)."""
    return {
        "model": str(model),
        "prompt": prompt,
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": True,
        "logprobs": 0,
        "extra_body": {"ignore_eos": True},
    }


def reference(model: Path, prompts: list[list[int]], max_tokens: int) -> list[list[int]]:
    outs = LLM(str(model)).generate(
        [{"prompt_token_ids": p} for p in prompts],
        SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True),
    )
    return [o.outputs[0].token_ids for o in outs]


def test_models_and_auth(server, client):
    assert [m.id for m in client.models.list().data] == [str(server_model(server))]
    bad = openai.OpenAI(base_url=f"{server.url}/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()
    assert httpx.get(f"{server.url}/v1/models").status_code == 401
    assert httpx.get(f"{server.url}/health").status_code == 200  # health is open


def server_model(server) -> str:
    return httpx.get(
        f"{server.url}/v1/models", headers={"Authorization": f"Bearer {API_KEY}"}
    ).json()["data"][0]["id"]


def test_greedy_completions_equal_offline_generate(server, client, model):
    prompts = [[5, 6, 7, 8], [100, 3], list(range(20, 50))]
    want = reference(model, prompts, 12)
    name = server_model(server)
    tok = LLM(str(model)).tokenizer
    for p, w in zip(prompts, want, strict=True):
        r = client.completions.create(
            model=name,
            prompt=p,
            max_tokens=12,
            temperature=0,
            extra_body={"ignore_eos": True},
            logprobs=2,
        )
        assert r.choices[0].text == tok.decode(w)
        assert len(r.choices[0].logprobs.tokens) == 12
        assert r.usage.prompt_tokens == len(p) and r.usage.completion_tokens == 12
        # streaming gives the same text
        chunks = client.completions.create(
            model=name,
            prompt=p,
            max_tokens=12,
            temperature=0,
            stream=True,
            extra_body={"ignore_eos": True},
        )
        assert "".join(c.choices[0].text for c in chunks) == tok.decode(w)


def test_chat_streaming_and_not(server, client):
    name = server_model(server)
    msgs = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello"}]
    r = client.chat.completions.create(
        model=name,
        messages=msgs,
        max_tokens=10,
        temperature=0,
        seed=1,
        extra_body={"ignore_eos": True},
    )
    assert r.choices[0].message.role == "assistant" and r.choices[0].finish_reason == "length"
    stream = client.chat.completions.create(
        model=name,
        messages=msgs,
        max_tokens=10,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
        extra_body={"ignore_eos": True},
    )
    parts, usage = [], None
    for c in stream:
        if c.usage:
            usage = c.usage
        for ch in c.choices:
            parts.append(ch.delta.content or "")
    assert "".join(parts) == r.choices[0].message.content
    assert usage.completion_tokens == 10
    multi = client.chat.completions.create(
        model=name,
        messages=msgs,
        max_tokens=5,
        n=3,
        temperature=1.0,
        seed=3,
        logprobs=True,
        top_logprobs=2,
    )
    assert sorted(c.index for c in multi.choices) == [0, 1, 2]
    assert multi.choices[0].logprobs.content[0].top_logprobs


def test_concurrent_clients(server, client, model):
    name = server_model(server)
    prompts = [[i, i + 1, i + 2] for i in range(3, 19)]
    want = reference(model, prompts, 8)
    got: dict[int, list[int] | str] = {}

    def call(i: int) -> None:
        r = client.completions.create(
            model=name,
            prompt=prompts[i],
            max_tokens=8,
            temperature=0,
            extra_body={"ignore_eos": True},
            logprobs=0,
        )
        got[i] = r.choices[0].logprobs.tokens

    threads = [threading.Thread(target=call, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    tok = LLM(str(model)).tokenizer
    for i, w in enumerate(want):
        assert got[i] == [tok.decode([t], skip_special_tokens=False) for t in w]


@pytest.mark.parametrize(
    "body, status, fragment",
    [
        ({"model": "nope", "prompt": "x"}, 404, "does not exist"),
        ({"prompt": "x"}, 422, "model"),
        ({"model": "M", "prompt": "x", "temperature": -1}, 422, "temperature"),
        ({"model": "M", "prompt": "x", "max_tokens": 10**7}, 400, "context length"),
        ({"model": "M", "prompt": [10**9]}, 400, "token ids outside"),
        ({"model": "M", "prompt": "x", "frequency_penalty": 1}, 422, "not supported"),
        ({"model": "M", "prompt": "x", "bogus": 1}, 422, "bogus"),
    ],
)
def test_bad_requests_get_openai_errors(server, body, status, fragment):
    body = {k: (server_model(server) if v == "M" else v) for k, v in body.items()}
    r = httpx.post(
        f"{server.url}/v1/completions",
        json=body,
        headers={"Authorization": f"Bearer {API_KEY}"},
        timeout=30,
    )
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert fragment in err["message"] and err["type"]


def test_oversized_and_malformed_bodies(server):
    headers = {"Authorization": f"Bearer {API_KEY}", "content-type": "application/json"}
    big = json.dumps({"model": "x", "prompt": "a" * (2 << 20)})
    r = httpx.post(f"{server.url}/v1/completions", content=big, headers=headers, timeout=30)
    assert r.status_code == 413 and "exceeds the limit" in r.json()["error"]["message"]
    r = httpx.post(f"{server.url}/v1/completions", content=b"{not json", headers=headers)
    assert r.status_code == 422
    assert httpx.get(f"{server.url}/health").status_code == 200


def test_admin_api_scales_an_expert(server):
    headers = {"Authorization": f"Bearer {ADMIN_KEY}"}
    r = httpx.post(
        f"{server.url}/admin/scale",
        json={"expert": "1:2", "replicas": 2},
        headers=headers,
        timeout=120,
    )
    assert r.status_code == 200, r.text
    m = httpx.get(f"{server.url}/admin/expert-map", headers=headers).json()
    assert len(m["replicas"]["1:2"]) == 2
    bad = httpx.post(
        f"{server.url}/admin/scale",
        json={"expert": "9:9", "replicas": 2},
        headers=headers,
        timeout=60,
    )
    assert bad.status_code == 400 and "does not exist" in bad.json()["error"]["message"]
    assert httpx.post(f"{server.url}/admin/scale", json={"expert": "1:2"}).status_code == 401
    # a key for /v1 is not a key for /admin, nor the other way round
    inference = {"Authorization": f"Bearer {API_KEY}"}
    assert httpx.get(f"{server.url}/admin/status", headers=inference).status_code == 401
    assert httpx.get(f"{server.url}/v1/models", headers=headers).status_code == 401


def test_admin_demand_and_drain_refusals(server):
    """The Kubernetes operator's hooks (a successful drain is tested in test_faults)."""
    headers = {"Authorization": f"Bearer {ADMIN_KEY}"}
    demand = httpx.get(f"{server.url}/admin/demand", headers=headers, timeout=60).json()
    assert demand["pools"]["default"]["workers"] == 2
    assert demand["pools"]["default"]["desired"] >= 2
    workers = [w["worker_id"] for w in demand["workers"]]
    assert len(workers) == 2 and all(w["node"] for w in demand["workers"])
    # draining every worker would lose experts: refused with 409, nothing changes
    r = httpx.post(
        f"{server.url}/admin/drain", json={"workers": workers}, headers=headers, timeout=60
    )
    assert r.status_code == 409 and "would leave no worker" in r.json()["error"]["message"]
    r = httpx.post(f"{server.url}/admin/drain", json={}, headers=headers, timeout=60)
    assert r.status_code in (400, 422) and "at least one worker or node" in r.text
    after = httpx.get(f"{server.url}/admin/demand", headers=headers, timeout=60).json()
    assert after["epoch"] == demand["epoch"]


def test_metrics_during_load(server, client):
    name = server_model(server)
    before = scrape(server)
    for i in range(4):
        client.completions.create(
            model=name,
            prompt=[7, 8, 9 + i],
            max_tokens=6,
            temperature=0,
            extra_body={"ignore_eos": True},
        )
    time.sleep(2.5)  # the cluster collector caches for 2 s
    after = scrape(server)
    for name_ in (
        "elasticmoe_time_to_first_token_seconds_count",
        "elasticmoe_inter_token_latency_seconds_count",
        "elasticmoe_e2e_latency_seconds_count",
        "elasticmoe_kv_cache_usage_ratio",
        "elasticmoe_expert_map_epoch",
        "elasticmoe_expert_replicas",
        "elasticmoe_worker_load_balance",
        "elasticmoe_running_requests",
        "elasticmoe_prefix_cache_hit_ratio",
        "elasticmoe_dispatch_seconds_total",
        "elasticmoe_scaling_operations_total",
        "elasticmoe_workers",
    ):
        assert any(k.startswith(name_) for k in after), name_
    assert (
        total(after, "elasticmoe_requests_total") >= total(before, "elasticmoe_requests_total") + 4
    )
    # tokens routed per expert add up: every computed token goes to top_k experts per MoE layer
    routed = total(after, "elasticmoe_expert_tokens_total") - total(
        before, "elasticmoe_expert_tokens_total"
    )
    computed = 4 * (3 + 5)  # each request: 3 prompt tokens + 5 decode steps
    assert routed == computed * 2 * 2  # top_k=2, 2 MoE layers
    assert after["elasticmoe_worker_load_balance"] > 0


def test_engine_killed_mid_stream_resumes_without_repeats(server, client, model):
    """An engine dies while its streams are open: they finish on the other engine
    (the shared per-step stream breaks, each request reruns and skips what was sent),
    every token arriving exactly once."""
    name = server_model(server)
    prompts = [[i + 1, i + 9, i + 4] for i in range(8)]
    want = reference(model, prompts, 40)
    tok = LLM(str(model)).tokenizer
    got: dict[int, list[str]] = {i: [] for i in range(len(prompts))}
    errors: list[BaseException] = []

    def call(i: int) -> None:
        try:
            stream = client.completions.create(
                model=name,
                prompt=prompts[i],
                max_tokens=40,
                temperature=0,
                stream=True,
                logprobs=0,
                extra_body={"ignore_eos": True},
            )
            for c in stream:
                if c.choices and c.choices[0].logprobs is not None:
                    got[i].extend(c.choices[0].logprobs.tokens)
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=call, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 120
    while sum(bool(v) for v in got.values()) < len(prompts) and time.monotonic() < deadline:
        time.sleep(0.05)
    engines = [
        int(line.split()[0])
        for line in subprocess.run(
            ["ps", "-eo", "pid,sid,args"], capture_output=True, text=True, check=True
        ).stdout.splitlines()
        if line.split()[1:2] == [str(server.proc.pid)] and "ray::EngineActor" in line
    ]
    assert len(engines) == 2
    os.kill(engines[0], signal.SIGKILL)
    for t in threads:
        t.join(240)
    assert not errors, errors
    for i, w in enumerate(want):
        assert got[i] == [tok.decode([t], skip_special_tokens=False) for t in w]
    # the restarted engine serves again
    deadline = time.monotonic() + 120
    while httpx.get(f"{server.url}/health", timeout=10).status_code != 200:
        assert time.monotonic() < deadline
        time.sleep(0.5)
    r = client.completions.create(model=name, prompt=prompts[0], max_tokens=4, temperature=0)
    assert r.choices[0].finish_reason in ("length", "stop")


def scrape(server) -> dict[str, float]:
    text = httpx.get(f"{server.url}/metrics", timeout=30).text
    out: dict[str, float] = {}
    for line in text.splitlines():
        m = re.match(r"^(elasticmoe_\w+)(\{[^}]*\})? ([0-9.e+-]+|NaN)$", line)
        if m:
            out[m.group(1) + (m.group(2) or "")] = float(m.group(3))
    return out


def total(metrics: dict[str, float], name: str) -> float:
    return sum(v for k, v in metrics.items() if k == name or k.startswith(name + "{"))


@pytest.fixture(scope="module")
def local_server(model, tmp_path_factory):
    args = ("--mode", "local", "--name", "fuzz")
    with Server(model, tmp_path_factory.mktemp("local"), *args) as srv:
        yield srv


def test_64_concurrent_streams_get_every_token_once_in_order(local_server, model):
    """64 streams at once through the shared per-step engine stream: each stream's
    tokens (from its chunks' logprobs) are exactly the offline greedy tokens, once each,
    in order, and its text is their decoding."""
    import asyncio

    prompts = [[(7 * i) % 200 + 1, i + 2, (3 * i) % 50 + 4] for i in range(64)]
    want = reference(model, prompts, 16)
    tok = LLM(str(model)).tokenizer
    client = openai.AsyncOpenAI(base_url=f"{local_server.url}/v1", api_key="x", max_retries=0)

    async def one(p: list[int]) -> tuple[list[str], str, list[str | None]]:
        stream = await client.completions.create(**greedy_stream(model, p, 16))
        tokens, text, finishes = [], "", []
        async for c in stream:
            ch = c.choices[0]
            text += ch.text
            finishes.append(ch.finish_reason)
            if ch.logprobs is not None:
                tokens.extend(ch.logprobs.tokens)
        return tokens, text, finishes

    async def main():
        try:
            return await asyncio.gather(*[one(p) for p in prompts])
        finally:
            await client.close()

    results = asyncio.run(main())
    for (tokens, text, finishes), w in zip(results, want, strict=True):
        assert tokens == [tok.decode([t], skip_special_tokens=False) for t in w]
        assert text == tok.decode(w)
        assert finishes[-1] == "length" and all(f is None for f in finishes[:-1])


@pytest.fixture(scope="module")
def interval_server(model, tmp_path_factory):
    # through Ray Serve's proxy: the other tests' servers take the default, direct ingress
    args = ("--mode", "local", "--name", "interval", "--stream-interval", "4", "--ingress", "proxy")
    with Server(model, tmp_path_factory.mktemp("interval"), *args) as srv:
        yield srv


def test_the_front_listens_itself_unless_told_to_use_the_proxy(server, interval_server):
    """Default (auto, on a Ray instance serve starts): the ingress replica holds the port;
    --ingress proxy: Ray Serve's proxy does. Both serve the same API (the tests around)."""

    def said(srv: Server) -> str:  # the log, with rich's line wrapping undone
        return " ".join(srv.log.read_text().split())

    # the ready line comes once serve.run returns, which can be after /health answers
    wait_for(lambda: "elasticmoe is serving" in said(server), "the direct server's ready line")
    wait_for(lambda: "elasticmoe is serving" in said(interval_server), "the proxied one's")
    assert "direct ingress" in said(server)
    assert "through Ray Serve's proxy" in said(interval_server)
    assert listener_of(server.port).startswith("ray::ServeRepli")
    assert listener_of(interval_server.port).startswith("ray::ProxyActor")


def test_stream_interval_sends_fewer_larger_chunks_and_every_token(interval_server, model):
    """--stream-interval 4: after a completion's first tokens, a chunk waits until 4 new
    tokens are there (the last chunk takes what is left); the tokens and text are still
    exactly offline greedy's, once each, in order."""
    prompts = [[5, 9, 14], [40, 41, 42, 43]]
    want = reference(model, prompts, 13)
    tok = LLM(str(model)).tokenizer
    c = openai.OpenAI(base_url=f"{interval_server.url}/v1", api_key="x", max_retries=0)
    for p, w in zip(prompts, want, strict=True):
        stream = c.completions.create(**greedy_stream(model, p, 13))
        per_chunk, tokens, text = [], [], ""
        for chunk in stream:
            ch = chunk.choices[0]
            text += ch.text
            got = ch.logprobs.tokens if ch.logprobs is not None else []
            tokens.extend(got)
            if got:
                per_chunk.append(len(got))
        assert tokens == [tok.decode([t], skip_special_tokens=False) for t in w]
        assert text == tok.decode(w)
        assert all(n >= 4 for n in per_chunk[1:-1]), per_chunk
        assert len(per_chunk) <= 1 + -(-12 // 4), per_chunk


def test_flush_now_holds_deltas_until_stream_interval_tokens():
    """The hold rule behind --stream-interval, on its own."""
    from elasticmoe.engine.request import CompletionDelta, StreamError
    from elasticmoe.serve.app import _flush_now

    def delta(n, index=0, finish=None):
        return CompletionDelta("r", index, list(range(n)), "x" * n, finish_reason=finish)

    assert _flush_now([delta(1)], set(), 4)  # the first tokens go out at once
    assert not _flush_now([delta(1), delta(2)], {0}, 4)
    assert _flush_now([delta(1), delta(3)], {0}, 4)
    assert _flush_now([delta(1, finish="stop")], {0}, 4)  # the last ones too
    assert _flush_now([delta(1), StreamError("r", "engine died")], {0}, 4)
    assert _flush_now([delta(1, index=1)], {0}, 4)  # completion 1's first tokens
    assert _flush_now([delta(1)], {0}, 1)


def engine_prompt_logprobs(model: Path, ids: list[int]) -> list[dict[int, float] | None]:
    out = LLM(str(model)).generate(
        [{"prompt_token_ids": ids}], SamplingParams(max_tokens=1, temperature=0, prompt_logprobs=1)
    )
    return out[0].prompt_logprobs


def test_echo_scores_the_prompt_with_the_engines_logprobs(local_server, model):
    """What lm-eval's loglikelihood sends: echo, logprobs, max_tokens 1 (or 0)."""
    import math

    c = openai.OpenAI(base_url=f"{local_server.url}/v1", api_key="x", max_retries=0)
    tok = LLM(str(model)).tokenizer
    ids = [[5, 9, 14, 30, 2, 77], [40, 41, 42]]
    r = c.completions.create(
        model=str(model), prompt=ids, max_tokens=1, temperature=0, logprobs=1, echo=True
    )
    r0 = c.completions.create(
        model=str(model), prompt=ids, max_tokens=0, temperature=0, logprobs=1, echo=True
    )
    for p, choice, only in zip(
        ids, sorted(r.choices, key=lambda x: x.index), r0.choices, strict=True
    ):
        lp = choice.logprobs
        assert len(lp.tokens) == len(p) + 1 and lp.token_logprobs[0] is None
        assert lp.top_logprobs[0] is None
        assert choice.text.startswith(tok.decode(p))
        assert lp.text_offset[0] == 0 and lp.text_offset[1] == len(lp.tokens[0])
        want = engine_prompt_logprobs(model, p)
        for pos in range(1, len(p)):
            assert math.isclose(lp.token_logprobs[pos], want[pos][p[pos]], abs_tol=1e-4)
            assert max(lp.top_logprobs[pos].values()) >= lp.token_logprobs[pos]
        # max_tokens=0: the prompt alone, nothing generated
        assert only.text == tok.decode(p) and only.finish_reason == "length"
        assert only.logprobs.token_logprobs[1:] == pytest.approx(lp.token_logprobs[1 : len(p)])
        assert len(only.logprobs.tokens) == len(p)
    assert r0.usage.completion_tokens == 0
    text = c.completions.create(model=str(model), prompt="def f(x):", max_tokens=3, echo=True)
    assert text.choices[0].text.startswith("def f(x):")
    bad = httpx.post(
        f"{local_server.url}/v1/completions",
        json={"model": str(model), "prompt": "x", "max_tokens": 0},
        timeout=30,
    )
    assert bad.status_code == 422 and "only allowed with echo" in bad.text


def test_lm_eval_loglikelihood_task_against_the_server(local_server, model, tmp_path, monkeypatch):
    """lm-evaluation-harness (local-completions) runs a local loglikelihood task; each
    answer equals the engine's own prompt logprobs."""
    import math

    lm_eval = pytest.importorskip("lm_eval")
    from lm_eval.tasks import TaskManager

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    docs = [
        {"context": "def add(a, b):", "continuation": "\n    return a + b"},
        {"context": "import os\nimport", "continuation": " sys"},
        {"context": "for i in", "continuation": " range(10):"},
    ]
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps(d) + "\n" for d in docs))
    (tmp_path / "tiny_ll.yaml").write_text(
        "task: tiny_ll\n"
        "dataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {data}\n"
        "test_split: test\n"
        "output_type: loglikelihood\n"
        "doc_to_text: '{{context}}'\n"
        "doc_to_target: '{{continuation}}'\n"
        "metric_list:\n"
        "  - metric: perplexity\n    aggregation: perplexity\n    higher_is_better: false\n"
        "  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n"
    )
    results = lm_eval.simple_evaluate(
        model="local-completions",
        model_args={
            "model": str(model),
            "base_url": f"{local_server.url}/v1/completions",
            "tokenizer": str(model),
            "tokenized_requests": True,
            "num_concurrent": 2,
            "max_retries": 1,
        },
        tasks=["tiny_ll"],
        task_manager=TaskManager(include_path=str(tmp_path)),
        log_samples=True,
        batch_size=1,
    )
    samples = results["samples"]["tiny_ll"]
    assert len(samples) == len(docs)
    tok = LLM(str(model)).tokenizer
    for s in samples:
        context, continuation = s["arguments"][0]
        ctx = tok.encode(context, add_special_tokens=False)
        whole = tok.encode(context + continuation, add_special_tokens=False)
        cont = whole[len(ctx) :]
        want = engine_prompt_logprobs(model, whole)
        expected = sum(want[len(ctx) + j][t] for j, t in enumerate(cont))
        greedy = all(
            want[len(ctx) + j][t] == max(want[len(ctx) + j].values()) for j, t in enumerate(cont)
        )
        got_lp, got_greedy = s["resps"][0][0]
        assert math.isclose(got_lp, expected, abs_tol=1e-3), (got_lp, expected)
        assert got_greedy == greedy
    assert "perplexity,none" in results["results"]["tiny_ll"]


def test_usage_reports_cached_tokens_continuous_usage_and_min_tokens(local_server, model):
    c = openai.OpenAI(base_url=f"{local_server.url}/v1", api_key="x", max_retries=0)
    prompt = list(range(100, 140))  # 40 tokens: two full 16-token blocks are reusable
    first = c.completions.create(model=str(model), prompt=prompt, max_tokens=2, temperature=0)
    again = c.completions.create(model=str(model), prompt=prompt, max_tokens=2, temperature=0)
    assert again.usage.prompt_tokens_details.cached_tokens == 32
    assert first.usage.prompt_tokens_details.cached_tokens in (0, 32)  # an earlier test may warm it
    stream = c.chat.completions.create(
        model=str(model),
        messages=[{"role": "user", "content": "count"}],
        max_tokens=5,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True, "continuous_usage_stats": True},
        extra_body={"ignore_eos": True, "min_tokens": 3},
    )
    usages = [ch.usage for ch in stream]
    assert all(u is not None for u in usages)
    counts = [u.completion_tokens for u in usages]
    assert counts == sorted(counts) and counts[-1] == 5
    assert all(u.total_tokens == u.prompt_tokens + u.completion_tokens for u in usages)
    r = httpx.post(
        f"{local_server.url}/v1/completions",
        json={"model": str(model), "prompt": "x", "max_tokens": 2, "min_tokens": 3},
        timeout=30,
    )
    assert r.status_code == 400 and "min_tokens" in r.json()["error"]["message"]


def test_fuzz_http_api_never_5xx(local_server):
    """Schemathesis, from the server's own OpenAPI document: no request gets a 5xx.

    (The pytest plugin's ``from_fixture`` does not work with pytest 9, so each
    operation's hypothesis strategy is driven directly.)
    """
    from hypothesis import HealthCheck, given, settings

    schema = schemathesis.openapi.from_url(f"{local_server.url}/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    assert {op.path for op in operations} >= {"/v1/completions", "/v1/chat/completions"}
    failures: list[str] = []
    for op in operations:

        @given(case=op.as_strategy())
        @settings(
            max_examples=25, deadline=None, database=None, suppress_health_check=list(HealthCheck)
        )
        def check(case) -> None:
            if isinstance(case.body, dict) and isinstance(case.body.get("max_tokens"), int):
                case.body["max_tokens"] = min(case.body["max_tokens"], 8)  # keep it short
            response = case.call(base_url=local_server.url, timeout=60)
            if response.status_code >= 500:
                failures.append(
                    f"{case.method} {case.path} {case.body!r:.200}: "
                    f"{response.status_code} {response.text[:200]}"
                )

        check()
    assert not failures, failures[:5]


def test_server_still_healthy_after_fuzz_then_auth_off(local_server, model):
    assert httpx.get(f"{local_server.url}/health", timeout=10).status_code == 200
    c = openai.OpenAI(base_url=f"{local_server.url}/v1", api_key="anything", max_retries=0)
    r = c.completions.create(model=str(model), prompt=[1, 2, 3], max_tokens=4, temperature=0)
    assert r.choices[0].finish_reason in ("length", "stop")


def test_graceful_shutdown_finishes_in_flight_requests(local_server, model):
    c = openai.OpenAI(base_url=f"{local_server.url}/v1", api_key="x", max_retries=0)
    results: list = []

    def call() -> None:
        try:
            r = c.completions.create(
                model=str(model),
                prompt=[4, 5, 6],
                max_tokens=60,
                temperature=0,
                extra_body={"ignore_eos": True},
            )
            results.append(r.choices[0].finish_reason)
        except Exception as e:
            results.append(e)

    threads = [threading.Thread(target=call) for _ in range(3)]
    for t in threads:
        t.start()
    time.sleep(1.0)
    assert local_server.stop() == 0
    for t in threads:
        t.join(60)
    # accepted requests finished before the server went away
    assert results == ["length"] * 3, results
    assert "stopped" in local_server.log.read_text()


def test_worker_grpc_needs_the_deployment_token(server):
    """`elasticmoe serve` makes a token for the Ray instance it starts; a caller without
    it (any other process that can reach a worker's port) is refused."""
    import grpc

    from elasticmoe._proto.elasticmoe.v1 import expert_pb2, expert_pb2_grpc
    from elasticmoe.experts.rpc import RpcSecurity, open_channel

    headers = {"Authorization": f"Bearer {ADMIN_KEY}"}
    status = httpx.get(f"{server.url}/admin/status", headers=headers, timeout=60).json()
    addresses = [w["address"] for w in status["workers"]]
    assert addresses
    unload = expert_pb2.UnloadExpertsRequest(experts=[expert_pb2.ExpertRef(layer=0, expert=0)])
    for address in addresses:
        with open_channel(address, RpcSecurity()) as channel:
            stub = expert_pb2_grpc.ExpertServiceStub(channel)
            for method, request in (
                (stub.Health, expert_pb2.HealthRequest()),
                (stub.UnloadExperts, unload),
            ):
                with pytest.raises(grpc.RpcError) as err:
                    method(request, timeout=30)
                assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    # and the deployment still serves (nothing was unloaded)
    r = httpx.post(
        f"{server.url}/v1/completions",
        json={"model": server_model(server), "prompt": [1, 2, 3], "max_tokens": 2},
        headers={"Authorization": f"Bearer {API_KEY}"},
        timeout=120,
    )
    assert r.status_code == 200, r.text


def test_a_chunked_body_is_held_to_the_size_limit(server):
    """No Content-Length (Transfer-Encoding: chunked): the limit still holds."""
    headers = {"Authorization": f"Bearer {API_KEY}", "content-type": "application/json"}

    def chunks(total: int):
        yield b'{"model": "x", "prompt": "'
        for _ in range(total // 65536):
            yield b"a" * 65536
        yield b'"}'

    r = httpx.post(
        f"{server.url}/v1/completions", content=chunks(5 * 2**20), headers=headers, timeout=60
    )
    assert r.status_code == 413 and "exceeds the limit" in r.json()["error"]["message"]
    small = b'{"model": "%s", "prompt": [1, 2], "max_tokens": 2}' % server_model(server).encode()
    r = httpx.post(
        f"{server.url}/v1/completions", content=iter([small[:10], small[10:]]), headers=headers,
        timeout=120,
    )  # fmt: skip
    assert r.status_code == 200, r.text


def _descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (from /proc's parent links)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except OSError:
                continue
            children.setdefault(ppid, []).append(int(entry))
    out, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def test_serving_actors_run_at_normal_priority(server):
    """Ray starts worker processes at nice 15 unless told; the deployment's own Ray
    instance runs its engines, HTTP front and expert workers at nice 0."""
    actors = {}
    for pid in _descendants(server.proc.pid):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                name = f.read().split(b"\0")[0].decode()
        except OSError:
            continue
        if name.startswith(("ray::EngineActor", "ray::ProxyActor", "ray::ServeReplica")):
            actors[pid] = (name, os.getpriority(os.PRIO_PROCESS, pid))
    names = {name.split(".")[0] for name, _ in actors.values()}
    assert {"ray::EngineActor", "ray::ProxyActor"} <= names, actors
    assert all(nice == 0 for _, nice in actors.values()), actors
