"""``run_shard_task``: the only read -> merge -> write loop.

Work proceeds in units (a whole tensor, or a block of rows of a tensor that an
elementwise method may process in pieces); the inputs of the next unit are read on a
background thread while the current one merges (bounded prefetch of one unit; a unit's
ranges are fetched with several requests in flight, ``Storage.read_many``), and the
result streams into the shard file. The shard is visible only when complete; then a
receipt records its size and sha256 so a rerun can skip it.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import torch

from sar_dist.checkpoint.format import DTYPES
from sar_dist.checkpoint.reader import read_tensors
from sar_dist.checkpoint.writer import ShardWriter
from sar_dist.merge.base import MergeMethod, TensorContext
from sar_dist.merge.registry import get_method
from sar_dist.plan.types import ShardResult, ShardTask, TensorJob
from sar_dist.storage import READ_CONCURRENCY, Storage

Unit = tuple[TensorJob, tuple[int, int] | None]


def _row_ranges(job: TensorJob) -> list[tuple[int, int] | None]:
    """The row blocks of a tensor (``[None]``: the whole tensor at once)."""
    rows = job.shape[0] if job.shape else 0
    step = job.chunk_rows or rows
    if not job.shape or step >= rows:
        return [None]
    return [(r0, min(rows, r0 + step)) for r0 in range(0, rows, step)]


def _units(task: ShardTask) -> Iterator[Unit]:
    for job in task.tensors:
        for rows in _row_ranges(job):
            yield job, rows


def gather_state(
    method: MergeMethod, job: TensorJob, storage: Storage, device: str, seed: int, concurrency: int = READ_CONCURRENCY
) -> Any:
    """Whole-tensor statistics of a chunked tensor, in passes over its row blocks.

    Each pass reads the blocks again (one block in memory at a time), so a tensor of any
    size is handled within the memory budget, exactly as if it were merged whole.
    """
    compute = DTYPES[job.compute_dtype][0]
    state = method.state(job.params, math.prod(job.shape), compute, device)
    row_elems = math.prod(job.shape[1:])
    while state.needs_pass():
        for rows in _row_ranges(job):
            tensors = [t.to(device=device, dtype=compute) for t in read_tensors(storage, job.sources, rows,
                                                                                 concurrency=concurrency)]
            base = tensors.pop(0) if job.base is not None else None
            ctx = TensorContext(name=job.name, seed=seed, offset=(rows[0] if rows else 0) * row_elems)
            n = len(job.inputs)
            if job.fisher:
                state.observe(tensors[:n], base, ctx, fisher=_scaled_fisher(tensors[n:], job))
            else:
                state.observe(tensors[:n], base, ctx)
            del tensors, base
        state.end_pass()
    return state


def _scaled_fisher(stats: list[torch.Tensor], job: TensorJob) -> list[torch.Tensor]:
    """Stored Fisher sums (compute dtype) -> the F the method takes (``TensorJob.fisher_scale``)."""
    return [f.mul_(scale) for f, scale in zip(stats, job.fisher_scale, strict=True)]


def _read_unit(storage: Storage, unit: Unit, concurrency: int) -> list[torch.Tensor]:
    job, rows = unit
    return read_tensors(storage, job.sources, rows, concurrency=concurrency)


def merge_unit(
    method: MergeMethod, unit: Unit, raw: list[torch.Tensor], seed: int, device: str, state: Any = None
) -> torch.Tensor:
    """Merge one unit's inputs (stored dtype, CPU) into the output dtype (CPU).

    Args:
        method: the registered method.
        unit: the tensor job and optional row range.
        raw: its sources as read: base (if any), inputs, then Fisher statistics; the list
            is emptied (its tensors are converted and handed to the method).
        seed: job seed (keyed randomness).
        device: compute device.
        state: whole-tensor statistics when the unit is a row block of a method that needs them.

    Returns:
        The merged block, in the job's output dtype, on CPU.
    """
    job, rows = unit
    out_dtype = DTYPES[job.out_dtype][0]
    if job.params is None:
        return raw[0].to(out_dtype)
    compute = DTYPES[job.compute_dtype][0]
    # convert in place in the caller's list, so each stored-dtype buffer is freed as soon
    # as its compute-dtype copy exists (peak: one extra tensor, not a second set)
    row_elems = raw[0].numel() // raw[0].shape[0] if raw[0].dim() and raw[0].shape[0] else 0
    shape = raw[0].shape
    for i in range(len(raw)):
        raw[i] = raw[i].to(device=device, dtype=compute)
    tensors = list(raw)
    raw.clear()
    base = tensors.pop(0) if job.base is not None else None
    n = len(job.inputs)
    inputs, fisher = tensors[:n], _scaled_fisher(tensors[n:], job)
    ctx = TensorContext(name=job.name, seed=seed, offset=rows[0] * row_elems if rows else 0)
    kwargs: dict[str, Any] = {"fisher": fisher} if fisher else {}
    if state is not None:
        kwargs["state"] = state
    del tensors
    out = method.fn(inputs, base, job.params, ctx=ctx, **kwargs)
    del inputs, base, fisher
    assert out.shape == shape, (job.name, tuple(out.shape), tuple(shape))
    return out.to(dtype=out_dtype).cpu()


def run_shard_task(task: ShardTask, on_tensor: Callable[[TensorJob], None] | None = None) -> ShardResult:
    """Read, merge and write one output shard; then write its receipt.

    Args:
        task: the shard task from the plan.
        on_tensor: called after each finished tensor (local progress).

    Returns:
        The shard's result (also written as its receipt).
    """
    # no autograd for merges; scoped, so a caller's own grad mode is left as it was
    with torch.no_grad():
        return _run_shard_task(task, on_tensor)


def _run_shard_task(task: ShardTask, on_tensor: Callable[[TensorJob], None] | None) -> ShardResult:
    start = time.perf_counter()
    storage = Storage(task.storage_options)
    method = get_method(task.method)
    entries = [(j.name, j.out_dtype, j.shape) for j in task.tensors]
    units = list(_units(task))
    with ShardWriter(storage, task.url, entries) as writer, ThreadPoolExecutor(max_workers=1) as pool:
        pending: Future | None = pool.submit(_read_unit, storage, units[0], task.read_concurrency) if units else None
        state = None
        for i, unit in enumerate(units):
            assert pending is not None
            raw = pending.result()
            job, rows = unit
            if rows is not None and rows[0] == 0 and method.state is not None and job.params is not None:
                state = gather_state(method, job, storage, task.device, task.seed, task.read_concurrency)  # before its first block
            pending = pool.submit(_read_unit, storage, units[i + 1], task.read_concurrency) if i + 1 < len(units) else None
            out = merge_unit(method, unit, raw, task.seed, task.device, state if rows is not None else None)
            del raw
            writer.write(job.name, out)
            del out
            if rows is None or rows[1] == job.shape[0]:  # the tensor is finished
                state = None
                if on_tensor is not None:
                    on_tensor(job)
    result = ShardResult(
        plan_id=task.plan_id,
        index=task.index,
        file_name=task.file_name,
        bytes=writer.total_bytes,
        sha256=writer.sha256,
        tensors=tuple(j.name for j in task.tensors),
        read_bytes=task.read_bytes,
        seconds=time.perf_counter() - start,
    )
    storage.write_bytes(task.receipt_url, json.dumps(result.to_dict()).encode())
    return result
