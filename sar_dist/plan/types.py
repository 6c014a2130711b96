"""What a plan is made of: frozen, picklable data that executors only run.

Each ``ShardTask`` owns one output shard and carries everything its worker needs
(input locations, resolved parameters, storage options, memory estimate), like the
metadata on Ray Data's ``ReadTask``.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

from sar_dist.checkpoint.format import DTYPES
from sar_dist.checkpoint.index import TensorRef
from sar_dist.storage import READ_CONCURRENCY


@dataclass(frozen=True, kw_only=True, slots=True)
class TensorJob:
    """One output tensor.

    Attributes:
        name: tensor name.
        shape: its shape (same in every input).
        out_dtype: safetensors dtype written.
        compute_dtype: safetensors dtype the method computes in.
        base: the base model's tensor, or None.
        inputs: the non-base inputs, in config order.
        fisher: each input's Fisher statistics tensor (methods that need them), else ().
        fisher_scale: per input, the factor that turns its stored statistics (sums over
            examples) into the F the method takes: ``1 / num_examples``, and ``1 / l2_norm_mean``
            too with ``fisher_norm: l2``.
        params: the method's params resolved for this tensor; None means copy ``copy_from``.
        copy_from: for non-float tensors, the source copied unchanged.
        chunk_rows: rows per chunk (the whole first dimension when not chunked).
        cache_update: for a chunked tensor of a method with ``MergeMethod.update`` whose state needs
            passes: its update (compute dtype, the whole tensor) is held in memory, so every chunk
            of its sources is read once and the passes run over the update; the finishing step
            reads only the base again.
    """

    name: str
    shape: tuple[int, ...]
    out_dtype: str
    compute_dtype: str
    base: TensorRef | None
    inputs: tuple[TensorRef, ...]
    fisher: tuple[TensorRef, ...] = ()
    fisher_scale: tuple[float, ...] = ()
    params: Any = None
    copy_from: TensorRef | None = None
    chunk_rows: int = 0
    cache_update: bool = False

    @property
    def update_bytes(self) -> int:
        """Bytes of the held update of a ``cache_update`` tensor (0 otherwise)."""
        return math.prod(self.shape) * DTYPES[self.compute_dtype][1] if self.cache_update else 0

    @property
    def sources(self) -> tuple[TensorRef, ...]:
        if self.copy_from is not None:
            return (self.copy_from,)
        return ((self.base,) if self.base is not None else ()) + self.inputs + self.fisher

    @property
    def read_bytes(self) -> int:
        return sum(r.info.nbytes for r in self.sources)

    @property
    def out_bytes(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n * DTYPES[self.out_dtype][1]


@dataclass(frozen=True, kw_only=True, slots=True)
class ShardTask:
    """One output shard: read, merge and write its tensors, in order.

    Attributes:
        index: shard number (0-based).
        file_name: e.g. ``model-00001-of-00004.safetensors``.
        url: where the shard is written.
        receipt_url: where the finished shard's receipt is written.
        plan_id: identity of the plan (receipts from another plan are not trusted).
        method: registry name.
        tensors: output tensors in file order.
        seed: job seed.
        device: ``cpu`` or ``cuda``.
        storage_options: fsspec options for every URL.
        read_bytes: bytes read from inputs.
        out_bytes: size of the finished shard file (header + data).
        estimated_bytes: peak memory estimate for the task (Ray ``memory=`` request).
        read_concurrency: most range requests the task keeps in flight (``Storage.read_many``).
        allow_nonfinite: skip the NaN/inf checks of inputs and merged blocks (``sar_dist.finite``).
    """

    index: int
    file_name: str
    url: str
    receipt_url: str
    plan_id: str
    method: str
    tensors: tuple[TensorJob, ...]
    seed: int
    device: str
    storage_options: dict[str, Any]
    read_bytes: int
    out_bytes: int
    estimated_bytes: int
    read_concurrency: int = READ_CONCURRENCY
    allow_nonfinite: bool = False


@dataclass(frozen=True, kw_only=True, slots=True)
class ShardResult:
    """What a finished shard task reports (and records as its receipt)."""

    plan_id: str
    index: int
    file_name: str
    bytes: int
    sha256: str
    tensors: tuple[str, ...]
    read_bytes: int
    seconds: float

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["tensors"] = list(self.tensors)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ShardResult:
        return cls(**{**d, "tensors": tuple(d["tensors"])})


@dataclass(frozen=True, kw_only=True)
class Plan:
    """A whole merge, decided from headers only.

    Attributes:
        plan_id: sha256 over the resolved job, input fingerprints, device and layout.
        output: output directory URL.
        tasks: one per output shard.
        job: the resolved config (``MergeJob.to_dict()``).
        inputs: input URL -> fingerprint.
        config_json: the output ``config.json`` (base's, dtype updated), or None.
        copy_files: (source URL, output name) of config/tokenizer files to copy.
        memory_budget: bytes a task may use.
        warnings: things the user should know (e.g. a tensor larger than the budget).
        statistics: the Fisher statistics each model's merge uses (recorded in the manifest).
    """

    plan_id: str
    output: str
    tasks: tuple[ShardTask, ...]
    job: dict[str, Any]
    inputs: dict[str, str]
    config_json: dict[str, Any] | None
    copy_files: tuple[tuple[str, str], ...]
    memory_budget: int
    warnings: tuple[str, ...] = ()
    statistics: tuple[dict[str, Any], ...] = ()

    @property
    def num_tensors(self) -> int:
        return sum(len(t.tensors) for t in self.tasks)

    def summary(self) -> dict[str, Any]:
        """JSON-ready description (what ``--dry-run`` prints)."""
        return {
            "plan_id": self.plan_id,
            "output": self.output,
            "merge_method": self.job["merge_method"],
            "num_shards": len(self.tasks),
            "num_tensors": self.num_tensors,
            "read_bytes": sum(t.read_bytes for t in self.tasks),
            "write_bytes": sum(t.out_bytes for t in self.tasks),
            "memory_budget_bytes": self.memory_budget,
            "peak_task_bytes": max((t.estimated_bytes for t in self.tasks), default=0),
            "warnings": list(self.warnings),
            "shards": [
                {
                    "file": t.file_name,
                    "tensors": len(t.tensors),
                    "read_bytes": t.read_bytes,
                    "write_bytes": t.out_bytes,
                    "estimated_peak_bytes": t.estimated_bytes,
                    "chunked_tensors": sum(1 for j in t.tensors if j.chunk_rows and j.shape and j.chunk_rows < j.shape[0]),
                }
                for t in self.tasks
            ],
        }
