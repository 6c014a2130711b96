"""``run_shard_task``: the only read -> merge -> write loop.

Work proceeds in units (a whole tensor, or a block of rows of a tensor that an
elementwise method may process in pieces); the inputs of the next unit are read on a
background thread while the current one merges (bounded prefetch of one unit; a unit's
ranges are fetched with several requests in flight, ``Storage.read_many``), and the
result streams into the shard file. A unit of an elementwise method is merged in cache-sized
flat blocks with reused buffers (``execute/blocks.py``): no full-size compute-dtype copies. The
shard is visible only when complete; then a receipt records its size and sha256 so a rerun can
skip it.

Non-finite values stop the task (``sar_dist.finite``, unless the job allows them): every
floating-point block is checked as it is read, on the prefetch thread (beside the merge of the
previous unit), and every merged block before it is written. The blocks of a tensor whose
whole-tensor state is gathered in passes are checked once, in the first pass, instead; the inputs
of ``OUTPUT_COVERS_INPUTS`` methods only through their merged block. A failed check raises before
the shard or its receipt exists.
"""

from __future__ import annotations

import collections
import json
import math
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import torch

from sar_dist.checkpoint.format import DTYPES
from sar_dist.checkpoint.reader import read_tensors
from sar_dist.checkpoint.writer import ShardWriter
from sar_dist.execute.blocks import (
    block_rows,
    fill_update,
    finish_update,
    merge_blocks,
    merge_row_blocks,
    merge_via_update,
    observe_blocks,
    scale_fisher,
    state_over_update,
)
from sar_dist.finite import NonFiniteError, check_finite
from sar_dist.merge.base import MergeMethod, TensorContext
from sar_dist.merge.registry import get_method
from sar_dist.plan.types import ShardResult, ShardTask, TensorJob
from sar_dist.storage import READ_CONCURRENCY, Storage, display_url

Unit = tuple[TensorJob, tuple[int, int] | None]

# Methods whose merged entry is non-finite wherever an input entry is (sums and products of every
# input entry: no masks, selections or sparsification; 0 * NaN and 0 * inf are NaN too). For them the
# check of the merged block covers its inputs, which are read again to name the culprit only when it
# fails. Measured on 2 vCPU (bench/finite_bench.py, 12 layers, 2 GB read): task_arithmetic spent
# 0.12 s in checks with its inputs checked too (0.10 s of it on the prefetch thread, which competes
# for the 2 cores), 0.02 s (0.8% of the merge) this way. tests/test_nonfinite.py holds both methods
# to it with NaN, +inf and -inf inputs, at weight 0 and in the base.
OUTPUT_COVERS_INPUTS = frozenset({"linear", "task_arithmetic"})

WRITES_IN_FLIGHT = 2
"""Merged units that may wait for the writer thread (memory: that many output units beside the merge's)."""


def _row_ranges(job: TensorJob) -> list[tuple[int, int] | None]:
    """The row blocks of a tensor (``[None]``: the whole tensor at once)."""
    rows = job.shape[0] if job.shape else 0
    step = job.chunk_rows or rows
    if not job.shape or step >= rows:
        return [None]
    return [(r0, min(rows, r0 + step)) for r0 in range(0, rows, step)]


def _units(task: ShardTask) -> Iterator[Unit]:
    for job in task.tensors:
        if job.cache_update:  # one unit: its chunks are read by merge_cached_update itself
            yield job, None
            continue
        for rows in _row_ranges(job):
            yield job, rows


def _dir_url(file_url: str) -> str:
    return display_url(file_url.rsplit("/", 1)[0] if "/" in file_url else file_url)


def check_inputs(job: TensorJob, rows: tuple[int, int] | None, raw: list[torch.Tensor]) -> None:
    """Raise ``NonFiniteError`` naming the checkpoint and tensor if a source block holds NaN/inf.

    ``raw`` are the blocks as read (stored dtype), in ``job.sources`` order: base, inputs, Fisher.
    """
    if job.params is None:  # a copied non-float tensor
        return
    roles = (["base model"] if job.base is not None else []) + ["model"] * len(job.inputs) \
        + ["fisher statistics"] * len(job.fisher)
    total = job.shape[0] if job.shape else None
    for ref, t, role in zip(job.sources, raw, roles, strict=True):
        check_finite(t, f"{role} {_dir_url(ref.file)}", job.name, rows=rows, total_rows=total)


def check_output(job: TensorJob, rows: tuple[int, int] | None, out: torch.Tensor, output_url: str) -> None:
    """Raise ``NonFiniteError`` if a merged block (output dtype) holds NaN/inf: its inputs were
    checked, so the merge overflowed in the compute dtype or on the cast to the output dtype."""
    if job.params is None:
        return
    check_finite(out, f"merged output {_dir_url(output_url)}", job.name, rows=rows,
                 total_rows=job.shape[0] if job.shape else None,
                 note=f"the inputs are finite: the merge overflowed (computed in {job.compute_dtype}, "
                      f"written as {job.out_dtype})")


def gather_state(
    method: MergeMethod, job: TensorJob, storage: Storage, device: str, seed: int, concurrency: int = READ_CONCURRENCY,
    check: bool = False,
) -> tuple[Any, bool]:
    """Whole-tensor statistics of a chunked tensor, in passes over its row blocks.

    Each pass reads the blocks again (one block in memory at a time), so a tensor of any
    size is handled within the memory budget, exactly as if it were merged whole. With
    ``check``, every block is checked for non-finite values in the first pass.

    Returns:
        The state, and whether every block was checked (False when no pass was needed).
    """
    checked = False
    compute = DTYPES[job.compute_dtype][0]
    state = method.state(job.params, math.prod(job.shape), compute, device)
    row_elems = math.prod(job.shape[1:])
    step = block_rows(job.shape, device)
    while state.needs_pass():
        for rows in _row_ranges(job):
            raw = read_tensors(storage, job.sources, rows, concurrency=concurrency)
            if check:
                check_inputs(job, rows, raw)
            ctx = TensorContext(name=job.name, seed=seed, offset=(rows[0] if rows else 0) * row_elems)
            observe_blocks(state, raw, has_base=job.base is not None, num_inputs=len(job.inputs),
                           fisher_scale=job.fisher_scale, ctx=ctx, compute_dtype=compute, device=device, step=step)
            del raw
        state.end_pass()
        checked, check = checked or check, False  # the blocks do not change between passes
    return state, checked


def merge_cached_update(
    method: MergeMethod, job: TensorJob, storage: Storage, device: str, concurrency: int, arena: ReadArena,
    check: bool,
) -> Iterator[tuple[tuple[int, int], torch.Tensor]]:
    """Merge a ``cache_update`` tensor: every chunk of its sources is read once and its update
    computed into one whole-tensor buffer; the state's passes run over that buffer; then each
    chunk of the output is finished from it and the base, read again (``(rows, merged chunk)``
    in order). The bits are those of the chunked passes over the sources (the passes see the same
    update entries in the same order). With ``check``, every source chunk is checked as read."""
    compute = DTYPES[job.compute_dtype][0]
    step = block_rows(job.shape, device)
    kw = {"compute_dtype": compute, "device": device, "step": step}
    update = torch.empty(job.shape, dtype=compute, device=device)
    for r0, r1 in map(_rows, _row_ranges(job)):
        raw = read_tensors(storage, job.sources, (r0, r1), concurrency=concurrency, allocate=arena.allocate)
        if check:
            check_inputs(job, (r0, r1), raw)
        fill_update(method, job.params, raw, update[r0:r1], num_inputs=len(job.inputs),
                    fisher_scale=job.fisher_scale, **kw)
        del raw
    state = state_over_update(method, job.params, update, **kw)
    for r0, r1 in map(_rows, _row_ranges(job)):
        (base,) = read_tensors(storage, job.sources[:1], (r0, r1), concurrency=concurrency, allocate=arena.allocate)
        yield (r0, r1), finish_update(method, job.params, update[r0:r1], base, state,
                                      out_dtype=DTYPES[job.out_dtype][0], **kw)


def _rows(rows: tuple[int, int] | None) -> tuple[int, int]:
    assert rows is not None, "a cache_update tensor is chunked"
    return rows


def _state_from_memory(method: MergeMethod, job: TensorJob, raw: Sequence[torch.Tensor], ctx: TensorContext,
                       compute: torch.dtype, device: str, step: int) -> Any:
    """Whole-tensor statistics of a tensor held whole in memory: its passes run over row blocks of
    the sources as read (one read of the tensor, however many passes)."""
    state = method.state(job.params, math.prod(job.shape), compute, device)
    if hasattr(state, "hold_masks"):  # the merge reuses the passes' random masks (the unit is in memory)
        state.hold_masks()
    while state.needs_pass():
        observe_blocks(state, raw, has_base=job.base is not None, num_inputs=len(job.inputs),
                       fisher_scale=job.fisher_scale, ctx=ctx, compute_dtype=compute, device=device, step=step)
        state.end_pass()
    return state


class ReadArena:
    """One reused byte buffer that a unit's sources are read into (``read_tensors(allocate=)``).

    Fresh buffers for every unit cost a page fault per 4 KiB page, each time (glibc maps large
    blocks anew and unmaps them on free): about 1.3 s of a 5.4 GB task_arithmetic merge on 2 vCPU.
    The buffer grows to the largest unit and is then reused; a unit's tensors are views into it,
    valid until the arena's next ``allocate``.
    """

    ALIGN = 64

    def __init__(self) -> None:
        self._buf: torch.Tensor | None = None

    def allocate(self, sizes: Sequence[int]) -> list[torch.Tensor]:
        offsets, total = [], 0
        for n in sizes:
            offsets.append(total)
            total += -(-n // self.ALIGN) * self.ALIGN
        if self._buf is None or self._buf.numel() < total:
            self._buf = None  # free the smaller one first
            self._buf = torch.empty(total, dtype=torch.uint8)
        return [self._buf[o:o + n] for o, n in zip(offsets, sizes, strict=True)]

    def holds(self, t: torch.Tensor) -> bool:
        """Whether ``t`` is a view of this arena's memory."""
        return (self._buf is not None and t.device.type == "cpu"
                and t.untyped_storage().data_ptr() == self._buf.untyped_storage().data_ptr())


def _one_thread() -> None:
    """The prefetch thread's torch ops (the input checks) run on this thread alone: an intra-op
    team of its own beside the merge's oversubscribes the cores (measured once on 2 vCPU, best of
    3: checks of every input cost a task_arithmetic merge +19% wall that way, +5% single-threaded)."""
    torch.get_num_threads()  # torch's per-thread lazy init first, else the first op would undo the next line
    torch.set_num_threads(1)


def _read_unit(storage: Storage, unit: Unit, concurrency: int, check: bool = False,
               arena: ReadArena | None = None) -> list[torch.Tensor]:
    """Read a unit's sources (on the prefetch thread; into ``arena`` if given); with ``check``,
    check them there too, beside the merge of the previous unit. A ``cache_update`` tensor reads
    its own chunks (nothing is read here)."""
    job, rows = unit
    if job.cache_update:
        return []
    raw = read_tensors(storage, job.sources, rows, concurrency=concurrency,
                       allocate=arena.allocate if arena is not None else None)
    if check:
        check_inputs(job, rows, raw)
    return raw


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
    row_elems = raw[0].numel() // raw[0].shape[0] if raw[0].dim() and raw[0].shape[0] else 0
    shape = raw[0].shape
    offset = rows[0] * row_elems if rows else 0
    if method.elementwise(job.params):  # no whole-tensor statistic: any state is unused
        ctx = TensorContext(name=job.name, seed=seed, offset=offset)
        out = merge_blocks(method, job.params, raw, has_base=job.base is not None, num_inputs=len(job.inputs),
                           fisher_scale=job.fisher_scale, ctx=ctx, compute_dtype=compute, out_dtype=out_dtype,
                           device=device)
        raw.clear()
        return out
    if method.state is not None and job.shape and shape[0] > 0:
        # whole-tensor statistics: passes over row blocks of the unit in memory (unless given for a
        # chunk of a larger tensor), then the merge block by block: no full-size temporaries
        step = block_rows(job.shape, device)
        ctx = TensorContext(name=job.name, seed=seed, offset=offset)
        if method.update is not None:  # the passes run over the unit's update, computed once
            out = merge_via_update(method, job.params, raw, state, num_inputs=len(job.inputs),
                                   fisher_scale=job.fisher_scale, compute_dtype=compute,
                                   out_dtype=out_dtype, device=device, step=step)
            raw.clear()
            return out
        if state is None:
            state = _state_from_memory(method, job, raw, ctx, compute, device, step)
        out = merge_row_blocks(method, job.params, raw, state, has_base=job.base is not None,
                               num_inputs=len(job.inputs), fisher_scale=job.fisher_scale, ctx=ctx,
                               compute_dtype=compute, out_dtype=out_dtype, device=device, step=step)
        raw.clear()
        return out
    # convert in place in the caller's list, so each stored-dtype buffer is freed as soon
    # as its compute-dtype copy exists (peak: one extra tensor, not a second set)
    for i in range(len(raw)):
        raw[i] = raw[i].to(device=device, dtype=compute)
    tensors = list(raw)
    raw.clear()
    base = tensors.pop(0) if job.base is not None else None
    n = len(job.inputs)
    inputs, fisher = tensors[:n], scale_fisher(tensors[n:], job.fisher_scale)
    ctx = TensorContext(name=job.name, seed=seed, offset=offset)
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
    check = not task.allow_nonfinite
    check_in = check and method.name not in OUTPUT_COVERS_INPUTS
    threads = torch.get_num_threads()
    # two read arenas: unit i is read into arenas[i % 2] while unit i - 1 (in the other) merges
    arenas = (ReadArena(), ReadArena())
    with ShardWriter(storage, task.url, entries) as writer, \
            ThreadPoolExecutor(max_workers=1, initializer=_one_thread) as pool, \
            ThreadPoolExecutor(max_workers=1) as write_pool:
        pool.submit(int).result()  # the thread exists and runs single-threaded; then
        torch.set_num_threads(threads)  # restore the default it changed for threads made later (ours: unchanged)

        def stateful(unit: Unit) -> bool:  # a row block of a tensor whose state is gathered in passes
            return unit[1] is not None and method.state is not None and unit[0].params is not None

        def prefetch(k: int) -> Future:
            # blocks of stateful tensors are checked by the state's first pass, not again on prefetch
            return pool.submit(_read_unit, storage, units[k], task.read_concurrency,
                               check_in and not stateful(units[k]), arenas[k % 2])

        # merged units are hashed and written on their own thread, beside the next merge; at most
        # WRITES_IN_FLIGHT outputs wait there (each is a fresh tensor, never a view of an arena)
        writes: collections.deque[tuple[Future, TensorJob | None]] = collections.deque()

        def written(write: Future, finished: TensorJob | None) -> None:  # a tensor is reported once in the file
            write.result()
            if finished is not None and on_tensor is not None:
                on_tensor(finished)

        pending: Future | None = prefetch(0) if units else None
        state = None
        state_checked = False
        for i, unit in enumerate(units):
            assert pending is not None
            raw = pending.result()  # raises the prefetch thread's NonFiniteError here
            job, rows = unit
            if job.cache_update:
                # reads its chunks into this unit's arena; the next unit is read beside it
                pending = prefetch(i + 1) if i + 1 < len(units) else None
                for chunk_rows, out in merge_cached_update(method, job, storage, task.device, task.read_concurrency,
                                                           arenas[i % 2], check_in):
                    if check:
                        check_output(job, chunk_rows, out, task.url)
                    while len(writes) >= WRITES_IN_FLIGHT:
                        written(*writes.popleft())
                    last = chunk_rows[1] == job.shape[0]
                    writes.append((write_pool.submit(writer.write, job.name, out), job if last else None))
                    del out
                continue
            if stateful(unit) and rows[0] == 0:
                state, state_checked = gather_state(method, job, storage, task.device, task.seed,
                                                    task.read_concurrency, check=check_in)  # before its first block
            if check_in and stateful(unit) and not state_checked:  # a state that needed no pass
                check_inputs(job, rows, raw)
            # arenas[(i + 1) % 2] held unit i - 1, whose merge is done and whose output is its own
            pending = prefetch(i + 1) if i + 1 < len(units) else None
            out = merge_unit(method, unit, raw, task.seed, task.device, state if rows is not None else None)
            del raw
            if arenas[i % 2].holds(out):  # a copied tensor in its stored dtype: the arena is reused
                out = out.clone()
            if check:
                try:
                    check_output(job, rows, out, task.url)
                except NonFiniteError:
                    if not check_in:  # name the input that made it non-finite, if one did
                        check_inputs(job, rows, _read_unit(storage, unit, task.read_concurrency))
                    raise
            while len(writes) >= WRITES_IN_FLIGHT:
                written(*writes.popleft())
            finished = rows is None or rows[1] == job.shape[0]
            writes.append((write_pool.submit(writer.write, job.name, out), job if finished else None))
            del out
            if finished:
                state = None
        while writes:
            written(*writes.popleft())
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
