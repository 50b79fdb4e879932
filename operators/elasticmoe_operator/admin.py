"""Client of the elasticmoe controller's admin API (the Serve app's ``/admin/``).

The operator reads ``GET /admin/demand`` (how many workers each pool should
have) and calls ``POST /admin/drain`` before it removes worker pods, so that
experts move off them first. A 409 answer means "not now" (changes paused, or
an expert would lose its last replica): the operator keeps the pods and tries
again on its next pass. ``PUT /admin/policy`` hands the controller a new
autoscaling policy; a 400 answer (:class:`RequestRefused`) means the controller
will never take that document, so the operator does not send it again.
"""

from __future__ import annotations

from typing import Any

import httpx
from pydantic import BaseModel, ConfigDict, Field, ValidationError


class AdminError(RuntimeError):
    """The admin API could not be reached or answered something unexpected."""


class DrainRefused(AdminError):
    """``/admin/drain`` answered 409: the drain cannot be done now."""


class RequestRefused(AdminError):
    """The admin API answered 400: the request itself is wrong and will stay wrong."""


class PoolDemand(BaseModel):
    """One pool in ``/admin/demand``."""

    model_config = ConfigDict(extra="ignore")
    workers: int = Field(ge=0)
    desired: int = Field(ge=0)


class WorkerInfo(BaseModel):
    """One worker in ``/admin/demand``."""

    model_config = ConfigDict(extra="ignore")
    worker_id: str
    pool: str
    node: str | None = None  # None until the worker reported its node
    spare: bool = False
    healthy: bool = True


class Demand(BaseModel):
    """``GET /admin/demand``: live and wanted workers per pool, and where workers run."""

    model_config = ConfigDict(extra="ignore")
    epoch: int | None = None  # None before the first expert map
    pools: dict[str, PoolDemand] = Field(default_factory=dict)
    workers: list[WorkerInfo] = Field(default_factory=list)


class AdminClient:
    """Async client of one deployment's admin API."""

    def __init__(
        self,
        base_url: str,
        api_key: str | None = None,
        timeout_s: float = 10.0,
        drain_timeout_s: float = 600.0,
    ) -> None:
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._client = httpx.AsyncClient(base_url=base_url, headers=headers, timeout=timeout_s)
        self._drain_timeout_s = drain_timeout_s

    async def __aenter__(self) -> AdminClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Close the HTTP connections."""
        await self._client.aclose()

    async def demand(self) -> Demand:
        """The controller's worker demand."""
        data = await self._call("GET", "/admin/demand")
        try:
            return Demand.model_validate(data)
        except ValidationError as e:
            raise AdminError(f"GET /admin/demand: unexpected answer: {e}") from None

    async def drain(self, *, nodes: list[str] | None = None, workers: list[str] | None = None):
        """Move every replica off these nodes (or workers) and stop their workers.

        Returns the drained worker ids; raises :class:`DrainRefused` on 409.
        """
        body: dict[str, Any] = {"nodes": nodes} if nodes is not None else {"workers": workers}
        data = await self._call("POST", "/admin/drain", json=body, timeout=self._drain_timeout_s)
        return list(data.get("drained", []))

    async def health(self) -> dict[str, Any]:
        """``GET /health``: 200 once every expert has a live replica and the engines
        answer; anything else raises :class:`AdminError`."""
        return await self._call("GET", "/health")

    async def put_policy(self, text: str) -> dict[str, Any]:
        """Apply an autoscaling policy (YAML text) on the running deployment.

        Raises :class:`RequestRefused` when the controller rejects the document.
        """
        return await self._call("PUT", "/admin/policy", json={"policy": text})

    async def _call(self, method: str, path: str, **kw: Any) -> dict[str, Any]:
        try:
            resp = await self._client.request(method, path, **kw)
        except httpx.HTTPError as e:
            raise AdminError(f"{method} {path}: {type(e).__name__}: {e}") from None
        if resp.status_code == 409:
            raise DrainRefused(_message(resp))
        if resp.status_code == 400:
            raise RequestRefused(f"{method} {path}: {_message(resp)}")
        if resp.status_code >= 400:
            raise AdminError(f"{method} {path}: HTTP {resp.status_code}: {_message(resp)}")
        try:
            return resp.json()
        except ValueError:
            raise AdminError(f"{method} {path}: answer is not JSON") from None


def _message(resp: httpx.Response) -> str:
    try:
        return str(resp.json()["error"]["message"])
    except (ValueError, KeyError, TypeError):
        return resp.text[:200]
