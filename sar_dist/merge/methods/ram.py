"""Reinforced Agent Merging (RAM) and RAM+ tensor-local: keep unique updates whole, average overlaps."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from sar_dist.merge.base import TensorContext, method_param

RAM_URL = "https://arxiv.org/abs/2601.13572"


@dataclass(frozen=True, kw_only=True, slots=True)
class RamParams:
    """Parameters of ``ram`` (no weights: RAM ignores them).

    Attributes:
        epsilon: ``epsilon``, an entry is an update where ``|x_i - base| > epsilon`` (default 1e-5).
    """

    epsilon: float = method_param("epsilon", 1e-5)


@dataclass(frozen=True, kw_only=True, slots=True)
class RamplusTlParams:
    """Parameters of ``ramplus_tl``.

    Attributes:
        r: ``r``, strength of the unique-entry boost (default 0.1).
        alpha: ``alpha``, cap on the overlap ratio (default 0.2).
        epsilon: ``epsilon``, update threshold and floor of the unique count (default 1e-5).
    """

    r: float = method_param("r", 0.1)
    alpha: float = method_param("alpha", 0.2)
    epsilon: float = method_param("epsilon", 1e-5)


def _split_updates(tensors: Sequence[Tensor], base: Tensor, epsilon: float) -> tuple[Tensor, Tensor, Tensor]:
    """Stacked task vectors zeroed where ``|t| <= epsilon``, the update mask, and the per-entry count."""
    tv = torch.stack([x - base for x in tensors])
    updated = tv.abs() > epsilon
    count = updated.sum(dim=0)
    tv.mul_(updated)
    return tv, updated, count


def ram(tensors: Sequence[Tensor], base: Tensor, p: RamParams, *, ctx: TensorContext) -> Tensor:
    """RAM (arXiv 2601.13572, https://arxiv.org/abs/2601.13572).

    ``t_i = x_i - base`` zeroed where ``|t_i| <= epsilon``; ``c = #{i : |t_i| > epsilon}``;
    ``base + sum_i t_i / max(c, 1)``: an update made by one model is kept whole, overlaps are averaged
    over their contributors. Computed in the input dtype, like mergekit.

    Args:
        tensors: the non-base inputs.
        base: the base model's tensor.
        p: resolved parameters.
        ctx: tensor identity (unused: deterministic).

    Returns:
        The merged tensor, in ``base``'s dtype.
    """
    tv, _, count = _split_updates(tensors, base, p.epsilon)
    # Each term is divided before the sum over models, as mergekit does (same rounding).
    return base + tv.div_(count.clamp(min=1)).sum(dim=0)


def ramplus_tl(tensors: Sequence[Tensor], base: Tensor, p: RamplusTlParams, *, ctx: TensorContext) -> Tensor:
    """RAM+ tensor-local (arXiv 2601.13572, https://arxiv.org/abs/2601.13572).

    As ``ram``, but model i's unique updates (``c == 1``) are scaled by
    ``1 + r * clamp(rho_i, 0, alpha)``, ``rho_i = n_shared_i / max(n_unique_i, epsilon)``, counting
    model i's updates in the overlap (``c > 1``) and alone over the whole tensor. The boost is a
    float32 factor, so as in mergekit the unique part and the sum are float32 for half-precision
    inputs; the result is cast back to ``base``'s dtype.

    Args:
        tensors: the non-base inputs.
        base: the base model's tensor.
        p: resolved parameters.
        ctx: tensor identity (unused: deterministic).

    Returns:
        The merged tensor, in ``base``'s dtype.
    """
    tv, updated, count = _split_updates(tensors, base, p.epsilon)
    unique = count == 1
    overlap = count > 1
    dims = tuple(range(1, tv.dim()))
    num_shared = (updated & overlap).sum(dim=dims)
    num_unique = (updated & unique).sum(dim=dims)
    del updated
    rho = num_shared / num_unique.clamp(min=p.epsilon)  # float32, like mergekit
    boost = (1 + p.r * rho.clamp(min=0, max=p.alpha)).view(-1, *([1] * base.dim()))
    overlap_part = tv * overlap / count.clamp(min=1)
    unique_part = tv.mul_(unique) * boost
    return (base + (unique_part + overlap_part).sum(dim=0)).to(base.dtype)
