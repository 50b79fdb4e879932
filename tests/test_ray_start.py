"""Starting a local Ray instance on a loaded machine: a start that fails is retried, and
the failed start's own processes (its GCS and raylet) are stopped, not left behind.

The failure is made by Ray's own check: the wait for the new raylet to register with the
GCS raises, as it does when the 30 s it allows run out; everything else is a real start.
"""

from __future__ import annotations

import os
from pathlib import Path
from unittest import mock

import pytest
import ray

from elasticmoe.chaos.cluster import local_cluster
from elasticmoe.control.cluster import start_local_ray

RAY_INIT = {"num_cpus": 1, "include_dashboard": False, "log_to_driver": False}


def ray_daemons() -> list[int]:
    """Pids of the GCS servers and raylets this process started that are still running."""
    pids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:  # the process exited while we looked
            continue
        name = text[text.index("(") + 1 : text.rindex(")")]
        fields = text[text.rindex(")") + 2 :].split()
        state, ppid = fields[0], int(fields[1])
        if ppid == os.getpid() and name in ("gcs_server", "raylet") and state != "Z":
            pids.append(int(stat.parent.name))
    return pids


def failing_registration(*failing_calls: int):
    """``services.get_node`` that raises like a raylet that never registered on the calls
    numbered ``failing_calls`` (from 1), and answers the others."""
    real = ray._private.services.get_node
    calls = {"n": 0}

    def get_node(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] in failing_calls:
            raise Exception("The current node timed out during startup (made by the test)")
        return real(*args, **kwargs)

    return mock.patch.object(ray._private.services, "get_node", get_node)


def stop_ray() -> None:
    # waits for Ray's processes to exit (by default ray.shutdown only signals them)
    ray.shutdown(wait_for_processes=True)


@pytest.fixture
def no_ray():
    stop_ray()
    assert ray_daemons() == []
    yield
    stop_ray()


def test_a_failed_start_is_retried_and_leaves_no_processes(no_ray):
    with failing_registration(1):
        start_local_ray(**RAY_INIT)
    assert ray.is_initialized()
    assert ray.get(ray.remote(lambda: 42).remote()) == 42
    # one GCS and one raylet: the failed start's pair was stopped
    assert len(ray_daemons()) == 2
    stop_ray()
    assert ray_daemons() == []


def test_a_start_that_keeps_failing_raises_and_leaves_no_processes(no_ray):
    with failing_registration(1, 2), pytest.raises(Exception, match="timed out"):
        start_local_ray(attempts=2, **RAY_INIT)
    assert not ray.is_initialized()
    assert ray_daemons() == []


def test_bad_arguments_are_not_retried(no_ray, caplog):
    with pytest.raises(RuntimeError, match="no_such_option"):
        start_local_ray(no_such_option=1)
    assert "did not start" not in caplog.text
    assert ray_daemons() == []


def test_a_cluster_whose_node_fails_to_start_is_started_again(no_ray):
    # call 1 is the head's registration, call 2 the second node's: it fails once
    with failing_registration(2), local_cluster(num_nodes=2, cpus_per_node=1) as cluster:
        assert len([n for n in ray.nodes() if n["Alive"]]) == 2
        assert len(cluster.worker_nodes) == 1
        # the first try's head and its added node were stopped: one GCS, two raylets
        assert len(ray_daemons()) == 3
    assert ray_daemons() == []
