"""Reach a running deployment's controller over Ray (CLI, admin API, operator)."""

from __future__ import annotations

import os
from typing import Any

from elasticmoe.control.cluster import CONTROLLER_NAME, NAMESPACE


class ControllerNotFoundError(RuntimeError):
    """No controller of that deployment is running on the Ray cluster."""


class ControllerClient:
    """Calls the named controller actor of deployment ``name``.

    Connects to Ray at ``address`` (default ``RAY_ADDRESS``, else the local
    cluster via ``"auto"``) unless this process is already connected.
    """

    def __init__(self, name: str = "default", address: str | None = None, timeout: float = 600):
        import ray

        if not ray.is_initialized():
            try:
                ray.init(
                    address=address or os.environ.get("RAY_ADDRESS") or "auto",
                    namespace=NAMESPACE,
                    log_to_driver=False,
                )
            except ConnectionError as e:
                raise ControllerNotFoundError(
                    f"no Ray cluster at {address or os.environ.get('RAY_ADDRESS') or 'auto'}: {e}; "
                    "is elasticmoe running? (set RAY_ADDRESS or --ray-address)"
                ) from e
        try:
            self.actor = ray.get_actor(f"{CONTROLLER_NAME}-{name}", namespace=NAMESPACE)
        except ValueError:
            raise ControllerNotFoundError(
                f"no elasticmoe deployment named {name!r} on this Ray cluster"
            ) from None
        self.timeout = timeout

    def call(self, method: str, *args: Any) -> Any:
        """Invoke a controller method and wait for its result."""
        import ray

        return ray.get(getattr(self.actor, method).remote(*args), timeout=self.timeout)
