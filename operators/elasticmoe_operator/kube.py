"""The one wrapper through which handlers read and write Kubernetes objects.

A small async client over ``httpx``, built from the same credentials kopf
logs in with (:class:`kopf.ConnectionInfo`), so the operator has one login
path in a pod (service account) and on a laptop (kubeconfig). Writes use JSON
merge patches, the only kind every API server (and kmock) understands the
same way; lists inside a patch replace the whole list.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import quote

import httpx
import kopf

Obj = dict[str, Any]

# (group/version, plural) of what the operator touches.
CONFIG_MAPS = ("v1", "configmaps")
SECRETS = ("v1", "secrets")
PODS = ("v1", "pods")
PVCS = ("v1", "persistentvolumeclaims")
SERVICES = ("v1", "services")
RAY_CLUSTERS = ("ray.io/v1", "rayclusters")


class KubeError(RuntimeError):
    """An API call failed; ``status`` is the HTTP status (0: no answer)."""

    def __init__(self, message: str, status: int = 0) -> None:
        super().__init__(message)
        self.status = status


class KubeClient:
    """Namespaced get/list/create/patch/delete of any resource."""

    def __init__(self, info: kopf.ConnectionInfo, timeout_s: float = 30.0) -> None:
        headers = {"Accept": "application/json", **info.as_http_headers()}
        verify: Any = True
        if info.server.startswith("https"):
            verify = False if info.insecure else info.as_ssl_context()
        self._client = httpx.AsyncClient(
            base_url=info.server.rstrip("/"), headers=headers, verify=verify, timeout=timeout_s
        )

    async def aclose(self) -> None:
        """Close the HTTP connections."""
        await self._client.aclose()

    @staticmethod
    def _url(res: tuple[str, str], namespace: str, name: str | None = None) -> str:
        api, plural = res
        prefix = "/api/v1" if api == "v1" else f"/apis/{api}"
        url = f"{prefix}/namespaces/{quote(namespace)}/{plural}"
        return f"{url}/{quote(name)}" if name else url

    async def _call(self, method: str, url: str, **kw: Any) -> Obj | None:
        try:
            resp = await self._client.request(method, url, **kw)
        except httpx.HTTPError as e:
            raise KubeError(f"{method} {url}: {type(e).__name__}: {e}") from None
        if resp.status_code == 404:
            return None
        if resp.status_code >= 400:
            try:
                message = resp.json().get("message", resp.text)
            except ValueError:
                message = resp.text
            raise KubeError(f"{method} {url}: HTTP {resp.status_code}: {message}", resp.status_code)
        return resp.json() if resp.content else {}

    async def get(self, res: tuple[str, str], namespace: str, name: str) -> Obj | None:
        """The object, or None when it does not exist."""
        return await self._call("GET", self._url(res, namespace, name))

    async def list(
        self, res: tuple[str, str], namespace: str, labels: dict[str, str] | None = None
    ) -> list[Obj]:
        """Objects matching every label (also filtered here: some servers ignore selectors)."""
        params = {}
        if labels:
            params["labelSelector"] = ",".join(f"{k}={v}" for k, v in labels.items())
        data = await self._call("GET", self._url(res, namespace), params=params) or {}
        items = data.get("items", [])
        return (
            [
                o
                for o in items
                if all(
                    o.get("metadata", {}).get("labels", {}).get(k) == v for k, v in labels.items()
                )
            ]
            if labels
            else items
        )

    async def create(self, res: tuple[str, str], obj: Obj) -> Obj:
        """Create ``obj`` in its namespace."""
        ns = obj["metadata"]["namespace"]
        out = await self._call("POST", self._url(res, ns), json=obj)
        assert out is not None, f"create {res[1]}/{obj['metadata']['name']} answered 404"
        return out

    async def patch(
        self, res: tuple[str, str], namespace: str, name: str, patch: Obj, status: bool = False
    ) -> Obj | None:
        """Merge-patch the object (or its status subresource)."""
        url = self._url(res, namespace, name) + ("/status" if status else "")
        headers = {"Content-Type": "application/merge-patch+json"}
        return await self._call("PATCH", url, json=patch, headers=headers)

    async def delete(self, res: tuple[str, str], namespace: str, name: str) -> bool:
        """Delete; False when it was already gone."""
        return await self._call("DELETE", self._url(res, namespace, name)) is not None
