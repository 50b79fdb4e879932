"""kmock's KubernetesEmulator with the bits of an API server that kopf relies on.

kmock 0.8 keeps objects as plain JSON and serves lists and real watch streams,
which is most of what an operator needs. What it leaves out, and kopf needs:

- discovery verbs: ``kmock.resources[...] = ResourceInfo(...)`` without ``verbs``
  is served as ``verbs: []``, and kopf drops such a resource ("Non-watchable
  resources will not be served"). :func:`serve_api` registers kmock's bundled
  built-in resources (with their verbs, and ``namespaces``, whose discovery kopf
  waits for before it opens any watch), the MoEDeployment CRD as the API server
  would serve it once established, and KubeRay's RayCluster;
- ``metadata.resourceVersion``: kopf's JSON patches (finalizers, progress) start
  with ``test /metadata/resourceVersion``; without one on the object every patch
  fails. :class:`ApiServerEmulator` stamps a new one on each write, plus ``uid``,
  ``creationTimestamp`` and ``generation`` (bumped when ``spec`` changes), and
  answers a failed ``test`` with 422 and a stale ``resourceVersion`` in a merge
  patch with 409 Conflict, as the API server does (kmock answers 500);
- a gap-free watch: kmock lists the objects for a new watch stream, releases its
  lock, and only then subscribes to its event bus, so a write that lands in
  between is never streamed (kopf then waits for an event that does not come:
  a finalizer patch that lost a race stalls the object until the next change).
  The emulator subscribes first, then lists, and honours the watch's
  ``resourceVersion`` (what the list answered) as the API server does;
- ``GET /api/v1/namespaces``: kmock's path parser reads it as the start of a
  namespaced URL and fails, so kopf's namespace listing for ``--namespace=...``
  gets HTTP 500. The emulator answers the list and keeps the watch open (the
  tests never add or remove namespaces while an operator runs).

:meth:`ApiServerEmulator.hold` keeps writes to one resource from landing, so a
test can stop the operator between two writes of one reconcile.
"""

from __future__ import annotations

import asyncio
import copy
import dataclasses
import datetime
import itertools
import json
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import aiohttp.web
import attrs
import jsonpatch
import kmock as km

from operators.elasticmoe_operator import crd

VERBS = {"get", "list", "watch", "create", "update", "patch", "delete", "deletecollection"}
NAMESPACES = km.resource("", "v1", "namespaces")
CRDS = km.resource("apiextensions.k8s.io", "v1", "customresourcedefinitions")
DEPLOYMENTS = km.resource(crd.GROUP, crd.VERSION, crd.PLURAL)
RAYCLUSTERS = km.resource("ray.io", "v1", "rayclusters")


@dataclasses.dataclass
class Hold:
    """Writes held at the server: ``arrived`` is set when the first one waits;
    :meth:`drop` answers them 503 (they never land) and lets later ones through."""

    _remove: Callable[[], object]
    arrived: asyncio.Event = dataclasses.field(default_factory=asyncio.Event)
    dropped: asyncio.Event = dataclasses.field(default_factory=asyncio.Event)

    def drop(self) -> None:
        """Answer the held writes 503, as an API server that went away would."""
        self._remove()
        self.dropped.set()


def _conflict(message: str) -> km.KubernetesError:
    return km.KubernetesError(status=409, reason="Conflict", message=message)


@attrs.define(kw_only=True)
class ApiServerEmulator(km.KubernetesEmulator):
    """KubernetesEmulator plus resource versions, generations and conflict answers."""

    # Objects a test puts in ``kmock.objects`` directly carry version "1" or none.
    _versions: Iterator[int] = attrs.field(factory=lambda: itertools.count(2), init=False)
    _last_version: int = attrs.field(default=1, init=False)
    _holds: dict[tuple[km.resource, km.action], Hold] = attrs.field(factory=dict, init=False)

    def hold(self, resource: km.resource, action: km.action) -> Hold:
        """Keep writes (``km.action.CREATE`` or ``UPDATE``) of ``resource`` from landing."""
        hold = Hold(lambda: self._holds.pop((resource, action), None))
        self._holds[resource, action] = hold
        return hold

    async def __call__(self, raw_request: aiohttp.web.BaseRequest) -> aiohttp.web.StreamResponse:
        if raw_request.method == "GET" and raw_request.path.rstrip("/") == "/api/v1/namespaces":
            return await self._serve_namespaces(raw_request)
        return await super().__call__(raw_request)

    async def _serve_namespaces(
        self, raw_request: aiohttp.web.BaseRequest
    ) -> aiohttp.web.StreamResponse:
        items = [
            obj.raw
            for (res, _, _), obj in self.objects.items()
            if res == NAMESPACES and not obj.deleted
        ]
        if raw_request.query.get("watch") != "true":
            return aiohttp.web.json_response(
                {
                    "kind": "NamespaceList",
                    "apiVersion": "v1",
                    "metadata": {"resourceVersion": "1"},
                    "items": items,
                }
            )
        response = aiohttp.web.StreamResponse()
        await response.prepare(raw_request)
        for item in items:
            await response.write(json.dumps({"type": "ADDED", "object": item}).encode() + b"\n")
        while raw_request.transport is not None and not raw_request.transport.is_closing():
            await asyncio.sleep(0.1)  # no namespace events: idle until the client goes away
        return response

    async def _serve_list(self, request: km.Request) -> Any:
        out = await super()._serve_list(request)
        out["metadata"]["resourceVersion"] = str(self._last_version)
        return out

    async def _serve_watch(self, request: km.Request) -> AsyncIterator[Any]:
        yield b""  # send the headers now, even if nothing happens for a while
        since = request.params.get("resourceVersion", "")
        since_version = int(since) if since.isdigit() else None
        bus = self._buses[request.resource]
        async with self._lock:  # no write lands between the mark and the listing
            mark = await bus.mark()
            current = [
                obj.raw
                for (res, ns, name), obj in self.objects.items()
                if self._matches(request, res, ns, name) and not obj.deleted
            ]
        try:
            for raw in current:
                if since_version is None or _version(raw) > since_version:
                    yield {"type": "ADDED" if since_version is None else "MODIFIED", "object": raw}
            async for event in mark:  # pragma: no branch  # ends when the client goes away
                meta = event.get("object", {}).get("metadata", {})
                if self._matches(
                    request, request.resource, meta.get("namespace"), meta.get("name")
                ):
                    yield event
        finally:
            await bus.unmark(mark)

    @staticmethod
    def _matches(request: km.Request, res: km.resource, namespace: str | None, name: str) -> bool:
        return (
            res == request.resource
            and (request.namespace is None or namespace == request.namespace)
            and (request.name is None or name == request.name)
        )

    def _current(self, request: km.Request) -> dict[str, Any] | None:
        key = (request.resource, request.namespace, request.name)
        if key not in self.objects or self.objects[key].deleted:
            return None
        return copy.deepcopy(dict(self.objects[key].raw))

    async def _handle(self, request: km.Request) -> aiohttp.web.StreamResponse:
        if request.resource is not None and request.action in (km.action.CREATE, km.action.UPDATE):
            hold = self._holds.get((request.resource, request.action))
            if hold is not None:
                hold.arrived.set()
                await hold.dropped.wait()
                raise km.KubernetesError(
                    status=503, reason="ServiceUnavailable", message="held by the test, dropped"
                )
            self._stamp(request)
        try:
            return await super()._handle(request)
        except jsonpatch.JsonPatchTestFailed as e:
            # The API server's answer to a failed JSON-patch test; kopf retries on the next event.
            raise km.KubernetesError(status=422, reason="Invalid", message=str(e)) from None

    def _stamp(self, request: km.Request) -> None:
        """What the API server adds on a write: versions, uid, timestamps, generation."""
        self._last_version = next(self._versions)
        version = str(self._last_version)
        data = request.data
        if request.action == km.action.CREATE and isinstance(data, dict):
            meta = data.setdefault("metadata", {})
            meta.setdefault("uid", str(uuid.uuid4()))
            meta.setdefault(
                "creationTimestamp",
                datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
            )
            meta.setdefault("generation", 1)
            meta["resourceVersion"] = version
            return
        current = self._current(request)
        if current is None:
            return  # kmock answers 404
        meta = current.get("metadata", {})
        if isinstance(data, dict):  # merge patch
            wanted = (data.get("metadata") or {}).get("resourceVersion")
            if wanted is not None and wanted != meta.get("resourceVersion"):
                raise _conflict(
                    f"the object has been modified: resourceVersion {wanted} is not the "
                    f"current {meta.get('resourceVersion')}"
                )
            patch_meta: dict[str, Any] = {"resourceVersion": version}
            if request.subresource is None and "spec" in data:
                merged_spec = _merge(current.get("spec", {}), data["spec"])
                if merged_spec != current.get("spec"):
                    patch_meta["generation"] = int(meta.get("generation", 1)) + 1
            data["metadata"] = {**(data.get("metadata") or {}), **patch_meta}
        elif isinstance(data, list):  # JSON patch: the version after kopf's own test op
            touches_spec = request.subresource is None and any(
                str(op.get("path", "")).startswith("/spec") for op in data
            )
            data.append({"op": "add", "path": "/metadata/resourceVersion", "value": version})
            if touches_spec:
                generation = int(meta.get("generation", 1)) + 1
                data.append({"op": "add", "path": "/metadata/generation", "value": generation})


def _version(raw: dict[str, Any]) -> int:
    value = str(raw.get("metadata", {}).get("resourceVersion", ""))
    return int(value) if value.isdigit() else 0


def _merge(base: Any, patch: Any) -> Any:
    """JSON merge patch (RFC 7386), to tell whether a patch changes ``spec``."""
    if not isinstance(patch, dict):
        return patch
    out = dict(base) if isinstance(base, dict) else {}
    for key, value in patch.items():
        if value is None:
            out.pop(key, None)
        else:
            out[key] = _merge(out.get(key), value)
    return out


def serve_api(kmock: km.KubernetesEmulator, namespaces: tuple[str, ...] = ("models",)) -> None:
    """Built-in resources, the MoEDeployment CRD (established), KubeRay's RayCluster."""
    kmock.resources.load_bundled()
    definition = crd.crd()
    (version,) = [v for v in definition["spec"]["versions"] if v["served"]]
    names = definition["spec"]["names"]
    kmock.resources[DEPLOYMENTS] = km.ResourceInfo(
        kind=names["kind"],
        singular=names["singular"],
        shortnames=set(names.get("shortNames", [])),
        categories=set(names.get("categories", [])),
        namespaced=definition["spec"]["scope"] == "Namespaced",
        subresources=set(version.get("subresources", {})),
        verbs=VERBS,
    )
    kmock.objects[CRDS, None, definition["metadata"]["name"]] = {
        **definition,
        "metadata": {**definition["metadata"], "resourceVersion": "1"},
        "status": {"conditions": [{"type": "Established", "status": "True"}]},
    }
    kmock.resources[RAYCLUSTERS] = km.ResourceInfo(
        kind="RayCluster", singular="raycluster", namespaced=True, subresources={"status"},
        verbs=VERBS,
    )  # fmt: skip
    for name in namespaces:
        kmock.objects[NAMESPACES, None, name] = {
            "apiVersion": "v1",
            "kind": "Namespace",
            "metadata": {"name": name, "resourceVersion": "1"},
        }
