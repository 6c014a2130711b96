"""Run a planned merge: check the output, resume, execute, commit.

Split in two so callers can tell bad input (``prepare``: raises ``ValueError`` before
anything is written) from failures while running (``execute``).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from sar_dist.execute.commit import check_output, clear_previous, commit, finished_shards, read_manifest
from sar_dist.execute.progress import Event, Progress
from sar_dist.plan.types import Plan, ShardResult
from sar_dist.storage import Storage

EXECUTORS = ("ray", "local")


@dataclass(frozen=True, kw_only=True, slots=True)
class Prepared:
    """A plan checked against its output.

    Attributes:
        plan: the plan.
        complete: the output already holds exactly this merge.
        force: retire a different merge at the output before writing.
    """

    plan: Plan
    complete: bool
    force: bool


def prepare(plan: Plan, *, force: bool = False) -> Prepared:
    """Check the output before any write.

    Raises:
        ValueError: the output holds a different complete merge and ``force`` is off.
    """
    storage = Storage(plan.job["storage_options"])
    return Prepared(plan=plan, complete=check_output(storage, plan, force=force), force=force)


def execute(
    prepared: Prepared,
    *,
    executor: str = "ray",
    emit: Callable[[Event], None] = lambda e: None,
    ray_address: str | None = None,
    num_cpus: int | None = None,
) -> dict[str, Any]:
    """Run the shards not finished yet and commit.

    Args:
        prepared: from ``prepare``.
        executor: ``ray`` or ``local``.
        emit: receives progress events.
        ray_address: Ray cluster address (None: local Ray, or RAY_ADDRESS).
        num_cpus: CPUs for a local Ray.

    Returns:
        The manifest.
    """
    plan = prepared.plan
    storage = Storage(plan.job["storage_options"])
    if prepared.complete:
        manifest = read_manifest(storage, plan.output)
        assert manifest is not None
        emit({"event": "already_complete", "output": plan.output, "plan_id": plan.plan_id})
        return manifest
    started = time.time()
    if prepared.force:
        clear_previous(storage, plan)
    done = finished_shards(storage, plan)
    progress = Progress(plan, emit)
    for index, result in done.items():
        progress.resumed(result, plan.tasks[index].out_bytes)
    todo = [t for t in plan.tasks if t.index not in done]
    progress.event("start", executor=executor, output=plan.output, resumed_shards=len(done), todo_shards=len(todo))
    results: list[ShardResult]
    if executor == "local":
        from sar_dist.execute.local import run_local

        results = run_local(todo, progress)
    elif executor == "ray":
        from sar_dist.execute.ray_executor import run_ray

        results = run_ray(todo, progress, address=ray_address, num_cpus=num_cpus)
    else:
        raise ValueError(f"unknown executor {executor!r} (known: {', '.join(EXECUTORS)})")
    manifest = commit(storage, plan, [*done.values(), *results], started=started)
    progress.event("committed", output=plan.output, plan_id=plan.plan_id)
    return manifest
