"""``elasticmoe serve``: start a deployment and its HTTP front, stop both cleanly."""

from __future__ import annotations

import signal
import threading
import time
from pathlib import Path
from typing import Any

import yaml
from pydantic import Field
from rich.console import Console

from elasticmoe.control.cluster import CONTROLLER_NAME, ENGINE_PREFIX
from elasticmoe.control.deployment import Deployment
from elasticmoe.control.deployment_config import DeploymentConfig
from elasticmoe.model.registry import resolve_model
from elasticmoe.serve.app import ServeSettings

console = Console(stderr=True)


class ServeConfig(DeploymentConfig):
    """Everything ``elasticmoe serve`` runs: a deployment plus its HTTP front."""

    model: str = "default"
    served_model_name: str | None = Field(None, description="name clients use (default: model)")
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=1, le=65535)
    api_keys: list[str] = Field(default_factory=list)
    max_in_flight: int = Field(256, ge=1)
    max_body_bytes: int = Field(1 << 20, ge=1024)
    shutdown_timeout_s: float = Field(30.0, ge=0)


def load_serve_config(path: str | Path | None, overrides: dict[str, Any]) -> ServeConfig:
    """Read a YAML config (optional) and apply CLI overrides; errors name the field."""
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
    return ServeConfig(**data)


def run_server(config: ServeConfig, stop: threading.Event | None = None) -> None:
    """Start everything, print the URL, serve until SIGINT/SIGTERM (or ``stop``), shut down."""
    from ray import serve

    from elasticmoe.serve.app import OpenAIServer

    stop = stop or threading.Event()
    model_dir = resolve_model(config.model)
    deploy_fields = set(DeploymentConfig.model_fields)
    dep_cfg = DeploymentConfig(
        **{k: v for k, v in config.model_dump().items() if k in deploy_fields},
    ).model_copy(update={"model": str(model_dir)})
    started = time.monotonic()
    deployment = Deployment(dep_cfg, progress=True).start()
    handle = None
    try:
        with console.status("starting the HTTP front (Ray Serve)"):
            serve.start(http_options={"host": config.host, "port": config.port})
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
                max_in_flight=config.max_in_flight,
                max_body_bytes=config.max_body_bytes,
                max_model_len=config.engine.get("max_model_len"),
            )
            handle = serve.run(
                OpenAIServer.bind(settings.model_dump()), name="elasticmoe", route_prefix="/"
            )
        url = f"http://{config.host}:{config.port}"
        console.print(
            f"[green]elasticmoe is serving[/green] {settings.model_name!r} at {url}/v1 "
            f"({config.mode}, {config.num_engines} engine(s)"
            + (f", {config.num_workers} expert workers" if config.mode == "distributed" else "")
            + f"; ready in {time.monotonic() - started:.1f}s)\n"
            f"  try: curl {url}/v1/models   health: {url}/health   metrics: {url}/metrics"
        )
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: stop.set())
        stop.wait()
        console.print("shutting down: finishing in-flight requests ...")
    finally:
        left = 0
        if handle is not None:
            try:
                left = handle.drain.remote(config.shutdown_timeout_s).result()
            except Exception as e:  # the front may already be gone
                console.print(f"[yellow]drain failed: {e}[/yellow]")
            serve.shutdown()
        deployment.shutdown(timeout=config.shutdown_timeout_s)
        if left:
            console.print(f"[yellow]{left} request(s) were still running and were failed[/yellow]")
        console.print("[green]stopped[/green]: no actors left")
