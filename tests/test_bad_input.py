"""Bad input against a real ``elasticmoe serve``: each gets a clear 4xx in the OpenAI
error shape whose ``param`` and message name the field, and the service keeps serving.

gRPC, serve-config and checkpoint bad inputs live with their parts
(test_expert_service, test_serve_config, test_examples, test_model_parts).
"""

from __future__ import annotations

import asyncio
import json
import threading

import httpx
import pytest
from test_serve_e2e import ADMIN_KEY, API_KEY, Server
from waiting import wait_for

from elasticmoe.engine.request import CompletionDelta, SamplingParams
from elasticmoe.model.init_model import init_model

V1 = {"Authorization": f"Bearer {API_KEY}"}
ADMIN = {"Authorization": f"Bearer {ADMIN_KEY}"}
KEYS = {"ELASTICMOE_API_KEYS": API_KEY, "ELASTICMOE_ADMIN_API_KEYS": ADMIN_KEY}


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return init_model("mixtral", "tiny", tmp_path_factory.mktemp("m") / "tiny")


@pytest.fixture(scope="module")
def local(model, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("bad")
    srv = Server(model, tmp, "--mode", "local", "--name", "bad", env=KEYS)
    yield srv
    srv.stop()


def post(srv: Server, path: str, body=None, *, raw: bytes | None = None, headers=None, **kw):
    headers = {**(headers or (ADMIN if path.startswith("/admin") else V1))}
    if raw is not None:
        headers["content-type"] = "application/json"
        return httpx.post(f"{srv.url}{path}", content=raw, headers=headers, timeout=120, **kw)
    return httpx.post(f"{srv.url}{path}", json=body, headers=headers, timeout=120)


def assert_error(r: httpx.Response, status: int, param: str | None, fragment: str) -> dict:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["type"] and err["code"] == status, err
    if param is not None:
        assert err["param"] == param, err
    assert fragment in err["message"], err
    return err


def assert_still_serves(srv: Server, model) -> None:
    assert httpx.get(f"{srv.url}/health", timeout=30).status_code == 200
    r = post(srv, "/v1/completions", {"model": str(model), "prompt": [1, 2, 3], "max_tokens": 3})
    assert r.status_code == 200, r.text
    assert len(r.json()["choices"][0]["text"]) >= 0 and r.json()["usage"]["completion_tokens"]


M = "<model>"
MANY_MESSAGES = [{"role": "user", "content": "hi"}] * 1025

# (endpoint, body, status, param, fragment of the message)
CASES = [
    # the example: [true, false] was served as token ids 1, 0
    ("completions", {"prompt": [True, False]}, 422, "prompt", "valid integer"),
    ("completions", {"prompt": [[1, True]]}, 422, "prompt", "valid integer"),
    ("completions", {"prompt": [1.5, 2]}, 422, "prompt", "valid integer"),
    ("completions", {"prompt": {"a": 1}}, 422, "prompt", "prompt"),
    ("completions", {"prompt": ["x"] * 129}, 422, "prompt", "at most 128 prompts"),
    ("completions", {"prompt": []}, 422, "prompt", "must not be empty"),
    ("completions", {"prompt": [[]]}, 422, "prompt", "must not be empty"),
    ("completions", {"prompt": [10**9]}, 400, "prompt", "token ids outside"),
    ("completions", {"prompt": "x", "n": 1000}, 422, "n", "less than or equal to 16"),
    ("completions", {"prompt": "x", "n": True}, 422, "n", "expected a number"),
    ("completions", {"prompt": "x", "max_tokens": True}, 422, "max_tokens", "expected a number"),
    ("completions", {"prompt": "x", "max_tokens": 10**30}, 422, "max_tokens", "less than"),
    ("completions", {"prompt": "x", "max_tokens": 10**5}, 400, "max_tokens", "context length"),
    ("completions", {"prompt": "x", "max_tokens": -1}, 422, "max_tokens", "greater than"),
    ("completions", {"prompt": "x", "max_tokens": 0}, 422, "max_tokens", "only allowed with echo"),
    ("completions", {"prompt": "x", "max_tokens": 2, "min_tokens": 3}, 400, "min_tokens", "exc"),
    ("completions", {"prompt": "x", "stop": ["a"] * 5}, 422, "stop", "at most 4 stop strings"),
    ("completions", {"prompt": "x", "stop": "s" * 257}, 422, "stop", "at most 256"),
    ("completions", {"prompt": "x", "stop": [""]}, 422, "stop", "non-empty"),
    ("completions", {"prompt": "x", "stop": [1]}, 422, "stop", "valid string"),
    ("completions", {"prompt": "x", "temperature": -1}, 422, "temperature", "greater than"),
    ("completions", {"prompt": "x", "temperature": 3}, 422, "temperature", "less than"),
    ("completions", {"prompt": "x", "temperature": "hot"}, 422, "temperature", "valid number"),
    ("completions", {"prompt": "x", "top_p": 0}, 422, "top_p", "greater than 0"),
    ("completions", {"prompt": "x", "top_k": -2}, 422, "top_k", "greater than"),
    ("completions", {"prompt": "x", "seed": -1}, 422, "seed", "greater than"),
    ("completions", {"prompt": "x", "seed": 2**64}, 422, "seed", "less than"),
    ("completions", {"prompt": "x", "logprobs": 6}, 422, "logprobs", "less than"),
    ("completions", {"prompt": "x", "best_of": 2}, 422, "best_of", "not supported"),
    ("completions", {"prompt": "x", "frequency_penalty": 1}, 422, "frequency_penalty", "not"),
    ("completions", {"prompt": "x", "user": "u" * 300}, 422, "user", "at most 256"),
    ("completions", {"prompt": "x", "bogus": 1}, 422, "bogus", "Extra inputs"),
    ("completions", {"model": "nope", "prompt": "x"}, 404, "model", "does not exist"),
    ("chat", {"messages": MANY_MESSAGES}, 422, "messages", "at most 1024"),
    ("chat", {"messages": []}, 422, "messages", "at least 1"),
    ("chat", {"messages": "hi"}, 422, "messages", "valid list"),
    ("chat", {"messages": [{"role": "user", "content": 5}]}, 422, "messages", "valid string"),
    ("chat", {"messages": [{"role": "wizard", "content": "x"}]}, 422, "messages", "role"),
    ("chat", {"messages": [{"role": "user", "content": "x"}], "top_logprobs": 21}, 422,
     "top_logprobs", "less than"),
    ("chat", {"messages": [{"role": "user", "content": "x"}], "max_completion_tokens": 0}, 422,
     "max_completion_tokens", "greater than"),
]  # fmt: skip


@pytest.mark.parametrize(("endpoint", "body", "status", "param", "fragment"), CASES)
def test_bad_field_is_a_4xx_naming_it(local, model, endpoint, body, status, param, fragment):
    body = {"model": str(model), **body}
    path = "/v1/completions" if endpoint == "completions" else "/v1/chat/completions"
    err = assert_error(post(local, path, body), status, param, fragment)
    if param is not None and status == 422 and param != "bogus":
        assert param in err["message"]


@pytest.mark.parametrize(
    ("raw", "param"),
    [
        (b'"temperature": NaN', "temperature"),
        (b'"temperature": Infinity', "temperature"),
        (b'"top_p": -Infinity', "top_p"),
        (b'"presence_penalty": NaN', "presence_penalty"),
    ],
)
def test_nan_and_infinity_in_raw_json_are_refused(local, model, raw, param):
    body = b'{"model": "%s", "prompt": "x", %s}' % (str(model).encode(), raw)
    assert_error(post(local, "/v1/completions", raw=body), 422, param, "finite number")


def test_malformed_and_oversized_bodies(local):
    r = post(local, "/v1/completions", raw=b'{"model": "x", "prompt": ')
    assert_error(r, 422, None, "not valid JSON")
    r = post(local, "/v1/completions", raw=b"[1, 2]")
    assert r.status_code == 422, r.text
    big = json.dumps({"model": "x", "prompt": "a" * (2 << 20)}).encode()
    assert_error(post(local, "/v1/completions", raw=big), 413, None, "exceeds the limit")

    def chunks():  # 5 MB sent chunked: no Content-Length to check up front
        yield b'{"model": "x", "prompt": "'
        for _ in range(80):
            yield b"a" * 65536
        yield b'"}'

    assert_error(post(local, "/v1/completions", raw=chunks()), 413, None, "exceeds the limit")


def test_temperature_below_the_floor_is_greedy(local, model):
    """The issue's example: temperature 1e-45 returned an empty completion."""
    base = {"model": str(model), "prompt": [5, 6, 7], "max_tokens": 8, "ignore_eos": True}
    greedy = post(local, "/v1/completions", {**base, "temperature": 0}).json()
    tiny = post(local, "/v1/completions", {**base, "temperature": 1e-45}).json()
    assert greedy["usage"]["completion_tokens"] == 8
    assert tiny["choices"][0]["text"] == greedy["choices"][0]["text"]
    assert tiny["usage"] == greedy["usage"]
    # the offline API behaves the same
    assert SamplingParams(temperature=1e-45).temperature == 0.0
    assert SamplingParams(temperature=1e-45).greedy
    assert SamplingParams(top_k=-1).top_k == 0  # vLLM's "off"


def test_policies_bad_text_is_a_400_and_never_a_file_read(local, model):
    # local mode has no controller, but the policy is checked first, naming the field
    r = httpx.put(
        f"{local.url}/admin/policy", json={"policy": "/etc/passwd"}, headers=ADMIN, timeout=60
    )
    err = assert_error(r, 400, "policy", "")
    assert "root:" not in err["message"]
    one_line = json.dumps({"name": "p", "rules": [{"x": "y" * 70_000}]})
    r = httpx.put(f"{local.url}/admin/policy", json={"policy": one_line}, headers=ADMIN, timeout=60)
    assert_error(r, 400, "policy", "")
    r = httpx.put(
        f"{local.url}/admin/policy", json={"policy": "rules: [unclosed"}, headers=ADMIN, timeout=60
    )
    assert_error(r, 400, "policy", "")


def test_service_still_serves_after_the_bad_inputs(local, model):
    assert_still_serves(local, model)


# ---------------------------------------------------------------- queue and deadline
@pytest.fixture(scope="module")
def tight(model, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("tight")
    cfg = tmp / "serve.yaml"
    cfg.write_text("max_queued_per_engine: 2\nrequest_timeout_s: 1.0\nnum_engines: 1\n")
    srv = Server(model, tmp, "--mode", "local", "--name", "tight", "--config", str(cfg), env=KEYS)
    yield srv
    srv.stop()


def long_body(model, **kw) -> dict:
    # the whole context (2048 tokens): far more than a second of generation
    return {"model": str(model), "prompt": [1, 2], "max_tokens": 2046, "ignore_eos": True, **kw}


def test_a_request_past_the_deadline_is_aborted_with_504(tight, model):
    r = post(tight, "/v1/completions", long_body(model))
    assert_error(r, 504, None, "request_timeout_s=1")
    # a stream ends with an error event, never a silent [DONE]
    with httpx.stream(
        "POST", f"{tight.url}/v1/completions", json=long_body(model, stream=True),
        headers=V1, timeout=120,
    ) as s:  # fmt: skip
        events = [line[6:] for line in s.iter_lines() if line.startswith("data: ")]
    errors = [json.loads(e)["error"] for e in events if e.startswith('{"error"')]
    assert errors and "request_timeout_s" in errors[-1]["message"], events[-3:]
    assert errors[-1]["code"] == 504
    # both were aborted in the engine: nothing left running there (a 2046-token
    # generation each, had they not been)
    wait_for(lambda: engine_requests(tight) == 0, "the engine to drop the timed-out requests")
    assert_still_serves(tight, model)


def engine_requests(srv: Server) -> float:
    text = httpx.get(f"{srv.url}/metrics", timeout=30).text
    values = [
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith(("elasticmoe_running_requests", "elasticmoe_waiting_requests"))
    ]
    assert len(values) >= 2, "the engine gauges are missing from /metrics"
    return sum(values)




def test_engine_queue_is_bounded_with_429_and_400(tight, model):
    r = post(tight, "/v1/completions", {"model": str(model), "prompt": "x", "n": 3})
    assert_error(r, 400, "n", "max_queued_per_engine=2")
    # two long streams fill the queue; a third request is refused, not queued or dropped
    started = threading.Barrier(3)
    results: list = []

    def stream() -> None:
        with httpx.stream(
            "POST", f"{tight.url}/v1/completions", json=long_body(model, stream=True),
            headers=V1, timeout=120,
        ) as s:  # fmt: skip
            lines = s.iter_lines()
            for line in lines:
                if line.startswith("data: "):
                    break
            started.wait(60)
            results.append([line for line in lines if line.startswith("data: ")][-1])

    threads = [threading.Thread(target=stream) for _ in range(2)]
    for t in threads:
        t.start()
    started.wait(60)
    r = post(tight, "/v1/completions", {"model": str(model), "prompt": "x", "max_tokens": 2})
    assert_error(r, 429, None, "queues are full")
    for t in threads:
        t.join(120)
    # the accepted streams were answered to the end (here: by the deadline, in-band)
    assert len(results) == 2 and all("[DONE]" in x for x in results)
    assert_still_serves(tight, model)


# ------------------------------------------------------------------ admin (distributed)
@pytest.fixture(scope="module")
def dist(model, tmp_path_factory):
    srv = Server(
        model,
        tmp_path_factory.mktemp("dist"),
        "--workers", "2", "--engines", "1", "--name", "baddist",
        env=KEYS,
    )  # fmt: skip
    yield srv
    srv.stop()


def test_admin_unknown_targets_and_bad_counts_name_the_field(dist, model):
    status = httpx.get(f"{dist.url}/admin/status", headers=ADMIN, timeout=60).json()
    epoch = status["epoch"]
    holder = status["replicas"]["0:0"][0]
    for path, body, status_code, param, fragment in [
        ("/admin/replicate", {"expert": "0:0", "target": "w-nope"}, 400, "target", "no worker"),
        ("/admin/migrate", {"expert": "0:0", "source": "w-nope"}, 400, "source", "w-nope"),
        ("/admin/migrate", {"expert": "0:0", "source": holder, "target": "w-nope"}, 400,
         "target", "no worker"),
        ("/admin/evict", {"expert": "0:0", "source": "w-nope"}, 400, "source", "w-nope"),
        ("/admin/evict", {"expert": "0:0"}, 400, "source", "required"),
        ("/admin/replicate", {"expert": "99:0"}, 400, "expert", "does not exist"),
        ("/admin/replicate", {"expert": "zero"}, 422, "expert", "pattern"),
        ("/admin/scale", {"expert": "0:0", "replicas": 0}, 422, "replicas", "greater than"),
        ("/admin/workers", {"count": 0}, 422, "count", "greater than"),
        ("/admin/workers", {"count": 65}, 422, "count", "less than"),
        ("/admin/workers", {"count": True}, 422, "count", ""),
    ]:  # fmt: skip
        err = assert_error(post(dist, path, body), status_code, param, fragment)
        assert "ray::" not in err["message"] and "pid=" not in err["message"]  # no traceback
    r = httpx.delete(f"{dist.url}/admin/workers/w-nope", headers=ADMIN, timeout=60)
    assert_error(r, 400, "worker_id", "w-nope")
    after = httpx.get(f"{dist.url}/admin/status", headers=ADMIN, timeout=60).json()
    assert after["epoch"] == epoch  # nothing changed
    assert_still_serves(dist, model)


# ----------------------------------------------------- a resumed stream that can't catch up
class _FakeClient:
    """An engine client whose stream is scripted: deltas, then optionally an error."""

    def __init__(self, items: list) -> None:
        self.items = items
        self.released: list[tuple[str, bool]] = []

    async def submit(self, prompt_ids, params, request_id):
        q: asyncio.Queue = asyncio.Queue()
        for item in self.items:
            q.put_nowait(item)
        return q

    def release(self, request_id: str, abort: bool) -> None:
        self.released.append((request_id, abort))


def test_a_resumed_stream_that_cannot_catch_up_ends_with_an_error_event():
    """The engine dies after 3 tokens; the rerun on the other engine finishes after 2
    (it cannot catch up): the stream ends with an error event, not a silent [DONE]."""
    from ray.exceptions import RayActorError

    from elasticmoe.serve.app import OpenAIServer, ServeSettings
    from elasticmoe.serve.metrics import RequestMetrics
    from elasticmoe.serve.protocol import CompletionRequest

    def d(ids, text, finish=None):
        return CompletionDelta("r-0", 0, ids, text, finish_reason=finish, finished=bool(finish))

    cls = OpenAIServer.func_or_class
    srv = cls.__new__(cls)
    srv.settings = ServeSettings(model_name="m", model_dir="/nonexistent", engine_names=["a", "b"])
    srv.clients = [
        _FakeClient([d([5], "a"), d([6], "b"), d([7], "c"), RayActorError()]),
        _FakeClient([d([5], "a"), d([6], "b", "stop")]),
    ]
    srv.engines = srv.clients
    srv._rr = iter(range(10**6))
    srv.tokenizer = None
    srv.in_flight, srv.queued = 1, 1
    from prometheus_client import CollectorRegistry

    srv.metrics = RequestMetrics(CollectorRegistry())
    req = CompletionRequest(model="m", prompt=[1, 2], stream=True, temperature=0)
    params = SamplingParams(max_tokens=8, temperature=0)

    async def run() -> list[str]:
        return [e async for e in srv._sse("completions", "r", req, [[1, 2]], [params], False)]

    events = asyncio.run(run())
    texts = [json.loads(e[6:])["choices"][0]["text"] for e in events if '"choices": [{' in e]
    assert "".join(texts) == "abc"  # what was delivered, each once
    errors = [json.loads(e[6:])["error"] for e in events if e.startswith('data: {"error"')]
    assert len(errors) == 1 and "short of the 3 already delivered" in errors[0]["message"]
    assert events.index(f"data: {json.dumps({'error': errors[0]})}\n\n") == len(events) - 2
    assert srv.in_flight == 0 and srv.queued == 0
    assert srv.clients[0].released == [("r-0", True)]  # the dead attempt was aborted
