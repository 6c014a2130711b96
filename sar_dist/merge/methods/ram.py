"""Reinforced Agent Merging (RAM) and RAM+ tensor-local: keep unique updates whole, average overlaps.

``ram`` is elementwise. ``ramplus_tl``'s boost needs two whole-tensor counts per model (its updates
in the overlap and alone); integer sums are exact in any order, so :class:`RamplusState` adds them
up over row blocks in one pass and a chunked run gives the whole-tensor bits.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from sar_dist.merge.base import NON_NEGATIVE, POSITIVE, TensorContext, method_param

RAM_URL = "https://arxiv.org/abs/2601.13572"


@dataclass(frozen=True, kw_only=True, slots=True)
class RamParams:
    """Parameters of ``ram`` (no weights: RAM ignores them).

    Attributes:
        epsilon: ``epsilon``, an entry is an update where ``|x_i - base| > epsilon`` (default 1e-5).
    """

    epsilon: float = method_param(
        "epsilon", 1e-5, valid=NON_NEGATIVE, why="a threshold on |x_i - base|; 0 counts every changed entry"
    )


@dataclass(frozen=True, kw_only=True, slots=True)
class RamplusTlParams:
    """Parameters of ``ramplus_tl``.

    Attributes:
        r: ``r``, strength of the unique-entry boost (default 0.1).
        alpha: ``alpha``, cap on the overlap ratio (default 0.2).
        epsilon: ``epsilon``, update threshold and floor of the unique count (default 1e-5).
    """

    r: float = method_param(
        "r", 0.1, valid=NON_NEGATIVE,
        why="the strength of the boost of unique updates; a negative r would shrink them (and flip them below -1/alpha)",
    )
    alpha: float = method_param(
        "alpha", 0.2, valid=NON_NEGATIVE, why="a cap on the overlap ratio rho, which is >= 0"
    )
    epsilon: float = method_param(
        "epsilon", 1e-5, valid=POSITIVE,
        why="it also floors the unique-update count rho divides by: 0 gives 0/0 = NaN for a model that "
            "changes nothing in a tensor",
    )


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


def _overlap_counts(updated: Tensor, count: Tensor) -> tuple[Tensor, Tensor]:
    """Per model: its updates where several models update (``c > 1``) and where it alone does (int64)."""
    dims = tuple(range(1, updated.dim()))
    return (updated & (count > 1)).sum(dim=dims), (updated & (count == 1)).sum(dim=dims)


class RamplusState:
    """``ramplus_tl``'s whole-tensor counts, summed over row blocks in one pass (O(models) int64).

    Args:
        epsilon: update threshold.
        numel: elements in the whole tensor (unused: the counts are sums).
        dtype: compute dtype (unused).
        device: compute device (unused).
    """

    def __init__(self, epsilon: float, numel: int, dtype: torch.dtype, device: torch.device | str):
        self.epsilon = epsilon
        self.num_shared: Tensor | None = None
        self.num_unique: Tensor | None = None
        self._pending = True

    def needs_pass(self) -> bool:
        """Whether the counting pass over all row blocks is still needed."""
        return self._pending

    def observe(self, tensors: Sequence[Tensor], base: Tensor, ctx: TensorContext | None = None) -> None:
        """Count one row block's updates (``ctx`` unused)."""
        _, updated, count = _split_updates(tensors, base, self.epsilon)
        shared, unique = _overlap_counts(updated, count)
        self.num_shared = shared if self.num_shared is None else self.num_shared + shared
        self.num_unique = unique if self.num_unique is None else self.num_unique + unique

    def end_pass(self) -> None:
        """Close the counting pass."""
        assert self.num_shared is not None, "the pass must observe the blocks"
        self._pending = False


def ramplus_tl_state(p: RamplusTlParams, numel: int, dtype: torch.dtype, device: torch.device | str) -> RamplusState:
    """The whole-tensor counts ``ramplus_tl`` needs, for a chunked run."""
    return RamplusState(p.epsilon, numel, dtype, device)


def ramplus_tl(
    tensors: Sequence[Tensor], base: Tensor, p: RamplusTlParams, *, ctx: TensorContext,
    state: RamplusState | None = None,
) -> Tensor:
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
        state: the counts gathered over the whole tensor when the inputs are a block of rows;
            None counts over the tensors given.

    Returns:
        The merged tensor, in ``base``'s dtype.
    """
    tv, updated, count = _split_updates(tensors, base, p.epsilon)
    if state is None:  # the whole tensor is here: count over it
        num_shared, num_unique = _overlap_counts(updated, count)
    else:
        assert state.num_shared is not None and state.num_unique is not None and not state.needs_pass()
        num_shared, num_unique = state.num_shared, state.num_unique
    del updated
    rho = num_shared / num_unique.clamp(min=p.epsilon)  # float32, like mergekit
    boost = (1 + p.r * rho.clamp(min=0, max=p.alpha)).view(-1, *([1] * base.dim()))
    overlap = count > 1
    overlap_part = tv * overlap / count.clamp(min=1)
    unique_part = tv.mul_(count == 1) * boost
    return (base + (unique_part + overlap_part).sum(dim=0)).to(base.dtype)
