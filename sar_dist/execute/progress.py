"""Progress of a run: shards, tensors and bytes done, rate and ETA, as events.

Executors report finished shards (and, locally, finished tensors); the CLI turns each
event into a log line or, with ``--json``, one JSON object per line for orchestrators.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from sar_dist.plan.types import Plan, ShardResult, TensorJob

Event = dict[str, Any]


class Progress:
    """Counts work done against a plan and emits events.

    Args:
        plan: the plan being run.
        emit: receives each event (a JSON-ready dict with an ``event`` key).
        skipped: shards already finished by an earlier run (resume).
    """

    def __init__(self, plan: Plan, emit: Callable[[Event], None], skipped: int = 0):
        self._emit = emit
        self.total_shards = len(plan.tasks)
        self.total_tensors = plan.num_tensors
        self.total_bytes = sum(t.read_bytes + t.out_bytes for t in plan.tasks)
        self.shards = 0
        self.tensors = 0
        self.bytes = 0
        self.bytes_this_run = 0
        self._tensor_bytes_in_shard = 0
        self.start = time.perf_counter()
        self.skipped = skipped

    def _rates(self) -> dict[str, Any]:
        elapsed = max(time.perf_counter() - self.start, 1e-9)
        rate = self.bytes_this_run / elapsed
        left = self.total_bytes - self.bytes
        return {
            "elapsed_s": round(elapsed, 3),
            "rate_mb_s": round(rate / 1e6, 2),
            "eta_s": round(left / rate, 1) if rate > 0 else None,
        }

    def counts(self) -> dict[str, Any]:
        return {
            "shards_done": self.shards,
            "shards_total": self.total_shards,
            "tensors_done": self.tensors,
            "tensors_total": self.total_tensors,
            "bytes_done": self.bytes,
            "bytes_total": self.total_bytes,
        }

    def event(self, name: str, **fields: Any) -> None:
        """Emit an arbitrary event with the current counts."""
        self._emit({"event": name, **fields, **self.counts(), **self._rates()})

    def resumed(self, result: ShardResult, out_bytes: int) -> None:
        """A shard finished by an earlier run (counted, not timed)."""
        self.shards += 1
        self.tensors += len(result.tensors)
        self.bytes += result.read_bytes + out_bytes

    def tensor_done(self, job: TensorJob) -> None:
        """A tensor finished inside a running shard (local executor)."""
        self.tensors += 1
        n = job.read_bytes + job.out_bytes
        self.bytes += n
        self.bytes_this_run += n
        self._tensor_bytes_in_shard += n
        self.event("tensor_done", tensor=job.name)

    def shard_done(self, result: ShardResult, out_bytes: int, *, counted_tensors: bool) -> None:
        """A shard finished in this run."""
        self.shards += 1
        n = result.read_bytes + out_bytes
        if not counted_tensors:
            self.tensors += len(result.tensors)
            self.bytes += n
            self.bytes_this_run += n
        else:  # tensors were counted one by one; add the header bytes they missed
            rest = n - self._tensor_bytes_in_shard
            self.bytes += rest
            self.bytes_this_run += rest
        self._tensor_bytes_in_shard = 0
        self.event("shard_done", file=result.file_name, sha256=result.sha256, seconds=round(result.seconds, 3))
