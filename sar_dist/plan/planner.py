"""``build_plan(job)``: decide every output tensor, shard and task from headers only.

Validates that every input has every tensor with the same shape and dtype, that method
parameters resolve for every tensor, and that the output does not already hold a
different merge; raises one ``ValueError`` naming file and tensor. Reads no tensor data.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from sar_dist.checkpoint.format import DTYPE_NAMES, DTYPES, FLOAT_DTYPES, build_header, order_for_writing, pack_in_order
from sar_dist.checkpoint.index import CheckpointIndex, layout_problems, open_checkpoint, read_json
from sar_dist.checkpoint.writer import SAFETENSORS_METADATA
from sar_dist.config import MergeJob
from sar_dist.fisher.stats import FisherStats, open_fisher
from sar_dist.merge.base import MergeMethod
from sar_dist.merge.methods.trim import band_state_bytes
from sar_dist.plan import params as param_resolver
from sar_dist.plan.types import Plan, ShardTask, TensorJob
from sar_dist.storage import (
    READ_CONCURRENCY,
    READ_PART_BYTES,
    Storage,
    check_read_concurrency,
    display_url,
    is_local,
    join,
)

MANIFEST_NAME = "sar_merge.json"
STATE_DIR = ".sar_dist"  # receipts of finished shards live here until commit
DEFAULT_MEMORY_BUDGET = 2**30
# interpreter + torch + buffers a task holds besides its tensors (measured ~250 MB RSS)
TASK_OVERHEAD_BYTES = 300 * 2**20
COPIED_FILES = ("generation_config.json",)
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
)


def unit_bytes(job: TensorJob, rows: int) -> int:
    """Peak working set for ``rows`` rows of a tensor: read buffers for this and the
    prefetched next block, compute-dtype copies, method scratch and the output."""
    row_elems = math.prod(job.shape[1:]) if job.shape else 1
    csize = DTYPES[job.compute_dtype][1]
    sources = job.sources
    stored = sum(r.info.itemsize for r in sources)
    per_elem = 2 * stored + (2 * len(sources) + 4) * csize + DTYPES[job.out_dtype][1]
    return rows * row_elems * per_elem


def state_bytes(job: TensorJob, method: MergeMethod) -> int:
    """Bound on what a method's whole-tensor state holds beside the blocks (0 without one).

    Counted in a task's memory request, not against ``--memory-budget`` (which sizes the blocks).
    The bound of the largest state, ``trim.BandState``'s, covers the others (``sar``'s single
    selector, ``slerp``'s piece buffers, the per-row L1 sums of DARE and DELLA).
    """
    if method.state is None or job.params is None:
        return 0
    shape = job.shape or (1,)
    return len(job.inputs) * band_state_bytes(shape[0], math.prod(shape), DTYPES[job.compute_dtype][1])


def _pick_chunk_rows(job: TensorJob, elementwise: bool, budget: int) -> tuple[int, bool]:
    """Rows per chunk and whether the tensor fits the budget."""
    rows = job.shape[0] if job.shape else 1
    whole = unit_bytes(job, rows)
    if whole <= budget or rows <= 1:
        return rows, whole <= budget
    if not elementwise:
        return rows, False
    per_row = unit_bytes(job, 1)
    fit = max(1, budget // per_row)
    return int(fit), per_row <= budget


def _raise_all(problems: list[str]) -> None:
    if problems:
        more = f" (and {len(problems) - 1} more problem(s))" if len(problems) > 1 else ""
        raise ValueError(problems[0] + more)


def _fisher_scale(stats: FisherStats, params: Any) -> float:
    """Stored sums -> the F a method takes: the mean, divided by its global L2 norm with
    ``fisher_norm: l2`` (recorded by the Fisher stage, so no pass over the statistics)."""
    scale = 1.0 / stats.num_examples
    if getattr(params, "fisher_norm", "none") == "l2":
        if not stats.l2_norm_mean > 0:
            raise ValueError(f"fisher statistics {display_url(stats.index.url)}: all zero (l2_norm_mean 0); "
                             f"fisher_norm: l2 cannot normalise them")
        scale /= stats.l2_norm_mean
    return scale


def build_plan(
    job: MergeJob,
    *,
    device: str = "cpu",
    memory_budget: int = DEFAULT_MEMORY_BUDGET,
    storage: Storage | None = None,
    read_concurrency: int = READ_CONCURRENCY,
    pending_statistics: frozenset[str] = frozenset(),
) -> Plan:
    """Plan a merge from headers only.

    Args:
        job: the validated config.
        device: where tasks compute (``cpu`` or ``cuda``).
        memory_budget: bytes one task may hold for tensors; larger tensors of
            elementwise methods are processed in row chunks.
        storage: storage to read headers with (default: from ``job.storage_options``).
        read_concurrency: most range requests one task keeps in flight (does not change the result).
        pending_statistics: Fisher statistics URLs that a pipeline computes before the merge
            (``sar-dist run``). They stand in as the model's own names and shapes, which is what
            the Fisher stage writes, so every other check runs before any work. Such a plan is
            for checking only: its ``plan_id`` and scales are not those of the real merge.

    Returns:
        The plan.

    Raises:
        ValueError: any input problem, naming file and tensor.
    """
    storage = storage or Storage(job.storage_options)
    method: MergeMethod = job.method
    base_url = job.base_model
    input_refs = job.input_models()
    input_urls = [m.model for m in input_refs]
    # a base the method does not merge is still opened: its layout must match (it supplies config.json)
    urls = ([base_url] if base_url else []) + input_urls
    check_read_concurrency(read_concurrency)  # bad input: before any header is read

    with ThreadPoolExecutor(max_workers=min(8, len(urls))) as pool:
        futures = {
            u: pool.submit(open_checkpoint, storage, u, what="base model" if u == base_url else "model")
            for u in dict.fromkeys(urls)
        }
        indexes = {u: f.result() for u, f in futures.items()}
        fisher_indexes: list[CheckpointIndex] = []
        fisher_stats: list[FisherStats] = []
        if method.needs_fisher:
            # statistics must come from `sar-dist fisher` on exactly this model
            fisher_futures = [None if m.fisher in pending_statistics else pool.submit(open_fisher, storage, m.fisher,
                                                                                      indexes[m.model])
                              for m in input_refs]
            fisher_stats = [FisherStats(index=indexes[m.model], manifest={"num_examples": 1, "l2_norm_mean": 1.0})
                            if f is None else f.result() for m, f in zip(input_refs, fisher_futures, strict=True)]
            fisher_indexes = [s.index for s in fisher_stats]

    ref_url = base_url if method.needs_base else input_urls[0]
    ref = indexes[ref_url]
    ref_name = "the base model" if method.needs_base else "the first model"
    problems: list[str] = []
    for u in input_urls:
        if u != ref_url:
            problems += layout_problems(ref_name, ref, indexes[u], "model")
    if base_url is not None and base_url != ref_url and base_url not in input_urls:
        problems += layout_problems(ref_name, ref, indexes[base_url], "base model", dtypes=False)
    _raise_all(problems)

    base_dir = base_url if base_url is not None else input_urls[0]
    config_json = read_json(storage, join(base_dir, "config.json"))
    num_layers = int((config_json or {}).get("num_hidden_layers", 0)) or (
        1 + max((param_resolver.layer_index(n) or 0 for n in ref.tensors), default=0)
    )
    compute = DTYPE_NAMES[job.dtype] if job.dtype else "F32"
    out_override = DTYPE_NAMES[job.out_dtype] if job.out_dtype else (DTYPE_NAMES[job.dtype] if job.dtype else None)

    jobs: list[TensorJob] = []
    warnings: list[str] = []
    per_model_params = [m.parameters for m in input_refs]
    for name, r in ref.tensors.items():
        base_ref = indexes[base_url].tensors[name] if method.needs_base else None
        inputs = tuple(indexes[u].tensors[name] for u in input_urls)
        if r.info.dtype not in FLOAT_DTYPES:
            tj = TensorJob(name=name, shape=r.info.shape, out_dtype=r.info.dtype, compute_dtype=r.info.dtype,
                           base=None, inputs=(), copy_from=r)
            warnings.append(f"tensor '{name}' is {r.info.dtype} (not floating point): copied from {ref_name}")
        else:
            t = param_resolver.layer_position(name, num_layers)
            params = param_resolver.resolve(method, name, t, job.parameters, per_model_params)
            tj = TensorJob(
                name=name,
                shape=r.info.shape,
                out_dtype=out_override or r.info.dtype,
                compute_dtype=compute,
                base=base_ref,
                inputs=inputs,
                fisher=tuple(fi.tensors[name] for fi in fisher_indexes),
                fisher_scale=tuple(_fisher_scale(s, params) for s in fisher_stats),
                params=params,
            )
        # row blocks: elementwise methods, and methods that gather whole-tensor statistics in
        # passes (1-D tensors are small and stay whole)
        chunkable = tj.params is None or method.elementwise(tj.params) or (
            method.state is not None and len(tj.shape) >= 2
        )
        rows, fits = _pick_chunk_rows(tj, chunkable, memory_budget)
        if (chunkable and tj.params is not None and method.update is not None and not method.elementwise(tj.params)
                and rows < tj.shape[0]):
            # hold the tensor's update (half the budget at most) and chunk the reads in the rest:
            # one read of every source instead of one per pass
            update = math.prod(tj.shape) * DTYPES[compute][1]
            if 2 * update <= memory_budget:
                rows, fits = _pick_chunk_rows(tj, chunkable, memory_budget - update)
                tj = dataclasses.replace(tj, cache_update=True)
        if not fits:
            need = unit_bytes(tj, rows if chunkable else (tj.shape[0] if tj.shape else 1))
            why = "one row" if chunkable else f"processed whole: {method.name} needs whole-tensor statistics"
            warnings.append(
                f"tensor '{name}' needs ~{need / 2**20:.0f} MiB, over the memory budget of "
                f"{memory_budget / 2**20:.0f} MiB ({why})"
            )
        jobs.append(dataclasses.replace(tj, chunk_rows=rows))

    shards = _assign_shards(jobs, job.max_shard_bytes)
    layout = [[(j.name, j.out_dtype, j.shape) for j in s] for s in shards]
    inputs_fp = {u: idx.fingerprint() for u, idx in indexes.items()}
    inputs_fp.update({m.fisher: fi.fingerprint() for m, fi in zip(input_refs, fisher_indexes, strict=False)})
    resolved = job.to_dict()
    # allow_nonfinite changes no output bit (it only skips checks): a run stopped by a check
    # resumes with it
    identity = {k: v for k, v in resolved.items() if k not in ("output", "storage_options", "allow_nonfinite")}
    plan_id = hashlib.sha256(
        json.dumps({"job": identity, "inputs": inputs_fp, "device": device, "layout": layout},
                   sort_keys=True, default=str).encode()
    ).hexdigest()

    n = len(shards)
    tasks = []
    remote_inputs = any(not is_local(ref.file) for j in jobs for ref in j.sources)
    read_buffer = read_concurrency * READ_PART_BYTES if remote_inputs else 0
    for i, shard_jobs in enumerate(shards):
        file_name = "model.safetensors" if n == 1 else f"model-{i + 1:05d}-of-{n:05d}.safetensors"
        peak = max((unit_bytes(j, j.chunk_rows or 1) + j.update_bytes for j in shard_jobs), default=0)
        # a state's statistics are held beside the blocks, outside the budget for tensor blocks
        state = max((state_bytes(j, method) for j in shard_jobs), default=0)
        tasks.append(
            ShardTask(
                index=i,
                file_name=file_name,
                url=join(job.output, file_name),
                receipt_url=join(job.output, STATE_DIR, f"{file_name}.json"),
                plan_id=plan_id,
                method=method.name,
                tensors=tuple(shard_jobs),
                seed=job.seed,
                device=device,
                storage_options=job.storage_options,
                read_bytes=sum(j.read_bytes for j in shard_jobs),
                out_bytes=len(build_header(layout[i], SAFETENSORS_METADATA)[0]) + sum(j.out_bytes for j in shard_jobs),
                # parts in flight are held until copied into their tensors (remote inputs)
                estimated_bytes=TASK_OVERHEAD_BYTES + peak + state + read_buffer,
                read_concurrency=read_concurrency,
                allow_nonfinite=job.allow_nonfinite,
            )
        )

    if config_json is not None:
        config_json = dict(config_json)
        out_names = {j.out_dtype for j in jobs if j.copy_from is None}
        if len(out_names) == 1:
            torch_name = {v: k for k, v in DTYPE_NAMES.items() if k in ("float32", "float16", "bfloat16", "float64")}
            dtype_name = torch_name.get(out_names.pop())
            if dtype_name:
                config_json["torch_dtype"] = dtype_name
                if "dtype" in config_json:
                    config_json["dtype"] = dtype_name
    copy_files = [(join(base_dir, f), f) for f in COPIED_FILES if storage.exists(join(base_dir, f))]
    if job.tokenizer_source is not None:
        tok_dir = base_dir if job.tokenizer_source == "base" else job.tokenizer_source
        found = [(join(tok_dir, f), f) for f in TOKENIZER_FILES if storage.exists(join(tok_dir, f))]
        if not found:
            raise ValueError(f"tokenizer_source {display_url(tok_dir)}: no tokenizer files ({', '.join(TOKENIZER_FILES[:3])}, ...)")
        copy_files += found

    return Plan(
        plan_id=plan_id,
        output=job.output,
        tasks=tuple(tasks),
        job=resolved,
        inputs=inputs_fp,
        config_json=config_json,
        copy_files=tuple(copy_files),
        memory_budget=memory_budget,
        warnings=tuple(warnings),
        statistics=tuple(_statistics_record(m.model, m.fisher, s)
                         for m, s in zip(input_refs, fisher_stats, strict=False) if m.fisher not in pending_statistics),
    )


def _statistics_record(model: str, url: str, stats: FisherStats) -> dict[str, Any]:
    """What the merge manifest records of the statistics a model's merge used."""
    m = stats.manifest
    return {"model": display_url(model), "fisher": display_url(url), "job_id": m.get("job_id"),
            "num_examples": m.get("num_examples"), "estimator": m.get("estimator"),
            "stats_dtype": m.get("stats_dtype", "float32"), "l2_norm_mean": m.get("l2_norm_mean")}


def _assign_shards(jobs: list[TensorJob], max_shard_bytes: int) -> list[list[TensorJob]]:
    """Greedy packing in checkpoint order; each shard then in safetensors write order."""
    by_name = {j.name: j for j in jobs}
    shards = pack_in_order([(j.name, j.out_bytes) for j in jobs], max_shard_bytes) if jobs else []
    return [[by_name[name] for name, _, _ in order_for_writing([(n, by_name[n].out_dtype, by_name[n].shape) for n in s])]
            for s in shards]
