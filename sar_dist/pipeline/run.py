"""Plan and run a pipeline: the Fisher stage (one driver thread per model, one Ray), merge, analyze.

Each stage is the existing one (``fisher.run``, ``execute.run``, ``analyze.run``) with its own
resume logic; the pipeline plans them all before any work and labels their events with the
stage and model. Planning writes nothing:

- every Fisher job still to do is planned (data read and tokenized, output checked), and
  reused statistics are opened and checked against their model;
- the merge is planned from headers with the statistics still to compute standing in as their
  model's names and shapes (what the Fisher stage writes), and its output is checked;
- every output of the pipeline (statistics, merged model, report) must be disjoint from every
  input and from every other output.
"""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from sar_dist.fisher.plan import FisherPlan, build_fisher_plan
from sar_dist.fisher.run import prepare_output, run_fisher
from sar_dist.output import check_disjoint
from sar_dist.pipeline.config import PipelineJob
from sar_dist.plan.types import Plan
from sar_dist.storage import display_url

Event = dict[str, Any]
STAGES = ("fisher", "merge", "analyze")


@dataclass(kw_only=True)
class PipelinePlan:
    """Every stage of a run, checked before any work.

    Attributes:
        job: the pipeline file.
        stages: the stages this run does, in order.
        fisher: model name -> Fisher plan, for the statistics this run computes.
        complete: model name -> statistics URL that need no work (reused, or committed earlier).
        merge: the merge plan; while statistics are still to be computed it is a plan for
            checking only (``build_plan``'s ``pending_statistics``), made again before the merge.
        merge_complete: the merge output already holds this merge.
        pending: statistics URLs not committed yet (this run's, or other models' that another
            task of an orchestrator computes); empty when ``merge`` is the real plan.
        model: the one model of a ``--stage fisher --model`` run, else None.
    """

    job: PipelineJob
    stages: tuple[str, ...]
    fisher: dict[str, FisherPlan]
    complete: dict[str, str]
    merge: Plan | None
    merge_complete: bool = False
    pending: frozenset[str] = frozenset()
    model: str | None = None


def plan_pipeline(job: PipelineJob, *, stage: str | None = None, model: str | None = None,
                  force: bool = False) -> PipelinePlan:
    """Plan the stages of one run: every stage, or ``stage`` (and ``model`` of the Fisher stage).

    A run of one stage still checks the whole file (the merge settings with the Fisher stage,
    say), so an orchestrator's first task already fails on a bad merge config.

    Raises:
        ValueError: any input problem of any stage (exit 2), before anything is written.
    """
    if stage is not None and stage not in STAGES:
        raise ValueError(f"--stage: unknown stage {stage!r} (known: {', '.join(STAGES)})")
    if model is not None and stage != "fisher":
        raise ValueError("--model: only with --stage fisher")
    if stage == "analyze" and job.analyze is None:
        raise ValueError(f"{job.where}: --stage analyze, but the file has no 'analyze' section")
    if stage is None:
        stages: tuple[str, ...] = ("fisher", "merge") + (("analyze",) if job.analyze is not None else ())
    else:
        stages = (stage,)
    chosen = job.entry(model).name if model is not None else None
    _check_outputs_disjoint(job)
    fisher: dict[str, FisherPlan] = {}
    complete: dict[str, str] = {}
    pending: set[str] = set()
    for entry in job.models:
        if entry.fisher is None:
            complete[entry.name] = entry.statistics  # reused: the merge plan opens and checks them
            continue
        p = build_fisher_plan(entry.fisher)
        if prepare_output(p, force=force) is not None:
            complete[entry.name] = entry.statistics
        elif "fisher" in stages and chosen in (None, entry.name):
            fisher[entry.name] = p
            pending.add(entry.statistics)
        elif "fisher" in stages:  # another model's, computed by another task of the orchestrator
            pending.add(entry.statistics)
        else:
            raise ValueError(f"{job.where}: model {entry.name!r} has no committed statistics at "
                             f"{display_url(entry.statistics)}; run the Fisher stage first "
                             f"(--stage fisher --model {entry.name})")
    from sar_dist.execute.run import check_merge_output
    from sar_dist.plan.planner import build_plan

    merge = build_plan(job.merge, pending_statistics=frozenset(pending))
    merge_complete = check_merge_output(merge, force=force, statistics_pending=bool(pending))
    if job.analyze is not None and "analyze" in stages and not pending:
        _prepare_analyze(job, force=force)  # every check of the report's inputs and output
    return PipelinePlan(job=job, stages=stages, fisher=fisher, complete=complete, merge=merge,
                        merge_complete=merge_complete, pending=frozenset(pending), model=chosen)


def _check_outputs_disjoint(job: PipelineJob) -> None:
    """Each output of the pipeline is disjoint from every input and every other output."""
    inputs = [("base_model", job.merge.base_model)] if job.merge.base_model else []
    for m in job.models:
        inputs.append((f"model {m.name}", m.model))
        if m.fisher is None:
            inputs.append((f"statistics of {m.name} (reused)", m.statistics))
        else:
            inputs.append((f"data of {m.name}", m.fisher.data))
    outputs = [(f"statistics of {m.name}", m.statistics) for m in job.models if m.fisher is not None]
    outputs.append(("output", job.merge.output))
    if job.analyze is not None:
        outputs.append(("analyze.output", job.analyze["output"]))
    for i, (role, url) in enumerate(outputs):
        try:
            check_disjoint(url, [*inputs, *(o for j, o in enumerate(outputs) if j != i)])
        except ValueError as e:
            raise ValueError(f"{job.where}: {role}: {e}") from None


def summary(plan: PipelinePlan) -> dict[str, Any]:
    """The ``--dry-run`` JSON: stages, tasks, bytes and estimated peak memory per task."""
    fisher = []
    for name, p in plan.fisher.items():
        params = sum(r.info.nbytes for r in p.checkpoint.tensors.values())
        numel = sum(r.info.numel for r in p.checkpoint.tensors.values())
        world = p.job.ranks_per_group
        fisher.append({
            "model": name, "statistics": display_url(p.job.output), "status": "todo",
            "tasks": len(p.parts), "ranks_per_task": world, "examples": len(p.data.examples),
            "target_tokens": p.data.num_targets, "read_bytes": params * len(p.parts),
            "write_bytes": 4 * numel,
            # a rank holds 1/R of the weights and of the float32 sums (bench/fisher_memory_bench.py)
            "est_peak_bytes_per_rank": (params + 4 * numel) // world,
        })
    fisher += [{"model": n, "statistics": display_url(u), "status": "complete", "tasks": 0}
               for n, u in plan.complete.items()]
    stages: list[dict[str, Any]] = []
    if "fisher" in plan.stages:
        stages.append({"stage": "fisher", "models": fisher})
    if "merge" in plan.stages and plan.merge is not None:
        merge = plan.merge.summary()
        if plan.pending:
            merge["status"] = "waits for the Fisher stage"
            merge.pop("plan_id", None)  # made again once the statistics exist
        else:
            merge["status"] = "complete" if plan.merge_complete else "todo"
        stages.append({"stage": "merge", **merge})
    if "analyze" in plan.stages and plan.job.analyze is not None:
        stages.append({"stage": "analyze", "output": display_url(plan.job.analyze["output"])})
    return {"pipeline": plan.job.where, "stages": stages}


def _labelled(emit: Callable[[Event], None], lock: threading.Lock, stage: str,
              model: str | None = None) -> Callable[[Event], None]:
    def out(event: Event) -> None:
        with lock:
            emit({**event, "stage": stage, **({"model": model} if model else {})})
    return out


def _share_cluster(plans: dict[str, FisherPlan]) -> dict[str, FisherPlan]:
    """Give every model's groups their share of the cluster's CPUs, so the Fisher jobs run side
    by side (a job left to itself spreads over all CPUs, and the next would wait for it).
    ``cpus_per_rank`` is not part of a job's identity: resumed parts stay valid."""
    if not plans:
        return {}
    import ray

    total = int(ray.cluster_resources().get("CPU", 1))
    ranks = sum(p.job.groups * p.job.ranks_per_group for p in plans.values() if p.job.cpus_per_rank is None)
    out = {}
    for name, p in plans.items():
        if p.job.cpus_per_rank is None and ranks:
            p = dataclasses.replace(p, job=dataclasses.replace(p.job, cpus_per_rank=max(1, total // ranks)))
        out[name] = p
    return out


def run_fisher_stage(plan: PipelinePlan, emit: Callable[[Event], None], *, force: bool = False) -> None:
    """Every Fisher job still to do, each driver on its own thread against the one Ray.

    Raises:
        The first error of any job, once every job has stopped (the others run to the end,
        so a rerun has the least left to do).
    """
    lock = threading.Lock()
    for name, url in plan.complete.items():
        if plan.model not in (None, name):
            continue
        _labelled(emit, lock, "fisher", name)({"event": "already_complete", "output": display_url(url)})
    errors: list[BaseException] = []

    def one(name: str, p: FisherPlan) -> None:
        try:
            run_fisher(p, emit=_labelled(emit, lock, "fisher", name), force=force)
        except BaseException as e:  # noqa: BLE001 - re-raised on the calling thread
            errors.append(e)

    threads = [threading.Thread(target=one, args=(n, p), name=f"sar-dist-fisher-{n}", daemon=True)
               for n, p in _share_cluster(plan.fisher).items()]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]


def run_merge_stage(plan: PipelinePlan, emit: Callable[[Event], None], *, force: bool = False) -> dict[str, Any]:
    """Run the merge with its own resume logic; planned again if statistics were pending (they
    exist now), else the plan made up front is the real one."""
    from sar_dist.execute.run import execute, prepare
    from sar_dist.plan.planner import build_plan

    merge = build_plan(plan.job.merge) if plan.pending or plan.merge is None else plan.merge
    prepared = prepare(merge, force=force)
    return execute(prepared, executor="ray", emit=_labelled(emit, threading.Lock(), "merge"))


def _prepare_analyze(job: PipelineJob, *, force: bool):
    from sar_dist.analyze.run import prepare_analyze

    a = job.analyze or {}
    return prepare_analyze(job.merge.base_model or "", [m.model for m in job.models], a["output"],
                           fisher=[m.statistics for m in job.models], storage_options=job.storage_options,
                           tolerance=a.get("tolerance", 0.0), rank_fraction=a.get("rank_fraction", 0.01),
                           svd=a.get("svd", "auto"), force=force)


def run_analyze_stage(plan: PipelinePlan, emit: Callable[[Event], None], *, force: bool = False) -> dict[str, Any]:
    """``sar-dist analyze`` of the fine-tunes against the base, with their statistics."""
    from sar_dist.analyze.run import execute_analyze
    from sar_dist.analyze.run import summary as analyze_summary

    report = execute_analyze(_prepare_analyze(plan.job, force=force), executor="ray")
    out = {"event": "committed", "stage": "analyze", "output": display_url(plan.job.analyze["output"])}
    emit({**out, "summary": analyze_summary(report)})
    return report


def run_pipeline(plan: PipelinePlan, emit: Callable[[Event], None], *, ray_address: str | None = None,
                 num_cpus: int | None = None, force: bool = False) -> dict[str, Any]:
    """Run the planned stages on one Ray (started here, or the cluster at ``ray_address``).

    Returns:
        The merge manifest when the merge stage ran, else ``{}``.
    """
    import ray

    from sar_dist.execute.ray_executor import ensure_ray

    # nothing to do (a rerun of a finished pipeline): no Ray at all
    work = bool(plan.fisher) or ("merge" in plan.stages and not plan.merge_complete) or "analyze" in plan.stages
    started = ensure_ray(ray_address, num_cpus) if work else False
    manifest: dict[str, Any] = {}
    try:
        for stage in plan.stages:
            emit({"event": "stage_start", "stage": stage})
            if stage == "fisher":
                run_fisher_stage(plan, emit, force=force)
            elif stage == "merge":
                manifest = run_merge_stage(plan, emit, force=force)
            else:
                run_analyze_stage(plan, emit, force=force)
            emit({"event": "stage_done", "stage": stage})
    finally:
        if started:
            ray.shutdown()
    return manifest
