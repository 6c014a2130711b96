"""Fetch tensors (or blocks of their rows) by range reads into their own buffers.

Locally the bytes are ``pread`` straight into each tensor's buffer; remotely the ranges of
all the tensors asked for at once are fetched concurrently in parts (``Storage.read_many``)
and copied into the buffers. The decode is ``.view(dtype).reshape(shape)`` with no further copy.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch

from sar_dist.checkpoint.format import TensorInfo
from sar_dist.checkpoint.index import TensorRef
from sar_dist.storage import READ_CONCURRENCY, Storage


def read_tensor(storage: Storage, ref: TensorRef, rows: tuple[int, int] | None = None) -> torch.Tensor:
    """Read a tensor, or rows ``[r0, r1)`` of its first dimension, in its stored dtype.

    Args:
        storage: how to reach ``ref.file``.
        ref: file and location from the checkpoint index.
        rows: optional row range; rows are contiguous in safetensors (row-major).

    Returns:
        A CPU tensor of dtype ``ref.info.torch_dtype``.
    """
    return read_tensors(storage, [ref], rows)[0]


def read_tensors(
    storage: Storage, refs: Sequence[TensorRef], rows: tuple[int, int] | None = None, *,
    concurrency: int = READ_CONCURRENCY, allocate: Callable[[Sequence[int]], list[torch.Tensor]] | None = None,
) -> list[torch.Tensor]:
    """Read the same rows of several tensors (a merge unit's sources), requests in flight together.

    Args:
        storage: how to reach the files.
        refs: files and locations from the checkpoint indexes.
        rows: optional row range, the same for every tensor.
        concurrency: most range requests in flight (1: one request per tensor, in order).
        allocate: gives the byte buffers (uint8 CPU tensors of the sizes asked, each starting at a
            multiple of 64 bytes) to read into, e.g. reused ones; default fresh ``torch.empty``.

    Returns:
        CPU tensors in their stored dtypes, in the order of ``refs``.
    """
    planned = [_span(ref, rows) for ref in refs]
    sizes = [n for n, _, _ in planned]
    buffers = allocate(sizes) if allocate is not None else [torch.empty(n, dtype=torch.uint8) for n in sizes]
    planned = [(b, start, shape) for b, (_, start, shape) in zip(buffers, planned, strict=True)]
    storage.read_many([(ref.file, start, memoryview(buf.numpy())) for ref, (buf, start, _) in zip(refs, planned, strict=True)],
                      concurrency=concurrency)
    return [buf.view(ref.info.torch_dtype).reshape(shape) for ref, (buf, _, shape) in zip(refs, planned, strict=True)]


def _span(ref: TensorRef, rows: tuple[int, int] | None) -> tuple[int, int, tuple[int, ...]]:
    """The byte count, file offset and shape of a tensor or block of rows."""
    info: TensorInfo = ref.info
    shape = info.shape
    start, nbytes = info.offset, info.nbytes
    if rows is not None:
        r0, r1 = rows
        assert shape and 0 <= r0 <= r1 <= shape[0], (rows, shape)
        row_bytes = math.prod(shape[1:]) * info.itemsize
        start += r0 * row_bytes
        nbytes = (r1 - r0) * row_bytes
        shape = (r1 - r0, *shape[1:])
    return nbytes, start, tuple(shape)


def read_flat(
    storage: Storage, ref: TensorRef, start: int, end: int, *, concurrency: int = READ_CONCURRENCY
) -> torch.Tensor:
    """Read elements ``[start, end)`` of a tensor flattened in row-major order.

    A ZeRO-3 rank loads exactly its own partition of a parameter this way (one range; from
    object storage in parts with requests in flight, as ``read_tensors``).
    """
    info: TensorInfo = ref.info
    assert 0 <= start <= end <= info.numel, (start, end, info.numel)
    out = torch.empty((end - start) * info.itemsize, dtype=torch.uint8)
    storage.read_many([(ref.file, info.offset + start * info.itemsize, memoryview(out.numpy()))],
                      concurrency=concurrency)
    return out.view(info.torch_dtype)
