"""Run a Fisher plan on Ray: groups of ZeRO-3 ranks write parts, a map over shards reduces them.

Placement: each group is one placement group of ``ranks_per_group`` bundles (PACK: the ranks
of a group sit together when they fit on a node, and may span nodes when the model needs more)
holding one actor per rank. Actors rather than Ray Train's ``TorchTrainer``: the groups are
independent worlds that start, fail and retry on their own, each rendezvous is one
``tcp://`` address handed from rank 0 to the others, and nothing but the statistics is
written (no trainer run directories or checkpoints). A group whose rank dies is torn down
whole (its peers would block in collectives) and restarted from scratch, up to
``max_retries`` times; groups that finished keep their parts, and a rerun skips them.

Reduce: one Ray task per final shard sums that shard's tensors over the parts in part order
(row blocks for big tensors), so the result does not depend on which parts were resumed, and
returns the squared L2 norm of the mean statistics it wrote; ``fisher.json`` is written last.
With ``stats_dtype: bfloat16`` the reduce still sums in float32 and rounds only what it writes
(round to nearest even); the norm is taken over the rounded values, the ones a merge reads.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
import socket
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from sar_dist.checkpoint.format import DTYPE_NAMES, DTYPES, order_for_writing
from sar_dist.checkpoint.index import open_checkpoint, read_json
from sar_dist.checkpoint.reader import read_tensor
from sar_dist.checkpoint.writer import ShardWriter
from sar_dist.execute.commit import package_versions
from sar_dist.execute.ray_executor import ensure_ray
from sar_dist.finite import NonFiniteError, check_finite
from sar_dist.fisher.data import is_template_file
from sar_dist.fisher.plan import FORMAT_VERSION, MANIFEST, PARTS_DIR, STATS_STEM, FisherPlan, part_is_complete
from sar_dist.fisher.types import PartSpec
from sar_dist.output import Lease, check_disjoint, check_ownership, remove_state, write_claims
from sar_dist.storage import Storage, display_url, join

INDEX_NAME = f"{STATS_STEM}.safetensors.index.json"

logger = logging.getLogger(__name__)

Event = dict[str, Any]
REDUCE_BLOCK_BYTES = 256 * 2**20  # one part's row block; the sum holds another


class ClusterTooSmall(ValueError):
    """A group needs more CPUs or GPUs than the Ray cluster has (bad input: exit 2)."""


class FisherRank:
    """A Ray actor: one rank of one group (threaded, so the driver can poll ``progress``)."""

    def __init__(self) -> None:
        self._progress: dict[str, Any] = {}

    def endpoint(self) -> str:
        """``host:port`` for the group's rendezvous (rank 0 only)."""
        import ray

        host = ray.util.get_node_ip_address()
        with socket.socket() as s:
            s.bind((host, 0))
            return f"{host}:{s.getsockname()[1]}"

    def run(self, spec: PartSpec, rank: int, world: int, master: str, num_threads: int) -> dict[str, Any]:
        import ray

        from sar_dist.fisher.worker import run_rank

        return run_rank(spec, rank=rank, world=world, master=master, num_threads=num_threads, progress=self._progress,
                        node=ray.get_runtime_context().get_node_id())

    def progress(self) -> dict[str, Any]:
        return {**self._progress, "pid": os.getpid()}


@dataclass
class _Group:
    part: PartSpec
    attempt: int
    pg: Any
    actors: list[Any]
    refs: list[Any]
    results: dict[int, dict[str, Any]] = field(default_factory=dict)


def output_files(plan: FisherPlan) -> list[str]:
    """Every name the job writes at the top of its output (``fisher.json`` last)."""
    return [PARTS_DIR, *plan.shards, INDEX_NAME, MANIFEST]


def output_id(plan: FisherPlan) -> str:
    """Identity of the committed statistics (``fisher.json``'s ``job_id``).

    ``plan.job_id`` keys the parts, which are float32 sums whatever ``stats_dtype`` says: a
    rerun with another ``stats_dtype`` (``--force``) reuses finished parts and only reduces
    again. The committed output must match the requested dtype, so ``stats_dtype`` joins the
    output's identity; float32 keeps ``plan.job_id`` itself, so earlier outputs stay complete.
    """
    if plan.job.stats_dtype == "float32":
        return plan.job_id
    ident = {"job_id": plan.job_id, "stats_dtype": plan.job.stats_dtype}
    return hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()


def _inputs(plan: FisherPlan) -> list[tuple[str, str]]:
    job = plan.job
    roles = [("the model", job.model), ("the data", job.data), ("the tokenizer", job.tokenizer)]
    if job.chat_template is not None and is_template_file(job.chat_template):
        roles.append(("the chat template", job.chat_template))
    files = sorted({r.file for r in plan.checkpoint.tensors.values()})
    return [(role, url) for role, url in roles if url] + [("input file", f) for f in files]


def _earlier_files(plan: FisherPlan, manifest: dict[str, Any] | None) -> set[str]:
    """Names at the output that an earlier sar-dist Fisher run wrote."""
    if manifest is not None and manifest.get("kind") == "sar-dist fisher statistics":
        shards = manifest.get("shards")
        return {PARTS_DIR, INDEX_NAME, MANIFEST, *(shards if isinstance(shards, dict) else ())}
    # no manifest (removed, or never committed), but finished parts of this very job: ours
    if any(part_is_complete(plan.storage, p) is not None for p in plan.parts):
        return set(output_files(plan))
    return set()


def prepare_output(plan: FisherPlan, *, force: bool = False) -> dict[str, Any] | None:
    """Check the output before any work; nothing is written.

    Returns:
        The finished manifest if this job is already done, else None.

    Raises:
        ValueError: the output is, holds or lies inside the model, data or tokenizer; its
            bucket is missing; it holds statistics of another job, or files sar-dist did not
            write, and ``force`` is off; a name the job writes is taken by such a file.
    """
    storage, out = plan.storage, plan.job.output
    check_disjoint(out, _inputs(plan))
    storage.check_bucket(out)
    manifest = read_json(storage, join(out, MANIFEST), strict=False)
    if manifest is not None and manifest.get("job_id") == output_id(plan):
        return manifest
    if manifest is not None and not force:
        raise ValueError(f"output {display_url(out)}: holds Fisher statistics of a different job (model, data or "
                         f"settings differ); pass --force to replace them")
    check_ownership(storage, out, output_files(plan), _earlier_files(plan, manifest), force=force)
    return None


def run_fisher(
    plan: FisherPlan,
    *,
    emit: Callable[[Event], None] | None = None,
    ray_address: str | None = None,
    num_cpus: int | None = None,
    force: bool = False,
    poll_s: float = 2.0,
) -> dict[str, Any]:
    """Compute the statistics of ``plan`` and commit them; returns ``fisher.json``.

    A rerun of the same job resumes: finished parts are skipped, and a committed output is
    returned as it is. The run holds the output's lease from its first write to its last.

    Raises:
        ClusterTooSmall: a group does not fit the cluster (found before anything is written).
        LeaseHeld: another run holds the output.
    """
    emit = emit or (lambda e: None)
    t0 = time.perf_counter()
    done = prepare_output(plan, force=force)
    if done is not None:
        emit({"event": "already_complete", "output": display_url(plan.job.output)})
        return done
    import ray

    storage, out = plan.storage, plan.job.output
    started = ensure_ray(ray_address, num_cpus)
    try:
        _resources(plan)  # a cluster too small is bad input: refuse before the first write
        with Lease(storage, out, "Fisher run") as lease:
            lease.acquire()
            done = prepare_output(plan, force=force)  # again, now that no other run can change it
            if done is not None:
                return done
            manifest = read_json(storage, join(out, MANIFEST), strict=False)
            write_claims(storage, out, output_files(plan), known=_earlier_files(plan, manifest))
            storage.remove(join(out, MANIFEST))  # --force: from here on it never looks complete
            markers = _run_parts(plan, emit, poll_s)
            manifest = _reduce_and_commit(plan, markers, emit, t0, lease)
            if not plan.job.keep_parts:
                storage.remove_tree(join(out, PARTS_DIR))
            remove_state(storage, out, [])
    finally:
        if started:
            ray.shutdown()
    return manifest


def _resources(plan: FisherPlan) -> tuple[int, int]:
    """(CPUs per rank, GPUs per rank), checked against the cluster."""
    import ray

    job = plan.job
    world = job.ranks_per_group
    total_cpus = int(ray.cluster_resources().get("CPU", 1))
    cpus = job.cpus_per_rank or max(1, total_cpus // (job.groups * world))
    if cpus * world > total_cpus:
        raise ClusterTooSmall(f"a group of {world} ranks x {cpus} CPUs does not fit this Ray cluster ({total_cpus} CPUs)")
    gpus = 1 if job.device == "cuda" else 0
    if gpus and world > int(ray.cluster_resources().get("GPU", 0)):
        raise ClusterTooSmall(f"device cuda: a group of {world} ranks needs {world} GPUs; the cluster has "
                         f"{int(ray.cluster_resources().get('GPU', 0))}")
    return cpus, gpus


def _run_parts(plan: FisherPlan, emit: Callable[[Event], None], poll_s: float) -> list[dict[str, Any]]:
    import ray
    from ray.util.placement_group import placement_group, remove_placement_group
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    storage, job = plan.storage, plan.job
    world = job.ranks_per_group
    cpus, gpus = _resources(plan)
    actor_cls = ray.remote(FisherRank)
    run_tag = uuid.uuid4().hex[:8]  # names are per namespace: concurrent jobs (``sar-dist run``) differ
    markers: dict[int, dict[str, Any]] = {}
    todo = []
    for part in plan.parts:
        marker = part_is_complete(storage, part)
        if marker is not None:
            markers[part.part] = marker
        else:
            todo.append(part)
    total_examples = len(plan.data.examples)
    total_targets = plan.data.num_targets
    done_examples = sum(m["num_examples"] for m in markers.values())
    done_targets = sum(m["num_targets"] for m in markers.values())
    # rates count this run's work only: resumed parts and finished parts' ranks leave `live`
    run_targets = run_tokens = 0
    emit({"event": "start", "output": display_url(job.output), "parts_total": len(plan.parts),
          "parts_resumed": len(markers), "examples_total": total_examples, "target_tokens_total": total_targets,
          "groups": job.groups, "ranks_per_group": world, "cpus_per_rank": cpus, "estimator": job.estimator})

    def launch(part: PartSpec, attempt: int) -> _Group:
        storage.remove_tree(part.url)  # an unfinished part is redone from scratch
        bundle = {"CPU": cpus, **({"GPU": gpus} if gpus else {})}
        pg = placement_group([bundle] * world, strategy="PACK", name=f"sar-dist-fisher-{run_tag}-{part.part}-{attempt}")
        actors = [
            actor_cls.options(
                num_cpus=cpus, num_gpus=gpus, max_concurrency=2, max_restarts=0,
                scheduling_strategy=PlacementGroupSchedulingStrategy(pg, placement_group_bundle_index=r),
            ).remote()
            for r in range(world)
        ]
        master = actors[0].endpoint.remote()  # resolved by Ray before the ranks start
        spec = dataclasses.replace(part, allow_nonfinite=job.allow_nonfinite)  # not in the part's identity
        refs = [a.run.remote(spec, r, world, master, cpus) for r, a in enumerate(actors)]
        return _Group(part=part, attempt=attempt, pg=pg, actors=actors, refs=refs)

    def teardown(group: _Group) -> None:
        for a in group.actors:
            ray.kill(a, no_restart=True)
        remove_placement_group(group.pg)

    active = {p.part: launch(p, 0) for p in todo}
    t_start = time.perf_counter()
    last_report = 0.0
    live: dict[tuple[int, int], dict[str, Any]] = {}
    try:
        while active:
            refs = [r for g in active.values() for r in g.refs if r not in _finished(g)]
            ray.wait(refs, num_returns=1, timeout=poll_s)
            for part_id, group in list(active.items()):
                ready, _ = ray.wait(group.refs, num_returns=len(group.refs), timeout=0)
                error: BaseException | None = None
                for r, ref in enumerate(group.refs):
                    if ref in ready and r not in group.results:
                        try:
                            group.results[r] = ray.get(ref)
                        except (ray.exceptions.RayError, Exception) as e:  # noqa: BLE001 - any rank failure
                            error = error or e
                if error is not None:
                    teardown(group)
                    for r in range(world):
                        live.pop((part_id, r), None)
                    cause = getattr(error, "cause", None)
                    cause = cause if isinstance(cause, BaseException) else error
                    if isinstance(cause, NonFiniteError):  # the same data gives the same NaN: no retry
                        raise NonFiniteError(f"Fisher statistics of model {display_url(job.model)} on data "
                                             f"{display_url(job.data)}: {cause}") from None
                    if group.attempt >= job.max_retries:
                        raise cause
                    emit({"event": "part_retry", "part": part_id, "attempt": group.attempt + 1,
                          "error": f"{cause.__class__.__name__}: {str(cause).splitlines()[0] if str(cause) else ''}"})
                    active[part_id] = launch(group.part, group.attempt + 1)
                elif len(group.results) == world:
                    teardown(group)
                    marker = part_is_complete(storage, group.part)
                    assert marker is not None, f"part {part_id} finished without its marker"
                    markers[part_id] = marker
                    done_examples += marker["num_examples"]
                    done_targets += marker["num_targets"]
                    run_targets += marker["num_targets"]
                    run_tokens += marker["num_tokens"]
                    for r in range(world):
                        live.pop((part_id, r), None)
                    del active[part_id]
                    emit({"event": "part_done", "part": part_id, "parts_done": len(markers),
                          "parts_total": len(plan.parts), "examples": marker["num_examples"]})
            now = time.perf_counter()
            if active and now - last_report >= poll_s:
                last_report = now
                _poll(active, live)
                live_targets = sum(v.get("targets", 0) for v in live.values())
                ex = done_examples + sum(v.get("examples", 0) for v in live.values())
                tg = done_targets + live_targets
                tok = run_tokens + sum(v.get("tokens", 0) for v in live.values())
                elapsed = now - t_start
                rate = (run_targets + live_targets) / elapsed if elapsed > 0 else 0.0
                emit({"event": "progress", "examples_done": ex, "examples_total": total_examples,
                      "target_tokens_done": tg, "target_tokens_total": total_targets,
                      "tokens_per_s": round(tok / elapsed, 1) if elapsed > 0 else 0.0,
                      "eta_s": round((total_targets - tg) / rate, 1) if rate > 0 else None,
                      "workers": [{"part": p, "rank": r, "pid": v.get("pid")} for (p, r), v in sorted(live.items())]})
    except BaseException:
        for group in active.values():
            teardown(group)
        raise
    return [markers[p.part] for p in plan.parts]


def _finished(group: _Group) -> set[Any]:
    return {group.refs[r] for r in group.results}


def _poll(active: dict[int, _Group], live: dict[tuple[int, int], dict[str, Any]]) -> None:
    import ray

    asks = {(p, r): a.progress.remote() for p, g in active.items() for r, a in enumerate(g.actors)}
    ready, _ = ray.wait(list(asks.values()), num_returns=len(asks), timeout=1.0)
    ready_set = set(ready)
    for key, ref in asks.items():
        if ref in ready_set:
            try:
                live[key] = ray.get(ref)
            except ray.exceptions.RayError:
                pass


def reduce_shard(storage_options: dict[str, Any], part_urls: list[str], url: str,
                 entries: list[tuple[str, str, tuple[int, ...]]], num_examples: int,
                 check: bool = True) -> dict[str, Any]:
    """Sum one final shard's tensors over the parts (in part order); a Ray task. With ``check``,
    a sum of finite parts that overflowed float32, or a finite sum that rounds to inf in the
    stored dtype, stops it (``NonFiniteError``).

    Args:
        entries: (name, stored dtype, shape) in write order; the dtype (``F32`` or ``BF16``)
            is the same for all. Sums are float32 whatever it is; ``BF16`` rounds each summed
            block to nearest even (``Tensor.to``) just before it is written.

    Returns:
        ``{"sha256", "bytes", "sumsq_mean"}``: the squared L2 norm of ``stored / num_examples``
        over the shard, in float64, from the values as written (rounded for ``BF16``): with
        ``fisher_norm: l2`` a merge then divides exactly what it reads by exactly its norm.
    """
    import torch

    storage = Storage(storage_options)
    parts = [open_checkpoint(storage, u, stem=STATS_STEM, what="fisher part") for u in part_urls]
    sumsq = 0.0
    with ShardWriter(storage, url, entries) as w:
        for name, dtype, shape in entries:
            refs = [p.tensors[name] for p in parts]
            row_bytes = 4 * math.prod(shape[1:]) if shape else 4
            rows = shape[0] if shape else 1
            step = max(1, REDUCE_BLOCK_BYTES // max(row_bytes, 1))
            for r0 in range(0, rows, step) if shape else [0]:
                span = (r0, min(rows, r0 + step)) if shape else None
                acc = read_tensor(storage, refs[0], span).to(torch.float32)
                for ref in refs[1:]:
                    acc.add_(read_tensor(storage, ref, span))
                stored = acc.to(torch.bfloat16) if dtype == "BF16" else acc
                block = float((stored.double() / num_examples).square().sum())  # finite iff stored is (float64)
                if check and not math.isfinite(block):
                    check_finite(acc, f"statistics summed over {len(refs)} part(s)", name, rows=span,
                                 total_rows=rows if shape else None, note="the sum over the parts overflowed float32")
                    check_finite(stored, f"statistics summed over {len(refs)} part(s)", name, rows=span,
                                 total_rows=rows if shape else None,
                                 note="a finite float32 sum rounded to inf in bfloat16 (stats_dtype)")
                sumsq += block
                w.write(name, stored)
    return {"sha256": w.sha256, "bytes": w.total_bytes, "sumsq_mean": sumsq}


def _reduce_and_commit(plan: FisherPlan, markers: list[dict[str, Any]], emit: Callable[[Event], None],
                       t0: float, lease: Lease) -> dict[str, Any]:
    import ray

    storage, job = plan.storage, plan.job
    num_examples = sum(m["num_examples"] for m in markers)
    assert num_examples == len(plan.data.examples), (num_examples, len(plan.data.examples))
    part_urls = [p.url for p in plan.parts]
    shapes = plan.shapes
    st_dtype = DTYPE_NAMES[job.stats_dtype]
    itemsize = DTYPES[st_dtype][1]
    remote = ray.remote(reduce_shard)
    refs = {}
    for file, names in plan.shards.items():
        entries = order_for_writing([(n, st_dtype, shapes[n]) for n in names])
        biggest = max(4 * math.prod(s) for _, _, s in entries)
        refs[file] = remote.options(
            num_cpus=1, memory=min(biggest, 2 * REDUCE_BLOCK_BYTES) + 2**27, max_retries=3,
            retry_exceptions=[ConnectionError, TimeoutError],
        ).remote(job.storage_options, part_urls, join(job.output, file), entries, num_examples,
                  not job.allow_nonfinite)
    shards = {}
    try:
        for file, ref in refs.items():
            shards[file] = ray.get(ref)
    except ray.exceptions.RayTaskError as e:
        cause = e.cause if isinstance(e.cause, BaseException) else e
        if isinstance(cause, NonFiniteError):
            raise NonFiniteError(f"Fisher statistics of model {display_url(job.model)} on data "
                                 f"{display_url(job.data)}: {cause}") from None
        raise cause from None
    emit({"event": "reduce_done", "shards": len(shards)})
    weight_map = {n: file for file, names in plan.shards.items() for n in names}
    index = {"metadata": {"total_size": sum(itemsize * math.prod(s) for s in shapes.values())},
             "weight_map": {n: weight_map[n] for n in shapes}}
    storage.write_bytes(join(job.output, INDEX_NAME), json.dumps(index, indent=2).encode())
    manifest = {
        "format_version": FORMAT_VERSION,
        "kind": "sar-dist fisher statistics",
        "statistic": "sum over examples of the squared per-example gradient of the summed target "
                     f"log-likelihood, summed in float32, stored as {job.stats_dtype}; mean = sum / num_examples",
        "job_id": output_id(plan),
        "stats_dtype": job.stats_dtype,
        "model": {"url": display_url(job.model), "fingerprint": plan.checkpoint.fingerprint(),
                  "content_fingerprint": plan.model_content},
        "estimator": job.estimator,
        "grad_batch": 1,
        "seed": job.seed,
        "num_examples": num_examples,
        "num_target_tokens": sum(m["num_targets"] for m in markers),
        "num_tokens": sum(m["num_tokens"] for m in markers),
        "data": {"url": display_url(job.data), "sha256": plan.data.sha256, "format": plan.data.format,
                 "container": plan.data.container, "chat_template_sha256": plan.data.chat_template_sha256,
                 "num_records": plan.data.num_records, "truncated": plan.data.truncated},
        "tokenizer": display_url(job.tokenizer or job.model) if plan.data.format != "tokenized" else None,
        "max_length": job.max_length,
        "overlength": job.overlength,
        "dtype": job.dtype,
        "device": job.device,
        "groups": job.groups,
        "ranks_per_group": job.ranks_per_group,
        "engine": job.engine,
        # over the stored values (rounded with stats_dtype bfloat16): what fisher_norm: l2 divides
        "l2_norm_mean": math.sqrt(sum(s["sumsq_mean"] for s in shards.values())),
        "tied": plan.tied,
        "parts": [{k: m.get(k) for k in ("part", "num_examples", "num_targets", "num_tokens", "compute_s",
                                          "peak_rss_bytes", "memory", "nodes")} for m in markers],
        "shards": {f: {"bytes": s["bytes"], "sha256": s["sha256"]} for f, s in shards.items()},
        "versions": package_versions(),
        "elapsed_s": round(time.perf_counter() - t0, 3),
    }
    storage.remove_partials(job.output, shards)  # from reduce tasks killed mid-write
    lease.check()  # a run that lost its lease must not declare the output complete
    storage.write_bytes(join(job.output, MANIFEST), json.dumps(manifest, indent=2).encode())
    emit({"event": "committed", "output": display_url(job.output), "num_examples": num_examples,
          "l2_norm_mean": manifest["l2_norm_mean"], "elapsed_s": manifest["elapsed_s"]})
    return manifest
