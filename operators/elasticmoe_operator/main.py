"""kopf wiring: each decorator is a one-line call into :mod:`handlers`.

Run in a cluster with ``elasticmoe-operator`` (the Helm chart's Deployment does), or
locally against a kubeconfig with ``kopf run -m operators.elasticmoe_operator.main -A``.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Mapping
from typing import Any

import kopf
import kopf.cli

from operators.elasticmoe_operator import handlers
from operators.elasticmoe_operator.config import OperatorConfig
from operators.elasticmoe_operator.crd import GROUP, PLURAL, VERSION
from operators.elasticmoe_operator.kube import KubeClient

CONFIG = OperatorConfig.from_env()
FINALIZER = f"{GROUP}/finalizer"
_context: handlers.OperatorContext | None = None


def _raw(value: Any) -> Any:
    """kopf's views of the object as plain dicts and lists (what the handlers take)."""
    if isinstance(value, Mapping):
        return {k: _raw(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_raw(v) for v in value]
    return value


def context() -> handlers.OperatorContext:
    """The handlers' context, built at login."""
    assert _context is not None, "login handler has not run"
    return _context


@kopf.on.startup()
def configure(settings: kopf.OperatorSettings, **_: Any) -> None:
    """Our own finalizer name; events only for warnings and errors."""
    settings.persistence.finalizer = FINALIZER
    settings.posting.level = logging.WARNING
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=GROUP)
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(prefix=GROUP)


@kopf.on.login()
def login(**kwargs: Any) -> kopf.ConnectionInfo | None:
    """Service account in a pod, else kubeconfig; the handlers' client uses the same."""
    global _context
    info = kopf.login_with_service_account(**kwargs) or kopf.login_with_kubeconfig(**kwargs)
    if info is not None:
        _context = handlers.OperatorContext(kube=KubeClient(info), config=CONFIG)
    return info


@kopf.on.cleanup()
async def close(**_: Any) -> None:
    """Close the handlers' HTTP connections."""
    if _context is not None:
        await _context.kube.aclose()


@kopf.on.create(GROUP, VERSION, PLURAL)
@kopf.on.update(GROUP, VERSION, PLURAL, field="spec")
@kopf.on.resume(GROUP, VERSION, PLURAL)
async def reconcile(body: kopf.Body, logger: logging.Logger, **_: Any) -> None:
    """Create or update the children."""
    await handlers.reconcile(_raw(body), context(), logger)


@kopf.timer(GROUP, VERSION, PLURAL, interval=CONFIG.scale_interval_s, initial_delay=5)
async def scale(body: kopf.Body, logger: logging.Logger, **_: Any) -> None:
    """Follow the controller's worker demand."""
    await handlers.scale(_raw(body), context(), logger)


@kopf.on.delete(GROUP, VERSION, PLURAL)
async def delete(body: kopf.Body, logger: logging.Logger, **_: Any) -> None:
    """Remove the children."""
    await handlers.delete(_raw(body), context(), logger)


def run() -> None:
    """Entry point ``elasticmoe-operator [kopf run options]`` (default: all namespaces)."""
    args = sys.argv[1:] or ["--all-namespaces"]
    sys.argv = ["kopf", "run", "--standalone", "-m", __name__, *args]
    sys.exit(kopf.cli.main())
