"""The generalized task-arithmetic family: one merge function, ``task_arithmetic`` and ``ties``.

The other presets (DARE, Model Breadcrumbs, DELLA) are in ``task_arithmetic_presets``.

For each model ``d_i = x_i - base`` is sparsified on its own (per preset), then ``wd_i = w_i * d_i``.
With sign election: ``mask_i = sign(wd_i) == sign(sum_j wd_j)`` (a zero sum counts as +),
``mixed = sum_i wd_i * mask_i``, ``divisor = sum_i w_i * mask_i`` (0 -> 1). Without:
``mixed = sum_i wd_i``, ``divisor = sum_i w_i`` (|divisor| < 1e-8 -> 1). If ``normalize``,
``mixed /= divisor``; result ``base + lambda * mixed``. Semantics of mergekit 0.1.5
(``docs/methods.md``); all arithmetic stays in the input dtype, as there.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from sar_dist.merge import ops
from sar_dist.merge.base import ANY_REAL, REQUIRED, UNIT, TensorContext, method_param, per_model
from sar_dist.merge.methods.trim import TrimState

TASK_ARITHMETIC_URL = "https://arxiv.org/abs/2212.04089"
TIES_URL = "https://arxiv.org/abs/2306.01708"


@dataclass(frozen=True, kw_only=True, slots=True)
class TaskArithmeticParams:
    """Parameters of ``task_arithmetic``; the other presets subclass it to change defaults.

    Attributes:
        weights: per-model ``weight`` (required, as in mergekit).
        densities: per-model ``density`` (default 1.0; unused without sparsification, accepted like mergekit).
        lambda_: ``lambda``, scale of the merged update (default 1.0).
        normalize: ``normalize``, divide by the (elected) weight sum.
        rescale: ``rescale``, L1-norm match after sparsification.
        int8_mask: ``int8_mask``, accepted for compatibility; memory only in mergekit, no effect here.
    """

    weights: tuple[float, ...] = per_model(
        "weight", REQUIRED, valid=ANY_REAL, why="a negative weight subtracts a task vector, as in mergekit"
    )
    densities: tuple[float, ...] = per_model(
        "density", 1.0, valid=UNIT,
        why="the fraction of a task vector's entries kept, for DARE and DELLA the keep probability: 0 keeps none, 1 all",
    )
    lambda_: float = method_param(
        "lambda", 1.0, valid=ANY_REAL, why="the scale of the merged update: 0 gives the base, < 0 subtracts it"
    )
    normalize: bool = method_param("normalize", False)
    rescale: bool = method_param("rescale", False)
    int8_mask: bool = method_param("int8_mask", False)


@dataclass(frozen=True, kw_only=True, slots=True)
class TiesParams(TaskArithmeticParams):
    """``task_arithmetic``'s parameters with ``normalize`` on by default."""

    normalize: bool = method_param("normalize", True)


Sparsifier = Callable[[Tensor, int], Tensor]
"""``(delta, model_index) -> sparsified delta``, bound to one tensor's params and context."""


def generalized_task_arithmetic(
    tensors: Sequence[Tensor],
    base: Tensor,
    p: TaskArithmeticParams,
    *,
    sparsify: Sparsifier | None,
    elect: bool,
) -> Tensor:
    """The family's merge (module docstring gives the formula); presets choose ``sparsify``/``elect``.

    Args:
        tensors: the non-base inputs, same shape and dtype as ``base``.
        base: the base model's tensor.
        p: resolved parameters (``weights`` has one value per input).
        sparsify: per-model sparsifier, or None for plain task vectors.
        elect: whether to apply TIES sign election.

    Returns:
        The merged tensor, in ``base``'s dtype.
    """
    num_models = len(tensors)
    assert len(p.weights) == num_models, "resolver must give one weight per model"
    # Stacked like mergekit so the reductions over models round the same way in bf16/fp16.
    deltas = base.new_empty((num_models, *base.shape))
    for i, x in enumerate(tensors):
        torch.sub(x, base, out=deltas[i])
        if sparsify is not None:
            deltas[i] = sparsify(deltas[i], i)
    # Weights are rounded to the compute dtype, as mergekit does.
    weights = torch.tensor(p.weights, dtype=base.dtype, device=base.device)
    weights = weights.view(num_models, *([1] * base.dim()))
    deltas.mul_(weights)
    if elect:
        mask = ops.sign_consensus_mask(deltas)
        mixed = deltas.mul_(mask).sum(dim=0)
        divisor = (weights * mask).sum(dim=0)
        del mask
        divisor[divisor == 0] = 1
    else:
        mixed = deltas.sum(dim=0)
        divisor = weights.sum(dim=0)
        divisor[divisor.abs() < 1e-8] = 1
    del deltas
    if p.normalize:
        mixed /= divisor
    if p.lambda_ != 1:
        mixed *= p.lambda_
    return base + mixed


def task_arithmetic(tensors: Sequence[Tensor], base: Tensor, p: TaskArithmeticParams, *, ctx: TensorContext) -> Tensor:
    """Task arithmetic (arXiv 2212.04089, https://arxiv.org/abs/2212.04089).

    ``base + lambda * sum_i w_i (x_i - base)``, divided by ``sum_i w_i`` when ``normalize`` (default off).

    Args:
        tensors: the non-base inputs.
        base: the base model's tensor.
        p: resolved parameters.
        ctx: tensor identity (unused: the method is deterministic).

    Returns:
        The merged tensor, in ``base``'s dtype.
    """
    return generalized_task_arithmetic(tensors, base, p, sparsify=None, elect=False)


def ties_state(p: TiesParams, numel: int, dtype: torch.dtype, device: torch.device | str) -> TrimState:
    """The whole-tensor trim statistics ``ties`` needs, for a chunked run (see ``trim.py``)."""
    return TrimState(p.densities, p.rescale, numel, dtype, device)


def ties(
    tensors: Sequence[Tensor], base: Tensor, p: TiesParams, *, ctx: TensorContext, state: TrimState | None = None
) -> Tensor:
    """TIES-Merging (arXiv 2306.01708, https://arxiv.org/abs/2306.01708).

    Trim each ``d_i`` to its ``max(1, int(k_i * numel))`` largest magnitudes (density 1 keeps all),
    elect signs, ``base + lambda * sum_i w_i d_i m_i / sum_i w_i m_i`` (divisor only if ``normalize``).

    Args:
        tensors: the non-base inputs.
        base: the base model's tensor.
        p: resolved parameters.
        ctx: tensor identity (unused: deterministic).
        state: trim statistics gathered over the whole tensor when ``tensors`` and ``base`` are a
            block of rows (blocks then come in order); None computes them from the tensors given.

    Returns:
        The merged tensor, in ``base``'s dtype.
    """
    if state is None:  # the whole tensor is here: gather the trim statistics from it
        state = ties_state(p, base.numel(), base.dtype, base.device).run(tensors, base)
    return generalized_task_arithmetic(tensors, base, p, elect=True, sparsify=state.sparsify)
