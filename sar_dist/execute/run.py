"""Run a planned merge: check the output, resume, execute, commit.

Split in two so callers can tell bad input (``prepare``: raises ``ValueError`` before
anything is written) from failures while running (``execute``).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from sar_dist.execute.commit import (
    check_output,
    clear_previous,
    commit,
    finished_shards,
    manifest_files,
    planned_files,
    read_manifest,
)
from sar_dist.execute.progress import Event, Progress
from sar_dist.output import Lease, check_disjoint, check_ownership, write_claims
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
        lease: this run's lease on the output (None when there is nothing to do);
            ``execute`` releases it.
    """

    plan: Plan
    complete: bool
    force: bool
    lease: Lease | None = None


def plan_inputs(plan: Plan) -> list[tuple[str, str]]:
    """``(role, url)`` of everything the merge reads: the config's URLs and every file they hold."""
    job = plan.job
    roles = [("base_model", job.get("base_model")), ("tokenizer_source", job.get("tokenizer_source"))]
    for i, m in enumerate(job["models"]):
        roles += [(f"models[{i}]", m.get("model")), (f"models[{i}].fisher", m.get("fisher"))]
    out = [(role, url) for role, url in roles if isinstance(url, str) and url != "base"]
    # the files themselves too: a shard symlinked from an input into the output is an input
    files = {ref.file for task in plan.tasks for j in task.tensors for ref in j.sources}
    out += [("input file", f) for f in sorted(files)]
    out += [("input file", src) for src, _ in plan.copy_files]
    return out


def check_merge_output(plan: Plan, *, force: bool = False, storage: Storage | None = None,
                       statistics_pending: bool = False) -> bool:
    """Check the output against the plan, writing nothing; True if it already holds this merge.

    With ``statistics_pending`` (a plan made before its Fisher statistics exist, see
    ``build_plan``) an earlier complete merge at the output is judged later, against the real
    plan: only the rest is checked now.

    Raises:
        ValueError: as ``prepare``, but for the lease.
    """
    storage = storage or Storage(plan.job["storage_options"])
    check_disjoint(plan.output, plan_inputs(plan))
    storage.check_bucket(plan.output)
    manifest = read_manifest(storage, plan.output)
    if not statistics_pending and check_output(plan, manifest, force=force):
        return True
    check_ownership(storage, plan.output, planned_files(plan), manifest_files(manifest), force=force)
    return False


def prepare(plan: Plan, *, force: bool = False) -> Prepared:
    """Check the output before any write, then take its lease and record what the run will write.

    Raises:
        ValueError: the output is, holds or lies inside an input; its bucket is missing; it
            holds a different complete merge, or files sar-dist did not write, and ``force``
            is off; a name the merge writes is taken by such a file; another run holds it
            (``LeaseHeld``).
    """
    storage = Storage(plan.job["storage_options"])

    def check() -> bool:
        return check_merge_output(plan, force=force, storage=storage)

    if check():
        return Prepared(plan=plan, complete=True, force=force)
    lease = Lease(storage, plan.output, "merge")
    lease.acquire()
    try:
        complete = check()  # again, now that no other run can change the output
        if not complete:
            write_claims(storage, plan.output, planned_files(plan),
                         known=manifest_files(read_manifest(storage, plan.output)))
    except BaseException:
        lease.release()
        raise
    if complete:
        lease.release()
        return Prepared(plan=plan, complete=True, force=force)
    return Prepared(plan=plan, complete=False, force=force, lease=lease)


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
    try:
        return _execute(prepared, executor=executor, emit=emit, ray_address=ray_address, num_cpus=num_cpus)
    finally:
        if prepared.lease is not None:
            prepared.lease.release()


def _execute(prepared: Prepared, *, executor: str, emit: Callable[[Event], None], ray_address: str | None,
             num_cpus: int | None) -> dict[str, Any]:
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
    manifest = commit(storage, plan, [*done.values(), *results], started=started, lease=prepared.lease)
    progress.event("committed", output=plan.output, plan_id=plan.plan_id)
    return manifest
