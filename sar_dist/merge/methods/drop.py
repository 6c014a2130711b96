"""Keep-masks that a block of rows determines alone, with the whole-tensor L1 rescale in one pass.

DARE's keyed Bernoulli drop (``ops.keyed_uniform`` at ``ctx.offset``) is elementwise and DELLA's
MagPrune ranks magnitudes within a row, so a block of whole rows gets exactly its part of the
whole mask. Only the rescale ``||d_i||_1 / ||d_i * mask_i||_1`` needs the whole tensor: per-row
float64 L1 sums, gathered in one pass over the row blocks as in ``trim.BandState`` (docs/methods.md).
"""

from __future__ import annotations

import abc
from collections.abc import Sequence

import torch
from torch import Tensor

from sar_dist.merge import ops
from sar_dist.merge.base import TensorContext
from sar_dist.merge.methods.trim import EntrySparsifier


class _MaskRescaleState(abc.ABC):
    """Keep-masks that a block of rows determines alone; only the L1 rescale factor
    ``||d_i||_1 / ||d_i * mask_i||_1`` needs the whole tensor: one pass of per-row float64 L1 sums,
    as in :class:`BandState` (holds O(rows) float64 per model).

    Args:
        masked: per model, whether its task vector is masked at all.
        rescale: whether to L1-rescale.
        numel: elements in the whole tensor.
        dtype: compute dtype.
    """

    def __init__(self, masked: Sequence[bool], rescale: bool, numel: int, dtype: torch.dtype):
        self.rescale = rescale
        self._numel = numel
        self._dtype = dtype
        self._masked = tuple(masked)
        self._factors: list[Tensor | None] = [None] * len(self._masked)
        self._l1 = [(ops.RowSums(numel), ops.RowSums(numel)) for _ in self._masked]
        self._pending = rescale and any(self._masked)
        self._held: Tensor | None = None

    def hold_masks(self) -> None:
        """Keep the masks of the norms pass for the merge that follows, which then draws no random
        numbers again: one bool per entry and model, in one buffer, for a tensor held whole in
        memory (the planner's per-entry scratch of a unit covers it)."""
        if self._pending:
            self._held = torch.empty((len(self._masked), self._numel), dtype=torch.bool)

    def _held_mask(self, i: int, ctx: TensorContext, numel: int) -> Tensor | None:
        """Model ``i``'s held mask of the block of ``numel`` entries at ``ctx.offset`` (flat), if held."""
        return None if self._held is None else self._held[i, ctx.offset:ctx.offset + numel]

    @abc.abstractmethod
    def _keep_mask(self, delta: Tensor, i: int, ctx: TensorContext) -> Tensor:
        """Model ``i``'s keep-mask of a block of rows (its first element at ``ctx.offset``)."""

    def needs_pass(self) -> bool:
        """Whether the norms pass over all row chunks is still needed."""
        return self._pending

    def observe(self, tensors: Sequence[Tensor], base: Tensor, ctx: TensorContext | None = None) -> None:
        """Feed one row chunk (``ctx.offset`` at its first element)."""
        assert ctx is not None, "the masks are keyed by the tensor context"
        for i, x in enumerate(tensors):
            if self._masked[i]:
                d = x - base
                keep = self._keep_mask(d, i, ctx)
                if self._held is not None:
                    self._held[i, ctx.offset:ctx.offset + keep.numel()].copy_(keep.reshape(-1))
                before, after = self._l1[i]
                ops.row_l1(d, out=before.slot(d))
                ops.row_l1(ops.mask_product(d, keep), out=after.slot(d))

    def end_pass(self) -> None:
        """Close the norms pass."""
        for i, (before, after) in enumerate(self._l1):
            if self._masked[i]:
                self._factors[i] = ops.rescale_factor(before.pieces(), after.pieces(), self._dtype)
        self._l1 = []
        self._pending = False

    def run(self, tensors: Sequence[Tensor], base: Tensor, ctx: TensorContext) -> _MaskRescaleState:
        """The pass over a whole tensor given as one chunk."""
        while self.needs_pass():
            self.observe(tensors, base, ctx)
            self.end_pass()
        return self

    def sparsify(self, delta: Tensor, i: int, ctx: TensorContext) -> Tensor:
        """Mask the next row chunk of model ``i``'s task vector (after the pass)."""
        assert not self.needs_pass()
        if not self._masked[i]:
            return delta
        held = self._held_mask(i, ctx, delta.numel())
        return self._apply(delta, held.view(delta.shape) if held is not None else self._keep_mask(delta, i, ctx), i)

    def _apply(self, delta: Tensor, keep: Tensor, i: int) -> Tensor:
        masked = ops.mask_product(delta, keep)
        factor = self._factors[i]
        return masked.mul_(factor.to(masked.device)) if self.rescale and factor is not None else masked


class DropState(_MaskRescaleState):
    """DARE's L1 rescale: the keyed Bernoulli mask ``u < k_i`` (``ops.keyed_uniform`` at
    ``ctx.offset``) is elementwise.

    Args:
        densities: keep probability ``k_i`` per model.
        rescale: whether to L1-rescale.
        numel: elements in the whole tensor.
        dtype: compute dtype.
        device: compute device (unused).
    """

    def __init__(self, densities: Sequence[float], rescale: bool, numel: int, dtype: torch.dtype,
                 device: torch.device | str):
        self.densities = tuple(densities)
        super().__init__([k < 1 for k in self.densities], rescale, numel, dtype)

    def _keep_mask(self, delta: Tensor, i: int, ctx: TensorContext) -> Tensor:
        return ops.keyed_keep_mask(delta, self.densities[i], ctx, i)

    def sparse(self, ctx: TensorContext, numel: int) -> EntrySparsifier | None:
        """:meth:`sparsify` on chosen entries of the block of ``numel`` entries at ``ctx.offset``
        (``generalized_task_arithmetic(sparse=)``: the keyed mask is elementwise), or None where a
        rescale factor is not finite (a signed zero would not stay one)."""
        if not ops.keeps_zeros(self._factors):
            return None

        def entries(values: Tensor, i: int, positions: Tensor) -> Tensor:
            if not self._masked[i]:
                return values
            held = self._held_mask(i, ctx, numel)
            if held is not None:
                return self._apply(values, held.index_select(0, positions), i)
            # the block's whole stream is drawn (each generator runs from its random block's
            # start), then compared where asked: ``u < k`` as keyed_keep_mask compares it
            u = ops.keyed_uniform(ctx, i, numel).index_select(0, positions.cpu())
            return self._apply(values, ops.below(u, self.densities[i]).to(positions.device), i)

        return entries


class DellaState(_MaskRescaleState):
    """DELLA's L1 rescale: the MagPrune mask ranks magnitudes within a row (dim 1) and draws from
    the keyed stream at ``ctx.offset``, so a block of whole rows of a >= 2-D tensor gets exactly
    its part of the whole mask (``ops.della_keep_mask``).

    Args:
        densities: mean keep probability ``k_i`` per model (>= 1 keeps all, <= 0 zeros).
        epsilons: keep-probability half-width per model.
        rescale: whether to L1-rescale.
        numel: elements in the whole tensor.
        dtype: compute dtype.
        device: compute device (unused).
    """

    def __init__(self, densities: Sequence[float], epsilons: Sequence[float], rescale: bool, numel: int,
                 dtype: torch.dtype, device: torch.device | str):
        self.densities, self.epsilons = tuple(densities), tuple(epsilons)
        super().__init__([0 < k < 1 for k in self.densities], rescale, numel, dtype)

    def _keep_mask(self, delta: Tensor, i: int, ctx: TensorContext) -> Tensor:
        return ops.della_keep_mask(delta, self.densities[i], self.epsilons[i], ctx=ctx, model_index=i)

    def sparsify(self, delta: Tensor, i: int, ctx: TensorContext) -> Tensor:
        """MagPrune the next row chunk of model ``i``'s task vector (after the pass)."""
        if self.densities[i] <= 0:
            return torch.zeros_like(delta)
        return super().sparsify(delta, i, ctx)
