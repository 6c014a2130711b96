"""Fetch one tensor (or a block of its rows) with a single range read.

Locally the bytes are ``pread`` straight into the tensor's own buffer; remotely one
``cat_file(path, start, end)`` request fetches exactly that tensor's bytes. The decode
is ``torch.frombuffer(...).view(dtype).reshape(shape)`` with no further copy.
"""

from __future__ import annotations

import math

import torch

from sar_dist.checkpoint.format import TensorInfo
from sar_dist.checkpoint.index import TensorRef
from sar_dist.storage import Storage


def read_tensor(storage: Storage, ref: TensorRef, rows: tuple[int, int] | None = None) -> torch.Tensor:
    """Read a tensor, or rows ``[r0, r1)`` of its first dimension, in its stored dtype.

    Args:
        storage: how to reach ``ref.file``.
        ref: file and location from the checkpoint index.
        rows: optional row range; rows are contiguous in safetensors (row-major).

    Returns:
        A CPU tensor of dtype ``ref.info.torch_dtype``.
    """
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
    out = torch.empty(nbytes, dtype=torch.uint8)
    if nbytes:
        storage.read_into(ref.file, start, memoryview(out.numpy()))
    return out.view(info.torch_dtype).reshape(shape)


def read_flat(storage: Storage, ref: TensorRef, start: int, end: int) -> torch.Tensor:
    """Read elements ``[start, end)`` of a tensor flattened in row-major order (one range read).

    A ZeRO-3 rank loads exactly its own partition of a parameter this way.
    """
    info: TensorInfo = ref.info
    assert 0 <= start <= end <= info.numel, (start, end, info.numel)
    out = torch.empty((end - start) * info.itemsize, dtype=torch.uint8)
    if end > start:
        storage.read_into(ref.file, info.offset + start * info.itemsize, memoryview(out.numpy()))
    return out.view(info.torch_dtype)
