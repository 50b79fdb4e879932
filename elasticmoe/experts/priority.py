"""Background work below serving's priority: the CPU scheduling of single threads.

Replica loads (checkpoint reads, peer copies, checksums) and a worker process's
start-up (importing torch and the expert service) compete for the same cores as
the Forward calls that serve tokens. This module lowers the priority of the
threads that do only such background work, so that steady traffic keeps its
share of the CPU while the controller scales.

Linux schedules threads, not processes: each thread has its own nice value and
scheduling policy, ``setpriority(PRIO_PROCESS, tid)`` and
``sched_setscheduler(tid)`` change one thread, and a new thread inherits its
creator's. An unprivileged process may lower a thread's priority but never raise
it again (containers run with ``RLIMIT_NICE`` 0, and Pod Security "restricted"
drops ``CAP_SYS_NICE``). So only threads that never serve are lowered: the
worker's loader thread and the thread that imports the heavy modules while a
worker process starts. The threads that answer Forward calls are created by
threads at the priority Ray gave the process, so a spare that joins the map
serves at full priority without a restart.

Levels (``DeploymentConfig.background_priority``): ``idle`` (``SCHED_IDLE``:
runs on cores serving leaves idle, with a small share under saturation),
``low`` (nice 19) and ``normal`` (unchanged). Ray already runs every worker's
Python threads at nice 15 (its ``worker_niceness``; measured: the main thread
and the threads it starts are at 15, Ray's C++ threads at 0), so nice 19 is
only ~2.4x below serving in CFS weight, ``SCHED_IDLE`` ~12x.

Caveat: the loader thread shares the GIL with the serving threads of its
process. While it holds the GIL (Python glue between torch/hashlib calls, which
release it) and other processes keep every core busy, a very low priority delays
its release: a short priority inversion. With idle cores (the normal case for a
closed-loop server, whose engines and workers wait on each other) it runs at once;
``low`` bounds the delay on machines saturated by foreign load.

No torch or grpc here: :func:`warm_up` runs in a fresh worker process before
they are imported.
"""

from __future__ import annotations

import gc
import importlib
import logging
import os
import sys
import threading
from collections.abc import Sequence
from typing import Literal, get_args

__all__ = [
    "BACKGROUND_PRIORITIES",
    "WARM_UP_MODULES",
    "BackgroundPriority",
    "freeze_start_up_heap",
    "lower_current_thread",
    "serve_without_wakeup_preemption",
    "thread_priority",
    "warm_up",
]

logger = logging.getLogger(__name__)

BackgroundPriority = Literal["idle", "low", "normal"]
BACKGROUND_PRIORITIES: tuple[str, ...] = get_args(BackgroundPriority)
# The heavy imports of an expert worker (torch alone is about a CPU-second).
WARM_UP_MODULES: tuple[str, ...] = (
    "torch",
    "grpc",
    "elasticmoe.experts.service",
    "elasticmoe.experts.faults",
)
_LOW_NICE = 19


def _check(level: str) -> None:
    if level not in BACKGROUND_PRIORITIES:
        raise ValueError(
            f"background_priority={level!r} is not one of {', '.join(BACKGROUND_PRIORITIES)}"
        )


def lower_current_thread(level: str = "idle") -> str:
    """Lower the calling thread (only it) to ``level``; what it became.

    Returns ``"idle"`` (``SCHED_IDLE``), ``"nice 19"`` or ``"unchanged"`` (``normal``, or
    a platform without per-thread scheduling). ``idle`` falls back to nice 19 where
    ``SCHED_IDLE`` is missing. Irreversible for an unprivileged process: call it only
    on threads that never serve.
    """
    _check(level)
    if level == "normal":
        return "unchanged"
    tid = threading.get_native_id()
    if level == "idle" and hasattr(os, "SCHED_IDLE"):
        try:
            os.sched_setscheduler(tid, os.SCHED_IDLE, os.sched_param(0))
            return "idle"
        except OSError as e:  # e.g. a seccomp profile that refuses it
            logger.info("SCHED_IDLE refused for thread %d (%s); using nice", tid, e)
    try:
        # Linux: PRIO_PROCESS with a thread id changes that thread only.
        os.setpriority(os.PRIO_PROCESS, tid, max(_LOW_NICE, os.getpriority(os.PRIO_PROCESS, tid)))
        return f"nice {_LOW_NICE}"
    except (AttributeError, OSError) as e:
        logger.info("could not lower thread %d: %s", tid, e)
        return "unchanged"


def serve_without_wakeup_preemption() -> bool:
    """Put the calling thread, one that serves frames, under ``SCHED_BATCH``: the same
    CPU share as before (its nice value is kept), but its wake-ups do not preempt the
    thread running on the CPU it wakes on.

    An engine writes a layer's frames to its workers one after the other. Under the
    normal policy the first worker, woken by the first write, preempts the engine on a
    busy 2-core node, and the second frame goes out only once the first worker has
    computed: the workers run one after the other, not side by side. A batch thread
    takes an idle core, or waits for the engine to block on the results. Returns whether
    the policy was set (any unprivileged thread may; not every platform has it)."""
    if not hasattr(os, "SCHED_BATCH"):
        return False
    try:
        os.sched_setscheduler(threading.get_native_id(), os.SCHED_BATCH, os.sched_param(0))
    except OSError as e:
        logger.info("SCHED_BATCH refused (%s); frames are served at the normal policy", e)
        return False
    return True


def thread_priority(tid: int | None = None) -> tuple[str, int]:
    """``(policy, nice)`` of thread ``tid`` (default: the caller); policy is "idle",
    "batch" or "other"."""
    tid = threading.get_native_id() if tid is None else tid
    policy = os.sched_getscheduler(tid)
    name = {os.SCHED_IDLE: "idle", os.SCHED_BATCH: "batch"}.get(policy, "other")
    return name, os.getpriority(os.PRIO_PROCESS, tid)


def warm_up(level: str = "idle", modules: Sequence[str] = WARM_UP_MODULES) -> str:
    """Import ``modules`` on a helper thread at the background ``level`` and wait for it.

    :class:`~elasticmoe.experts.worker.ExpertWorker` calls it first thing: the start
    of a spare (or of any new worker) spends most of its CPU in these imports, which
    then run on cores serving leaves idle. The caller's thread keeps its priority, so
    the threads it starts afterwards (the event loop, the gRPC server, the compute
    thread) serve at full priority. Returns what the helper thread became
    (``"unchanged"`` at once when every module is already imported). An import that
    fails is left for the real import to report.
    """
    _check(level)
    if all(name in sys.modules for name in modules):
        return "unchanged"
    became: list[str] = []

    def run() -> None:
        became.append(lower_current_thread(level))
        for name in modules:
            try:
                importlib.import_module(name)
            except Exception as e:  # the actor's own import raises it where it is seen
                logger.warning("warm-up import of %s failed: %s", name, e)

    thread = threading.Thread(target=run, name="elasticmoe-warm-up", daemon=True)
    thread.start()
    thread.join()
    return became[0] if became else "unchanged"


def freeze_start_up_heap() -> bool:
    """In a Ray actor's process (an engine's or a worker's), once it has loaded: collect,
    then move every object alive now (torch, Ray, the model's modules and weights: about
    300k objects) out of the garbage collector's reach, as vLLM's engine does. A full
    collection traverses them all: about 150 ms here, one stalled step whenever the
    collector reaches its oldest generation. Nothing is frozen elsewhere (an in-process
    engine shares its process with the caller, whose objects must stay collectable).
    Returns whether it froze."""
    try:
        import ray

        if not ray.is_initialized() or ray.get_runtime_context().get_actor_id() is None:
            return False
    except ImportError:
        return False
    gc.collect()
    gc.freeze()
    return True
