"""Plain data that the Fisher driver hands to its workers (picklable, no torch state)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

IGNORE_INDEX = -100  # a label that is not a target (Hugging Face's convention)


@dataclass(frozen=True, slots=True)
class Example:
    """One calibration example, tokenized.

    ``labels`` is aligned with ``input_ids`` (Hugging Face's convention): the target at
    position t is ``labels[t]``, predicted from ``input_ids[:t]``; position 0 is never a
    target and ``IGNORE_INDEX`` marks positions that are not.

    Attributes:
        index: position among the examples used (keys the ``sampled`` estimator's draws).
        input_ids: token ids.
        labels: targets, same length as ``input_ids``.
    """

    index: int
    input_ids: tuple[int, ...]
    labels: tuple[int, ...]

    @property
    def num_targets(self) -> int:
        return sum(1 for y in self.labels[1:] if y != IGNORE_INDEX)


@dataclass(frozen=True, kw_only=True)
class TensorSlot:
    """A checkpoint tensor whose statistics a part writes.

    Attributes:
        name: checkpoint tensor name (also the statistics tensor's name).
        shape: its shape.
        param: the model parameter it is (tied names share one); None for a checkpoint
            tensor that is no parameter (a stored buffer): its statistics are zeros.
        owner: the rank that gathers and writes it.
        view: ``(storage offset, strides)`` of this tensor in the flattened ``param`` when the
            model class holds it fused with others (``sar_dist.fisher.mapping``); None when
            the tensor is the parameter itself.
    """

    name: str
    shape: tuple[int, ...]
    param: str | None
    owner: int
    view: tuple[int, tuple[int, ...]] | None = None


@dataclass(frozen=True, kw_only=True)
class PartSpec:
    """What one data-parallel group computes and where it writes it.

    Attributes:
        part: part number (= group number).
        url: the part's directory (``OUTPUT/parts/part-NNNNN``).
        model_url: checkpoint directory.
        model_config: the checkpoint's ``config.json``.
        storage_options: fsspec options.
        examples: this group's examples, in order.
        slots: every checkpoint tensor, in the order the part writes them.
        files: rank -> shard file name (ranks with nothing to write have none).
        dtype: parameter dtype of the sharded model (``float32`` or ``bfloat16``).
        device: ``cpu`` or ``cuda``.
        estimator: ``empirical`` or ``sampled``.
        seed: keys the ``sampled`` estimator's draws.
        deepspeed: the DeepSpeed config of the group (ours merged with the user's).
        job_id: identity of the job; a part directory from another job is never reused.
        timeout_s: collective timeout inside the group.
        engine: ``deepspeed`` (a ZeRO-3 world) or ``torch`` (a one-rank group, plain autograd).
        allow_nonfinite: skip the NaN/inf checks of weights, losses and statistics.
    """

    part: int
    url: str
    model_url: str
    model_config: dict[str, Any]
    storage_options: dict[str, Any]
    examples: tuple[Example, ...]
    slots: tuple[TensorSlot, ...]
    files: dict[int, str]
    dtype: str
    device: str
    estimator: str
    seed: int
    deepspeed: dict[str, Any]
    job_id: str
    timeout_s: float = 1800.0
    engine: str = "deepspeed"
    allow_nonfinite: bool = False

    def examples_text(self) -> str:
        """This part's examples in words (0-based indices in data order), for messages."""
        idx = [e.index for e in self.examples]
        if not idx:
            return "no examples"
        if len(idx) == 1:
            return f"example {idx[0]}"
        if len(idx) == 2:
            return f"examples {idx[0]} and {idx[1]}"
        if all(b - a == 1 for a, b in zip(idx, idx[1:], strict=False)):
            return f"examples {idx[0]}-{idx[-1]}"
        return f"examples {idx[0]}, {idx[1]}, ..., {idx[-1]}"
