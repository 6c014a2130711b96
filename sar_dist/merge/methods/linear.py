"""Linear merge (model soups): a weighted average of the inputs, accumulated in float32."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from sar_dist.merge.base import ANY_REAL, REQUIRED, Constraint, TensorContext, method_param, per_model

LINEAR_URL = "https://arxiv.org/abs/2203.05482"


@dataclass(frozen=True, kw_only=True, slots=True)
class LinearParams:
    """Parameters of ``linear``.

    Attributes:
        weights: per-model ``weight`` (required).
        normalize: ``normalize``, divide by the weight sum (default true).
    """

    weights: tuple[float, ...] = per_model(
        "weight", REQUIRED, valid=ANY_REAL,
        why="negative weights extrapolate (e.g. 1.3 and -0.3), as mergekit allows",
    )
    normalize: bool = method_param("normalize", True)

    CONSTRAINTS: ClassVar[tuple[Constraint, ...]] = (
        Constraint(
            keys=("weight", "normalize"), per_model=False,
            text="the weights must sum to more than 0 with normalize: true",
            why="normalize divides by the sum: 0 divides by zero, and a negative sum is the same merge as the "
                "negated weights",
            applies=lambda v: bool(v["normalize"]),
            margins=lambda v: (sum(v["weight"]),),
        ),
    )


def linear(tensors: Sequence[Tensor], base: Tensor | None, p: LinearParams, *, ctx: TensorContext) -> Tensor:
    """Linear merge / model soup (arXiv 2203.05482, https://arxiv.org/abs/2203.05482).

    ``sum_i w_i x_i``, divided by ``sum_i w_i`` when ``normalize``. Accumulates in float32 (float64
    for float64 inputs) like mergekit, and returns the inputs' dtype. A ``base_model`` is not special
    here: the planner passes it as one more input with its own weight.

    Args:
        tensors: the inputs, in config order.
        base: ignored (None from the executor; the method takes no base).
        p: resolved parameters (one weight per input).
        ctx: tensor identity, for the error message.

    Returns:
        The merged tensor, in the inputs' dtype.

    Raises:
        ValueError: if ``normalize`` is on and the weights sum to 0 in float32 (mergekit would
            silently produce NaN/inf there).
    """
    assert len(p.weights) == len(tensors), "resolver must give one weight per model"
    first = tensors[0]
    acc_dtype = torch.float64 if first.dtype == torch.float64 else torch.float32
    weights = torch.tensor(p.weights, dtype=acc_dtype, device=first.device)
    denominator = weights.sum()
    if p.normalize and denominator.item() == 0:
        raise ValueError(f"linear: weights {list(p.weights)} sum to 0 for tensor {ctx.name!r} with normalize: true")
    acc = torch.zeros(first.shape, dtype=acc_dtype, device=first.device)
    for x, w in zip(tensors, weights.unbind(0), strict=True):
        acc.addcmul_(x, w)
    if p.normalize:
        acc.div_(denominator)
    return acc.to(first.dtype)
