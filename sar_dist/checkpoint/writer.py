"""Stream a safetensors shard whose header is known before any tensor is computed.

The planner fixes every output tensor's name, dtype and shape, so the header is
written first and tensors follow one at a time in header order: peak memory is about
one tensor, not one shard. The file becomes visible only when the last byte is in
(``Storage.open_write``), and its sha256 is computed on the way.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from types import TracebackType

import torch

from sar_dist.checkpoint.format import TORCH_TO_ST, build_header, tensor_bytes
from sar_dist.storage import Storage

SAFETENSORS_METADATA = {"format": "pt"}


class ShardWriter:
    """Writes one shard: ``with ShardWriter(...) as w: w.write(name, t) ...``.

    Args:
        storage: where to write.
        url: the shard's final URL.
        entries: (name, safetensors dtype, shape) in the order they will be written.
    """

    def __init__(self, storage: Storage, url: str, entries: Sequence[tuple[str, str, tuple[int, ...]]]):
        self.url = url
        self.entries = list(entries)
        self._header, self._spans = build_header(self.entries, SAFETENSORS_METADATA)
        self.total_bytes = len(self._header) + sum(n for _, _, n in self._spans)
        self._storage = storage
        self._next = 0
        self._in_entry = 0
        self._sha = hashlib.sha256()
        self._ctx = None
        self._f = None

    def __enter__(self) -> ShardWriter:
        self._ctx = self._storage.open_write(self.url)
        self._f = self._ctx.__enter__()
        self._emit(self._header)
        return self

    def _emit(self, data: bytes | memoryview) -> None:
        self._sha.update(data)
        self._f.write(data)

    def write(self, name: str, tensor: torch.Tensor) -> None:
        """Append the next tensor, or the next block of its rows.

        The tensor (block) must match the planned name, dtype and trailing shape; the
        entry is finished once all its rows are in.
        """
        exp_name, exp_dtype, exp_shape = self.entries[self._next]
        got_dtype = TORCH_TO_ST.get(tensor.dtype)
        shape = tuple(tensor.shape)
        assert name == exp_name and got_dtype == exp_dtype and shape[1:] == tuple(exp_shape)[1:], (
            f"planned {exp_name} {exp_dtype}{list(exp_shape)}, got {name} {got_dtype}{list(shape)}"
        )
        data = tensor_bytes(tensor.cpu())
        self._in_entry += len(data)
        expected = self._spans[self._next][2]
        assert self._in_entry <= expected, f"{name}: more rows than planned"
        self._emit(data)
        if self._in_entry == expected:
            self._next += 1
            self._in_entry = 0

    @property
    def sha256(self) -> str:
        return self._sha.hexdigest()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> bool:
        assert self._ctx is not None
        if exc_type is None and self._next != len(self.entries):
            err = AssertionError(f"{self.url}: wrote {self._next} of {len(self.entries)} planned tensors")
            self._ctx.__exit__(AssertionError, err, None)  # aborts: nothing visible at url
            raise err
        self._ctx.__exit__(exc_type, exc, tb)  # commits, or aborts and lets exc propagate
        return False
