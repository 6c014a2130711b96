"""Presets of :func:`generalized_task_arithmetic` (``ties`` lives beside it): DARE, Model Breadcrumbs, DELLA.

Each preset fixes the sparsifier and whether signs are elected, and has its own parameter class so
its defaults (``normalize``, ``rescale``, ``gamma``, ``epsilon``) match mergekit 0.1.5's table in
``docs/methods.md``. Sparsification runs on each ``d_i = x_i - base`` before the weights.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from sar_dist.merge.base import UNIT, Constraint, Interval, TensorContext, method_param, per_model
from sar_dist.merge.methods.drop import DellaState, DropState
from sar_dist.merge.methods.task_arithmetic import TaskArithmeticParams, generalized_task_arithmetic
from sar_dist.merge.methods.trim import OutlierState

DARE_URL = "https://arxiv.org/abs/2311.03099"
BREADCRUMBS_URL = "https://arxiv.org/abs/2312.06795"
DELLA_URL = "https://arxiv.org/abs/2406.11617"


@dataclass(frozen=True, kw_only=True, slots=True)
class DareLinearParams(TaskArithmeticParams):
    """``task_arithmetic``'s parameters with ``rescale`` on by default."""

    rescale: bool = method_param("rescale", True)


@dataclass(frozen=True, kw_only=True, slots=True)
class DareTiesParams(DareLinearParams):
    """Same fields and defaults as ``dare_linear``."""


@dataclass(frozen=True, kw_only=True, slots=True)
class BreadcrumbsParams(TaskArithmeticParams):
    """Adds per-model ``gamma`` (fraction of largest-magnitude outliers dropped, default 0.01)."""

    gammas: tuple[float, ...] = per_model(
        "gamma", 0.01, valid=UNIT,
        why="the fraction of largest-magnitude entries dropped as outliers (fewer where density + gamma > 1, "
            "as in mergekit)",
    )


@dataclass(frozen=True, kw_only=True, slots=True)
class BreadcrumbsTiesParams(BreadcrumbsParams):
    """Same fields and defaults as ``breadcrumbs``."""


@dataclass(frozen=True, kw_only=True, slots=True)
class DellaLinearParams(TaskArithmeticParams):
    """Adds per-model ``epsilon`` (keep-probability half-width, default 0.15); ``rescale`` on."""

    rescale: bool = method_param("rescale", True)
    epsilons: tuple[float, ...] = per_model(
        "epsilon", 0.15, valid=Interval(0.0, 0.5, hi_open=True),
        why="the half-width of the keep-probability window density +- epsilon, which must fit in (0, 1)",
    )

    CONSTRAINTS: ClassVar[tuple[Constraint, ...]] = (
        Constraint(
            keys=("density", "epsilon"), per_model=True,
            text="need density - epsilon > 0 and density + epsilon < 1 where 0 < density < 1",
            why="MagPrune keeps entries with probabilities from density - epsilon to density + epsilon; "
                "mergekit refuses a window outside (0, 1)",
            applies=lambda v: 0 < v["density"] < 1,
            # as mergekit tests it: density + epsilon >= 1 or density - epsilon <= 0 is an error
            margins=lambda v: (v["density"] - v["epsilon"], 1 - (v["density"] + v["epsilon"])),
        ),
    )


@dataclass(frozen=True, kw_only=True, slots=True)
class DellaParams(DellaLinearParams):
    """As ``della_linear`` with ``normalize`` on by default."""

    normalize: bool = method_param("normalize", True)


def dare_state(p: DareLinearParams, numel: int, dtype: torch.dtype, device: torch.device | str) -> DropState:
    """The whole-tensor rescale statistics DARE needs, for a chunked run (see ``trim.py``)."""
    return DropState(p.densities, p.rescale, numel, dtype, device)


def _dare(
    tensors: Sequence[Tensor], base: Tensor, p: DareLinearParams, ctx: TensorContext, elect: bool,
    state: DropState | None,
) -> Tensor:
    if state is None:  # the whole tensor is here: its rescale norms come from it
        state = dare_state(p, base.numel(), base.dtype, base.device).run(tensors, base, ctx)
    return generalized_task_arithmetic(
        tensors, base, p, sparsify=lambda d, i: state.sparsify(d, i, ctx), elect=elect,
        sparse=state.sparse(ctx, base.numel()),
    )


def dare_linear(
    tensors: Sequence[Tensor], base: Tensor, p: DareLinearParams, *, ctx: TensorContext, state: DropState | None = None
) -> Tensor:
    """DARE with a linear sum (arXiv 2311.03099, https://arxiv.org/abs/2311.03099).

    Keep each entry of ``d_i`` with probability ``k_i`` (keyed by seed, tensor, model, block), L1-rescale,
    then ``base + lambda * sum_i w_i d_i`` (divided by ``sum_i w_i`` if ``normalize``).

    Args:
        tensors: the non-base inputs.
        base: the base model's tensor.
        p: resolved parameters.
        ctx: tensor identity and seed, key the random masks.
        state: rescale statistics gathered over the whole tensor when the inputs are a block of
            rows (blocks then come in order); None computes them from the tensors given.

    Returns:
        The merged tensor, in ``base``'s dtype.
    """
    return _dare(tensors, base, p, ctx, elect=False, state=state)


def dare_ties(
    tensors: Sequence[Tensor], base: Tensor, p: DareTiesParams, *, ctx: TensorContext, state: DropState | None = None
) -> Tensor:
    """DARE drops with TIES sign election (arXiv 2311.03099, https://arxiv.org/abs/2311.03099).

    As ``dare_linear``, then ``mask_i = sign(w_i d_i) == sign(sum_j w_j d_j)`` before summing.

    Args:
        tensors: the non-base inputs.
        base: the base model's tensor.
        p: resolved parameters.
        ctx: tensor identity and seed, key the random masks.
        state: rescale statistics gathered over the whole tensor when the inputs are a block of
            rows (blocks then come in order); None computes them from the tensors given.

    Returns:
        The merged tensor, in ``base``'s dtype.
    """
    return _dare(tensors, base, p, ctx, elect=True, state=state)


def breadcrumbs_state(p: BreadcrumbsParams, numel: int, dtype: torch.dtype, device: torch.device | str) -> OutlierState:
    """The whole-tensor magnitude thresholds (and rescale norms) Breadcrumbs needs, for a chunked run."""
    return OutlierState(p.densities, p.gammas, p.rescale, numel, dtype, device)


def _breadcrumbs(
    tensors: Sequence[Tensor], base: Tensor, p: BreadcrumbsParams, elect: bool, state: OutlierState | None
) -> Tensor:
    if state is None:  # the whole tensor is here: its thresholds come from it
        state = breadcrumbs_state(p, base.numel(), base.dtype, base.device).run(tensors, base)
    return generalized_task_arithmetic(tensors, base, p, sparsify=state.sparsify, elect=elect, sparse=state.sparse())


def breadcrumbs(
    tensors: Sequence[Tensor], base: Tensor, p: BreadcrumbsParams, *, ctx: TensorContext,
    state: OutlierState | None = None,
) -> Tensor:
    """Model Breadcrumbs (arXiv 2312.06795, https://arxiv.org/abs/2312.06795).

    In each ``d_i`` drop the ``int(gamma_i * numel)`` largest and the smallest magnitudes, keeping
    ``int(k_i * numel)``; then ``base + lambda * sum_i w_i d_i``.

    Args:
        tensors: the non-base inputs.
        base: the base model's tensor.
        p: resolved parameters.
        ctx: tensor identity (unused: deterministic).
        state: the two magnitude thresholds per model gathered over the whole tensor when the
            inputs are a block of rows (blocks then come in order); None computes them from the
            tensors given.

    Returns:
        The merged tensor, in ``base``'s dtype.
    """
    return _breadcrumbs(tensors, base, p, elect=False, state=state)


def breadcrumbs_ties(
    tensors: Sequence[Tensor], base: Tensor, p: BreadcrumbsTiesParams, *, ctx: TensorContext,
    state: OutlierState | None = None,
) -> Tensor:
    """Model Breadcrumbs with TIES sign election (arXiv 2312.06795, https://arxiv.org/abs/2312.06795).

    Args:
        tensors: the non-base inputs.
        base: the base model's tensor.
        p: resolved parameters.
        ctx: tensor identity (unused: deterministic).
        state: as in ``breadcrumbs``.

    Returns:
        The merged tensor, in ``base``'s dtype.
    """
    return _breadcrumbs(tensors, base, p, elect=True, state=state)


def della_state(p: DellaLinearParams, numel: int, dtype: torch.dtype, device: torch.device | str) -> DellaState:
    """The whole-tensor rescale norms DELLA needs, for a chunked run (its ranks are per row)."""
    return DellaState(p.densities, p.epsilons, p.rescale, numel, dtype, device)


def _della(
    tensors: Sequence[Tensor], base: Tensor, p: DellaLinearParams, ctx: TensorContext, elect: bool,
    state: DellaState | None,
) -> Tensor:
    if state is None:  # the whole tensor is here: its rescale norms come from it
        state = della_state(p, base.numel(), base.dtype, base.device).run(tensors, base, ctx)
    return generalized_task_arithmetic(
        tensors, base, p, sparsify=lambda d, i: state.sparsify(d, i, ctx), elect=elect
    )


def della(
    tensors: Sequence[Tensor], base: Tensor, p: DellaParams, *, ctx: TensorContext, state: DellaState | None = None
) -> Tensor:
    """DELLA-Merging (arXiv 2406.11617, https://arxiv.org/abs/2406.11617).

    MagPrune each ``d_i``: keep with ``p = k_i - eps_i + 2 eps_i r`` (``r`` = normalized magnitude rank
    in its row), L1-rescale, elect signs, then as ``ties``.

    Args:
        tensors: the non-base inputs.
        base: the base model's tensor.
        p: resolved parameters.
        ctx: tensor identity and seed, key the random masks.
        state: rescale norms gathered over the whole tensor when the inputs are a block of rows
            (blocks then come in order); None computes them from the tensors given.

    Returns:
        The merged tensor, in ``base``'s dtype.

    Raises:
        ValueError: unless ``0 < k_i - eps_i`` and ``k_i + eps_i < 1`` (for ``0 < k_i < 1``).
    """
    return _della(tensors, base, p, ctx, elect=True, state=state)


def della_linear(
    tensors: Sequence[Tensor], base: Tensor, p: DellaLinearParams, *, ctx: TensorContext,
    state: DellaState | None = None,
) -> Tensor:
    """DELLA MagPrune with a linear sum (arXiv 2406.11617, https://arxiv.org/abs/2406.11617).

    Args:
        tensors: the non-base inputs.
        base: the base model's tensor.
        p: resolved parameters.
        ctx: tensor identity and seed, key the random masks.
        state: as in ``della``.

    Returns:
        The merged tensor, in ``base``'s dtype.

    Raises:
        ValueError: unless ``0 < k_i - eps_i`` and ``k_i + eps_i < 1`` (for ``0 < k_i < 1``).
    """
    return _della(tensors, base, p, ctx, elect=False, state=state)
