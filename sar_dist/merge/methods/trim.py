"""TIES' magnitude trim as a whole-tensor state gathered in passes, so huge tensors can be
merged in row chunks with exactly the result of the whole-tensor merge.

Per model ``i`` with ``0 < k_i < 1``: keep the ``max(1, int(k_i * numel))`` largest ``|d_i|``
(``d_i = x_i - base``; ties at the threshold by lowest flattened index), optionally L1-rescaled
``masked * (||d_i||_1 / ||masked||_1)`` (METHODS.md). Passes, each over all row chunks in order:
1. count the nonzero entries of each ``d_i``: when every nonzero entry is kept anyway (RLVR task
   vectors are mostly exact zeros) the trim is the identity and needs no threshold;
2. find the exact threshold: one ``kthvalue`` over the nonzero magnitudes kept from pass 1 when
   they are few (at most 2**22 per model: 16 MiB in fp32, whatever the tensor size), else a radix select on the float bits
   (``ops.MagnitudeSelector``: 2 passes for fp32, 1 for bf16);
3. with ``rescale``: both L1 norms, as float64 sums of per-row float64 sums (identical for any
   chunking and thread count), then rounded to the compute dtype as mergekit's sums are.
Then the merge runs chunk by chunk with :meth:`TrimState.sparsify`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from sar_dist.merge import ops
from sar_dist.merge.base import TensorContext

MAX_KEPT_MAGNITUDES = 2**22
"""Nonzero magnitudes a model may keep from the counting pass (a fixed bound, so the memory of
the state stays small beside the budget even for a 128k x 8192 embedding; more falls back to radix)."""


class TrimState:
    """Whole-tensor statistics of the magnitude trim of each model's task vector.

    Args:
        densities: ``k_i`` per model.
        rescale: whether to L1-rescale each trimmed task vector.
        numel: elements in the whole tensor.
        dtype: compute dtype.
        device: compute device.
    """

    def __init__(self, densities: Sequence[float], rescale: bool, numel: int, dtype: torch.dtype,
                 device: torch.device | str):
        self.densities, self.rescale, self.numel = tuple(densities), rescale, numel
        self._dtype, self._device = dtype, device
        self._trimmed = [0 < k < 1 for k in self.densities]
        self._nonzero = [0] * len(self.densities)
        self._selectors: list[ops.MagnitudeSelector | None] = [None] * len(self.densities)
        self._factors: list[Tensor | None] = [None] * len(self.densities)
        self._phase = "count" if any(self._trimmed) else "ready"
        self._l1: list[tuple[list[Tensor], list[Tensor]]] = []
        self._values: list[list[Tensor] | None] = [[] for _ in self.densities]
        self._num_values = [0] * len(self.densities)
        self._max_values = MAX_KEPT_MAGNITUDES

    def needs_pass(self) -> bool:
        """Whether another pass over all row chunks (in order) is needed."""
        return self._phase != "ready"

    def observe(self, tensors: Sequence[Tensor], base: Tensor, ctx: TensorContext | None = None) -> None:
        """Feed one row chunk of the inputs (compute dtype) during a pass (``ctx`` unused)."""
        self._observe_deltas([x - base if self._trimmed[i] else None for i, x in enumerate(tensors)])

    def _observe_deltas(self, deltas: Sequence[Tensor | None]) -> None:
        for i, d in enumerate(deltas):
            if d is None:
                continue
            if self._phase == "count":
                nz = d[d != 0]
                self._nonzero[i] += nz.numel()
                # keep the nonzero magnitudes while they are few (sparse RLVR updates): the exact
                # threshold is then one selection on them, with no radix passes
                if self._values[i] is not None and self._num_values[i] + nz.numel() <= self._max_values:
                    self._values[i].append(nz.abs())
                    self._num_values[i] += nz.numel()
                else:
                    self._values[i] = None
            elif self._phase == "select":
                sel = self._selectors[i]
                if sel is not None and sel.needs_pass():
                    sel.observe(d)
            elif self._phase == "norms" and self._selectors[i] is not None:
                before, after = self._l1[i]
                before.append(ops.row_l1(d))
                after.append(ops.row_l1(d * self._selectors[i].mask(d)))

    def end_pass(self) -> None:
        """Close a pass: decide the next one."""
        if self._phase == "count":
            for i, k in enumerate(self.densities):
                keep = max(1, int(k * self.numel))
                if self._trimmed[i] and keep < self._nonzero[i]:
                    sel = ops.MagnitudeSelector(self.numel, keep, self._dtype, self._device)
                    if self._values[i] is not None:
                        sel.resolve_from_values(torch.cat(self._values[i]))
                    self._selectors[i] = sel
            self._values = []
            self._phase = "select"
        elif self._phase == "select":
            for sel in self._selectors:
                if sel is not None and sel.needs_pass():
                    sel.end_pass()
        elif self._phase == "norms":
            for i, (before, after) in enumerate(self._l1):
                if self._selectors[i] is None:
                    continue
                self._factors[i] = ops.rescale_factor(before, after, self._dtype)
                self._selectors[i].rewind()
            self._l1 = []
            self._phase = "ready"
            return
        if self._phase == "select" and not any(s is not None and s.needs_pass() for s in self._selectors):
            if self.rescale and any(s is not None for s in self._selectors):
                self._phase = "norms"
                self._l1 = [([], []) for _ in self.densities]
            else:
                self._phase = "ready"

    def run(self, tensors: Sequence[Tensor], base: Tensor) -> TrimState:
        """All passes over a whole tensor given as one chunk (its task vectors computed once)."""
        if not self.needs_pass():
            return self
        return self.run_deltas([x - base if self._trimmed[i] else None for i, x in enumerate(tensors)])

    def run_deltas(self, deltas: Sequence[Tensor | None]) -> TrimState:
        """All passes over whole task vectors (None for a model that is not trimmed)."""
        while self.needs_pass():
            self._observe_deltas(deltas)
            self.end_pass()
        return self

    def sparsify(self, delta: Tensor, i: int) -> Tensor:
        """Trim the next row chunk of model ``i``'s task vector (chunks in order, after the passes)."""
        assert not self.needs_pass()
        k = self.densities[i]
        if k >= 1:
            return delta
        if k <= 0:
            return torch.zeros_like(delta)
        sel = self._selectors[i]
        if sel is None:  # every nonzero entry is kept: the trim (and its rescale) is the identity
            return delta
        masked = delta * sel.mask(delta)
        factor = self._factors[i]
        return masked.mul_(factor.to(masked.device)) if self.rescale and factor is not None else masked


class DropState:
    """DARE's L1 rescale as whole-tensor statistics, so DARE runs in row chunks too.

    The keyed Bernoulli mask (``u < k_i``, ``ops.keyed_uniform`` at ``ctx.offset``) is elementwise;
    only the rescale factor ``||d_i||_1 / ||d_i * mask_i||_1`` needs the whole tensor: one pass of
    per-row float64 L1 sums, as in :class:`TrimState`.

    Args:
        densities: keep probability ``k_i`` per model.
        rescale: whether to L1-rescale.
        numel: elements in the whole tensor (unused: the mask is elementwise).
        dtype: compute dtype.
        device: compute device.
    """

    def __init__(self, densities: Sequence[float], rescale: bool, numel: int, dtype: torch.dtype,
                 device: torch.device | str):
        self.densities, self.rescale = tuple(densities), rescale
        self._dtype = dtype
        self._dropped = [k < 1 for k in self.densities]
        self._factors: list[Tensor | None] = [None] * len(self.densities)
        self._l1: list[tuple[list[Tensor], list[Tensor]]] = [([], []) for _ in self.densities]
        self._pending = rescale and any(self._dropped)

    def needs_pass(self) -> bool:
        """Whether the norms pass over all row chunks is still needed."""
        return self._pending

    def observe(self, tensors: Sequence[Tensor], base: Tensor, ctx: TensorContext | None = None) -> None:
        """Feed one row chunk (``ctx.offset`` at its first element)."""
        assert ctx is not None, "the drop mask is keyed by the tensor context"
        for i, x in enumerate(tensors):
            if self._dropped[i]:
                d = x - base
                before, after = self._l1[i]
                before.append(ops.row_l1(d))
                after.append(ops.row_l1(d * ops.keyed_keep_mask(d, self.densities[i], ctx, i)))

    def end_pass(self) -> None:
        """Close the norms pass."""
        for i, (before, after) in enumerate(self._l1):
            if self._dropped[i]:
                self._factors[i] = ops.rescale_factor(before, after, self._dtype)
        self._l1 = []
        self._pending = False

    def run(self, tensors: Sequence[Tensor], base: Tensor, ctx: TensorContext) -> DropState:
        """The pass over a whole tensor given as one chunk."""
        while self.needs_pass():
            self.observe(tensors, base, ctx)
            self.end_pass()
        return self

    def sparsify(self, delta: Tensor, i: int, ctx: TensorContext) -> Tensor:
        """Drop entries of the next row chunk of model ``i``'s task vector (after the pass)."""
        assert not self.needs_pass()
        if not self._dropped[i]:
            return delta
        masked = delta * ops.keyed_keep_mask(delta, self.densities[i], ctx, i)
        factor = self._factors[i]
        return masked.mul_(factor.to(masked.device)) if self.rescale and factor is not None else masked


def magnitude_sparsify(delta: Tensor, density: float, rescale: bool) -> Tensor:
    """TIES trim of one whole task vector: keep the ``max(1, int(density * numel))`` largest ``|d|``.

    The single-tensor form of :class:`TrimState` (the code ``ties`` runs).

    Args:
        delta: the task vector.
        density: fraction to keep; >= 1 returns ``delta`` unchanged (no rescale), <= 0 zeros.
        rescale: L1-norm rescale after masking.

    Returns:
        The sparsified tensor, in ``delta``'s dtype.
    """
    state = TrimState((density,), rescale, delta.numel(), delta.dtype, delta.device)
    return state.run_deltas([delta]).sparsify(delta, 0)
