"""Elementwise merges over cache-sized blocks of a unit, in reused buffers.

A unit (a whole tensor, or a block of its rows) is read in its stored dtypes. An elementwise
method's result at an entry depends only on the inputs at that entry (``MergeMethod.elementwise``),
so the unit is merged in flat blocks of ``block_numel`` entries: each block's sources are converted
into compute-dtype buffers made once per unit, merged, and rounded straight into the output. No
full-size compute-dtype copy of any input exists, and the working set stays in the CPU caches.

The method's fused kernel (``MergeMethod.kernel``, where it has one) or its ``fn`` runs on each
block, and the output is bit-identical to the method on the whole unit: every block op is the same elementwise IEEE operation, and the sums over
the model dimension are taken over ``(models, n)`` blocks laid out as a fresh tensor would be,
whose per-column order torch keeps whatever ``n`` is when blocks start at multiples of
``block_numel`` (tests/test_blocks.py holds every method to it on awkward sizes).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import Tensor

from sar_dist.merge import ops
from sar_dist.merge.base import MergeMethod, TensorContext

CPU_BLOCK_NUMEL = 2**18
"""Entries per block on the CPU (1 MiB per float32 buffer; the float32 buffers of a SAR merge of three
models, seven sources, take 7 MiB, in L3 beside the per-core L2). Measured on 2 vCPU with
bench/unit_bench.py (one 2048 x 5632 tensor, three bf16 models, best of 3, GB/s of input) at 2**16,
2**18 and 2**20: task_arithmetic 2.52 / 3.21 / 2.73, ties 0.40 / 0.59 / 0.58, dare_ties 0.23 / 0.32 /
0.35, sar 1.23 / 1.59 / 1.56, sar at density 0.5 0.85 / 1.28 / 1.21 (each op's fixed cost is paid 4x
less often than at 2**16, and the blocks still stay in cache). Earlier, 2**16 blocks against whole
units (16M entries): task_arithmetic 2.31 GB/s in blocks, 0.13 GB/s whole."""

CUDA_BLOCK_NUMEL = 2**25
"""Entries per block on a GPU: large enough that kernel launches do not dominate."""


def block_numel(device: torch.device | str) -> int:
    """The block size for ``device`` (a multiple of 1024, so blocks keep torch's vectorized layout)."""
    return CUDA_BLOCK_NUMEL if torch.device(device).type == "cuda" else CPU_BLOCK_NUMEL


def scale_fisher(stats: Sequence[Tensor], scales: Sequence[float]) -> list[Tensor]:
    """Stored Fisher sums (compute dtype, scaled in place) -> the F a method takes
    (``TensorJob.fisher_scale``: the mean, L2-normalised with ``fisher_norm: l2``)."""
    return [f.mul_(s) for f, s in zip(stats, scales, strict=True)]


def merge_blocks(
    method: MergeMethod,
    params: Any,
    raw: Sequence[Tensor],
    *,
    has_base: bool,
    num_inputs: int,
    fisher_scale: Sequence[float],
    ctx: TensorContext,
    compute_dtype: torch.dtype,
    out_dtype: torch.dtype,
    device: str,
    block: int | None = None,
) -> Tensor:
    """Merge one unit of an elementwise method block by block.

    Args:
        method: the registered method (``method.elementwise(params)`` holds).
        params: its resolved parameters.
        raw: the unit's sources as read (stored dtypes, CPU): base (if any), inputs, Fisher statistics.
        has_base: whether ``raw[0]`` is the base.
        num_inputs: how many non-base inputs follow it.
        fisher_scale: per input, the factor that turns stored statistics into the method's F.
        ctx: the unit's tensor context (``ctx.offset``: flat index of its first entry).
        compute_dtype: the method's compute dtype.
        out_dtype: the output dtype.
        device: compute device.
        block: entries per block (default :func:`block_numel`).

    Returns:
        The merged unit, in ``out_dtype``, on the CPU, shaped like ``raw[0]``.
    """
    shape = raw[0].shape
    numel = raw[0].numel()
    out = torch.empty(shape, dtype=out_dtype)
    if numel == 0:
        return out
    # one thread on the CPU: a 64K-entry op split across cores costs more in hand-offs than it saves,
    # and the task's read and write threads want the other cores. Measured on 2 vCPU, 12-layer
    # task_arithmetic task (5.4 GB): 8.8-9.1 s wall and ~7 CPU-s on one thread, 10.4-10.7 s and
    # ~12.5 CPU-s on two. Elementwise results do not depend on the thread count.
    with ops.one_thread() if torch.device(device).type == "cpu" else contextlib.nullcontext():
        _merge_blocks(method, params, raw, out, has_base=has_base, num_inputs=num_inputs,
                      fisher_scale=fisher_scale, ctx=ctx, compute_dtype=compute_dtype, device=device, block=block)
    return out


def _merge_blocks(
    method: MergeMethod, params: Any, raw: Sequence[Tensor], out: Tensor, *, has_base: bool, num_inputs: int,
    fisher_scale: Sequence[float], ctx: TensorContext, compute_dtype: torch.dtype, device: str, block: int | None,
) -> None:
    """The block loop of :func:`merge_blocks`, into ``out``."""
    numel = out.numel()
    step = block or block_numel(device)
    flat = [r.reshape(-1) for r in raw]
    flat_out = out.view(-1)
    first_input = 1 if has_base else 0
    kernel = (method.kernel(params, num_inputs, compute_dtype, device)
              if method.kernel is not None and has_base and len(flat) == 1 + num_inputs else None)
    buffers = [torch.empty(min(step, numel), dtype=compute_dtype, device=device) for _ in flat]
    for start in range(0, numel, step):
        stop = min(numel, start + step)
        block_ctx = TensorContext(name=ctx.name, seed=ctx.seed, offset=ctx.offset + start)
        # one copy converts dtype (and moves to the device) into the reused buffer
        blocks = [buf[: stop - start].copy_(f[start:stop]) for buf, f in zip(buffers, flat, strict=True)]
        if kernel is not None:
            flat_out[start:stop].copy_(kernel(blocks, block_ctx))
            continue
        base = blocks[0] if has_base else None
        inputs = blocks[first_input:first_input + num_inputs]
        fisher = scale_fisher(blocks[first_input + num_inputs:], fisher_scale)
        kwargs: dict[str, Any] = {"fisher": fisher} if fisher else {}
        result = method.fn(inputs, base, params, ctx=block_ctx, **kwargs)
        flat_out[start:stop].copy_(result)


def block_rows(shape: Sequence[int], device: torch.device | str) -> int:
    """Rows of a tensor of ``shape`` per row block: about :func:`block_numel` entries, at least one row.

    A 1-D tensor is one block: a per-row statistic of it (DELLA's ranks) is taken over the whole.
    """
    if len(shape) < 2:
        return max(1, shape[0] if shape else 1)
    row_elems = math.prod(shape[1:]) or 1
    return max(1, block_numel(device) // row_elems)


def row_blocks(
    raw: Sequence[Tensor], step: int, compute_dtype: torch.dtype, device: str
) -> Iterator[tuple[int, int, list[Tensor]]]:
    """The row blocks ``[r0, r1)`` of a unit's sources, in order, each converted into compute-dtype
    buffers made once (the blocks yielded are overwritten by the next: use them before asking for it).

    Args:
        raw: the unit's sources as read (stored dtypes, CPU, same first dimension).
        step: rows per block.
        compute_dtype: the dtype of the blocks yielded.
        device: where they are.
    """
    rows = raw[0].shape[0]
    row_elems = raw[0].numel() // rows if rows else 0
    size = min(step, rows) * row_elems
    buffers = [torch.empty(size, dtype=compute_dtype, device=device) for _ in raw]
    for r0 in range(0, rows, step):
        r1 = min(rows, r0 + step)
        yield r0, r1, [buf[: (r1 - r0) * row_elems].view(r1 - r0, *r.shape[1:]).copy_(r[r0:r1])
                       for buf, r in zip(buffers, raw, strict=True)]


def _split_block(
    blocks: list[Tensor], r0: int, row_elems: int, *, has_base: bool, num_inputs: int,
    fisher_scale: Sequence[float], ctx: TensorContext,
) -> tuple[list[Tensor], Tensor | None, dict[str, Any], TensorContext]:
    """A row block's inputs, base, ``fisher`` keyword (scaled statistics, if any) and context."""
    first_input = 1 if has_base else 0
    fisher = scale_fisher(blocks[first_input + num_inputs:], fisher_scale)
    return (blocks[first_input:first_input + num_inputs], blocks[0] if has_base else None,
            {"fisher": fisher} if fisher else {},
            TensorContext(name=ctx.name, seed=ctx.seed, offset=ctx.offset + r0 * row_elems))


def observe_blocks(
    state: Any, raw: Sequence[Tensor], *, has_base: bool, num_inputs: int, fisher_scale: Sequence[float],
    ctx: TensorContext, compute_dtype: torch.dtype, device: str, step: int,
) -> None:
    """Feed a unit's row blocks (in order) to a whole-tensor state during one of its passes.

    ``ctx.offset`` is the flat index of the unit's first entry; each block's context is offset from it.
    """
    row_elems = raw[0].numel() // raw[0].shape[0] if raw[0].shape[0] else 0
    for r0, _, blocks in row_blocks(raw, step, compute_dtype, device):
        inputs, base, kwargs, block_ctx = _split_block(blocks, r0, row_elems, has_base=has_base, num_inputs=num_inputs,
                                                       fisher_scale=fisher_scale, ctx=ctx)
        state.observe(inputs, base, block_ctx, **kwargs)


def merge_row_blocks(
    method: MergeMethod,
    params: Any,
    raw: Sequence[Tensor],
    state: Any,
    *,
    has_base: bool,
    num_inputs: int,
    fisher_scale: Sequence[float],
    ctx: TensorContext,
    compute_dtype: torch.dtype,
    out_dtype: torch.dtype,
    device: str,
    step: int,
) -> Tensor:
    """Merge one unit of a method with whole-tensor statistics (``state``, after its passes) in row
    blocks, in order, exactly as the method merges row chunks of the tensor (``fn(..., state=)``).

    Returns:
        The merged unit, in ``out_dtype``, on the CPU, shaped like ``raw[0]``.
    """
    out = torch.empty(raw[0].shape, dtype=out_dtype)
    row_elems = raw[0].numel() // raw[0].shape[0] if raw[0].shape[0] else 0
    for r0, r1, blocks in row_blocks(raw, step, compute_dtype, device):
        inputs, base, kwargs, block_ctx = _split_block(blocks, r0, row_elems, has_base=has_base, num_inputs=num_inputs,
                                                       fisher_scale=fisher_scale, ctx=ctx)
        result = method.fn(inputs, base, params, ctx=block_ctx, state=state, **kwargs)
        out[r0:r1].copy_(result)
    return out


def fill_update(
    method: MergeMethod, params: Any, raw: Sequence[Tensor], update: Tensor, *, num_inputs: int,
    fisher_scale: Sequence[float], compute_dtype: torch.dtype, device: str, step: int,
) -> None:
    """Compute the ``MergeMethod.update`` of a unit's sources (base first) into ``update`` (its shape,
    compute dtype), row block by row block."""
    for r0, r1, blocks in row_blocks(raw, step, compute_dtype, device):
        fisher = scale_fisher(blocks[1 + num_inputs:], fisher_scale)
        update[r0:r1] = method.update(blocks[1:1 + num_inputs], blocks[0], params, fisher)


def state_over_update(method: MergeMethod, params: Any, update: Tensor, *, compute_dtype: torch.dtype,
                      device: str, step: int) -> Any:
    """A whole tensor's state, its passes run over row blocks of its held update (in order)."""
    state = method.state(params, update.numel(), compute_dtype, device)
    while state.needs_pass():
        for r0 in range(0, update.shape[0], step):
            state.observe_update(update[r0:r0 + step])
        state.end_pass()
    return state


def finish_update(
    method: MergeMethod, params: Any, update: Tensor, base: Tensor, state: Any, *, compute_dtype: torch.dtype,
    out_dtype: torch.dtype, device: str, step: int,
) -> Tensor:
    """The merged rows from their update and the base's same rows (stored dtype), row block by row
    block (``MergeMethod.finish``), in ``out_dtype`` on the CPU."""
    out = torch.empty(base.shape, dtype=out_dtype)
    for r0, r1, (b,) in row_blocks([base], step, compute_dtype, device):
        out[r0:r1].copy_(method.finish(update[r0:r1], b, params, state))
    return out


def merge_via_update(
    method: MergeMethod,
    params: Any,
    raw: Sequence[Tensor],
    state: Any,
    *,
    num_inputs: int,
    fisher_scale: Sequence[float],
    compute_dtype: torch.dtype,
    out_dtype: torch.dtype,
    device: str,
    step: int,
) -> Tensor:
    """Merge one unit of a method with ``MergeMethod.update``: the unit's update is computed once
    (:func:`fill_update`); the state's passes (when ``state`` is None: the unit is the whole tensor)
    and the finishing step then run over it, not over the inputs.

    ``raw`` starts with the base (these methods take one). Returns the merged unit, in ``out_dtype``,
    on the CPU.
    """
    update = torch.empty(raw[0].shape, dtype=compute_dtype, device=device)
    fill_update(method, params, raw, update, num_inputs=num_inputs, fisher_scale=fisher_scale,
                compute_dtype=compute_dtype, device=device, step=step)
    if state is None:
        state = state_over_update(method, params, update, compute_dtype=compute_dtype, device=device, step=step)
    return finish_update(method, params, update, raw[0], state, compute_dtype=compute_dtype, out_dtype=out_dtype,
                         device=device, step=step)
