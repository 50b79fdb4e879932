"""Direct ingress: the HTTP front (the Ray Serve ingress replica) listens on the serving
port itself, instead of behind Ray Serve's HTTP proxy.

Ray Serve reads these settings from the environment of every process of the Ray
instance, so they must be there when Ray starts: ``elasticmoe serve`` sets them before it
starts its own instance, and the Kubernetes operator puts them on the head pod, whose
``ray start`` and ``elasticmoe serve`` then share them. No Ray import here: the operator
renders them.
"""

from __future__ import annotations

from collections.abc import Mapping

# what Ray Serve lets the ingress replica hold at once; max_in_flight (our 429) stays within
# it, in ServeConfig and in the operator's CRD alike
MAX_ONGOING_REQUESTS = 2048

ENABLE_VAR = "RAY_SERVE_ENABLE_DIRECT_INGRESS"
MIN_PORT_VAR = "RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT"


def direct_ingress_environment(port: int) -> dict[str, str]:
    """What Ray Serve reads to let the one ingress replica listen on ``port`` itself (its
    proxy still runs, on a port of its own)."""
    return {
        ENABLE_VAR: "1",
        MIN_PORT_VAR: str(port),
        "RAY_SERVE_DIRECT_INGRESS_MAX_HTTP_PORT": str(port + 1),  # exclusive
        # a replica Serve restarts takes the same port at once (default: held back a while)
        "RAY_SERVE_PORT_QUARANTINE_S": "0",
        # the front is drained before Serve stops it (run_server); Serve's own floor of
        # 30 s, for an external load balancer to drop the replica, would only delay the stop
        "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": "0",
    }


def started_with_direct_ingress(environ: Mapping[str, str], port: int) -> bool:
    """Whether ``environ`` carries direct ingress for ``port``: in a pod the operator
    rendered, the cluster this process joins was started with it."""
    return environ.get(ENABLE_VAR) == "1" and environ.get(MIN_PORT_VAR) == str(port)
