"""``elasticmoe serve``: start a deployment and its HTTP front, stop both cleanly."""

from __future__ import annotations

import ipaddress
import os
import signal
import socket
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal
from unittest import mock
from urllib.parse import quote, urlsplit, urlunsplit

import yaml
from pydantic import Field, ValidationError, field_validator, model_validator
from rich.console import Console

from elasticmoe.control.cluster import CONTROLLER_NAME, ENGINE_PREFIX
from elasticmoe.control.deployment import Deployment
from elasticmoe.control.deployment_config import DeploymentConfig
from elasticmoe.model.registry import resolve_model
from elasticmoe.serve.app import ServeSettings
from elasticmoe.serve.ingress import (
    ENABLE_VAR,
    MAX_ONGOING_REQUESTS,
    MIN_PORT_VAR,
    direct_ingress_environment,
    started_with_direct_ingress,
)

console = Console(stderr=True)


class ServeConfig(DeploymentConfig):
    """Everything ``elasticmoe serve`` runs: a deployment plus its HTTP front."""

    model: str = "default"
    served_model_name: str | None = Field(None, description="name clients use (default: model)")
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=1, le=65535)
    api_keys: list[str] = Field(
        default_factory=list,
        description="Bearer keys for /v1 (none: /v1 is open); better given by "
        "ELASTICMOE_API_KEYS or ELASTICMOE_API_KEYS_FILE than in a file others read",
    )
    admin_api_keys: list[str] = Field(
        default_factory=list,
        description="Bearer keys for /admin, separate from api_keys "
        "(ELASTICMOE_ADMIN_API_KEYS or ELASTICMOE_ADMIN_API_KEYS_FILE)",
    )
    allow_open_admin: bool = Field(
        False,
        description="serve /admin without admin_api_keys on a non-loopback host "
        "(anyone who reaches the port can then reconfigure the deployment)",
    )
    max_in_flight: int = Field(
        256,
        ge=1,
        le=MAX_ONGOING_REQUESTS,
        description="HTTP requests at once; over it: 429",
    )
    max_queued_per_engine: int = Field(
        1024,
        ge=1,
        description="engine requests (prompts x n) admitted per engine; over it: 429, and a "
        "single request needing more than all engines hold: 400",
    )
    request_timeout_s: float = Field(
        600.0,
        gt=0,
        le=86400,
        description="a request still running after this is aborted in the engine and "
        "answered 504 (a stream ends with an error event)",
    )
    stream_interval: int = Field(
        1,
        ge=1,
        le=1024,
        description="a stream sends a completion's tokens once this many are new (its first "
        "tokens and its last at once): fewer, larger SSE chunks cost the server less per "
        "token; 1 sends every engine step's tokens (vLLM's --stream-interval)",
    )
    ingress: Literal["auto", "direct", "proxy"] = Field(
        "auto",
        description="direct: the HTTP front itself listens on host:port (Ray Serve's direct "
        "ingress), so a streamed chunk skips a process; on a Ray instance `elasticmoe "
        "serve` starts itself, or a cluster started with direct ingress for this port (the "
        "operator's head pod). proxy: Ray Serve's HTTP proxy listens there and forwards to "
        "the front. auto: direct where it can be, else proxy",
    )
    max_body_bytes: int = Field(1 << 20, ge=1024)
    shutdown_timeout_s: float = Field(30.0, ge=0)

    @field_validator("api_keys", "admin_api_keys")
    @classmethod
    def _keys_are_plain(cls, keys: list[str]) -> list[str]:
        for i, key in enumerate(keys):
            if not key or key != key.strip():
                raise ValueError(
                    f"key {i} is empty or has leading/trailing whitespace; "
                    "a padded key would never match what clients send"
                )
            if len(key) < 8:
                raise ValueError(f"key {i} is {len(key)} characters; use at least 8")
        return keys

    @model_validator(mode="after")
    def _check_engine_and_router(self) -> ServeConfig:
        # Typed at load, so a typo in engine.* or router.* fails here, naming the key,
        # not later inside an engine actor.
        from elasticmoe.engine.config import EngineConfig
        from elasticmoe.router.router import RouterConfig

        for section, model, extra in (
            ("engine", EngineConfig, {"model": self.model}),
            ("router", RouterConfig, {}),
        ):
            values = getattr(self, section)
            if section == "engine" and "model" in values:
                raise ValueError("engine.model: set the model at the top level, not under engine")
            try:
                model.model_validate({**extra, **values})
            except ValidationError as e:
                errors = "; ".join(
                    f"{section}.{'.'.join(str(p) for p in err['loc'])}: {err['msg']}"
                    for err in e.errors()
                )
                raise ValueError(errors) from None
        return self

    @model_validator(mode="after")
    def _admin_is_not_open_to_the_network(self) -> ServeConfig:
        if not self.admin_api_keys and not self.allow_open_admin and not is_loopback(self.host):
            raise ValueError(
                f"host={self.host!r} is reachable from other machines and admin_api_keys is "
                "empty: anyone could reconfigure the deployment through /admin. Set "
                "ELASTICMOE_ADMIN_API_KEYS (or admin_api_keys), or allow_open_admin: true"
            )
        return self


def is_loopback(host: str) -> bool:
    """Whether ``host`` only accepts connections from this machine."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


# setting -> environment variable; NAME_FILE names a file holding the value instead
SECRET_ENV = {"api_keys": "ELASTICMOE_API_KEYS", "admin_api_keys": "ELASTICMOE_ADMIN_API_KEYS"}
REDIS_PASSWORD_ENV = "ELASTICMOE_REDIS_PASSWORD"


def _secret_from_env(name: str, environ: Mapping[str, str]) -> str | None:
    """``$NAME``, else the contents of the file ``$NAME_FILE`` (a Kubernetes Secret
    volume), else None. A trailing newline of the file is not part of the secret."""
    if name in environ:
        return environ[name]
    path = environ.get(f"{name}_FILE")
    if not path:
        return None
    try:
        return Path(path).read_text().removesuffix("\n")
    except OSError as e:
        raise ValueError(f"{name}_FILE={path}: cannot read the file: {e.strerror or e}") from None


def _with_password(url: str, password: str) -> str:
    """``url`` with ``password`` percent-encoded into it (``@``, ``:``, ``/`` and the like
    are safe), unless the URL already carries one."""
    parts = urlsplit(url)
    if parts.scheme not in ("redis", "rediss") or parts.password is not None:
        return url
    user = quote(parts.username or "", safe="")
    netloc = f"{user}:{quote(password, safe='')}@{parts.hostname}"
    if parts.port:
        netloc += f":{parts.port}"
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))


def secrets_from_env(data: dict[str, Any], environ: Mapping[str, str]) -> dict[str, Any]:
    """Settings with the keys and the Redis password the environment holds: secrets
    reach ``elasticmoe serve`` by environment or file, never by command line (Ray shows
    a driver's argv on its dashboard)."""
    data = dict(data)
    for setting, env in SECRET_ENV.items():
        value = _secret_from_env(env, environ)
        if value is not None:
            given = [k for k in value.replace("\n", ",").split(",") if k != ""]
            data[setting] = [*data.get(setting, []), *given]
    password = _secret_from_env(REDIS_PASSWORD_ENV, environ)
    if password is not None and data.get("state_store"):
        data["state_store"] = _with_password(data["state_store"], password)
    return data


def load_serve_config(
    path: str | Path | None,
    overrides: dict[str, Any],
    environ: Mapping[str, str] | None = None,
) -> ServeConfig:
    """Read a YAML config (optional), apply CLI overrides and the secrets of the
    environment (:func:`secrets_from_env`); errors name the field."""
    data: dict[str, Any] = {}
    if path is not None:
        try:
            loaded = yaml.safe_load(Path(path).read_text())
        except (OSError, yaml.YAMLError) as e:
            raise ValueError(f"{path}: cannot read config: {e}") from e
        if not isinstance(loaded, dict):
            raise ValueError(f"{path}: expected a mapping of settings")
        data.update(loaded)
    data.update({k: v for k, v in overrides.items() if v is not None})
    environ = os.environ if environ is None else environ
    config = ServeConfig(**secrets_from_env(data, environ))
    direct_ingress(config, environ)  # refuses direct where serve would join a cluster
    return config


def starts_own_ray(config: ServeConfig, environ: Mapping[str, str]) -> bool:
    """Whether ``elasticmoe serve`` starts a Ray instance of its own (on this machine),
    rather than join a cluster."""
    import ray

    return not (config.ray_address or environ.get("RAY_ADDRESS") or ray.is_initialized())


def direct_ingress(config: ServeConfig, environ: Mapping[str, str] | None = None) -> bool:
    """Whether the HTTP front listens on ``config.port`` itself (see ``ServeConfig.ingress``).

    It can where ``elasticmoe serve`` starts its own Ray instance (and sets Serve's
    variables first), or where the cluster it joins was started with them for this port
    (:mod:`elasticmoe.serve.ingress`; the Kubernetes operator's head pod)."""
    environ = os.environ if environ is None else environ
    possible = starts_own_ray(config, environ) or started_with_direct_ingress(environ, config.port)
    if config.ingress == "direct" and not possible:
        raise ValueError(
            "ingress: direct needs the Ray instance elasticmoe serve starts itself, or a "
            f"cluster started with Ray Serve's direct ingress on port {config.port} "
            f"({ENABLE_VAR}=1, {MIN_PORT_VAR}={config.port}); this one joins "
            "a cluster without it (use ingress: proxy or auto)"
        )
    return config.ingress == "direct" or (config.ingress == "auto" and possible)


def check_port_free(config: ServeConfig, environ: Mapping[str, str] | None = None) -> None:
    """Raise ``ValueError`` naming ``port`` if the HTTP front (or the proxy) would listen on
    this machine and nothing here can listen on ``host:port``: found before any process
    starts, not as a failed Serve deployment afterwards. Where serve joins a cluster
    through the proxy, the proxy's node may be another, so nothing is checked."""
    environ = os.environ if environ is None else environ
    if not (direct_ingress(config, environ) or starts_own_ray(config, environ)):
        return
    host, port = config.host, config.port
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the HTTP server binds
        try:
            s.bind((host, port))
        except OSError as e:
            raise ValueError(f"port: cannot listen on {host}:{port}: {e.strerror}") from None


def run_server(config: ServeConfig, stop: threading.Event | None = None) -> None:
    """Start everything, print the URL, serve until SIGINT/SIGTERM (or ``stop``), shut down."""
    import ray
    from ray import serve

    from elasticmoe.serve.app import OpenAIServer

    stop = stop or threading.Event()
    model_dir = resolve_model(config.model)
    deploy_fields = set(DeploymentConfig.model_fields)
    dep_cfg = DeploymentConfig(
        **{k: v for k, v in config.model_dump().items() if k in deploy_fields},
    ).model_copy(update={"model": str(model_dir)})
    started = time.monotonic()
    direct = direct_ingress(config)
    # The Ray instance the deployment starts copies this process's environment to all of
    # its processes, Serve's controller and the ingress replica among them.
    with mock.patch.dict(os.environ, direct_ingress_environment(config.port) if direct else {}):
        deployment = Deployment(dep_cfg, progress=True).start()
    handle = None
    try:
        with console.status("starting the HTTP front (Ray Serve)"):
            # direct: the front takes config.port, and the proxy any free port
            proxy_port = 0 if direct else config.port
            serve.start(http_options={"host": config.host, "port": proxy_port})
            settings = ServeSettings(
                model_name=config.served_model_name or str(config.model),
                model_dir=str(model_dir),
                deployment=config.name,
                mode=config.mode,
                engine_names=[
                    f"{ENGINE_PREFIX}{config.name}-{i}" for i in range(config.num_engines)
                ],
                controller_name=(
                    f"{CONTROLLER_NAME}-{config.name}" if config.mode == "distributed" else None
                ),
                api_keys=config.api_keys,
                admin_api_keys=config.admin_api_keys,
                max_in_flight=config.max_in_flight,
                max_queued_per_engine=config.max_queued_per_engine,
                request_timeout_s=config.request_timeout_s,
                stream_interval=config.stream_interval,
                max_body_bytes=config.max_body_bytes,
                max_model_len=config.engine.get("max_model_len"),
            )
            front = OpenAIServer
            if direct:
                # the port is this node's (the head pod's, on Kubernetes): the front runs here
                node = {"ray.io/node-id": ray.get_runtime_context().get_node_id()}
                front = OpenAIServer.options(
                    ray_actor_options={"num_cpus": 0, "label_selector": node}
                )
            handle = serve.run(
                front.bind(settings.model_dump()), name="elasticmoe", route_prefix="/"
            )
        url = f"http://{config.host}:{config.port}"
        console.print(
            f"[green]elasticmoe is serving[/green] {settings.model_name!r} at {url}/v1 "
            f"({config.mode}, {config.num_engines} engine(s)"
            + (f", {config.num_workers} expert workers" if config.mode == "distributed" else "")
            + ("; direct ingress" if direct else "; through Ray Serve's proxy")
            + f"; ready in {time.monotonic() - started:.1f}s)\n"
            f"  try: curl {url}/v1/models   health: {url}/health   metrics: {url}/metrics"
        )
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: stop.set())
        stop.wait()
        console.print("shutting down: finishing in-flight requests ...")
    finally:
        # Order: the front stops admitting and waits for its requests; the engines
        # drain (the front still up, so what they finish reaches its clients); only
        # then does the front go away, and last the actors.
        left = 0
        if handle is not None:
            try:
                left = handle.drain.remote(config.shutdown_timeout_s).result()
            except Exception as e:  # the front may already be gone
                console.print(f"[yellow]drain failed: {e}[/yellow]")
            _drain_engines(deployment, config.shutdown_timeout_s)
            serve.shutdown()
        deployment.shutdown(timeout=config.shutdown_timeout_s)
        if left:
            console.print(f"[yellow]{left} request(s) were still running and were failed[/yellow]")
        console.print("[green]stopped[/green]: no actors left")


def _drain_engines(deployment: Deployment, timeout: float) -> None:
    """Let every engine finish what it holds (bounded by ``timeout``) and stop stepping."""
    import ray

    refs = [e.shutdown.remote(timeout) for e in deployment.engines]
    try:
        ray.get(refs, timeout=timeout + 5)
    except Exception as e:  # a dead engine cannot drain; deployment.shutdown kills it
        console.print(f"[yellow]engine drain failed: {e}[/yellow]")
