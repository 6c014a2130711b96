"""Run shard tasks in this process, one after another."""

from __future__ import annotations

from collections.abc import Callable, Sequence

from sar_dist.execute.progress import Progress
from sar_dist.execute.shard import run_shard_task
from sar_dist.plan.types import ShardResult, ShardTask


def run_local(
    tasks: Sequence[ShardTask],
    progress: Progress | None = None,
    on_result: Callable[[ShardResult], None] | None = None,
) -> list[ShardResult]:
    """Run tasks in order in this process.

    Args:
        tasks: shard tasks still to do.
        progress: receives per-tensor and per-shard progress.
        on_result: called with each finished shard.

    Returns:
        Their results, in task order.
    """
    results = []
    for task in tasks:
        result = run_shard_task(task, on_tensor=progress.tensor_done if progress else None)
        if progress is not None:
            progress.shard_done(result, task.out_bytes, counted_tensors=True)
        if on_result is not None:
            on_result(result)
        results.append(result)
    return results
