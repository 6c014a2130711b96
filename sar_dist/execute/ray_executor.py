"""Run shard tasks as Ray tasks: the only ``import ray`` in the library.

Each shard task becomes one Ray task that requests its share of the CPUs (at least
one; one GPU with ``--device cuda``) and its estimated memory,
writes its shard straight to the output and returns only a small ``ShardResult``;
Ray retries it on worker or node loss (and on transient I/O errors). The driver
collects results as they finish and reports progress; ``commit`` runs afterwards.

With no address, Ray starts locally (the embedded default) with limits suited to a
small machine: object store capped (no tensors travel through it), dashboard off.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from typing import Any

from sar_dist.execute.progress import Progress
from sar_dist.execute.shard import run_shard_task
from sar_dist.plan.types import ShardResult, ShardTask

logger = logging.getLogger(__name__)

LOCAL_OBJECT_STORE_BYTES = 128 * 2**20
DEFAULT_MAX_RETRIES = 3
# transient errors worth a retry of the whole shard task (its output is rewritten whole)
RETRY_EXCEPTIONS: list[type[BaseException]] = [ConnectionError, TimeoutError]


def ensure_ray(address: str | None = None, num_cpus: int | None = None) -> bool:
    """Connect to Ray, or start a local instance.

    Args:
        address: a cluster address (``auto``, ``HOST:6379``, ``ray://HOST:10001``);
            None uses ``RAY_ADDRESS`` if set (inside ``ray job submit``), else starts a
            local Ray.
        num_cpus: CPUs for a local Ray (default: all).

    Returns:
        True if this call started or connected Ray (the caller shuts it down).
    """
    import ray

    if ray.is_initialized():
        return False
    if address is None and os.environ.get("RAY_ADDRESS"):
        address = os.environ["RAY_ADDRESS"]
    if address is not None:
        ray.init(address=address, log_to_driver=True)
        return True
    ray.init(
        address="local",  # never join a stale cluster recorded in /tmp/ray
        num_cpus=num_cpus,
        object_store_memory=LOCAL_OBJECT_STORE_BYTES,
        include_dashboard=False,
        log_to_driver=True,
    )
    return True


def _run_shard_task_with_threads(task: ShardTask, num_threads: int) -> ShardResult:
    """The Ray task body: use the CPUs Ray gave this task for torch's intra-op threads."""
    import torch

    torch.set_num_threads(num_threads)
    return run_shard_task(task)


def cpus_per_task(num_tasks: int) -> int:
    """CPUs to request per task: spread the cluster's CPUs over the tasks (at least one),
    never more than the largest node has, so a merge with fewer shards than CPUs still
    uses every core (results do not depend on the thread count; see ``ops.one_thread``)."""
    import ray

    total = int(ray.cluster_resources().get("CPU", 1))
    largest_node = max((int(n["Resources"].get("CPU", 0)) for n in ray.nodes() if n.get("Alive")), default=1)
    return max(1, min(largest_node, total // max(num_tasks, 1)))


def run_ray(
    tasks: Sequence[ShardTask],
    progress: Progress | None = None,
    on_result: Callable[[ShardResult], None] | None = None,
    *,
    address: str | None = None,
    num_cpus: int | None = None,
    max_retries: int = DEFAULT_MAX_RETRIES,
) -> list[ShardResult]:
    """Run tasks on Ray and collect their results as they finish.

    Args:
        tasks: shard tasks still to do.
        progress: receives per-shard progress.
        on_result: called with each finished shard.
        address: Ray address (see ``ensure_ray``).
        num_cpus: CPUs for a local Ray.
        max_retries: retries per task on worker loss or transient errors.

    Returns:
        Results in task order.

    Raises:
        The first task's error (its original exception type), after cancelling the rest.
    """
    import ray

    started = ensure_ray(address, num_cpus)
    try:
        remote = ray.remote(_run_shard_task_with_threads)
        num_cpus_task = cpus_per_task(len(tasks))
        pending: dict[Any, ShardTask] = {}
        for task in tasks:
            ref = remote.options(
                name=f"sar-dist:{task.file_name}",
                num_cpus=num_cpus_task,
                num_gpus=1 if task.device == "cuda" else 0,
                memory=task.estimated_bytes,
                max_retries=max_retries,
                retry_exceptions=RETRY_EXCEPTIONS,
            ).remote(task, num_cpus_task)
            pending[ref] = task
        results: dict[int, ShardResult] = {}
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1)
            for ref in ready:
                task = pending.pop(ref)
                try:
                    result: ShardResult = ray.get(ref)
                except ray.exceptions.RayTaskError as e:
                    for other in pending:
                        ray.cancel(other)
                    cause = e.cause if isinstance(e.cause, BaseException) else e
                    raise cause from None
                results[task.index] = result
                if progress is not None:
                    progress.shard_done(result, task.out_bytes, counted_tensors=False)
                if on_result is not None:
                    on_result(result)
        return [results[t.index] for t in tasks]
    finally:
        if started:
            ray.shutdown()
