"""The HTTP front: an OpenAI-compatible API, health, metrics and an admin API.

A Ray Serve deployment with a FastAPI ingress. It tokenizes, validates and
limits requests itself, so a malformed or oversized request never reaches an
engine; it streams from the engine actors as server-sent events (one
subscription per engine carries each step's new tokens and text of all of
this replica's requests, see :mod:`elasticmoe.serve.engine_client`; the
engine detokenizes incrementally); and it turns every failure into the
OpenAI error shape with the right status code.
"""

import asyncio
import hmac
import itertools
import json
import logging
import re
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from pydantic import BaseModel, ConfigDict, Field
from ray import serve
from starlette.exceptions import HTTPException as StarletteHTTPException

from elasticmoe.engine.request import (
    CompletionDelta,
    OutputAccumulator,
    Replay,
    ReplayDivergedError,
    RequestOutput,
    SamplingParams,
    StreamError,
)
from elasticmoe.model.config import load_config
from elasticmoe.model.tokenizer import Tokenizer
from elasticmoe.serve.engine_client import EngineClient
from elasticmoe.serve.ingress import MAX_ONGOING_REQUESTS
from elasticmoe.serve.metrics import ClusterCollector, RequestMetrics
from elasticmoe.serve.protocol import (
    AddWorkersRequest,
    ChatCompletionRequest,
    CompletionRequest,
    DrainRequest,
    PolicyRequest,
    ReplicaRequest,
    ScaleRequest,
    error_body,
)

logger = logging.getLogger(__name__)
NAMESPACE = "elasticmoe"


class ServeSettings(BaseModel):
    """What the HTTP front needs to know (passed from ``elasticmoe serve``)."""

    model_config = ConfigDict(extra="forbid")

    model_name: str
    model_dir: str
    deployment: str = "default"
    mode: str = "distributed"
    engine_names: list[str]
    controller_name: str | None = None
    api_keys: list[str] = Field(default_factory=list)
    admin_api_keys: list[str] = Field(default_factory=list)
    max_in_flight: int = Field(256, ge=1, le=MAX_ONGOING_REQUESTS)
    max_queued_per_engine: int = Field(1024, ge=1)
    request_timeout_s: float = Field(600.0, gt=0)
    stream_interval: int = Field(1, ge=1, le=1024)
    max_body_bytes: int = Field(1 << 20, ge=1024)
    max_model_len: int | None = None


class APIError(Exception):
    """An error answered in the OpenAI shape."""

    def __init__(
        self,
        status: int,
        message: str,
        type_: str = "invalid_request_error",
        param: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param = status, message, type_, param


def _error(status: int, message: str, type_: str, param: str | None = None) -> JSONResponse:
    return JSONResponse(error_body(message, type_, status, param), status_code=status)


app = FastAPI(
    title="elasticmoe",
    version="0.1.0",
    description="OpenAI-compatible serving of Mixture-of-Experts models with elastic experts.",
)


def key_matches(header: str, keys: list[str]) -> bool:
    """Whether ``Authorization: Bearer <key>`` holds one of ``keys``, compared in constant
    time (every key is compared, so the time says nothing about which one was close)."""
    scheme, _, given = header.partition(" ")
    if scheme.lower() != "bearer" or not given:
        return False
    given_bytes = given.encode()
    found = False
    for key in keys:
        found |= hmac.compare_digest(given_bytes, key.encode())
    return found


class _Guard:
    """Auth and body-size limits before any body is parsed (so bad input costs nothing).

    A plain ASGI middleware: Starlette's ``BaseHTTPMiddleware`` would pass every
    streamed chunk through an extra in-memory stream, a cost paid per token.
    """

    def __init__(self, inner: Any) -> None:
        self.inner = inner

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        # the app serving this request (Serve may run a copy of the module's ``app``)
        served = scope.get("app")
        settings: ServeSettings | None = getattr(getattr(served, "state", None), "settings", None)
        path = scope.get("path", "")
        if (
            scope["type"] == "http"
            and settings is not None
            and (path.startswith("/v1") or path.startswith("/admin"))
        ):
            headers = {
                k: v for k, v in scope["headers"] if k in (b"authorization", b"content-length")
            }
            response = _refusal(settings, path.startswith("/admin"), headers)
            if response is None and b"content-length" not in headers:
                # A chunked body has no length to check up front: read it here, at most
                # max_body_bytes of it, and hand the app what was read.
                receive, response = await _bounded_body(receive, settings.max_body_bytes)
            if response is not None:
                await response(scope, receive, send)
                return
        await self.inner(scope, receive, send)


def _too_large(size: str, limit: int) -> JSONResponse:
    return _error(
        413, f"request body of {size} bytes exceeds the limit of {limit}", "invalid_request_error"
    )


async def _bounded_body(receive: Any, limit: int) -> tuple[Any, JSONResponse | None]:
    """(a receive that replays the body, None), or a 413 once more than ``limit`` bytes came."""
    chunks: list[bytes] = []
    total = 0
    while True:
        message = await receive()
        if message["type"] != "http.request":  # the client went away
            return receive, None
        chunk = message.get("body", b"")
        total += len(chunk)
        if total > limit:
            return receive, _too_large(f"more than {limit}", limit)
        chunks.append(chunk)
        if not message.get("more_body"):
            break
    replayed = False

    async def replay() -> dict:
        nonlocal replayed
        if not replayed:
            replayed = True
            return {"type": "http.request", "body": b"".join(chunks), "more_body": False}
        return await receive()

    return replay, None


def _refusal(
    settings: ServeSettings, admin: bool, headers: dict[bytes, bytes]
) -> JSONResponse | None:
    keys = settings.admin_api_keys if admin else settings.api_keys
    if keys and not key_matches(headers.get(b"authorization", b"").decode("latin-1"), keys):
        what = "admin API key" if admin else "API key"
        return _error(
            401, f"invalid or missing {what} (Authorization: Bearer <key>)", "authentication_error"
        )
    length = headers.get(b"content-length", b"").decode("latin-1")
    if length and length.isdigit() and int(length) > settings.max_body_bytes:
        return _too_large(length, settings.max_body_bytes)
    return None


app.add_middleware(_Guard)


@app.exception_handler(APIError)
async def _api_error(request: Request, exc: APIError) -> JSONResponse:
    return _error(exc.status, exc.message, exc.type, exc.param)


_NAMED = re.compile(r"^([a-z_]+): ")


@app.exception_handler(RequestValidationError)
async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    """422 naming the field: ``param`` is the top-level field (a whole-request check
    names it at the start of its message, ``"stop: ..."``)."""
    problems = []
    param = None
    for err in exc.errors():
        if err.get("type") == "json_invalid":  # loc is a byte offset, not a field
            problems.append(f"the body is not valid JSON: {err.get('msg')}")
            continue
        parts = [str(x) for x in err.get("loc", ()) if x != "body"]
        loc = ".".join(parts)
        msg = str(err.get("msg")).removeprefix("Value error, ")
        named = _NAMED.match(msg)
        param = param or (parts[0] if parts else named.group(1) if named else None)
        problems.append(f"{loc}: {msg}" if loc else msg)
    return _error(422, "; ".join(problems) or "invalid request", "invalid_request_error", param)


@app.exception_handler(StarletteHTTPException)
async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    return _error(exc.status_code, str(exc.detail), "invalid_request_error")


@app.exception_handler(Exception)
async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
    logger.exception("unhandled error")
    return _error(500, f"internal error: {type(exc).__name__}", "server_error")


def _controller_message(e: Exception) -> str:
    """The controller's own message (Ray wraps a remote error in its traceback)."""
    cause = getattr(e, "cause", None)
    if isinstance(cause, Exception) and str(cause):
        return str(cause)
    lines = [x for x in str(e).strip().splitlines() if x.strip()]
    last = lines[-1] if lines else str(e)
    return last.split(": ", 1)[1] if last.startswith(("ControllerError", "ChangesPaused")) else last


def _param_of(message: str, fields: dict[str, Any] | None) -> str | None:
    """Which sent field a controller refusal is about: the one whose value it names
    first, else ``expert`` when it talks about an expert."""
    found = []
    for name, value in (fields or {}).items():
        if value is not None:
            m = re.search(rf"(?<![\w-]){re.escape(str(value))}(?![\w-])", message)
            if m:
                found.append((m.start(), name))
    if found:  # the value it names first ("no worker 'x'; workers: [...]")
        return min(found)[1]
    if "expert" in message:
        return "expert"
    return next(iter(fields), None) if fields else None


def _logprob_token(tokenizer: Tokenizer | None, token_id: int) -> str:
    return tokenizer.decode([token_id], skip_special_tokens=False) if tokenizer else str(token_id)


async def _take(q: asyncio.Queue, items: list[Any], deadline: float, timeout: float) -> None:
    """Append the next engine step's item of one request, and any that arrived meanwhile
    (they go out as one answer); 504 once the request runs past ``deadline``."""
    left = deadline - time.monotonic()
    try:
        items.append(await asyncio.wait_for(q.get(), max(left, 0.0)))
    except TimeoutError:
        # the caller's finally aborts it in the engine
        raise APIError(
            504,
            f"the request ran past request_timeout_s={timeout:g} and was "
            "aborted; ask for fewer tokens or raise request_timeout_s",
            "timeout_error",
        ) from None
    while not q.empty():
        items.append(q.get_nowait())


def _flush_now(items: list[Any], started: set[int], interval: int) -> bool:
    """Whether the deltas held so far go out now (``stream_interval``, as vLLM's): a
    completion's first tokens, an error, a finished completion, or a completion holding
    ``interval`` new tokens go out at once; fewer wait for the next engine step."""
    if interval <= 1:
        return True
    held: dict[int, int] = {}
    for item in items:
        if (
            not isinstance(item, CompletionDelta)
            or item.finish_reason is not None
            or item.finished
            or item.index not in started
        ):
            return True
        held[item.index] = held.get(item.index, 0) + len(item.token_ids)
    return max(held.values(), default=0) >= interval


def _coalesce(items: list[Any]) -> list[Any]:
    """Merge consecutive deltas of the same completion into one (order kept; errors and
    other completions' deltas stay where they are)."""
    if len(items) == 1:
        return items
    out: list[Any] = []
    last: dict[int, CompletionDelta] = {}
    for item in items:
        if not isinstance(item, CompletionDelta):
            out.append(item)
            last.clear()
            continue
        prev = last.get(item.index)
        if prev is None or prev.finish_reason is not None:
            out.append(item)
            last[item.index] = item
            continue
        prev.token_ids = prev.token_ids + item.token_ids
        prev.text += item.text
        if prev.logprobs is not None and item.logprobs is not None:
            prev.logprobs = prev.logprobs + item.logprobs
        prev.finish_reason, prev.stop_reason = item.finish_reason, item.stop_reason
        prev.finished = item.finished
        if item.prompt_logprobs is not None:
            prev.prompt_logprobs = item.prompt_logprobs
    return out


def _usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int) -> dict[str, Any]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "prompt_tokens_details": {"cached_tokens": cached_tokens},
    }


@dataclass
class _Timing:
    """When a request started and when its last token arrived (for TTFT / ITL)."""

    start: float
    last: float | None = None


@serve.deployment(ray_actor_options={"num_cpus": 0}, max_ongoing_requests=MAX_ONGOING_REQUESTS)
@serve.ingress(app)
class OpenAIServer:
    """The ingress replica: routes OpenAI requests to the engine actors."""

    def __init__(self, settings: dict[str, Any]) -> None:
        import ray

        self.settings = ServeSettings(**settings)
        self.engines = [ray.get_actor(n, namespace=NAMESPACE) for n in self.settings.engine_names]
        self.clients = [EngineClient(e) for e in self.engines]
        self._rr = itertools.count()
        model_dir = self.settings.model_dir
        self.tokenizer = Tokenizer.from_dir(model_dir)
        mc = load_config(model_dir)
        self.max_model_len = self.settings.max_model_len or mc.max_position_embeddings
        self.vocab_size = mc.vocab_size
        self.num_experts = len(mc.moe_layers) * mc.num_experts
        self.created = int(time.time())
        self.in_flight = 0
        self.queued = 0  # engine requests (prompts x n) admitted and not finished
        self.draining = False
        self.registry = CollectorRegistry()
        self.metrics = RequestMetrics(self.registry)
        self.registry.register(ClusterCollector(self._engine_stats, self._controller_status))
        app.state.settings = self.settings

    # ------------------------------------------------------------- helpers
    def _controller(self) -> Any:
        import ray

        if self.settings.controller_name is None:
            raise APIError(
                409,
                "this deployment runs in local mode: no expert scaling",
                "invalid_request_error",
            )
        try:
            return ray.get_actor(self.settings.controller_name, namespace=NAMESPACE)
        except ValueError:
            raise APIError(503, "the controller is not running", "service_unavailable") from None

    def _engine_stats(self) -> list[dict[str, Any]]:
        import ray

        return ray.get([e.stats.remote() for e in self.engines], timeout=10)

    def _controller_status(self) -> dict[str, Any] | None:
        import ray

        if self.settings.controller_name is None:
            return None
        return ray.get(self._controller().status.remote(), timeout=10)

    def _check_model(self, name: str) -> None:
        if name != self.settings.model_name:
            raise APIError(
                404,
                f"model {name!r} does not exist; available: {self.settings.model_name!r}",
                "not_found_error",
                "model",
            )

    def _admit(self, num_seqs: int = 1) -> None:
        """Refuse (503 draining, 429 full, 400 never fits) before anything is accepted:
        an accepted request is never dropped for lack of room."""
        if self.draining:
            raise APIError(503, "the server is shutting down", "service_unavailable")
        if self.in_flight >= self.settings.max_in_flight:
            raise APIError(
                429,
                f"too many requests in flight ({self.in_flight}); retry later",
                "rate_limit_error",
            )
        capacity = self.settings.max_queued_per_engine * len(self.clients)
        if num_seqs > capacity:
            raise APIError(
                400,
                f"n: prompts x n = {num_seqs} sequences exceeds the {capacity} this server "
                f"queues (max_queued_per_engine={self.settings.max_queued_per_engine} "
                f"x {len(self.clients)} engine(s))",
                param="n",
            )
        if self.queued + num_seqs > capacity:
            raise APIError(
                429,
                f"the engines' queues are full ({self.queued} sequences queued, "
                f"max_queued_per_engine={self.settings.max_queued_per_engine}); retry later",
                "rate_limit_error",
            )

    def _tokens(self, prompt: str | list[int], param: str) -> list[int]:
        if isinstance(prompt, str):
            ids = self.tokenizer.encode(prompt)
        else:
            bad = [t for t in prompt if not 0 <= t < self.vocab_size]
            if bad:
                raise APIError(
                    400, f"token ids outside 0..{self.vocab_size - 1}: {bad[:5]}", param=param
                )
            ids = list(prompt)
        if not ids:
            raise APIError(400, "prompt is empty", param=param)
        return ids

    def _params(
        self,
        req: Any,
        prompt_len: int,
        max_tokens: int | None,
        logprobs: int | None,
        prompt_logprobs: int | None = None,
    ) -> SamplingParams:
        room = self.max_model_len - prompt_len
        if room < 1:
            raise APIError(
                400,
                f"prompt has {prompt_len} tokens; the model's context is {self.max_model_len}",
                param="prompt",
            )
        if max_tokens is not None and max_tokens > room:
            raise APIError(
                400,
                f"prompt ({prompt_len} tokens) + max_tokens ({max_tokens}) "
                f"exceeds the context length {self.max_model_len}",
                param="max_tokens",
            )
        max_tokens = max_tokens or room
        if req.min_tokens > max_tokens:
            raise APIError(
                400,
                f"min_tokens ({req.min_tokens}) exceeds max_tokens ({max_tokens})",
                param="min_tokens",
            )
        return SamplingParams(
            n=req.n,
            max_tokens=max_tokens,
            temperature=req.temperature,
            top_p=req.top_p,
            top_k=req.top_k,
            seed=req.seed,
            stop=req.stop_list,
            ignore_eos=req.ignore_eos,
            logprobs=logprobs,
            prompt_logprobs=prompt_logprobs,
            min_tokens=req.min_tokens,
        )

    async def _stream(
        self, prompt_ids: list[int], params: SamplingParams, request_id: str
    ) -> AsyncIterator[CompletionDelta]:
        """The deltas of one engine request; aborts it if the consumer goes away.

        If the engine dies, the request runs again on the next engine (Ray
        restarts the dead one). Tokens and text already streamed are not sent
        twice: greedy and seeded requests replay to the same tokens, which are
        cut off (:meth:`Replay.trim`). An unseeded sampled request that already
        streamed tokens fails with a retryable 503 instead: a rerun would not
        repeat what the client has seen.
        """
        from ray.exceptions import ActorUnavailableError, RayActorError

        replay = Replay(params)
        interval = self.settings.stream_interval
        first = next(self._rr)
        timeout = self.settings.request_timeout_s
        deadline = time.monotonic() + timeout
        for attempt in range(len(self.clients) + 1):
            # a rerun goes to the next engine, not back to the one that just failed
            client = self.clients[(first + attempt) % len(self.clients)]
            finished = False
            seen: dict[int, list[int]] = {}  # completion -> [tokens, chars] of this attempt
            started: set[int] = set()  # completions whose first tokens went out
            try:
                q = await client.submit(prompt_ids, params, request_id)
                while not finished:
                    items: list[Any] = []
                    await _take(q, items, deadline, timeout)
                    while not _flush_now(items, started, interval):
                        await _take(q, items, deadline, timeout)
                    for item in _coalesce(items):
                        if isinstance(item, BaseException):
                            raise item
                        if isinstance(item, StreamError):
                            raise APIError(
                                503, f"engine failed: {item.message}", "service_unavailable"
                            )
                        finished = item.finished
                        started.add(item.index)
                        pos = seen.get(item.index)
                        if pos is None:
                            pos = seen[item.index] = [0, 0]
                        if replay.trim(item, pos):
                            yield item
                        if finished:
                            break
                return
            except (RayActorError, ActorUnavailableError) as e:
                if not replay.can_resume() or attempt == len(self.engines):
                    raise APIError(
                        503,
                        f"engine failed mid-request ({e.__class__.__name__}); retry it",
                        "service_unavailable",
                    ) from e
                logger.warning("engine died while serving %s; running it again", request_id)
            except ReplayDivergedError as e:
                raise APIError(503, f"engine failover failed: {e}", "service_unavailable") from e
            except APIError:
                raise
            except ValueError as e:  # the engine refused the request (e.g. KV cache too small)
                raise APIError(400, f"the engine refused the request: {e}") from e
            except Exception as e:
                raise APIError(
                    503, f"engine failed: {type(e).__name__}: {e}", "service_unavailable"
                ) from e
            finally:
                client.release(request_id, abort=not finished)

    # ------------------------------------------------------------ endpoints
    @app.get("/health")
    async def health(self) -> JSONResponse:
        """200 when every expert has a live replica and the engines answer; else 503."""
        try:
            stats = await asyncio.gather(*[e.stats.remote() for e in self.engines])
        except Exception as e:
            return JSONResponse({"status": "unavailable", "reason": f"engine down: {e}"}, 503)
        body: dict[str, Any] = {"status": "ok", "engines": len(stats), "draining": self.draining}
        if self.settings.controller_name is not None:
            try:
                status = await self._controller().status.remote()
            except Exception as e:
                return JSONResponse({"status": "unavailable", "reason": f"controller: {e}"}, 503)
            healthy = {w["worker_id"] for w in status["workers"] if w["healthy"]}
            missing = [e for e, ws in status["replicas"].items() if not set(ws) & healthy]
            if len(status["replicas"]) < self.num_experts:
                missing.append("(experts missing from the map)")
            body["epoch"] = status["epoch"]
            if missing:
                return JSONResponse(
                    {"status": "unavailable", "reason": f"no live replica of {missing[:8]}"}, 503
                )
        if self.draining:
            return JSONResponse({**body, "status": "draining"}, 503)
        return JSONResponse(body)

    @app.get("/metrics")
    async def metrics(self) -> Response:
        """Prometheus text format."""
        data = await asyncio.to_thread(generate_latest, self.registry)
        return Response(data, media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def models(self) -> JSONResponse:
        """The one model this server serves."""
        return JSONResponse(
            {
                "object": "list",
                "data": [
                    {
                        "id": self.settings.model_name,
                        "object": "model",
                        "created": self.created,
                        "owned_by": "elasticmoe",
                        "max_model_len": self.max_model_len,
                    }
                ],
            }
        )

    @app.post("/v1/completions")
    async def completions(self, req: CompletionRequest) -> Response:
        """OpenAI completions, streaming (SSE) or not; ``echo`` with prompt logprobs."""
        self._check_model(req.model)
        raw = req.prompts()
        self._admit(len(raw) * req.n)
        prompts = [self._tokens(p, "prompt") for p in raw]
        # max_tokens=0 (with echo) scores the prompt only: the engine still samples one
        # token, which the answer leaves out
        limit = None if req.max_tokens is None else max(req.max_tokens, 1)
        prompt_lps = req.logprobs if req.echo else None
        params = [self._params(req, len(p), limit, req.logprobs, prompt_lps) for p in prompts]
        echo = None
        if req.echo:
            echo = [
                r if isinstance(r, str) else self.tokenizer.decode(p)
                for r, p in zip(raw, prompts, strict=True)
            ]
        return await self._respond("completions", req, prompts, params, chat=False, echo=echo)

    @app.post("/v1/chat/completions")
    async def chat_completions(self, req: ChatCompletionRequest) -> Response:
        """OpenAI chat completions, streaming (SSE) or not."""
        self._check_model(req.model)
        self._admit(req.n)
        try:
            text = self.tokenizer.apply_chat_template(
                [m.model_dump(exclude_none=True) for m in req.messages], add_generation_prompt=True
            )
        except Exception as e:
            raise APIError(
                400, f"messages: cannot apply the chat template: {e}", param="messages"
            ) from None
        ids = self._tokens(text, "messages")
        logprobs = (req.top_logprobs or 0) if req.logprobs else None
        params = self._params(req, len(ids), req.token_limit, logprobs)
        return await self._respond("chat", req, [ids], [params], chat=True)

    async def _respond(
        self,
        endpoint: str,
        req: Any,
        prompts: list[list[int]],
        params: list[SamplingParams],
        chat: bool,
        echo: list[str] | None = None,
    ) -> Response:
        rid = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}"
        num_seqs = sum(p.n for p in params)
        self.in_flight += 1
        self.queued += num_seqs
        self.metrics.in_flight.inc()
        if req.stream:
            return StreamingResponse(
                self._sse(endpoint, rid, req, prompts, params, chat, echo),
                media_type="text/event-stream",
            )
        try:
            finals = await asyncio.gather(
                *[
                    self._collect(p, sp, f"{rid}-{i}")
                    for i, (p, sp) in enumerate(zip(prompts, params, strict=True))
                ]
            )
        except APIError as e:
            self.metrics.requests.labels(endpoint, str(e.status)).inc()
            raise
        finally:
            self.in_flight -= 1
            self.queued -= num_seqs
            self.metrics.in_flight.dec()
        prompt_only = not chat and req.max_tokens == 0
        choices, completion_tokens = [], 0
        for pi, out in enumerate(finals):
            for c in out.outputs:
                if c.finish_reason == "error":
                    self.metrics.requests.labels(endpoint, "503").inc()
                    raise APIError(
                        503, f"generation failed: {c.stop_reason}", "service_unavailable"
                    )
                index = pi * req.n + c.index
                if chat:
                    completion_tokens += len(c.token_ids)
                    choices.append(
                        {
                            "index": index,
                            "message": {"role": "assistant", "content": c.text},
                            "logprobs": self._chat_logprobs(c.token_ids, c.logprobs)
                            if c.logprobs is not None
                            else None,
                            "finish_reason": c.finish_reason,
                        }
                    )
                    continue
                ids, lps, text = c.token_ids, c.logprobs, c.text
                finish = c.finish_reason
                if prompt_only:
                    ids, lps, text, finish = [], [] if lps is not None else None, "", "length"
                completion_tokens += len(ids)
                if echo is not None:
                    text = echo[pi] + text
                    if lps is not None:
                        plps = out.prompt_logprobs or [None] * len(prompts[pi])
                        lps = plps + lps
                    ids = prompts[pi] + ids
                choices.append(
                    {
                        "index": index,
                        "text": text,
                        "logprobs": self._completion_logprobs(ids, lps)
                        if lps is not None
                        else None,
                        "finish_reason": finish,
                    }
                )
        prompt_tokens = sum(len(p) for p in prompts)
        self.metrics.requests.labels(endpoint, "200").inc()
        self.metrics.prompt_tokens.inc(prompt_tokens)
        self.metrics.generation_tokens.inc(completion_tokens)
        return JSONResponse(
            {
                "id": rid,
                "object": "chat.completion" if chat else "text_completion",
                "created": int(time.time()),
                "model": self.settings.model_name,
                "choices": choices,
                "usage": _usage(
                    prompt_tokens, completion_tokens, sum(o.num_cached_tokens for o in finals)
                ),
            }
        )

    async def _collect(self, prompt: list[int], params: SamplingParams, rid: str) -> RequestOutput:
        start = time.monotonic()
        timing = _Timing(start)
        acc = OutputAccumulator(rid, prompt, params.n)
        async for delta in self._stream(prompt, params, rid):
            self._observe(delta, timing)
            acc.add(delta)
        self.metrics.e2e.observe(time.monotonic() - start)
        assert acc.output.finished
        return acc.output

    def _observe(self, delta: CompletionDelta, timing: _Timing) -> None:
        """TTFT on the first token, ITL between later arrivals."""
        if not delta.token_ids:
            return
        now = time.monotonic()
        if timing.last is None:
            self.metrics.ttft.observe(now - timing.start)
        elif now > timing.last:  # several completions' deltas of one step count once
            self.metrics.itl.observe(now - timing.last)
        timing.last = now

    def _completion_logprobs(
        self, ids: list[int], lps: list[dict[int, float] | None]
    ) -> dict[str, Any]:
        """The legacy completions shape; an entry of None (the first prompt token under
        ``echo``) has no logprob."""
        tokens = [_logprob_token(self.tokenizer, t) for t in ids]
        offsets, pos = [], 0
        for t in tokens:
            offsets.append(pos)
            pos += len(t)
        return {
            "tokens": tokens,
            "token_logprobs": [
                lp.get(t) if lp is not None else None for t, lp in zip(ids, lps, strict=False)
            ],
            "top_logprobs": [
                {_logprob_token(self.tokenizer, k): v for k, v in lp.items()}
                if lp is not None
                else None
                for lp in lps
            ],
            "text_offset": offsets,
        }

    def _chat_logprobs(self, ids: list[int], lps: list[dict[int, float]]) -> dict[str, Any]:
        content = []
        for t, lp in zip(ids, lps, strict=False):
            tok = _logprob_token(self.tokenizer, t)
            content.append(
                {
                    "token": tok,
                    "logprob": lp.get(t),
                    "bytes": list(tok.encode()),
                    "top_logprobs": [
                        {
                            "token": _logprob_token(self.tokenizer, k),
                            "logprob": v,
                            "bytes": list(_logprob_token(self.tokenizer, k).encode()),
                        }
                        for k, v in lp.items()
                        if k != t or len(lp) == 1
                    ],
                }
            )
        return {"content": content}

    async def _deltas(
        self, prompts: list[list[int]], params: list[SamplingParams], rid: str
    ) -> AsyncIterator[tuple[int, CompletionDelta | BaseException]]:
        """(prompt index, delta) of every prompt's request as they come; a failed
        request yields its exception (reported in-band: headers are already sent)."""
        if len(prompts) == 1:  # the common case: no merging task
            try:
                async for delta in self._stream(prompts[0], params[0], f"{rid}-0"):
                    yield 0, delta
            except Exception as e:
                yield 0, e
            return
        queue: asyncio.Queue[tuple[int, CompletionDelta | BaseException] | None] = asyncio.Queue()

        async def pump(pi: int) -> None:
            try:
                async for delta in self._stream(prompts[pi], params[pi], f"{rid}-{pi}"):
                    queue.put_nowait((pi, delta))
            except Exception as e:
                queue.put_nowait((pi, e))
            finally:
                queue.put_nowait(None)

        tasks = [asyncio.create_task(pump(i)) for i in range(len(prompts))]
        try:
            done = 0
            while done < len(tasks):
                item = await queue.get()
                if item is None:
                    done += 1
                else:
                    yield item
        finally:
            for t in tasks:
                t.cancel()

    async def _sse(
        self,
        endpoint: str,
        rid: str,
        req: Any,
        prompts: list[list[int]],
        params: list[SamplingParams],
        chat: bool,
        echo: list[str] | None = None,
    ) -> AsyncIterator[str]:
        """Server-sent events: one chunk per delta with new text, then usage (if asked)
        and [DONE]. The engine already detokenized and held back what a stop string
        could still cut, so a chunk is the delta's text as it is."""
        created = int(time.time())
        obj = "chat.completion.chunk" if chat else "text_completion"
        model = self.settings.model_name
        opts = req.stream_options
        include_usage = bool(opts and opts.include_usage)
        continuous = include_usage and bool(opts.continuous_usage_stats)
        prompt_only = not chat and req.max_tokens == 0
        prompt_tokens = sum(len(p) for p in prompts)
        cached: dict[int, int] = {}
        started: set[int] = set()
        timing = _Timing(time.monotonic())
        completion_tokens, status = 0, "200"

        offsets: dict[int, int] = {}  # choice -> chars streamed (for text_offset)
        # every chunk's fixed fields, encoded once
        head = json.dumps({"id": rid, "object": obj, "created": created, "model": model})
        head = f'data: {head[:-1]}, "choices": ['

        def chunk(
            index: int, text: str, finish: str | None, first: bool, d: CompletionDelta
        ) -> str:
            lps = None
            if d.logprobs is not None and d.token_ids and not prompt_only:
                if chat:
                    lps = self._chat_logprobs(d.token_ids, d.logprobs)
                else:
                    lps = self._completion_logprobs(d.token_ids, d.logprobs)
                    base = offsets.get(index, 0) + (len(text) - len(d.text))
                    lps["text_offset"] = [base + o for o in lps["text_offset"]]
            offsets[index] = offsets.get(index, 0) + len(text)
            if chat:
                delta: dict[str, Any] = {"role": "assistant"} if first else {}
                if text:
                    delta["content"] = text
                choice = {"index": index, "delta": delta, "logprobs": lps, "finish_reason": finish}
            else:
                choice = {"index": index, "text": text, "logprobs": lps, "finish_reason": finish}
            usage = ""
            if continuous:
                u = _usage(prompt_tokens, completion_tokens, sum(cached.values()))
                usage = f', "usage": {json.dumps(u)}'
            return f"{head}{json.dumps(choice)}]{usage}}}\n\n"

        try:
            async for pi, d in self._deltas(prompts, params, rid):
                if isinstance(d, BaseException):
                    # in-band (the 200 is sent): an error event, never a silent [DONE]
                    if isinstance(d, APIError):
                        code, msg, kind = d.status, d.message, d.type
                    else:
                        code, msg, kind = 503, str(d), "service_unavailable"
                    status = str(code)
                    yield f"data: {json.dumps(error_body(msg, kind, code))}\n\n"
                    continue
                self._observe(d, timing)
                if d.num_cached_tokens is not None and d.index == 0:
                    cached[pi] = d.num_cached_tokens
                index = pi * req.n + d.index
                if d.finish_reason == "error":
                    status = "503"
                    err = error_body(
                        f"generation failed: {d.stop_reason}", "service_unavailable", 503
                    )
                    yield f"data: {json.dumps(err)}\n\n"
                    continue
                first = index not in started
                text, finish = d.text, d.finish_reason
                if prompt_only:
                    text, finish = "", "length" if finish else None
                else:
                    completion_tokens += len(d.token_ids)
                if first:
                    started.add(index)
                    if echo is not None:
                        text = echo[pi] + text
                # a delta whose text is held back still carries its tokens' logprobs
                if text or finish or first or (d.logprobs is not None and d.token_ids):
                    yield chunk(index, text, finish, first, d)
            if include_usage:
                body = {
                    "id": rid,
                    "object": obj,
                    "created": created,
                    "model": model,
                    "choices": [],
                    "usage": _usage(prompt_tokens, completion_tokens, sum(cached.values())),
                }
                yield f"data: {json.dumps(body)}\n\n"
            yield "data: [DONE]\n\n"
        finally:
            self.in_flight -= 1
            self.queued -= sum(p.n for p in params)
            self.metrics.in_flight.dec()
            self.metrics.requests.labels(endpoint, status).inc()
            self.metrics.e2e.observe(time.monotonic() - timing.start)
            self.metrics.prompt_tokens.inc(prompt_tokens)
            self.metrics.generation_tokens.inc(completion_tokens)

    # ---------------------------------------------------------------- admin
    async def _admin(
        self,
        method: str,
        *args: Any,
        conflict: bool = False,
        fields: dict[str, Any] | None = None,
    ) -> JSONResponse:
        """Call the controller; its refusals become 400 (409 when paused or ``conflict``),
        ``param`` naming the field of ``fields`` (name -> value sent) the refusal is about."""
        from elasticmoe.control.controller import ControllerError

        try:
            result = await getattr(self._controller(), method).remote(*args)
        except ControllerError as e:
            msg = _controller_message(e)
            raise APIError(
                409 if conflict or "paused" in msg else 400, msg, param=_param_of(msg, fields)
            ) from None
        return JSONResponse(result)

    @app.get("/admin/status")
    async def admin_status(self) -> JSONResponse:
        """Workers, replicas, per-expert load, epoch."""
        return await self._admin("status")

    @app.get("/admin/expert-map")
    async def admin_expert_map(self) -> JSONResponse:
        """The current expert map."""
        return await self._admin("get_map")

    @app.post("/admin/scale")
    async def admin_scale(self, body: ScaleRequest) -> JSONResponse:
        """Set one expert's replica count."""
        return await self._admin(
            "scale", body.expert, body.replicas, fields={"replicas": body.replicas}
        )

    @app.post("/admin/replicate")
    async def admin_replicate(self, body: ReplicaRequest) -> JSONResponse:
        """Add a replica of an expert (target optional)."""
        return await self._admin(
            "replicate", body.expert, body.target, fields={"target": body.target}
        )

    @app.post("/admin/evict")
    async def admin_evict(self, body: ReplicaRequest) -> JSONResponse:
        """Drop an expert's replica on ``source``."""
        if body.source is None:
            raise APIError(400, "source: the worker to evict from is required", param="source")
        return await self._admin("evict", body.expert, body.source, fields={"source": body.source})

    @app.post("/admin/migrate")
    async def admin_migrate(self, body: ReplicaRequest) -> JSONResponse:
        """Move an expert's replica from ``source`` to ``target``."""
        if body.source is None:
            raise APIError(400, "source: the worker to move from is required", param="source")
        return await self._admin(
            "migrate",
            body.expert,
            body.source,
            body.target,
            fields={"source": body.source, "target": body.target},
        )

    @app.post("/admin/workers")
    async def admin_add_workers(self, body: AddWorkersRequest) -> JSONResponse:
        """Start workers."""
        return await self._admin("add_worker", body.count, fields={"count": body.count})

    @app.delete("/admin/workers/{worker_id}")
    async def admin_remove_worker(self, worker_id: str) -> JSONResponse:
        """Drain a worker's experts elsewhere, then stop it."""
        return await self._admin("remove_worker", worker_id, fields={"worker_id": worker_id})

    @app.get("/admin/demand")
    async def admin_demand(self) -> JSONResponse:
        """Workers per pool now and wanted, and where each worker runs (for the operator)."""
        return await self._admin("demand")

    @app.post("/admin/drain")
    async def admin_drain(self, body: DrainRequest) -> JSONResponse:
        """Move every replica off these workers / nodes, then stop those workers."""
        return await self._admin(
            "drain", body.workers, body.nodes, conflict=True, fields={"workers": None}
        )

    @app.put("/admin/policy")
    async def admin_policy(self, body: PolicyRequest) -> JSONResponse:
        """Validate and apply an autoscaling policy."""
        from elasticmoe.core.policy import PolicyError, policy_from_text

        try:
            policy_from_text(body.policy)
        except PolicyError as e:
            raise APIError(400, str(e), param="policy") from None
        return await self._admin("set_policy", body.policy)

    async def drain(self, timeout: float) -> int:
        """Stop admitting requests; wait (bounded) for in-flight ones; returns those left."""
        self.draining = True
        deadline = time.monotonic() + timeout
        while self.in_flight and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        return self.in_flight
