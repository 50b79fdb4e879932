"""Chaos suite: every fault scenario under steady load on a real 3-node Ray cluster.

The cluster is ``ray.cluster_utils.Cluster`` (three raylets on 127.0.0.1;
node loss stops one for real). The deployment keeps its state in a real
``redis-server`` (the Redis outage stops that process), runs 3 expert
workers with every expert on 2 of them, 1 spare worker and 2 engines.
Each scenario's JSON report is printed and written to ``chaos-reports/``
under the test's temporary directory; what it must show:
no request failed or was lost, no greedy output differs from the fault-free
run, and the deployment is whole again (every expert back to 2 replicas on
live workers, 3 live workers, controller and engines answering).
"""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from elasticmoe.chaos import run_scenario
from elasticmoe.chaos.cluster import drill
from elasticmoe.cli.main import app
from elasticmoe.model.init_model import init_model

from redis_server import RedisServer

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def drill_injector(tmp_path_factory):
    """(injector, report dir) for the drill deployment, its state in a real redis-server."""
    ckpt = init_model("mixtral", "tiny", tmp_path_factory.mktemp("chaos") / "ckpt")
    reports = tmp_path_factory.mktemp("chaos-reports")
    with RedisServer(persist=True) as redis, drill(str(ckpt), redis=redis) as injector:
        yield injector, reports


def _check(report: dict, reports) -> None:
    print(json.dumps(report, indent=1))
    (reports / f"{report['scenario']}.json").write_text(json.dumps(report, indent=1))
    r = report["requests"]
    assert r["sent"] > 0 and r["completed"] == r["sent"], report["errors"]
    assert r["failed"] == 0 and r["lost"] == 0, report["errors"]
    assert report["differing_outputs"] == 0
    assert report["whole_at_end"]


def test_slow_worker_via_cli_is_avoided(drill_injector):
    """`elasticmoe chaos` in this (already connected) process: 200 ms on one worker."""
    _, reports = drill_injector
    result = CliRunner().invoke(
        app,
        [
            "chaos",
            "--scenario", "slow-worker",
            "--duration", "12",
            "--baseline", "5",
            "--deployment", "chaos",
        ],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout[result.stdout.index("{") :])
    _check(report, reports)
    fault = report["faults"][0]
    assert fault["delay_ms"] == 200.0
    assert fault["avoided_after_s"] is not None  # every engine stopped sending it rows


def test_engine_kill(drill_injector):
    injector, reports = drill_injector
    report = run_scenario(injector, "engine-kill", 15, before_s=5)
    _check(report, reports)
    assert report["faults"][0]["restored_s"] is not None
    # the killed engine's requests ran again on the other one
    assert report["requests"]["rerun_on_another_engine"] >= 1


def test_redis_outage(drill_injector):
    injector, reports = drill_injector
    report = run_scenario(injector, "redis-outage", 10, before_s=5)
    _check(report, reports)
    notes = report["notes"]
    assert notes["change_during_outage"].startswith("refused"), notes
    assert "paused" in notes["change_during_outage"]
    assert notes["change_after_outage"] == "applied"


def test_controller_kill_during_migration(drill_injector):
    injector, reports = drill_injector
    report = run_scenario(injector, "controller-kill", 10, before_s=5)
    _check(report, reports)
    # the restarted controller found the half-done migration in the journal
    recovered = report["notes"]["recovered_operations"]
    assert [op["kind"] for op in recovered] == ["migrate"], recovered


def test_worker_kill_every_10s_for_60s(drill_injector):
    injector, reports = drill_injector
    report = run_scenario(injector, "worker-kill", 60, before_s=5, interval_s=10)
    _check(report, reports)
    assert len(report["faults"]) == 6
    # whole again after the last kill; after the others, if recovery beat the next kill
    # (on a loaded machine a replacement worker can take longer than 10 s to start)
    assert report["faults"][-1]["restored_s"] is not None


def test_node_loss(drill_injector):
    injector, reports = drill_injector
    report = run_scenario(injector, "node-loss", 15, before_s=5)
    _check(report, reports)
    assert report["faults"][0]["target"]["workers"]  # the node held workers
