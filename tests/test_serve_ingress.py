"""Direct ingress where ``elasticmoe serve`` joins a cluster, as in the operator's head pod:
the cluster's nodes are started with Ray Serve's direct-ingress variables for the serving
port, and ``elasticmoe serve`` (with the same environment, ``ray_address`` set) lets the
front listen on that port itself.

The cluster is ``ray.cluster_utils.Cluster`` on 127.0.0.1, two real raylets and a GCS;
the server is ``run_server`` in this process, since joining that cluster from a child
process would leave the loopback address (``ray.init`` turns 127.0.0.1 into the outward
IP). The front must run on the node ``elasticmoe serve`` runs on (the head pod, which the
Service targets): unpinned, it landed on the other node in one of two tries.
"""

from __future__ import annotations

import os
import threading
from unittest import mock

import httpx
import openai
import ray
from test_serve_e2e import free_port, listener_of
from waiting import wait_for

from elasticmoe.chaos.cluster import local_cluster
from elasticmoe.model.init_model import init_model
from elasticmoe.serve.ingress import direct_ingress_environment
from elasticmoe.serve.server import load_serve_config, run_server


def test_a_cluster_started_for_direct_ingress_gets_it(tmp_path):
    ckpt = init_model("mixtral", "tiny", tmp_path / "tiny")
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    stop = threading.Event()
    seen: dict = {}

    def client() -> None:
        try:
            wait_for(lambda: _healthy(url), "the front to answer", timeout_s=240)
            seen["listener"] = listener_of(port)
            c = openai.OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0)
            r = c.completions.create(model=str(ckpt), prompt=[5, 9], max_tokens=4, temperature=0)
            seen["tokens"] = r.usage.completion_tokens
            # the GCS's actor table (Ray's state API needs the dashboard, off here)
            seen["front_nodes"] = [
                a["Address"]["NodeID"]
                for a in ray._private.state.actors().values()
                if a["ActorClassName"].endswith("OpenAIServer") and a["State"] == "ALIVE"
            ]
        except BaseException as e:  # reported by the test below
            seen["error"] = e
        finally:
            stop.set()

    with (
        mock.patch.dict(os.environ, direct_ingress_environment(port)),
        local_cluster(num_nodes=2, cpus_per_node=4) as cluster,
    ):
        config = load_serve_config(
            None,
            {"model": str(ckpt), "mode": "local", "port": port, "ray_address": cluster.address},
        )
        assert config.ingress == "auto"
        here = ray.get_runtime_context().get_node_id()
        checker = threading.Thread(target=client, daemon=True)
        checker.start()
        run_server(config, stop)  # the main thread: it installs signal handlers
        checker.join()
    assert "error" not in seen, seen.get("error")
    assert seen["listener"].startswith("ray::ServeRepli"), seen["listener"]
    assert seen["tokens"] == 4
    assert seen["front_nodes"] == [here]


def _healthy(url: str) -> bool:
    try:
        return httpx.get(f"{url}/health", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False
