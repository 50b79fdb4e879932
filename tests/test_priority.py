"""Background work below serving's priority: which threads are lowered, and only those.

No timings: the tests read each thread's scheduling policy and nice value.
"""

from __future__ import annotations

import asyncio
import os
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from elasticmoe.control.deployment_config import DeploymentConfig
from elasticmoe.core.experts import LogicalExpert
from elasticmoe.experts.priority import lower_current_thread, thread_priority, warm_up
from elasticmoe.experts.service import ExpertServicer, ExpertStore
from elasticmoe.model.init_model import init_model

pytestmark = pytest.mark.skipif(
    not sys.platform.startswith("linux"), reason="per-thread priorities are Linux's"
)


def on_thread(fn: Callable[[], Any]) -> Any:
    """Run ``fn`` on a fresh thread (that is lowered for good) and return its result."""
    out: list[Any] = []
    thread = threading.Thread(target=lambda: out.append(fn()))
    thread.start()
    thread.join()
    return out[0]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("ckpt") / "mixtral-tiny"
    init_model("mixtral", "tiny", path, overwrite=True)
    return path


def test_lowering_changes_only_the_calling_thread() -> None:
    before = thread_priority()
    became, (policy, _) = on_thread(lambda: (lower_current_thread("idle"), thread_priority()))
    assert (became, policy) == ("idle", "idle")
    low = on_thread(lambda: (lower_current_thread("low"), thread_priority()))
    assert low == ("nice 19", ("other", 19))
    assert on_thread(lambda: (lower_current_thread("normal"), thread_priority())) == (
        "unchanged",
        before,
    )
    assert thread_priority() == before  # the caller's thread is never touched
    with pytest.raises(ValueError, match="background_priority='fast'"):
        lower_current_thread("fast")


def test_a_thread_started_by_a_lowered_thread_inherits_it() -> None:
    # why only threads that never serve are lowered: a lowered thread's children stay low
    def child_of_lowered() -> tuple[str, int]:
        lower_current_thread("low")
        return on_thread(thread_priority)

    assert on_thread(child_of_lowered) == ("other", 19)


def test_warm_up_imports_on_a_lowered_thread(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # a module that records the priority of the thread importing it
    (tmp_path / "probe_import_priority.py").write_text(
        "from elasticmoe.experts.priority import thread_priority\n"
        "import threading\n"
        "SEEN = (threading.get_native_id(), thread_priority())\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "probe_import_priority", raising=False)
    before = thread_priority()
    assert warm_up("low", ["probe_import_priority"]) == "nice 19"
    tid, seen = sys.modules["probe_import_priority"].SEEN
    assert tid != threading.get_native_id() and seen == ("other", 19)
    assert thread_priority() == before
    # already imported: nothing to do, no thread
    assert warm_up("idle", ["probe_import_priority"]) == "unchanged"
    # a missing module is left for the real import to report
    assert warm_up("low", ["probe_no_such_module_xyz"]) == "nice 19"


def test_servicer_loads_on_a_lowered_thread_and_computes_on_a_normal_one(
    model_dir: Path,
) -> None:
    async def run() -> tuple[Any, Any]:
        store = ExpertStore(model_dir, 2, torch.float32, worker_id="w0")
        servicer = ExpertServicer(store, num_threads=2, background_priority="idle")
        try:
            await servicer._run(servicer._compute, torch.get_num_threads)  # started first
            await servicer.load_experts([LogicalExpert(0, 1)])  # the loader's 1 stays its own
            loader = await servicer._run(
                servicer._io, lambda: (thread_priority()[0], torch.get_num_threads())
            )
            compute = await servicer._run(
                servicer._compute, lambda: (thread_priority(), torch.get_num_threads())
            )
            return loader, compute
        finally:
            servicer.close()

    loader, compute = asyncio.run(run())
    assert loader == ("idle", 1)  # one torch thread for loads and copies
    # the compute thread keeps the process's priority and its torch threads
    assert compute == (thread_priority(), 2)


def test_background_priority_is_validated_with_its_name(model_dir: Path) -> None:
    with pytest.raises(ValueError, match="background_priority"):
        DeploymentConfig(model=str(model_dir), background_priority="fast")
    assert DeploymentConfig(model=str(model_dir)).background_priority == "idle"
    from elasticmoe.experts.worker import ExpertWorker

    with pytest.raises(ValueError, match="background_priority='fast'"):
        ExpertWorker("w0", model_dir, 2, background_priority="fast")


def test_process_priority_is_per_thread_on_this_platform() -> None:
    # the mechanism rests on Linux's per-thread nice; a platform where it is
    # per-process would lower the serving threads too
    me = threading.get_native_id()
    on_thread(lambda: lower_current_thread("low"))
    assert os.getpriority(os.PRIO_PROCESS, me) == thread_priority()[1]


def test_the_start_up_heap_is_frozen_in_actors_only(ray_instance):
    """An engine's or worker's actor freezes its start-up objects (a full collection of
    them stalls a step for about 150 ms); a caller's process is left alone."""
    import gc

    import ray

    from elasticmoe.experts.priority import freeze_start_up_heap

    @ray.remote(num_cpus=0)
    class Probe:
        def freeze(self) -> tuple[bool, int]:
            return freeze_start_up_heap(), gc.get_freeze_count()

    probe = Probe.remote()
    try:
        froze, frozen = ray.get(probe.freeze.remote())
    finally:
        ray.kill(probe)
    assert froze and frozen > 0
    before = gc.get_freeze_count()
    assert freeze_start_up_heap() is False
    assert gc.get_freeze_count() == before
